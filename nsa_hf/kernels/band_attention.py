"""
Band attention: the Triton kernels shared by the sliding-window and the compressed branch (forward here, backward in
`band_attention_bwd.py`).

Both branches are the same computation with a different visibility rule. Key `j` has an end position
`e(j) = j * key_stride + key_end`; a query at position `p` (bottom-right aligned, `p = Tk - Tq + i`) sees key `j` iff

    e(j) <= p                      (causal: the key, or the whole compression block, is complete)
    e(j) >  p - window             (only when WINDOWED)

* window branch:     key_stride = 1, key_end = 0,          WINDOWED  -> keys p - w + 1 .. p
* compressed branch: key_stride = d, key_end = l - 1,      causal    -> blocks with i*d + l - 1 <= p

Design (FlashAttention-2 style, written for H100 / bf16):

* GQA packing. All G = HQ / HKV query heads of a KV head read the same keys and their masks only depend on the
  position, so one tile of BLOCK_M rows holds BLOCK_T query positions x HG heads of one KV group
  (row r -> position r // HG, head r % HG; HG = G, or BLOCK_M with G split in NUM_HC chunks when G > BLOCK_M).
  Small groups therefore still fill the tensor-core rows, and each K/V tile is loaded once for the whole group.
* Forward / dQ: one program per (query tile, KV head [x head chunk]); it walks only the key tiles inside the tile's
  visible band (window: [t_min - w + 1, t_max]; compressed: [0, (t_max + 1 - l) // d]). Only edge tiles are masked:
  either three loops (masked low edge / unmasked interior / masked high edge) or one software-pipelined loop that
  tests at run time whether a tile is an edge tile (SPLIT, autotuned). Online softmax in the exp2 domain with fp32
  accumulators; a row that sees no key gets o = 0 and lse = -inf, and P = 0 in the backward (no NaN).
* dK/dV: one program per (key tile, KV head, query chunk); it walks the query tiles (all heads of the group, so no
  reduction over heads is needed) that can see the key tile, masked / unmasked / masked, computing S^T, P^T,
  dV += P^T dO, dP^T, dS^T, dK += dS^T Q. On long causal bands (compressed branch) the queries are split into chunks
  whose partial dK/dV add up with fp32 atomics, so the triangular work spreads over many programs; with a single
  chunk (window branch, short sequences) the result is stored directly and is deterministic.
* dQ: its own kernel (no atomics); it also computes delta = rowsum(dO * O) for its rows when the caller has none,
  before the dK/dV kernel reads it.
* Head dims that are not a power of two (192) are split into two power-of-two pieces (128 + 64) so no tensor-core
  work is wasted on padding; other odd dims are zero-padded on the host.
* Packed documents: one program per (document, tile) from a work list of the call's geometry (`_geometry.py`: built
  on the device, no host sync, cached per `cu_seqlens` object); without `cu_seqlens` the batch plays the role of the
  documents.
* Configurations (key tile, warps, stages, loop form) are autotuned per (group size, head dims, branch, varlen) among
  the candidates of `_tiling.py`, filtered by the device's shared memory and the register rules measured for its
  capability; the interpreter (CPU tests) runs one fixed small set (`override(band_tiles=...)`).

Nothing of size T x T or T x Nc is ever allocated.
"""

from contextlib import nullcontext

import torch
import triton
import triton.language as tl

from ._geometry import Geometry
from ._tiling import (
    BAND_FWD_CONFIGS,
    DECODE_ROWS,
    INTERPRET,
    INTERPRET_BAND_TILES,
    LOG2E,
    SWITCHES,
    TIMED,
    choose_configs,
    device_limits,
    dot_precision,
    split_head_dim,
    tuning,
)

NO_WINDOW = 1 << 30  # the window of a causal band

# ---------------------------------------------------------------------------------------------------------------------
# small jit helpers
# ---------------------------------------------------------------------------------------------------------------------


