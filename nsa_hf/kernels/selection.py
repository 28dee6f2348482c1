"""
Triton kernel for NSA block selection (Eqs. 8-11): score the selection blocks of every query from the compressed
attention's probabilities and keep the top-n, without ever materialising a `[T, T/d]` or `[T, T/l']` tensor.

Semantics are exactly `select_blocks_ref(selection_scores_ref(...))` of `reference.py`.

Design (one program = a tile of BM query positions x ALL G query heads of one KV head):
- rows of the tile are (position, head) pairs, `BM * G_PAD` of them (G padded to a power of two), so small GQA
  groups still give tensor-core tiles of >= 16 rows; q is loaded once per program. Which bits of the row index hold
  the head (`HEAD_MASK`, see `_head_mask`) is chosen so that the head sum of Eq. 10 runs mostly inside threads
  (register bits of the accumulator layout) rather than across lanes; any choice gives the same result;
- the program streams over chunks of BS selection blocks, i.e. the `BS * r` compression blocks that start inside
  them (r = l'/d), up to the tile's causal limit only: P = exp2(q.K_cmp * scale*log2(e) - lse*log2(e)) with one
  `tl.dot`, masked to the visible compression blocks, summed over the heads of the group in registers (Eq. 10);
- Eq. 9 by index arithmetic: compression block i = j*r + k starts inside selection block j and overlaps it by
  min(c, r-k) strides (c = l/d) and block j+1 by max(0, c-r+k) strides (l <= l' so never further). The spill into
  the next block is shifted by one block with `tl.gather` and carried across chunks;
- (score, block) is packed into one int64 key: the float32 bits of the (non-negative) score in the high word, so
  integer order = score order, and `2^31-1-j` in the low word, so ties go to the lower block. Fixed blocks get the
  bits of +inf, ineligible ones the key -1. A chunk's keys are reduced with `tl.topk` (bitonic) to its best N_PAD,
  merged into the running best N_PAD (kept sorted, in registers) by the bitonic half-cleaner
  `max(run, flip(top))` + `tl.bitonic_merge`, so a merge costs O(N_PAD log N_PAD) per query;
- at the end the n best blocks are decoded, sorted ascending, padded with -1 and written: `[B, Tq, HKV, n]` int32.

Work is O(Tq * HQ * Nc_visible * DK) (the same dot as the compressed attention's logits: one exp2 per query head and
visible compression block) plus O(Tq * HKV * NS_visible * log^2 N_PAD) for the merges; memory O(Tq * HKV * n).
The heaviest (last) query tiles are launched first. Tiles come from an autotuned list (`_tiling.SELECTION_CONFIGS`);
the interpreter, tests (`override(selection_tile=...)`) and split launches use one fixed tile.

Few queries with long keys (decoding) split the selection blocks over several programs; each writes its best
N_PAD keys (O(Tq * HKV * splits * n) int64) and a small PyTorch pass merges them.
"""

import torch
import triton
import triton.language as tl
from triton.runtime.jit import constexpr_function

from ._checks import check_block_sizes, check_kernel_inputs, check_packing
from ._geometry import Geometry, geometry
from ._tiling import (
    DECODE_ROWS,
    INTERPRET,
    LOG2E,
    SELECTION_CONFIGS,
    SWITCHES,
    TIMED,
    choose_configs,
    device_limits,
    next_pow2,
    split_head_dim,
    tuning,
)

_MAX_LOW = 2**31 - 1  # low word of a key is _MAX_LOW - block index
KEY_MAX_LOW = tl.constexpr(_MAX_LOW)
KEY_INF_BITS = tl.constexpr(0x7F800000)  # float32 +inf as int32: the score of a fixed block


@constexpr_function
def _log2(x):
    return int(x).bit_length() - 1


@constexpr_function
def _rank_below(mask, b):
    """Number of set bits of `mask` below bit `b` (where bit b of a row index lands in the head or position index)."""
    return bin(int(mask) & ((1 << int(b)) - 1)).count("1")


@constexpr_function
def _rank_above(mask, b):
    return bin(int(mask) >> (int(b) + 1)).count("1")


@constexpr_function
def _bit_set(mask, b):
    return (int(mask) >> int(b)) & 1 == 1


# ----------------------------------------------------------------------------------------------------------------
# The kernel
# ----------------------------------------------------------------------------------------------------------------


