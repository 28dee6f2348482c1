"""
Triton backend of `nsa_attention`: the three branch kernels, the block selection between them, and a fused gated sum,
under one autograd.Function so the backward runs the branch backwards directly (no autograd graph of elementwise
ops, one pass over the branch outputs for the gates). Its inputs are checked by `nsa_attention`, which also builds the
call's geometry (`_geometry.py`); nothing here checks or syncs with the host.
"""

import contextlib

import torch
import triton
import triton.language as tl

from ._geometry import Geometry
from ._tiling import SWITCHES, next_pow2
from .compressed import compressed_attention_bwd, compressed_attention_fwd
from .selected import selected_attention_bwd, selected_attention_fwd
from .selection import select_blocks_fwd
from .window import window_attention_bwd, window_attention_fwd


@triton.jit
def _gate_combine_fwd_kernel(o_cmp, o_slc, o_win, gates, out, R, DV: tl.constexpr, BR: tl.constexpr, BD: tl.constexpr):
    rows = tl.program_id(0) * BR + tl.arange(0, BR)
    cols = tl.arange(0, BD)
    rmask = rows < R
    mask = rmask[:, None] & (cols[None, :] < DV)
    offs = rows[:, None].to(tl.int64) * DV + cols[None, :]
    g0 = tl.load(gates + rows * 3, mask=rmask, other=0.0).to(tl.float32)
    g1 = tl.load(gates + rows * 3 + 1, mask=rmask, other=0.0).to(tl.float32)
    g2 = tl.load(gates + rows * 3 + 2, mask=rmask, other=0.0).to(tl.float32)
    acc = g0[:, None] * tl.load(o_cmp + offs, mask=mask, other=0.0).to(tl.float32)
    acc += g1[:, None] * tl.load(o_slc + offs, mask=mask, other=0.0).to(tl.float32)
    acc += g2[:, None] * tl.load(o_win + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(out + offs, acc.to(out.dtype.element_ty), mask=mask)


@triton.jit
def _gate_combine_bwd_kernel(
    do, o_cmp, o_slc, o_win, gates, do_cmp, do_slc, do_win, dgates, deltas, R,
    DV: tl.constexpr, BR: tl.constexpr, BD: tl.constexpr,
):
    rows = tl.program_id(0) * BR + tl.arange(0, BR)
    cols = tl.arange(0, BD)
    rmask = rows < R
    mask = rmask[:, None] & (cols[None, :] < DV)
    offs = rows[:, None].to(tl.int64) * DV + cols[None, :]
    b_do = tl.load(do + offs, mask=mask, other=0.0).to(tl.float32)
    for branch in tl.static_range(3):
        o_ptr = o_cmp if branch == 0 else (o_slc if branch == 1 else o_win)
        d_ptr = do_cmp if branch == 0 else (do_slc if branch == 1 else do_win)
        g = tl.load(gates + rows * 3 + branch, mask=rmask, other=0.0).to(tl.float32)
        b_o = tl.load(o_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        tl.store(dgates + rows * 3 + branch, tl.sum(b_o * b_do, axis=1).to(dgates.dtype.element_ty), mask=rmask)
        d_branch = (g[:, None] * b_do).to(d_ptr.dtype.element_ty)
        tl.store(d_ptr + offs, d_branch, mask=mask)
        # the branch's softmax-backward term rowsum(dO_branch * O_branch), from the rounded dO_branch it will see
        tl.store(deltas + branch * R + rows, tl.sum(d_branch.to(tl.float32) * b_o, axis=1), mask=rmask)


def _combine_launch(DV):
    BD = next_pow2(DV)
    return BD, max(1, 4096 // BD)


def gate_combine_fwd(o_cmp, o_slc, o_win, gates):
    """`g_cmp * o_cmp + g_slc * o_slc + g_win * o_win` for `[..., DV]` outputs and `[..., 3]` gates, one pass."""
    out = torch.empty_like(o_cmp)
    R, DV = o_cmp.numel() // o_cmp.shape[-1], o_cmp.shape[-1]
    BD, BR = _combine_launch(DV)
    _gate_combine_fwd_kernel[(triton.cdiv(R, BR),)](o_cmp, o_slc, o_win, gates, out, R, DV=DV, BR=BR, BD=BD)
    return out


def gate_combine_bwd(do, o_cmp, o_slc, o_win, gates):
    """
    Backward of `gate_combine_fwd`, one pass over its inputs. Returns (dO_cmp, dO_slc, dO_win, dgates, deltas):
    deltas float32 `[3, ...]` holds rowsum(dO_b * O_b) of each branch b (cmp, slc, win), which their attention
    backwards need.
    """
    d_branches = [torch.empty_like(o_cmp) for _ in range(3)]
    dgates = torch.empty_like(gates)
    deltas = torch.empty(3, *o_cmp.shape[:-1], dtype=torch.float32, device=o_cmp.device)
    R, DV = o_cmp.numel() // o_cmp.shape[-1], o_cmp.shape[-1]
    BD, BR = _combine_launch(DV)
    _gate_combine_bwd_kernel[(triton.cdiv(R, BR),)](
        do, o_cmp, o_slc, o_win, gates, *d_branches, dgates, deltas, R, DV=DV, BR=BR, BD=BD
    )
    return (*d_branches, dgates, deltas)


_SIDE_STREAMS = {}


def _fork(x):
    """
    A second CUDA stream, ordered after the current one, for the sliding-window branch: it is bound by tensor-core
    math while the selection branch is bound by gathers of K/V blocks, so the two overlap on the GPU. None (no
    overlap) on CPU, during CUDA-graph capture, or with NSA_HF_STREAMS=0.
    """
    if not x.is_cuda or not SWITCHES.streams or torch.cuda.is_current_stream_capturing():
        return None
    side = _SIDE_STREAMS.get(x.device)
    if side is None:
        side = _SIDE_STREAMS[x.device] = torch.cuda.Stream(x.device)
    side.wait_stream(torch.cuda.current_stream(x.device))
    return side


def _on(side):
    return torch.cuda.stream(side) if side is not None else contextlib.nullcontext()


def _join(side, *made_on_side):
    """Order the current stream after `side`; tensors allocated there stay reserved until the current stream is done."""
    if side is None:
        return
    main = torch.cuda.current_stream(side.device)
    main.wait_stream(side)
    for t in made_on_side:
        if t is not None:
            t.record_stream(main)


class NSAAttentionFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, k_cmp, v_cmp, gates, k_win, v_win, geo: Geometry, settings: tuple):
        l, d, lp, n, w, num_initial, num_local, scale = settings
        shared_win = k_win is None
        kw, vw = (k, v) if shared_win else (k_win, v_win)
        side = _fork(q)
        with _on(side):
            o_win, lse_win = window_attention_fwd(q, kw, vw, w, scale, geo)
        o_cmp, lse_cmp = compressed_attention_fwd(q, k_cmp, v_cmp, l, d, scale, geo)
        block_indices = select_blocks_fwd(q, k_cmp, lse_cmp, geo, l, d, lp, n, num_initial, num_local, scale)
        o_slc, lse_slc = selected_attention_fwd(q, k, v, block_indices, lp, scale, geo)
        _join(side, o_win, lse_win)
        gates = gates.contiguous()
        out = gate_combine_fwd(o_cmp, o_slc, o_win, gates)
        ctx.save_for_backward(
            q, k, v, k_cmp, v_cmp, gates, kw, vw, o_cmp, lse_cmp, o_slc, lse_slc, o_win, lse_win, block_indices,
        )
        ctx.settings, ctx.geo, ctx.shared_win = settings, geo, shared_win
        ctx.mark_non_differentiable(block_indices)
        return out, block_indices

    @staticmethod
    def backward(ctx, do, _unused):
        (q, k, v, k_cmp, v_cmp, gates, kw, vw, o_cmp, lse_cmp, o_slc, lse_slc, o_win, lse_win,
         block_indices) = ctx.saved_tensors
        l, d, lp, _, w, _, _, scale = ctx.settings
        geo = ctx.geo
        do_cmp, do_slc, do_win, dgates, deltas = gate_combine_bwd(do.contiguous(), o_cmp, o_slc, o_win, gates)
        # No side stream here: on an H100 (paper layout, 64k) the overlapped backward measured 6 ms slower, while the
        # overlapped forward gains about 1 ms (benchmarks/results/logs/bench_side_stream_h100.log).
        dq_win, dk_win, dv_win = window_attention_bwd(do_win, q, kw, vw, None, lse_win, w, scale, geo, delta=deltas[2])
        dq, dk_cmp, dv_cmp = compressed_attention_bwd(
            do_cmp, q, k_cmp, v_cmp, None, lse_cmp, l, d, scale, geo, delta=deltas[0]
        )
        dq_slc, dk, dv = selected_attention_bwd(do_slc, q, k, v, o_slc, lse_slc, block_indices, lp, scale, geo,
                                                delta=deltas[1])
        dq = dq.add_(dq_slc).add_(dq_win)
        if ctx.shared_win:
            dk, dv = dk.add_(dk_win), dv.add_(dv_win)
            dk_win = dv_win = None
        return dq, dk, dv, dk_cmp, dv_cmp, dgates, dk_win, dv_win, None, None


def nsa_attention_triton(
    q, k, v, k_cmp, v_cmp, gates, k_win, v_win, geo: Geometry, *, compress_block_size, compress_stride,
    select_block_size, num_selected_blocks, window_size, num_initial_blocks, num_local_blocks, scale,
):
    """`nsa_hf.kernels.nsa_attention` on inputs it has checked, `geo` their geometry and `scale` resolved."""
    settings = (compress_block_size, compress_stride, select_block_size, num_selected_blocks, window_size,
                num_initial_blocks, num_local_blocks, scale)
    out, _ = NSAAttentionFunction.apply(q, k, v, k_cmp, v_cmp, gates, k_win, v_win, geo, settings)
    return out
