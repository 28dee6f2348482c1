"""
Selected-block attention over query tiles (see `selected.py` for the op): the tiled forward and the tiled dQ.

A program owns one KV head `h` and a tile of BM consecutive rows of the flattened (query position, head-in-group)
space of one document: row R is position `R // G`, query head `h*G + R % G`. With G >= BM a tile is a chunk of one
position's heads; with G < BM it holds several consecutive positions, so tensor-core tiles keep >= 16 rows for any group
size (1, 2, 7, ...) and no row is padding.

Union merge. The positions of a tile share most of their selected blocks (block 0, the local blocks, the strong top-n
blocks), so each KV block in the UNION of their sorted lists is streamed once for the whole tile; rows whose position
did not select the block are masked. The union is built by a tiny pre-pass kernel (`_union_kernel`): a P-way merge that
repeatedly takes the smallest block above the last one taken and records, as a bit mask, which positions selected it.
The main loops then just walk `(block, position-mask)` pairs, so the merge costs nothing inside the attention loop, and
the forward and the dQ kernels reuse the same table layout. A tile inside one position (G a multiple of the tile
height) needs no union: it walks that position's own list.
"""

import torch
import triton
import triton.language as tl

from ._tiling import (
    DECODE_ROWS,
    LOG2E,
    QUICK,
    SELECTED_TILE_CONFIGS,
    SWITCHES,
    TIMED,
    choose_configs,
    load_compiled,
    next_pow2,
)

# ----------------------------------------------------------------------------------------------------------------------
# Small jitted helpers
# ----------------------------------------------------------------------------------------------------------------------


# Integer arguments that change with the prompt length: never specialised (why: band_attention._BAND_FWD_VARYING).
_TILE_VARYING = ["TQ", "TK", "TILES_PER_DOC", "MAXU"]


@triton.jit
def load_rows(X, row, head, stride_t, stride_h, cols, ok, D: tl.constexpr):
    """`[rows, cols]` of X at (row, head) per row; rows with `ok` false and columns from D on read 0."""
    return tl.load(X + row[:, None] * stride_t + head[:, None] * stride_h + cols[None, :],
                   mask=ok[:, None] & (cols[None, :] < D), other=0.0)


@triton.jit
def load_keys(X, row, h, stride_t, stride_h, cols, ok, D: tl.constexpr):
    """`[keys, cols]` of X at rows `row` of head h; keys with `ok` false and columns from D on read 0."""
    return tl.load(X + row[:, None] * stride_t + h * stride_h + cols[None, :],
                   mask=ok[:, None] & (cols[None, :] < D), other=0.0)


@triton.jit
def load_keys_t(X, row, h, stride_t, stride_h, cols, ok, D: tl.constexpr):
    """`load_keys` transposed: `[cols, keys]`."""
    return tl.load(X + row[None, :] * stride_t + h * stride_h + cols[:, None],
                   mask=ok[None, :] & (cols[:, None] < D), other=0.0)


@triton.jit
def block_keys(j, c, L: tl.constexpr, len_k, bos_k, blk_ok):
    """Keys `c` (offsets in the block) of selection block j, valid where `blk_ok`: (position, valid, packed row)."""
    kpos = j * L + c
    kv_ok = (c < L) & (kpos < len_k) & blk_ok
    return kpos, kv_ok, (bos_k + kpos).to(tl.int64)


