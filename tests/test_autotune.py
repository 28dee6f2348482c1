"""
Which kernel configurations the autotuner times (host-side pruning, no GPU needed): training shapes get the full
candidate list, decoding shapes a single configuration so the first generate() call is not stalled by timing runs,
block selection and the key-centric selected forward their measured tiles (no timing at a new prompt length);
the switches that change that, read once from the environment or set through the testing hook.
"""

import pytest
import triton

from nsa_hf.kernels import _tiling, band_attention, selected_tiles, selection
from nsa_hf.kernels._tiling import Switches, override

BAND_CANDIDATES = [
    triton.Config({"BLOCK_N": 64, "SPLIT": False}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_N": 32, "SPLIT": False}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_N": 64, "SPLIT": False}, num_warps=4, num_stages=3),
    triton.Config({"BLOCK_N": 32, "SPLIT": False}, num_warps=4, num_stages=3),
]
DIMS = dict(BLOCK_DK1=128, BLOCK_DK2=0, BLOCK_DV1=128, BLOCK_DV2=0)


@pytest.fixture(autouse=True)
def _default_tuning():
    with override(autotune=True, config_index=None):
        yield


def test_band_kernels_time_every_candidate_for_training_tiles_only():
    training = band_attention.prune_q_tiled(BAND_CANDIDATES, {}, BLOCK_M=128, **DIMS)
    decoding = band_attention.prune_q_tiled(BAND_CANDIDATES, {}, BLOCK_M=16, **DIMS)
    assert len(training) > 1
    assert len(decoding) == 1 and decoding[0] in BAND_CANDIDATES


def test_selection_prefill_takes_the_measured_tile_untimed_at_every_length():
    const = dict(G_PAD=16, N_PAD=16, R_PAD=4, D1=128, D2=0)
    rows, bs, warps, stages = _tiling.TUNING[(9, 0)].selection_prefill_tile
    for t_bucket in (64, 1024, 65536):
        (tile,) = selection._prune_configs(_tiling.SELECTION_CONFIGS, {"T_BUCKET": t_bucket}, **const)
        got = (tile.kwargs["ROWS"], tile.kwargs["BS"] * 4, tile.num_warps, tile.num_stages)  # BS: selection blocks
        assert got == (rows, bs, warps, stages)
    decoding = selection._prune_configs(_tiling.SELECTION_CONFIGS, {"T_BUCKET": 16}, **const)
    assert len(decoding) == 1
    with override(config_index=2):  # benchmarks and tests still reach every candidate
        (third,) = selection._prune_configs(_tiling.SELECTION_CONFIGS, {"T_BUCKET": 65536}, **const)
    assert third.kwargs["ROWS"] != tile.kwargs["ROWS"] or third.kwargs["BS"] != tile.kwargs["BS"]


def test_selection_times_the_candidates_where_the_measured_tile_does_not_fit():
    const = dict(G_PAD=16, N_PAD=16, R_PAD=4, D1=128, D2=128)  # DK 256: the 128-row tile's q exceeds its registers
    training = selection._prune_configs(_tiling.SELECTION_CONFIGS, {"T_BUCKET": 65536}, **const)
    assert len(training) > 1
    assert not any(c.kwargs["ROWS"] == 128 and c.num_warps == 4 for c in training)


def test_key_centric_forward_takes_its_measured_configuration_untimed():
    from nsa_hf.kernels import selected_reverse

    configs = _tiling._configs([(64, 4, 2), (64, 8, 2), (128, 8, 2), (32, 4, 2)], ("BM",))  # the GPU candidates
    for dk, want in ((32, (64, 4, 2)), (64, (64, 4, 2)), (128, (128, 8, 2))):
        (cfg,) = selected_reverse._prune_by_block(configs, {}, DK=dk)
        assert (cfg.kwargs["BM"], cfg.num_warps, cfg.num_stages) == want
    assert selected_reverse._prune_by_block(configs, {}, DK=192) == configs  # not measured: timed
    with override(config_index=3):
        (cfg,) = selected_reverse._prune_by_block(configs, {}, DK=64)
    assert cfg.kwargs["BM"] == 32


def test_selected_forward_decoding_is_not_timed():
    configs = [triton.Config({}, num_warps=w, num_stages=s) for w in (4, 8) for s in (2, 3)]
    assert len(selected_tiles.prune(configs, {}, DECODE=False)) == 4
    assert selected_tiles.prune(configs, {}, DECODE=True) == configs[:1]


