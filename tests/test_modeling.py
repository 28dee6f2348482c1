"""
NSAModel / NSAForCausalLM on CPU (the PyTorch reference backend), fp32, tiny configs whose NSA sizes make 40-150 token
sequences exercise every branch: compression blocks of 8 (stride 4), selection blocks of 16 (4 selected), window 16.
"""

import functools
import logging

import pytest
import torch
import torch.nn.functional as F
from transformers import (
    AutoModel,
    AutoModelForCausalLM,
    DataCollatorWithFlattening,
    DynamicCache,
    LlamaConfig,
    LlamaForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
    StaticCache,
)

import nsa_hf
from nsa_hf import NSAConfig, NSAForCausalLM, NSAModel
from nsa_hf.kernels import nsa_attention
from nsa_hf.modeling import NSACache, modeling_nsa

from _tiny import DIMS, NSA_SIZES, VARIANTS, one_thread  # noqa: F401  (one_thread: autouse fixture)


def tiny_config(**overrides) -> NSAConfig:
    return NSAConfig(**{**DIMS, **NSA_SIZES, **overrides})


def randomize_nsa_parameters(model, std=0.2):
    """Move gates and compression off their init so that every branch and phi matter in equivalence tests."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if any(key in name for key in ("gate_proj", "compress_key", "compress_value")):
                param.normal_(0.0, std)
    return model


def make_model(seed=0, randomize=True, attn_implementation=None, **overrides) -> NSAForCausalLM:
    torch.manual_seed(seed)
    config = tiny_config(**overrides)
    if attn_implementation is None:
        model = NSAForCausalLM(config)
    else:
        model = NSAForCausalLM._from_config(config, attn_implementation=attn_implementation)
    if randomize:
        randomize_nsa_parameters(model)
    return model.eval()


def tokens(batch, length, seed=1):
    return torch.randint(0, DIMS["vocab_size"], (batch, length), generator=torch.Generator().manual_seed(seed))


def assert_close(actual, expected, atol=1e-5):
    torch.testing.assert_close(actual, expected, rtol=0, atol=atol)


# ----------------------------------------------------------------------------------------------- construction


def test_nsa_is_the_default_and_dense_is_opt_in(tmp_path):
    model = make_model()
    assert model.config._attn_implementation == "nsa"
    model.save_pretrained(tmp_path)
    assert NSAForCausalLM.from_pretrained(tmp_path).config._attn_implementation == "nsa"
    assert AutoModelForCausalLM.from_pretrained(tmp_path).config._attn_implementation == "nsa"
    for dense in ("sdpa", "eager"):
        loaded = NSAForCausalLM.from_pretrained(tmp_path, attn_implementation=dense)
        assert loaded.config._attn_implementation == dense
    model.set_attn_implementation("sdpa")
    assert model.config._attn_implementation == "sdpa"
    model.set_attn_implementation("nsa")
    assert model.config._attn_implementation == "nsa"


def test_switching_attention_on_a_live_model_gives_the_fresh_models_outputs():
    model = make_model()
    ids = tokens(2, 70)
    dense_twin = NSAForCausalLM._from_config(model.config, attn_implementation="sdpa").eval()
    dense_twin.load_state_dict(model.state_dict())
    with torch.no_grad():
        sparse, dense = model(ids).logits, dense_twin(ids).logits
        assert (dense - sparse).abs().max() > 1e-2
        for implementation in ("sdpa", "eager"):
            model.set_attn_implementation(implementation)
            assert_close(model(ids).logits, dense)
        model.set_attn_implementation("nsa")
        assert torch.equal(model(ids).logits, sparse)
        assert type(model(ids[:, :20], use_cache=True).past_key_values) is NSACache
    prompt = dict(input_ids=ids[:, :20], max_new_tokens=5, do_sample=False)
    model.set_attn_implementation("sdpa")
    assert torch.equal(model.generate(**prompt), dense_twin.generate(**prompt))
    # and training in dense mode: the gradients of the dense twin
    model.train(), dense_twin.train()
    model(ids, labels=ids).loss.backward()
    dense_twin(ids, labels=ids).loss.backward()
    assert_close(model.model.layers[0].self_attn.q_proj.weight.grad,
                 dense_twin.model.layers[0].self_attn.q_proj.weight.grad, atol=1e-6)


def test_models_built_from_one_config_object_switch_alone():
    config = tiny_config()
    # from_config copies the config (as from_pretrained does): attn_implementation= switches that model alone
    first = AutoModelForCausalLM.from_config(config)
    dense = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")
    assert (first.config._attn_implementation, dense.config._attn_implementation) == ("nsa", "sdpa")
    # the constructor keeps the object it is given (a torch module's idiom); switching takes a copy first
    a, b = NSAForCausalLM(config), NSAForCausalLM(config)
    assert a.config is b.config is config
    a.set_attn_implementation("sdpa")
    assert a.config._attn_implementation == "sdpa"
    assert b.config._attn_implementation == config._attn_implementation == first.config._attn_implementation == "nsa"
    assert all(layer.self_attn.config is a.config for layer in a.model.layers) and a.model.config is a.config


def test_auto_classes_build_nsa_models():
    assert type(AutoModelForCausalLM.from_config(tiny_config())) is NSAForCausalLM
    assert type(AutoModel.from_config(tiny_config())) is NSAModel
    assert nsa_hf.nsa_attention is nsa_attention


@pytest.mark.parametrize("tie", [False, True])
def test_save_and_load_round_trip_is_exact(tmp_path, tie):
    model = make_model(shared_kv=False, use_qk_norm=True, tie_word_embeddings=tie)
    ids = tokens(2, 70)
    with torch.no_grad():
        expected = model(ids).logits
    model.save_pretrained(tmp_path)
    loaded = NSAForCausalLM.from_pretrained(tmp_path).eval()
    state, loaded_state = model.state_dict(), loaded.state_dict()
    assert state.keys() == loaded_state.keys()
    for name in state:
        assert torch.equal(state[name], loaded_state[name]), name
    if tie:
        assert loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, expected)


def test_sharded_save_loads_with_device_map_and_dtype(tmp_path):
    model = make_model(shared_kv=False)
    ids = tokens(1, 40)
    with torch.no_grad():
        expected = model(ids).logits
    model.save_pretrained(tmp_path, max_shard_size="100KB")
    assert len(list(tmp_path.glob("model-*.safetensors"))) > 1
    for kwargs in (dict(device_map="auto"), dict(device_map="cpu", low_cpu_mem_usage=True)):
        loaded = AutoModelForCausalLM.from_pretrained(tmp_path, **kwargs).eval()
        with torch.no_grad():
            assert torch.equal(loaded(ids).logits, expected), kwargs
    model.to(torch.float16).save_pretrained(tmp_path / "half")
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "half", dtype="auto").dtype == torch.float16


def test_init_mlp_compression_is_mean_pooling_and_gates_are_one_third():
    model = make_model(randomize=False)
    blocks = torch.randn(2, 5, 8, 2, 16)
    for layer in model.model.layers:
        attn = layer.self_attn
        for phi in (attn.compress_key, attn.compress_value):
            assert torch.equal(phi(blocks), blocks.mean(dim=-3))
        gates = torch.sigmoid(attn.gate_proj(torch.randn(3, 64)))
        assert_close(gates, torch.full_like(gates, 1 / 3), atol=1e-7)
    # Hence the whole model equals its `mean`-compression twin at init.
    mean_model = make_model(randomize=False, compress_function="mean")
    result = mean_model.load_state_dict(model.state_dict(), strict=False)
    assert result.missing_keys == [] and all("compress_" in key for key in result.unexpected_keys)
    ids = tokens(2, 60)
    with torch.no_grad():
        assert_close(model(ids).logits, mean_model(ids).logits, atol=1e-6)


# ----------------------------------------------------------------------------------------------- training


@pytest.mark.parametrize("variant", ["mlp", "separate_kv_qk_norm_tied", "mean_padded"])
def test_gradients_reach_every_parameter(variant):
    overrides = {
        "mlp": {},
        "separate_kv_qk_norm_tied": dict(shared_kv=False, use_qk_norm=True, tie_word_embeddings=True),
        "mean_padded": dict(compress_function="mean"),
    }[variant]
    model = make_model(**overrides).train()  # `down_proj` of phi off zero, so `up_proj` gets gradients too
    ids = tokens(2, 64)
    mask = torch.ones_like(ids)
    if variant == "mean_padded":
        mask[1, :9] = 0
    labels = ids.masked_fill(mask == 0, -100)
    model(ids, attention_mask=mask, labels=labels).loss.backward()
    names = [name for name, _ in model.named_parameters()]
    assert any("position_embedding" in n for n in names) == (variant != "mean_padded")
    assert any("win_k_proj" in n for n in names) == (variant == "separate_kv_qk_norm_tied")
    for name, param in model.named_parameters():
        assert param.grad is not None, name
        assert torch.isfinite(param.grad).all(), name
        assert param.grad.abs().sum() > 0, name


def test_gradient_checkpointing_gives_the_same_gradients():
    model = make_model(shared_kv=False).train()
    ids = tokens(2, 50)

    def grads():
        model.zero_grad()
        model(ids, labels=ids).loss.backward()
        return {name: p.grad.clone() for name, p in model.named_parameters()}

    plain = grads()
    # transformers 5.24 renamed `gradient_checkpointing_enable` (deprecated) to `activation_checkpointing_enable`
    getattr(model, "activation_checkpointing_enable", model.gradient_checkpointing_enable)()
    assert model.model.layers[0].gradient_checkpointing
    checkpointed = grads()
    for name in plain:
        assert_close(checkpointed[name], plain[name], atol=1e-6)


def test_loss_uses_shifted_labels_and_ignores_minus_100():
    model = make_model()
    ids = tokens(2, 40)
    labels = ids.clone()
    labels[0, :13] = -100
    labels[1, 30:] = -100
    with torch.no_grad():
        out = model(ids, labels=labels)
    logits, targets = out.logits[:, :-1].reshape(-1, DIMS["vocab_size"]), labels[:, 1:].reshape(-1)
    assert_close(out.loss, F.cross_entropy(logits, targets, ignore_index=-100), atol=1e-6)
    # Trainer passes the token count of the whole (accumulated) batch: the loss is then a sum over it.
    with torch.no_grad():
        summed = model(ids, labels=labels, num_items_in_batch=torch.tensor(100)).loss
    assert_close(summed, F.cross_entropy(logits, targets, ignore_index=-100, reduction="sum") / 100, atol=1e-6)


def test_logits_to_keep():
    model = make_model()
    ids = tokens(2, 30)
    with torch.no_grad():
        full = model(ids).logits
        last = model(ids, logits_to_keep=1).logits
    assert last.shape == (2, 1, DIMS["vocab_size"])
    assert_close(last, full[:, -1:])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_forward_on_cpu(dtype):
    model = make_model()
    ids = tokens(2, 60)
    with torch.no_grad():
        reference = model(ids).logits
        logits = model.to(dtype)(ids).logits
    assert logits.dtype == dtype and torch.isfinite(logits).all()
    assert (logits.float() - reference).abs().max() < 0.05 * reference.abs().max()


# ----------------------------------------------------------------------------------------------- sequence shapes


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_any_length_runs_and_is_causal(variant):
    # Lengths of 1, shorter than a compression block, not a multiple of any block, and longer than everything.
    model = make_model(**VARIANTS[variant])
    ids = tokens(2, 150)
    with torch.no_grad():
        full = model(ids).logits
        assert torch.isfinite(full).all()
        for length in (1, 5, 8, 37):
            assert_close(model(ids[:, :length]).logits, full[:, :length])


@pytest.mark.parametrize("side", ["left", "right"])
def test_padding_gives_the_outputs_of_the_unpadded_rows(side):
    model = make_model(shared_kv=False)
    lengths = (70, 51, 9)
    rows = [tokens(1, n, seed=i) for i, n in enumerate(lengths)]
    width = max(lengths)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    spans = []
    for i, row in enumerate(rows):
        span = slice(width - row.shape[1], width) if side == "left" else slice(0, row.shape[1])
        ids[i, span], mask[i, span] = row[0], 1
        spans.append(span)
    with torch.no_grad():
        padded = model(ids, attention_mask=mask).logits
        for i, row in enumerate(rows):
            assert_close(padded[i, spans[i]], model(row).logits[0])
        # a row of nothing but padding, and a batch of nothing but padding, do not break anything
        empty_row_mask = torch.cat([mask, torch.zeros_like(mask[:1])])
        with_empty = model(torch.cat([ids, ids[:1]]), attention_mask=empty_row_mask).logits
        assert torch.isfinite(with_empty).all()
        assert_close(with_empty[:-1], padded)
        assert torch.isfinite(model(ids, attention_mask=torch.zeros_like(mask)).logits).all()


def test_packed_documents_never_attend_across_documents():
    model = make_model()
    docs = [tokens(1, n, seed=i) for i, n in enumerate((37, 60, 5, 48))]
    packed = torch.cat(docs, dim=1)
    position_ids = torch.cat([torch.arange(d.shape[1]) for d in docs]).unsqueeze(0)
    lengths = torch.tensor([d.shape[1] for d in docs])
    cu_seqlens = F.pad(lengths.cumsum(0), (1, 0)).to(torch.int32)
    with torch.no_grad():
        separate = torch.cat([model(d).logits for d in docs], dim=1)
        assert_close(model(packed, position_ids=position_ids).logits, separate)
        explicit = model(packed, position_ids=position_ids, cu_seq_lens_q=cu_seqlens, cu_seq_lens_k=cu_seqlens)
        assert_close(explicit.logits, separate)
        # Teeth: the same tokens as one sequence differ from the separate documents.
        assert (model(packed).logits - separate).abs().max() > 1e-2


def test_flattening_collator_loss_equals_per_document_loss():
    model = make_model()
    docs = [tokens(1, n, seed=10 + i)[0].tolist() for i, n in enumerate((41, 23, 66))]
    batch = DataCollatorWithFlattening()([{"input_ids": d} for d in docs], return_tensors="pt")
    with torch.no_grad():
        packed_loss = model(**batch).loss
        total, count = 0.0, 0
        for doc in docs:
            ids = torch.tensor([doc])
            logits = model(ids).logits[0, :-1]
            total += F.cross_entropy(logits, ids[0, 1:], reduction="sum")
            count += len(doc) - 1
    assert_close(packed_loss, total / count, atol=1e-5)


# ----------------------------------------------------------------------------------------------- against dense


def _llama_pair(dense_cls, dense_config_cls, attn_implementation, **nsa_overrides):
    torch.manual_seed(0)
    dense = dense_cls._from_config(dense_config_cls(**DIMS), attn_implementation=attn_implementation).eval()
    nsa = NSAForCausalLM._from_config(tiny_config(**nsa_overrides), attn_implementation=attn_implementation).eval()
    result = nsa.load_state_dict(dense.state_dict(), strict=False)
    assert result.unexpected_keys == []
    assert all(key.split(".self_attn.")[-1].startswith(("gate_proj", "compress_")) for key in result.missing_keys)
    return dense, nsa


@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])
def test_dense_mode_equals_llama(attn_implementation):
    llama, nsa = _llama_pair(LlamaForCausalLM, LlamaConfig, attn_implementation)
    ids = tokens(2, 90)
    mask = torch.ones_like(ids)
    mask[1, :17] = 0
    with torch.no_grad():
        assert_close(nsa(ids).logits, llama(ids).logits)
        assert_close(nsa(ids, attention_mask=mask).logits[1, 17:], llama(ids, attention_mask=mask).logits[1, 17:])
        # with a cache, one token at a time after a prefill
        cache = nsa(ids[:, :60], use_cache=True, attention_mask=mask[:, :60]).past_key_values
        assert type(cache) is DynamicCache
        for t in range(60, 64):
            step = nsa(ids[:, t : t + 1], past_key_values=cache, attention_mask=mask[:, : t + 1]).logits
            assert_close(step[1], llama(ids[:, : t + 1], attention_mask=mask[:, : t + 1]).logits[1, -1:])


def test_dense_mode_with_qk_norm_equals_qwen3():
    qwen3, nsa = _llama_pair(Qwen3ForCausalLM, Qwen3Config, "sdpa", use_qk_norm=True)
    ids = tokens(2, 50)
    with torch.no_grad():
        assert_close(nsa(ids).logits, qwen3(ids).logits)


def _only_branch(model, branch):
    """Gates (cmp, slc, win) set to one-hot on `branch` for every query and head."""
    with torch.no_grad():
        for layer in model.model.layers:
            gate = layer.self_attn.gate_proj
            gate.weight.zero_()
            bias = torch.full((gate.bias.numel() // 3, 3), -40.0)
            bias[:, ("cmp", "slc", "win").index(branch)] = 40.0
            gate.bias.copy_(bias.flatten())


@pytest.mark.parametrize("shared_kv", [True, False])
@pytest.mark.parametrize("branch", ["cmp", "slc", "win"])
def test_each_branch_equals_dense_attention_when_it_sees_every_key(branch, shared_kv):
    # cmp with blocks of one token (l = d = 1) and mean/init-mlp phi is causal attention over the keys themselves;
    # slc with as many selected blocks as there are blocks, and win with a window over everything, are too.
    overrides = {
        "cmp": dict(compress_block_size=1, compress_stride=1),
        "slc": dict(num_selected_blocks=8),
        "win": dict(window_size=128),
    }[branch]
    model = make_model(randomize=False, shared_kv=shared_kv, **overrides)
    _only_branch(model, branch)
    if not shared_kv:  # the branch's own projections, copied from the dense ones
        with torch.no_grad():
            for layer in model.model.layers:
                attn = layer.self_attn
                prefix = {"cmp": "cmp", "win": "win"}.get(branch)
                if prefix is not None:
                    getattr(attn, f"{prefix}_k_proj").weight.copy_(attn.k_proj.weight)
                    getattr(attn, f"{prefix}_v_proj").weight.copy_(attn.v_proj.weight)
    ids = tokens(2, 100)
    with torch.no_grad():
        sparse = model(ids).logits
        model.set_attn_implementation("sdpa")
        dense = model(ids).logits
    assert_close(sparse, dense, atol=2e-5)


# ----------------------------------------------------------------------------------------------- errors


def test_bad_inputs_raise_clear_errors():
    model = make_model()
    ids = tokens(2, 20)
    with torch.no_grad():
        with pytest.raises(ValueError, match="2-D padding mask"):
            model(ids, attention_mask=torch.ones(2, 1, 20, 20))
        with pytest.raises(ValueError, match="expected"):
            model(ids, attention_mask=torch.ones(2, 21, dtype=torch.long))
        filled = DynamicCache()
        filled.update(torch.zeros(2, 2, 3, 16), torch.zeros(2, 2, 3, 16), 0)
        with pytest.raises(ValueError, match="NSACache"):
            model(ids, past_key_values=filled)
        with pytest.raises(ValueError, match="cu_seq_lens_q"):
            model(ids[:1], cu_seq_lens_q=torch.tensor([0, 5, 19], dtype=torch.int32))
        with pytest.raises(ValueError, match="cannot use a cache"):
            model(ids[:1], past_key_values=NSACache(model.config), cu_seq_lens_q=torch.tensor([0, 5, 20]))
        with pytest.raises(ValueError, match="not both"):
            model(ids, past_key_values=NSACache(model.config), cache=NSACache(model.config))
        model.set_attn_implementation("sdpa")
        with pytest.raises(ValueError, match="dense attention"):
            model(ids, past_key_values=NSACache(model.config))


def test_a_cache_built_for_another_model_is_refused_naming_the_difference():
    model = make_model()
    ids = tokens(1, 20)
    with torch.no_grad():
        for other in (dict(num_hidden_layers=3), dict(compress_block_size=16, compress_stride=8, select_block_size=16)):
            cache = NSACache(tiny_config(**other))
            with pytest.raises(ValueError, match=next(iter(other))):
                model(ids, past_key_values=cache)
        # generate's prefill and decoding steps take the model's own cache
        model(ids, past_key_values=NSACache(model.config))


@pytest.fixture
def warnings_once_again():
    """transformers' `warning_once` remembers its messages process-wide: let this test see them again."""
    from transformers.utils import logging as hf_logging

    hf_logging.warning_once.cache_clear()
    yield
    hf_logging.warning_once.cache_clear()


