"""
Dense Llama-style checkpoints (Llama, Mistral, Qwen2, Qwen3) -> NSA checkpoints for continued training.

Every dense weight is copied under the same name; the NSA-only parameters start where they change nothing a dense
model computes and give NSA a sensible start: gates at 1/3 each, compression as exact mean pooling, separate
branch K/V projections (`shared_kv=False`) as copies of the dense ones. In dense mode (`attn_implementation="sdpa"`
or `"eager"`) the converted model gives exactly the source's logits.
"""

import dataclasses
import json
import logging
import os
import secrets
import shutil
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, LlamaConfig
from transformers.utils import logging as hf_logging

from ..configuration_nsa import NSAConfig
from ..modeling import NSAForCausalLM

logger = logging.getLogger(__name__)

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")
DTYPES = ("auto", "bfloat16", "float16", "float32")
# the NSAConfig fields a conversion may set; the rest come from the source
NSA_FIELDS = tuple(f.name for f in dataclasses.fields(NSAConfig) if f.name not in
                   {f.name for f in dataclasses.fields(LlamaConfig)})
_INDEX = "model.safetensors.index.json"

# parameters that only NSA has (per decoder layer), and the dense bias NSA adds for Qwen2 (o_proj has none there)
_NSA_ONLY_MODULES = ("gate_proj", "compress_key", "compress_value", "cmp_k_proj", "cmp_v_proj", "win_k_proj",
                     "win_v_proj")
_NSA_ONLY = tuple(f"self_attn.{name}." for name in _NSA_ONLY_MODULES)
_ZERO_BIAS = "self_attn.o_proj.bias"


