"""
The NSA causal language model: a Llama-style decoder whose attention is Native Sparse Attention (Yuan et al. 2025,
arXiv 2502.11089; `shared/NSA_SPEC.md`). Read top-down like transformers' `models/llama/modeling_llama.py`; the RMSNorm,
rotary embedding, MLP and RoPE function are Llama's own, imported.

Attention implementations (`config._attn_implementation`):
- `"nsa"` (the default, also when nothing is requested): queries, keys and values as in Llama, RoPE, then
  `nsa_hf.kernels.nsa_attention` mixes the compressed, selected and sliding-window branches with learned gates.
- `"sdpa"` / `"eager"` ("dense mode"): the same q/k/v/o weights run plain causal attention through transformers'
  attention functions; compression, selection and gates are ignored. A Llama checkpoint copied into an NSA model gives
  the Llama logits in this mode.

Batches reach `nsa_attention` in one of three layouts, decided once per forward (`NSALayout`):
- "batched": every token of every row is real and rows are whole sequences (the common case, cached or not);
- "packed": padded rows (2-D `attention_mask`) or packed documents (restarting `position_ids` as produced by
  `DataCollatorWithFlattening`, or explicit `cu_seq_lens_q`/`cu_seq_lens_k`) are gathered into one packed sequence with
  `cu_seqlens`, so no token attends across documents or to padding, and blocks restart per document;
- "cached_packed": an `NSACache` whose rows hold different numbers of real tokens (left-padded batched generation):
  each active row's real keys are gathered into a packed sequence and its new queries sit at its end.
"""

from collections.abc import Callable
from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F
from torch import nn
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.cache_utils import Cache, DynamicCache
from transformers.generation import GenerationMixin
from transformers.masking_utils import create_causal_mask, find_packed_sequence_indices
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, PreTrainedModel
from transformers.models.llama.modeling_llama import (
    LlamaMLP,
    LlamaRMSNorm,
    LlamaRotaryEmbedding,
    apply_rotary_pos_emb,
    eager_attention_forward,
)
from transformers.utils import can_return_tuple, logging
from transformers.utils.generic import merge_with_config_defaults
from transformers.utils.output_capturing import capture_outputs

from ..configuration_nsa import NSAConfig
from ..kernels import nsa_attention, num_compressed_blocks, unfold_compression_blocks
from .cache_nsa import NSACache, NSACacheStep

logger = logging.get_logger(__name__)

NSA_ATTENTION = "nsa"

# transformers 5.24 renamed the cache argument and output field `past_key_values` -> `cache` (with a deprecation shim);
# 5.17 only knows `past_key_values`. Our forwards accept both names and fill the output field this transformers
# declares.
_CACHE_FIELD = "cache" if "cache" in {f.name for f in fields(BaseModelOutputWithPast)} else "past_key_values"


def _pick_cache(past_key_values: Cache | None, cache: Cache | None) -> Cache | None:
    if past_key_values is not None and cache is not None and past_key_values is not cache:
        raise ValueError("pass the cache as `past_key_values` or as `cache`, not both")
    return cache if cache is not None else past_key_values


class NSARMSNorm(LlamaRMSNorm):
    pass


class NSARotaryEmbedding(LlamaRotaryEmbedding):
    pass


class NSAMLP(LlamaMLP):
    pass


class NSAGateProjection(nn.Linear):
    """
    hidden -> one logit per branch (cmp, slc, win) per query head, `[..., num_heads * 3]`; the gates are its sigmoid.
    A class of its own so that `_init_weights` can start it at weight 0, bias -ln 2 (every gate 1/3).
    """

    def __init__(self, hidden_size: int, num_heads: int):
        super().__init__(hidden_size, 3 * num_heads, bias=True)


