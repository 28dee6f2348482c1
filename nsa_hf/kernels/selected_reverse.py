"""
Selected-block attention over the reverse index (see `selected.py` for the op): the dK/dV pass (dQ fused in or not)
and the key-centric forward.

The reverse index is a CSR over (KV head, KV block) of the query positions that selected the block (each listed once,
ascending), built with a stable sort and searchsorted, O(Nq * HKV * n) memory and no host sync. A program owns one KV
block (or a 64-key chunk of it) and walks a segment of its list in chunks of BM gathered rows (positions x
heads-in-group). Lists longer than one segment (block 0 is selected by every query, local blocks by ~2 l' queries) are
cut into segments of ~4096 rows handled by separate programs that combine with fp32 atomic adds; blocks with a single
segment store directly. This keeps every program's work bounded (no straggler on block 0) and touches only selected
(position, block) pairs: no T x T or T x (T/l') tensor is ever built.

* dK/dV (`_dkdv_kernel`): dK/dV in fp32 registers per program; with FUSE_DQ also dS K of each row added into an fp32
  dQ accumulator with atomics (every (query, block) pair is visited once for all gradients).
* Key-centric forward (`_fwd_by_block_kernel`, "by_block"): a log-sum-exp pass, then P V added into an fp32
  output with atomics; no masked rows at any group size. The default for group 4 at long documents
  (`selected.default_fwd_mode`; measured by `benchmarks/sweep_selected.py ... compare`).
"""

import functools

import torch
import triton
import triton.language as tl

from ._tiling import (
    LOG2E,
    QUICK,
    SELECTED_BY_BLOCK_CONFIGS,
    SELECTED_DKDV_CONFIGS,
    TIMED,
    choose_configs,
    device_limits,
    load_compiled,
    next_pow2,
    tuning,
)
from .selected_tiles import PRUNE, block_keys, doc_bounds, key_tile, load_keys, load_keys_t, load_rows

# ----------------------------------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------------------------------


# Integer arguments that change with the prompt length: never specialised (why: band_attention._BAND_FWD_VARYING).
_BUCKET_VARYING = ["TQ", "TK", "NSB", "NBUCKETS", "SEG"]


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
def _bucket_block(bucket, BLK_DOC, BLK_OFF, NSB, TK, L: tl.constexpr, VARLEN: tl.constexpr):
    """(KV head, document, block in the document) of a reverse-index bucket (KV head x block slot)."""
    h = bucket // NSB
    gblk = bucket % NSB
    if VARLEN:
        doc = tl.load(BLK_DOC + gblk)
        j = gblk - tl.load(BLK_OFF + doc)
    else:
        nb = (TK + L - 1) // L
        doc = gblk // nb
        j = gblk % nb
    return h, doc, j


@triton.jit
def _segment(BUCKET_OFF, bucket, seg, SEG):
    """The bucket's list [lo, hi) and the entries [start, end) of its segment `seg` of SEG entries."""
    lo = tl.load(BUCKET_OFF + bucket)
    hi = tl.load(BUCKET_OFF + bucket + 1)
    start = lo + seg * SEG
    return lo, hi, start, tl.minimum(start + SEG, hi)


def _prune_by_block(configs, named_args, **kwargs):
    """The measured configuration for this head dim (`Tuning.selected_by_block_tiles`) untimed, unless a test picks
    one with `config_index`."""
    q, dk = named_args.get("Q"), kwargs["DK"]
    rules = tuning(device_limits(q.device if isinstance(q, torch.Tensor) else None))
    tile = next((tuple(t[1:]) for t in rules.selected_by_block_tiles if dk <= t[0]), None)
    measured = next((c for c in configs if (c.kwargs["BM"], c.num_warps, c.num_stages) == tile), None)
    return choose_configs(configs, configs, measured=measured)


@triton.autotune(configs=SELECTED_BY_BLOCK_CONFIGS, key=["G", "L", "DK", "DV", "BN", "PASS"],
                 prune_configs_by={"early_config_prune": _prune_by_block},
                 reset_to_zero=["OACC"], cache_results=True, do_bench=QUICK)
