"""Shape helpers shared by the reference and the Triton kernels: compression-block counts and packed offsets."""

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


def unfold_compression_blocks(
    x: torch.Tensor, compress_block_size: int, compress_stride: int, cu_seqlens: torch.Tensor | None = None
) -> torch.Tensor:
    """
    Cut keys or values into (overlapping) compression blocks; blocks never cross a document boundary.

    Args:
        x: `[batch, seq, heads, dim]`; with `cu_seqlens`, batch is 1 and the documents are packed along seq.
        cu_seqlens: `[num_docs + 1]` int offsets of the packed documents, or None.

    Returns:
        `[batch, num_blocks, compress_block_size, heads, dim]`; with `cu_seqlens` the blocks of all documents are
        packed along num_blocks in the order given by `compressed_cu_seqlens`.
    """
    l, d = compress_block_size, compress_stride
    if cu_seqlens is None:
        if x.shape[1] < l:
            return x.new_zeros(x.shape[0], 0, l, *x.shape[2:])
        return x.unfold(1, l, d).permute(0, 1, 4, 2, 3)
    if x.shape[0] != 1:
        raise ValueError(f"with `cu_seqlens` the batch size must be 1 (documents packed along seq), got {x.shape[0]}")
    bounds = cu_seqlens.tolist()
    pieces = [unfold_compression_blocks(x[:, s:e], l, d) for s, e in zip(bounds[:-1], bounds[1:])]
    if not pieces:
        return x.new_zeros(1, 0, l, *x.shape[2:])
    return torch.cat(pieces, dim=1)
