"""
Selected-attention strategy sweep on real selections (bf16, CUDA): forward ms per query-tile height `block_m` and for
the key-centric forward (`selected_fwd="by_block"`), backward ms with dQ fused into the dK/dV pass (atomics) or in its
own tiled pass per `block_m`. Every variant is chosen through the testing hook `nsa_hf.kernels._tiling.override`.

    python benchmarks/sweep_selected.py paper,llama3-8b 8192,65536            # everything
    python benchmarks/sweep_selected.py paper,llama3-8b 8192,65536 fwd        # forward only
    python benchmarks/sweep_selected.py paper,llama3-8b 8192,65536 compare    # tiled vs by_block, side by side

`compare` times, per layout and length, the selected forward with the default tiled heuristic and with by_block, the
whole NSA forward (and forward+backward) with each, and the largest differences of o and lse between the two; with
`--json PATH` it also writes the rows.
"""

import argparse
import json
import os
import sys

import torch
from triton.testing import do_bench

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.bench_training import LAYOUTS, make_inputs, ours  # noqa: E402
from nsa_hf.kernels import unfold_compression_blocks  # noqa: E402
from nsa_hf.kernels._geometry import geometry  # noqa: E402
from nsa_hf.kernels._tiling import override  # noqa: E402
from nsa_hf.kernels.compressed import compressed_attention_fwd  # noqa: E402
from nsa_hf.kernels.selected import selected_attention_bwd, selected_attention_fwd  # noqa: E402
from nsa_hf.kernels.selection import select_blocks_fwd  # noqa: E402


def ms(fn):
    return do_bench(fn, warmup=50, rep=200, return_mode="median")


def real_selection(q, k, settings):
    """Block indices as NSA computes them (mean-pooled keys, compressed attention, top-n), and the geometry."""
    l, d, lp, n = (settings[key] for key in
                   ("compress_block_size", "compress_stride", "select_block_size", "num_selected_blocks"))
    geo = geometry(q, k.shape[1])
    scale = q.shape[-1] ** -0.5
    kc = unfold_compression_blocks(k, l, d).mean(2)
    _, lse = compressed_attention_fwd(q, kc, kc, l, d, scale, geo)
    return select_blocks_fwd(q, kc, lse, geo, l, d, lp, n, 1, 2, scale), geo, scale


def sweep(layout, T, forward_only):
    HQ, HKV, D, s = LAYOUTS[layout]
    q, k, v, _, do = make_inputs(T, HQ, HKV, D)
    q, k, v = q.detach(), k.detach(), v.detach()
    lp = s["select_block_size"]
    idx, geo, scale = real_selection(q, k, s)

    def fwd():
        return selected_attention_fwd(q, k, v, idx, lp, scale, geo)

    o, lse = fwd()
    with override(selected_fwd="by_block"):
        print(f"{layout:<10} T={T:6d} fwd by_block: {ms(fwd):7.2f} ms", flush=True)
    if not forward_only:
        with override(selected_dq="fused"):
            fused = ms(lambda: selected_attention_bwd(do, q, k, v, o, lse, idx, lp, scale, geo))
        print(f"{layout:<10} T={T:6d} bwd dq fused: {fused:7.2f} ms", flush=True)
    for bm in (16, 32, 64):
        try:
            with override(selected_fwd="tiled", selected_block_m=bm, selected_dq="tiled"):
                line = f"{layout:<10} T={T:6d} block_m={bm:4d}: fwd {ms(fwd):7.2f} ms"
                if not forward_only:
                    b = ms(lambda: selected_attention_bwd(do, q, k, v, o, lse, idx, lp, scale, geo))
                    line += f"  bwd dq tiled {b:7.2f} ms"
            print(line, flush=True)
        except Exception as err:
            print(f"{layout:<10} T={T:6d} block_m={bm:4d}: {type(err).__name__}: {str(err)[:100]}", flush=True)


def compare(layout, T):
    """Tiled (the default heuristic) vs by_block: selected forward, whole NSA forward and forward+backward."""
    HQ, HKV, D, s = LAYOUTS[layout]
    q, k, v, gates, do = make_inputs(T, HQ, HKV, D)
    lp = s["select_block_size"]
    qd, kd, vd = q.detach(), k.detach(), v.detach()
    idx, geo, scale = real_selection(qd, kd, s)
    row = {"layout": layout, "seqlen": T, "q_heads": HQ, "kv_heads": HKV, "group": HQ // HKV}
    results = {}
    for mode in ("tiled", "by_block"):
        with override(selected_fwd=mode):
            results[mode] = selected_attention_fwd(qd, kd, vd, idx, lp, scale, geo)
            row[f"selected_fwd_{mode}_ms"] = ms(lambda: selected_attention_fwd(qd, kd, vd, idx, lp, scale, geo))

            def nsa_fwd():
                with torch.no_grad():
                    ours(q, k, v, gates, s)

            def nsa_fwd_bwd():
                ours(q, k, v, gates, s).backward(do)
                for t in (q, k, v, gates):
                    t.grad = None

            row[f"nsa_fwd_{mode}_ms"] = ms(nsa_fwd)
            row[f"nsa_fwd_bwd_{mode}_ms"] = ms(nsa_fwd_bwd)
    (o_t, lse_t), (o_b, lse_b) = results["tiled"], results["by_block"]
    row["max_abs_diff_o"] = (o_t.float() - o_b.float()).abs().max().item()
    finite = torch.isfinite(lse_t)
    row["max_abs_diff_lse"] = (lse_t[finite] - lse_b[finite]).abs().max().item() if finite.any() else 0.0
    row["same_empty_rows"] = bool(torch.equal(torch.isneginf(lse_t), torch.isneginf(lse_b)))
    for key in ("selected_fwd", "nsa_fwd", "nsa_fwd_bwd"):
        row[f"{key}_by_block_speedup"] = row[f"{key}_tiled_ms"] / row[f"{key}_by_block_ms"]
    print(
        f"{layout:<10} T={T:6d} G={HQ // HKV:2d} | selected fwd tiled {row['selected_fwd_tiled_ms']:7.2f} "
        f"by_block {row['selected_fwd_by_block_ms']:7.2f} ms ({row['selected_fwd_by_block_speedup']:.2f}x) | "
        f"nsa fwd {row['nsa_fwd_tiled_ms']:7.2f} / {row['nsa_fwd_by_block_ms']:7.2f} | "
        f"nsa f+b {row['nsa_fwd_bwd_tiled_ms']:7.2f} / {row['nsa_fwd_bwd_by_block_ms']:7.2f} | "
        f"max |do| {row['max_abs_diff_o']:.2e} |dlse| {row['max_abs_diff_lse']:.2e}",
        flush=True,
    )
    return row


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("layouts", help="comma-separated: " + ",".join(LAYOUTS))
    parser.add_argument("seqlens", help="comma-separated, e.g. 8192,65536")
    parser.add_argument("mode", nargs="?", default="all", choices=["all", "fwd", "compare"])
    parser.add_argument("--json", default=None, help="with `compare`: write the rows here")
    args = parser.parse_args()
    rows = []
    for layout in args.layouts.split(","):
        for T in (int(x) for x in args.seqlens.split(",")):
            if args.mode == "compare":
                rows.append(compare(layout, T))
            else:
                sweep(layout, T, forward_only=args.mode == "fwd")
            torch.cuda.empty_cache()
    if args.json and rows:
        meta = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__}
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "results": rows}, f, indent=1)
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
