"""
Dense Llama-style checkpoints (Llama, Mistral, Qwen2, Qwen3) -> NSA checkpoints for continued training, streamed:
the source is read one tensor at a time and the output written one shard at a time, so the peak memory is about one
output shard whatever the size of the model.

Every dense weight is copied under the same name. The NSA-only parameters start where NSA computes what the source
computes wherever the math allows (`nsa_init="dense"`, the default; README "Converting a dense checkpoint"): the
compressed branch gets a small gate, the selected and window branches share the rest, compression starts as exact
mean pooling and separate branch K/V projections (`shared_kv=False`) as copies of the dense ones. `nsa_init="uniform"`
starts the gates at 1/3 each, as a fresh NSA model does. In dense mode (`attn_implementation="sdpa"` or `"eager"`)
the converted model gives exactly the source's logits, whichever the init.
"""

import dataclasses
import json
import logging
import math
import os
import secrets
import shutil
from contextlib import contextmanager
from pathlib import Path

import torch
from huggingface_hub import split_torch_state_dict_into_shards
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig, LlamaConfig

from ..configuration_nsa import NSAConfig
from ..modeling import NSAForCausalLM

logger = logging.getLogger(__name__)

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")
DTYPES = ("auto", "bfloat16", "float16", "float32")
NSA_INITS = ("dense", "uniform")
# nsa_init="dense": the compressed branch's gate at step 0 (the selected and window gates share the rest, so their
# weights sum to 1 - DENSE_INIT_CMP_GATE). Small enough that NSA mode is within ~0.1% of the source's loss where the
# window sees every key, large enough that the gate's sigmoid is far from saturation: its gradient is
# g(1 - g) = 0.0196 of the logit's, and Adam's updates do not shrink with it (README, "What the converted model
# computes at step 0", has the measured trade-off).
DENSE_INIT_CMP_GATE = 0.02
# the NSAConfig fields a conversion may set; the rest come from the source
NSA_FIELDS = tuple(f.name for f in dataclasses.fields(NSAConfig) if f.name not in
                   {f.name for f in dataclasses.fields(LlamaConfig)})
# the output's shard size when none is given: huggingface_hub's default, that of most Hub checkpoints
MAX_SHARD_SIZE = "5GB"
_INDEX = "model.safetensors.index.json"
_PICKLE_INDEX = "pytorch_model.bin.index.json"

# modules that only NSA has (per decoder layer), and the dense bias NSA adds for Qwen2 (o_proj has none there)
NSA_ONLY_MODULES = ("gate_proj", "compress_key", "compress_value", "cmp_k_proj", "cmp_v_proj", "win_k_proj",
                    "win_v_proj")
