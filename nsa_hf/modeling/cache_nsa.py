"""
The key/value caches of Native Sparse Attention, on the transformers `Cache` API (`Cache` + `CacheLayerMixin`, the
same contract in transformers 5.17 and 5.24):

- `NSACache`: grows as tokens arrive (the default of `generate()` and of a forward with `use_cache=True`);
- `NSAStaticCache`: preallocated for `max_cache_len` tokens, so that a decoding step has fixed shapes and addresses
  and runs under `torch.compile` / CUDA graphs (`generate(..., cache_implementation="static")`).

Both store, per layer and in the `[batch, seq, heads, dim]` layout of `nsa_hf.kernels`, each row's REAL tokens from
column 0 (padding is never stored): the raw keys/values of the selection branch (`"key"`, `"value"`, every branch's
when K/V are shared), with `shared_kv=False` those of the compression (`"cmp_key"`, `"cmp_value"`) and window
(`"win_key"`, `"win_value"`) branches, and the compressed keys/values (`"compressed_key"`, `"compressed_value"`), one
per complete compression block of the row. Each buffer has one scratch column past its capacity, where padding
tokens and blocks that do not complete in a step are written, so that a step needs no host-side branching.

A block is compressed in the forward where it completes and never again; in a decoding step the candidate blocks
(`ceil(q_len / compress_stride)` per row) are compressed branch-free and only the completed ones land in the cache.
Shared by the layers: `seqlens` (`[batch]` int32 on the device), each row's real tokens.
"""

import math

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from ..kernels import MAX_DECODE_QUERIES, num_compressed_blocks, unfold_compression_blocks

_GROWTH = 256  # dynamic raw buffers grow to the next multiple of this many tokens


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def _tokens_to_drop(tokens_to_remove, length) -> int:
    """
    `crop`'s argument as the number of tokens to drop: transformers < 5.18 passes the length to keep (a positive
    number; a 0-d tensor in 5.17's assisted decoding), newer versions minus the number to drop. `length()`: the
    cache's length, read only for the former.
    """
    tokens_to_remove = int(tokens_to_remove)
    if tokens_to_remove > 0:
        return max(int(length()) - tokens_to_remove, 0)
    return -tokens_to_remove


def num_compressed(lengths: torch.Tensor, compress_block_size: int, compress_stride: int) -> torch.Tensor:
    """Complete compression blocks of sequences of `lengths` tokens (tensor form of `num_compressed_blocks`)."""
    return torch.where(lengths >= compress_block_size,
                       torch.div(lengths - compress_block_size, compress_stride, rounding_mode="floor") + 1, 0)


class NSACacheStep:
    """
    What one forward adds to an NSA cache, shared by every layer (`NSACache.begin_step`).

    Attributes:
        decode: the new tokens go through the decode kernels (`q_len <= 16`); else through the training kernels.
        query_positions: `[batch, q_len]` int32, each new token's position in its row, -1 for padding.
        write_columns: `[batch, q_len]` int64, where each new token is stored (the scratch column for padding).
        old_lengths, new_lengths: `[batch]` int32, real tokens per row before / after this forward.
        host_old_lengths, host_new_lengths: the same as lists (prefill only: one host sync).
    """

    def __init__(self, decode, query_positions, write_columns, old_lengths, new_lengths, capacity,
                 host_lengths=None):
        self.decode = decode
        self.capacity = capacity  # raw tokens each row can hold in this step (column `capacity` is scratch)
        self.query_positions = query_positions
        self.write_columns = write_columns
        self.old_lengths = old_lengths
        self.new_lengths = new_lengths
        self.host_old_lengths, self.host_new_lengths = host_lengths if host_lengths is not None else (None, None)

    def shared(self, name: str, build):
        """What every layer of the step needs alike (`build()`), built by the first layer that asks."""
        value = self.__dict__.get(name)
        if value is None:
            value = self.__dict__[name] = build()
        return value

    def packing(self, build):
        """The step's `CachedPrefill`, built by the first layer that asks (`build()`), shared by the rest."""
        return self.shared("_packing", build)

    @property
    def uniform(self) -> bool:
        """Prefill only: every row holds the same number of tokens and every new token is real."""
        old, new = self.host_old_lengths, self.host_new_lengths
        return len(set(old)) == 1 and len(set(new)) == 1 and new[0] - old[0] == self.query_positions.shape[1]


