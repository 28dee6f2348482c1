"""
Attention over compressed keys (the `cmp` branch of NSA, Eq. 7) in Triton: the query at position t sees compressed
block i iff `i * d + l - 1 <= t` (the block [i*d, i*d + l) is complete).

Same conventions as `nsa_hf.kernels.reference.compressed_attention_ref`; packed documents keep their compressed keys
packed per `nsa_hf.kernels.utils.compressed_cu_seqlens(cu_seqlens_k, l, d)`. A query that sees no block gets o = 0 and
lse = -inf, with no NaN forward or backward. The kernels live in `_attention_common.py` (band attention with
key_stride d, key_end l - 1, no window): a query tile visits only the compressed-key tiles up to
floor((t_max + 1 - l) / d); the dK/dV pass splits the long causal band into query chunks that add up with fp32
atomics.
"""

import torch

from ._attention_common import (
    _BIG,
    Docs,
    _cached,
    band_attention_bwd,
    band_attention_fwd,
    check_cu_seqlens,
    check_qkv,
    default_q_chunk,
    last_dim_contiguous,
)
from .utils import compressed_cu_seqlens


def _prepare(q, k_cmp, v_cmp, l, d, scale, cu_seqlens_q, cu_seqlens_k, num_keys):
    check_qkv(q, k_cmp, v_cmp, "k_cmp", "v_cmp")
    for name, x in (("compress_block_size", l), ("compress_stride", d)):
        if isinstance(x, bool) or not isinstance(x, int) or x < 1:
            raise ValueError(f"{name} must be a positive int, got {x!r}")
    cu_q, cu_k = check_cu_seqlens(q, cu_seqlens_q, cu_seqlens_k)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    if cu_q is None:
        tk = q.shape[1] if num_keys is None else int(num_keys)
        if tk < q.shape[1]:
            raise ValueError(f"queries are the last positions of the keys, so Tq ({q.shape[1]}) must be <= num_keys ({tk})")
        docs = Docs(q.shape[0], q.shape[1], tk, k_cmp.shape[1], None, None, None)
    else:
        # per-document key lengths come from cu_seqlens_k; `num_keys` (if given, the packed total) is not needed
        cu_n = _cached(cu_k, ("compressed", l, d), lambda: compressed_cu_seqlens(cu_k, l, d).to(torch.int32))
        docs = Docs(1, q.shape[1], 0, k_cmp.shape[1], cu_q, cu_k, cu_n)
    return scale, docs


def compressed_attention_fwd(
    q, k_cmp, v_cmp, compress_block_size, compress_stride, scale=None, cu_seqlens_q=None, cu_seqlens_k=None,
    num_keys=None,
):
    """
    Forward of compressed attention.

    Args:
        q: `[B, Tq, HQ, DK]`; k_cmp: `[B, Nc, HKV, DK]`; v_cmp: `[B, Nc, HKV, DV]`; any strides with a contiguous last dim.
        compress_block_size, compress_stride: l and d; block i covers key positions [i*d, i*d + l).
        num_keys: Tk, the number of uncompressed key positions (default Tq); ignored with `cu_seqlens_*`.
        cu_seqlens_q, cu_seqlens_k: `[num_docs + 1]` int offsets of packed documents (batch 1), or None.
    Returns:
        (o `[B, Tq, HQ, DV]` in q's dtype, lse `[B, Tq, HQ]` float32, -inf where no block is complete).
    """
    q, k_cmp, v_cmp = last_dim_contiguous(q), last_dim_contiguous(k_cmp), last_dim_contiguous(v_cmp)
    l, d = compress_block_size, compress_stride
    scale, docs = _prepare(q, k_cmp, v_cmp, l, d, scale, cu_seqlens_q, cu_seqlens_k, num_keys)
    return band_attention_fwd(q, k_cmp, v_cmp, scale=scale, window=_BIG, key_stride=d, key_end=l - 1, docs=docs, reverse=True)


def compressed_attention_bwd(
    do, q, k_cmp, v_cmp, o, lse, compress_block_size, compress_stride, scale=None, cu_seqlens_q=None,
    cu_seqlens_k=None, num_keys=None, delta=None, q_chunk=None,
):
    """
    Backward of compressed attention from the forward's `o` and `lse` (gradients from `do` only). `delta` (float32
    `[B, Tq, HQ]`, rowsum(do * o)) may be passed by a caller that has it (then `o` may be None). `q_chunk`: query positions per dK/dV
    program (default about 32k (position, head) rows; chunks add up with fp32 atomics). Returns (dq, dk_cmp, dv_cmp).
    """
    q, k_cmp, v_cmp = last_dim_contiguous(q), last_dim_contiguous(k_cmp), last_dim_contiguous(v_cmp)
    do = last_dim_contiguous(do)
    l, d = compress_block_size, compress_stride
    scale, docs = _prepare(q, k_cmp, v_cmp, l, d, scale, cu_seqlens_q, cu_seqlens_k, num_keys)
    G = q.shape[2] // k_cmp.shape[2]
    return band_attention_bwd(
        do, q, k_cmp, v_cmp, lse, o=None if delta is not None else o, delta=delta, scale=scale, window=_BIG,
        key_stride=d, key_end=l - 1, docs=docs, reverse=True, q_chunk=default_q_chunk(G) if q_chunk is None else q_chunk,
    )


class CompressedAttentionFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k_cmp, v_cmp, l, d, scale, cu_seqlens_q, cu_seqlens_k, num_keys):
        o, lse = compressed_attention_fwd(q, k_cmp, v_cmp, l, d, scale, cu_seqlens_q, cu_seqlens_k, num_keys)
        ctx.save_for_backward(q, k_cmp, v_cmp, o, lse, cu_seqlens_q, cu_seqlens_k)
        ctx.args = (l, d, scale, num_keys)
        ctx.mark_non_differentiable(lse)
        return o, lse

    @staticmethod
    def backward(ctx, do, dlse):  # lse is a non-differentiable output: its gradient is ignored
        q, k_cmp, v_cmp, o, lse, cu_q, cu_k = ctx.saved_tensors
        l, d, scale, num_keys = ctx.args
        dq, dk, dv = compressed_attention_bwd(do, q, k_cmp, v_cmp, o, lse, l, d, scale, cu_q, cu_k, num_keys)
        return dq, dk, dv, None, None, None, None, None, None


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
    return CompressedAttentionFunction.apply(
        q, k_cmp, v_cmp, compress_block_size, compress_stride, scale, cu_seqlens_q, cu_seqlens_k, num_keys
    )


__all__ = [
    "compressed_attention", "compressed_attention_fwd", "compressed_attention_bwd", "CompressedAttentionFunction",
]