_NSA_ONLY = tuple(f"self_attn.{name}." for name in NSA_ONLY_MODULES)
_ZERO_BIAS = "self_attn.o_proj.bias"
# separate branch K/V projections (`shared_kv=False`) start as copies of the dense ones
_BRANCH_COPIES = {f"{branch}_{kv}_proj": f"{kv}_proj" for branch in ("cmp", "win") for kv in ("k", "v")}
_SAFETENSORS_FLOATS = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
# what a Hub source's download brings: config, weights index, tokenizer files, generation config, card
_HUB_FILES = ["*.json", "*.model", "*.txt", "*.tiktoken", "README.md"]


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
    nsa_init: str = "dense",
    max_shard_size: int | str = MAX_SHARD_SIZE,
    overwrite: bool = False,
    verify: bool = False,
    **nsa_fields,
) -> NSAConfig:
    """
    Convert the dense checkpoint `source` (a local folder or a Hub id) into an NSA checkpoint in `output_dir`
    (safetensors shards of at most `max_shard_size` with an index when there are several, config with the NSA
    fields, generation config, tokenizer when the source has one, the flat code for `trust_remote_code`, a model card
    naming a Hub source as `base_model`). Returns the converted checkpoint's config.

    Streamed: the source's tensors are read one at a time (safetensors through `safe_open`; pickle files, the
    `pytorch_model*.bin` of older checkpoints, only with `torch.load(weights_only=True, mmap=True)`) and the output is
    written one shard at a time, so the peak memory is about one output shard, not the model. `nsa_init` sets the
    NSA-only parameters: `"dense"` (NSA mode as close to the source as the math allows) or `"uniform"` (gates 1/3
    each, as a fresh model); see the module docstring.

    The source is only read. Everything is checked before anything is written: the NSA fields, the source (a path
    that looks local and is missing is reported as such without asking the Hub; its weight files and index are read
    through, their names and shapes matched against the NSA layout), the output folder (an existing non-empty one is
    refused unless `overwrite`). The output is written into a folder beside `output_dir` and moved into place at the
    end, so a failed conversion leaves nothing; files and folders get the modes the process umask gives.

    `verify`: before the output is moved into place, load the source and then the converted model (one after the
    other: peak memory about one model in `dtype`) and run both on one random batch; raise unless their dense-mode
    logits are identical. Both differences, dense mode and NSA mode, are logged at INFO level.

    Bad input raises `ValueError` (or `FileNotFoundError` / `FileExistsError`) naming the value and what is allowed.
    """
    if isinstance(dtype, str) and dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r} is not one of {', '.join(DTYPES)} (or a torch.dtype)")
    if nsa_init not in NSA_INITS:
        raise ValueError(f"`nsa_init` {nsa_init!r} is not one of {', '.join(NSA_INITS)}")
    unknown = set(nsa_fields) - set(NSA_FIELDS)
    if unknown:
        raise ValueError(f"unknown NSA fields {sorted(unknown)}: allowed are {', '.join(NSA_FIELDS)}")
    max_shard_bytes = _shard_bytes(max_shard_size)
    NSAConfig(**nsa_fields)  # field errors first, before the source is touched
    source, local, offline = _resolve_source(source)
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
    folder = Path(source) if local else _download(source, offline)
    _check_weight_files(folder)

    dense_config = AutoConfig.from_pretrained(folder)
    config = nsa_config_from_dense(dense_config, **nsa_fields)
    note = _sliding_window_note(dense_config)
    if note:
        logger.warning(f"{note}; the NSA model's dense mode is full causal attention, equal to the source only on "
                       "sequences within that window")
    weights = _SourceWeights(folder)
    plan = _ConversionPlan(weights, config, _model_dtype(dtype, dense_config, weights), nsa_init, source)
    config.architectures = [NSAForCausalLM.__name__]
    config.dtype = plan.dtype

    with _staging_folder(output_dir) as staging:
        plan.write(staging, max_shard_bytes)
        if (folder / "README.md").is_file():  # the source's card, kept and extended by write_model_card
            shutil.copyfile(folder / "README.md", staging / "README.md")
        config.save_pretrained(staging)
        _generation_config(folder, dense_config).save_pretrained(staging)
        try:
            AutoTokenizer.from_pretrained(folder).save_pretrained(staging)
        except (OSError, ValueError, TypeError) as err:  # a bare weights folder (no tokenizer files)
            logger.info(f"no tokenizer copied: none loads from {source}")
            logger.debug(f"the tokenizer of {source} does not load: {err}")
        config.write_model_card(staging, repo_id=output_dir.name, base_model=None if local else source)
        if verify:
            _verify_conversion(folder, staging, source, dtype)
        _apply_umask(staging)
        if output_dir.is_dir():
            shutil.rmtree(output_dir)
        elif output_dir.exists():
            output_dir.unlink()
        os.replace(staging, output_dir)
    return config


