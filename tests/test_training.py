"""
The warm-up recipe (`nsa_hf.training`, `examples/warmup_nsa.py`): which parameters are NSA's own, stage 1 trains only
those and lowers the selection-alignment loss, the loss is the KL it says it is (packed documents alike), and the
example script runs both stages on a folder of text.
"""

import importlib.util
import os

import pytest
import torch
from test_conversion import make_source

from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from nsa_hf import NSAForCausalLM
from nsa_hf.conversion import convert_checkpoint
from nsa_hf.kernels import unfold_compression_blocks
from nsa_hf.kernels.reference import compressed_attention_ref, selection_scores_ref
from nsa_hf.training import freeze_all_but_nsa, nsa_parameters, selection_alignment_loss

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# 128-token sequences hold 8 selection blocks of 16, of which 4 are selected: the selection has choices to make
SIZES = dict(compress_block_size=8, compress_stride=4, select_block_size=16, num_selected_blocks=4, window_size=16)


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """
    A tiny Llama with a byte vocabulary, converted with separate branch K/V. Its weights are 10x the usual init, so
    that its attention is far from uniform and the block selection has something to align with.
    """
    folder = tmp_path_factory.mktemp("models")
    make_source(folder / "src", "llama", vocab_size=256, initializer_range=0.2)
    convert_checkpoint(folder / "src", folder / "nsa", shared_kv=False, **SIZES)
    return folder / "nsa"


def ids(batch=2, seq=128, seed=0):
    return torch.randint(0, 256, (batch, seq), generator=torch.Generator().manual_seed(seed))


def test_nsa_parameters_are_the_gates_compressions_and_branch_projections(converted):
    model = NSAForCausalLM.from_pretrained(converted)
    names = set(nsa_parameters(model))
    modules = {n.split(".")[4] for n in names}
    assert modules == {"gate_proj", "compress_key", "compress_value", "cmp_k_proj", "cmp_v_proj", "win_k_proj",
                       "win_v_proj"}
    assert not [n for n in names if ".mlp." in n or ".q_proj." in n]  # not the MLP's own gate_proj
    trainable = freeze_all_but_nsa(model)
    assert set(trainable) == names == {n for n, p in model.named_parameters() if p.requires_grad}
    with pytest.raises(ValueError, match="has no NSA attention layers"):
        nsa_parameters(torch.nn.Linear(2, 2))


def test_stage_1_trains_only_nsa_parameters_and_lowers_the_alignment_loss(converted):
    torch.manual_seed(0)
    model = NSAForCausalLM.from_pretrained(converted).train()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainable = freeze_all_but_nsa(model)
    optimizer = torch.optim.Adam(trainable.values(), lr=3e-3)
    batch = ids()
    losses = []
    for _ in range(12):
        alignment, outputs = selection_alignment_loss(model, batch, labels=batch, return_outputs=True)
        (outputs.loss + alignment).backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(alignment.item())
    assert losses[-1] < 0.8 * losses[0], losses
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed == set(trainable), changed ^ set(trainable)


