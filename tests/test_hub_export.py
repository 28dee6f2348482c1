"""
Saved folders carry the NSA code as flat files plus an `auto_map`, so they load with `trust_remote_code=True` where
nsa-hf is not installed (the Hub use case). The loading side runs in subprocesses: one where `import nsa_hf` fails,
one where it works, each with its own transformers module cache.
"""

import json
import os
import re
import stat
import subprocess
import sys
import textwrap

import pytest
import torch
from _tiny import DIMS, NSA_SIZES

from nsa_hf import NSAConfig, NSAForCausalLM
from nsa_hf.hub_export import AUTO_MAP

LOAD_SCRIPT = textwrap.dedent(
    """
    import importlib.abc, os, sys

    folder, resave, block = sys.argv[1], sys.argv[2], sys.argv[3] == "block"
    if block:
        class NoNsaHf(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path, target=None):
                if name == "nsa_hf" or name.startswith("nsa_hf."):
                    raise ModuleNotFoundError(f"No module named {name!r}")

        sys.meta_path.insert(0, NoNsaHf())
    else:
        import nsa_hf  # registers the model type `nsa_hf` locally; remote code must still win
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.set_num_threads(1)
    config = AutoConfig.from_pretrained(folder, trust_remote_code=True)
    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
    if block:
        assert not [m for m in sys.modules if m.startswith("nsa_hf")], "nsa_hf was imported"
    print("model_module", type(model).__module__)
    expected = torch.load(os.path.join(folder, "expected.pt"))
    with torch.no_grad():
        logits = model(expected["ids"]).logits
        generated = model.generate(expected["ids"], max_new_tokens=4, do_sample=False)
    print("max_diff", (logits - expected["logits"]).abs().max().item())
    print("same_generation", torch.equal(generated, expected["generated"]))
    print("config_class", type(config).__name__, config.model_type)
    model.save_pretrained(resave)
    """
)


def _save_with_expected(folder):
    torch.manual_seed(0)
    model = NSAForCausalLM(NSAConfig(**DIMS, **NSA_SIZES)).eval()
    ids = torch.randint(0, DIMS["vocab_size"], (1, 37))
    model.save_pretrained(folder)
    with torch.no_grad():
        expected = {
            "ids": ids,
            "logits": model(ids).logits,
            "generated": model.generate(ids, max_new_tokens=4, do_sample=False),
        }
    torch.save(expected, os.path.join(folder, "expected.pt"))
    return expected


