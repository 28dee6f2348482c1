"""
The decode path (`nsa_decode`): the whole-tensor reference against `nsa_attention_ref` of each query alone, and the
Triton decode kernels (interpreter on CPU, bf16 on a GPU) against that reference, for rows at different lengths,
1 to 16 queries per row, slots without a query, separate window K/V, and the paper's and Llama's group sizes.
"""

import pytest
import torch

from nsa_hf.kernels import nsa_decode, num_compressed_blocks
from nsa_hf.kernels.reference import nsa_attention_ref, nsa_decode_ref


def _settings(l=8, d=4, lp=16, n=4, w=16, init=1, local=2):
    return dict(compress_block_size=l, compress_stride=d, select_block_size=lp, num_selected_blocks=n,
                window_size=w, num_initial_blocks=init, num_local_blocks=local)


def make_case(lengths, q_len, HQ, HKV, DK, DV, settings, capacity=None, separate_win=False, dtype=torch.float32,
              device="cpu", seed=0, pad_slots=()):
    """Caches holding `lengths[b]` tokens per row (the new queries are the last q_len of each row)."""
    g = torch.Generator().manual_seed(seed)
    B = len(lengths)
    S = capacity or max(lengths) + 3
    l, d = settings["compress_block_size"], settings["compress_stride"]
    ncmp = num_compressed_blocks(S, l, d) + 1

    def rnd(*shape):
        return torch.randn(*shape, generator=g).to(dtype=dtype, device=device)

    case = dict(q=rnd(B, q_len, HQ, DK), k=rnd(B, S, HKV, DK), v=rnd(B, S, HKV, DV), k_cmp=rnd(B, ncmp, HKV, DK),
                v_cmp=rnd(B, ncmp, HKV, DV), gates=torch.rand(B, q_len, HQ, 3, generator=g).to(dtype=dtype,
                                                                                              device=device))
    if separate_win:
        case.update(k_win=rnd(B, S, HKV, DK), v_win=rnd(B, S, HKV, DV))
    pos = torch.tensor([[n - q_len + i for i in range(q_len)] for n in lengths], dtype=torch.int32)
    for b, i in pad_slots:
        pos[b, i] = -1
    case["query_positions"] = pos.to(device)
    return case


def per_query_reference(case, settings):
    """`nsa_attention_ref` of each query alone over the keys [0, t] of its row and the blocks it can see."""
    q, pos = case["q"], case["query_positions"].cpu()
    out = torch.zeros(*q.shape[:3], case["v"].shape[-1], dtype=q.dtype, device=q.device)
    l, d = settings["compress_block_size"], settings["compress_stride"]
    for b in range(q.shape[0]):
        for i in range(q.shape[1]):
            t = int(pos[b, i])
            if t < 0:
                continue
            keys = slice(b, b + 1), slice(0, t + 1)
            blocks = slice(b, b + 1), slice(0, num_compressed_blocks(t + 1, l, d))
            extra = {}
            if "k_win" in case:
                extra = dict(k_win=case["k_win"][keys], v_win=case["v_win"][keys])
            out[b, i] = nsa_attention_ref(
                q[b : b + 1, i : i + 1], case["k"][keys], case["v"][keys], case["k_cmp"][blocks],
                case["v_cmp"][blocks], case["gates"][b : b + 1, i : i + 1], **settings, **extra,
            )[0, 0]
    return out


CASES = {
    # name: (row lengths, queries per row, HQ, HKV, DK, DV, settings)
    "one_query_g2": ((57, 9, 1, 100), 1, 4, 2, 16, 16, _settings()),
    "block_edges": ((7, 8, 11, 12, 15, 16, 17, 64, 65), 1, 4, 2, 16, 16, _settings()),
    "chunk_g4": ((40, 23, 90), 5, 8, 2, 32, 16, _settings()),
    "sixteen_queries": ((120, 16), 16, 2, 1, 16, 16, _settings()),
    "paper_like_g16": ((200, 77), 2, 16, 1, 48, 32, _settings(l=16, d=8, lp=32, n=5, w=32)),
    "stride_equals_block": ((150, 41), 1, 4, 1, 16, 16, _settings(l=16, d=16, lp=16, n=3, w=20)),
    "long_rows": ((300, 257, 129), 1, 4, 2, 16, 16, _settings()),
    "two_initial_one_local": ((130,), 3, 4, 2, 16, 16, _settings(init=2, local=1)),
}


@pytest.mark.parametrize("name", list(CASES))
def test_reference_equals_each_query_alone(name):
    lengths, q_len, HQ, HKV, DK, DV, settings = CASES[name]
    case = make_case(lengths, q_len, HQ, HKV, DK, DV, settings, dtype=torch.float64, pad_slots=[(0, 0)])
    torch.testing.assert_close(nsa_decode_ref(**case, **settings), per_query_reference(case, settings),
                               rtol=0, atol=1e-10)