# Integer arguments that change with the prompt length: never specialised (on == 1 or on divisibility by 16), so that
# a prefill of a new length compiles nothing. The backward kernels keep it: training runs few lengths (packed rows),
# and with every kernel unspecialised the 8k training step measured 4.5% slower on an H200 (notes/PERF.md).
_BAND_FWD_VARYING = ["Tq", "Tk", "NK", "num_docs", "tiles_per_doc", "stride_lb"]


@triton.jit
def _locate(pid, TILE_DOC, TILE_CUM, CU_Q, CU_K, CU_N, num_docs, tiles_per_doc, Tq, Tk, NK, VARLEN: tl.constexpr):
    """Map a program id to (batch, tile within doc, q offset, q len, k len, key offset, key count, surplus program)."""
    if VARLEN:
        doc = tl.load(TILE_DOC + pid)
        invalid = doc >= num_docs
        doc = tl.minimum(doc, num_docs - 1)
        tile = pid - tl.load(TILE_CUM + doc)
        q0 = tl.load(CU_Q + doc)
        q_len = tl.load(CU_Q + doc + 1) - q0
        k_len = tl.load(CU_K + doc + 1) - tl.load(CU_K + doc)
        n0 = tl.load(CU_N + doc)
        n_keys = tl.load(CU_N + doc + 1) - n0
        b = doc * 0
    else:
        b = pid // tiles_per_doc
        tile = pid % tiles_per_doc
        invalid = b < 0
        q0 = b * 0
        q_len = q0 + Tq
        k_len = q0 + Tk
        n0 = b * 0
        n_keys = q0 + NK
    return b, tile, q0, q_len, k_len, n0, n_keys, invalid


