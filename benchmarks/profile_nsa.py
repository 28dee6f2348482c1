"""
Where the time of one NSA forward+backward goes: per-kernel CUDA time from torch.profiler, for one layout and length.

    python benchmarks/profile_nsa.py --layout paper --seqlen 65536
"""

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.bench_training import LAYOUTS, make_inputs, ours  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--layout", nargs="+", default=["paper"], choices=list(LAYOUTS))
    parser.add_argument("--seqlen", type=int, nargs="+", default=[65536])
    parser.add_argument("--rows", type=int, default=18)
    args = parser.parse_args()
    for layout in args.layout:
        for T in args.seqlen:
            profile(layout, T, args.rows)


def profile(layout, T, rows):
    HQ, HKV, D, settings = LAYOUTS[layout]
    q, k, v, gates, do = make_inputs(T, HQ, HKV, D)

    def step():
        out = ours(q, k, v, gates, settings)
        out.backward(do)
        for t in (q, k, v, gates):
            t.grad = None

    for _ in range(3):  # compile and autotune outside the profile
        step()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(3):
            step()
        torch.cuda.synchronize()
    events = [e for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA]
    total = sum(e.device_time_total for e in events) / 3 / 1e3
    print(f"\n{layout} T={T}: {total:.2f} ms of GPU kernel time per forward+backward")
    for e in sorted(events, key=lambda e: -e.device_time_total)[:rows]:
        ms = e.device_time_total / 3 / 1e3
        print(f"  {ms:8.2f} ms {100 * ms / total:5.1f}%  x{e.count // 3:<3d} {e.key[:90]}")


if __name__ == "__main__":
    main()