def test_alignment_loss_is_the_kl_of_dense_block_mass_and_selection_scores(converted):
    model = NSAForCausalLM.from_pretrained(converted).eval()
    batch = ids(batch=1, seq=100)
    with torch.no_grad():
        loss = selection_alignment_loss(model, batch, max_queries=1000)
    # brute force from the reference: every query with a choosable block, every layer
    config, kls = model.config, []
    recorded = {}
    hooks = [layer.self_attn.register_forward_pre_hook(
        lambda m, a, kw: recorded.setdefault(m, kw) and None, with_kwargs=True) for layer in model.model.layers]
    with torch.no_grad():
        model(batch)
        for hook in hooks:
            hook.remove()
        for layer in model.model.layers:
            attn, kw = layer.self_attn, recorded[layer.self_attn]
            states = attn._branch_states(kw["hidden_states"], None, None, *kw["position_embeddings"])
            h = kw["hidden_states"]
            q = attn.q_proj(h).view(1, 100, -1, 16)
            k = attn.k_proj(h).view(1, 100, -1, 16)
            q, k = apply_rotary_pos_emb(q, k, *kw["position_embeddings"], unsqueeze_dim=2)
            k_cmp = attn.compress_key(unfold_compression_blocks(states["cmp_key"], 8, 4))
            _, lse = compressed_attention_ref(q, k_cmp, k_cmp, 8, 4)
            score = selection_scores_ref(q, k_cmp, lse, 8, 4, 16)[0]  # [T, kv, blocks], summed over the group
            probs = torch.softmax((torch.einsum("thd,shd->hts", q[0], k[0].repeat_interleave(2, 1)) / 4)
                                  .masked_fill(torch.ones(100, 100).triu(1).bool(), float("-inf")), -1)
            mass = torch.nn.functional.pad(probs, (0, 12)).view(4, 100, 7, 16).sum(-1)  # [heads, T, blocks]
            mass = mass.view(2, 2, 100, 7).sum(1).permute(1, 0, 2)  # [T, kv, blocks]
            for t in range(3 * 16, 100):
                choosable = torch.zeros(7, dtype=torch.bool)
                choosable[config.num_initial_blocks : t // 16 - config.num_local_blocks + 1] = True
                p = mass[t][:, choosable] / mass[t][:, choosable].sum(-1, keepdim=True)
                r = score[t][:, choosable] / score[t][:, choosable].sum(-1, keepdim=True)
                kls += list((p * (p / r).log()).sum(-1))
    assert torch.allclose(loss, torch.stack(kls).mean(), rtol=1e-4), (loss, torch.stack(kls).mean())


def test_alignment_below_max_query_position_is_the_alignment_of_the_document_cut_there(converted):
    # a causal model: queries below the cut see the same keys, and the evenly spaced queries are the same positions
    model = NSAForCausalLM.from_pretrained(converted).eval()
    batch = ids(batch=2, seq=100)
    with torch.no_grad():
        cut = selection_alignment_loss(model, batch[:, :70])
        limited = selection_alignment_loss(model, batch, max_query_position=70)
        full = selection_alignment_loss(model, batch)
    assert torch.allclose(limited, cut, rtol=1e-5), (limited, cut)
    assert not torch.allclose(limited, full, rtol=1e-3)
    with pytest.raises(ValueError, match="below max_query_position=48"):
        selection_alignment_loss(model, batch, max_query_position=48)  # no choosable block below position 48


@pytest.mark.parametrize("bad", [0, -5, 2.5, True, "4096"])
def test_alignment_max_query_position_must_be_a_positive_integer(converted, bad):
    model = NSAForCausalLM.from_pretrained(converted).eval()
    with pytest.raises(ValueError, match=f"max_query_position must be None or a positive integer.*{bad!r}"):
        selection_alignment_loss(model, ids(batch=1, seq=100), max_query_position=bad)


def test_packed_documents_give_the_loss_of_separate_rows(converted):
    model = NSAForCausalLM.from_pretrained(converted).eval()
    a, b = ids(1, 70, seed=1), ids(1, 90, seed=2)
    with torch.no_grad():
        separate = [selection_alignment_loss(model, x) for x in (a, b)]
        packed = selection_alignment_loss(model, torch.cat([a, b], 1),
                                          position_ids=torch.cat([torch.arange(70), torch.arange(90)])[None])
    # means over (queries x kv heads x layers): 70 tokens give 70 - 48 = 22 queries, 90 give 42
    expected = (22 * separate[0] + 42 * separate[1]) / 64
    assert torch.allclose(packed, expected, rtol=1e-5), (packed, expected)
    with pytest.raises(ValueError, match="takes no padded batches"):
        selection_alignment_loss(model, a, attention_mask=torch.ones(1, 70).index_fill(1, torch.tensor([0]), 0))
    with pytest.raises(ValueError, match="no document is long enough"):
        selection_alignment_loss(model, ids(1, 40))


def _example():
    spec = importlib.util.spec_from_file_location("warmup_nsa", os.path.join(REPO_ROOT, "examples", "warmup_nsa.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_example_runs_two_steps_of_each_stage(converted, tmp_path, capsys):
    data = tmp_path / "texts"
    (data / "more").mkdir(parents=True)
    text = "Native Sparse Attention reads compressed blocks, the selected ones and a window. " * 6
    for i in range(4):
        (data / f"doc{i}.txt").write_text(text[i:])
    (data / "more" / "notes.md").write_text(text[::-1])
    example = _example()
    common = ["--data", str(data), "--byte-level", "--seq-len", "160", "--batch-size", "2", "--max-steps", "2",
              "--logging-steps", "1"]
    example.main(["--stage", "1", "--model", str(converted), "--output", str(tmp_path / "one"), *common])
    out = capsys.readouterr().out
    assert "stage 1: training" in out and "alignment_kl" in out
    example.main(["--stage", "2", "--model", str(tmp_path / "one"), "--output", str(tmp_path / "two"), *common])
    assert "stage 2: training" in capsys.readouterr().out
    start, one, two = (NSAForCausalLM.from_pretrained(p) for p in (converted, tmp_path / "one", tmp_path / "two"))
    nsa = set(nsa_parameters(start))
    moved = {name for name, p in start.named_parameters() if not torch.equal(p, one.get_parameter(name))}
    assert moved <= nsa and {n for n in nsa if "gate_proj" in n or "down_proj" in n} <= moved, moved ^ nsa
    assert not torch.equal(one.model.layers[0].self_attn.q_proj.weight, two.model.layers[0].self_attn.q_proj.weight)
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit, match="no .txt/.md files"):
        example.main(["--stage", "1", "--model", str(converted), "--output", str(tmp_path / "x"),
                      "--data", str(tmp_path / "empty"), "--byte-level"])
