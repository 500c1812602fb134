"""Pure-PyTorch references for longattn's ops.

These are deliberately simple and dense (they build full ``Lq x Lk`` score matrices and
masks); they exist to define and check the semantics written down in ``docs/semantics.md``,
not to be fast.  Every function computes in float64 by default (``upcast=True``).  With
``upcast=False`` the computation runs in the input dtype exactly as plain PyTorch would
(matmuls in that dtype, softmax in that dtype): this is the "PyTorch in the same low
precision" baseline of the tolerance rule (docs/numerics.md).

All references are differentiable with respect to q, k, v (and ``sink_logits``), and rows
with no visible key produce ``out = 0``, ``lse = -inf`` and finite zero gradients.

This module imports only torch, so it can be used without the compiled extension.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence, Tuple

import torch

__all__ = [
    "visible_mask",
    "alibi_slopes",
    "attention_ref",
    "masked_attention_ref",
    "merge_attention_ref",
    "dilated_attention_ref",
    "dilated_mask",
]


# --------------------------------------------------------------------------------------
# Masks and positions
# --------------------------------------------------------------------------------------


def _positions(n: int, start: int, device) -> torch.Tensor:
    return torch.arange(n, device=device, dtype=torch.int64) + int(start)


def visible_mask(
    Lq: int,
    Lk: int,
    *,
    causal: bool = False,
    window: Optional[Tuple[Optional[int], Optional[int]]] = None,
    sinks: int = 0,
    q_start: Optional[int] = None,
    k_start: int = 0,
    device=None,
) -> torch.Tensor:
    """Boolean ``(Lq, Lk)`` mask: ``mask[i, j]`` is True iff key j is visible from query i.

    Query row i sits at absolute position ``p = q_start + i`` (default
    ``q_start = k_start + Lk - Lq``: bottom-right aligned), key j at ``s = k_start + j``.

    - ``window=(left, right)``: ``p - left <= s <= p + right`` (None = unbounded side).
    - ``sinks=n``: keys with ``s < n`` are visible regardless of the window.
    - ``causal``: additionally ``s <= p`` (applies to sink keys too).
    """
    if q_start is None:
        q_start = k_start + Lk - Lq
    p = _positions(Lq, q_start, device)[:, None]
    s = _positions(Lk, k_start, device)[None, :]
    vis = torch.ones(Lq, Lk, dtype=torch.bool, device=device)
    if window is not None:
        left, right = window
        if left is not None:
            vis &= s >= p - int(left)
        if right is not None:
            vis &= s <= p + int(right)
    if sinks and sinks > 0:
        vis |= s < int(sinks)
    if causal:
        vis &= s <= p
    return vis


def alibi_slopes(n_heads: int) -> torch.Tensor:
    """ALiBi slopes of Press et al. as an fp32 tensor ``[n_heads]``.

    For a power of two n: ``start = 2 ** (-2 ** -(log2(n) - 3))`` (= ``2 ** (-8 / n)``) and
    ``slope_h = start ** (h + 1)``.  Otherwise, with ``c = 2 ** floor(log2(n))``:
    ``slopes(c) + slopes(2c)[0::2][: n - c]``.
    """

    def pow2(n: int):
        start = 2.0 ** (-(2.0 ** -(math.log2(n) - 3)))
        return [start ** (h + 1) for h in range(n)]

    if n_heads <= 0:
        raise ValueError(f"n_heads must be positive, got {n_heads}")
    if math.log2(n_heads).is_integer():
        vals = pow2(n_heads)
    else:
        c = 2 ** int(math.floor(math.log2(n_heads)))
        vals = pow2(c) + pow2(2 * c)[0::2][: n_heads - c]
    return torch.tensor(vals, dtype=torch.float32)


def dilated_mask(L: int, n_heads: int, w: int, r: int, *, causal: bool = False, device=None):
    """Per-head ``(n_heads, L, L)`` mask of one LongNet config ``(w, r)``.

    Segments ``[j*w, min((j+1)*w, L))``; head h keeps the tokens whose offset t from the
    segment start satisfies ``t % r == h % r``; kept queries see kept keys of the same segment
    (and ``s <= p`` when causal).
    """
    i = torch.arange(L, device=device)
    seg = i // w
    off = i % w
    h = torch.arange(n_heads, device=device)
    kept = (off[None, :] % r) == (h[:, None] % r)  # (H, L)
    same_seg = seg[:, None] == seg[None, :]  # (L, L)
    m = kept[:, :, None] & kept[:, None, :] & same_seg[None]
    if causal:
        m &= (i[None, :] <= i[:, None])[None]
    return m


# --------------------------------------------------------------------------------------
# Attention core
# --------------------------------------------------------------------------------------


def _lse_dtype(dtype: torch.dtype) -> torch.dtype:
    """lse is float32, except float64 for float64 inputs (as longattn returns it)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _logn_factor(p: torch.Tensor, logn_base: Optional[float]) -> torch.Tensor:
    """``f(p) = max(1, ln(p + 1) / ln(base))`` in float64 (1 for p < 1 or no base)."""
    pf = p.to(torch.float64)
    if not logn_base:
        return torch.ones_like(pf)
    f = torch.log(pf.clamp(min=1) + 1) / math.log(float(logn_base))
    f = torch.clamp(f, min=1.0)
    return torch.where(pf < 1, torch.ones_like(f), f)


