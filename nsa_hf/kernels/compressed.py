"""
Attention over compressed keys (the `cmp` branch of NSA, Eq. 7) in Triton: the query at position t sees compressed
block i iff `i * d + l - 1 <= t` (the block [i*d, i*d + l) is complete).

Same conventions as `nsa_hf.kernels.reference.compressed_attention_ref`; packed documents keep their compressed keys
packed per `nsa_hf.kernels.utils.compressed_cu_seqlens(cu_seqlens_k, l, d)`. A query that sees no block gets o = 0 and
lse = -inf, with no NaN forward or backward. The kernels are the band kernels (`band_attention.py`,
`band_attention_bwd.py`) with key_stride d, key_end l - 1 and no window: a query tile visits only the compressed-key
tiles up to floor((t_max + 1 - l) / d); the dK/dV pass splits the long causal band into query chunks that add up with
fp32 atomics.
"""

import torch

from ._checks import check_int, check_kernel_inputs, check_packing, check_qkv
from ._geometry import Geometry, geometry
from ._tiling import SWITCHES
from .band_attention import NO_WINDOW, band_attention_fwd, last_dim_contiguous
from .band_attention_bwd import band_attention_bwd, default_q_chunk


def compressed_attention_fwd(q, k_cmp, v_cmp, compress_block_size: int, compress_stride: int, scale: float,
                             geo: Geometry):
    """
    Forward of compressed attention on checked inputs (`compressed_attention`'s shapes; `scale` resolved; `geo` the
    call's geometry, whose key length is the uncompressed one). Returns (o `[B, Tq, HQ, DV]` in q's dtype, lse
    `[B, Tq, HQ]` float32, -inf where no block is complete).
    """
    l, d = compress_block_size, compress_stride
    q, k_cmp, v_cmp = last_dim_contiguous(q), last_dim_contiguous(k_cmp), last_dim_contiguous(v_cmp)
    return band_attention_fwd(
        q, k_cmp, v_cmp, geo, geo.compressed_offsets(l, d), scale=scale, window=NO_WINDOW, key_stride=d,
        key_end=l - 1, reverse=True,
    )


def compressed_attention_bwd(do, q, k_cmp, v_cmp, o, lse, compress_block_size: int, compress_stride: int,
                             scale: float, geo: Geometry, delta=None):
    """
    Backward of compressed attention from the forward's `o` and `lse` (gradients from `do` only). `delta` (float32
    `[B, Tq, HQ]`, rowsum(do * o)) may be passed by a caller that has it (then `o` may be None). The dK/dV pass takes
    about 32k (position, head) rows per program (`override(compressed_q_chunk=...)` sets the query positions); chunks
    add up with fp32 atomics. Returns (dq, dk_cmp, dv_cmp).
    """
    l, d = compress_block_size, compress_stride
    q, k_cmp, v_cmp, do = (last_dim_contiguous(x) for x in (q, k_cmp, v_cmp, do))
    q_chunk = SWITCHES.compressed_q_chunk or default_q_chunk(q.shape[2] // k_cmp.shape[2], q.device)
    return band_attention_bwd(
        do, q, k_cmp, v_cmp, lse, geo, geo.compressed_offsets(l, d), o=None if delta is not None else o, delta=delta,
        scale=scale, window=NO_WINDOW, key_stride=d, key_end=l - 1, reverse=True, q_chunk=q_chunk,
    )


class CompressedAttentionFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k_cmp, v_cmp, l, d, scale, geo):
        o, lse = compressed_attention_fwd(q, k_cmp, v_cmp, l, d, scale, geo)
        ctx.save_for_backward(q, k_cmp, v_cmp, o, lse)
        ctx.args = (l, d, scale, geo)
        ctx.mark_non_differentiable(lse)
        return o, lse

    @staticmethod
    def backward(ctx, do, dlse):  # lse is a non-differentiable output: its gradient is ignored
        q, k_cmp, v_cmp, o, lse = ctx.saved_tensors
        dq, dk, dv = compressed_attention_bwd(do, q, k_cmp, v_cmp, o, lse, *ctx.args)
        return dq, dk, dv, None, None, None, None


def compressed_attention(
    q, k_cmp, v_cmp, compress_block_size, compress_stride, scale=None, cu_seqlens_q=None, cu_seqlens_k=None,
    num_keys=None,
):
    """
    Attention over compressed keys, differentiable in q, k_cmp, v_cmp: the query at position t sees block i iff
    `i * compress_stride + compress_block_size - 1 <= t`.

    Args:
        q: `[B, Tq, HQ, DK]`; k_cmp: `[B, Nc, HKV, DK]`, v_cmp: `[B, Nc, HKV, DV]` (HQ % HKV == 0), packed per document
            by `compressed_cu_seqlens(cu_seqlens_k, l, d)` when `cu_seqlens_*` are given.
        num_keys: Tk, uncompressed key positions (default Tq; queries are the last Tq of them); ignored when packed.
    Returns:
        (o `[B, Tq, HQ, DV]` in q's dtype, lse `[B, Tq, HQ]` float32, `-inf` where no block is complete; lse carries
        no gradient and is meant for the block selection).
    """
    check_qkv(q, k_cmp, v_cmp, "k_cmp", "v_cmp")
    check_kernel_inputs(q, k_cmp, v_cmp)
    check_int("compress_block_size", compress_block_size)
    check_int("compress_stride", compress_stride)
    check_packing(q, cu_seqlens_q, cu_seqlens_k)
    # packed, the per-document key lengths come from cu_seqlens_k
    geo = geometry(q, num_keys if cu_seqlens_q is None else None, cu_seqlens_q, cu_seqlens_k)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    return CompressedAttentionFunction.apply(q, k_cmp, v_cmp, compress_block_size, compress_stride, scale, geo)


__all__ = [
    "compressed_attention", "compressed_attention_fwd", "compressed_attention_bwd", "CompressedAttentionFunction",
]
