"""
torch.compile of training: the NSA model's forward and backward under Dynamo / AOTAutograd equal eager mode, and the
batched training forward is one graph. On CPU through the PyTorch reference and through the Triton kernels in
Triton's interpreter (there as the custom ops `nsa_hf::nsa_attention_fwd` / `_bwd`); on a GPU (`gpu` marker) through
the compiled Triton path in bf16.
"""

import functools

import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend
from transformers import DataCollatorWithFlattening

from nsa_hf.kernels import nsa, nsa_attention, unfold_compression_blocks
from nsa_hf.modeling import modeling_nsa

from _tiny import DIMS, fresh_dynamo, one_thread  # noqa: F401  (fixtures)
from test_modeling import _gpu_model, make_model, tokens


@pytest.fixture
def triton_backend(monkeypatch):
    """The model's attention through the Triton kernels (Triton's interpreter on CPU tensors)."""
    monkeypatch.setattr(modeling_nsa, "nsa_attention", functools.partial(nsa_attention, backend="triton"))


def _step(model, compiled=None, **batch):
    """Loss, logits and every parameter's gradient of one training forward + backward (of `compiled(model)`)."""
    model.zero_grad(set_to_none=True)
    out = (model if compiled is None else compiled)(**batch)
    out.loss.backward()
    return out.loss.detach(), out.logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def _assert_steps_equal(compiled, eager, atol):
    torch.testing.assert_close(compiled[0], eager[0], rtol=0, atol=atol)
    torch.testing.assert_close(compiled[1], eager[1], rtol=0, atol=atol)
    assert compiled[2].keys() == eager[2].keys()
    for name, grad in eager[2].items():
        torch.testing.assert_close(compiled[2][name], grad, rtol=0, atol=atol, msg=lambda m: f"{name}: {m}")


def _break_reasons(model, **batch):
    torch._dynamo.reset()
    explained = torch._dynamo.explain(model)(**batch)
    return explained, {reason.reason.splitlines()[0] for reason in explained.break_reasons}


def _compile(model, backend="aot_eager", **options):
    """`torch.compile(model)`, counting the graphs Dynamo makes: (compiled, counter), Dynamo's counters reset."""
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    counter = CompileCounterWithBackend(backend)
    return torch.compile(model, backend=counter, **options), counter


def _graph_breaks() -> set[str]:
    return {reason.splitlines()[0] for reason in torch._dynamo.utils.counters["graph_break"]}


@pytest.mark.parametrize("backend,variant", [("eager", {}), ("aot_eager", {}),
                                             ("aot_eager", dict(shared_kv=False, use_qk_norm=True))])
def test_compiled_training_step_equals_eager_on_the_reference(backend, variant):
    model = make_model(**variant).train()
    ids = tokens(2, 64)
    eager = _step(model, input_ids=ids, labels=ids)
    torch._dynamo.reset()
    compiled = _step(model, torch.compile(model, backend=backend, fullgraph=True), input_ids=ids, labels=ids)
    _assert_steps_equal(compiled, eager, atol=1e-6)


def test_batched_training_forward_is_one_graph_also_with_gradient_checkpointing():
    model = make_model().train()
    ids = tokens(2, 64)
    explained, reasons = _break_reasons(model, input_ids=ids, labels=ids)
    assert (explained.graph_count, explained.graph_break_count) == (1, 0), reasons
    # transformers 5.24 renamed `gradient_checkpointing_enable` (deprecated) to `activation_checkpointing_enable`
    getattr(model, "activation_checkpointing_enable", model.gradient_checkpointing_enable)()
    # use_cache=False: transformers' own "use_cache is incompatible with gradient checkpointing" warning breaks graphs
    explained, reasons = _break_reasons(model, input_ids=ids, labels=ids, use_cache=False)
    assert (explained.graph_count, explained.graph_break_count) == (1, 0), reasons


def test_attention_layer_compiles_with_fullgraph(triton_backend):
    model = make_model(num_hidden_layers=1).train()
    layer = model.model.layers[0].self_attn
    hidden = torch.randn(2, 48, DIMS["hidden_size"], requires_grad=True)
    positions = model.model.rotary_emb(hidden, torch.arange(48)[None])

    def run(attention):
        out = attention(hidden, positions)[0]
        return [out.detach(), *torch.autograd.grad(out.square().sum(), [hidden, *layer.parameters()])]

    eager = run(layer)
    torch._dynamo.reset()
    compiled = run(torch.compile(layer, backend="aot_eager", fullgraph=True))
    for a, b in zip(compiled, eager):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def test_triton_path_compiles_to_the_custom_ops_and_equals_eager(triton_backend, monkeypatch):
    model = make_model(shared_kv=False, num_hidden_layers=1).train()
    ids = tokens(2, 48)
    eager = _step(model, input_ids=ids, labels=ids)
    compiled, counter = _compile(model, fullgraph=True)
    _assert_steps_equal(_step(model, compiled, input_ids=ids, labels=ids), eager, atol=1e-6)
    assert counter.frame_count == 1
    assert "nsa_hf.nsa_attention_fwd.default" in {str(node.target) for node in counter.graphs[0].graph.nodes}
    # with gradient checkpointing, as the recipe and the benchmark train: the op inside the recomputed layer
    getattr(model, "activation_checkpointing_enable", model.gradient_checkpointing_enable)()
    compiled, counter = _compile(model, fullgraph=True)
    _assert_steps_equal(_step(model, compiled, input_ids=ids, labels=ids, use_cache=False), eager, atol=1e-6)

    # eager mode keeps calling the autograd.Function directly: no dispatch through the custom op
    def refuse(*args):
        raise AssertionError("eager mode dispatched the custom op")

    monkeypatch.setattr(nsa, "_nsa_attention_fwd_op", refuse)
    _step(model, input_ids=ids, labels=ids)


