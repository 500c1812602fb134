"""Moving K/V and dK/dV between ranks, and turning a failure anywhere into an error everywhere.

Each step posts one ``batch_isend_irecv`` batch (this step's transfers, which overlap this
step's compute) and waits for it at the end of the step. A message is posted in the same step
on both ends, so no step waits on a later one: with non-blocking ops this cannot deadlock.
Within a batch, even ranks post sends first and odd ranks receives first, the usual parity
order, which also keeps a neighbour ring safe on backends where sends block. Messages between
one pair of ranks are posted in one canonical order (and tagged), as gloo and NCCL match them
in order.

Streams (CUDA tensors on NCCL). There is no side stream of ours: ProcessGroupNCCL runs a batch
on its own stream after making it wait for the current stream (so a payload written just
before, the stacked K/V or a dK/dV share, is complete), and the step's kernel calls go on the
current stream, so the two overlap. ``work.wait()`` makes the current stream wait for the
transfers without blocking the host: the step's readers of the received buffers are ordered
after them, and a buffer dropped after the wait is recycled by the caching allocator only for
later work on the current stream, ordered after the transfers as well (ProcessGroupNCCL also
keeps its own references until then). So no record_stream / wait_stream is needed.

Timeouts. gloo (CPU tensors): every wait blocks the host for at most ``timeout``, so a peer
that died or skipped the call becomes an error. NCCL: a timed ``WorkNCCL.wait`` blocks the host
until the transfer is done (torch's ProcessGroupNCCL.hpp), a host sync per hop that would
drain the launch queue. So the hops wait on the stream only, and with a ``timeout`` the pass
ends with one host wait bounded by it (:meth:`Comm.finish`): an event recorded on the current
stream after the last transfer's wait completes only once every transfer of the pass has, so a
hang anywhere in the ring becomes an error there. Without ``timeout`` the process group's
watchdog (its own timeout) catches hangs.

Nothing posted outlives the call. A step's works and their ops live in the Comm only, not in
the pass's frames, and are dropped once waited for: all of them, even after one failed, so a
timeout on one transfer does not leave the others in flight. When the pass raises between
posting a step and waiting for it (its compute failed), :meth:`Comm.settle` waits for that step
before the error leaves the op: the peers posted the matching ops in the same step, so this
ends at once when they are healthy, and is bounded by the timeout when they are not (after a
timeout gloo fails every pending op of the group). An exception's traceback keeps the frames of
the pass alive, possibly until the process exits, and a gloo work kept there would still be
waiting for, or sending from, its buffer while the process group is torn down.

Collectives (the metadata all-gather, mode="allgather") go through :meth:`Comm.collective`,
which on CPU tensors also waits until gloo has released them (release.py): gloo drops a
finished work on a worker thread of its own, and doing so at interpreter shutdown aborts the
process.
"""
from __future__ import annotations

import datetime
import time
from dataclasses import dataclass, field
from typing import Callable, List, Optional, Sequence

import torch
import torch.distributed as dist

from .group import group_from_name
from .options import META_NAMES, describe, local_meta
from .release import python_refs, wait_released
from .schedule import Msg