def test_what_nsa_attention_does_not_compute_is_said_not_silently_dropped(caplog, warnings_once_again):
    model = make_model(attention_dropout=0.1)
    ids = tokens(1, 20)
    with caplog.at_level(logging.WARNING), torch.no_grad():
        out = model(ids, output_attentions=True)
        assert out.attentions == ()
        assert "output_attentions" in caplog.text and "'eager'" in caplog.text
        caplog.clear()
        model(ids, past_key_values=StaticCache(config=model.config, max_cache_len=32))
        assert "StaticCache" in caplog.text and "NSAStaticCache" in caplog.text
        caplog.clear()
        model.train()
        model(ids)
        assert "attention_dropout" in caplog.text
        caplog.clear()
        model.eval()
        model(ids, past_key_values=DynamicCache())  # what generate makes: replaced without a word
        model.set_attn_implementation("eager")
        model.train()
        out = model(ids, output_attentions=True)
        assert caplog.text == "" and out.attentions[0].shape == (1, 4, 20, 20)


# ----------------------------------------------------------------------------------------------- GPU


def _gpu_model(**overrides):
    torch.manual_seed(0)
    config = NSAConfig(
        vocab_size=1024, hidden_size=512, intermediate_size=1024, num_hidden_layers=2, num_attention_heads=8,
        num_key_value_heads=2, head_dim=64, compress_block_size=32, compress_stride=16, select_block_size=64,
        num_selected_blocks=8, window_size=256, **overrides,
    )
    return randomize_nsa_parameters(NSAForCausalLM(config), std=0.05).to("cuda", torch.bfloat16)


