"""
The key/value cache of Native Sparse Attention, built on the transformers `Cache` API (`Cache` + `CacheLayerMixin`,
which exist with the same contract in transformers 5.17 and 5.24).

Per layer it holds, in the `[batch, seq, heads, dim]` layout of `nsa_hf.kernels.nsa_attention`:
- the raw keys/values of the selection branch (`"key"`, `"value"`), which are also every branch's when K/V are shared;
- with `shared_kv=False`, the raw keys/values of the compression branch (`"cmp_key"`, `"cmp_value"`, the source of
  the compressed blocks) and of the window branch (`"win_key"`, `"win_value"`);
- the compressed keys/values (`"compressed_key"`, `"compressed_value"`), one per complete compression block of each
  row's real tokens. A block is compressed once, in the forward where it completes; the prefix is never recompressed.

Raw states live in buffers that grow by whole chunks of `_GROWTH` tokens, so that a decoding step writes one column in
place instead of copying the whole cache (`torch.cat` per step costs as much memory traffic as dense attention).
The views handed out are `buffer[:, :length]`, contiguous for batch 1 and strided otherwise.

Rows may hold different numbers of real tokens (left padding in batched generation). The cache then keeps, shared by
all layers, a `[batch, seq]` mask of which cached columns are real tokens and each row's real length; compression
blocks are cut from each row's real tokens only, so a padded row gives the same result as the row run alone.
"""

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from ..kernels import num_compressed_blocks

_GROWTH = 256  # raw buffers grow to the next multiple of this many tokens
_CMP_GROWTH = 64  # compressed buffers grow to the next multiple of this many blocks


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


