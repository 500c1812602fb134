"""Ring attention (context parallelism) over torch.distributed.

Every rank holds a shard of one sequence (q, k and v alike). K/V blocks travel between ranks
while each rank attends its queries to the block it holds; partial results merge by
log-sum-exp (docs/semantics.md, "Merge"). The kernel is called per (query piece, key piece)
with the pieces' global positions, so causal, window and sink masks are exact across shards.

Public: :func:`ring_attention`, :func:`shard`, :func:`unshard`, :func:`shard_positions`,
:func:`layout_lengths`, :func:`plan` (the schedule, to see what a mask skips), ``RingPlan``,
``LAYOUTS``, ``MODES``. The modules, from the bottom up:

    group       the process group of a call, this rank's place in it
    release     collectives return only once gloo has released their tensors (teardown)
    layout      the layouts (contiguous, zigzag, stripe): pieces and positions, shard/unshard
    schedule    the mask-aware plan: kernel calls per (rank, block), skipped hops, transfers
    options     argument checks and the metadata every rank must agree on
    comm        batch_isend_irecv steps, parity order, timeouts, streams, metadata exchange
    compute     the per-call kernel and the fp32 log-sum-exp merge
    ring_mode   mode="ring": forward and backward with K/V travelling rank to rank
    allgather   mode="allgather": K/V gathered once, then local attention
    ops         the custom ops (longattn::ring_attention and its backward), fake kernels,
                autograd
    api         ring_attention()
"""
from __future__ import annotations

from .api import ring_attention
from .layout import LAYOUTS, layout_lengths, shard, shard_positions, unshard
from .options import MODES
from .schedule import RingPlan, plan

__all__ = ["ring_attention", "shard", "unshard", "shard_positions", "layout_lengths", "plan",
           "RingPlan", "LAYOUTS", "MODES"]
