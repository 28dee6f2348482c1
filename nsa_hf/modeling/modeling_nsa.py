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

How a forward's tokens reach the kernels is decided once per forward and shared by the layers (`layout_nsa.py`):
without a cache an `NSALayout` (batched, or packed documents / padded rows); with a cache the `NSACacheStep` of the
cache: a decoding step (at most 16 new tokens per row) runs `nsa_hf.kernels.nsa_decode` on the cache's buffers, a
longer chunk runs `nsa_attention` over each row's cached keys.
"""

import copy
from collections.abc import Callable
from dataclasses import fields

import torch
from torch import nn
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.cache_utils import Cache, DynamicCache
from transformers.generation import GenerationMixin
from transformers.masking_utils import create_causal_mask
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
from ..kernels import MAX_DECODE_QUERIES, nsa_attention, nsa_decode, num_compressed_blocks, unfold_compression_blocks
from .cache_nsa import NSACache, NSACacheStep, NSAStaticCache
from .layout_nsa import CachedPrefill, NSALayout, build_nsa_layout, packed_cu_seqlens

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
        nsa_step: NSACacheStep | None = None,
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
                                            past_key_values, nsa_layout, nsa_step)
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

    def _nsa_forward(self, hidden_states, query_states, key_states, value_states, cos, sin, cache, layout, step):
        config = self.config
        l, d = config.compress_block_size, config.compress_stride
        batch_size, q_len = query_states.shape[:2]
        gates = torch.sigmoid(self.gate_proj(hidden_states)).view(batch_size, q_len, self.num_heads, 3)
        states = self._branch_states(hidden_states, key_states, value_states, cos, sin)
        key_source, value_source = ("cmp_key", "cmp_value") if not config.shared_kv else ("key", "value")
        settings = dict(
            compress_block_size=l,
            compress_stride=d,
            select_block_size=config.select_block_size,
            num_selected_blocks=config.num_selected_blocks,
            window_size=config.window_size,
            num_initial_blocks=config.num_initial_blocks,
            num_local_blocks=config.num_local_blocks,
            scale=self.scaling,
        )

        if cache is not None:
            if step is None:
                raise ValueError("NSAAttention needs the `nsa_step` built by NSAModel when a cache is passed")
            raw, compressed = cache.update_nsa(
                self.layer_idx, states,
                (("compressed_key", key_source, self.compress_key),
                 ("compressed_value", value_source, self.compress_value)),
                step,
            )
            k_cmp, v_cmp = compressed["compressed_key"], compressed["compressed_value"]
            windows = dict(k_win=raw.get("win_key"), v_win=raw.get("win_value"))
            if step.decode:
                return nsa_decode(query_states, raw["key"], raw["value"], k_cmp, v_cmp, gates, step.query_positions,
                                  **windows, **settings)
            if step.uniform:  # every row alike: the rows' first new_length columns
                length = step.host_new_lengths[0]
                blocks = num_compressed_blocks(length, l, d)
                return nsa_attention(
                    query_states, raw["key"][:, :length], raw["value"][:, :length], k_cmp[:, :blocks],
                    v_cmp[:, :blocks], gates, **{k: v[:, :length] for k, v in windows.items() if v is not None},
                    **settings,
                )
            packing = step.packing(lambda: CachedPrefill(step, l, d, query_states.device))
            return self._packed(
                query_states, gates, packing.query_index,
                {name: packing.keys(raw[name]) for name in states},
                [packing.compressed(k_cmp), packing.compressed(v_cmp)],
                packing.cu_seqlens_q, packing.cu_seqlens_k, settings,
            )

        if layout is None or layout.mode == "batched":
            compressed = [compress(unfold_compression_blocks(states[source], l, d))
                          for source, compress in ((key_source, self.compress_key),
                                                   (value_source, self.compress_value))]
            return nsa_attention(
                query_states, states["key"], states["value"], *compressed, gates,
                k_win=states.get("win_key"), v_win=states.get("win_value"), **settings,
            )
        packed = {name: self._pack(x, layout.query_index) for name, x in states.items()}
        compressed = [compress(unfold_compression_blocks(packed[source], l, d, block_index=layout.compression_index))
                      for source, compress in ((key_source, self.compress_key), (value_source, self.compress_value))]
        return self._packed(query_states, gates, layout.query_index, packed, compressed, layout.cu_seqlens,
                            layout.cu_seqlens, settings)

    @staticmethod
    def _pack(x, query_index):
        """`[batch, q_len, ...]` -> `[1, real tokens, ...]` in document order."""
        return x.reshape(-1, *x.shape[2:]).index_select(0, query_index).unsqueeze(0)

    def _packed(self, query_states, gates, query_index, keys, compressed, cu_seqlens_q, cu_seqlens_k, settings):
        """NSA of the real queries as packed documents, scattered back to `[batch, q_len, heads, dim]` (padding: 0)."""
        batch_size, q_len = query_states.shape[:2]
        if query_index.numel() == 0:  # nothing but padding in this forward
            return query_states.new_zeros(batch_size, q_len, self.num_heads, keys["value"].shape[-1])
        out = nsa_attention(
            self._pack(query_states, query_index), keys["key"], keys["value"], *compressed,
            self._pack(gates, query_index), k_win=keys.get("win_key"), v_win=keys.get("win_value"),
            cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k, **settings,
        )[0]
        full = out.new_zeros(batch_size * q_len, *out.shape[1:]).index_copy(0, query_index, out)
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
    _can_compile_fullgraph = True  # the decoding step of an NSAStaticCache, with the kernels as custom ops
    _supports_attention_backend = False
    _can_record_outputs = {
        "hidden_states": NSADecoderLayer,
        "attentions": NSAAttention,
    }

    def _upload_modified_files(self, working_dir, repo_id, *args, **kwargs):
        # push_to_hub has just written the Hub's model card (or a blank one) over ours: extend that card
        self.config.write_model_card(working_dir, repo_id=repo_id)
        return super()._upload_modified_files(working_dir, repo_id, *args, **kwargs)

    @classmethod
    def _from_config(cls, config, **kwargs):
        """
        transformers' `_from_config` (behind `from_config`) on a copy of `config`, as `from_pretrained` does: it would
        otherwise keep the object and set `attn_implementation` on it, which switches every model built from it.
        """
        return super()._from_config(copy.deepcopy(config), **kwargs)

    def set_attn_implementation(self, attn_implementation: str | dict, *args, **kwargs):
        """
        transformers' `set_attn_implementation` (`"nsa"`, `"sdpa"`, `"eager"`) on the live model, which first takes a
        copy of its config when the value changes: `NSAForCausalLM(config)` keeps the object it is given, and a second
        model built from the same object would be switched too.
        """
        if attn_implementation != self.config._attn_implementation:
            shared, own = self.config, copy.deepcopy(self.config)
            for module in self.modules():
                if getattr(module, "config", None) is shared:
                    module.config = own
        return super().set_attn_implementation(attn_implementation, *args, **kwargs)

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
        config.validate_architecture()  # again: attributes set after `__post_init__` (`config.x = ...`) skip it
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

        nsa_layout = nsa_step = None
        if self.config._attn_implementation == NSA_ATTENTION:
            if kwargs.get("output_attentions", getattr(self.config, "output_attentions", False)):
                logger.warning_once(
                    "NSA attention forms no attention matrix: `output_attentions=True` returns no attention weights. "
                    "Load the model with attn_implementation='eager' for those of dense attention."
                )
            if self.training and self.config.attention_dropout > 0:
                logger.warning_once(
                    f"attention_dropout={self.config.attention_dropout} is not applied by NSA attention, only in dense "
                    "mode (attn_implementation='sdpa' / 'eager')."
                )
            past_key_values, position_ids, nsa_layout, nsa_step = self._prepare_nsa_inputs(
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
                nsa_step=nsa_step,
                **kwargs,
            )

        hidden_states = self.norm(hidden_states)
        return BaseModelOutputWithPast(last_hidden_state=hidden_states, **{_CACHE_FIELD: past_key_values})

    def _prepare_nsa_inputs(self, inputs_embeds, attention_mask, position_ids, cache, use_cache, kwargs):
        """The NSA cache, position ids, and the `NSALayout` (no cache) or `NSACacheStep` (cache) of one forward."""
        batch_size, q_len = inputs_embeds.shape[:2]
        device = inputs_embeds.device
        if cache is not None and not isinstance(cache, NSACache):
            if cache.get_seq_length() > 0:
                raise ValueError(
                    f"NSA attention needs an NSA cache, got a filled {type(cache).__name__}; pass an NSACache or "
                    "NSAStaticCache, or none (the model creates one), or run dense attention (attn_implementation="
                    "'sdpa')"
                )
            if type(cache) is not DynamicCache:
                logger.warning_once(
                    f"NSA attention keeps its own cache: the empty {type(cache).__name__} passed is replaced by an "
                    "NSACache; pass an NSAStaticCache for a preallocated one."
                )
            cache = NSACache(self.config)  # an empty cache of another kind (e.g. from generate): replace it
        elif cache is not None:
            self._check_cache(cache)
        # a static cache counts its tokens on the device: its steps read no host-side length
        past = cache.get_seq_length() if cache is not None and not cache.is_static else 0

        mask = None
        if attention_mask is not None:
            if attention_mask.dim() != 2:
                raise ValueError(
                    f"NSA attention takes a 2-D padding mask [batch, past + new tokens], got shape "
                    f"{tuple(attention_mask.shape)}; custom 4-D masks need attn_implementation='sdpa' or 'eager'"
                )
            allowed = {past + q_len} if cache is None else {past + q_len, q_len}
            if attention_mask.shape[0] != batch_size or attention_mask.shape[1] < q_len or (
                    not getattr(cache, "is_static", False) and attention_mask.shape[1] not in allowed):
                raise ValueError(
                    f"attention_mask has shape {tuple(attention_mask.shape)}, expected (batch, cached + new tokens) = "
                    f"{(batch_size, past + q_len)}"
                    + (f" or (batch, new tokens) = {(batch_size, q_len)}" if cache is not None else "")
                )
            mask = attention_mask[:, -q_len:].to(device=device, dtype=torch.bool)

        if cache is None:
            layout = build_nsa_layout(kwargs, position_ids, mask, batch_size, q_len, self.config.compress_block_size,
                                      self.config.compress_stride, device)
            # In training (with gradients) no cache is made unless one is passed: nothing would read it.
            if layout.mode == "packed" or not use_cache or (self.training and torch.is_grad_enabled()):
                if position_ids is None:
                    position_ids = _default_position_ids(inputs_embeds, attention_mask, 0)
                return None, position_ids, layout, None
            cache = NSACache(self.config)
            padded = layout.mode == "padded" or (mask is not None and q_len <= MAX_DECODE_QUERIES)
            new_mask = mask if padded else None
        else:
            decoding = q_len <= MAX_DECODE_QUERIES
            # Decoding steps take the mask as it is (no host sync); other forwards drop a mask without padding.
            new_mask = mask if mask is not None and (decoding or not bool(mask.all())) else None
            if not decoding and packed_cu_seqlens(kwargs, position_ids, new_mask, past, batch_size, q_len, device) \
                    is not None:
                raise ValueError("packed sequences (cu_seq_lens or restarting position_ids) cannot use a cache")

        step = cache.begin_step(new_mask, q_len, batch_size, device)
        if position_ids is None:  # positions count each row's real tokens
            position_ids = step.query_positions.clamp_min(0).long()
        return cache, position_ids, None, step

    def _check_cache(self, cache):
        """Refuse an NSA cache built from another model's config: its layers and compression blocks would not fit."""
        expected = dict(num_hidden_layers=self.config.num_hidden_layers,
                        compress_block_size=self.config.compress_block_size,
                        compress_stride=self.config.compress_stride)
        held = dict(num_hidden_layers=len(cache.layers), compress_block_size=cache.compress_block_size,
                    compress_stride=cache.compress_stride)
        if held != expected:
            differ = [name for name in expected if held[name] != expected[name]]
            raise ValueError(
                f"the {type(cache).__name__} was built for another model ("
                + ", ".join(f"{name}={held[name]}" for name in differ) + "; this model has "
                + ", ".join(f"{name}={expected[name]}" for name in differ)
                + "): build it from this model's config, e.g. NSACache(model.config)"
            )


