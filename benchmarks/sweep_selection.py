"""
Block selection's prefill tile against the prompt length: every candidate configuration (`_tiling.SELECTION_CONFIGS`,
pruned per shape) timed at 1k-64k for three layouts, to check that one untimed tile (`Tuning.selection_prefill_tile`)
serves every length. One run:

    python benchmarks/sweep_selection.py > benchmarks/results/logs/selection_configs_<gpu>.log
"""

import json
import os
import sys

import torch
from triton.testing import do_bench

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from nsa_hf.kernels import selection  # noqa: E402
from nsa_hf.kernels._tiling import override  # noqa: E402
from nsa_hf.kernels.utils import num_compressed_blocks  # noqa: E402

LAYOUTS = {"paper": (64, 4, 128), "llama3-8b": (32, 8, 128), "1.1B": (32, 8, 64)}  # query heads, kv heads, head dim
LENGTHS = (1000, 4096, 16384, 65536)
NSA = dict(compress_block_size=32, compress_stride=16, select_block_size=64, num_selected_blocks=16)


def main():
    for layout, (HQ, HKV, D) in LAYOUTS.items():
        for T in LENGTHS:
            q = torch.randn(1, T, HQ, D, device="cuda", dtype=torch.bfloat16)
            k_cmp = torch.randn(1, num_compressed_blocks(T, 32, 16), HKV, D, device="cuda", dtype=torch.bfloat16)
            lse = torch.randn(1, T, HQ, device="cuda") + 5

            def fn():
                return selection.select_blocks(q, k_cmp, lse, *NSA.values())

            times = []
            for index in range(len(selection.SELECTION_CONFIGS)):  # indices past the pruned list repeat its last
                selection._select_kernel_tuned.cache.clear()
                with override(config_index=index):
                    fn()
                    config = str(selection._select_kernel_tuned.best_config).split(", num_ctas")[0]
                    times.append((round(do_bench(fn, warmup=10, rep=50), 4), config))
            selection._select_kernel_tuned.cache.clear()
            print(json.dumps(dict(layout=layout, T=T, ms_by_config=times)), flush=True)


if __name__ == "__main__":
    main()
