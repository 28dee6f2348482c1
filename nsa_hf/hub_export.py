"""
Saved NSA folders carry their own code: the modeling files as flat modules plus an `auto_map` in config.json, so
`AutoModelForCausalLM.from_pretrained(folder_or_repo, trust_remote_code=True)` works where nsa-hf is not installed;
and a model card (README.md) with the Hub metadata, how to load the model with and without the package, the NSA
settings and the paper's citation.

Transformers loads remote code as one flat package (every file beside config.json) and follows only single-dot
relative imports (`from .x import y`). The package layout has two levels (`modeling/`, `kernels/`), so the files are
renamed and their imports rewritten on the way out. This module is itself one of the exported files: a model loaded
as remote code saves the same flat files again.
"""

import os
import re
import secrets
from pathlib import Path

# Auto class -> "module.Class" for config.json
AUTO_MAP = {
    "AutoConfig": "configuration_nsa.NSAConfig",
    "AutoModel": "modeling_nsa.NSAModel",
    "AutoModelForCausalLM": "modeling_nsa.NSAForCausalLM",
}

# flat file name -> path inside the nsa_hf package (the kernel files keep their names)
_PACKAGE_FILES = {
    "hub_export.py": "hub_export.py",
    "configuration_nsa.py": "configuration_nsa.py",
    "modeling_nsa.py": "modeling/modeling_nsa.py",
    "cache_nsa.py": "modeling/cache_nsa.py",
    "layout_nsa.py": "modeling/layout_nsa.py",
    "nsa_kernels.py": "kernels/__init__.py",
}

_IMPORT_REWRITES = [
    (re.compile(r"^(\s*)from \.\.configuration_nsa import", re.M), r"\1from .configuration_nsa import"),
    (re.compile(r"^(\s*)from \.\.kernels import", re.M), r"\1from .nsa_kernels import"),
]
# what must not survive in a flat file: imports that reach outside the folder into the package
_PACKAGE_IMPORT = re.compile(r"^\s*(from\s+\.\.|from\s+nsa_hf\b|import\s+nsa_hf\b)", re.M)


def _sources() -> dict[str, Path]:
    """
    Flat file name -> source file, from the nsa_hf package or, for remote code, from this folder itself. Remote code
    lives in one folder per loaded class: beside the config class sit only configuration_nsa.py and this file, and
    transformers itself copies the model's files when a remote-code model is saved.
    """
    here = Path(__file__).resolve().parent
    if not (here / "kernels" / "__init__.py").is_file():
        return {path.name: path for path in sorted(here.glob("*.py")) if path.name != "__init__.py"}
    files = {flat: here / rel for flat, rel in _PACKAGE_FILES.items()}
    for path in sorted((here / "kernels").glob("*.py")):
        if path.name != "__init__.py":
            files[path.name] = path
    missing = [str(path) for path in files.values() if not path.is_file()]
    if missing:
        raise RuntimeError(f"cannot export the NSA code: {missing} not found")
    return files


def flat_sources() -> dict[str, str]:
    """Flat file name -> its text, imports rewritten for the one-folder layout."""
    texts = {}
    for name, path in _sources().items():
        text = path.read_text(encoding="utf-8")
        for pattern, replacement in _IMPORT_REWRITES:
            text = pattern.sub(replacement, text)
        bad = _PACKAGE_IMPORT.search(text)
        if bad:
            raise RuntimeError(
                f"{path}: `{bad.group(0).strip()}` has no flat equivalent; add a rewrite to nsa_hf/hub_export.py"
            )
        texts[name] = text
    return texts


def write_remote_code(save_directory: str | os.PathLike) -> list[str]:
    """Write the flat code files into `save_directory` (each one atomically). Returns the file names written."""
    save_directory = Path(save_directory)
    save_directory.mkdir(parents=True, exist_ok=True)
    written = []
    for name, text in flat_sources().items():
        write_text_atomically(save_directory / name, text)
        written.append(name)
    return written


def write_text_atomically(path: Path, text: str) -> None:
    """
    Write `text` to `path` through a temporary file beside it, so `path` is never seen half-written. The file is
    created by `open`, so its mode follows the process umask (0644 under the usual 022), as any other file would.
    """
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    try:
        with open(tmp, "x", encoding="utf-8", newline="") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