class NSACompression(nn.Module):
    """
    phi of Eq. 7: maps each compression block `[..., compress_block_size, heads, dim]` to one vector
    `[..., heads, dim]`, with the same weights for every head.

    - `"mean"`: parameter-free mean pooling.
    - `"mlp"`: a learned position embedding `[compress_block_size, dim]` is added to the block, which is then
      `mean_pool(x) + down(act(up(flatten(x))))` with `up: l*dim -> dim`, `down: dim -> dim`. `down` starts at zero and
      the position embedding at zero (`NSAPreTrainedModel._init_weights`), so at step 0 phi is exactly mean pooling
      while every weight can learn (the residual mean keeps gradients flowing to the keys and the position embedding;
      `down` gets gradients from the first step, `up` as soon as `down` moves off zero).
    """

    def __init__(self, config: NSAConfig, head_dim: int):
        super().__init__()
        self.function = config.compress_function
        self.block_size = config.compress_block_size
        if self.function == "mlp":
            self.position_embedding = nn.Parameter(torch.zeros(self.block_size, head_dim))
            self.up_proj = nn.Linear(self.block_size * head_dim, head_dim)
            self.down_proj = nn.Linear(head_dim, head_dim)
            self.act_fn = ACT2FN[config.hidden_act]

    def forward(self, blocks: torch.Tensor) -> torch.Tensor:
        if self.function == "mean":
            return blocks.mean(dim=-3)
        x = blocks + self.position_embedding[:, None, :].to(blocks.dtype)
        flat = x.movedim(-3, -2).flatten(-2)  # [..., heads, block_size * dim]
        return x.mean(dim=-3) + self.down_proj(self.act_fn(self.up_proj(flat)))

    def extra_repr(self) -> str:
        return f"function={self.function!r}, block_size={self.block_size}"


@dataclass
class NSALayout:
    """How the tokens of one forward reach `nsa_attention` (see the module docstring); shared by every layer."""

    mode: str  # "batched" | "packed" | "cached_packed"
    # batched: compressed blocks complete before / after this forward (the same for every row)
    num_compressed_old: int = 0
    num_compressed_new: int = 0
    # packed / cached_packed: flat indices into [batch * q_len] of the real queries, in document order
    query_index: torch.Tensor | None = None
    cu_seqlens_q: torch.Tensor | None = None
    cu_seqlens_k: torch.Tensor | None = None
    # cached_packed: (row, column) of every real key of the active rows, in document order
    key_rows: torch.Tensor | None = None
    key_cols: torch.Tensor | None = None
    # cached_packed: (row, real-key columns from the first new block's start, first new block, block count after)
    block_updates: tuple = ()
    # cached_packed: (row, compressed blocks) of the active rows, in document order
    compressed_counts: tuple = ()


def _cu_seqlens(lengths: torch.Tensor) -> torch.Tensor:
    return F.pad(lengths.cumsum(0), (1, 0)).to(torch.int32)


def build_nsa_layout(
    config: NSAConfig,
    batch_size: int,
    q_len: int,
    new_mask: torch.Tensor | None,
    packed_cu_seqlens: torch.Tensor | None,
    step: NSACacheStep | None,
    device: torch.device,
) -> NSALayout:
    """The `NSALayout` of a forward; `new_mask` is the `[batch, q_len]` real-token mask (None: all real)."""
    l, d = config.compress_block_size, config.compress_stride

    def ncmp(n: int) -> int:
        return num_compressed_blocks(n, l, d)

    if step is None:
        if packed_cu_seqlens is not None:
            index = torch.arange(batch_size * q_len, device=device)
            cu = packed_cu_seqlens
            return NSALayout("packed", query_index=index, cu_seqlens_q=cu, cu_seqlens_k=cu)
        if new_mask is None:
            return NSALayout("batched", 0, ncmp(q_len))
        lengths = new_mask.sum(1)
        cu = _cu_seqlens(lengths[lengths > 0])
        index = new_mask.flatten().nonzero().flatten()
        return NSALayout("packed", query_index=index, cu_seqlens_q=cu, cu_seqlens_k=cu)
    if step.uniform:
        return NSALayout("batched", ncmp(step.past_length), ncmp(step.past_length + q_len))

    new_counts = [n - o for o, n in zip(step.old_lengths, step.new_lengths)]
    active = [b for b in range(batch_size) if new_counts[b] > 0]
    active_rows = torch.zeros(batch_size, dtype=torch.bool, device=device)
    active_rows[active] = True
    key_rows, key_cols = (step.key_mask & active_rows[:, None]).nonzero(as_tuple=True)
    query_mask = step.key_mask[:, step.past_length :]
    block_updates = []
    for b in range(batch_size):
        first, last = ncmp(step.old_lengths[b]), ncmp(step.new_lengths[b])
        if last > first:
            cols = step.key_mask[b].nonzero().flatten()[first * d :]
            block_updates.append((b, cols, first, last))
    return NSALayout(
        "cached_packed",
        query_index=query_mask.flatten().nonzero().flatten(),
        cu_seqlens_q=_cu_seqlens(torch.tensor([new_counts[b] for b in active], device=device)),
        cu_seqlens_k=_cu_seqlens(torch.tensor([step.new_lengths[b] for b in active], device=device)),
        key_rows=key_rows,
        key_cols=key_cols,
        block_updates=tuple(block_updates),
        compressed_counts=tuple((b, ncmp(step.new_lengths[b])) for b in active),
    )


