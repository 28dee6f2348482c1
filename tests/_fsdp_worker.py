"""
Run by tests/test_fsdp.py under `torchrun --nproc_per_node 2` (CPU, gloo): SGD steps of the recipe's tiny model
under FSDP2 (`fully_shard` of each `NSADecoderLayer` and of the root, the units Trainer's `fsdp_config` asks
accelerate for), in float32 and in bf16 mixed precision, each rank on its half of every step's packed pieces; then the
recipe itself (`examples/train_nsa.py`, which accelerate runs as DDP on CPU). Rank 0 writes the results as JSON.
With `gpu`, one process per GPU: the recipe alone, with `--fsdp` (FSDP2 through accelerate) in bf16.

    torchrun --nproc_per_node 2 tests/_fsdp_worker.py DATA_FOLDER OUTPUT_FOLDER [gpu]
"""

import gc
import importlib.util
import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from transformers import ByT5Tokenizer, DataCollatorWithFlattening

_RECIPE = Path(__file__).resolve().parents[1] / "examples" / "train_nsa.py"
STEPS, PIECES_PER_STEP, LR = 3, 4, 0.5
RECIPE_ARGS = ["--model", "tiny", "--max-length", "96", "--lr", "3e-3", "--logging-steps", "1", "--save-steps", "100",
               "--max-steps", "3", "--no-gradient-checkpointing"]


def recipe():
    spec = importlib.util.spec_from_file_location("train_nsa", _RECIPE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def step_pieces(data: Path) -> list[list[dict]]:
    """The pieces of each step, in order."""
    train_nsa = recipe()
    pieces = train_nsa.tokenized_pieces(train_nsa.read_documents(data), ByT5Tokenizer(), 96)
    return [pieces[s * PIECES_PER_STEP : (s + 1) * PIECES_PER_STEP] for s in range(STEPS)]


def train_steps(model, steps: list[list[dict]], rank: int = 0, world: int = 1) -> list[float]:
    """
    SGD steps (their updates scale with the gradients, unlike Adam's, so a wrong gradient scale would show); rank r
    of `world` takes the r-th share of each step's pieces. Each rank's loss is its token-loss sum
    over the whole step's token count, times `world` (FSDP averages gradients over ranks): the gradients of one
    process on all the pieces. Returns the step losses (summed over ranks).
    """
    collate = DataCollatorWithFlattening()
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    losses = []
    for pieces in steps:
        tokens = sum(len(p["input_ids"]) - 1 for p in pieces)  # every label but each piece's first
        share = len(pieces) // world
        batch = collate(pieces[rank * share : (rank + 1) * share], return_tensors="pt")
        loss = model(**batch, num_items_in_batch=torch.tensor(tokens)).loss
        (loss * world).backward()
        optimizer.step()
        optimizer.zero_grad()
        loss = loss.detach()
        if world > 1:
            dist.all_reduce(loss)
        losses.append(loss.item())
    return losses


def recipe_run(*args) -> dict:
    trainer = recipe().main(list(args))
    return dict(losses=[e["loss"] for e in trainer.state.log_history if "loss" in e],
                world_size=trainer.args.world_size, wrapped=type(trainer.model_wrapped).__name__)


def main(data: Path, output: Path, gpu: bool = False) -> None:
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    from nsa_hf.modeling.modeling_nsa import NSADecoderLayer

    if gpu:
        results = dict(recipe=recipe_run("--data", str(data), "--output-dir", str(output / "recipe"), "--batch-size",
                                         "2", "--fsdp", "--precision", "bf16", *RECIPE_ARGS))
        if dist.get_rank() == 0:  # accelerate has set up the process group
            (output / "results.json").write_text(json.dumps(results))
        return
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    steps = step_pieces(data)
    results = {}
    for name, policy in (("float32", MixedPrecisionPolicy()),
                         ("bf16", MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32))):
        model = recipe().load_model("tiny", seed=0).train()
        for module in model.modules():
            if isinstance(module, NSADecoderLayer):
                fully_shard(module, mp_policy=policy)
        fully_shard(model, mp_policy=policy)
        losses = train_steps(model, steps, rank, world)
        weights = {n: p.full_tensor() for n, p in model.named_parameters()}  # every rank takes part in the gather
        results[name] = dict(losses=losses, dtypes=sorted({str(p.dtype) for p in model.parameters()}))
        if rank == 0:
            torch.save(weights, output / f"{name}.pt")
    results["recipe"] = recipe_run("--data", str(data), "--output-dir", str(output / "recipe"), "--batch-size", "2",
                                   *RECIPE_ARGS)
    if rank == 0:
        (output / "results.json").write_text(json.dumps(results))


def shut_down() -> None:
    """
    Leave together and skip the interpreter's finalisation: Gloo's worker threads can still hold work objects whose
    tensors take the GIL when freed, which aborts a finalising interpreter at random ("terminate called without an
    active exception", seen in CI on rank 1 after its work was done).
    """
    gc.collect()
    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]), gpu=sys.argv[3:] == ["gpu"])
    shut_down()
