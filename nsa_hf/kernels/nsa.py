"""Triton backend of `nsa_attention`: the three branch kernels, the block selection between them, the gated sum."""

import torch

from .compressed import compressed_attention
from .selected import selected_attention
from .selection import select_blocks
from .window import window_attention

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_HEAD_DIM = 256


def unsupported_reason(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> str | None:
    """Why these inputs are outside what the kernels cover, or None."""
    if q.dtype not in SUPPORTED_DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
        return f"dtypes {q.dtype}/{k.dtype}/{v.dtype} (the kernels take one of {SUPPORTED_DTYPES} for q, k and v)"
    if q.shape[-1] > MAX_HEAD_DIM or v.shape[-1] > MAX_HEAD_DIM:
        return f"head dims {q.shape[-1]}/{v.shape[-1]} (the kernels take at most {MAX_HEAD_DIM})"
    return None


def nsa_attention_triton(
    q, k, v, k_cmp, v_cmp, gates, *, compress_block_size, compress_stride, select_block_size, num_selected_blocks,
    window_size, num_initial_blocks=1, num_local_blocks=2, scale=None, k_win=None, v_win=None,
    cu_seqlens_q=None, cu_seqlens_k=None,
):
    """Same contract as `nsa_hf.kernels.nsa_attention`."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    k_win = k if k_win is None else k_win
    v_win = v if v_win is None else v_win
    varlen = dict(cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k)
    o_cmp, lse_cmp = compressed_attention(
        q, k_cmp, v_cmp, compress_block_size, compress_stride, scale=scale, num_keys=k.shape[1], **varlen
    )
    block_indices = select_blocks(
        q.detach(), k_cmp.detach(), lse_cmp.detach(), compress_block_size, compress_stride, select_block_size,
        num_selected_blocks, num_initial_blocks, num_local_blocks, scale=scale, num_keys=k.shape[1], **varlen,
    )
    o_slc = selected_attention(q, k, v, block_indices, select_block_size, scale=scale, **varlen)
    o_win = window_attention(q, k_win, v_win, window_size, scale=scale, **varlen)
    g = gates.to(o_cmp.dtype)
    return torch.addcmul(torch.addcmul(o_win * g[..., 2:3], o_cmp, g[..., 0:1]), o_slc, g[..., 1:2])
