"""
Continued training of a converted NSA model (README, "Warming up a converted model"):

- stage 1 trains only the NSA-only parameters (`nsa_parameters`: gates, compression MLPs, separate branch K/V
  projections) in NSA mode, optionally with `selection_alignment_loss`, which teaches the compressed keys to rank the
  selection blocks as the model's own dense attention would;
- stage 2 trains the whole model in NSA mode.

`NSAWarmupTrainer` is a `transformers.Trainer` that adds `alignment_weight * selection_alignment_loss` to the
language-model loss of the same forward; `examples/warmup_nsa.py` runs both stages on a folder of text.

The alignment target is dense attention with the same weights: each layer's softmax(q k^T) over every earlier key of
the document, computed from the queries and keys that layer gets in the NSA forward, summed per selection block and
over the query heads of a KV group (the selection is shared by a group, Eq. 10), then renormalised over the blocks the
selection can choose (eligible and not fixed). The prediction is the NSA block score of Eq. 8-9 from the compressed
keys, normalised the same way. No second model and no second forward: the target needs only the layer's q and k.
The queries and keys enter without gradient, so the loss trains the compression of the keys (and `cmp_k_proj` when
the K/V are separate), never the dense projections.
"""

import math

import torch
from torch import nn
from transformers import Trainer
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from .conversion.convert import NSA_ONLY_MODULES
from .kernels import unfold_compression_blocks
from .modeling.layout_nsa import packed_cu_seqlens
from .modeling.modeling_nsa import NSAAttention

__all__ = ["nsa_parameters", "freeze_all_but_nsa", "selection_alignment_loss", "NSAWarmupTrainer"]

# Query positions per document at which the alignment is computed: evenly spaced, so its cost stays a small share of
# a dense attention forward at long context.
ALIGNMENT_QUERIES = 256
_QUERY_CHUNK = 64  # bounds the [queries, heads, keys] dense-attention probabilities held at once


def _nsa_attentions(model: nn.Module) -> list[NSAAttention]:
    layers = [m for m in model.modules() if isinstance(m, NSAAttention)]
    if not layers:
        raise ValueError(f"{type(model).__name__} has no NSA attention layers: expected an NSA model (nsa_hf), "
                         "e.g. one made by `nsa-hf convert`, or a wrapper of one")
    return layers


def nsa_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """
    The parameters only NSA has, by their names in `model` (which may wrap an NSA model: peft, DDP): per attention
    layer the gates (`gate_proj`), the `mlp` compressions (`compress_key`, `compress_value`) and, with
    `shared_kv=False`, the compressed and window branches' K/V projections. A converted model got these at
    conversion; every other parameter is the dense source's.
    """
    nsa_only = {id(p) for attn in _nsa_attentions(model) for name in NSA_ONLY_MODULES if hasattr(attn, name)
                for p in getattr(attn, name).parameters()}
    return {name: p for name, p in model.named_parameters() if id(p) in nsa_only}


def freeze_all_but_nsa(model: nn.Module) -> dict[str, nn.Parameter]:
    """Stage 1: `requires_grad=False` for every parameter but `nsa_parameters(model)`; returns those it keeps."""
    trainable = nsa_parameters(model)
    keep = {id(p) for p in trainable.values()}
    for p in model.parameters():
        p.requires_grad_(id(p) in keep)
    return trainable


