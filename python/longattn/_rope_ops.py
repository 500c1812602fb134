"""Fake (meta) kernels and autograd for ``torch.ops.longattn.rope`` / ``rope_`` /
``rope_backward``.

A rotation is orthogonal, so the backward of ``rope`` in q and k is ``rope`` itself with the
opposite angle (``inverse`` flipped) applied to the incoming gradients, scaled by the same
attention_scaling; the untouched tail passes its gradient through. When ``inv_freq`` needs a
gradient, the forward's q and k are saved as well and ``rope_backward`` computes, in one pass
over the gradients, both the rotated-back gradients and ``d loss / d inv_freq``. The in-place
``rope_`` is for inference: it has no autograd formula (``longattn.apply_rope`` refuses it when a
gradient is needed), and its schema marks q and k as mutated so torch.compile functionalizes it.
"""
from __future__ import annotations

import torch

from . import _C  # noqa: F401  (loads the library: schemas and kernels)

ops = torch.ops.longattn


@torch.library.register_fake("longattn::rope")
def _rope_fake(q, k, positions, inv_freq, attention_scaling, rotary_dim, interleaved, inverse):
    k_out = k.new_empty(k.shape) if k is not None else q.new_empty((0,))
    return q.new_empty(q.shape), k_out


@torch.library.register_fake("longattn::rope_")
def _rope_inplace_fake(q, k, positions, inv_freq, attention_scaling, rotary_dim, interleaved,
                       inverse):
    return None


@torch.library.register_fake("longattn::rope_backward")
def _rope_backward_fake(dq_out, dk_out, q, k, positions, inv_freq, attention_scaling, rotary_dim,
                        interleaved, inverse, input_grads):
    empty = dq_out.new_empty((0,))
    dq = dq_out.new_empty(dq_out.shape) if input_grads else empty
    dk = dk_out.new_empty(dk_out.shape) if input_grads and dk_out is not None else empty.clone()
    return dq, dk, inv_freq.new_empty(inv_freq.shape)


def _rope_setup_context(ctx, inputs, output):
    q, k, positions, inv_freq, attention_scaling, rotary_dim, interleaved, inverse = inputs
    # The forward's inputs are kept only when inv_freq's gradient needs them.
    ctx.freq_grad = bool(ctx.needs_input_grad[3])
    if ctx.freq_grad:
        ctx.save_for_backward(positions, inv_freq, q, k)
    else:
        ctx.save_for_backward(positions, inv_freq)
    ctx.has_k = k is not None
    ctx.forward_options = (attention_scaling, rotary_dim, interleaved, inverse)
    ctx.options = (attention_scaling, rotary_dim, interleaved, not inverse)


def _head_dim_contiguous(g):
    # Incoming gradients can be expanded (stride 0 everywhere, e.g. from .sum()).
    return g if g.stride(-1) == 1 else g.contiguous()


def _rotate_back(ctx, dq_out, dk_out, positions, inv_freq):
    dq = dk = None
    if dq_out is not None:
        dq, dk = ops.rope(_head_dim_contiguous(dq_out),
                          None if dk_out is None else _head_dim_contiguous(dk_out),
                          positions, inv_freq, *ctx.options)
        if dk_out is None:
            dk = None
    elif dk_out is not None:
        dk, _ = ops.rope(_head_dim_contiguous(dk_out), None, positions, inv_freq, *ctx.options)
    return dq, dk


def _pairs(t, rotary_dim, interleaved):
    r = t[..., :rotary_dim]
    if interleaved:
        return r[..., 0::2], r[..., 1::2]
    return r[..., : rotary_dim // 2], r[..., rotary_dim // 2:]


def _freq_grad_differentiable(ctx, grads_and_inputs, positions, inv_freq):
    """d loss / d inv_freq from differentiable ops, for backward(create_graph=True) only: with
    y = rope(x), d loss / d angle of a pair is sign * (y_a g_b - y_b g_a) (rotation invariance),
    and rope's own autograd then carries the second derivatives."""
    scaling, rotary_dim, interleaved, inverse = ctx.forward_options
    acc = torch.float64 if inv_freq.dtype == torch.float64 else torch.float32
    total = None
    for g, x in grads_and_inputs:
        y, _ = ops.rope(x, None, positions, inv_freq, *ctx.forward_options)
        ya, yb = _pairs(y.to(acc), rotary_dim, interleaved)
        ga, gb = _pairs(g.to(acc), rotary_dim, interleaved)
        cross = (ya * gb - yb * ga).sum(-2)  # over heads: (B, L, half) or (T, half)
        pos = positions.to(acc)
        if cross.dim() == 3 and pos.dim() == 1:
            pos = pos[None]
        part = (pos[..., None] * cross).reshape(-1, cross.shape[-1]).sum(0)
        total = part if total is None else total + part
    sign = -1.0 if inverse else 1.0
    return (sign * total).to(inv_freq.dtype)


def _backward_with_freq_grad(ctx, dq_out, dk_out):
    positions, inv_freq, q, k = ctx.saved_tensors
    pairs = [(g, x) for g, x in ((dq_out, q), (dk_out, k)) if g is not None]
    if not pairs:
        return None, None, None, None
    if torch.is_grad_enabled():  # backward(create_graph=True): keep every step differentiable
        dq, dk = _rotate_back(ctx, dq_out, dk_out, positions, inv_freq)
        return dq, dk, None, _freq_grad_differentiable(ctx, pairs, positions, inv_freq)
    input_grads = bool(ctx.needs_input_grad[0] or ctx.needs_input_grad[1])
    (g0, x0), (g1, x1) = pairs[0], (pairs[1] if len(pairs) == 2 else (None, None))
    d0, d1, dinv_freq = ops.rope_backward(
        _head_dim_contiguous(g0), None if g1 is None else _head_dim_contiguous(g1), x0, x1,
        positions, inv_freq, *ctx.forward_options, input_grads)
    if not input_grads:
        return None, None, None, dinv_freq
    if dq_out is None:  # the one pair was k's
        return None, d0, None, dinv_freq
    return d0, (d1 if g1 is not None else None), None, dinv_freq


def _rope_backward(ctx, dq_out, dk_out):
    if not ctx.has_k:
        dk_out = None
    if ctx.freq_grad:
        dq, dk, _, dinv_freq = _backward_with_freq_grad(ctx, dq_out, dk_out)
        return dq, dk, None, dinv_freq, None, None, None, None
    positions, inv_freq = ctx.saved_tensors
    dq, dk = _rotate_back(ctx, dq_out, dk_out, positions, inv_freq)
    return dq, dk, None, None, None, None, None, None


torch.library.register_autograd("longattn::rope", _rope_backward, setup_context=_rope_setup_context)
