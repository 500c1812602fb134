"""Training-free context extension as position remaps of RoPE attention.

Each method gives every (query p, key s) pair a relative position that differs from ``p - s``
only for keys beyond a neighbor window: keys with ``0 <= p - s < W`` (near) keep the usual RoPE
positions, farther ones (far) are scored with q and k rotated by the method's positions.

By default (``fused=True``) one kernel pass does it: ``torch.ops.longattn.rope_attention``
takes q and k before RoPE and rotates them as their tiles are loaded, each (query tile, key
tile) pair by the side(s) its pairs take (csrc/common/remap.h): a tile wholly near or wholly far
computes one score set, only the tiles on the boundary compute both and pick per element. No
rotated copy of q or k is stored.

``fused=False`` runs the reference composition: q and k rotated twice (four rotated copies),
two attention calls over complementary windows on the true positions,

    near:  causal, window (W - 1, 0)       keys with 0 <= p - s < W
    far:   causal, window (None, -W)       keys with p - s >= W

and the partial results merged exactly by their log-sum-exp (``merge_attention``). The fused
kernels have no gradient for inv_freq, so a call whose inv_freq requires grad takes this path.

All functions take q ``(B, Lq, Hq, D)``, k/v ``(B, Lk, Hkv, D)`` *before* RoPE, query row i at
position ``p = q_start + i`` (default ``Lk - Lq``, bottom-right aligned) and key j at ``s = j``;
or the varlen form q ``(Tq, Hq, D)``, k/v ``(Tk, Hkv, D)`` with ``cu_seqlens_q/k`` (int32
``(batch + 1,)``, as ``longattn.attention``), positions restarting at 0 in every sequence and
``q_start`` (default ``Lk - Lq`` of each sequence) applying to each. A varlen batch gives what
each sequence gives alone in the dense form. ``scale``, ``softcap`` and ``sink_logits`` are
``longattn.attention``'s. They are differentiable in q, k, v, sink_logits and inv_freq.
References: ``longattn.rope_reference`` (a dense per-pair implementation of each method).
"""
from __future__ import annotations

from typing import Optional

import torch

from . import _opaque
from ._extend_layout import first_keys_attention, make_layout
from ._ops import _lse_dtype
from .attention import attention, merge_attention
from .rope import apply_rope
from .rope_attention import fused as _fused, needs_freq_grad

__all__ = ["self_extend_attention", "rerope_attention", "lm_infinite_attention",
           "self_extend_positions"]


def _check_freq(inv_freq, name):
    if not isinstance(inv_freq, torch.Tensor):
        raise ValueError(f"{name}: inv_freq must be a torch.Tensor, got {type(inv_freq).__name__}")


def _positive_int(x, what, name):
    if isinstance(x, bool) or not isinstance(x, int) or x < 1:
        raise ValueError(f"{name}: {what} must be an int >= 1, got {x!r}")
    return x


def _varlen_as_one_op(method, q, k, v, inv_freq, cu_q, cu_k, return_lse, options, sink_logits):
    """The unfused varlen form under torch.compile: one opaque op (longattn/_opaque.py), since
    the composition reads the sequence table on the host."""
    out, lse = _opaque.call("extend_varlen", [q, k, v, inv_freq, cu_q, cu_k, sink_logits],
                            method=method, **options)
    return (out, lse) if return_lse else out


def _result(out_lse, return_lse):
    return out_lse if return_lse else out_lse[0]


def _merge(parts, return_lse):
    out, lse = merge_attention([o for o, _ in parts], [l for _, l in parts])
    return (out, lse) if return_lse else out


def self_extend_positions(p: torch.Tensor, s: torch.Tensor, group_size: int, window: int):
    """SelfExtend's grouped positions: queries ``p // G + W - W // G``, keys ``s // G``.

    With them, a key at distance >= W gets relative position ``(p // G + W - W // G) - s // G``,
    which continues the neighbor range [0, W) instead of jumping (datamllab/LongLM)."""
    return p // group_size + (window - window // group_size), s // group_size