class _AttentionInputs:
    """What each NSA attention layer gets in one forward (its input hidden states and RoPE cos/sin), recorded by hooks."""

    def __init__(self, model: nn.Module):
        self.layers = _nsa_attentions(model)
        self.inputs: dict[NSAAttention, tuple] = {}

    def __enter__(self):
        self._handles = [layer.register_forward_pre_hook(self._record, with_kwargs=True) for layer in self.layers]
        return self

    def __exit__(self, *exc):
        for handle in self._handles:
            handle.remove()

    def _record(self, layer, args, kwargs):
        if layer not in self.inputs:  # the first call; a gradient-checkpointing recompute comes after the forward
            hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
            cos, sin = kwargs["position_embeddings"]
            self.inputs[layer] = (hidden.detach(), cos.detach(), sin.detach())

    def alignment_loss(self, position_ids=None, max_queries: int = ALIGNMENT_QUERIES,
                       max_query_position: int | None = None, **kwargs):
        """
        (the mean KL over every layer, document, chosen query and KV head, see the module docstring; the number of
        terms). With no document long enough for a choosable block, (None, 0).
        """
        if len(self.inputs) != len(self.layers):
            raise RuntimeError("the forward did not reach every NSA attention layer")
        mask = kwargs.get("attention_mask")
        if mask is not None and not bool(mask.bool().all()):
            raise ValueError("the selection-alignment loss takes no padded batches (an attention_mask with zeros): "
                             "pack the documents instead, with restarting position_ids (DataCollatorWithFlattening)")
        hidden = next(iter(self.inputs.values()))[0]
        batch, seq = hidden.shape[:2]
        cu_seqlens = packed_cu_seqlens(kwargs, position_ids, None, 0, batch, seq, hidden.device)
        if cu_seqlens is None:  # every row is one document
            cu_seqlens = torch.arange(0, batch * seq + 1, seq, device=hidden.device)
        bounds = cu_seqlens.tolist()
        total, count = None, 0
        for layer, (hidden, cos, sin) in self.inputs.items():
            kl, n = _layer_alignment(layer, hidden, cos, sin, bounds, max_queries, max_query_position)
            if n:
                total = kl if total is None else total + kl
                count += n
        return (total / count if count else None), count


