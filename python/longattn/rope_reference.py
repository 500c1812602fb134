"""Pure-PyTorch references for RoPE and the training-free extension methods.

Everything runs in float64 by default (``upcast=True``); with ``upcast=False`` the arithmetic
runs in the input dtype as plain PyTorch would (cos/sin still from exact float64 angles, then
cast), which is the low-precision baseline of the tolerance rule (docs/numerics.md).
Imports only torch.

The extension references are deliberately direct: they build, for every query/key pair, the
relative angle the method prescribes (``delta[p, s]``, possibly fractional) and score
``<R(delta * theta) q_p, k_s>``; they share no code path with ``longattn.extend``, which gets
the same numbers from two attention calls over rotated copies of q and k and an lse merge.
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch

__all__ = ["rope_angles_ref", "apply_rope_ref", "rope_grads_ref", "relative_rope_attention_ref",
           "rope_delta", "self_extend_delta", "rerope_delta", "lm_infinite_delta"]


def rope_angles_ref(positions: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    """``positions[..., None] * inv_freq`` in float64: exact for an fp32 inv_freq and
    ``|positions| < 2**29`` (a 24-bit times a 29-bit integer fits in 53 bits)."""
    return positions.to(torch.float64)[..., None] * inv_freq.to(torch.float64)


def _split(x, rotary_dim, interleaved):
    r = x[..., :rotary_dim]
    if interleaved:
        return r[..., 0::2], r[..., 1::2]
    return r[..., : rotary_dim // 2], r[..., rotary_dim // 2:]


def _join(y0, y1, interleaved):
    return torch.stack((y0, y1), dim=-1).flatten(-2) if interleaved else torch.cat((y0, y1), dim=-1)


def apply_rope_ref(x: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor, *,
                   attention_scaling: float = 1.0, rotary_dim: Optional[int] = None,
                   interleaved: bool = False, inverse: bool = False,
                   upcast: bool = True) -> torch.Tensor:
    """HF's ``x * cos + rotate_half(x) * sin`` on the first ``rotary_dim`` features.

    ``x``: ``(B, L, H, D)`` with positions ``(B, L)``/``(1, L)``/``(L,)``, or ``(T, H, D)`` with
    ``(T,)``. Returns float64 (``upcast``) or x's dtype.
    """
    rotary_dim = 2 * inv_freq.numel() if rotary_dim is None else rotary_dim
    dtype = torch.float64 if upcast else x.dtype
    ang = rope_angles_ref(positions, inv_freq)
    if x.dim() == 4 and ang.dim() == 2:  # (L, half) -> (1, L, half)
        ang = ang[None]
    ang = ang[..., None, :]  # broadcast over heads
    sign = -1.0 if inverse else 1.0
    cos = (ang.cos() * attention_scaling).to(dtype)
    sin = (ang.sin() * (sign * attention_scaling)).to(dtype)
    xd = x.to(dtype)
    x0, x1 = _split(xd, rotary_dim, interleaved)
    y = _join(x0 * cos - x1 * sin, x1 * cos + x0 * sin, interleaved)
    return torch.cat((y, xd[..., rotary_dim:]), dim=-1)


def rope_grads_ref(q: torch.Tensor, k: Optional[torch.Tensor], positions: torch.Tensor,
                   inv_freq: torch.Tensor, dq_out: torch.Tensor,
                   dk_out: Optional[torch.Tensor] = None, *, attention_scaling: float = 1.0,
                   rotary_dim: Optional[int] = None, interleaved: bool = False,
                   inverse: bool = False, upcast: bool = True):
    """Gradients of :func:`apply_rope_ref` on q (and k) given the output gradients, by autograd
    through the plain formula: ``(dq, dk, dinv_freq)``; dk is None without k. inv_freq is taken
    as a float64 leaf, so ``dinv_freq`` is float64; with ``upcast=False`` everything past the
    angle runs in the inputs' dtype (the low-precision baseline of the tolerance rule)."""
    inv = inv_freq.detach().to(torch.float64).requires_grad_()
    xs = [q.detach().requires_grad_()] + ([k.detach().requires_grad_()] if k is not None else [])
    gs = [dq_out] + ([dk_out] if k is not None else [])
    kw = dict(attention_scaling=attention_scaling, rotary_dim=rotary_dim, interleaved=interleaved,
              inverse=inverse, upcast=upcast)
    outs = [apply_rope_ref(x, positions, inv, **kw) for x in xs]
    grads = torch.autograd.grad(outs, xs + [inv], [g.to(o.dtype) for g, o in zip(gs, outs)])
    dq, dk = grads[0], (grads[1] if k is not None else None)
    return dq, dk, grads[-1]