def self_extend_attention(q, k, v, inv_freq, *, group_size: int, window: int,
                          attention_scaling: float = 1.0, rotary_dim: Optional[int] = None,
                          interleaved: bool = False, scale: Optional[float] = None,
                          q_start: Optional[int] = None, cu_seqlens_q=None, cu_seqlens_k=None,
                          max_seqlen_q: Optional[int] = None, max_seqlen_k: Optional[int] = None,
                          softcap: float = 0.0, sink_logits: Optional[torch.Tensor] = None,
                          return_lse: bool = False, fused: bool = True):
    """SelfExtend (Jin et al. 2024): causal attention in which keys within ``window`` of the
    query use normal RoPE positions and farther keys use grouped (floor-divided) positions.

    ``group_size=1`` is plain causal RoPE attention. Returns ``out`` (and ``lse``).
    """
    name = "self_extend_attention"
    _check_freq(inv_freq, name)
    G = _positive_int(group_size, "group_size", name)
    W = _positive_int(window, "window", name)
    if fused and not needs_freq_grad(inv_freq):
        return _result(_fused(
            q, k, v, inv_freq, "self_extend", window=W, group_size=G,
            attention_scaling=attention_scaling, rotary_dim=rotary_dim, interleaved=interleaved,
            scale=scale, softcap=softcap, sink_logits=sink_logits, q_start=q_start,
            cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k, max_seqlen_q=max_seqlen_q,
            max_seqlen_k=max_seqlen_k), return_lse)
    if cu_seqlens_q is not None and torch.compiler.is_compiling():
        return _varlen_as_one_op("self_extend", q, k, v, inv_freq, cu_seqlens_q, cu_seqlens_k,
                                 return_lse, dict(
                                     group_size=group_size, window=window,
                                     attention_scaling=attention_scaling, rotary_dim=rotary_dim,
                                     interleaved=interleaved, scale=scale, q_start=q_start,
                                     max_seqlen_q=max_seqlen_q, max_seqlen_k=max_seqlen_k,
                                     softcap=softcap), sink_logits)
    lay = make_layout(q, k, v, q_start, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, name)
    p, s = lay.p, lay.s
    rope = dict(attention_scaling=attention_scaling, rotary_dim=rotary_dim, interleaved=interleaved)
    attn = dict(causal=True, scale=scale, softcap=softcap, return_lse=True, **lay.attn)
    near = attention(apply_rope(q, None, p, inv_freq, **rope), apply_rope(k, None, s, inv_freq, **rope),
                     v, window=(W - 1, 0), sink_logits=sink_logits, **attn)
    pg, sg = self_extend_positions(p, s, G, W)
    far = attention(apply_rope(q, None, pg, inv_freq, **rope), apply_rope(k, None, sg, inv_freq, **rope),
                    v, window=(None, -W), **attn)
    return _merge([near, far], return_lse)


def rerope_attention(q, k, v, inv_freq, *, window: int, leak: Optional[float] = None,
                     attention_scaling: float = 1.0, rotary_dim: Optional[int] = None,
                     interleaved: bool = False, scale: Optional[float] = None,
                     q_start: Optional[int] = None, cu_seqlens_q=None, cu_seqlens_k=None,
                     max_seqlen_q: Optional[int] = None, max_seqlen_k: Optional[int] = None,
                     softcap: float = 0.0, sink_logits: Optional[torch.Tensor] = None,
                     return_lse: bool = False, fused: bool = True):
    """ReRoPE (Su 2023): causal attention with relative position ``min(p - s, window)``; with
    ``leak=k`` (leaky ReRoPE) distances past the window grow at 1/k: ``w + (p - s - w) / k``.

    A window at least as long as the sequence is plain causal RoPE attention.
    ReRoPE's far part rotates q to position w and leaves k at position 0 (distance w for
    every far key). Leaky: q by ``w * theta + (p - w) * theta / k`` and k by ``s * theta / k``;
    theta / k is taken in float64 so no fp32 rounding of the frequency enters the angle.
    """
    name = "rerope_attention"
    _check_freq(inv_freq, name)
    W = _positive_int(window, "window", name)
    if leak is not None and not (isinstance(leak, (int, float)) and not isinstance(leak, bool) and leak >= 1):
        raise ValueError(f"{name}: leak must be a number >= 1 or None, got {leak!r}")
    if fused and not needs_freq_grad(inv_freq):
        return _result(_fused(
            q, k, v, inv_freq, "rerope", window=W, leak=leak, attention_scaling=attention_scaling,
            rotary_dim=rotary_dim, interleaved=interleaved, scale=scale, softcap=softcap,
            sink_logits=sink_logits, q_start=q_start, cu_seqlens_q=cu_seqlens_q,
            cu_seqlens_k=cu_seqlens_k, max_seqlen_q=max_seqlen_q, max_seqlen_k=max_seqlen_k),
            return_lse)
    if cu_seqlens_q is not None and torch.compiler.is_compiling():
        return _varlen_as_one_op("rerope", q, k, v, inv_freq, cu_seqlens_q, cu_seqlens_k,
                                 return_lse, dict(
                                     window=window, leak=leak, attention_scaling=attention_scaling,
                                     rotary_dim=rotary_dim, interleaved=interleaved, scale=scale,
                                     q_start=q_start, max_seqlen_q=max_seqlen_q,
                                     max_seqlen_k=max_seqlen_k, softcap=softcap), sink_logits)
    lay = make_layout(q, k, v, q_start, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, name)
    p, s = lay.p, lay.s
    rope = dict(rotary_dim=rotary_dim, interleaved=interleaved)
    A = attention_scaling
    attn = dict(causal=True, scale=scale, softcap=softcap, return_lse=True, **lay.attn)
    near = attention(apply_rope(q, None, p, inv_freq, attention_scaling=A, **rope),
                     apply_rope(k, None, s, inv_freq, attention_scaling=A, **rope),
                     v, window=(W - 1, 0), sink_logits=sink_logits, **attn)
    q_far = apply_rope(q, None, torch.full_like(p, W), inv_freq, attention_scaling=A, **rope)
    if leak is None:
        k_far = apply_rope(k, None, torch.zeros_like(s), inv_freq, attention_scaling=A, **rope)
    else:
        slow = inv_freq.to(torch.float64) / float(leak)
        q_far = apply_rope(q_far, None, p - W, slow, **rope)
        k_far = apply_rope(k, None, s, slow, attention_scaling=A, **rope)
    far = attention(q_far, k_far, v, window=(None, -W), **attn)
    return _merge([near, far], return_lse)


