"""
Triton backend of `nsa_attention`: the three branch kernels, the block selection between them, and a fused gated sum,
under one autograd.Function so the backward runs the branch backwards directly (no autograd graph of elementwise
ops, one pass over the branch outputs for the gates); under `torch.compile` the same forward and backward run as two
custom ops (`nsa_hf::nsa_attention_fwd` / `_bwd`). Its inputs are checked by `nsa_attention`, which in eager mode also
builds the call's geometry (`_geometry.py`); the custom ops build it when they run. Nothing else here checks or syncs
with the host.
"""

import contextlib

import torch
import triton
import triton.language as tl

from ._geometry import Geometry, attention_geometry
from ._tiling import SWITCHES, next_pow2
from .compressed import compressed_attention_bwd, compressed_attention_fwd
from .selected import selected_attention_bwd, selected_attention_fwd
from .selection import select_blocks_fwd
from .window import window_attention_bwd, window_attention_fwd


# Integer arguments that change with the prompt length: never specialised (why: band_attention._BAND_FWD_VARYING).
_ROWS_VARYING = ["R"]


@triton.jit(do_not_specialize=_ROWS_VARYING)
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


def nsa_forward(q, k, v, k_cmp, v_cmp, gates, k_win, v_win, geo: Geometry, settings: tuple):
    """
    The Triton forward. Returns `(out, saved)`, `saved` what `nsa_backward` needs besides the inputs: the contiguous
    gates, each branch's output and log-sum-exp, and the selected blocks.
    """
    l, d, lp, n, w, num_initial, num_local, scale = settings
    kw, vw = (k, v) if k_win is None else (k_win, v_win)
    side = _fork(q)
    with _on(side):
        o_win, lse_win = window_attention_fwd(q, kw, vw, w, scale, geo)
    o_cmp, lse_cmp = compressed_attention_fwd(q, k_cmp, v_cmp, l, d, scale, geo)
    block_indices = select_blocks_fwd(q, k_cmp, lse_cmp, geo, l, d, lp, n, num_initial, num_local, scale)
    o_slc, lse_slc = selected_attention_fwd(q, k, v, block_indices, lp, scale, geo)
    _join(side, o_win, lse_win)
    gates = gates.contiguous()
    out = gate_combine_fwd(o_cmp, o_slc, o_win, gates)
    return out, (gates, o_cmp, lse_cmp, o_slc, lse_slc, o_win, lse_win, block_indices)


def nsa_backward(do, q, k, v, k_cmp, v_cmp, k_win, v_win, saved: tuple, geo: Geometry, settings: tuple):
    """Gradients `(dq, dk, dv, dk_cmp, dv_cmp, dgates, dk_win, dv_win)`, the last two None when K/V are shared."""
    gates, o_cmp, lse_cmp, o_slc, lse_slc, o_win, lse_win, block_indices = saved
    l, d, lp, _, w, _, _, scale = settings
    kw, vw = (k, v) if k_win is None else (k_win, v_win)
    do_cmp, do_slc, do_win, dgates, deltas = gate_combine_bwd(do.contiguous(), o_cmp, o_slc, o_win, gates)
    # No side stream here: on an H100 (paper layout, 64k) the overlapped backward measured 6 ms slower, while the
    # overlapped forward gains about 1 ms (benchmarks/results/logs/bench_side_stream_h100.log).
    dq_win, dk_win, dv_win = window_attention_bwd(do_win, q, kw, vw, None, lse_win, w, scale, geo, delta=deltas[2])
    dq, dk_cmp, dv_cmp = compressed_attention_bwd(do_cmp, q, k_cmp, v_cmp, None, lse_cmp, l, d, scale, geo,
                                                  delta=deltas[0])
    dq_slc, dk, dv = selected_attention_bwd(do_slc, q, k, v, o_slc, lse_slc, block_indices, lp, scale, geo,
                                            delta=deltas[1])
    dq = dq.add_(dq_slc).add_(dq_win)
    if k_win is None:
        dk, dv = dk.add_(dk_win), dv.add_(dv_win)
        dk_win = dv_win = None
    return dq, dk, dv, dk_cmp, dv_cmp, dgates, dk_win, dv_win


