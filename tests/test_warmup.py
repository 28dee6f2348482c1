"""`nsa_hf.warmup`: one call per tuning regime before serving (CPU: the calls it makes; GPU: nothing compiles after)."""

import pytest

import nsa_hf
from nsa_hf import NSAConfig, NSAForCausalLM

from _tiny import DIMS, NSA_SIZES, one_thread  # noqa: F401  (one_thread: autouse fixture)


def test_warmup_visits_every_regime_and_leaves_the_model_as_it_was():
    model = NSAForCausalLM(NSAConfig(**DIMS, **NSA_SIZES)).train()
    seconds = nsa_hf.warmup(model, max_length=40, batch_sizes=(1, 2), min_length=16)
    assert sorted({n for _, n in seconds}) == [15, 16, 17, 31, 32, 33, 39, 40]
    assert {b for b, _ in seconds} == {1, 2} and all(s > 0 for s in seconds.values())
    assert model.training


@pytest.mark.parametrize("kwargs", [dict(max_length=0), dict(max_length=8, batch_sizes=()),
                                    dict(max_length=8, batch_sizes=(0,))])
def test_warmup_refuses_bad_arguments(kwargs):
    model = NSAForCausalLM(NSAConfig(**DIMS, **NSA_SIZES))
    with pytest.raises(ValueError, match="max_length|batch_sizes"):
        nsa_hf.warmup(model, **kwargs)
