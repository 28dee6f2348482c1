"""
The one seam between the model and the attention kernels: `nsa_attention`. The model never knows which backend ran:
Triton on CUDA tensors where the kernels cover the shapes, the PyTorch reference everywhere else.

Inputs are checked here, once per call, and the call's packed geometry is built here (`_geometry.py`): the branch
kernels below, and their backwards, trust both. Under `torch.compile` the Triton path is one custom op per direction
(`nsa_hf::nsa_attention_fwd` / `_bwd`, `nsa_hf::nsa_decode`) and the geometry is built when the op runs.
"""

import os
import warnings

import torch

from ._checks import check_block_sizes, check_int, check_packing, check_qkv, check_query_count, unsupported_reason
from ._geometry import attention_geometry
from ._tiling import MAX_DECODE_QUERIES
from .reference import nsa_attention_ref, nsa_attention_unchecked, nsa_decode_ref
from .utils import compressed_cu_seqlens, compression_block_index, num_compressed_blocks, unfold_compression_blocks

if os.environ.get("TRITON_INTERPRET") == "1":  # CPU interpreter (tests): work around Triton interpreter bugs
    from ._interpreter import patch_triton_interpreter

    patch_triton_interpreter()

_warned: set[str] = set()


def _warn_once(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        warnings.warn(message, stacklevel=3)


def _triton_unsupported_reason(*tensors: torch.Tensor) -> str | None:
    """Why the Triton kernels cannot run these inputs, or None when they can."""
    try:
        from ._tiling import INTERPRET
        from .nsa import nsa_attention_triton  # noqa: F401
    except ImportError as err:  # triton missing or too old
        return f"the Triton kernels could not be imported ({err})"
    if not tensors[0].is_cuda and not INTERPRET:
        return "inputs are not on a CUDA device"
    return unsupported_reason(*tensors)


def _check_inputs(q, k, v, k_cmp, v_cmp, gates, k_win, v_win):
    check_qkv(q, k, v)
    check_qkv(q, k_cmp, v_cmp, "k_cmp", "v_cmp")
    if k_cmp.shape[2] != k.shape[2] or v_cmp.shape[3] != v.shape[3]:
        raise ValueError(f"k_cmp / v_cmp {tuple(k_cmp.shape)} / {tuple(v_cmp.shape)} must have the heads and value "
                         f"dim of k / v {tuple(k.shape)} / {tuple(v.shape)}")
    if (k_win is None) != (v_win is None):
        raise ValueError("pass both `k_win` and `v_win`, or neither")
    if k_win is not None:
        check_qkv(q, k_win, v_win, "k_win", "v_win")
        if k_win.shape[:3] != k.shape[:3] or v_win.shape[3] != v.shape[3]:
            raise ValueError(f"k_win / v_win {tuple(k_win.shape)} / {tuple(v_win.shape)} must have the shapes of "
                             f"k / v {tuple(k.shape)} / {tuple(v.shape)}")
    if gates.shape != (*q.shape[:3], 3) or gates.device != q.device:
        raise ValueError(f"gates must have shape {(*q.shape[:3], 3)} on {q.device}, got {tuple(gates.shape)} on "
                         f"{gates.device}")


def _autocast(*tensors):
    """Under autocast, as for SDPA: every input in autocast's lower precision (the Triton kernels take one dtype)."""
    device = tensors[0].device.type
    if not torch.is_autocast_enabled(device):
        return tensors
    dtype = torch.get_autocast_dtype(device)
    return tuple(None if x is None else x.to(dtype) for x in tensors)


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
            keys are then packed per document, see `compressed_cu_seqlens`. Their values are read on the host once
            per tensor object (the one host sync of a packed step, when every layer passes the same tensors).
        backend: `"auto"` (Triton on CUDA when supported, else the reference), `"triton"` (also on CPU tensors under
            `TRITON_INTERPRET=1`, Triton's interpreter) or `"reference"`.

    Returns:
        `[batch, q_len, num_heads, v_head_dim]` in the dtype of `q` (under autocast: its lower precision).
    """
    if backend not in ("auto", "triton", "reference"):
        raise ValueError(f"`backend` must be 'auto', 'triton' or 'reference', got {backend!r}")
    _check_inputs(q, k, v, k_cmp, v_cmp, gates, k_win, v_win)
    q, k, v, k_cmp, v_cmp, gates, k_win, v_win = _autocast(q, k, v, k_cmp, v_cmp, gates, k_win, v_win)
    l, d = compress_block_size, compress_stride
    check_block_sizes(l, d, select_block_size, num_selected_blocks, num_initial_blocks, num_local_blocks)
    check_int("window_size", window_size)
    check_packing(q, cu_seqlens_q, cu_seqlens_k)
    if torch.compiler.is_compiling():
        # Shapes only: the geometry reads packed offsets on the host, so the Triton op (or the reference) builds and
        # checks it when it runs, outside the graph.
        geo = None
        if cu_seqlens_q is None:
            check_query_count(q.shape[1], k.shape[1])
    else:
        geo = attention_geometry(q, k, k_cmp, l, d, cu_seqlens_q, cu_seqlens_k)
    settings = dict(
        compress_block_size=l, compress_stride=d, select_block_size=select_block_size,
        num_selected_blocks=num_selected_blocks, window_size=window_size, num_initial_blocks=num_initial_blocks,
        num_local_blocks=num_local_blocks, scale=q.shape[-1] ** -0.5 if scale is None else float(scale),
    )
    if backend != "reference" and (backend == "triton" or q.is_cuda):
        tensors = (q, k, v, k_cmp, v_cmp) + (() if k_win is None else (k_win, v_win))
        reason = _triton_unsupported_reason(*tensors)
        if reason is None:
            from .nsa import nsa_attention_triton

            return nsa_attention_triton(q, k, v, k_cmp, v_cmp, gates, k_win, v_win, geo, cu_seqlens_q=cu_seqlens_q,
                                        cu_seqlens_k=cu_seqlens_k, **settings)
        if backend == "triton":
            raise ValueError(f"backend='triton' cannot run these inputs: {reason}")
        _warn_once(f"nsa_attention: falling back to the PyTorch reference because {reason}; it is much slower.")
    # compiling a packed call: no geometry checked the offsets, the reference does (it reads them on the host anyway)
    reference = nsa_attention_ref if geo is None and cu_seqlens_q is not None else nsa_attention_unchecked
    return reference(
        q, k, v, k_cmp, v_cmp, gates, k_win=k_win, v_win=v_win, cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k,
        **settings,
    )


def _decode_unsupported_reason(tensors, select_block_size, compress_stride) -> str | None:
    q, k = tensors[:2]
    reason = _triton_unsupported_reason(*tensors)
    if reason is not None:
        return reason
    ratio = select_block_size // compress_stride
    if q.shape[1] > MAX_DECODE_QUERIES:
        return f"{q.shape[1]} queries per row (the decode kernels take at most {MAX_DECODE_QUERIES})"
    if ratio & (ratio - 1):
        return f"select_block_size / compress_stride = {ratio} (the decode kernels need a power of two)"
    if q.shape[2] // k.shape[2] > 128:
        return f"{q.shape[2] // k.shape[2]} query heads per key/value head (the decode kernels take at most 128)"
    return None


@torch.library.custom_op("nsa_hf::nsa_decode", mutates_args=())
def _nsa_decode_op(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cmp: torch.Tensor, v_cmp: torch.Tensor,
    gates: torch.Tensor, query_positions: torch.Tensor, k_win: torch.Tensor | None, v_win: torch.Tensor | None,
    compress_block_size: int, compress_stride: int, select_block_size: int, num_selected_blocks: int,
    window_size: int, num_initial_blocks: int, num_local_blocks: int, scale: float,
) -> torch.Tensor:
    """The Triton decode path as one opaque op for torch.compile (Dynamo and CUDA graphs see a single node)."""
    from .decode import nsa_decode_triton

    return nsa_decode_triton(
        q, k, v, k_cmp, v_cmp, gates, query_positions, compress_block_size=compress_block_size,
        compress_stride=compress_stride, select_block_size=select_block_size,
        num_selected_blocks=num_selected_blocks, window_size=window_size, num_initial_blocks=num_initial_blocks,
        num_local_blocks=num_local_blocks, scale=scale, k_win=k_win, v_win=v_win,
    )


@_nsa_decode_op.register_fake
def _(q, k, v, k_cmp, v_cmp, gates, query_positions, k_win, v_win, *settings):
    return q.new_empty(*q.shape[:3], v.shape[-1])


def nsa_decode(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_cmp: torch.Tensor,
    v_cmp: torch.Tensor,
    gates: torch.Tensor,
    query_positions: torch.Tensor,
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
    backend: str = "auto",
) -> torch.Tensor:
    """
    Native Sparse Attention of a few new queries per row against a key/value cache (decoding; also chunked prefill
    and speculative decoding), every row at its own length. Runs under CUDA-graph capture and `torch.compile`: no
    host sync, and nothing depends on the current lengths except through `query_positions`.

    Args:
        q: `[batch, q_len, num_heads, head_dim]`, `q_len` at most 16 for the Triton kernels (longer chunks: use
            `nsa_attention` with packed documents, as the model does).
        k, v: `[batch, capacity, num_kv_heads, head_dim / v_head_dim]` caches (strided views are fine as long as the
            last dim is contiguous). Row b's tokens sit at positions `0 ..` of row b.
        k_cmp, v_cmp: `[batch, cmp_capacity, num_kv_heads, dim]`, row b's compressed blocks from index 0; block i
            (tokens `[i*compress_stride, i*compress_stride + compress_block_size)`) must be there for every query
            that sees it.
        gates: `[batch, q_len, num_heads, 3]` branch gates (cmp, slc, win).
        query_positions: `[batch, q_len]` int32/int64, the position `t < capacity` of each query in its row (the
            key at t is the query's own); `-1` marks a slot without a query, whose output is zero.
        k_win, v_win: window-branch caches when K/V are not shared.
        backend: `"auto"`, `"triton"` or `"reference"`, as in `nsa_attention`.

    Returns:
        `[batch, q_len, num_heads, v_head_dim]` in the dtype of `q` (under autocast: its lower precision).
    """
    if backend not in ("auto", "triton", "reference"):
        raise ValueError(f"`backend` must be 'auto', 'triton' or 'reference', got {backend!r}")
    _check_inputs(q, k, v, k_cmp, v_cmp, gates, k_win, v_win)
    q, k, v, k_cmp, v_cmp, gates, k_win, v_win = _autocast(q, k, v, k_cmp, v_cmp, gates, k_win, v_win)
    check_block_sizes(compress_block_size, compress_stride, select_block_size, num_selected_blocks,
                      num_initial_blocks, num_local_blocks)
    check_int("window_size", window_size)
    if query_positions.shape != q.shape[:2] or query_positions.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"query_positions must be an int32/int64 tensor of shape {tuple(q.shape[:2])}, got "
                         f"{query_positions.dtype} {tuple(query_positions.shape)}")
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    settings = dict(
        compress_block_size=compress_block_size, compress_stride=compress_stride, select_block_size=select_block_size,
        num_selected_blocks=num_selected_blocks, window_size=window_size, num_initial_blocks=num_initial_blocks,
        num_local_blocks=num_local_blocks, scale=scale,
    )
    if backend != "reference" and (backend == "triton" or q.is_cuda):
        tensors = (q, k, v, k_cmp, v_cmp) + (() if k_win is None else (k_win, v_win))
        reason = _decode_unsupported_reason(tensors, select_block_size, compress_stride)
        if reason is None:
            gates = gates if gates.stride(-1) == 1 else gates.contiguous()
            if torch.compiler.is_compiling():
                return _nsa_decode_op(q, k, v, k_cmp, v_cmp, gates, query_positions, k_win, v_win,
                                      *settings.values())
            from .decode import nsa_decode_triton

            return nsa_decode_triton(q, k, v, k_cmp, v_cmp, gates, query_positions, k_win=k_win, v_win=v_win,
                                     **settings)
        if backend == "triton":
            raise ValueError(f"backend='triton' cannot run these inputs: {reason}")
        _warn_once(f"nsa_decode: falling back to the PyTorch reference because {reason}; it is much slower.")
    return nsa_decode_ref(q, k, v, k_cmp, v_cmp, gates, query_positions, k_win=k_win, v_win=v_win, **settings)


__all__ = [
    "MAX_DECODE_QUERIES", "nsa_attention", "nsa_decode", "compressed_cu_seqlens", "compression_block_index",
    "num_compressed_blocks", "unfold_compression_blocks",
]