class NSAAttentionFunction(torch.autograd.Function):
    """The Triton path in eager mode (`torch.compile` sees the custom ops below instead)."""

    @staticmethod
    def forward(ctx, q, k, v, k_cmp, v_cmp, gates, k_win, v_win, geo: Geometry, settings: tuple):
        out, saved = nsa_forward(q, k, v, k_cmp, v_cmp, gates, k_win, v_win, geo, settings)
        ctx.save_for_backward(q, k, v, k_cmp, v_cmp, k_win, v_win, *saved)
        ctx.settings, ctx.geo = settings, geo
        ctx.mark_non_differentiable(saved[-1])
        return out, saved[-1]

    @staticmethod
    def backward(ctx, do, _unused):
        q, k, v, k_cmp, v_cmp, k_win, v_win, *saved = ctx.saved_tensors
        grads = nsa_backward(do, q, k, v, k_cmp, v_cmp, k_win, v_win, saved, ctx.geo, ctx.settings)
        return *grads, None, None


# The same forward and backward as two custom ops with fake implementations, so that Dynamo and AOTAutograd see one
# opaque node each (no graph break, no tracing into the launchers). The geometry is built inside, when the op runs:
# packed offsets are read on the host there, out of the graph. The forward returns what the backward needs.


@torch.library.custom_op("nsa_hf::nsa_attention_fwd", mutates_args=())
def _nsa_attention_fwd_op(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cmp: torch.Tensor, v_cmp: torch.Tensor,
    gates: torch.Tensor, k_win: torch.Tensor | None, v_win: torch.Tensor | None, cu_seqlens_q: torch.Tensor | None,
    cu_seqlens_k: torch.Tensor | None, compress_block_size: int, compress_stride: int, select_block_size: int,
    num_selected_blocks: int, window_size: int, num_initial_blocks: int, num_local_blocks: int, scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
           torch.Tensor]:
    """(out, o_cmp, lse_cmp, o_slc, lse_slc, o_win, lse_win, block_indices), all contiguous."""
    settings = (compress_block_size, compress_stride, select_block_size, num_selected_blocks, window_size,
                num_initial_blocks, num_local_blocks, scale)
    geo = attention_geometry(q, k, k_cmp, compress_block_size, compress_stride, cu_seqlens_q, cu_seqlens_k)
    out, saved = nsa_forward(q, k, v, k_cmp, v_cmp, gates, k_win, v_win, geo, settings)
    return tuple(t.contiguous() for t in (out, *saved[1:]))


@_nsa_attention_fwd_op.register_fake
def _(q, k, v, k_cmp, v_cmp, gates, k_win, v_win, cu_seqlens_q, cu_seqlens_k, compress_block_size, compress_stride,
      select_block_size, num_selected_blocks, *settings):
    B, T, HQ = q.shape[:3]
    outputs = [q.new_empty(B, T, HQ, v.shape[-1]) for _ in range(4)]  # out, o_cmp, o_slc, o_win
    lses = [q.new_empty(B, T, HQ, dtype=torch.float32) for _ in range(3)]
    block_indices = q.new_empty(B, T, k.shape[2], num_selected_blocks, dtype=torch.int32)
    return outputs[0], outputs[1], lses[0], outputs[2], lses[1], outputs[3], lses[2], block_indices