def _default_position_ids(inputs_embeds, attention_mask, past_seen_tokens):
    """
    Positions of the new tokens: counting real tokens only under a 2-D mask (the same as `past + arange` without
    padding, and no host sync to find out), else `past + arange`.
    """
    q_len = inputs_embeds.shape[1]
    if attention_mask is not None and attention_mask.dim() == 2 and (
            attention_mask.shape[1] == past_seen_tokens + q_len or not bool(attention_mask.bool().all())):
        positions = attention_mask.long().cumsum(-1) - 1
        return positions.clamp_min(0)[:, -q_len:].to(inputs_embeds.device)
    return torch.arange(past_seen_tokens, past_seen_tokens + q_len, device=inputs_embeds.device).unsqueeze(0)


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

    def _prepare_cache_for_generation(self, generation_config, model_kwargs, generation_mode, batch_size,
                                      max_cache_length):
        """
        `generate` makes a DynamicCache, or a static cache through `_prepare_static_cache`; NSA attention swaps the
        dynamic one for an NSACache (transformers 5.17 and 5.24 alike).
        """
        if generation_config.prompt_lookup_num_tokens:
            # prompt lookup verifies its candidates without capping them at `max_length`: room for them in static caches
            max_cache_length += generation_config.prompt_lookup_num_tokens
        super()._prepare_cache_for_generation(generation_config, model_kwargs, generation_mode, batch_size,
                                              max_cache_length)
        if self.config._attn_implementation != NSA_ATTENTION:
            return
        for name in ("cache", "past_key_values"):
            cache = model_kwargs.get(name)
            if cache is None or isinstance(cache, NSACache) or cache.get_seq_length() > 0:
                continue
            if generation_config.cache_implementation not in (None, "dynamic"):
                logger.warning_once(
                    f"cache_implementation={generation_config.cache_implementation!r} is not available with NSA "
                    "attention; using an NSACache ('static' gives an NSAStaticCache)"
                )
            model_kwargs[name] = NSACache(self.config)

    def _prepare_static_cache(self, cache_implementation, batch_size, max_cache_len, *args, **kwargs):
        """`cache_implementation="static"` with NSA attention: a new `NSAStaticCache`, as long as the longest so far."""
        if self.config._attn_implementation != NSA_ATTENTION:
            return super()._prepare_static_cache(cache_implementation, batch_size, max_cache_len, *args, **kwargs)
        if "offloaded" in cache_implementation:
            raise ValueError(f"cache_implementation={cache_implementation!r}: NSA caches do not support offloading")
        # As transformers does: the longest length seen so far, so that a later call does not recompile the step.
        length = max(max_cache_len, getattr(self, "_previous_max_cache_length", -1))
        self._previous_max_cache_length = length
        return NSAStaticCache(self.config, max_cache_len=length)

    def create_masks_for_generate(self, **kwargs):
        """
        With a static cache `generate` turns the 2-D padding mask into a 4-D one here. NSA attention reads only the new
        tokens' columns of the 2-D mask: hand on those, a fixed `[batch, new tokens]` shape for compiled steps.
        """
        if self.config._attn_implementation != NSA_ATTENTION:
            from transformers.masking_utils import create_masks_for_generate

            return create_masks_for_generate(**kwargs)
        mask = kwargs.get("attention_mask")
        if mask is None:
            return None
        # a copy, not a view: the view's row stride grows every step, and compiled steps would recompile for it
        return mask[:, -kwargs["inputs_embeds"].shape[1] :].clone(memory_format=torch.contiguous_format)


__all__ = [
    "NSAPreTrainedModel",
    "NSAModel",
    "NSAForCausalLM",
    "NSAAttention",
    "NSACompression",
    "NSAGateProjection",
    "NSALayout",
    "NSACache",
    "NSAStaticCache",
]