@pytest.mark.gpu
@pytest.mark.parametrize("shared_kv", [True, False])
def test_gpu_triton_model_matches_reference_backend(monkeypatch, shared_kv):
    model = _gpu_model(shared_kv=shared_kv).train()
    ids = torch.randint(0, 1024, (2, 2048), device="cuda")
    mask = torch.ones_like(ids)
    mask[1, :300] = 0  # the packed (varlen) path as well

    def run():
        model.zero_grad()
        out = model(ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100))
        out.loss.backward()
        return out.logits.float(), {n: p.grad.float() for n, p in model.named_parameters()}

    logits, grads = run()
    monkeypatch.setattr(modeling_nsa, "nsa_attention", functools.partial(nsa_attention, backend="reference"))
    ref_logits, ref_grads = run()
    assert (logits - ref_logits).abs().max() < 0.05 * ref_logits.abs().max()
    for name, ref in ref_grads.items():
        if name.endswith("compress_key.down_proj.bias"):
            # A bias shared by every compressed key shifts all of a query's cmp logits equally, so softmax cancels it:
            # its true gradient is exactly 0 and both backends return rounding noise. Check that the noise is tiny.
            weight_grad = grads[name.replace(".bias", ".weight")]
            assert grads[name].norm() < 5e-2 * weight_grad.norm(), (name, grads[name].norm().item())
            continue
        err = (grads[name] - ref).norm() / ref.norm().clamp_min(1e-12)
        assert err < 0.05, (name, err.item())


