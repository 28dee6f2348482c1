"""
Training-kernel benchmark: forward and forward+backward time and peak memory of NSA attention against dense causal
attention (SDPA on its cuDNN backend) and, where installed, flash-linear-attention's `parallel_nsa`, side by side in
one run on one GPU.

    python benchmarks/bench_training.py                       # all layouts, 8k..128k
    python benchmarks/bench_training.py --seqlens 8192 65536 --layouts paper
    python benchmarks/bench_training.py --seqlens 65536 --selected-fwd by_block   # the key-centric selected forward

Prints a table and writes JSON to benchmarks/results/training_<gpu>.json (plot it with benchmarks/plot.py).
"""

import argparse
import json
import math
import os
import platform
import sys
from datetime import datetime, timezone

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from nsa_hf.kernels import nsa_attention, unfold_compression_blocks  # noqa: E402
from nsa_hf.kernels._tiling import SWITCHES, override  # noqa: E402

# name -> (query heads, kv heads, head dim, NSA settings)
PAPER = dict(compress_block_size=32, compress_stride=16, select_block_size=64, num_selected_blocks=16, window_size=512)
FLA = dict(compress_block_size=64, compress_stride=64, select_block_size=64, num_selected_blocks=16, window_size=512)
LAYOUTS = {
    "paper": (64, 4, 128, PAPER),  # the paper's head layout and NSA settings
    "llama3-8b": (32, 8, 128, PAPER),  # Llama-3-8B's head layout, paper NSA settings
    "llama-d64": (32, 8, 64, PAPER),  # the same heads at head dim 64: the 1.1B model of bench_model_training.py
    "fla-settings": (64, 4, 128, FLA),  # flash-linear-attention's own settings (mean pooling, l=d=l'=64)
}


def bench(fn, warmup_ms=100, rep_ms=400):
    from triton.testing import do_bench

    return do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median")


def peak_memory_mb(fn):
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def make_inputs(T, HQ, HKV, D, dtype=torch.bfloat16, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    q = torch.randn(1, T, HQ, D, device="cuda", dtype=dtype, generator=g).requires_grad_()
    k = torch.randn(1, T, HKV, D, device="cuda", dtype=dtype, generator=g).requires_grad_()
    v = torch.randn(1, T, HKV, D, device="cuda", dtype=dtype, generator=g).requires_grad_()
    gates = torch.rand(1, T, HQ, 3, device="cuda", dtype=dtype, generator=g).requires_grad_()
    do = torch.randn(1, T, HQ, D, device="cuda", dtype=dtype, generator=g)
    return q, k, v, gates, do


def ours(q, k, v, gates, settings):
    # Mean-pooling compression in PyTorch (the learned MLP adds a small GEMM on T/d blocks); everything after it runs
    # in the Triton kernels.
    l, d = settings["compress_block_size"], settings["compress_stride"]
    k_cmp = unfold_compression_blocks(k, l, d).mean(2)
    v_cmp = unfold_compression_blocks(v, l, d).mean(2)
    return nsa_attention(q, k, v, k_cmp, v_cmp, gates, backend="triton", **settings)


DENSE_GQA = {"mode": None}  # how cuDNN took the GQA heads: "enable_gqa" or "expanded" (recorded in the JSON)


def dense_cudnn(q, k, v):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    qt, kt, vt = (x.transpose(1, 2) for x in (q, k, v))
    with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
        if DENSE_GQA["mode"] in (None, "enable_gqa"):
            try:
                out = F.scaled_dot_product_attention(qt, kt, vt, is_causal=True, enable_gqa=True)
                DENSE_GQA["mode"] = "enable_gqa"
                return out.transpose(1, 2)
            except RuntimeError:
                DENSE_GQA["mode"] = "expanded"
        # cuDNN without native GQA: expanded K/V heads, as a model's repeat_kv would give it.
        G = q.shape[2] // k.shape[2]
        kt, vt = kt.repeat_interleave(G, dim=1), vt.repeat_interleave(G, dim=1)
        return F.scaled_dot_product_attention(qt, kt, vt, is_causal=True).transpose(1, 2)


_flex_cache = {}


def fla_nsa(q, k, v, gates, settings):
    """flash-linear-attention's parallel_nsa (its compression + selection kernels) plus a flex-attention window."""
    from fla.ops.nsa import parallel_nsa
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    T, w = q.shape[1], settings["window_size"]
    o = parallel_nsa(
        q, k, v, g_cmp=gates[..., 0], g_slc=gates[..., 1], g_swa=None,
        block_counts=settings["num_selected_blocks"], block_size=settings["select_block_size"], window_size=0,
    )
    if T not in _flex_cache:
        mask = create_block_mask(lambda b, h, qi, ki: (ki <= qi) & (qi - ki < w), None, None, T, T, device="cuda")
        _flex_cache[T] = (mask, torch.compile(flex_attention, dynamic=False))
    mask, flex = _flex_cache[T]
    o_win = flex(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), block_mask=mask, enable_gqa=True)
    return o + o_win.transpose(1, 2) * gates[..., 2:3]


def fla_available():
    try:
        import fla.ops.nsa  # noqa: F401

        return True
    except Exception:
        return False


