"""
`nsa-hf convert`: dense Llama / Mistral / Qwen2 / Qwen3 checkpoints -> NSA checkpoints whose dense mode reproduces the
source exactly and whose NSA mode starts as close to it as the math allows; streamed shard by shard in about one
shard of memory; the source is never touched and a failed conversion leaves nothing behind.
"""

import hashlib
import json
import logging
import os
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

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
import nsa_hf.conversion.convert as convert_mod
from nsa_hf import NSAForCausalLM
from nsa_hf.conversion import convert_checkpoint, nsa_config_from_dense

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SOURCES = {
    "llama": (LlamaForCausalLM, LlamaConfig, {}),
    "llama_bias": (LlamaForCausalLM, LlamaConfig, dict(attention_bias=True)),
    "llama_tied": (LlamaForCausalLM, LlamaConfig, dict(tie_word_embeddings=True)),
    "mistral": (MistralForCausalLM, MistralConfig, dict(sliding_window=None)),
    "qwen2": (Qwen2ForCausalLM, Qwen2Config, {}),
    "qwen3": (Qwen3ForCausalLM, Qwen3Config, {}),
}


def make_source(folder, name, seed=0, **extra):
    model_cls, config_cls, kwargs = SOURCES[name]
    torch.manual_seed(seed)
    model = model_cls(config_cls(**{**DIMS, **kwargs, **extra})).eval()
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


@pytest.mark.parametrize("nsa_init, gates", [("dense", (0.02, 0.49, 0.49)), ("uniform", (1 / 3, 1 / 3, 1 / 3))])
def test_nsa_only_parameters_start_as_documented(tmp_path, nsa_init, gates):
    src, out = tmp_path / "src", tmp_path / "out"
    make_source(src, "qwen2")
    config = convert_checkpoint(src, out, shared_kv=False, nsa_init=nsa_init, **NSA_SIZES)
    model = NSAForCausalLM.from_pretrained(out)
    for layer in model.model.layers:
        attn = layer.self_attn
        assert (attn.gate_proj.weight == 0).all()
        assert torch.allclose(torch.sigmoid(attn.gate_proj.bias.view(-1, 3)), torch.tensor(gates).expand(4, 3))
        assert (attn.compress_key.down_proj.weight == 0).all() and (attn.compress_value.position_embedding == 0).all()
        assert attn.compress_key.up_proj.weight.std() > 0  # the model's own init: learns once down_proj moves
        assert (attn.o_proj.bias == 0).all()  # Qwen2's o_proj has no bias: NSA's starts at zero
        for branch in ("cmp", "win"):
            assert torch.equal(getattr(attn, f"{branch}_k_proj").weight, attn.k_proj.weight)
            assert torch.equal(getattr(attn, f"{branch}_v_proj").bias, attn.v_proj.bias)
    assert config.attention_bias and not config.use_qk_norm and model.config.window_size == config.window_size
    assert nsa_config_from_dense(Qwen3Config(**DIMS)).use_qk_norm
    convert_checkpoint(src, tmp_path / "again", shared_kv=False, nsa_init=nsa_init, **NSA_SIZES)
    assert digest(tmp_path / "again")["model.safetensors"] == digest(out)["model.safetensors"]  # reproducible


# Window 64 and 4 selected blocks of 16: at positions < 64 the window and the selected blocks hold every key.
WIDE = dict(compress_block_size=8, compress_stride=4, select_block_size=16, num_selected_blocks=4, window_size=64)
FAMILIES = {
    "llama": ("llama", {}),
    "mistral": ("mistral", {}),
    "qwen2_7to1": ("qwen2", dict(hidden_size=112, num_attention_heads=7, num_key_value_heads=1)),
    "qwen3": ("qwen3", {}),
}


