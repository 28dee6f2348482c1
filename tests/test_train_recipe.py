"""
examples/train_nsa.py on CPU with its built-in tiny model (float32): full fine-tuning from a saved folder, LoRA,
torch.compile, and an interrupted run resumed from its checkpoint, which continues on the uninterrupted run's loss
curve.
"""

import importlib.util
import json
import random
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, ByT5Tokenizer, TrainerCallback

from _tiny import fresh_dynamo, one_thread  # noqa: F401  (fixtures)

_RECIPE = Path(__file__).resolve().parents[1] / "examples" / "train_nsa.py"
_spec = importlib.util.spec_from_file_location("train_nsa", _RECIPE)
train_nsa = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(train_nsa)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """Text files and a jsonl file of word salad over a small vocabulary (a tiny model learns it within steps)."""
    folder = tmp_path_factory.mktemp("texts")
    words = "the quick brown fox jumps over a lazy dog while sparse attention selects blocks".split()
    rng = random.Random(0)
    for i in range(6):
        (folder / f"doc{i}.txt").write_text(" ".join(rng.choice(words) for _ in range(40 + 15 * i)))
    with open(folder / "more.jsonl", "w") as f:
        for i in range(6):
            f.write(json.dumps({"text": " ".join(rng.choice(words) for _ in range(30 + 10 * i))}) + "\n")
    return folder


def _args(data, output_dir, *extra):
    return ["--model", "tiny", "--data", str(data), "--output-dir", str(output_dir), "--max-length", "128",
            "--batch-size", "2", "--lr", "3e-3", "--logging-steps", "1", "--save-steps", "3", "--max-steps", "6",
            *extra]


def _losses(trainer) -> dict[int, float]:
    return {entry["step"]: entry["loss"] for entry in trainer.state.log_history if "loss" in entry}


@pytest.fixture(scope="module")
def uninterrupted(data, tmp_path_factory):
    output = tmp_path_factory.mktemp("uninterrupted")
    trainer = train_nsa.main(_args(data, output))
    return _losses(trainer), {n: p.detach().clone() for n, p in trainer.model.named_parameters()}


def test_documents_are_read_tokenized_with_an_end_token_and_cut(data):
    documents = train_nsa.read_documents(data)
    assert len(documents) == 12
    pieces = train_nsa.tokenized_pieces(documents, ByT5Tokenizer(), 128)
    assert all(2 <= len(p["input_ids"]) <= 128 for p in pieces)
    ends = [p["input_ids"][-1] for p in pieces]
    assert ends.count(ByT5Tokenizer().eos_token_id) == len(documents)


def test_the_loss_falls_and_the_run_is_saved(uninterrupted, tmp_path):
    losses, _ = uninterrupted
    assert sorted(losses) == [1, 2, 3, 4, 5, 6]
    assert losses[6] < losses[1] - 0.5, losses


def test_fine_tuning_a_saved_folder_and_loading_the_result(data, tmp_path):
    folder = tmp_path / "model"
    train_nsa.load_model("tiny", seed=3).save_pretrained(folder)
    ByT5Tokenizer().save_pretrained(folder)
    output = tmp_path / "run"
    trainer = train_nsa.main(_args(data, output, "--model", str(folder), "--max-steps", "2",
                                   "--no-gradient-checkpointing"))
    assert trainer.state.global_step == 2
    loaded = AutoModelForCausalLM.from_pretrained(output)
    for name, param in trainer.model.named_parameters():
        assert torch.equal(loaded.state_dict()[name], param.detach()), name
    assert (output / "tokenizer_config.json").is_file()


def test_an_interrupted_run_resumes_on_the_same_loss_curve(data, uninterrupted, tmp_path):
    losses, weights = uninterrupted

    class Interrupt(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            control.should_training_stop = state.global_step == 3

    args = _args(data, tmp_path)
    trainer = train_nsa.build_trainer(train_nsa.build_parser().parse_args(args))
    trainer.add_callback(Interrupt())
    trainer.train()
    assert trainer.state.global_step == 3 and (tmp_path / "checkpoint-3").is_dir()
    class Steps(TrainerCallback):
        done = []

        def on_step_end(self, args, state, control, **kwargs):
            self.done.append(state.global_step)

    options = train_nsa.build_parser().parse_args(args + ["--resume"])
    resumed = train_nsa.build_trainer(options)
    resumed.add_callback(Steps())
    resumed.train(resume_from_checkpoint=options.resume)
    assert Steps.done == [4, 5, 6]  # continued, not started again
    for step in (4, 5, 6):
        assert abs(_losses(resumed)[step] - losses[step]) <= 1e-6, (step, _losses(resumed), losses)
    for name, param in resumed.model.named_parameters():
        torch.testing.assert_close(param.detach(), weights[name], rtol=0, atol=1e-6, msg=name)


def test_compiled_training_follows_the_same_loss_curve(data, uninterrupted, tmp_path):
    losses, _ = uninterrupted
    # Dynamo alone (backend "eager": no code generation), so the numbers are eager's exactly
    trainer = train_nsa.main(_args(data, tmp_path, "--compile", "--compile-backend", "eager"))
    for step, loss in losses.items():
        assert abs(_losses(trainer)[step] - loss) <= 1e-6, (step, _losses(trainer), losses)


def test_lora_trains_adapters_and_the_nsa_modules(data, tmp_path):
    trainer = train_nsa.main(_args(data, tmp_path, "--lora", "--lora-rank", "4", "--lr", "1e-2", "--max-steps", "4"))
    trainable = [name for name, p in trainer.model.named_parameters() if p.requires_grad]
    fully_trained = [n for n in trainable if "lora_" not in n]
    assert trainable and all("modules_to_save" in n for n in fully_trained)
    assert {n.split(".self_attn.")[1].split(".")[0] for n in fully_trained} == {"gate_proj", "compress_key",
                                                                                "compress_value"}
    assert not any("mlp.gate_proj.modules_to_save" in n for n in trainable)  # the MLP's gate gets LoRA
    assert any("mlp.gate_proj.lora_A" in n for n in trainable) and any("o_proj.lora_B" in n for n in trainable)
    losses = _losses(trainer)
    assert losses[4] < losses[1], losses
    assert (tmp_path / "adapter_config.json").is_file() and (tmp_path / "adapter_model.safetensors").is_file()


def test_bad_arguments_are_refused(data, tmp_path):
    with pytest.raises(SystemExit, match="no such folder"):
        train_nsa.main(_args(data, tmp_path, "--model", str(tmp_path / "missing")))
    with pytest.raises(SystemExit, match="no text"):
        train_nsa.main(_args(tmp_path, tmp_path / "out"))
    with pytest.raises(SystemExit, match="--max-length"):
        train_nsa.main(_args(data, tmp_path, "--max-length", "0"))
    (tmp_path / "bad.jsonl").write_text('{"body": "no text field"}\n')
    with pytest.raises(SystemExit, match='string "text" field'):
        train_nsa.main(_args(tmp_path, tmp_path / "out"))
