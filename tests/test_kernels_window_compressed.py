"""
Triton kernels of the sliding-window and compressed branches against the PyTorch reference.

On the CPU the kernels run in Triton's interpreter in float32 (outputs, lse and every gradient to ~1e-4); the tests
marked `gpu` run them in bfloat16 at realistic shapes on a CUDA device against the reference in float32.
"""

import pytest
import torch

from nsa_hf.kernels import band_attention, band_attention_bwd
from nsa_hf.kernels._geometry import geometry
from nsa_hf.kernels._tiling import override, split_head_dim
from nsa_hf.kernels.compressed import compressed_attention, compressed_attention_bwd, compressed_attention_fwd
from nsa_hf.kernels.selected import attention_delta
from nsa_hf.kernels.reference import compressed_attention_ref, window_attention_ref
from nsa_hf.kernels.utils import compressed_cu_seqlens, num_compressed_blocks
from nsa_hf.kernels.window import window_attention, window_attention_bwd, window_attention_fwd

CPU_TOL = 2e-4


def _cu(lengths, device="cpu"):
    out = [0]
    for n in lengths:
        out.append(out[-1] + n)
    return torch.tensor(out, dtype=torch.int32, device=device)


def _rel(a, b):
    """max |a - b| / max(max |b|, 1): relative for large values, absolute for small ones (and all-zero ones)."""
    a, b = a.float(), b.float()
    return ((a - b).abs().max() / b.abs().max().clamp_min(1.0)).item() if b.numel() else 0.0


def _leaf(shape, dtype=torch.float32, device="cpu", gen=None):
    return torch.randn(*shape, generator=gen, dtype=torch.float32).to(device=device, dtype=dtype).requires_grad_()


def _grads(out, tensors, do):
    grads = torch.autograd.grad(out, tensors, do, allow_unused=True)
    return [torch.zeros_like(t) if g is None else g for g, t in zip(grads, tensors)]


def _check_window(B, Tq, Tk, HQ, HKV, DK, DV, w, cu_q=None, cu_k=None, seed=0, tol=CPU_TOL):
    gen = torch.Generator().manual_seed(seed)
    q, k, v = _leaf((B, Tq, HQ, DK), gen=gen), _leaf((B, Tk, HKV, DK), gen=gen), _leaf((B, Tk, HKV, DV), gen=gen)
    do = torch.randn(B, Tq, HQ, DV, generator=gen)
    kw = dict(cu_seqlens_q=cu_q, cu_seqlens_k=cu_k)
    out = window_attention(q, k, v, w, **kw)
    ref = window_attention_ref(q, k, v, w, **kw)
    assert out.shape == ref.shape and out.dtype == q.dtype
    assert _rel(out, ref) < tol
    for g, r, name in zip(_grads(out, (q, k, v), do), _grads(ref, (q, k, v), do), "qkv"):
        assert torch.isfinite(g).all(), f"d{name} has non-finite values"
        assert _rel(g, r) < tol, f"d{name}: {_rel(g, r)}"


def _cmp_inputs(B, Tq, Tk, HQ, HKV, DK, DV, l, d, cu_k=None, gen=None, dtype=torch.float32, device="cpu"):
    nc = num_compressed_blocks(Tk, l, d) if cu_k is None else int(compressed_cu_seqlens(cu_k, l, d)[-1])
    q = _leaf((B, Tq, HQ, DK), dtype, device, gen)
    k_cmp = _leaf((B, nc, HKV, DK), dtype, device, gen)
    v_cmp = _leaf((B, nc, HKV, DV), dtype, device, gen)
    return q, k_cmp, v_cmp