@triton.jit
def _key_ranges(p_first, p_last, n_keys, window, key_stride, key_end, BLOCK_N: tl.constexpr, WINDOWED: tl.constexpr):
    """
    Key tiles of a query tile holding positions p_first..p_last: [lo_a, end_a) masked, [full_lo, full_hi) unmasked
    (every key visible to every position of the tile), [full_hi, hi) masked; starts are multiples of BLOCK_N.
    """
    hi = tl.where(p_last >= key_end, (p_last - key_end) // key_stride + 1, 0)
    hi = tl.minimum(hi, n_keys)
    f_hi = tl.where(p_first >= key_end, (p_first - key_end) // key_stride + 1, 0)
    f_hi = tl.minimum(f_hi, n_keys)
    if WINDOWED:
        x = p_first - window + 1 - key_end
        lo = tl.where(x > 0, (x + key_stride - 1) // key_stride, 0)
        y = p_last - window + 1 - key_end
        f_lo = tl.where(y > 0, (y + key_stride - 1) // key_stride, 0)
    else:
        lo = hi * 0
        f_lo = hi * 0
    lo_a = (lo // BLOCK_N) * BLOCK_N
    full_lo = tl.maximum(lo_a, ((f_lo + BLOCK_N - 1) // BLOCK_N) * BLOCK_N)
    full_hi = tl.maximum((f_hi // BLOCK_N) * BLOCK_N, full_lo)
    end_a = tl.minimum(full_lo, hi)
    return lo_a, end_a, full_lo, full_hi, hi


@triton.jit
def _query_tile(offs_m, tile, hc, q_len, k_len, G: tl.constexpr, HG: tl.constexpr, BLOCK_T: tl.constexpr):
    """
    GQA packing of a query tile (rows `offs_m`): row r is query i_q = tile*BLOCK_T + r // HG of the document, head
    g = hc*HG + r % HG of the group. Returns (row_ok, pos, p_first, p_last, i_q, g): the rows' validity and positions,
    the tile's first and last position, the rows' query and head in the group.
    """
    t_loc = offs_m // HG
    g = hc * HG + offs_m % HG
    i_q = tile * BLOCK_T + t_loc
    row_ok = (t_loc < BLOCK_T) & (i_q < q_len) & (g < G)
    shift = k_len - q_len
    pos = i_q + shift
    p_first = tile * BLOCK_T + shift
    p_last = tl.minimum(tile * BLOCK_T + BLOCK_T, q_len) - 1 + shift
    return row_ok, pos, p_first, p_last, i_q, g


@triton.jit
def _load_pieces(ptrs, offs1, offs2, ok, HAS2: tl.constexpr):
    """The two head-dim pieces of `[rows, :]` tiles at `ptrs` (rows with `ok` false read 0); the first twice if one."""
    x1 = tl.load(ptrs + offs1[None, :], mask=ok[:, None], other=0.0)
    x2 = x1
    if HAS2:
        x2 = tl.load(ptrs + offs2[None, :], mask=ok[:, None], other=0.0)
    return x1, x2


@triton.jit
def _load_keys(ptrs, ok, MASKED: tl.constexpr):
    """A `[keys, :]` tile; edge tiles mask the keys past the end."""
    if MASKED:
        x = tl.load(ptrs, mask=ok[:, None], other=0.0)
    else:
        x = tl.load(ptrs)
    return x


@triton.jit
def _scores(q1, q2, k_ptrs, offs_dk1, offs_dk2, col_ok, MASKED: tl.constexpr, BLOCK_DK2: tl.constexpr,
            DOT_PREC: tl.constexpr):
    """S = Q K^T of one key tile over both head-dim pieces; returns (S, K piece 1, K piece 2 or piece 1)."""
    k1 = _load_keys(k_ptrs + offs_dk1[None, :], col_ok, MASKED)
    s = tl.dot(q1, tl.trans(k1), input_precision=DOT_PREC)
    k2 = k1
    if BLOCK_DK2 > 0:
        k2 = _load_keys(k_ptrs + offs_dk2[None, :], col_ok, MASKED)
        s = tl.dot(q2, tl.trans(k2), s, input_precision=DOT_PREC)
    return s, k1, k2


@triton.jit
def _visible(cols, pos, col_ok, window, key_stride, key_end, WINDOWED: tl.constexpr):
    """[rows, keys] visibility: key j ends at e(j) = j * key_stride + key_end <= pos (and > pos - window)."""
    e = cols * key_stride + key_end
    vis = (e[None, :] <= pos[:, None]) & col_ok[None, :]
    if WINDOWED:
        vis = vis & (e[None, :] > pos[:, None] - window)
    return vis


@triton.jit
def _mask_edge(x, start_n, cols, pos, col_ok, window, key_stride, key_end, full_lo, full_hi, FILL: tl.constexpr,
               MODE: tl.constexpr, WINDOWED: tl.constexpr):
    """`x` with the invisible entries set to FILL on edge tiles: MODE 1 always, MODE 2 when outside [full_lo, full_hi)."""
    if MODE == 1:
        x = tl.where(_visible(cols, pos, col_ok, window, key_stride, key_end, WINDOWED), x, FILL)
    elif MODE == 2:
        if (start_n < full_lo) | (start_n >= full_hi):
            x = tl.where(_visible(cols, pos, col_ok, window, key_stride, key_end, WINDOWED), x, FILL)
    return x


# ---------------------------------------------------------------------------------------------------------------------
# forward
# ---------------------------------------------------------------------------------------------------------------------


@triton.jit
def _fwd_step(
    acc1, acc2, m_i, l_i, q1, q2, k_base, v_base, start_n, pos, n_keys, window, key_stride, key_end, qk_scale,
    stride_kt, stride_vt, offs_n, offs_dk1, offs_dk2, offs_dv1, offs_dv2, full_lo, full_hi,
    BLOCK_DK2: tl.constexpr, BLOCK_DV2: tl.constexpr, MODE: tl.constexpr, WINDOWED: tl.constexpr,
    DOT_PREC: tl.constexpr,
):
    """
    One key tile of the online softmax: S = Q K^T, running max / sum, acc += P V. MODE 0: interior tile, no masks;
    1: edge tile, masked; 2: either, decided at run time from [full_lo, full_hi) (one loop over all tiles).
    """
    MASKED: tl.constexpr = MODE != 0
    cols = start_n + offs_n
    k_ptrs = k_base + cols.to(tl.int64)[:, None] * stride_kt
    v_ptrs = v_base + cols.to(tl.int64)[:, None] * stride_vt
    col_ok = cols < n_keys
    s, _, _ = _scores(q1, q2, k_ptrs, offs_dk1, offs_dk2, col_ok, MASKED, BLOCK_DK2, DOT_PREC)
    s = _mask_edge(s * qk_scale, start_n, cols, pos, col_ok, window, key_stride, key_end, full_lo, full_hi,
                   float("-inf"), MODE, WINDOWED)
    m_new = tl.maximum(m_i, tl.max(s, 1))
    alpha = tl.math.exp2(m_i - m_new)
    p = tl.math.exp2(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    v1 = _load_keys(v_ptrs + offs_dv1[None, :], col_ok, MASKED)
    acc1 = tl.dot(p.to(v1.dtype), v1, acc1 * alpha[:, None], input_precision=DOT_PREC)
    if BLOCK_DV2 > 0:
        v2 = _load_keys(v_ptrs + offs_dv2[None, :], col_ok, MASKED)
        acc2 = tl.dot(p.to(v2.dtype), v2, acc2 * alpha[:, None], input_precision=DOT_PREC)
    return acc1, acc2, m_new, l_i


@triton.jit(do_not_specialize=_BAND_FWD_VARYING)
def _band_fwd_kernel(
    Q, K, V, O, LSE,
    TILE_DOC, TILE_CUM, CU_Q, CU_K, CU_N,
    stride_qb, stride_qt, stride_qh,
    stride_kb, stride_kt, stride_kh,
    stride_vb, stride_vt, stride_vh,
    stride_ob, stride_ot, stride_oh,
    stride_lb, stride_lt,
    Tq, Tk, NK, num_docs, tiles_per_doc,
    qk_scale, window, key_stride, key_end,
    G: tl.constexpr, HG: tl.constexpr, NUM_HC: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_DK1: tl.constexpr, BLOCK_DK2: tl.constexpr, BLOCK_DV1: tl.constexpr, BLOCK_DV2: tl.constexpr,
    WINDOWED: tl.constexpr, VARLEN: tl.constexpr, REVERSE: tl.constexpr, DOT_PREC: tl.constexpr,
    BLOCK_N: tl.constexpr, SPLIT: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_h = tl.program_id(1)
    kvh = pid_h // NUM_HC
    hc = pid_h % NUM_HC
    b, tile, q0, q_len, k_len, n0, n_keys, invalid = _locate(
        pid_m, TILE_DOC, TILE_CUM, CU_Q, CU_K, CU_N, num_docs, tiles_per_doc, Tq, Tk, NK, VARLEN
    )
    if VARLEN:
        if invalid:
            return
    if REVERSE:  # the heaviest (latest) tiles of a causal band start first
        tile = (q_len + BLOCK_T - 1) // BLOCK_T - 1 - tile
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_dk1 = tl.arange(0, BLOCK_DK1)
    offs_dk2 = BLOCK_DK1 + tl.arange(0, BLOCK_DK2 if BLOCK_DK2 > 0 else 16)
    offs_dv1 = tl.arange(0, BLOCK_DV1)
    offs_dv2 = BLOCK_DV1 + tl.arange(0, BLOCK_DV2 if BLOCK_DV2 > 0 else 16)
    row_ok, pos, p_first, p_last, i_q, g = _query_tile(offs_m, tile, hc, q_len, k_len, G, HG, BLOCK_T)
    bb = b.to(tl.int64)
    row_t = (q0 + i_q).to(tl.int64)
    head = (kvh * G + g).to(tl.int64)
    q_ptrs = Q + (bb * stride_qb + row_t * stride_qt + head * stride_qh)[:, None]
    q1, q2 = _load_pieces(q_ptrs, offs_dk1, offs_dk2, row_ok, BLOCK_DK2 > 0)
    k_base = K + bb * stride_kb + n0.to(tl.int64) * stride_kt + kvh.to(tl.int64) * stride_kh
    v_base = V + bb * stride_vb + n0.to(tl.int64) * stride_vt + kvh.to(tl.int64) * stride_vh

    # finite start for the running max: a fully masked tile then leaves (m, l, acc) unchanged instead of NaN
    m_i = tl.full([BLOCK_M], -1.0e30, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc1 = tl.zeros([BLOCK_M, BLOCK_DV1], dtype=tl.float32)
    acc2 = tl.zeros([BLOCK_M, BLOCK_DV2 if BLOCK_DV2 > 0 else 16], dtype=tl.float32)

    lo_a, end_a, full_lo, full_hi, hi = _key_ranges(p_first, p_last, n_keys, window, key_stride, key_end, BLOCK_N, WINDOWED)
    if SPLIT:  # three loops: masked low edge, unmasked interior, masked high edge
        if WINDOWED:  # masked tiles at the window's low edge (none for a causal band)
            for start_n in range(lo_a, end_a, BLOCK_N):
                acc1, acc2, m_i, l_i = _fwd_step(
                    acc1, acc2, m_i, l_i, q1, q2, k_base, v_base, start_n, pos, n_keys, window, key_stride, key_end, qk_scale,
                    stride_kt, stride_vt, offs_n, offs_dk1, offs_dk2, offs_dv1, offs_dv2, full_lo, full_hi,
                    BLOCK_DK2, BLOCK_DV2, 1, WINDOWED, DOT_PREC,
                )
        for start_n in range(full_lo, full_hi, BLOCK_N):
            acc1, acc2, m_i, l_i = _fwd_step(
                acc1, acc2, m_i, l_i, q1, q2, k_base, v_base, start_n, pos, n_keys, window, key_stride, key_end, qk_scale,
                stride_kt, stride_vt, offs_n, offs_dk1, offs_dk2, offs_dv1, offs_dv2, full_lo, full_hi,
                BLOCK_DK2, BLOCK_DV2, 0, WINDOWED, DOT_PREC,
            )
        for start_n in range(full_hi, hi, BLOCK_N):
            acc1, acc2, m_i, l_i = _fwd_step(
                acc1, acc2, m_i, l_i, q1, q2, k_base, v_base, start_n, pos, n_keys, window, key_stride, key_end, qk_scale,
                stride_kt, stride_vt, offs_n, offs_dk1, offs_dk2, offs_dv1, offs_dv2, full_lo, full_hi,
                BLOCK_DK2, BLOCK_DV2, 1, WINDOWED, DOT_PREC,
            )
    else:  # one pipelined loop over all tiles; edge tiles are recognised at run time
        for start_n in range(lo_a, hi, BLOCK_N):
            acc1, acc2, m_i, l_i = _fwd_step(
                acc1, acc2, m_i, l_i, q1, q2, k_base, v_base, start_n, pos, n_keys, window, key_stride, key_end,
                qk_scale, stride_kt, stride_vt, offs_n, offs_dk1, offs_dk2, offs_dv1, offs_dv2, full_lo, full_hi,
                BLOCK_DK2, BLOCK_DV2, 2, WINDOWED, DOT_PREC,
            )

    has_key = l_i > 0.0
    l_safe = tl.where(has_key, l_i, 1.0)
    inv_l = 1.0 / l_safe
    lse = tl.where(has_key, (m_i + tl.math.log2(l_safe)) * 0.6931471805599453, float("-inf"))
    o_ptrs = O + (bb * stride_ob + row_t * stride_ot + head * stride_oh)[:, None]
    tl.store(o_ptrs + offs_dv1[None, :], (acc1 * inv_l[:, None]).to(O.dtype.element_ty), mask=row_ok[:, None])
    if BLOCK_DV2 > 0:
        tl.store(o_ptrs + offs_dv2[None, :], (acc2 * inv_l[:, None]).to(O.dtype.element_ty), mask=row_ok[:, None])
    tl.store(LSE + bb * stride_lb + row_t * stride_lt + head, lse, mask=row_ok)


# ---------------------------------------------------------------------------------------------------------------------
# launch configuration
# ---------------------------------------------------------------------------------------------------------------------


def smem_ok(resident_rows: int, streamed_rows: int, dk: int, dv: int, stages: int, args) -> bool:
    """Rough bf16 shared-memory estimate (pipelined streamed tiles + the resident tile) against the device's limit."""
    limits = device_limits(_device(args))
    return (stages * streamed_rows + resident_rows) * (dk + dv) * 2 <= limits.shared_memory - tuning(limits).smem_reserve


def regs_per_thread(fp32_elements: float, num_warps: int) -> float:
    """fp32 accumulator/score registers per thread: a crude spill predictor, calibrated against ptxas (`Tuning`)."""
    return fp32_elements / (32 * num_warps)


def head_dims(args):
    return args["BLOCK_DK1"] + args["BLOCK_DK2"], args["BLOCK_DV1"] + args["BLOCK_DV2"]


def _device(args):
    q = args.get("Q")
    return q.device if isinstance(q, torch.Tensor) else None


# Register budget, from compiling the kernels for sm_90a with ptxas (H100): with 128-row query tiles and DV = 128,
# 4 warps spill (fp32 accumulator 128 x DV plus the 128 x BLOCK_N scores), 8 warps do not; with the dK/dV
# accumulators (64 x (DK + DV) fp32), 64-row query steps spill when DK + DV > 256 and 4 warps spill when DK + DV > 256
# or with 64-row steps at DK + DV = 256. The filters keep the configurations that compiled without spills.
def prune_q_tiled(configs, named_args, **kwargs):
    args = {**named_args, **kwargs}
    dk, dv = head_dims(args)
    bm = args["BLOCK_M"]
    regs = tuning(device_limits(_device(args))).band_q_regs
    kept = [
        c for c in configs
        if smem_ok(bm, c.kwargs["BLOCK_N"], dk, dv, c.num_stages, args)
        and regs_per_thread(bm * dv + 1.5 * bm * c.kwargs["BLOCK_N"], c.num_warps) <= regs
        and not (c.num_warps == 8 and bm <= 32)
        and not (c.kwargs["BLOCK_N"] >= 128 and dk + dv > 256)
    ]
    if bm < DECODE_ROWS and kept:
        kept = kept[:1]
    return choose_configs(kept, configs)


Q_TUNING_KEY = ["G", "BLOCK_M", "BLOCK_DK1", "BLOCK_DK2", "BLOCK_DV1", "BLOCK_DV2", "WINDOWED", "VARLEN"]

if INTERPRET:
    _fwd_kernel = _band_fwd_kernel
else:
    _fwd_kernel = triton.autotune(
        BAND_FWD_CONFIGS, key=Q_TUNING_KEY, prune_configs_by={"early_config_prune": prune_q_tiled}, cache_results=True,
        do_bench=TIMED,
    )(_band_fwd_kernel)


def interpreter_tiles() -> dict:
    """The band kernels' fixed tile sizes under the interpreter."""
    return SWITCHES.band_tiles or INTERPRET_BAND_TILES


def q_tile_rows(g: int, avg_q: int) -> int:
    """Rows (positions x heads) of a query tile: 128, or fewer for short query runs (decoding)."""
    rows = g * max(1, avg_q)
    block_m = 128 if rows >= 128 else max(16, triton.next_power_of_2(rows))
    if INTERPRET:
        block_m = min(block_m, interpreter_tiles()["BLOCK_M"])
    return block_m


def q_tiles(g: int, geo: Geometry):
    """(BLOCK_M, HG, NUM_HC, BLOCK_T): query-tile rows, heads per tile, head chunks, positions per tile."""
    block_m = q_tile_rows(g, geo.avg_q)
    hg = min(g, block_m)
    return block_m, hg, triton.cdiv(g, hg), block_m // hg


# ---------------------------------------------------------------------------------------------------------------------
# host side
# ---------------------------------------------------------------------------------------------------------------------


def device_of(x):
    """Launch on the tensors' GPU even when it is not the current device."""
    return torch.cuda.device(x.device) if x.is_cuda else nullcontext()


def last_dim_contiguous(x):
    return x if x.stride(-1) == 1 else x.contiguous()


def pad_last(x, size):
    return x if x.shape[-1] == size else torch.nn.functional.pad(x, (0, size - x.shape[-1]))


def doc_offsets(geo: Geometry, cu_keys):
    """The kernels' (CU_Q, CU_K, CU_N) arguments: query, key-position and key-row offsets, or dummies."""
    return (geo.cu_q, geo.cu_k, cu_keys) if geo.varlen else (geo.dummy,) * 3


def band_attention_fwd(q, k, v, geo: Geometry, cu_keys, *, scale, window, key_stride, key_end, reverse: bool):
    """
    Band attention forward. q `[B, Tq, HQ, DK]`, k `[B, NK, HKV, DK]`, v `[B, NK, HKV, DV]`, last dims contiguous;
    key j ends at position `j * key_stride + key_end`; packed, `cu_keys` holds the offsets of each document's rows of
    k / v (`geo.cu_k` for the window branch, the compressed offsets for cmp). Returns o `[B, Tq, HQ, DV]` (q's dtype)
    and lse `[B, Tq, HQ]` float32 (natural log; -inf where no key is visible).
    """
    with device_of(q):
        B, Tq, HQ, DK = q.shape
        HKV, DV = k.shape[2], v.shape[3]
        G = HQ // HKV
        dk1, dk2 = split_head_dim(DK)
        dv1, dv2 = split_head_dim(DV)
        q, k, v = pad_last(q, dk1 + dk2), pad_last(k, dk1 + dk2), pad_last(v, dv1 + dv2)
        o = torch.empty(B, Tq, HQ, dv1 + dv2, dtype=q.dtype, device=q.device)
        lse = torch.empty(B, Tq, HQ, dtype=torch.float32, device=q.device)
        if B * Tq > 0:
            block_m, hg, num_hc, block_t = q_tiles(G, geo)
            grid_m, tile_doc, tile_cum, tiles_per_doc = geo.work_list(geo.cu_q, Tq, Tq, block_t)
            extra = {}
            if INTERPRET:
                extra = {"BLOCK_N": interpreter_tiles()["BLOCK_N"], "SPLIT": interpreter_tiles()["SPLIT"]}
            _fwd_kernel[(grid_m, HKV * num_hc)](
                q, k, v, o, lse, tile_doc, tile_cum, *doc_offsets(geo, cu_keys),
                q.stride(0), q.stride(1), q.stride(2),
                k.stride(0), k.stride(1), k.stride(2),
                v.stride(0), v.stride(1), v.stride(2),
                o.stride(0), o.stride(1), o.stride(2),
                lse.stride(0), lse.stride(1),
                Tq, 0 if geo.varlen else geo.k_len, k.shape[1], geo.num_docs, tiles_per_doc,
                scale * LOG2E, window, key_stride, key_end,
                G=G, HG=hg, NUM_HC=num_hc, BLOCK_T=block_t, BLOCK_M=block_m,
                BLOCK_DK1=dk1, BLOCK_DK2=dk2, BLOCK_DV1=dv1, BLOCK_DV2=dv2,
                WINDOWED=window < NO_WINDOW, VARLEN=geo.varlen, REVERSE=reverse, DOT_PREC=dot_precision(q.dtype),
                **extra,
            )
    return (o if dv1 + dv2 == DV else o[..., :DV]), lse
