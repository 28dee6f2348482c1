"""
`nsa-hf demo` / `nsa-hf convert` as a user meets them: every flag documented with its default, `--help` without
torch, strict values, and bad input answered with one line `nsa-hf <command>: error: ...`, exit status 2 and nothing
written. No test reaches the Hub: the Hub is offline here, or its probe is replaced.
"""

import json
import os
import subprocess
import sys

import huggingface_hub.constants
import pytest
from _tiny import NSA_SIZES
from test_conversion import break_one_weight, digest, make_source
from transformers import GPT2Config, GPT2LMHeadModel

import nsa_hf.conversion.convert as convert_mod
import nsa_hf_cli
from nsa_hf import NSAConfig
from nsa_hf.conversion.convert import DTYPES, NSA_FIELDS, NSA_INITS
from nsa_hf_cli import build_parser, main

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = [f"--{k.replace('_', '-')}={v}" for k, v in NSA_SIZES.items()]


@pytest.fixture(autouse=True)
def hub_offline(monkeypatch):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


def run_cli(capsys, *argv):
    """(exit status, stdout, stderr) of `nsa-hf argv...` run in this process."""
    capsys.readouterr()  # what came before, e.g. the progress bars of saving a source
    try:
        main(list(argv))
        status = 0
    except SystemExit as exit_:
        status = exit_.code
    out, err = capsys.readouterr()
    return status, out, err


def assert_one_line_error(status, err, command, *fragments, expected_status=2):
    assert status == expected_status, err
    # transformers' progress bars ("Loading weights: ...it/s]") may come first
    lines = [line for line in err.splitlines() if line.strip() and "it/s]" not in line]
    assert len(lines) == 1 and lines[0].startswith(f"nsa-hf {command}: error: "), err
    for fragment in fragments:
        assert fragment in err, err


def snapshot(folder):
    """Every path under `folder` with its content's digest (folders: None)."""
    files = digest(folder)
    return {str(p.relative_to(folder)): files.get(p.name) if p.is_file() else None for p in folder.rglob("*")}


def subcommands():
    parser = build_parser()
    return {name: p for action in parser._subparsers._group_actions for name, p in action.choices.items()}


def test_help_answers_without_importing_torch_or_transformers():
    script = (
        "import sys, nsa_hf_cli\n"
        "for command in ('demo', 'convert'):\n"
        "    try:\n"
        "        nsa_hf_cli.main([command, '--help'])\n"
        "    except SystemExit as e:\n"
        "        assert e.code == 0\n"
        "print('heavy imports:', sorted(m for m in ('torch', 'transformers', 'nsa_hf') if m in sys.modules))\n"
    )
    env = {**os.environ, "PYTHONPATH": REPO_ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "heavy imports: []" in result.stdout
    assert "--window-size" in result.stdout and "--num-local-blocks" in result.stdout


@pytest.mark.parametrize("command", ["demo", "convert"])
def test_every_flag_says_what_it_does_and_its_default(command):
    parser = subcommands()[command]
    flags = [a for a in parser._actions if a.option_strings and a.dest != "help"]
    for action in flags:
        assert action.help and "(default: " in action.help, action.option_strings
    names = {a.dest for a in flags}
    assert set(NSA_FIELDS) <= names, set(NSA_FIELDS) - names  # every NSA field of the README table is a flag


def test_flag_defaults_are_nsaconfig_defaults():
    config = NSAConfig()
    assert list(nsa_hf_cli.NSA_FLAGS) == list(NSA_FIELDS)
    assert {k: v[1] for k, v in nsa_hf_cli.NSA_FLAGS.items()} == {k: getattr(config, k) for k in NSA_FIELDS}
    assert nsa_hf_cli.DTYPES == DTYPES and nsa_hf_cli.NSA_INITS == NSA_INITS
    help_text = subcommands()["convert"].format_help()
    assert "(default: 512, the paper's)" in " ".join(help_text.split())
    assert "(default: true; the paper's: false)" in " ".join(help_text.split())  # --shared-kv


@pytest.mark.parametrize("text, value", [("true", True), ("True", True), ("1", True), ("YES", True),
                                         ("false", False), ("0", False), ("no", False), ("False", False)])
def test_boolean_flags_accept_true_false_1_0_yes_no(text, value):
    args = build_parser().parse_args(["convert", "src", "out", "--shared-kv", text, "--use-qk-norm", text])
    assert args.shared_kv is value and args.use_qk_norm is value


@pytest.mark.parametrize("text", ["flase", "", "2", "y", "on"])
def test_boolean_flags_refuse_anything_else(capsys, tmp_path, text):
    status, out, err = run_cli(capsys, "convert", str(tmp_path / "src"), str(tmp_path / "out"), "--shared-kv", text)
    assert_one_line_error(status, err, "convert", f"argument --shared-kv: expected one of true/false/1/0/yes/no, "
                                                  f"got {text!r}")
    assert list(tmp_path.iterdir()) == []


def _truncated_shard(src):
    path = src / "model.safetensors"
    path.write_bytes(path.read_bytes()[:1000])


def _sharded(src):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(src)
    for path in src.glob("model*.safetensors*"):
        path.unlink()
    model.save_pretrained(src, max_shard_size="100KB")
    return json.loads((src / "model.safetensors.index.json").read_text())


def _index_without_an_entry(src):
    index = _sharded(src)
    del index["weight_map"]["model.layers.0.self_attn.q_proj.weight"]
    (src / "model.safetensors.index.json").write_text(json.dumps(index))


def _index_naming_a_missing_shard(src):
    index = _sharded(src)
    (src / index["weight_map"]["lm_head.weight"]).unlink()


def _gpt2(src):
    for path in src.iterdir():
        path.unlink()
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64)).save_pretrained(src)