class NSACacheLayer(CacheLayerMixin):
    """
    One layer's NSA states. Raw streams are `[batch, capacity, heads, dim]` buffers of which the first `length` columns
    are filled; compressed streams are `[batch, capacity, heads, dim]` buffers whose row `b` holds that row's blocks in
    order (how many are valid is the cache's business: `NSACache.num_compressed`).
    """

    is_compileable = False
    is_sliding = False
    is_croppable = True

    def __init__(self, **kwargs):
        super().__init__()
        self.length = 0
        self.raw: dict[str, torch.Tensor] = {}
        self.compressed: dict[str, torch.Tensor] = {}

    # ------------------------------------------------------------------ Cache API
    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        self.is_initialized = True

    def update(self, key_states, value_states, *args, **kwargs):
        raise ValueError(
            "NSACache is filled by NSAAttention (NSA attention, the default `attn_implementation`); dense attention "
            "('sdpa' / 'eager') uses a `DynamicCache` instead."
        )

    def get_seq_length(self) -> int:
        return self.length

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.length + query_length, 0

    def get_max_length(self) -> int:
        return -1

    def offload(self):
        raise NotImplementedError("NSACache does not support offloading")

    def prefetch(self):
        raise NotImplementedError("NSACache does not support offloading")

    def reset(self) -> None:
        self.length = 0
        self.raw = {}
        self.compressed = {}
        self.keys = self.values = None
        self.is_initialized = False

    def crop(self, tokens_to_remove: int) -> None:
        """Drop the last `abs(tokens_to_remove)` token columns (compressed blocks are recounted by the cache)."""
        self.length = max(self.length - abs(tokens_to_remove), 0)
        self._refresh_views()

    def _map_batch(self, fn) -> None:
        self.raw = {name: fn(buf) for name, buf in self.raw.items()}
        self.compressed = {name: fn(buf) for name, buf in self.compressed.items()}
        self._refresh_views()

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._map_batch(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._map_batch(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._map_batch(lambda t: t[indices])

    # ------------------------------------------------------------------ NSA storage
    @staticmethod
    def _ensure(buffers: dict, name: str, like: torch.Tensor, needed: int, growth: int) -> torch.Tensor:
        """The buffer `name` with room for `needed` columns, (re)allocated like `like` `[batch, n, heads, dim]`."""
        buf = buffers.get(name)
        if buf is not None and buf.shape[0] != like.shape[0]:
            raise ValueError(f"the cache holds {buf.shape[0]} rows but the inputs have batch size {like.shape[0]}")
        if buf is not None and buf.shape[1] >= needed:
            return buf
        capacity = _round_up(max(needed, 1), growth)
        new = like.new_zeros(like.shape[0], capacity, *like.shape[2:])
        if buf is not None:
            keep = min(buf.shape[1], capacity)
            new[:, :keep] = buf[:, :keep]
        buffers[name] = new
        return new

    def append(self, states: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """
        Write the new tokens' states (`{name: [batch, new, heads, dim]}`, every stream of the layer, each call) after
        the cached ones; return `{name: [batch, length, heads, dim]}` views of all tokens.
        """
        first = next(iter(states.values()))
        if not self.is_initialized:
            self.lazy_initialization(first, first)
        num_new = first.shape[1]
        end = self.length + num_new
        out = {}
        for name, new in states.items():
            buf = self._ensure(self.raw, name, new, end, _GROWTH)
            buf[:, self.length : end] = new
            out[name] = buf[:, :end]
        self.length = end
        self._refresh_views()
        return out

    def write_compressed(self, name: str, blocks: torch.Tensor, start: int, row: int | None = None) -> None:
        """Store compressed blocks `[batch, n, heads, dim]` (or `[n, heads, dim]` for one `row`) from index `start`."""
        if row is None:
            buf = self._ensure(self.compressed, name, blocks, start + blocks.shape[1], _CMP_GROWTH)
            buf[:, start : start + blocks.shape[1]] = blocks
        else:
            like = blocks.new_empty(self.batch_size, 0, *blocks.shape[1:])
            buf = self._ensure(self.compressed, name, like, start + blocks.shape[0], _CMP_GROWTH)
            buf[row, start : start + blocks.shape[0]] = blocks

    def get_compressed(self, name: str, count: int, like: torch.Tensor, row: int | None = None) -> torch.Tensor:
        """The first `count` compressed blocks: `[batch, count, heads, dim]`, or `[count, heads, dim]` of one `row`."""
        buf = self.compressed.get(name)
        if buf is None:
            buf = like.new_zeros(self.batch_size, 0, *like.shape[2:])
        return buf[:, :count] if row is None else buf[row, :count]

    @property
    def batch_size(self) -> int:
        for buf in self.raw.values():
            return buf.shape[0]
        return 0

    def _refresh_views(self) -> None:
        # `keys` / `values` as in every transformers cache layer (the selection branch's states).
        self.keys = self.raw["key"][:, : self.length] if "key" in self.raw else None
        self.values = self.raw["value"][:, : self.length] if "value" in self.raw else None


class NSACacheStep:
    """What one forward adds to an `NSACache`, shared by every layer (built by `NSACache.begin_step`)."""

    def __init__(self, past_length, num_new, uniform, old_lengths=None, new_lengths=None, key_mask=None):
        self.past_length = past_length  # cached columns before this forward (padding included)
        self.num_new = num_new
        self.uniform = uniform  # every cached and new column of every row is a real token
        self.old_lengths = old_lengths  # per row: real tokens before / after this forward (padded case only)
        self.new_lengths = new_lengths
        self.key_mask = key_mask  # [batch, past + new] bool, which columns are real tokens (padded case only)


class NSACache(Cache):
    """
    KV cache of an NSA model: one `NSACacheLayer` per decoder layer plus the token bookkeeping shared by the layers
    (which cached columns are real tokens, each row's real length). Created by `NSAModel` when `use_cache` is on and
    by `NSAForCausalLM.generate`; pass it back as `past_key_values` (transformers 5.17) / `cache` (5.24+).

    Args:
        config: the model's `NSAConfig` (number of layers, compression block size and stride).
    """

    def __init__(self, config, **kwargs):
        num_layers = config.num_hidden_layers
        super().__init__(layers=[NSACacheLayer() for _ in range(num_layers)])
        self.compress_block_size = config.compress_block_size
        self.compress_stride = config.compress_stride
        self.key_mask: torch.Tensor | None = None  # None while every cached column of every row is a real token
        self.real_lengths: list[int] | None = None  # per row, None while rows are uniform

    def num_compressed(self, real_length: int) -> int:
        return num_compressed_blocks(real_length, self.compress_block_size, self.compress_stride)

    def begin_step(self, new_mask: torch.Tensor | None, num_new: int, batch_size: int) -> NSACacheStep:
        """
        Record the tokens of the coming forward (`new_mask`: `[batch, num_new]` bool of which are real tokens, None
        when all are) and describe the step for the layers.
        """
        past = self.get_seq_length()
        if self.key_mask is None and new_mask is None:
            return NSACacheStep(past, num_new, uniform=True)
        if past > 0 and self.layers[0].batch_size not in (0, batch_size):
            raise ValueError(
                f"the cache holds {self.layers[0].batch_size} rows but the inputs have batch size {batch_size}"
            )
        device = new_mask.device if new_mask is not None else self.key_mask.device
        past_mask = self.key_mask
        if past_mask is None:
            past_mask = torch.ones(batch_size, past, dtype=torch.bool, device=device)
        if new_mask is None:
            new_mask = torch.ones(batch_size, num_new, dtype=torch.bool, device=device)
        old_lengths = self.real_lengths if self.real_lengths is not None else [past] * batch_size
        new_lengths = [o + n for o, n in zip(old_lengths, new_mask.sum(1).tolist())]
        self.key_mask = torch.cat([past_mask, new_mask.to(torch.bool)], dim=1)
        self.real_lengths = new_lengths
        return NSACacheStep(past, num_new, uniform=False, old_lengths=old_lengths, new_lengths=new_lengths,
                            key_mask=self.key_mask)

    # Batch/length edits must keep the shared bookkeeping in step with the layers.
    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove > 0:  # transformers < 5.18: a positive value is the length to keep
            tokens_to_remove = max(self.get_seq_length() - tokens_to_remove, 0)
        tokens_to_remove = abs(tokens_to_remove)
        if tokens_to_remove == 0:
            return
        super().crop(-tokens_to_remove)
        if self.key_mask is not None:
            self.key_mask = self.key_mask[:, : self.key_mask.shape[1] - tokens_to_remove]
            self.real_lengths = self.key_mask.sum(1).tolist()

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        super().reorder_cache(beam_idx)
        if self.key_mask is not None:
            self.key_mask = self.key_mask.index_select(0, beam_idx.to(self.key_mask.device))
            self.real_lengths = [self.real_lengths[i] for i in beam_idx.tolist()]

    def batch_repeat_interleave(self, repeats: int) -> None:
        super().batch_repeat_interleave(repeats)
        if self.key_mask is not None:
            self.key_mask = self.key_mask.repeat_interleave(repeats, dim=0)
            self.real_lengths = [n for n in self.real_lengths for _ in range(repeats)]

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        super().batch_select_indices(indices)
        if self.key_mask is not None:
            self.key_mask = self.key_mask[indices]
            self.real_lengths = self.key_mask.sum(1).tolist()

    def reset(self) -> None:
        super().reset()
        self.key_mask = None
        self.real_lengths = None

    @property
    def batch_size(self) -> int:
        """Rows held, or -1 before the first forward (as transformers' `Cache.batch_size`)."""
        size = self.layers[0].batch_size if self.layers else 0
        return size if size > 0 else -1


__all__ = ["NSACache", "NSACacheLayer", "NSACacheStep"]
