"""
Pure-PyTorch Native Sparse Attention: the executable form of `shared/NSA_SPEC.md` and the oracle that every Triton
kernel is tested against. It runs on any device and is differentiable by autograd.

Conventions shared by every function here:
- layout `[batch, seq, heads, dim]`; queries have `HQ` heads, keys/values `HKV` heads, `HQ % HKV == 0`, query head
  `h` reads key/value head `h // (HQ // HKV)`;
- queries are the LAST `Tq` positions of the `Tk` keys (bottom-right causal alignment, as in FlashAttention), so a
  prefill has `Tq == Tk` and a decoding step `Tq == 1`; query `i` sits at position `t = Tk - Tq + i`;
- packed documents: batch is 1 and `cu_seqlens_q` / `cu_seqlens_k` (`[num_docs + 1]` int offsets) delimit them; each
  document is its own sequence (positions, blocks and masks restart), compressed keys are packed by
  `utils.compressed_cu_seqlens(cu_seqlens_k, ...)`;
- softmax runs in float32; outputs come back in the dtype of `q`; a query that sees no key gets a zero output and a
  log-sum-exp of `-inf`.
"""

import math

import torch

from ._checks import check_document_lengths, check_packing, check_query_count
from .utils import compressed_cu_seqlens, host_offsets

_QUERY_CHUNK = 1024  # bounds the [Tq, Tk] score matrix the reference holds at once


def _positions(num_queries: int, num_keys: int, device) -> torch.Tensor:
    return torch.arange(num_keys - num_queries, num_keys, device=device)


