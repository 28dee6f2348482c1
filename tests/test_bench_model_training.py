"""benchmarks/bench_model_training.py: its arguments and a tiny run on CPU (the JSON rows issue 11 asks for)."""

import json

import pytest

from _tiny import fresh_dynamo, one_thread  # noqa: F401  (fixtures)
from benchmarks import bench_model_training as bench


def test_arguments_and_defaults():
    args = bench.build_parser().parse_args([])
    assert args.seqlens == [4096, 8192, 16384, 32768, 65536] and not args.compile and not args.tiny
    args = bench.build_parser().parse_args(["--compile", "--seqlens", "128", "--steps", "3"])
    assert args.compile and args.compile_backend == "inductor" and args.seqlens == [128] and args.steps == 3
    with pytest.raises(SystemExit, match="at least 1"):
        bench.main(["--tiny", "--steps", "0"])


def test_a_tiny_run_writes_the_rows(tmp_path):
    out = tmp_path / "model_training.json"
    bench.main(["--tiny", "--seqlens", "96", "--steps", "1", "--warmup", "1", "--compile", "--compile-backend",
                "eager", "--out", str(out)])
    (row,) = json.loads(out.read_text())["results"]
    assert row["seqlen"] == 96 and "error" not in " ".join(row)
    for key in ("nsa_tokens_per_s", "dense_tokens_per_s", "speedup", "nsa_compiled_tokens_per_s",
                "dense_compiled_tokens_per_s", "speedup_compiled", "nsa_compile_gain", "dense_compile_gain"):
        assert row[key] > 0, key
    assert row["speedup"] == pytest.approx(row["nsa_tokens_per_s"] / row["dense_tokens_per_s"])


def test_compile_only_at_the_named_lengths_and_a_profile_per_length(tmp_path):
    out = tmp_path / "model_training.json"
    bench.main(["--tiny", "--seqlens", "64", "96", "--steps", "1", "--warmup", "1", "--compile", "--compile-backend",
                "eager", "--compile-seqlens", "96", "--profile", str(tmp_path / "prof"), "--out", str(out)])
    short, long = json.loads(out.read_text())["results"]
    assert "nsa_compiled_tokens_per_s" not in short and "speedup_compiled" not in short
    assert long["nsa_compiled_tokens_per_s"] > 0 and long["speedup_compiled"] > 0
    for seqlen in (64, 96):
        table = (tmp_path / "prof" / f"profile_model_{seqlen}.txt").read_text()
        assert "Self CPU" in table and "aten::" in table