@pytest.mark.parametrize("family", list(FAMILIES))
def test_nsa_mode_starts_close_to_the_source_where_every_key_is_seen(tmp_path, family):
    name, extra = FAMILIES[family]
    src = tmp_path / "src"
    dense = make_source(src, name, **extra)
    ids = torch.randint(0, DIMS["vocab_size"], (2, WIDE["window_size"]), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = dense(ids).logits
    differences = {}
    for nsa_init in ("dense", "uniform"):
        convert_checkpoint(src, tmp_path / nsa_init, nsa_init=nsa_init, **WIDE)
        nsa = NSAForCausalLM.from_pretrained(tmp_path / nsa_init).eval()
        with torch.no_grad():
            logits = nsa(ids).logits
        differences[nsa_init] = ((logits - expected).norm(dim=-1) / expected.norm(dim=-1)).mean().item()
    # (1 - 0.02) * dense + 0.02 * compressed: about 2% of the distance between the compressed and dense outputs
    assert differences["dense"] < 0.01 and differences["dense"] < differences["uniform"] / 10, differences


def test_every_nsa_only_parameter_learns_from_the_dense_init(tmp_path):
    src, out = tmp_path / "src", tmp_path / "out"
    make_source(src, "llama")
    convert_checkpoint(src, out, shared_kv=False, **NSA_SIZES)
    model = NSAForCausalLM.from_pretrained(out).train()
    nsa_only = {n: p for n, p in model.named_parameters()
                if any(f".{m}." in n for m in convert_mod.NSA_ONLY_MODULES)}
    before = {n: p.detach().clone() for n, p in nsa_only.items()}
    optimizer = torch.optim.Adam(nsa_only.values(), lr=1e-3)
    ids = torch.randint(0, DIMS["vocab_size"], (2, 48), generator=torch.Generator().manual_seed(3))
    for _ in range(2):  # the compression's up_proj gets a gradient once down_proj has left zero
        optimizer.zero_grad()
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
    assert not [n for n, p in nsa_only.items() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not [n for n, p in nsa_only.items() if torch.equal(p, before[n])]


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

    def broken_save(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"half")
        raise OSError("disk full")

    monkeypatch.setattr(convert_mod, "save_file", broken_save)
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


def break_one_weight(monkeypatch, name="model.layers.0.self_attn.v_proj.weight"):
    """Make the conversion copy `name` slightly wrong, as a bug in it would."""
    original = convert_mod._SourceWeights.read

    def read_and_break(self, tensor_name):
        tensor = original(self, tensor_name)
        return tensor * 1.001 if tensor_name == name else tensor

    monkeypatch.setattr(convert_mod._SourceWeights, "read", read_and_break)


def test_verify_catches_a_wrong_conversion_before_writing(tmp_path, monkeypatch):
    src, out = tmp_path / "src", tmp_path / "out"
    make_source(src, "mistral")
    break_one_weight(monkeypatch)
    with pytest.raises(RuntimeError, match="differs from .* in dense mode"):
        convert_checkpoint(src, out, verify=True, **NSA_SIZES)
    assert not out.exists()


def test_failed_conversion_removes_the_parent_folders_it_made(tmp_path, monkeypatch):
    src = tmp_path / "src"
    make_source(src, "llama")
    monkeypatch.setattr(convert_mod, "save_file", lambda *args, **kwargs: 1 / 0)
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


MEASURE_PEAK = textwrap.dedent("""
    import json, re, sys
    import torch
    from nsa_hf.conversion import convert_checkpoint

    def status(field):
        return int(re.search(field + r":\\s+(\\d+) kB", open("/proc/self/status").read()).group(1)) * 1024

    torch.set_num_threads(1)
    tiny, src, out, shard = sys.argv[1:]
    convert_checkpoint(tiny, out + "-warmup")  # what a first conversion imports and allocates once
    open("/proc/self/clear_refs", "w").write("5")  # VmHWM := VmRSS
    base = status("VmRSS")
    convert_checkpoint(src, out, max_shard_size=shard)
    print(json.dumps({"peak_bytes": status("VmHWM") - base}))
""")


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="peak RSS is read from Linux's /proc")
def test_a_sharded_checkpoint_converts_in_about_one_shard_of_memory(tmp_path):
    src, out, tiny = tmp_path / "src", tmp_path / "out", tmp_path / "tiny"
    config = LlamaConfig(vocab_size=4096, hidden_size=512, intermediate_size=1024, num_hidden_layers=8,
                         num_attention_heads=8, num_key_value_heads=2, head_dim=64)
    torch.manual_seed(0)
    dense = LlamaForCausalLM(config).eval()  # 22M parameters, 88 MB in float32
    dense.save_pretrained(src, max_shard_size="16MB")
    make_source(tiny, "llama")
    shard = 16_000_000
    env = {**os.environ, "PYTHONPATH": REPO_ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    result = subprocess.run([sys.executable, "-c", MEASURE_PEAK, str(tiny), str(src), str(out), str(shard)],
                            capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    peak = json.loads(result.stdout.strip().splitlines()[-1])["peak_bytes"]
    shards = sorted(out.glob("model-*.safetensors"))
    assert len(shards) >= 5 and all(p.stat().st_size <= shard + 100_000 for p in shards), shards
    assert peak < 2 * shard, f"peak memory {peak / 1e6:.1f} MB for shards of {shard / 1e6:.0f} MB"
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == {p.name for p in shards}
    converted = AutoModelForCausalLM.from_pretrained(out, attn_implementation="sdpa").eval()
    ids = torch.randint(0, config.vocab_size, (1, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (converted(ids).logits - dense(ids).logits).abs().max().item() == 0.0


def test_a_pickle_checkpoint_converts_with_weights_only_loading(tmp_path):
    src, out = tmp_path / "src", tmp_path / "out"
    dense = make_source(src, "qwen3")
    (src / "model.safetensors").unlink()
    torch.save(dense.state_dict(), src / "pytorch_model.bin")
    convert_checkpoint(src, out, dtype="bfloat16", **NSA_SIZES)
    converted = AutoModelForCausalLM.from_pretrained(out).state_dict()
    assert {t.dtype for t in converted.values()} == {torch.bfloat16}
    for name, tensor in dense.state_dict().items():
        assert torch.equal(converted[name], tensor.to(torch.bfloat16)), name


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):  # unpickling this runs code: weights_only loading must refuse it
        return (Path.touch, (self.marker,))


def test_a_pickle_that_is_not_plain_weights_is_refused_unread(tmp_path):
    src, marker = tmp_path / "src", tmp_path / "ran"
    make_source(src, "llama")
    (src / "model.safetensors").unlink()
    torch.save({"model.embed_tokens.weight": _Payload(marker)}, src / "pytorch_model.bin")
    with pytest.raises(ValueError, match="does not load as a weights-only torch checkpoint"):
        convert_checkpoint(src, tmp_path / "out", **NSA_SIZES)
    assert not marker.exists() and not (tmp_path / "out").exists()
