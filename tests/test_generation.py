"""
NSACache and generation on CPU (reference backend), fp32: incremental decoding and chunked prefill equal one full
forward, padded rows equal the rows alone, generate (greedy, sampling, beams, left-padded batches) works.
"""

import contextlib

import pytest
import torch
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

from nsa_hf import NSAConfig, NSAForCausalLM
from nsa_hf.kernels import num_compressed_blocks, unfold_compression_blocks
from nsa_hf.modeling import NSACache, NSAStaticCache

from _tiny import NSA_SIZES, VARIANTS, one_thread  # noqa: F401  (one_thread: autouse fixture)
from _tiny import DIMS as _TINY_DIMS

DIMS = dict(_TINY_DIMS, pad_token_id=0, bos_token_id=None, eos_token_id=None)


def make_model(seed=0, **overrides) -> NSAForCausalLM:
    torch.manual_seed(seed)
    model = NSAForCausalLM(NSAConfig(**{**DIMS, **NSA_SIZES, **overrides}))
    with torch.no_grad():  # gates and phi off their init, so that every branch matters
        for name, param in model.named_parameters():
            if any(key in name for key in ("gate_proj", "compress_key", "compress_value")):
                param.normal_(0.0, 0.2)
    return model.eval()


def tokens(batch, length, seed=1):
    # never the pad id 0, so that generated continuations compare cleanly
    return torch.randint(1, DIMS["vocab_size"], (batch, length), generator=torch.Generator().manual_seed(seed))


def cache_of(output):
    """The cache of a model/generate output: `cache` in transformers >= 5.24, `past_key_values` before."""
    return output["cache"] if "cache" in output.keys() else output["past_key_values"]


def assert_close(actual, expected, atol=1e-4):
    torch.testing.assert_close(actual, expected, rtol=0, atol=atol)


