"""
Band attention backward (see `band_attention.py` for the visibility rule and the design): dQ per query tile (it also
derives delta = rowsum(dO * O) when the caller has none), then dK/dV per key tile over the query tiles that see it,
in query chunks that add up with fp32 atomics on long causal bands.
"""

import torch
import triton
import triton.language as tl

from ._geometry import Geometry
from ._tiling import BAND_DKDV_CONFIGS, BAND_DQ_CONFIGS, INTERPRET, LOG2E, TIMED, choose_configs, device_limits
from ._tiling import dot_precision, split_head_dim, tuning
from .band_attention import (
    NO_WINDOW,
    Q_TUNING_KEY,
    _device,
    _key_ranges,
    _load_pieces,
    _locate,
    _mask_edge,
    _query_tile,
    _scores,
    device_of,
    doc_offsets,
    head_dims,
    interpreter_tiles,
    pad_last,
    prune_q_tiled,
    q_tiles,
    regs_per_thread,
    smem_ok,
)


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
    col_ok = cols < n_keys
    s, k1, k2 = _scores(q1, q2, k_ptrs, offs_dk1, offs_dk2, col_ok, MASKED, BLOCK_DK2, DOT_PREC)
    p = _mask_edge(tl.math.exp2(s * qk_scale - lse2[:, None]), start_n, cols, pos, col_ok, window, key_stride,
                   key_end, full_lo, full_hi, 0.0, MODE, WINDOWED)
    dp, _, _ = _scores(do1, do2, v_ptrs, offs_dv1, offs_dv2, col_ok, MASKED, BLOCK_DV2, DOT_PREC)
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
    row_ok, pos, p_first, p_last, i_q, g = _query_tile(offs_m, tile, hc, q_len, k_len, G, HG, BLOCK_T)
    bb = b.to(tl.int64)
    row_t = (q0 + i_q).to(tl.int64)
    head = (kvh * G + g).to(tl.int64)
    q_ptrs = Q + (bb * stride_qb + row_t * stride_qt + head * stride_qh)[:, None]
    do_ptrs = DO + (bb * stride_dob + row_t * stride_dot + head * stride_doh)[:, None]
    q1, q2 = _load_pieces(q_ptrs, offs_dk1, offs_dk2, row_ok, BLOCK_DK2 > 0)
    do1, do2 = _load_pieces(do_ptrs, offs_dv1, offs_dv2, row_ok, BLOCK_DV2 > 0)
    l_offs = bb * stride_lb + row_t * stride_lt + head
    lse = tl.load(LSE + l_offs, mask=row_ok, other=0.0)
    # a row that sees no key (lse = -inf) gets P = 0 everywhere
    lse2 = tl.where(lse == float("-inf"), float("inf"), lse * 1.4426950408889634)
    if COMPUTE_DELTA:
        o_ptrs = O + (bb * stride_ob + row_t * stride_ot + head * stride_oh)[:, None]
        o1, o2 = _load_pieces(o_ptrs, offs_dv1, offs_dv2, row_ok, BLOCK_DV2 > 0)
        delta = tl.sum(o1.to(tl.float32) * do1.to(tl.float32), 1)
        if BLOCK_DV2 > 0:
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
    k1, k2 = _load_pieces(k_ptrs, offs_dk1, offs_dk2, col_ok, BLOCK_DK2 > 0)
    v1, v2 = _load_pieces(v_ptrs, offs_dv1, offs_dv2, col_ok, BLOCK_DV2 > 0)

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