@dataclass
class Comm:
    group: object
    rank: int
    world: int
    timeout: Optional[datetime.timedelta]
    # The tensors' device when it is a GPU: waits order its current stream, not the host.
    stream_device: Optional[torch.device] = None
    _unchecked: Optional[str] = None   # the latest transfers waited for on the stream only
    _posted: list = field(default_factory=list)   # the works of the step in flight
    _ops: list = field(default_factory=list)      # and its ops (they hold the send payloads)

    def fail(self, what: str, e: Exception):
        limit = f" (timeout {self.timeout.total_seconds():g} s)" if self.timeout else ""
        return RuntimeError(
            f"ring_attention: rank {self.rank} of {self.world} failed {what}{limit}: {e}. A peer "
            "rank may have failed, hung or not made the same ring_attention call.")

    def wait(self, works: List, what: str, *, host: bool = False):
        """Wait for every work in ``works`` (the list is emptied: no reference to a work is
        left behind, not even in a traceback), on the host with the timeout (gloo, or
        ``host``), else on the current stream. After a failure the others are still waited
        for; the first failure is raised."""
        on_stream = self.stream_device is not None and not host
        first = None
        waited = bool(works)
        while works:
            w = works.pop(0)
            try:
                if self.timeout is None or on_stream:
                    w.wait()
                else:
                    w.wait(self.timeout)
            except RuntimeError as e:
                first = first or e
            w = None
        if first is not None:
            try:
                raise self.fail(f"waiting for {what}", first) from first
            finally:
                first = None    # its traceback holds this frame: no cycle (see exchange_metadata)
        if on_stream and waited:
            self._unchecked = what

    def finish(self):
        """End of a pass on a GPU with a timeout: wait on the host, at most ``timeout``, until
        the current stream is past every transfer of the pass (see the module doc)."""
        what, self._unchecked = self._unchecked, None
        if what is None or self.timeout is None:
            return
        done = torch.cuda.Event()
        done.record(torch.cuda.current_stream(self.stream_device))
        deadline = time.monotonic() + self.timeout.total_seconds()
        while not done.query():
            if time.monotonic() > deadline:
                raise self.fail(f"waiting for {what}",
                                TimeoutError("the transfers did not complete in time"))
            time.sleep(1e-4)

    def exchange(self, msgs: Sequence[Msg], payload, alloc):
        """Post this rank's share of one batch; returns [(msg, buffer) received]. Wait for it
        with :meth:`complete` before the next one."""
        assert not self._posted, "ring_attention: internal error, a step was left posted"
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
        # The ops keep the send payloads alive until the step is waited for.
        self._posted, self._ops = list(works), p2p
        return received

    def complete(self, what: str):
        """Wait for the step posted last and let go of its works and ops."""
        try:
            self.wait(self._posted, what)
        finally:
            self._posted, self._ops = [], []

    def settle(self):
        """End of a pass, normal or not: wait for whatever it left posted (it raised between
        :meth:`exchange` and :meth:`complete`) and let go of it. Errors are dropped: the pass's
        own error is the one the caller sees."""
        try:
            self.complete("the transfers of a failed step")
        except RuntimeError:
            pass

    def collective(self, post: Callable, tensors: Sequence[torch.Tensor], what: str, *,
                   host: bool = False):
        """Run one collective over ``tensors`` (every tensor it reads or writes): ``post()``
        starts it and returns its work. Waits as :meth:`wait` does and, on CPU tensors, until
        the backend has released the tensors (release.py)."""
        refs = python_refs(tensors)
        try:
            works = [post()]
        except RuntimeError as e:
            raise self.fail(f"starting {what}", e) from e
        self.wait(works, what, host=host)     # empties works: the work is gone once waited for
        wait_released(tensors, refs, self.timeout.total_seconds() if self.timeout else None)


def make_comm(group_name: str, timeout_s: float, like: torch.Tensor) -> Comm:
    group = group_from_name(group_name)
    timeout = datetime.timedelta(seconds=timeout_s) if timeout_s > 0 else None
    return Comm(group, dist.get_rank(group), dist.get_world_size(group), timeout,
                like.device if like.is_cuda else None)


def _metadata_device(group, q: torch.Tensor) -> torch.device:
    # One backend for every rank whatever its inputs (a rank with CPU tensors in a CUDA run
    # must reach the same all-gather): gloo whenever the group has it.
    backend = str(dist.get_backend(group))
    if "nccl" in backend and "gloo" not in backend:
        # q's device when it is a GPU: the ring's transfers then use the same communicator.
        return q.device if q.is_cuda else torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def exchange_metadata(q, k, v, alibi, sink_logits, group_name, layout, mode, causal, left,
                      right, sinks, scale, softcap, logn_base, timeout_s, need_grad, arg_error):
    """Exchange and check every rank's metadata; every rank raises the same error on a
    mismatch (nobody is left waiting). Returns (comm, lengths of every rank)."""
    comm = make_comm(group_name, timeout_s, q)
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
            try:
                raise error
            finally:
                error = None    # see below
        return comm, (n,)
    mine = torch.tensor([int(error is not None), n] + shared, dtype=torch.int64,
                        device=_metadata_device(comm.group, q))
    everyone = [torch.empty_like(mine) for _ in range(comm.world)]
    # The host needs the table (the lengths shape the schedule): a host wait, once per call.
    comm.collective(lambda: dist.all_gather(everyone, mine, group=comm.group, async_op=True),
                    [mine, *everyone], "the metadata exchange at the start of the call",
                    host=True)
    table = torch.stack(everyone).cpu().tolist()
    if error is not None:
        try:
            raise error
        finally:
            # The traceback holds this frame: with ``error`` still in it, the cycle would keep
            # the frame's tensors and Comm, hence the process group, alive until the cyclic
            # garbage collector runs, possibly only at interpreter shutdown, after
            # destroy_process_group() (see release.py).
            error = None
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
