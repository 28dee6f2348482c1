"""
Training-step benchmark of the whole model, side by side in one run: the 1.1B NSA model (hidden 2048, 16 layers,
32q/8kv, head dim 64, the paper's NSA settings) against its dense twin (the same weights, attn_implementation="sdpa"),
one sequence of `seqlen` tokens per step, bf16 weights, AdamW, gradient checkpointing on; optionally (`--compile`)
both again under `torch.compile` (inductor, static shapes, one compilation per length).

A step is forward + backward + optimizer step; its tokens/s are timed over `--steps` steps after `--warmup` steps, and
peak memory is the most the step allocates on the GPU.

    python benchmarks/bench_model_training.py                      # 4k-64k, eager
    python benchmarks/bench_model_training.py --compile            # and compiled
    python benchmarks/bench_model_training.py --tiny --seqlens 128 256 --steps 2   # a small model, also on CPU

Prints one line per case and writes benchmarks/results/model_training_<gpu>.json: rows with `seqlen`,
`nsa_tokens_per_s`, `dense_tokens_per_s`, `speedup` (dense time / NSA time), peak memory, and with `--compile` the
same for the compiled models plus what compile gained each.
"""

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.bench_decode import MODEL, meta  # noqa: E402

TINY = dict(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=32, max_position_embeddings=8192, pad_token_id=0, bos_token_id=None,
            eos_token_id=None, compress_block_size=16, compress_stride=8, select_block_size=32, num_selected_blocks=4,
            window_size=64)


def build_models(sizes: dict, device, dtype):
    """The NSA model and its dense twin, each with a config object of its own (from_config keeps the one it gets)."""
    from nsa_hf import NSAConfig, NSAForCausalLM

    torch.manual_seed(0)
    with torch.device(device):
        nsa = NSAForCausalLM(NSAConfig(**sizes)).to(dtype)
        dense = NSAForCausalLM._from_config(NSAConfig(**sizes), attn_implementation="sdpa").to(dtype)
    dense.load_state_dict(nsa.state_dict())
    for model in (nsa, dense):
        model.train()
        # transformers 5.24 renamed `gradient_checkpointing_enable` (a deprecated alias now)
        getattr(model, "activation_checkpointing_enable", model.gradient_checkpointing_enable)()
    return {"nsa": nsa, "dense": dense}


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_steps(model, ids, steps: int, warmup: int, compile_backend: str | None) -> dict:
    """tokens/s of forward + backward + AdamW over `steps` steps after `warmup`, the first step's seconds, peak GB."""
    device = ids.device
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, foreach=True)
    run = model if compile_backend is None else torch.compile(model, backend=compile_backend, dynamic=False)

    def step():
        loss = run(input_ids=ids, labels=ids, use_cache=False).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    _sync(device)
    start = time.perf_counter()
    step()
    _sync(device)
    first = time.perf_counter() - start
    for _ in range(warmup - 1):
        step()
    _sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    _sync(device)
    elapsed = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None
    return dict(tokens_per_s=ids.numel() * steps / elapsed, step_s=elapsed / steps, first_step_s=first, peak_gb=peak)