def _layer_alignment(attn: NSAAttention, hidden, cos, sin, bounds: list[int], max_queries: int,
                     max_query_position: int | None = None):
    """(sum of the KL over the chosen queries and KV heads of every document, their number) for one layer."""
    config = attn.config
    l, d, lp = config.compress_block_size, config.compress_stride, config.select_block_size
    kv_heads, dim = attn.num_key_value_heads, attn.head_dim
    shape = (*hidden.shape[:2], -1, dim)
    with torch.no_grad():
        q = attn.q_proj(hidden).view(shape)
        k = attn.k_proj(hidden).view(shape)
        if config.use_qk_norm:
            q, k = attn.q_norm(q), attn.k_norm(k)
        q, k = apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=2)
    if config.shared_kv:
        k_src = k
    else:  # the compressed branch's own keys, with gradient (the projection is NSA's)
        k_src = attn.cmp_k_proj(hidden).view(shape)
        if config.use_qk_norm:
            k_src = attn.k_norm(k_src)
        k_src, _ = apply_rotary_pos_emb(k_src, k_src, cos, sin, unsqueeze_dim=2)
    q, k, k_src = (x.flatten(0, 1).float() for x in (q, k, k_src))  # [batch * seq, heads, dim]: packed documents
    fixed = config.num_initial_blocks + config.num_local_blocks
    total, count = None, 0
    for start, end in zip(bounds[:-1], bounds[1:]):
        length = end - start
        first = fixed * lp  # the first position with a block the selection may choose
        queried = length if max_query_position is None else min(length, max_query_position)
        if queried <= first:
            continue
        t = torch.linspace(first, queried - 1, min(max_queries, queried - first), device=q.device).round().long()
        t = torch.unique(t)
        k_cmp = attn.compress_key(unfold_compression_blocks(k_src[None, start:end], l, d))[0].float()
        target = _dense_block_mass(q[start + t], k[start:end], t, lp, kv_heads, attn.scaling)
        score = _selection_scores(q[start + t], k_cmp, t, l, d, lp, kv_heads, attn.scaling, target.shape[-1])
        blocks = torch.arange(target.shape[-1], device=q.device)
        choosable = (blocks >= config.num_initial_blocks) & (blocks <= (t // lp)[:, None] - config.num_local_blocks)
        choosable = choosable[:, None, :]  # [queries, 1, blocks]
        target = (target * choosable) / (target * choosable).sum(-1, keepdim=True)
        score = (score * choosable) / (score * choosable).sum(-1, keepdim=True)
        kl = (torch.xlogy(target, target) - target * torch.log(score.clamp_min(1e-30))).sum()
        total = kl if total is None else total + kl
        count += t.numel() * kv_heads
    return total, count


@torch.no_grad()
def _dense_block_mass(q, k, t, select_block_size, kv_heads, scale):
    """
    Dense causal attention of queries `q` `[n, heads, dim]` at positions `t` over one document's keys `k`
    `[length, kv_heads, dim]`, summed per selection block and over each KV group's query heads, divided by the group
    size: `[n, kv_heads, num_select_blocks]`, each row summing to 1.
    """
    length = k.shape[0]
    num_blocks = math.ceil(length / select_block_size)
    group = q.shape[1] // kv_heads
    keys = torch.arange(length, device=q.device)
    out = []
    for rows in torch.split(torch.arange(q.shape[0], device=q.device), _QUERY_CHUNK):
        qc = q[rows].view(len(rows), kv_heads, group, -1)
        logits = torch.einsum("nkgd,skd->nkgs", qc, k) * scale
        logits = logits.masked_fill(keys[None, None, None, :] > t[rows][:, None, None, None], float("-inf"))
        probs = torch.softmax(logits, dim=-1).sum(2)  # [n, kv_heads, length]
        probs = torch.nn.functional.pad(probs, (0, num_blocks * select_block_size - length))
        out.append(probs.view(len(rows), kv_heads, num_blocks, select_block_size).sum(-1) / group)
    return torch.cat(out)


def _selection_scores(q, k_cmp, t, l, d, lp, kv_heads, scale, num_blocks):
    """
    The block scores of Eq. 8-10 for queries `q` `[n, heads, dim]` at positions `t` from one document's compressed
    keys `k_cmp` `[num_compressed, kv_heads, dim]`: `[n, kv_heads, num_blocks]`, differentiable in `k_cmp`.
    """
    n, group = q.shape[0], q.shape[1] // kv_heads
    logits = torch.einsum("nkgd,ckd->nkgc", q.view(n, kv_heads, group, -1), k_cmp) * scale
    ends = torch.arange(k_cmp.shape[0], device=q.device) * d + l - 1
    logits = logits.masked_fill(ends[None, None, None, :] > t[:, None, None, None], float("-inf"))
    probs = torch.softmax(logits, dim=-1).nan_to_num(0.0).sum(2) / group  # [n, kv_heads, num_compressed]
    starts = torch.arange(k_cmp.shape[0], device=q.device) * d
    block_starts = torch.arange(num_blocks, device=q.device) * lp
    overlap = (torch.minimum(starts[:, None] + l, block_starts[None, :] + lp)
               - torch.maximum(starts[:, None], block_starts[None, :])).clamp_min(0)
    return probs @ (overlap.to(probs.dtype) / d)


def selection_alignment_loss(model: nn.Module, input_ids: torch.Tensor | None = None, *,
                             max_queries: int = ALIGNMENT_QUERIES, max_query_position: int | None = None,
                             return_outputs: bool = False, **inputs):
    """
    Run `model` on one batch (`input_ids` and any other forward arguments: `position_ids` of packed documents,
    `labels`) and return the selection-alignment loss: the mean over layers, documents, query positions and KV heads
    of KL(dense attention mass per selection block || NSA block-selection scores), both renormalised over the blocks
    the selection may choose (module docstring). `max_queries` query positions per document, evenly spaced, take part
    (documents shorter than `(num_initial_blocks + num_local_blocks) * select_block_size + 1` have none). With
    `max_query_position`, only queries at document positions below it take part: set it to the context length the
    dense source was trained on when training longer, since past it the source's own dense attention (RoPE beyond its
    training) is no target for the selection. The model
    runs in whatever attention mode it is in (the loss needs only each layer's inputs); padded batches are refused:
    pack documents instead (restarting `position_ids`, as `DataCollatorWithFlattening` makes them).

    With `return_outputs`, returns `(loss, outputs)`: `outputs.loss` is the language-model loss when `labels` were
    passed, so one forward gives both.
    """
    _check_alignment_queries(max_queries, max_query_position)
    with _AttentionInputs(model) as recorded:
        outputs = model(input_ids=input_ids, **inputs)
    loss, count = recorded.alignment_loss(max_queries=max_queries, max_query_position=max_query_position, **inputs)
    if not count:
        raise ValueError(
            "no document is long enough for the alignment loss: a query needs a selection block it may choose, i.e. "
            "at least (num_initial_blocks + num_local_blocks) * select_block_size + 1 tokens"
            + ("" if max_query_position is None else f" below max_query_position={max_query_position}")
        )
    return (loss, outputs) if return_outputs else loss


def _check_alignment_queries(max_queries, max_query_position, queries_name="max_queries",
                             position_name="max_query_position") -> None:
    if isinstance(max_queries, bool) or not isinstance(max_queries, int) or max_queries < 1:
        raise ValueError(f"{queries_name} must be a positive integer, got {max_queries!r}")
    if max_query_position is not None and (isinstance(max_query_position, bool)
                                           or not isinstance(max_query_position, int) or max_query_position < 1):
        raise ValueError(f"{position_name} must be None or a positive integer (the source's trained context "
                         f"length), got {max_query_position!r}")


class NSAWarmupTrainer(Trainer):
    """
    A `transformers.Trainer` whose loss is the language-model loss plus `alignment_weight` times
    `selection_alignment_loss`, both from the same forward (`alignment_weight=0`, the default, is the plain Trainer).
    The mean alignment loss since the last log is logged as `alignment_kl`. Use it with `freeze_all_but_nsa` for
    stage 1.
    """

    def __init__(self, *args, alignment_weight: float = 0.0, alignment_queries: int = ALIGNMENT_QUERIES,
                 alignment_max_position: int | None = None, **kwargs):
        if not alignment_weight >= 0:
            raise ValueError(f"alignment_weight must be a non-negative number, got {alignment_weight!r}")
        _check_alignment_queries(alignment_queries, alignment_max_position, "alignment_queries",
                                 "alignment_max_position")
        super().__init__(*args, **kwargs)
        self.alignment_weight = alignment_weight
        self.alignment_queries = alignment_queries
        self.alignment_max_position = alignment_max_position
        self._alignment_values: list[torch.Tensor] = []

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if not self.alignment_weight or not model.training:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        with _AttentionInputs(model) as recorded:
            loss, outputs = super().compute_loss(model, inputs, True, num_items_in_batch)
        alignment, count = recorded.alignment_loss(max_queries=self.alignment_queries,
                                                   max_query_position=self.alignment_max_position, **inputs)
        if not count:  # every document of this batch is too short to choose a block: nothing to align
            return (loss, outputs) if return_outputs else loss
        self._alignment_values.append(alignment.detach())
        scaled = getattr(self, "loss_is_scaled_for_ga", None)
        if scaled is None:  # Trainer's own rule: a loss normalised over the accumulated batch is not divided again
            scaled = (self.model_accepts_loss_kwargs and num_items_in_batch is not None) \
                or self.compute_loss_func is not None
        if scaled:  # the alignment loss is a per-batch mean: give it the share the language-model loss has
            alignment = alignment / self.current_gradient_accumulation_steps
        loss = loss + self.alignment_weight * alignment
        return (loss, outputs) if return_outputs else loss

    def log(self, logs: dict[str, float], *args, **kwargs) -> None:
        if self._alignment_values and "loss" in logs:
            logs["alignment_kl"] = round(torch.stack(self._alignment_values).mean().item(), 6)
            self._alignment_values.clear()
        super().log(logs, *args, **kwargs)

