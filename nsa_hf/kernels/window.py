"""
Sliding-window attention (the `win` branch of NSA) in Triton: the query at position t sees keys t - w + 1 .. t.

Same conventions as `nsa_hf.kernels.reference.window_attention_ref`: layout `[batch, seq, heads, dim]`, GQA with query
head h reading KV head h // (HQ // HKV), queries are the last Tq of the Tk key positions (bottom-right alignment), packed
documents through `cu_seqlens_q` / `cu_seqlens_k` (batch 1). The kernels live in `_attention_common.py` (band
attention with key_stride 1, key_end 0 and a window); only the O(w) neighbouring key tiles of a query tile are
visited, forward and backward.
"""

import torch

from ._attention_common import (
    _BIG,
    Docs,
    band_attention_bwd,
    band_attention_fwd,
    check_cu_seqlens,
    check_qkv,
    last_dim_contiguous,
)


def _prepare(q, k, v, window_size, scale, cu_seqlens_q, cu_seqlens_k):
    check_qkv(q, k, v)
    if isinstance(window_size, bool) or not isinstance(window_size, int) or window_size < 1:
        raise ValueError(f"window_size must be a positive int, got {window_size!r}")
    cu_q, cu_k = check_cu_seqlens(q, cu_seqlens_q, cu_seqlens_k)
    if cu_q is None and q.shape[1] > k.shape[1]:
        raise ValueError(f"queries are the last positions of the keys, so Tq ({q.shape[1]}) must be <= Tk ({k.shape[1]})")
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    docs = Docs(q.shape[0], q.shape[1], k.shape[1], k.shape[1], cu_q, cu_k, cu_k)
    return scale, min(window_size, _BIG - 1), docs


def window_attention_fwd(q, k, v, window_size, scale=None, cu_seqlens_q=None, cu_seqlens_k=None):
    """
    Forward of sliding-window attention.

    Args:
        q: `[B, Tq, HQ, DK]`; k: `[B, Tk, HKV, DK]`; v: `[B, Tk, HKV, DV]`; any strides with a contiguous last dim.
        window_size: w >= 1; the query at position t sees keys `t - w + 1 .. t`.
        scale: softmax scale, default `DK ** -0.5`.
        cu_seqlens_q, cu_seqlens_k: `[num_docs + 1]` int offsets of packed documents (batch 1), or None.
    Returns:
        (o `[B, Tq, HQ, DV]` in q's dtype, lse `[B, Tq, HQ]` float32 natural-log log-sum-exp).
    """
    q, k, v = last_dim_contiguous(q), last_dim_contiguous(k), last_dim_contiguous(v)
    scale, window, docs = _prepare(q, k, v, window_size, scale, cu_seqlens_q, cu_seqlens_k)
    return band_attention_fwd(q, k, v, scale=scale, window=window, key_stride=1, key_end=0, docs=docs, reverse=False)


def window_attention_bwd(
    do, q, k, v, o, lse, window_size, scale=None, cu_seqlens_q=None, cu_seqlens_k=None, delta=None
):
    """
    Backward of sliding-window attention from the forward's `o` and `lse`. `delta` (float32 `[B, Tq, HQ]`,
    rowsum(do * o)) may be passed by a caller that already has it (then `o` may be None); otherwise the dQ kernel
    derives it from `o`. Returns (dq, dk, dv) in the dtypes of q, k, v.
    """
    q, k, v = last_dim_contiguous(q), last_dim_contiguous(k), last_dim_contiguous(v)
    do = last_dim_contiguous(do)
    scale, window, docs = _prepare(q, k, v, window_size, scale, cu_seqlens_q, cu_seqlens_k)
    return band_attention_bwd(
        do, q, k, v, lse, o=None if delta is not None else o, delta=delta, scale=scale, window=window, key_stride=1,
        key_end=0, docs=docs, reverse=False,
    )


class WindowAttentionFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, window_size, scale, cu_seqlens_q, cu_seqlens_k):
        o, lse = window_attention_fwd(q, k, v, window_size, scale, cu_seqlens_q, cu_seqlens_k)
        ctx.save_for_backward(q, k, v, o, lse, cu_seqlens_q, cu_seqlens_k)
        ctx.window_size, ctx.scale = window_size, scale
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse, cu_q, cu_k = ctx.saved_tensors
        dq, dk, dv = window_attention_bwd(do, q, k, v, o, lse, ctx.window_size, ctx.scale, cu_q, cu_k)
        return dq, dk, dv, None, None, None, None


def window_attention(q, k, v, window_size, scale=None, cu_seqlens_q=None, cu_seqlens_k=None):
    """
    Sliding-window attention, differentiable in q, k, v: the query at position t sees keys `t - w + 1 .. t`.

    Args:
        q: `[B, Tq, HQ, DK]`, k: `[B, Tk, HKV, DK]`, v: `[B, Tk, HKV, DV]` (HQ % HKV == 0; float16/bfloat16/float32).
        window_size: w >= 1.
        scale: softmax scale, default `DK ** -0.5`.
        cu_seqlens_q, cu_seqlens_k: `[num_docs + 1]` int32 offsets of packed documents (batch 1); per document the
            queries are the last positions of its keys.
    Returns:
        `[B, Tq, HQ, DV]` in q's dtype.
    """
    return WindowAttentionFunction.apply(q, k, v, window_size, scale, cu_seqlens_q, cu_seqlens_k)


__all__ = ["window_attention", "window_attention_fwd", "window_attention_bwd", "WindowAttentionFunction"]
