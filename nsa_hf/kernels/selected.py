"""
Selected-block attention, the selection branch of Native Sparse Attention, in Triton: forward and backward.

    o = selected_attention(q, k, v, block_indices, select_block_size)

A query at position t attends to key s iff `s // select_block_size` is among the blocks its KV group selected
(`block_indices`) and `s <= t` (only the block holding t is cut by the causal mask). Oracle:
`nsa_hf.kernels.reference.selected_attention_ref`.

Design:

* Everything runs on a packed layout: q `[Nq, HQ, DK]`, k/v `[Nk, HKV, D*]` with document offsets (a plain batch is
  B equal documents), so varlen and batched inputs share one code path.
* Group-centric tiles (NSA paper, Sec. 3.4). A program owns one KV head `h` and a tile of BM consecutive rows of the
  flattened (query position, head-in-group) space of one document: row R is position `R // G`, query head
  `h*G + R % G`. With G >= BM a tile is a chunk of one position's heads; with G < BM it holds several consecutive
  positions, so tensor-core tiles keep >= 16 rows for any group size (1, 2, 7, ...) and no row is padding.
* Union merge. The positions of a tile share most of their selected blocks (block 0, the local blocks, the strong
  top-n blocks), so each KV block in the UNION of their sorted lists is streamed once for the whole tile; rows whose
  position did not select the block are masked. The union is built by a tiny pre-pass kernel (`_union_kernel`): a
  P-way merge that repeatedly takes the smallest block above the last one taken and records, as a bit mask, which
  positions selected it. The main loops then just walk `(block, position-mask)` pairs, so the merge costs nothing
  inside the attention loop, and the forward and the dQ kernels reuse the same table layout. A tile inside one
  position (G a multiple of the tile height) needs no union: it walks that position's own list.
* Backward. dK/dV use a reverse index (CSR built with a stable sort and searchsorted, O(Nq * HKV * n) memory): for every (KV head,
  KV block) the sorted list of query positions that selected it. A dK/dV program owns one KV block (or a 64-key
  chunk of it) and walks a segment of that list in chunks of BM gathered rows (positions x heads-in-group), keeping
  dK/dV in fp32 registers. Lists longer than one segment (block 0 is selected by every query, local blocks by
  ~2 l' queries) are cut into segments of ~4096 rows handled by separate programs that combine with fp32 atomic adds;
  blocks with a single segment store directly. This keeps every program's work bounded (no straggler on block 0)
  and touches only selected (position, block) pairs: no T x T or T x (T/l') tensor is ever built.
  dQ either rides along in that pass (dS K added into an fp32 accumulator with atomics: every (query, block) pair is
  visited once for all gradients; the default for G < 16) or gets its own pass over the query tiles with the union
  loop of the forward and p recomputed from the saved log-sum-exp (no atomics; the default for G >= 16, where the
  tiles have no masked rows to waste and the atomics would be 16 per KV block row).
"""

import os

import torch
import triton
import triton.language as tl

from ._tiling import DECODE_ROWS, choose_configs

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
_LOG2E = 1.4426950408889634

# Rows (query positions x heads) per dK/dV segment: bounds the work of one program on a hot block (block 0).
_DKDV_SEGMENT_ROWS = 4096


# ----------------------------------------------------------------------------------------------------------------------
# Small jitted helpers
# ----------------------------------------------------------------------------------------------------------------------

if _INTERPRET:

    def _idx(x):
        """
        Loop bound from a loaded scalar. Triton's interpreter keeps scalars as 1-element arrays and converts them
        with `int(array)`, which NumPy >= 2.4 rejects; hand `range` a Python int instead. Interpreter only.
        """
        return int(x.handle.data.reshape(-1)[0]) if hasattr(x, "handle") else int(x)

else:

    @triton.jit
    def _idx(x):
        return x



@triton.jit
def _tile_coords(tile, TILE_DOC, TILE_ROW0, TILES_PER_DOC, VARLEN: tl.constexpr, BM: tl.constexpr):
    """(document, first flattened row) of a query tile; document -1 marks an unused grid slot (varlen only)."""
    if VARLEN:
        doc = tl.load(TILE_DOC + tile)
        row0 = tl.load(TILE_ROW0 + tile)
    else:
        doc = tile // TILES_PER_DOC
        row0 = (tile % TILES_PER_DOC) * BM
    return doc, row0


@triton.jit
def _doc_bounds(doc, CU_Q, CU_K, TQ, TK, VARLEN: tl.constexpr):
    """(first query row, query count, first key row, key count) of a document in the packed layout."""
    if VARLEN:
        bos_q = tl.load(CU_Q + doc)
        len_q = tl.load(CU_Q + doc + 1) - bos_q
        bos_k = tl.load(CU_K + doc)
        len_k = tl.load(CU_K + doc + 1) - bos_k
    else:
        bos_q = doc * TQ
        len_q = TQ
        bos_k = doc * TK
        len_k = TK
    return bos_q, len_q, bos_k, len_k


@triton.jit
def _tile_block(e, UB, UM, ubase, bit, IDX_ROW, t0, L: tl.constexpr, N: tl.constexpr, NP: tl.constexpr,
                DIRECT: tl.constexpr):
    """
    Entry `e` of a tile's block walk: (block, [BM] rows that use it, whether the block has visible keys).
    DIRECT (the tile is one position): entry e is slot e of the position's own list at IDX_ROW; -1, blocks past the
    causal limit t0 and repeats of an earlier slot are skipped. Otherwise entry e of the union table.
    """
    if DIRECT:
        c = tl.arange(0, NP)
        row = tl.load(IDX_ROW + c, mask=c < N, other=-1)
        blk = tl.load(IDX_ROW + e)
        repeats = tl.sum(((row == blk) & (c < e)).to(tl.int32), 0)
        blk_ok = (blk >= 0) & (blk * L <= t0) & (t0 >= 0) & (repeats == 0)
        blk = tl.where(blk_ok, blk, 0)
        active = (bit == 0) & blk_ok
    else:
        blk = tl.load(UB + ubase + e)
        msk = tl.load(UM + ubase + e)
        active = ((msk >> bit) & 1) != 0
        blk_ok = blk >= 0
    return blk, active, blk_ok


# ----------------------------------------------------------------------------------------------------------------------
# Union of the selected blocks of the positions of each query tile
# ----------------------------------------------------------------------------------------------------------------------


