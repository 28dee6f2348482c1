"""End-to-end: the Triton backend of nsa_attention (all kernels together) against the PyTorch reference."""

import pytest
import torch

from nsa_hf.kernels import _tiling, compressed_cu_seqlens, nsa_attention, unfold_compression_blocks
from nsa_hf.kernels._tiling import override
from nsa_hf.kernels.reference import nsa_attention_ref


def nsa_attention_triton(*args, **kwargs):
    """The seam with the Triton backend: on CPU tensors it runs in Triton's interpreter (TRITON_INTERPRET=1)."""
    return nsa_attention(*args, backend="triton", **kwargs)

SMALL = dict(compress_block_size=8, compress_stride=4, select_block_size=16, num_selected_blocks=4, window_size=24)


def _inputs(B, T, HQ, HKV, DK, DV, dtype, device, seed=0):
    gen = torch.Generator(device=device).manual_seed(seed)
    q = torch.randn(B, T, HQ, DK, generator=gen, device=device, dtype=dtype)
    k = torch.randn(B, T, HKV, DK, generator=gen, device=device, dtype=dtype)
    v = torch.randn(B, T, HKV, DV, generator=gen, device=device, dtype=dtype)
    gates = torch.rand(B, T, HQ, 3, generator=gen, device=device, dtype=dtype)
    do = torch.randn(B, T, HQ, DV, generator=gen, device=device, dtype=dtype)
    return [x.requires_grad_() for x in (q, k, v, gates)] + [do]


def _run(fn, q, k, v, gates, do, settings, cu_seqlens=None, upcast=False):
    leaves = [(x.detach().float() if upcast else x.detach().clone()).requires_grad_() for x in (q, k, v, gates)]
    q, k, v, gates = leaves
    l, d = settings["compress_block_size"], settings["compress_stride"]
    k_cmp = unfold_compression_blocks(k, l, d, cu_seqlens).mean(2)
    v_cmp = unfold_compression_blocks(v, l, d, cu_seqlens).mean(2)
    out = fn(q, k, v, k_cmp, v_cmp, gates, cu_seqlens_q=cu_seqlens, cu_seqlens_k=cu_seqlens, **settings)
    out.backward(do.to(out.dtype))
    return [out.detach().float()] + [x.grad.float() for x in leaves]


def _rel(a, b):
    return ((a - b).norm() / b.norm().clamp_min(1e-12)).item()


@pytest.mark.parametrize("HQ,HKV", [(4, 4), (8, 2), (7, 1), (16, 1)])  # G=16: the tiled selected dQ by default
@pytest.mark.parametrize("T", [1, 37, 100])
def test_triton_matches_reference_interpreter(HQ, HKV, T):
    q, k, v, gates, do = _inputs(2, T, HQ, HKV, 16, 16, torch.float32, "cpu", seed=T + HQ)
    got = _run(nsa_attention_triton, q, k, v, gates, do, SMALL)
    ref = _run(nsa_attention_ref, q, k, v, gates, do, SMALL)
    for name, a, b in zip(("out", "dq", "dk", "dv", "dgates"), got, ref):
        assert torch.isfinite(a).all(), name
        torch.testing.assert_close(a, b, atol=2e-3, rtol=2e-3, msg=lambda m: f"{name}: {m}")


def test_triton_with_forward_by_block_matches_reference_interpreter():
    """override(selected_fwd="by_block"): the key-centric selected forward inside the full autograd path."""
    q, k, v, gates, do = _inputs(2, 37, 8, 2, 16, 16, torch.float32, "cpu", seed=5)
    with override(selected_fwd="by_block"):
        got = _run(nsa_attention_triton, q, k, v, gates, do, SMALL)
    ref = _run(nsa_attention_ref, q, k, v, gates, do, SMALL)
    for name, a, b in zip(("out", "dq", "dk", "dv", "dgates"), got, ref):
        torch.testing.assert_close(a, b, atol=2e-3, rtol=2e-3, msg=lambda m: f"{name}: {m}")


def test_triton_varlen_matches_reference_interpreter():
    lengths = [50, 7, 81]
    cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32)
    q, k, v, gates, do = _inputs(1, sum(lengths), 8, 2, 32, 16, torch.float32, "cpu", seed=3)
    got = _run(nsa_attention_triton, q, k, v, gates, do, SMALL, cu_seqlens=cu)
    ref = _run(nsa_attention_ref, q, k, v, gates, do, SMALL, cu_seqlens=cu)
    assert compressed_cu_seqlens(cu, 8, 4).tolist() == [0, 11, 11, 30]
    for name, a, b in zip(("out", "dq", "dk", "dv", "dgates"), got, ref):
        torch.testing.assert_close(a, b, atol=2e-3, rtol=2e-3, msg=lambda m: f"{name}: {m}")


def test_backend_reference_on_cpu_and_triton_refused_on_cpu(monkeypatch):
    q, k, v, gates, _ = _inputs(1, 40, 4, 2, 16, 16, torch.float32, "cpu")
    k_cmp = unfold_compression_blocks(k, 8, 4).mean(2)
    v_cmp = unfold_compression_blocks(v, 8, 4).mean(2)
    out = nsa_attention(q, k, v, k_cmp, v_cmp, gates, **SMALL)
    torch.testing.assert_close(out, nsa_attention_ref(q, k, v, k_cmp, v_cmp, gates, **SMALL))
    monkeypatch.setattr(_tiling, "INTERPRET", False)  # without the interpreter, CPU tensors cannot take Triton
    with pytest.raises(ValueError, match="backend='triton' cannot run"):
        nsa_attention(q, k, v, k_cmp, v_cmp, gates, backend="triton", **SMALL)
    with pytest.raises(ValueError, match="backend"):
        nsa_attention(q, k, v, k_cmp, v_cmp, gates, backend="cuda", **SMALL)