class VerificationError(RuntimeError):
    """`convert_checkpoint(..., verify=True)`: the converted model's dense-mode logits differ from the source's."""


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
    if nsa_fields.get("use_qk_norm", fields["use_qk_norm"]) != fields["use_qk_norm"]:
        raise ValueError(
            f"`use_qk_norm` cannot be {nsa_fields['use_qk_norm']} for a {model_type} source, which has "
            f"{'its' if fields['use_qk_norm'] else 'no'} per-head q/k norms: leave it out, it follows the source"
        )
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
    `trust_remote_code`, a model card naming the source as `base_model`). Returns the converted model.

    The source is only read. Everything is checked before anything is written: the NSA fields, the source (a path
    that looks local and is missing is reported as such without asking the Hub; a local source's weight files and
    index are read through), the output folder (an existing non-empty one is refused unless `overwrite`). The output
    is written into a folder beside `output_dir` and moved into place at the end, so a failed conversion leaves
    nothing; files and folders get the modes the process umask gives (0644 / 0755 under the usual 022).

    `verify`: before anything is written, run the source and the converted model on one random batch, and raise
    unless their dense-mode logits are identical (loads the source model a second time); both differences, dense
    mode and NSA mode, are logged at INFO level.

    Bad input raises `ValueError` (or `FileNotFoundError` / `FileExistsError`) naming the value and what is allowed.
    """
    if isinstance(dtype, str) and dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r} is not one of {', '.join(DTYPES)} (or a torch.dtype)")
    unknown = set(nsa_fields) - set(NSA_FIELDS)
    if unknown:
        raise ValueError(f"unknown NSA fields {sorted(unknown)}: allowed are {', '.join(NSA_FIELDS)}")
    NSAConfig(**nsa_fields)  # field errors first, before the source is touched
    source, local, hub_kwargs = _resolve_source(source)
    output_dir = Path(output_dir).expanduser().resolve()
    if local:
        source_dir = Path(source).resolve()
        overlap = ("is" if output_dir == source_dir else "lies inside" if source_dir in output_dir.parents
                   else "contains" if output_dir in source_dir.parents else None)
        if overlap:
            raise ValueError(f"output_dir {str(output_dir)!r} {overlap} the source checkpoint {str(source_dir)!r}, "
                             "which is only read: choose a folder apart from it")
    if output_dir.exists() and (not output_dir.is_dir() or any(output_dir.iterdir())) and not overwrite:
        raise FileExistsError(f"output_dir {str(output_dir)!r} exists and is not empty (overwrite=True replaces it)")
    if local:
        _check_weight_files(Path(source))

    dense_config = AutoConfig.from_pretrained(source, **hub_kwargs)
    config = nsa_config_from_dense(dense_config, **nsa_fields)
    note = _sliding_window_note(dense_config)
    if note:
        logger.warning(f"{note}; the NSA model's dense mode is full causal attention, equal to the source only on "
                       "sequences within that window")

    # transformers' load report would list the NSA-only weights as missing: expected here, and checked below
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        model, info = NSAForCausalLM.from_pretrained(
            source, config=config, dtype=dtype, output_loading_info=True, **hub_kwargs
        )
    except SafetensorError as err:  # a Hub download (a local source was read through above)
        raise ValueError(f"cannot read the weights of {source}: {err}") from None
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
        _verify_conversion(source, model, dtype, hub_kwargs)

    with _staging_folder(output_dir) as staging:
        model.save_pretrained(staging)
        try:
            AutoTokenizer.from_pretrained(source, **hub_kwargs).save_pretrained(staging)
        except (OSError, ValueError, TypeError) as err:  # a bare weights folder (no tokenizer files)
            logger.info(f"no tokenizer copied: none loads from {source}")
            logger.debug(f"the tokenizer of {source} does not load: {err}")
        if not local and not hub_kwargs:
            _download_model_card(source)
        config.write_model_card(staging, repo_id=output_dir.name, base_model=None if local else source)
        _apply_umask(staging)
        if output_dir.is_dir():
            shutil.rmtree(output_dir)
        elif output_dir.exists():
            output_dir.unlink()
        os.replace(staging, output_dir)
    return model


def _resolve_source(source) -> tuple[str, bool, dict]:
    """
    (source, whether it is a local folder, the `from_pretrained` arguments for it). A source that looks like a path
    (it exists, starts with `.`, `/` or `~`, has no `/` or more than one, has a `\\`, or its first part is a local
    folder) but is not a folder raises `FileNotFoundError` at once; so does a Hub id that is not in the local cache
    when the Hub is offline or unreachable (one quick request, instead of transformers' retries).
    """
    from huggingface_hub import try_to_load_from_cache
    from huggingface_hub.constants import is_offline_mode
    from huggingface_hub.utils import validate_repo_id

    text = os.fspath(source)
    path = Path(text).expanduser()
    if path.is_dir():
        return str(path), True, {}
    if path.exists():
        raise NotADirectoryError(f"source {text!r} is a file: a checkpoint is a folder (or a Hub id owner/name)")
    looks_local = (
        isinstance(source, os.PathLike) or text.startswith((".", "/", "~")) or "\\" in text
        or text.count("/") != 1 or Path(text).parent.is_dir()
    )
    if looks_local:
        raise FileNotFoundError(f"no such folder: {text!r} (a Hub id has the form owner/name)")
    try:
        validate_repo_id(text)
    except ValueError as err:
        raise ValueError(f"{text!r} is neither a local folder nor a valid Hub id: {err}") from None
    offline = is_offline_mode() or not _hub_reachable()
    if offline and not isinstance(try_to_load_from_cache(text, "config.json"), str):
        reason = "offline mode is on (HF_HUB_OFFLINE)" if is_offline_mode() else "the Hub cannot be reached"
        raise FileNotFoundError(f"no such folder: {text!r}, and {reason} to look for it as a Hub id")
    return text, False, {"local_files_only": True} if offline else {}


def _hub_reachable(timeout: float = 5.0) -> bool:
    from huggingface_hub import constants
    from huggingface_hub.utils import get_session

    try:
        get_session().head(constants.ENDPOINT, timeout=timeout)
    except Exception:  # any transport error: treat the Hub as unreachable
        return False
    return True


def _download_model_card(repo_id: str) -> None:
    """Bring the source's model card into the Hub cache, where `write_model_card` finds it to keep and extend."""
    from huggingface_hub import hf_hub_download

    try:
        hf_hub_download(repo_id, "README.md")
    except Exception as err:  # optional: a repo without a card, or a failed download, leaves a card of our own
        logger.info(f"no model card of {repo_id} to extend: {err}")


def _check_weight_files(folder: Path) -> None:
    """Read the headers of a local source's safetensors files and check its index against them."""
    index_path = folder / _INDEX
    if index_path.is_file():
        try:
            weight_map = json.loads(index_path.read_text(encoding="utf-8"))["weight_map"]
            shards = {}
            for name, file in weight_map.items():
                shards.setdefault(file, set()).add(name)
        except (ValueError, KeyError, TypeError, AttributeError) as err:
            raise ValueError(
                f"{index_path} is not a safetensors index (a JSON object with a weight_map): {err}"
            ) from None
    elif (folder / "model.safetensors").is_file():
        shards = {"model.safetensors": None}
    else:  # no safetensors weights (e.g. pytorch_model.bin): from_pretrained reports what it finds
        return
    for file, indexed in shards.items():
        path = folder / file
        if not path.is_file():
            raise FileNotFoundError(f"{index_path} names the weight file {file!r}, which is not in {folder}")
        try:
            with safe_open(path, framework="pt") as f:
                names = set(f.keys())
        except (SafetensorError, OSError) as err:
            raise ValueError(f"{path} is truncated or corrupt: {err}") from None
        if indexed is None:
            continue
        if indexed - names:
            raise ValueError(f"{index_path} maps {sorted(indexed - names)[:3]} to {file!r}, which does not hold them")
        if names - indexed:
            raise ValueError(f"{index_path} has no entry for {sorted(names - indexed)[:3]}, held by {file!r}")


@contextmanager
def _staging_folder(output_dir: Path):
    """A new folder beside `output_dir` (made like any folder, so with the umask's mode); removed on failure."""
    created = next((p for p in reversed(output_dir.parents) if not p.exists()), None)
    staging = output_dir.parent / f".{output_dir.name}.{secrets.token_hex(4)}.tmp"
    try:
        staging.mkdir(parents=True)
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        if created is not None:  # and the parent folders made for it
            shutil.rmtree(created, ignore_errors=True)
        raise


def _apply_umask(folder: Path) -> None:
    """Give every file and folder under `folder` the mode a plain `open` / `mkdir` would (some writers use 0600)."""
    umask = os.umask(0)
    os.umask(umask)
    folder.chmod(0o777 & ~umask)
    for path in folder.rglob("*"):
        path.chmod((0o777 if path.is_dir() else 0o666) & ~umask)


@torch.no_grad()
def _verify_conversion(source, model: NSAForCausalLM, dtype, hub_kwargs, seq_len: int = 64):
    dense = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, attn_implementation="sdpa", **hub_kwargs).eval()
    ids = torch.randint(0, model.config.vocab_size, (2, seq_len), generator=torch.Generator().manual_seed(0))
    expected = dense(ids).logits.float()
    previous = model.config._attn_implementation
    diffs = {}
    try:  # from_pretrained returned the model in eval mode
        for mode in ("sdpa", "nsa"):  # dense mode, then NSA (the default attn_implementation)
            model.set_attn_implementation(mode)
            diffs[mode] = (model(ids).logits.float() - expected).abs().max().item()
    finally:
        model.set_attn_implementation(previous)
    what = f"logits of the converted model vs {source} on {ids.shape[0]}x{seq_len} random tokens"
    logger.info(f"verify, dense mode (sdpa): {what}: max |difference| = {diffs['sdpa']:.3g} (must be 0)")
    logger.info(f"verify, NSA mode: {what}: max |difference| = {diffs['nsa']:.3g} (not checked: NSA attends "
                "to fewer keys, and continued training adapts the model to it)")
    if diffs["sdpa"] != 0.0:
        raise VerificationError(
            f"converted model differs from {source} in dense mode: max |logit difference| = {diffs['sdpa']:.3g}"
        )


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