def _visible_dots(qh: torch.Tensor, kh: torch.Tensor, vis: torch.Tensor) -> torch.Tensor:
    """``qh @ kh^T`` with masked pairs 0 and outside autograd's reach: the matmul's backward
    would multiply a masked pair's zero gradient by a non-finite row of the other operand. Used
    when q or k holds a NaN or an infinity (memory ``Lq * Lk * D``: tests only)."""
    pair = vis.expand(qh.shape[:-2] + (qh.shape[-2], kh.shape[-2]))[..., None]
    zero = torch.zeros((), dtype=qh.dtype, device=qh.device)
    qb = torch.where(pair, qh[..., :, None, :], zero)
    kb = torch.where(pair, kh[..., None, :, :], zero)
    return (qb * kb).sum(-1)


def _visible_matmul(probs: torch.Tensor, vh: torch.Tensor, vis: torch.Tensor) -> torch.Tensor:
    """``probs @ vh`` over the visible pairs only (docs/semantics.md, non-finite inputs): a
    masked pair contributes nothing, not ``0 * v``, so a NaN or infinity in a value row reaches
    exactly the rows that see it (and a NaN row's probabilities reach only its visible keys)."""
    probs = torch.where(vis, probs, torch.zeros((), dtype=probs.dtype, device=probs.device))
    finite = torch.isfinite(vh)
    if bool(finite.all()):
        return torch.matmul(probs, vh)
    out = torch.matmul(probs, torch.where(finite, vh, torch.zeros_like(vh)))
    # The non-finite entries, visible pairs only: (B, H, Lq, J, D) over the J keys holding one.
    keys = (~finite).flatten(0, 1).any(0).any(-1).nonzero()[:, 0]
    vb, pb = vh[..., keys, :], probs[..., keys]
    seen = vis.expand(probs.shape)[..., keys]
    bad = (~torch.isfinite(vb))[:, :, None] & seen[..., None]
    terms = torch.where(bad, pb[..., None] * vb[:, :, None], torch.zeros((), dtype=vh.dtype, device=vh.device))
    return out + terms.sum(-2)


