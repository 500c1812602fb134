"""The mask-aware schedule: which (rank, block) pairs see anything, the kernel calls for them,
and the K/V and dK/dV transfers between ranks.

It is a pure function of the lengths and the mask, so every rank computes the same table and
no rank has to ask another what it needs. A hop whose block is invisible is skipped (no
compute), and so is its transfer: a block is sent straight from the rank that last held it to
the next rank that needs it, never to ranks that would only forward it. Each call is trimmed to
the query and key rows its window/sinks can see, and only the rows of a block that other ranks
read travel. With a causal window of w tokens over contiguous shards of n >= w tokens, rank r
reads only the last w rows of block r-1, so compute and traffic per rank stay those of the
window, whatever W is.

Stripe positions are strided, so each (rank, rank) pair maps to the kernel's unit-stride
positions: with p = a + W*i, s = b + W*j and d = floor((a - b) / W), causal s <= p is
j <= i + d, the window sides become floor((left + b - a) / W) + d and
floor((right + a - b) / W) - d, and the sinks the first ceil((sinks - b) / W) keys. ALiBi and
log-n depend on the raw positions and are not expressible this way (rejected for stripe).
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import NamedTuple, Optional, Sequence, Tuple, Union

from .. import _C
from ..attention import UNBOUNDED, window_bounds
from .layout import Piece, layout_lengths, pieces_for_lengths


class Call(NamedTuple):
    """One kernel call: local q rows [q0, q1) against rows [k0, k1) of a K/V block, with kernel
    positions (unit stride) and the mask translated to them."""
    q0: int
    q1: int
    k0: int
    k1: int
    q_start: int
    k_start: int
    left: int
    right: int
    sinks: int


def _pair_call(qp: Piece, kp: Piece, causal: bool, left: int, right: int,
               sinks: int) -> Optional[Call]:
    """The call for query piece ``qp`` against key piece ``kp``, or None if nothing is visible."""
    if qp.length == 0 or kp.length == 0:
        return None
    S, a, b = qp.stride, qp.start, kp.start
    assert kp.stride == S
    d = (a - b) // S
    if S == 1:
        qs, ks = a, b          # keep absolute positions (ALiBi and log-n read them)
    else:
        qs, ks = max(d, 0), max(-d, 0)
    kl = UNBOUNDED if left >= UNBOUNDED else (left + b - a) // S + d
    kr = UNBOUNDED if right >= UNBOUNDED else (right + a - b) // S - d
    n_sink = max(0, -((b - sinks) // S))          # keys j with b + S*j < sinks
    ksinks = ks + n_sink if n_sink else 0

    # Kernel coordinates from here on. The call covers the hull of the visible pairs, from the
    # mask definition the kernels classify tiles with (common/mask.h), so a narrow window also
    # trims the rows computed, merged and sent.
    hull_ = _C._visible_hull(qs, ks, kl, kr, ksinks, causal, qp.length, kp.length)
    if hull_ is None:
        return None
    q0, q1, k0, k1, band = hull_
    if not band:
        # Only sink keys are visible: attend to them alone with no window, which also avoids
        # an empty (left + right < 0) window in stripe coordinates.
        kl, kr, ksinks = UNBOUNDED, UNBOUNDED, 0
    return Call(qp.offset + q0, qp.offset + q1, kp.offset + k0, kp.offset + k1, qs + q0,
                ks + k0, kl, kr, ksinks)


class Msg(NamedTuple):
    step: int    # the batch it travels in (posted at the start of the step, waited at its end)
    kind: int    # 0: K/V rows of a block, 1: a user's fp32 dK/dV share of them, back to the owner
    block: int   # owner rank of the block
    src: int
    dst: int
    lo: int      # the block rows [lo, hi) it carries
    hi: int


def hull(calls: Sequence[Call]) -> Tuple[int, int]:
    return min(c.k0 for c in calls), max(c.k1 for c in calls)


@dataclass(frozen=True)
class RingPlan:
    """The schedule every rank derives from the lengths and the mask.

    ``calls[r][o]``: kernel calls of rank r against block o (empty: hop skipped).
    ``fwd_msgs`` / ``bwd_msgs``: all transfers, forward and backward, with the rows they carry.
    """
    world_size: int
    lengths: Tuple[int, ...]
    calls: Tuple[Tuple[Tuple[Call, ...], ...], ...]
    fwd_msgs: Tuple[Msg, ...]
    bwd_msgs: Tuple[Msg, ...]

    @property
    def hops(self) -> int:
        """(rank, block) pairs of a full ring, the own block included: W * W."""
        return self.world_size ** 2

    @property
    def computed_hops(self) -> int:
        return sum(1 for row in self.calls for c in row if c)

    @property
    def skipped_hop_fraction(self) -> float:
        return 1.0 - self.computed_hops / self.hops

    @property
    def transfers(self) -> int:
        """K/V block transfers in the forward (a full ring makes W * (W - 1))."""
        return len(self.fwd_msgs)

    @property
    def skipped_transfer_fraction(self) -> float:
        full = self.world_size * (self.world_size - 1)
        return 1.0 - self.transfers / full if full else 0.0

    @property
    def traffic_fraction(self) -> float:
        """K/V rows sent in the forward over those of a full ring ((W - 1) * L)."""
        full = (self.world_size - 1) * sum(self.lengths)
        sent = sum(m.hi - m.lo for m in self.fwd_msgs)
        return sent / full if full else 0.0

    def need(self, rank: int, block: int) -> bool:
        return bool(self.calls[rank][block])


@lru_cache(maxsize=256)
def make_plan(layout: str, lengths: Tuple[int, ...], causal: bool, left: int, right: int,
              sinks: int) -> RingPlan:
    pieces = pieces_for_lengths(layout, lengths)
    W = len(lengths)
    calls = tuple(
        tuple(tuple(c for qp in pieces[r] for kp in pieces[o]
                    if (c := _pair_call(qp, kp, causal, left, right, sinks)) is not None)
              for o in range(W))
        for r in range(W))
    fwd, bwd = [], []
    for o in range(W):
        # Hops (ring distance from the owner) at which block o is used, the owner excluded.
        users = [h for h in range(1, W) if calls[(o + h) % W][o]]
        reads = [hull(calls[(o + h) % W][o]) for h in users]
        prev = 0
        for i, h in enumerate(users):
            # K/V from the last holder straight to the next user, landing for step h, with the
            # rows this user and the later ones read (a lambda mask's sink rows go on alone).
            lo, hi = min(a for a, _ in reads[i:]), max(b for _, b in reads[i:])
            m = Msg(h - 1, 0, o, (o + prev) % W, (o + h) % W, lo, hi)
            fwd.append(m)
            bwd.append(m)
            # The user's dK/dV share of the rows it read goes home once its step is done.
            # Straight home rather than accumulated along the chain: a chain carries the hull
            # of all earlier users' rows, which for sinks is the whole block.
            bwd.append(Msg(h + 1, 1, o, (o + h) % W, o, *reads[i]))
            prev = h
    key = lambda m: (m.step, m.kind, m.block)  # noqa: E731  (the canonical posting order)
    return RingPlan(W, lengths, calls, tuple(sorted(fwd, key=key)), tuple(sorted(bwd, key=key)))


def plan(lengths: Union[int, Sequence[int]], world_size: Optional[int] = None,
         layout: str = "zigzag", *, causal: bool = False, window=None, sinks: int = 0) -> RingPlan:
    """The mask-aware schedule for a sequence (its length, with ``world_size``, or the local
    lengths of every rank). Useful to see how many hops and transfers a mask skips."""
    if isinstance(lengths, int):
        if world_size is None:
            raise ValueError("plan(seq_len, world_size, ...) needs world_size")
        lengths = layout_lengths(lengths, world_size, layout)
    left, right = window_bounds(window)
    return make_plan(layout, tuple(int(n) for n in lengths), bool(causal), left, right,
                     int(sinks))