def left_pad(rows):
    width = max(r.shape[1] for r in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, row in enumerate(rows):
        ids[i, width - row.shape[1] :], mask[i, width - row.shape[1] :] = row[0], 1
    return ids, mask


# ----------------------------------------------------------------------------------------------- cache


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_chunked_prefill_and_decoding_equal_one_full_forward(variant):
    model = make_model(**VARIANTS[variant])
    ids = tokens(2, 100)
    with torch.no_grad():
        full = model(ids).logits
        out = model(ids[:, :45], use_cache=True)
        cache = cache_of(out)
        assert isinstance(cache, NSACache)
        pieces = [out.logits]
        pieces.append(model(ids[:, 45:75], past_key_values=cache).logits)  # a chunk that completes several blocks
        for t in range(75, 100):
            pieces.append(model(ids[:, t : t + 1], past_key_values=cache).logits)
    assert cache.get_seq_length() == 100
    assert_close(torch.cat(pieces, dim=1), full)


def _count_compressed_blocks(model):
    """Hook phi of every layer's keys; return the list that collects how many blocks each call compressed."""
    counts = []
    for layer in model.model.layers:
        layer.self_attn.compress_key.register_forward_hook(
            lambda module, args, output: counts.append(output.shape[:-2].numel())
        )
    return counts


def _assert_cache_holds_the_compressed_sequence(model, cache, lengths):
    """Every row's cached compressed blocks equal phi of the blocks cut from the row's cached keys."""
    for layer, attn in zip(cache.layers, (m.self_attn for m in model.model.layers)):
        for b, n in enumerate(lengths):
            keys = layer.buffers["key"][b : b + 1, :n]
            expected = attn.compress_key(unfold_compression_blocks(keys, 8, 4))[0]
            count = num_compressed_blocks(n, 8, 4)
            assert_close(layer.buffers["compressed_key"][b, :count], expected, atol=1e-6)


def test_blocks_are_compressed_when_they_complete_and_never_again():
    model = make_model()
    counts = _count_compressed_blocks(model)
    ids = tokens(3, 90)
    layers = model.config.num_hidden_layers
    with torch.no_grad():
        cache = cache_of(model(ids[:, :30], use_cache=True))
        assert sum(counts) == layers * 3 * num_compressed_blocks(30, 8, 4)  # the prefill: its own blocks only
        counts.clear()
        for t in range(30, 90):
            model(ids[:, t : t + 1], past_key_values=cache)
    # a decoding step compresses one candidate block per row (ceil(1 / stride)), branch-free; the prefix never again
    assert counts == [3] * (layers * 60)
    _assert_cache_holds_the_compressed_sequence(model, cache, [90, 90, 90])
    # the same with rows of different real lengths (left padding)
    rows = [tokens(1, n, seed=i) for i, n in enumerate((30, 17, 4))]
    ids, mask = left_pad(rows)
    more = tokens(3, 60, seed=7)
    with torch.no_grad():
        cache = cache_of(model(ids, attention_mask=mask, use_cache=True))
        for t in range(60):
            mask = torch.cat([mask, torch.ones(3, 1, dtype=torch.long)], dim=1)
            model(more[:, t : t + 1], attention_mask=mask, past_key_values=cache)
    _assert_cache_holds_the_compressed_sequence(model, cache, [r.shape[1] + 60 for r in rows])
    assert cache.seqlens.tolist() == [90, 77, 64]


@pytest.mark.parametrize("variant", ["mlp", "separate_kv"])
def test_left_padded_cached_decoding_equals_each_row_alone(variant):
    model = make_model(**VARIANTS[variant])
    rows = [tokens(1, n, seed=i) for i, n in enumerate((50, 23, 6))]
    more = tokens(3, 40, seed=5)
    ids, mask = left_pad(rows)
    with torch.no_grad():
        out = model(ids, attention_mask=mask, use_cache=True)
        cache = cache_of(out)
        prefill = out.logits
        mask = torch.cat([mask, torch.ones(3, 10, dtype=torch.long)], dim=1)
        pieces = [model(more[:, :10], attention_mask=mask, past_key_values=cache).logits]
        for t in range(10, 40):
            mask = torch.cat([mask, torch.ones(3, 1, dtype=torch.long)], dim=1)
            pieces.append(model(more[:, t : t + 1], attention_mask=mask, past_key_values=cache).logits)
        decoded = torch.cat(pieces, dim=1)
        for i, row in enumerate(rows):
            alone = model(torch.cat([row, more[i : i + 1]], dim=1)).logits[0]
            n = row.shape[1]
            assert_close(prefill[i, -n:], alone[:n])
            assert_close(decoded[i], alone[n:])


def test_crop_and_batch_edits_keep_the_cache_consistent():
    model = make_model()
    rows = [tokens(1, n, seed=i) for i, n in enumerate((45, 31))]
    more = tokens(2, 30, seed=3)
    ids, mask = left_pad(rows)
    with torch.no_grad():
        cache = cache_of(model(ids, attention_mask=mask, use_cache=True))
        mask = torch.cat([mask, torch.ones(2, 30, dtype=torch.long)], dim=1)
        model(more[:, :20], attention_mask=mask[:, :-10], past_key_values=cache)
        # roll back 12 tokens (as assisted decoding does) and go on from there
        cache.crop(-12)
        assert cache.get_seq_length() == 45 + 8
        logits = model(more[:, 8:30], attention_mask=mask, past_key_values=cache).logits
        for i, row in enumerate(rows):
            alone = model(torch.cat([row, more[i : i + 1]], dim=1)).logits[0, -22:]
            assert_close(logits[i], alone)
        # keep only the second row, then decode it alone
        cache.batch_select_indices(torch.tensor([1]))
        nxt = tokens(1, 1, seed=9)
        step = model(nxt, attention_mask=torch.cat([mask[1:], torch.ones(1, 1, dtype=torch.long)], 1),
                     past_key_values=cache).logits
        alone = model(torch.cat([rows[1], more[1:2], nxt], dim=1)).logits[0, -1]
        assert_close(step[0, -1], alone)
        # duplicate it (beam expansion), the two copies decode alike
        cache.batch_repeat_interleave(2)
        nxt2 = tokens(2, 1, seed=4)[:1].repeat(2, 1)
        mask2 = torch.ones(2, cache.get_seq_length() + 1, dtype=torch.long)
        mask2[:, :45 - 31] = 0
        two = model(nxt2, attention_mask=mask2, past_key_values=cache).logits
        assert_close(two[0], two[1], atol=1e-6)


def test_an_empty_cache_of_another_kind_is_replaced_by_an_nsa_cache():
    model = make_model()
    ids = tokens(1, 20)
    with torch.no_grad():
        out = model(ids, past_key_values=DynamicCache(), use_cache=True)
    assert isinstance(cache_of(out), NSACache) and cache_of(out).get_seq_length() == 20


@pytest.mark.parametrize("variant", ["mlp", "separate_kv"])
def test_static_cache_decodes_like_the_full_forward_with_left_padding(variant):
    model = make_model(**VARIANTS[variant])
    rows = [tokens(1, n, seed=i) for i, n in enumerate((41, 16, 7))]
    more = tokens(3, 30, seed=5)
    ids, mask = left_pad(rows)
    cache = NSAStaticCache(model.config, max_cache_len=80)
    with torch.no_grad():
        prefill = model(ids, attention_mask=mask, past_key_values=cache).logits
        pieces = []
        chunk_mask = torch.ones(3, 3, dtype=torch.long)
        chunk_mask[2, 0] = 0  # a padded slot inside a decoding chunk
        pieces.append(model(more[:, :3], attention_mask=chunk_mask, past_key_values=cache).logits)
        for t in range(3, 30):  # the new tokens' mask alone: the shape a compiled step sees
            pieces.append(model(more[:, t : t + 1], attention_mask=torch.ones(3, 1, dtype=torch.long),
                                past_key_values=cache).logits)
    decoded = torch.cat(pieces, dim=1)
    assert cache.seqlens.tolist() == [41 + 30, 16 + 30, 7 + 29]
    for i, row in enumerate(rows):
        extra = more[i : i + 1] if i < 2 else more[i : i + 1, 1:]  # row 2's first new slot was padding
        alone = model(torch.cat([row, extra], dim=1)).logits[0]
        n = row.shape[1]
        assert_close(prefill[i, -n:], alone[:n])
        assert_close(decoded[i] if i < 2 else decoded[i, 1:], alone[n:])


def test_static_cache_refuses_to_overflow_and_keeps_its_buffers():
    model = make_model()
    cache = NSAStaticCache(model.config, max_cache_len=40)
    with torch.no_grad():
        model(tokens(2, 30), past_key_values=cache)
        buffers = {name: buf.data_ptr() for name, buf in cache.layers[0].buffers.items()}
        for t in range(10):
            model(tokens(2, 1, seed=t), past_key_values=cache)
        assert {name: buf.data_ptr() for name, buf in cache.layers[0].buffers.items()} == buffers
        assert int(cache.get_seq_length()) == 40
        with pytest.raises(ValueError, match="max_cache_len=40"):
            model(tokens(2, 1), past_key_values=cache)
    with pytest.raises(ValueError, match="max_cache_len"):
        NSAStaticCache(model.config, max_cache_len=0)


def test_static_cache_crop_and_beam_reorder_match_the_dynamic_cache():
    model = make_model()
    ids = tokens(2, 37)
    with torch.no_grad():
        results = []
        for cache in (NSACache(model.config), NSAStaticCache(model.config, max_cache_len=64)):
            model(ids[:, :30], past_key_values=cache)
            model(ids[:, 30:], past_key_values=cache)
            cache.crop(-5)
            cache.reorder_cache(torch.tensor([1, 0]))
            results.append(model(tokens(2, 2, seed=3), past_key_values=cache).logits)
    assert_close(results[1], results[0], atol=1e-6)


def test_static_cache_tokens_past_its_capacity_leave_the_held_tokens_intact():
    # Compiled and captured steps skip the capacity check (it would sync): a chunk that runs past the capacity must
    # write its extra tokens to the scratch column, not over the last held token.
    model = make_model()
    ids = tokens(1, 42)
    cache = NSAStaticCache(model.config, max_cache_len=40)
    cache.check_capacity = lambda new_lengths: None
    with torch.no_grad():
        model(ids[:, :36], past_key_values=cache)
        logits = model(ids[:, 36:], past_key_values=cache).logits
        full = model(ids[:, :40]).logits
    assert_close(logits[:, :4], full[:, 36:40])


def test_decoding_step_with_a_static_cache_compiles_without_graph_breaks():
    model = make_model()
    cache = NSAStaticCache(model.config, max_cache_len=64)
    ids = tokens(2, 40)
    with torch.no_grad():
        model(ids[:, :30], past_key_values=cache)
        eager = NSAStaticCache(model.config, max_cache_len=64)
        model(ids[:, :30], past_key_values=eager)
        torch._dynamo.reset()
        compiled = torch.compile(model, fullgraph=True, backend="eager", dynamic=False)
        for t in range(30, 36):  # fullgraph=True raises at any graph break
            step = dict(attention_mask=torch.ones(2, 1, dtype=torch.long))
            out = compiled(ids[:, t : t + 1], past_key_values=cache, **step).logits
            ref = model(ids[:, t : t + 1], past_key_values=eager, **step).logits
            assert_close(out, ref, atol=1e-5)
    # one graph for every step: nothing in a step depends on the current length on the host
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1


# ----------------------------------------------------------------------------------------------- generate


def test_greedy_generate_equals_a_plain_loop_and_needs_no_cache():
    model = make_model()
    ids = tokens(2, 40)
    generated = model.generate(ids, max_new_tokens=40, do_sample=False)
    assert torch.equal(generated, model.generate(ids, max_new_tokens=40, do_sample=False, use_cache=False))
    sequence = ids
    with torch.no_grad():
        for _ in range(40):
            sequence = torch.cat([sequence, model(sequence).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(generated, sequence)


def test_generate_makes_an_nsa_cache():
    model = make_model()
    out = model.generate(tokens(1, 30), max_new_tokens=5, do_sample=False, return_dict_in_generate=True)
    cache = cache_of(out)
    assert isinstance(cache, NSACache) and cache.get_seq_length() == 34  # the last token is not fed back


def test_generate_with_a_static_cache_equals_the_dynamic_cache():
    model = make_model()
    rows = [tokens(1, n, seed=i) for i, n in enumerate((33, 9))]
    ids, mask = left_pad(rows)
    kwargs = dict(attention_mask=mask, max_new_tokens=25, do_sample=False)
    out = model.generate(ids, cache_implementation="static", return_dict_in_generate=True, **kwargs)
    assert isinstance(cache_of(out), NSAStaticCache)
    assert torch.equal(out.sequences, model.generate(ids, **kwargs))
    beams = dict(max_new_tokens=10, num_beams=3, do_sample=False)
    assert torch.equal(model.generate(ids[:1], cache_implementation="static", **beams),
                       model.generate(ids[:1], **beams))


def test_sampling_is_reproducible_and_cache_independent():
    model = make_model()
    ids = tokens(2, 30)
    kwargs = dict(max_new_tokens=30, do_sample=True, top_k=20, temperature=0.9)
    torch.manual_seed(123)
    first = model.generate(ids, **kwargs)
    torch.manual_seed(123)
    second = model.generate(ids, **kwargs)
    torch.manual_seed(123)
    uncached = model.generate(ids, use_cache=False, **kwargs)
    assert first.shape == (2, 60) and torch.equal(first, second) and torch.equal(first, uncached)
    assert int(first.min()) >= 0 and int(first.max()) < DIMS["vocab_size"]


@pytest.mark.parametrize("variant", ["mlp", "separate_kv"])
def test_left_padded_batch_generates_what_each_prompt_generates_alone(variant):
    model = make_model(**VARIANTS[variant])
    rows = [tokens(1, n, seed=i) for i, n in enumerate((44, 19, 3))]
    ids, mask = left_pad(rows)
    batch = model.generate(ids, attention_mask=mask, max_new_tokens=35, do_sample=False)
    for i, row in enumerate(rows):
        alone = model.generate(row, max_new_tokens=35, do_sample=False)
        assert torch.equal(batch[i, -35:], alone[0, -35:]), i


def test_beam_search_with_the_cache_equals_without():
    model = make_model()
    ids = tokens(2, 30)
    kwargs = dict(max_new_tokens=15, num_beams=3, do_sample=False)
    assert torch.equal(model.generate(ids, **kwargs), model.generate(ids, use_cache=False, **kwargs))


def _generate_unless_refused(model, ids, **kwargs):
    """generate, or None where transformers (< 5.24) refuses assisted decoding with a static cache."""
    try:
        return model.generate(ids, **kwargs)
    except ValueError as error:
        if kwargs.get("cache_implementation") == "static" and "not supported with Static cache" in str(error):
            return None
        raise


def test_prompt_lookup_and_assisted_decoding_equal_greedy_decoding():
    # The prompt repeats, so lookups propose candidates up to the last step; the target model's verification forward
    # then runs past `max_length - 1` tokens, and rejected candidates are cropped from the cache.
    model = make_model()
    ids = tokens(1, 30)
    repeated = torch.cat([ids, ids, ids], dim=1)
    kwargs = dict(max_new_tokens=30, do_sample=False)
    greedy = model.generate(repeated, **kwargs)
    assistant = make_model(seed=3)
    for cache_implementation in (None, "static"):
        cached = dict(kwargs, cache_implementation=cache_implementation)
        for assisted in (dict(prompt_lookup_num_tokens=5), dict(assistant_model=assistant)):
            out = _generate_unless_refused(model, repeated, **assisted, **cached)
            assert out is None or torch.equal(out, greedy), (cache_implementation, assisted)
    model.set_attn_implementation("sdpa")  # transformers' StaticCache, the same verification forwards
    out = _generate_unless_refused(model, repeated, prompt_lookup_num_tokens=5, cache_implementation="static", **kwargs)
    assert out is None or torch.equal(out, model.generate(repeated, **kwargs))


def test_text_generation_pipeline_batches_like_single_prompts():
    from transformers import ByT5Tokenizer, pipeline

    tokenizer = ByT5Tokenizer()  # byte-level: no vocabulary file to download
    generator = pipeline("text-generation", model=make_model(vocab_size=len(tokenizer)), tokenizer=tokenizer)
    prompts = ["Hi", "a longer prompt, so that the batch is padded"]
    kwargs = dict(max_new_tokens=12, do_sample=False)
    alone = [generator(prompt, **kwargs)[0]["generated_text"] for prompt in prompts]
    batched = [out[0]["generated_text"] for out in generator(prompts, batch_size=2, **kwargs)]
    assert batched == alone and all(text.startswith(prompt) and len(text) > len(prompt)
                                    for text, prompt in zip(alone, prompts))


def test_dense_mode_generates_like_llama():
    torch.manual_seed(0)
    llama = LlamaForCausalLM._from_config(LlamaConfig(**DIMS), attn_implementation="sdpa").eval()
    nsa = NSAForCausalLM._from_config(NSAConfig(**DIMS, **NSA_SIZES), attn_implementation="sdpa").eval()
    nsa.load_state_dict(llama.state_dict(), strict=False)
    rows = [tokens(1, n, seed=i) for i, n in enumerate((30, 12))]
    ids, mask = left_pad(rows)
    kwargs = dict(attention_mask=mask, max_new_tokens=20, do_sample=False)
    assert torch.equal(nsa.generate(ids, **kwargs), llama.generate(ids, **kwargs))


def test_static_cache_generate_compiles_one_decoding_graph_for_every_step():
    # generate's own compilation of the static-cache step (as on a GPU), with the eager backend so that it runs here;
    # a step input whose strides grow with the length (a view of the padding mask) would recompile at every step
    from transformers import CompileConfig

    model = make_model()
    ids, mask = left_pad([tokens(1, n, seed=i) for i, n in enumerate((33, 9))])
    config = CompileConfig(backend="eager", fullgraph=True, dynamic=False)
    config._compile_all_devices = True
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    kwargs = dict(attention_mask=mask, max_new_tokens=12, do_sample=False)
    compiled = model.generate(ids, cache_implementation="static", compile_config=config, **kwargs)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1
    assert torch.equal(compiled, model.generate(ids, **kwargs))
    torch._dynamo.reset()


# ----------------------------------------------------------------------------------------------- GPU


@pytest.mark.gpu
def test_gpu_cached_decoding_matches_full_forward():
    torch.manual_seed(0)
    config = NSAConfig(
        vocab_size=1024, hidden_size=512, intermediate_size=1024, num_hidden_layers=2, num_attention_heads=8,
        num_key_value_heads=2, head_dim=64, compress_block_size=32, compress_stride=16, select_block_size=64,
        num_selected_blocks=8, window_size=256, pad_token_id=0, bos_token_id=None, eos_token_id=None,
    )
    model = NSAForCausalLM(config).to("cuda", torch.bfloat16).eval()
    rows = [torch.randint(1, 1024, (1, n), device="cuda") for n in (1500, 900)]
    width = 1500
    ids = torch.zeros(2, width, dtype=torch.long, device="cuda")
    mask = torch.zeros_like(ids)
    for i, row in enumerate(rows):
        ids[i, width - row.shape[1] :], mask[i, width - row.shape[1] :] = row[0], 1
    more = torch.randint(1, 1024, (2, 64), device="cuda")
    with torch.no_grad():
        cache = cache_of(model(ids, attention_mask=mask, use_cache=True))
        steps = []
        for t in range(64):
            mask = torch.cat([mask, torch.ones(2, 1, dtype=torch.long, device="cuda")], dim=1)
            steps.append(model(more[:, t : t + 1], attention_mask=mask, past_key_values=cache).logits)
        decoded = torch.cat(steps, dim=1).float()
        for i, row in enumerate(rows):
            alone = model(torch.cat([row, more[i : i + 1]], dim=1)).logits[0, -64:].float()
            assert (decoded[i] - alone).abs().max() < 0.05 * alone.abs().max()
        # batch 1, no padding: the plain cached path
        cache = cache_of(model(rows[0], use_cache=True))
        step = model(more[:1, :1], past_key_values=cache).logits[0, -1].float()
        alone = model(torch.cat([rows[0], more[:1, :1]], dim=1)).logits[0, -1].float()
        assert (step - alone).abs().max() < 0.05 * alone.abs().max()


def _gpu_model():
    torch.manual_seed(0)
    config = NSAConfig(
        vocab_size=1024, hidden_size=512, intermediate_size=1024, num_hidden_layers=2, num_attention_heads=8,
        num_key_value_heads=2, head_dim=64, compress_block_size=32, compress_stride=16, select_block_size=64,
        num_selected_blocks=8, window_size=256, pad_token_id=0, bos_token_id=None, eos_token_id=None,
    )
    return NSAForCausalLM(config).to("cuda", torch.bfloat16).eval()


@pytest.mark.gpu
def test_gpu_static_cache_generate_compiles_and_matches_the_dynamic_cache():
    model = _gpu_model()
    rows = [torch.randint(1, 1024, (1, n), device="cuda") for n in (1100, 700)]
    ids = torch.zeros(2, 1100, dtype=torch.long, device="cuda")
    mask = torch.zeros_like(ids)
    for i, row in enumerate(rows):
        ids[i, 1100 - row.shape[1] :], mask[i, 1100 - row.shape[1] :] = row[0], 1
    kwargs = dict(attention_mask=mask, max_new_tokens=40, do_sample=False, return_dict_in_generate=True,
                  output_logits=True)
    dynamic = model.generate(ids, **kwargs)
    static = model.generate(ids, cache_implementation="static", **kwargs)
    assert hasattr(model, "_compiled_call")  # generate compiled the decoding step, as for transformers' StaticCache
    first = torch.stack(dynamic.logits[:8]).float()  # [step, row, vocab]
    # Per (step, row): a near-tied top-n block choice may flip between inductor's and eager's bf16 rounding of the
    # gates / compression, and moves that step's logits by more than rounding; the others agree to rounding.
    err = (torch.stack(static.logits[:8]).float() - first).abs().amax(-1)
    close = err < 0.05 * first.abs().max()
    assert close.float().mean() >= 0.875 and err.median() < 0.02 * first.abs().max(), err
    assert (static.sequences[:, :1108] == dynamic.sequences[:, :1108]).float().mean() > 0.99


@contextlib.contextmanager
def _triton_compilations():
    """The names of the Triton kernels compiled inside the block (Triton's post-compile hook)."""
    import triton

    compiled = []
    triton.knobs.runtime.jit_post_compile_hook = lambda *a, **k: compiled.append(getattr(k.get("fn"), "name", "?"))
    try:
        yield compiled
    finally:
        triton.knobs.runtime.jit_post_compile_hook = None


@pytest.mark.gpu
def test_gpu_after_warmup_a_new_prompt_length_compiles_no_kernel():
    import nsa_hf

    model = _gpu_model()
    with torch.no_grad():
        nsa_hf.warmup(model, max_length=8192)
        with _triton_compilations() as compiled:
            for length in (4097, 2345, 6001):
                model.generate(torch.randint(1, 1024, (1, length), device="cuda"), max_new_tokens=20,
                               do_sample=False)
    assert compiled == []


@pytest.mark.gpu
def test_gpu_a_new_prompt_length_compiles_no_kernel_without_warmup():
    # the forward kernels never specialise on the integers that follow the length (== 1, divisible by 16), so a
    # prompt of a length not seen before runs the kernels the first one compiled
    model = _gpu_model()
    with torch.no_grad():
        model(torch.randint(1, 1024, (1, 4096), device="cuda"), use_cache=False)
        with _triton_compilations() as compiled:
            for length in (4097, 4111, 4999, 6001):
                model(torch.randint(1, 1024, (1, length), device="cuda"), use_cache=False)
    assert compiled == []


@pytest.mark.gpu
def test_gpu_the_first_prompt_past_the_long_context_boundary_compiles_no_kernel(monkeypatch):
    # the selected forward switches kernels at long documents (32k keys; lowered here to 5000): the model's first call
    # compiles both regimes (`selected.compile_ahead`), so the first long prompt compiles nothing
    import dataclasses

    from nsa_hf.kernels import _tiling

    rules = _tiling.tuning(_tiling.device_limits(torch.device("cuda")))
    low = dataclasses.replace(rules, selected_long_context=5000, selected_by_block_keys=5000)
    monkeypatch.setitem(_tiling.TUNING, (9, 0), low)
    model = _gpu_model()
    with torch.no_grad():
        model(torch.randint(1, 1024, (1, 4096), device="cuda"), use_cache=False)
        with _triton_compilations() as compiled:
            for length in (6001, 7777):
                model(torch.randint(1, 1024, (1, length), device="cuda"), use_cache=False)
    assert compiled == []
