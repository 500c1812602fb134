"""LongNet dilated attention on top of the attention kernel, without copying q/k/v.

For one configuration (w, r), head h keeps the tokens at offsets ``t % r == h % r`` inside each
segment of length w. The heads sharing an offset o are ``o, o + r, ...`` and their kept tokens
``o, o + r, ...`` of every segment: both are strided views, and the full segments fold into the
batch dimension of one 4-D view per (batch element, offset). The kernel then runs dense causal
(or full) attention over w / r tokens per segment, so the work drops by r, not masked away.
Configurations are mixed by the log-sum-exp merge (LongNet weights each by its softmax
denominator, which is exactly that merge).
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch

from . import _opaque
from ._ops import _lse_dtype
from .attention import attention, merge_attention


def _kv_heads(t: torch.Tensor, o: int, r: int, heads_q: int) -> torch.Tensor:
    """The k/v heads serving q heads o, o + r, ... (a view when r is a multiple of the GQA group)."""
    group = heads_q // t.shape[-2]
    if group == 1:
        return t[..., o::r, :]
    if r % group == 0:
        return t[..., o // group::r // group, :]
    idx = torch.arange(o, heads_q, r, device=t.device) // group
    return t.index_select(-2, idx)  # a copy: r and the group do not line up


def _one_config(q, k, v, w: int, r: int, causal: bool, scale):
    B, L, H, _ = q.shape
    n_full = L // w
    full = n_full * w
    if n_full > 0 and w % r == 0 and H % r == 0 and r <= w:
        out, lse = _full_segments_diagonal(q, k, v, w, r, causal, scale)
        if full == L:
            return out, lse
        o_rem, l_rem = _scatter_config(q[:, full:], k[:, full:], v[:, full:], w, r, causal, scale)
        return torch.cat([out, o_rem], dim=1), torch.cat([lse, l_rem], dim=2)
    return _scatter_config(q, k, v, w, r, causal, scale)


def _run(q, k, v, o: int, r: int, heads_q: int, causal: bool, scale):
    return attention(q, _kv_heads(k, o, r, heads_q), _kv_heads(v, o, r, heads_q), causal=causal,
                     scale=scale, return_lse=True)


def _full_segments_diagonal(q, k, v, w: int, r: int, causal: bool, scale):
    """Output and lse of the full segments (tokens [0, L // w * w)) when every offset class
    has the same shape (w % r == 0, H % r == 0).

    Token t * r + a of a segment and head g * r + c are kept iff a == c: the kept entries are
    the diagonal of the (a, c) plane. Inputs are taken as the diagonal's r slices and results
    placed back with diag_embed, so autograd sees one diagonal / stack per tensor. Strided
    slices per offset (and slice assignment of the results) would each allocate and fill a
    full-size gradient in the backward: r of them per tensor, which made the backward ~5x
    the forward."""
    B, L, H, D = q.shape
    n = L // w
    full = n * w

    def fold(t):  # (B * n, w / r, a, heads, D); a view unless t is not foldable
        return t[:, :full].reshape(B * n, w // r, r, t.shape[2], D)

    q_parts = torch.diagonal(fold(q).unflatten(3, (H // r, r)), dim1=2, dim2=4).unbind(-1)
    k_parts, v_parts = fold(k).unbind(2), fold(v).unbind(2)
    outs, lses = [], []
    for o in range(r):
        o_c, l_c = _run(q_parts[o], k_parts[o], v_parts[o], o, r, H, causal, scale)
        outs.append(o_c)  # (B * n, w / r, H / r, D)
        lses.append(l_c.unflatten(0, (B, n)).transpose(1, 2))  # (B, H / r, n, w / r)
    # out: (B * n, w / r, [a], H / r, [c], D) with the offset on the (a, c) diagonal.
    out = torch.diag_embed(torch.stack(outs, dim=-1), dim1=2, dim2=4).reshape(B, full, H, D)
    # lse: (B, H / r, [c], n, w / r, [a]); off the diagonal a token is not kept: -inf.
    lse = torch.diag_embed(torch.stack(lses, dim=-1), dim1=2, dim2=5)
    on_diag = torch.eye(r, dtype=torch.bool, device=q.device).view(r, 1, 1, r)
    lse = torch.where(on_diag, lse, float("-inf")).reshape(B, H, full)
    return out, lse


def _scatter_config(q, k, v, w: int, r: int, causal: bool, scale):
    """Any shapes: one call per (batch element, offset), results assigned into place."""
    B, L, H, _ = q.shape
    out = q.new_zeros(q.shape)
    lse = q.new_full((B, H, L), float("-inf"), dtype=_lse_dtype(q))
    n_full = L // w
    full = n_full * w
    for o in range(min(r, H)):
        hs = slice(o, None, r)
        for b in range(B):
            if n_full > 0 and o < w:
                # (n_full, w/r, H, D): the full segments become the batch of one strided view.
                def seg(t):
                    return t[b, :full].unflatten(0, (n_full, w))[:, o::r]
                o_c, l_c = _run(seg(q)[:, :, hs], seg(k), seg(v), o, r, H, causal, scale)
                seg(out)[:, :, hs] = o_c
                lse[b, hs, :full].unflatten(-1, (n_full, w))[:, :, o::r] = l_c.transpose(0, 1)
            if L - full > o:  # the last, shorter segment
                sl = slice(full + o, None, r)
                o_c, l_c = _run(q[b, sl, hs].unsqueeze(0), k[b, sl].unsqueeze(0),
                                v[b, sl].unsqueeze(0), o, r, H, causal, scale)
                out[b, sl, hs] = o_c[0]
                lse[b, hs, sl] = l_c[0]
    return out, lse


def dilated_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                      segments: Sequence[Tuple[int, int]], *, causal: bool = False,
                      scale: Optional[float] = None, return_lse: bool = False):
    """LongNet dilated attention (Ding et al. 2023).

    Args:
        q, k, v: ``(batch, seqlen, heads, head_dim)`` self-attention inputs (same seqlen);
            k/v may have fewer heads (GQA).
        segments: ``[(w, r), ...]``: segment length w and dilation r per configuration.
        causal: causal attention inside each segment.
    Returns ``out`` or ``(out, lse)``; a token kept by no configuration gets zeros.
    """
    if not isinstance(q, torch.Tensor) or q.dim() != 4:
        raise ValueError("q must be a 4-D tensor (batch, seqlen, heads, head_dim)")
    if k.shape[1] != q.shape[1] or v.shape[1] != q.shape[1]:
        raise ValueError(f"dilated_attention is self-attention: q, k, v need one seqlen, got "
                         f"{q.shape[1]}, {k.shape[1]}, {v.shape[1]}")
    segments = list(segments)
    if not segments:
        raise ValueError("segments must list at least one (w, r) pair")
    for seg in segments:
        if (not isinstance(seg, (tuple, list)) or len(seg) != 2
                or not all(isinstance(x, int) and not isinstance(x, bool) and x >= 1 for x in seg)):
            raise ValueError(f"each segment must be a (w, r) pair of ints >= 1, got {seg!r}")
    if torch.compiler.is_compiling():
        # One opaque op (longattn/_opaque.py): traced, this Python would branch on the length
        # (full segments, the last segment's size, the reshapes' size-0/1 cases), one graph each.
        out, lse = _opaque.call("dilated", [q, k, v], segments=segments, causal=bool(causal),
                                scale=scale)
    else:
        out, lse = _dilated([q, k, v], segments, causal, scale)
    return (out, lse) if return_lse else out


def _dilated_fake(tensors, segments, causal, scale):
    q = tensors[0]
    return q.new_empty(q.shape), q.new_empty((q.shape[0], q.shape[2], q.shape[1]),
                                             dtype=_lse_dtype(q))


@_opaque.register("dilated", _dilated_fake)
def _dilated(tensors, segments, causal, scale):
    q, k, v = tensors
    results = [_one_config(q, k, v, w, r, causal, scale) for w, r in segments]
    if len(results) == 1:
        return results[0]
    return merge_attention([o for o, _ in results], [l for _, l in results])