def _packed_batch(lengths, seed=0):
    docs = [tokens(1, n, seed=seed + i)[0].tolist() for i, n in enumerate(lengths)]
    return DataCollatorWithFlattening()([{"input_ids": d} for d in docs], return_tensors="pt")


@pytest.mark.parametrize("layout", ["packed", "padded"])
def test_packed_and_padded_batches_compile_with_one_graph_break_at_the_layout(triton_backend, layout):
    model = make_model(num_hidden_layers=1).train()
    if layout == "packed":
        batch = _packed_batch((30, 9, 25))
    else:
        ids = tokens(2, 40)
        mask = torch.ones_like(ids)
        mask[1, :13] = 0
        batch = dict(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100))
    eager = _step(model, **batch)
    compiled, _ = _compile(model)
    _assert_steps_equal(_step(model, compiled, **batch), eager, atol=1e-6)
    # one place: the layout (documents, real tokens, compression blocks) is read outside the graph
    assert len(_graph_breaks()) == 1 and "torch.compiler.disable" in _graph_breaks().pop()


def test_new_packings_reuse_the_compiled_graphs(triton_backend):
    model = make_model(num_hidden_layers=1).train()
    compiled, counter = _compile(model, backend="eager")  # Dynamo's guards decide; opcheck covers dynamic shapes
    frames = []
    for seed, lengths in enumerate([(30, 9, 25), (12, 40, 5, 7), (20, 20, 8, 9, 7)]):
        batch = _packed_batch(lengths, seed=10 * seed)
        if seed == 2:
            _assert_steps_equal(_step(model, compiled, **batch), _step(model, **batch), atol=1e-6)
        else:
            compiled(**batch).loss.backward()
        frames.append(counter.frame_count)
    # the second packing recompiles with dynamic shapes; later ones compile nothing
    assert frames[2] == frames[1] > frames[0], frames


@pytest.mark.parametrize("shared_kv,packed", [(True, False), (False, True)])
def test_custom_op_registration_passes_opcheck(shared_kv, packed):
    torch.manual_seed(0)
    l, d = 8, 4
    cu = torch.tensor([0, 20, 48], dtype=torch.int32) if packed else None
    q = torch.randn(1, 48, 4, 16, requires_grad=True)
    k, v = (torch.randn(1, 48, 2, 16, requires_grad=True) for _ in range(2))
    k_cmp, v_cmp = (unfold_compression_blocks(x.detach(), l, d, cu).mean(2).requires_grad_() for x in (k, v))
    gates = torch.rand(1, 48, 4, 3, requires_grad=True)
    k_win = v_win = None
    if not shared_kv:
        k_win, v_win = (torch.randn(1, 48, 2, 16, requires_grad=True) for _ in range(2))
    settings = (l, d, 16, 2, 16, 1, 2, 0.25)
    torch.library.opcheck(nsa._nsa_attention_fwd_op, (q, k, v, k_cmp, v_cmp, gates, k_win, v_win, cu, cu, *settings))


# ----------------------------------------------------------------------------------------------- GPU


def _assert_close_bf16(compiled, eager):
    """
    Logits per token: inductor fuses the gates / compression projections and rounds them to bf16 differently from
    eager, which flips a near-tied top-n block choice for a few (token, head) pairs and moves those tokens' logits by
    more than rounding (on an H200, 1.1% of the tokens of these shapes); every other token agrees to rounding (a
    wrong kernel or graph moves most of them, and the median with them). Gradients:
    relative norm error, as tests/test_modeling.py's Triton-vs-reference GPU test.
    """
    scale = eager[1].float().abs().max()
    err = (compiled[1].float() - eager[1].float()).abs().amax(-1)  # [batch, tokens]
    off = (err >= 0.05 * scale).float().mean().item()
    assert off < 0.03 and err.median() < 0.01 * scale, (off, err.max().item(), err.median().item(), scale.item())
    for name, grad in eager[2].items():
        if name.endswith("compress_key.down_proj.bias"):  # its true gradient is 0 (softmax cancels it): noise
            assert compiled[2][name].norm() < 5e-2 * compiled[2][name.replace(".bias", ".weight")].norm(), name
            continue
        err = (compiled[2][name].float() - grad.float()).norm() / grad.float().norm().clamp_min(1e-12)
        assert err < 0.05, (name, err.item())


@pytest.mark.gpu
def test_gpu_compiled_training_step_equals_eager_without_graph_breaks():
    model = _gpu_model().train()
    ids = torch.randint(0, 1024, (2, 4096), device="cuda")
    explained, reasons = _break_reasons(model, input_ids=ids, labels=ids)
    assert (explained.graph_count, explained.graph_break_count) == (1, 0), reasons
    eager = _step(model, input_ids=ids, labels=ids)
    torch._dynamo.reset()
    compiled_model = torch.compile(model, fullgraph=True)  # inductor
    _step(model, compiled_model, input_ids=ids, labels=ids)  # compiles
    _assert_close_bf16(_step(model, compiled_model, input_ids=ids, labels=ids), eager)


@pytest.mark.gpu
def test_gpu_compiled_packed_step_equals_eager():
    model = _gpu_model().train()
    lengths = (1500, 700, 1896)
    docs = [torch.randint(0, 1024, (n,)).tolist() for n in lengths]
    batch = DataCollatorWithFlattening()([{"input_ids": d} for d in docs], return_tensors="pt")
    batch = {name: x.cuda() for name, x in batch.items()}
    eager = _step(model, **batch)
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    _assert_close_bf16(_step(model, torch.compile(model), **batch), eager)
    assert len(_graph_breaks()) == 1 and "torch.compiler.disable" in _graph_breaks().pop()
