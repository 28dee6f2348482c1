"""
Which kernel configurations the autotuner times (host-side pruning, no GPU needed): training shapes get the full
candidate list, decoding shapes a single configuration so the first generate() call is not stalled by timing runs.
"""

import pytest
import triton

from nsa_hf.kernels import _attention_common as common
from nsa_hf.kernels import selected, selection

BAND_CANDIDATES = [
    triton.Config({"BLOCK_N": 64, "SPLIT": False}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_N": 32, "SPLIT": False}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_N": 64, "SPLIT": False}, num_warps=4, num_stages=3),
    triton.Config({"BLOCK_N": 32, "SPLIT": False}, num_warps=4, num_stages=3),
]
DIMS = dict(BLOCK_DK1=128, BLOCK_DK2=0, BLOCK_DV1=128, BLOCK_DV2=0)


@pytest.fixture(autouse=True)
def _default_tuning(monkeypatch):
    monkeypatch.delenv("NSA_HF_AUTOTUNE", raising=False)
    monkeypatch.delenv("NSA_HF_CONFIG_INDEX", raising=False)


def test_band_kernels_time_every_candidate_for_training_tiles_only():
    training = common._prune_q_tiled(BAND_CANDIDATES, {}, BLOCK_M=128, **DIMS)
    decoding = common._prune_q_tiled(BAND_CANDIDATES, {}, BLOCK_M=16, **DIMS)
    assert len(training) > 1
    assert len(decoding) == 1 and decoding[0] in BAND_CANDIDATES


def test_selection_times_every_candidate_for_training_lengths_only():
    const = dict(G_PAD=16, N_PAD=16, R_PAD=4, D1=128, D2=0)
    training = selection._prune_configs(selection._GPU_CONFIGS, {"T_BUCKET": 65536}, **const)
    decoding = selection._prune_configs(selection._GPU_CONFIGS, {"T_BUCKET": 16}, **const)
    assert len(training) > 1
    assert len(decoding) == 1 and decoding[0].kwargs == training[0].kwargs


def test_selected_forward_decoding_is_not_timed():
    configs = [triton.Config({}, num_warps=w, num_stages=s) for w in (4, 8) for s in (2, 3)]
    assert len(selected._prune(configs, {}, DECODE=False)) == 4
    assert selected._prune(configs, {}, DECODE=True) == configs[:1]


def test_environment_overrides(monkeypatch):
    every = common._prune_q_tiled(BAND_CANDIDATES, {}, BLOCK_M=128, **DIMS)
    monkeypatch.setenv("NSA_HF_AUTOTUNE", "0")
    assert common._prune_q_tiled(BAND_CANDIDATES, {}, BLOCK_M=128, **DIMS) == every[:1]
    monkeypatch.delenv("NSA_HF_AUTOTUNE")
    monkeypatch.setenv("NSA_HF_CONFIG_INDEX", "1")
    assert common._prune_q_tiled(BAND_CANDIDATES, {}, BLOCK_M=128, **DIMS) == every[1:2]
