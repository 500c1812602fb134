"""Fake (meta) kernels and autograd for ``torch.ops.longattn.rope`` / ``rope_``.

A rotation is orthogonal, so the backward of ``rope`` is ``rope`` itself with the opposite
angle (``inverse`` flipped) applied to the incoming gradients, scaled by the same
attention_scaling; the untouched tail passes its gradient through. The in-place ``rope_`` is
for inference: it has no autograd formula (``longattn.apply_rope`` refuses it when a gradient
is needed), and its schema marks q and k as mutated so torch.compile functionalizes it.
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


def _rope_setup_context(ctx, inputs, output):
    q, k, positions, inv_freq, attention_scaling, rotary_dim, interleaved, inverse = inputs
    ctx.save_for_backward(positions, inv_freq)
    ctx.has_k = k is not None
    ctx.options = (attention_scaling, rotary_dim, interleaved, not inverse)


def _head_dim_contiguous(g):
    # Incoming gradients can be expanded (stride 0 everywhere, e.g. from .sum()).
    return g if g.stride(-1) == 1 else g.contiguous()


def _rope_backward(ctx, dq_out, dk_out):
    positions, inv_freq = ctx.saved_tensors
    if not ctx.has_k:
        dk_out = None
    dq = dk = None
    if dq_out is not None:
        dq, dk = ops.rope(_head_dim_contiguous(dq_out),
                          None if dk_out is None else _head_dim_contiguous(dk_out),
                          positions, inv_freq, *ctx.options)
        if dk_out is None:
            dk = None
    elif dk_out is not None:
        dk, _ = ops.rope(_head_dim_contiguous(dk_out), None, positions, inv_freq, *ctx.options)
    return dq, dk, None, None, None, None, None, None


torch.library.register_autograd("longattn::rope", _rope_backward, setup_context=_rope_setup_context)
