"""
Data-parallel training of the NSA model in two CPU processes (gloo) equals one process on the same data: FSDP2
(`fully_shard` of each `NSADecoderLayer`, float32 and bf16 mixed precision) and the recipe's Trainer run, which
accelerate runs as DDP on CPU (it enables FSDP only on accelerators). One `torchrun` launch, `tests/_fsdp_worker.py`.
On two GPUs (`gpu` marker): the recipe with `--fsdp`, FSDP2 through accelerate in bf16.
"""

import json
import os
import subprocess
import sys

import pytest
import torch

import _fsdp_worker as worker
from _tiny import one_thread  # noqa: F401  (one_thread: autouse fixture)
from test_train_recipe import data  # noqa: F401  (fixture)


def _launch(data, output, *extra) -> dict:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               worker.__file__, str(data), str(output), *extra]
    run = subprocess.run(command, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-5000:]
    return json.loads((output / "results.json").read_text())


@pytest.fixture(scope="module")
def two_processes(data, tmp_path_factory):  # noqa: F811
    output = tmp_path_factory.mktemp("fsdp")
    return output, _launch(data, output)


def test_fsdp2_in_two_processes_equals_one_process(data, two_processes):  # noqa: F811
    output, results = two_processes
    model = worker.recipe().load_model("tiny", seed=0).train()
    losses = worker.train_steps(model, worker.step_pieces(data))
    assert losses[-1] < losses[0], losses
    torch.testing.assert_close(results["float32"]["losses"], losses, rtol=0, atol=1e-5)
    sharded = torch.load(output / "float32.pt")
    for name, param in model.named_parameters():
        torch.testing.assert_close(sharded[name], param.detach(), rtol=0, atol=1e-5, msg=name)
    # bf16 compute, float32 parameters and gradient reduction: the same curve within bf16 rounding
    assert results["bf16"]["dtypes"] == ["torch.float32"]
    torch.testing.assert_close(results["bf16"]["losses"], losses, rtol=2e-2, atol=0)


def test_the_recipe_in_two_processes_equals_one_process(data, two_processes, tmp_path):  # noqa: F811
    _, results = two_processes
    assert results["recipe"]["world_size"] == 2 and results["recipe"]["wrapped"] == "DistributedDataParallel"
    single = worker.recipe().main(["--data", str(data), "--output-dir", str(tmp_path), "--batch-size", "4",
                                   *worker.RECIPE_ARGS])
    losses = [e["loss"] for e in single.state.log_history if "loss" in e]
    torch.testing.assert_close(results["recipe"]["losses"], losses, rtol=0, atol=1e-5)


def test_the_recipe_refuses_fsdp_without_gpus(data, tmp_path):  # noqa: F811
    if torch.cuda.is_available():
        pytest.skip("GPUs present")
    with pytest.raises(SystemExit, match="--fsdp needs GPUs"):
        worker.recipe().main(["--data", str(data), "--output-dir", str(tmp_path), "--fsdp", *worker.RECIPE_ARGS])


@pytest.mark.gpu
def test_gpu_the_recipe_under_fsdp2_in_two_processes_equals_one_process(data, tmp_path):  # noqa: F811
    if torch.cuda.device_count() < 2:
        pytest.skip("needs 2 GPUs")
    results = _launch(data, tmp_path / "fsdp", "gpu")["recipe"]
    assert results["world_size"] == 2 and results["wrapped"].startswith("FSDP"), results
    single = worker.recipe().main(["--data", str(data), "--output-dir", str(tmp_path / "one"), "--batch-size", "4",
                                   "--precision", "bf16", *worker.RECIPE_ARGS])
    losses = [e["loss"] for e in single.state.log_history if "loss" in e]
    torch.testing.assert_close(results["losses"], losses, rtol=2e-2, atol=0)
