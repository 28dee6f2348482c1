"""
Saved NSA folders carry their own code: the modeling files as flat modules plus an `auto_map` in config.json, so
`AutoModelForCausalLM.from_pretrained(folder_or_repo, trust_remote_code=True)` works where nsa-hf is not installed.

Transformers loads remote code as one flat package (every file beside config.json) and follows only single-dot
relative imports (`from .x import y`). The package layout has two levels (`modeling/`, `kernels/`), so the files are
renamed and their imports rewritten on the way out. This module is itself one of the exported files: a model loaded
as remote code saves the same flat files again.
"""

import os
import re
import tempfile
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
        fd, tmp = tempfile.mkstemp(dir=save_directory, prefix=f".{name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(text)
            os.replace(tmp, save_directory / name)
        except BaseException:
            if os.path.exists(tmp):
                os.remove(tmp)
            raise
        written.append(name)
    return written
