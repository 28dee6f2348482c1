"""
Compile representative variants of every Triton kernel of nsa-hf for a GPU architecture, without a GPU (Triton's
NVIDIA backend and its bundled ptxas / cuobjdump run on any machine), and print registers, spill stack, shared
memory and global loads by width per variant; `--dump DIR` also writes PTX and SASS, so two checkouts can be
compared with `diff -r`.

    python benchmarks/compile_kernels.py                  # sm_90 (H100 / H200)
    python benchmarks/compile_kernels.py --arch 100 --dump /tmp/sass

The signatures assume what the launches usually get (16-byte aligned pointers, strides that are multiples of 16) and
no other integer specialisation; compare variants and checkouts rather than reading the numbers as exact.
"""

import argparse
import os
import re
import subprocess
import sys
import tempfile

if __name__ == "__main__":
    os.environ.pop("TRITON_INTERPRET", None)  # the real kernels, not the interpreter's (imported: the caller's choice)
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

from nsa_hf.kernels import band_attention, band_attention_bwd, decode, nsa, selected_reverse, selected_tiles  # noqa: E402
from nsa_hf.kernels import selection  # noqa: E402

TOOLS = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")

KERNELS = dict(
    band_fwd=band_attention._band_fwd_kernel, band_dq=band_attention_bwd._band_dq_kernel,
    band_dkdv=band_attention_bwd._band_dkdv_kernel, union=selected_tiles._union_kernel,
    sel_fwd=selected_tiles._fwd_kernel, sel_dq=selected_tiles._dq_kernel, sel_by_block=selected_reverse._fwd_by_block_kernel,
    sel_dkdv=selected_reverse._dkdv_kernel, delta=selected_reverse._delta_kernel, select=selection._select_kernel,
    gate_fwd=nsa._gate_combine_fwd_kernel, gate_bwd=nsa._gate_combine_bwd_kernel,
    decode_cmp=decode._cmp_kernel, decode_select=decode._select_kernel, decode_sparse=decode._sparse_kernel,
)
# pointer arguments by name; every other argument without a constexpr is an int32 unless it is a scale
FP32 = {"LSE", "DELTA", "LSE_E", "OACC", "DKA", "DVA", "DQA", "deltas"}
I64 = {"UM", "WS", "CAND"}
BF16 = {"Q", "K", "V", "O", "DO", "DQ", "KC", "DK_OUT", "DV_OUT", "o_cmp", "o_slc", "o_win", "gates", "out", "do",
        "do_cmp", "do_slc", "do_win", "dgates", "VC", "KW", "VW"}
I32 = {"TILE_DOC", "TILE_CUM", "TILE_DOC_S", "TILE_CUM_S", "TILE_DOC_L", "TILE_CUM_L", "CU_Q", "CU_K", "CU_N", "CU_C",
       "UB", "UC", "IDX", "POS", "QPOS", "TILE_ROW0", "ITEM_BUCKET", "ITEM_SEG", "BUCKET_OFF", "BLK_DOC", "BLK_OFF", "OUT"}
FLOATS = {"qk_scale", "sm_scale", "scale", "scale_log2"}

BAND = dict(DOT_PREC="tf32", BLOCK_DK1=128, BLOCK_DK2=0, BLOCK_DV1=128, BLOCK_DV2=0)
DK192 = dict(BLOCK_DK2=64)
SEL = dict(HKV=4, L=64, N=16, NP=16, DK=128, DV=128, BK1=128, BK2=0, BV=128, BN=64, PREC="tf32")
DECODE = dict(Q_LEN=1, HKV=4, GP=16, DK=128, BK1=128, BK2=0, DV=128, BV=128, CMP_LEN=32, STRIDE=16, SEL_LEN=64, R=4,
              C=2, BN=64, NJ=16, PREC="tf32")