def _existing_output(src):
    (src.parent / "out").mkdir()
    (src.parent / "out" / "keep.txt").write_text("mine")


@pytest.mark.parametrize(
    "prepare, flags, fragments",
    [
        (None, ["--window-size", "-5"], ["--window-size must be a positive integer, got -5"]),
        (None, ["--compress-stride", "5"], ["--compress-stride (5) must divide --compress-block-size (32)"]),
        (None, ["--use-qk-norm", "true"], ["--use-qk-norm cannot be True for a llama source"]),
        (None, ["--max-shard-size", "5XB"], ["--max-shard-size '5XB' is not a positive size"]),
        (None, ["--nsa-init", "zero"], ["argument --nsa-init: invalid choice: 'zero'"]),
        (_gpt2, [], ["model_type 'gpt2'", "supported are llama, mistral, qwen2, qwen3"]),
        (_existing_output, [], ["exists and is not empty (--overwrite replaces it)"]),
        (_truncated_shard, [], ["model.safetensors is truncated or corrupt", "header"]),
        (_index_without_an_entry, [], ["has no entry for ['model.layers.0.self_attn.q_proj.weight']"]),
        (_index_naming_a_missing_shard, [], ["names the weight file", "which is not in"]),
    ],
    ids=["negative-window", "bad-stride", "qk-norm-mismatch", "bad-shard-size", "bad-init", "gpt2", "existing-output", "truncated-shard",
         "missing-index-entry", "missing-shard"],
)
def test_convert_errors_are_one_line_exit_2_and_write_nothing(capsys, tmp_path, prepare, flags, fragments):
    src = tmp_path / "src"
    make_source(src, "llama")
    if prepare is not None:
        prepare(src)
    before = snapshot(tmp_path)
    status, out, err = run_cli(capsys, "convert", str(src), str(tmp_path / "out"), *flags)
    assert_one_line_error(status, err, "convert", *fragments)
    assert "overwrite=True" not in err
    assert snapshot(tmp_path) == before, "something was written"


@pytest.mark.parametrize("source", ["does-not-exist", "./does-not-exist", "~/does-not-exist-nsa-hf", "{tmp}/nope",
                                    "{tmp}/src/nope", "a/b/c", "src/missing"])
def test_a_missing_local_source_is_no_such_folder_without_asking_the_hub(capsys, tmp_path, monkeypatch, source):
    (tmp_path / "src").mkdir()
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(convert_mod, "_hub_reachable", lambda: pytest.fail("asked the Hub about a local path"))
    source = source.format(tmp=tmp_path)
    status, out, err = run_cli(capsys, "convert", source, "out")
    assert_one_line_error(status, err, "convert", f"no such folder: {source!r}")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


def test_a_hub_id_that_cannot_be_looked_up_fails_at_once(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    status, out, err = run_cli(capsys, "convert", "someone/not-cached", "out")
    assert_one_line_error(status, err, "convert", "no such folder: 'someone/not-cached'", "offline mode is on")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(convert_mod, "_hub_reachable", lambda: False)  # one quick probe instead of 5 retries
    status, out, err = run_cli(capsys, "convert", "someone/not-cached", "out")
    assert_one_line_error(status, err, "convert", "the Hub cannot be reached")
    status, out, err = run_cli(capsys, "convert", "some--one/x", "out")
    assert_one_line_error(status, err, "convert", "'some--one/x' is neither a local folder nor a valid Hub id")
    assert list(tmp_path.iterdir()) == []


def test_convert_with_verify_prints_what_it_compared(capsys, tmp_path):
    src, out = tmp_path / "src", tmp_path / "out"
    make_source(src, "llama")
    status, stdout, err = run_cli(capsys, "convert", str(src), str(out), *SMALL, "--shared-kv", "no", "--verify")
    assert status == 0, err
    lines = stdout.splitlines()
    dense = next(line for line in lines if line.startswith("verify, dense mode"))
    nsa = next(line for line in lines if line.startswith("verify, NSA mode"))
    assert f"vs {src} on 2x64 random tokens: max |difference| = 0 (must be 0)" in dense
    assert float(nsa.split("max |difference| = ")[1].split()[0]) > 0
    assert lines[-1].startswith(f"wrote {out}:")
    config = NSAConfig.from_pretrained(out)
    assert (config.window_size, config.compress_block_size, config.shared_kv) == (16, 8, False)


def test_failed_verification_is_one_line_exit_1(capsys, tmp_path, monkeypatch):
    src = tmp_path / "src"
    make_source(src, "llama")
    break_one_weight(monkeypatch)
    status, out, err = run_cli(capsys, "convert", str(src), str(tmp_path / "out"), *SMALL, "--verify")
    assert_one_line_error(status, err, "convert", "differs from", "in dense mode", expected_status=1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


def test_demo_runs_with_nsa_flags_and_saves_a_readable_folder(capsys, tmp_path):
    status, out, err = run_cli(capsys, "demo", "--steps", "6", "--batch-size", "2", "--seq-len", "64",
                               "--new-tokens", "2", "--cpu", "--window-size", "24", "--save", str(tmp_path / "m"))
    assert status == 0, err
    assert "(means of the first and the last 3 steps; a uniform guess scores 5.545)" in out
    assert NSAConfig.from_pretrained(tmp_path / "m").window_size == 24
    assert (tmp_path / "m" / "README.md").is_file()


def test_demo_errors_are_one_line(capsys):
    status, out, err = run_cli(capsys, "demo", "--compress-stride", "5")
    assert_one_line_error(status, err, "demo", "--compress-stride (5) must divide --compress-block-size (16)")
    status, out, err = run_cli(capsys, "demo", "--steps", "0")
    assert_one_line_error(status, err, "demo", "argument --steps: expected a positive integer, got '0'")