def test_a_single_candidate_is_not_run_by_the_timing_functions(monkeypatch):
    # Triton's autotuner times whatever the filter leaves, even one candidate, at every new tuning key
    timed = []
    monkeypatch.setattr(triton.testing, "do_bench", lambda fn, warmup, rep, quantiles: timed.append(rep) or [1.0] * 3)
    launches = []
    const = dict(G_PAD=16, N_PAD=16, R_PAD=4, D1=128, D2=0)
    selection._prune_configs(_tiling.SELECTION_CONFIGS, {"T_BUCKET": 4096}, **const)  # the measured tile alone
    assert _tiling.TIMED(lambda: launches.append(1), quantiles=(0.5, 0.2, 0.8)) == [0.0, 0.0, 0.0]
    assert launches == [] and timed == []
    configs = [triton.Config({}, num_warps=w, num_stages=s) for w in (4, 8) for s in (2, 3)]
    selected_tiles.prune(configs, {}, DECODE=False)  # four candidates: timed
    assert _tiling.QUICK(lambda: None, quantiles=(0.5, 0.2, 0.8)) == [1.0] * 3
    assert _tiling.TIMED(lambda: None, quantiles=(0.5, 0.2, 0.8)) == [1.0] * 3
    assert timed == [10, 100]
    with override(autotune=False):
        selected_tiles.prune(configs, {}, DECODE=False)
    assert _tiling.TIMED(lambda: launches.append(1)) == 0.0 and launches == []


def test_selected_forward_runs_key_centric_only_where_it_measured_faster():
    from nsa_hf.kernels.selected import default_fwd_mode

    rules = _tiling.TUNING[(9, 0)]
    assert default_fwd_mode(4, 65536, rules) == "by_block"
    assert default_fwd_mode(4, rules.selected_by_block_keys - 1, rules) == "tiled"  # 8k: the reverse index costs more
    assert default_fwd_mode(16, 65536, rules) == "tiled"


def test_switches_override_the_autotuner():
    every = band_attention.prune_q_tiled(BAND_CANDIDATES, {}, BLOCK_M=128, **DIMS)
    with override(autotune=False):
        assert band_attention.prune_q_tiled(BAND_CANDIDATES, {}, BLOCK_M=128, **DIMS) == every[:1]
    with override(config_index=1):
        assert band_attention.prune_q_tiled(BAND_CANDIDATES, {}, BLOCK_M=128, **DIMS) == every[1:2]
    assert band_attention.prune_q_tiled(BAND_CANDIDATES, {}, BLOCK_M=128, **DIMS) == every  # restored


def test_switches_come_from_the_environment():
    assert Switches.from_environ({}) == Switches()
    env = Switches.from_environ({"NSA_HF_AUTOTUNE": "0", "NSA_HF_CONFIG_INDEX": "2", "NSA_HF_STREAMS": "0"})
    assert (env.autotune, env.config_index, env.streams) == (False, 2, False)


def test_override_rejects_unknown_knobs_and_bad_values():
    with pytest.raises(TypeError, match="unknown knobs"):
        with override(selected_mode="by_block"):
            pass
    for knob, value in [("selected_fwd", "rows"), ("selected_dq", "atomic"), ("selected_block_m", 48),
                        ("selection_tile", dict(ROWS=16)), ("band_tiles", dict(BLOCK_K=16)), ("autotune", 0)]:
        with pytest.raises(ValueError, match=knob):
            with override(**{knob: value}):
                pass
    with override(selected_fwd="by_block", selected_block_m=32):
        assert (_tiling.SWITCHES.selected_fwd, _tiling.SWITCHES.selected_block_m) == ("by_block", 32)
    assert (_tiling.SWITCHES.selected_fwd, _tiling.SWITCHES.selected_block_m) == (None, None)


def test_tuning_follows_the_device_capability():
    h100 = _tiling.DeviceLimits((9, 0), 232448, 132)
    assert _tiling.tuning(h100) is _tiling.TUNING[(9, 0)]
    # unmeasured GPUs take the nearest lower measured entry, older ones the lowest
    assert _tiling.tuning(_tiling.DeviceLimits((10, 0), 232448, 148)) is _tiling.TUNING[(9, 0)]
    assert _tiling.tuning(_tiling.DeviceLimits((8, 0), 166912, 108)) is _tiling.TUNING[(9, 0)]
    # the shared-memory filter reads the device's limit: a smaller GPU keeps fewer configurations
    assert h100.shared_memory - _tiling.TUNING[(9, 0)].smem_reserve == 200 * 1024
