"""Fake (meta) kernels and autograd for ``torch.ops.longattn.rope_attention`` (RoPE applied
inside attention, with a position remap) and its backward.

The backward op returns the gradients of q and k before RoPE (the kernels send dS K and
dS^T Q back through each side's rotation) and of v and the sink logits. It has no gradient for
inv_freq: ``longattn.rope_attention`` and ``longattn.extend`` take the unfused path when
inv_freq requires grad, and calling the raw op with such an inv_freq raises in the backward
rather than return a silent zero.
"""
from __future__ import annotations

import torch

from . import _C  # noqa: F401  (loads the library: schemas and kernels)
from ._ops import _check_devices, _lse_dtype, _lse_shape

ops = torch.ops.longattn

#: Remap names of the op's ``remap`` argument (common/remap.h).
REMAPS = ("none", "self_extend", "rerope", "lm_infinite")


@torch.library.register_fake("longattn::rope_attention")
def _rope_attention_fake(q, k, v, inv_freq, cu_seqlens_q, cu_seqlens_k, sink_logits, *scalars):
    _check_devices(q, k=k, v=v, inv_freq=inv_freq, cu_seqlens_q=cu_seqlens_q,
                   cu_seqlens_k=cu_seqlens_k, sink_logits=sink_logits)
    out = q.new_empty(q.shape)
    lse = q.new_empty(_lse_shape(q, cu_seqlens_q is not None), dtype=_lse_dtype(q))
    return out, lse


@torch.library.register_fake("longattn::rope_attention_backward")
def _rope_attention_backward_fake(dout, dlse, out, lse, q, k, v, inv_freq, cu_seqlens_q,
                                  cu_seqlens_k, sink_logits, *scalars):
    dsink = (sink_logits.new_empty(sink_logits.shape) if sink_logits is not None
             else q.new_empty((0,), dtype=torch.float32))
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape), dsink


def _setup_context(ctx, inputs, output):
    q, k, v, inv_freq, cu_q, cu_k, sink_logits = inputs[:7]
    out, lse = output
    ctx.save_for_backward(q, k, v, inv_freq, out, lse, cu_q, cu_k, sink_logits)
    ctx.scalars = inputs[7:]
    ctx.freq_grad = bool(ctx.needs_input_grad[3])


def _backward(ctx, dout, dlse):
    if ctx.freq_grad:
        raise RuntimeError(
            "longattn::rope_attention has no gradient for inv_freq; longattn.rope_attention "
            "and longattn.extend compute it (unfused) when inv_freq requires grad")
    q, k, v, inv_freq, out, lse, cu_q, cu_k, sink_logits = ctx.saved_tensors
    dq, dk, dv, dsink = ops.rope_attention_backward(
        dout, dlse, out, lse, q, k, v, inv_freq, cu_q, cu_k, sink_logits, *ctx.scalars)
    return (dq, dk, dv, None, None, None, dsink if sink_logits is not None else None) + \
        (None,) * len(ctx.scalars)


torch.library.register_autograd("longattn::rope_attention", _backward,
                                setup_context=_setup_context)