class _SourceWeights:
    """
    The tensors of a dense checkpoint folder by name, with their shapes and dtypes read from the file headers; each
    tensor is read from disk only when asked for. safetensors files are opened per read (`safe_open` maps the file,
    and the mapped pages count as memory while it is open); pickle files (`pytorch_model*.bin`) are loaded with
    `torch.load(weights_only=True, mmap=True)`, one file kept open at a time.
    """

    def __init__(self, folder: Path):
        self.folder = folder
        self.files: dict[str, Path] = {}
        self.shapes: dict[str, tuple[tuple[int, ...], torch.dtype | None]] = {}
        safetensors = _weight_files(folder, _INDEX, "model.safetensors")
        if safetensors:
            for path in safetensors:
                with safe_open(path, framework="pt") as f:
                    for name in f.keys():
                        piece = f.get_slice(name)
                        self.files[name] = path
                        self.shapes[name] = (tuple(piece.get_shape()), _SAFETENSORS_FLOATS.get(piece.get_dtype()))
            return
        pickles = _weight_files(folder, _PICKLE_INDEX, "pytorch_model.bin")
        if not pickles:
            raise FileNotFoundError(
                f"no weights in {folder}: expected model.safetensors, {_INDEX} with its shards, pytorch_model.bin or "
                f"{_PICKLE_INDEX} with its shards"
            )
        self._open: tuple[Path, dict] | None = None
        for path in pickles:
            for name, tensor in self._pickle(path).items():
                self.files[name] = path
                self.shapes[name] = (tuple(tensor.shape), tensor.dtype if tensor.is_floating_point() else None)

    def read(self, name: str) -> torch.Tensor:
        path = self.files[name]
        if path.suffix == ".safetensors":
            with safe_open(path, framework="pt") as f:
                return f.get_tensor(name)
        return self._pickle(path)[name].clone()

    def _pickle(self, path: Path) -> dict:
        if self._open is None or self._open[0] != path:
            self._open = None  # release the previous file's mapping first
            try:
                state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError as err:  # a legacy (non-zip) pickle cannot be mapped: read it whole
                if "mmap" not in str(err):
                    raise ValueError(f"{path} does not load as a weights-only torch checkpoint: {err}") from None
                state = torch.load(path, map_location="cpu", weights_only=True)
            except Exception as err:  # weights_only refuses anything but tensors and plain containers
                raise ValueError(f"{path} does not load as a weights-only torch checkpoint: {err}") from None
            if not isinstance(state, dict) or not all(isinstance(t, torch.Tensor) for t in state.values()):
                raise ValueError(f"{path} is not a state dict (a mapping of names to tensors)")
            self._open = (path, state)
        return self._open[1]


class _ConversionPlan:
    """
    Every tensor of the NSA checkpoint, in the NSA model's order, and where it comes from: a source tensor (dense
    weights, and the copies that start separate branch K/V projections) or the NSA-only init of its layer. Building
    the plan checks the source's names and shapes against an NSA model on the meta device (nothing allocated).
    """

    def __init__(self, weights: _SourceWeights, config: NSAConfig, dtype: torch.dtype, nsa_init: str, source):
        self.weights, self.config, self.dtype, self.nsa_init = weights, config, dtype, nsa_init
        with torch.device("meta"):
            self.meta_model = NSAForCausalLM(config)
        expected = self.meta_model.state_dict()
        if config.tie_word_embeddings:
            for tied in NSAForCausalLM._tied_weights_keys:
                expected.pop(tied, None)
        found = {name for name in weights.shapes if "rotary_emb" not in name}
        missing = [n for n in expected if n not in found and not _nsa_only(n)]
        mismatched = [f"{n}: {weights.shapes[n][0]} vs {tuple(t.shape)}" for n, t in expected.items()
                      if n in found and weights.shapes[n][0] != tuple(t.shape)]
        if missing or mismatched:
            raise ValueError(
                f"{source} does not match the {config.model_type} layout NSA expects: missing {missing[:5]}, "
                f"mismatched {mismatched[:5]}"
            )
        ignored = sorted(found - set(expected) - set(NSAForCausalLM._tied_weights_keys))
        if ignored:
            raise ValueError(f"{source} has weights NSA has no place for: {ignored[:5]}")
        # name -> source tensor name (None: the NSA-only init of its layer)
        self.origin = {name: name if name in found else _copied_from(name) for name in expected}
        # floating tensors in the model's dtype, anything else (an integer buffer) in its own
        self.meta = {name: t if not t.is_floating_point() else t.to(dtype) for name, t in expected.items()}
        self._layer_init: tuple[int, dict] | None = None

    def tensor(self, name: str) -> torch.Tensor:
        origin = self.origin[name]
        if origin is not None:
            tensor = self.weights.read(origin)
            return tensor.to(self.dtype) if tensor.is_floating_point() else tensor
        layer = int(name.split(".")[2])  # model.layers.<i>.self_attn....
        if self._layer_init is None or self._layer_init[0] != layer:
            self._layer_init = (layer, self._init_layer(layer))
        return self._layer_init[1][name]

    @torch.no_grad()
    def _init_layer(self, layer: int) -> dict[str, torch.Tensor]:
        """The NSA-only tensors of one layer, by full name: the model's own init, then the gates of `nsa_init`."""
        prefix = f"model.layers.{layer}.self_attn."
        attn = self.meta_model.model.layers[layer].self_attn
        tensors = {}
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(layer)  # the same source converts to the same bytes
            for name in ("gate_proj", "compress_key", "compress_value"):
                module = getattr(attn, name).to_empty(device="cpu")
                for child in reversed(list(module.modules())):  # children first: a compression then zeroes down_proj
                    self.meta_model._init_weights(child)
                tensors.update({f"{prefix}{name}.{k}": v.to(self.dtype) for k, v in module.state_dict().items()})
                module.to("meta")
        if self.nsa_init == "dense":
            tensors[f"{prefix}gate_proj.bias"] = dense_init_gate_bias(self.config.num_attention_heads, self.dtype)
        if self.config.attention_bias:
            tensors[f"{prefix}o_proj.bias"] = torch.zeros(self.config.hidden_size, dtype=self.dtype)
        return tensors

    def write(self, folder: Path, max_shard_bytes: int) -> None:
        split = split_torch_state_dict_into_shards(self.meta, max_shard_size=max_shard_bytes)
        for number, (filename, names) in enumerate(split.filename_to_tensors.items(), 1):
            shard = {name: self.tensor(name) for name in names}
            save_file(shard, folder / filename, metadata={"format": "pt"})
            del shard
            if split.is_sharded:
                logger.info(f"wrote {filename} ({number} of {len(split.filename_to_tensors)})")
        if split.is_sharded:
            index = {"metadata": split.metadata, "weight_map": split.tensor_to_filename}
            (folder / _INDEX).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def dense_init_gate_bias(num_heads: int, dtype: torch.dtype = torch.float32,
                         cmp_gate: float = DENSE_INIT_CMP_GATE) -> torch.Tensor:
    """
    The gate bias of `nsa_init="dense"`, `[num_heads * 3]` in the (cmp, slc, win) order of `NSAGateProjection`: the
    compressed gate `cmp_gate`, the selected and window gates half of the rest each. Where the window and the selected
    blocks hold every key, both branches are the source's attention and the layer computes
    `(1 - cmp_gate) * dense + cmp_gate * compressed`.
    """
    if not 0 < cmp_gate < 1:
        raise ValueError(f"cmp_gate must lie strictly between 0 and 1 (a sigmoid's value), got {cmp_gate}")
    cmp = cmp_gate
    shared = (1 - cmp) / 2
    logits = [math.log(cmp / (1 - cmp)), math.log(shared / (1 - shared)), math.log(shared / (1 - shared))]
    return torch.tensor(logits * num_heads, dtype=torch.float64).to(dtype)


