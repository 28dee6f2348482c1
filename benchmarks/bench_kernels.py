"""
Quick timings of single kernels against dense causal SDPA (bf16, CUDA), moved here from the kernel files:

    python benchmarks/bench_kernels.py band --seqlens 8192 32768 65536       # window + compressed attention
    python benchmarks/bench_kernels.py selected --seqlens 8192 16384 32768   # selected attention, synthetic selection
    python benchmarks/bench_kernels.py selection --seqlens 65536             # block scoring + top-n (l, d, l') pairs

`synthetic_selection` makes block indices with the structure of real NSA selections, cheap at long T.
"""

import argparse
import os
import sys

import torch
import triton
from triton.testing import do_bench

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from nsa_hf.kernels.compressed import compressed_attention  # noqa: E402
from nsa_hf.kernels.selected import selected_attention  # noqa: E402
from nsa_hf.kernels.selection import select_blocks  # noqa: E402
from nsa_hf.kernels.utils import num_compressed_blocks  # noqa: E402
from nsa_hf.kernels.window import window_attention  # noqa: E402


def synthetic_selection(B, T, HKV, n, L, device, seed=0):
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


def dense_sdpa(q, k, v, do):
    """Forward and forward+backward ms of causal SDPA (cuDNN backend where it takes the shapes) on expanded K/V."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    G = q.shape[2] // k.shape[2]
    qd = q.detach().transpose(1, 2).requires_grad_()
    kd = k.detach().repeat_interleave(G, 2).transpose(1, 2).requires_grad_()
    vd = v.detach().repeat_interleave(G, 2).transpose(1, 2).requires_grad_()
    dod = do.transpose(1, 2)

    def dense():
        with sdpa_kernel([SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION]):
            return torch.nn.functional.scaled_dot_product_attention(qd, kd, vd, is_causal=True)

    dense().backward(dod)
    return do_bench(lambda: dense(), warmup=5, rep=50), do_bench(lambda: dense().backward(dod), warmup=5, rep=50)


def bench_band(seqlens, HQ=64, HKV=4, DK=192, DV=128, window=512, l=32, d=16):
    """Forward and forward+backward times (ms) of the window and compressed kernels and of dense causal SDPA."""
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
            row["dense_fwd"], row["dense_fwd_bwd"] = dense_sdpa(q, k, v, do)
        except Exception as err:  # no backend for the shape
            row["dense"] = f"unavailable: {type(err).__name__}"
        print({key: round(val, 3) if isinstance(val, float) else val for key, val in row.items()}, flush=True)


def bench_selected(seqlens, HQ=64, HKV=4, DK=192, DV=128, L=64, n=16):
    """Forward and forward+backward time of `selected_attention` vs dense causal SDPA, synthetic selections."""
    dev, bf = "cuda", torch.bfloat16
    for T in seqlens:
        q = torch.randn(1, T, HQ, DK, device=dev, dtype=bf, requires_grad=True)
        k = torch.randn(1, T, HKV, DK, device=dev, dtype=bf, requires_grad=True)
        v = torch.randn(1, T, HKV, DV, device=dev, dtype=bf, requires_grad=True)
        idx = synthetic_selection(1, T, HKV, n, L, dev)
        do = torch.randn(1, T, HQ, DV, device=dev, dtype=bf)

        def fn():
            return selected_attention(q, k, v, idx, L)

        fn().backward(do)
        fwd = do_bench(lambda: fn(), warmup=5, rep=50)
        fwd_bwd = do_bench(lambda: fn().backward(do), warmup=5, rep=50)
        dense_f, dense_fb = dense_sdpa(q, k, v, do)
        print(
            f"T={T:6d} HQ={HQ} HKV={HKV} DK={DK} DV={DV} l'={L} n={n}: selected fwd {fwd:7.3f} ms f+b {fwd_bwd:7.3f} ms"
            f" | dense fwd {dense_f:7.3f} ms f+b {dense_fb:7.3f} ms | speedup fwd {dense_f / fwd:5.2f}x"
            f" f+b {dense_fb / fwd_bwd:5.2f}x", flush=True,
        )


def bench_selection(seqlens, HQ=64, HKV=4, D=128, n=16):
    """`select_blocks` (block scores recomputed from the compressed logits, top-n) for the paper's (l, d, l') and
    (64, 64, 64), with the throughput of the q . K_cmp^T it recomputes."""
    dev, bf = "cuda", torch.bfloat16
    for T in seqlens:
        for l, d, lp in ((32, 16, 64), (64, 64, 64)):
            q = torch.randn(1, T, HQ, D, device=dev, dtype=bf)
            k_cmp = torch.randn(1, num_compressed_blocks(T, l, d), HKV, D, device=dev, dtype=bf)
            lse = torch.full((1, T, HQ), 6.0, device=dev)
            ms = do_bench(lambda: select_blocks(q, k_cmp, lse, l, d, lp, n), warmup=50, rep=200)
            flops = 2 * HQ * D * sum((t - l) // d + 1 for t in range(l - 1, T, 64)) * 64  # causal q . K_cmp^T
            print(f"T={T:6d} HQ={HQ} HKV={HKV} D={D} l={l} d={d} l'={lp} n={n}: select_blocks {ms:7.3f} ms"
                  f" ({flops / ms / 1e9:.0f} TFLOP/s of q . K_cmp^T)", flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("kernel", choices=["band", "selected", "selection"])
    parser.add_argument("--seqlens", type=int, nargs="+", default=[8192, 32768, 65536])
    args = parser.parse_args()
    dict(band=bench_band, selected=bench_selected, selection=bench_selection)[args.kernel](args.seqlens)


if __name__ == "__main__":
    main()