@triton.jit(do_not_specialize=_BUCKET_VARYING)
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
    h, doc, j = _bucket_block(bucket, BLK_DOC, BLK_OFF, NSB, TK, L, VARLEN)
    bos_q, len_q, bos_k, len_k = doc_bounds(doc, CU_Q, CU_K, TQ, TK, VARLEN)
    _, _, start, end = _segment(BUCKET_OFF, bucket, seg, SEG)
    d1 = tl.arange(0, BK1)
    dv = tl.arange(0, BV)
    r = tl.arange(0, BM)
    cols = tl.arange(0, BN)
    for r0 in range(start * G, end * G, BM):
        rr = r0 + r
        r_ok = rr < end * G
        qrow = tl.load(POS + rr // G, mask=r_ok, other=0).to(tl.int64)
        head = h * G + rr % G
        t = (qrow - bos_q) + (len_k - len_q)
        q1 = load_rows(Q, qrow, head, stride_qt, stride_qh, d1, r_ok, DK)
        if BK2 > 0:
            d2 = BK1 + tl.arange(0, BK2)
            q2 = load_rows(Q, qrow, head, stride_qt, stride_qh, d2, r_ok, DK)
        if PASS == 0:
            m_i = tl.full([BM], float("-inf"), tl.float32)
            l_i = tl.zeros([BM], tl.float32)
        else:
            lse = tl.load(LSE + qrow * HQ + head, mask=r_ok, other=0.0)
            lse2 = tl.where(lse == float("-inf"), 0.0, lse * 1.4426950408889634)
            acc = tl.zeros([BM, BV], tl.float32)
        for sub in range(NSUB):
            kpos, kv_ok, krow = block_keys(j, sub * BN + cols, L, len_k, bos_k, True)
            kt1 = load_keys_t(K, krow, h, stride_kt, stride_kh, d1, kv_ok, DK)
            s = tl.dot(q1, kt1, input_precision=PREC)
            if BK2 > 0:
                kt2 = load_keys_t(K, krow, h, stride_kt, stride_kh, d2, kv_ok, DK)
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
                vb = load_keys(V, krow, h, stride_vt, stride_vh, dv, kv_ok, DV)
                acc += tl.dot(p.to(vb.dtype), vb, input_precision=PREC)
        if PASS == 0:
            # every listed block holds a key the row sees (j * L <= t), so l_i > 0 for real rows
            tl.store(LSE_E + rr, m_i + tl.log2(tl.where(l_i > 0, l_i, 1.0)), mask=r_ok)
        else:
            tl.atomic_add(OACC + (qrow * HQ + head)[:, None] * DV + dv[None, :], acc,
                          mask=r_ok[:, None] & (dv[None, :] < DV), sem="relaxed")



@triton.autotune(
    configs=SELECTED_DKDV_CONFIGS, key=["G", "L", "DK", "DV", "BN", "FUSE_DQ"], reset_to_zero=["DKA", "DVA", "DQA"],
    prune_configs_by=PRUNE, cache_results=True, do_bench=TIMED,
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
    h, doc, j = _bucket_block(bucket, BLK_DOC, BLK_OFF, NSB, TK, L, VARLEN)
    bos_q, len_q, bos_k, len_k = doc_bounds(doc, CU_Q, CU_K, TQ, TK, VARLEN)

    kpos, kv_ok, krow = block_keys(j, sub * BN + tl.arange(0, BN), L, len_k, bos_k, True)
    d1 = tl.arange(0, BK1)
    dv = tl.arange(0, BV)
    k1 = load_keys(K, krow, h, stride_kt, stride_kh, d1, kv_ok, DK)
    if BK2 > 0:
        d2 = BK1 + tl.arange(0, BK2)
        k2 = load_keys(K, krow, h, stride_kt, stride_kh, d2, kv_ok, DK)
    vb = load_keys(V, krow, h, stride_vt, stride_vh, dv, kv_ok, DV)

    lo, hi, start, end = _segment(BUCKET_OFF, bucket, seg, SEG)
    dk1 = tl.zeros([BN, BK1], tl.float32)
    if BK2 > 0:
        dk2 = tl.zeros([BN, BK2], tl.float32)
    dvacc = tl.zeros([BN, BV], tl.float32)
    r = tl.arange(0, BM)
    for r0 in range(start * G, end * G, BM):
        rr = r0 + r
        r_ok = rr < end * G
        qrow = tl.load(POS + rr // G, mask=r_ok, other=0).to(tl.int64)
        head = h * G + rr % G
        t = (qrow - bos_q) + (len_k - len_q)
        q1 = load_rows(Q, qrow, head, stride_qt, stride_qh, d1, r_ok, DK)
        sT = tl.dot(k1, tl.trans(q1), input_precision=PREC)
        if BK2 > 0:
            q2 = load_rows(Q, qrow, head, stride_qt, stride_qh, d2, r_ok, DK)
            sT += tl.dot(k2, tl.trans(q2), input_precision=PREC)
        lse = tl.load(LSE + qrow * HQ + head, mask=r_ok, other=0.0)
        lse2 = tl.where(lse == float("-inf"), 0.0, lse * 1.4426950408889634)
        delta = tl.load(DELTA + qrow * HQ + head, mask=r_ok, other=0.0)
        allowed = r_ok[None, :] & kv_ok[:, None] & (kpos[:, None] <= t[None, :])
        pT = tl.where(allowed, tl.exp2(sT * scale_log2 - lse2[None, :]), 0.0)
        do = load_rows(DO, qrow, head, stride_dot, stride_doh, dv, r_ok, DV)
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



# ----------------------------------------------------------------------------------------------------------------------
# Host side
# ----------------------------------------------------------------------------------------------------------------------


def attention_delta(o, do):
    """delta = rowsum(dO * O) in float32, `[B, T, H]` (the softmax-backward correction term)."""
    B, T, H, DV = o.shape
    delta = torch.empty(B, T, H, dtype=torch.float32, device=o.device)
    if B * T * H == 0:
        return delta
    o, do = (x if x.stride(-1) == 1 else x.contiguous() for x in (o, do))
    block_d = max(16, next_pow2(DV))
    block_r = max(1, min(64, 8192 // block_d))
    _delta_kernel[(triton.cdiv(T * H, block_r), B)](
        o, do, delta, o.stride(0), o.stride(1), o.stride(2), do.stride(0), do.stride(1), do.stride(2), T, H,
        DV=DV, BLOCK_R=block_r, BLOCK_D=block_d,
    )
    return delta


def _query_positions(pk):
    """
    The geometry's part of the reverse index, shared by every call on it: per query row its position t and the first
    block of its document; per (document, block) slot its document; the block offsets of the documents; the slots.
    """
    dev, L = pk.q.device, pk.L
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
        return t, first_blk, blk_doc, blk_off.to(torch.int32), nsb
    nb = triton.cdiv(pk.TK, L)
    rows = torch.arange(pk.Nq, device=dev)
    t = rows % pk.TQ + (pk.TK - pk.TQ)
    first_blk = (rows // pk.TQ) * nb
    return t, first_blk, pk.geo.dummy, pk.geo.dummy, pk.B * nb


def reverse_index(pk, seg: int) -> dict:
    """
    CSR over (KV head, KV block) of the query rows that selected the block (each row listed once, ascending), and
    the work items: one per `seg` consecutive entries of a list. Memory O(Nq * HKV * n); no device sync.
    """
    dev = pk.q.device
    HKV, n, L = pk.HKV, pk.n, pk.L
    t, first_blk, blk_doc, blk_off, nsb = pk.geo.table(("reverse", L), lambda: _query_positions(pk))
    idx = pk.idx.long()  # [Nq, HKV, n]
    if n > 1:  # sorted rows make repeated blocks neighbours (any order is accepted)
        idx = idx.sort(dim=-1).values
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
        blk_off=blk_off, pos=pos, nsb=nsb, nbuckets=nbuckets, num_items=num_items, order=order,
        valid=valid.flatten(),
    )


def segment_rows(pk) -> int:
    """Query positions per dK/dV (and key-centric forward) segment: `rows` (positions x heads) over the group."""
    return max(1, pk.segment_rows // pk.G)


def by_block_forward(pk, compile_only: bool = False):
    """
    Key-centric forward: (fp32 output `[Nq, HQ, DV]`, lse `[Nq, HQ]`); see `selected.selected_attention_fwd`. With
    `compile_only` both passes' configurations are compiled for these inputs' signature, not run (None).
    """
    dev = pk.q.device
    oacc = torch.zeros(pk.Nq, pk.HQ, pk.DV, dtype=torch.float32, device=dev)
    if pk.n == 0 or pk.Nk == 0:
        return oacc, torch.full((pk.Nq, pk.HQ), float("-inf"), device=dev)
    seg = segment_rows(pk)
    rev = reverse_index(pk, seg)
    entries = pk.Nq * pk.HKV * pk.n
    lse_entry = torch.empty(entries * pk.G, dtype=torch.float32, device=dev)  # log2 units, per (sorted entry, head)
    lse = torch.empty(pk.Nq, pk.HQ, dtype=torch.float32, device=dev)

    def launch(pass_):
        grid = (rev["num_items"],)
        kernel = _fwd_by_block_kernel[grid]
        if compile_only:
            kernel = functools.partial(_fwd_by_block_kernel.warmup, grid=grid)
        launched = kernel(
            pk.q, pk.k, pk.v, lse_entry, lse, oacc, pk.cu_q, pk.cu_k,
            rev["item_bucket"], rev["item_seg"], rev["bucket_off"], rev["blk_doc"], rev["blk_off"], rev["pos"],
            pk.q.stride(0), pk.q.stride(1), pk.k.stride(0), pk.k.stride(1), pk.v.stride(0), pk.v.stride(1),
            pk.TQ, pk.TK, rev["nsb"], rev["nbuckets"], seg, pk.scale * LOG2E,
            HKV=pk.HKV, G=pk.G, L=pk.L, DK=pk.DK, DV=pk.DV, BK1=pk.BK1, BK2=pk.BK2, BV=pk.BV,
            BN=key_tile(pk.L), PASS=pass_, VARLEN=pk.varlen, PREC=pk.prec,
        )
        if compile_only:
            load_compiled(launched)

    launch(0)
    if compile_only:
        launch(1)
        return None
    # back from sorted entries to (query, KV head, slot), then the log-sum-exp over each query's blocks
    order = rev["order"]
    rank = torch.empty_like(order)
    rank[order] = torch.arange(entries, device=dev, dtype=order.dtype)
    per_slot = lse_entry.view(entries, pk.G)[rank].view(pk.Nq, pk.HKV, pk.n, pk.G)
    per_slot = per_slot.masked_fill(~rev["valid"].view(pk.Nq, pk.HKV, pk.n, 1), float("-inf"))
    lse.copy_(torch.logsumexp(per_slot * 0.6931471805599453, dim=2).reshape(pk.Nq, pk.HQ))
    launch(1)
    return oacc, lse


def dkdv(pk, do, lse, delta, dka, dva, dqa, fused: bool) -> None:
    """
    dK/dV over the reverse index into the fp32 accumulators dka, dva `[Nk, HKV, D*]` (zeroed), and with `fused` dQ
    into dqa `[Nq, HQ, DK]` (zeroed). do `[Nq, HQ, DV]`, lse and delta float32 `[Nq, HQ]`.
    """
    seg = segment_rows(pk)
    rev = reverse_index(pk, seg)
    BN = key_tile(pk.L)
    _dkdv_kernel[(rev["num_items"], triton.cdiv(pk.L, BN))](
        pk.q, pk.k, pk.v, do, lse, delta, dka, dva, dqa, pk.cu_q, pk.cu_k,
        rev["item_bucket"], rev["item_seg"], rev["bucket_off"], rev["blk_doc"], rev["blk_off"], rev["pos"],
        pk.q.stride(0), pk.q.stride(1), pk.k.stride(0), pk.k.stride(1), pk.v.stride(0), pk.v.stride(1),
        do.stride(0), do.stride(1),
        pk.TQ, pk.TK, rev["nsb"], rev["nbuckets"], seg, pk.scale * LOG2E, pk.scale,
        HKV=pk.HKV, G=pk.G, L=pk.L, DK=pk.DK, DV=pk.DV, BK1=pk.BK1, BK2=pk.BK2, BV=pk.BV,
        BN=BN, FUSE_DQ=fused, VARLEN=pk.varlen, PREC=pk.prec,
    )
