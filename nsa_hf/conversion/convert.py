"""
Dense Llama-style checkpoints (Llama, Mistral, Qwen2, Qwen3) -> NSA checkpoints for continued training.

Every dense weight is copied under the same name; the NSA-only parameters start where they change nothing a dense
model computes and give NSA a sensible start: gates at 1/3 each, compression as exact mean pooling, separate
branch K/V projections (`shared_kv=False`) as copies of the dense ones. In dense mode (`attn_implementation="sdpa"`
or `"eager"`) the converted model gives exactly the source's logits.
"""

import dataclasses
import logging
import os
import shutil
import tempfile
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
from transformers.utils import logging as hf_logging

from ..configuration_nsa import NSAConfig
from ..modeling import NSAForCausalLM

logger = logging.getLogger(__name__)

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")

# parameters that only NSA has (per decoder layer), and the dense bias NSA adds for Qwen2 (o_proj has none there)
_NSA_ONLY_MODULES = ("gate_proj", "compress_key", "compress_value", "cmp_k_proj", "cmp_v_proj", "win_k_proj",
                     "win_v_proj")
_NSA_ONLY = tuple(f"self_attn.{name}." for name in _NSA_ONLY_MODULES)
_ZERO_BIAS = "self_attn.o_proj.bias"


def nsa_config_from_dense(dense_config, **nsa_fields) -> NSAConfig:
    """
    The NSAConfig of a dense Llama / Mistral / Qwen2 / Qwen3 config: its shared fields copied, the architecture
    differences mapped (Qwen2's q/k/v biases, Qwen3's q/k RMSNorm), `nsa_fields` (any NSAConfig field) on top.
    """
    model_type = getattr(dense_config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(
            f"cannot convert a checkpoint of model_type {model_type!r}: supported are {', '.join(SUPPORTED_MODEL_TYPES)}"
        )
    if getattr(dense_config, "mlp_bias", False) and model_type != "llama":
        raise ValueError(f"{model_type} with `mlp_bias=True` is not a layout NSA covers")
    names = {f.name for f in dataclasses.fields(NSAConfig)} - {"architectures", "transformers_version", "dtype"}
    fields = {k: v for k, v in dense_config.to_dict().items() if k in names}
    if fields.get("head_dim") is None:
        fields["head_dim"] = dense_config.hidden_size // dense_config.num_attention_heads
    if fields.get("num_key_value_heads") is None:
        fields["num_key_value_heads"] = dense_config.num_attention_heads
    if model_type == "qwen2":
        fields["attention_bias"] = True  # q/k/v carry biases; o_proj gets a zero one
    elif model_type == "mistral":
        fields["attention_bias"] = False
    fields["use_qk_norm"] = model_type == "qwen3"
    unknown = set(nsa_fields) - {f.name for f in dataclasses.fields(NSAConfig)}
    if unknown:
        raise ValueError(f"unknown NSAConfig fields {sorted(unknown)}")
    return NSAConfig(**{**fields, **nsa_fields})


def _sliding_window_note(dense_config) -> str | None:
    window = getattr(dense_config, "sliding_window", None)
    layer_types = getattr(dense_config, "layer_types", None)
    if dense_config.model_type == "mistral" and window is not None:
        return f"the source uses a {window}-token sliding window"
    if layer_types and "sliding_attention" in layer_types:
        return f"{layer_types.count('sliding_attention')} source layers use a {window}-token sliding window"
    return None


def convert_checkpoint(
    source: str | os.PathLike,
    output_dir: str | os.PathLike,
    *,
    dtype: str | torch.dtype = "auto",
    overwrite: bool = False,
    verify: bool = False,
    **nsa_fields,
) -> NSAForCausalLM:
    """
    Convert the dense checkpoint `source` (a local folder or a Hub id) into an NSA checkpoint in `output_dir`
    (weights, config with the NSA fields, generation config, tokenizer when the source has one, the flat code for
    `trust_remote_code`). The source is only read. The output is written into a temporary folder beside
    `output_dir` and moved into place at the end, so a failed conversion leaves no partial checkpoint; an existing
    non-empty `output_dir` is refused unless `overwrite`. `verify`: before anything is written, run the source and
    the converted model in dense mode on one random batch and raise unless their logits are identical (loads the
    source model a second time). Returns the converted model.
    """
    output_dir = Path(output_dir).resolve()
    if Path(source).exists() and Path(source).resolve() == output_dir:
        raise ValueError(f"output_dir {str(output_dir)!r} is the source checkpoint: choose another folder")
    if output_dir.exists() and (not output_dir.is_dir() or any(output_dir.iterdir())) and not overwrite:
        raise FileExistsError(f"output_dir {str(output_dir)!r} exists and is not empty (pass overwrite=True)")

    dense_config = AutoConfig.from_pretrained(source)
    config = nsa_config_from_dense(dense_config, **nsa_fields)
    note = _sliding_window_note(dense_config)
    if note:
        logger.warning(f"{note}; the NSA model's dense mode is full causal attention, equal to the source only on "
                       "sequences within that window")

    # transformers' load report would list the NSA-only weights as missing: expected here, and checked below
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        model, info = NSAForCausalLM.from_pretrained(source, config=config, dtype=dtype, output_loading_info=True)
    finally:
        hf_logging.set_verbosity(verbosity)
    missing = [k for k in info["missing_keys"] if not _nsa_only(k, config)]
    if missing or info["mismatched_keys"]:
        raise ValueError(
            f"{source} does not match the {dense_config.model_type} layout NSA expects: missing {missing[:5]}, "
            f"mismatched {list(info['mismatched_keys'])[:5]}"
        )
    ignored = [k for k in info["unexpected_keys"] if "rotary_emb" not in k]
    if ignored:
        raise ValueError(f"{source} has weights NSA has no place for: {ignored[:5]}")
    _init_nsa_only(model, config, zero_o_bias=any(k.endswith(_ZERO_BIAS) for k in info["missing_keys"]))
    if verify:
        _verify_dense_equal(source, model, dtype)

    output_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.", dir=output_dir.parent))
    try:
        model.save_pretrained(staging)
        try:
            AutoTokenizer.from_pretrained(source).save_pretrained(staging)
        except (OSError, ValueError, TypeError) as err:  # a bare weights folder (no tokenizer files)
            logger.info(f"no tokenizer copied from {source}: {err}")
        if output_dir.is_dir():
            shutil.rmtree(output_dir)
        elif output_dir.exists():
            output_dir.unlink()
        os.replace(staging, output_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return model


@torch.no_grad()
def _verify_dense_equal(source, model: NSAForCausalLM, dtype, seq_len: int = 64):
    dense = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, attn_implementation="sdpa").eval()
    ids = torch.randint(0, model.config.vocab_size, (2, seq_len), generator=torch.Generator().manual_seed(0))
    previous = model.config._attn_implementation
    model.set_attn_implementation("sdpa")
    try:  # from_pretrained returned the model in eval mode
        diff = (model(ids).logits.float() - dense(ids).logits.float()).abs().max().item()
    finally:
        model.set_attn_implementation(previous)
    if diff != 0.0:
        raise RuntimeError(f"converted model differs from {source} in dense mode: max |logit difference| = {diff:.3g}")
    logger.info(f"verified: dense-mode logits equal those of {source} on a {seq_len}-token batch")


def _nsa_only(name: str, config: NSAConfig) -> bool:
    return any(part in name for part in _NSA_ONLY) or (config.attention_bias and name.endswith(_ZERO_BIAS))


@torch.no_grad()
def _init_nsa_only(model: NSAForCausalLM, config: NSAConfig, zero_o_bias: bool):
    """The start of the NSA-only parameters, set here explicitly rather than left to the init of missing weights."""
    for layer in model.model.layers:
        attn = layer.self_attn
        nsa_modules = [m for name, m in attn.named_modules() if name.split(".")[0] in _NSA_ONLY_MODULES]
        for module in reversed(nsa_modules):  # children first: a compression module then zeroes its own down_proj
            model._init_weights(module)
        if zero_o_bias:
            attn.o_proj.bias.zero_()
        if not config.shared_kv:
            for branch in ("cmp", "win"):
                for dense, copy in ((attn.k_proj, getattr(attn, f"{branch}_k_proj")),
                                    (attn.v_proj, getattr(attn, f"{branch}_v_proj"))):
                    copy.weight.copy_(dense.weight)
                    if copy.bias is not None:
                        copy.bias.copy_(dense.bias)
