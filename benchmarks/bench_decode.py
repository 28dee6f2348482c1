"""
Decoding benchmark, side by side in one run on one GPU:

- `kernel`: one attention decode step (`nsa_decode`: compressed + selected + window + gates, against a cache of
  `cache_len` tokens per row) vs dense SDPA over the whole cache, both captured in CUDA graphs and, for reference,
  eager. Several layers' caches are cycled so that the timing does not sit in L2 (a model reads a new layer's
  cache at every step).
- `model`: a 1.1B NSA model (hidden 2048, 16 layers, 32q/8kv, head dim 64) vs its dense twin (same weights,
  attn_implementation="sdpa"): decode ms/token after a long prompt with `generate()`, static caches compiled by
  generate (transformers' own path) and dynamic caches eager; tokens/s at batch 16.
- `coldstart`: prefill seconds at prompt lengths never seen before, first call vs second call, the number of
  Triton compilations each first call triggered, and the autotuner's tunings (kernel, candidates, seconds).

    python benchmarks/bench_decode.py --parts kernel model coldstart

Prints tables and writes benchmarks/results/decode_<gpu>.json (plot: benchmarks/plot_decode.py).
"""

import argparse
import cProfile
import io
import json
import math
import os
import platform
import pstats
import sys
import time
from datetime import datetime, timezone

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from nsa_hf.kernels import nsa_decode, num_compressed_blocks  # noqa: E402

PAPER = dict(compress_block_size=32, compress_stride=16, select_block_size=64, num_selected_blocks=16, window_size=512)
LAYOUTS = {"paper": (64, 4, 128), "llama3-8b": (32, 8, 128)}  # (query heads, kv heads, head dim)
L2_BYTES = 60 * 2**20


def graph_ms(fn, reps=20):
    """Median ms of one `fn()` replayed from a CUDA graph (captured after a warm-up on a side stream)."""
    from triton.testing import do_bench_cudagraph

    return do_bench_cudagraph(fn, rep=reps * 10, return_mode="median")


def eager_ms(fn):
    from triton.testing import do_bench

    return do_bench(fn, warmup=50, rep=200, return_mode="median")


def kernel_cases(args):
    rows = []
    for layout in args.layouts:
        HQ, HKV, D = LAYOUTS[layout]
        for cache_len in args.cache_lens:
            for batch in args.batches:
                if args.isolate:  # one process per case: a clean CUDA context and allocator for each
                    rows.append(isolated_case(layout, cache_len, batch))
                else:
                    rows.append(kernel_case(layout, HQ, HKV, D, cache_len, batch))
                r = rows[-1]
                if "error" in r:
                    print(f"{layout:10s} T={cache_len:6d} B={batch:2d}  FAILED: {r['error']}", flush=True)
                    continue
                print(f"{layout:10s} T={cache_len:6d} B={batch:2d}  nsa {r['ours_ms']:.4f} ms (eager {r['ours_eager_ms']:.3f})"
                      f"  dense {r['dense_ms']:.4f} ms (eager {r['dense_eager_ms']:.3f})  {r['speedup_vs_dense']:.2f}x",
                      flush=True)
    return rows


def isolated_case(layout, cache_len, batch):
    import subprocess
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "case.json")
        cmd = [sys.executable, os.path.abspath(__file__), "--parts", "kernel", "--no-isolate", "--layouts", layout,
               "--cache-lens", str(cache_len), "--batches", str(batch), "--out", out]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            return dict(case="attention_decode_step", layout=layout, batch=batch, cache_len=cache_len,
                        error=(done.stderr.strip().splitlines() or ["?"])[-1])
        with open(out) as f:
            return json.load(f)["results"][0]


