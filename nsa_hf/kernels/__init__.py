"""
The one seam between the model and the attention kernels: `nsa_attention`. The model never knows which backend ran:
Triton on CUDA tensors where the kernels cover the shapes, the PyTorch reference everywhere else.
"""

import os
import warnings

import torch

from .reference import check_query_key_lengths, nsa_attention_ref
from .utils import compressed_cu_seqlens, num_compressed_blocks, unfold_compression_blocks

if os.environ.get("TRITON_INTERPRET") == "1":  # CPU interpreter (tests): work around Triton 3.6 interpreter bugs
    from ._interpreter import patch_triton_interpreter

    patch_triton_interpreter()

_warned: set[str] = set()


def _warn_once(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        warnings.warn(message, stacklevel=3)


def _triton_unsupported_reason(q, k, v) -> str | None:
    """Why the Triton kernels cannot run these inputs, or None when they can."""
    if not q.is_cuda:
        return "inputs are not on a CUDA device"
    try:
        from . import nsa as triton_nsa
    except ImportError as err:  # triton missing or too old
        return f"the Triton kernels could not be imported ({err})"
    return triton_nsa.unsupported_reason(q, k, v)


def nsa_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_cmp: torch.Tensor,
    v_cmp: torch.Tensor,
    gates: torch.Tensor,
    *,
    compress_block_size: int,
    compress_stride: int,
    select_block_size: int,
    num_selected_blocks: int,
    window_size: int,
    num_initial_blocks: int = 1,
    num_local_blocks: int = 2,
    scale: float | None = None,
    k_win: torch.Tensor | None = None,
    v_win: torch.Tensor | None = None,
    cu_seqlens_q: torch.Tensor | None = None,
    cu_seqlens_k: torch.Tensor | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """
    Native Sparse Attention: `g_cmp * Attn(q, K_cmp) + g_slc * Attn(q, K_selected) + g_win * Attn(q, K_window)`.

    Args:
        q: `[batch, q_len, num_heads, head_dim]` queries (after RoPE); the queries are the last `q_len` positions of
            the keys (bottom-right causal alignment: `q_len == k_len` for training/prefill, 1 for a decoding step).
        k, v: `[batch, k_len, num_kv_heads, head_dim]` / `[..., v_head_dim]` keys (after RoPE) and values of the
            selection branch (of every branch when keys/values are shared). `num_heads % num_kv_heads == 0`.
        k_cmp, v_cmp: `[batch, num_cmp_blocks, num_kv_heads, head_dim / v_head_dim]` compressed keys/values, one per
            complete block `[i*compress_stride, i*compress_stride + compress_block_size)` of the keys.
        gates: `[batch, q_len, num_heads, 3]` branch gates (cmp, slc, win) in [0, 1].
        k_win, v_win: window-branch keys/values when they are not shared with the selection branch.
        cu_seqlens_q, cu_seqlens_k: `[num_docs + 1]` int32 offsets of packed documents (batch must be 1); compressed
            keys are then packed per document, see `compressed_cu_seqlens`.
        backend: `"auto"` (Triton on CUDA when supported, else the reference), `"triton"` or `"reference"`.

    Returns:
        `[batch, q_len, num_heads, v_head_dim]` in the dtype of `q`.
    """
    if backend not in ("auto", "triton", "reference"):
        raise ValueError(f"`backend` must be 'auto', 'triton' or 'reference', got {backend!r}")
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"q, k, v must be 4-D [batch, seq, heads, dim], got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if q.shape[2] % k.shape[2] != 0:
        raise ValueError(f"query heads ({q.shape[2]}) must be a multiple of key/value heads ({k.shape[2]})")
    check_query_key_lengths(q, k, cu_seqlens_q, cu_seqlens_k)
    if gates.shape != (*q.shape[:3], 3):
        raise ValueError(f"gates must have shape {(*q.shape[:3], 3)}, got {tuple(gates.shape)}")
    kwargs = dict(
        compress_block_size=compress_block_size, compress_stride=compress_stride, select_block_size=select_block_size,
        num_selected_blocks=num_selected_blocks, window_size=window_size, num_initial_blocks=num_initial_blocks,
        num_local_blocks=num_local_blocks, scale=scale, k_win=k_win, v_win=v_win,
        cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k,
    )
    if backend != "reference":
        reason = _triton_unsupported_reason(q, k, v)
        if reason is None:
            from .nsa import nsa_attention_triton

            return nsa_attention_triton(q, k, v, k_cmp, v_cmp, gates, **kwargs)
        if backend == "triton":
            raise ValueError(f"backend='triton' cannot run these inputs: {reason}")
        if q.is_cuda:
            _warn_once(f"nsa_attention: falling back to the PyTorch reference because {reason}; it is much slower.")
    return nsa_attention_ref(q, k, v, k_cmp, v_cmp, gates, **kwargs)


__all__ = ["nsa_attention", "compressed_cu_seqlens", "num_compressed_blocks", "unfold_compression_blocks"]
