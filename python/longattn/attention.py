"""Public attention API: argument checking and normalization in front of the custom ops.

Semantics (positions, window, sinks, score order, lse) are those of docs/semantics.md.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence, Tuple, Union

import torch

from . import _ops
from ._device import check_device_built

ops = torch.ops.longattn

#: Sentinel the raw ops take for an unbounded window side.
UNBOUNDED = 1 << 62

Window = Optional[Tuple[Optional[int], Optional[int]]]


def _is_int(x) -> bool:
    return isinstance(x, (int, torch.SymInt)) and not isinstance(x, bool)


def window_bounds(window: Window) -> Tuple[int, int]:
    """``(left, right)`` with ``None`` sides replaced by :data:`UNBOUNDED`, validated."""
    if window is None:
        return UNBOUNDED, UNBOUNDED
    if not isinstance(window, (tuple, list)) or len(window) != 2:
        raise ValueError(f"window must be None or a (left, right) pair, got {window!r}")
    left, right = window
    for name, side in (("left", left), ("right", right)):
        if side is not None and not _is_int(side):
            raise ValueError(f"window {name} must be an int or None, got {side!r}")
        if side is not None and abs(side) >= UNBOUNDED:
            raise ValueError(f"window {name} must be below 2**62 in magnitude, got {side}")
    if left is not None and right is not None and left + right < 0:
        raise ValueError(f"window=({left}, {right}) is empty: left + right must be >= 0 "
                         "(a causal window of W keys is (W - 1, 0))")
    return (UNBOUNDED if left is None else int(left), UNBOUNDED if right is None else int(right))


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = False,
              window: Window = None, sinks: int = 0, scale: Optional[float] = None,
              softcap: float = 0.0, alibi_slopes: Optional[torch.Tensor] = None,
              sink_logits: Optional[torch.Tensor] = None, logn_base: Optional[float] = None,
              q_start: Optional[int] = None, k_start: int = 0,
              cu_seqlens_q: Optional[torch.Tensor] = None,
              cu_seqlens_k: Optional[torch.Tensor] = None,
              max_seqlen_q: Optional[int] = None, max_seqlen_k: Optional[int] = None,
              dilation: int = 1, return_lse: bool = False):
    """Tiled attention with the long-context mask family, forward and backward.

    Args:
        q: ``(batch, seqlen_q, heads_q, head_dim)``, or ``(total_q, heads_q, head_dim)`` with
            ``cu_seqlens_q``. Any strides with a contiguous head dim.
        k, v: ``(batch, seqlen_k, heads_kv, head_dim)`` (or varlen); ``heads_q`` must be a
            multiple of ``heads_kv`` (GQA/MQA).
        causal: key position ``s`` visible from query position ``p`` only if ``s <= p``.
        window: ``(left, right)``: ``p - left <= s <= p + right``; ``None`` on a side is
            unbounded. A causal sliding window of exactly ``W`` keys is ``(W - 1, 0)``.
        sinks: keys at positions ``< sinks`` are always visible (subject to causal);
            ``causal + window + sinks`` is the LM-Infinite lambda mask.
        scale: softmax scale, default ``1 / sqrt(head_dim)``.
        softcap: ``x -> softcap * tanh(x / softcap)`` on scaled logits (0 = off).
        alibi_slopes: fp32 ``(heads_q,)``; adds ``-slope * |p - s|``.
        sink_logits: fp32 ``(heads_q,)`` (fp64 allowed with fp64 q); a learned logit in the softmax denominator with no
            value (gpt-oss). Receives a gradient.
        logn_base: scale query ``p`` by ``max(1, ln(p + 1) / ln(logn_base))``.
        q_start, k_start: absolute position of query row 0 / key 0. Default
            ``q_start = k_start + seqlen_k - seqlen_q``: bottom-right aligned (the last query at
            the last key's position), per sequence in varlen.
        cu_seqlens_q, cu_seqlens_k: int32 ``(batch + 1,)`` cumulative lengths (varlen form).
        max_seqlen_q, max_seqlen_k: upper bounds of the longest sequence in varlen form;
            derived from ``cu_seqlens`` when omitted (on a GPU that reads them on the host).
        dilation: NATTEN-style dilation ``r``: additionally require ``(p - s) % r == 0``. Runs
            one call per residue class on strided views (no copies of q/k/v).
        return_lse: also return the log-sum-exp ``(batch, heads_q, seqlen_q)`` (varlen:
            ``(heads_q, total_q)``), fp32 (fp64 for fp64 inputs); differentiable.

    Returns:
        ``out`` (q's dtype, q's shape), or ``(out, lse)`` with ``return_lse=True``. Rows with
        no visible key give ``out = 0`` and ``lse = -inf``.
    """
    # Every tensor and size is checked once, in C++ (csrc/attention_args.cpp), with the
    # argument's name; this layer only normalizes (window sides, the default scale).
    if not isinstance(q, torch.Tensor):
        raise ValueError(f"q must be a torch.Tensor, got {type(q).__name__}")
    check_device_built(q, "q")
    varlen = cu_seqlens_q is not None or cu_seqlens_k is not None
    if not varlen:
        # The shapes carry them; passing sizes as ints would make them constants under
        # torch.compile (one graph per sequence length).
        max_seqlen_q = max_seqlen_k = None
    left, right = window_bounds(window)
    if scale is None:  # (a head dim of 0 is reported by the op)
        scale = 1.0 / math.sqrt(q.shape[-1]) if q.shape[-1] > 0 else 1.0
    if not _is_int(dilation) or dilation < 1:
        raise ValueError(f"dilation must be an int >= 1, got {dilation!r}")
    if dilation > 1:
        out, lse = _residue_class_attention(
            q, k, v, dilation, causal=causal, window=window, sinks=sinks, scale=scale,
            softcap=softcap, alibi_slopes=alibi_slopes, sink_logits=sink_logits,
            logn_base=logn_base, q_start=q_start, k_start=k_start, varlen=varlen)
    else:
        out, lse = ops.attention(
            q, k, v, cu_seqlens_q, cu_seqlens_k, alibi_slopes, sink_logits, scale, softcap,
            0.0 if logn_base is None else logn_base, bool(causal), left, right, sinks, q_start,
            k_start, max_seqlen_q, max_seqlen_k)
    return (out, lse) if return_lse else out


def _residue_class_attention(q, k, v, r, *, causal, window, sinks, scale, softcap,
                             alibi_slopes, sink_logits, logn_base, q_start, k_start, varlen):
    """Dilated (NATTEN-style) attention: keys with (p - s) % r == 0 only.

    Query position p = c + r * p' sees keys s = c + r * s' of its residue class c, so each class
    is plain attention over stride-r views with positions in units of r: the window shrinks
    to (floor(left / r), floor(right / r)), ALiBi slopes scale by r, causal is unchanged.
    """
    if varlen:
        raise ValueError("dilation > 1 is not supported with cu_seqlens (varlen) inputs")
    if sinks:
        raise ValueError("dilation > 1 cannot be combined with sinks (sink positions do not "
                         "map onto one residue class)")
    if logn_base is not None:
        raise ValueError("dilation > 1 cannot be combined with logn_base")
    Lq, Lk = q.shape[1], k.shape[1]
    q0 = k_start + Lk - Lq if q_start is None else q_start
    left, right = window if window is not None else (None, None)
    win = (None if left is None else left // r, None if right is None else right // r)
    slopes = alibi_slopes * r if alibi_slopes is not None else None
    out = q.new_zeros(q.shape)
    lse = q.new_full((q.shape[0], q.shape[2], Lq), float("-inf"), dtype=_ops._lse_dtype(q))
    for c in range(r):
        i0, j0 = (c - q0) % r, (c - k_start) % r
        qv = q[:, i0::r]
        if qv.shape[1] == 0:
            continue
        o_c, l_c = attention(
            qv, k[:, j0::r], v[:, j0::r], causal=causal, window=win, scale=scale,
            softcap=softcap, alibi_slopes=slopes, sink_logits=sink_logits,
            q_start=(q0 + i0 - c) // r, k_start=(k_start + j0 - c) // r, return_lse=True)
        out[:, i0::r] = o_c
        lse[:, :, i0::r] = l_c
    return out, lse


def merge_attention(outs: Sequence[torch.Tensor], lses: Sequence[torch.Tensor]):
    """Merge partial attentions over disjoint key sets by their log-sum-exp.

    ``outs[i]``: ``[*, L, H, D]`` and ``lses[i]``: ``[*, H, L]`` (the shapes :func:`attention`
    returns). Returns ``(out, lse)``; fp32 accumulation; rows whose every lse is ``-inf`` give
    zeros and ``-inf`` (no NaN). Differentiable in every input.
    """
    outs, lses = list(outs), list(lses)
    if len(outs) == 0 or len(outs) != len(lses):
        raise ValueError(f"outs and lses must be non-empty lists of equal length, got "
                         f"{len(outs)} and {len(lses)}")
    for i, (o, l) in enumerate(zip(outs, lses)):
        if not isinstance(o, torch.Tensor) or not isinstance(l, torch.Tensor):
            raise ValueError(f"outs[{i}] and lses[{i}] must be tensors")
        if o.dim() < 3 or tuple(l.shape) != tuple(o.shape[:-3]) + (o.shape[-2], o.shape[-3]):
            raise ValueError(f"outs[{i}] must be [*, L, H, D] and lses[{i}] [*, H, L]; got "
                             f"{tuple(o.shape)} and {tuple(l.shape)}")
    check_device_built(outs[0], "outs[0]")
    return ops.merge_attention(outs, lses)
