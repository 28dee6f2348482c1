"""Plot benchmarks/results/decode_*.json: attention decode step speedup over dense SDPA, model decode ms/token, cold start."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.plot_io import read_results, save  # noqa: E402  (sets the Agg backend first)
import matplotlib.pyplot as plt  # noqa: E402


def main():
    data, out = read_results(__doc__)
    rows = data["results"]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))

    ax = axes[0]
    kernel = [r for r in rows if r["case"] == "attention_decode_step"]
    for layout, batch in sorted({(r["layout"], r["batch"]) for r in kernel}):
        mine = [r for r in kernel if (r["layout"], r["batch"]) == (layout, batch)]
        pts = sorted((r["cache_len"], r["speedup_vs_dense"]) for r in mine)
        commits = "/".join(sorted({r.get("commit", "?") for r in mine}))
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=f"{layout}, batch {batch} ({commits})")
    ax.axhline(1.0, color="gray", lw=0.8, ls="--")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("cached tokens")
    ax.set_ylabel("speedup over dense SDPA (x)")
    ax.set_title("attention decode step (CUDA graphs)")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)

    ax = axes[1]
    model = [r for r in rows if r["case"] == "model_decode"]
    labels, values, colors = [], [], []
    for r in model:
        for key, color in (("nsa_static", "C0"), ("dense_static", "C1"), ("nsa_dynamic", "C2"),
                           ("dense_dynamic", "C3")):
            if f"{key}_ms_per_token" in r:
                labels.append(f"{key}\nB={r['batch']} {r['prompt_len'] // 1024}k")
                values.append(r[f"{key}_ms_per_token"])
                colors.append(color)
    ax.bar(range(len(values)), values, color=colors)
    ax.set_xticks(range(len(values)), labels, fontsize=6, rotation=60)
    ax.set_ylabel("ms per token")
    ax.set_title("1.1B model, generate() after the prompt")

    ax = axes[2]
    cold = sorted((r for r in rows if r["case"] == "coldstart_prefill"), key=lambda r: r["prompt_len"])
    ax.plot([r["prompt_len"] for r in cold], [r["first_s"] for r in cold], marker="o", label="first call")
    ax.plot([r["prompt_len"] for r in cold], [r["second_s"] for r in cold], marker="o", label="second call")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("prompt length (never seen before)")
    ax.set_ylabel("prefill seconds")
    ax.set_title("cold start (NSA model forward)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    meta = data["meta"]
    fig.suptitle(f"{meta['gpu']}, bf16, torch {meta['torch']}, triton {meta['triton']}, transformers {meta['transformers']}")
    save(fig, out)


if __name__ == "__main__":
    main()
