"""RoPE inside attention: q and k are passed before RoPE and rotated as the kernel loads their
tiles, optionally with a position remap (SelfExtend, ReRoPE, LM-Infinite: ``longattn.extend``).
No rotated copy of q or k is ever stored.

Query row i sits at ``p = q_start + i`` (default ``Lk - Lq``, bottom-right aligned; per sequence
in varlen), key j at ``s = j``; both rotate as ``longattn.apply_rope`` does (inv_freq from
``longattn.rope.frequencies``, attention_scaling on cos and sin, rotary_dim, NeoX or
interleaved pairs, the exact angle at any position below 2**48).
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from . import _rope_attention_ops  # noqa: F401  (fake kernels, autograd)
from ._device import check_device_built
from ._extend_layout import make_layout
from .attention import attention
from .rope import apply_rope

ops = torch.ops.longattn

__all__ = ["rope_attention"]


def needs_freq_grad(inv_freq) -> bool:
    """Whether a call must differentiate inv_freq, which the fused kernels do not: the callers
    then take their unfused path."""
    return isinstance(inv_freq, torch.Tensor) and inv_freq.requires_grad and torch.is_grad_enabled()


def fused(q, k, v, inv_freq, remap: str, *, window: int = 0, group_size: int = 1,
          leak: Optional[float] = None, global_tokens: int = 0, max_distance: int = 0,
          causal: bool = True, attention_scaling: float = 1.0, rotary_dim: Optional[int] = None,
          interleaved: bool = False, scale: Optional[float] = None, softcap: float = 0.0,
          sink_logits: Optional[torch.Tensor] = None, q_start: Optional[int] = None,
          cu_seqlens_q=None, cu_seqlens_k=None, max_seqlen_q: Optional[int] = None,
          max_seqlen_k: Optional[int] = None):
    """``torch.ops.longattn.rope_attention`` with its defaults filled in: ``(out, lse)``. Every
    tensor and value is checked in C++ (csrc/rope_attention_args.cpp)."""
    for name, t in (("q", q), ("k", k), ("v", v), ("inv_freq", inv_freq)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    check_device_built(q, "q")
    if q_start is not None and (isinstance(q_start, bool) or not isinstance(q_start, (int, torch.SymInt))):
        raise ValueError(f"q_start must be an int or None, got {q_start!r}")
    if cu_seqlens_q is None and cu_seqlens_k is None:
        # The shapes carry them; ints would make them constants under torch.compile.
        max_seqlen_q = max_seqlen_k = None
    if rotary_dim is None:
        rotary_dim = 2 * inv_freq.shape[0] if inv_freq.dim() == 1 else 0
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1]) if q.shape[-1] > 0 else 1.0
    return ops.rope_attention(
        q, k, v, inv_freq, cu_seqlens_q, cu_seqlens_k, sink_logits, remap, window, group_size,
        0.0 if leak is None else float(leak), global_tokens, max_distance,
        float(attention_scaling), rotary_dim, bool(interleaved), float(scale), float(softcap),
        bool(causal), q_start, max_seqlen_q, max_seqlen_k)


def rope_attention(q, k, v, inv_freq, *, causal: bool = False, attention_scaling: float = 1.0,
                   rotary_dim: Optional[int] = None, interleaved: bool = False,
                   scale: Optional[float] = None, softcap: float = 0.0,
                   sink_logits: Optional[torch.Tensor] = None, q_start: Optional[int] = None,
                   cu_seqlens_q=None, cu_seqlens_k=None, max_seqlen_q: Optional[int] = None,
                   max_seqlen_k: Optional[int] = None, return_lse: bool = False):
    """``attention(apply_rope(q, p), apply_rope(k, s), v)`` in one pass: RoPE fused into the
    attention kernels, forward and backward, causal or not.

    q ``(B, Lq, Hq, D)``, k/v ``(B, Lk, Hkv, D)`` before RoPE, or the varlen form ``(T, H, D)``
    with ``cu_seqlens_q/k``; ``scale``, ``softcap``, ``sink_logits`` and ``return_lse`` as
    :func:`longattn.attention`. Differentiable in q, k, v and sink_logits; when ``inv_freq``
    requires grad the call runs unfused (``apply_rope`` then ``attention``), which also
    differentiates inv_freq.
    """
    common = dict(scale=scale, softcap=softcap, sink_logits=sink_logits)
    rope = dict(attention_scaling=attention_scaling, rotary_dim=rotary_dim, interleaved=interleaved)
    if needs_freq_grad(inv_freq):
        lay = make_layout(q, k, v, q_start, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                          max_seqlen_k, "rope_attention")
        out, lse = attention(apply_rope(q, None, lay.p, inv_freq, **rope),
                             apply_rope(k, None, lay.s, inv_freq, **rope), v, causal=causal,
                             return_lse=True, **common, **lay.attn)
    else:
        out, lse = fused(q, k, v, inv_freq, "none", causal=causal, q_start=q_start,
                         cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k,
                         max_seqlen_q=max_seqlen_q, max_seqlen_k=max_seqlen_k, **rope, **common)
    return (out, lse) if return_lse else out
