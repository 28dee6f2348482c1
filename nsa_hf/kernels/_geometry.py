"""
The packed geometry of an attention call, built once where the inputs enter (`nsa_attention`, or an op's public
function) and handed down to every launcher of the forward and the backward.

Without `cu_seqlens` the batch entries play the role of documents (each `q_len` queries, the last of `k_len` key
positions). With `cu_seqlens` the documents are packed along one sequence; reading their offsets on the host is the one
host sync of a packed call, and it happens once per offsets tensor object (`utils.host_offsets`): every layer of a
model step passes the same `cu_seqlens`, so a step syncs once, at its first layer. The geometry is cached per offsets
object too, and it memoises the device tables derived from the offsets (compressed-key offsets, work lists of the band
kernels, query tiles and reverse-index positions of the selected attention), so that layers after the first and the
backward build nothing.
"""

from collections import OrderedDict

import torch

from ._checks import check_document_lengths, check_query_count
from .utils import compressed_cu_seqlens, host_offsets, num_compressed_blocks


class Geometry:
    """
    Attributes:
        varlen: packed documents (batch 1) or a plain batch.
        batch, num_docs: batch size; documents (`batch` when not packed).
        q_len, k_len: queries / key positions per sequence; packed: in all documents (`k_len` None when the caller
            gave no key tensor, e.g. compressed attention alone).
        max_q, max_k, avg_q, avg_k: longest / mean document's queries and key positions (host ints).
        cu_q, cu_k: int32 `[num_docs + 1]` offsets on the inputs' device (packed), else None.
        bounds_q, bounds_k: the same offsets as Python lists (packed), else None.
        dummy: int32 `[1]` on the device, for pointer arguments a kernel variant does not read.
    """

    def __init__(self, device, batch, q_len, k_len, cu_q=None, cu_k=None, bounds_q=None, bounds_k=None):
        self.device = device
        self.varlen = cu_q is not None
        self.batch, self.q_len, self.k_len = batch, q_len, k_len
        self.cu_q, self.cu_k, self.bounds_q, self.bounds_k = cu_q, cu_k, bounds_q, bounds_k
        if self.varlen:
            self.num_docs = len(bounds_q) - 1
            lens_q = [b - a for a, b in zip(bounds_q[:-1], bounds_q[1:])]
            self.lens_k = [b - a for a, b in zip(bounds_k[:-1], bounds_k[1:])]
            self.max_q, self.max_k = max(lens_q), max(self.lens_k)
            self.avg_q = max(1, q_len // self.num_docs)
            self.avg_k = bounds_k[-1] // self.num_docs
        else:
            self.num_docs = batch
            self.max_q = self.avg_q = q_len
            self.max_k = self.avg_k = k_len
        self.dummy = torch.zeros(1, dtype=torch.int32, device=device)
        self._tables = {}

    def table(self, tag: tuple, build):
        """A device table derived from the geometry, built on first use by `build()` and kept with it."""
        value = self._tables.get(tag)
        if value is None:
            value = self._tables[tag] = build()
        return value

    def compressed_offsets(self, compress_block_size: int, compress_stride: int) -> torch.Tensor | None:
        """int32 offsets of each document's compressed keys (packed), else None."""
        if not self.varlen:
            return None
        l, d = compress_block_size, compress_stride
        return self.table(("cmp", l, d), lambda: compressed_cu_seqlens(self.cu_k, l, d).to(torch.int32))

    def num_compressed(self, compress_block_size: int, compress_stride: int) -> int:
        """Compressed keys of all documents (packed) or of one sequence, from the host offsets (no sync)."""
        lens = self.lens_k if self.varlen else [self.k_len]
        return sum(num_compressed_blocks(n, compress_block_size, compress_stride) for n in lens)

    def work_list(self, cu: torch.Tensor | None, rows: int, rows_per_doc: int, block: int):
        """
        Work over (document, tile of `block` rows) -> (grid size, tile -> doc, doc -> first tile, tiles per doc).
        Packed (`cu`: the offsets of the rows, one of this geometry's tensors): built on the device without a sync;
        the grid is an upper bound and surplus programs exit. Not packed: tile arithmetic, dummies for the tables.
        """
        if not self.varlen:
            tiles = -(-rows_per_doc // block)
            return self.batch * tiles, self.dummy, self.dummy, tiles
        return self.table(("work", id(cu), rows, block), lambda: self._work_list(cu, rows, block))

    def _work_list(self, cu, rows, block):
        lens = cu[1:] - cu[:-1]
        cum = torch.zeros(self.num_docs + 1, dtype=torch.int32, device=cu.device)
        torch.cumsum(torch.div(lens + (block - 1), block, rounding_mode="floor"), 0, out=cum[1:])
        grid = -(-rows // block) + self.num_docs
        tile_doc = torch.searchsorted(cum[1:], torch.arange(grid, device=cu.device, dtype=torch.int32), right=True)
        return grid, tile_doc.to(torch.int32), cum, 0


_GEOMETRIES: "OrderedDict[tuple, tuple]" = OrderedDict()
_CACHE_SIZE = 16


def geometry(q: torch.Tensor, num_keys: int | None = None, cu_seqlens_q=None, cu_seqlens_k=None) -> Geometry:
    """
    The geometry of a call with queries `q` `[B, Tq, ...]` and `num_keys` key positions (per sequence; packed: in
    all documents, or None where no key tensor bounds them), checked: queries <= keys per sequence or document, and
    packed offsets that end at the packed lengths. The shapes of `cu_seqlens_*` are the caller's to check
    (`_checks.check_packing`). Cached per (shape, device) or per offsets tensor objects and versions.
    """
    if cu_seqlens_q is None:
        key, sources = (q.device, q.shape[0], q.shape[1], num_keys), ()
    else:
        sources = (cu_seqlens_q, cu_seqlens_k)
        key = (q.device, q.shape[1], num_keys, id(cu_seqlens_q), cu_seqlens_q._version, id(cu_seqlens_k),
               cu_seqlens_k._version)
    hit = _GEOMETRIES.get(key)
    if hit is not None and all(a is b for a, b in zip(hit[0], sources)):
        _GEOMETRIES.move_to_end(key)
        return hit[1]
    if cu_seqlens_q is None:
        k_len = q.shape[1] if num_keys is None else int(num_keys)
        check_query_count(q.shape[1], k_len)
        geo = Geometry(q.device, q.shape[0], q.shape[1], k_len)
    else:
        bounds_q, bounds_k = host_offsets(cu_seqlens_q, cu_seqlens_k)
        check_document_lengths(bounds_q, bounds_k, q.shape[1], num_keys)
        to = dict(device=q.device, dtype=torch.int32)
        cu_q = cu_seqlens_q.to(**to).contiguous()
        cu_k = cu_q if cu_seqlens_k is cu_seqlens_q else cu_seqlens_k.to(**to).contiguous()
        geo = Geometry(q.device, 1, q.shape[1], num_keys, cu_q, cu_k, bounds_q, bounds_k)
    _GEOMETRIES[key] = (sources, geo)
    if len(_GEOMETRIES) > _CACHE_SIZE:
        _GEOMETRIES.popitem(last=False)
    return geo


def attention_geometry(q, k, k_cmp, compress_block_size: int, compress_stride: int, cu_seqlens_q=None,
                       cu_seqlens_k=None) -> Geometry:
    """`geometry` of an `nsa_attention` call, which also checks that packed documents have `k_cmp`'s block count."""
    geo = geometry(q, k.shape[1], cu_seqlens_q, cu_seqlens_k)
    if geo.varlen and k_cmp.shape[1] != geo.num_compressed(compress_block_size, compress_stride):
        raise ValueError(f"k_cmp holds {k_cmp.shape[1]} compressed blocks, the documents of cu_seqlens_k have "
                         f"{geo.num_compressed(compress_block_size, compress_stride)}")
    return geo
