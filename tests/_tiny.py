"""Shared sizes and fixtures of the tiny CPU models used by the modeling and generation tests."""

import pytest
import torch

DIMS = dict(
    vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, head_dim=16,
)
# Small NSA blocks so that sequences of 40-150 tokens exercise every branch.
NSA_SIZES = dict(compress_block_size=8, compress_stride=4, select_block_size=16, num_selected_blocks=4, window_size=16)
VARIANTS = {
    "mlp": {},
    "mean": dict(compress_function="mean"),
    "separate_kv": dict(shared_kv=False),
    "qk_norm": dict(use_qk_norm=True),
}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny tensors gain nothing from intra-op threads; on a busy CPU machine they cost a lot of synchronisation."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """
    Compiling tests leave Dynamo as they found it: its caches and counters are process-wide and other tests count
    graphs. Autouse in the modules that import it.
    """
    yield
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