class NSAAttention(nn.Module):
    """
    Llama's attention (q/k/v/o projections, GQA, RoPE) with Native Sparse Attention as the attention function.

    Extra parameters: `gate_proj` (hidden -> 3 gates per query head, sigmoid); `compress_key` / `compress_value` (phi);
    optional Qwen3-style `q_norm` / `k_norm` (RMSNorm per head, before RoPE); with `shared_kv=False`, separate key/value
    projections for the compression (`cmp_k_proj`, `cmp_v_proj`) and window (`win_k_proj`, `win_v_proj`) branches,
    the selection branch keeping `k_proj` / `v_proj`. RoPE is applied to every query/key before compression.
    """

    def __init__(self, config: NSAConfig, layer_idx: int):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        self.num_heads = config.num_attention_heads
        self.num_key_value_heads = config.num_key_value_heads
        self.num_key_value_groups = config.num_attention_heads // config.num_key_value_heads
        self.scaling = self.head_dim**-0.5
        self.attention_dropout = config.attention_dropout
        self.is_causal = True

        bias = config.attention_bias
        kv_dim = config.num_key_value_heads * self.head_dim
        self.q_proj = nn.Linear(config.hidden_size, config.num_attention_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(config.hidden_size, kv_dim, bias=bias)
        self.v_proj = nn.Linear(config.hidden_size, kv_dim, bias=bias)
        self.o_proj = nn.Linear(config.num_attention_heads * self.head_dim, config.hidden_size, bias=bias)
        if config.use_qk_norm:
            self.q_norm = NSARMSNorm(self.head_dim, eps=config.rms_norm_eps)
            self.k_norm = NSARMSNorm(self.head_dim, eps=config.rms_norm_eps)
        if not config.shared_kv:
            self.cmp_k_proj = nn.Linear(config.hidden_size, kv_dim, bias=bias)
            self.cmp_v_proj = nn.Linear(config.hidden_size, kv_dim, bias=bias)
            self.win_k_proj = nn.Linear(config.hidden_size, kv_dim, bias=bias)
            self.win_v_proj = nn.Linear(config.hidden_size, kv_dim, bias=bias)
        self.gate_proj = NSAGateProjection(config.hidden_size, config.num_attention_heads)
        self.compress_key = NSACompression(config, self.head_dim)
        self.compress_value = NSACompression(config, self.head_dim)

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        attention_mask: torch.Tensor | None = None,
        past_key_values: Cache | None = None,
        nsa_layout: NSALayout | None = None,
        **kwargs,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        input_shape = hidden_states.shape[:-1]
        hidden_shape = (*input_shape, -1, self.head_dim)

        # [batch, seq, heads, head_dim], the layout of nsa_attention
        query_states = self.q_proj(hidden_states).view(hidden_shape)
        key_states = self.k_proj(hidden_states).view(hidden_shape)
        value_states = self.v_proj(hidden_states).view(hidden_shape)
        if self.config.use_qk_norm:
            query_states = self.q_norm(query_states)
            key_states = self.k_norm(key_states)
        cos, sin = position_embeddings
        query_states, key_states = apply_rotary_pos_emb(query_states, key_states, cos, sin, unsqueeze_dim=2)

        if self.config._attn_implementation == NSA_ATTENTION:
            attn_output = self._nsa_forward(hidden_states, query_states, key_states, value_states, cos, sin,
                                            past_key_values, nsa_layout)
            attn_weights = None
        else:
            # Dense mode: Llama's attention, [batch, heads, seq, head_dim].
            query_states, key_states, value_states = (
                t.transpose(1, 2) for t in (query_states, key_states, value_states)
            )
            if past_key_values is not None:
                key_states, value_states = past_key_values.update(key_states, value_states, self.layer_idx)
            attention_interface: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(
                self.config._attn_implementation, eager_attention_forward
            )
            attn_output, attn_weights = attention_interface(
                self,
                query_states,
                key_states,
                value_states,
                attention_mask,
                dropout=0.0 if not self.training else self.attention_dropout,
                scaling=self.scaling,
                **kwargs,
            )

        attn_output = attn_output.reshape(*input_shape, -1).contiguous()
        attn_output = self.o_proj(attn_output)
        return attn_output, attn_weights

    def _branch_states(self, hidden_states, key_states, value_states, cos, sin) -> dict[str, torch.Tensor]:
        """The raw per-branch keys/values, by the names `NSACacheLayer` stores them under."""
        states = {"key": key_states, "value": value_states}
        if not self.config.shared_kv:
            hidden_shape = (*hidden_states.shape[:-1], -1, self.head_dim)
            cmp_key = self.cmp_k_proj(hidden_states).view(hidden_shape)
            win_key = self.win_k_proj(hidden_states).view(hidden_shape)
            if self.config.use_qk_norm:
                cmp_key, win_key = self.k_norm(cmp_key), self.k_norm(win_key)
            cmp_key, win_key = apply_rotary_pos_emb(cmp_key, win_key, cos, sin, unsqueeze_dim=2)
            states["cmp_key"] = cmp_key
            states["cmp_value"] = self.cmp_v_proj(hidden_states).view(hidden_shape)
            states["win_key"] = win_key
            states["win_value"] = self.win_v_proj(hidden_states).view(hidden_shape)
        return states

    def _nsa_forward(self, hidden_states, query_states, key_states, value_states, cos, sin, cache, layout):
        config = self.config
        l, d = config.compress_block_size, config.compress_stride
        batch_size, q_len = query_states.shape[:2]
        gates = torch.sigmoid(self.gate_proj(hidden_states)).view(batch_size, q_len, self.num_heads, 3)
        states = self._branch_states(hidden_states, key_states, value_states, cos, sin)
        sources = (("cmp_key", "cmp_value") if not config.shared_kv else ("key", "value"))
        compressors = (("compressed_key", self.compress_key), ("compressed_value", self.compress_value))
        cache_layer = cache.layers[self.layer_idx] if cache is not None else None
        nsa_kwargs = dict(
            compress_block_size=l,
            compress_stride=d,
            select_block_size=config.select_block_size,
            num_selected_blocks=config.num_selected_blocks,
            window_size=config.window_size,
            num_initial_blocks=config.num_initial_blocks,
            num_local_blocks=config.num_local_blocks,
            scale=self.scaling,
        )
        if layout is None:
            layout = NSALayout("batched", 0, num_compressed_blocks(q_len, l, d))
            if cache_layer is not None:
                raise ValueError("NSAAttention needs the `nsa_layout` built by NSAModel when a cache is passed")

        if layout.mode == "batched":
            if cache_layer is not None:
                states = cache_layer.append(states)
            compressed = []
            completes_blocks = cache_layer is None or layout.num_compressed_new > layout.num_compressed_old
            for source, (name, compress) in zip(sources, compressors):
                if completes_blocks:  # most decoding steps complete no block: no phi call then
                    new = compress(unfold_compression_blocks(states[source][:, layout.num_compressed_old * d :], l, d))
                if cache_layer is not None:
                    if completes_blocks:
                        cache_layer.write_compressed(name, new, layout.num_compressed_old)
                    new = cache_layer.get_compressed(name, layout.num_compressed_new, like=states[source])
                compressed.append(new)
            return nsa_attention(
                query_states, states["key"], states["value"], *compressed, gates,
                k_win=states.get("win_key"), v_win=states.get("win_value"), **nsa_kwargs,
            )

        def pack_queries(x):
            return x.reshape(batch_size * q_len, *x.shape[2:]).index_select(0, layout.query_index).unsqueeze(0)

        if layout.mode == "packed":
            states = {name: pack_queries(x) for name, x in states.items()}
            compressed = [
                compress(unfold_compression_blocks(states[source], l, d, layout.cu_seqlens_k))
                for source, (_, compress) in zip(sources, compressors)
            ]
        elif layout.mode == "cached_packed":
            states = cache_layer.append(states)
            compressed = []
            for source, (name, compress) in zip(sources, compressors):
                if layout.block_updates:
                    pieces = [states[source][row, cols].unfold(0, l, d).movedim(-1, 1)
                              for row, cols, _, _ in layout.block_updates]
                    new = compress(torch.cat(pieces)).split([p.shape[0] for p in pieces])
                    for (row, _, first, _), blocks in zip(layout.block_updates, new):
                        cache_layer.write_compressed(name, blocks, first, row=row)
                like = states[source]
                per_row = [
                    cache_layer.get_compressed(name, count, like, row=row) for row, count in layout.compressed_counts
                ]
                compressed.append(torch.cat(per_row or [like.new_zeros(0, *like.shape[2:])]).unsqueeze(0))
            states = {name: x[layout.key_rows, layout.key_cols].unsqueeze(0) for name, x in states.items()}
        else:
            raise ValueError(f"unknown NSA layout mode {layout.mode!r}")
        if layout.query_index.numel() == 0:  # nothing but padding in this forward
            return query_states.new_zeros(batch_size, q_len, self.num_heads, states["value"].shape[-1])

        out = nsa_attention(
            pack_queries(query_states), states["key"], states["value"], *compressed, pack_queries(gates),
            k_win=states.get("win_key"), v_win=states.get("win_value"),
            cu_seqlens_q=layout.cu_seqlens_q, cu_seqlens_k=layout.cu_seqlens_k, **nsa_kwargs,
        )[0]
        # Scatter back; padding positions get a zero attention output.
        full = out.new_zeros(batch_size * q_len, *out.shape[1:]).index_copy(0, layout.query_index, out)
        return full.view(batch_size, q_len, *out.shape[1:])


class NSADecoderLayer(GradientCheckpointingLayer):
    def __init__(self, config: NSAConfig, layer_idx: int):
        super().__init__()
        self.hidden_size = config.hidden_size
        self.self_attn = NSAAttention(config=config, layer_idx=layer_idx)
        self.mlp = NSAMLP(config)
        self.input_layernorm = NSARMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = NSARMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        use_cache: bool | None = False,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        **kwargs,
    ) -> torch.Tensor:
        residual = hidden_states
        hidden_states = self.input_layernorm(hidden_states)
        hidden_states, _ = self.self_attn(
            hidden_states=hidden_states,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            use_cache=use_cache,
            position_embeddings=position_embeddings,
            **kwargs,
        )
        hidden_states = residual + hidden_states

        residual = hidden_states
        hidden_states = self.post_attention_layernorm(hidden_states)
        hidden_states = self.mlp(hidden_states)
        hidden_states = residual + hidden_states
        return hidden_states


