"""Shape helpers shared by the reference and the Triton kernels: compression-block counts and packed offsets."""

from collections import OrderedDict

import torch


def num_compressed_blocks(seqlen: int, compress_block_size: int, compress_stride: int) -> int:
    """Complete compression blocks in a sequence of `seqlen` tokens: block i covers [i*d, i*d + l)."""
    if seqlen < compress_block_size:
        return 0
    return (seqlen - compress_block_size) // compress_stride + 1


def compressed_cu_seqlens(cu_seqlens: torch.Tensor, compress_block_size: int, compress_stride: int) -> torch.Tensor:
    """Offsets of each packed document's compressed keys, from the offsets `cu_seqlens` of its tokens."""
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
    counts = torch.where(
        lengths >= compress_block_size,
        torch.div(lengths - compress_block_size, compress_stride, rounding_mode="floor") + 1,
        torch.zeros_like(lengths),
    )
    return torch.cat([counts.new_zeros(1), counts.cumsum(0)]).to(cu_seqlens.dtype)


_HOST: "OrderedDict[tuple, tuple]" = OrderedDict()
_HOST_SIZE = 16


def host_offsets(*offsets: torch.Tensor) -> list[list[int]]:
    """
    The values of offsets tensors as Python lists, memoised per tensor object and version: every layer of a model step
    passes the same `cu_seqlens` object, so a packed step reads them from the device once (one sync for all the
    tensors not seen before), not once per layer and kernel. An entry keeps its tensor alive, so its id cannot be
    recycled while the entry exists.
    """
    keys = [(id(t), t._version) for t in offsets]
    missing = []
    for t, key in zip(offsets, keys):
        hit = _HOST.get(key)
        if hit is not None and hit[0] is t:
            _HOST.move_to_end(key)
        elif not any(m is t for m in missing):
            missing.append(t)
    if missing:
        if len({t.device for t in missing}) == 1:
            flat = torch.cat([t.reshape(-1).long() for t in missing]).tolist()
        else:
            flat = [v for t in missing for v in t.reshape(-1).tolist()]
        start = 0
        for t in missing:
            _HOST[(id(t), t._version)] = (t, flat[start : start + t.numel()])
            start += t.numel()
        while len(_HOST) > _HOST_SIZE:
            _HOST.popitem(last=False)
    return [_HOST[key][1] for key in keys]


def compression_block_index(cu_seqlens: torch.Tensor, compress_block_size: int, compress_stride: int) -> torch.Tensor:
    """
    `[num_blocks, compress_block_size]` int64 token indices of the compression blocks of packed documents (offsets
    `cu_seqlens`), in the order of `compressed_cu_seqlens`. Built on the device from the number of blocks, which
    `host_offsets` reads (once per offsets tensor: the kernels' geometry of the same tensor reads nothing again).
    """
    l, d = compress_block_size, compress_stride
    (bounds,) = host_offsets(cu_seqlens)
    total = sum(num_compressed_blocks(end - start, l, d) for start, end in zip(bounds[:-1], bounds[1:]))
    cu = cu_seqlens.long()
    cu_cmp = compressed_cu_seqlens(cu, l, d)
    document = torch.repeat_interleave(torch.arange(cu.numel() - 1, device=cu.device), cu_cmp[1:] - cu_cmp[:-1],
                                       output_size=total)
    starts = cu[document] + (torch.arange(total, device=cu.device) - cu_cmp[document]) * d
    return starts[:, None] + torch.arange(l, device=cu.device)


def unfold_compression_blocks(
    x: torch.Tensor, compress_block_size: int, compress_stride: int, cu_seqlens: torch.Tensor | None = None,
    block_index: torch.Tensor | None = None,
) -> torch.Tensor:
    """
    Cut keys or values into (overlapping) compression blocks; blocks never cross a document boundary.

    Args:
        x: `[batch, seq, heads, dim]`; with `cu_seqlens`, batch is 1 and the documents are packed along seq.
        cu_seqlens: `[num_docs + 1]` int offsets of the packed documents, or None.
        block_index: the `compression_block_index` of `cu_seqlens` where the caller has it (then no host sync, and
            `cu_seqlens` may be None).

    Returns:
        `[batch, num_blocks, compress_block_size, heads, dim]`; packed documents have their blocks packed along
        num_blocks in the order given by `compressed_cu_seqlens`.
    """
    l, d = compress_block_size, compress_stride
    if cu_seqlens is None and block_index is None:
        if x.shape[1] < l:
            return x.new_zeros(x.shape[0], 0, l, *x.shape[2:])
        return x.unfold(1, l, d).permute(0, 1, 4, 2, 3)
    if x.shape[0] != 1:
        raise ValueError(f"with `cu_seqlens` the batch size must be 1 (documents packed along seq), got {x.shape[0]}")
    if block_index is None:
        block_index = compression_block_index(cu_seqlens, l, d)
    return x[0, block_index].unsqueeze(0)
