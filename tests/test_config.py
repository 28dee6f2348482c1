"""NSAConfig: paper defaults, validation errors naming the field, save/load round trip, Auto registration."""

import json
import os
import re
import subprocess
import sys

import pytest
from transformers import AutoConfig
from transformers.models.auto.configuration_auto import CONFIG_MAPPING

import nsa_hf
from nsa_hf import NSAConfig

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

TINY = dict(
    vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, head_dim=16, compress_block_size=8, compress_stride=4, select_block_size=16,
    num_selected_blocks=4, window_size=16,
)


def test_defaults_are_the_paper_settings():
    config = NSAConfig()
    assert config.model_type == "nsa_hf"
    assert (config.compress_block_size, config.compress_stride, config.select_block_size) == (32, 16, 64)
    assert (config.num_selected_blocks, config.window_size) == (16, 512)
    assert (config.num_initial_blocks, config.num_local_blocks) == (1, 2)
    assert config.compress_function == "mlp" and config.shared_kv is True and config.use_qk_norm is False


@pytest.mark.parametrize(
    "overrides, field",
    [
        (dict(compress_stride=5), "compress_stride"),
        (dict(compress_stride=16, compress_block_size=8), "compress_stride"),
        (dict(select_block_size=4), "select_block_size"),
        (dict(select_block_size=18), "compress_stride"),
        (dict(num_selected_blocks=2), "num_selected_blocks"),
        (dict(num_local_blocks=0), "num_local_blocks"),
        (dict(num_initial_blocks=-1), "num_initial_blocks"),
        (dict(window_size=0), "window_size"),
        (dict(compress_block_size=0), "compress_block_size"),
        (dict(compress_function="max"), "compress_function"),
        (dict(num_key_value_heads=3), "num_key_value_heads"),
    ],
)
def test_invalid_configs_raise_value_error_naming_the_field(overrides, field):
    with pytest.raises(ValueError, match=f"`{field}`"):
        NSAConfig(**{**TINY, **overrides})


def test_values_set_after_construction_are_checked_when_a_model_is_built(tmp_path):
    # `config.x = ...` and `from_pretrained(folder, x=...)` set attributes after `__post_init__` has validated
    from transformers import AutoModelForCausalLM

    from nsa_hf import NSAForCausalLM

    config = NSAConfig(**TINY)
    config.num_selected_blocks = 1
    with pytest.raises(ValueError, match="`num_selected_blocks`"):
        NSAForCausalLM(config)
    NSAForCausalLM(NSAConfig(**TINY)).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="`compress_stride`"):
        AutoModelForCausalLM.from_pretrained(tmp_path, compress_stride=3)
    assert AutoModelForCausalLM.from_pretrained(tmp_path, window_size=32).config.window_size == 32


def test_save_and_load_round_trip(tmp_path):
    config = NSAConfig(**TINY, compress_function="mean", shared_kv=False, use_qk_norm=True, num_initial_blocks=0)
    config.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["model_type"] == "nsa_hf" and saved["shared_kv"] is False and saved["compress_function"] == "mean"

    def fields(c):
        return {k: v for k, v in c.to_dict().items() if k != "_name_or_path"}

    loaded = NSAConfig.from_pretrained(tmp_path)
    assert fields(loaded) == fields(config)
    auto = AutoConfig.from_pretrained(tmp_path)
    assert type(auto) is NSAConfig and fields(auto) == fields(config)


def test_registered_under_its_own_model_type():
    assert nsa_hf.NSAConfig.model_type == "nsa_hf" != "nsa"  # flash-linear-attention owns "nsa"
    assert CONFIG_MAPPING["nsa_hf"] is NSAConfig
    assert type(AutoConfig.for_model("nsa_hf", **TINY)) is NSAConfig


def test_auto_classes_after_plain_import_in_a_fresh_process(tmp_path):
    # Save a tiny model here, load it through the Auto classes in a new interpreter that only runs `import nsa_hf`.
    from nsa_hf import NSAForCausalLM

    NSAForCausalLM(NSAConfig(**TINY)).save_pretrained(tmp_path)
    script = (
        "import nsa_hf, torch\n"
        "from transformers import AutoConfig, AutoModel, AutoModelForCausalLM\n"
        f"path = {str(tmp_path)!r}\n"
        "assert type(AutoConfig.from_pretrained(path)).__name__ == 'NSAConfig'\n"
        "m = AutoModelForCausalLM.from_pretrained(path)\n"
        "assert type(m).__name__ == 'NSAForCausalLM', type(m)\n"
        "assert m.config._attn_implementation == 'nsa', m.config._attn_implementation\n"
        "assert type(AutoModel.from_pretrained(path)).__name__ == 'NSAModel'\n"
        "print(m(torch.arange(20)[None]).logits.shape)\n"
    )
    pythonpath = REPO_ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")
    env = {**os.environ, "PYTHONPATH": pythonpath, "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "torch.Size([1, 20, 128])" in result.stdout


def _sharded(name: str, plan: dict) -> bool:
    """Whether a rule of a transformers TP plan (`*` standing for a layer number) applies to parameter `name`."""
    module = name.rsplit(".", 1)[0]
    rules = [re.compile(re.escape(rule).replace(r"\*", r"\d+")) for rule in plan]
    return any(rule.fullmatch(module) or rule.fullmatch(name) for rule in rules)


def test_no_tensor_parallel_plan_so_tied_weights_are_never_split_apart():
    # What transformers' common test_tied_weights_are_sharded_together checks, for every NSA parameter there is.
    from nsa_hf import NSAForCausalLM

    assert NSAConfig.base_model_tp_plan is None
    model = NSAForCausalLM(NSAConfig(**TINY, shared_kv=False, use_qk_norm=True, tie_word_embeddings=True))
    assert model.tp_plan == {}
    assert model.lm_head.weight is model.model.embed_tokens.weight
    for target, source in model._tied_weights_keys.items():
        assert _sharded(target, model.tp_plan) == _sharded(source, model.tp_plan), (target, source)
    assert not [name for name, _ in model.named_parameters() if _sharded(name, model.tp_plan)]
    if hasattr(model, "_resolve_parallel_plans"):  # transformers >= 5.2x: tp_size > 1 is refused, naming the plan
        from transformers.distributed import DistributedConfig

        with pytest.raises(ValueError, match="has no `tp_plan`"):
            model._resolve_parallel_plans(DistributedConfig(tp_size=2))
