"""
How the tokens of one forward reach the NSA kernels, decided once per forward and shared by every layer.

Without a cache (`NSALayout`):
- "batched": every token of every row is real and rows are whole sequences (the common training case);
- "packed" / "padded": packed documents (restarting `position_ids` as produced by `DataCollatorWithFlattening`, or
  explicit `cu_seq_lens_q`/`cu_seq_lens_k`) or padded rows (2-D `attention_mask`) are gathered into one packed
  sequence with `cu_seqlens`, so no token attends across documents or to padding, and blocks restart per document.

A forward without mask, position ids or `cu_seq_lens` is batched without looking at any tensor: no host sync, so
`torch.compile(model, fullgraph=True)` traces it whole. Otherwise `build_nsa_layout` reads them once, outside the graph
(`torch.compiler.disable`: one graph break per forward; its outputs have data-dependent sizes, which a compiled graph
takes as dynamic shapes). The layers after it do not sync on the Triton path; the PyTorch reference loops over the
documents on the host.

With a cache the step (`NSACacheStep`) decides: decoding steps go to `nsa_decode` with per-row query positions; a
longer chunk (prefill) goes to `nsa_attention`, batched when every row is alike, else packed by `CachedPrefill`.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers.masking_utils import find_packed_sequence_indices

from ..kernels import compression_block_index, num_compressed_blocks


@dataclass
class NSALayout:
    """How the tokens of one uncached forward reach `nsa_attention`."""

    mode: str  # "batched" | "packed" (documents, every token real) | "padded" (real tokens of padded rows)
    # packed / padded: flat indices into [batch * q_len] of the real queries, in document order, the document offsets
    # and the token indices of each compression block (`compression_block_index`) in the packed sequence
    query_index: torch.Tensor | None = None
    cu_seqlens: torch.Tensor | None = None
    compression_index: torch.Tensor | None = None


def cu_seqlens_of(lengths: torch.Tensor) -> torch.Tensor:
    """int32 offsets `[n + 1]` of packed pieces of `lengths`."""
    return F.pad(lengths.cumsum(0), (1, 0)).to(torch.int32)


def build_nsa_layout(
    kwargs, position_ids: torch.Tensor | None, mask: torch.Tensor | None, batch_size: int, q_len: int,
    compress_block_size: int, compress_stride: int, device,
) -> NSALayout:
    """
    The `NSALayout` of an uncached forward; `mask` is the `[batch, q_len]` bool real-token mask (None: all real),
    `kwargs` the forward's keyword arguments (`cu_seq_lens_q` / `cu_seq_lens_k`).
    """
    if mask is None and position_ids is None and kwargs.get("cu_seq_lens_q") is None \
            and kwargs.get("cu_seq_lens_k") is None:
        return NSALayout("batched")
    return _read_layout(kwargs, position_ids, mask, batch_size, q_len, compress_block_size, compress_stride, device)


@torch.compiler.disable
def _read_layout(kwargs, position_ids, mask, batch_size, q_len, compress_block_size, compress_stride, device):
    padded = mask is not None and not bool(mask.all())
    cu_seqlens = packed_cu_seqlens(kwargs, position_ids, mask if padded else None, 0, batch_size, q_len, device)
    if cu_seqlens is not None:
        query_index = torch.arange(batch_size * q_len, device=device)
        mode = "packed"
    elif padded:
        lengths = mask.sum(1)
        query_index, cu_seqlens = mask.flatten().nonzero().flatten(), cu_seqlens_of(lengths[lengths > 0])
        mode = "padded"
    else:
        return NSALayout("batched")
    index = compression_block_index(cu_seqlens, compress_block_size, compress_stride)
    return NSALayout(mode, query_index, cu_seqlens, index)


class CachedPrefill:
    """
    A prefill chunk whose rows differ (padding, or rows at different lengths) as packed documents: each row with new
    tokens is one document of its cached keys `[0, new_length)` and its new queries. Built once per forward (one host
    sync, in `NSACacheStep`) and used by every layer.
    """

    def __init__(self, step, compress_block_size: int, compress_stride: int, device):
        old, new = step.host_old_lengths, step.host_new_lengths
        active = [b for b in range(len(new)) if new[b] > old[b]]
        self.query_index = (step.query_positions.flatten() >= 0).nonzero().flatten()
        self.cu_seqlens_q = cu_seqlens_of(torch.tensor([new[b] - old[b] for b in active], device=device))
        self.cu_seqlens_k = cu_seqlens_of(torch.tensor([new[b] for b in active], device=device))
        self.key_rows = torch.cat([torch.full((new[b],), b, device=device) for b in active]) if active else None
        self.key_cols = torch.cat([torch.arange(new[b], device=device) for b in active]) if active else None
        counts = [num_compressed_blocks(new[b], compress_block_size, compress_stride) for b in active]
        self.cmp_rows = torch.cat([torch.full((n,), b, device=device) for b, n in zip(active, counts)]) \
            if active else None
        self.cmp_cols = torch.cat([torch.arange(n, device=device) for n in counts]) if active else None

    def keys(self, buf: torch.Tensor) -> torch.Tensor:
        """`[1, sum of lengths, heads, dim]` packed keys of the active rows."""
        return buf[self.key_rows, self.key_cols].unsqueeze(0)

    def compressed(self, buf: torch.Tensor) -> torch.Tensor:
        return buf[self.cmp_rows, self.cmp_cols].unsqueeze(0)


def packed_cu_seqlens(kwargs, position_ids, new_mask, past, batch_size, q_len, device) -> torch.Tensor | None:
    """
    `cu_seqlens` of packed documents over the flattened `[batch * q_len]` tokens, or None when not packed: from
    explicit `cu_seq_lens_q` / `cu_seq_lens_k` (transformers' flash-attention kwargs), else from `position_ids` that
    restart (transformers' `find_packed_sequence_indices`, the rule its dense masks use).
    """
    cu_q, cu_k = kwargs.get("cu_seq_lens_q"), kwargs.get("cu_seq_lens_k")
    if cu_q is not None or cu_k is not None:
        if cu_q is not None and cu_k is not None and not torch.equal(cu_q.cpu(), cu_k.cpu()):
            raise ValueError("`cu_seq_lens_q` and `cu_seq_lens_k` must be equal: packed queries are their own keys")
        cu = torch.unique_consecutive((cu_q if cu_q is not None else cu_k).to(device=device, dtype=torch.int32))
        if past > 0 or new_mask is not None:
            raise ValueError("`cu_seq_lens_q` / `cu_seq_lens_k` cannot be combined with a cache or a padding mask")
        if int(cu[0]) != 0 or int(cu[-1]) != batch_size * q_len or bool((cu[1:] < cu[:-1]).any()):
            raise ValueError(
                f"`cu_seq_lens_q` must rise from 0 to the number of tokens ({batch_size * q_len}), got {cu.tolist()}"
            )
        return cu
    if position_ids is None or new_mask is not None or past > 0 or position_ids.dim() != 2:
        return None
    position_ids = position_ids.to(device).expand(batch_size, -1)
    documents = find_packed_sequence_indices(position_ids)
    if documents is None:
        return None
    starts = torch.ones(batch_size, q_len, dtype=torch.bool, device=device)
    starts[:, 1:] = documents[:, 1:] != documents[:, :-1]
    offsets = starts.flatten().nonzero().flatten()
    return torch.cat([offsets, offsets.new_tensor([batch_size * q_len])]).to(torch.int32)


__all__ = ["NSALayout", "CachedPrefill", "build_nsa_layout", "cu_seqlens_of", "packed_cu_seqlens"]
