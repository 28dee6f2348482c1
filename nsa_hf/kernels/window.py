"""
Sliding-window attention (the `win` branch of NSA) in Triton: the query at position t sees keys t - w + 1 .. t.

Same conventions as `nsa_hf.kernels.reference.window_attention_ref`: layout `[batch, seq, heads, dim]`, GQA with query
head h reading KV head h // (HQ // HKV), queries are the last Tq of the Tk key positions (bottom-right alignment),
packed documents through `cu_seqlens_q` / `cu_seqlens_k` (batch 1). The kernels are the band kernels (`band_attention.py`,
`band_attention_bwd.py`) with key_stride 1, key_end 0 and a window: only the O(w) neighbouring key tiles of a query tile
are visited, forward and backward.
"""

import torch

from ._checks import check_int, check_kernel_inputs, check_packing, check_qkv
from ._geometry import Geometry, geometry
from .band_attention import NO_WINDOW, band_attention_fwd, last_dim_contiguous
from .band_attention_bwd import band_attention_bwd


def window_attention_fwd(q, k, v, window_size: int, scale: float, geo: Geometry):
    """
    Forward of sliding-window attention on checked inputs (`window_attention`'s shapes; `scale` resolved; `geo` the
    call's geometry). Returns (o `[B, Tq, HQ, DV]` in q's dtype, lse `[B, Tq, HQ]` float32 natural-log log-sum-exp).
    """
    q, k, v = last_dim_contiguous(q), last_dim_contiguous(k), last_dim_contiguous(v)
    return band_attention_fwd(
        q, k, v, geo, geo.cu_k, scale=scale, window=min(window_size, NO_WINDOW - 1), key_stride=1, key_end=0,
        reverse=False,
    )


def window_attention_bwd(do, q, k, v, o, lse, window_size: int, scale: float, geo: Geometry, delta=None):
    """
    Backward of sliding-window attention from the forward's `o` and `lse`. `delta` (float32 `[B, Tq, HQ]`,
    rowsum(do * o)) may be passed by a caller that already has it (then `o` may be None); otherwise the dQ kernel
    derives it from `o`. Returns (dq, dk, dv) in the dtypes of q, k, v.
    """
    q, k, v, do = (last_dim_contiguous(x) for x in (q, k, v, do))
    return band_attention_bwd(
        do, q, k, v, lse, geo, geo.cu_k, o=None if delta is not None else o, delta=delta, scale=scale,
        window=min(window_size, NO_WINDOW - 1), key_stride=1, key_end=0, reverse=False,
    )


class WindowAttentionFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, window_size, scale, geo):
        o, lse = window_attention_fwd(q, k, v, window_size, scale, geo)
        ctx.save_for_backward(q, k, v, o, lse)
        ctx.window_size, ctx.scale, ctx.geo = window_size, scale, geo
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse = ctx.saved_tensors
        dq, dk, dv = window_attention_bwd(do, q, k, v, o, lse, ctx.window_size, ctx.scale, ctx.geo)
        return dq, dk, dv, None, None, None


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
    check_qkv(q, k, v)
    check_kernel_inputs(q, k, v)
    check_int("window_size", window_size)
    check_packing(q, cu_seqlens_q, cu_seqlens_k)
    geo = geometry(q, k.shape[1], cu_seqlens_q, cu_seqlens_k)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    return WindowAttentionFunction.apply(q, k, v, window_size, scale, geo)


__all__ = ["window_attention", "window_attention_fwd", "window_attention_bwd", "WindowAttentionFunction"]
