"""
Selected-block attention, the selection branch of Native Sparse Attention, in Triton: forward and backward.

    o = selected_attention(q, k, v, block_indices, select_block_size)

A query at position t attends to key s iff `s // select_block_size` is among the blocks its KV group selected
(`block_indices`) and `s <= t` (only the block holding t is cut by the causal mask). Oracle:
`nsa_hf.kernels.reference.selected_attention_ref`.

Design:

* Everything runs on a packed layout: q `[Nq, HQ, DK]`, k/v `[Nk, HKV, D*]` with document offsets (a plain batch is
  B equal documents), so varlen and batched inputs share one code path (`SelectedInputs`).
* Forward, group-centric (NSA paper, Sec. 3.4; `selected_tiles.py`): a program owns one KV head and a tile of
  consecutive (position, head-in-group) rows and streams each KV block in the union of the tile's selections once.
  A second, key-centric forward ("by_block", `selected_reverse.py`) walks the reverse index instead: no masked rows
  at any group size, but the index costs a pass, so it runs where it measured faster (`default_fwd_mode`: group 4
  from 32k keys per document on an H200) or through `_tiling.override(selected_fwd="by_block")`.
* Backward (`selected_reverse.py`): dK/dV over the reverse index, for every (KV head, KV block) the query positions
  that selected it. dQ either rides along in that pass (dS K added into an fp32 accumulator with atomics: every
  (query, block) pair is visited once for all gradients; the default for G < 16) or gets its own pass over the query
  tiles with the union loop of the forward and p recomputed from the saved log-sum-exp (no atomics; the default for
  G >= 16, where the tiles have no masked rows to waste and the atomics would be 16 per KV block row).
"""

import torch

from ._checks import check_int, check_kernel_inputs, check_packing, check_qkv
from ._geometry import Geometry, geometry
from ._tiling import DECODE_ROWS, INTERPRET, SWITCHES, device_limits, dot_precision, next_pow2, split_head_dim, tuning
from .selected_reverse import attention_delta, by_block_forward, dkdv
from .selected_tiles import tile_rows, tiled_dq, tiled_forward


class SelectedInputs:
    """The inputs in the packed layout plus the per-document bookkeeping every kernel shares."""

    def __init__(self, q, k, v, block_indices, select_block_size, scale, geo: Geometry):
        B, Tq, HQ, DK = q.shape
        _, Tk, HKV, DV = v.shape
        self.geo, self.rules = geo, tuning(device_limits(q.device))
        self.B, self.HQ, self.HKV, self.G, self.DK, self.DV = B, HQ, HKV, HQ // HKV, DK, DV
        self.L = select_block_size
        self.n = block_indices.shape[-1]
        self.scale = scale
        self.varlen = geo.varlen
        self.q, self.k, self.v = _rows(q), _rows(k), _rows(v)
        self.idx = block_indices.reshape(B * Tq, HKV, self.n)
        if self.idx.dtype != torch.int32:
            self.idx = self.idx.to(torch.int32)
        if self.idx.stride(-1) != 1:
            self.idx = self.idx.contiguous()
        self.Nq, self.Nk = B * Tq, B * Tk
        self.num_docs = geo.num_docs
        if self.varlen:
            self.cu_q, self.cu_k = geo.cu_q, geo.cu_k
            self.TQ = self.TK = 0
        else:
            self.cu_q = self.cu_k = geo.dummy
            self.TQ, self.TK = Tq, Tk
        self.BK1, self.BK2 = split_head_dim(DK)
        self.BV = max(16, next_pow2(DV))
        self.prec = dot_precision(q.dtype)
        self.segment_rows = SWITCHES.selected_segment_rows or self.rules.selected_segment_rows

    def unpack(self, x):
        return x.reshape(self.B, -1, *x.shape[1:])


def _rows(x):
    """[B, T, H, D] -> [B*T, H, D] with a unit stride on D (a view whenever possible)."""
    x = x.reshape(x.shape[0] * x.shape[1], x.shape[2], x.shape[3])
    return x if x.stride(-1) == 1 else x.contiguous()


def default_fwd_mode(G: int, avg_keys: int, rules) -> str:
    """
    The key-centric forward for the group sizes and document lengths where it measured faster
    (`Tuning.selected_by_block_groups`, `Tuning.selected_by_block_keys`); the query tiles elsewhere.
    """
    by_block = G in rules.selected_by_block_groups and avg_keys >= rules.selected_by_block_keys
    return "by_block" if by_block else "tiled"


def forward_kernel(G: int, avg_keys: int, rules) -> tuple:
    """
    The selected forward that runs for group size G at `avg_keys` keys per document: `(mode, query-tile rows)`, rows
    None for the key-centric forward (`SWITCHES` overrides apply).
    """
    mode = SWITCHES.selected_fwd or default_fwd_mode(G, avg_keys, rules)
    return mode, tile_rows(G, avg_keys, rules) if mode == "tiled" else None


def forward_regimes(G: int, rules) -> set:
    """The `forward_kernel`s at short and at long documents for group size G."""
    return {forward_kernel(G, avg_keys, rules) for avg_keys in (0, 1 << 62)}