def run_case(name, fn, inputs, grads_of):
    do = inputs[-1]

    def fwd():
        with torch.no_grad():
            fn()

    def fwd_bwd():
        out = fn()
        torch.autograd.backward(out, do)
        for t in grads_of:
            t.grad = None

    row = {"impl": name}
    try:
        row["fwd_ms"] = bench(fwd)
        row["fwd_bwd_ms"] = bench(fwd_bwd)
        row["fwd_peak_mb"] = peak_memory_mb(fwd)
        row["fwd_bwd_peak_mb"] = peak_memory_mb(fwd_bwd)
    except torch.OutOfMemoryError:
        row["error"] = "out of memory"
    except Exception as err:  # report, keep benchmarking the others
        row["error"] = f"{type(err).__name__}: {err}"[:300]
    torch.cuda.empty_cache()
    return row


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seqlens", type=int, nargs="+", default=[8192, 16384, 32768, 65536, 131072])
    parser.add_argument("--layouts", nargs="+", default=list(LAYOUTS), choices=list(LAYOUTS))
    parser.add_argument("--out", default=None, help="JSON path (default benchmarks/results/training_<gpu>.json)")
    parser.add_argument("--no-dense", action="store_true", help="skip dense attention (fast iteration on our kernels)")
    parser.add_argument("--selected-fwd", choices=["tiled", "by_block"], default=None,
                        help="force the selected forward (default: the kernels' own choice)")
    args = parser.parse_args()
    with override(selected_fwd=args.selected_fwd):
        run(args)


def run(args):
    if not torch.cuda.is_available():
        sys.exit("this benchmark needs a CUDA GPU")

    import transformers
    import triton

    gpu = torch.cuda.get_device_name()
    meta = {
        "gpu": gpu, "torch": torch.__version__, "triton": triton.__version__, "transformers": transformers.__version__,
        "cuda": torch.version.cuda, "python": platform.python_version(), "dtype": "bfloat16", "batch": 1,
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "window_on_side_stream": SWITCHES.streams, "selected_fwd": SWITCHES.selected_fwd or "default",
    }
    if fla_available():
        import fla

        meta["fla"] = getattr(fla, "__version__", "installed")
    results = []
    header = f"{'layout':<13}{'T':>7} {'impl':<10}{'fwd ms':>9}{'f+b ms':>9}{'fwd MB':>9}{'f+b MB':>9}{'fwd x':>7}{'f+b x':>7}"
    print(header)
    for layout in args.layouts:
        HQ, HKV, D, settings = LAYOUTS[layout]
        for T in args.seqlens:
            inputs = make_inputs(T, HQ, HKV, D)
            q, k, v, gates, _ = inputs
            rows = []
            if not args.no_dense:
                rows.append(run_case("dense", lambda: dense_cudnn(q, k, v), inputs, (q, k, v)))
            rows.append(run_case("nsa-hf", lambda: ours(q, k, v, gates, settings), inputs, (q, k, v, gates)))
            if layout == "fla-settings" and fla_available():
                rows.append(run_case("fla", lambda: fla_nsa(q, k, v, gates, settings), inputs, (q, k, v, gates)))
            dense = rows[0] if rows[0]["impl"] == "dense" and "error" not in rows[0] else None
            for row in rows:
                row.update(layout=layout, seqlen=T, q_heads=HQ, kv_heads=HKV, head_dim=D, **settings)
                if dense and "error" not in row:
                    row["fwd_speedup_vs_dense"] = dense["fwd_ms"] / row["fwd_ms"]
                    row["fwd_bwd_speedup_vs_dense"] = dense["fwd_bwd_ms"] / row["fwd_bwd_ms"]
                if "error" in row:
                    print(f"{layout:<13}{T:>7} {row['impl']:<10} {row['error'][:60]}")
                else:
                    print(
                        f"{layout:<13}{T:>7} {row['impl']:<10}{row['fwd_ms']:>9.2f}{row['fwd_bwd_ms']:>9.2f}"
                        f"{row['fwd_peak_mb']:>9.0f}{row['fwd_bwd_peak_mb']:>9.0f}"
                        f"{row.get('fwd_speedup_vs_dense', math.nan):>7.2f}{row.get('fwd_bwd_speedup_vs_dense', math.nan):>7.2f}",
                        flush=True,
                    )
            by_impl = {r["impl"]: r for r in rows if "error" not in r}
            if "fla" in by_impl and "nsa-hf" in by_impl:
                by_impl["nsa-hf"]["fwd_speedup_vs_fla"] = by_impl["fla"]["fwd_ms"] / by_impl["nsa-hf"]["fwd_ms"]
                by_impl["nsa-hf"]["fwd_bwd_speedup_vs_fla"] = by_impl["fla"]["fwd_bwd_ms"] / by_impl["nsa-hf"]["fwd_bwd_ms"]
                print(f"{'':<21}nsa-hf vs fla: fwd {by_impl['nsa-hf']['fwd_speedup_vs_fla']:.2f}x, "
                      f"fwd+bwd {by_impl['nsa-hf']['fwd_bwd_speedup_vs_fla']:.2f}x")
            results.extend(rows)
            del inputs, q, k, v, gates
            torch.cuda.empty_cache()
    meta["dense_gqa"] = DENSE_GQA["mode"]
    slug = gpu.lower().replace("nvidia", "").strip().split()[0]
    out = args.out or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", f"training_{slug}.json")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as f:
        json.dump({"meta": meta, "results": results}, f, indent=1)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