def kernel_case(layout, HQ, HKV, D, cache_len, batch, dtype=torch.bfloat16):
    s = PAPER
    ncmp = num_compressed_blocks(cache_len, s["compress_block_size"], s["compress_stride"])
    raw_bytes = 2 * batch * cache_len * HKV * D * 2
    layers = max(2, min(16, math.ceil(4 * L2_BYTES / raw_bytes)))
    g = torch.Generator(device="cuda").manual_seed(0)

    def rnd(*shape):
        return torch.randn(*shape, device="cuda", dtype=dtype, generator=g)

    caches = [dict(k=rnd(batch, cache_len, HKV, D), v=rnd(batch, cache_len, HKV, D),
                   k_cmp=rnd(batch, ncmp, HKV, D), v_cmp=rnd(batch, ncmp, HKV, D)) for _ in range(layers)]
    q = rnd(batch, 1, HQ, D)
    gates = torch.rand(batch, 1, HQ, 3, device="cuda", dtype=dtype, generator=g)
    pos = torch.full((batch, 1), cache_len - 1, dtype=torch.int32, device="cuda")

    def ours():
        for c in caches:
            nsa_decode(q, c["k"], c["v"], c["k_cmp"], c["v_cmp"], gates, pos, **s)

    # dense: SDPA's [batch, heads, seq, dim] layout, native GQA; views of the same caches
    qd = q.transpose(1, 2)
    dense_kv = [(c["k"].transpose(1, 2), c["v"].transpose(1, 2)) for c in caches]

    def dense():
        for k, v in dense_kv:
            F.scaled_dot_product_attention(qd, k, v, enable_gqa=True)

    ours_ms, dense_ms = graph_ms(ours) / layers, graph_ms(dense) / layers
    ours_eager, dense_eager = eager_ms(ours) / layers, eager_ms(dense) / layers
    bytes_dense = raw_bytes
    bytes_nsa = 2 * batch * HKV * D * 2 * (ncmp + s["num_selected_blocks"] * s["select_block_size"] + s["window_size"])
    del caches
    torch.cuda.empty_cache()
    return dict(case="attention_decode_step", layout=layout, batch=batch, cache_len=cache_len, heads=HQ,
                kv_heads=HKV, head_dim=D, layers_cycled=layers, ours_ms=ours_ms, dense_ms=dense_ms,
                speedup_vs_dense=dense_ms / ours_ms, ours_eager_ms=ours_eager, dense_eager_ms=dense_eager,
                ours_bytes=bytes_nsa, dense_bytes=bytes_dense,
                ours_tb_per_s=bytes_nsa / ours_ms / 1e9, dense_tb_per_s=bytes_dense / dense_ms / 1e9)


MODEL = dict(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=16, num_attention_heads=32,
             num_key_value_heads=8, head_dim=64, max_position_embeddings=131072, pad_token_id=0, bos_token_id=None,
             eos_token_id=None, **PAPER)


def _models():
    """The 1.1B NSA model and its dense twin (same weights, each with its own config object)."""
    from nsa_hf import NSAConfig, NSAForCausalLM

    torch.manual_seed(0)
    with torch.device("cuda"):
        nsa = NSAForCausalLM(NSAConfig(**MODEL)).to(torch.bfloat16).eval()
        dense = NSAForCausalLM._from_config(NSAConfig(**MODEL), attn_implementation="sdpa").to(torch.bfloat16).eval()
    dense.load_state_dict(nsa.state_dict())
    return {"nsa": nsa, "dense": dense}


def _generate_s(model, ids, new_tokens, cache, max_cache_len):
    kwargs = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
    if cache == "static":
        kwargs.update(cache_implementation="static", max_cache_len=max_cache_len)
    torch.cuda.synchronize()
    start = time.perf_counter()
    model.generate(ids, attention_mask=torch.ones_like(ids), **kwargs)
    torch.cuda.synchronize()
    return time.perf_counter() - start


