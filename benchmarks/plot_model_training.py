"""Plot tokens/s and the speedup over the dense twin against length from benchmarks/results/model_training_*.json."""

import argparse
import json
import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("json_path")
    parser.add_argument("--out", default=None, help="PNG path (default: beside the JSON)")
    args = parser.parse_args()
    with open(args.json_path) as f:
        data = json.load(f)
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
    fig.tight_layout()
    out = args.out or os.path.splitext(args.json_path)[0] + ".png"
    fig.savefig(out, dpi=120)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
