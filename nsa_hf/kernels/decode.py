"""
Triton kernels of NSA decoding: 1 to 16 new queries per sequence against a key/value cache, every sequence at its
own length, in four launches that run under CUDA-graph capture (no host sync, no data-dependent host branching, grid
and workspace sized from the cache's capacity, not from the current lengths).

Shapes: `G` query heads share one KV head; a program's rows are the `G` heads of one query position (padded to
`GP >= 16` rows for the tensor cores). Every softmax is in base 2 (`s2 = q.k * scale * log2(e)`).

1. `_cmp_kernel`, grid (splits, batch * q_len, kv_heads): compressed attention split over the compressed keys
   (split-KV, so that one sequence fills the GPU). Each split writes its (max, sum, P V) for the output and, per
   chunk of `BN` compressed blocks, the chunk's row max and the chunk's block-importance partials of Eq. 9: for
   selection block j, `own[j]` sums the probabilities of the compression blocks starting in j and `spill[j]` the
   part of those blocks that overlaps block j + 1, both weighted by the overlap in units of the stride and relative
   to the chunk's max. The compressed keys are read once for both the output and the scores.
2. `_select_kernel`, grid (parts, batch * q_len, kv_heads): the log-sum-exp of the compressed softmax from the
   splits, the scores of Eq. 8-10 of the part's selection blocks (the partials rescaled by `exp2(chunk max - lse)`
   and summed over the group's heads), and the part's best n (score, block) keys with the fixed initial/local
   blocks, merged chunk by chunk in registers (no `torch.topk`, nothing `[T, NS]` in memory beyond the partials).
3. `_sparse_kernel`, grid (units, batch * q_len, kv_heads): each selected unit first merges the parts' candidates
   into the top n (every unit the same, in registers); then the selected blocks and the sliding window, each unit a
   few blocks / window chunks with its own partial (max, sum, P V).
4. `_combine_kernel`, grid (batch * q_len * heads,): merges the partials of each branch and applies the gates.

A query position of -1 is a slot without a query (e.g. padding in a chunk): its output is zero.
"""

import torch
import triton
import triton.language as tl

from ._tiling import LOG2E, device_limits, dot_precision, next_pow2, split_head_dim
from .selection import KEY_MAX_LOW, _merge_chunk

# Integer arguments that change with the cache's capacity or the batch: never specialised, so that a new length
# compiles nothing. The batch strides stay specialised: a cache's `capacity * heads * dim` keeps its divisibility by
# 16 as the capacity changes (whenever heads * dim is a multiple of 16), and without that hint the K/V tiles load
# 2 bytes per instruction instead of 16 (the compressed pass ran 86 -> ~40 us at batch 16, 64k, 64q/4kv).
_CMP_VARYING = ["num_chunks", "chunks_per_split", "num_splits"]
_SELECT_VARYING = ["num_chunks", "num_splits", "sel_chunks_per_program", "num_sel_programs"]
_SPARSE_VARYING = ["num_sel_programs"]
_COMBINE_VARYING = ["num_splits"]


@triton.jit
def _tile_mask(keep, dims, LIMIT: tl.constexpr, END: tl.constexpr):
    """
    `keep & (dims < LIMIT)` for a tile whose `dims` end at END. When END == LIMIT the dims test is left out: a mask
    that varies along the contiguous dim stops Triton from using 16-byte vector loads.
    """
    if END == LIMIT:
        return keep
    else:
        return keep & (dims < LIMIT)


@triton.jit
def _load_rows(ptr, rows_ok, cols, LIMIT: tl.constexpr, END: tl.constexpr):
    """A `[rows, cols]` tile whose columns past LIMIT are zero."""
    return tl.load(ptr + cols[None, :], mask=_tile_mask(rows_ok[:, None], cols[None, :], LIMIT, END), other=0.0)