# Integer arguments that change with the prompt length: never specialised (why: band_attention._BAND_FWD_VARYING).
_SELECT_VARYING = [
    "stride_lb", "stride_ob", "q_len", "k_len", "nc_len", "num_bh", "max_q", "num_splits", "split_chunks",
]


@triton.jit
def _chunk_scores(
    q1, q2, lse2, t_row, k_base, stride_kt, ci, nc_doc, scale_log2, carry,
    BM: tl.constexpr, G_PAD: tl.constexpr, DK: tl.constexpr, D1: tl.constexpr, D2: tl.constexpr,
    CMP_LEN: tl.constexpr, STRIDE: tl.constexpr, R: tl.constexpr, R_PAD: tl.constexpr, C: tl.constexpr,
    BS: tl.constexpr, HEAD_MASK: tl.constexpr, MASK_CAUSAL: tl.constexpr, FP32_DOT: tl.constexpr,
):
    """
    Scores `[BM, BS]` of the selection blocks `ci*BS .. ci*BS+BS-1` for the BM query positions of the tile, summed
    over the heads of the group, plus the spill `[BM]` of the chunk's last block into the next chunk's first block.
    `carry` is the spill of the previous chunk into this chunk's first block.
    """
    BC: tl.constexpr = BS * R_PAD
    cols = tl.arange(0, BC)
    grp = cols // R_PAD
    kk = cols % R_PAD
    cmp_idx = (ci * BS + grp) * R + kk  # compression block of each column
    # In the unmasked variant every compression block of the chunk exists and is visible to every row.
    if MASK_CAUSAL:
        col_ok = cmp_idx < nc_doc
        if R_PAD != R:
            col_ok = col_ok & (kk < R)
    else:
        col_ok = kk < R
    d1 = tl.arange(0, D1)
    k_ptrs = k_base + cmp_idx[None, :] * stride_kt + d1[:, None]
    if D1 == DK and (MASK_CAUSAL or R_PAD != R):
        k1 = tl.load(k_ptrs, mask=col_ok[None, :], other=0.0)
    elif D1 == DK:
        k1 = tl.load(k_ptrs)
    else:
        k1 = tl.load(k_ptrs, mask=col_ok[None, :] & (d1[:, None] < DK), other=0.0)
    if FP32_DOT:  # float32 inputs: 3 tf32 passes, about float32 accuracy on tensor cores
        s = tl.dot(q1, k1, input_precision="tf32x3")
    else:
        s = tl.dot(q1, k1)
    if D2 > 0:
        d2 = D1 + tl.arange(0, D2)
        k2 = tl.load(k_base + cmp_idx[None, :] * stride_kt + d2[:, None], mask=col_ok[None, :] & (d2[:, None] < DK),
                     other=0.0)
        if FP32_DOT:
            s += tl.dot(q2, k2, input_precision="tf32x3")
        else:
            s += tl.dot(q2, k2)
    p = tl.exp2(s * scale_log2 - lse2[:, None])  # rows without any visible block have lse2 = +inf: p = 0
    if MASK_CAUSAL:
        visible = col_ok[None, :] & ((cmp_idx * STRIDE + (CMP_LEN - 1))[None, :] <= t_row[:, None])
        p = tl.where(visible, p, 0.0)
    elif R_PAD != R:
        p = tl.where(col_ok[None, :], p, 0.0)
    # Eq. 10: sum over the query heads of the group. Row r holds head pext(r, HEAD_MASK) of position
    # pext(r, ~HEAD_MASK): view the rows as a hypercube of bits and sum out the head bits.
    NB: tl.constexpr = _log2(BM * G_PAD)
    if G_PAD == 1:
        ph = p
    elif HEAD_MASK == G_PAD - 1:
        ph = tl.sum(tl.reshape(p, [BM, G_PAD, BC]), axis=1)
    else:
        h = tl.reshape(p, [2] * NB + [BC])  # row bit b is axis NB-1-b
        for i in tl.static_range(NB):  # high (register) bits first, so the lane shuffles see fewer values
            if _bit_set(HEAD_MASK, NB - 1 - i):
                h = tl.sum(h, axis=i - _rank_above(HEAD_MASK, NB - 1 - i))
        ph = tl.reshape(h, [BM, BC])
    # Eq. 9: overlap weights in units of the stride
    jj = tl.arange(0, BS)
    kr = tl.arange(0, R_PAD)
    if R_PAD == 1:
        own = ph
    else:
        p3 = tl.reshape(ph, [BM, BS, R_PAD])
        w_own = tl.where(kr < R, tl.minimum(C, R - kr), 0).to(tl.float32)
        own = tl.sum(p3 * w_own[None, None, :], axis=2)
    if C == 1:
        # identity gather: moves the [BM, BS] scores out of the head-reduced layout of the dot (where every thread
        # holds several of them, replicated over lanes) into a compact one, which makes the sort below cheap
        score = tl.gather(own, tl.broadcast_to(jj[None, :], [BM, BS]), axis=1)
        new_carry = carry
    else:
        w_spill = tl.where(kr < R, tl.maximum(0, C - R + kr), 0).to(tl.float32)
        spill = tl.sum(p3 * w_spill[None, None, :], axis=2)  # spill[:, jj] belongs to block jj + 1
        prev = tl.gather(spill, tl.broadcast_to(tl.maximum(jj - 1, 0)[None, :], [BM, BS]), axis=1)
        prev = tl.where(jj[None, :] == 0, carry[:, None], prev)
        new_carry = tl.sum(tl.where(jj[None, :] == BS - 1, spill, 0.0), axis=1)
        score = own + prev
    return score, new_carry


