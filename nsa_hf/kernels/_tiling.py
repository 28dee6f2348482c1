"""
Tiling helpers and switches shared by every Triton kernel of nsa-hf: one copy of each, read once.
"""

import os

import torch
import triton

LOG2E = 1.4426950408889634  # softmax in base 2: exp(x) = exp2(x * LOG2E)
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"  # kernels run in Triton's CPU interpreter (tests)

next_pow2 = triton.next_power_of_2

MAX_DECODE_QUERIES = 16  # new queries per sequence the decode kernels take; longer chunks use the training kernels


def split_head_dim(d: int) -> tuple[int, int]:
    """
    Two power-of-two pieces (each >= 16, the second may be 0) covering head dim `d` with little padding, so that a
    non-power-of-two dim wastes little tensor-core work: 192 -> (128, 64), 96 -> (64, 32), 128 -> (128, 0),
    112 -> (128, 0) (one masked piece is cheaper than 64 + 64). Pieces past `d` are masked loads.
    """
    if d <= 16:
        return 16, 0
    p = 1 << (d.bit_length() - 1)
    if p == d:
        return d, 0
    rest = max(16, next_pow2(d - p))
    if p + rest >= next_pow2(d):
        return next_pow2(d), 0
    return p, rest


def dot_precision(dtype: torch.dtype) -> str:
    """`tl.dot` precision: exact fp32 products for float32 inputs (tests), tensor cores otherwise."""
    return "ieee" if dtype == torch.float32 else "tf32"
