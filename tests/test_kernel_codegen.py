"""
Code generation of the decode kernels, checked offline for an H100/H200 (sm_90) with Triton's bundled ptxas and
nvdisasm, no GPU: the K/V tiles must load 16 bytes per instruction. Unspecialised batch strides once compiled them to
2-byte loads (8x the instructions, the batch-16 step at a third of the memory bandwidth) with every test still green.
`benchmarks/compile_kernels.py` runs in its own process: the CPU suite's kernels are the interpreter's.
"""

import os
import re
import subprocess
import sys

import pytest
import triton

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DECODE_KV_VARIANTS = ["decode_cmp_g16", "decode_cmp_g4_dk192", "decode_sparse_g16", "decode_sparse_g4_dk192"]


@pytest.mark.skipif(not os.path.exists(os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin",
                                                    "nvdisasm")), reason="this Triton install has no bundled nvdisasm")
def test_decode_kv_tiles_load_16_bytes_per_instruction():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "compile_kernels.py"), "--only",
                          ",".join(DECODE_KV_VARIANTS)], capture_output=True, text=True, env=env, timeout=600)
    assert run.returncode == 0, run.stdout + run.stderr
    lines = {line.split()[0]: line for line in run.stdout.splitlines() if line.strip()}
    assert sorted(lines) == sorted(DECODE_KV_VARIANTS), run.stdout
    for name, line in lines.items():
        loads = line.split("global loads", 1)[1]
        assert not re.search(r"\b(16|8)b x", loads), f"sub-word global loads: {line}"
        wide = sum(int(n) for n in re.findall(r"128b x(\d+)", loads))  # direct and async-to-shared ones
        assert wide >= 16, f"too few 16-byte loads: {line}"
