"""Plot speedup over dense attention against sequence length from a benchmarks/results/training_*.json file."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.plot_io import read_results, save  # noqa: E402  (sets the Agg backend first)
import matplotlib.pyplot as plt  # noqa: E402


def main():
    data, out = read_results(__doc__)
    # where a file holds several runs of one case, the later row (a re-run of newer code) wins
    latest = {(r["layout"], r["impl"], r["seqlen"]): r for r in data["results"]}
    rows = [r for r in latest.values() if "fwd_speedup_vs_dense" in r and r["impl"] != "dense"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    for ax, key, title in zip(axes, ("fwd_speedup_vs_dense", "fwd_bwd_speedup_vs_dense"), ("forward", "forward + backward")):
        for layout, impl in sorted({(r["layout"], r["impl"]) for r in rows}):
            pts = sorted((r["seqlen"], r[key]) for r in rows if r["layout"] == layout and r["impl"] == impl)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=f"{impl} ({layout})")
        ax.axhline(1.0, color="gray", lw=0.8, ls="--")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("sequence length")
        ax.set_title(f"{title}: speedup over dense cuDNN SDPA")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("speedup (x)")
    axes[1].legend(fontsize=8)
    fig.suptitle(f"{data['meta']['gpu']}, bf16, batch 1, torch {data['meta']['torch']}, triton {data['meta']['triton']}")
    save(fig, out)


if __name__ == "__main__":
    main()
