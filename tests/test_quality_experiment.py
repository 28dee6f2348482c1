"""
benchmarks/quality_experiment.py at its smoke sizes on CPU, split into the two calls the GPU session makes (the
pretrained source and the results travel between them): every row issue 10 asks for, with its keys, and the
converted model's dense mode equal to the source.
"""

import json
import shutil

from _tiny import one_thread  # noqa: F401  (autouse fixture)

from benchmarks import quality_experiment as experiment

ROWS = [("source", "pretrained"), ("nsa-recipe", "converted (dense mode)"), ("nsa-recipe", "converted"),
        ("nsa-naive", "converted"), ("nsa-recipe", "stage 1"), ("nsa-recipe", "stage 2"), ("nsa-naive", "continued"),
        ("dense-twin", "continued")]


def test_two_calls_write_every_row(tmp_path):
    first, second = tmp_path / "call1", tmp_path / "call2"
    experiment.main(["--smoke", "--phases", "corpus", "pretrain", "baseline", "--out-dir", str(first),
                     "--work-dir", str(tmp_path / "work1")])
    (results,) = first.glob("quality_*.json")
    carried = tmp_path / "quality_source"
    shutil.copytree(first / "source", carried)
    experiment.main(["--smoke", "--phases", "corpus", "stage1", "stage2", "naive", "dense-twin", "plot",
                     "--source", str(carried), "--results", str(results), "--resume", "--out-dir", str(second),
                     "--work-dir", str(tmp_path / "work2")])

    (final,) = second.glob("quality_*.json")
    assert list(second.glob("quality_*.png"))
    rows = {(r["model"], r["stage"]): r for r in json.loads(final.read_text())["rows"]}
    assert sorted(rows) == sorted(ROWS)
    for row in rows.values():
        assert row["attention"] in ("dense", "nsa")
        assert row["loss_by_bucket"] and all(loss > 0 for loss in row["loss_by_bucket"].values())
        assert row["passkey"] and all(0 <= acc <= 1 for acc in row["passkey"].values())
    assert rows["source", "pretrained"]["loss_by_bucket"] == rows["nsa-recipe", "converted (dense mode)"]["loss_by_bucket"]
    budget = rows["nsa-recipe", "stage 2"]["tokens_trained"]
    assert budget > rows["nsa-recipe", "stage 1"]["tokens_trained"] > 0
    assert rows["nsa-naive", "continued"]["tokens_trained"] == budget == rows["dense-twin", "continued"]["tokens_trained"]