def test_reference_with_separate_window_keys():
    lengths, q_len, HQ, HKV, DK, DV, settings = CASES["chunk_g4"]
    case = make_case(lengths, q_len, HQ, HKV, DK, DV, settings, dtype=torch.float64, separate_win=True)
    torch.testing.assert_close(nsa_decode_ref(**case, **settings), per_query_reference(case, settings),
                               rtol=0, atol=1e-10)


def _assert_same_selection(actual, expected):
    torch.testing.assert_close(actual.sort(-1).values, expected.sort(-1).values, rtol=0, atol=0)


@pytest.mark.parametrize("name", list(CASES))
def test_triton_decode_matches_reference_in_the_interpreter(name):
    from nsa_hf.kernels.decode import nsa_decode_triton

    lengths, q_len, HQ, HKV, DK, DV, settings = CASES[name]
    case = make_case(lengths, q_len, HQ, HKV, DK, DV, settings, separate_win=name == "chunk_g4",
                     pad_slots=[(0, q_len - 1)] if q_len > 1 else [])
    out, idx = nsa_decode_triton(**case, **settings, scale=DK**-0.5, return_block_indices=True)
    ref, ref_idx = nsa_decode_ref(**case, **settings, return_block_indices=True)
    _assert_same_selection(idx, ref_idx)
    torch.testing.assert_close(out, ref, rtol=0, atol=2e-5)


def test_triton_decode_head_dims_192_128_and_strided_caches():
    from nsa_hf.kernels.decode import nsa_decode_triton

    settings = _settings()
    case = make_case((70, 33), 2, 4, 2, 48, 32, settings, capacity=96)
    # strided views of larger buffers, as the caches hand out
    case["k"] = torch.cat([case["k"], torch.randn_like(case["k"])], dim=2)[:, :, :2]
    ref = nsa_decode_ref(**case, **settings)
    torch.testing.assert_close(nsa_decode_triton(**case, **settings, scale=48**-0.5), ref, rtol=0, atol=2e-5)


def test_seam_checks_its_inputs():
    settings = _settings()
    case = make_case((20,), 1, 4, 2, 16, 16, settings)
    with pytest.raises(ValueError, match="query_positions"):
        nsa_decode(**{**case, "query_positions": case["query_positions"].float()}, **settings)
    with pytest.raises(ValueError, match="gates"):
        nsa_decode(**{**case, "gates": case["gates"][..., :2]}, **settings)
    with pytest.raises(ValueError, match="multiple"):
        nsa_decode(**{**case, "q": torch.randn(1, 1, 3, 16)}, **{**settings, "backend": "reference"})
    with pytest.raises(ValueError, match="backend"):
        nsa_decode(**case, **settings, backend="cuda")


# ----------------------------------------------------------------------------------------------- GPU, bf16

GPU_LAYOUTS = {
    # name: (HQ, HKV, DK, DV)
    "paper_64q_4kv_d128": (64, 4, 128, 128),
    "llama_32q_8kv_d64": (32, 8, 64, 64),
    "deepseek_dims_192_128": (64, 4, 192, 128),
    "small_group_4q_1kv": (4, 1, 128, 128),
}


@pytest.mark.gpu
@pytest.mark.parametrize("layout", list(GPU_LAYOUTS))
@pytest.mark.parametrize("q_len", [1, 4, 16])
def test_gpu_decode_matches_reference(layout, q_len):
    HQ, HKV, DK, DV = GPU_LAYOUTS[layout]
    settings = _settings(l=32, d=16, lp=64, n=16, w=512)
    lengths = (9000, 513, 64, 31) if q_len == 1 else (5000, 700)
    case = make_case(lengths, q_len, HQ, HKV, DK, DV, settings, capacity=9216, dtype=torch.bfloat16,
                     device="cuda", separate_win=layout == "small_group_4q_1kv")
    from nsa_hf.kernels.decode import nsa_decode_triton

    out, idx = nsa_decode_triton(**case, **settings, scale=DK**-0.5, return_block_indices=True)
    ref, ref_idx = nsa_decode_ref(**{k: v.float() if v.is_floating_point() else v for k, v in case.items()},
                                  **settings, return_block_indices=True)
    # bf16 logits may reorder blocks whose float32 scores nearly tie: compare where the selections agree
    same = (idx.sort(-1).values == ref_idx.sort(-1).values).all(-1)  # [B, Tq, HKV]
    assert same.float().mean() > 0.9
    G = HQ // HKV
    rows = same.repeat_interleave(G, dim=2)
    err = (out.float() - ref.float())[rows].abs().max()
    assert err < 2e-2, err


@pytest.mark.gpu
def test_gpu_decode_runs_under_cuda_graph_capture():
    settings = _settings(l=32, d=16, lp=64, n=16, w=512)
    case = make_case((4000, 100), 1, 32, 8, 128, 128, settings, capacity=8192, dtype=torch.bfloat16, device="cuda")
    eager = nsa_decode(**case, **settings)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = nsa_decode(**case, **settings)
    case["query_positions"].add_(1)  # the next step: one more token per row, same graph
    graph.replay()
    torch.testing.assert_close(captured, nsa_decode(**case, **settings), rtol=0, atol=0)
    assert not torch.equal(captured, eager)