def test_trainer_trains_on_packed_documents(tmp_path):
    from transformers import Trainer, TrainingArguments

    model = make_model(randomize=False).train()
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    data = [{"input_ids": tokens(1, n, seed=i)[0].tolist()} for i, n in enumerate((40, 25, 60, 33, 51, 19))]
    args = TrainingArguments(
        output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=3, learning_rate=1e-2,
        logging_steps=1, save_strategy="no", report_to=[], use_cpu=True, disable_tqdm=True,
    )
    trainer = Trainer(model=model, args=args, train_dataset=data, data_collator=DataCollatorWithFlattening())
    result = trainer.train()
    assert torch.isfinite(torch.tensor(result.training_loss))
    # every parameter learns, the compression MLP's `up_proj` too once `down_proj` has left zero after step 1
    unchanged = [name for name, p in model.named_parameters() if torch.equal(p.detach(), before[name])]
    assert unchanged == []


def test_peft_lora_wraps_the_nsa_model():
    from peft import LoraConfig, get_peft_model

    model = make_model()
    ids = tokens(2, 48)
    with torch.no_grad():
        base = model(ids).logits
    lora = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "k_proj", "v_proj", "gate_proj"]))
    with torch.no_grad():
        assert_close(lora(input_ids=ids).logits, base)  # LoRA B starts at zero
    lora.train()
    lora(input_ids=ids, labels=ids).loss.backward()
    trainable = [(n, p) for n, p in lora.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n, _ in trainable)
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for _, p in trainable)
    assert any("gate_proj.lora_B" in n and p.grad.abs().sum() > 0 for n, p in trainable)