def _check_compressed(B, Tq, Tk, HQ, HKV, DK, DV, l, d, cu_q=None, cu_k=None, seed=0, tol=CPU_TOL):
    gen = torch.Generator().manual_seed(seed)
    q, k_cmp, v_cmp = _cmp_inputs(B, Tq, Tk, HQ, HKV, DK, DV, l, d, cu_k, gen)
    do = torch.randn(B, Tq, HQ, DV, generator=gen)
    kw = dict(cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, num_keys=None if cu_q is not None else Tk)
    out, lse = compressed_attention(q, k_cmp, v_cmp, l, d, **kw)
    ref, ref_lse = compressed_attention_ref(q, k_cmp, v_cmp, l, d, **kw)
    assert out.shape == ref.shape and lse.shape == ref_lse.shape and lse.dtype == torch.float32
    assert not lse.requires_grad
    assert torch.isfinite(out).all()
    assert torch.equal(torch.isneginf(lse), torch.isneginf(ref_lse)), "rows without a visible block differ"
    assert not torch.isnan(lse).any() and not torch.isposinf(lse).any()
    seen = torch.isfinite(ref_lse)
    assert _rel(lse[seen], ref_lse[seen]) < tol
    assert _rel(out, ref) < tol
    assert (out[~seen] == 0).all()
    for g, r, name in zip(_grads(out, (q, k_cmp, v_cmp), do), _grads(ref, (q, k_cmp, v_cmp), do), ("q", "k_cmp", "v_cmp")):
        assert torch.isfinite(g).all(), f"d{name} has non-finite values"
        assert _rel(g, r) < tol, f"d{name}: {_rel(g, r)}"
    return lse


@pytest.fixture
def small_tiles():
    """
    Interpreter tiles of 16: many tile edges on short sequences, groups wider than a tile (NUM_HC > 1), and the
    three-loop (masked / unmasked / masked) variant of the query-tiled kernels.
    """
    with override(band_tiles=dict(SPLIT=True, BLOCK_M=16, BLOCK_N=16, DKDV_BLOCK_N=16, DKDV_BLOCK_M=16)):
        yield


@pytest.fixture
def split_loops():
    """The three-loop variant of the query-tiled kernels, and the larger dK/dV key tile (its own work list)."""
    with override(band_tiles=dict(SPLIT=True, DKDV_WIDE=True)):
        yield


# ---------------------------------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------------------------------


def test_attention_delta():
    gen = torch.Generator().manual_seed(1)
    o, do = torch.randn(2, 9, 3, 24, generator=gen), torch.randn(2, 9, 3, 24, generator=gen)
    assert torch.allclose(attention_delta(o, do), (o * do).sum(-1), atol=1e-5)


def test_geometry_cache_is_per_tensor_object_and_version():
    cu = _cu([3, 4])
    q = torch.zeros(1, 7, 1, 16)
    first = geometry(q, 7, cu, cu)
    assert geometry(q, 7, cu, cu) is first
    table = first.table(("t",), object)
    assert first.table(("t",), object) is table  # device tables are built once per geometry
    assert geometry(q, 7, _cu([3, 4]), _cu([3, 4])) is not first  # other tensor objects
    cu[1] = 2  # in-place change bumps the version: rebuilt (and checked again)
    second = geometry(q, 7, cu, cu)
    assert second is not first and second.bounds_q == [0, 2, 7]
    assert geometry(torch.zeros(2, 5, 1, 16), 9) is geometry(torch.zeros(2, 5, 1, 16), 9)  # plain batches by shape


@pytest.mark.parametrize("d,pieces", [(16, (16, 0)), (64, (64, 0)), (128, (128, 0)), (192, (128, 64)), (96, (64, 32)),
                                      (80, (64, 16)), (24, (32, 0)), (8, (16, 0)), (256, (256, 0)), (112, (128, 0))])
def test_split_head_dim(d, pieces):
    assert split_head_dim(d) == pieces
    assert sum(pieces) >= d


# ---------------------------------------------------------------------------------------------------------------------
# sliding window (CPU interpreter, float32)
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("HQ,HKV", [(2, 2), (4, 2), (8, 2), (7, 1)])
def test_window_group_sizes(HQ, HKV):
    _check_window(2, 75, 75, HQ, HKV, 32, 32, 17)


@pytest.mark.parametrize("DK,DV", [(32, 16), (48, 24)])
def test_window_head_dims(DK, DV):
    # 48 is split in two power-of-two pieces (32 + 16); 24 is zero-padded to 32
    _check_window(1, 60, 60, 4, 2, DK, DV, 9)


