"""
Triton selected-block attention (nsa_hf.kernels.selected) against the PyTorch reference.

CPU: the kernels run in Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1) in float32 on small shapes,
outputs and gradients compared tightly. GPU (`-m gpu`): bfloat16 at the paper's shapes, relative error < 1e-2 against
the float32 reference.
"""

import math

import pytest
import torch

from nsa_hf.kernels._geometry import geometry
from nsa_hf.kernels._tiling import device_limits, override, tuning
from nsa_hf.kernels.reference import (
    compressed_attention_ref,
    select_blocks_ref,
    selected_attention_ref,
    selection_scores_ref,
)
from nsa_hf.kernels import _tiling, selected_tiles
from nsa_hf.kernels.selected import (
    forward_regimes,
    selected_attention,
    selected_attention_bwd,
    selected_attention_fwd,
)
from nsa_hf.kernels.utils import unfold_compression_blocks

ATOL = 1e-4
RTOL = 1e-4


# ----------------------------------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------------------------------


def reference_selection(q, k, compress_block_size, compress_stride, select_block_size, num_selected):
    """Block indices as NSA computes them: mean-pooled compressed keys -> cmp attention -> block scores -> top-n."""
    l, d, lp = compress_block_size, compress_stride, select_block_size
    Tk = k.shape[1]
    with torch.no_grad():
        k_cmp = unfold_compression_blocks(k.float(), l, d).mean(2)
        _, lse = compressed_attention_ref(q.float(), k_cmp, k_cmp, l, d, num_keys=Tk)
        scores = selection_scores_ref(q.float(), k_cmp, lse, l, d, lp, num_keys=Tk)
        return select_blocks_ref(scores, lp, num_selected, num_keys=Tk)


def reference_selection_varlen(q, k, cu_q, cu_k, l, d, lp, n):
    bq, bk = cu_q.tolist(), cu_k.tolist()
    parts = [
        reference_selection(q[:, bq[i] : bq[i + 1]], k[:, bk[i] : bk[i + 1]], l, d, lp, n) for i in range(len(bq) - 1)
    ]
    return torch.cat(parts, dim=1)