def lm_infinite_attention(q, k, v, inv_freq, *, local_window: int, global_tokens: int,
                          max_distance: Optional[int] = None, attention_scaling: float = 1.0,
                          rotary_dim: Optional[int] = None, interleaved: bool = False,
                          scale: Optional[float] = None, q_start: Optional[int] = None,
                          cu_seqlens_q=None, cu_seqlens_k=None, max_seqlen_q: Optional[int] = None,
                          max_seqlen_k: Optional[int] = None, softcap: float = 0.0,
                          sink_logits: Optional[torch.Tensor] = None, return_lse: bool = False,
                          fused: bool = True):
    """LM-Infinite (Han et al. 2023): the lambda mask plus the distance ceiling.

    Keys within ``local_window`` (``0 <= p - s < n_local``) are scored with normal RoPE; the first
    ``global_tokens`` keys (of each sequence), when farther, are scored as if at distance
    ``max_distance`` (default ``local_window``): q rotated to that position, k unrotated
    (Glaciohound/LM-Infinite's "stationary" branch). Other keys are invisible.
    """
    name = "lm_infinite_attention"
    _check_freq(inv_freq, name)
    W = _positive_int(local_window, "local_window", name)
    if isinstance(global_tokens, bool) or not isinstance(global_tokens, int) or global_tokens < 0:
        raise ValueError(f"{name}: global_tokens must be an int >= 0, got {global_tokens!r}")
    M = W if max_distance is None else _positive_int(max_distance, "max_distance", name)
    if fused and not needs_freq_grad(inv_freq):
        return _result(_fused(
            q, k, v, inv_freq, "lm_infinite", window=W, global_tokens=global_tokens,
            max_distance=M, attention_scaling=attention_scaling, rotary_dim=rotary_dim,
            interleaved=interleaved, scale=scale, softcap=softcap, sink_logits=sink_logits,
            q_start=q_start, cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k,
            max_seqlen_q=max_seqlen_q, max_seqlen_k=max_seqlen_k), return_lse)
    if cu_seqlens_q is not None and torch.compiler.is_compiling():
        return _varlen_as_one_op("lm_infinite", q, k, v, inv_freq, cu_seqlens_q, cu_seqlens_k,
                                 return_lse, dict(
                                     local_window=local_window, global_tokens=global_tokens,
                                     max_distance=max_distance,
                                     attention_scaling=attention_scaling, rotary_dim=rotary_dim,
                                     interleaved=interleaved, scale=scale, q_start=q_start,
                                     max_seqlen_q=max_seqlen_q, max_seqlen_k=max_seqlen_k,
                                     softcap=softcap), sink_logits)
    lay = make_layout(q, k, v, q_start, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, name)
    p, s = lay.p, lay.s
    rope = dict(attention_scaling=attention_scaling, rotary_dim=rotary_dim, interleaved=interleaved)
    attn = dict(causal=True, scale=scale, softcap=softcap, return_lse=True)
    parts = [attention(apply_rope(q, None, p, inv_freq, **rope), apply_rope(k, None, s, inv_freq, **rope),
                       v, window=(W - 1, 0), sink_logits=sink_logits, **attn, **lay.attn)]
    if global_tokens > 0:
        q_far = apply_rope(q, None, torch.full_like(p, M), inv_freq, **rope)

        def unrotated(kg):  # position 0: only the attention scaling
            return apply_rope(kg, None, torch.zeros(kg.shape[-3], dtype=torch.int64,
                                                    device=kg.device), inv_freq, **rope)

        far = first_keys_attention(lay, q_far, k, v, global_tokens, unrotated,
                                   window=(None, -W), **attn)
        if far is not None:
            parts.append(far)
    return _merge(parts, return_lse)


_METHODS = {"self_extend": self_extend_attention, "rerope": rerope_attention,
            "lm_infinite": lm_infinite_attention}


def _extend_varlen_fake(tensors, method, **options):
    q = tensors[0]
    return q.new_empty(q.shape), q.new_empty((q.shape[1], q.shape[0]), dtype=_lse_dtype(q))


@_opaque.register("extend_varlen", _extend_varlen_fake)
def _extend_varlen(tensors, method, **options):
    q, k, v, inv_freq, cu_q, cu_k, *rest = tensors
    sink_logits = rest[0] if rest else None
    return _METHODS[method](q, k, v, inv_freq, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k,
                            sink_logits=sink_logits, return_lse=True, fused=False, **options)
