"""Rotary position embedding: the fused rotation, cache re-rotation, and frequencies.

    inv_freq, attn_scale = longattn.rope.frequencies(128, 500000.0, config.rope_scaling)
    q, k = longattn.apply_rope(q, k, positions, inv_freq, attention_scaling=attn_scale)

Semantics (HF's ``x * cos + rotate_half(x) * sin`` with NeoX pairing): feature pair
``(i, i + rotary_dim/2)`` (``interleaved=True``: ``(2i, 2i+1)``) of every head of a token at
position ``p`` is rotated by the angle ``p * inv_freq[i]``, and cos/sin are multiplied by
``attention_scaling``. Features past ``rotary_dim`` are left unchanged (not scaled). The angle
is the exact product of the integer position and the fp32 frequency, reduced mod pi/2 in
extended precision before cos/sin (fp32 ``pos * inv_freq`` is off by ~0.03 rad at 1e6).
"""
from __future__ import annotations

from typing import Optional, Union

import torch

from . import _rope_ops  # noqa: F401  (fake kernels and autograd)
from ._device import check_device_built
from .rope_scaling import ROPE_TYPES, frequencies, frequencies_from_config

ops = torch.ops.longattn

__all__ = ["apply_rope", "rerotate_keys", "frequencies", "frequencies_from_config", "ROPE_TYPES"]


def _check_tensor(name, t, allow_none=False):
    if t is None and allow_none:
        return
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")


def _rotary_dim(rotary_dim, inv_freq) -> int:
    if inv_freq.dim() != 1:
        raise ValueError(f"inv_freq must be 1-D of length rotary_dim // 2, got shape "
                         f"{tuple(inv_freq.shape)}")
    if rotary_dim is None:
        return 2 * inv_freq.shape[0]
    if isinstance(rotary_dim, bool) or not isinstance(rotary_dim, int):
        raise ValueError(f"rotary_dim must be an int or None, got {rotary_dim!r}")
    return rotary_dim


def apply_rope(q: torch.Tensor, k: Optional[torch.Tensor], positions: torch.Tensor,
               inv_freq: torch.Tensor, *, attention_scaling: float = 1.0,
               rotary_dim: Optional[int] = None, interleaved: bool = False,
               inplace: bool = False):
    """Rotate q (and k) by their positions: one read and one write of each tensor.

    Args:
        q: ``(batch, seqlen, heads_q, head_dim)`` or varlen ``(tokens, heads_q, head_dim)``;
            any strides with a contiguous head dim (a ``(B, H, L, D)`` tensor passed as
            ``.transpose(1, 2)`` needs no copy). float32/float64/bfloat16/float16.
        k: ``None`` or like q with its own number of heads (GQA) and head_dim.
        positions: int32/int64 ``(batch, seqlen)``, ``(1, seqlen)`` or ``(seqlen,)``; varlen:
            ``(tokens,)``. Any values, including negative ones (exact for ``|p| < 2**53``).
        inv_freq: fp32 ``(rotary_dim // 2,)``, e.g. from :func:`frequencies` (fp64 accepted;
            then the angle is a rounded double product). Differentiable (learned or searched
            frequencies): ``d/d inv_freq[i] = sum over tokens and heads of position *
            (d loss / d angle of pair i)``, computed by the kernels with q and k saved for it
            (only when inv_freq requires grad).
        attention_scaling: multiplies cos and sin (HF's ``attention_scaling``; YaRN's mscale).
        rotary_dim: rotated features per head, default ``2 * len(inv_freq)``; the rest pass
            through unchanged (partial rotary).
        interleaved: GPT-J pairing ``(2i, 2i+1)`` instead of NeoX ``(i, i + rotary_dim/2)``.
        inplace: rotate q and k in place (inference only: refused when q, k or inv_freq
            requires grad, since the backward needs the inputs the rotation overwrites) and
            return them. Safe under torch.compile (the op's schema marks the mutation).

    Returns:
        ``(q_out, k_out)``, or ``q_out`` alone when ``k`` is None. Out of place the outputs are
        new contiguous tensors; differentiable in q and k (the backward rotates the gradient by
        the opposite angle) and in inv_freq.
    """
    _check_tensor("q", q)
    _check_tensor("k", k, allow_none=True)
    _check_tensor("positions", positions)
    _check_tensor("inv_freq", inv_freq)
    check_device_built(q, "q")
    rd = _rotary_dim(rotary_dim, inv_freq)
    scaling = float(attention_scaling)
    if inplace:
        needs_grad = torch.is_grad_enabled() and (
            q.requires_grad or (k is not None and k.requires_grad) or inv_freq.requires_grad)
        if needs_grad:
            raise ValueError("apply_rope(inplace=True) is for inference: q, k or inv_freq "
                             "requires grad; use inplace=False (the default) when training")
        ops.rope_(q, k, positions, inv_freq, scaling, rd, bool(interleaved), False)
        return q if k is None else (q, k)
    q_out, k_out = ops.rope(q, k, positions, inv_freq, scaling, rd, bool(interleaved), False)
    return q_out if k is None else (q_out, k_out)


def _as_positions(p, name, like: Optional[torch.Tensor], device) -> torch.Tensor:
    if isinstance(p, torch.Tensor):
        if p.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"{name} must be int32 or int64, got {p.dtype}")
        return p.to(torch.int64)
    if isinstance(p, int) and not isinstance(p, bool):
        return torch.full(like.shape if like is not None else (), p, dtype=torch.int64, device=device)
    raise ValueError(f"{name} must be an int or an integer tensor, got {type(p).__name__}")


def rerotate_keys(k: torch.Tensor, old_positions: Union[torch.Tensor, int],
                  new_positions: Union[torch.Tensor, int], inv_freq: torch.Tensor, *,
                  rotary_dim: Optional[int] = None, interleaved: bool = False,
                  inplace: bool = False) -> torch.Tensor:
    """Move cached keys, already rotated at ``old_positions``, to ``new_positions``.

    One rotation by ``new - old``, with the integer difference taken exactly before any
    angle is formed, so shifting a cache many times never accumulates angle error: the keys
    equal (to the rounding of their dtype, once per call) keys rotated at the final positions
    directly. This is what StreamingLLM-style caches need when they evict tokens and renumber
    the rest. attention_scaling is not applied again (the cached keys carry it already).

    Args:
        k: ``(batch, seqlen, heads, head_dim)`` or ``(tokens, heads, head_dim)``.
        old_positions, new_positions: positions shaped as for :func:`apply_rope` (or ints).
        inv_freq, rotary_dim, interleaved: as the keys were rotated with.
        inplace: rewrite k in place (inference only).
    """
    _check_tensor("k", k)
    ref = old_positions if isinstance(old_positions, torch.Tensor) else (
        new_positions if isinstance(new_positions, torch.Tensor) else None)
    if ref is None:  # two ints: one shift for every token
        ref = torch.empty(k.shape[:-2] if k.dim() == 3 else k.shape[1:2], dtype=torch.int64,
                          device=k.device)
    old = _as_positions(old_positions, "old_positions", ref, k.device)
    new = _as_positions(new_positions, "new_positions", ref, k.device)
    try:
        delta = new - old
    except RuntimeError as e:
        raise ValueError(f"old_positions {tuple(old.shape)} and new_positions {tuple(new.shape)} "
                         f"do not broadcast: {e}") from None
    return apply_rope(k, None, delta, inv_freq, attention_scaling=1.0, rotary_dim=rotary_dim,
                      interleaved=interleaved, inplace=inplace)