class NSAPreTrainedModel(PreTrainedModel):
    config: NSAConfig
    config_class = NSAConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["NSADecoderLayer"]
    _skip_keys_device_placement = ["past_key_values", "cache"]
    _supports_sdpa = True
    _supports_flash_attn = False
    _supports_flex_attn = False
    _can_compile_fullgraph = False
    _supports_attention_backend = False
    _can_record_outputs = {
        "hidden_states": NSADecoderLayer,
        "attentions": NSAAttention,
    }

    def _upload_modified_files(self, working_dir, repo_id, *args, **kwargs):
        # push_to_hub has just written the Hub's model card (or a blank one) over ours: extend that card
        self.config.write_model_card(working_dir, repo_id=repo_id)
        return super()._upload_modified_files(working_dir, repo_id, *args, **kwargs)

    def get_correct_attn_implementation(self, requested_attention: str | None, is_init_check: bool = False) -> str:
        """NSA unless dense attention (`"sdpa"`, `"eager"`) is requested explicitly."""
        if requested_attention is None or requested_attention == NSA_ATTENTION:
            return NSA_ATTENTION
        return super().get_correct_attn_implementation(requested_attention, is_init_check)

    @torch.no_grad()
    def _init_weights(self, module):
        """
        Llama's init, plus: gates start at 1/3 each (`gate_proj` weight 0, bias -ln 2), so the layer output starts as
        the mean of the three branches, the scale of one attention output; the `mlp` compression starts as exact mean
        pooling (position embedding and `down_proj` at zero).
        """
        super()._init_weights(module)
        if isinstance(module, NSACompression) and module.function == "mlp":
            init.zeros_(module.position_embedding)
            init.zeros_(module.down_proj.weight)
            init.zeros_(module.down_proj.bias)
        elif isinstance(module, NSAGateProjection):
            init.zeros_(module.weight)
            init.constant_(module.bias, -0.6931471805599453)  # sigmoid(-ln 2) = 1/3


