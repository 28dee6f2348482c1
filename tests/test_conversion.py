"""
`nsa-hf convert`: dense Llama / Mistral / Qwen2 / Qwen3 checkpoints -> NSA checkpoints whose dense mode reproduces the
source exactly, with the NSA-only parameters at their neutral start; the source is never touched and a failed
conversion leaves nothing behind.
"""

import hashlib
import logging
import os
import stat
import subprocess
import sys

import pytest
import torch
from _tiny import DIMS, NSA_SIZES
from transformers import (
    AutoModelForCausalLM,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

import nsa_hf  # noqa: F401
from nsa_hf import NSAForCausalLM
from nsa_hf.conversion import convert_checkpoint, nsa_config_from_dense

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SOURCES = {
    "llama": (LlamaForCausalLM, LlamaConfig, {}),
    "llama_bias": (LlamaForCausalLM, LlamaConfig, dict(attention_bias=True)),
    "mistral": (MistralForCausalLM, MistralConfig, dict(sliding_window=None)),
    "qwen2": (Qwen2ForCausalLM, Qwen2Config, {}),
    "qwen3": (Qwen3ForCausalLM, Qwen3Config, {}),
}


def make_source(folder, name, seed=0, **extra):
    model_cls, config_cls, kwargs = SOURCES[name]
    torch.manual_seed(seed)
    model = model_cls(config_cls(**DIMS, **{**kwargs, **extra})).eval()
    with torch.no_grad():  # biases and norms away from their init, so a dropped one would show
        for n, p in model.named_parameters():
            if n.endswith("bias") or "norm" in n:
                p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(folder)
    return model


def digest(folder):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("name", list(SOURCES))
def test_dense_mode_equals_the_source_exactly(tmp_path, name):
    src, out = tmp_path / "src", tmp_path / "out"
    make_source(src, name)
    before = digest(src)
    convert_checkpoint(src, out, **NSA_SIZES)
    assert digest(src) == before, "the source checkpoint changed"
    ids = torch.randint(0, DIMS["vocab_size"], (2, 45), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        for implementation in ("sdpa", "eager"):
            dense = AutoModelForCausalLM.from_pretrained(src, attn_implementation=implementation).eval()
            converted = AutoModelForCausalLM.from_pretrained(out, attn_implementation=implementation).eval()
            assert isinstance(converted, NSAForCausalLM)
            assert (converted(ids).logits - dense(ids).logits).abs().max().item() == 0.0, implementation
        nsa = AutoModelForCausalLM.from_pretrained(out).eval()  # NSA attention: runs, finite
        assert torch.isfinite(nsa(ids).logits).all()


def test_nsa_parameters_start_neutral(tmp_path):
    src, out = tmp_path / "src", tmp_path / "out"
    make_source(src, "qwen2")
    model = convert_checkpoint(src, out, shared_kv=False, **NSA_SIZES)
    for layer in model.model.layers:
        attn = layer.self_attn
        assert (attn.gate_proj.weight == 0).all() and torch.allclose(attn.gate_proj.bias, torch.tensor(-0.6931471805599453))
        assert (attn.compress_key.down_proj.weight == 0).all() and (attn.compress_value.position_embedding == 0).all()
        assert (attn.o_proj.bias == 0).all()  # Qwen2's o_proj has no bias: NSA's starts at zero
        for branch in ("cmp", "win"):
            assert torch.equal(getattr(attn, f"{branch}_k_proj").weight, attn.k_proj.weight)
            assert torch.equal(getattr(attn, f"{branch}_v_proj").bias, attn.v_proj.bias)
    assert model.config.attention_bias and not model.config.use_qk_norm
    assert nsa_config_from_dense(Qwen3Config(**DIMS)).use_qk_norm


def test_refuses_bad_inputs_without_writing(tmp_path):
    src, out = tmp_path / "src", tmp_path / "out"
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64)).save_pretrained(src)
    with pytest.raises(ValueError, match="model_type 'gpt2'.*llama, mistral, qwen2, qwen3"):
        convert_checkpoint(src, out)
    assert not out.exists()
    make_source(src, "llama")
    with pytest.raises(ValueError, match="is the source"):
        convert_checkpoint(src, src)
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not empty"):
        convert_checkpoint(src, out, **NSA_SIZES)
    assert (out / "keep.txt").read_text() == "mine"
    with pytest.raises(ValueError, match="window_sizes"):
        convert_checkpoint(src, tmp_path / "other", window_sizes=3)
    convert_checkpoint(src, out, overwrite=True, **NSA_SIZES)
    assert not (out / "keep.txt").exists() and (out / "config.json").is_file()


def test_failed_conversion_leaves_nothing(tmp_path, monkeypatch):
    src, out = tmp_path / "src", tmp_path / "out"
    make_source(src, "llama")

    def broken_save(self, folder, **kwargs):
        (folder / "model.safetensors").write_bytes(b"half")
        raise OSError("disk full")

    monkeypatch.setattr(NSAForCausalLM, "save_pretrained", broken_save)
    with pytest.raises(OSError, match="disk full"):
        convert_checkpoint(src, out, **NSA_SIZES)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