DECODE_PARTIALS = ("M_SPLIT", "L_SPLIT", "ACC_SPLIT", "M_CHUNK", "OWN", "SPILL", "M_UNIT", "L_UNIT", "ACC_UNIT")
# (name, kernel, warps, stages, fp32 outputs, constexprs): paper layout (G=16), llama3 (G=4), DK 192 = 128 + 64
VARIANTS = [
    ("band_fwd_window_g16", "band_fwd", 8, 3, (), dict(BAND, G=16, HG=16, NUM_HC=1, BLOCK_T=8, BLOCK_M=128,
     WINDOWED=True, VARLEN=False, REVERSE=False, BLOCK_N=64, SPLIT=False)),
    ("band_fwd_cmp_dk192_varlen_split", "band_fwd", 8, 3, (), dict(BAND, **DK192, G=4, HG=4, NUM_HC=1, BLOCK_T=32,
     BLOCK_M=128, WINDOWED=False, VARLEN=True, REVERSE=True, BLOCK_N=64, SPLIT=True)),
    ("band_dq_window_g16", "band_dq", 8, 3, (), dict(BAND, G=16, HG=16, NUM_HC=1, BLOCK_T=8, BLOCK_M=128,
     WINDOWED=True, VARLEN=False, REVERSE=False, COMPUTE_DELTA=False, BLOCK_N=32, SPLIT=False)),
    ("band_dq_cmp_dk192_varlen_delta", "band_dq", 8, 3, (), dict(BAND, **DK192, G=4, HG=4, NUM_HC=1, BLOCK_T=32,
     BLOCK_M=128, WINDOWED=False, VARLEN=True, REVERSE=True, COMPUTE_DELTA=True, BLOCK_N=32, SPLIT=True)),
    ("band_dkdv_window_g4", "band_dkdv", 8, 3, (), dict(BAND, G=4, WINDOWED=True, VARLEN=False, ATOMIC=False,
     BLOCK_N_S=64, BLOCK_N=64, BLOCK_M=32, HG=4, NUM_HC=1, BLOCK_T=8)),
    ("band_dkdv_cmp_g16_atomic", "band_dkdv", 8, 3, ("DK_OUT", "DV_OUT"), dict(BAND, G=16, WINDOWED=False, VARLEN=True,
     ATOMIC=True, BLOCK_N_S=64, BLOCK_N=64, BLOCK_M=32, HG=16, NUM_HC=1, BLOCK_T=2)),
    ("union_g4", "union", 4, 2, (), dict(HKV=4, G=4, L=64, N=16, NP=16, PP=16, BM=64, VARLEN=True)),
    ("sel_fwd_g16_direct", "sel_fwd", 4, 2, (), dict(SEL, G=16, BM=16, DIRECT=True, VARLEN=False, DECODE=False)),
    ("sel_fwd_g4_union_varlen", "sel_fwd", 8, 3, (), dict(SEL, HKV=8, G=4, BM=64, DIRECT=False, VARLEN=True,
     DECODE=False)),
    ("sel_dq_g16_direct", "sel_dq", 4, 2, (), dict(SEL, G=16, BM=16, DIRECT=True, VARLEN=False)),
    ("sel_dq_g4_union_dk192", "sel_dq", 8, 2, (), dict(SEL, HKV=8, G=4, BM=64, DIRECT=False, VARLEN=True, DK=192,
     BK2=64)),
    ("sel_dkdv_fused_g4", "sel_dkdv", 8, 2, (), dict(SEL, HKV=8, G=4, BM=32, FUSE_DQ=True, VARLEN=True)),
    ("sel_dkdv_g16", "sel_dkdv", 8, 3, (), dict(SEL, G=16, BM=32, FUSE_DQ=False, VARLEN=False)),
    ("sel_by_block_pass0_g4", "sel_by_block", 4, 2, (), dict(SEL, HKV=8, G=4, BM=64, PASS=0, VARLEN=True)),
    ("sel_by_block_pass1_g4", "sel_by_block", 4, 2, (), dict(SEL, HKV=8, G=4, BM=64, PASS=1, VARLEN=False)),
    ("sel_by_block_pass1_g16", "sel_by_block", 8, 2, (), dict(SEL, G=16, BM=64, PASS=1, VARLEN=False)),
    ("delta", "delta", 4, 2, (), dict(DV=128, BLOCK_R=64, BLOCK_D=128)),
    ("select_paper", "select", 8, 2, (), dict(HKV=4, G=16, G_PAD=16, DK=128, D1=128, D2=0, CMP_LEN=32, STRIDE=16,
     SEL_LEN=64, R=4, R_PAD=4, C=2, N=16, N_PAD=16, N_INIT=1, N_LOCAL=2, VARLEN=False, SPLIT=False, FP32_DOT=False,
     ROWS=128, BS=16, HEAD_MASK=selection._head_mask(128, 8, 16))),
    ("gate_fwd", "gate_fwd", 4, 2, (), dict(DV=128, BR=32, BD=128)),
    ("gate_bwd", "gate_bwd", 4, 2, (), dict(DV=128, BR=32, BD=128)),
    # decoding (one query per row): paper layout, llama3 (G=4), DK 192 = 128 + 64
    ("decode_cmp_g16", "decode_cmp", 4, 1, DECODE_PARTIALS, dict(DECODE, G=16, STAGES=decode._CMP_STAGES)),
    ("decode_cmp_g4_dk192", "decode_cmp", 4, 1, DECODE_PARTIALS, dict(DECODE, G=4, DK=192, BK2=64,
     STAGES=decode._CMP_STAGES)),
    ("decode_select_g16", "decode_select", 4, 1, DECODE_PARTIALS, dict(DECODE, G=16, SP=64, NP=16, N_INIT=1,
     N_LOCAL=2, BS=128)),
    ("decode_sparse_g16", "decode_sparse", 4, 1, DECODE_PARTIALS, dict(DECODE, G=16, N=16, WINDOW=512, NUM_WIN=8,
     PER_UNIT=1, SEL_UNITS=16, NUM_UNITS=24, NP=16, CP=8, BN=64, STAGES=1)),
    ("decode_sparse_g4_dk192", "decode_sparse", 4, 1, DECODE_PARTIALS, dict(DECODE, G=4, DK=192, BK2=64, N=16,
     WINDOW=512, NUM_WIN=8, PER_UNIT=5, SEL_UNITS=4, NUM_UNITS=6, NP=16, CP=4, BN=64, STAGES=1)),
]