def _nsa_only(name: str) -> bool:
    return any(part in name for part in _NSA_ONLY) or name.endswith(_ZERO_BIAS)


def _copied_from(name: str) -> str | None:
    """The source tensor an NSA-only tensor copies (separate branch K/V), or None (it is initialised)."""
    module = name.split(".")[-2]
    return name.replace(f".{module}.", f".{_BRANCH_COPIES[module]}.") if module in _BRANCH_COPIES else None


def _model_dtype(dtype, dense_config, weights: _SourceWeights) -> torch.dtype:
    """The converted weights' dtype: `dtype`, or for "auto" what `from_pretrained(dtype="auto")` of the source gives."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype != "auto":
        return getattr(torch, dtype)
    configured = getattr(dense_config, "dtype", None)
    if configured is not None:
        return getattr(torch, configured) if isinstance(configured, str) else configured
    return next((d for _, d in weights.shapes.values() if d is not None), torch.float32)


def _shard_bytes(max_shard_size) -> int:
    from huggingface_hub.serialization._base import parse_size_to_int

    try:
        if isinstance(max_shard_size, str) and max_shard_size.strip().isdigit():
            max_shard_size = int(max_shard_size)
        size = max_shard_size if isinstance(max_shard_size, int) else parse_size_to_int(max_shard_size)
    except (ValueError, TypeError, AttributeError):
        size = 0
    if isinstance(size, bool) or size < 1:
        raise ValueError(f"`max_shard_size` {max_shard_size!r} is not a positive size: a number of bytes or a "
                         "string of digits and a unit KB, MB, GB or TB, such as '5GB'")
    return size


def _generation_config(folder: Path, dense_config) -> GenerationConfig:
    try:
        return GenerationConfig.from_pretrained(folder)
    except OSError:  # no generation_config.json: the one save_pretrained writes for a model without one
        return GenerationConfig.from_model_config(dense_config)


def _resolve_source(source) -> tuple[str, bool, bool]:
    """
    (source, whether it is a local folder, whether the Hub is offline). A source that looks like a path (it exists,
    starts with `.`, `/` or `~`, has no `/` or more than one, has a `\\`, or its first part is a local folder) but is
    not a folder raises `FileNotFoundError` at once; so does a Hub id that is not in the local cache when the Hub is
    offline or unreachable (one quick request, instead of the download's retries).
    """
    from huggingface_hub import try_to_load_from_cache
    from huggingface_hub.constants import is_offline_mode
    from huggingface_hub.utils import validate_repo_id

    text = os.fspath(source)
    path = Path(text).expanduser()
    if path.is_dir():
        return str(path), True, False
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
    return text, False, offline


def _hub_reachable(timeout: float = 5.0) -> bool:
    from huggingface_hub import constants
    from huggingface_hub.utils import get_session

    try:
        get_session().head(constants.ENDPOINT, timeout=timeout)
    except Exception:  # any transport error: treat the Hub as unreachable
        return False
    return True


def _download(repo_id: str, offline: bool) -> Path:
    """The local snapshot of a Hub source: config, tokenizer, card and weights (safetensors when it has them)."""
    from huggingface_hub import HfApi, snapshot_download

    if offline:  # what the cache holds
        return Path(snapshot_download(repo_id, local_files_only=True))
    files = HfApi().list_repo_files(repo_id)
    weights = "*.safetensors" if any(f.endswith(".safetensors") for f in files) else "pytorch_model*.bin"
    return Path(snapshot_download(repo_id, allow_patterns=[*_HUB_FILES, weights]))


def _weight_files(folder: Path, index_name: str, single: str) -> list[Path]:
    """The weight files of one format in `folder`: those its index names, or the single file; [] if neither."""
    index_path = folder / index_name
    if index_path.is_file():
        return [folder / file for file in dict.fromkeys(_index_map(index_path).values())]
    return [folder / single] if (folder / single).is_file() else []


def _index_map(index_path: Path) -> dict[str, str]:
    try:
        weight_map = json.loads(index_path.read_text(encoding="utf-8"))["weight_map"]
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()):
            raise TypeError("names and files must be strings")
    except (ValueError, KeyError, TypeError, AttributeError) as err:
        raise ValueError(f"{index_path} is not a weights index (a JSON object with a weight_map): {err}") from None
    return weight_map


def _check_weight_files(folder: Path) -> None:
    """Read the headers of a source's safetensors files and check its index against them."""
    index_path = folder / _INDEX
    if index_path.is_file():
        shards = {}
        for name, file in _index_map(index_path).items():
            shards.setdefault(file, set()).add(name)
    elif (folder / "model.safetensors").is_file():
        shards = {"model.safetensors": None}
    else:  # no safetensors weights (e.g. pytorch_model.bin): _SourceWeights reports what it finds
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
def _verify_conversion(folder: Path, converted: Path, source, dtype, seq_len: int = 64):
    """Dense-mode and NSA-mode logits of the converted folder vs the source's; one model in memory at a time."""
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the load reports of both models: nothing to act on here
    try:
        dense = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, attn_implementation="sdpa").eval()
        ids = torch.randint(0, dense.config.vocab_size, (2, seq_len), generator=torch.Generator().manual_seed(0))
        expected = dense(ids).logits.float()
        del dense
        model = NSAForCausalLM.from_pretrained(converted, dtype=dtype, attn_implementation="sdpa").eval()
    finally:
        hf_logging.set_verbosity(verbosity)
    diffs = {}
    for mode in ("sdpa", "nsa"):  # dense mode, then NSA
        model.set_attn_implementation(mode)
        diffs[mode] = (model(ids).logits.float() - expected).abs().max().item()
    what = f"logits of the converted model vs {source} on {ids.shape[0]}x{seq_len} random tokens"
    logger.info(f"verify, dense mode (sdpa): {what}: max |difference| = {diffs['sdpa']:.3g} (must be 0)")
    logger.info(f"verify, NSA mode: {what}: max |difference| = {diffs['nsa']:.3g} (not checked: NSA attends "
                "to fewer keys, and continued training adapts the model to it)")
    if diffs["sdpa"] != 0.0:
        raise VerificationError(
            f"converted model differs from {source} in dense mode: max |logit difference| = {diffs['sdpa']:.3g}"
        )