@triton.jit
def _merge_chunk(run, score, ci, t_q, q_ok,
                 BS: tl.constexpr, N_PAD: tl.constexpr, SEL_LEN: tl.constexpr,
                 N_INIT: tl.constexpr, N_LOCAL: tl.constexpr):
    """Turn the chunk's scores into (score, block) keys and merge them into the running sorted top-N_PAD."""
    j = ci * BS + tl.arange(0, BS)
    cur = t_q // SEL_LEN  # block holding the query
    eligible = (j[None, :] <= cur[:, None]) & q_ok[:, None]
    fixed = (j[None, :] < N_INIT) | (j[None, :] > cur[:, None] - N_LOCAL)
    bits = score.to(tl.int32, bitcast=True)
    bits = tl.where(fixed, KEY_INF_BITS, bits)
    key = (bits.to(tl.int64) << 32) | (j * -1 + KEY_MAX_LOW).to(tl.int64)[None, :]
    key = tl.where(eligible, key, -1)
    if BS == N_PAD:
        top_asc = tl.sort(key, dim=1)
    else:
        top_asc = tl.flip(tl.topk(key, N_PAD, dim=1), 1)
    # run is sorted descending, top_asc ascending: their elementwise max holds the best N_PAD of both, as a bitonic
    # sequence (Batcher's half-cleaner); one bitonic merge sorts it again.
    return tl.bitonic_merge(tl.maximum(run, top_asc), 1, descending=True)