def relative_rope_attention_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                                inv_freq: torch.Tensor, delta: torch.Tensor,
                                visible: torch.Tensor, *, attention_scaling: float = 1.0,
                                rotary_dim: Optional[int] = None, interleaved: bool = False,
                                scale: Optional[float] = None, softcap: float = 0.0,
                                sink_logits: Optional[torch.Tensor] = None,
                                upcast: bool = True) -> Tuple[torch.Tensor, torch.Tensor]:
    """Attention whose score for query row i and key j is
    ``scale * (A^2 <R(delta[i, j] * theta) q_rot, k_rot> + <q_tail, k_tail>)`` on ``visible``,
    then ``softcap * tanh(x / softcap)`` when softcap > 0; ``sink_logits`` (``(Hq,)``) join each
    row's denominator with no value, as in ``longattn.attention``.

    q ``(B, Lq, Hq, D)``, k/v ``(B, Lk, Hkv, D)`` un-rotated; ``delta`` float ``(Lq, Lk)``, the
    relative position the method assigns to each pair (for plain RoPE ``p - s``);
    ``visible`` bool ``(Lq, Lk)``. Returns ``out (B, Lq, Hq, D)`` and ``lse (B, Hq, Lq)``; rows
    with no visible key give 0 and -inf (the sink logit's lse with one).
    """
    rotary_dim = 2 * inv_freq.numel() if rotary_dim is None else rotary_dim
    dtype = torch.float64 if upcast else q.dtype
    group = q.shape[2] // k.shape[2]
    k = k.repeat_interleave(group, dim=2)
    v = v.repeat_interleave(group, dim=2)
    qd, kd, vd = q.to(dtype), k.to(dtype), v.to(dtype)
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    q0, q1 = _split(qd, rotary_dim, interleaved)  # (B, L, H, half)
    k0, k1 = _split(kd, rotary_dim, interleaved)
    # <R(a) (x0, x1), (y0, y1)> = cos a (x0 y0 + x1 y1) + sin a (x0 y1 - x1 y0), per frequency.
    same = torch.einsum("bihf,bjhf->bhijf", q0, k0) + torch.einsum("bihf,bjhf->bhijf", q1, k1)
    cross = torch.einsum("bihf,bjhf->bhijf", q0, k1) - torch.einsum("bihf,bjhf->bhijf", q1, k0)
    ang = delta.to(torch.float64)[..., None] * inv_freq.to(torch.float64)  # (Lq, Lk, half)
    rot = (same * ang.cos().to(dtype) + cross * ang.sin().to(dtype)).sum(-1)
    tail = torch.einsum("bihd,bjhd->bhij", qd[..., rotary_dim:], kd[..., rotary_dim:])
    logits = scale * (attention_scaling ** 2 * rot + tail)
    if softcap > 0:
        logits = softcap * torch.tanh(logits / softcap)
    logits = logits.masked_fill(~visible, float("-inf"))
    if sink_logits is None:
        lse = torch.logsumexp(logits, dim=-1)  # (B, H, Lq)
    else:
        z = sink_logits.to(dtype)[None, :, None, None].expand(*logits.shape[:-1], 1)
        lse = torch.logsumexp(torch.cat((logits, z), dim=-1), dim=-1)
    p = torch.exp(logits - lse[..., None].masked_fill(torch.isinf(lse)[..., None], 0.0))
    p = p.masked_fill(~visible, 0.0)
    out = torch.einsum("bhij,bjhd->bihd", p, vd)
    return out, lse


def _grid(Lq, Lk, q_start, device):
    if q_start is None:
        q_start = Lk - Lq
    p = torch.arange(Lq, device=device, dtype=torch.int64)[:, None] + q_start
    s = torch.arange(Lk, device=device, dtype=torch.int64)[None, :]
    return p, s


def rope_delta(Lq: int, Lk: int, causal: bool = True, q_start=None, device=None):
    """Plain RoPE (``longattn.rope_attention``): ``delta = p - s``, every key visible, or the
    keys ``s <= p`` when causal. Returns (delta, visible)."""
    p, s = _grid(Lq, Lk, q_start, device)
    visible = s <= p if causal else torch.ones(Lq, Lk, dtype=torch.bool, device=device)
    return (p - s).to(torch.float64), visible


def self_extend_delta(Lq: int, Lk: int, group: int, window: int, q_start=None, device=None):
    """SelfExtend (datamllab/LongLM): neighbors (``p - s < W``) keep ``p - s``; farther keys
    use grouped positions ``(p // G + W - W // G) - s // G``. Causal. Returns (delta, visible)."""
    p, s = _grid(Lq, Lk, q_start, device)
    grouped = (p // group + window - window // group) - s // group
    delta = torch.where(p - s < window, p - s, grouped)
    return delta.to(torch.float64), s <= p


def rerope_delta(Lq: int, Lk: int, window: int, leak: Optional[float] = None, q_start=None,
                 device=None):
    """ReRoPE (Su): relative distance ``min(p - s, w)``; leaky ReRoPE: ``w + (p - s - w) / k``
    past w. Causal. Returns (delta, visible)."""
    p, s = _grid(Lq, Lk, q_start, device)
    d = (p - s).to(torch.float64)
    far = window + (d - window) / leak if leak is not None else torch.full_like(d, float(window))
    return torch.where(d < window, d, far), s <= p


def lm_infinite_delta(Lq: int, Lk: int, local_window: int, global_tokens: int,
                      max_distance: Optional[int] = None, q_start=None, device=None):
    """LM-Infinite (Han et al.): the lambda mask (``s < n_global`` or ``0 <= p - s < n_local``)
    with the distance ceiling: global keys outside the local window are scored at distance
    ``max_distance`` (default n_local): q rotated there, k unrotated. Returns (delta, visible)."""
    p, s = _grid(Lq, Lk, q_start, device)
    max_distance = local_window if max_distance is None else max_distance
    local = (p - s >= 0) & (p - s < local_window)
    far_global = (s < global_tokens) & (p - s >= local_window)
    delta = torch.where(local, (p - s).to(torch.float64), torch.full_like(p - s, max_distance,
                                                                           dtype=torch.float64))
    return delta, local | far_global
