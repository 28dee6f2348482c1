"""
Does a converted NSA model recover the dense model's quality at long context, and does the warm-up recipe help?
(issue 10, item 4). Nothing is downloaded: a small dense Llama-style model is trained from scratch on an offline
corpus, the Python sources of the installed packages (one long byte-level document per package), with synthetic
passkey documents (`PASSKEY = "<5 digits>"` somewhere in a file, `assert PASSKEY == "` at its end; 30% of the
pretrain's rows, 20% of continued training's) so that retrieval is a skill the dense model has. It is converted (`nsa-hf convert`) twice: with the default `nsa_init="dense"` (the
recipe) and with `nsa_init="uniform"` (the naive conversion, gates 1/3). Then, on the same continued-training tokens
at 16k context:

- recipe: stage 1 (NSA-only parameters, LM loss + selection-alignment KL on the queries below the pretrain's 4k
  context, where the source's dense attention is a target: `max_query_position`) for `stage1_tokens`, then stage 2
  (the whole model, NSA mode) for `stage2_tokens`;
- naive: the uniform conversion, whole model, NSA mode, for stage1 + stage2 tokens;
- dense twin: the source, whole model, dense attention, for the same tokens.

Each row of the results has `model`, `stage`, `attention`, `tokens_trained` (continued training), `loss_by_bucket`
(held-out mean next-byte loss by position: <=512, 512-2k, 2k-8k, 8k-16k) and `passkey` (accuracy at 4k, 8k, 16k, 32k:
all five digits right under teacher forcing, which is what greedy decoding would produce). Rows: source; converted
(dense mode, NSA mode; naive NSA mode) before training; after stage 1; after stage 2; naive after the budget; dense
twin after the budget. Results `<out-dir>/quality_<gpu>.json`, plot `<out-dir>/quality_<gpu>.png`, log
`<out-dir>/quality_log.txt` (written as it goes).

Model: hidden 512, 8 layers, 8 query / 2 KV heads (GQA 4:1), head dim 64, SwiGLU 1408, byte vocabulary, RoPE theta
500k: 22.8M parameters (45.6 MB in bf16, three shards of at most 16 MB). NSA: the paper's l=32, d=16, l'=64, n=16,
w=512. Training: AdamW, bf16 autocast over float32 weights, rows of one window each (no padding).

## GPU session (one H200; each command fits one 10-minute call, 30 minutes of device time in all)

Time per phase, estimated from FLOPs (`flops_per_token`: training 6N + attention over the keys each query sees; NSA
counted as its keys, compressed T/32 + selected 1024 + window 512, at half the dense kernels' efficiency) at 35% MFU
of the H200's 790 TFLOP/s bf16 (half that speed doubles every figure): corpus ~20 s (reading the sources); pretrain
300 s, time-boxed (4k-context rows, 237 MFLOP/token, ~1.2M tokens/s: ~350M tokens, ~2700 steps of 131k tokens; the
schedule is set from the speed of steps 10-30, past compilation); baseline: conversion twice (~1 s) and 4 evaluations, ~2 s of
FLOPs each (16 x 16k held-out tokens, 4 x 128 passkeys up to 32k) plus the first NSA call's Triton compilation
(not measured here; say 30-90 s); stage1 5.2M tokens at 16k (40 steps, 337 MFLOP/token) ~6 s; stage2 26.2M (200
steps) ~32 s; naive 31.5M ~38 s; dense twin 31.5M (539 MFLOP/token, ~0.51M tokens/s) ~61 s. Every phase checks the
time left (`--deadline-minutes`, default 9.5) against its estimate from the speed measured so far and stops
cleanly, leaving what is done; `--resume` skips the rows the results file already has.

1. Pretrain and the untrained rows (~7 min):

       run(command="export PYTHONUNBUFFERED=1 NSA_HF_AUTOTUNE=0; python3 benchmarks/quality_experiment.py
            --phases corpus pretrain baseline --out-dir $OUT", timeout_s=600)

   Then here: `mkdir -p quality_source && cp <files_at>/source/* quality_source/ && echo /quality_source/ >>
   .git/info/exclude && cp <files_at>/quality_*.json <files_at>/quality_log.txt benchmarks/results/`.

2. Continued training and the plot (~4-7 min):

       run(command="export PYTHONUNBUFFERED=1 NSA_HF_AUTOTUNE=0; python3 benchmarks/quality_experiment.py
            --phases corpus stage1 stage2 naive dense-twin plot --source quality_source
            --results benchmarks/results/quality_h200.json --resume --out-dir $OUT", carry=["quality_source"],
            timeout_s=600)

   Copy `quality_h200.json`, `quality_h200.png` and the log into benchmarks/results/. A phase cut off by the deadline
   is rerun by the same command (`--resume`); stage 2 alone needs the stage-1 parameters: step 2 writes them to
   `<out-dir>/stage1_nsa.safetensors` (4.6 MB), which `--stage1 PATH` reads back.

Or everything in one call (measured 2026-12-03: 516 s, pretrain 240 s; nothing needs to travel back but the results):

       run(command="export PYTHONUNBUFFERED=1 NSA_HF_AUTOTUNE=0; python3 benchmarks/quality_experiment.py
            --phases corpus pretrain baseline stage1 stage2 naive dense-twin plot --deadline-minutes 9.55
            --reserve-s 330 --out-dir $OUT; rm -rf $OUT/source $OUT/stage1_nsa.safetensors", timeout_s=600)

CPU smoke test (tiny sizes, a minute): `python benchmarks/quality_experiment.py --smoke --out-dir /tmp/quality`.
"""

