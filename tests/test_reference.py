"""
Proves the PyTorch reference (`nsa_hf/kernels/reference.py`, the oracle of every kernel) against the literal,
per-query brute force of `shared/NSA_SPEC.md` in `tests/_bruteforce.py`, plus crafted cases for each rule of the spec.

The reference runs its softmax in float32 even for float64 inputs (documented in its module docstring), so
comparisons against the float64 brute force use float32-level tolerances (ATOL/RTOL below); crafted cases whose
result is exact in float32 are compared exactly. `test_float64_inputs_keep_float64_precision` documents the gap.
"""

import math

import pytest
import torch
from _bruteforce import bf_mean_compress, bf_nsa, bf_nsa_varlen, bf_select, overlap_tokens

from nsa_hf.kernels import nsa_attention
from nsa_hf.kernels.reference import (
    compressed_attention_ref,
    nsa_attention_ref,
    select_blocks_ref,
    selected_attention_ref,
    selection_scores_ref,
    window_attention_ref,
)
from nsa_hf.kernels.utils import compressed_cu_seqlens, num_compressed_blocks, unfold_compression_blocks

ATOL, RTOL = 5e-6, 1e-5  # float32 softmax inside the reference vs float64 brute force


def _inputs(B, Tq, Tk, HQ, HKV, DK, DV, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Tq, HQ, DK, generator=g, dtype=dtype)
    k = torch.randn(B, Tk, HKV, DK, generator=g, dtype=dtype)
    v = torch.randn(B, Tk, HKV, DV, generator=g, dtype=dtype)
    gates = torch.rand(B, Tq, HQ, 3, generator=g, dtype=dtype)
    return q, k, v, gates


def _compress(x, l, d, cu_seqlens=None):
    return unfold_compression_blocks(x, l, d, cu_seqlens).mean(2)


def _ref(q, k, v, gates, *, l, d, lp, n, w, n_init=1, n_local=2, k_cmp=None, v_cmp=None, **kw):
    k_cmp = _compress(k, l, d, kw.get("cu_seqlens_k")) if k_cmp is None else k_cmp
    v_cmp = _compress(v, l, d, kw.get("cu_seqlens_k")) if v_cmp is None else v_cmp
    return nsa_attention_ref(
        q, k, v, k_cmp, v_cmp, gates, compress_block_size=l, compress_stride=d, select_block_size=lp,
        num_selected_blocks=n, window_size=w, num_initial_blocks=n_init, num_local_blocks=n_local,
        return_block_indices=True, **kw,
    )


def _bf(q, k, v, gates, *, l, d, lp, n, w, n_init=1, n_local=2, k_cmp=None, v_cmp=None, **kw):
    k_cmp = bf_mean_compress(k, l, d) if k_cmp is None else k_cmp
    v_cmp = bf_mean_compress(v, l, d) if v_cmp is None else v_cmp
    return bf_nsa(q, k, v, k_cmp, v_cmp, gates, l=l, d=d, lp=lp, n=n, w=w, n_init=n_init, n_local=n_local, **kw)


def _close(got, want, atol=ATOL, rtol=RTOL):
    torch.testing.assert_close(got.double(), want.double(), atol=atol, rtol=rtol)


# ---------------------------------------------------------------------------------------------------------------------
# compressed keys
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("l,d,T", [(8, 4, 37), (8, 8, 40), (32, 16, 100), (32, 16, 31), (32, 16, 32), (4, 1, 9), (8, 4, 1)])
def test_unfold_mean_equals_bruteforce_mean(l, d, T):
    x = torch.randn(2, T, 3, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(T))
    got = _compress(x, l, d)
    want = bf_mean_compress(x, l, d)
    assert got.shape == want.shape == (2, num_compressed_blocks(T, l, d), 3, 5)
    torch.testing.assert_close(got, want, atol=1e-12, rtol=0)