def jit_function(kernel):
    while not isinstance(kernel, JITFunction):  # autotuners and heuristics wrap the JITFunction
        kernel = kernel.fn
    return kernel


def global_loads(sass: str) -> str:
    """
    Global loads by width, direct (LDG) and asynchronous to shared memory (LDGSTS), e.g. `128b x8 async-128b x24`:
    narrow loads of a K/V tile mean lost vectorisation.
    """
    counts = {}
    for op in re.findall(r"\b(?:LDGSTS|LDG)\.E[.A-Z0-9]*", sass):
        bits = next((b for tag, b in ((".128", 128), (".64", 64), ("16", 16), ("U8", 8), ("S8", 8)) if tag in op), 32)
        key = ("async-" if op.startswith("LDGSTS") else "", bits)
        counts[key] = counts.get(key, 0) + 1
    ordered = sorted(counts.items(), key=lambda item: (item[0][0], -item[0][1]))  # direct first, widest first
    return " ".join(f"{kind}{bits}b x{n}" for (kind, bits), n in ordered)


def signature(fn, constexprs, fp32_outputs):
    sig = {}
    for param in fn.params:
        name = param.name
        if param.is_constexpr or name in constexprs:
            sig[name] = "constexpr"
        elif name in FP32 or name in fp32_outputs:
            sig[name] = "*fp32"
        elif name in I64:
            sig[name] = "*i64"
        elif name in BF16:
            sig[name] = "*bf16"
        elif name in I32:
            sig[name] = "*i32"
        elif name in FLOATS:
            sig[name] = "fp32"
        else:
            sig[name] = "i32"
    return sig