class NSACacheLayer(CacheLayerMixin):
    """
    One layer's NSA states: `buffers[name]` is `[batch, capacity + 1, heads, dim]` (the last column is scratch),
    row b holding that row's tokens (raw streams) or compressed blocks (compressed streams) from column 0.
    """

    is_compileable = False
    is_sliding = False
    is_croppable = True

    def __init__(self, **kwargs):
        super().__init__()
        self.buffers: dict[str, torch.Tensor] = {}

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        self.is_initialized = True

    def update(self, key_states, value_states, *args, **kwargs):
        raise ValueError(
            "an NSA cache is filled by NSAAttention (NSA attention, the default `attn_implementation`); dense "
            "attention ('sdpa' / 'eager') uses a `DynamicCache` or `StaticCache` instead."
        )

    def get_seq_length(self) -> int:
        raise NotImplementedError("ask the cache (NSACache.get_seq_length), not one of its layers")

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return 0, 0

    def get_max_length(self) -> int:
        return -1

    def offload(self):
        raise NotImplementedError("NSA caches do not support offloading")

    def prefetch(self):
        raise NotImplementedError("NSA caches do not support offloading")

    def reset(self) -> None:
        self.buffers = {}
        self.keys = self.values = None
        self.is_initialized = False

    def _map_batch(self, fn) -> None:
        self.buffers = {name: fn(buf) for name, buf in self.buffers.items()}
        self._refresh_views()

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._map_batch(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._map_batch(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._map_batch(lambda t: t[indices])

    def crop(self, tokens_to_remove: int) -> None:
        pass  # the cache's `seqlens` say what is valid

    def ensure(self, name: str, like: torch.Tensor, capacity: int) -> torch.Tensor:
        """The buffer `name`, `[batch, >= capacity + 1, heads, dim]` like `like` (dynamic caches: grown, data kept)."""
        buf = self.buffers.get(name)
        if buf is not None and buf.shape[1] >= capacity + 1:
            return buf
        new = like.new_zeros(like.shape[0], capacity + 1, *like.shape[2:])
        if buf is not None:
            keep = buf.shape[1] - 1
            new[:, :keep] = buf[:, :keep]
        self.buffers[name] = new
        return new

    def _refresh_views(self) -> None:
        # `keys` / `values` as in every transformers cache layer: the selection branch's (padded) buffers
        self.keys = self.buffers.get("key")
        self.values = self.buffers.get("value")


class NSACache(Cache):
    """
    KV cache of an NSA model that grows as tokens arrive: one `NSACacheLayer` per decoder layer plus each row's real
    length. Created by `NSAModel` when `use_cache` is on and by `generate`; pass it back as `past_key_values`
    (transformers 5.17) / `cache` (5.24+).

    Args:
        config: the model's `NSAConfig` (number of layers, compression block size and stride).
    """

    is_static = False

    def __init__(self, config, **kwargs):
        super().__init__(layers=[NSACacheLayer() for _ in range(config.num_hidden_layers)])
        self.compress_block_size = config.compress_block_size
        self.compress_stride = config.compress_stride
        self.seqlens: torch.Tensor | None = None  # [batch] int32, real tokens per row
        self._columns = 0  # token columns seen, padding included (what `get_seq_length` reports, as for Llama)
        self._host_seqlens: list[int] | None = None  # seqlens on the host while known without a sync

    # ------------------------------------------------------------------ lengths
    def get_seq_length(self, layer_idx: int = 0):
        return self._columns

    def get_max_length(self, layer_idx: int = 0) -> int:
        return -1

    def raw_capacity(self, num_new: int) -> int:
        """Raw columns the buffers need after a forward of `num_new` tokens (no row holds more than the columns)."""
        return _round_up(self._columns + num_new, _GROWTH)

    def _lengths(self, batch_size: int, device) -> torch.Tensor:
        if self.seqlens is None:
            self.seqlens = torch.zeros(batch_size, dtype=torch.int32, device=device)
            self._host_seqlens = [0] * batch_size
        if self.seqlens.shape[0] != batch_size:
            raise ValueError(f"the cache holds {self.seqlens.shape[0]} rows but the inputs have batch size {batch_size}")
        return self.seqlens

    def _advance(self, new_lengths: torch.Tensor, num_new: int) -> None:
        self.seqlens = new_lengths
        self._columns += num_new

    def begin_step(self, new_mask: torch.Tensor | None, num_new: int, batch_size: int, device) -> NSACacheStep:
        """
        Record the tokens of the coming forward (`new_mask`: `[batch, num_new]` bool, which are real tokens; None when
        all are) and describe the step for the layers. Decoding steps (`num_new <= 16`) do no host sync.
        """
        old = self._lengths(batch_size, device)
        if self.is_static:
            old = old.clone()  # the static lengths are updated in place below
        decode = num_new <= MAX_DECODE_QUERIES
        if new_mask is None:
            ranks = torch.arange(1, num_new + 1, device=device, dtype=torch.int32).expand(batch_size, num_new)
            real = None
        else:
            real = new_mask.to(device=device, dtype=torch.bool)
            ranks = real.to(torch.int32).cumsum(1, dtype=torch.int32)
        new = old + ranks[:, -1] if num_new > 0 else old.clone()
        scratch = self.raw_capacity(num_new)
        positions = old[:, None] + ranks - 1
        # past the capacity only when it is full (compiled steps do not check): such tokens go to the scratch column
        columns = positions.to(torch.int64).clamp_max(scratch)
        positions = positions.clamp_max(scratch - 1)
        if real is not None:
            positions = torch.where(real, positions, -1)
            columns = torch.where(real, columns, scratch)
        host = None
        if not decode:
            host_old = self._host_seqlens if self._host_seqlens is not None else old.tolist()
            host = (host_old, new.tolist())
            if max(host[1], default=0) > scratch:
                raise ValueError(f"the cache holds at most {scratch} tokens per row, this forward needs {max(host[1])}")
        else:
            self.check_capacity(new)
        if self.is_static:  # host lengths are only read by prefills, which sync; decoding steps must not touch them
            self._host_seqlens = None
        elif host is not None:
            self._host_seqlens = host[1]
        elif self._host_seqlens is not None:
            self._host_seqlens = [n + num_new for n in self._host_seqlens] if real is None else None
        self._advance(new, num_new)
        return NSACacheStep(decode, positions, columns, old, new, scratch, host)

    def check_capacity(self, new_lengths: torch.Tensor) -> None:
        pass  # dynamic buffers grow to fit

    # ------------------------------------------------------------------ one layer's update
    def update_nsa(self, layer_idx: int, states: dict[str, torch.Tensor], compress_sources, step: NSACacheStep):
        """
        Store one layer's new tokens (`states`: `{name: [batch, q_len, heads, dim]}`, every raw stream of the layer)
        and the compression blocks they complete (`compress_sources`: `(("compressed_key", source_name, phi), ...)`).
        Returns `(raw, compressed)`: `{name: [batch, capacity + 1, heads, dim]}` buffers of all tokens so far.
        """
        layer = self.layers[layer_idx]
        first = next(iter(states.values()))
        if not layer.is_initialized:
            layer.lazy_initialization(first, first)
        capacity = step.capacity
        rows = step.shared("_rows", lambda: torch.arange(first.shape[0], device=first.device)[:, None])
        raw = {}
        for name, new in states.items():
            buf = layer.ensure(name, new, capacity)
            buf.index_put_((rows, step.write_columns), new)
            raw[name] = buf
        d = self.compress_stride
        cmp_capacity = max(math.ceil(capacity / d), 1)
        compressed = {}
        for name, source, phi in compress_sources:
            src = raw[source]
            buf = layer.ensure(name, src[:, :0], cmp_capacity)
            if step.decode:
                self._compress_candidates(buf, src, phi, step, cmp_capacity)
            else:
                self._compress_prefill(buf, src, phi, step)
            compressed[name] = buf
        layer._refresh_views()
        return raw, compressed

    def _compress_candidates(self, buf, src, phi, step, cmp_capacity):
        """Decoding: compress the blocks that may complete in this step, branch-free; write those that do."""
        rows, tokens, dest = step.shared("_candidates", lambda: self._candidate_blocks(step, src, cmp_capacity))
        blocks = src[rows[:, :, None], tokens]  # [batch, C, l, heads, dim]
        buf.index_put_((rows, dest), phi(blocks).to(buf.dtype))

    def _candidate_blocks(self, step, src, cmp_capacity):
        """
        Per row, the blocks that may complete in this decoding step: `(rows [batch, 1], tokens [batch, C, l], dest
        [batch, C])`, dest the block's slot or the scratch slot when it does not complete. The same for every layer.
        """
        l, d = self.compress_block_size, self.compress_stride
        batch, num_new = step.query_positions.shape
        first = num_compressed(step.old_lengths, l, d)  # [batch]
        done = num_compressed(step.new_lengths, l, d)
        cand = first[:, None] + torch.arange(-(-num_new // d), device=src.device)  # [batch, C]
        tokens = (cand[..., None] * d + torch.arange(l, device=src.device)).clamp_max(step.capacity)  # scratch
        dest = torch.where(cand < done[:, None], cand, cmp_capacity).to(torch.int64)
        return torch.arange(batch, device=src.device)[:, None], tokens, dest

    def _compress_prefill(self, buf, src, phi, step):
        """Prefill: compress each row's newly completed blocks (host-known lengths)."""
        l, d = self.compress_block_size, self.compress_stride
        counts = [(num_compressed_blocks(o, l, d), num_compressed_blocks(n, l, d)) for o, n in zip(step.host_old_lengths,
                                                                            step.host_new_lengths)]
        if step.uniform:
            first, last = counts[0]
            if last > first:
                blocks = unfold_compression_blocks(src[:, first * d : (last - 1) * d + l], l, d)
                buf[:, first:last] = phi(blocks).to(buf.dtype)
            return
        pieces = [(b, f, n) for b, (f, n) in enumerate(counts) if n > f]
        if not pieces:
            return
        blocks = torch.cat([unfold_compression_blocks(src[b : b + 1, f * d : (n - 1) * d + l], l, d)[0]
                            for b, f, n in pieces])
        new = phi(blocks).to(buf.dtype).split([n - f for _, f, n in pieces])
        for (b, f, n), part in zip(pieces, new):
            buf[b, f:n] = part

    # ------------------------------------------------------------------ batch / length edits
    def crop(self, tokens_to_remove: int) -> None:
        """Drop the last `abs(tokens_to_remove)` tokens of every row (as assisted decoding rolls back)."""
        tokens_to_remove = _tokens_to_drop(tokens_to_remove, self.get_seq_length)
        if tokens_to_remove == 0 or self.seqlens is None:
            return
        self.seqlens = (self.seqlens - tokens_to_remove).clamp_min(0)
        self._columns = max(self._columns - tokens_to_remove, 0)
        if self._host_seqlens is not None:
            self._host_seqlens = [max(n - tokens_to_remove, 0) for n in self._host_seqlens]

    def _map_rows(self, fn) -> None:
        if self.seqlens is not None:
            self.seqlens = fn(self.seqlens)
            self._host_seqlens = None

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        super().reorder_cache(beam_idx)
        self._map_rows(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        super().batch_repeat_interleave(repeats)
        self._map_rows(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        super().batch_select_indices(indices)
        self._map_rows(lambda t: t[indices])

    def reset(self) -> None:
        super().reset()
        self.seqlens = None
        self._columns = 0
        self._host_seqlens = None

    @property
    def batch_size(self) -> int:
        """Rows held, or -1 before the first forward (as transformers' `Cache.batch_size`)."""
        return self.seqlens.shape[0] if self.seqlens is not None else -1


class NSAStaticCache(NSACache):
    """
    An NSA cache preallocated for `max_cache_len` tokens per row: fixed buffer shapes and addresses, lengths kept on
    the device, so a decoding step runs under `torch.compile` and CUDA graphs. `generate(...,
    cache_implementation="static")` makes one for NSA attention (and compiles the decoding step, as it does for
    transformers' `StaticCache`). Buffers are allocated at the first forward (batch, dtype and device from it).

    Args:
        config: the model's `NSAConfig`.
        max_cache_len: tokens each row can hold.
    """

    is_static = True
    is_compileable = True

    def __init__(self, config, max_cache_len: int, **kwargs):
        super().__init__(config)
        if max_cache_len < 1:
            raise ValueError(f"max_cache_len must be at least 1, got {max_cache_len}")
        self._max_cache_len = max_cache_len
        self._columns = torch.zeros((), dtype=torch.int64)

    @property
    def max_cache_len(self) -> int:
        """Tokens each row can hold."""
        return self._max_cache_len

    def get_seq_length(self, layer_idx: int = 0):
        return self._columns  # a 0-d tensor, as transformers' StaticCache: reading it needs no recompilation

    def get_max_length(self, layer_idx: int = 0) -> int:
        return self._max_cache_len

    def raw_capacity(self, num_new: int) -> int:
        return self._max_cache_len

    def check_capacity(self, new_lengths: torch.Tensor) -> None:
        if torch.compiler.is_compiling() or (new_lengths.is_cuda and torch.cuda.is_current_stream_capturing()):
            return  # positions past the capacity land in the scratch column; generate sizes the cache to fit
        longest = int(new_lengths.max()) if new_lengths.numel() else 0
        if longest > self._max_cache_len:
            raise ValueError(f"NSAStaticCache(max_cache_len={self._max_cache_len}) is full: a row needs {longest} tokens")

    def _lengths(self, batch_size: int, device) -> torch.Tensor:
        if self.seqlens is None:
            self.seqlens = torch.zeros(batch_size, dtype=torch.int32, device=device)
            self._columns = self._columns.to(device)
            if not torch.compiler.is_compiling():
                torch._dynamo.mark_static_address(self.seqlens)
                torch._dynamo.mark_static_address(self._columns)
        return super()._lengths(batch_size, device)

    def _advance(self, new_lengths: torch.Tensor, num_new: int) -> None:
        self.seqlens.copy_(new_lengths)  # in place: fixed addresses for compiled / captured steps
        self._columns.add_(num_new)

    def update_nsa(self, layer_idx, states, compress_sources, step):
        layer = self.layers[layer_idx]
        fresh = not layer.buffers
        raw, compressed = super().update_nsa(layer_idx, states, compress_sources, step)
        if fresh and not torch.compiler.is_compiling():
            for buf in layer.buffers.values():
                torch._dynamo.mark_static_address(buf)
        return raw, compressed

    def crop(self, tokens_to_remove: int) -> None:
        tokens_to_remove = _tokens_to_drop(tokens_to_remove, lambda: self._columns)
        if tokens_to_remove == 0 or self.seqlens is None:
            return
        self.seqlens.sub_(tokens_to_remove).clamp_min_(0)
        self._columns.sub_(tokens_to_remove).clamp_min_(0)
        self._host_seqlens = None

    def _map_rows(self, fn) -> None:
        if self.seqlens is not None:
            self.seqlens.copy_(fn(self.seqlens))
            self._host_seqlens = None

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        for layer in self.layers:  # in place: the buffers keep their addresses
            for buf in layer.buffers.values():
                buf.copy_(buf.index_select(0, beam_idx.to(buf.device)))
        self._map_rows(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        raise NotImplementedError("NSAStaticCache has a fixed batch size; size it for all beams / sequences up front")

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        raise NotImplementedError("NSAStaticCache has a fixed batch size")

    def reset(self) -> None:
        for layer in self.layers:
            for buf in layer.buffers.values():
                buf.zero_()
        if self.seqlens is not None:
            self.seqlens.zero_()
            self._columns.zero_()
            self._host_seqlens = [0] * self.seqlens.shape[0]


__all__ = ["NSACache", "NSAStaticCache", "NSACacheLayer", "NSACacheStep"]