def _attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    vis: torch.Tensor,
    *,
    scale: Optional[float],
    softcap: float,
    alibi_slopes: Optional[torch.Tensor],
    sink_logits: Optional[torch.Tensor],
    logn_base: Optional[float],
    q_start: int,
    k_start: int,
    upcast: bool,
    out_dtype: Optional[torch.dtype] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Dense core.  q ``(B, Lq, Hq, D)``, k/v ``(B, Lk, Hkv, D)``, vis broadcastable to
    ``(B, Hq, Lq, Lk)`` (typically ``(Lq, Lk)`` or ``(Hq, Lq, Lk)``).
    Returns out ``(B, Lq, Hq, D)`` in q's dtype (or ``out_dtype``) and lse ``(B, Hq, Lq)``
    fp32 (fp64 for fp64 q)."""
    B, Lq, Hq, D = q.shape
    Lk, Hkv = k.shape[1], k.shape[2]
    assert Hq % Hkv == 0, "Hq must be a multiple of Hkv"
    group = Hq // Hkv
    dt = torch.float64 if upcast else q.dtype
    dev = q.device
    if scale is None:
        scale = 1.0 / math.sqrt(D)

    qh = q.to(dt).transpose(1, 2)  # (B, Hq, Lq, D)
    kh = k.to(dt).transpose(1, 2)
    vh = v.to(dt).transpose(1, 2)
    if group > 1:
        kh = kh.repeat_interleave(group, dim=1)  # q head h reads kv head h // group
        vh = vh.repeat_interleave(group, dim=1)

    p = _positions(Lq, q_start, dev)
    s = _positions(Lk, k_start, dev)

    # 1. x = scale * f(p) * <q_p, k_s>
    vis = vis.to(dev)
    if bool(torch.isfinite(qh).all()) and bool(torch.isfinite(kh).all()):
        x = torch.matmul(qh, kh.transpose(-1, -2))  # (B, Hq, Lq, Lk)
    else:
        x = _visible_dots(qh, kh, vis)
    if logn_base:
        fac = (_logn_factor(p, logn_base) * float(scale)).to(dt)
        x = x * fac[:, None]
    else:
        x = x * float(scale)
    # 2. softcap
    if softcap and softcap > 0:
        x = float(softcap) * torch.tanh(x / float(softcap))
    # 3. ALiBi
    if alibi_slopes is not None:
        dist = (p[:, None] - s[None, :]).abs().to(dt)  # (Lq, Lk)
        # No gradient flows to the slopes (docs/semantics.md: a fixed bias).
        x = x - alibi_slopes.detach().to(device=dev, dtype=dt)[None, :, None, None] * dist
    # 4. mask
    x = x.masked_fill(~vis, float("-inf"))
    row_any = vis.any(dim=-1).expand(B, Hq, Lq) if Lk > 0 else torch.zeros(
        B, Hq, Lq, dtype=torch.bool, device=dev
    )
    # 5. learned sink logit: one more column with no value.
    if sink_logits is not None:
        z = sink_logits.to(device=dev, dtype=dt)[None, :, None, None].expand(B, Hq, Lq, 1)
        x = torch.cat([x, z], dim=-1)
        row_any = torch.ones_like(row_any)
    # Safe softmax: rows with nothing visible are replaced by zeros (finite, no NaN in
    # forward or backward) and their results are overwritten below.
    x = torch.where(row_any[..., None], x, torch.zeros((), dtype=dt, device=dev))
    if x.shape[-1] == 0:
        lse = torch.full((B, Hq, Lq), float("-inf"), dtype=dt, device=dev)
        probs = x
    else:
        lse = torch.logsumexp(x, dim=-1)
        probs = torch.softmax(x, dim=-1)
    probs = probs[..., :Lk]
    out = _visible_matmul(probs, vh, vis)  # (B, Hq, Lq, D)
    out = torch.where(row_any[..., None], out, torch.zeros((), dtype=dt, device=dev))
    lse = torch.where(row_any, lse, torch.full((), float("-inf"), dtype=dt, device=dev))
    out_dtype = q.dtype if out_dtype is None else out_dtype
    return out.transpose(1, 2).to(out_dtype).contiguous(), lse.to(_lse_dtype(q.dtype))


def masked_attention_ref(
    q,
    k,
    v,
    mask,
    *,
    scale=None,
    softcap=0.0,
    alibi_slopes=None,
    sink_logits=None,
    logn_base=None,
    q_start=None,
    k_start=0,
    upcast=True,
):
    """Dense attention with an explicit boolean mask broadcastable to ``(B, Hq, Lq, Lk)``.

    Same scoring as :func:`attention_ref` (positions only matter for ALiBi and log-n)."""
    Lq, Lk = q.shape[1], k.shape[1]
    if q_start is None:
        q_start = k_start + Lk - Lq
    return _attend(
        q, k, v, mask,
        scale=scale, softcap=softcap, alibi_slopes=alibi_slopes, sink_logits=sink_logits,
        logn_base=logn_base, q_start=q_start, k_start=k_start, upcast=upcast,
    )


def attention_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = False,
    window: Optional[Tuple[Optional[int], Optional[int]]] = None,
    sinks: int = 0,
    scale: Optional[float] = None,
    softcap: float = 0.0,
    alibi_slopes: Optional[torch.Tensor] = None,
    sink_logits: Optional[torch.Tensor] = None,
    logn_base: Optional[float] = None,
    q_start: Optional[int] = None,
    k_start: int = 0,
    cu_seqlens_q: Optional[torch.Tensor] = None,
    cu_seqlens_k: Optional[torch.Tensor] = None,
    upcast: bool = True,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Reference of ``longattn.attention`` (see docs/semantics.md).

    Dense: q ``(B, Lq, Hq, D)``, k/v ``(B, Lk, Hkv, D)`` -> out ``(B, Lq, Hq, D)``,
    lse ``(B, Hq, Lq)`` (fp32; fp64 for fp64 q).  Varlen (``cu_seqlens_q``/``cu_seqlens_k`` given): q ``(Tq, Hq, D)``,
    k/v ``(Tk, Hkv, D)`` -> out ``(Tq, Hq, D)``, lse ``(Hq, Tq)``.  ``q_start`` defaults to
    ``k_start + Lk - Lq`` (per sequence in varlen); explicit ``q_start``/``k_start`` apply to every
    sequence.
    """
    opts = dict(
        scale=scale, softcap=softcap, alibi_slopes=alibi_slopes, sink_logits=sink_logits,
        logn_base=logn_base, upcast=upcast,
    )
    mask_opts = dict(causal=causal, window=window, sinks=sinks)

    if cu_seqlens_q is None and cu_seqlens_k is None:
        Lq, Lk = q.shape[1], k.shape[1]
        qs = k_start + Lk - Lq if q_start is None else int(q_start)
        vis = visible_mask(Lq, Lk, q_start=qs, k_start=k_start, device=q.device, **mask_opts)
        return _attend(q, k, v, vis, q_start=qs, k_start=k_start, **opts)

    assert cu_seqlens_q is not None and cu_seqlens_k is not None, "give both cu_seqlens"
    cq = [int(x) for x in cu_seqlens_q.tolist()]
    ck = [int(x) for x in cu_seqlens_k.tolist()]
    assert len(cq) == len(ck)
    Hq = q.shape[1]
    outs, lses = [], []
    for n in range(len(cq) - 1):
        qn = q[cq[n]: cq[n + 1]].unsqueeze(0)
        kn = k[ck[n]: ck[n + 1]].unsqueeze(0)
        vn = v[ck[n]: ck[n + 1]].unsqueeze(0)
        Lq, Lk = qn.shape[1], kn.shape[1]
        if Lq == 0:
            continue
        qs = k_start + Lk - Lq if q_start is None else int(q_start)
        vis = visible_mask(Lq, Lk, q_start=qs, k_start=k_start, device=q.device, **mask_opts)
        o, l = _attend(qn, kn, vn, vis, q_start=qs, k_start=k_start, **opts)
        outs.append(o[0])
        lses.append(l[0])
    if not outs:
        return (
            torch.zeros_like(q) + 0 * q.sum(),  # keep the graph when q requires grad
            torch.empty(Hq, 0, dtype=_lse_dtype(q.dtype), device=q.device),
        )
    # Sequences may not cover q entirely only if cu_seqlens_q[-1] < Tq (malformed); we
    # assume well-formed cu_seqlens.
    return torch.cat(outs, dim=0), torch.cat(lses, dim=1)