@triton.jit
def _query_rows(row0, h, bos_q, len_q, len_k, G: tl.constexpr, BM: tl.constexpr):
    """
    Rows row0 .. row0 + BM of a document's flattened (position, head-in-group) space: (valid, position, query head,
    position relative to the tile's first, causal position t, packed query row).
    """
    rows = row0 + tl.arange(0, BM)
    row_ok = rows < len_q * G
    pos = rows // G
    head = h * G + rows % G
    bit = (pos - row0 // G).to(tl.int64)
    t = pos + (len_k - len_q)
    return row_ok, pos, head, bit, t, (bos_q + pos).to(tl.int64)


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
def doc_bounds(doc, CU_Q, CU_K, TQ, TK, VARLEN: tl.constexpr):
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


@triton.jit(do_not_specialize=_TILE_VARYING)
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
    bos_q, len_q, bos_k, len_k = doc_bounds(doc, CU_Q, CU_K, TQ, TK, VARLEN)
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
# Forward and dQ over query tiles
# ----------------------------------------------------------------------------------------------------------------------


def prune(configs, named_args, **kwargs):
    """The switches of `_tiling.choose_configs` apply; decoding launches are not timed."""
    kept = configs[:1] if kwargs.get("DECODE", False) else configs
    return choose_configs(kept, configs)


PRUNE = {"early_config_prune": prune}


@triton.autotune(
    configs=SELECTED_TILE_CONFIGS, key=["G", "L", "DK", "DV", "BM", "BN", "DIRECT", "DECODE"], prune_configs_by=PRUNE,
    cache_results=True, do_bench=QUICK,
)
@triton.jit(do_not_specialize=_TILE_VARYING)
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
    bos_q, len_q, bos_k, len_k = doc_bounds(doc, CU_Q, CU_K, TQ, TK, VARLEN)
    HQ: tl.constexpr = HKV * G
    NSUB: tl.constexpr = (L + BN - 1) // BN

    row_ok, pos, head, bit, t, qrow = _query_rows(row0, h, bos_q, len_q, len_k, G, BM)
    d1 = tl.arange(0, BK1)
    dv = tl.arange(0, BV)
    q1 = load_rows(Q, qrow, head, stride_qt, stride_qh, d1, row_ok, DK)
    if BK2 > 0:
        d2 = BK1 + tl.arange(0, BK2)
        q2 = load_rows(Q, qrow, head, stride_qt, stride_qh, d2, row_ok, DK)

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
    for i in range(0, cnt * NSUB):
        e = i // NSUB
        blk, active, blk_ok = _tile_block(e, UB, UM, ubase, bit, idx_row, t0, L, N, NP, DIRECT)
        kpos, kv_ok, krow = block_keys(blk, (i % NSUB) * BN + cols, L, len_k, bos_k, blk_ok)
        kt1 = load_keys_t(K, krow, h, stride_kt, stride_kh, d1, kv_ok, DK)
        s = tl.dot(q1, kt1, input_precision=PREC)
        if BK2 > 0:
            kt2 = load_keys_t(K, krow, h, stride_kt, stride_kh, d2, kv_ok, DK)
            s += tl.dot(q2, kt2, input_precision=PREC)
        allowed = active[:, None] & kv_ok[None, :] & (kpos[None, :] <= t[:, None])
        s = tl.where(allowed, s * scale_log2, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_use)
        p = tl.exp2(s - m_use[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        vb = load_keys(V, krow, h, stride_vt, stride_vh, dv, kv_ok, DV)
        acc = acc * alpha[:, None] + tl.dot(p.to(vb.dtype), vb, input_precision=PREC)
        m_i = m_new

    empty = l_i == 0.0
    l_safe = tl.where(empty, 1.0, l_i)
    out = acc / l_safe[:, None]
    lse = tl.where(empty, float("-inf"), (m_i + tl.log2(l_safe)) * 0.6931471805599453)
    tl.store(O + qrow[:, None] * stride_ot + head[:, None] * stride_oh + dv[None, :], out.to(O.dtype.element_ty),
             mask=row_ok[:, None] & (dv[None, :] < DV))
    tl.store(LSE + qrow * HQ + head, lse, mask=row_ok)



@triton.autotune(
    configs=SELECTED_TILE_CONFIGS, key=["G", "L", "DK", "DV", "BM", "BN", "DIRECT"], prune_configs_by=PRUNE,
    cache_results=True, do_bench=TIMED,
)
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
    bos_q, len_q, bos_k, len_k = doc_bounds(doc, CU_Q, CU_K, TQ, TK, VARLEN)
    HQ: tl.constexpr = HKV * G
    NSUB: tl.constexpr = (L + BN - 1) // BN

    row_ok, pos, head, bit, t, qrow = _query_rows(row0, h, bos_q, len_q, len_k, G, BM)
    d1 = tl.arange(0, BK1)
    dv = tl.arange(0, BV)
    q1 = load_rows(Q, qrow, head, stride_qt, stride_qh, d1, row_ok, DK)
    if BK2 > 0:
        d2 = BK1 + tl.arange(0, BK2)
        q2 = load_rows(Q, qrow, head, stride_qt, stride_qh, d2, row_ok, DK)
    do = load_rows(DO, qrow, head, stride_dot, stride_doh, dv, row_ok, DV)
    o = load_rows(O, qrow, head, stride_ot, stride_oh, dv, row_ok, DV)
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
    for i in range(0, cnt * NSUB):
        e = i // NSUB
        blk, active, blk_ok = _tile_block(e, UB, UM, ubase, bit, idx_row, t0, L, N, NP, DIRECT)
        kpos, kv_ok, krow = block_keys(blk, (i % NSUB) * BN + cols, L, len_k, bos_k, blk_ok)
        kt1 = load_keys_t(K, krow, h, stride_kt, stride_kh, d1, kv_ok, DK)
        s = tl.dot(q1, kt1, input_precision=PREC)
        if BK2 > 0:
            kt2 = load_keys_t(K, krow, h, stride_kt, stride_kh, d2, kv_ok, DK)
            s += tl.dot(q2, kt2, input_precision=PREC)
        allowed = active[:, None] & kv_ok[None, :] & (kpos[None, :] <= t[:, None])
        p = tl.where(allowed, tl.exp2(s * scale_log2 - lse2[:, None]), 0.0)
        vt = load_keys_t(V, krow, h, stride_vt, stride_vh, dv, kv_ok, DV)
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



# ----------------------------------------------------------------------------------------------------------------------
# Host side
# ----------------------------------------------------------------------------------------------------------------------


def tile_rows(G: int, avg_keys: int, rules, forward: bool = True) -> int:
    """
    Rows (positions x heads-in-group) of a query tile for the forward and the tiled dQ kernels
    (`override(selected_block_m=...)` forces one).

    More positions per tile load each shared KV block once for more rows (fewer loads) but mask the rows whose
    position did not pick a block (more MMA work). Measured on reference selections (T=4096, l'=64, n=16, random
    data, the worst case for overlap), the union of P consecutive positions' lists holds 16 / 24 / 32 / 38 / 40 blocks
    for P = 1 / 2 / 4 / 8 / 16 (23 / 28 for P = 4 / 16 on data with local structure): loads per position fall 2-9x
    while the masked MMA work grows at most ~2x. 64 rows fill one H100 warpgroup MMA (wgmma needs M=64 per warpgroup);
    for G=1 we stop at 32 rows (32 positions) so that long-context random selections do not blow the union up.
    At long context (`rules.selected_long_context` keys per document) the unions of random selections stop
    overlapping and the forward is bound by K/V gathers, so 16-row tiles (one position for G=16, no union table) win
    there: H100, `benchmarks/sweep_selected.py`, forward ms for 16 / 64 rows: 18.1 / 19.1 (64q/4kv, 64k), 29.6 / 32.7
    (32q/8kv, 64k), 2.25 / 1.75 and 2.65 / 1.72 at 8k.
    """
    if SWITCHES.selected_block_m is not None:
        return SWITCHES.selected_block_m
    if forward and G >= 4 and avg_keys >= rules.selected_long_context:
        return 16
    return 64 if G >= 4 else 32


def key_tile(L: int) -> int:
    """Keys per inner step: a whole selection block up to 64 keys, else 64-key chunks of it."""
    return min(64, max(16, next_pow2(L)))


def tile_positions(G: int, BM: int) -> int:
    """Most query positions one tile of BM flattened rows can touch (tiles start at multiples of BM)."""
    return BM // G if BM % G == 0 else (BM - 1) // G + 2


class QueryTiles:
    """Query tiles (BM flattened rows of one document) and the union of their selected blocks per KV head."""

    def __init__(self, pk, BM: int):
        G, dev, geo = pk.G, pk.q.device, pk.geo
        self.BM = BM
        npos = tile_positions(G, BM)
        if npos > 64:
            raise ValueError(f"a query tile of {BM} rows would hold {npos} positions; at most 64 are supported")
        if pk.varlen:
            self.num, self.tile_doc, self.tile_row0 = geo.table(("selected_tiles", G, BM), lambda: _tile_list(pk, BM))
            self.per_doc = 1
        else:
            self.per_doc = triton.cdiv(pk.TQ * G, BM)
            self.num = pk.B * self.per_doc
            self.tile_doc = self.tile_row0 = geo.dummy
        # A tile inside one position walks that position's own list: no union table is needed.
        self.direct = G % BM == 0
        if self.direct:
            self.maxu = 1
            self.ub = self.uc = geo.dummy
            self.um = geo.table(("dummy", torch.int64), lambda: torch.zeros(1, dtype=torch.int64, device=dev))
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
            HKV=pk.HKV, G=G, L=pk.L, N=pk.n, NP=max(2, next_pow2(pk.n)), PP=max(2, next_pow2(npos)),
            BM=BM, VARLEN=pk.varlen,
        )


def _tile_list(pk, BM):
    """Packed: (grid upper bound, tile -> document or -1, tile -> first row), built on the device without a sync."""
    dev = pk.q.device
    len_q = (pk.cu_q[1:] - pk.cu_q[:-1]).long()
    per_doc = (len_q * pk.G + BM - 1) // BM
    cum = per_doc.cumsum(0)
    num = pk.Nq * pk.G // BM + pk.num_docs  # upper bound, known without a device sync
    ids = torch.arange(num, device=dev)
    doc = torch.searchsorted(cum, ids, right=True)
    used = doc < pk.num_docs
    docc = doc.clamp_max(pk.num_docs - 1)
    first = cum[docc] - per_doc[docc]
    return num, torch.where(used, doc, -1).to(torch.int32), ((ids - first) * BM).clamp_min(0).to(torch.int32)


def tiled_forward(pk, BM: int, compile_only: bool = False):
    """
    Forward over query tiles of BM rows: (o `[Nq, HQ, DV]` in q's dtype, lse `[Nq, HQ]` float32). With
    `compile_only` the forward kernel's configurations are compiled for these inputs' signature, not run (None).
    """
    o = torch.empty(pk.Nq, pk.HQ, pk.DV, dtype=pk.q.dtype, device=pk.q.device)
    lse = torch.empty(pk.Nq, pk.HQ, dtype=torch.float32, device=pk.q.device)
    tiles = QueryTiles(pk, BM)
    grid = (tiles.num, pk.HKV)
    args = (
        pk.q, pk.k, pk.v, o, lse, pk.cu_q, pk.cu_k, tiles.tile_doc, tiles.tile_row0, tiles.ub, tiles.um, tiles.uc,
        pk.idx, pk.q.stride(0), pk.q.stride(1), pk.k.stride(0), pk.k.stride(1), pk.v.stride(0), pk.v.stride(1),
        o.stride(0), o.stride(1), pk.idx.stride(0), pk.idx.stride(1),
        pk.TQ, pk.TK, tiles.per_doc, tiles.maxu, pk.scale * LOG2E,
    )
    meta = dict(
        HKV=pk.HKV, G=pk.G, L=pk.L, N=pk.n, NP=max(2, next_pow2(pk.n)), DK=pk.DK, DV=pk.DV, BK1=pk.BK1,
        BK2=pk.BK2, BV=pk.BV, BM=BM, BN=key_tile(pk.L), DIRECT=tiles.direct, VARLEN=pk.varlen, PREC=pk.prec,
        DECODE=pk.Nq * pk.G < DECODE_ROWS * pk.num_docs,
    )
    if compile_only:
        load_compiled(_fwd_kernel.warmup(*args, grid=grid, **meta))
        return None
    _fwd_kernel[grid](*args, **meta)
    return o, lse


def tiled_dq(pk, o, do, lse, BM: int):
    """dQ over query tiles of BM rows (o, do `[Nq, HQ, DV]`, lse `[Nq, HQ]`): (dq in q's dtype, delta float32)."""
    dq = torch.empty(pk.Nq, pk.HQ, pk.DK, dtype=pk.q.dtype, device=pk.q.device)
    delta = torch.empty(pk.Nq, pk.HQ, dtype=torch.float32, device=pk.q.device)
    tiles = QueryTiles(pk, BM)
    _dq_kernel[(tiles.num, pk.HKV)](
        pk.q, pk.k, pk.v, o, do, lse, delta, dq, pk.cu_q, pk.cu_k,
        tiles.tile_doc, tiles.tile_row0, tiles.ub, tiles.um, tiles.uc, pk.idx,
        pk.q.stride(0), pk.q.stride(1), pk.k.stride(0), pk.k.stride(1), pk.v.stride(0), pk.v.stride(1),
        o.stride(0), o.stride(1), do.stride(0), do.stride(1), dq.stride(0), dq.stride(1),
        pk.idx.stride(0), pk.idx.stride(1),
        pk.TQ, pk.TK, tiles.per_doc, tiles.maxu, pk.scale * LOG2E, pk.scale,
        HKV=pk.HKV, G=pk.G, L=pk.L, N=pk.n, NP=max(2, next_pow2(pk.n)), DK=pk.DK, DV=pk.DV, BK1=pk.BK1,
        BK2=pk.BK2, BV=pk.BV, BM=BM, BN=key_tile(pk.L), DIRECT=tiles.direct, VARLEN=pk.varlen, PREC=pk.prec,
    )
    return dq, delta
