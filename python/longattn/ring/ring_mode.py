"""mode="ring": K/V blocks travel from rank to rank along the schedule while each rank computes
on the block it holds.

Backward. Standard ring-attention backward: the block gradient with the *global* out and lse of
the rows (P = exp(S - lse)) is the block's exact share of dq, dk, dv (delta = rowsum(dO * O) -
dlse). K/V travel the same route again; each user sends its fp32 dK/dV share of the rows it read
straight back to the owner in the next step (one message in and one out per rank and step, as
with an accumulator passed along the ring, but never wider than what that user read); dq
accumulates locally. Accumulators live on the tensors' device.
"""
from __future__ import annotations

import torch

from .comm import Comm
from .compute import Accumulator, Kernel, acc_dtype
from .schedule import Call, Msg, RingPlan, hull


class Blocks:
    """K/V blocks a rank holds: its own (all rows) and received ones (the rows their message
    carried), addressed in the owner's row numbers."""

    def __init__(self, plan_: RingPlan, rank: int, k, v, msgs):
        self.rank, self.k, self.v = rank, k, v
        self.held = {rank: (k, v, 0)}
        self.bufs = {}
        self.last_use = {}            # last step that reads each block (compute or send)
        W = plan_.world_size
        for o in range(W):
            if plan_.calls[rank][o]:
                self.last_use[o] = (rank - o) % W
        for m in msgs:
            if m.kind == 0 and m.src == rank:
                self.last_use[m.block] = max(self.last_use.get(m.block, -1), m.step)

    def payload(self, m: Msg):
        """Rows [m.lo, m.hi) of the block as one contiguous K/V message."""
        if m.block == self.rank:      # the owner sends once: the one copy it makes
            return torch.stack([self.k[:, m.lo:m.hi], self.v[:, m.lo:m.hi]])
        buf, lo, hi = self.bufs[m.block]
        if (lo, hi) == (m.lo, m.hi):
            return buf
        return buf[:, :, m.lo - lo:m.hi - lo].contiguous()

    def receive(self, m: Msg, buf):
        self.bufs[m.block] = (buf, m.lo, m.hi)
        self.held[m.block] = (buf[0], buf[1], m.lo)

    def rows(self, block, c: Call):
        k, v, base = self.held[block]
        return k[:, c.k0 - base:c.k1 - base], v[:, c.k0 - base:c.k1 - base]

    def release(self, step):
        for b in [b for b in self.held if b != self.rank and self.last_use.get(b, -1) <= step]:
            self.held.pop(b)
            self.bufs.pop(b, None)


def _by_step(msgs, W):
    steps = [[] for _ in range(W + 1)]
    for m in msgs:
        steps[m.step].append(m)
    return steps


def _alloc(m: Msg, like: torch.Tensor, dtype: torch.dtype):
    return torch.empty((2, like.shape[0], m.hi - m.lo) + tuple(like.shape[2:]), dtype=dtype,
                       device=like.device)


def ring_forward(comm: Comm, plan_: RingPlan, kern: Kernel, q, k, v):
    r, W = comm.rank, comm.world
    acc = Accumulator(q)
    blocks = Blocks(plan_, r, k, v, plan_.fwd_msgs)
    by_step = _by_step(plan_.fwd_msgs, W)
    for h in range(W):
        received = comm.exchange(by_step[h], blocks.payload, lambda m: _alloc(m, k, k.dtype))
        o = (r - h) % W
        for c in plan_.calls[r][o]:
            out, lse = kern.fwd(q[:, c.q0:c.q1], *blocks.rows(o, c), c)
            acc.add(c.q0, c.q1, out, lse)
        comm.complete(f"K/V blocks of step {h + 1} of {W}")
        for m, t in received:
            blocks.receive(m, t)
        blocks.release(h)
    return acc.out, acc.lse


def ring_backward(comm: Comm, plan_: RingPlan, kern: Kernel, dout, dlse, q, k, v, out, lse):
    r, W = comm.rank, comm.world
    adt = acc_dtype(q)
    dq = torch.zeros(q.shape, dtype=adt, device=q.device)
    dkv_own = torch.zeros((2,) + tuple(k.shape), dtype=adt, device=k.device)
    blocks = Blocks(plan_, r, k, v, plan_.bwd_msgs)
    pending = {}  # block -> this rank's dK/dV share of the rows it read, sent home next step

    def payload(m):
        return blocks.payload(m) if m.kind == 0 else pending[m.block]

    def alloc(m):
        return _alloc(m, k, k.dtype if m.kind == 0 else adt)

    by_step = _by_step(plan_.bwd_msgs, W)
    for h in range(W + 1):
        received = comm.exchange(by_step[h], payload, alloc)
        o = (r - h) % W
        if h < W and plan_.calls[r][o]:
            calls = plan_.calls[r][o]
            if h == 0:
                dkv, base = dkv_own, 0
            else:
                base, hi = hull(calls)
                dkv = torch.zeros((2, k.shape[0], hi - base) + tuple(k.shape[2:]), dtype=adt,
                                  device=k.device)
                pending[o] = dkv
            for c in calls:
                dl_c = None if dlse is None else dlse[:, :, c.q0:c.q1]
                dq_c, dk_c, dv_c, _ = kern.bwd(dout[:, c.q0:c.q1], dl_c, q[:, c.q0:c.q1],
                                               *blocks.rows(o, c), out[:, c.q0:c.q1],
                                               lse[:, :, c.q0:c.q1], c)
                dq[:, c.q0:c.q1] += dq_c
                dkv[0, :, c.k0 - base:c.k1 - base] += dk_c
                dkv[1, :, c.k0 - base:c.k1 - base] += dv_c
        what = "the final dK/dV returns" if h == W else f"K/V and dK/dV of step {h + 1} of {W}"
        comm.complete(what)
        for m in by_step[h]:          # shares sent home are done with
            if m.kind == 1 and m.src == r:
                pending.pop(m.block)
        for m, t in received:
            if m.kind == 0:
                blocks.receive(m, t)
            else:
                dkv_own[:, :, m.lo:m.hi] += t     # a user's share of this rank's block
        blocks.release(h)
    assert not pending, "ring_attention: internal error, dK/dV left unsent"
    dk, dv = dkv_own[0], dkv_own[1]
    return (dq.to(q.dtype), dk.to(k.dtype, copy=True), dv.to(v.dtype, copy=True))