def prune_k_tiled(configs, named_args, **kwargs):
    args = {**named_args, **kwargs}
    dk, dv = head_dims(args)
    regs = tuning(device_limits(_device(args))).band_k_regs
    kept = []
    for c in configs:
        bn, bm = c.kwargs["BLOCK_N"], c.kwargs["BLOCK_M"]
        if (
            smem_ok(bn, bm, dk, dv, c.num_stages, args)
            and regs_per_thread(bn * (dk + dv) + 3 * bn * bm, c.num_warps) <= regs
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

if INTERPRET:
    _dq_kernel = _band_dq_kernel
    _dkdv_kernel = triton.heuristics(_DKDV_HEURISTICS)(_band_dkdv_kernel)
else:
    _dq_kernel = triton.autotune(
        BAND_DQ_CONFIGS, key=Q_TUNING_KEY, prune_configs_by={"early_config_prune": prune_q_tiled}, cache_results=True,
        do_bench=TIMED,
    )(_band_dq_kernel)
    _dkdv_kernel = triton.autotune(
        BAND_DKDV_CONFIGS,
        key=["G", "BLOCK_DK1", "BLOCK_DK2", "BLOCK_DV1", "BLOCK_DV2", "WINDOWED", "VARLEN", "ATOMIC"],
        prune_configs_by={"early_config_prune": prune_k_tiled},
        reset_to_zero=["DK_OUT", "DV_OUT"], cache_results=True, do_bench=TIMED,
    )(triton.heuristics(_DKDV_HEURISTICS)(_band_dkdv_kernel))


def default_q_chunk(g: int, device) -> int:
    """
    Query positions per dK/dV program on long causal bands: about 32k (position, head) rows per program, enough work
    to amortise the fp32 atomic adds of its dK/dV tile, while the triangular band still spreads over many programs.
    """
    return max(512, tuning(device_limits(device)).band_chunk_rows // max(1, g))


# ---------------------------------------------------------------------------------------------------------------------
# host side
# ---------------------------------------------------------------------------------------------------------------------


def band_attention_bwd(
    do, q, k, v, lse, geo: Geometry, cu_keys, *, o=None, delta=None, scale, window, key_stride, key_end,
    reverse: bool, q_chunk=None,
):
    """
    Band attention backward from the forward's lse (arguments as `band_attention_fwd`, last dims contiguous). delta =
    rowsum(dO * O) (float32 `[B, Tq, HQ]`) is taken from `delta`, or derived by the dQ kernel from `o`. `q_chunk`:
    query positions per dK/dV program (None: all of them, stored directly; otherwise chunks add up in fp32 with
    atomics). Returns (dq, dk, dv) in the dtypes of q, k, v.
    """
    with device_of(q):
        B, Tq, HQ, DK = q.shape
        NKt, HKV, DV = k.shape[1], k.shape[2], v.shape[3]
        G = HQ // HKV
        dk1, dk2 = split_head_dim(DK)
        dv1, dv2 = split_head_dim(DV)
        q, k = pad_last(q, dk1 + dk2), pad_last(k, dk1 + dk2)
        v, do = pad_last(v, dv1 + dv2), pad_last(do, dv1 + dv2)
        lse = lse.contiguous()
        compute_delta = delta is None
        if compute_delta:
            o = pad_last(o, dv1 + dv2)
            delta = torch.empty(B, Tq, HQ, dtype=torch.float32, device=q.device)
        else:
            o = do  # unused by the kernel
            delta = delta.to(torch.float32).contiguous()
        windowed = window < NO_WINDOW
        prec = dot_precision(q.dtype)
        offsets = doc_offsets(geo, cu_keys)
        tk = 0 if geo.varlen else geo.k_len

        # dQ: one program per query tile, like the forward
        dq = torch.empty(B, Tq, HQ, dk1 + dk2, dtype=q.dtype, device=q.device)
        if B * Tq > 0:
            block_m, hg, num_hc, block_t = q_tiles(G, geo)
            grid_m, tile_doc, tile_cum, tiles_per_doc = geo.work_list(geo.cu_q, Tq, Tq, block_t)
            extra = {}
            if INTERPRET:
                extra = {"BLOCK_N": interpreter_tiles()["BLOCK_N"], "SPLIT": interpreter_tiles()["SPLIT"]}
            _dq_kernel[(grid_m, HKV * num_hc)](
                q, k, v, o, do, lse, delta, dq, tile_doc, tile_cum, *offsets,
                q.stride(0), q.stride(1), q.stride(2),
                k.stride(0), k.stride(1), k.stride(2),
                v.stride(0), v.stride(1), v.stride(2),
                o.stride(0), o.stride(1), o.stride(2),
                do.stride(0), do.stride(1), do.stride(2),
                dq.stride(0), dq.stride(1), dq.stride(2),
                lse.stride(0), lse.stride(1),
                Tq, tk, NKt, geo.num_docs, tiles_per_doc,
                scale, scale * LOG2E, window, key_stride, key_end,
                G=G, HG=hg, NUM_HC=num_hc, BLOCK_T=block_t, BLOCK_M=block_m,
                BLOCK_DK1=dk1, BLOCK_DK2=dk2, BLOCK_DV1=dv1, BLOCK_DV2=dv2,
                WINDOWED=windowed, VARLEN=geo.varlen, REVERSE=reverse, COMPUTE_DELTA=compute_delta, DOT_PREC=prec,
                **extra,
            )

        # dK/dV: one program per (key tile, KV head, query chunk)
        # positions of one document; packed, the key count bounds it on the host without a sync
        max_positions = tk if not geo.varlen else NKt * key_stride + key_end + key_stride
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
            if INTERPRET:
                tiles = interpreter_tiles()
                bn_s, bn_l = tiles["DKDV_BLOCK_N"], 2 * tiles["DKDV_BLOCK_N"]
            else:
                bn_s, bn_l = 64, 128
            cu_n = cu_keys if geo.varlen else None
            grid_s, doc_s, cum_s, per_doc_s = geo.work_list(cu_n, NKt, NKt, bn_s)
            grid_l, doc_l, cum_l, per_doc_l = geo.work_list(cu_n, NKt, NKt, bn_l)

            def grid(meta):
                return (grid_s if meta["BLOCK_N"] == bn_s else grid_l, HKV, num_chunks)

            extra = {}
            if INTERPRET:
                extra = {"BLOCK_M": tiles["DKDV_BLOCK_M"], "BLOCK_N": bn_l if tiles["DKDV_WIDE"] else bn_s}
                grid = grid(extra)
            _dkdv_kernel[grid](
                q, k, v, do, lse, delta, dk, dv, doc_s, cum_s, doc_l, cum_l, *offsets,
                q.stride(0), q.stride(1), q.stride(2),
                k.stride(0), k.stride(1), k.stride(2),
                v.stride(0), v.stride(1), v.stride(2),
                do.stride(0), do.stride(1), do.stride(2),
                dk.stride(0), dk.stride(1), dk.stride(2),
                dv.stride(0), dv.stride(1), dv.stride(2),
                lse.stride(0), lse.stride(1),
                Tq, tk, NKt, geo.num_docs, per_doc_s, per_doc_l, q_chunk,
                scale, scale * LOG2E, window, key_stride, key_end,
                G=G, BLOCK_DK1=dk1, BLOCK_DK2=dk2, BLOCK_DV1=dv1, BLOCK_DV2=dv2,
                WINDOWED=windowed, VARLEN=geo.varlen, ATOMIC=atomic, DOT_PREC=prec, BLOCK_N_S=bn_s,
                **extra,
            )
        if atomic:
            dk, dv = dk.to(k.dtype), dv.to(v.dtype)
    if dk1 + dk2 != DK:
        dq, dk = dq[..., :DK], dk[..., :DK]
    if dv1 + dv2 != DV:
        dv = dv[..., :DV]
    return dq, dk, dv
