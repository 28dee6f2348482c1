"""Plot tokens/s and the speedup over the dense twin against length from benchmarks/results/model_training_*.json."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.plot_io import read_results, save  # noqa: E402  (sets the Agg backend first)
import matplotlib.pyplot as plt  # noqa: E402


def main():
    data, out = read_results(__doc__)
    rows = sorted(data["results"], key=lambda r: r["seqlen"])
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    for key, label in [("nsa_", "NSA"), ("dense_", "dense twin (sdpa)"), ("nsa_compiled_", "NSA, compiled"),
                       ("dense_compiled_", "dense twin, compiled")]:
        pts = [(r["seqlen"], r[f"{key}tokens_per_s"]) for r in rows if f"{key}tokens_per_s" in r]
        if pts:
            left.plot(*zip(*pts), marker="o", label=label)
    for key, label in [("speedup", "eager"), ("speedup_compiled", "compiled")]:
        pts = [(r["seqlen"], r[key]) for r in rows if key in r]
        if pts:
            right.plot(*zip(*pts), marker="o", label=label)
    right.axhline(1.0, color="gray", lw=0.8, ls="--")
    for ax, title in ((left, "training tokens/s"), (right, "NSA / dense twin")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("sequence length (batch 1)")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    meta = data["meta"]
    fig.suptitle(f"{meta.get('model', '')} step (fwd+bwd+AdamW, gradient checkpointing), {meta.get('gpu', '')}, "
                 f"torch {meta.get('torch', '')}")
    save(fig, out)


if __name__ == "__main__":
    main()