def random_indices(B, Tq, Tk, HKV, n, lp, gen, allow_empty=True, device="cpu"):
    """Random valid selections: ascending, distinct, eligible (j*l' <= t), a random count per row, -1 padded."""
    NS = max(1, math.ceil(Tk / lp))
    t = torch.arange(Tk - Tq, Tk)
    eligible = (torch.arange(NS)[None, :] <= (t // lp)[:, None]) & (t[:, None] >= 0)  # [Tq, NS]
    r = torch.rand(B, Tq, HKV, NS, generator=gen).masked_fill(~eligible[None, :, None, :], -1.0)
    order = r.argsort(dim=-1, descending=True)[..., :n]
    picked = torch.gather(r, -1, order) >= 0
    low = 0 if allow_empty else 1
    count = torch.randint(low, n + 1, (B, Tq, HKV, 1), generator=gen)
    keep = picked & (torch.arange(order.shape[-1])[None, None, None, :] < count)
    big = NS + 1
    idx = torch.where(keep, order, torch.full_like(order, big)).sort(dim=-1).values
    idx = torch.where(idx == big, torch.full_like(idx, -1), idx)
    if idx.shape[-1] < n:
        idx = torch.cat([idx, idx.new_full((*idx.shape[:3], n - idx.shape[-1]), -1)], dim=-1)
    return idx.to(torch.int32).to(device)


def make_qkv(B, Tq, Tk, HQ, HKV, DK, DV, gen, device="cpu", dtype=torch.float32):
    q = torch.randn(B, Tq, HQ, DK, generator=gen).to(device=device, dtype=dtype)
    k = torch.randn(B, Tk, HKV, DK, generator=gen).to(device=device, dtype=dtype)
    v = torch.randn(B, Tk, HKV, DV, generator=gen).to(device=device, dtype=dtype)
    return q, k, v


def fwd(q, k, v, idx, lp, scale=None, cu_q=None, cu_k=None):
    """The forward launcher on the call's geometry, as `selected_attention` runs it."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    return selected_attention_fwd(q, k, v, idx, lp, scale, geometry(q, k.shape[1], cu_q, cu_k))


def bwd(do, q, k, v, o, lse, idx, lp, scale=None):
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    return selected_attention_bwd(do, q, k, v, o, lse, idx, lp, scale, geometry(q, k.shape[1]))


def run_both(q, k, v, idx, lp, scale=None, cu_q=None, cu_k=None, gen=None, **kw):
    """(out, dq, dk, dv) of the Triton kernel and of the reference for the same upstream gradient."""
    results = []
    do = None
    for fn in (selected_attention, selected_attention_ref):
        qq, kk, vv = (x.detach().clone().requires_grad_(True) for x in (q, k, v))
        o = fn(qq, kk, vv, idx, lp, scale=scale, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, **kw)
        if do is None:
            do = torch.randn(o.shape, generator=gen).to(o)
        o.backward(do)
        results.append((o.detach(), qq.grad, kk.grad, vv.grad))
    return results


def assert_matches(q, k, v, idx, lp, scale=None, cu_q=None, cu_k=None, gen=None):
    mine, ref = run_both(q, k, v, idx, lp, scale=scale, cu_q=cu_q, cu_k=cu_k, gen=gen)
    for name, a, b in zip(("out", "dq", "dk", "dv"), mine, ref):
        assert a.shape == b.shape and a.dtype == b.dtype, name
        assert torch.isfinite(a).all(), name
        torch.testing.assert_close(a, b, atol=ATOL, rtol=RTOL, msg=lambda m: f"{name}: {m}")


def reference_lse(q, k, idx, lp, scale):
    """Log-sum-exp over the allowed keys, built densely (small shapes only)."""
    B, Tq, HQ, _ = q.shape
    Tk, HKV = k.shape[1], k.shape[2]
    G = HQ // HKV
    t = torch.arange(Tk - Tq, Tk)
    s = torch.arange(Tk)
    NS = math.ceil(Tk / lp)
    chosen = torch.zeros(B, Tq, HKV, NS + 1, dtype=torch.bool)
    chosen.scatter_(-1, torch.where(idx.long() < 0, NS, idx.long()), True)
    allowed = chosen[..., :NS][..., s // lp] & (s[None, :] <= t[:, None])[None, :, None, :]  # [B, Tq, HKV, Tk]
    allowed = allowed.repeat_interleave(G, dim=2)  # [B, Tq, HQ, Tk]
    logits = torch.einsum("bthd,bshd->bths", q.float(), k.float().repeat_interleave(G, dim=2)) * scale
    return torch.logsumexp(logits.masked_fill(~allowed, float("-inf")), dim=-1)


# ----------------------------------------------------------------------------------------------------------------------
# CPU (interpreter), float32
# ----------------------------------------------------------------------------------------------------------------------

# (B, T, HQ, HKV, DK, DV, l', n, l, d)
REFERENCE_CASES = [
    (1, 45, 2, 2, 16, 16, 16, 3, 8, 4),  # G=1, length not a multiple of l'
    (2, 64, 4, 2, 32, 16, 16, 4, 8, 4),  # G=2, batch 2, DK != DV
    (1, 37, 4, 1, 16, 32, 16, 3, 8, 8),  # G=4, DV > DK
    (1, 50, 7, 1, 16, 16, 16, 3, 8, 4),  # G=7 (tiles straddle positions)
    (1, 33, 16, 1, 16, 16, 16, 3, 8, 4),  # G=16, one position per tile
    (1, 10, 4, 2, 16, 16, 16, 2, 8, 4),  # shorter than one block
    (1, 1, 4, 2, 16, 16, 16, 2, 8, 4),  # a single token
    (1, 70, 4, 1, 24, 16, 32, 3, 16, 8),  # l'=32, DK=24 (padded head dim)
    (1, 50, 2, 1, 48, 32, 24, 3, 8, 8),  # l'=24 (not a power of two), DK=48 = 32 + 16 split
]


@pytest.mark.parametrize("B,T,HQ,HKV,DK,DV,lp,n,l,d", REFERENCE_CASES)
def test_matches_reference_with_reference_selection(B, T, HQ, HKV, DK, DV, lp, n, l, d):
    gen = torch.Generator().manual_seed(B * 1000 + T * 10 + HQ)
    q, k, v = make_qkv(B, T, T, HQ, HKV, DK, DV, gen)
    idx = reference_selection(q, k, l, d, lp, n)
    assert_matches(q, k, v, idx, lp, gen=gen)


# (B, Tq, Tk, HQ, HKV, DK, DV, l', n)
RANDOM_CASES = [
    (1, 60, 60, 2, 2, 16, 16, 16, 3),  # G=1
    (2, 41, 41, 4, 2, 16, 32, 16, 4),  # G=2, batch
    (1, 77, 77, 8, 2, 32, 16, 16, 5),  # G=4
    (1, 48, 48, 7, 1, 16, 16, 16, 3),  # G=7
    (1, 40, 40, 16, 1, 16, 16, 16, 3),  # G=16
    (1, 20, 90, 4, 1, 16, 16, 16, 4),  # queries are the last 20 of 90 keys
    (1, 9, 9, 4, 2, 16, 16, 16, 2),  # shorter than one block
]


@pytest.mark.parametrize("B,Tq,Tk,HQ,HKV,DK,DV,lp,n", RANDOM_CASES)
def test_matches_reference_with_random_indices(B, Tq, Tk, HQ, HKV, DK, DV, lp, n):
    """Random valid index sets with -1 padding, including rows that select nothing (zero output)."""
    gen = torch.Generator().manual_seed(Tq * 100 + Tk + HQ)
    q, k, v = make_qkv(B, Tq, Tk, HQ, HKV, DK, DV, gen)
    idx = random_indices(B, Tq, Tk, HKV, n, lp, gen)
    assert (idx < 0).any()
    assert_matches(q, k, v, idx, lp, gen=gen)


def test_varlen_three_documents_reference_selection():
    gen = torch.Generator().manual_seed(7)
    lengths = [37, 5, 60]  # the middle document is shorter than a block and than a compression block
    cu = torch.tensor([0, 37, 42, 102], dtype=torch.int32)
    HQ, HKV, DK, DV, lp, n = 4, 2, 16, 32, 16, 3
    q, k, v = make_qkv(1, sum(lengths), sum(lengths), HQ, HKV, DK, DV, gen)
    idx = reference_selection_varlen(q, k, cu, cu, 8, 4, lp, n)
    assert_matches(q, k, v, idx, lp, cu_q=cu, cu_k=cu, gen=gen)


def test_varlen_queries_shorter_than_keys_random_indices():
    """Packed chunked prefill: each document's queries are its last few positions; one document has no queries."""
    gen = torch.Generator().manual_seed(8)
    lq, lk = [3, 0, 17], [40, 5, 77]
    cu_q = torch.tensor([0, 3, 3, 20], dtype=torch.int32)
    cu_k = torch.tensor([0, 40, 45, 122], dtype=torch.int32)
    HQ, HKV, DK, DV, lp, n = 7, 1, 16, 16, 16, 4
    q = torch.randn(1, sum(lq), HQ, DK, generator=gen)
    k = torch.randn(1, sum(lk), HKV, DK, generator=gen)
    v = torch.randn(1, sum(lk), HKV, DV, generator=gen)
    idx = torch.cat([random_indices(1, a, b, HKV, n, lp, gen) for a, b in zip(lq, lk)], dim=1)
    assert_matches(q, k, v, idx, lp, cu_q=cu_q, cu_k=cu_k, gen=gen)


def test_decoding_single_query():
    gen = torch.Generator().manual_seed(9)
    HQ, HKV, DK, DV, lp, n, Tk = 8, 2, 32, 16, 16, 4, 90
    q, k, v = make_qkv(2, 1, Tk, HQ, HKV, DK, DV, gen)
    idx = reference_selection(q, k, 8, 4, lp, n)
    assert (idx[..., -1] >= 0).all()  # 6 eligible blocks: all 4 slots used
    assert_matches(q, k, v, idx, lp, gen=gen)


def test_decoding_varlen_one_query_per_document():
    gen = torch.Generator().manual_seed(10)
    lk = [33, 70, 2]
    cu_q = torch.tensor([0, 1, 2, 3], dtype=torch.int32)
    cu_k = torch.tensor([0, 33, 103, 105], dtype=torch.int32)
    HQ, HKV, DK, DV, lp, n = 4, 1, 16, 16, 16, 3
    q = torch.randn(1, 3, HQ, DK, generator=gen)
    k = torch.randn(1, sum(lk), HKV, DK, generator=gen)
    v = torch.randn(1, sum(lk), HKV, DV, generator=gen)
    idx = reference_selection_varlen(q, k, cu_q, cu_k, 8, 4, lp, n)
    assert_matches(q, k, v, idx, lp, cu_q=cu_q, cu_k=cu_k, gen=gen)


def check_fwd_bwd(q, k, v, idx, lp, gen, block_m=None, dq_mode=None):
    with override(selected_block_m=block_m, selected_dq=dq_mode):
        o, lse = fwd(q, k, v, idx, lp)
        torch.testing.assert_close(o, selected_attention_ref(q, k, v, idx, lp), atol=ATOL, rtol=RTOL)
        do = torch.randn(o.shape, generator=gen)
        grads = bwd(do, q, k, v, o, lse, idx, lp)
    qq, kk, vv = (x.clone().requires_grad_(True) for x in (q, k, v))
    selected_attention_ref(qq, kk, vv, idx, lp).backward(do)
    for name, a, b in zip(("dq", "dk", "dv"), grads, (qq.grad, kk.grad, vv.grad)):
        torch.testing.assert_close(a, b, atol=ATOL, rtol=RTOL, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("dq_mode", ["fused", "tiled"])
@pytest.mark.parametrize("block_m", [16, 32, 64, 128])
def test_tile_sizes_agree(block_m, dq_mode):
    """Every query-tile height (positions x heads per tile) gives the reference result, fwd and both dQ modes."""
    gen = torch.Generator().manual_seed(11)
    HQ, HKV, DK, DV, lp, n, T = 6, 2, 16, 16, 16, 3, 53  # G=3: tiles straddle positions for every block_m
    q, k, v = make_qkv(1, T, T, HQ, HKV, DK, DV, gen)
    idx = random_indices(1, T, T, HKV, n, lp, gen, allow_empty=False)
    check_fwd_bwd(q, k, v, idx, lp, gen, block_m=block_m, dq_mode=dq_mode)


@pytest.mark.parametrize("dq_mode", ["fused", "tiled"])
@pytest.mark.parametrize("G,block_m", [(16, 16), (32, 16), (32, 32)])
def test_one_position_tiles(G, block_m, dq_mode):
    """
    Tiles inside one position walk its own list (no union table): -1 slots, blocks past the causal limit, repeated
    and unsorted entries must still count each eligible block once.
    """
    gen = torch.Generator().manual_seed(14)
    HKV, DK, DV, lp, n, T = 1, 16, 16, 8, 4, 37
    q, k, v = make_qkv(1, T, T, G * HKV, HKV, DK, DV, gen)
    idx = random_indices(1, T, T, HKV, n, lp, gen)
    idx[0, 20, 0] = torch.tensor([2, -1, 0, 2], dtype=torch.int32)  # unsorted, with a repeat
    idx[0, 5, 0] = torch.tensor([0, 3, 4, 0], dtype=torch.int32)  # blocks 3, 4 start after position 5
    assert G % block_m == 0  # every tile sits inside one position
    check_fwd_bwd(q, k, v, idx, lp, gen, block_m=block_m, dq_mode=dq_mode)


def test_dkdv_split_into_segments():
    """Long reverse lists (block 0 is chosen by every query) split into segments that combine with atomic adds."""
    gen = torch.Generator().manual_seed(12)
    q, k, v = make_qkv(1, 70, 70, 4, 2, 16, 16, gen)
    idx = reference_selection(q, k, 8, 4, 16, 3)
    assert (idx[..., 0] == 0).all()
    with override(selected_segment_rows=16):
        assert_matches(q, k, v, idx, 16, gen=gen)


def test_lse_and_empty_rows():
    gen = torch.Generator().manual_seed(13)
    HQ, HKV, DK, DV, lp, n, T = 4, 2, 16, 16, 16, 3, 40
    q, k, v = make_qkv(1, T, T, HQ, HKV, DK, DV, gen)
    idx = random_indices(1, T, T, HKV, n, lp, gen)
    idx[0, 5, 1] = -1  # query 5, KV head 1 (query heads 2, 3): sees nothing
    idx[0, 30, 0, :] = torch.tensor([2, -1, -1], dtype=torch.int32)  # a block after t=30: nothing visible either
    scale = 0.3
    o, lse = fwd(q, k, v, idx, lp, scale=scale)
    torch.testing.assert_close(lse, reference_lse(q, k, idx, lp, scale), atol=ATOL, rtol=RTOL)
    assert torch.isneginf(lse[0, 5, 2:]).all() and torch.isneginf(lse[0, 30, :2]).all()
    assert (o[0, 5, 2:] == 0).all() and (o[0, 30, :2] == 0).all()
    assert_matches(q, k, v, idx, lp, scale=scale, gen=gen)
    grads = run_both(q, k, v, idx, lp, scale=scale, gen=gen)[0]
    assert (grads[1][0, 5, 2:] == 0).all()


def test_non_contiguous_inputs():
    """q/k/v as strided views of one fused projection (no copies needed), and int64 indices."""
    gen = torch.Generator().manual_seed(14)
    T, HQ, HKV, D, lp, n = 45, 4, 2, 16, 16, 3
    qkv = torch.randn(1, T, HQ + 2 * HKV, D, generator=gen)
    q, k, v = qkv[:, :, :HQ], qkv[:, :, HQ : HQ + HKV], qkv[:, :, HQ + HKV :]
    assert not q.is_contiguous()
    idx = reference_selection(q, k, 8, 4, lp, n).long()
    assert_matches(q, k, v, idx, lp, gen=gen)


def test_no_selected_slots():
    gen = torch.Generator().manual_seed(15)
    q, k, v = make_qkv(1, 20, 20, 4, 2, 16, 16, gen)
    idx = torch.empty(1, 20, 2, 0, dtype=torch.int32)
    assert_matches(q, k, v, idx, 16, gen=gen)
    assert (selected_attention(q, k, v, idx, 16) == 0).all()


def test_bad_inputs_raise_clear_errors():
    q, k, v = make_qkv(1, 8, 8, 4, 2, 16, 16, torch.Generator().manual_seed(0))
    idx = torch.zeros(1, 8, 2, 2, dtype=torch.int32)
    with pytest.raises(ValueError, match="multiple of key/value heads"):
        selected_attention(q, k[:, :, :1].repeat(1, 1, 3, 1), v[:, :, :1].repeat(1, 1, 3, 1), idx, 16)
    with pytest.raises(ValueError, match="block_indices must have shape"):
        selected_attention(q, k, v, idx[:, :4], 16)
    with pytest.raises(ValueError, match="integer tensor"):
        selected_attention(q, k, v, idx.float(), 16)
    with pytest.raises(ValueError, match="select_block_size"):
        selected_attention(q, k, v, idx, 0)
    with pytest.raises(ValueError, match="head dims differ"):
        selected_attention(q, k[..., :8], v, idx, 16)
    with pytest.raises(ValueError, match="both"):
        selected_attention(q, k, v, idx, 16, cu_seqlens_q=torch.tensor([0, 8], dtype=torch.int32))
    with pytest.raises(ValueError, match="batch size must be 1"):
        cu = torch.tensor([0, 8], dtype=torch.int32)
        selected_attention(q.repeat(2, 1, 1, 1), k.repeat(2, 1, 1, 1), v.repeat(2, 1, 1, 1), idx.repeat(2, 1, 1, 1), 16,
                           cu_seqlens_q=cu, cu_seqlens_k=cu)
    with pytest.raises(ValueError, match="block_m"):
        with override(selected_block_m=48):
            pass
    with pytest.raises(ValueError, match="more queries"):
        selected_attention(q, k[:, :4], v[:, :4], idx, 16)
    with pytest.raises(ValueError, match="share one of"):
        selected_attention(q.double(), k.double(), v.double(), idx, 16)


# ----------------------------------------------------------------------------------------------------------------------
# GPU, bfloat16, realistic shapes
# ----------------------------------------------------------------------------------------------------------------------


def rel_err(x, ref):
    return ((x.float() - ref.float()).norm() / ref.float().norm().clamp_min(1e-12)).item()


def reference_grads_chunked(q, k, v, idx, lp, do, chunk=1024):
    """
    float32 reference output and grads, queries in chunks so that T=8192 fits in memory: the queries [s, e) of a
    causal sequence are the last e - s queries of the keys [0, e), which is the reference's bottom-right alignment.
    """
    qf, kf, vf = (x.detach().float().requires_grad_(True) for x in (q, k, v))
    outs = []
    T = q.shape[1]
    for s in range(0, T, chunk):
        e = min(T, s + chunk)
        o = selected_attention_ref(qf[:, s:e], kf[:, :e], vf[:, :e], idx[:, s:e], lp)
        o.backward(do[:, s:e].float())
        outs.append(o.detach())
        del o
    return torch.cat(outs, dim=1), qf.grad, kf.grad, vf.grad


def check_gpu(q, k, v, idx, lp, chunk=1024, tol=1e-2):
    qq, kk, vv = (x.detach().clone().requires_grad_(True) for x in (q, k, v))
    o = selected_attention(qq, kk, vv, idx, lp)
    do = torch.randn_like(o)
    o.backward(do)
    ref = reference_grads_chunked(q, k, v, idx, lp, do, chunk)
    for name, a, b in zip(("out", "dq", "dk", "dv"), (o, qq.grad, kk.grad, vv.grad), ref):
        assert a.dtype == q.dtype and torch.isfinite(a).all(), name
        err = rel_err(a, b)
        assert err < tol, f"{name}: relative error {err:.3e}"


@pytest.mark.gpu
@pytest.mark.parametrize("T", [4096, 8192])
@pytest.mark.parametrize("HQ,HKV,DK,DV", [(64, 4, 128, 128), (32, 8, 128, 128), (64, 4, 192, 128)])
def test_gpu_paper_shapes_bf16(T, HQ, HKV, DK, DV):
    gen = torch.Generator().manual_seed(T + HQ + DK)
    q, k, v = make_qkv(1, T, T, HQ, HKV, DK, DV, gen, device="cuda", dtype=torch.bfloat16)
    idx = reference_selection(q, k, 32, 16, 64, 16)
    check_gpu(q, k, v, idx, 64)


@pytest.mark.gpu
@pytest.mark.parametrize("HQ,HKV", [(64, 4), (32, 8)])
def test_gpu_dq_modes_bf16(HQ, HKV):
    """Both dQ strategies (fused atomics in the dK/dV pass, separate tiled pass) match the reference."""
    gen = torch.Generator().manual_seed(HQ)
    T = 4096
    q, k, v = make_qkv(1, T, T, HQ, HKV, 128, 128, gen, device="cuda", dtype=torch.bfloat16)
    idx = reference_selection(q, k, 32, 16, 64, 16)
    o, lse = fwd(q, k, v, idx, 64)
    do = torch.randn_like(o)
    ref = reference_grads_chunked(q, k, v, idx, 64, do, 1024)
    assert rel_err(o, ref[0]) < 1e-2
    for mode in ("fused", "tiled"):
        with override(selected_dq=mode):
            grads = bwd(do, q, k, v, o, lse, idx, 64)
        for name, a, b in zip(("dq", "dk", "dv"), grads, ref[1:]):
            assert rel_err(a, b) < 1e-2, f"{mode} {name}"


@pytest.mark.gpu
@pytest.mark.parametrize("HQ,HKV", [(64, 4), (32, 8)])
def test_gpu_long_context_bf16(HQ, HKV):
    """
    From 32k keys the forward takes 16-row tiles for G=16 (one position) and the key-centric forward for G=4
    (`default_fwd_mode`; the 16-row tiles with a union of 4 positions under `override(selected_fwd="tiled")`). Output
    and dQ of the last 512 queries (which depend only on those queries' dO) against the reference.
    """
    gen = torch.Generator().manual_seed(HQ + 1)
    T, lp, tail = 32768, 64, 512
    q, k, v = make_qkv(1, T, T, HQ, HKV, 128, 128, gen, device="cuda", dtype=torch.bfloat16)
    idx = random_indices(1, T, T, HKV, 16, lp, gen, allow_empty=False, device="cuda")
    assert selected_tiles.tile_rows(HQ // HKV, T, tuning(device_limits(q.device))) == 16
    qq = q.detach().clone().requires_grad_(True)
    o = selected_attention(qq, k, v, idx, lp)
    do = torch.randn_like(o)
    o.backward(do)
    qf = q[:, -tail:].detach().float().requires_grad_(True)
    o_ref = selected_attention_ref(qf, k.float(), v.float(), idx[:, -tail:], lp)
    o_ref.backward(do[:, -tail:].float())
    assert rel_err(o[:, -tail:], o_ref) < 1e-2
    assert rel_err(qq.grad[:, -tail:], qf.grad) < 1e-2


def test_forward_regimes_are_the_short_and_the_long_context_kernels():
    rules = tuning(device_limits(None))
    assert forward_regimes(4, rules) == {("tiled", 64), ("by_block", None)}
    assert forward_regimes(16, rules) == {("tiled", 64), ("tiled", 16)}
    assert forward_regimes(8, rules) == {("tiled", 64), ("tiled", 16)}
    assert forward_regimes(1, rules) == {("tiled", 32)}  # one regime: nothing to compile ahead
    with override(selected_fwd="by_block"):
        assert forward_regimes(16, rules) == {("by_block", None)}


@pytest.mark.gpu
@pytest.mark.parametrize("HQ,HKV", [(32, 8), (64, 4)])
def test_gpu_first_document_past_the_long_context_boundary_compiles_nothing(monkeypatch, HQ, HKV):
    """
    The first call compiles and loads the long-context regime's kernels ahead (`selected.compile_ahead`), so the
    first document past the boundary (lowered here to 4096 keys) neither compiles a kernel nor loads one (a load
    builds the launcher of a new signature: ~0.35 s), it only times their configurations.
    """
    import dataclasses

    import triton

    rules = tuning(device_limits(torch.device("cuda")))
    low = dataclasses.replace(rules, selected_long_context=4096, selected_by_block_keys=4096)
    monkeypatch.setitem(_tiling.TUNING, (9, 0), low)
    gen = torch.Generator().manual_seed(HQ + 11)

    def call(T):  # 12 selected blocks, which no other test uses: a kernel signature of its own
        q, k, v = make_qkv(1, T, T, HQ, HKV, 128, 128, gen, device="cuda", dtype=torch.bfloat16)
        idx = random_indices(1, T, T, HKV, 12, 64, gen, allow_empty=False, device="cuda")
        return q, k, v, idx, fwd(q, k, v, idx, 64)[0]

    call(2048)
    compiled, loaded = [], []
    triton.knobs.runtime.jit_post_compile_hook = lambda *a, **kw: compiled.append(getattr(kw.get("fn"), "name", "?"))
    triton.knobs.runtime.kernel_load_start_hook = lambda module, function, name, *a: loaded.append(name)
    try:
        q, k, v, idx, o = call(5000)
    finally:
        triton.knobs.runtime.jit_post_compile_hook = None
        triton.knobs.runtime.kernel_load_start_hook = None
    assert compiled == [] and loaded == []
    ref = selected_attention_ref(q[:, -256:].float(), k.float(), v.float(), idx[:, -256:], 64)
    assert rel_err(o[:, -256:], ref) < 1e-2


@pytest.mark.gpu
@pytest.mark.parametrize("HQ,HKV", [(64, 4), (32, 8), (14, 2)])
def test_gpu_forward_by_block_bf16(HQ, HKV):
    gen = torch.Generator().manual_seed(HQ + 5)
    T = 4096
    q, k, v = make_qkv(1, T, T, HQ, HKV, 128, 128, gen, device="cuda", dtype=torch.bfloat16)
    idx = reference_selection(q, k, 32, 16, 64, 16)
    with override(selected_fwd="by_block"):
        o, lse = fwd(q, k, v, idx, 64)
    with override(selected_fwd="tiled"):
        o_tiled, lse_tiled = fwd(q, k, v, idx, 64)
    ref = reference_grads_chunked(q, k, v, idx, 64, torch.zeros_like(o), 1024)[0]
    assert rel_err(o, ref) < 1e-2
    torch.testing.assert_close(lse, lse_tiled, atol=2e-2, rtol=0)


@pytest.mark.gpu
@pytest.mark.parametrize("G", [1, 2, 7])
def test_gpu_small_groups_bf16(G):
    gen = torch.Generator().manual_seed(G)
    HKV = 2
    q, k, v = make_qkv(2, 2048, 2048, G * HKV, HKV, 128, 128, gen, device="cuda", dtype=torch.bfloat16)
    idx = reference_selection(q, k, 32, 16, 64, 16)
    check_gpu(q, k, v, idx, 64)


@pytest.mark.gpu
@pytest.mark.parametrize("lp", [32, 128])
def test_gpu_block_sizes_bf16(lp):
    gen = torch.Generator().manual_seed(lp)
    q, k, v = make_qkv(1, 3000, 3000, 32, 2, 128, 128, gen, device="cuda", dtype=torch.bfloat16)
    idx = random_indices(1, 3000, 3000, 2, 16, lp, gen, allow_empty=False, device="cuda")
    check_gpu(q, k, v, idx, lp)


@pytest.mark.gpu
def test_gpu_varlen_bf16():
    gen = torch.Generator().manual_seed(21)
    lengths = [3000, 17, 1500, 64]
    cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32, device="cuda")
    HQ, HKV, D = 32, 2, 128
    q, k, v = make_qkv(1, sum(lengths), sum(lengths), HQ, HKV, D, D, gen, device="cuda", dtype=torch.bfloat16)
    idx = reference_selection_varlen(q, k, cu, cu, 32, 16, 64, 16)
    qq, kk, vv = (x.detach().clone().requires_grad_(True) for x in (q, k, v))
    o = selected_attention(qq, kk, vv, idx, 64, cu_seqlens_q=cu, cu_seqlens_k=cu)
    do = torch.randn_like(o)
    o.backward(do)
    qf, kf, vf = (x.detach().float().requires_grad_(True) for x in (q, k, v))
    o_ref = selected_attention_ref(qf, kf, vf, idx, 64, cu_seqlens_q=cu, cu_seqlens_k=cu)
    o_ref.backward(do.float())
    for name, a, b in zip(("out", "dq", "dk", "dv"), (o, qq.grad, kk.grad, vv.grad), (o_ref, qf.grad, kf.grad, vf.grad)):
        assert rel_err(a, b) < 1e-2, name


@pytest.mark.gpu
def test_gpu_decoding_bf16():
    gen = torch.Generator().manual_seed(22)
    Tk, HQ, HKV, D = 8192, 64, 4, 128
    q, k, v = make_qkv(4, 1, Tk, HQ, HKV, D, D, gen, device="cuda", dtype=torch.bfloat16)
    idx = reference_selection(q, k, 32, 16, 64, 16)
    o = selected_attention(q, k, v, idx, 64)
    ref = selected_attention_ref(q.float(), k.float(), v.float(), idx, 64)
    assert rel_err(o, ref) < 1e-2


@pytest.mark.gpu
def test_gpu_float16_and_lse():
    gen = torch.Generator().manual_seed(23)
    q, k, v = make_qkv(1, 2048, 2048, 16, 1, 64, 64, gen, device="cuda", dtype=torch.float16)
    idx = reference_selection(q, k, 32, 16, 64, 8)
    check_gpu(q, k, v, idx, 64)
    _, lse = fwd(q, k, v, idx, 64)
    ref = reference_lse(q[:, -64:].cpu(), k.cpu(), idx[:, -64:].cpu(), 64, 64 ** -0.5)
    assert rel_err(lse[:, -64:].cpu(), ref) < 1e-3


# (B, Tq, Tk, HQ, HKV, DK, DV, l', n): G = 1 / 3 / 4 / 16, decoding-like Tq < Tk, l' above the 64-key tile
BY_BLOCK_CASES = [
    (1, 45, 45, 2, 2, 16, 16, 16, 3),
    (2, 37, 37, 6, 2, 16, 32, 8, 4),
    (1, 30, 70, 4, 1, 32, 16, 16, 3),
    (1, 40, 40, 16, 1, 16, 16, 16, 2),
    (1, 150, 150, 2, 1, 16, 16, 128, 2),
]


@pytest.mark.parametrize("B,Tq,Tk,HQ,HKV,DK,DV,lp,n", BY_BLOCK_CASES)
def test_forward_by_block_matches_reference(B, Tq, Tk, HQ, HKV, DK, DV, lp, n):
    """The key-centric forward (log-sum-exp pass, then P V with atomics) gives the reference output and lse."""
    gen = torch.Generator().manual_seed(Tq + HQ)
    q, k, v = make_qkv(B, Tq, Tk, HQ, HKV, DK, DV, gen)
    idx = random_indices(B, Tq, Tk, HKV, n, lp, gen)  # includes rows with no block at all
    idx[0, -1, 0, :2] = idx[0, -1, 0, :1]  # a repeated block counts once
    with override(selected_fwd="by_block"):
        o, lse = fwd(q, k, v, idx, lp)
    torch.testing.assert_close(o, selected_attention_ref(q, k, v, idx, lp), atol=ATOL, rtol=RTOL)
    scale = DK ** -0.5
    torch.testing.assert_close(lse, reference_lse(q, k, idx, lp, scale), atol=ATOL, rtol=RTOL)


def test_forward_by_block_varlen():
    gen = torch.Generator().manual_seed(31)
    lengths = [50, 7, 81]
    cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32)
    q, k, v = make_qkv(1, sum(lengths), sum(lengths), 8, 2, 16, 16, gen)
    idx = reference_selection_varlen(q, k, cu, cu, 8, 4, 16, 3)
    with override(selected_fwd="by_block"):
        o, lse = fwd(q, k, v, idx, 16, cu_q=cu, cu_k=cu)
    with override(selected_fwd="tiled"):
        o_ref, lse_ref = fwd(q, k, v, idx, 16, cu_q=cu, cu_k=cu)
    torch.testing.assert_close(o, o_ref, atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(lse, lse_ref, atol=ATOL, rtol=RTOL)
    with pytest.raises(ValueError, match="selected_fwd"):
        with override(selected_fwd="rows"):
            pass