def test_lora_adapter_saves_loads_on_a_fresh_base_and_merges(tmp_path):
    from peft import AutoPeftModelForCausalLM, LoraConfig, get_peft_model

    make_model().save_pretrained(tmp_path / "base")
    base = AutoModelForCausalLM.from_pretrained(tmp_path / "base")
    lora_config = LoraConfig(r=4, task_type="CAUSAL_LM", target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                             init_lora_weights=False)  # random B: the adapter changes the outputs
    adapted = get_peft_model(base, lora_config).eval()
    ids = tokens(2, 48)
    with torch.no_grad():
        expected = adapted(input_ids=ids).logits
        assert (expected - make_model()(ids).logits).abs().max() > 1e-3
    adapted.save_pretrained(tmp_path / "adapter")
    loaded = AutoPeftModelForCausalLM.from_pretrained(tmp_path / "adapter").eval()
    merged = loaded.merge_and_unload()
    assert type(merged) is NSAForCausalLM
    with torch.no_grad():
        assert_close(merged(ids).logits, expected, atol=1e-5)
        assert torch.equal(merged.generate(ids, max_new_tokens=5, do_sample=False),
                           adapted.generate(input_ids=ids, max_new_tokens=5, do_sample=False))


def test_checkpoint_without_nsa_weights_loads_with_the_nsa_init(tmp_path):
    # A dense checkpoint (q/k/v/o, MLP, norms, embeddings only) loads into an NSA model whose gates start at 1/3 and
    # whose compression starts as mean pooling, whatever the seed.
    from safetensors.torch import load_file, save_file

    make_model(seed=3).save_pretrained(tmp_path)
    weights = load_file(tmp_path / "model.safetensors")
    dense = {k: v for k, v in weights.items() if not any(s in k for s in ("gate_proj", "compress_"))}
    assert len(dense) < len(weights)
    save_file(dense, tmp_path / "model.safetensors", metadata={"format": "pt"})
    for seed in (0, 1):
        torch.manual_seed(seed)
        model = NSAForCausalLM.from_pretrained(tmp_path)
        for name, param in model.state_dict().items():
            if name in dense:
                assert torch.equal(param, dense[name]), name
        for layer in model.model.layers:
            attn = layer.self_attn
            assert torch.equal(attn.gate_proj.weight, torch.zeros_like(attn.gate_proj.weight))
            assert_close(torch.sigmoid(attn.gate_proj.bias), torch.full((12,), 1 / 3), atol=1e-7)
            for phi in (attn.compress_key, attn.compress_value):
                assert not phi.position_embedding.any()
                assert not phi.down_proj.weight.any() and not phi.down_proj.bias.any()
                assert phi.up_proj.weight.std() > 0
