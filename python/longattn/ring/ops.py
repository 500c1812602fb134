"""The two custom ops (``longattn::ring_attention``, ``longattn::ring_attention_backward``) with
fake kernels and registered autograd: torch.compile sees one opaque node per call and no graph
break, and the process group travels by name.

The forward returns the lengths of every rank (a CPU tensor) so the backward needs no second
metadata exchange.
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch
import torch.distributed as dist

from .allgather import allgather_backward, allgather_forward
from .comm import exchange_metadata, make_comm
from .compute import Kernel, acc_dtype
from .group import group_from_name
from .ring_mode import ring_backward, ring_forward
from .schedule import RingPlan, make_plan

# mode -> (forward, backward); both take (comm, plan, kernel, ...) and return accumulators
_PASSES = {"ring": (ring_forward, ring_backward),
           "allgather": (allgather_forward, allgather_backward)}


def _plan_and_kernel(lengths: Sequence[int], alibi, layout, causal, left, right, sinks, scale,
                     softcap, logn_base) -> Tuple[RingPlan, Kernel]:
    return (make_plan(layout, tuple(lengths), causal, left, right, sinks),
            Kernel(causal, scale, softcap, logn_base, alibi))


@torch.library.custom_op("longattn::ring_attention", mutates_args=())
def _ring_attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                       alibi_slopes: Optional[torch.Tensor],
                       sink_logits: Optional[torch.Tensor], group_name: str, layout: str,
                       mode: str, causal: bool, window_left: int, window_right: int, sinks: int,
                       scale: float, softcap: float, logn_base: float, timeout_s: float,
                       need_grad: bool, arg_error: str
                       ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    comm, lengths = exchange_metadata(q, k, v, alibi_slopes, sink_logits, group_name, layout,
                                      mode, causal, window_left, window_right, sinks, scale,
                                      softcap, logn_base, timeout_s, need_grad, arg_error)
    plan_, kern = _plan_and_kernel(lengths, alibi_slopes, layout, causal, window_left,
                                   window_right, sinks, scale, softcap, logn_base)
    with torch.no_grad():
        try:
            out, lse = _PASSES[mode][0](comm, plan_, kern, q, k, v)
            comm.finish()
        finally:
            comm.settle()   # nothing posted by the pass outlives it, error or not
        if sink_logits is not None:
            # The learned sink is one more denominator term with no value: merge it once, as a
            # partial with out = 0 and lse = z, after the ring.
            z = sink_logits.to(lse.dtype).view(1, -1, 1)
            new = torch.logaddexp(lse, z)
            out = out * torch.exp(lse - new).transpose(1, 2).unsqueeze(-1)
            lse = new
    return out.to(q.dtype), lse, torch.tensor(plan_.lengths, dtype=torch.int64)


@_ring_attention_op.register_fake
def _(q, k, v, alibi_slopes, sink_logits, group_name, layout, mode, *args):
    world = dist.get_world_size(group_from_name(group_name))
    lse = q.new_empty((q.shape[0], q.shape[2], q.shape[1]), dtype=acc_dtype(q))
    return q.new_empty(q.shape), lse, torch.empty(world, dtype=torch.int64, device="cpu")


@torch.library.custom_op("longattn::ring_attention_backward", mutates_args=())
def _ring_attention_backward_op(dout: torch.Tensor, dlse: Optional[torch.Tensor],
                                q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                                out: torch.Tensor, lse: torch.Tensor, lengths: torch.Tensor,
                                alibi_slopes: Optional[torch.Tensor],
                                sink_logits: Optional[torch.Tensor], group_name: str,
                                layout: str, mode: str, causal: bool, window_left: int,
                                window_right: int, sinks: int, scale: float, softcap: float,
                                logn_base: float, timeout_s: float
                                ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                           torch.Tensor]:
    # The forward's lengths (a CPU tensor: no device read) spare a second metadata exchange.
    comm = make_comm(group_name, timeout_s, q)
    plan_, kern = _plan_and_kernel(lengths.tolist(), alibi_slopes, layout, causal, window_left,
                                   window_right, sinks, scale, softcap, logn_base)
    with torch.no_grad():
        try:
            dq, dk, dv = _PASSES[mode][1](comm, plan_, kern, dout.contiguous(), dlse, q, k, v,
                                          out, lse)
            comm.finish()
        finally:
            comm.settle()   # nothing posted by the pass outlives it, error or not
        if sink_logits is None:
            return dq, dk, dv, q.new_empty(0, dtype=torch.float32)
        # dz = -sum_i P_sink_i * delta_i over this rank's rows: like any parameter replicated
        # across the group, the full gradient is the sum over ranks.
        adt = lse.dtype
        delta = (dout.to(adt) * out.to(adt)).sum(-1).transpose(1, 2)
        if dlse is not None:
            delta = delta - dlse.to(adt)
        p_sink = torch.exp(sink_logits.to(adt).view(1, -1, 1) - lse)
        dsink = -(p_sink * delta).sum(dim=(0, 2))
    return dq, dk, dv, dsink.to(sink_logits.dtype)


@_ring_attention_backward_op.register_fake
def _(dout, dlse, q, k, v, out, lse, lengths, alibi_slopes, sink_logits, *args):
    dsink = (sink_logits.new_empty(sink_logits.shape) if sink_logits is not None
             else q.new_empty((0,), dtype=torch.float32))
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape), dsink


def _setup_context(ctx, inputs, output):
    q, k, v, alibi, sink_logits = inputs[:5]
    out, lse, lengths = output
    ctx.save_for_backward(q, k, v, out, lse, lengths, alibi, sink_logits)
    ctx.options = inputs[5:16]   # group_name .. timeout_s


def _backward(ctx, dout, dlse, _dlengths):
    q, k, v, out, lse, lengths, alibi, sink_logits = ctx.saved_tensors
    if dout is None:
        dout = torch.zeros_like(out)
    dq, dk, dv, dsink = _ring_attention_backward_op(dout, dlse, q, k, v, out, lse, lengths,
                                                    alibi, sink_logits, *ctx.options)
    return (dq, dk, dv, None, dsink if sink_logits is not None else None) + (None,) * 13


torch.library.register_autograd("longattn::ring_attention", _backward,
                                setup_context=_setup_context)
