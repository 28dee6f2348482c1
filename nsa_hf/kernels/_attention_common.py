"""
Shared Triton kernels of the sliding-window and compressed branches: "band" attention.

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
* Packed documents: one program per (document, tile) from a work list built on the device (no host sync; cached per
  `cu_seqlens` object); without `cu_seqlens` the batch plays the role of the documents.
* Configurations (key tile, warps, stages, loop form) are autotuned per (group size, head dims, branch, varlen) among
  ones checked to compile for sm_90a without register spills; the interpreter (CPU tests) uses one fixed small set.

Nothing of size T x T or T x Nc is ever allocated.
"""

import os
from collections import OrderedDict
from contextlib import nullcontext

import torch
import triton
import triton.language as tl

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
LOG2E = 1.4426950408889634
_BIG = 1 << 30  # "no window"


# ---------------------------------------------------------------------------------------------------------------------
# small jit helpers
# ---------------------------------------------------------------------------------------------------------------------


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
    if MASKED:
        col_ok = cols < n_keys
        k1 = tl.load(k_ptrs + offs_dk1[None, :], mask=col_ok[:, None], other=0.0)
    else:
        k1 = tl.load(k_ptrs + offs_dk1[None, :])
    s = tl.dot(q1, tl.trans(k1), input_precision=DOT_PREC)
    if BLOCK_DK2 > 0:
        if MASKED:
            k2 = tl.load(k_ptrs + offs_dk2[None, :], mask=col_ok[:, None], other=0.0)
        else:
            k2 = tl.load(k_ptrs + offs_dk2[None, :])
        s = tl.dot(q2, tl.trans(k2), s, input_precision=DOT_PREC)
    s = s * qk_scale
    if MODE == 1:
        e = cols * key_stride + key_end
        vis = (e[None, :] <= pos[:, None]) & col_ok[None, :]
        if WINDOWED:
            vis = vis & (e[None, :] > pos[:, None] - window)
        s = tl.where(vis, s, float("-inf"))
    elif MODE == 2:
        if (start_n < full_lo) | (start_n >= full_hi):
            e = cols * key_stride + key_end
            vis = (e[None, :] <= pos[:, None]) & col_ok[None, :]
            if WINDOWED:
                vis = vis & (e[None, :] > pos[:, None] - window)
            s = tl.where(vis, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    alpha = tl.math.exp2(m_i - m_new)
    p = tl.math.exp2(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    if MASKED:
        v1 = tl.load(v_ptrs + offs_dv1[None, :], mask=col_ok[:, None], other=0.0)
    else:
        v1 = tl.load(v_ptrs + offs_dv1[None, :])
    acc1 = tl.dot(p.to(v1.dtype), v1, acc1 * alpha[:, None], input_precision=DOT_PREC)
    if BLOCK_DV2 > 0:
        if MASKED:
            v2 = tl.load(v_ptrs + offs_dv2[None, :], mask=col_ok[:, None], other=0.0)
        else:
            v2 = tl.load(v_ptrs + offs_dv2[None, :])
        acc2 = tl.dot(p.to(v2.dtype), v2, acc2 * alpha[:, None], input_precision=DOT_PREC)
    return acc1, acc2, m_new, l_i


@triton.jit
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

    # GQA packing: row r of the tile is query position tile*BLOCK_T + r // HG of head kvh*G + hc*HG + r % HG
    t_loc = offs_m // HG
    g = hc * HG + offs_m % HG
    i_q = tile * BLOCK_T + t_loc
    row_ok = (t_loc < BLOCK_T) & (i_q < q_len) & (g < G)
    shift = k_len - q_len
    pos = i_q + shift
    p_first = tile * BLOCK_T + shift
    p_last = tl.minimum(tile * BLOCK_T + BLOCK_T, q_len) - 1 + shift

    bb = b.to(tl.int64)
    row_t = (q0 + i_q).to(tl.int64)
    head = (kvh * G + g).to(tl.int64)
    q_ptrs = Q + (bb * stride_qb + row_t * stride_qt + head * stride_qh)[:, None]
    q1 = tl.load(q_ptrs + offs_dk1[None, :], mask=row_ok[:, None], other=0.0)
    q2 = q1
    if BLOCK_DK2 > 0:
        q2 = tl.load(q_ptrs + offs_dk2[None, :], mask=row_ok[:, None], other=0.0)
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
# backward: delta, dQ, dK/dV
# ---------------------------------------------------------------------------------------------------------------------


@triton.jit
def _delta_kernel(
    O, DO, DELTA, stride_ob, stride_ot, stride_oh, stride_dob, stride_dot, stride_doh, T, H,
    DV: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    r = pid * BLOCK_R + tl.arange(0, BLOCK_R)
    r_ok = r < T * H
    t = (r // H).to(tl.int64)
    h = (r % H).to(tl.int64)
    d = tl.arange(0, BLOCK_D)
    m = r_ok[:, None] & (d[None, :] < DV)
    o = tl.load(O + b * stride_ob + t[:, None] * stride_ot + h[:, None] * stride_oh + d[None, :], mask=m, other=0.0)
    do = tl.load(DO + b * stride_dob + t[:, None] * stride_dot + h[:, None] * stride_doh + d[None, :], mask=m, other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(DELTA + b * T * H + r, delta, mask=r_ok)


@triton.jit
def _dq_step(
    dq1, dq2, q1, q2, do1, do2, lse2, delta, k_base, v_base, start_n, pos, n_keys, window, key_stride, key_end,
    qk_scale, stride_kt, stride_vt, offs_n, offs_dk1, offs_dk2, offs_dv1, offs_dv2, full_lo, full_hi,
    BLOCK_DK2: tl.constexpr, BLOCK_DV2: tl.constexpr, MODE: tl.constexpr, WINDOWED: tl.constexpr,
    DOT_PREC: tl.constexpr,
):
    """One key tile of dQ: P from the saved lse, dP = dO V^T, dS = P (dP - delta), dQ += dS K. MODE as _fwd_step."""
    MASKED: tl.constexpr = MODE != 0
    cols = start_n + offs_n
    k_ptrs = k_base + cols.to(tl.int64)[:, None] * stride_kt
    v_ptrs = v_base + cols.to(tl.int64)[:, None] * stride_vt
    if MASKED:
        col_ok = cols < n_keys
        k1 = tl.load(k_ptrs + offs_dk1[None, :], mask=col_ok[:, None], other=0.0)
    else:
        k1 = tl.load(k_ptrs + offs_dk1[None, :])
    s = tl.dot(q1, tl.trans(k1), input_precision=DOT_PREC)
    k2 = k1
    if BLOCK_DK2 > 0:
        if MASKED:
            k2 = tl.load(k_ptrs + offs_dk2[None, :], mask=col_ok[:, None], other=0.0)
        else:
            k2 = tl.load(k_ptrs + offs_dk2[None, :])
        s = tl.dot(q2, tl.trans(k2), s, input_precision=DOT_PREC)
    p = tl.math.exp2(s * qk_scale - lse2[:, None])
    if MODE == 1:
        e = cols * key_stride + key_end
        vis = (e[None, :] <= pos[:, None]) & col_ok[None, :]
        if WINDOWED:
            vis = vis & (e[None, :] > pos[:, None] - window)
        p = tl.where(vis, p, 0.0)
    elif MODE == 2:
        if (start_n < full_lo) | (start_n >= full_hi):
            e = cols * key_stride + key_end
            vis = (e[None, :] <= pos[:, None]) & col_ok[None, :]
            if WINDOWED:
                vis = vis & (e[None, :] > pos[:, None] - window)
            p = tl.where(vis, p, 0.0)
    if MASKED:
        v1 = tl.load(v_ptrs + offs_dv1[None, :], mask=col_ok[:, None], other=0.0)
    else:
        v1 = tl.load(v_ptrs + offs_dv1[None, :])
    dp = tl.dot(do1, tl.trans(v1), input_precision=DOT_PREC)
    if BLOCK_DV2 > 0:
        if MASKED:
            v2 = tl.load(v_ptrs + offs_dv2[None, :], mask=col_ok[:, None], other=0.0)
        else:
            v2 = tl.load(v_ptrs + offs_dv2[None, :])
        dp = tl.dot(do2, tl.trans(v2), dp, input_precision=DOT_PREC)
    ds = (p * (dp - delta[:, None])).to(k1.dtype)
    dq1 = tl.dot(ds, k1, dq1, input_precision=DOT_PREC)
    if BLOCK_DK2 > 0:
        dq2 = tl.dot(ds, k2, dq2, input_precision=DOT_PREC)
    return dq1, dq2


@triton.jit
def _band_dq_kernel(
    Q, K, V, O, DO, LSE, DELTA, DQ,
    TILE_DOC, TILE_CUM, CU_Q, CU_K, CU_N,
    stride_qb, stride_qt, stride_qh,
    stride_kb, stride_kt, stride_kh,
    stride_vb, stride_vt, stride_vh,
    stride_ob, stride_ot, stride_oh,
    stride_dob, stride_dot, stride_doh,
    stride_dqb, stride_dqt, stride_dqh,
    stride_lb, stride_lt,
    Tq, Tk, NK, num_docs, tiles_per_doc,
    sm_scale, qk_scale, window, key_stride, key_end,
    G: tl.constexpr, HG: tl.constexpr, NUM_HC: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_DK1: tl.constexpr, BLOCK_DK2: tl.constexpr, BLOCK_DV1: tl.constexpr, BLOCK_DV2: tl.constexpr,
    WINDOWED: tl.constexpr, VARLEN: tl.constexpr, REVERSE: tl.constexpr, COMPUTE_DELTA: tl.constexpr,
    DOT_PREC: tl.constexpr, BLOCK_N: tl.constexpr, SPLIT: tl.constexpr,
):
    """dQ per query tile; with COMPUTE_DELTA it first derives delta = rowsum(dO * O) and stores it for dK/dV."""
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
    if REVERSE:
        tile = (q_len + BLOCK_T - 1) // BLOCK_T - 1 - tile
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_dk1 = tl.arange(0, BLOCK_DK1)
    offs_dk2 = BLOCK_DK1 + tl.arange(0, BLOCK_DK2 if BLOCK_DK2 > 0 else 16)
    offs_dv1 = tl.arange(0, BLOCK_DV1)
    offs_dv2 = BLOCK_DV1 + tl.arange(0, BLOCK_DV2 if BLOCK_DV2 > 0 else 16)

    t_loc = offs_m // HG
    g = hc * HG + offs_m % HG
    i_q = tile * BLOCK_T + t_loc
    row_ok = (t_loc < BLOCK_T) & (i_q < q_len) & (g < G)
    shift = k_len - q_len
    pos = i_q + shift
    p_first = tile * BLOCK_T + shift
    p_last = tl.minimum(tile * BLOCK_T + BLOCK_T, q_len) - 1 + shift

    bb = b.to(tl.int64)
    row_t = (q0 + i_q).to(tl.int64)
    head = (kvh * G + g).to(tl.int64)
    q_ptrs = Q + (bb * stride_qb + row_t * stride_qt + head * stride_qh)[:, None]
    do_ptrs = DO + (bb * stride_dob + row_t * stride_dot + head * stride_doh)[:, None]
    q1 = tl.load(q_ptrs + offs_dk1[None, :], mask=row_ok[:, None], other=0.0)
    q2 = q1
    if BLOCK_DK2 > 0:
        q2 = tl.load(q_ptrs + offs_dk2[None, :], mask=row_ok[:, None], other=0.0)
    do1 = tl.load(do_ptrs + offs_dv1[None, :], mask=row_ok[:, None], other=0.0)
    do2 = do1
    if BLOCK_DV2 > 0:
        do2 = tl.load(do_ptrs + offs_dv2[None, :], mask=row_ok[:, None], other=0.0)
    l_offs = bb * stride_lb + row_t * stride_lt + head
    lse = tl.load(LSE + l_offs, mask=row_ok, other=0.0)
    # a row that sees no key (lse = -inf) gets P = 0 everywhere
    lse2 = tl.where(lse == float("-inf"), float("inf"), lse * 1.4426950408889634)
    if COMPUTE_DELTA:
        o_ptrs = O + (bb * stride_ob + row_t * stride_ot + head * stride_oh)[:, None]
        o1 = tl.load(o_ptrs + offs_dv1[None, :], mask=row_ok[:, None], other=0.0)
        delta = tl.sum(o1.to(tl.float32) * do1.to(tl.float32), 1)
        if BLOCK_DV2 > 0:
            o2 = tl.load(o_ptrs + offs_dv2[None, :], mask=row_ok[:, None], other=0.0)
            delta += tl.sum(o2.to(tl.float32) * do2.to(tl.float32), 1)
        tl.store(DELTA + l_offs, delta, mask=row_ok)
    else:
        delta = tl.load(DELTA + l_offs, mask=row_ok, other=0.0)

    k_base = K + bb * stride_kb + n0.to(tl.int64) * stride_kt + kvh.to(tl.int64) * stride_kh
    v_base = V + bb * stride_vb + n0.to(tl.int64) * stride_vt + kvh.to(tl.int64) * stride_vh
    dq1 = tl.zeros([BLOCK_M, BLOCK_DK1], dtype=tl.float32)
    dq2 = tl.zeros([BLOCK_M, BLOCK_DK2 if BLOCK_DK2 > 0 else 16], dtype=tl.float32)

    lo_a, end_a, full_lo, full_hi, hi = _key_ranges(p_first, p_last, n_keys, window, key_stride, key_end, BLOCK_N, WINDOWED)
    if SPLIT:  # three loops: masked low edge, unmasked interior, masked high edge
        if WINDOWED:  # masked tiles at the window's low edge (none for a causal band)
            for start_n in range(lo_a, end_a, BLOCK_N):
                dq1, dq2 = _dq_step(
                    dq1, dq2, q1, q2, do1, do2, lse2, delta, k_base, v_base, start_n, pos, n_keys, window, key_stride,
                    key_end, qk_scale, stride_kt, stride_vt, offs_n, offs_dk1, offs_dk2, offs_dv1, offs_dv2, full_lo, full_hi,
                    BLOCK_DK2, BLOCK_DV2, 1, WINDOWED, DOT_PREC,
                )
        for start_n in range(full_lo, full_hi, BLOCK_N):
            dq1, dq2 = _dq_step(
                dq1, dq2, q1, q2, do1, do2, lse2, delta, k_base, v_base, start_n, pos, n_keys, window, key_stride,
                key_end, qk_scale, stride_kt, stride_vt, offs_n, offs_dk1, offs_dk2, offs_dv1, offs_dv2, full_lo, full_hi,
                BLOCK_DK2, BLOCK_DV2, 0, WINDOWED, DOT_PREC,
            )
        for start_n in range(full_hi, hi, BLOCK_N):
            dq1, dq2 = _dq_step(
                dq1, dq2, q1, q2, do1, do2, lse2, delta, k_base, v_base, start_n, pos, n_keys, window, key_stride,
                key_end, qk_scale, stride_kt, stride_vt, offs_n, offs_dk1, offs_dk2, offs_dv1, offs_dv2, full_lo, full_hi,
                BLOCK_DK2, BLOCK_DV2, 1, WINDOWED, DOT_PREC,
            )
    else:  # one pipelined loop over all tiles; edge tiles are recognised at run time
        for start_n in range(lo_a, hi, BLOCK_N):
            dq1, dq2 = _dq_step(
                dq1, dq2, q1, q2, do1, do2, lse2, delta, k_base, v_base, start_n, pos, n_keys, window, key_stride,
                key_end, qk_scale, stride_kt, stride_vt, offs_n, offs_dk1, offs_dk2, offs_dv1, offs_dv2, full_lo,
                full_hi, BLOCK_DK2, BLOCK_DV2, 2, WINDOWED, DOT_PREC,
            )

    dq_ptrs = DQ + (bb * stride_dqb + row_t * stride_dqt + head * stride_dqh)[:, None]
    tl.store(dq_ptrs + offs_dk1[None, :], (dq1 * sm_scale).to(DQ.dtype.element_ty), mask=row_ok[:, None])
    if BLOCK_DK2 > 0:
        tl.store(dq_ptrs + offs_dk2[None, :], (dq2 * sm_scale).to(DQ.dtype.element_ty), mask=row_ok[:, None])


@triton.jit
def _dkdv_step(
    dk1, dk2, dv1, dv2, k1, k2, v1, v2, e_cols, col_ok, p_s, p_end, shift, hc,
    q_base, do_base, LSE, DELTA, l_base, stride_qt, stride_qh, stride_dot, stride_doh, stride_lt,
    kvh, qk_scale, window, offs_dk1, offs_dk2, offs_dv1, offs_dv2,
    G: tl.constexpr, HG: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_DK2: tl.constexpr, BLOCK_DV2: tl.constexpr, MASKED: tl.constexpr, WINDOWED: tl.constexpr,
    DOT_PREC: tl.constexpr,
):
    """
    One query tile (BLOCK_T positions x HG heads) against the program's key tile, in the transposed orientation:
    S^T = K Q^T, P^T, dV += P^T dO, dP^T = V dO^T, dS^T = P^T (dP^T - delta), dK += dS^T Q.
    Rows outside the chunk or the group load zeros and contribute nothing.
    """
    offs_m = tl.arange(0, BLOCK_M)
    t_loc = offs_m // HG
    g = hc * HG + offs_m % HG
    pos = p_s + t_loc
    row_ok = (t_loc < BLOCK_T) & (pos < p_end) & (g < G)
    head = (kvh * G + g).to(tl.int64)
    row_t = (pos - shift).to(tl.int64)
    q_ptrs = q_base + (row_t * stride_qt + head * stride_qh)[:, None]
    do_ptrs = do_base + (row_t * stride_dot + head * stride_doh)[:, None]
    q1 = tl.load(q_ptrs + offs_dk1[None, :], mask=row_ok[:, None], other=0.0)
    sT = tl.dot(k1, tl.trans(q1), input_precision=DOT_PREC)
    q2 = q1
    if BLOCK_DK2 > 0:
        q2 = tl.load(q_ptrs + offs_dk2[None, :], mask=row_ok[:, None], other=0.0)
        sT = tl.dot(k2, tl.trans(q2), sT, input_precision=DOT_PREC)
    l_offs = l_base + row_t * stride_lt + head
    lse = tl.load(LSE + l_offs, mask=row_ok, other=0.0)
    lse2 = tl.where(lse == float("-inf"), float("inf"), lse * 1.4426950408889634)
    delta = tl.load(DELTA + l_offs, mask=row_ok, other=0.0)
    pT = tl.math.exp2(sT * qk_scale - lse2[None, :])
    if MASKED:
        vis = (e_cols[:, None] <= pos[None, :]) & col_ok[:, None]
        if WINDOWED:
            vis = vis & (e_cols[:, None] > pos[None, :] - window)
        pT = tl.where(vis, pT, 0.0)
    do1 = tl.load(do_ptrs + offs_dv1[None, :], mask=row_ok[:, None], other=0.0)
    dv1 = tl.dot(pT.to(do1.dtype), do1, dv1, input_precision=DOT_PREC)
    dpT = tl.dot(v1, tl.trans(do1), input_precision=DOT_PREC)
    if BLOCK_DV2 > 0:
        do2 = tl.load(do_ptrs + offs_dv2[None, :], mask=row_ok[:, None], other=0.0)
        dv2 = tl.dot(pT.to(do2.dtype), do2, dv2, input_precision=DOT_PREC)
        dpT = tl.dot(v2, tl.trans(do2), dpT, input_precision=DOT_PREC)
    dsT = (pT * (dpT - delta[None, :])).to(q1.dtype)
    dk1 = tl.dot(dsT, q1, dk1, input_precision=DOT_PREC)
    if BLOCK_DK2 > 0:
        dk2 = tl.dot(dsT, q2, dk2, input_precision=DOT_PREC)
    return dk1, dk2, dv1, dv2


@triton.jit
def _band_dkdv_kernel(
    Q, K, V, DO, LSE, DELTA, DK_OUT, DV_OUT,
    TILE_DOC_S, TILE_CUM_S, TILE_DOC_L, TILE_CUM_L, CU_Q, CU_K, CU_N,
    stride_qb, stride_qt, stride_qh,
    stride_kb, stride_kt, stride_kh,
    stride_vb, stride_vt, stride_vh,
    stride_dob, stride_dot, stride_doh,
    stride_dkb, stride_dkt, stride_dkh,
    stride_dvb, stride_dvt, stride_dvh,
    stride_lb, stride_lt,
    Tq, Tk, NK, num_docs, tiles_per_doc_s, tiles_per_doc_l, q_chunk,
    sm_scale, qk_scale, window, key_stride, key_end,
    G: tl.constexpr,
    BLOCK_DK1: tl.constexpr, BLOCK_DK2: tl.constexpr, BLOCK_DV1: tl.constexpr, BLOCK_DV2: tl.constexpr,
    WINDOWED: tl.constexpr, VARLEN: tl.constexpr, ATOMIC: tl.constexpr, DOT_PREC: tl.constexpr, BLOCK_N_S: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, HG: tl.constexpr, NUM_HC: tl.constexpr, BLOCK_T: tl.constexpr,
):
    pid_n = tl.program_id(0)
    kvh = tl.program_id(1)
    chunk = tl.program_id(2)
    # the work list matching the autotuned key-tile size (the host builds one for each of the two sizes)
    if BLOCK_N == BLOCK_N_S:
        b, tile, q0, q_len, k_len, n0, n_keys, invalid = _locate(
            pid_n, TILE_DOC_S, TILE_CUM_S, CU_Q, CU_K, CU_N, num_docs, tiles_per_doc_s, Tq, Tk, NK, VARLEN
        )
    else:
        b, tile, q0, q_len, k_len, n0, n_keys, invalid = _locate(
            pid_n, TILE_DOC_L, TILE_CUM_L, CU_Q, CU_K, CU_N, num_docs, tiles_per_doc_l, Tq, Tk, NK, VARLEN
        )
    if VARLEN:
        if invalid:
            return
    kn = tile * BLOCK_N
    shift = k_len - q_len
    e_first = kn * key_stride + key_end
    e_last = (tl.minimum(kn + BLOCK_N, n_keys) - 1) * key_stride + key_end
    # query positions that see at least one key of the tile; this program takes chunk `chunk` of them
    p_lo = tl.maximum(e_first, shift)
    p_hi = k_len
    if WINDOWED:
        p_hi = tl.minimum(p_hi, e_last + window)
    p_lo = p_lo + chunk * q_chunk
    p_hi = tl.minimum(p_hi, p_lo + q_chunk)
    n_tot = tl.maximum(p_hi - p_lo + BLOCK_T - 1, 0) // BLOCK_T
    if ATOMIC:
        if n_tot <= 0:  # an empty chunk has nothing to add
            return
    # leading query tiles holding a position < e_last are masked (causal edge) ...
    n_a = tl.minimum((tl.maximum(e_last - p_lo, 0) + BLOCK_T - 1) // BLOCK_T, n_tot)
    # ... then unmasked ones while every position p keeps p - window < e_first; the rest is masked (window edge)
    if WINDOWED:
        p_b = p_lo + n_a * BLOCK_T
        n_b = tl.minimum(tl.maximum(e_first + window - p_b, 0) // BLOCK_T, n_tot - n_a)
    else:
        n_b = n_tot - n_a

    offs_n = tl.arange(0, BLOCK_N)
    offs_dk1 = tl.arange(0, BLOCK_DK1)
    offs_dk2 = BLOCK_DK1 + tl.arange(0, BLOCK_DK2 if BLOCK_DK2 > 0 else 16)
    offs_dv1 = tl.arange(0, BLOCK_DV1)
    offs_dv2 = BLOCK_DV1 + tl.arange(0, BLOCK_DV2 if BLOCK_DV2 > 0 else 16)
    cols = kn + offs_n
    col_ok = cols < n_keys
    e_cols = cols * key_stride + key_end

    bb = b.to(tl.int64)
    k_ptrs = K + bb * stride_kb + kvh.to(tl.int64) * stride_kh + (n0 + cols).to(tl.int64)[:, None] * stride_kt
    v_ptrs = V + bb * stride_vb + kvh.to(tl.int64) * stride_vh + (n0 + cols).to(tl.int64)[:, None] * stride_vt
    k1 = tl.load(k_ptrs + offs_dk1[None, :], mask=col_ok[:, None], other=0.0)
    k2 = k1
    if BLOCK_DK2 > 0:
        k2 = tl.load(k_ptrs + offs_dk2[None, :], mask=col_ok[:, None], other=0.0)
    v1 = tl.load(v_ptrs + offs_dv1[None, :], mask=col_ok[:, None], other=0.0)
    v2 = v1
    if BLOCK_DV2 > 0:
        v2 = tl.load(v_ptrs + offs_dv2[None, :], mask=col_ok[:, None], other=0.0)

    q_base = Q + bb * stride_qb + q0.to(tl.int64) * stride_qt
    do_base = DO + bb * stride_dob + q0.to(tl.int64) * stride_dot
    l_base = bb * stride_lb + q0.to(tl.int64) * stride_lt

    dk1 = tl.zeros([BLOCK_N, BLOCK_DK1], dtype=tl.float32)
    dk2 = tl.zeros([BLOCK_N, BLOCK_DK2 if BLOCK_DK2 > 0 else 16], dtype=tl.float32)
    dv1 = tl.zeros([BLOCK_N, BLOCK_DV1], dtype=tl.float32)
    dv2 = tl.zeros([BLOCK_N, BLOCK_DV2 if BLOCK_DV2 > 0 else 16], dtype=tl.float32)
    for hc in range(0, NUM_HC):
        for it in range(0, n_a):
            dk1, dk2, dv1, dv2 = _dkdv_step(
                dk1, dk2, dv1, dv2, k1, k2, v1, v2, e_cols, col_ok, p_lo + it * BLOCK_T, p_hi, shift, hc,
                q_base, do_base, LSE, DELTA, l_base, stride_qt, stride_qh, stride_dot, stride_doh, stride_lt,
                kvh, qk_scale, window, offs_dk1, offs_dk2, offs_dv1, offs_dv2,
                G, HG, BLOCK_T, BLOCK_M, BLOCK_DK2, BLOCK_DV2, True, WINDOWED, DOT_PREC,
            )
        for it in range(n_a, n_a + n_b):
            dk1, dk2, dv1, dv2 = _dkdv_step(
                dk1, dk2, dv1, dv2, k1, k2, v1, v2, e_cols, col_ok, p_lo + it * BLOCK_T, p_hi, shift, hc,
                q_base, do_base, LSE, DELTA, l_base, stride_qt, stride_qh, stride_dot, stride_doh, stride_lt,
                kvh, qk_scale, window, offs_dk1, offs_dk2, offs_dv1, offs_dv2,
                G, HG, BLOCK_T, BLOCK_M, BLOCK_DK2, BLOCK_DV2, False, WINDOWED, DOT_PREC,
            )
        if WINDOWED:  # masked query tiles at the window's far edge (none for a causal band)
            for it in range(n_a + n_b, n_tot):
                dk1, dk2, dv1, dv2 = _dkdv_step(
                    dk1, dk2, dv1, dv2, k1, k2, v1, v2, e_cols, col_ok, p_lo + it * BLOCK_T, p_hi, shift, hc,
                    q_base, do_base, LSE, DELTA, l_base, stride_qt, stride_qh, stride_dot, stride_doh, stride_lt,
                    kvh, qk_scale, window, offs_dk1, offs_dk2, offs_dv1, offs_dv2,
                    G, HG, BLOCK_T, BLOCK_M, BLOCK_DK2, BLOCK_DV2, True, WINDOWED, DOT_PREC,
                )

    # without atomics every key tile stores, zeros for keys that no query sees
    dk_ptrs = DK_OUT + bb * stride_dkb + kvh.to(tl.int64) * stride_dkh + (n0 + cols).to(tl.int64)[:, None] * stride_dkt
    dv_ptrs = DV_OUT + bb * stride_dvb + kvh.to(tl.int64) * stride_dvh + (n0 + cols).to(tl.int64)[:, None] * stride_dvt
    if ATOMIC:
        tl.atomic_add(dk_ptrs + offs_dk1[None, :], dk1 * sm_scale, mask=col_ok[:, None], sem="relaxed")
        if BLOCK_DK2 > 0:
            tl.atomic_add(dk_ptrs + offs_dk2[None, :], dk2 * sm_scale, mask=col_ok[:, None], sem="relaxed")
        tl.atomic_add(dv_ptrs + offs_dv1[None, :], dv1, mask=col_ok[:, None], sem="relaxed")
        if BLOCK_DV2 > 0:
            tl.atomic_add(dv_ptrs + offs_dv2[None, :], dv2, mask=col_ok[:, None], sem="relaxed")
    else:
        tl.store(dk_ptrs + offs_dk1[None, :], (dk1 * sm_scale).to(DK_OUT.dtype.element_ty), mask=col_ok[:, None])
        if BLOCK_DK2 > 0:
            tl.store(dk_ptrs + offs_dk2[None, :], (dk2 * sm_scale).to(DK_OUT.dtype.element_ty), mask=col_ok[:, None])
        tl.store(dv_ptrs + offs_dv1[None, :], dv1.to(DV_OUT.dtype.element_ty), mask=col_ok[:, None])
        if BLOCK_DV2 > 0:
            tl.store(dv_ptrs + offs_dv2[None, :], dv2.to(DV_OUT.dtype.element_ty), mask=col_ok[:, None])


# ---------------------------------------------------------------------------------------------------------------------
# launch configuration
# ---------------------------------------------------------------------------------------------------------------------


def _next_pow2(x: int) -> int:
    return 1 << max(0, (int(x) - 1).bit_length())


def split_head_dim(d: int) -> tuple[int, int]:
    """
    Two power-of-two pieces (each >= 16, the second may be 0) covering head dim `d` with little padding, so that a
    non-power-of-two dim wastes no tensor-core work: 192 -> (128, 64), 96 -> (64, 32), 128 -> (128, 0). When the
    pieces exceed `d` (e.g. 72 -> (64, 16)) the host pads the tensors with zeros.
    """
    if d <= 16:
        return 16, 0
    p = 1 << (d.bit_length() - 1)
    if p == d:
        return d, 0
    rest = max(16, _next_pow2(d - p))
    if p + rest >= _next_pow2(d):
        return _next_pow2(d), 0
    return p, rest


def _smem_ok(resident_rows: int, streamed_rows: int, dk: int, dv: int, stages: int) -> bool:
    """Rough bf16 shared-memory estimate (pipelined streamed tiles + the resident tile) against the H100's 227 KB."""
    return (stages * streamed_rows + resident_rows) * (dk + dv) * 2 <= 200 * 1024


def _regs_per_thread(fp32_elements: float, num_warps: int) -> float:
    """fp32 accumulator/score registers per thread: a crude spill predictor, calibrated against ptxas (see below)."""
    return fp32_elements / (32 * num_warps)


def _dims(args):
    return args["BLOCK_DK1"] + args["BLOCK_DK2"], args["BLOCK_DV1"] + args["BLOCK_DV2"]


# Register budget, from compiling the kernels for sm_90a with ptxas (H100): with 128-row query tiles and DV = 128,
# 4 warps spill (fp32 accumulator 128 x DV plus the 128 x BLOCK_N scores), 8 warps do not; with the dK/dV
# accumulators (64 x (DK + DV) fp32), 64-row query steps spill when DK + DV > 256 and 4 warps spill when DK + DV > 256
# or with 64-row steps at DK + DV = 256. The rules below keep the configurations that compiled without spills.
# Query tiles of fewer rows than this come from decoding (a few queries per sequence): the grid is tiny, every
# configuration runs at launch speed, and timing them all would stall the first generate() call for minutes.
DECODE_ROWS = 64


def choose_configs(kept, configs):
    """
    The configurations the autotuner times. Environment overrides (read at the first call for a tuning key):
    NSA_HF_AUTOTUNE=0 takes the first valid configuration without timing (quick tests, short jobs);
    NSA_HF_CONFIG_INDEX=i takes the i-th valid one (tests that check every configuration on the GPU).
    """
    kept = kept or configs[:1]
    index = os.environ.get("NSA_HF_CONFIG_INDEX")
    if index is not None:
        return [kept[min(int(index), len(kept) - 1)]]
    if os.environ.get("NSA_HF_AUTOTUNE", "1") == "0":
        return kept[:1]
    return kept


def _prune_q_tiled(configs, named_args, **kwargs):
    args = {**named_args, **kwargs}
    dk, dv = _dims(args)
    bm = args["BLOCK_M"]
    kept = [
        c for c in configs
        if _smem_ok(bm, c.kwargs["BLOCK_N"], dk, dv, c.num_stages)
        and _regs_per_thread(bm * dv + 1.5 * bm * c.kwargs["BLOCK_N"], c.num_warps) <= 160
        and not (c.num_warps == 8 and bm <= 32)
        and not (c.kwargs["BLOCK_N"] >= 128 and dk + dv > 256)
    ]
    if bm < DECODE_ROWS and kept:
        kept = kept[:1]
    return choose_configs(kept, configs)


def _prune_k_tiled(configs, named_args, **kwargs):
    args = {**named_args, **kwargs}
    dk, dv = _dims(args)
    kept = []
    for c in configs:
        bn, bm = c.kwargs["BLOCK_N"], c.kwargs["BLOCK_M"]
        if (
            _smem_ok(bn, bm, dk, dv, c.num_stages)
            and _regs_per_thread(bn * (dk + dv) + 3 * bn * bm, c.num_warps) <= 180
            and not (bn == 64 and bm >= 64 and dk + dv > 256)
        ):
            kept.append(c)
    return choose_configs(kept, configs)


# the dK/dV kernel autotunes BLOCK_M (query rows per step); the GQA packing follows from it
_DKDV_HEURISTICS = {
    "HG": lambda a: min(a["G"], a["BLOCK_M"]),
    "NUM_HC": lambda a: -(-a["G"] // min(a["G"], a["BLOCK_M"])),
    "BLOCK_T": lambda a: a["BLOCK_M"] // min(a["G"], a["BLOCK_M"]),
}

# Tile sizes under the CPU interpreter (one fixed configuration; tests may shrink them to reach more tile edges).
INTERPRET_BLOCKS = {"fwd_m": 64, "fwd_n": 32, "dkdv_n": 32, "dkdv_m": 64, "split": False, "dkdv_large": False}

if INTERPRET:
    _fwd_kernel = _band_fwd_kernel
    _dq_kernel = _band_dq_kernel
    _dkdv_kernel = triton.heuristics(_DKDV_HEURISTICS)(_band_dkdv_kernel)
else:
    _Q_KEY = ["G", "BLOCK_M", "BLOCK_DK1", "BLOCK_DK2", "BLOCK_DV1", "BLOCK_DV2", "WINDOWED", "VARLEN"]
    # SPLIT: three loops (masked edge / unmasked interior / masked edge) or one loop that checks at run time whether
    # a tile is an edge tile. One loop keeps a single software pipeline over the few (~w / BLOCK_N) tiles of a window
    # query tile; three loops drop the per-tile check. The autotuner picks.
    _fwd_kernel = triton.autotune(
        [
            triton.Config({"BLOCK_N": 64, "SPLIT": False}, num_warps=8, num_stages=3),
            triton.Config({"BLOCK_N": 64, "SPLIT": True}, num_warps=8, num_stages=3),
            triton.Config({"BLOCK_N": 32, "SPLIT": False}, num_warps=8, num_stages=3),
            triton.Config({"BLOCK_N": 128, "SPLIT": False}, num_warps=8, num_stages=2),
            triton.Config({"BLOCK_N": 64, "SPLIT": False}, num_warps=4, num_stages=3),
            triton.Config({"BLOCK_N": 32, "SPLIT": False}, num_warps=4, num_stages=3),
        ],
        key=_Q_KEY,
        prune_configs_by={"early_config_prune": _prune_q_tiled},
        cache_results=True,
    )(_band_fwd_kernel)
    _dq_kernel = triton.autotune(
        [
            triton.Config({"BLOCK_N": 32, "SPLIT": False}, num_warps=8, num_stages=3),
            triton.Config({"BLOCK_N": 32, "SPLIT": True}, num_warps=8, num_stages=3),
            triton.Config({"BLOCK_N": 64, "SPLIT": False}, num_warps=8, num_stages=2),
            triton.Config({"BLOCK_N": 32, "SPLIT": False}, num_warps=4, num_stages=3),
            triton.Config({"BLOCK_N": 64, "SPLIT": False}, num_warps=4, num_stages=2),
        ],
        key=_Q_KEY,
        prune_configs_by={"early_config_prune": _prune_q_tiled},
        cache_results=True,
    )(_band_dq_kernel)
    _dkdv_kernel = triton.autotune(
        [
            triton.Config({"BLOCK_N": 64, "BLOCK_M": 32}, num_warps=8, num_stages=3),
            triton.Config({"BLOCK_N": 64, "BLOCK_M": 32}, num_warps=8, num_stages=2),
            triton.Config({"BLOCK_N": 64, "BLOCK_M": 64}, num_warps=8, num_stages=2),
            triton.Config({"BLOCK_N": 64, "BLOCK_M": 32}, num_warps=4, num_stages=3),
            triton.Config({"BLOCK_N": 64, "BLOCK_M": 64}, num_warps=4, num_stages=2),
            triton.Config({"BLOCK_N": 128, "BLOCK_M": 32}, num_warps=8, num_stages=3),
            triton.Config({"BLOCK_N": 128, "BLOCK_M": 64}, num_warps=8, num_stages=2),
        ],
        key=["G", "BLOCK_DK1", "BLOCK_DK2", "BLOCK_DV1", "BLOCK_DV2", "WINDOWED", "VARLEN", "ATOMIC"],
        prune_configs_by={"early_config_prune": _prune_k_tiled},
        reset_to_zero=["DK_OUT", "DV_OUT"],
        cache_results=True,
    )(triton.heuristics(_DKDV_HEURISTICS)(_band_dkdv_kernel))


def _q_tile_rows(g: int, avg_q: int) -> int:
    """Rows (positions x heads) of a query tile: 128, or fewer for short query runs (decoding)."""
    rows = g * max(1, avg_q)
    block_m = 128 if rows >= 128 else max(16, _next_pow2(rows))
    if INTERPRET:
        block_m = min(block_m, INTERPRET_BLOCKS["fwd_m"])
    return block_m


def _dot_precision(dtype):
    return "ieee" if dtype == torch.float32 else "tf32"


# ---------------------------------------------------------------------------------------------------------------------
# host side
# ---------------------------------------------------------------------------------------------------------------------


class Docs:
    """
    Geometry of the documents: without `cu_q` the batch entries (each `tq` queries, `tk` key positions, `nk` keys);
    with it the packed documents given by the int32 offsets of their queries (`cu_q`), key positions (`cu_k`) and
    attended keys, i.e. rows of k / v (`cu_n`: `cu_k` for the window branch, the compressed offsets for cmp).
    """

    def __init__(self, batch, tq, tk, nk, cu_q=None, cu_k=None, cu_n=None):
        self.varlen = cu_q is not None
        self.batch, self.tq, self.tk, self.nk = batch, tq, tk, nk
        self.cu_q, self.cu_k, self.cu_n = cu_q, cu_k, cu_n
        self.num_docs = cu_q.shape[0] - 1 if self.varlen else batch

    def schedule(self, cu, total: int, per_doc: int, block: int):
        """
        Work list over (document, tile) -> (grid size, tile->doc, doc->first tile, tiles per doc). Packed: built on
        the device from the offsets `cu` without a host sync; the grid is an upper bound and surplus programs exit.
        """
        if not self.varlen:
            tiles = triton.cdiv(per_doc, block)
            return self.batch * tiles, None, None, tiles
        return _cached(cu, ("schedule", total, block), lambda: self._build_schedule(cu, total, block))

    def _build_schedule(self, cu, total, block):
        lens = cu[1:] - cu[:-1]
        cum = torch.zeros(self.num_docs + 1, dtype=torch.int32, device=cu.device)
        torch.cumsum(torch.div(lens + (block - 1), block, rounding_mode="floor"), 0, out=cum[1:])
        grid = triton.cdiv(total, block) + self.num_docs
        tile_doc = torch.searchsorted(cum[1:], torch.arange(grid, device=cu.device, dtype=torch.int32), right=True)
        return grid, tile_doc.to(torch.int32), cum, 0

    def offsets(self, dummy):
        return (self.cu_q, self.cu_k, self.cu_n) if self.varlen else (dummy, dummy, dummy)

    def avg_queries(self, tq: int) -> int:
        return max(1, tq // max(1, self.num_docs)) if self.varlen else tq


_CACHE: "OrderedDict[tuple, tuple]" = OrderedDict()
_CACHE_SIZE = 64


def _cached(t: torch.Tensor, tag: tuple, build):
    """
    Memoise small device-side tables derived from an offsets tensor `t` (work lists, compressed offsets): every layer
    of a model step passes the same `cu_seqlens` object, so the tables are built once per step, not per kernel call.
    An entry is only reused for the very same tensor object, unmodified (`_version`); the cache keeps `t` alive, so
    its id cannot be recycled while the entry exists.
    """
    key = (id(t), t._version) + tag
    hit = _CACHE.get(key)
    if hit is not None and hit[0] is t:
        _CACHE.move_to_end(key)
        return hit[1]
    value = build()
    _CACHE[key] = (t, value)
    if len(_CACHE) > _CACHE_SIZE:
        _CACHE.popitem(last=False)
    return value


def _pad_last(x, size):
    return x if x.shape[-1] == size else torch.nn.functional.pad(x, (0, size - x.shape[-1]))


def band_attention_fwd(q, k, v, *, scale, window, key_stride, key_end, docs: Docs, reverse: bool):
    """
    Band attention forward: q `[B, Tq, HQ, DK]`, k `[B, NK, HKV, DK]`, v `[B, NK, HKV, DV]` (last dim contiguous).
    Returns o `[B, Tq, HQ, DV]` (q's dtype) and lse `[B, Tq, HQ]` float32 (natural log; -inf where no key is visible).
    """
    with _device_of(q):
        return _band_attention_fwd(q, k, v, scale, window, key_stride, key_end, docs, reverse)


def _device_of(x):
    """Launch on the tensors' GPU even when it is not the current device."""
    return torch.cuda.device(x.device) if x.is_cuda else nullcontext()


def _band_attention_fwd(q, k, v, scale, window, key_stride, key_end, docs, reverse):
    B, Tq, HQ, DK = q.shape
    HKV, DV = k.shape[2], v.shape[3]
    G = HQ // HKV
    dk1, dk2 = split_head_dim(DK)
    dv1, dv2 = split_head_dim(DV)
    q, k, v = _pad_last(q, dk1 + dk2), _pad_last(k, dk1 + dk2), _pad_last(v, dv1 + dv2)
    o = torch.empty(B, Tq, HQ, dv1 + dv2, dtype=q.dtype, device=q.device)
    lse = torch.empty(B, Tq, HQ, dtype=torch.float32, device=q.device)
    if B * Tq > 0:
        block_m = _q_tile_rows(G, docs.avg_queries(Tq))
        hg = min(G, block_m)
        num_hc = triton.cdiv(G, hg)
        block_t = block_m // hg
        grid_m, tile_doc, tile_cum, tiles_per_doc = docs.schedule(docs.cu_q, Tq, Tq, block_t)
        dummy = torch.zeros(1, dtype=torch.int32, device=q.device)
        extra = {"BLOCK_N": INTERPRET_BLOCKS["fwd_n"], "SPLIT": INTERPRET_BLOCKS["split"]} if INTERPRET else {}
        _fwd_kernel[(grid_m, HKV * num_hc)](
            q, k, v, o, lse,
            dummy if tile_doc is None else tile_doc, dummy if tile_cum is None else tile_cum, *docs.offsets(dummy),
            q.stride(0), q.stride(1), q.stride(2),
            k.stride(0), k.stride(1), k.stride(2),
            v.stride(0), v.stride(1), v.stride(2),
            o.stride(0), o.stride(1), o.stride(2),
            lse.stride(0), lse.stride(1),
            Tq, docs.tk, docs.nk, docs.num_docs, tiles_per_doc,
            scale * LOG2E, window, key_stride, key_end,
            G=G, HG=hg, NUM_HC=num_hc, BLOCK_T=block_t, BLOCK_M=block_m,
            BLOCK_DK1=dk1, BLOCK_DK2=dk2, BLOCK_DV1=dv1, BLOCK_DV2=dv2,
            WINDOWED=window < _BIG, VARLEN=docs.varlen, REVERSE=reverse, DOT_PREC=_dot_precision(q.dtype),
            **extra,
        )
    return (o if dv1 + dv2 == DV else o[..., :DV]), lse


def attention_delta(o, do):
    """delta = rowsum(dO * O) in float32, `[B, T, H]` (the softmax-backward correction term)."""
    B, T, H, DV = o.shape
    delta = torch.empty(B, T, H, dtype=torch.float32, device=o.device)
    if B * T * H == 0:
        return delta
    o, do = last_dim_contiguous(o), last_dim_contiguous(do)
    block_d = max(16, _next_pow2(DV))
    block_r = max(1, min(64, 8192 // block_d))
    with _device_of(o):
        _delta_kernel[(triton.cdiv(T * H, block_r), B)](
            o, do, delta, o.stride(0), o.stride(1), o.stride(2), do.stride(0), do.stride(1), do.stride(2), T, H,
            DV=DV, BLOCK_R=block_r, BLOCK_D=block_d,
        )
    return delta


def band_attention_bwd(
    do, q, k, v, lse, *, o=None, delta=None, scale, window, key_stride, key_end, docs: Docs, reverse: bool,
    q_chunk=None,
):
    """
    Band attention backward from the forward's lse. delta = rowsum(dO * O) (float32 `[B, Tq, HQ]`) is taken from
    `delta`, or computed by the dQ kernel from `o` on the fly. `q_chunk`: query positions per dK/dV program (None: all
    of them, stored directly; otherwise chunks add up in fp32 with atomics). Returns (dq, dk, dv) in the dtypes of q,
    k, v.
    """
    if (o is None) == (delta is None):
        raise ValueError("band_attention_bwd needs exactly one of `o` and `delta`")
    with _device_of(q):
        return _band_attention_bwd(do, q, k, v, lse, o, delta, scale, window, key_stride, key_end, docs, reverse, q_chunk)


def _band_attention_bwd(do, q, k, v, lse, o, delta, scale, window, key_stride, key_end, docs, reverse, q_chunk):
    B, Tq, HQ, DK = q.shape
    NKt, HKV, DV = k.shape[1], k.shape[2], v.shape[3]
    G = HQ // HKV
    dk1, dk2 = split_head_dim(DK)
    dv1, dv2 = split_head_dim(DV)
    q, k = _pad_last(q, dk1 + dk2), _pad_last(k, dk1 + dk2)
    v, do = _pad_last(v, dv1 + dv2), _pad_last(do, dv1 + dv2)
    lse = lse.contiguous()
    compute_delta = delta is None
    if compute_delta:
        o = _pad_last(last_dim_contiguous(o), dv1 + dv2)
        delta = torch.empty(B, Tq, HQ, dtype=torch.float32, device=q.device)
    else:
        o = do  # unused by the kernel
        delta = delta.to(torch.float32).contiguous()
    dummy = torch.zeros(1, dtype=torch.int32, device=q.device)
    windowed = window < _BIG
    prec = _dot_precision(q.dtype)
    offsets = docs.offsets(dummy)

    # dQ: one program per query tile, like the forward
    dq = torch.empty(B, Tq, HQ, dk1 + dk2, dtype=q.dtype, device=q.device)
    if B * Tq > 0:
        block_m = _q_tile_rows(G, docs.avg_queries(Tq))
        hg = min(G, block_m)
        num_hc = triton.cdiv(G, hg)
        block_t = block_m // hg
        grid_m, tile_doc, tile_cum, tiles_per_doc = docs.schedule(docs.cu_q, Tq, Tq, block_t)
        extra = {"BLOCK_N": INTERPRET_BLOCKS["fwd_n"], "SPLIT": INTERPRET_BLOCKS["split"]} if INTERPRET else {}
        _dq_kernel[(grid_m, HKV * num_hc)](
            q, k, v, o, do, lse, delta, dq,
            dummy if tile_doc is None else tile_doc, dummy if tile_cum is None else tile_cum, *offsets,
            q.stride(0), q.stride(1), q.stride(2),
            k.stride(0), k.stride(1), k.stride(2),
            v.stride(0), v.stride(1), v.stride(2),
            o.stride(0), o.stride(1), o.stride(2),
            do.stride(0), do.stride(1), do.stride(2),
            dq.stride(0), dq.stride(1), dq.stride(2),
            lse.stride(0), lse.stride(1),
            Tq, docs.tk, docs.nk, docs.num_docs, tiles_per_doc,
            scale, scale * LOG2E, window, key_stride, key_end,
            G=G, HG=hg, NUM_HC=num_hc, BLOCK_T=block_t, BLOCK_M=block_m,
            BLOCK_DK1=dk1, BLOCK_DK2=dk2, BLOCK_DV1=dv1, BLOCK_DV2=dv2,
            WINDOWED=windowed, VARLEN=docs.varlen, REVERSE=reverse, COMPUTE_DELTA=compute_delta, DOT_PREC=prec,
            **extra,
        )

    # dK/dV: one program per (key tile, KV head, query chunk)
    # positions of one document; packed, the key count bounds it on the host without a sync
    max_positions = docs.tk if not docs.varlen else NKt * key_stride + key_end + key_stride
    if q_chunk is None or q_chunk >= max_positions:
        q_chunk, num_chunks = max(1, max_positions), 1
    else:
        num_chunks = triton.cdiv(max_positions, q_chunk)
    atomic = num_chunks > 1
    kv_dtype = torch.float32 if atomic else k.dtype
    dk = (torch.zeros if atomic else torch.empty)(B, NKt, HKV, dk1 + dk2, dtype=kv_dtype, device=k.device)
    dv = (torch.zeros if atomic else torch.empty)(B, NKt, HKV, dv1 + dv2, dtype=kv_dtype, device=k.device)
    if B * NKt > 0:
        # key tiles of 64 or 128 (autotuned): a work list for each
        bn_s, bn_l = (INTERPRET_BLOCKS["dkdv_n"], 2 * INTERPRET_BLOCKS["dkdv_n"]) if INTERPRET else (64, 128)
        grid_s, doc_s, cum_s, per_doc_s = docs.schedule(docs.cu_n, NKt, docs.nk, bn_s)
        grid_l, doc_l, cum_l, per_doc_l = docs.schedule(docs.cu_n, NKt, docs.nk, bn_l)

        def grid(meta):
            return (grid_s if meta["BLOCK_N"] == bn_s else grid_l, HKV, num_chunks)

        extra = {}
        if INTERPRET:
            extra = {"BLOCK_M": INTERPRET_BLOCKS["dkdv_m"], "BLOCK_N": bn_l if INTERPRET_BLOCKS["dkdv_large"] else bn_s}
        if INTERPRET:
            grid = grid(extra)
        _dkdv_kernel[grid](
            q, k, v, do, lse, delta, dk, dv,
            dummy if doc_s is None else doc_s, dummy if cum_s is None else cum_s,
            dummy if doc_l is None else doc_l, dummy if cum_l is None else cum_l, *offsets,
            q.stride(0), q.stride(1), q.stride(2),
            k.stride(0), k.stride(1), k.stride(2),
            v.stride(0), v.stride(1), v.stride(2),
            do.stride(0), do.stride(1), do.stride(2),
            dk.stride(0), dk.stride(1), dk.stride(2),
            dv.stride(0), dv.stride(1), dv.stride(2),
            lse.stride(0), lse.stride(1),
            Tq, docs.tk, docs.nk, docs.num_docs, per_doc_s, per_doc_l, q_chunk,
            scale, scale * LOG2E, window, key_stride, key_end,
            G=G, BLOCK_DK1=dk1, BLOCK_DK2=dk2, BLOCK_DV1=dv1, BLOCK_DV2=dv2,
            WINDOWED=windowed, VARLEN=docs.varlen, ATOMIC=atomic, DOT_PREC=prec, BLOCK_N_S=bn_s,
            **extra,
        )
    if atomic:
        dk, dv = dk.to(k.dtype), dv.to(v.dtype)
    if dk1 + dk2 != DK:
        dq, dk = dq[..., :DK], dk[..., :DK]
    if dv1 + dv2 != DV:
        dv = dv[..., :DV]
    return dq, dk, dv


def default_q_chunk(g: int) -> int:
    """
    Query positions per dK/dV program on long causal bands: about 32k (position, head) rows per program, enough work
    to amortise the fp32 atomic adds of its dK/dV tile, while the triangular band still spreads over many programs.
    """
    return max(512, 32768 // max(1, g))


# ---------------------------------------------------------------------------------------------------------------------
# argument checking shared by the public wrappers
# ---------------------------------------------------------------------------------------------------------------------


def last_dim_contiguous(x):
    return x if x.stride(-1) == 1 else x.contiguous()


def check_qkv(q, k, v, name_k="k", name_v="v"):
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(
            f"q, {name_k}, {name_v} must be 4-D [batch, seq, heads, dim], got {tuple(q.shape)}, {tuple(k.shape)}, "
            f"{tuple(v.shape)}"
        )
    if k.shape[:3] != v.shape[:3]:
        raise ValueError(f"{name_k} {tuple(k.shape)} and {name_v} {tuple(v.shape)} must agree on batch, seq and heads")
    if q.shape[0] != k.shape[0]:
        raise ValueError(f"q and {name_k} must have the same batch size, got {q.shape[0]} and {k.shape[0]}")
    if k.shape[2] == 0 or q.shape[2] % k.shape[2] != 0:
        raise ValueError(f"query heads ({q.shape[2]}) must be a multiple of key/value heads ({k.shape[2]})")
    if q.shape[3] != k.shape[3]:
        raise ValueError(f"q and {name_k} must have the same head dim, got {q.shape[3]} and {k.shape[3]}")
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"dtype {q.dtype} is not supported (float16, bfloat16 or float32)")
    if q.dtype != k.dtype or q.dtype != v.dtype:
        raise ValueError(f"q, {name_k}, {name_v} must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if q.device != k.device or q.device != v.device:
        raise ValueError(f"q, {name_k}, {name_v} must be on one device, got {q.device}, {k.device}, {v.device}")
    for name, x in (("q", q), (name_v, v)):
        if not 1 <= x.shape[-1] <= 256:
            raise ValueError(f"head dim of {name} is {x.shape[-1]}; 1 to 256 are supported")


def check_cu_seqlens(q, cu_seqlens_q, cu_seqlens_k):
    """Validate packed-document offsets (shapes only: no host sync) and return them as contiguous int32."""
    if (cu_seqlens_q is None) != (cu_seqlens_k is None):
        raise ValueError("pass both `cu_seqlens_q` and `cu_seqlens_k`, or neither")
    if cu_seqlens_q is None:
        return None, None
    if q.shape[0] != 1:
        raise ValueError(f"with `cu_seqlens_q` the batch size must be 1 (documents packed along seq), got {q.shape[0]}")
    if cu_seqlens_q.dim() != 1 or cu_seqlens_q.shape != cu_seqlens_k.shape or cu_seqlens_q.shape[0] < 2:
        raise ValueError(
            "cu_seqlens_q / cu_seqlens_k must be 1-D [num_docs + 1] tensors of equal length, got "
            f"{tuple(cu_seqlens_q.shape)} and {tuple(cu_seqlens_k.shape)}"
        )
    to = dict(device=q.device, dtype=torch.int32)
    return cu_seqlens_q.to(**to).contiguous(), cu_seqlens_k.to(**to).contiguous()


# ---------------------------------------------------------------------------------------------------------------------
# quick timing on a GPU: python -m nsa_hf.kernels._attention_common [T ...]
# ---------------------------------------------------------------------------------------------------------------------


def _benchmark(seqlens=(8192, 32768, 65536), HQ=64, HKV=4, DK=192, DV=128, window=512, l=32, d=16):
    """Forward and forward+backward times (ms) of the window and compressed kernels and of dense causal SDPA."""
    from triton.testing import do_bench

    from .compressed import compressed_attention
    from .window import window_attention

    dev, bf = "cuda", torch.bfloat16
    for T in seqlens:
        q = torch.randn(1, T, HQ, DK, device=dev, dtype=bf, requires_grad=True)
        k = torch.randn(1, T, HKV, DK, device=dev, dtype=bf, requires_grad=True)
        v = torch.randn(1, T, HKV, DV, device=dev, dtype=bf, requires_grad=True)
        nc = (T - l) // d + 1
        kc = torch.randn(1, nc, HKV, DK, device=dev, dtype=bf, requires_grad=True)
        vc = torch.randn(1, nc, HKV, DV, device=dev, dtype=bf, requires_grad=True)
        do = torch.randn(1, T, HQ, DV, device=dev, dtype=bf)

        def win():
            return window_attention(q, k, v, window)

        def cmp():
            return compressed_attention(q, kc, vc, l, d, num_keys=T)[0]

        row = {"T": T}
        for name, fn in (("window", win), ("compressed", cmp)):
            fn().backward(do)  # autotune / compile outside the timing
            row[f"{name}_fwd"] = do_bench(lambda: fn(), warmup=5, rep=50)
            row[f"{name}_fwd_bwd"] = do_bench(lambda: fn().backward(do), warmup=5, rep=50)
        try:
            from torch.nn.attention import SDPBackend, sdpa_kernel

            qd = q.detach().transpose(1, 2).requires_grad_()
            kd = k.detach().repeat_interleave(HQ // HKV, 2).transpose(1, 2).requires_grad_()
            vd = v.detach().repeat_interleave(HQ // HKV, 2).transpose(1, 2).requires_grad_()
            dod = do.transpose(1, 2)

            def dense():
                with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
                    return torch.nn.functional.scaled_dot_product_attention(qd, kd, vd, is_causal=True)

            dense().backward(dod)
            row["dense_fwd"] = do_bench(lambda: dense(), warmup=5, rep=50)
            row["dense_fwd_bwd"] = do_bench(lambda: dense().backward(dod), warmup=5, rep=50)
        except Exception as err:  # cuDNN missing or shape unsupported
            row["dense"] = f"unavailable: {type(err).__name__}"
        print({key: round(val, 3) if isinstance(val, float) else val for key, val in row.items()}, flush=True)


if __name__ == "__main__":
    import sys

    _benchmark(tuple(int(a) for a in sys.argv[1:]) or (8192, 32768, 65536))