def compile_variant(variant, arch: int = 90, divisible: frozenset = frozenset()):
    """
    Compile one VARIANTS entry for `arch` as a launch would: 16-byte aligned pointers, strides that are multiples of
    16 unless the kernel says `do_not_specialize` (then the compiler gets no divisibility hint for them either),
    `divisible` integer arguments as multiples of 16. Returns Triton's compiled kernel.
    """
    name, kernel, warps, stages, fp32_outputs, constexprs = variant
    fn = jit_function(KERNELS[kernel])
    constexprs = {k: v for k, v in constexprs.items() if k in fn.arg_names}
    sig = signature(fn, constexprs, fp32_outputs)
    unspecialised = {fn.arg_names[i] if isinstance(i, int) else i for i in fn.do_not_specialize} - set(divisible)
    aligned = {(i,): [["tt.divisibility", 16]] for i, (arg, kind) in enumerate(sig.items())
               if kind.startswith("*") or (kind == "i32" and (arg.startswith("stride_") or arg in divisible)
                                           and arg not in unspecialised)}
    src = ASTSource(fn, signature=sig, constexprs=constexprs, attrs=aligned)
    return triton.compile(src, target=GPUTarget("cuda", arch, 32), options={"num_warps": warps, "num_stages": stages})


def sass_of(compiled, cubin_path: str) -> str:
    """SASS text of a compiled kernel (Triton's bundled nvdisasm); the cubin is written to `cubin_path`."""
    with open(cubin_path, "wb") as f:
        f.write(compiled.asm["cubin"])
    return subprocess.run([os.path.join(TOOLS, "nvdisasm"), "-c", cubin_path], capture_output=True, text=True,
                          check=True).stdout


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", type=int, default=90, help="compute capability x10 (90: H100/H200)")
    parser.add_argument("--dump", default=None, help="write <variant>.ptx / .sass here")
    parser.add_argument("--only", default=None, help="comma-separated variant names")
    parser.add_argument("--divisible", default="", help="comma-separated integer arguments compiled as multiples of 16"
                        " (as a launch specialises them when they are): compare with and without for do_not_specialize")
    args = parser.parse_args()
    only = set(args.only.split(",")) if args.only else None
    divisible = set(filter(None, args.divisible.split(",")))
    if args.dump:
        os.makedirs(args.dump, exist_ok=True)
    failed = 0
    for variant in VARIANTS:
        name = variant[0]
        if only and name not in only:
            continue
        try:
            compiled = compile_variant(variant, args.arch, frozenset(divisible))
        except Exception as err:  # report every variant
            failed += 1
            print(f"{name:<36} FAILED {type(err).__name__}: {str(err)[:500]}", flush=True)
            continue
        usage = loads = ""
        cubin = os.path.join(args.dump or tempfile.gettempdir(), f"{name}.cubin")
        try:
            sass = sass_of(compiled, cubin)
            res = subprocess.run([os.path.join(TOOLS, "cuobjdump"), "-res-usage", cubin], capture_output=True,
                                 text=True)
            usage = " ".join(re.findall(r"(?:REG|STACK):\d+", res.stdout)[:2])
            loads = global_loads(sass)
            if args.dump:
                with open(os.path.join(args.dump, f"{name}.sass"), "w") as f:
                    f.write(sass)
        except (OSError, subprocess.CalledProcessError):
            usage = "(no cuobjdump)"
        if args.dump:
            with open(os.path.join(args.dump, f"{name}.ptx"), "w") as f:
                f.write(compiled.asm["ptx"])
        else:
            os.remove(cubin)
        print(f"{name:<36} ok  {usage:<20} shared {compiled.metadata.shared:>7} B  global loads {loads}", flush=True)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