@triton.jit
def _group_queries(Q, bt, h, stride_qb, stride_qt, stride_qh, Q_LEN: tl.constexpr, HKV: tl.constexpr,
                   G: tl.constexpr, GP: tl.constexpr, DK: tl.constexpr, BK1: tl.constexpr, BK2: tl.constexpr):
    """
    The G query heads of KV head h at query slot bt (= batch row * Q_LEN + query) as `[GP, BK1]` (+ `[GP, BK2]`)
    tiles, which rows are real heads, and each row's index in the `[batch * q_len * heads, ...]` partials.
    """
    rows = tl.arange(0, GP)
    row_ok = rows < G
    out_row = (bt * HKV * G + h * G + rows).to(tl.int64)
    q_ptr = Q + (bt // Q_LEN).to(tl.int64) * stride_qb + (bt % Q_LEN) * stride_qt + (h * G + rows)[:, None] * stride_qh
    q1 = _load_rows(q_ptr, row_ok, tl.arange(0, BK1), DK, BK1)
    q2 = q1  # unused without a second head-dim piece
    if BK2 > 0:
        q2 = _load_rows(q_ptr, row_ok, BK1 + tl.arange(0, BK2), DK, BK1 + BK2)
    return q1, q2, row_ok, out_row


@triton.jit
def _kv_tiles(k_base, v_base, kpos, stride_kt, stride_vt, kv_ok, DK: tl.constexpr, BK1: tl.constexpr,
              BK2: tl.constexpr, DV: tl.constexpr, BV: tl.constexpr):
    """
    K^T `[BK1, BN]` (+ `[BK2, BN]`) and V `[BN, BV]` of the keys at `kpos` (zero where not `kv_ok`), every load
    issued before any dot uses one, so that the V load's latency hides behind the scores.
    """
    k_ptr = k_base + kpos.to(tl.int64)[None, :] * stride_kt
    d1 = tl.arange(0, BK1)
    kt1 = tl.load(k_ptr + d1[:, None], mask=_tile_mask(kv_ok[None, :], d1[:, None], DK, BK1), other=0.0)
    kt2 = kt1  # unused without a second head-dim piece
    if BK2 > 0:
        d2 = BK1 + tl.arange(0, BK2)
        kt2 = tl.load(k_ptr + d2[:, None], mask=_tile_mask(kv_ok[None, :], d2[:, None], DK, BK1 + BK2), other=0.0)
    dv = tl.arange(0, BV)
    vb = tl.load(v_base + kpos.to(tl.int64)[:, None] * stride_vt + dv[None, :],
                 mask=_tile_mask(kv_ok[:, None], dv[None, :], DV, BV), other=0.0)
    return kt1, kt2, vb


@triton.jit
def _tile_scores(q1, q2, kt1, kt2, BK2: tl.constexpr, PREC: tl.constexpr):
    """`q . K^T` `[GP, BN]` from `_kv_tiles`' pieces."""
    s = tl.dot(q1, kt1, input_precision=PREC)
    if BK2 > 0:
        s += tl.dot(q2, kt2, input_precision=PREC)
    return s


@triton.jit(do_not_specialize=_CMP_VARYING)
def _cmp_kernel(
    Q, KC, VC, QPOS, M_SPLIT, L_SPLIT, ACC_SPLIT, M_CHUNK, OWN, SPILL,
    stride_qb, stride_qt, stride_qh,
    stride_cb, stride_ct, stride_ch,
    stride_db, stride_dt, stride_dh,
    num_chunks, chunks_per_split, num_splits, scale_log2,
    Q_LEN: tl.constexpr, HKV: tl.constexpr, G: tl.constexpr, GP: tl.constexpr,
    DK: tl.constexpr, BK1: tl.constexpr, BK2: tl.constexpr, DV: tl.constexpr, BV: tl.constexpr,
    CMP_LEN: tl.constexpr, STRIDE: tl.constexpr, R: tl.constexpr, C: tl.constexpr,
    BN: tl.constexpr, NJ: tl.constexpr, PREC: tl.constexpr, STAGES: tl.constexpr,
):
    split = tl.program_id(0)
    bt = tl.program_id(1)
    h = tl.program_id(2)
    b = bt // Q_LEN
    t = tl.load(QPOS + bt)
    n_vis = tl.where(t + 1 >= CMP_LEN, (t + 1 - CMP_LEN) // STRIDE + 1, 0)  # compression blocks i*d + l - 1 <= t

    q1, q2, row_ok, out_row = _group_queries(Q, bt, h, stride_qb, stride_qt, stride_qh, Q_LEN, HKV, G, GP, DK, BK1,
                                             BK2)
    dv = tl.arange(0, BV)
    k_base = KC + b.to(tl.int64) * stride_cb + h * stride_ch
    v_base = VC + b.to(tl.int64) * stride_db + h * stride_dh

    # Eq. 9 weights: compression block i = j*R + k overlaps selection block j by min(C, R-k) strides and block j+1
    # by max(0, C-R+k)
    kr = tl.arange(0, R)
    w_own = tl.minimum(C, R - kr).to(tl.float32)
    w_spill = tl.maximum(0, C - R + kr).to(tl.float32)
    jn = tl.arange(0, NJ)

    m_i = tl.full([GP], float("-inf"), tl.float32)
    l_i = tl.zeros([GP], tl.float32)
    acc = tl.zeros([GP, BV], tl.float32)
    first = split * chunks_per_split
    for c in tl.range(0, tl.minimum(chunks_per_split, tl.cdiv(n_vis, BN) - first), num_stages=STAGES):
        chunk = first + c
        cols = chunk * BN + tl.arange(0, BN)
        vis = cols < n_vis
        kt1, kt2, vb = _kv_tiles(k_base, v_base, cols, stride_ct, stride_dt, vis, DK, BK1, BK2, DV, BV)
        s = _tile_scores(q1, q2, kt1, kt2, BK2, PREC)
        s = tl.where(vis[None, :], s * scale_log2, float("-inf"))
        m_c = tl.max(s, 1)  # finite: the chunk's first block is visible
        p = tl.exp2(s - m_c[:, None])
        if R == 1:  # l' = d: every compression block is its own selection block's, and C = 1 spills nothing
            own = p
        else:
            p3 = tl.reshape(p, [GP, NJ, R])
            own = tl.sum(p3 * w_own[None, None, :], 2)
            spill = tl.sum(p3 * w_spill[None, None, :], 2)
        tl.store(M_CHUNK + out_row * num_chunks + chunk, m_c, mask=row_ok)
        part = out_row[:, None] * (num_chunks * NJ) + chunk * NJ + jn[None, :]
        tl.store(OWN + part, own, mask=row_ok[:, None])
        if R > 1:
            tl.store(SPILL + part, spill, mask=row_ok[:, None])

        m_new = tl.maximum(m_i, m_c)
        alpha = tl.exp2(m_i - m_new)
        beta = tl.exp2(m_c - m_new)
        l_i = l_i * alpha + tl.sum(p, 1) * beta
        acc = acc * alpha[:, None] + tl.dot((p * beta[:, None]).to(vb.dtype), vb, input_precision=PREC)
        m_i = m_new
    at = out_row * num_splits + split
    tl.store(M_SPLIT + at, m_i, mask=row_ok)
    tl.store(L_SPLIT + at, l_i, mask=row_ok)
    tl.store(ACC_SPLIT + at[:, None] * DV + dv[None, :], acc, mask=_tile_mask(row_ok[:, None], dv[None, :], DV, BV))


@triton.jit(do_not_specialize=_SELECT_VARYING)
def _select_kernel(
    QPOS, M_SPLIT, L_SPLIT, M_CHUNK, OWN, SPILL, CAND,
    num_chunks, num_splits, sel_chunks_per_program, num_sel_programs,
    HKV: tl.constexpr, G: tl.constexpr, GP: tl.constexpr, SP: tl.constexpr,
    CMP_LEN: tl.constexpr, STRIDE: tl.constexpr, SEL_LEN: tl.constexpr, R: tl.constexpr,
    BN: tl.constexpr, NJ: tl.constexpr,
    NP: tl.constexpr, N_INIT: tl.constexpr, N_LOCAL: tl.constexpr, BS: tl.constexpr,
):
    """The best NP (score, block) keys among this program's selection blocks -> CAND (merged by _sparse_kernel)."""
    part = tl.program_id(0)
    bt = tl.program_id(1)
    h = tl.program_id(2)
    t = tl.load(QPOS + bt)
    q_ok = t >= 0
    n_vis = tl.where(t + 1 >= CMP_LEN, (t + 1 - CMP_LEN) // STRIDE + 1, 0)

    rows = tl.arange(0, GP)
    row_ok = rows < G
    out_row = (bt * HKV * G + h * G + rows).to(tl.int64)
    # log-sum-exp of the compressed softmax, from the splits
    sp = tl.arange(0, SP)
    at = out_row[:, None] * num_splits + sp[None, :]
    ok = row_ok[:, None] & (sp[None, :] < num_splits)
    m = tl.load(M_SPLIT + at, mask=ok, other=float("-inf"))
    m_max = tl.max(m, 1)
    m_safe = tl.where(m_max == float("-inf"), 0.0, m_max)
    total = tl.sum(tl.load(L_SPLIT + at, mask=ok, other=0.0) * tl.exp2(m - m_safe[:, None]), 1)
    lse2 = tl.where(total > 0, m_safe + tl.log2(tl.where(total > 0, total, 1.0)), float("inf"))  # inf: p = 0

    t_vec = tl.zeros([1], tl.int32) + t
    ok_vec = t_vec >= 0
    run = tl.full([1, NP], -1, tl.int64)
    first = part * sel_chunks_per_program
    last = tl.minimum(first + sel_chunks_per_program, tl.where(q_ok, tl.cdiv(t // SEL_LEN + 1, BS), 0))
    for ci in range(first, last):
        j = ci * BS + tl.arange(0, BS)
        # own[j] was written by the chunk holding compression block j*R, spill[j-1] by the one holding (j-1)*R;
        # only chunks whose first block is visible were written
        c_own = (j * R) // BN
        own_ok = row_ok[:, None] & (c_own * BN < n_vis)[None, :]
        f_own = tl.exp2(tl.load(M_CHUNK + out_row[:, None] * num_chunks + c_own[None, :], mask=own_ok,
                                other=float("-inf")) - lse2[:, None])
        contrib = f_own * tl.load(OWN + out_row[:, None] * (num_chunks * NJ) + j[None, :], mask=own_ok, other=0.0)
        if R > 1:
            c_spill = (tl.maximum(j - 1, 0) * R) // BN
            spill_ok = row_ok[:, None] & ((j >= 1) & (c_spill * BN < n_vis))[None, :]
            f_spill = tl.exp2(tl.load(M_CHUNK + out_row[:, None] * num_chunks + c_spill[None, :], mask=spill_ok,
                                      other=float("-inf")) - lse2[:, None])
            contrib += f_spill * tl.load(SPILL + out_row[:, None] * (num_chunks * NJ) + (j - 1)[None, :],
                                         mask=spill_ok, other=0.0)
        score = tl.sum(contrib, 0)  # Eq. 10: the group's heads summed
        run = _merge_chunk(run, score[None, :], ci, t_vec, ok_vec, BS, NP, SEL_LEN, N_INIT, N_LOCAL)
    rank = tl.arange(0, NP)[None, :]
    tl.store(CAND + ((bt * HKV + h) * num_sel_programs + part).to(tl.int64) * NP + rank, run)


@triton.jit
def _selected_blocks(CAND, cand_row, num_sel_programs, CP: tl.constexpr, NP: tl.constexpr):
    """The n best blocks of a (query, KV head) from its programs' candidates: `[NP]` int32, best first, -1 unused."""
    c = tl.arange(0, CP)[:, None]
    keys = tl.load(CAND + (cand_row * num_sel_programs + c) * NP + tl.arange(0, NP)[None, :],
                   mask=c < num_sel_programs, other=-1)
    keys = tl.reshape(keys, [CP * NP])
    if CP == 1:
        best = tl.sort(keys, descending=True)
    else:
        best = tl.topk(keys, NP)
    return tl.where(best >= 0, (best & 0xFFFFFFFF) * -1 + KEY_MAX_LOW, -1).to(tl.int32)


@triton.jit(do_not_specialize=_SPARSE_VARYING)
def _sparse_kernel(
    Q, K, V, KW, VW, QPOS, CAND, IDX, M_UNIT, L_UNIT, ACC_UNIT,
    stride_qb, stride_qt, stride_qh,
    stride_kb, stride_kt, stride_kh,
    stride_vb, stride_vt, stride_vh,
    stride_wb, stride_wt, stride_wh,
    stride_xb, stride_xt, stride_xh,
    scale_log2, num_sel_programs,
    Q_LEN: tl.constexpr, HKV: tl.constexpr, G: tl.constexpr, GP: tl.constexpr,
    DK: tl.constexpr, BK1: tl.constexpr, BK2: tl.constexpr, DV: tl.constexpr, BV: tl.constexpr,
    SEL_LEN: tl.constexpr, N: tl.constexpr, WINDOW: tl.constexpr, NUM_WIN: tl.constexpr,
    PER_UNIT: tl.constexpr, SEL_UNITS: tl.constexpr, NUM_UNITS: tl.constexpr, BN: tl.constexpr,
    NP: tl.constexpr, CP: tl.constexpr, PREC: tl.constexpr, STAGES: tl.constexpr,
):
    """Unit u < SEL_UNITS: selected slots [u*PER_UNIT, ...) (blocks of SEL_LEN keys); else window chunks of BN keys."""
    unit = tl.program_id(0)
    bt = tl.program_id(1)
    h = tl.program_id(2)
    b = bt // Q_LEN
    t = tl.load(QPOS + bt)

    q1, q2, row_ok, out_row = _group_queries(Q, bt, h, stride_qb, stride_qt, stride_qh, Q_LEN, HKV, G, GP, DK, BK1,
                                             BK2)
    dv = tl.arange(0, BV)
    is_sel = unit < SEL_UNITS
    slots = tl.arange(0, NP)
    if is_sel:
        blocks = _selected_blocks(CAND, bt * HKV + h, num_sel_programs, CP, NP)
        if unit == 0:
            tl.store(IDX + (bt * HKV + h) * N + slots, blocks, mask=slots < N)
    else:
        blocks = tl.full([NP], -1, tl.int32)
    if is_sel:
        k_base = K + b.to(tl.int64) * stride_kb + h * stride_kh
        v_base = V + b.to(tl.int64) * stride_vb + h * stride_vh
        skt = stride_kt
        svt = stride_vt
        first = unit * PER_UNIT
        count = tl.minimum(PER_UNIT, N - first)
    else:
        k_base = KW + b.to(tl.int64) * stride_wb + h * stride_wh
        v_base = VW + b.to(tl.int64) * stride_xb + h * stride_xh
        skt = stride_wt
        svt = stride_xt
        first = (unit - SEL_UNITS) * PER_UNIT
        count = tl.minimum(PER_UNIT, NUM_WIN - first)
    SUB: tl.constexpr = (SEL_LEN + BN - 1) // BN  # key tiles per selected block

    m_i = tl.full([GP], float("-inf"), tl.float32)
    l_i = tl.zeros([GP], tl.float32)
    acc = tl.zeros([GP, BV], tl.float32)
    for e in tl.range(0, tl.where(t >= 0, count, 0) * tl.where(is_sel, SUB, 1), num_stages=STAGES):
        if is_sel:
            blk = tl.sum(tl.where(slots == first + e // SUB, blocks, 0))
            lo = blk * SEL_LEN + (e % SUB) * BN
            hi = tl.minimum(blk * SEL_LEN + SEL_LEN, t + 1)
            lo = tl.where(blk >= 0, lo, hi)  # an unused slot (-1) reads nothing
        else:
            lo = t - WINDOW + 1 + (first + e) * BN
            hi = tl.minimum(lo + BN, t + 1)
            lo = tl.maximum(lo, 0)
        kpos = lo + tl.arange(0, BN)
        kv_ok = kpos < hi
        kt1, kt2, vb = _kv_tiles(k_base, v_base, kpos, skt, svt, kv_ok, DK, BK1, BK2, DV, BV)
        s = _tile_scores(q1, q2, kt1, kt2, BK2, PREC)
        s = tl.where(kv_ok[None, :], s * scale_log2, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_use)
        p = tl.exp2(s - m_use[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(vb.dtype), vb, input_precision=PREC)
        m_i = m_new
    at = out_row * NUM_UNITS + unit
    tl.store(M_UNIT + at, m_i, mask=row_ok)
    tl.store(L_UNIT + at, l_i, mask=row_ok)
    tl.store(ACC_UNIT + at[:, None] * DV + dv[None, :], acc, mask=_tile_mask(row_ok[:, None], dv[None, :], DV, BV))


@triton.jit
def _merge_partials(M, L, ACC, row, lo, hi, STRIDE_ROW, UP: tl.constexpr, DV: tl.constexpr,
                    BV: tl.constexpr):
    """softmax(...) V of one row from its partials [lo, hi): sum_u 2^(m_u - M) acc_u / sum_u 2^(m_u - M) l_u."""
    u = lo + tl.arange(0, UP)
    ok = u < hi
    m = tl.load(M + row * STRIDE_ROW + u, mask=ok, other=float("-inf"))
    m_max = tl.max(m, 0)
    w = tl.where(m == float("-inf"), 0.0, tl.exp2(m - tl.where(m_max == float("-inf"), 0.0, m_max)))
    total = tl.sum(w * tl.load(L + row * STRIDE_ROW + u, mask=ok, other=0.0), 0)
    dv = tl.arange(0, BV)
    acc = tl.load(ACC + (row * STRIDE_ROW + u)[:, None] * DV + dv[None, :], mask=_tile_mask(ok[:, None], dv[None, :], DV, BV),
                  other=0.0)
    return tl.sum(w[:, None] * acc, 0) / tl.where(total > 0, total, 1.0)


@triton.jit(do_not_specialize=_COMBINE_VARYING)
def _combine_kernel(
    QPOS, GATES, M_SPLIT, L_SPLIT, ACC_SPLIT, M_UNIT, L_UNIT, ACC_UNIT, OUT,
    stride_gb, stride_gt, stride_gh, stride_ob, stride_ot, stride_oh,
    num_splits,
    Q_LEN: tl.constexpr, HQ: tl.constexpr, DV: tl.constexpr, BV: tl.constexpr, SP: tl.constexpr,
    SEL_UNITS: tl.constexpr, NUM_UNITS: tl.constexpr, UP: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    bt = row // HQ
    head = row % HQ
    b = bt // Q_LEN
    i = bt % Q_LEN
    t = tl.load(QPOS + bt)
    # the compressed splits are normalised by the sum over all splits, as the other two branches
    o_cmp = _merge_partials(M_SPLIT, L_SPLIT, ACC_SPLIT, row, 0, num_splits, num_splits, SP, DV, BV)
    o_slc = _merge_partials(M_UNIT, L_UNIT, ACC_UNIT, row, 0, SEL_UNITS, NUM_UNITS, UP, DV, BV)
    o_win = _merge_partials(M_UNIT, L_UNIT, ACC_UNIT, row, SEL_UNITS, NUM_UNITS, NUM_UNITS, UP, DV, BV)
    g = GATES + b * stride_gb + i * stride_gt + head * stride_gh
    out = (tl.load(g).to(tl.float32) * o_cmp + tl.load(g + 1).to(tl.float32) * o_slc
           + tl.load(g + 2).to(tl.float32) * o_win)
    out = tl.where(t >= 0, out, 0.0)
    dv = tl.arange(0, BV)
    tl.store(OUT + b * stride_ob + i * stride_ot + head * stride_oh + dv, out.to(OUT.dtype.element_ty), mask=dv < DV)


# Launch geometry and software pipelining of the decode kernels (benchmarks/sweep_decode.py): programs per
# multiprocessor, the stages of the compressed pass's and the sparse units' loops, the combine's warps. H200, 64k,
# batch 16, whole step: the compressed pass at 2 programs per SM with its chunk loop double-buffered 102 -> 85 us
# (64q/4kv) and 153 -> 132 us (32q/8kv) against 4 per SM unpipelined; the selection and sparse units at 8 per SM and
# the combine at 2 warps a few us each (benchmarks/results/logs/decode_variants_h200.log). Batch 1 is unchanged by
# the compressed pass's setting (one chunk per program there).
_PROGRAMS_PER_SM = 8
_CMP_PROGRAMS_PER_SM = 2
_CMP_STAGES = 2
_SPARSE_STAGES = 1
_COMBINE_WARPS = 2


def _grid_plan(num_rows: int, num_items: int, sms: int, per_sm: int) -> tuple[int, int]:
    """(programs per row, items per program) that give about `per_sm` programs per multiprocessor."""
    per_row = max(1, min(num_items, -(-per_sm * sms // max(num_rows, 1))))
    per_program = -(-num_items // per_row)
    return -(-num_items // per_program), per_program


def nsa_decode_triton(
    q, k, v, k_cmp, v_cmp, gates, query_positions, *, compress_block_size, compress_stride, select_block_size,
    num_selected_blocks, window_size, num_initial_blocks, num_local_blocks, scale, k_win=None, v_win=None,
    return_block_indices=False,
):
    """
    Same contract as `nsa_hf.kernels.nsa_decode` (inputs already checked there). Returns `[B, Tq, HQ, DV]`, and with
    `return_block_indices` also the int32 `[B, Tq, HKV, n]` selection (unordered, -1 for unused slots).
    """
    B, Tq, HQ, DK = q.shape
    cap, HKV = k.shape[1], k.shape[2]
    DV = v.shape[-1]
    G = HQ // HKV
    GP = max(16, next_pow2(G))
    l, d, lp, n, w = compress_block_size, compress_stride, select_block_size, num_selected_blocks, window_size
    R, C = lp // d, l // d
    BN = max(64, 16 * R)  # compressed blocks per chunk: NJ = BN / R selection blocks per chunk, >= 16 for the dot
    NJ = BN // R
    BK1, BK2 = split_head_dim(DK)
    BV = max(16, next_pow2(DV))
    NP = max(16, next_pow2(n))
    prec = dot_precision(q.dtype)
    k_win = k if k_win is None else k_win
    v_win = v if v_win is None else v_win
    device = q.device
    sms = device_limits(device).num_sms

    rows = B * Tq * HQ
    num_chunks = max(triton.cdiv(k_cmp.shape[1], BN), triton.cdiv(triton.cdiv(cap, lp) * R, BN), 1)
    num_splits, chunks_per_split = _grid_plan(B * Tq * HKV, num_chunks, sms, _CMP_PROGRAMS_PER_SM)
    BK = 64 if lp % 64 == 0 or lp > 64 else max(16, next_pow2(lp))  # key tile of the selected / window units
    num_win = triton.cdiv(w, BK)
    units_per_row, per_unit = _grid_plan(B * Tq * HKV, n + num_win, sms, _PROGRAMS_PER_SM)
    sel_units, win_units = triton.cdiv(n, per_unit), triton.cdiv(num_win, per_unit)
    num_units = sel_units + win_units

    BS = max(NP, 128)  # selection blocks per top-n merge
    sel_programs, sel_chunks_per_program = _grid_plan(B * Tq * HKV, triton.cdiv(triton.cdiv(cap, lp), BS), sms,
                                                     _PROGRAMS_PER_SM)

    sizes = [rows * num_splits, rows * num_splits, rows * num_splits * DV, rows * num_chunks,
             rows * num_chunks * NJ, rows * num_chunks * NJ if R > 1 else 0, rows * num_units, rows * num_units,
             rows * num_units * DV]
    work = torch.empty(sum(sizes), dtype=torch.float32, device=device)
    m_split, l_split, acc_split, m_chunk, own, spill, m_unit, l_unit, acc_unit = work.split(sizes)
    cand = torch.empty(B * Tq * HKV * sel_programs * NP, dtype=torch.int64, device=device)
    idx = torch.empty(B, Tq, HKV, n, dtype=torch.int32, device=device)
    out = torch.empty(B, Tq, HQ, DV, dtype=q.dtype, device=device)
    qpos = query_positions.to(torch.int32).contiguous()
    common = dict(HKV=HKV, G=G, GP=GP, num_warps=4, num_stages=1)

    _cmp_kernel[(num_splits, B * Tq, HKV)](
        q, k_cmp, v_cmp, qpos, m_split, l_split, acc_split, m_chunk, own, spill,
        q.stride(0), q.stride(1), q.stride(2), k_cmp.stride(0), k_cmp.stride(1), k_cmp.stride(2),
        v_cmp.stride(0), v_cmp.stride(1), v_cmp.stride(2),
        num_chunks, chunks_per_split, num_splits, scale * LOG2E,
        Q_LEN=Tq, DK=DK, BK1=BK1, BK2=BK2, DV=DV, BV=BV, CMP_LEN=l, STRIDE=d, R=R, C=C, BN=BN, NJ=NJ, PREC=prec,
        STAGES=_CMP_STAGES, **common,
    )
    _select_kernel[(sel_programs, B * Tq, HKV)](
        qpos, m_split, l_split, m_chunk, own, spill, cand, num_chunks, num_splits, sel_chunks_per_program,
        sel_programs, SP=max(2, next_pow2(num_splits)), CMP_LEN=l, STRIDE=d, SEL_LEN=lp, R=R, BN=BN, NJ=NJ,
        NP=NP, N_INIT=num_initial_blocks, N_LOCAL=num_local_blocks, BS=BS, **common,
    )
    _sparse_kernel[(num_units, B * Tq, HKV)](
        q, k, v, k_win, v_win, qpos, cand, idx, m_unit, l_unit, acc_unit,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), k_win.stride(0), k_win.stride(1), k_win.stride(2),
        v_win.stride(0), v_win.stride(1), v_win.stride(2), scale * LOG2E, sel_programs,
        Q_LEN=Tq, DK=DK, BK1=BK1, BK2=BK2, DV=DV, BV=BV, SEL_LEN=lp, N=n, WINDOW=w, NUM_WIN=num_win,
        PER_UNIT=per_unit, SEL_UNITS=sel_units, NUM_UNITS=num_units, BN=BK, NP=NP,
        CP=max(1, next_pow2(sel_programs)), PREC=prec, STAGES=_SPARSE_STAGES, **common,
    )
    _combine_kernel[(rows,)](
        qpos, gates, m_split, l_split, acc_split, m_unit, l_unit, acc_unit, out,
        gates.stride(0), gates.stride(1), gates.stride(2), out.stride(0), out.stride(1), out.stride(2),
        num_splits, Q_LEN=Tq, HQ=HQ, DV=DV, BV=BV, SP=max(2, next_pow2(num_splits)),
        SEL_UNITS=sel_units, NUM_UNITS=num_units, UP=max(2, next_pow2(max(sel_units, win_units))),
        num_warps=_COMBINE_WARPS, num_stages=1,
    )
    return (out, idx) if return_block_indices else out
