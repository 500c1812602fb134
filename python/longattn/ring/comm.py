"""Moving K/V and dK/dV between ranks, and turning a failure anywhere into an error everywhere.

Each step posts one ``batch_isend_irecv`` batch (this step's transfers, which overlap this
step's compute) and waits for it at the end of the step. A message is posted in the same step
on both ends, so no step waits on a later one: with non-blocking ops this cannot deadlock.
Within a batch, even ranks post sends first and odd ranks receives first, the usual parity
order, which also keeps a neighbour ring safe on backends where sends block. Messages between
one pair of ranks are posted in one canonical order (and tagged), as gloo and NCCL match them
in order. Every wait takes ``timeout``, so a peer that died or skipped the call turns into an
error instead of a hang.
"""
from __future__ import annotations

import datetime
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.distributed as dist

from .group import group_from_name
from .options import META_NAMES, describe, local_meta
from .schedule import Msg


@dataclass
class Comm:
    group: object
    rank: int
    world: int
    timeout: Optional[datetime.timedelta]

    def fail(self, what: str, e: Exception):
        limit = f" (timeout {self.timeout.total_seconds():g} s)" if self.timeout else ""
        return RuntimeError(
            f"ring_attention: rank {self.rank} of {self.world} failed {what}{limit}: {e}. A peer "
            "rank may have failed, hung or not made the same ring_attention call.")

    def wait(self, works, what: str):
        for w in works:
            try:
                if self.timeout is None:
                    w.wait()
                else:
                    w.wait(self.timeout)
            except RuntimeError as e:
                raise self.fail(f"waiting for {what}", e) from e

    def exchange(self, msgs: Sequence[Msg], payload, alloc):
        """Post this rank's share of one batch; returns (works, [(msg, buffer) received],
        the ops, which keep the send buffers alive)."""
        sends = [m for m in msgs if m.src == self.rank]
        recvs = [m for m in msgs if m.dst == self.rank]
        ordered = sends + recvs if self.rank % 2 == 0 else recvs + sends
        p2p, received = [], []
        for m in ordered:
            tag = m.kind * self.world + m.block
            if m.src == self.rank:
                p2p.append(dist.P2POp(dist.isend, payload(m), group=self.group, tag=tag,
                                      group_peer=m.dst))
            else:
                t = alloc(m)
                received.append((m, t))
                p2p.append(dist.P2POp(dist.irecv, t, group=self.group, tag=tag,
                                      group_peer=m.src))
        try:
            works = dist.batch_isend_irecv(p2p) if p2p else []
        except RuntimeError as e:
            raise self.fail("posting its sends and receives", e) from e
        return works, received, p2p


def make_comm(group_name: str, timeout_s: float) -> Comm:
    group = group_from_name(group_name)
    timeout = datetime.timedelta(seconds=timeout_s) if timeout_s > 0 else None
    return Comm(group, dist.get_rank(group), dist.get_world_size(group), timeout)


def _metadata_device(group) -> torch.device:
    # One backend for every rank whatever its inputs (a rank with CPU tensors in a CUDA run
    # must reach the same all-gather): gloo whenever the group has it.
    backend = str(dist.get_backend(group))
    if "nccl" in backend and "gloo" not in backend:
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def exchange_metadata(q, k, v, alibi, sink_logits, group_name, layout, mode, causal, left,
                      right, sinks, scale, softcap, logn_base, timeout_s, need_grad, arg_error):
    """Exchange and check every rank's metadata; every rank raises the same error on a
    mismatch (nobody is left waiting). Returns (comm, lengths of every rank)."""
    comm = make_comm(group_name, timeout_s)
    error = ValueError(arg_error) if arg_error else None
    n, shared = 0, [0] * len(META_NAMES)
    if error is None:
        try:
            n, shared = local_meta(q, k, v, alibi, sink_logits, layout, mode, causal, left,
                                   right, sinks, scale, softcap, logn_base, need_grad)
        except ValueError as e:
            error = e
    if comm.world == 1:
        if error is not None:
            raise error
        return comm, (n,)
    mine = torch.tensor([int(error is not None), n] + shared, dtype=torch.int64,
                        device=_metadata_device(comm.group))
    everyone = [torch.empty_like(mine) for _ in range(comm.world)]
    work = dist.all_gather(everyone, mine, group=comm.group, async_op=True)
    comm.wait([work], "the metadata exchange at the start of the call")
    table = torch.stack(everyone).cpu().tolist()
    if error is not None:
        raise error
    bad = [r for r in range(comm.world) if table[r][0]]
    if bad:
        raise ValueError(f"ring_attention: rank(s) {bad} rejected their inputs (see the error "
                         "on those ranks)")
    for i, name in enumerate(META_NAMES):
        vals = [row[2 + i] for row in table]
        if any(x != vals[0] for x in vals):
            raise ValueError(f"ring_attention: every rank must pass the same {name}; got "
                             f"{describe(name, vals)} on ranks 0..{comm.world - 1}")
    return comm, tuple(row[1] for row in table)