@pytest.mark.parametrize("T", [1, 5, 64])
def test_window_short_and_tile_multiple(T):
    _check_window(1, T, T, 4, 1, 16, 16, 7)


@pytest.mark.parametrize("w", [1, 1000])
def test_window_extremes(w):
    # w = 1: each query sees itself only; w larger than the sequence: plain causal attention
    _check_window(1, 50, 50, 4, 2, 16, 16, w)


def test_window_varlen():
    cu = _cu([5, 48, 37])
    _check_window(1, 90, 90, 4, 2, 32, 16, 13, cu, cu)


def test_window_decoding_and_prefill_with_cache():
    _check_window(2, 1, 70, 8, 2, 16, 16, 20)  # one decoding step
    _check_window(1, 9, 70, 4, 4, 16, 16, 20)  # chunk of queries after a cache
    cu_q, cu_k = _cu([1, 3, 0, 6]), _cu([30, 3, 4, 40])  # per document: the queries are the last positions
    _check_window(1, 10, 77, 4, 1, 16, 16, 7, cu_q, cu_k)


def test_window_small_tiles_and_wide_group(small_tiles):
    _check_window(1, 45, 45, 32, 1, 16, 16, 11)  # 32 heads per KV head > 16-row tile: two head chunks
    cu = _cu([3, 40, 2])
    _check_window(1, 45, 45, 6, 2, 16, 16, 19, cu, cu)


def test_split_loop_variant(split_loops):
    cu = _cu([9, 70, 1])
    _check_window(1, 80, 80, 7, 1, 16, 32, 23, cu, cu)
    _check_compressed(1, 80, 80, 4, 2, 16, 16, 8, 4, cu, cu)
    _check_compressed(1, 13, 90, 8, 2, 16, 16, 8, 4)


def test_window_non_contiguous_inputs():
    gen = torch.Generator().manual_seed(3)
    qkv = torch.randn(2, 40, 4 + 2 + 2, 16, generator=gen).requires_grad_()
    q, k, v = qkv[:, :, :4], qkv[:, :, 4:6], qkv[:, :, 6:]
    out = window_attention(q, k, v, 8)
    ref = window_attention_ref(q, k, v, 8)
    assert _rel(out, ref) < CPU_TOL
    do = torch.randn_like(out)
    (g,) = torch.autograd.grad(out, qkv, do)
    (r,) = torch.autograd.grad(ref, qkv, do)
    assert _rel(g, r) < CPU_TOL


def test_window_fwd_bwd_functions_with_given_delta():
    gen = torch.Generator().manual_seed(4)
    q, k, v = torch.randn(1, 30, 4, 16, generator=gen), torch.randn(1, 30, 2, 16, generator=gen), torch.randn(1, 30, 2, 16, generator=gen)
    geo = geometry(q, k.shape[1])
    o, lse = window_attention_fwd(q, k, v, 6, 0.3, geo)
    do = torch.randn_like(o)
    delta = (o * do).sum(-1)
    grads = window_attention_bwd(do, q, k, v, None, lse, 6, 0.3, geo, delta=delta)
    qr, kr, vr = (x.clone().requires_grad_() for x in (q, k, v))
    ref = window_attention_ref(qr, kr, vr, 6, scale=0.3)
    assert _rel(o, ref) < CPU_TOL
    for g, r in zip(grads, _grads(ref, (qr, kr, vr), do)):
        assert _rel(g, r) < CPU_TOL


