"""Fake (meta) kernels and autograd for every op in ``torch.ops.longattn``.

The compiled module registers the schemas (csrc/ops.cpp) and the CPU/CUDA kernels; this file
gives torch.compile shapes without running a kernel, and wires each forward op to its backward
op, so a compiled graph sees two opaque custom ops and no graph break.
"""
from __future__ import annotations

import torch

from . import _C  # noqa: F401  (loads the library: schemas and kernels)

ops = torch.ops.longattn


def _lse_dtype(q: torch.Tensor) -> torch.dtype:
    return torch.float64 if q.dtype == torch.float64 else torch.float32


def _lse_shape(q: torch.Tensor, varlen: bool):
    if varlen:
        return (q.shape[1], q.shape[0])
    return (q.shape[0], q.shape[2], q.shape[1])


def _check_devices(q, **named):
    """The device check of csrc/attention_args.cpp, for calls that reach the fake kernel (meta
    tensors, tracing): a mix with a meta tensor would otherwise dispatch here unchecked."""
    for name, t in named.items():
        if t is not None and t.device != q.device:
            raise ValueError(f"{name} is on {t.device} but q is on {q.device}; all tensors must "
                             "be on one device")


@torch.library.register_fake("longattn::attention")
def _attention_fake(q, k, v, cu_seqlens_q, cu_seqlens_k, alibi_slopes, sink_logits, scale,
                    softcap, logn_base, causal, window_left, window_right, sinks, q_start,
                    k_start, max_seqlen_q, max_seqlen_k):
    _check_devices(q, k=k, v=v, cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k,
                   alibi_slopes=alibi_slopes, sink_logits=sink_logits)
    out = q.new_empty(q.shape)
    lse = q.new_empty(_lse_shape(q, cu_seqlens_q is not None), dtype=_lse_dtype(q))
    return out, lse


@torch.library.register_fake("longattn::attention_backward")
def _attention_backward_fake(dout, dlse, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k,
                             alibi_slopes, sink_logits, *args):
    dsink = (sink_logits.new_empty(sink_logits.shape) if sink_logits is not None
             else q.new_empty((0,), dtype=torch.float32))
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape), dsink


# Positions of the non-tensor arguments of longattn::attention after the 7 tensors.
_ATTN_SCALARS = ("scale", "softcap", "logn_base", "causal", "window_left", "window_right",
                 "sinks", "q_start", "k_start", "max_seqlen_q", "max_seqlen_k")


def _attention_setup_context(ctx, inputs, output):
    q, k, v, cu_q, cu_k, alibi, sink_logits = inputs[:7]
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, cu_q, cu_k, alibi, sink_logits)
    ctx.scalars = inputs[7:]


def _attention_backward(ctx, dout, dlse):
    q, k, v, out, lse, cu_q, cu_k, alibi, sink_logits = ctx.saved_tensors
    dq, dk, dv, dsink = ops.attention_backward(
        dout, dlse, q, k, v, out, lse, cu_q, cu_k, alibi, sink_logits, *ctx.scalars)
    dsink_out = dsink if sink_logits is not None else None
    return (dq, dk, dv, None, None, None, dsink_out) + (None,) * len(_ATTN_SCALARS)


torch.library.register_autograd("longattn::attention", _attention_backward,
                                setup_context=_attention_setup_context)


@torch.library.register_fake("longattn::merge_attention")
def _merge_fake(outs, lses):
    return outs[0].new_empty(outs[0].shape), lses[0].new_empty(lses[0].shape,
                                                               dtype=_lse_dtype(outs[0]))


@torch.library.register_fake("longattn::merge_attention_backward")
def _merge_backward_fake(dout, dlse, outs, lses, out, lse):
    return [o.new_empty(o.shape) for o in outs], [l.new_empty(l.shape) for l in lses]


def _merge_setup_context(ctx, inputs, output):
    outs, lses = inputs
    out, lse = output
    ctx.n = len(outs)
    ctx.save_for_backward(out, lse, *outs, *lses)


def _merge_backward(ctx, dout, dlse):
    out, lse, *rest = ctx.saved_tensors
    outs, lses = rest[:ctx.n], rest[ctx.n:]
    douts, dlses = ops.merge_attention_backward(dout, dlse, outs, lses, out, lse)
    return douts, dlses


torch.library.register_autograd("longattn::merge_attention", _merge_backward,
                                setup_context=_merge_setup_context)


# The running merge in place (ring attention's hop accumulation): no autograd, the ring op has
# its own backward; the schema marks out and lse as mutated, so torch.compile functionalizes it.
@torch.library.register_fake("longattn::merge_attention_")
def _merge_inplace_fake(out, lse, part_out, part_lse, row_start):
    return None