_COMPILED_AHEAD = set()


def compile_ahead(pk, used: tuple) -> None:
    """
    Compile, without running or timing, the selected forward's kernels of the length regime a call with these
    shapes did not use (`forward_regimes`), once per process: a server's first prompt past the regime boundary (32k
    keys) then compiles nothing; it only times the candidate configurations on its own inputs
    (`_tiling.QUICK`). The compile moves to the first call, once per machine (Triton's disk cache keeps it).
    """
    if INTERPRET or pk.q.device.type != "cuda" or torch.cuda.is_current_stream_capturing():
        return
    signature = (pk.q.device, pk.q.dtype, pk.k.dtype, pk.HQ, pk.HKV, pk.DK, pk.DV, pk.L, pk.n, pk.varlen)
    _COMPILED_AHEAD.add((signature, used))
    others = {r for r in forward_regimes(pk.G, pk.rules) if (signature, r) not in _COMPILED_AHEAD}
    if not others:
        return
    _COMPILED_AHEAD.update((signature, r) for r in others)
    # a small document of the same signature: every integer that follows the length is unspecialised
    T, dev = max(2 * pk.L, DECODE_ROWS), pk.q.device
    q = torch.zeros(1, T, pk.HQ, pk.DK, dtype=pk.q.dtype, device=dev)
    k = torch.zeros(1, T, pk.HKV, pk.DK, dtype=pk.k.dtype, device=dev)
    v = torch.zeros(1, T, pk.HKV, pk.DV, dtype=pk.v.dtype, device=dev)
    idx = torch.full((1, T, pk.HKV, pk.n), -1, dtype=torch.int32, device=dev)
    idx[..., 0] = 0
    cu = torch.tensor([0, T], dtype=torch.int32, device=dev) if pk.varlen else None
    small = SelectedInputs(q, k, v, idx, pk.L, pk.scale, geometry(q, T, cu, cu))
    for mode, rows in others:
        if mode == "by_block":
            by_block_forward(small, compile_only=True)
        else:
            tiled_forward(small, rows, compile_only=True)


def default_dq_mode(G: int, rules) -> str:
    """
    Fused dQ costs one fp32 atomic per (query head, selected block, dim): ~2.8 ms per 1e9 on an H100. The tiled pass
    pays for masked rows of its union tiles instead, which grows as G shrinks. Measured backward ms (H100, 64k /
    8k): 32q/8kv fused 21.0 / 2.8 vs tiled 51.3 / 3.2; 64q/4kv fused 42.5 / 4.7 vs tiled 38.6 / 4.1.
    """
    return "tiled" if G >= rules.selected_tiled_dq_groups else "fused"


def selected_attention_fwd(q, k, v, block_indices, select_block_size: int, scale: float, geo: Geometry):
    """
    Forward of selected-block attention on checked inputs (`selected_attention`'s shapes; `scale` resolved; `geo` the
    call's geometry). Returns `(o [B, Tq, HQ, DV] in q's dtype, lse [B, Tq, HQ] float32)`, lse the natural-log
    log-sum-exp of the scaled scores (`-inf` for a query that sees no key; its output is zero).

    Query tiles of a heuristic height (`selected_tiles.tile_rows`), or the key-centric forward over the reverse index
    where `default_fwd_mode` or `override(selected_fwd=...)` says so.
    """
    pk = SelectedInputs(q, k, v, block_indices, select_block_size, scale, geo)
    if pk.Nq == 0:
        o = torch.empty(pk.Nq, pk.HQ, pk.DV, dtype=q.dtype, device=q.device)
        return pk.unpack(o), torch.empty(pk.B, 0, pk.HQ, dtype=torch.float32, device=q.device)
    mode, rows = forward_kernel(pk.G, geo.avg_k, pk.rules)
    if mode == "by_block":
        o, lse = by_block_forward(pk)
        o = o.to(q.dtype)
    else:
        o, lse = tiled_forward(pk, rows)
    compile_ahead(pk, (mode, rows))
    return pk.unpack(o), lse.reshape(pk.B, -1, pk.HQ)