class NSAModel(NSAPreTrainedModel):
    def __init__(self, config: NSAConfig):
        super().__init__(config)
        self.padding_idx = config.pad_token_id
        self.vocab_size = config.vocab_size

        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, self.padding_idx)
        self.layers = nn.ModuleList(
            [NSADecoderLayer(config, layer_idx) for layer_idx in range(config.num_hidden_layers)]
        )
        self.norm = NSARMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = NSARotaryEmbedding(config=config)
        self.gradient_checkpointing = False

        self.post_init()

    @merge_with_config_defaults
    @capture_outputs
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        use_cache: bool | None = None,
        cache: Cache | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPast:
        r"""
        Like `LlamaModel.forward`. `past_key_values` and `cache` are the same argument (transformers 5.17 / 5.24
        names). Packed documents: pass restarting `position_ids` (no `attention_mask`), or `cu_seq_lens_q` /
        `cu_seq_lens_k` with the tokens of all documents in one row. A 2-D `attention_mask` marks padding (left or
        right); without `position_ids`, positions then count real tokens only.
        """
        past_key_values = _pick_cache(past_key_values, cache)
        if (input_ids is None) ^ (inputs_embeds is not None):
            raise ValueError("You must specify exactly one of input_ids or inputs_embeds")
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)

        if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
            if use_cache or past_key_values is not None:
                logger.warning_once("Caching is incompatible with gradient checkpointing: no cache is used.")
            use_cache, past_key_values = False, None

        nsa_layout = None
        if self.config._attn_implementation == NSA_ATTENTION:
            past_key_values, position_ids, nsa_layout = self._prepare_nsa_inputs(
                inputs_embeds, attention_mask, position_ids, past_key_values, use_cache, kwargs
            )
            causal_mask = None
        else:
            if isinstance(past_key_values, NSACache):
                raise ValueError(
                    "an NSACache cannot serve dense attention ('sdpa' / 'eager'): pass a DynamicCache or none"
                )
            if use_cache and past_key_values is None:
                past_key_values = DynamicCache(config=self.config)
            if position_ids is None:
                past_seen_tokens = past_key_values.get_seq_length() if past_key_values is not None else 0
                position_ids = _default_position_ids(inputs_embeds, attention_mask, past_seen_tokens)
            causal_mask = create_causal_mask(
                self.config, inputs_embeds, attention_mask, past_key_values, position_ids=position_ids
            )

        hidden_states = inputs_embeds
        position_embeddings = self.rotary_emb(hidden_states, position_ids=position_ids)

        for decoder_layer in self.layers[: self.config.num_hidden_layers]:
            hidden_states = decoder_layer(
                hidden_states,
                attention_mask=causal_mask,
                position_embeddings=position_embeddings,
                position_ids=position_ids,
                past_key_values=past_key_values,
                use_cache=use_cache,
                nsa_layout=nsa_layout,
                **kwargs,
            )

        hidden_states = self.norm(hidden_states)
        return BaseModelOutputWithPast(last_hidden_state=hidden_states, **{_CACHE_FIELD: past_key_values})

    def _prepare_nsa_inputs(self, inputs_embeds, attention_mask, position_ids, cache, use_cache, kwargs):
        """The NSA cache, position ids and `NSALayout` of one forward."""
        batch_size, q_len = inputs_embeds.shape[:2]
        device = inputs_embeds.device
        if cache is not None and not isinstance(cache, NSACache):
            if cache.get_seq_length() > 0:
                raise ValueError(
                    f"NSA attention needs an NSACache, got a filled {type(cache).__name__}; pass an NSACache, or none "
                    "(the model creates one), or run dense attention (attn_implementation='sdpa')"
                )
            cache = NSACache(self.config)  # an empty cache of another kind (e.g. from generate): replace it
        past = cache.get_seq_length() if cache is not None else 0

        new_mask = None
        if attention_mask is not None:
            if attention_mask.dim() != 2:
                raise ValueError(
                    f"NSA attention takes a 2-D padding mask [batch, past + new tokens], got shape "
                    f"{tuple(attention_mask.shape)}; custom 4-D masks need attn_implementation='sdpa' or 'eager'"
                )
            if tuple(attention_mask.shape) != (batch_size, past + q_len):
                raise ValueError(
                    f"attention_mask has shape {tuple(attention_mask.shape)}, expected (batch, cached + new tokens) = "
                    f"{(batch_size, past + q_len)}"
                )
            mask = attention_mask[:, past:].to(device=device, dtype=torch.bool)
            if not bool(mask.all()):
                new_mask = mask

        packed_cu_seqlens = _packed_cu_seqlens(kwargs, position_ids, new_mask, past, batch_size, q_len, device)
        if packed_cu_seqlens is not None:
            if cache is not None:
                raise ValueError("packed sequences (cu_seq_lens or restarting position_ids) cannot use a cache")
        elif cache is None and use_cache and not (self.training and torch.is_grad_enabled()):
            # In training (with gradients) no cache is made unless one is passed: nothing would read it.
            cache = NSACache(self.config)

        if position_ids is None:
            padded_cache = cache is not None and cache.key_mask is not None
            if attention_mask is not None and (new_mask is not None or padded_cache):
                position_ids = _default_position_ids(inputs_embeds, attention_mask, past)
            elif cache is not None and cache.real_lengths is not None:
                starts = torch.tensor(cache.real_lengths, device=device)[:, None]
                position_ids = starts + torch.arange(q_len, device=device)
            else:
                position_ids = torch.arange(past, past + q_len, device=device).unsqueeze(0)

        step = cache.begin_step(new_mask, q_len, batch_size) if cache is not None else None
        layout = build_nsa_layout(self.config, batch_size, q_len, new_mask, packed_cu_seqlens, step, device)
        return cache, position_ids, layout