def profile_step(model, ids, seqlen: int, out_dir: str, rows: int = 40) -> None:
    """One eager forward + backward of `model` under torch.profiler: the ops by device time, to out_dir."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if ids.is_cuda else [])
    with profile(activities=activities) as prof:
        model(input_ids=ids, labels=ids, use_cache=False).loss.backward()
        _sync(ids.device)
    model.zero_grad(set_to_none=True)
    sort = "self_cuda_time_total" if ids.is_cuda else "self_cpu_time_total"
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, f"profile_model_{seqlen}.txt"), "w") as f:
        f.write(prof.key_averages().table(sort_by=sort, row_limit=rows, max_name_column_width=60))


def run_case(models, seqlen: int, args, device) -> dict:
    row = dict(seqlen=seqlen, batch=1)
    ids = torch.randint(1, models["nsa"].config.vocab_size, (1, seqlen), device=device)
    compiled = args.compile and (not args.compile_seqlens or seqlen in args.compile_seqlens)
    variants = [("", None)] + ([("compiled_", args.compile_backend)] if compiled else [])
    for prefix, backend in variants:
        for name, model in models.items():
            key = f"{name}_{prefix}"
            try:
                result = time_steps(model, ids, args.steps, args.warmup, backend)
                row.update({f"{key}{k}": v for k, v in result.items()})
            except torch.OutOfMemoryError:
                row[f"{key}error"] = "out of memory"
            except Exception as err:  # keep the other cases; say what failed
                row[f"{key}error"] = f"{type(err).__name__}: {str(err).splitlines()[0][:300]}"
            finally:
                torch._dynamo.reset()
                if device.type == "cuda":
                    torch.cuda.empty_cache()
        if f"nsa_{prefix}tokens_per_s" in row and f"dense_{prefix}tokens_per_s" in row:
            row[f"speedup{'_' + prefix[:-1] if prefix else ''}"] = (
                row[f"nsa_{prefix}tokens_per_s"] / row[f"dense_{prefix}tokens_per_s"])
    if args.profile:
        profile_step(models["nsa"], ids, seqlen, args.profile)
    if compiled:
        for name in models:
            if f"{name}_compiled_tokens_per_s" in row and f"{name}_tokens_per_s" in row:
                row[f"{name}_compile_gain"] = row[f"{name}_compiled_tokens_per_s"] / row[f"{name}_tokens_per_s"]
    return row


def describe(row) -> str:
    parts = [f"T={row['seqlen']:6d}"]
    for key in ("nsa_", "dense_", "nsa_compiled_", "dense_compiled_"):
        if f"{key}tokens_per_s" in row:
            peak = row[f"{key}peak_gb"]
            parts.append(f"{key[:-1]} {row[f'{key}tokens_per_s']:.0f} tok/s" + (f" {peak:.1f} GB" if peak else ""))
        elif f"{key}error" in row:
            parts.append(f"{key[:-1]} FAILED ({row[f'{key}error']})")
    for key in ("speedup", "speedup_compiled", "nsa_compile_gain", "dense_compile_gain"):
        if key in row:
            parts.append(f"{key} {row[key]:.2f}x")
    return "  ".join(parts)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seqlens", nargs="+", type=int, default=[4096, 8192, 16384, 32768, 65536])
    parser.add_argument("--steps", type=int, default=5, help="timed steps per case (default: 5)")
    parser.add_argument("--warmup", type=int, default=2, help="steps before timing, the first included (default: 2)")
    parser.add_argument("--compile", action="store_true", help="also time both models under torch.compile")
    parser.add_argument("--compile-seqlens", nargs="+", type=int, default=None,
                        help="the lengths --compile times (default: all of --seqlens)")
    parser.add_argument("--profile", metavar="DIR", default=None,
                        help="also profile one NSA step per length (torch.profiler): DIR/profile_model_<seqlen>.txt")
    parser.add_argument("--compile-backend", default="inductor", help="torch.compile backend (default: inductor)")
    parser.add_argument("--tiny", action="store_true", help="a 2-layer model instead of the 1.1B one (CPU works)")
    parser.add_argument("--out", help="JSON path (default: benchmarks/results/model_training_<gpu>.json)")
    return parser


def main(argv=None) -> list[dict]:
    args = build_parser().parse_args(argv)
    if args.steps < 1 or args.warmup < 1:
        raise SystemExit("error: --steps and --warmup must be at least 1")
    cuda = torch.cuda.is_available()
    if not cuda and not args.tiny:
        raise SystemExit("error: the 1.1B benchmark needs a GPU (--tiny runs a small model anywhere)")
    device = torch.device("cuda" if cuda else "cpu")
    gpu = torch.cuda.get_device_name().split()[-1].lower() if cuda else "cpu"
    out = args.out or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                   f"model_training_{gpu}.json")
    models = build_models(TINY if args.tiny else MODEL, device, torch.bfloat16 if cuda else torch.float32)
    info = dict(meta() if cuda else {}, model="tiny" if args.tiny else "1.1B-32q8kv-d64", batch=1,
                gradient_checkpointing=True, optimizer="AdamW", steps=args.steps, warmup=args.warmup,
                compile_backend=args.compile_backend if args.compile else None)
    rows = []
    for seqlen in args.seqlens:
        rows.append(run_case(models, seqlen, args, device))
        print(describe(rows[-1]), flush=True)
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        with open(out, "w") as f:  # after every case, so that a run cut short keeps what it measured
            json.dump(dict(meta=info, results=rows), f, indent=1)
    print(f"wrote {out}")
    return rows


if __name__ == "__main__":
    main()