def selected_attention_bwd(do, q, k, v, o, lse, block_indices, select_block_size: int, scale: float, geo: Geometry,
                           delta=None):
    """
    Backward of selected-block attention from the forward's `o` and `lse`. Returns `(dq, dk, dv)` shaped and typed
    like q, k, v. `delta` (float32 `[B, Tq, HQ]`, rowsum(do * o)) may be passed by a caller that has it.

    dQ "fused" (added inside the dK/dV pass over the reverse index with fp32 atomics) or "tiled" (its own pass over
    the query tiles, like the forward, no atomics): `default_dq_mode`, or `override(selected_dq=...)`.
    """
    pk = SelectedInputs(q, k, v, block_indices, select_block_size, scale, geo)
    dev = q.device
    fused = (SWITCHES.selected_dq or default_dq_mode(pk.G, pk.rules)) == "fused"
    dka = torch.zeros(pk.Nk, pk.HKV, pk.DK, dtype=torch.float32, device=dev)
    dva = torch.zeros(pk.Nk, pk.HKV, pk.DV, dtype=torch.float32, device=dev)
    if pk.Nq == 0 or pk.Nk == 0 or pk.n == 0:
        dq = torch.zeros(pk.Nq, pk.HQ, pk.DK, dtype=q.dtype, device=dev)
        return pk.unpack(dq), pk.unpack(dka.to(k.dtype)), pk.unpack(dva.to(v.dtype))
    do_ = _rows(do)
    lse_ = lse.reshape(pk.Nq, pk.HQ).float().contiguous()
    if fused:
        dqa = torch.zeros(pk.Nq, pk.HQ, pk.DK, dtype=torch.float32, device=dev)
        if delta is None:
            delta = attention_delta(o, do)
        delta = delta.reshape(pk.Nq, pk.HQ).float().contiguous()
    else:
        dqa = dka  # unused by the kernel
        dq, delta = tiled_dq(pk, _rows(o), do_, lse_, tile_rows(pk.G, 0, pk.rules, forward=False))
    dkdv(pk, do_, lse_, delta, dka, dva, dqa, fused)
    if fused:
        dq = dqa.to(q.dtype)
    return pk.unpack(dq), pk.unpack(dka.to(k.dtype)), pk.unpack(dva.to(v.dtype))


class SelectedAttentionFunction(torch.autograd.Function):
    """Thin autograd wrapper: the forward saves (q, k, v, o, lse); block indices get no gradient."""

    @staticmethod
    def forward(ctx, q, k, v, block_indices, select_block_size, scale, geo):
        o, lse = selected_attention_fwd(q, k, v, block_indices, select_block_size, scale, geo)
        ctx.save_for_backward(q, k, v, o, lse, block_indices)
        ctx.select_block_size, ctx.scale, ctx.geo = select_block_size, scale, geo
        ctx.mark_non_differentiable(lse)
        return o, lse

    @staticmethod
    def backward(ctx, do, dlse):
        q, k, v, o, lse, block_indices = ctx.saved_tensors
        dq, dk, dv = selected_attention_bwd(
            do.contiguous(), q, k, v, o, lse, block_indices, ctx.select_block_size, ctx.scale, ctx.geo
        )
        return dq, dk, dv, None, None, None, None


def check_block_indices(q, k, block_indices) -> None:
    B, Tq, _, _ = q.shape
    HKV = k.shape[2]
    if not isinstance(block_indices, torch.Tensor) or block_indices.dim() != 4:
        raise ValueError(f"`block_indices` must be a 4-D tensor, got {getattr(block_indices, 'shape', block_indices)}")
    if block_indices.shape[:3] != (B, Tq, HKV):
        raise ValueError(f"block_indices must have shape {(B, Tq, HKV, 'n')}, got {tuple(block_indices.shape)}")
    if block_indices.dtype not in (torch.int32, torch.int64, torch.int16):
        raise ValueError(f"block_indices must be an integer tensor (int32), got {block_indices.dtype}")
    if block_indices.device != q.device:
        raise ValueError(f"block_indices must be on the device of q ({q.device}), got {block_indices.device}")


def selected_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    block_indices: torch.Tensor,
    select_block_size: int,
    scale: float | None = None,
    cu_seqlens_q: torch.Tensor | None = None,
    cu_seqlens_k: torch.Tensor | None = None,
) -> torch.Tensor:
    """
    Attention of each query over the key blocks its KV group selected (NSA selection branch), differentiable in
    q, k, v.

    Args:
        q: `[B, Tq, HQ, DK]`; k: `[B, Tk, HKV, DK]`; v: `[B, Tk, HKV, DV]`; `HQ % HKV == 0`; float16/bfloat16 on CUDA
            (float32 works too; on CPU only under `TRITON_INTERPRET=1`). DK, DV <= 256.
        block_indices: int32 `[B, Tq, HKV, n]`: per query and KV head the selected block numbers, ascending, `-1` for
            unused slots. Block j covers keys `[j*l', (j+1)*l')` (per document when packed). Blocks with no visible
            key (`j*l' > t`) are ignored.
        select_block_size: l', any positive int (16..128 in practice).
        scale: softmax scale, default `DK ** -0.5`.
        cu_seqlens_q, cu_seqlens_k: `[num_docs + 1]` int32 offsets of packed documents (batch 1); queries of a
            document are the last positions of its keys (bottom-right alignment): query i of a document with Lq
            queries and Lk keys sits at position `Lk - Lq + i` and sees keys `s <= Lk - Lq + i`.

    Returns:
        `[B, Tq, HQ, DV]` in q's dtype; a query that sees no key gets zeros.
    """
    check_qkv(q, k, v)
    check_block_indices(q, k, block_indices)
    check_int("select_block_size", select_block_size)
    check_kernel_inputs(q, k, v)
    check_packing(q, cu_seqlens_q, cu_seqlens_k)
    geo = geometry(q, k.shape[1], cu_seqlens_q, cu_seqlens_k)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    return SelectedAttentionFunction.apply(q, k, v, block_indices, select_block_size, scale, geo)[0]


__all__ = ["selected_attention", "selected_attention_fwd", "selected_attention_bwd", "SelectedAttentionFunction"]