def test_window_bad_arguments():
    q, k = torch.randn(1, 8, 4, 16), torch.randn(1, 8, 2, 16)
    with pytest.raises(ValueError, match="window_size"):
        window_attention(q, k, k, 0)
    with pytest.raises(ValueError, match="multiple"):
        window_attention(torch.randn(1, 8, 3, 16), k, k, 4)
    with pytest.raises(ValueError, match="Tq"):
        window_attention(torch.randn(1, 9, 4, 16), k, k, 4)
    with pytest.raises(ValueError, match="both"):
        window_attention(q, k, k, 4, cu_seqlens_q=_cu([8]))
    with pytest.raises(ValueError, match="batch size"):
        window_attention(torch.randn(2, 8, 4, 16), torch.randn(2, 8, 2, 16), torch.randn(2, 8, 2, 16), 4,
                         cu_seqlens_q=_cu([8]), cu_seqlens_k=_cu([8]))
    with pytest.raises(ValueError, match="head dim"):
        window_attention(q, torch.randn(1, 8, 2, 32), k, 4)


# ---------------------------------------------------------------------------------------------------------------------
# compressed (CPU interpreter, float32)
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("HQ,HKV", [(2, 2), (4, 2), (8, 2), (7, 1)])
def test_compressed_group_sizes(HQ, HKV):
    _check_compressed(2, 90, 90, HQ, HKV, 32, 32, 8, 4)


def test_compressed_head_dims_and_block_shapes():
    _check_compressed(1, 80, 80, 4, 2, 48, 16, 16, 8)  # DK split 32 + 16, DK != DV
    _check_compressed(1, 70, 70, 4, 1, 16, 24, 6, 3)  # DV padded to 32, stride that does not divide the tile


@pytest.mark.parametrize("T", [1, 7, 8, 33])
def test_compressed_short_sequences(T):
    # T < l: no block is complete -> o = 0, lse = -inf, zero gradients and no NaN; T = l: one block
    lse = _check_compressed(1, T, T, 4, 2, 16, 16, 8, 4)
    assert torch.isneginf(lse[:, : min(T, 7)]).all()


def test_compressed_varlen():
    cu = _cu([37, 5, 61])  # the middle document is shorter than l and has no compressed key
    _check_compressed(1, 103, 103, 4, 2, 32, 16, 8, 4, cu, cu)


def test_compressed_decoding_and_prefill_with_cache():
    _check_compressed(2, 1, 90, 8, 2, 16, 16, 8, 4)
    _check_compressed(1, 11, 90, 4, 4, 16, 16, 8, 4)
    cu_q, cu_k = _cu([1, 2, 0, 7]), _cu([50, 5, 9, 33])
    _check_compressed(1, 10, 97, 4, 1, 16, 16, 8, 4, cu_q, cu_k)


def test_compressed_small_tiles_and_wide_group(small_tiles):
    _check_compressed(1, 70, 70, 32, 1, 16, 16, 8, 4)
    cu = _cu([20, 3, 50])
    _check_compressed(1, 73, 73, 6, 2, 16, 16, 8, 4, cu, cu)


@pytest.mark.parametrize("varlen", [False, True])
def test_compressed_chunked_dkdv_atomics(varlen):
    """Long causal bands split the dK/dV queries into chunks that add up with atomics; same result."""
    gen = torch.Generator().manual_seed(5)
    T, l, d = 120, 8, 4
    cu = _cu([70, 6, 44]) if varlen else None
    q, k_cmp, v_cmp = _cmp_inputs(1, T, T, 4, 2, 16, 16, l, d, cu, gen)
    kw = dict(cu_seqlens_q=cu, cu_seqlens_k=cu, num_keys=None if varlen else T)
    geo = geometry(q, T, cu, cu)
    o, lse = compressed_attention_fwd(q, k_cmp, v_cmp, l, d, 16 ** -0.5, geo)
    do = torch.randn_like(o)
    ref, _ = compressed_attention_ref(q, k_cmp, v_cmp, l, d, **kw)
    expected = _grads(ref, (q, k_cmp, v_cmp), do)
    for q_chunk in (None, 16, 37):
        with override(compressed_q_chunk=q_chunk):
            grads = compressed_attention_bwd(do, q, k_cmp, v_cmp, o, lse, l, d, 16 ** -0.5, geo)
        for g, r in zip(grads, expected):
            assert g.dtype == torch.float32
            assert _rel(g, r) < CPU_TOL


