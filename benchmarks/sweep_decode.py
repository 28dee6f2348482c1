"""
Launch geometry of the decode kernels (programs per multiprocessor, loop pipelining stages, the combine's warps),
timed under CUDA graphs, plus a per-kernel profile of the default and of the fastest setting. One run:
python benchmarks/sweep_decode.py
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


# (programs per SM of the compressed pass, its loop's stages, the sparse units' loop's stages, programs per SM of
# the selection and the sparse units, the combine's warps): the defaults first, then their neighbours and the
# pre-c84c4ce launch
KNOBS = ("_CMP_PROGRAMS_PER_SM", "_CMP_STAGES", "_SPARSE_STAGES", "_PROGRAMS_PER_SM", "_COMBINE_WARPS")
SETTINGS = [tuple(getattr(decode, knob) for knob in KNOBS), (4, 1, 1, 4, 4), (2, 3, 1, 8, 2), (4, 2, 1, 8, 2),
            (2, 2, 2, 8, 2), (2, 2, 1, 4, 2), (2, 2, 1, 8, 1), (2, 2, 1, 16, 2)]


def use(setting):
    for knob, value in zip(KNOBS, setting):
        setattr(decode, knob, value)


def profile(fn, layers):
    """Device microseconds per step of each kernel of `fn` (5 steps under torch.profiler)."""
    fn()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(5):
            fn()
        torch.cuda.synchronize()
    return {e.key[:40]: e.device_time_total / (5 * layers) for e in prof.key_averages() if e.device_time_total > 0}


def main():
    T = int(os.environ.get("T", 65536))
    default = SETTINGS[0]
    for layout, batch in [("paper", 1), ("paper", 16), ("llama3-8b", 1), ("llama3-8b", 16)]:
        HQ, HKV, D = LAYOUTS[layout]
        layers = 8 if batch == 1 else 2
        fn = inputs(HQ, HKV, D, T, batch, layers)
        timed = {}
        for setting in SETTINGS:
            use(setting)
            timed[setting] = graph_ms(fn) / layers * 1000
        print(f"{layout:10s} B={batch:2d} T={T} us per step (cmp programs per SM / cmp stages / sparse stages / "
              "select+sparse programs per SM / combine warps):  "
              + "  ".join(f"{'/'.join(map(str, k))}: {us:6.1f}" for k, us in timed.items()), flush=True)
        for setting in dict.fromkeys((default, min(timed, key=timed.get))):
            use(setting)
            kernels = "  ".join(f"{name} {us:.1f}" for name, us in profile(fn, layers).items())
            print(f"    {'/'.join(map(str, setting))} per kernel (us per step): {kernels}", flush=True)
        use(default)


if __name__ == "__main__":
    main()
