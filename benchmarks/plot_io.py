"""What the plot scripts share: the command line (a results JSON, `--out`), reading it, writing the PNG beside it."""

import argparse
import json
import os

import matplotlib

matplotlib.use("Agg")


def read_results(description: str) -> tuple[dict, str]:
    """Parse `json_path [--out PNG]`; returns the JSON's contents and the PNG path (default: beside the JSON)."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("json_path")
    parser.add_argument("--out", default=None, help="PNG path (default: beside the JSON)")
    args = parser.parse_args()
    with open(args.json_path) as f:
        data = json.load(f)
    return data, args.out or os.path.splitext(args.json_path)[0] + ".png"


def save(fig, out: str) -> None:
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    print(f"wrote {out}")