PAPER_URL = "https://arxiv.org/abs/2502.11089"
CARD_TAGS = ["nsa", "native-sparse-attention"]
# NSAConfig field -> the paper's symbol, for the card's settings table
NSA_FIELDS = {
    "compress_block_size": "l",
    "compress_stride": "d",
    "compress_function": "φ",
    "select_block_size": "l'",
    "num_selected_blocks": "n",
    "num_initial_blocks": "",
    "num_local_blocks": "",
    "window_size": "w",
    "shared_kv": "",
    "use_qk_norm": "",
}
CITATION = """\
@article{yuan2025native,
  title={Native Sparse Attention: Hardware-Aligned and Natively Trainable Sparse Attention},
  author={Yuan, Jingyang and Gao, Huazuo and Dai, Damai and Luo, Junyu and Zhao, Liang and Zhang, Zhengyan and
          Xie, Zhenda and Wei, Y. X. and Wang, Lean and Xiao, Zhiping and others},
  journal={arXiv preprint arXiv:2502.11089},
  year={2025}
}"""
# The card's NSA part sits between these markers, so a later save replaces it and keeps everything else.
_CARD_START = "<!-- nsa-hf: start of the generated part -->"
_CARD_END = "<!-- nsa-hf: end of the generated part -->"
# (kept off the start of a line here: `flat_sources` refuses files with a package import there)
_IMPORT_NSA_HF = 'import nsa_hf  # registers the model type "nsa_hf" with the Auto classes'
# The text of transformers' blank template (`create_and_tag_model_card`): nothing in it to keep
_TRANSFORMERS_TEMPLATE = "This model card has been automatically generated."


def write_model_card(save_directory: str | os.PathLike, config, *, repo_id: str | None = None,
                     base_model: str | None = None) -> Path:
    """
    Write `README.md` into `save_directory`: the Hub metadata (`library_name: transformers`, the `nsa` tags,
    `pipeline_tag: text-generation`, `base_model` when given), how to load the model with and without nsa-hf, the NSA
    settings of `config` and the paper's citation. `repo_id` is the name the usage snippets load (default: the
    folder's name).

    An existing card is kept and extended, not replaced: the one already in `save_directory`, else the card of the
    folder or Hub repo the model was loaded from (`config._name_or_path`; a Hub card only where it is already in the
    local cache, nothing is downloaded). Its metadata gains the fields above, its text keeps everything but a
    previous NSA part, which is rewritten.
    """
    from huggingface_hub import ModelCard

    save_directory = Path(save_directory)
    text = _existing_card(save_directory, getattr(config, "_name_or_path", None)) or ""
    if not text.lstrip().startswith("---"):
        text = "---\n{}\n---\n" + text  # a card without a metadata block; ModelCard warns otherwise
    card = ModelCard(text, ignore_metadata_errors=True)
    data = card.data
    data.library_name = "transformers"
    data.tags = list(dict.fromkeys([*(data.tags or []), *CARD_TAGS]))
    data.pipeline_tag = data.pipeline_tag or "text-generation"
    if base_model is not None:
        data.base_model = base_model
    body = card.text
    if _TRANSFORMERS_TEMPLATE in body:
        body = ""
    section = _nsa_card_section(config, repo_id or save_directory.resolve().name, data.base_model)
    if _CARD_START in body and _CARD_END in body:
        before, rest = body.split(_CARD_START, 1)
        body = before + section + rest.split(_CARD_END, 1)[1]
    else:
        body = (body.rstrip() + "\n\n" if body.strip() else "") + section + "\n"
    card.text = body
    path = save_directory / "README.md"
    write_text_atomically(path, card.content)
    return path


def _existing_card(save_directory: Path, source: str | None) -> str | None:
    own = save_directory / "README.md"
    if own.is_file():
        return own.read_text(encoding="utf-8")
    if not source:
        return None
    local = Path(source).expanduser()
    if local.is_dir():
        card = local / "README.md"
        return card.read_text(encoding="utf-8") if card.is_file() else None
    from huggingface_hub import try_to_load_from_cache

    try:
        cached = try_to_load_from_cache(str(source), "README.md")
    except ValueError:  # not a Hub id either
        return None
    return Path(cached).read_text(encoding="utf-8") if isinstance(cached, str) else None


def _nsa_card_section(config, repo_id: str, base_model) -> str:
    settings = "\n".join(
        f"| `{name}` | {symbol} | `{getattr(config, name)!r}` |" for name, symbol in NSA_FIELDS.items()
    )
    origin = ""
    if base_model:
        origin = (
            f" It derives from the dense checkpoint `{base_model}`, converted by `nsa-hf convert` (every dense weight "
            "copied, the NSA-only parameters initialised so that NSA mode starts close to the source: right after "
            "conversion, dense mode gives the source's logits exactly)."
        )
    return f"""{_CARD_START}
## Native Sparse Attention

The attention of this model is Native Sparse Attention ([Yuan et al., 2025]({PAPER_URL})):
each query attends to compressed blocks of the past, to the blocks they rank highest and to a sliding window,
mixed by learned gates (model type `nsa_hf`, from nsa-hf).{origin}

### Usage

With the `nsa-hf` package installed:

```python
{_IMPORT_NSA_HF}
from transformers import AutoModelForCausalLM

model = AutoModelForCausalLM.from_pretrained("{repo_id}")
```

Without it, transformers runs the copy of the NSA code saved beside the weights:

```python
from transformers import AutoModelForCausalLM

model = AutoModelForCausalLM.from_pretrained("{repo_id}", trust_remote_code=True)
```

`attn_implementation="sdpa"` (or `"eager"`) runs the same weights as plain causal attention (dense mode).

### NSA settings

| `NSAConfig` field | paper | value |
| --- | --- | --- |
{settings}

### Citation

```bibtex
{CITATION}
```
{_CARD_END}"""
