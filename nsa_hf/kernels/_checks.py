"""
Argument checks, one copy each. They run where inputs enter: `nsa_attention` (once per call, for every branch) and the
public function of each op (`window_attention`, `compressed_attention`, `select_blocks`, `selected_attention`,
the reference functions); launchers, autograd backwards and kernels below them trust their inputs. None of these reads
a tensor's values: the per-document lengths are checked where the packed geometry is built (`_geometry.py`).
"""

import torch

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_HEAD_DIM = 256


def check_int(name: str, value, minimum: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"`{name}` must be an integer >= {minimum}, got {value!r}")


def check_qkv(q, k, v, name_k: str = "k", name_v: str = "v") -> None:
    """q `[B, Tq, HQ, DK]`, k `[B, Tk, HKV, DK]`, v `[B, Tk, HKV, DV]` on one device, HQ a multiple of HKV."""
    for name, x in (("q", q), (name_k, k), (name_v, v)):
        if not isinstance(x, torch.Tensor) or x.dim() != 4:
            got = getattr(x, "shape", type(x))
            raise ValueError(f"`{name}` must be a 4-D [batch, seq, heads, dim] tensor, got {got}")
    if k.shape[:3] != v.shape[:3]:
        raise ValueError(f"{name_k} {tuple(k.shape)} and {name_v} {tuple(v.shape)} must agree on batch, seq and heads")
    if q.shape[0] != k.shape[0]:
        raise ValueError(f"q and {name_k} must have the same batch size, got {q.shape[0]} and {k.shape[0]}")
    if k.shape[2] == 0 or q.shape[2] % k.shape[2] != 0:
        raise ValueError(f"query heads ({q.shape[2]}) must be a multiple of key/value heads ({k.shape[2]})")
    if q.shape[3] != k.shape[3]:
        raise ValueError(f"q and {name_k} head dims differ: {q.shape[3]} vs {k.shape[3]}")
    if q.device != k.device or q.device != v.device:
        raise ValueError(f"q, {name_k}, {name_v} must be on one device, got {q.device}, {k.device}, {v.device}")


def unsupported_reason(*tensors: torch.Tensor) -> str | None:
    """Why the Triton kernels cannot take these tensors (dtype, head dim), or None when they can."""
    dtypes = [x.dtype for x in tensors]
    if len(set(dtypes)) != 1 or dtypes[0] not in SUPPORTED_DTYPES:
        names = "/".join(str(dt).replace("torch.", "") for dt in dtypes)
        return f"the inputs must share one of the dtypes float16/bfloat16/float32, got {names}"
    dims = sorted({x.shape[-1] for x in tensors})
    if dims[-1] > MAX_HEAD_DIM:
        return f"head dims up to {MAX_HEAD_DIM} are supported, got {dims}"
    return None


def check_kernel_inputs(*tensors: torch.Tensor) -> None:
    """The op-level public functions run the Triton kernels directly: refuse what they do not cover."""
    from ._tiling import INTERPRET  # imports triton, which the seam and the reference do not need

    reason = unsupported_reason(*tensors)
    if reason is not None:
        raise ValueError(reason)
    if not tensors[0].is_cuda and not INTERPRET:
        raise ValueError(f"the Triton kernels need CUDA tensors (or TRITON_INTERPRET=1), got {tensors[0].device}")


def check_packing(q, cu_seqlens_q, cu_seqlens_k) -> None:
    """Shapes of the packed-document offsets (their values are checked with the geometry, on the host once)."""
    if (cu_seqlens_q is None) != (cu_seqlens_k is None):
        raise ValueError("pass both `cu_seqlens_q` and `cu_seqlens_k`, or neither")
    if cu_seqlens_q is None:
        return
    if q.shape[0] != 1:
        raise ValueError(f"with `cu_seqlens_q` the batch size must be 1 (documents packed along seq), got {q.shape[0]}")
    if cu_seqlens_q.dim() != 1 or cu_seqlens_q.shape != cu_seqlens_k.shape or cu_seqlens_q.shape[0] < 2:
        raise ValueError(
            "`cu_seqlens_q` and `cu_seqlens_k` must be 1-D [num_docs + 1] tensors of equal length >= 2, got "
            f"{tuple(cu_seqlens_q.shape)} and {tuple(cu_seqlens_k.shape)}"
        )


def check_block_sizes(
    compress_block_size, compress_stride, select_block_size, num_selected_blocks, num_initial_blocks=1,
    num_local_blocks=2,
) -> None:
    """The NSA block rules (as `NSAConfig` states them): d | l, d | l', l <= l'."""
    l, d, lp = compress_block_size, compress_stride, select_block_size
    for name, value, minimum in (
        ("compress_block_size", l, 1), ("compress_stride", d, 1), ("select_block_size", lp, 1),
        ("num_selected_blocks", num_selected_blocks, 1), ("num_initial_blocks", num_initial_blocks, 0),
        ("num_local_blocks", num_local_blocks, 0),
    ):
        check_int(name, value, minimum)
    if l % d != 0:
        raise ValueError(f"`compress_stride` ({d}) must divide `compress_block_size` ({l})")
    if lp % d != 0:
        raise ValueError(f"`compress_stride` ({d}) must divide `select_block_size` ({lp})")
    if lp < l:
        raise ValueError(f"`select_block_size` ({lp}) must be at least `compress_block_size` ({l})")


def check_query_count(q_len: int, k_len: int) -> None:
    if q_len > k_len:
        raise ValueError(
            f"more queries (Tq={q_len}) than keys (Tk / num_keys={k_len}): the queries are the last positions of the "
            "keys, so q_len must be at most k_len"
        )


def check_document_lengths(bounds_q: list, bounds_k: list, q_len: int, k_len: int | None) -> None:
    """Host values of the offsets: every document has 0 <= queries <= keys, and the offsets end at the lengths."""
    for i in range(len(bounds_q) - 1):
        nq, nk = bounds_q[i + 1] - bounds_q[i], bounds_k[i + 1] - bounds_k[i]
        if nq < 0 or nq > nk:
            raise ValueError(f"document {i} has {nq} queries and {nk} keys; each must have 0 <= q_len <= k_len")
    if bounds_q[-1] != q_len or (k_len is not None and bounds_k[-1] != k_len):
        raise ValueError(
            f"`cu_seqlens_q[-1]`={bounds_q[-1]} / `cu_seqlens_k[-1]`={bounds_k[-1]} must equal the packed lengths of "
            f"q ({q_len}) / k ({k_len})"
        )