# --------------------------------------------------------------------------------------
# Merge and dilated attention
# --------------------------------------------------------------------------------------


def merge_attention_ref(
    outs: Sequence[torch.Tensor],
    lses: Sequence[torch.Tensor],
    *,
    upcast: bool = True,
    out_dtype: Optional[torch.dtype] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """LSE merge of partial attentions over disjoint key sets.

    outs each ``[*, L, H, D]``, lses each ``[*, H, L]``.  ``lse = logsumexp_n(lse_n)``,
    ``out = sum_n exp(lse_n - lse) * out_n``, computed in float64 (``upcast=False``: in
    outs' dtype, the plain-PyTorch baseline); out in outs' dtype (or ``out_dtype``), lse fp32
    (fp64 when the lses are fp64).
    Rows where every lse is -inf give out 0, lse -inf and zero gradients.
    """
    assert len(outs) == len(lses) and len(outs) > 0
    dtype = outs[0].dtype if out_dtype is None else out_dtype
    ct = torch.float64 if upcast else torch.promote_types(outs[0].dtype, lses[0].dtype)
    L = torch.stack([l.to(ct) for l in lses], dim=0)  # (N, *, H, L)
    O = torch.stack([o.to(ct if upcast else outs[0].dtype) for o in outs], dim=0)
    mx = L.max(dim=0).values
    empty = torch.isneginf(mx)  # (*, H, L)
    Ls = torch.where(empty[None], torch.zeros((), dtype=L.dtype, device=L.device), L)
    lse = torch.logsumexp(Ls, dim=0)  # (*, H, L)
    w = torch.exp(Ls - lse[None])  # (N, *, H, L)
    w = w.transpose(-1, -2)[..., None].to(O.dtype)  # (N, *, L, H, 1)
    # A partial with lse = -inf saw no key: it adds nothing (not 0 * out), NaN out included.
    dead = torch.isneginf(L).transpose(-1, -2)[..., None]
    out = torch.where(dead, torch.zeros((), dtype=O.dtype, device=O.device), w * O).sum(dim=0)
    empty_o = empty.transpose(-1, -2)[..., None]
    out = torch.where(empty_o, torch.zeros((), dtype=out.dtype, device=out.device), out)
    lse = torch.where(empty, torch.full((), float("-inf"), dtype=lse.dtype, device=lse.device), lse)
    return out.to(dtype), lse.to(_lse_dtype(lses[0].dtype))


def dilated_attention_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    segments: Sequence[Tuple[int, int]],
    *,
    causal: bool = False,
    scale: Optional[float] = None,
    upcast: bool = True,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """LongNet dilated attention (dense layout, self-attention Lq == Lk == L).

    Each config ``(w, r)`` is a masked attention with the per-head mask of
    :func:`dilated_mask`; the configs are mixed by :func:`merge_attention_ref`.
    """
    B, L, Hq, D = q.shape
    assert k.shape[1] == L, "dilated attention is self-attention (Lq == Lk)"
    outs, lses = [], []
    for w, r in segments:
        m = dilated_mask(L, Hq, int(w), int(r), causal=causal, device=q.device)
        o, l = _attend(
            q, k, v, m, scale=scale, softcap=0.0, alibi_slopes=None, sink_logits=None,
            logn_base=None, q_start=0, k_start=0, upcast=upcast,
            out_dtype=torch.float64 if upcast else q.dtype,
        )
        outs.append(o)
        lses.append(l)
    return merge_attention_ref(outs, lses, upcast=upcast, out_dtype=q.dtype)


# --------------------------------------------------------------------------------------
# KV cache (longattn.kvcache)
# --------------------------------------------------------------------------------------


def decode_attention_ref(q, k_cache, v_cache, lengths, *, positions=None, q_positions=None,
                         scale=None, window=None, sinks=0, upcast=True):
    """Eager reference of ``longattn.kvcache.decode_attention``.

    Returns ``out`` (q's dtype), ``lse`` and ``probs`` ``(B, Hq, n, C)`` (the softmax
    probabilities, 0 for masked or uncached slots), computed in fp64 when ``upcast``. The score
    increment of the op is ``probs.view(B, Hkv, G, n, C).sum((2, 3))``.
    """
    B, Hq, n, D = q.shape
    Hkv, C = k_cache.shape[1], k_cache.shape[2]
    G = Hq // Hkv
    ct = torch.float64 if upcast else q.dtype
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    k = k_cache.to(ct).repeat_interleave(G, dim=1)
    v = v_cache.to(ct).repeat_interleave(G, dim=1)
    s = torch.einsum("bhid,bhjd->bhij", q.to(ct), k) * scale
    slot = torch.arange(C, device=q.device)
    vis = slot < lengths.to(torch.int64).repeat_interleave(G, dim=1)[..., None, None]  # (B,Hq,1,C)
    vis = vis.expand(B, Hq, n, C)
    if q_positions is not None:
        kpos = slot.expand(B, Hkv, C) if positions is None else positions
        kpos = kpos.repeat_interleave(G, dim=1)[:, :, None, :]  # (B,Hq,1,C)
        qp = q_positions[:, None, :, None]  # (B,1,n,1)
        ok = kpos <= qp
        if window is not None:
            ok = ok & ((qp - kpos <= window) | (slot < sinks))
        vis = vis & ok
    s = s.masked_fill(~vis, -math.inf)
    lse = torch.logsumexp(s, dim=-1)
    p = torch.exp(s - lse[..., None]).masked_fill(~vis, 0.0)
    out = _visible_matmul(p, v, vis)
    lse_dt = torch.float64 if q.dtype == torch.float64 else torch.float32
    return out.to(q.dtype), lse.to(lse_dt), p


def compact_ref(t, keep, keep_lengths):
    """Out-of-place compaction: row j of (b, h) becomes t[b, h, keep[b, h, j]] for j < count
    (rows beyond the count are left as they were). t is ``(B, H, C, ...)``."""
    out = t.clone()
    B, H = keep.shape[:2]
    for b in range(B):
        for h in range(H):
            n = int(keep_lengths[b, h])
            out[b, h, :n] = t[b, h, keep[b, h, :n].long()]
    return out


def select_keep_ref(scores, lengths, n_sink, n_recent, budget):
    """Straightforward per-head loop for ``select_keep``: returns a list of lists of kept
    indices (ascending) per (b, h). Ties between equal scores go to the lower slot."""
    B, H, _ = scores.shape
    res = []
    for b in range(B):
        row = []
        for h in range(H):
            L = int(lengths[b, h])
            bud = int(budget[b, h]) if isinstance(budget, torch.Tensor) else int(budget)
            if L <= bud:
                row.append(list(range(L)))
                continue
            fixed = set(range(min(n_sink, L))) | set(range(max(L - n_recent, 0), L))
            middle = [j for j in range(L) if j not in fixed]
            middle.sort(key=lambda j: (-float(scores[b, h, j]), j))
            row.append(sorted(fixed | set(middle[: bud - len(fixed)])))
        res.append(row)
    return res

