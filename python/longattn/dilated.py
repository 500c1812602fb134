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
    out = q.new_zeros(q.shape)
    lse = q.new_full((B, H, L), float("-inf"), dtype=_lse_dtype(q))
    n_full = L // w
    full = n_full * w

    def run(qv, kv, vv, o):
        return attention(qv, _kv_heads(kv, o, r, H), _kv_heads(vv, o, r, H), causal=causal,
                         scale=scale, return_lse=True)

    for o in range(min(r, H)):
        hs = slice(o, None, r)
        for b in range(B):
            if n_full > 0 and o < w:
                # (n_full, w/r, H, D): the full segments become the batch of one strided view.
                def seg(t):
                    return t[b, :full].unflatten(0, (n_full, w))[:, o::r]
                o_c, l_c = run(seg(q)[:, :, hs], seg(k), seg(v), o)
                seg(out)[:, :, hs] = o_c
                lse[b, hs, :full].unflatten(-1, (n_full, w))[:, :, o::r] = l_c.transpose(0, 1)
            if L - full > o:  # the last, shorter segment
                sl = slice(full + o, None, r)
                o_c, l_c = run(q[b, sl, hs].unsqueeze(0), k[b, sl].unsqueeze(0),
                               v[b, sl].unsqueeze(0), o)
                out[b, sl, hs] = o_c[0]
                lse[b, hs, sl] = l_c[0]
    return out, lse


def dilated_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                      segments: Sequence[Tuple[int, int]], *, causal: bool = True,
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
    results = [_one_config(q, k, v, w, r, causal, scale) for w, r in segments]
    if len(results) == 1:
        out, lse = results[0]
    else:
        out, lse = merge_attention([o for o, _ in results], [l for _, l in results])
    return (out, lse) if return_lse else out