@torch.library.custom_op("nsa_hf::nsa_attention_bwd", mutates_args=())
def _nsa_attention_bwd_op(
    do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cmp: torch.Tensor, v_cmp: torch.Tensor,
    gates: torch.Tensor, k_win: torch.Tensor | None, v_win: torch.Tensor | None, o_cmp: torch.Tensor,
    lse_cmp: torch.Tensor, o_slc: torch.Tensor, lse_slc: torch.Tensor, o_win: torch.Tensor, lse_win: torch.Tensor,
    block_indices: torch.Tensor, cu_seqlens_q: torch.Tensor | None, cu_seqlens_k: torch.Tensor | None,
    compress_block_size: int, compress_stride: int, select_block_size: int, num_selected_blocks: int,
    window_size: int, num_initial_blocks: int, num_local_blocks: int, scale: float,
) -> list[torch.Tensor]:
    """[dq, dk, dv, dk_cmp, dv_cmp, dgates] and, when the window branch has its own K/V, [dk_win, dv_win]."""
    settings = (compress_block_size, compress_stride, select_block_size, num_selected_blocks, window_size,
                num_initial_blocks, num_local_blocks, scale)
    geo = attention_geometry(q, k, k_cmp, compress_block_size, compress_stride, cu_seqlens_q, cu_seqlens_k)
    saved = (gates.contiguous(), o_cmp, lse_cmp, o_slc, lse_slc, o_win, lse_win, block_indices)
    grads = nsa_backward(do, q, k, v, k_cmp, v_cmp, k_win, v_win, saved, geo, settings)
    return [g.contiguous() for g in grads if g is not None]


@_nsa_attention_bwd_op.register_fake
def _(do, q, k, v, k_cmp, v_cmp, gates, k_win, v_win, *rest):
    inputs = (q, k, v, k_cmp, v_cmp, gates) + (() if k_win is None else (k_win, v_win))
    return [torch.empty_like(x, memory_format=torch.contiguous_format) for x in inputs]


def _setup_context(ctx, inputs, output):
    q, k, v, k_cmp, v_cmp, gates, k_win, v_win, cu_seqlens_q, cu_seqlens_k, *settings = inputs
    ctx.save_for_backward(q, k, v, k_cmp, v_cmp, gates, k_win, v_win, *output[1:], cu_seqlens_q, cu_seqlens_k)
    ctx.settings = settings


def _backward(ctx, do, *unused):  # the outputs after `out` are saved state: their gradients are ignored
    q, k, v, k_cmp, v_cmp, gates, k_win, v_win, *saved, cu_seqlens_q, cu_seqlens_k = ctx.saved_tensors
    dq, dk, dv, dk_cmp, dv_cmp, dgates, *win = _nsa_attention_bwd_op(
        do, q, k, v, k_cmp, v_cmp, gates, k_win, v_win, *saved, cu_seqlens_q, cu_seqlens_k, *ctx.settings
    )
    dk_win, dv_win = win or (None, None)
    return (dq, dk, dv, dk_cmp, dv_cmp, dgates, dk_win, dv_win) + (None,) * (2 + len(ctx.settings))


_nsa_attention_fwd_op.register_autograd(_backward, setup_context=_setup_context)


def nsa_attention_triton(
    q, k, v, k_cmp, v_cmp, gates, k_win, v_win, geo: Geometry | None, *, cu_seqlens_q=None, cu_seqlens_k=None,
    compress_block_size, compress_stride, select_block_size, num_selected_blocks, window_size, num_initial_blocks,
    num_local_blocks, scale,
):
    """
    `nsa_hf.kernels.nsa_attention` on inputs it has checked, `geo` their geometry and `scale` resolved. Under
    `torch.compile` (`geo` None: the custom op builds it when it runs) one custom op; in eager mode the
    autograd.Function, which skips the op dispatcher.
    """
    settings = (compress_block_size, compress_stride, select_block_size, num_selected_blocks, window_size,
                num_initial_blocks, num_local_blocks, scale)
    if torch.compiler.is_compiling():
        return _nsa_attention_fwd_op(q, k, v, k_cmp, v_cmp, gates, k_win, v_win, cu_seqlens_q, cu_seqlens_k,
                                     *settings)[0]
    if geo is None:
        geo = attention_geometry(q, k, k_cmp, compress_block_size, compress_stride, cu_seqlens_q, cu_seqlens_k)
    out, _ = NSAAttentionFunction.apply(q, k, v, k_cmp, v_cmp, gates, k_win, v_win, geo, settings)
    return out