import argparse
import importlib.util
import json
import math
import os
import random
import shutil
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from nsa_hf.conversion import convert_checkpoint  # noqa: E402
from nsa_hf.training import freeze_all_but_nsa, nsa_parameters, selection_alignment_loss  # noqa: E402

PHASES = ("corpus", "pretrain", "baseline", "stage1", "stage2", "naive", "dense-twin", "plot")
PACKAGES = ("torch", "transformers", "numpy", "scipy", "sympy", "pandas", "jax", "matplotlib", "sklearn", "triton",
            "networkx", "IPython", "tensorboard", "accelerate", "peft", "safetensors", "huggingface_hub", "flax",
            "optax", "onnx", "statsmodels", "skimage", "cupy", "numba", "botorch", "gpytorch", "lightning")
BUCKETS = ((1, 512, "<=512"), (513, 2048, "512-2k"), (2049, 8192, "2k-8k"), (8193, 16384, "8k-16k"))
PASSKEY_LENGTHS = (4096, 8192, 16384, 32768)
FULL = dict(
    model=dict(vocab_size=256, hidden_size=512, intermediate_size=1408, num_hidden_layers=8, num_attention_heads=8,
               num_key_value_heads=2, head_dim=64, max_position_embeddings=32768, rope_theta=500000.0,
               tie_word_embeddings=False, bos_token_id=None, eos_token_id=None, pad_token_id=None),
    nsa=dict(compress_block_size=32, compress_stride=16, select_block_size=64, num_selected_blocks=16,
             window_size=512),
    corpus_bytes=400_000_000, pretrain_seq=4096, pretrain_rows=32, pretrain_tokens=400_000_000, pretrain_lr=1.5e-3,
    pretrain_minutes=5.0, seq=16384, rows=8, stage1_tokens=5_242_880, stage2_tokens=26_214_400, lr=3e-4,
    stage1_lr=2e-3, eval_seqs=16, eval_seq=16384, passkey_trials=128, passkey_lengths=PASSKEY_LENGTHS,
    buckets=BUCKETS, warmup_steps=100,
)
SMOKE = dict(
    model=dict(FULL["model"], hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, head_dim=16, max_position_embeddings=2048),
    nsa=dict(compress_block_size=16, compress_stride=8, select_block_size=32, num_selected_blocks=4, window_size=64),
    corpus_bytes=2_000_000, pretrain_seq=256, pretrain_rows=4, pretrain_tokens=3 * 4 * 256, pretrain_lr=2e-3,
    pretrain_minutes=1.0, seq=512, rows=2, stage1_tokens=2 * 2 * 512, stage2_tokens=2 * 2 * 512, lr=3e-4,
    stage1_lr=2e-3, eval_seqs=2, eval_seq=512, passkey_trials=2, passkey_lengths=(256, 512),
    buckets=((1, 64, "<=64"), (65, 256, "64-256"), (257, 512, "256-512")), warmup_steps=1,
)
PASSKEY_SHARE = 0.2
# Continued training: 5% (~96 passkey rows in 240 steps) left every model short at 16k (dense twin 69%, NSA 6-19%,
# 2026-12-03); the three arms see the same rows.
# A passkey row teaches retrieval through its 5 answer bytes alone: at 5% of a 100-second pretrain (~840 rows) the
# source learned none of it (0/32 at 4k, 2026-12-03), so the pretrain sees many more of them than continued training.
PRETRAIN_PASSKEY_SHARE = 0.3
ALIGNMENT_WEIGHT = 1.0