def test_unfold_mean_packed_equals_per_document_bruteforce():
    cu = torch.tensor([0, 5, 42, 120, 121], dtype=torch.int32)
    x = torch.randn(1, 121, 2, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    got = _compress(x, 8, 4, cu)
    per_doc = [bf_mean_compress(x[:, s:e], 8, 4) for s, e in zip(cu[:-1].tolist(), cu[1:].tolist())]
    torch.testing.assert_close(got, torch.cat(per_doc, dim=1), atol=1e-12, rtol=0)
    counts = [p.shape[1] for p in per_doc]
    assert counts == [0, 8, 18, 0]
    assert compressed_cu_seqlens(cu, 8, 4).tolist() == [0, 0, 8, 26, 26]


# ---------------------------------------------------------------------------------------------------------------------
# the whole op and each branch against the brute force, random inputs
# ---------------------------------------------------------------------------------------------------------------------

# (l, d, l', n, w, n_init, n_local, B, T, G, HKV, DK, DV): every T is a multiple of none of l, d, l'
CONFIGS = {
    "paper_blocks_g3": (32, 16, 64, 4, 40, 1, 2, 1, 333, 3, 1, 16, 8),
    "small_blocks_g2": (8, 4, 16, 5, 24, 1, 2, 2, 150, 2, 2, 16, 24),
    "fla_like_l_eq_d_eq_lp_g1": (16, 16, 16, 4, 20, 1, 2, 1, 130, 1, 3, 8, 12),
    "l_eq_d_lt_lp_g3": (8, 8, 24, 4, 10, 1, 2, 1, 157, 3, 1, 8, 4),
    "more_fixed_blocks_g2": (16, 8, 32, 7, 33, 2, 3, 1, 301, 2, 1, 8, 16),
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_nsa_matches_bruteforce(name):
    l, d, lp, n, w, n_init, n_local, B, T, G, HKV, DK, DV = CONFIGS[name]
    cfg = dict(l=l, d=d, lp=lp, n=n, w=w, n_init=n_init, n_local=n_local)
    q, k, v, gates = _inputs(B, T, T, G * HKV, HKV, DK, DV, seed=len(name))
    want = _bf(q, k, v, gates, **cfg)
    out, idx = _ref(q, k, v, gates, **cfg)
    assert out.dtype == torch.float64 and out.shape == (B, T, G * HKV, DV)
    assert torch.equal(idx.long(), want["blocks"])
    _close(out, want["out"])
    # the selection must not be trivial in these configs: some query chose among more eligible blocks than n
    eligible = torch.tensor([t // lp + 1 for t in range(T)])
    assert (eligible > n).any()

    # each branch on its own
    k_cmp, v_cmp = _compress(k, l, d), _compress(v, l, d)
    o_cmp, lse = compressed_attention_ref(q, k_cmp, v_cmp, l, d)
    _close(o_cmp, want["o_cmp"])
    scores = selection_scores_ref(q, k_cmp, lse, l, d, lp)
    _close(scores, want["scores"])
    assert torch.equal(select_blocks_ref(scores, lp, n, n_init, n_local).long(), want["blocks"])
    _close(selected_attention_ref(q, k, v, idx, lp), want["o_slc"])
    _close(window_attention_ref(q, k, v, w), want["o_win"])


def test_nsa_separate_window_kv_matches_bruteforce():
    l, d, lp, n, w = 8, 4, 16, 4, 11
    q, k, v, gates = _inputs(1, 70, 70, 4, 2, 8, 6, seed=3)
    _, k_win, v_win, _ = _inputs(1, 70, 70, 4, 2, 8, 6, seed=4)
    want = _bf(q, k, v, gates, l=l, d=d, lp=lp, n=n, w=w, k_win=k_win, v_win=v_win)
    out, idx = _ref(q, k, v, gates, l=l, d=d, lp=lp, n=n, w=w, k_win=k_win, v_win=v_win)
    assert torch.equal(idx.long(), want["blocks"])
    _close(out, want["out"])


def test_nsa_float32_inputs_match_bruteforce():
    cfg = dict(l=8, d=4, lp=16, n=4, w=9)
    q, k, v, gates = _inputs(2, 75, 75, 6, 2, 16, 8, dtype=torch.float32, seed=5)
    want = _bf(q, k, v, gates, **cfg)
    out, idx = _ref(q, k, v, gates, **cfg)
    assert out.dtype == torch.float32
    assert torch.equal(idx.long(), want["blocks"])
    _close(out, want["out"], atol=1e-5, rtol=1e-5)


def test_float64_inputs_keep_float64_precision():
    cfg = dict(l=8, d=4, lp=16, n=4, w=9)
    q, k, v, gates = _inputs(1, 40, 40, 2, 1, 8, 8, seed=6)
    want = _bf(q, k, v, gates, **cfg)
    out, _ = _ref(q, k, v, gates, **cfg)
    _close(out, want["out"], atol=1e-10, rtol=0)


# ---------------------------------------------------------------------------------------------------------------------
# Eq. 9: overlap weights
# ---------------------------------------------------------------------------------------------------------------------


def _one_hot_scores(target, l, d, lp, Tk, G=1):
    """selection_scores_ref for one query at t = Tk - 1 whose p_cmp is exactly one-hot on compressed block `target`."""
    Nc = num_compressed_blocks(Tk, l, d)
    q = torch.zeros(1, 1, G, 2)
    q[..., 0] = 1.0
    k_cmp = torch.zeros(1, Nc, 1, 2)
    k_cmp[0, :, 0, 0] = -1000.0  # logit -1000 -> exp underflows to exactly 0
    k_cmp[0, target, 0, 0] = 0.0  # logit 0
    lse = torch.zeros(1, 1, G)  # log(1 + sum e^-1000) == 0: p_cmp is exactly one-hot
    return selection_scores_ref(q, k_cmp, lse, l, d, lp, num_keys=Tk, scale=1.0)[0, 0, 0]


def test_eq9_overlap_weights_paper_blocks():
    l, d, lp, Tk = 32, 16, 64, 320
    Nc = num_compressed_blocks(Tk, l, d)  # 19 blocks, all visible from t = 319
    W = torch.stack([_one_hot_scores(i, l, d, lp, Tk) for i in range(Nc)])  # W[i, j]: weight of cmp i in slc j
    assert W.shape == (Nc, 5)
    for j in range(1, 4):  # compressed blocks 4j-1 .. 4j+3 all exist for j = 1..3
        assert W[4 * j - 1 : 4 * j + 4, j].tolist() == [1.0, 2.0, 2.0, 2.0, 1.0]
        others = [i for i in range(Nc) if not 4 * j - 1 <= i <= 4 * j + 3]
        assert (W[others, j] == 0).all()
    assert W[0:4, 0].tolist() == [2.0, 2.0, 2.0, 1.0] and (W[4:, 0] == 0).all()  # block 0 has no block -1
    assert W[15:19, 4].tolist() == [1.0, 2.0, 2.0, 2.0]  # the last, partial selection block [256, 320)
    # each compressed block spreads its full length l/d over the selection blocks
    assert (W.sum(1) == l / d).all()
    # the literal token-overlap count agrees
    assert W.tolist() == [[overlap_tokens(i, j, l, d, lp) / d for j in range(5)] for i in range(Nc)]


@pytest.mark.parametrize("l,d,lp", [(16, 16, 16), (8, 8, 24), (16, 4, 32), (8, 2, 8)])
def test_eq9_overlap_weights_other_block_sizes(l, d, lp):
    Tk = 5 * lp + 3
    Nc = num_compressed_blocks(Tk, l, d)
    W = torch.stack([_one_hot_scores(i, l, d, lp, Tk) for i in range(Nc)])
    want = torch.tensor([[overlap_tokens(i, j, l, d, lp) / d for j in range(W.shape[1])] for i in range(Nc)])
    assert torch.equal(W, want.float())
    if l == d == lp:  # fla-like: the selection score of block j is exactly p_cmp[j]
        assert torch.equal(W, torch.eye(Nc, W.shape[1]))


def test_eq10_scores_summed_over_group_heads():
    # both heads of the group are one-hot on the same compressed block: the group score is twice a head's
    one = _one_hot_scores(5, 32, 16, 64, 320, G=1)
    two = _one_hot_scores(5, 32, 16, 64, 320, G=2)
    assert torch.equal(two, 2 * one)


# ---------------------------------------------------------------------------------------------------------------------
# selection rules
# ---------------------------------------------------------------------------------------------------------------------

L, D, LP = 32, 16, 64  # paper block sizes for the crafted selection cases


def _crafted_cmp(Tk, head_logits, HKV=1):
    """
    q `[1, 1, HQ, 4]` and k_cmp `[1, Nc, HKV, 4]` with scale 1 such that head h's cmp logits are `head_logits[h]`
    (a dict {cmp block: logit}, every other block 0): block i gets key e_{slot}, head h query value logit in that slot.
    """
    Nc = num_compressed_blocks(Tk, L, D)
    targets = sorted({i for hl in head_logits for i in hl})
    assert len(targets) <= 4
    k_cmp = torch.zeros(1, Nc, HKV, 4, dtype=torch.float64)
    q = torch.zeros(1, 1, len(head_logits), 4, dtype=torch.float64)
    for slot, i in enumerate(targets):
        k_cmp[0, i, :, slot] = 1.0
    for h, hl in enumerate(head_logits):
        for i, logit in hl.items():
            q[0, 0, h, targets.index(i)] = logit
    return q, k_cmp


def test_gqa_group_sum_decides_shared_selection():
    # Tk = 512: t = 511, current block 7, fixed {0, 6, 7}, n = 4 leaves one free choice among blocks 1..5.
    # Compressed block 4j+1 lies inside selection block j (weight 2). Head 0: 55% on block 1 (X), 45% on block 4 (Z);
    # head 1: 55% on block 2 (Y), 45% on Z. Alone each head picks its own X / Y; the group sum picks Z (0.9 vs 0.55).
    Tk, n = 512, 4
    X, Y, Z = 4 * 1 + 1, 4 * 2 + 1, 4 * 4 + 1
    big = 40.0
    logits = [{X: big + math.log(0.55), Z: big + math.log(0.45)}, {Y: big + math.log(0.55), Z: big + math.log(0.45)}]
    q, k_cmp = _crafted_cmp(Tk, logits, HKV=1)
    _, k, v, _ = _inputs(1, 1, Tk, 2, 1, 4, 3, seed=7)
    v_cmp = torch.randn(1, k_cmp.shape[1], 1, 3, dtype=torch.float64)
    gates = torch.ones(1, 1, 2, 3, dtype=torch.float64)
    cfg = dict(l=L, d=D, lp=LP, n=n, w=16, k_cmp=k_cmp, v_cmp=v_cmp, scale=1.0)

    out, idx = _ref(q, k, v, gates, **cfg)
    assert idx[0, 0, 0].tolist() == [0, 4, 6, 7]
    want = _bf(q, k, v, gates, **cfg)
    assert want["blocks"][0, 0, 0].tolist() == [0, 4, 6, 7]
    _close(out, want["out"])

    # the same heads as two separate KV heads (G = 1): each head picks its own favourite
    k2, v2 = k.expand(-1, -1, 2, -1), v.expand(-1, -1, 2, -1)
    kc2, vc2 = k_cmp.expand(-1, -1, 2, -1), v_cmp.expand(-1, -1, 2, -1)
    cfg2 = dict(cfg, k_cmp=kc2, v_cmp=vc2)
    out2, idx2 = _ref(q, k2, v2, gates, **cfg2)
    assert idx2[0, 0].tolist() == [[0, 1, 6, 7], [0, 2, 6, 7]]
    want2 = _bf(q, k2, v2, gates, **cfg2)
    assert torch.equal(idx2.long(), want2["blocks"])
    _close(out2, want2["out"])
    # and the slc branch really differs between shared and per-head selection
    assert not torch.allclose(out, out2)


@pytest.mark.parametrize("G", [1, 2, 3])
def test_gqa_all_heads_of_a_group_use_the_group_selection(G):
    # every head of a group reads exactly the group's blocks: each head's slc output equals attention over the keys
    # of the shared blocks (brute force uses one block list per group), random data with real competition
    cfg = dict(l=8, d=4, lp=16, n=4, w=5)
    q, k, v, gates = _inputs(1, 120, 120, 2 * G, 2, 8, 5, seed=10 + G)
    out, idx = _ref(q, k, v, gates, **cfg)
    want = _bf(q, k, v, gates, **cfg)
    assert torch.equal(idx.long(), want["blocks"])
    _close(selected_attention_ref(q, k, v, idx, 16), want["o_slc"])
    _close(out, want["out"])


def test_fixed_blocks_chosen_even_with_low_scores():
    # t = 511 (current block 7), all probability mass on compressed blocks inside selection blocks 1..5
    Tk, n = 512, 4
    logits = [{4 * 1 + 1: 30.0, 4 * 2 + 1: 31.0, 4 * 3 + 1: 32.0, 4 * 5 + 1: 29.0}]
    q, k_cmp = _crafted_cmp(Tk, logits)
    _, lse = compressed_attention_ref(q, k_cmp, torch.zeros(1, k_cmp.shape[1], 1, 1, dtype=torch.float64), L, D,
                                      num_keys=Tk, scale=1.0)
    scores = selection_scores_ref(q, k_cmp, lse, L, D, LP, num_keys=Tk, scale=1.0)
    assert scores[0, 0, 0, [0, 6, 7]].max() < 1e-9 < scores[0, 0, 0, 3]  # fixed blocks score ~0
    assert select_blocks_ref(scores, LP, n, num_keys=Tk).tolist() == [[[[0, 3, 6, 7]]]]
    # with n = 5 the next best (block 2) joins
    assert select_blocks_ref(scores, LP, 5, num_keys=Tk).tolist() == [[[[0, 2, 3, 6, 7]]]]


def test_fixed_blocks_crafted_scores():
    # 10 selection blocks, one query at t = 9*16 + 3 with l' = 16: current block 9
    scores = torch.tensor([0.0, 9, 8, 7, 6, 5, 4, 3, 0, 0]).reshape(1, 1, 1, 10)
    t = 9 * 16 + 3
    cases = [  # (n, n_init, n_local, expected)
        (4, 1, 2, [0, 1, 8, 9]),
        (5, 1, 2, [0, 1, 2, 8, 9]),
        (6, 2, 3, [0, 1, 2, 7, 8, 9]),  # initial {0, 1}, local {7, 8, 9}, then the best other: 2
        (3, 0, 1, [1, 2, 9]),  # no initial block: block 0 (score 0) is not forced
        (3, 1, 1, [0, 1, 9]),
    ]
    for n, n_init, n_local, expected in cases:
        got = select_blocks_ref(scores, 16, n, n_init, n_local, num_keys=t + 1)[0, 0, 0].tolist()
        assert got == expected == bf_select(scores[0, 0, 0].tolist(), t, 16, n, n_init, n_local), (n, n_init, n_local)


def test_selection_ties_go_to_lower_index():
    scores = torch.full((1, 1, 1, 12), 0.5)
    got = select_blocks_ref(scores, 16, 6, num_keys=12 * 16)[0, 0, 0].tolist()
    assert got == [0, 1, 2, 3, 10, 11] == bf_select([0.5] * 12, 12 * 16 - 1, 16, 6, 1, 2)
    scores = torch.tensor([0.0, 0.3, 0.7, 0.3, 0.7, 0.3, 0.0, 0.0]).reshape(1, 1, 1, 8)
    assert select_blocks_ref(scores, 16, 5, num_keys=128)[0, 0, 0].tolist() == [0, 2, 4, 6, 7]
    assert select_blocks_ref(scores, 16, 6, num_keys=128)[0, 0, 0].tolist() == [0, 1, 2, 4, 6, 7]


def test_exactly_tied_scores_from_uniform_p_cmp_go_to_lower_index():
    # zero queries: uniform p_cmp, so every selection block covered by 8 visible compressed blocks scores exactly
    # 8 * p; the brute force sums in the same order for every block and keeps the ties exact
    cfg = dict(l=8, d=4, lp=16, n=5, w=4)
    q, k, v, gates = _inputs(1, 150, 150, 2, 1, 8, 4, seed=12)
    q = torch.zeros_like(q)
    _, idx = _ref(q, k, v, gates, **cfg)
    want = _bf(q, k, v, gates, **cfg)
    assert want["blocks"][0, 91, 0].tolist() == [0, 1, 2, 4, 5]
    assert torch.equal(idx.long(), want["blocks"])


def test_n_larger_than_eligible_blocks_pads_with_minus_one():
    cfg = dict(l=8, d=4, lp=16, n=6, w=4)
    T = 40  # 3 selection blocks
    q, k, v, gates = _inputs(1, T, T, 3, 1, 8, 4, seed=13)
    out, idx = _ref(q, k, v, gates, **cfg)
    want = _bf(q, k, v, gates, **cfg)
    assert torch.equal(idx.long(), want["blocks"])
    assert idx.shape == (1, T, 1, 6) and idx.dtype == torch.int32
    assert idx[0, 0, 0].tolist() == [0, -1, -1, -1, -1, -1]
    assert idx[0, 16, 0].tolist() == [0, 1, -1, -1, -1, -1]
    assert idx[0, 39, 0].tolist() == [0, 1, 2, -1, -1, -1]
    # all eligible blocks are used: the slc branch is plain causal attention
    causal = [
        torch.softmax(k[0, : t + 1, 0] @ q[0, t, h] / math.sqrt(8), 0) @ v[0, : t + 1, 0] for t in range(T) for h in range(3)
    ]
    _close(selected_attention_ref(q, k, v, idx, 16), torch.stack(causal).reshape(1, T, 3, 4))
    _close(out, want["out"])


def test_causal_mask_inside_current_block():
    T, lp = 48, 16
    q, k, v, _ = _inputs(1, T, T, 2, 1, 8, 4, seed=14)
    idx = torch.tensor([0, 1, 2], dtype=torch.int32).expand(1, T, 1, 3)  # every block, even not yet eligible ones
    base = selected_attention_ref(q, k, v, idx, lp)
    for t in (16, 21, 31, 40):  # first token, middle, last token of a block
        k2, v2 = k.clone(), v.clone()
        k2[0, t + 1 :] = 100.0  # future keys would dominate the softmax if they leaked
        v2[0, t + 1 :] = 1e6
        got = selected_attention_ref(q, k2, v2, idx, lp)
        torch.testing.assert_close(got[0, : t + 1], base[0, : t + 1], atol=0, rtol=0)
        want = torch.stack([torch.softmax(k[0, : t + 1, 0] @ q[0, t, h] / math.sqrt(8), 0) @ v[0, : t + 1, 0] for h in range(2)])
        _close(got[0, t], want)
    # only the current block selected at its first token: the query sees itself only -> output v[t]
    only = torch.tensor([2, -1, -1], dtype=torch.int32).expand(1, T, 1, 3)
    _close(selected_attention_ref(q, k, v, only, lp)[0, 32], v[0, 32].expand(2, -1))
    # in the full op, a query at the first token of block j has j selected and sees no later key of it
    cfg = dict(l=8, d=4, lp=16, n=4, w=1)
    gates = torch.tensor([0.0, 1.0, 0.0], dtype=torch.float64).expand(1, T, 2, 3)
    out, idx_full = _ref(q, k, v, gates, **cfg)
    assert 2 in idx_full[0, 32, 0].tolist()
    _close(out, _bf(q, k, v, gates, **cfg)["out"])


# ---------------------------------------------------------------------------------------------------------------------
# sliding window
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("w", [1, 2, 7, 40, 41, 100])
def test_window_edges(w):
    T = 41
    q, k, v, _ = _inputs(1, T, T, 3, 1, 8, 5, seed=15)
    got = window_attention_ref(q, k, v, w)
    want = torch.stack([
        torch.softmax(k[0, max(0, t - w + 1) : t + 1, 0] @ q[0, t, h] / math.sqrt(8), 0) @ v[0, max(0, t - w + 1) : t + 1, 0]
        for t in range(T) for h in range(3)
    ]).reshape(1, T, 3, 5)
    _close(got, want)
    if w == 1:  # a query sees only itself
        _close(got[0], v[0, :, 0:1].expand(-1, 3, -1))
    if w >= T:  # every query sees its whole prefix: plain causal attention
        mask = torch.ones(T, T, dtype=torch.bool).tril()
        causal = torch.nn.functional.scaled_dot_product_attention(
            q.transpose(1, 2), k.expand(-1, -1, 3, -1).transpose(1, 2), v.expand(-1, -1, 3, -1).transpose(1, 2),
            attn_mask=mask,
        ).transpose(1, 2)
        _close(got, causal)


# ---------------------------------------------------------------------------------------------------------------------
# short and odd sequence lengths
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "l,d,lp,T",
    [
        (8, 4, 16, 1),  # a single token
        (8, 4, 16, 7),  # shorter than one compression block: no cmp block at all
        (8, 4, 16, 8),  # exactly one compression block, seen by the last query only
        (8, 4, 16, 13),  # shorter than one selection block
        (8, 4, 16, 16),
        (8, 4, 16, 35),  # multiple of no block size
        (32, 16, 64, 1),
        (32, 16, 64, 20),
        (32, 16, 64, 63),
        (32, 16, 64, 65),
        (16, 16, 16, 15),
        (16, 16, 16, 33),
    ],
)
def test_short_sequences(l, d, lp, T):
    cfg = dict(l=l, d=d, lp=lp, n=3, w=6)
    q, k, v, gates = _inputs(1, T, T, 4, 2, 8, 6, seed=T)
    out, idx = _ref(q, k, v, gates, **cfg)
    want = _bf(q, k, v, gates, **cfg)
    assert not out.isnan().any()
    assert torch.equal(idx.long(), want["blocks"])
    _close(out, want["out"])
    o_cmp, lse = compressed_attention_ref(q, _compress(k, l, d), _compress(v, l, d), l, d)
    no_block = torch.arange(T) < l - 1
    assert (o_cmp[0, no_block] == 0).all() and torch.isneginf(lse[0, no_block]).all()
    assert torch.isfinite(lse[0, ~no_block]).all()


# ---------------------------------------------------------------------------------------------------------------------
# packed documents and decoding alignment
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("G", [1, 3])
def test_varlen_equals_each_document_alone(G):
    cfg = dict(l=8, d=4, lp=16, n=4, w=12)
    cu = torch.tensor([0, 5, 42, 120], dtype=torch.int32)  # documents of 5, 37 and 78 tokens
    q, k, v, gates = _inputs(1, 120, 120, 2 * G, 2, 8, 12, seed=20 + G)
    out, idx = _ref(q, k, v, gates, cu_seqlens_q=cu, cu_seqlens_k=cu, **cfg)
    assert out.shape == (1, 120, 2 * G, 12) and idx.shape == (1, 120, 2, 4)
    b = cu.tolist()
    for s, e in zip(b[:-1], b[1:]):
        o1, i1 = _ref(q[:, s:e], k[:, s:e], v[:, s:e], gates[:, s:e], **cfg)
        torch.testing.assert_close(out[:, s:e], o1, atol=1e-12, rtol=0)
        assert torch.equal(idx[:, s:e], i1)
    want = bf_nsa_varlen(q, k, v, gates, cu, cu, **cfg)
    assert torch.equal(idx.long(), want["blocks"])
    _close(out, want["out"])
    # a document's positions restart: its first query sees only itself in every branch
    first = cu[1].item()
    assert idx[0, first, 0].tolist() == [0, -1, -1, -1]


def test_varlen_decoding_last_queries_of_each_document():
    cfg = dict(l=8, d=4, lp=16, n=4, w=12)
    cu_k = torch.tensor([0, 5, 42, 120], dtype=torch.int32)
    cu_q = torch.tensor([0, 1, 3, 6], dtype=torch.int32)  # the last 1, 2 and 3 tokens of each document
    q_full, k, v, g_full = _inputs(1, 120, 120, 4, 2, 8, 12, seed=30)
    rows = torch.cat([torch.arange(e - m, e) for e, m in zip(cu_k[1:].tolist(), [1, 2, 3])])
    full, idx_full = _ref(q_full, k, v, g_full, cu_seqlens_q=cu_k, cu_seqlens_k=cu_k, **cfg)
    out, idx = _ref(q_full[:, rows], k, v, g_full[:, rows], cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, **cfg)
    _close(out, full[:, rows])  # float32 inside: equal up to rounding, not bitwise
    assert torch.equal(idx, idx_full[:, rows])
    want = bf_nsa_varlen(q_full[:, rows], k, v, g_full[:, rows], cu_q, cu_k, **cfg)
    _close(out, want["out"])


@pytest.mark.parametrize("Tq", [1, 2, 17, 90])
def test_decoding_alignment_equals_last_rows(Tq):
    cfg = dict(l=8, d=4, lp=16, n=4, w=10)
    T = 90
    q, k, v, gates = _inputs(2, T, T, 6, 2, 8, 5, seed=40)
    full, idx_full = _ref(q, k, v, gates, **cfg)
    out, idx = _ref(q[:, -Tq:], k, v, gates[:, -Tq:], **cfg)
    _close(out, full[:, -Tq:])  # float32 inside: equal up to rounding, not bitwise
    assert torch.equal(idx, idx_full[:, -Tq:])
    if Tq <= 2:
        want = _bf(q[:, -Tq:], k, v, gates[:, -Tq:], **cfg)
        assert torch.equal(idx.long(), want["blocks"])
        _close(out, want["out"])


# ---------------------------------------------------------------------------------------------------------------------
# gradients
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype,T", [(torch.float32, 20), (torch.float64, 20), (torch.float32, 5)])
def test_gradients_finite_and_match_bruteforce(dtype, T):
    # l = 8: queries t < 7 see no compressed block (T = 5: there is no compressed block at all)
    l, d = 8, 4
    cfg = dict(l=l, d=d, lp=16, n=3, w=6)
    q, k, v, gates = _inputs(1, T, T, 4, 2, 8, 6, dtype=dtype, seed=50)
    k_cmp, v_cmp = _compress(k, l, d), _compress(v, l, d)
    leaves = [x.clone().requires_grad_(True) for x in (q, k, v, k_cmp, v_cmp, gates)]
    weight = torch.randn(1, T, 4, 6, dtype=dtype, generator=torch.Generator().manual_seed(51))
    out, _ = _ref(*leaves[:3], leaves[5], k_cmp=leaves[3], v_cmp=leaves[4], **cfg)
    (out * weight).sum().backward()
    grads = [x.grad for x in leaves]
    for name, g in zip(("q", "k", "v", "k_cmp", "v_cmp", "gates"), grads):
        assert g is not None and torch.isfinite(g).all(), name
    # no compressed block: the cmp output is 0, so the cmp gate gets exactly zero gradient
    assert (grads[5][0, : l - 1, :, 0] == 0).all()

    bf_leaves = [x.detach().double().requires_grad_(True) for x in (q, k, v, k_cmp, v_cmp, gates)]
    want = _bf(*bf_leaves[:3], bf_leaves[5], k_cmp=bf_leaves[3], v_cmp=bf_leaves[4], **cfg)["out"]
    (want * weight.double()).sum().backward()
    for name, g, bl in zip(("q", "k", "v", "k_cmp", "v_cmp", "gates"), grads, bf_leaves):
        want_grad = torch.zeros_like(bl) if bl.grad is None else bl.grad  # T < l: k_cmp/v_cmp are empty
        _close(g, want_grad, atol=2e-5, rtol=1e-4)


def test_selection_has_no_gradient_path():
    # the scores / top-n run under no_grad: the cmp keys' gradient comes only from the cmp branch output, so with the
    # cmp gate at 0 the compressed keys get exactly zero gradient even though they decide the selection
    cfg = dict(l=8, d=4, lp=16, n=3, w=6)
    q, k, v, gates = _inputs(1, 70, 70, 2, 1, 8, 6, seed=60)
    gates = gates.clone()
    gates[..., 0] = 0
    k_cmp = _compress(k, 8, 4).requires_grad_(True)
    out, _ = _ref(q, k, v, gates, k_cmp=k_cmp, v_cmp=_compress(v, 8, 4), **cfg)
    out.sum().backward()
    assert k_cmp.grad is not None and (k_cmp.grad == 0).all()


@pytest.mark.parametrize("cu", [[0, 5, 5, 40], [0, 0, 30]])
def test_varlen_zero_length_document(cu):
    cfg = dict(l=8, d=4, lp=16, n=4, w=12)
    cu_t = torch.tensor(cu, dtype=torch.int32)
    T = cu[-1]
    q, k, v, gates = _inputs(1, T, T, 2, 1, 8, 8, seed=70)
    out, idx = _ref(q, k, v, gates, cu_seqlens_q=cu_t, cu_seqlens_k=cu_t, **cfg)
    cu_nonempty = torch.tensor(sorted(set(cu)), dtype=torch.int32)  # the same packing without the empty document
    want, want_idx = _ref(q, k, v, gates, cu_seqlens_q=cu_nonempty, cu_seqlens_k=cu_nonempty, **cfg)
    torch.testing.assert_close(out, want, atol=0, rtol=0)
    assert torch.equal(idx, want_idx)


def test_more_queries_than_keys_is_rejected():
    q, k, v, gates = _inputs(1, 10, 4, 2, 1, 8, 8, seed=80)
    k_cmp, v_cmp = _compress(k, 8, 4), _compress(v, 8, 4)
    with pytest.raises(ValueError):
        nsa_attention(q, k, v, k_cmp, v_cmp, gates, compress_block_size=8, compress_stride=4, select_block_size=16,
                      num_selected_blocks=4, window_size=4, backend="reference")