def model_cases(args, log, emit):
    """Decode ms/token of generate() after a long prompt: the difference of two runs of n1 and n2 new tokens."""
    models = _models()
    n1, n2 = 8, 8 + args.decode_tokens
    for batch, prompt in args.model_cases:
        ids = torch.randint(1, MODEL["vocab_size"], (batch, prompt), device="cuda")
        row = dict(case="model_decode", model="1.1B-32q8kv-d64", batch=batch, prompt_len=prompt, cache_len=prompt)
        for name, model in models.items():
            static = f"{batch}x{prompt}" in args.static_cases
            for cache in ("static", "dynamic") if static else ("dynamic",):
                key = f"{name}_{cache}"
                try:
                    first = _generate_s(model, ids, n1, cache, max(args.max_cache_len, prompt + n2))  # compiles
                    t1 = _generate_s(model, ids, n1, cache, max(args.max_cache_len, prompt + n2))
                    t2 = _generate_s(model, ids, n2, cache, max(args.max_cache_len, prompt + n2))
                    row[f"{key}_ms_per_token"] = (t2 - t1) / (n2 - n1) * 1000
                    row[f"{key}_first_call_s"] = first
                    row[f"{key}_tokens_per_s"] = batch * (n2 - n1) / (t2 - t1)
                except Exception as err:  # keep the other rows; say what failed
                    row[f"{key}_error"] = f"{type(err).__name__}: {str(err).splitlines()[0][:300]}"
                log(f"  {key:14s} B={batch} prompt={prompt}: " + ", ".join(
                    f"{k[len(key) + 1:]}={v:.3f}" if isinstance(v, float) else f"{k[len(key) + 1:]}={v}"
                    for k, v in row.items() if k.startswith(key)))
                torch._dynamo.reset()
                torch.cuda.empty_cache()
        for cache in ("static", "dynamic"):
            if f"nsa_{cache}_ms_per_token" in row and f"dense_{cache}_ms_per_token" in row:
                row[f"speedup_{cache}"] = row[f"dense_{cache}_ms_per_token"] / row[f"nsa_{cache}_ms_per_token"]
        if "nsa_static_ms_per_token" in row:
            row["ours_ms"] = row["nsa_static_ms_per_token"]
            row["dense_ms"] = row.get("dense_static_ms_per_token")
            row["speedup_vs_dense"] = row.get("speedup_static")
        emit(row)


def coldstart_cases(args, log, emit):
    """Prefill seconds at prompt lengths not seen before (first call) and again (second call), Triton compilations."""
    import triton

    from nsa_hf import NSAConfig, NSAForCausalLM

    from triton.runtime.autotuner import Autotuner

    compiles, tunings = [], []
    triton.knobs.runtime.jit_post_compile_hook = lambda *a, **k: compiles.append(getattr(k.get("fn"), "name", "?"))
    check_disk_cache = Autotuner.check_disk_cache

    def logged_check_disk_cache(self, tuning_key, configs, *args, **kwargs):  # every new tuning key passes here
        start = time.perf_counter()
        from_disk = check_disk_cache(self, tuning_key, configs, *args, **kwargs)
        tunings.append(dict(kernel=self.base_fn.__name__, candidates=len(configs), from_disk=bool(from_disk),
                            seconds=round(time.perf_counter() - start, 4)))
        return from_disk

    Autotuner.check_disk_cache = logged_check_disk_cache
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = NSAForCausalLM(NSAConfig(**MODEL)).to(torch.bfloat16).eval()
    with torch.no_grad():
        torch.cuda.synchronize()
        start = time.perf_counter()
        model(torch.randint(1, 1000, (1, 4096), device="cuda"), logits_to_keep=1)  # the model's first call
        torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        emit(dict(case="coldstart_first_call", prompt_len=4096, first_s=seconds, triton_compilations=len(compiles),
                  compiled_kernels=sorted(set(compiles))))
        log(f"  the model's first call, 4096: {seconds:.3f} s, {len(compiles)} Triton compilations")
        for length in args.coldstart_lens:
            ids = torch.randint(1, 1000, (1, length), device="cuda")
            times = []
            before, tuned_before = len(compiles), len(tunings)
            for call in range(2):
                profiler = cProfile.Profile() if call == 0 and length in args.coldstart_profile else None
                torch.cuda.synchronize()
                start = time.perf_counter()
                if profiler is not None:
                    profiler.enable()
                model(ids, logits_to_keep=1, use_cache=False)
                torch.cuda.synchronize()
                times.append(time.perf_counter() - start)
                if profiler is not None:
                    profiler.disable()
                    text = io.StringIO()
                    pstats.Stats(profiler, stream=text).sort_stats("cumulative").print_stats(45)
                    pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(25)
                    log(f"  cProfile of the first call at {length} (cumulative, then own time):\n{text.getvalue()}")
            kernels = sorted(set(compiles[before:]))
            emit(dict(case="coldstart_prefill", prompt_len=length, first_s=times[0], second_s=times[1],
                             first_over_second=times[0] / times[1], triton_compilations=len(compiles) - before,
                             compiled_kernels=kernels, tunings=tunings[tuned_before:]))
            log(f"  prefill {length:6d}: first {times[0]:.3f} s, second {times[1]:.3f} s, "
                f"{len(compiles) - before} Triton compilations {kernels}")
            for t in tunings[tuned_before:]:
                log(f"    tuned {t['kernel']}: {t['candidates']} candidates, {t['seconds']:.3f} s"
                    + (" (from disk)" if t["from_disk"] else ""))
    triton.knobs.runtime.jit_post_compile_hook = None
    Autotuner.check_disk_cache = check_disk_cache