@triton.jit
def _union_kernel(
    IDX, CU_Q, CU_K, TILE_DOC, TILE_ROW0, UB, UM, UC,
    stride_it, stride_ih, TQ, TK, TILES_PER_DOC, MAXU,
    HKV: tl.constexpr, G: tl.constexpr, L: tl.constexpr, N: tl.constexpr, NP: tl.constexpr, PP: tl.constexpr,
    BM: tl.constexpr, VARLEN: tl.constexpr,
):
    """
    For tile `tile` and KV head `h`: the ascending union of the blocks selected by the tile's positions (UB) and,
    per union entry, the bit mask of the positions (relative to the tile's first one) that selected it (UM); UC gets
    the union size. Blocks that cannot hold a visible key (-1, j*L > t) are dropped.
    """
    tile = tl.program_id(0)
    h = tl.program_id(1)
    doc, row0 = _tile_coords(tile, TILE_DOC, TILE_ROW0, TILES_PER_DOC, VARLEN, BM)
    if doc < 0:
        return
    bos_q, len_q, bos_k, len_k = _doc_bounds(doc, CU_Q, CU_K, TQ, TK, VARLEN)
    p0 = row0 // G
    p_last = tl.minimum((row0 + BM - 1) // G, len_q - 1)
    pp = tl.arange(0, PP)
    c = tl.arange(0, NP)
    pos = p0 + pp
    ok = (pp[:, None] <= p_last - p0) & (c[None, :] < N)
    ptrs = IDX + (bos_q + pos).to(tl.int64)[:, None] * stride_it + h * stride_ih + c[None, :]
    idx = tl.load(ptrs, mask=ok, other=-1)
    t = pos + (len_k - len_q)
    t_ok = t >= 0
    last_blk = tl.where(t_ok, t, 0) // L
    keep = ok & (idx >= 0) & (idx <= last_blk[:, None]) & t_ok[:, None]
    BIG: tl.constexpr = 2147483647
    vals = tl.where(keep, idx, BIG)
    bits = tl.full([PP], 1, tl.int64) << pp.to(tl.int64)
    base = (tile * HKV + h).to(tl.int64) * MAXU
    cur = tl.min(tl.min(vals, axis=1), axis=0)
    cnt = 0
    while cur < BIG:
        hit = tl.max((vals == cur).to(tl.int32), axis=1)
        m = tl.sum(tl.where(hit > 0, bits, 0), axis=0)
        tl.store(UB + base + cnt, cur)
        tl.store(UM + base + cnt, m)
        cnt += 1
        cur = tl.min(tl.min(tl.where(vals > cur, vals, BIG), axis=1), axis=0)
    tl.store(UC + tile * HKV + h, cnt)


# ----------------------------------------------------------------------------------------------------------------------
# Forward
# ----------------------------------------------------------------------------------------------------------------------


def _prune(configs, named_args, **kwargs):
    """NSA_HF_AUTOTUNE=0 / NSA_HF_CONFIG_INDEX apply as in the band kernels; decoding launches are not timed."""
    kept = configs[:1] if kwargs.get("DECODE", False) else configs
    return choose_configs(kept, configs)


_PRUNE = {"early_config_prune": _prune}


def _by_block_configs():
    """Rows per step of the key-centric forward (it holds no dK/dV accumulators, so 64 rows fit at 4 warps)."""
    if _INTERPRET:
        return [triton.Config({"BM": 32}, num_warps=4, num_stages=1)]
    return [triton.Config({"BM": bm}, num_warps=w, num_stages=s) for bm, w, s in
            ((64, 4, 2), (64, 8, 2), (128, 8, 2), (32, 4, 2))]


def _fwd_configs():
    if _INTERPRET:
        return [triton.Config({}, num_warps=4, num_stages=1)]
    return [triton.Config({}, num_warps=w, num_stages=s) for w in (4, 8) for s in (2, 3)]


@triton.autotune(
    configs=_fwd_configs(), key=["G", "L", "DK", "DV", "BM", "BN", "DIRECT", "DECODE"], prune_configs_by=_PRUNE
)
@triton.jit
def _fwd_kernel(
    Q, K, V, O, LSE, CU_Q, CU_K, TILE_DOC, TILE_ROW0, UB, UM, UC, IDX,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_ot, stride_oh, stride_it, stride_ih,
    TQ, TK, TILES_PER_DOC, MAXU, scale_log2,
    HKV: tl.constexpr, G: tl.constexpr, L: tl.constexpr, N: tl.constexpr, NP: tl.constexpr,
    DK: tl.constexpr, DV: tl.constexpr, BK1: tl.constexpr, BK2: tl.constexpr, BV: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, DIRECT: tl.constexpr, VARLEN: tl.constexpr, PREC: tl.constexpr,
    DECODE: tl.constexpr,  # only a tuning key: decoding launches keep their own (untimed) configuration
):
    tile = tl.program_id(0)
    h = tl.program_id(1)
    doc, row0 = _tile_coords(tile, TILE_DOC, TILE_ROW0, TILES_PER_DOC, VARLEN, BM)
    if doc < 0:
        return
    bos_q, len_q, bos_k, len_k = _doc_bounds(doc, CU_Q, CU_K, TQ, TK, VARLEN)
    HQ: tl.constexpr = HKV * G
    NSUB: tl.constexpr = (L + BN - 1) // BN

    rows = row0 + tl.arange(0, BM)
    row_ok = rows < len_q * G
    pos = rows // G
    head = h * G + rows % G
    bit = (pos - row0 // G).to(tl.int64)
    t = pos + (len_k - len_q)
    qrow = (bos_q + pos).to(tl.int64)
    d1 = tl.arange(0, BK1)
    dv = tl.arange(0, BV)
    q1 = tl.load(Q + qrow[:, None] * stride_qt + head[:, None] * stride_qh + d1[None, :],
                 mask=row_ok[:, None] & (d1[None, :] < DK), other=0.0)
    if BK2 > 0:
        d2 = BK1 + tl.arange(0, BK2)
        q2 = tl.load(Q + qrow[:, None] * stride_qt + head[:, None] * stride_qh + d2[None, :],
                     mask=row_ok[:, None] & (d2[None, :] < DK), other=0.0)

    m_i = tl.full([BM], float("-inf"), tl.float32)
    l_i = tl.zeros([BM], tl.float32)
    acc = tl.zeros([BM, BV], tl.float32)
    ubase = (tile * HKV + h).to(tl.int64) * MAXU
    idx_row = IDX + (bos_q + row0 // G).to(tl.int64) * stride_it + h * stride_ih
    t0 = row0 // G + (len_k - len_q)
    if DIRECT:
        cnt = N
    else:
        cnt = tl.load(UC + tile * HKV + h)
    cols = tl.arange(0, BN)
    for i in range(0, _idx(cnt * NSUB)):
        e = i // NSUB
        blk, active, blk_ok = _tile_block(e, UB, UM, ubase, bit, idx_row, t0, L, N, NP, DIRECT)
        c = (i % NSUB) * BN + cols
        kpos = blk * L + c
        kv_ok = (c < L) & (kpos < len_k) & blk_ok
        krow = (bos_k + kpos).to(tl.int64)
        kt1 = tl.load(K + krow[None, :] * stride_kt + h * stride_kh + d1[:, None],
                      mask=kv_ok[None, :] & (d1[:, None] < DK), other=0.0)
        s = tl.dot(q1, kt1, input_precision=PREC)
        if BK2 > 0:
            kt2 = tl.load(K + krow[None, :] * stride_kt + h * stride_kh + d2[:, None],
                          mask=kv_ok[None, :] & (d2[:, None] < DK), other=0.0)
            s += tl.dot(q2, kt2, input_precision=PREC)
        allowed = active[:, None] & kv_ok[None, :] & (kpos[None, :] <= t[:, None])
        s = tl.where(allowed, s * scale_log2, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_use)
        p = tl.exp2(s - m_use[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        vb = tl.load(V + krow[:, None] * stride_vt + h * stride_vh + dv[None, :],
                     mask=kv_ok[:, None] & (dv[None, :] < DV), other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(vb.dtype), vb, input_precision=PREC)
        m_i = m_new

    empty = l_i == 0.0
    l_safe = tl.where(empty, 1.0, l_i)
    out = acc / l_safe[:, None]
    lse = tl.where(empty, float("-inf"), (m_i + tl.log2(l_safe)) * 0.6931471805599453)
    tl.store(O + qrow[:, None] * stride_ot + head[:, None] * stride_oh + dv[None, :], out.to(O.dtype.element_ty),
             mask=row_ok[:, None] & (dv[None, :] < DV))
    tl.store(LSE + qrow * HQ + head, lse, mask=row_ok)


# ----------------------------------------------------------------------------------------------------------------------
# Forward over the reverse index (key-centric): each KV block meets the queries that chose it
# ----------------------------------------------------------------------------------------------------------------------


@triton.autotune(configs=_by_block_configs(), key=["G", "L", "DK", "DV", "BN", "PASS"], prune_configs_by=_PRUNE,
                 reset_to_zero=["OACC"])
@triton.jit
def _fwd_by_block_kernel(
    Q, K, V, LSE_E, LSE, OACC, CU_Q, CU_K, ITEM_BUCKET, ITEM_SEG, BUCKET_OFF, BLK_DOC, BLK_OFF, POS,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
    TQ, TK, NSB, NBUCKETS, SEG, scale_log2,
    HKV: tl.constexpr, G: tl.constexpr, L: tl.constexpr,
    DK: tl.constexpr, DV: tl.constexpr, BK1: tl.constexpr, BK2: tl.constexpr, BV: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, PASS: tl.constexpr, VARLEN: tl.constexpr, PREC: tl.constexpr,
):
    """
    One program: KV head h, block j, one segment of the queries that chose j (rows = entries x heads-in-group).
    PASS 0: the log2-sum-exp of each row over the block's visible keys, stored per (entry, head) in LSE_E.
    PASS 1: with the merged log-sum-exp of each row (LSE, natural log, [Nq, HQ]), P V of the block added into the
    fp32 output accumulator OACC `[Nq, HQ, DV]` with atomics (each row gets one add per block it chose).
    """
    item = tl.program_id(0)
    bucket = tl.load(ITEM_BUCKET + item)
    if bucket >= NBUCKETS:
        return
    HQ: tl.constexpr = HKV * G
    NSUB: tl.constexpr = (L + BN - 1) // BN
    seg = tl.load(ITEM_SEG + item)
    h = bucket // NSB
    gblk = bucket % NSB
    if VARLEN:
        doc = tl.load(BLK_DOC + gblk)
        j = gblk - tl.load(BLK_OFF + doc)
    else:
        nb = (TK + L - 1) // L
        doc = gblk // nb
        j = gblk % nb
    bos_q, len_q, bos_k, len_k = _doc_bounds(doc, CU_Q, CU_K, TQ, TK, VARLEN)
    lo = tl.load(BUCKET_OFF + bucket)
    hi = tl.load(BUCKET_OFF + bucket + 1)
    start = lo + seg * SEG
    end = tl.minimum(start + SEG, hi)
    d1 = tl.arange(0, BK1)
    dv = tl.arange(0, BV)
    r = tl.arange(0, BM)
    cols = tl.arange(0, BN)
    for r0 in range(_idx(start * G), _idx(end * G), BM):
        rr = r0 + r
        r_ok = rr < end * G
        qrow = tl.load(POS + rr // G, mask=r_ok, other=0).to(tl.int64)
        head = h * G + rr % G
        t = (qrow - bos_q) + (len_k - len_q)
        q1 = tl.load(Q + qrow[:, None] * stride_qt + head[:, None] * stride_qh + d1[None, :],
                     mask=r_ok[:, None] & (d1[None, :] < DK), other=0.0)
        if BK2 > 0:
            d2 = BK1 + tl.arange(0, BK2)
            q2 = tl.load(Q + qrow[:, None] * stride_qt + head[:, None] * stride_qh + d2[None, :],
                         mask=r_ok[:, None] & (d2[None, :] < DK), other=0.0)
        if PASS == 0:
            m_i = tl.full([BM], float("-inf"), tl.float32)
            l_i = tl.zeros([BM], tl.float32)
        else:
            lse = tl.load(LSE + qrow * HQ + head, mask=r_ok, other=0.0)
            lse2 = tl.where(lse == float("-inf"), 0.0, lse * 1.4426950408889634)
            acc = tl.zeros([BM, BV], tl.float32)
        for sub in range(NSUB):
            c = sub * BN + cols
            kpos = j * L + c
            kv_ok = (c < L) & (kpos < len_k)
            krow = (bos_k + kpos).to(tl.int64)
            kt1 = tl.load(K + krow[None, :] * stride_kt + h * stride_kh + d1[:, None],
                          mask=kv_ok[None, :] & (d1[:, None] < DK), other=0.0)
            s = tl.dot(q1, kt1, input_precision=PREC)
            if BK2 > 0:
                kt2 = tl.load(K + krow[None, :] * stride_kt + h * stride_kh + d2[:, None],
                              mask=kv_ok[None, :] & (d2[:, None] < DK), other=0.0)
                s += tl.dot(q2, kt2, input_precision=PREC)
            allowed = r_ok[:, None] & kv_ok[None, :] & (kpos[None, :] <= t[:, None])
            if PASS == 0:
                s = tl.where(allowed, s * scale_log2, float("-inf"))
                m_new = tl.maximum(m_i, tl.max(s, 1))
                m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
                l_i = l_i * tl.exp2(m_i - m_use) + tl.sum(tl.exp2(s - m_use[:, None]), 1)
                m_i = m_new
            else:
                p = tl.where(allowed, tl.exp2(s * scale_log2 - lse2[:, None]), 0.0)
                vb = tl.load(V + krow[:, None] * stride_vt + h * stride_vh + dv[None, :],
                             mask=kv_ok[:, None] & (dv[None, :] < DV), other=0.0)
                acc += tl.dot(p.to(vb.dtype), vb, input_precision=PREC)
        if PASS == 0:
            # every listed block holds a key the row sees (j * L <= t), so l_i > 0 for real rows
            tl.store(LSE_E + rr, m_i + tl.log2(tl.where(l_i > 0, l_i, 1.0)), mask=r_ok)
        else:
            tl.atomic_add(OACC + (qrow * HQ + head)[:, None] * DV + dv[None, :], acc,
                          mask=r_ok[:, None] & (dv[None, :] < DV), sem="relaxed")


# ----------------------------------------------------------------------------------------------------------------------
# Backward: dQ (+ delta) over the union, dK/dV over the reverse index
# ----------------------------------------------------------------------------------------------------------------------


@triton.autotune(configs=_fwd_configs(), key=["G", "L", "DK", "DV", "BM", "BN", "DIRECT"], prune_configs_by=_PRUNE)
@triton.jit
def _dq_kernel(
    Q, K, V, O, DO, LSE, DELTA, DQ, CU_Q, CU_K, TILE_DOC, TILE_ROW0, UB, UM, UC, IDX,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_ot, stride_oh,
    stride_dot, stride_doh, stride_dqt, stride_dqh, stride_it, stride_ih,
    TQ, TK, TILES_PER_DOC, MAXU, scale_log2, scale,
    HKV: tl.constexpr, G: tl.constexpr, L: tl.constexpr, N: tl.constexpr, NP: tl.constexpr,
    DK: tl.constexpr, DV: tl.constexpr, BK1: tl.constexpr, BK2: tl.constexpr, BV: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, DIRECT: tl.constexpr, VARLEN: tl.constexpr, PREC: tl.constexpr,
):
    tile = tl.program_id(0)
    h = tl.program_id(1)
    doc, row0 = _tile_coords(tile, TILE_DOC, TILE_ROW0, TILES_PER_DOC, VARLEN, BM)
    if doc < 0:
        return
    bos_q, len_q, bos_k, len_k = _doc_bounds(doc, CU_Q, CU_K, TQ, TK, VARLEN)
    HQ: tl.constexpr = HKV * G
    NSUB: tl.constexpr = (L + BN - 1) // BN

    rows = row0 + tl.arange(0, BM)
    row_ok = rows < len_q * G
    pos = rows // G
    head = h * G + rows % G
    bit = (pos - row0 // G).to(tl.int64)
    t = pos + (len_k - len_q)
    qrow = (bos_q + pos).to(tl.int64)
    d1 = tl.arange(0, BK1)
    dv = tl.arange(0, BV)
    q1 = tl.load(Q + qrow[:, None] * stride_qt + head[:, None] * stride_qh + d1[None, :],
                 mask=row_ok[:, None] & (d1[None, :] < DK), other=0.0)
    if BK2 > 0:
        d2 = BK1 + tl.arange(0, BK2)
        q2 = tl.load(Q + qrow[:, None] * stride_qt + head[:, None] * stride_qh + d2[None, :],
                     mask=row_ok[:, None] & (d2[None, :] < DK), other=0.0)
    vmask = row_ok[:, None] & (dv[None, :] < DV)
    do = tl.load(DO + qrow[:, None] * stride_dot + head[:, None] * stride_doh + dv[None, :], mask=vmask, other=0.0)
    o = tl.load(O + qrow[:, None] * stride_ot + head[:, None] * stride_oh + dv[None, :], mask=vmask, other=0.0)
    delta = tl.sum(do.to(tl.float32) * o.to(tl.float32), 1)
    tl.store(DELTA + qrow * HQ + head, delta, mask=row_ok)
    lse = tl.load(LSE + qrow * HQ + head, mask=row_ok, other=0.0)
    lse2 = tl.where(lse == float("-inf"), 0.0, lse * 1.4426950408889634)

    dq1 = tl.zeros([BM, BK1], tl.float32)
    if BK2 > 0:
        dq2 = tl.zeros([BM, BK2], tl.float32)
    ubase = (tile * HKV + h).to(tl.int64) * MAXU
    idx_row = IDX + (bos_q + row0 // G).to(tl.int64) * stride_it + h * stride_ih
    t0 = row0 // G + (len_k - len_q)
    if DIRECT:
        cnt = N
    else:
        cnt = tl.load(UC + tile * HKV + h)
    cols = tl.arange(0, BN)
    for i in range(0, _idx(cnt * NSUB)):
        e = i // NSUB
        blk, active, blk_ok = _tile_block(e, UB, UM, ubase, bit, idx_row, t0, L, N, NP, DIRECT)
        c = (i % NSUB) * BN + cols
        kpos = blk * L + c
        kv_ok = (c < L) & (kpos < len_k) & blk_ok
        krow = (bos_k + kpos).to(tl.int64)
        kt1 = tl.load(K + krow[None, :] * stride_kt + h * stride_kh + d1[:, None],
                      mask=kv_ok[None, :] & (d1[:, None] < DK), other=0.0)
        s = tl.dot(q1, kt1, input_precision=PREC)
        if BK2 > 0:
            kt2 = tl.load(K + krow[None, :] * stride_kt + h * stride_kh + d2[:, None],
                          mask=kv_ok[None, :] & (d2[:, None] < DK), other=0.0)
            s += tl.dot(q2, kt2, input_precision=PREC)
        allowed = active[:, None] & kv_ok[None, :] & (kpos[None, :] <= t[:, None])
        p = tl.where(allowed, tl.exp2(s * scale_log2 - lse2[:, None]), 0.0)
        vt = tl.load(V + krow[None, :] * stride_vt + h * stride_vh + dv[:, None],
                     mask=kv_ok[None, :] & (dv[:, None] < DV), other=0.0)
        dp = tl.dot(do, vt, input_precision=PREC)
        ds = (p * (dp - delta[:, None])).to(kt1.dtype)
        dq1 += tl.dot(ds, tl.trans(kt1), input_precision=PREC)
        if BK2 > 0:
            dq2 += tl.dot(ds, tl.trans(kt2), input_precision=PREC)

    tl.store(DQ + qrow[:, None] * stride_dqt + head[:, None] * stride_dqh + d1[None, :],
             (dq1 * scale).to(DQ.dtype.element_ty), mask=row_ok[:, None] & (d1[None, :] < DK))
    if BK2 > 0:
        tl.store(DQ + qrow[:, None] * stride_dqt + head[:, None] * stride_dqh + d2[None, :],
                 (dq2 * scale).to(DQ.dtype.element_ty), mask=row_ok[:, None] & (d2[None, :] < DK))


def _dkdv_configs():
    if _INTERPRET:
        return [triton.Config({"BM": 32}, num_warps=4, num_stages=1)]
    # (64 rows, 4 warps) spills registers at DK >= 128 (ptxas on sm_90), so it is not offered.
    return [
        triton.Config({"BM": bm}, num_warps=w, num_stages=s)
        for bm, w, s in ((32, 4, 2), (32, 8, 2), (32, 8, 3), (64, 8, 2), (64, 8, 3))
    ]


@triton.autotune(
    configs=_dkdv_configs(), key=["G", "L", "DK", "DV", "BN", "FUSE_DQ"], reset_to_zero=["DKA", "DVA", "DQA"],
    prune_configs_by=_PRUNE,
)
@triton.jit
def _dkdv_kernel(
    Q, K, V, DO, LSE, DELTA, DKA, DVA, DQA, CU_Q, CU_K, ITEM_BUCKET, ITEM_SEG, BUCKET_OFF, BLK_DOC, BLK_OFF, POS,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_dot, stride_doh,
    TQ, TK, NSB, NBUCKETS, SEG, scale_log2, scale,
    HKV: tl.constexpr, G: tl.constexpr, L: tl.constexpr,
    DK: tl.constexpr, DV: tl.constexpr, BK1: tl.constexpr, BK2: tl.constexpr, BV: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, FUSE_DQ: tl.constexpr, VARLEN: tl.constexpr, PREC: tl.constexpr,
):
    """
    One program: KV head h, keys [j*L + sub*BN, +BN) of block j, against one segment of the queries that chose j.
    With FUSE_DQ it also adds dS K of those rows into the fp32 dQ accumulator DQA `[Nq, HQ, DK]` (atomics).
    """
    item = tl.program_id(0)
    sub = tl.program_id(1)
    bucket = tl.load(ITEM_BUCKET + item)
    if bucket >= NBUCKETS:
        return
    HQ: tl.constexpr = HKV * G
    seg = tl.load(ITEM_SEG + item)
    h = bucket // NSB
    gblk = bucket % NSB
    if VARLEN:
        doc = tl.load(BLK_DOC + gblk)
        j = gblk - tl.load(BLK_OFF + doc)
    else:
        nb = (TK + L - 1) // L
        doc = gblk // nb
        j = gblk % nb
    bos_q, len_q, bos_k, len_k = _doc_bounds(doc, CU_Q, CU_K, TQ, TK, VARLEN)

    c = sub * BN + tl.arange(0, BN)
    kpos = j * L + c
    kv_ok = (c < L) & (kpos < len_k)
    krow = (bos_k + kpos).to(tl.int64)
    d1 = tl.arange(0, BK1)
    dv = tl.arange(0, BV)
    k1 = tl.load(K + krow[:, None] * stride_kt + h * stride_kh + d1[None, :],
                 mask=kv_ok[:, None] & (d1[None, :] < DK), other=0.0)
    if BK2 > 0:
        d2 = BK1 + tl.arange(0, BK2)
        k2 = tl.load(K + krow[:, None] * stride_kt + h * stride_kh + d2[None, :],
                     mask=kv_ok[:, None] & (d2[None, :] < DK), other=0.0)
    vb = tl.load(V + krow[:, None] * stride_vt + h * stride_vh + dv[None, :],
                 mask=kv_ok[:, None] & (dv[None, :] < DV), other=0.0)

    lo = tl.load(BUCKET_OFF + bucket)
    hi = tl.load(BUCKET_OFF + bucket + 1)
    start = lo + seg * SEG
    end = tl.minimum(start + SEG, hi)
    dk1 = tl.zeros([BN, BK1], tl.float32)
    if BK2 > 0:
        dk2 = tl.zeros([BN, BK2], tl.float32)
    dvacc = tl.zeros([BN, BV], tl.float32)
    r = tl.arange(0, BM)
    for r0 in range(_idx(start * G), _idx(end * G), BM):
        rr = r0 + r
        r_ok = rr < end * G
        qrow = tl.load(POS + rr // G, mask=r_ok, other=0).to(tl.int64)
        head = h * G + rr % G
        t = (qrow - bos_q) + (len_k - len_q)
        q1 = tl.load(Q + qrow[:, None] * stride_qt + head[:, None] * stride_qh + d1[None, :],
                     mask=r_ok[:, None] & (d1[None, :] < DK), other=0.0)
        sT = tl.dot(k1, tl.trans(q1), input_precision=PREC)
        if BK2 > 0:
            q2 = tl.load(Q + qrow[:, None] * stride_qt + head[:, None] * stride_qh + d2[None, :],
                         mask=r_ok[:, None] & (d2[None, :] < DK), other=0.0)
            sT += tl.dot(k2, tl.trans(q2), input_precision=PREC)
        lse = tl.load(LSE + qrow * HQ + head, mask=r_ok, other=0.0)
        lse2 = tl.where(lse == float("-inf"), 0.0, lse * 1.4426950408889634)
        delta = tl.load(DELTA + qrow * HQ + head, mask=r_ok, other=0.0)
        allowed = r_ok[None, :] & kv_ok[:, None] & (kpos[:, None] <= t[None, :])
        pT = tl.where(allowed, tl.exp2(sT * scale_log2 - lse2[None, :]), 0.0)
        do = tl.load(DO + qrow[:, None] * stride_dot + head[:, None] * stride_doh + dv[None, :],
                     mask=r_ok[:, None] & (dv[None, :] < DV), other=0.0)
        dvacc += tl.dot(pT.to(do.dtype), do, input_precision=PREC)
        dpT = tl.dot(vb, tl.trans(do), input_precision=PREC)
        dsT = (pT * (dpT - delta[None, :])).to(q1.dtype)
        dk1 += tl.dot(dsT, q1, input_precision=PREC)
        if BK2 > 0:
            dk2 += tl.dot(dsT, q2, input_precision=PREC)
        if FUSE_DQ:
            ds = tl.trans(dsT)
            dq_base = (qrow * HQ + head)[:, None] * DK
            tl.atomic_add(DQA + dq_base + d1[None, :], tl.dot(ds, k1, input_precision=PREC) * scale,
                          mask=r_ok[:, None] & (d1[None, :] < DK), sem="relaxed")
            if BK2 > 0:
                tl.atomic_add(DQA + dq_base + d2[None, :], tl.dot(ds, k2, input_precision=PREC) * scale,
                              mask=r_ok[:, None] & (d2[None, :] < DK), sem="relaxed")

    # dK/dV accumulators: fp32 [Nk, HKV, D] contiguous.
    single = (hi - lo) <= SEG
    base_k = krow[:, None] * (HKV * DK) + h * DK
    base_v = krow[:, None] * (HKV * DV) + h * DV
    kmask1 = kv_ok[:, None] & (d1[None, :] < DK)
    vmask = kv_ok[:, None] & (dv[None, :] < DV)
    if single:
        tl.store(DKA + base_k + d1[None, :], dk1 * scale, mask=kmask1)
        tl.store(DVA + base_v + dv[None, :], dvacc, mask=vmask)
    else:
        tl.atomic_add(DKA + base_k + d1[None, :], dk1 * scale, mask=kmask1, sem="relaxed")
        tl.atomic_add(DVA + base_v + dv[None, :], dvacc, mask=vmask, sem="relaxed")
    if BK2 > 0:
        kmask2 = kv_ok[:, None] & (d2[None, :] < DK)
        if single:
            tl.store(DKA + base_k + d2[None, :], dk2 * scale, mask=kmask2)
        else:
            tl.atomic_add(DKA + base_k + d2[None, :], dk2 * scale, mask=kmask2, sem="relaxed")


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


# ----------------------------------------------------------------------------------------------------------------------
# Host side
# ----------------------------------------------------------------------------------------------------------------------


def _next_pow2(x: int) -> int:
    return 1 << max(0, (int(x) - 1).bit_length())


def _split_dim(d: int) -> tuple[int, int]:
    """Split a head dim into two power-of-two tiles (192 -> 128 + 64) so no MMA work is spent on padding."""
    if d <= 16:
        return 16, 0
    b1 = 1 << (d.bit_length() - 1)
    rem = d - b1
    if rem == 0:
        return b1, 0
    b2 = max(16, _next_pow2(rem))
    if b2 >= b1:
        return 2 * b1, 0
    return b1, b2


def _tile_rows(G: int, avg_keys: int = 0, forward: bool = True) -> int:
    """
    Rows (positions x heads-in-group) of a query tile for the forward and the tiled dQ kernels.

    More positions per tile load each shared KV block once for more rows (fewer loads) but mask the rows whose
    position did not pick a block (more MMA work). Measured on reference selections (T=4096, l'=64, n=16, random
    data, the worst case for overlap), the union of P consecutive positions' lists holds 16 / 24 / 32 / 38 / 40 blocks
    for P = 1 / 2 / 4 / 8 / 16 (23 / 28 for P = 4 / 16 on data with local structure): loads per position fall 2-9x
    while the masked MMA work grows at most ~2x. 64 rows fill one H100 warpgroup MMA (wgmma needs M=64 per warpgroup);
    for G=1 we stop at 32 rows (32 positions) so that long-context random selections do not blow the union up.
    At long context the unions of random selections stop overlapping and the forward is bound by K/V gathers, so
    16-row tiles (one position for G=16, no union table) win there: H100, `benchmarks/sweep_selected.py`, forward ms
    for 16 / 64 rows: 18.1 / 19.1 (64q/4kv, 64k), 29.6 / 32.7 (32q/8kv, 64k), 2.25 / 1.75 and 2.65 / 1.72 at 8k.
    """
    if forward and G >= 4 and avg_keys >= _LONG_CONTEXT:
        return 16
    return 64 if G >= 4 else 32


# Keys per document from which the forward takes 16-row query tiles (see _tile_rows).
_LONG_CONTEXT = 32768


def _key_tile(L: int) -> int:
    """Keys per inner step: a whole selection block up to 64 keys, else 64-key chunks of it."""
    return min(64, max(16, _next_pow2(L)))


def _dot_precision(dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"


class _Packed:
    """Inputs in the packed layout plus the per-document bookkeeping every kernel shares."""

    def __init__(self, q, k, v, block_indices, select_block_size, scale, cu_seqlens_q, cu_seqlens_k):
        _validate(q, k, v, block_indices, select_block_size, cu_seqlens_q, cu_seqlens_k)
        B, Tq, HQ, DK = q.shape
        _, Tk, HKV, DV = v.shape
        self.B, self.HQ, self.HKV, self.G, self.DK, self.DV = B, HQ, HKV, HQ // HKV, DK, DV
        self.L = int(select_block_size)
        self.n = block_indices.shape[-1]
        self.scale = DK ** -0.5 if scale is None else float(scale)
        self.varlen = cu_seqlens_q is not None
        self.q = _rows(q)
        self.k = _rows(k)
        self.v = _rows(v)
        self.idx = block_indices.reshape(B * Tq, HKV, self.n)
        if self.idx.dtype != torch.int32:
            self.idx = self.idx.to(torch.int32)
        if self.idx.stride(-1) != 1:
            self.idx = self.idx.contiguous()
        self.Nq, self.Nk = B * Tq, B * Tk
        dev = q.device
        if self.varlen:
            self.cu_q = cu_seqlens_q.to(device=dev, dtype=torch.int32)
            self.cu_k = cu_seqlens_k.to(device=dev, dtype=torch.int32)
            self.num_docs = self.cu_q.numel() - 1
            self.TQ = self.TK = 0
        else:
            self.cu_q = self.cu_k = torch.zeros(1, dtype=torch.int32, device=dev)  # unused dummies
            self.num_docs = B
            self.TQ, self.TK = Tq, Tk
        self.BK1, self.BK2 = _split_dim(DK)
        self.BV = max(16, _next_pow2(DV))
        self.prec = _dot_precision(q.dtype)

    def avg_keys(self) -> int:
        return self.TK if not self.varlen else self.Nk // max(1, self.num_docs)

    def unpack_q(self, x):
        return x.reshape(self.B, -1, *x.shape[1:])

    def unpack_k(self, x):
        return x.reshape(self.B, -1, *x.shape[1:])


def _rows(x):
    """[B, T, H, D] -> [B*T, H, D] with a unit stride on D (a view whenever possible)."""
    x = x.reshape(x.shape[0] * x.shape[1], x.shape[2], x.shape[3])
    return x if x.stride(-1) == 1 else x.contiguous()


def _validate(q, k, v, block_indices, select_block_size, cu_seqlens_q, cu_seqlens_k):
    for name, x in (("q", q), ("k", k), ("v", v), ("block_indices", block_indices)):
        if not isinstance(x, torch.Tensor) or x.dim() != 4:
            raise ValueError(f"`{name}` must be a 4-D tensor, got {getattr(x, 'shape', type(x))}")
    B, Tq, HQ, DK = q.shape
    if k.shape[0] != B or v.shape[0] != B or k.shape[1] != v.shape[1] or k.shape[2] != v.shape[2]:
        raise ValueError(f"k {tuple(k.shape)} and v {tuple(v.shape)} must share batch/seq/heads with q {tuple(q.shape)}")
    if k.shape[3] != DK:
        raise ValueError(f"q and k head dims differ: {DK} vs {k.shape[3]}")
    HKV = k.shape[2]
    if HKV == 0 or HQ % HKV != 0:
        raise ValueError(f"query heads ({HQ}) must be a multiple of key/value heads ({HKV})")
    if DK > 256 or v.shape[3] > 256:
        raise ValueError(f"head dims up to 256 are supported, got DK={DK}, DV={v.shape[3]}")
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32) or k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"q, k, v must share one of float16/bfloat16/float32, got {q.dtype}, {k.dtype}, {v.dtype}")
    if block_indices.shape[:3] != (B, Tq, HKV):
        raise ValueError(f"block_indices must have shape {(B, Tq, HKV, 'n')}, got {tuple(block_indices.shape)}")
    if block_indices.dtype not in (torch.int32, torch.int64, torch.int16):
        raise ValueError(f"block_indices must be an integer tensor (int32), got {block_indices.dtype}")
    if not isinstance(select_block_size, int) or select_block_size < 1:
        raise ValueError(f"select_block_size must be a positive int, got {select_block_size!r}")
    if (cu_seqlens_q is None) != (cu_seqlens_k is None):
        raise ValueError("pass both `cu_seqlens_q` and `cu_seqlens_k`, or neither")
    if cu_seqlens_q is None and Tq > k.shape[1]:
        raise ValueError(
            f"more queries ({Tq}) than keys ({k.shape[1]}): queries are the last positions of the keys, so q_len must "
            "be at most k_len"
        )
    if cu_seqlens_q is not None:
        if B != 1:
            raise ValueError(f"with `cu_seqlens_q` the batch size must be 1 (documents packed along seq), got {B}")
        if cu_seqlens_q.dim() != 1 or cu_seqlens_q.shape != cu_seqlens_k.shape or cu_seqlens_q.numel() < 2:
            raise ValueError(
                f"cu_seqlens_q/k must be 1-D of equal length >= 2, got {tuple(cu_seqlens_q.shape)}, {tuple(cu_seqlens_k.shape)}"
            )
    devices = {x.device for x in (q, k, v, block_indices)}
    if len(devices) != 1:
        raise ValueError(f"q, k, v, block_indices must be on one device, got {devices}")
    if not q.is_cuda and not _INTERPRET:
        raise ValueError(f"the Triton kernels need CUDA tensors (or TRITON_INTERPRET=1), got device {q.device}")


class _Tiles:
    """Query tiles (BM flattened rows of one document) and the union of their selected blocks per KV head."""

    def __init__(self, pk: _Packed, BM: int):
        G, dev = pk.G, pk.q.device
        self.BM = BM
        if pk.varlen:
            len_q = (pk.cu_q[1:] - pk.cu_q[:-1]).long()
            per_doc = (len_q * G + BM - 1) // BM
            cum = per_doc.cumsum(0)
            self.num = pk.Nq * G // BM + pk.num_docs  # upper bound, known without a device sync
            ids = torch.arange(self.num, device=dev)
            doc = torch.searchsorted(cum, ids, right=True)
            used = doc < pk.num_docs
            docc = doc.clamp_max(pk.num_docs - 1)
            first = cum[docc] - per_doc[docc]
            self.tile_doc = torch.where(used, doc, -1).to(torch.int32)
            self.tile_row0 = ((ids - first) * BM).clamp_min(0).to(torch.int32)
            self.per_doc = 1
        else:
            self.per_doc = triton.cdiv(pk.TQ * G, BM)
            self.num = pk.B * self.per_doc
            self.tile_doc = self.tile_row0 = torch.zeros(1, dtype=torch.int32, device=dev)
        npos = _tile_positions(G, BM)
        self.npos = npos
        # A tile inside one position walks that position's own list: no union table is needed.
        self.direct = G % BM == 0
        if self.direct:
            self.maxu = 1
            self.ub = self.uc = torch.zeros(1, dtype=torch.int32, device=dev)
            self.um = torch.zeros(1, dtype=torch.int64, device=dev)
            return
        # A union never holds more blocks than a document has (caps the table for small G and long selections).
        max_blocks = triton.cdiv(pk.Nk, pk.L) if pk.varlen else triton.cdiv(pk.TK, pk.L)
        self.maxu = max(1, min(npos * pk.n, max_blocks))
        self.ub = torch.empty(self.num * pk.HKV * self.maxu, dtype=torch.int32, device=dev)
        self.um = torch.empty(self.num * pk.HKV * self.maxu, dtype=torch.int64, device=dev)
        self.uc = torch.zeros(self.num * pk.HKV, dtype=torch.int32, device=dev)
        if self.num == 0 or pk.n == 0:
            return
        _union_kernel[(self.num, pk.HKV)](
            pk.idx, pk.cu_q, pk.cu_k, self.tile_doc, self.tile_row0, self.ub, self.um, self.uc,
            pk.idx.stride(0), pk.idx.stride(1), pk.TQ, pk.TK, self.per_doc, self.maxu,
            HKV=pk.HKV, G=G, L=pk.L, N=pk.n, NP=max(2, _next_pow2(pk.n)), PP=max(2, _next_pow2(npos)),
            BM=BM, VARLEN=pk.varlen,
        )


def _tile_positions(G: int, BM: int) -> int:
    """Most query positions one tile of BM flattened rows can touch (tiles start at multiples of BM)."""
    return BM // G if BM % G == 0 else (BM - 1) // G + 2


def _check_tile(G: int, BM: int):
    if BM not in (16, 32, 64, 128):
        raise ValueError(f"block_m must be one of 16, 32, 64, 128, got {BM}")
    npos = _tile_positions(G, BM)
    if npos > 64:
        raise ValueError(f"a query tile of {BM} rows would hold {npos} positions; at most 64 are supported")


def selected_attention_fwd(
    q, k, v, block_indices, select_block_size, scale=None, cu_seqlens_q=None, cu_seqlens_k=None, block_m=None,
    fwd_mode="tiled",
):
    """
    Forward of selected-block attention. Same arguments as `selected_attention` (`block_m`: rows per query tile,
    default by heuristic). Returns `(o [B, Tq, HQ, DV] in q's dtype, lse [B, Tq, HQ] float32)`, lse the natural-log
    log-sum-exp of the scaled scores (`-inf` for a query that sees no key; its output is zero).

    `fwd_mode`: "tiled" walks the blocks of each query tile (the union of its positions' lists); "by_block" walks,
    for each KV block, the queries that chose it (the backward's reverse index): a log-sum-exp pass, then P V added
    into an fp32 output with atomics. "by_block" has no masked rows at any group size; it is tested against the
    reference but not yet measured on a GPU, so it is not the default.
    """
    if fwd_mode not in ("tiled", "by_block"):
        raise ValueError(f"fwd_mode must be 'tiled' or 'by_block', got {fwd_mode!r}")
    pk = _Packed(q, k, v, block_indices, select_block_size, scale, cu_seqlens_q, cu_seqlens_k)
    o = torch.empty(pk.Nq, pk.HQ, pk.DV, dtype=q.dtype, device=q.device)
    lse = torch.empty(pk.Nq, pk.HQ, dtype=torch.float32, device=q.device)
    if pk.Nq == 0:
        return pk.unpack_q(o), lse.reshape(pk.B, -1, pk.HQ)
    if fwd_mode == "by_block":
        o, lse = _fwd_by_block(pk)
        return pk.unpack_q(o.to(q.dtype)), lse.reshape(pk.B, -1, pk.HQ)
    BM = block_m or _tile_rows(pk.G, pk.avg_keys())
    _check_tile(pk.G, BM)
    tiles = _Tiles(pk, BM)
    _fwd_kernel[(tiles.num, pk.HKV)](
        pk.q, pk.k, pk.v, o, lse, pk.cu_q, pk.cu_k, tiles.tile_doc, tiles.tile_row0, tiles.ub, tiles.um, tiles.uc,
        pk.idx, pk.q.stride(0), pk.q.stride(1), pk.k.stride(0), pk.k.stride(1), pk.v.stride(0), pk.v.stride(1),
        o.stride(0), o.stride(1), pk.idx.stride(0), pk.idx.stride(1),
        pk.TQ, pk.TK, tiles.per_doc, tiles.maxu, pk.scale * _LOG2E,
        HKV=pk.HKV, G=pk.G, L=pk.L, N=pk.n, NP=max(2, _next_pow2(pk.n)), DK=pk.DK, DV=pk.DV, BK1=pk.BK1,
        BK2=pk.BK2, BV=pk.BV, BM=BM, BN=_key_tile(pk.L), DIRECT=tiles.direct, VARLEN=pk.varlen, PREC=pk.prec,
        DECODE=pk.Nq * pk.G < DECODE_ROWS * pk.num_docs,
    )
    return pk.unpack_q(o), lse.reshape(pk.B, -1, pk.HQ)


def _fwd_by_block(pk: _Packed):
    """Key-centric forward: (fp32 output [Nq, HQ, DV], lse [Nq, HQ]); see `selected_attention_fwd`."""
    dev = pk.q.device
    oacc = torch.zeros(pk.Nq, pk.HQ, pk.DV, dtype=torch.float32, device=dev)
    if pk.n == 0 or pk.Nk == 0:
        return oacc, torch.full((pk.Nq, pk.HQ), float("-inf"), device=dev)
    seg = max(1, _DKDV_SEGMENT_ROWS // pk.G)
    rev = _reverse_index(pk, seg)
    entries = pk.Nq * pk.HKV * pk.n
    lse_entry = torch.empty(entries * pk.G, dtype=torch.float32, device=dev)  # log2 units, per (sorted entry, head)
    lse = torch.empty(pk.Nq, pk.HQ, dtype=torch.float32, device=dev)

    def launch(pass_):
        _fwd_by_block_kernel[(rev["num_items"],)](
            pk.q, pk.k, pk.v, lse_entry, lse, oacc, pk.cu_q, pk.cu_k,
            rev["item_bucket"], rev["item_seg"], rev["bucket_off"], rev["blk_doc"], rev["blk_off"], rev["pos"],
            pk.q.stride(0), pk.q.stride(1), pk.k.stride(0), pk.k.stride(1), pk.v.stride(0), pk.v.stride(1),
            pk.TQ, pk.TK, rev["nsb"], rev["nbuckets"], seg, pk.scale * _LOG2E,
            HKV=pk.HKV, G=pk.G, L=pk.L, DK=pk.DK, DV=pk.DV, BK1=pk.BK1, BK2=pk.BK2, BV=pk.BV,
            BN=_key_tile(pk.L), PASS=pass_, VARLEN=pk.varlen, PREC=pk.prec,
        )

    launch(0)
    # back from sorted entries to (query, KV head, slot), then the log-sum-exp over each query's blocks
    order = rev["order"]
    rank = torch.empty_like(order)
    rank[order] = torch.arange(entries, device=dev, dtype=order.dtype)
    per_slot = lse_entry.view(entries, pk.G)[rank].view(pk.Nq, pk.HKV, pk.n, pk.G)
    per_slot = per_slot.masked_fill(~rev["valid"].view(pk.Nq, pk.HKV, pk.n, 1), float("-inf"))
    lse.copy_(torch.logsumexp(per_slot * 0.6931471805599453, dim=2).reshape(pk.Nq, pk.HQ))
    launch(1)
    return oacc, lse


def _reverse_index(pk: _Packed, seg: int):
    """
    CSR over (KV head, KV block) of the query rows that selected the block (each row listed once, ascending), and
    the work items: one per `seg` consecutive entries of a list. Memory O(Nq * HKV * n); no device sync.
    """
    dev = pk.q.device
    HKV, n, L = pk.HKV, pk.n, pk.L
    idx = pk.idx.long()  # [Nq, HKV, n]
    if n > 1:  # sorted rows make repeated blocks neighbours (any order is accepted)
        idx = idx.sort(dim=-1).values
    if pk.varlen:
        len_q = (pk.cu_q[1:] - pk.cu_q[:-1]).long()
        len_k = (pk.cu_k[1:] - pk.cu_k[:-1]).long()
        nblk = (len_k + L - 1) // L
        blk_off = torch.cat([nblk.new_zeros(1), nblk.cumsum(0)])
        nsb = pk.Nk // L + pk.num_docs  # upper bound on the blocks of all documents
        row_doc = torch.repeat_interleave(torch.arange(pk.num_docs, device=dev), len_q, output_size=pk.Nq)
        t = torch.arange(pk.Nq, device=dev) - pk.cu_q[:-1].long()[row_doc] + (len_k - len_q)[row_doc]
        first_blk = blk_off[:-1][row_doc]
        blk_doc = torch.searchsorted(blk_off[1:], torch.arange(nsb, device=dev), right=True)
        blk_doc = blk_doc.clamp_max(pk.num_docs - 1).to(torch.int32)
        blk_off32 = blk_off.to(torch.int32)
    else:
        nb = triton.cdiv(pk.TK, L)
        nsb = pk.B * nb
        rows = torch.arange(pk.Nq, device=dev)
        t = rows % pk.TQ + (pk.TK - pk.TQ)
        first_blk = (rows // pk.TQ) * nb
        blk_doc = blk_off32 = torch.zeros(1, dtype=torch.int32, device=dev)
    valid = (idx >= 0) & (idx <= (t.clamp_min(0) // L)[:, None, None]) & (t >= 0)[:, None, None]
    if n > 1:  # a block listed twice in one row counts once
        valid[..., 1:] &= idx[..., 1:] != idx[..., :-1]
    nbuckets = HKV * nsb
    heads = torch.arange(HKV, device=dev)[None, :, None]
    key = torch.where(valid, heads * nsb + first_blk[:, None, None] + idx, nbuckets).flatten().to(torch.int32)
    # Stable sort keeps each list ascending in query position (neighbouring rows, better locality); the bucket
    # offsets come from searchsorted on the sorted keys (torch.bincount would sync with the host on CUDA).
    sorted_key, order = torch.sort(key, stable=True)
    pos = (order // (HKV * n)).to(torch.int32)
    bucket_off = torch.searchsorted(sorted_key, torch.arange(nbuckets + 1, device=dev, dtype=torch.int32))
    counts = bucket_off[1:] - bucket_off[:-1]
    bucket_off = bucket_off.to(torch.int32)
    nseg = (counts + seg - 1) // seg
    item_cum = nseg.cumsum(0)
    num_items = pk.Nq * HKV * n // seg + nbuckets  # upper bound
    ids = torch.arange(num_items, device=dev)
    item_bucket = torch.searchsorted(item_cum, ids, right=True)
    b = item_bucket.clamp_max(nbuckets - 1)
    item_seg = (ids - (item_cum[b] - nseg[b])).clamp_min(0).to(torch.int32)
    return dict(
        item_bucket=item_bucket.to(torch.int32), item_seg=item_seg, bucket_off=bucket_off, blk_doc=blk_doc,
        blk_off=blk_off32, pos=pos, nsb=nsb, nbuckets=nbuckets, num_items=num_items, order=order,
        valid=valid.flatten(),
    )


def attention_delta(o, do):
    """delta = rowsum(dO * O) in float32, `[B, T, H]` (the softmax-backward correction term)."""
    B, T, H, DV = o.shape
    delta = torch.empty(B, T, H, dtype=torch.float32, device=o.device)
    if B * T * H == 0:
        return delta
    o, do = (x if x.stride(-1) == 1 else x.contiguous() for x in (o, do))
    block_d = max(16, _next_pow2(DV))
    block_r = max(1, min(64, 8192 // block_d))
    _delta_kernel[(triton.cdiv(T * H, block_r), B)](
        o, do, delta, o.stride(0), o.stride(1), o.stride(2), do.stride(0), do.stride(1), do.stride(2), T, H,
        DV=DV, BLOCK_R=block_r, BLOCK_D=block_d,
    )
    return delta


def _default_dq_mode(G: int) -> str:
    """
    Fused dQ costs one fp32 atomic per (query head, selected block, dim): ~2.8 ms per 1e9 on an H100. The tiled pass
    pays for masked rows of its union tiles instead, which grows as G shrinks. Measured backward ms (H100, 64k /
    8k): 32q/8kv fused 21.0 / 2.8 vs tiled 51.3 / 3.2; 64q/4kv fused 42.5 / 4.7 vs tiled 38.6 / 4.1.
    """
    return "tiled" if G >= 16 else "fused"


def selected_attention_bwd(
    do, q, k, v, o, lse, block_indices, select_block_size, scale=None, cu_seqlens_q=None, cu_seqlens_k=None,
    block_m=None, delta=None, dq_mode=None,
):
    """
    Backward of selected-block attention from the forward's `o` and `lse`. Returns `(dq, dk, dv)` shaped and typed
    like q, k, v.

    `delta` (float32 `[B, Tq, HQ]`, rowsum(do * o)) may be passed by a caller that has it. `dq_mode`: "fused" adds
    dQ inside the dK/dV pass over the reverse index with fp32 atomics (each (query, block) pair is visited once for
    all four gradients); "tiled" runs a separate dQ pass over the query tiles, like the forward (no atomics on dQ).
    """
    dq_mode = dq_mode or _default_dq_mode(q.shape[2] // max(1, k.shape[2]))
    if dq_mode not in ("fused", "tiled"):
        raise ValueError(f"dq_mode must be 'fused' or 'tiled', got {dq_mode!r}")
    pk = _Packed(q, k, v, block_indices, select_block_size, scale, cu_seqlens_q, cu_seqlens_k)
    dev = q.device
    fused = dq_mode == "fused"
    dka = torch.zeros(pk.Nk, pk.HKV, pk.DK, dtype=torch.float32, device=dev)
    dva = torch.zeros(pk.Nk, pk.HKV, pk.DV, dtype=torch.float32, device=dev)
    if fused:
        dqa = torch.zeros(pk.Nq, pk.HQ, pk.DK, dtype=torch.float32, device=dev)
    else:
        dqa = dka  # unused by the kernel
        dq = torch.empty(pk.Nq, pk.HQ, pk.DK, dtype=q.dtype, device=dev)
    if pk.Nq == 0 or pk.Nk == 0 or pk.n == 0:
        dq = torch.zeros(pk.Nq, pk.HQ, pk.DK, dtype=q.dtype, device=dev)
        return pk.unpack_q(dq), pk.unpack_k(dka.to(k.dtype)), pk.unpack_k(dva.to(v.dtype))
    do_ = _rows(do)
    lse_ = lse.reshape(pk.Nq, pk.HQ).float().contiguous()
    BN = _key_tile(pk.L)
    if fused:
        if delta is None:
            delta = attention_delta(o, do)
        delta = delta.reshape(pk.Nq, pk.HQ).float().contiguous()
    else:
        o_ = _rows(o)
        delta = torch.empty(pk.Nq, pk.HQ, dtype=torch.float32, device=dev)
        BM = block_m or _tile_rows(pk.G, forward=False)
        _check_tile(pk.G, BM)
        tiles = _Tiles(pk, BM)
        _dq_kernel[(tiles.num, pk.HKV)](
            pk.q, pk.k, pk.v, o_, do_, lse_, delta, dq, pk.cu_q, pk.cu_k,
            tiles.tile_doc, tiles.tile_row0, tiles.ub, tiles.um, tiles.uc, pk.idx,
            pk.q.stride(0), pk.q.stride(1), pk.k.stride(0), pk.k.stride(1), pk.v.stride(0), pk.v.stride(1),
            o_.stride(0), o_.stride(1), do_.stride(0), do_.stride(1), dq.stride(0), dq.stride(1),
            pk.idx.stride(0), pk.idx.stride(1),
            pk.TQ, pk.TK, tiles.per_doc, tiles.maxu, pk.scale * _LOG2E, pk.scale,
            HKV=pk.HKV, G=pk.G, L=pk.L, N=pk.n, NP=max(2, _next_pow2(pk.n)), DK=pk.DK, DV=pk.DV, BK1=pk.BK1,
            BK2=pk.BK2, BV=pk.BV, BM=BM, BN=BN, DIRECT=tiles.direct, VARLEN=pk.varlen, PREC=pk.prec,
        )
    seg = max(1, _DKDV_SEGMENT_ROWS // pk.G)
    rev = _reverse_index(pk, seg)
    grid = (rev["num_items"], triton.cdiv(pk.L, BN))
    _dkdv_kernel[grid](
        pk.q, pk.k, pk.v, do_, lse_, delta, dka, dva, dqa, pk.cu_q, pk.cu_k,
        rev["item_bucket"], rev["item_seg"], rev["bucket_off"], rev["blk_doc"], rev["blk_off"], rev["pos"],
        pk.q.stride(0), pk.q.stride(1), pk.k.stride(0), pk.k.stride(1), pk.v.stride(0), pk.v.stride(1),
        do_.stride(0), do_.stride(1),
        pk.TQ, pk.TK, rev["nsb"], rev["nbuckets"], seg, pk.scale * _LOG2E, pk.scale,
        HKV=pk.HKV, G=pk.G, L=pk.L, DK=pk.DK, DV=pk.DV, BK1=pk.BK1, BK2=pk.BK2, BV=pk.BV,
        BN=BN, FUSE_DQ=fused, VARLEN=pk.varlen, PREC=pk.prec,
    )
    if fused:
        dq = dqa.to(q.dtype)
    return pk.unpack_q(dq), pk.unpack_k(dka.to(k.dtype)), pk.unpack_k(dva.to(v.dtype))


class SelectedAttentionFunction(torch.autograd.Function):
    """Thin autograd wrapper: the forward saves (q, k, v, o, lse); block indices get no gradient."""

    @staticmethod
    def forward(ctx, q, k, v, block_indices, select_block_size, scale, cu_seqlens_q, cu_seqlens_k):
        o, lse = selected_attention_fwd(q, k, v, block_indices, select_block_size, scale, cu_seqlens_q, cu_seqlens_k)
        ctx.save_for_backward(q, k, v, o, lse, block_indices, cu_seqlens_q, cu_seqlens_k)
        ctx.select_block_size, ctx.scale = select_block_size, scale
        ctx.mark_non_differentiable(lse)
        return o, lse

    @staticmethod
    def backward(ctx, do, dlse):
        q, k, v, o, lse, block_indices, cu_q, cu_k = ctx.saved_tensors
        dq, dk, dv = selected_attention_bwd(
            do.contiguous(), q, k, v, o, lse, block_indices, ctx.select_block_size, ctx.scale, cu_q, cu_k
        )
        return dq, dk, dv, None, None, None, None, None


def selected_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    block_indices: torch.Tensor,
    select_block_size: int,
    scale: float | None = None,
    cu_seqlens_q: torch.Tensor | None = None,
    cu_seqlens_k: torch.Tensor | None = None,
) -> torch.Tensor:
    """
    Attention of each query over the key blocks its KV group selected (NSA selection branch), differentiable in
    q, k, v.

    Args:
        q: `[B, Tq, HQ, DK]`; k: `[B, Tk, HKV, DK]`; v: `[B, Tk, HKV, DV]`; `HQ % HKV == 0`; float16/bfloat16 on CUDA
            (float32 works too; on CPU only under `TRITON_INTERPRET=1`). DK, DV <= 256.
        block_indices: int32 `[B, Tq, HKV, n]`: per query and KV head the selected block numbers, ascending, `-1` for
            unused slots. Block j covers keys `[j*l', (j+1)*l')` (per document when packed). Blocks with no visible
            key (`j*l' > t`) are ignored.
        select_block_size: l', any positive int (16..128 in practice).
        scale: softmax scale, default `DK ** -0.5`.
        cu_seqlens_q, cu_seqlens_k: `[num_docs + 1]` int32 offsets of packed documents (batch 1); queries of a
            document are the last positions of its keys (bottom-right alignment): query i of a document with Lq
            queries and Lk keys sits at position `Lk - Lq + i` and sees keys `s <= Lk - Lq + i`.

    Returns:
        `[B, Tq, HQ, DV]` in q's dtype; a query that sees no key gets zeros.
    """
    return SelectedAttentionFunction.apply(q, k, v, block_indices, select_block_size, scale, cu_seqlens_q, cu_seqlens_k)[0]


__all__ = ["selected_attention", "selected_attention_fwd", "selected_attention_bwd", "SelectedAttentionFunction"]


def _synthetic_selection(B, T, HKV, n, L, device, seed=0):
    """
    Block indices with the structure of real NSA selections, cheap to make at long T: block 0 and the two local
    blocks always, the rest the top blocks of a score that is shared by the 64 queries of a chunk plus per-query noise.
    """
    gen = torch.Generator(device=device).manual_seed(seed)
    NS = triton.cdiv(T, L)
    t = torch.arange(T, device=device)
    chunk_scores = torch.rand(B, triton.cdiv(T, 64), HKV, NS, device=device, generator=gen)
    scores = chunk_scores.repeat_interleave(64, dim=1)[:, :T] + 0.3 * torch.rand(B, T, HKV, NS, device=device, generator=gen)
    j = torch.arange(NS, device=device)
    cur = (t // L)[:, None]
    scores = scores.masked_fill(((j[None, :] == 0) | (j[None, :] >= cur - 1))[None, :, None, :], 2.0)
    scores = scores.masked_fill((j[None, :] > cur)[None, :, None, :], -1.0)
    top = scores.topk(min(n, NS), dim=-1)
    idx = torch.where(top.values >= 0, top.indices, NS + 1).sort(dim=-1).values
    return torch.where(idx > NS, -1, idx).to(torch.int32)


def _benchmark(seqlens=(8192, 16384, 32768), HQ=64, HKV=4, DK=192, DV=128, L=64, n=16):
    """Forward and forward+backward time of `selected_attention` vs dense causal SDPA (bf16, CUDA)."""
    from triton.testing import do_bench

    dev = "cuda"
    for T in seqlens:
        q = torch.randn(1, T, HQ, DK, device=dev, dtype=torch.bfloat16, requires_grad=True)
        k = torch.randn(1, T, HKV, DK, device=dev, dtype=torch.bfloat16, requires_grad=True)
        v = torch.randn(1, T, HKV, DV, device=dev, dtype=torch.bfloat16, requires_grad=True)
        idx = _synthetic_selection(1, T, HKV, n, L, dev)
        do = torch.randn(1, T, HQ, DV, device=dev, dtype=torch.bfloat16)
        fwd = do_bench(lambda: selected_attention_fwd(q, k, v, idx, L))
        o, lse = selected_attention_fwd(q, k, v, idx, L)
        bwd = do_bench(lambda: selected_attention_bwd(do, q, k, v, o, lse, idx, L))
        qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        sdpa = torch.nn.functional.scaled_dot_product_attention
        dense_f = do_bench(lambda: sdpa(qt, kt, vt, is_causal=True, enable_gqa=True))
        od = sdpa(qt, kt, vt, is_causal=True, enable_gqa=True)
        dense_b = do_bench(lambda: torch.autograd.grad(od, (qt, kt, vt), do.transpose(1, 2), retain_graph=True))
        print(
            f"T={T:6d} HQ={HQ} HKV={HKV} DK={DK} DV={DV} l'={L} n={n}: selected fwd {fwd:7.3f} ms bwd {bwd:7.3f} ms | "
            f"dense SDPA fwd {dense_f:7.3f} ms bwd {dense_b:7.3f} ms | speedup fwd {dense_f / fwd:5.2f}x "
            f"bwd {dense_b / bwd:5.2f}x"
        )


if __name__ == "__main__":
    _benchmark()