def test_compressed_bad_arguments():
    q, k = torch.randn(1, 40, 4, 16), torch.randn(1, 9, 2, 16)
    with pytest.raises(ValueError, match="compress_block_size"):
        compressed_attention(q, k, k, 0, 4)
    with pytest.raises(ValueError, match="compress_stride"):
        compressed_attention(q, k, k, 8, -1)
    with pytest.raises(ValueError, match="num_keys"):
        compressed_attention(q, k, k, 8, 4, num_keys=30)
    with pytest.raises(ValueError, match="dtype"):
        compressed_attention(q.long(), k.long(), k.long(), 8, 4)


# ---------------------------------------------------------------------------------------------------------------------
# GPU, bfloat16, realistic shapes (run with `pytest -m gpu` on a CUDA machine)
# ---------------------------------------------------------------------------------------------------------------------


def _norm_rel(a, b):
    a, b = a.float(), b.float()
    return ((a - b).norm() / b.norm().clamp_min(1e-12)).item()


def _gpu_compare(fn, ref_fn, tensors, do, tol=1e-2):
    out = fn(*tensors)
    out = out[0] if isinstance(out, tuple) else out
    ref_inputs = [t.detach().float().requires_grad_() for t in tensors]
    ref = ref_fn(*ref_inputs)
    ref = ref[0] if isinstance(ref, tuple) else ref
    assert torch.isfinite(out).all()
    assert _norm_rel(out, ref) < tol, f"out: {_norm_rel(out, ref)}"
    grads = torch.autograd.grad(out, tensors, do)
    ref_grads = torch.autograd.grad(ref, ref_inputs, do.float())
    for i, (g, r) in enumerate(zip(grads, ref_grads)):
        assert g.dtype == tensors[i].dtype and torch.isfinite(g).all()
        assert _norm_rel(g, r) < tol, f"grad {i}: {_norm_rel(g, r)}"


@pytest.fixture
def first_config():
    """Skip the autotuner's timing on the GPU (it compiles every configuration per shape): its first configuration."""
    _clear_autotune_memory()
    with override(autotune=False):
        yield


def _clear_autotune_memory():
    for kernel in (band_attention._fwd_kernel, band_attention_bwd._dq_kernel, band_attention_bwd._dkdv_kernel):
        if hasattr(kernel, "cache"):
            kernel.cache.clear()


GPU_SHAPES = [
    # (B, T, HQ, HKV, DK, DV, doc lengths or None)
    pytest.param(1, 4096, 64, 4, 128, 128, [1000, 1, 2500, 595], id="varlen4k-g16-d128"),
    pytest.param(1, 8192, 64, 4, 128, 128, [3000, 17, 5175], id="varlen8k-g16-d128"),
    pytest.param(2, 4096, 32, 8, 128, 128, None, id="b2-4k-g4-d128"),
    pytest.param(1, 4096, 16, 1, 192, 128, None, id="4k-g16-dk192-dv128"),
    pytest.param(1, 2048, 28, 4, 64, 64, [1500, 548], id="varlen2k-g7-d64"),
]


@pytest.mark.gpu
@pytest.mark.parametrize("B,T,HQ,HKV,DK,DV,docs", GPU_SHAPES)
def test_gpu_window_bf16(B, T, HQ, HKV, DK, DV, docs, first_config):
    torch.manual_seed(0)
    dev, bf = "cuda", torch.bfloat16
    q, k, v = _leaf((B, T, HQ, DK), bf, dev), _leaf((B, T, HKV, DK), bf, dev), _leaf((B, T, HKV, DV), bf, dev)
    do = torch.randn(B, T, HQ, DV, device=dev, dtype=bf)
    cu = _cu(docs, dev) if docs else None
    kw = dict(cu_seqlens_q=cu, cu_seqlens_k=cu)
    _gpu_compare(lambda *t: window_attention(*t, 512, **kw), lambda *t: window_attention_ref(*t, 512, **kw), (q, k, v), do)