def test_sliding_window_source_is_flagged(tmp_path, caplog):
    src = tmp_path / "src"
    make_source(src, "mistral", sliding_window=32)
    with caplog.at_level(logging.WARNING, logger="nsa_hf.conversion.convert"):
        convert_checkpoint(src, tmp_path / "out", **NSA_SIZES)
    assert "32-token sliding window" in caplog.text


def test_tokenizer_travels_with_the_checkpoint(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    src, out = tmp_path / "src", tmp_path / "out"
    make_source(src, "llama")
    vocab = {"[UNK]": 0, **{w: i + 1 for i, w in enumerate("native sparse attention reads less".split())}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]").save_pretrained(src)
    convert_checkpoint(src, out, **NSA_SIZES)
    assert AutoTokenizer.from_pretrained(out)("sparse attention")["input_ids"] == [2, 3]


def test_verify_catches_a_wrong_conversion_before_writing(tmp_path, monkeypatch):
    import nsa_hf.conversion.convert as convert_mod

    src, out = tmp_path / "src", tmp_path / "out"
    make_source(src, "mistral")
    original = convert_mod._init_nsa_only

    def init_and_break(model, config, zero_o_bias):
        original(model, config, zero_o_bias)
        with torch.no_grad():
            model.model.layers[0].self_attn.v_proj.weight.mul_(1.001)

    monkeypatch.setattr(convert_mod, "_init_nsa_only", init_and_break)
    with pytest.raises(RuntimeError, match="differs from .* in dense mode"):
        convert_checkpoint(src, out, verify=True, **NSA_SIZES)
    assert not out.exists()


def test_failed_conversion_removes_the_parent_folders_it_made(tmp_path, monkeypatch):
    src = tmp_path / "src"
    make_source(src, "llama")
    monkeypatch.setattr(NSAForCausalLM, "save_pretrained", lambda self, folder, **kwargs: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        convert_checkpoint(src, tmp_path / "new" / "deeper" / "out", **NSA_SIZES)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_converted_folder_has_the_modes_of_the_umask(tmp_path, umask):
    src, out = tmp_path / "src", tmp_path / "out"
    make_source(src, "llama")
    previous = os.umask(umask)
    try:
        convert_checkpoint(src, out, **NSA_SIZES)
    finally:
        os.umask(previous)
    assert stat.S_IMODE(out.stat().st_mode) == 0o777 & ~umask
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in out.iterdir()}
    assert {"model.safetensors", "config.json", "modeling_nsa.py", "README.md"} <= set(modes)
    assert set(modes.values()) == {0o666 & ~umask}, modes


def test_card_of_a_local_source_is_kept_and_extended(tmp_path):
    from huggingface_hub import ModelCard

    src, out = tmp_path / "src", tmp_path / "out"
    make_source(src, "llama")
    card = "---\nlicense: apache-2.0\ntags: [dense]\n---\n# Tiny Llama\n\nThe source's notes.\n"
    (src / "README.md").write_text(card)
    convert_checkpoint(src, out, **NSA_SIZES)
    card = ModelCard.load(out / "README.md")
    assert card.data.license == "apache-2.0" and card.data.tags == ["dense", "nsa", "native-sparse-attention"]
    assert card.data.library_name == "transformers" and card.data.pipeline_tag == "text-generation"
    assert card.data.base_model is None  # a local folder names no Hub model
    assert card.text.startswith("# Tiny Llama\n\nThe source's notes.\n") and "## Native Sparse Attention" in card.text
    assert 'from_pretrained("out", trust_remote_code=True)' in card.text


def test_a_cached_hub_id_converts_offline_and_is_the_card_s_base_model(tmp_path):
    # The Hub cache's layout: models--owner--name/{refs/main, snapshots/<commit>/<files>}
    cache, commit = tmp_path / "hub", "0" * 40
    snapshot = cache / "models--someone--tiny-llama" / "snapshots" / commit
    make_source(snapshot, "llama")
    (snapshot / "README.md").write_text("---\nlicense: mit\n---\nThe Hub card.\n")
    (cache / "models--someone--tiny-llama" / "refs").mkdir()
    (cache / "models--someone--tiny-llama" / "refs" / "main").write_text(commit)
    env = {**os.environ, "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": REPO_ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in NSA_SIZES.items()]
    result = subprocess.run([sys.executable, "-m", "nsa_hf_cli", "convert", "someone/tiny-llama", str(tmp_path / "out"),
                             "--verify", *flags], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "max |difference| = 0 (must be 0)" in result.stdout
    card = (tmp_path / "out" / "README.md").read_text()
    assert "base_model: someone/tiny-llama" in card and "license: mit" in card and "The Hub card." in card