@triton.jit(do_not_specialize=_SELECT_VARYING)
def _select_kernel(
    Q, KC, LSE, OUT, WS, CU_Q, CU_K, CU_C,
    stride_qb, stride_qt, stride_qh,
    stride_kb, stride_kt, stride_kh,
    stride_lb, stride_lt, stride_lh,
    stride_ob, stride_ot, stride_oh,
    q_len, k_len, nc_len, num_bh, max_q, num_splits, split_chunks,
    scale_log2, T_BUCKET,
    HKV: tl.constexpr, G: tl.constexpr, G_PAD: tl.constexpr,
    DK: tl.constexpr, D1: tl.constexpr, D2: tl.constexpr,
    CMP_LEN: tl.constexpr, STRIDE: tl.constexpr, SEL_LEN: tl.constexpr,
    R: tl.constexpr, R_PAD: tl.constexpr, C: tl.constexpr,
    N: tl.constexpr, N_PAD: tl.constexpr, N_INIT: tl.constexpr, N_LOCAL: tl.constexpr,
    VARLEN: tl.constexpr, SPLIT: tl.constexpr, FP32_DOT: tl.constexpr,
    ROWS: tl.constexpr, BS: tl.constexpr, HEAD_MASK: tl.constexpr,
):
    BM: tl.constexpr = ROWS // G_PAD
    num_tiles = tl.cdiv(max_q, BM)
    pid = tl.program_id(0)
    bh = pid % num_bh
    rest = pid // num_bh
    if SPLIT:
        split = rest % num_splits
        tile = rest // num_splits
    else:
        split = 0
        tile = num_tiles - 1 - rest  # the heaviest (last) query tiles first
    b = bh // HKV
    hkv = bh % HKV

    if VARLEN:
        bos_q = tl.load(CU_Q + b)
        tq = tl.load(CU_Q + b + 1) - bos_q
        bos_k = tl.load(CU_K + b)
        tk = tl.load(CU_K + b + 1) - bos_k
        bos_c = tl.load(CU_C + b)
        nc_doc = tl.load(CU_C + b + 1) - bos_c
        batch = 0
    else:
        bos_q = 0
        tq = q_len
        tk = k_len
        bos_c = 0
        nc_doc = nc_len
        batch = b
    m0 = tile * BM
    if m0 >= tq:
        return

    # ---- the tile's queries: rows are (position, head), the head fastest
    rows = tl.arange(0, ROWS)
    if HEAD_MASK == G_PAD - 1:
        m_row = m0 + rows // G_PAD
        g_row = rows % G_PAD
    else:
        NB: tl.constexpr = _log2(ROWS)
        g_row = rows * 0
        m_row = m0 + rows * 0
        for b in tl.static_range(NB):
            bit = (rows >> b) & 1
            if _bit_set(HEAD_MASK, b):
                g_row += bit << _rank_below(HEAD_MASK, b)
            else:
                m_row += bit << (b - _rank_below(HEAD_MASK, b))
    row_ok = (m_row < tq) & (g_row < G)
    t_row = tk - tq + m_row
    q_base = Q + batch.to(tl.int64) * stride_qb + (bos_q + m_row).to(tl.int64)[:, None] * stride_qt \
        + (hkv * G + g_row)[:, None] * stride_qh
    d1 = tl.arange(0, D1)
    if D1 == DK:
        q1 = tl.load(q_base + d1[None, :], mask=row_ok[:, None], other=0.0)
    else:
        q1 = tl.load(q_base + d1[None, :], mask=row_ok[:, None] & (d1[None, :] < DK), other=0.0)
    if D2 > 0:
        d2 = D1 + tl.arange(0, D2)
        q2 = tl.load(q_base + d2[None, :], mask=row_ok[:, None] & (d2[None, :] < DK), other=0.0)
    else:
        q2 = q1
    lse = tl.load(LSE + batch.to(tl.int64) * stride_lb + (bos_q + m_row).to(tl.int64) * stride_lt
                  + (hkv * G + g_row) * stride_lh, mask=row_ok, other=float("-inf"))
    lse2 = tl.where(lse == float("-inf"), float("inf"), lse * 1.4426950408889634)
    k_base = KC + batch.to(tl.int64) * stride_kb + bos_c.to(tl.int64) * stride_kt + hkv * stride_kh

    m_q = m0 + tl.arange(0, BM)
    q_ok = m_q < tq
    t_q = tk - tq + m_q
    t_min = tk - tq + m0
    t_max = tk - tq + tl.minimum(m0 + BM, tq) - 1

    # ---- chunk ranges: [0, n_full) every row sees every compression block of the chunk; [n_full, n_cmp) some
    # blocks are visible; [n_cmp, n_chunks) none is (only the fixed/eligibility rules and the carry matter).
    CHUNK_CMP: tl.constexpr = BS * R
    n_chunks = tl.cdiv(t_max // SEL_LEN + 1, BS)
    # visible compression blocks of the last / first row: floor((t - l + 1) / d) + 1, clamped to [0, nc_doc]
    vis_max = tl.minimum(tl.maximum(t_max - (CMP_LEN - 1) + STRIDE, 0) // STRIDE, nc_doc)
    vis_min = tl.minimum(tl.maximum(t_min - (CMP_LEN - 1) + STRIDE, 0) // STRIDE, nc_doc)
    n_cmp = tl.cdiv(vis_max, CHUNK_CMP)
    n_full = vis_min // CHUNK_CMP
    if SPLIT:
        c_lo = split * split_chunks
        c_hi = tl.minimum(c_lo + split_chunks, n_chunks)
    else:
        c_lo = 0
        c_hi = n_chunks

    run = tl.full([BM, N_PAD], -1, tl.int64)
    carry = tl.zeros([BM], dtype=tl.float32)
    if C > 1:
        if c_lo > 0:
            if c_lo - 1 < n_cmp:  # the previous split's last chunk spills into our first block
                _, carry = _chunk_scores(
                    q1, q2, lse2, t_row, k_base, stride_kt, c_lo - 1, nc_doc, scale_log2, carry,
                    BM, G_PAD, DK, D1, D2, CMP_LEN, STRIDE, R, R_PAD, C, BS, HEAD_MASK, True, FP32_DOT)
    for ci in range(c_lo, tl.minimum(n_full, c_hi)):
        score, carry = _chunk_scores(
            q1, q2, lse2, t_row, k_base, stride_kt, ci, nc_doc, scale_log2, carry,
            BM, G_PAD, DK, D1, D2, CMP_LEN, STRIDE, R, R_PAD, C, BS, HEAD_MASK, False, FP32_DOT)
        run = _merge_chunk(run, score, ci, t_q, q_ok, BS, N_PAD, SEL_LEN, N_INIT, N_LOCAL)
    for ci in range(tl.maximum(n_full, c_lo), tl.minimum(n_cmp, c_hi)):
        score, carry = _chunk_scores(
            q1, q2, lse2, t_row, k_base, stride_kt, ci, nc_doc, scale_log2, carry,
            BM, G_PAD, DK, D1, D2, CMP_LEN, STRIDE, R, R_PAD, C, BS, HEAD_MASK, True, FP32_DOT)
        run = _merge_chunk(run, score, ci, t_q, q_ok, BS, N_PAD, SEL_LEN, N_INIT, N_LOCAL)
    jj = tl.arange(0, BS)
    for ci in range(tl.maximum(n_cmp, c_lo), c_hi):
        score = tl.where(jj[None, :] == 0, carry[:, None], 0.0)
        score = tl.gather(score, tl.broadcast_to(jj[None, :], [BM, BS]), axis=1)  # compact layout, see above
        carry = tl.zeros([BM], dtype=tl.float32)
        run = _merge_chunk(run, score, ci, t_q, q_ok, BS, N_PAD, SEL_LEN, N_INIT, N_LOCAL)

    rank = tl.arange(0, N_PAD)
    if SPLIT:
        # workspace [total_q, HKV, num_splits, N_PAD] int64 of raw keys, merged on the host side
        ws_ptrs = WS + ((((batch * q_len + bos_q + m_q).to(tl.int64) * HKV + hkv) * num_splits + split)
                        * N_PAD)[:, None] + rank[None, :]
        tl.store(ws_ptrs, run, mask=q_ok[:, None])
    else:
        valid = (run >= 0) & (rank < N)[None, :]
        idx = tl.where(valid, (run & 0xFFFFFFFF) * -1 + KEY_MAX_LOW, KEY_MAX_LOW).to(tl.int32)
        idx = tl.sort(idx, dim=1)
        idx = tl.where(idx == KEY_MAX_LOW, -1, idx)
        o_ptrs = OUT + batch.to(tl.int64) * stride_ob + (bos_q + m_q).to(tl.int64)[:, None] * stride_ot \
            + hkv * stride_oh + rank[None, :]
        tl.store(o_ptrs, idx, mask=q_ok[:, None] & (rank < N)[None, :])


# ----------------------------------------------------------------------------------------------------------------
# Launch configurations
# ----------------------------------------------------------------------------------------------------------------


def _head_mask(rows: int, num_warps: int, g_pad: int) -> int:
    """
    Which bits of the row index of the `[rows, BC]` score tile hold the head (the rest hold the position).

    Any choice is correct; the cost of the head sum depends on it. In the tensor-core accumulator layouts (mma v2 and
    wgmma alike) row bits 0-2 go to lanes, bit 3 to a register, the next log2(warps) bits to warps and any higher bits
    to registers: head bits on register bits are summed inside a thread, on lane bits with shuffles, on warp bits
    through shared memory. So the head takes bit 3, then the register bits above the warps, then lanes 0-2, then warps.
    """
    nb, hb, wb = rows.bit_length() - 1, g_pad.bit_length() - 1, num_warps.bit_length() - 1
    if nb <= 4 + wb:  # no register bits above the warps: the plain layout (head = low bits) is as good
        return g_pad - 1
    order = [3] + list(range(4 + wb, nb)) + [0, 1, 2] + list(range(4, 4 + wb))
    return sum(1 << b for b in order[:hb])


def _prune_configs(configs, named_args, **kwargs):
    g_pad, n_pad, r_pad = kwargs["G_PAD"], kwargs["N_PAD"], kwargs["R_PAD"]
    dk_pad = kwargs["D1"] + kwargs["D2"]
    min_bs = max(16, n_pad)
    q = named_args.get("Q")
    rules = tuning(device_limits(q.device if isinstance(q, torch.Tensor) else None))
    made, preferred = {}, None
    for cfg in configs:
        rows = min(max(cfg.kwargs["ROWS"], g_pad, 16), 128 * g_pad)  # at most 128 positions per tile
        bs = max(min_bs, cfg.kwargs["BS"] // r_pad)  # the candidate's "BS" is its number of compression blocks
        threads = 32 * cfg.num_warps
        if rows * bs * r_pad > threads * rules.selection_p_regs or rows * dk_pad > threads * rules.selection_q_regs:
            continue
        key = (rows, bs, cfg.num_warps, cfg.num_stages)
        if key not in made:
            made[key] = triton.Config({"ROWS": rows, "BS": bs, "HEAD_MASK": _head_mask(rows, cfg.num_warps, g_pad)},
                                      num_warps=cfg.num_warps, num_stages=cfg.num_stages)
        if (cfg.kwargs["ROWS"], cfg.kwargs["BS"], cfg.num_warps, cfg.num_stages) == rules.selection_prefill_tile:
            preferred = made[key]
    kept = list(made.values())
    if not kept:  # very wide chunks (large l'/d or n): the smallest legal tile
        rows = max(g_pad, 16)
        kept = [triton.Config({"ROWS": rows, "BS": min_bs, "HEAD_MASK": _head_mask(rows, 8, g_pad)}, num_warps=8,
                              num_stages=2)]
    if {**named_args, **kwargs}.get("T_BUCKET", DECODE_ROWS) < DECODE_ROWS:  # decoding: see DECODE_ROWS
        return choose_configs(kept[:1], kept)
    return choose_configs(kept, kept, measured=preferred)  # prefill: the measured tile, untimed


_select_kernel_tuned = triton.autotune(
    configs=SELECTION_CONFIGS,
    key=["T_BUCKET", "HKV", "G_PAD", "D1", "D2", "R_PAD", "C", "N_PAD", "VARLEN", "SPLIT"],
    prune_configs_by={"early_config_prune": _prune_configs},
    cache_results=True,
    do_bench=TIMED,
)(_select_kernel)


# ----------------------------------------------------------------------------------------------------------------
# Launcher
# ----------------------------------------------------------------------------------------------------------------


def _fixed_tile(g_pad: int, n_pad: int, max_q: int, num_sel: int, on_gpu: bool) -> dict:
    """
    The tile of untimed launches: the interpreter (few big programs: its cost is per operation), split launches, and
    tests (`override(selection_tile=...)`).
    """
    forced = SWITCHES.selection_tile
    if forced is not None:
        tile = {"ROWS": forced["ROWS"], "BS": forced["BS"]}
        if tile["ROWS"] < max(16, g_pad) or tile["BS"] < max(16, n_pad):
            raise ValueError(
                f"selection_tile {forced} needs ROWS >= max(16, G_PAD={g_pad}) and BS >= max(16, N_PAD={n_pad})"
            )
    elif on_gpu:
        tile = {"ROWS": max(16, g_pad), "BS": max(16, n_pad)}
    else:
        bm = min(64, next_pow2(max_q))
        tile = {"ROWS": max(16, bm * g_pad), "BS": max(16, n_pad, min(64, next_pow2(num_sel)))}
    if forced is not None and "HEAD_MASK" in forced:
        tile["HEAD_MASK"] = forced["HEAD_MASK"]
        if bin(tile["HEAD_MASK"]).count("1") != g_pad.bit_length() - 1 or tile["HEAD_MASK"] >= tile["ROWS"]:
            raise ValueError(f"selection_tile HEAD_MASK must have log2(G_PAD={g_pad}) bits below ROWS={tile['ROWS']}")
    else:
        tile["HEAD_MASK"] = _head_mask(tile["ROWS"], 4, g_pad)
    return tile


def select_blocks_fwd(
    q, k_cmp, lse_cmp, geo: Geometry, compress_block_size: int, compress_stride: int, select_block_size: int,
    num_selected_blocks: int, num_initial_blocks: int, num_local_blocks: int, scale: float,
) -> torch.Tensor:
    """The launcher of `select_blocks` on checked inputs (`scale` resolved, `geo` the call's geometry)."""
    l, d, lp, n = compress_block_size, compress_stride, select_block_size, num_selected_blocks
    B, Tq, HQ, DK = q.shape
    HKV = k_cmp.shape[2]
    G = HQ // HKV
    device = q.device
    out = torch.full((B, Tq, HKV, n), -1, dtype=torch.int32, device=device)
    max_q, Tk = geo.max_q, geo.max_k  # the longest document's queries and keys
    if B == 0 or Tq == 0 or max_q == 0:
        return out
    if geo.varlen:
        cu_q, cu_k, cu_c = geo.cu_q, geo.cu_k, geo.compressed_offsets(l, d)
    else:
        cu_q = cu_k = cu_c = geo.dummy

    q = q if q.stride(-1) == 1 else q.contiguous()
    k_cmp = k_cmp if k_cmp.stride(-1) == 1 else k_cmp.contiguous()
    lse_cmp = lse_cmp.to(torch.float32)
    n_pad = max(next_pow2(n), 1)
    g_pad = next_pow2(G)
    d1, d2 = split_head_dim(DK)
    r, c = lp // d, l // d
    r_pad = next_pow2(r)
    num_bh = geo.num_docs * HKV
    const = dict(
        HKV=HKV, G=G, G_PAD=g_pad, DK=DK, D1=d1, D2=d2, CMP_LEN=l, STRIDE=d, SEL_LEN=lp, R=r, R_PAD=r_pad, C=c,
        N=n, N_PAD=n_pad, N_INIT=num_initial_blocks, N_LOCAL=num_local_blocks, VARLEN=geo.varlen,
        FP32_DOT=q.dtype == torch.float32,
    )
    args = (
        q, k_cmp, lse_cmp, out, None, cu_q, cu_k, cu_c,
        q.stride(0), q.stride(1), q.stride(2),
        k_cmp.stride(0), k_cmp.stride(1), k_cmp.stride(2),
        lse_cmp.stride(0), lse_cmp.stride(1), lse_cmp.stride(2),
        out.stride(0), out.stride(1), out.stride(2),
        Tq, Tk, k_cmp.shape[1], num_bh,
    )
    t_bucket = max(16, next_pow2(max(max_q, 1)))
    num_sel = triton.cdiv(Tk, lp)  # selection blocks of the longest document
    on_gpu = q.is_cuda and not INTERPRET
    fixed = _fixed_tile(g_pad, n_pad, max_q, num_sel, on_gpu)
    tiles_fixed = triton.cdiv(max_q, fixed["ROWS"] // g_pad)
    chunks = triton.cdiv(num_sel, fixed["BS"])

    # Decoding-like launches (few query tiles, many selection blocks) split the selection blocks over programs.
    if SWITCHES.selection_splits is not None:
        num_splits = max(1, min(SWITCHES.selection_splits, chunks))
    elif on_gpu:
        sms = device_limits(device).num_sms
        programs = tiles_fixed * num_bh
        num_splits = 1
        if programs < sms and chunks >= 8:
            num_splits = max(1, min(triton.cdiv(chunks, 2), triton.cdiv(2 * sms, programs)))
    else:
        num_splits = 1

    if num_splits > 1:
        split_chunks = triton.cdiv(chunks, num_splits)
        num_splits = triton.cdiv(chunks, split_chunks)
        ws = torch.empty((B * Tq, HKV, num_splits, n_pad), dtype=torch.int64, device=device)
        args = args[:4] + (ws,) + args[5:]
        grid = (num_bh * tiles_fixed * num_splits,)
        _select_kernel[grid](
            *args, max_q, num_splits, split_chunks, scale * LOG2E, t_bucket,
            **const, SPLIT=True, **fixed, num_warps=4, num_stages=1,
        )
        return _finish_splits(ws, n, B, Tq, HKV)

    if on_gpu and SWITCHES.selection_tile is None:
        def grid(meta):
            return (num_bh * triton.cdiv(max_q, meta["ROWS"] // g_pad),)

        _select_kernel_tuned[grid](*args, max_q, 1, 0, scale * LOG2E, t_bucket, **const, SPLIT=False)
    else:
        grid = (num_bh * tiles_fixed,)
        _select_kernel[grid](
            *args, max_q, 1, 0, scale * LOG2E, t_bucket, **const, SPLIT=False, **fixed, num_warps=4, num_stages=1,
        )
    return out


def _finish_splits(ws: torch.Tensor, n: int, B: int, Tq: int, HKV: int) -> torch.Tensor:
    """Merge the per-split best keys `[B*Tq, HKV, S, N_PAD]` into the final ascending `[B, Tq, HKV, n]` indices."""
    keys = ws.flatten(2)
    top = torch.topk(keys, n, dim=-1).values  # descending keys = best blocks first, ties to the lower block
    idx = torch.where(top >= 0, _MAX_LOW - (top & 0xFFFFFFFF), torch.full_like(top, _MAX_LOW))
    idx = torch.sort(idx, dim=-1).values
    idx = torch.where(idx == _MAX_LOW, torch.full_like(idx, -1), idx)
    return idx.to(torch.int32).reshape(B, Tq, HKV, n)


# ----------------------------------------------------------------------------------------------------------------
# Public function
# ----------------------------------------------------------------------------------------------------------------


def select_blocks(
    q: torch.Tensor,
    k_cmp: torch.Tensor,
    lse_cmp: torch.Tensor,
    compress_block_size: int,
    compress_stride: int,
    select_block_size: int,
    num_selected_blocks: int,
    num_initial_blocks: int = 1,
    num_local_blocks: int = 2,
    scale: float | None = None,
    cu_seqlens_q: torch.Tensor | None = None,
    cu_seqlens_k: torch.Tensor | None = None,
    num_keys: int | None = None,
) -> torch.Tensor:
    """
    Top-n selection blocks of every query and KV head (NSA Eqs. 8-11), scored from the compressed attention.

    Same result as `select_blocks_ref(selection_scores_ref(...))` of `reference.py` (up to float rounding at exact
    near-ties), without materialising any `[T, T/d]` score tensor.

    Args:
        q: `[B, Tq, HQ, DK]` queries (float32/float16/bfloat16), DK in 1..256.
        k_cmp: `[B, Nc, HKV, DK]` compressed keys, `HQ % HKV == 0`; packed: per document, offsets
            `compressed_cu_seqlens(cu_seqlens_k, compress_block_size, compress_stride)`.
        lse_cmp: `[B, Tq, HQ]` float32 log-sum-exp of the (scaled) compressed-attention logits, `-inf` where a query
            sees no compression block.
        compress_block_size, compress_stride, select_block_size: l, d, l' with d | l, d | l', l <= l'.
        num_selected_blocks: n, the initial and local blocks counted in.
        num_initial_blocks, num_local_blocks: always-selected blocks at the start / ending with the query's block.
        scale: logit scale (default `DK ** -0.5`), the one the compressed attention used.
        cu_seqlens_q, cu_seqlens_k: `[num_docs + 1]` int32 offsets of packed documents (batch 1).
        num_keys: Tk, the key length when `Tq < Tk` (queries are the last Tq positions); default Tq. Ignored (taken
            from `cu_seqlens_k`) for packed documents.

    Returns:
        int32 `[B, Tq, HKV, n]`: selected block indices in ascending order, `-1` padding where fewer than n blocks
        (those with `j * l' <= t`) are eligible.
    """
    check_block_sizes(compress_block_size, compress_stride, select_block_size, num_selected_blocks,
                      num_initial_blocks, num_local_blocks)
    if q.dim() != 4 or k_cmp.dim() != 4:
        raise ValueError(
            f"q and k_cmp must be 4-D [batch, seq, heads, dim], got {tuple(q.shape)}, {tuple(k_cmp.shape)}"
        )
    B, Tq, HQ, DK = q.shape
    HKV = k_cmp.shape[2]
    if HKV < 1 or HQ % HKV != 0:
        raise ValueError(f"query heads ({HQ}) must be a multiple of the compressed keys' heads ({HKV})")
    if k_cmp.shape[0] != B or k_cmp.shape[3] != DK:
        raise ValueError(f"k_cmp {tuple(k_cmp.shape)} does not match q {tuple(q.shape)} in batch or head dim")
    if tuple(lse_cmp.shape) != (B, Tq, HQ):
        raise ValueError(f"lse_cmp must have shape {(B, Tq, HQ)}, got {tuple(lse_cmp.shape)}")
    check_kernel_inputs(q, k_cmp)
    check_packing(q, cu_seqlens_q, cu_seqlens_k)
    geo = geometry(q, num_keys if cu_seqlens_q is None else None, cu_seqlens_q, cu_seqlens_k)
    if geo.varlen and k_cmp.shape[1] != geo.num_compressed(compress_block_size, compress_stride):
        raise ValueError(
            f"k_cmp holds {k_cmp.shape[1]} compressed blocks, the documents of cu_seqlens_k have "
            f"{geo.num_compressed(compress_block_size, compress_stride)}"
        )
    scale = DK ** -0.5 if scale is None else float(scale)
    return select_blocks_fwd(q, k_cmp, lse_cmp, geo, compress_block_size, compress_stride, select_block_size,
                             num_selected_blocks, num_initial_blocks, num_local_blocks, scale)


__all__ = ["select_blocks", "select_blocks_fwd"]