@pytest.mark.gpu
@pytest.mark.parametrize("B,T,HQ,HKV,DK,DV,docs", GPU_SHAPES)
def test_gpu_compressed_bf16(B, T, HQ, HKV, DK, DV, docs, first_config):
    torch.manual_seed(0)
    dev, bf = "cuda", torch.bfloat16
    l, d = 32, 16
    cu = _cu(docs, dev) if docs else None
    q, k_cmp, v_cmp = _cmp_inputs(B, T, T, HQ, HKV, DK, DV, l, d, cu, None, bf, dev)
    do = torch.randn(B, T, HQ, DV, device=dev, dtype=bf)
    kw = dict(cu_seqlens_q=cu, cu_seqlens_k=cu, num_keys=None if docs else T)
    _gpu_compare(
        lambda *t: compressed_attention(*t, l, d, **kw), lambda *t: compressed_attention_ref(*t, l, d, **kw),
        (q, k_cmp, v_cmp), do,
    )
    out, lse = compressed_attention(q, k_cmp, v_cmp, l, d, **kw)
    _, ref_lse = compressed_attention_ref(q.float(), k_cmp.float(), v_cmp.float(), l, d, **kw)
    assert torch.equal(torch.isneginf(lse), torch.isneginf(ref_lse))
    seen = torch.isfinite(ref_lse)
    assert (lse[seen] - ref_lse[seen]).abs().max().item() < 5e-2


@pytest.mark.gpu
@pytest.mark.parametrize("Tq", [1, 64])
def test_gpu_decoding_bf16(Tq, first_config):
    torch.manual_seed(0)
    dev, bf = "cuda", torch.bfloat16
    B, Tk, HQ, HKV, D, l, d = 4, 8192, 64, 4, 128, 32, 16
    q, k, v = (torch.randn(B, n, h, D, device=dev, dtype=bf) for n, h in ((Tq, HQ), (Tk, HKV), (Tk, HKV)))
    out = window_attention(q, k, v, 512)
    ref = window_attention_ref(q.float(), k.float(), v.float(), 512)
    assert _norm_rel(out, ref) < 1e-2
    nc = num_compressed_blocks(Tk, l, d)
    k_cmp, v_cmp = k[:, :nc], v[:, :nc]
    out, lse = compressed_attention(q, k_cmp, v_cmp, l, d, num_keys=Tk)
    ref, ref_lse = compressed_attention_ref(q.float(), k_cmp.float(), v_cmp.float(), l, d, num_keys=Tk)
    assert _norm_rel(out, ref) < 1e-2
    assert (lse - ref_lse).abs().max().item() < 5e-2


@pytest.mark.gpu
@pytest.mark.parametrize("DK,DV,index", [(192, 128, i) for i in range(3)] + [(128, 128, i) for i in range(5)])
def test_gpu_every_autotune_config(DK, DV, index):
    """The autotuner may pick any configuration on any machine: each one must be right, for both branches."""
    _clear_autotune_memory()
    try:
        with override(config_index=index):
            torch.manual_seed(index)
            dev, bf = "cuda", torch.bfloat16
            T, HQ, HKV, l, d = 2048, 32, 2, 32, 16
            cu = _cu([700, 3, 1345], dev)
            q, k, v = _leaf((1, T, HQ, DK), bf, dev), _leaf((1, T, HKV, DK), bf, dev), _leaf((1, T, HKV, DV), bf, dev)
            do = torch.randn(1, T, HQ, DV, device=dev, dtype=bf)
            kw = dict(cu_seqlens_q=cu, cu_seqlens_k=cu)
            _gpu_compare(lambda *t: window_attention(*t, 256, **kw), lambda *t: window_attention_ref(*t, 256, **kw),
                         (q, k, v), do)
            _, k_cmp, v_cmp = _cmp_inputs(1, T, T, HQ, HKV, DK, DV, l, d, cu, None, bf, dev)
            _gpu_compare(
                lambda *t: compressed_attention(*t, l, d, **kw), lambda *t: compressed_attention_ref(*t, l, d, **kw),
                (q, k_cmp, v_cmp), do,
            )
    finally:
        _clear_autotune_memory()
