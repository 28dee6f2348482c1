"""
A deliberately literal, per-query reading of `shared/NSA_SPEC.md`, independent of `nsa_hf.kernels.reference`.

Everything loops in Python over batch, query position and head; for each branch it builds the explicit list of key
indices the spec says the query sees and runs a float64 softmax over exactly those keys. The discrete decisions
(which compressed blocks are visible, block scores, the top-n selection) use plain Python numbers, so autograd flows
only through the attention of the three branches, as the spec requires ("selection is discrete and has no gradient").
Slow on purpose; keep shapes small.
"""

import math

import torch


def bf_mean_compress(x, l, d):
    """Mean-pool compression, literally: compressed key i is the mean of x[i*d : i*d + l], for every complete block."""
    B, T, H, D = x.shape
    blocks = []
    i = 0
    while i * d + l <= T:
        blocks.append(x[:, i * d : i * d + l].sum(1) / l)
        i += 1
    if not blocks:
        return x.new_zeros(B, 0, H, D)
    return torch.stack(blocks, dim=1)


def _attend(qv, keys, values, scale):
    """float64 softmax attention of one query vector over the given rows (empty -> zero output)."""
    if keys.shape[0] == 0:
        return qv.new_zeros(values.shape[-1])
    logits = (keys @ qv) * scale
    p = torch.softmax(logits, dim=0)
    return p @ values


def overlap_tokens(i, j, l, d, lp):
    """Number of tokens shared by compression block i = [i*d, i*d+l) and selection block j = [j*lp, (j+1)*lp)."""
    return len(set(range(i * d, i * d + l)) & set(range(j * lp, (j + 1) * lp)))


def bf_select(scores, t, lp, n, n_init, n_local):
    """
    Top-n selection for one query at t from the list `scores` (one per selection block): the fixed blocks (initial
    blocks, the block holding t and the n_local - 1 before it) among the eligible ones (j*lp <= t), then the
    highest-scoring other eligible blocks, ties to the lower index. Returns the ascending list padded with -1 to n.
    """
    eligible = [j for j in range(len(scores)) if j * lp <= t]
    cur = t // lp
    fixed = [j for j in eligible if j < n_init or cur - n_local < j <= cur]
    others = sorted((j for j in eligible if j not in fixed), key=lambda j: (-scores[j], j))
    chosen = sorted(fixed + others[: max(0, n - len(fixed))])
    return chosen + [-1] * (n - len(chosen))


def bf_nsa(
    q, k, v, k_cmp, v_cmp, gates, *, l, d, lp, n, w, n_init=1, n_local=2, scale=None, k_win=None, v_win=None
):
    """
    Brute-force NSA for one (unpacked) batch: q `[B, Tq, HQ, DK]` are the last Tq positions of k/v `[B, Tk, HKV, *]`.

    Returns a dict of float64 tensors: out, o_cmp, o_slc, o_win `[B, Tq, HQ, DV]`; scores `[B, Tq, HKV, NS]`
    (Eq. 9-10 importance, summed over the group); blocks, an int64 `[B, Tq, HKV, n]` of selected blocks.
    """
    q, k, v, k_cmp, v_cmp, gates = (x.double() for x in (q, k, v, k_cmp, v_cmp, gates))
    k_win = k if k_win is None else k_win.double()
    v_win = v if v_win is None else v_win.double()
    B, Tq, HQ, DK = q.shape
    Tk, HKV = k.shape[1], k.shape[2]
    G = HQ // HKV
    Nc = k_cmp.shape[1]
    NS = math.ceil(Tk / lp)
    scale = DK**-0.5 if scale is None else scale
    overlap = [[overlap_tokens(i, j, l, d, lp) for j in range(NS)] for i in range(Nc)]

    out, o_cmp, o_slc, o_win = ([[[None] * HQ for _ in range(Tq)] for _ in range(B)] for _ in range(4))
    scores_all = torch.zeros(B, Tq, HKV, NS, dtype=torch.float64)
    blocks_all = torch.zeros(B, Tq, HKV, n, dtype=torch.int64)
    for b in range(B):
        for qi in range(Tq):
            t = Tk - Tq + qi
            for g in range(HKV):
                heads = range(g * G, (g + 1) * G)
                # compression branch: complete blocks ending at or before t
                visible = [i for i in range(Nc) if i * d + l - 1 <= t]
                score = [0.0] * NS
                for h in heads:
                    qv = q[b, qi, h]
                    o_cmp[b][qi][h] = _attend(qv, k_cmp[b, visible, g], v_cmp[b, visible, g], scale)
                    if visible:
                        p = torch.softmax((k_cmp[b, visible, g] @ qv) * scale, dim=0).tolist()
                        p_cmp = dict(zip(visible, p))
                        for j in range(NS):
                            for i in visible:
                                if overlap[i][j] > 0:
                                    score[j] += p_cmp[i] * overlap[i][j] / d
                scores_all[b, qi, g] = torch.tensor(score, dtype=torch.float64)
                chosen = bf_select(score, t, lp, n, n_init, n_local)
                blocks_all[b, qi, g] = torch.tensor(chosen)
                slc_keys = [s for j in chosen if j >= 0 for s in range(j * lp, min((j + 1) * lp, Tk)) if s <= t]
                win_keys = list(range(max(0, t - w + 1), t + 1))
                for h in heads:
                    qv = q[b, qi, h]
                    o_slc[b][qi][h] = _attend(qv, k[b, slc_keys, g], v[b, slc_keys, g], scale)
                    o_win[b][qi][h] = _attend(qv, k_win[b, win_keys, g], v_win[b, win_keys, g], scale)
                    gt = gates[b, qi, h]
                    out[b][qi][h] = gt[0] * o_cmp[b][qi][h] + gt[1] * o_slc[b][qi][h] + gt[2] * o_win[b][qi][h]

    def stack(nested):
        return torch.stack([torch.stack([torch.stack(row) for row in per_b]) for per_b in nested])

    return dict(
        out=stack(out), o_cmp=stack(o_cmp), o_slc=stack(o_slc), o_win=stack(o_win), scores=scores_all,
        blocks=blocks_all,
    )


def bf_nsa_varlen(q, k, v, gates, cu_q, cu_k, *, l, d, compress=bf_mean_compress, **kw):
    """Packed documents: run `bf_nsa` on each document alone (mean-compressed keys) and concatenate along seq."""
    bq, bk = cu_q.tolist(), cu_k.tolist()
    res = []
    for i in range(len(bq) - 1):
        kd, vd = k[:, bk[i] : bk[i + 1]], v[:, bk[i] : bk[i + 1]]
        res.append(
            bf_nsa(q[:, bq[i] : bq[i + 1]], kd, vd, compress(kd, l, d), compress(vd, l, d), gates[:, bq[i] : bq[i + 1]],
                   l=l, d=d, **kw)
        )
    # scores are left out: their last dim (number of selection blocks) differs between documents
    return {key: torch.cat([r[key] for r in res], dim=1) for key in res[0] if key != "scores"}