def _masked_attention(q, k, v, mask_fn, scale):
    """
    Softmax attention of q `[B, Tq, HQ, D]` over k/v `[B, Tk, HKV, D*]` where `mask_fn(query_slice)` gives the
    allowed keys as a bool tensor broadcastable to `[B, HKV, 1 or G, len(query_slice), Tk]`.
    Returns (out `[B, Tq, HQ, DV]` in q's dtype, lse `[B, Tq, HQ]` float32).
    """
    B, Tq, HQ, DK = q.shape
    HKV, DV = k.shape[2], v.shape[3]
    G = HQ // HKV
    acc = _compute_dtype(q)
    qf = q.to(acc).reshape(B, Tq, HKV, G, DK).permute(0, 2, 3, 1, 4)  # [B, HKV, G, Tq, D]
    kf = k.to(acc).permute(0, 2, 1, 3).unsqueeze(2)  # [B, HKV, 1, Tk, D]
    vf = v.to(acc).permute(0, 2, 1, 3).unsqueeze(2)
    outs, lses = [qf.new_zeros(B, HKV, G, 0, DV)], [qf.new_zeros(B, HKV, G, 0)]
    for start in range(0, Tq, _QUERY_CHUNK):
        rows = slice(start, min(start + _QUERY_CHUNK, Tq))
        scores = (qf[:, :, :, rows] @ kf.transpose(-1, -2)) * scale
        mask = mask_fn(rows)
        # A row with no visible key gets all-zero logits, then a zero output and lse -inf: no NaN forward or backward.
        has_key = mask.any(-1, keepdim=True)
        scores = scores.masked_fill(~mask, float("-inf")).masked_fill(~has_key, 0.0)
        probs = torch.softmax(scores, dim=-1) * has_key
        outs.append(probs @ vf)
        lses.append(torch.logsumexp(scores, dim=-1).masked_fill(~has_key.squeeze(-1), float("-inf")))
    out = torch.cat(outs, dim=3).permute(0, 3, 1, 2, 4).reshape(B, Tq, HQ, DV)
    lse = torch.cat(lses, dim=3).permute(0, 3, 1, 2).reshape(B, Tq, HQ)
    return out.to(q.dtype), lse.float()


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    """float64 for float64 inputs (exact checks of the reference itself), float32 for everything else."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _per_document(fn, q, cu_seqlens_q, cu_seqlens_k, *tensors_k, cu_seqlens_cmp=None, tensors_cmp=()):
    """
    Run `fn(doc_index, q_doc, *k_docs, *cmp_docs)` on each packed document that has queries and concatenate its
    outputs along seq.
    """
    bq, bk = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    bc = cu_seqlens_cmp.tolist() if cu_seqlens_cmp is not None else None
    results = []
    for i in range(len(bq) - 1):
        if bq[i + 1] == bq[i]:
            continue
        args = [q[:, bq[i] : bq[i + 1]]] + [t[:, bk[i] : bk[i + 1]] for t in tensors_k]
        args += [t[:, bc[i] : bc[i + 1]] for t in tensors_cmp]
        results.append(fn(i, *args))
    if not results:  # no queries at all: run one empty document for correctly shaped empty outputs
        args = [q[:, :0]] + [t[:, :0] for t in tensors_k] + [t[:, :0] for t in tensors_cmp]
        results.append(fn(0, *args))
    if isinstance(results[0], tuple):
        return tuple(torch.cat(parts, dim=1) for parts in zip(*results))
    return torch.cat(results, dim=1)


def check_query_key_lengths(q, k, cu_seqlens_q=None, cu_seqlens_k=None):
    """Validate the packing arguments and that every document has at least as many keys as queries."""
    check_packing(q, cu_seqlens_q, cu_seqlens_k)
    if cu_seqlens_q is None:
        check_query_count(q.shape[1], k.shape[1])
    else:
        check_document_lengths(*host_offsets(cu_seqlens_q, cu_seqlens_k), q.shape[1], k.shape[1])


def compressed_attention_ref(
    q, k_cmp, v_cmp, compress_block_size, compress_stride, num_keys=None, scale=None,
    cu_seqlens_q=None, cu_seqlens_k=None,
):
    """
    Attention over compressed keys (Eq. 7): query at position t sees block i iff `i*d + l - 1 <= t`.

    Args:
        q: `[B, Tq, HQ, DK]`. k_cmp: `[B, Nc, HKV, DK]`, v_cmp: `[B, Nc, HKV, DV]`.
        num_keys: Tk, the length of the uncompressed key sequence (default Tq); packed: from `cu_seqlens_k`.
    Returns:
        (out `[B, Tq, HQ, DV]`, lse `[B, Tq, HQ]` float32, `-inf` where no block is complete).
    """
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    l, d = compress_block_size, compress_stride
    if cu_seqlens_q is not None:
        if cu_seqlens_k is None:
            raise ValueError("pass both `cu_seqlens_q` and `cu_seqlens_k`, or neither")
        cu_cmp = compressed_cu_seqlens(cu_seqlens_k, l, d)
        lengths = (cu_seqlens_k[1:] - cu_seqlens_k[:-1]).tolist()
        return _per_document(
            lambda i, qd, kc, vc: compressed_attention_ref(qd, kc, vc, l, d, lengths[i], scale),
            q, cu_seqlens_q, cu_seqlens_k, cu_seqlens_cmp=cu_cmp, tensors_cmp=(k_cmp, v_cmp),
        )
    Tq = q.shape[1]
    num_keys = Tq if num_keys is None else num_keys
    if Tq > num_keys:
        raise ValueError(f"more queries ({Tq}) than keys ({num_keys}): q_len must be at most k_len")
    t = _positions(Tq, num_keys, q.device)
    block_end = torch.arange(k_cmp.shape[1], device=q.device) * d + l - 1
    visible = block_end[None, :] <= t[:, None]  # [Tq, Nc]
    return _masked_attention(q, k_cmp, v_cmp, lambda rows: visible[rows], scale)


def selection_scores_ref(q, k_cmp, lse_cmp, compress_block_size, compress_stride, select_block_size, num_keys=None, scale=None):
    """
    Importance of each selection block for each query and KV head (Eqs. 8-10), without the fixed/eligibility rules.

    p_cmp = softmax(q . K_cmp * scale) is re-derived from `lse_cmp`; the score of selection block j is the sum over
    the compression blocks i overlapping it of p_cmp[i] * overlap(i, j) / d, summed over the query heads of the group.
    Returns `[B, Tq, HKV, num_select_blocks]` float32 with `num_select_blocks = ceil(Tk / l')`. Not packed: the caller
    splits documents.
    """
    B, Tq, HQ, _ = q.shape
    HKV = k_cmp.shape[2]
    num_keys = Tq if num_keys is None else num_keys
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    l, d, lp = compress_block_size, compress_stride, select_block_size
    num_sel = math.ceil(num_keys / lp)
    Nc = k_cmp.shape[1]
    t = _positions(Tq, num_keys, q.device)
    if Nc == 0:
        return q.new_zeros(B, Tq, HKV, num_sel, dtype=torch.float32)
    # float64 then rounded to float32: blocks whose scores are mathematically equal (e.g. uniform p_cmp) then tie
    # exactly whatever the summation order, and the tie goes to the lower index as specified.
    qf = q.double().reshape(B, Tq, HKV, HQ // HKV, -1)
    logits = torch.einsum("btkgd,bnkd->btkgn", qf, k_cmp.double()) * scale
    visible = (torch.arange(Nc, device=q.device) * d + l - 1)[None, :] <= t[:, None]  # [Tq, Nc]
    lse = lse_cmp.double().reshape(B, Tq, HKV, HQ // HKV, 1)
    probs = torch.exp(logits - lse).masked_fill(~visible[None, :, None, None, :], 0.0)
    probs = torch.nan_to_num(probs, nan=0.0).sum(3)  # [B, Tq, HKV, Nc]
    cmp_start = torch.arange(Nc, device=q.device) * d
    sel_start = torch.arange(num_sel, device=q.device) * lp
    overlap = (
        torch.minimum(cmp_start[:, None] + l, sel_start[None, :] + lp) - torch.maximum(cmp_start[:, None], sel_start[None, :])
    ).clamp_min(0)
    return (probs @ (overlap.double() / d)).float()


def select_blocks_ref(
    scores, select_block_size, num_selected_blocks, num_initial_blocks=1, num_local_blocks=2, num_keys=None
):
    """
    Top-n selection (Eq. 11) from `scores` `[B, Tq, HKV, NS]`. The initial blocks and the local blocks (the one
    holding t and the `num_local_blocks - 1` before it) are always taken; only blocks with `j*l' <= t` are eligible;
    ties go to the lower block index. Returns int32 `[B, Tq, HKV, n]`, ascending, `-1` where fewer than n blocks are
    eligible.
    """
    B, Tq, HKV, NS = scores.shape
    num_keys = Tq if num_keys is None else num_keys
    t = _positions(Tq, num_keys, scores.device)
    j = torch.arange(NS, device=scores.device)
    current = (t // select_block_size)[:, None]
    eligible = j[None, :] <= current
    fixed = eligible & ((j[None, :] < num_initial_blocks) | (j[None, :] > current - num_local_blocks))
    ranked = scores.float().masked_fill(fixed[None, :, None, :], float("inf"))
    ranked = ranked.masked_fill(~eligible[None, :, None, :], float("-inf"))
    order = torch.sort(ranked, dim=-1, descending=True, stable=True).indices[..., :num_selected_blocks]
    taken = torch.gather(eligible[None, :, None, :].expand(B, Tq, HKV, NS), -1, order)
    order = torch.where(taken, order, torch.full_like(order, NS))
    order = torch.sort(order, dim=-1).values
    order = torch.where(order == NS, torch.full_like(order, -1), order)
    if order.shape[-1] < num_selected_blocks:
        pad = order.new_full((B, Tq, HKV, num_selected_blocks - order.shape[-1]), -1)
        order = torch.cat([order, pad], dim=-1)
    return order.to(torch.int32)


def selected_attention_ref(q, k, v, block_indices, select_block_size, scale=None, cu_seqlens_q=None, cu_seqlens_k=None):
    """
    Attention over the selected blocks: query at t sees key s iff `s // l'` is among its group's `block_indices`
    (`[B, Tq, HKV, n]`, `-1` = unused) and `s <= t`. Returns `[B, Tq, HQ, DV]`.
    """
    check_query_key_lengths(q, k, cu_seqlens_q, cu_seqlens_k)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    if cu_seqlens_q is not None:
        bq = cu_seqlens_q.tolist()

        def one(n, qd, kd, vd):
            return selected_attention_ref(qd, kd, vd, block_indices[:, bq[n] : bq[n + 1]], select_block_size, scale)

        return _per_document(one, q, cu_seqlens_q, cu_seqlens_k, k, v)
    B, Tq = q.shape[:2]
    Tk = k.shape[1]
    NS = math.ceil(Tk / select_block_size)
    t = _positions(Tq, Tk, q.device)
    idx = block_indices.long()
    chosen = torch.zeros(B, Tq, idx.shape[2], NS + 1, dtype=torch.bool, device=q.device)
    chosen.scatter_(-1, torch.where(idx < 0, NS, idx), True)
    key_block = torch.arange(Tk, device=q.device) // select_block_size
    causal = torch.arange(Tk, device=q.device)[None, :] <= t[:, None]  # [Tq, Tk]
    allowed = chosen[..., :NS][..., key_block] & causal[None, :, None, :]  # [B, Tq, HKV, Tk]
    allowed = allowed.permute(0, 2, 1, 3).unsqueeze(2)  # [B, HKV, 1, Tq, Tk]
    return _masked_attention(q, k, v, lambda rows: allowed[:, :, :, rows], scale)[0]


def window_attention_ref(q, k, v, window_size, scale=None, cu_seqlens_q=None, cu_seqlens_k=None):
    """Sliding-window attention: query at t sees keys `t - w + 1 .. t`. Returns `[B, Tq, HQ, DV]`."""
    check_query_key_lengths(q, k, cu_seqlens_q, cu_seqlens_k)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    if cu_seqlens_q is not None:
        return _per_document(
            lambda i, qd, kd, vd: window_attention_ref(qd, kd, vd, window_size, scale), q, cu_seqlens_q, cu_seqlens_k, k, v
        )
    Tq, Tk = q.shape[1], k.shape[1]
    t = _positions(Tq, Tk, q.device)
    s = torch.arange(Tk, device=q.device)
    allowed = (s[None, :] <= t[:, None]) & (s[None, :] > t[:, None] - window_size)
    return _masked_attention(q, k, v, lambda rows: allowed[rows], scale)[0]


def nsa_attention_ref(
    q, k, v, k_cmp, v_cmp, gates, *, compress_block_size, compress_stride, select_block_size, num_selected_blocks,
    window_size, num_initial_blocks=1, num_local_blocks=2, scale=None, k_win=None, v_win=None,
    cu_seqlens_q=None, cu_seqlens_k=None, return_block_indices=False,
):
    """
    Native Sparse Attention (Eq. 5): gated sum of compressed, selected and sliding-window attention.

    Args:
        q: `[B, Tq, HQ, DK]`; k: `[B, Tk, HKV, DK]`, v: `[B, Tk, HKV, DV]` (the selection branch's keys/values, and
            every branch's when K/V are shared).
        k_cmp, v_cmp: `[B, Nc, HKV, DK/DV]` compressed keys/values, Nc = complete compression blocks of Tk (packed:
            per document, offsets `compressed_cu_seqlens(cu_seqlens_k)`).
        gates: `[B, Tq, HQ, 3]` in [0, 1], the (cmp, slc, win) gates.
        k_win, v_win: window-branch keys/values when they are not shared (default: k, v).
    Returns:
        `[B, Tq, HQ, DV]` in q's dtype; with `return_block_indices`, also the int32 `[B, Tq, HKV, n]` selection.
    """
    check_query_key_lengths(q, k, cu_seqlens_q, cu_seqlens_k)
    return nsa_attention_unchecked(
        q, k, v, k_cmp, v_cmp, gates, compress_block_size=compress_block_size, compress_stride=compress_stride,
        select_block_size=select_block_size, num_selected_blocks=num_selected_blocks, window_size=window_size,
        num_initial_blocks=num_initial_blocks, num_local_blocks=num_local_blocks, scale=scale, k_win=k_win,
        v_win=v_win, cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k, return_block_indices=return_block_indices,
    )


def nsa_attention_unchecked(
    q, k, v, k_cmp, v_cmp, gates, *, compress_block_size, compress_stride, select_block_size, num_selected_blocks,
    window_size, num_initial_blocks=1, num_local_blocks=2, scale=None, k_win=None, v_win=None,
    cu_seqlens_q=None, cu_seqlens_k=None, return_block_indices=False,
):
    """`nsa_attention_ref` on inputs `nsa_attention` (or `nsa_attention_ref`) has checked."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    k_win = k if k_win is None else k_win
    v_win = v if v_win is None else v_win
    l, d, lp = compress_block_size, compress_stride, select_block_size
    if cu_seqlens_q is not None:
        cu_cmp = compressed_cu_seqlens(cu_seqlens_k, l, d)
        bq = cu_seqlens_q.tolist()

        def one(n, qd, kd, vd, kwd, vwd, kcd, vcd):
            return nsa_attention_unchecked(
                qd, kd, vd, kcd, vcd, gates[:, bq[n] : bq[n + 1]], compress_block_size=l, compress_stride=d,
                select_block_size=lp, num_selected_blocks=num_selected_blocks, window_size=window_size,
                num_initial_blocks=num_initial_blocks, num_local_blocks=num_local_blocks, scale=scale,
                k_win=kwd, v_win=vwd, return_block_indices=True,
            )

        out, indices = _per_document(
            one, q, cu_seqlens_q, cu_seqlens_k, k, v, k_win, v_win, cu_seqlens_cmp=cu_cmp, tensors_cmp=(k_cmp, v_cmp)
        )
        return (out, indices) if return_block_indices else out

    Tk = k.shape[1]
    o_cmp, lse_cmp = compressed_attention_ref(q, k_cmp, v_cmp, l, d, num_keys=Tk, scale=scale)
    with torch.no_grad():
        scores = selection_scores_ref(q, k_cmp, lse_cmp, l, d, lp, num_keys=Tk, scale=scale)
        indices = select_blocks_ref(scores, lp, num_selected_blocks, num_initial_blocks, num_local_blocks, num_keys=Tk)
    o_slc = selected_attention_ref(q, k, v, indices, lp, scale)
    o_win = window_attention_ref(q, k_win, v_win, window_size, scale)
    acc = _compute_dtype(q)
    g = gates.to(acc)
    out = g[..., 0:1] * o_cmp.to(acc) + g[..., 1:2] * o_slc.to(acc) + g[..., 2:3] * o_win.to(acc)
    out = out.to(q.dtype)
    return (out, indices) if return_block_indices else out


def nsa_decode_ref(
    q, k, v, k_cmp, v_cmp, gates, query_positions, *, compress_block_size, compress_stride, select_block_size,
    num_selected_blocks, window_size, num_initial_blocks=1, num_local_blocks=2, scale=None, k_win=None, v_win=None,
    return_block_indices=False,
):
    """
    NSA for a few queries per row at explicit positions of a key/value cache (decoding, chunked prefill, speculative
    decoding), with every row at its own length. Equal to `nsa_attention_ref` of each query alone over the keys
    `[0, t]` of its row; built from whole-tensor masks (no host sync, no loop over rows), so it traces under
    `torch.compile` and CUDA graphs.

    Args:
        q: `[B, Tq, HQ, DK]`; gates `[B, Tq, HQ, 3]`.
        k, v (and k_win, v_win): `[B, S, HKV, D]` caches; only the keys at or before each query's position are read.
        k_cmp, v_cmp: `[B, Nc, HKV, D]`, row b's compressed blocks from index 0 (at least as many as the last query
            of the row sees).
        query_positions: `[B, Tq]` int, the position t of each query in its row; -1 marks a slot without a query
            (its output is zero).
    Returns:
        `[B, Tq, HQ, DV]` in q's dtype; with `return_block_indices`, also the int32 `[B, Tq, HKV, n]` selection.
    """
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    k_win = k if k_win is None else k_win
    v_win = v if v_win is None else v_win
    l, d, lp = compress_block_size, compress_stride, select_block_size
    B, Tq, HQ, _ = q.shape
    S, HKV = k.shape[1], k.shape[2]
    G = HQ // HKV
    Nc = k_cmp.shape[1]
    NS = -(-S // lp)
    t = query_positions.long()  # [B, Tq]
    dev = q.device

    def attention(keys, values, mask):
        # _masked_attention wants one mask for every row of the batch: fold the batch into the heads
        qf = q.permute(1, 0, 2, 3).reshape(Tq, 1, B * HQ, -1).transpose(0, 1)  # [1, Tq, B*HQ, D]
        kf = keys.permute(1, 0, 2, 3).reshape(keys.shape[1], B * HKV, -1).unsqueeze(0)
        vf = values.permute(1, 0, 2, 3).reshape(values.shape[1], B * HKV, -1).unsqueeze(0)
        m = mask.expand(B, Tq, HKV, mask.shape[-1]).permute(0, 2, 1, 3).reshape(1, B * HKV, 1, Tq, -1)
        out, lse = _masked_attention(qf, kf, vf, lambda rows: m[..., rows, :], scale)
        out = out.reshape(Tq, B, HQ, -1).transpose(0, 1)
        return out, lse.reshape(Tq, B, HQ).transpose(0, 1)

    visible = (torch.arange(Nc, device=dev) * d + l - 1)[None, None, :] <= t[..., None]  # [B, Tq, Nc]
    o_cmp, lse_cmp = attention(k_cmp, v_cmp, visible.unsqueeze(2))

    with torch.no_grad():  # Eq. 8-11, in float64 as `selection_scores_ref` (exact ties go to the lower block)
        qd = q.double().reshape(B, Tq, HKV, G, -1)
        logits = torch.einsum("btkgd,bnkd->btkgn", qd, k_cmp.double()) * scale
        probs = torch.exp(logits - lse_cmp.double().reshape(B, Tq, HKV, G, 1))
        probs = torch.nan_to_num(probs.masked_fill(~visible[:, :, None, None, :], 0.0), nan=0.0).sum(3)
        cmp_start = torch.arange(Nc, device=dev) * d
        sel_start = torch.arange(NS, device=dev) * lp
        overlap = (torch.minimum(cmp_start[:, None] + l, sel_start[None, :] + lp)
                   - torch.maximum(cmp_start[:, None], sel_start[None, :])).clamp_min(0)
        scores = (probs @ (overlap.double() / d)).float()  # [B, Tq, HKV, NS]
        j = torch.arange(NS, device=dev)
        current = (t // lp)[..., None]  # [B, Tq, 1]
        eligible = (j <= current) & (t[..., None] >= 0)
        fixed = eligible & ((j < num_initial_blocks) | (j > current - num_local_blocks))
        ranked = scores.masked_fill(fixed[:, :, None, :], float("inf"))
        ranked = ranked.masked_fill(~eligible[:, :, None, :], float("-inf"))
        n = min(num_selected_blocks, NS)
        order = torch.sort(ranked, dim=-1, descending=True, stable=True).indices[..., :n]
        taken = torch.gather(eligible[:, :, None, :].expand(B, Tq, HKV, NS), -1, order)
        indices = torch.where(taken, order, torch.full_like(order, -1))
        if n < num_selected_blocks:
            indices = torch.cat([indices, indices.new_full((B, Tq, HKV, num_selected_blocks - n), -1)], dim=-1)

    s = torch.arange(S, device=dev)
    chosen = torch.zeros(B, Tq, HKV, NS + 1, dtype=torch.bool, device=dev)
    chosen.scatter_(-1, torch.where(indices < 0, NS, indices), True)
    causal = s <= t[..., None]  # [B, Tq, S]
    o_slc, _ = attention(k, v, chosen[..., :NS][..., s // lp] & causal.unsqueeze(2))
    in_window = causal & (s > t[..., None] - window_size)
    o_win, _ = attention(k_win, v_win, in_window.unsqueeze(2))

    acc = _compute_dtype(q)
    g = gates.to(acc)
    out = g[..., 0:1] * o_cmp.to(acc) + g[..., 1:2] * o_slc.to(acc) + g[..., 2:3] * o_win.to(acc)
    out = out.masked_fill((t < 0)[..., None, None], 0.0).to(q.dtype)
    return (out, indices.to(torch.int32)) if return_block_indices else out
