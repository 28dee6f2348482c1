"""
Selected-attention strategy sweep on real selections (bf16, CUDA): forward ms per query-tile height `block_m` and
for the key-centric `fwd_mode="by_block"`, and backward ms with dQ fused into the dK/dV pass (atomics) or in its own
tiled pass per `block_m`.

    python benchmarks/sweep_selected.py paper,llama3-8b 8192,65536 [fwd]   # fwd: forward only
"""

import os
import sys

import torch
from triton.testing import do_bench

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.bench_training import LAYOUTS, make_inputs  # noqa: E402
from nsa_hf.kernels import unfold_compression_blocks  # noqa: E402
from nsa_hf.kernels.compressed import compressed_attention_fwd  # noqa: E402
from nsa_hf.kernels.selected import selected_attention_bwd, selected_attention_fwd  # noqa: E402
from nsa_hf.kernels.selection import select_blocks  # noqa: E402


def ms(fn):
    return do_bench(fn, warmup=50, rep=200, return_mode="median")


forward_only = len(sys.argv) > 3 and sys.argv[3] == "fwd"
for layout in sys.argv[1].split(","):
    HQ, HKV, D, s = LAYOUTS[layout]
    for T in [int(x) for x in sys.argv[2].split(",")]:
        q, k, v, _, do = make_inputs(T, HQ, HKV, D)
        q, k, v = q.detach(), k.detach(), v.detach()
        l, d, lp, n = s["compress_block_size"], s["compress_stride"], s["select_block_size"], s["num_selected_blocks"]
        kc = unfold_compression_blocks(k, l, d).mean(2)
        _, lse = compressed_attention_fwd(q, kc, kc, l, d)
        idx = select_blocks(q, kc, lse, l, d, lp, n)
        o, lse_s = selected_attention_fwd(q, k, v, idx, lp)
        by_block = ms(lambda: selected_attention_fwd(q, k, v, idx, lp, fwd_mode="by_block"))
        print(f"{layout:<10} T={T:6d} fwd by_block: {by_block:7.2f} ms", flush=True)
        if not forward_only:
            fused = ms(lambda: selected_attention_bwd(do, q, k, v, o, lse_s, idx, lp, dq_mode="fused"))
            print(f"{layout:<10} T={T:6d} bwd dq fused: {fused:7.2f} ms", flush=True)
        for bm in (16, 32, 64):
            try:
                f = ms(lambda: selected_attention_fwd(q, k, v, idx, lp, block_m=bm))
                line = f"{layout:<10} T={T:6d} block_m={bm:4d}: fwd {f:7.2f} ms"
                if not forward_only:
                    b = ms(lambda: selected_attention_bwd(do, q, k, v, o, lse_s, idx, lp, block_m=bm, dq_mode="tiled"))
                    line += f"  bwd dq tiled {b:7.2f} ms"
                print(line, flush=True)
            except Exception as err:
                print(f"{layout:<10} T={T:6d} block_m={bm:4d}: {type(err).__name__}: {str(err)[:100]}", flush=True)
