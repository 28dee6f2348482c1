"""
Code generation of the decode kernels, checked offline for an H100/H200 (sm_90) with Triton's bundled ptxas and
nvdisasm, no GPU: the K/V tiles must load 16 bytes per instruction. Unspecialised batch strides once compiled them to
2-byte loads (8x the instructions, the batch-16 step at a third of the memory bandwidth) with every test still green.
"""

import os
import re

import pytest

from benchmarks import compile_kernels

DECODE_KV_VARIANTS = ["decode_cmp_g16", "decode_cmp_g4_dk192", "decode_sparse_g16", "decode_sparse_g4_dk192"]


@pytest.mark.skipif(not os.path.exists(os.path.join(compile_kernels.TOOLS, "nvdisasm")),
                    reason="this Triton install has no bundled nvdisasm")
@pytest.mark.parametrize("name", DECODE_KV_VARIANTS)
def test_decode_kv_tiles_load_16_bytes_per_instruction(name, tmp_path):
    variant = next(v for v in compile_kernels.VARIANTS if v[0] == name)
    sass = compile_kernels.sass_of(compile_kernels.compile_variant(variant), str(tmp_path / f"{name}.cubin"))
    loads = re.findall(r"\b(?:LDGSTS|LDG)\.E[.A-Z0-9]*", sass)
    narrow = [op for op in loads if "16" in op.split(".")[-1] or op.endswith((".U8", ".S8"))]
    assert not narrow, (f"{name}: {len(narrow)} sub-word global loads {sorted(set(narrow))}; all loads: "
                        f"{compile_kernels.global_loads(sass)}")
    assert sum(op.endswith(".128") for op in loads) >= 16, compile_kernels.global_loads(sass)