def _load_in_subprocess(tmp_path, folder, resave, block):
    script = tmp_path / "load.py"
    script.write_text(LOAD_SCRIPT)
    env = {**os.environ, "HF_MODULES_CACHE": str(tmp_path / f"modules_{block}"), "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(
        [sys.executable, str(script), str(folder), str(resave), block], capture_output=True, text=True, env=env,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    values = dict(line.split(" ", 1) for line in result.stdout.splitlines() if " " in line)
    return values


def test_saved_folder_holds_flat_code_and_auto_map(tmp_path):
    _save_with_expected(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["auto_map"] == AUTO_MAP
    for name in ("configuration_nsa.py", "modeling_nsa.py", "cache_nsa.py", "nsa_kernels.py", "selected.py"):
        assert (tmp_path / name).is_file(), name
    for path in tmp_path.glob("*.py"):
        text = path.read_text()
        assert not re.search(r"^\s*from \.\.", text, re.M), f"{path.name} imports from a parent package"
        assert not re.search(r"^\s*(from|import) nsa_hf\b", text, re.M), f"{path.name} imports nsa_hf"
    assert not list(tmp_path.glob(".*.tmp")), "temporary files left behind"


def test_loads_with_trust_remote_code_where_nsa_hf_is_not_installed(tmp_path):
    folder, resaved = tmp_path / "model", tmp_path / "resaved"
    _save_with_expected(folder)
    values = _load_in_subprocess(tmp_path, folder, resaved, "block")
    assert float(values["max_diff"]) == 0.0
    assert values["same_generation"] == "True"
    assert values["config_class"] == "NSAConfig nsa_hf"
    assert values["model_module"].startswith("transformers_modules.")
    # a model loaded as remote code saves a folder that loads the same way again
    assert json.loads((resaved / "config.json").read_text())["auto_map"] == AUTO_MAP
    assert (resaved / "modeling_nsa.py").read_text() == (folder / "modeling_nsa.py").read_text()
    (resaved / "expected.pt").write_bytes((folder / "expected.pt").read_bytes())
    again = _load_in_subprocess(tmp_path, resaved, tmp_path / "resaved_again", "block")
    assert float(again["max_diff"]) == 0.0 and again["same_generation"] == "True"


def test_trust_remote_code_with_nsa_hf_imported_uses_the_installed_classes(tmp_path):
    folder = tmp_path / "model"
    _save_with_expected(folder)
    values = _load_in_subprocess(tmp_path, folder, tmp_path / "resaved", "allow")
    assert values["model_module"].startswith("nsa_hf.")
    assert float(values["max_diff"]) == 0.0 and values["same_generation"] == "True"


class _FakeHub:
    """Stands in for huggingface_hub.HfApi in transformers' upload path: records what would be uploaded."""

    def __init__(self):
        self.uploaded = {}

    def create_repo(self, repo_id, **kwargs):
        return type("RepoUrl", (), {"repo_id": repo_id})()

    def create_commit(self, repo_id, operations, **kwargs):
        for op in operations:
            source = op.path_or_fileobj
            self.uploaded[op.path_in_repo] = open(source, "rb").read() if isinstance(source, str) else source
        return "commit"


@pytest.fixture
def fake_hub(monkeypatch):
    import transformers.utils.hub as hub

    fake = _FakeHub()
    monkeypatch.setattr(hub, "hf_api", lambda: fake)
    # the model card is fetched from the Hub first (no network here): a blank card instead
    monkeypatch.setattr(hub, "create_and_tag_model_card", lambda *args, **kwargs: hub.ModelCard(""))
    return fake


def test_push_to_hub_uploads_the_code(fake_hub):
    torch.manual_seed(0)
    model = NSAForCausalLM(NSAConfig(**DIMS, **NSA_SIZES))
    model.push_to_hub("someone/tiny-nsa")
    for name in ("config.json", "model.safetensors", "configuration_nsa.py", "modeling_nsa.py", "nsa_kernels.py"):
        assert name in fake_hub.uploaded, f"{name} not uploaded: {sorted(fake_hub.uploaded)}"
    assert json.loads(fake_hub.uploaded["config.json"])["auto_map"] == AUTO_MAP


def test_config_save_pretrained_with_push_uploads_the_code(tmp_path, fake_hub):
    NSAConfig(**DIMS, **NSA_SIZES).save_pretrained(tmp_path, push_to_hub=True, repo_id="someone/tiny-nsa-config")
    assert json.loads(fake_hub.uploaded["config.json"])["auto_map"] == AUTO_MAP
    assert "configuration_nsa.py" in fake_hub.uploaded and "modeling_nsa.py" in fake_hub.uploaded


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_files_written_for_the_hub_follow_the_umask(tmp_path, umask):
    previous = os.umask(umask)
    try:
        NSAForCausalLM(NSAConfig(**DIMS, **NSA_SIZES)).save_pretrained(tmp_path / "model")
    finally:
        os.umask(previous)
    ours = [p for p in (tmp_path / "model").iterdir() if p.suffix == ".py" or p.name == "README.md"]
    assert len(ours) > 5
    assert {p.name: stat.S_IMODE(p.stat().st_mode) for p in ours} == {p.name: 0o666 & ~umask for p in ours}
    assert stat.S_IMODE((tmp_path / "model").stat().st_mode) == 0o777 & ~umask


def test_saved_folder_has_a_model_card(tmp_path):
    from huggingface_hub import ModelCard

    NSAForCausalLM(NSAConfig(**DIMS, **NSA_SIZES, shared_kv=False)).save_pretrained(tmp_path / "tiny-nsa")
    card = ModelCard.load(tmp_path / "tiny-nsa" / "README.md")
    assert card.data.library_name == "transformers" and card.data.pipeline_tag == "text-generation"
    assert card.data.tags == ["nsa", "native-sparse-attention"]
    assert "import nsa_hf" in card.text and 'from_pretrained("tiny-nsa")' in card.text
    assert 'from_pretrained("tiny-nsa", trust_remote_code=True)' in card.text
    assert "| `window_size` | w | `16` |" in card.text and "| `shared_kv` |  | `False` |" in card.text
    assert "arXiv:2502.11089" in card.text and "@article{yuan2025native" in card.text


def test_an_existing_card_is_kept_and_extended_once(tmp_path):
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "README.md").write_text("---\nlicense: apache-2.0\nlanguage: [en]\n---\n# My model\n\nMy notes.\n")
    model = NSAForCausalLM(NSAConfig(**DIMS, **NSA_SIZES))
    model.save_pretrained(folder)
    model.config.window_size = 32
    model.save_pretrained(folder)  # again: the NSA part is rewritten, not repeated
    text = (folder / "README.md").read_text()
    assert "license: apache-2.0" in text and "- en" in text and text.count("- nsa\n") == 1
    assert "# My model\n\nMy notes.\n" in text and text.count("## Native Sparse Attention") == 1
    assert "| `window_size` | w | `32` |" in text
    # a model loaded from that folder and saved elsewhere carries the card along
    NSAForCausalLM.from_pretrained(folder).save_pretrained(tmp_path / "copy")
    assert "My notes." in (tmp_path / "copy" / "README.md").read_text()


def test_push_to_hub_uploads_the_card_extending_the_hub_s_own(fake_hub, monkeypatch):
    import transformers.utils.hub as hub

    monkeypatch.setattr(hub, "create_and_tag_model_card",
                        lambda *args, **kwargs: hub.ModelCard("---\nlicense: mit\n---\nWritten on the Hub.\n"))
    NSAForCausalLM(NSAConfig(**DIMS, **NSA_SIZES)).push_to_hub("someone/tiny-nsa")
    card = fake_hub.uploaded["README.md"].decode()
    assert "license: mit" in card and "Written on the Hub." in card and "- native-sparse-attention" in card
    assert 'from_pretrained("someone/tiny-nsa", trust_remote_code=True)' in card


def test_push_to_hub_over_transformers_blank_card(fake_hub, monkeypatch):
    import transformers.utils.hub as hub

    blank = hub.ModelCard.from_template(hub.ModelCardData(library_name="transformers"), model_description=(
        "This is the model card of a 🤗 transformers model that has been pushed on the Hub. This model card has been "
        "automatically generated."))
    monkeypatch.setattr(hub, "create_and_tag_model_card", lambda *args, **kwargs: blank)
    NSAForCausalLM(NSAConfig(**DIMS, **NSA_SIZES)).push_to_hub("someone/tiny-nsa")
    card = fake_hub.uploaded["README.md"].decode()
    assert "automatically generated" not in card and "[More Information Needed]" not in card
    assert "## Native Sparse Attention" in card


def test_save_pretrained_with_push_uploads_the_card(tmp_path, fake_hub, monkeypatch):
    import transformers.modeling_utils as modeling_utils
    import transformers.utils.hub as hub

    # model.save_pretrained(push_to_hub=True) reaches the Hub through modeling_utils' own names for these
    monkeypatch.setattr(modeling_utils, "hf_api", lambda: fake_hub)
    monkeypatch.setattr(modeling_utils, "create_and_tag_model_card",
                        lambda *args, **kwargs: hub.ModelCard("---\nlicense: mit\n---\nWritten on the Hub.\n"))
    model = NSAForCausalLM(NSAConfig(**DIMS, **NSA_SIZES))
    model.save_pretrained(tmp_path / "tiny-nsa", push_to_hub=True, repo_id="someone/tiny-nsa")
    for card in (fake_hub.uploaded["README.md"].decode(), (tmp_path / "tiny-nsa" / "README.md").read_text()):
        assert "license: mit" in card and "Written on the Hub." in card and "## Native Sparse Attention" in card
        assert 'from_pretrained("someone/tiny-nsa")' in card
    assert "modeling_nsa.py" in fake_hub.uploaded