def meta():
    import transformers
    import triton

    return dict(gpu=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
                transformers=transformers.__version__, python=platform.python_version(),
                date=datetime.now(timezone.utc).isoformat(timespec="seconds"), dtype="bfloat16", nsa_settings=PAPER)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", nargs="+", default=["kernel"], choices=["kernel", "model", "coldstart"])
    parser.add_argument("--layouts", nargs="+", default=list(LAYOUTS), choices=list(LAYOUTS))
    parser.add_argument("--cache-lens", nargs="+", type=int, default=[8192, 65536, 131072])
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 16])
    parser.add_argument("--model-cases", nargs="+", default=["1x65536", "1x16384", "16x16384"],
                        help="batch x prompt length for the model part")
    parser.add_argument("--static-cases", nargs="+", default=["1x65536"],
                        help="model cases that also run static caches + compile (one compilation per batch size)")
    parser.add_argument("--max-cache-len", type=int, default=65536 + 64, help="static caches' size (one compile)")
    parser.add_argument("--decode-tokens", type=int, default=32)
    parser.add_argument("--coldstart-lens", nargs="+", type=int,
                        default=[1000, 3001, 4097, 6000, 9999, 12345, 20000, 33333, 40000, 65000])
    parser.add_argument("--coldstart-profile", nargs="*", type=int, default=[],
                        help="cold-start lengths whose first call is profiled with cProfile (host time, into the log)")
    parser.add_argument("--no-isolate", dest="isolate", action="store_false",
                        help="run every kernel case in this process (default: one process per case)")
    parser.add_argument("--out", default=None, help="JSON path (default benchmarks/results/decode_<gpu>.json)")
    args = parser.parse_args()
    args.model_cases = [tuple(int(x) for x in case.split("x")) for case in args.model_cases]
    gpu = torch.cuda.get_device_name().split()[-1].lower()
    out = args.out or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", f"decode_{gpu}.json")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    results = []

    def save():  # after every part, so that a run cut short keeps what it measured
        with open(out, "w") as f:
            json.dump(dict(meta=meta(), results=results), f, indent=1)

    def log(line):
        print(line, flush=True)

    def emit(row):
        results.append(row)
        save()

    if "kernel" in args.parts:
        results += kernel_cases(args)
        save()
    if "model" in args.parts:
        model_cases(args, log, emit)
    if "coldstart" in args.parts:
        coldstart_cases(args, log, emit)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