def _default_position_ids(inputs_embeds, attention_mask, past_seen_tokens):
    """Positions of the new tokens: counting real tokens only when a 2-D mask has padding, else `past + arange`."""
    q_len = inputs_embeds.shape[1]
    if attention_mask is not None and attention_mask.dim() == 2 and not bool(attention_mask.bool().all()):
        positions = attention_mask.long().cumsum(-1) - 1
        return positions.clamp_min(0)[:, -q_len:].to(inputs_embeds.device)
    return torch.arange(past_seen_tokens, past_seen_tokens + q_len, device=inputs_embeds.device).unsqueeze(0)


def _packed_cu_seqlens(kwargs, position_ids, new_mask, past, batch_size, q_len, device) -> torch.Tensor | None:
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


class NSAForCausalLM(NSAPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: NSAConfig):
        super().__init__(config)
        self.model = NSAModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)

        self.post_init()

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        cache: Cache | None = None,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        r"""
        Like `LlamaForCausalLM.forward`; `past_key_values` and `cache` are the same argument (transformers 5.17 / 5.24
        names). `labels` use -100 for ignored positions; the loss is transformers' causal-LM loss (shifted inside).
        """
        outputs: BaseModelOutputWithPast = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=_pick_cache(past_key_values, cache),
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            **kwargs,
        )

        hidden_states = outputs.last_hidden_state
        slice_indices = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.lm_head(hidden_states[:, slice_indices, :])

        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)

        return CausalLMOutputWithPast(
            loss=loss,
            logits=logits,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            **{_CACHE_FIELD: getattr(outputs, _CACHE_FIELD)},
        )

    def _prepare_cache_for_generation(self, generation_config, model_kwargs, *args, **kwargs):
        """`generate` makes a DynamicCache; NSA attention swaps it for an NSACache (both transformers 5.17 and 5.24)."""
        super()._prepare_cache_for_generation(generation_config, model_kwargs, *args, **kwargs)
        if self.config._attn_implementation != NSA_ATTENTION:
            return
        for name in ("cache", "past_key_values"):
            cache = model_kwargs.get(name)
            if cache is None or isinstance(cache, NSACache) or cache.get_seq_length() > 0:
                continue
            if generation_config.cache_implementation not in (None, "dynamic"):
                logger.warning_once(
                    f"cache_implementation={generation_config.cache_implementation!r} is not available with NSA "
                    "attention; using an NSACache"
                )
            model_kwargs[name] = NSACache(self.config)


__all__ = [
    "NSAPreTrainedModel",
    "NSAModel",
    "NSAForCausalLM",
    "NSAAttention",
    "NSACompression",
    "NSAGateProjection",
    "NSALayout",
]