PAPER = dict(compress_block_size=32, compress_stride=16, select_block_size=64, num_selected_blocks=16, window_size=512)


@pytest.mark.gpu
@pytest.mark.parametrize("HQ,HKV,DK,DV", [(64, 4, 128, 128), (32, 8, 128, 128), (16, 1, 192, 128), (28, 4, 64, 64)])
def test_triton_matches_reference_gpu_bf16(HQ, HKV, DK, DV):
    # Reference in float32 on the same bf16-rounded inputs. A few queries may pick a different block where bf16
    # rounding makes two block scores tie, so the check is on relative error over the whole tensor.
    q, k, v, gates, do = _inputs(1, 2048, HQ, HKV, DK, DV, torch.bfloat16, "cuda")
    got = _run(lambda *a, **kw: nsa_attention(*a, backend="triton", **kw), q, k, v, gates, do, PAPER)
    ref = _run(nsa_attention_ref, q, k, v, gates, do, PAPER, upcast=True)
    for name, a, b in zip(("out", "dq", "dk", "dv", "dgates"), got, ref):
        assert torch.isfinite(a).all(), name
        assert _rel(a, b) < 2e-2, f"{name}: relative error {_rel(a, b):.3e}"


@pytest.mark.gpu
def test_triton_varlen_gpu_bf16():
    lengths = [3000, 17, 600, 1500]
    cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32, device="cuda")
    q, k, v, gates, do = _inputs(1, sum(lengths), 64, 4, 128, 128, torch.bfloat16, "cuda", seed=1)
    got = _run(lambda *a, **kw: nsa_attention(*a, backend="triton", **kw), q, k, v, gates, do, PAPER, cu_seqlens=cu)
    ref = _run(nsa_attention_ref, q, k, v, gates, do, PAPER, cu_seqlens=cu, upcast=True)
    for name, a, b in zip(("out", "dq", "dk", "dv", "dgates"), got, ref):
        assert _rel(a, b) < 2e-2, f"{name}: relative error {_rel(a, b):.3e}"


def test_triton_separate_window_kv_matches_reference_interpreter():
    q, k, v, gates, do = _inputs(1, 70, 4, 2, 16, 16, torch.float32, "cpu", seed=5)
    gen = torch.Generator().manual_seed(9)
    k_win = torch.randn(k.shape, generator=gen).requires_grad_()
    v_win = torch.randn(v.shape, generator=gen).requires_grad_()

    def run(fn):
        leaves = [x.detach().clone().requires_grad_() for x in (q, k, v, gates, k_win, v_win)]
        qq, kk, vv, gg, kw, vw = leaves
        k_cmp = unfold_compression_blocks(kk, 8, 4).mean(2)
        v_cmp = unfold_compression_blocks(vv, 8, 4).mean(2)
        out = fn(qq, kk, vv, k_cmp, v_cmp, gg, k_win=kw, v_win=vw, **SMALL)
        out.backward(do)
        return [out.detach()] + [x.grad for x in leaves]

    for name, a, b in zip(("out", "dq", "dk", "dv", "dgates", "dk_win", "dv_win"), run(nsa_attention_triton), run(nsa_attention_ref)):
        torch.testing.assert_close(a, b, atol=2e-3, rtol=2e-3, msg=lambda m: f"{name}: {m}")


def test_packed_call_reads_the_offsets_once(monkeypatch):
    """
    A packed step reads `cu_seqlens` on the host once (the first compression of the first layer): later layers, their
    kernels and every backward build nothing from the offsets again. Counted on CPU tensors through the conversions
    that sync with a GPU (tolist, item, bool/int/float of a tensor, cpu, numpy) made from nsa-hf's own code.
    """
    import os
    import sys

    import nsa_hf

    package = os.path.dirname(nsa_hf.__file__)
    reads = []

    def counting(name):
        original = getattr(torch.Tensor, name)

        def wrapper(self, *args, **kwargs):
            caller = sys._getframe(1).f_code.co_filename
            if caller.startswith(package):
                reads.append(f"{name} at {caller[len(package):]}:{sys._getframe(1).f_lineno}")
            return original(self, *args, **kwargs)

        return wrapper

    for name in ("tolist", "item", "__bool__", "__int__", "__index__", "__float__", "cpu", "numpy"):
        monkeypatch.setattr(torch.Tensor, name, counting(name))
    lengths = [50, 7, 81]
    cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32)
    q, k, v, gates, do = _inputs(1, sum(lengths), 8, 2, 16, 16, torch.float32, "cpu", seed=4)
    for layer in range(2):
        k_cmp = unfold_compression_blocks(k, 8, 4, cu).mean(2)
        v_cmp = unfold_compression_blocks(v, 8, 4, cu).mean(2)
        out = nsa_attention_triton(q, k, v, k_cmp, v_cmp, gates, cu_seqlens_q=cu, cu_seqlens_k=cu, **SMALL)
        out.backward(do)
        assert len(reads) == 1, reads  # the first layer's first look at the offsets, nothing after it