# ---------------------------------------------------------------------------------------------------------- corpus

def package_sources(package: str, max_bytes: int | None = None) -> bytes:
    """The `.py` files of an installed package (found without importing it), in path order, each after a header line."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(f"{package!r} is not an installed package (a folder with .py files)")
    root = Path(next(iter(spec.submodule_search_locations)))
    parts, size = [], 0
    for path in sorted(root.rglob("*.py")):
        text = f"# ===== {package}/{path.relative_to(root)} =====\n".encode() + path.read_bytes()
        parts.append(text)
        size += len(text)
        if max_bytes is not None and size >= max_bytes:
            break
    return b"".join(parts)[:max_bytes]


def byte_documents(packages, max_bytes: int | None = None) -> list[tuple[str, torch.Tensor]]:
    """One long byte-level document (int64 token ids 0-255) per package."""
    return [(p, torch.frombuffer(bytearray(package_sources(p, max_bytes)), dtype=torch.uint8).long())
            for p in packages]


def build_corpus(total_bytes: int, held_out_share: float = 0.03):
    """(train, held-out) uint8 streams: each installed package's sources, the last 3% of each held out."""
    found = [p for p in PACKAGES if importlib.util.find_spec(p) is not None]
    train, held_out, size = [], [], 0
    for package, doc in byte_documents(found, max_bytes=total_bytes // 4):
        cut = int(len(doc) * (1 - held_out_share))
        train.append(doc[:cut].to(torch.uint8))
        held_out.append(doc[cut:].to(torch.uint8))
        size += len(doc)
        if size >= total_bytes:
            break
    return torch.cat(train), torch.cat(held_out), found[: len(train)]


def passkey_document(stream: torch.Tensor, length: int, generator: random.Random, depth: float | None = None):
    """
    `length` bytes of source code from `stream` with `PASSKEY = "<5 digits>"` at `depth` (0-1) and the question at the
    end: (token ids, key, position of the first key digit of the answer).
    """
    key = f"{generator.randrange(10**5):05d}"
    line, question = f'\nPASSKEY = "{key}"  # remember this\n'.encode(), b'\nassert PASSKEY == "'
    answer = f'{key}"'.encode()
    filler_len = length - len(line) - len(question) - len(answer)
    start = generator.randrange(len(stream) - filler_len)
    filler = stream[start : start + filler_len]
    at = int((generator.random() if depth is None else depth) * filler_len)
    parts = [filler[:at], _bytes(line), filler[at:], _bytes(question), _bytes(answer)]
    ids = torch.cat(parts).long()
    return ids, key, length - len(answer)


def _bytes(data: bytes) -> torch.Tensor:
    return torch.frombuffer(bytearray(data), dtype=torch.uint8)


class Batches:
    """Deterministic training batches by step: random windows of the training stream, `passkey_share` passkey rows."""

    def __init__(self, stream: torch.Tensor, seq: int, rows: int, seed: int, device, passkey_share=PASSKEY_SHARE):
        self.stream, self.seq, self.rows, self.seed, self.device = stream, seq, rows, seed, device
        self.passkey_share = passkey_share

    def __call__(self, step: int) -> torch.Tensor:
        rng = random.Random(self.seed * 1_000_003 + step)
        out = []
        for _ in range(self.rows):
            if rng.random() < self.passkey_share:
                out.append(passkey_document(self.stream, self.seq, rng)[0])
            else:
                start = rng.randrange(len(self.stream) - self.seq)
                out.append(self.stream[start : start + self.seq].long())
        return torch.stack(out).to(self.device, non_blocking=True)


# ------------------------------------------------------------------------------------------------------ training

def flops_per_token(cfg, seq: int, attention: str, train: bool = True) -> float:
    """Matmul FLOPs per token: 2N per pass (N: projection and MLP weights) plus attention over the keys each sees."""
    m = cfg["model"]
    d, layers, kv = m["hidden_size"], m["num_hidden_layers"], m["num_key_value_heads"] * m["head_dim"]
    attn_dim = m["num_attention_heads"] * m["head_dim"]
    n = layers * (d * attn_dim * 2 + d * kv * 2 + 3 * d * m["intermediate_size"]) + d * m["vocab_size"]
    if attention == "dense":
        keys = seq / 2
    else:
        s = cfg["nsa"]
        keys = seq / 2 / s["compress_stride"] + s["num_selected_blocks"] * s["select_block_size"] + s["window_size"]
        keys = min(keys, seq / 2) * 2  # the NSA kernels run at about half the dense kernels' efficiency
    per_pass = 2 * n + layers * 4 * attn_dim * keys
    return per_pass * (3 if train else 1)


class Clock:
    """The command's deadline, and the speed (FLOP/s) measured so far, to decide whether a phase still fits."""

    def __init__(self, minutes: float, log):
        self.end = time.time() + minutes * 60
        self.flops_per_s = 0.35 * 790e12 if torch.cuda.is_available() else 2e10
        self.log = log

    def left(self) -> float:
        return self.end - time.time()

    def fits(self, name: str, flops: float, extra_s: float = 0.0) -> bool:
        need = flops / self.flops_per_s + extra_s
        if need > self.left():
            self.log(f"{name}: needs ~{need:.0f} s, {self.left():.0f} s left: stopping here (rerun with --resume)")
            return False
        self.log(f"{name}: expected ~{need:.0f} s ({self.left():.0f} s left)")
        return True

    def measured(self, flops: float, seconds: float) -> None:
        if seconds > 1:
            self.flops_per_s = flops / seconds


def train(model, batches: Batches, steps: int, lr: float, params, log, clock: Clock, flops_per_step: float,
          first_step: int = 0, warmup: int = 100, alignment_weight: float = 0.0, time_box_s: float | None = None,
          weight_decay: float = 0.1, alignment_max_position: int | None = None) -> int:
    """
    AdamW with linear warm-up and cosine decay to 10% over `steps`, on the batches `first_step, first_step + 1, ...`
    (so that a second stage continues the first one's data). `time_box_s`: at step 30, cut `steps` to what fits the
    box at the speed of steps 10-30 (the schedule follows). Returns the number of steps run.
    """
    device = next(model.parameters()).device
    params = [p for p in params if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.95), weight_decay=weight_decay,
                                  fused=device.type == "cuda")
    model.train()
    start = time.time()
    step = 0
    while step < steps:
        scale = (step + 1) / warmup if step < warmup else 0.1 + 0.45 * (1 + math.cos(math.pi * (step - warmup) /
                                                                                  max(1, steps - warmup)))
        for group in optimizer.param_groups:
            group["lr"] = lr * min(scale, 1.0)
        ids = batches(first_step + step)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            if alignment_weight:
                alignment, outputs = selection_alignment_loss(model, ids, labels=ids, return_outputs=True,
                                                              max_query_position=alignment_max_position)
                loss = outputs.loss + alignment_weight * alignment
            else:
                alignment, loss = None, model(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        if time_box_s is not None and step in (10, 30):
            # steps 10-30 set the pace: the first ones carry compilation and autotuning (3x the steady step)
            if device.type == "cuda":
                torch.cuda.synchronize()
            if step == 10:
                paced_from = time.time()
            else:
                per_step = (time.time() - paced_from) / 20
                steps = max(30, min(steps, 30 + int((time_box_s - (time.time() - start)) / per_step)))
                log(f"  {per_step * 1000:.0f} ms/step: {steps} steps fit the time box")
        if step % 20 == 0 or step == steps:
            elapsed = time.time() - start
            extra = f", alignment {alignment.item():.4f}" if alignment is not None else ""
            log(f"  step {step}/{steps}: loss {outputs.loss.item() if alignment is not None else loss.item():.4f}"
                f"{extra}, {step * ids.numel() / elapsed / 1e6:.2f}M tokens/s")
    if device.type == "cuda":
        torch.cuda.synchronize()
    clock.measured(flops_per_step * steps, time.time() - start)
    return steps


# ---------------------------------------------------------------------------------------------------- evaluation

@torch.no_grad()
def evaluate(model, held_out: torch.Tensor, cfg, log) -> dict:
    """Held-out loss by position bucket and passkey accuracy by length."""
    model.eval()
    device = next(model.parameters()).device
    rng = random.Random(1234)
    seq = cfg["eval_seq"]
    sums = torch.zeros(seq - 1, dtype=torch.float64)
    for _ in range(cfg["eval_seqs"]):
        start = rng.randrange(len(held_out) - seq)
        ids = held_out[start : start + seq].long().to(device)[None]
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            logits = model(input_ids=ids, use_cache=False).logits
        sums += F.cross_entropy(logits[0, :-1].float(), ids[0, 1:], reduction="none").double().cpu()
    per_position = sums / cfg["eval_seqs"]  # index i: the loss of predicting position i + 1
    buckets = {name: round(per_position[lo - 1 : hi].mean().item(), 4) for lo, hi, name in cfg["buckets"]
               if hi <= seq}
    passkey = {}
    for length in cfg["passkey_lengths"]:
        rng = random.Random(length)
        right = 0
        for trial in range(cfg["passkey_trials"]):
            ids, key, at = passkey_document(held_out, length, rng, depth=(trial + 0.5) / cfg["passkey_trials"])
            ids = ids.to(device)[None]
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                # the logits at positions at - 1 .. end: their first len(key) predict the answer's digits
                logits = model(input_ids=ids, use_cache=False, logits_to_keep=ids.shape[1] - at + 1).logits
            predicted = logits[0, : len(key)].argmax(-1)
            right += int(torch.equal(predicted, ids[0, at : at + len(key)]))
        passkey[str(length)] = right / cfg["passkey_trials"]
    log(f"  loss by bucket {buckets}, passkey {passkey}")
    return dict(loss_by_bucket=buckets, passkey=passkey)


# ---------------------------------------------------------------------------------------------------- experiment

class Experiment:
    def __init__(self, args, cfg):
        self.args, self.cfg = args, cfg
        self.out = Path(args.out_dir)
        self.out.mkdir(parents=True, exist_ok=True)
        self.work = Path(args.work_dir)
        self.work.mkdir(parents=True, exist_ok=True)
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        gpu = torch.cuda.get_device_name().split()[-1].lower() if self.device.type == "cuda" else "cpu"
        self.name = f"quality_{gpu}"
        self.log_path = self.out / "quality_log.txt"
        self.clock = Clock(args.deadline_minutes, self.log)
        self.results = {"meta": {}, "rows": []}
        if args.results and Path(args.results).is_file():
            self.results = json.loads(Path(args.results).read_text())
        self.results["meta"].update(self._meta())
        self.train_stream = self.held_out = None

    def _meta(self) -> dict:
        import transformers

        cfg = self.cfg
        return dict(device=torch.cuda.get_device_name() if self.device.type == "cuda" else "cpu",
                    torch=torch.__version__, transformers=transformers.__version__, smoke=self.args.smoke,
                    model=cfg["model"], nsa=cfg["nsa"], continued_seq=cfg["seq"], rows_per_step=cfg["rows"],
                    stage1_tokens=cfg["stage1_tokens"], stage2_tokens=cfg["stage2_tokens"],
                    passkey_share=PASSKEY_SHARE, pretrain_passkey_share=PRETRAIN_PASSKEY_SHARE,
                    alignment_weight=ALIGNMENT_WEIGHT, alignment_max_position=cfg["pretrain_seq"], lr=cfg["lr"],
                    stage1_lr=cfg["stage1_lr"], passkey_trials=cfg["passkey_trials"])

    def log(self, message: str) -> None:
        line = f"[{time.strftime('%H:%M:%S')}] {message}"
        print(line, flush=True)
        with open(self.log_path, "a", encoding="utf-8") as f:
            f.write(line + "\n")

    def has(self, model: str, stage: str) -> bool:
        return any(r["model"] == model and r["stage"] == stage for r in self.results["rows"])

    def record(self, model: str, stage: str, attention: str, tokens: int, result: dict, **extra) -> None:
        self.results["rows"] = [r for r in self.results["rows"] if not (r["model"] == model and r["stage"] == stage)]
        self.results["rows"].append(dict(model=model, stage=stage, attention=attention, tokens_trained=tokens,
                                         **result, **extra))
        (self.out / f"{self.name}.json").write_text(json.dumps(self.results, indent=1) + "\n")

    # -- the phases, in order

    def corpus(self) -> None:
        start = time.time()
        self.train_stream, self.held_out, packages = build_corpus(self.cfg["corpus_bytes"])
        self.results["meta"]["corpus"] = dict(packages=packages, train_bytes=len(self.train_stream),
                                              held_out_bytes=len(self.held_out))
        self.log(f"corpus: {len(self.train_stream) / 1e6:.1f} MB train, {len(self.held_out) / 1e6:.1f} MB held out "
                 f"from {len(packages)} packages ({time.time() - start:.0f} s)")

    def source_dir(self) -> Path:
        return Path(self.args.source) if self.args.source else self.work / "source"

    def pretrain(self) -> None:
        from transformers import LlamaConfig, LlamaForCausalLM

        cfg = self.cfg
        if (self.source_dir() / "config.json").is_file() and self.args.resume:
            self.log(f"pretrain: {self.source_dir()} exists, kept")
            return
        torch.manual_seed(0)
        model = LlamaForCausalLM(LlamaConfig(**cfg["model"])).to(self.device)
        model.config._attn_implementation = "sdpa"
        batches = Batches(self.train_stream, cfg["pretrain_seq"], cfg["pretrain_rows"], seed=0, device=self.device,
                          passkey_share=PRETRAIN_PASSKEY_SHARE)
        tokens_per_step = cfg["pretrain_seq"] * cfg["pretrain_rows"]
        box = min(cfg["pretrain_minutes"] * 60, self.clock.left() - self.args.reserve_s)
        self.log(f"pretrain: {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters, "
                 f"{cfg['pretrain_seq']}-token rows, time box {box:.0f} s")
        steps = train(model, batches, cfg["pretrain_tokens"] // tokens_per_step, cfg["pretrain_lr"],
                      model.parameters(), self.log, self.clock,
                      flops_per_token(cfg, cfg["pretrain_seq"], "dense") * tokens_per_step,
                      warmup=cfg["warmup_steps"], time_box_s=box)
        self.results["meta"]["pretrain_tokens"] = steps * tokens_per_step
        self.save_source(model)

    def save_source(self, model) -> None:
        """bf16 shards of at most 16 MB (16e6 bytes: what comes back from a device call), config and index: 5 files."""
        folder = self.source_dir()
        if folder.exists():
            shutil.rmtree(folder)
        model.to(torch.bfloat16).save_pretrained(folder, max_shard_size="16MB")
        (folder / "generation_config.json").unlink(missing_ok=True)
        travel = self.out / "source"
        if travel.resolve() != folder.resolve():
            shutil.copytree(folder, travel, dirs_exist_ok=True)
        self.log(f"pretrain: saved {folder} ({sum(p.stat().st_size for p in folder.iterdir()) / 1e6:.1f} MB)")

    def converted(self, nsa_init: str) -> Path:
        folder = self.work / f"nsa-{nsa_init}"
        if not (folder / "config.json").is_file():
            convert_checkpoint(self.source_dir(), folder, nsa_init=nsa_init, overwrite=True, **self.cfg["nsa"])
        return folder

    def load(self, folder: Path, attention: str):
        from transformers import AutoModelForCausalLM

        import nsa_hf  # noqa: F401

        kwargs = {"attn_implementation": "sdpa"} if attention == "dense" else {}
        return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, **kwargs).to(self.device)

    def eval_flops(self, attention: str) -> float:
        cfg = self.cfg
        passkey = sum(cfg["passkey_trials"] * n * flops_per_token(cfg, n, attention, train=False)
                      for n in cfg["passkey_lengths"])
        return cfg["eval_seqs"] * cfg["eval_seq"] * flops_per_token(cfg, cfg["eval_seq"], attention, False) + passkey

    def evaluated(self, model_name, stage, attention, folder_or_model, tokens=0, **extra) -> bool:
        if self.args.resume and self.has(model_name, stage):
            return True
        if not self.clock.fits(f"evaluate {model_name} / {stage}", self.eval_flops(attention), extra_s=5):
            return False
        model = self.load(folder_or_model, attention) if isinstance(folder_or_model, Path) else folder_or_model
        start = time.time()
        self.log(f"evaluate {model_name} / {stage} ({attention})")
        result = self.evaluate(model)
        self.record(model_name, stage, attention, tokens, result, eval_s=round(time.time() - start, 1), **extra)
        return True

    def evaluate(self, model) -> dict:
        return evaluate(model, self.held_out, self.cfg, self.log)

    def baseline(self) -> bool:
        recipe, naive = self.converted("dense"), self.converted("uniform")
        return (self.evaluated("source", "pretrained", "dense", self.source_dir())
                and self.evaluated("nsa-recipe", "converted (dense mode)", "dense", recipe)
                and self.evaluated("nsa-recipe", "converted", "nsa", recipe)
                and self.evaluated("nsa-naive", "converted", "nsa", naive))

    def steps(self, tokens: int) -> int:
        return max(1, tokens // (self.cfg["seq"] * self.cfg["rows"]))

    def batches(self) -> Batches:  # one data order for every continued-training run
        return Batches(self.train_stream, self.cfg["seq"], self.cfg["rows"], seed=1, device=self.device)

    def continued(self, name: str, stage: str, attention: str, model, steps: int, lr: float, params, first_step=0,
                  alignment_weight=0.0, weight_decay=0.1, alignment_max_position=None) -> bool:
        cfg = self.cfg
        tokens_per_step = cfg["seq"] * cfg["rows"]
        flops = flops_per_token(cfg, cfg["seq"], attention) * tokens_per_step
        if not self.clock.fits(f"{name} / {stage}: {steps} steps", flops * steps + self.eval_flops(attention),
                               extra_s=10):
            return False
        self.log(f"{name} / {stage}: {steps} steps of {cfg['rows']} x {cfg['seq']} tokens, lr {lr}")
        start = time.time()
        train(model, self.batches(), steps, lr, params, self.log, self.clock, flops, first_step=first_step,
              warmup=min(cfg["warmup_steps"], max(1, steps // 10)), alignment_weight=alignment_weight,
              weight_decay=weight_decay, alignment_max_position=alignment_max_position)
        train_s = time.time() - start
        tokens = (first_step + steps) * tokens_per_step
        return self.evaluated(name, stage, attention, model, tokens, train_s=round(train_s, 1))

    def stage1(self) -> bool:
        s1 = self.steps(self.cfg["stage1_tokens"])
        if self.args.resume and self.has("nsa-recipe", "stage 1") and self.stage1_path().is_file():
            return True
        model = self.load(self.converted("dense"), "nsa")
        trainable = freeze_all_but_nsa(model)
        done = self.continued("nsa-recipe", "stage 1", "nsa", model, s1, self.cfg["stage1_lr"], trainable.values(),
                              alignment_weight=ALIGNMENT_WEIGHT, weight_decay=0.0,
                              alignment_max_position=self.cfg["pretrain_seq"])
        if done:
            from safetensors.torch import save_file

            save_file({n: p.detach().to(torch.bfloat16).cpu().contiguous() for n, p in trainable.items()},
                      self.stage1_path())
            if self.stage1_path().resolve() != (self.out / "stage1_nsa.safetensors").resolve():
                shutil.copyfile(self.stage1_path(), self.out / "stage1_nsa.safetensors")
        return done

    def stage1_path(self) -> Path:
        return Path(self.args.stage1) if self.args.stage1 else self.work / "stage1_nsa.safetensors"

    def stage2(self) -> bool:
        from safetensors.torch import load_file

        if self.args.resume and self.has("nsa-recipe", "stage 2"):
            return True
        s1, s2 = self.steps(self.cfg["stage1_tokens"]), self.steps(self.cfg["stage2_tokens"])
        model = self.load(self.converted("dense"), "nsa")
        stage1 = load_file(self.stage1_path())
        if set(stage1) != set(nsa_parameters(model)):
            raise ValueError(f"{self.stage1_path()} does not hold this model's NSA parameters")
        model.load_state_dict(stage1, strict=False)
        # stage 2 continues the data after stage 1's, with a schedule (and optimizer) of its own
        return self.continued("nsa-recipe", "stage 2", "nsa", model, s2, self.cfg["lr"], model.parameters(),
                              first_step=s1)

    def naive(self) -> bool:
        if self.args.resume and self.has("nsa-naive", "continued"):
            return True
        steps = self.steps(self.cfg["stage1_tokens"]) + self.steps(self.cfg["stage2_tokens"])
        model = self.load(self.converted("uniform"), "nsa")
        return self.continued("nsa-naive", "continued", "nsa", model, steps, self.cfg["lr"], model.parameters())

    def dense_twin(self) -> bool:
        if self.args.resume and self.has("dense-twin", "continued"):
            return True
        steps = self.steps(self.cfg["stage1_tokens"]) + self.steps(self.cfg["stage2_tokens"])
        model = self.load(self.source_dir(), "dense")
        return self.continued("dense-twin", "continued", "dense", model, steps, self.cfg["lr"], model.parameters())

    def plot(self) -> None:
        plot_results(self.results, self.out / f"{self.name}.png")
        self.log(f"plot: {self.out / self.name}.png")

    def run(self, phases) -> None:
        self.log(f"phases {' '.join(phases)} on {self.device}; deadline in {self.clock.left() / 60:.1f} min")
        for phase in phases:
            if phase != "corpus" and phase != "plot" and self.train_stream is None:
                self.corpus()
            done = getattr(self, phase.replace("-", "_"))()
            if done is False:
                break
        self.log(f"done; results {self.out / self.name}.json")


def plot_results(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = results["rows"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 4.8))
    for row in rows:
        label = f"{row['model']} / {row['stage']} ({row['tokens_trained'] / 1e6:.0f}M)"
        buckets = list(row["loss_by_bucket"])
        left.plot(buckets, list(row["loss_by_bucket"].values()), marker="o", label=label)
        lengths = [int(n) for n in row["passkey"]]
        right.plot(lengths, list(row["passkey"].values()), marker="o", label=label)
    left.set(title="held-out loss by position", xlabel="positions", ylabel="loss (nats / byte)")
    right.set(title="passkey accuracy", xlabel="context (tokens)", ylabel="accuracy", ylim=(-0.05, 1.05))
    right.set_xscale("log", base=2)
    right.set_xticks(lengths, [f"{n // 1024}k" if n >= 1024 else str(n) for n in lengths])
    left.legend(fontsize=7)
    meta = results.get("meta", {})
    fig.suptitle(f"Dense -> NSA conversion, {meta.get('device', '')}: recipe vs naive vs dense twin")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--phases", nargs="+", default=list(PHASES), choices=PHASES)
    parser.add_argument("--smoke", action="store_true", help="tiny sizes for a CPU check (a minute)")
    parser.add_argument("--out-dir", default=os.environ.get("OUT", "benchmarks/results"),
                        help="results, plot, log and what travels between calls (default: $OUT)")
    parser.add_argument("--work-dir", default="/tmp/nsa_quality_work",
                        help="checkpoints and conversions (default: /tmp/nsa_quality_work)")
    parser.add_argument("--source", default=None, help="the pretrained dense checkpoint (default: <work-dir>/source)")
    parser.add_argument("--stage1", default=None, help="stage-1 NSA parameters (default: <work-dir>/stage1_nsa...)")
    parser.add_argument("--results", default=None, help="earlier results to extend (default: none)")
    parser.add_argument("--resume", action="store_true", help="skip the rows the results already have")
    parser.add_argument("--deadline-minutes", type=float, default=9.5,
                        help="stop before a phase that would end after this (default: 9.5)")
    parser.add_argument("--reserve-s", type=float, default=150,
                        help="seconds the pretrain time box leaves for the phases after it (default: 150)")
    args = parser.parse_args(argv)
    cfg = SMOKE if args.smoke else FULL
    torch.backends.cuda.matmul.allow_tf32 = True
    Experiment(args, cfg).run(args.phases)


if __name__ == "__main__":
    main()
