"""
Launch geometry of the decode kernels: programs per multiprocessor x pipelining stages, timed under CUDA graphs,
plus a per-kernel profile of the default. One run:  python benchmarks/sweep_decode.py
"""

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import nsa_hf.kernels.decode as decode  # noqa: E402
from bench_decode import LAYOUTS, PAPER, graph_ms  # noqa: E402
from nsa_hf.kernels import nsa_decode, num_compressed_blocks  # noqa: E402


def inputs(HQ, HKV, D, T, B, layers):
    nc = num_compressed_blocks(T, PAPER["compress_block_size"], PAPER["compress_stride"])

    def r(*s):
        return torch.randn(*s, device="cuda", dtype=torch.bfloat16)

    caches = [(r(B, T, HKV, D), r(B, T, HKV, D), r(B, nc, HKV, D), r(B, nc, HKV, D)) for _ in range(layers)]
    q, g = r(B, 1, HQ, D), torch.rand(B, 1, HQ, 3, device="cuda", dtype=torch.bfloat16)
    pos = torch.full((B, 1), T - 1, dtype=torch.int32, device="cuda")
    return lambda: [nsa_decode(q, *c, g, pos, **PAPER) for c in caches]


def main():
    T = int(os.environ.get("T", 65536))
    for layout, batch in [("paper", 1), ("paper", 16), ("llama3-8b", 1), ("llama3-8b", 16)]:
        HQ, HKV, D = LAYOUTS[layout]
        layers = 8 if batch == 1 else 2
        fn = inputs(HQ, HKV, D, T, batch, layers)
        line = []
        for ppsm in (2, 4, 8, 16):
            for stages in (1, 3):
                decode._PROGRAMS_PER_SM, decode._NUM_STAGES = ppsm, stages
                line.append(f"{ppsm}/{stages}: {graph_ms(fn) / layers * 1000:6.1f}")
        print(f"{layout:10s} B={batch:2d} T={T} us per step (programs per SM / stages):  " + "  ".join(line),
              flush=True)
        decode._PROGRAMS_PER_SM, decode._NUM_STAGES = 2, 1
        fn()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            for _ in range(5):
                fn()
            torch.cuda.synchronize()
        for e in prof.key_averages():
            if e.device_time_total > 0:
                print(f"    {e.key[:40]:40s} {e.device_time_total / (5 * layers):8.1f} us per step")


if __name__ == "__main__":
    main()
