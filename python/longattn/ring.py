"""Ring attention (context parallelism) over torch.distributed.

Every rank holds a shard of one sequence (q, k and v alike). K/V blocks travel between ranks
while each rank attends its queries to the block it holds; partial results merge by
log-sum-exp (docs/semantics.md, "Merge"). The kernel is called per (query piece, key piece)
with the pieces' global positions, so causal, window and sink masks are exact across shards.

Layouts (how the global sequence of length L is split over W ranks):
    contiguous  rank r holds one run of tokens; runs may have any lengths (an uneven split is
                fine), in rank order.
    zigzag      L is cut into 2W chunks (sizes as torch.tensor_split); rank r holds chunks r and
                2W-1-r. Balances causal work: every rank gets one early and one late chunk.
    stripe      token t lives on rank t mod W. Positions are strided, so each (rank, rank) pair
                maps to the kernel's unit-stride positions: with p = a + W*i, s = b + W*j and
                d = floor((a - b) / W), causal s <= p is j <= i + d, the window sides become
                floor((left + b - a) / W) + d and floor((right + a - b) / W) - d, and the sinks
                the first ceil((sinks - b) / W) keys. ALiBi and log-n depend on the raw
                positions and are not expressible this way (rejected for stripe).

Schedule. Which (rank, block) pairs see anything is a pure function of the lengths and the
mask, so every rank computes the same table (:func:`plan`). A hop whose block is invisible is
skipped (no compute), and so is its transfer: a block is sent straight from the rank that last
held it to the next rank that needs it, never to ranks that would only forward it. Each call is
trimmed to the query and key rows its window/sinks can see, and only the rows of a block that
other ranks read travel. With a causal window of w tokens over contiguous shards of n >= w
tokens, rank r reads only the last w rows of block r-1, so compute and traffic per rank stay
those of the window, whatever W is.

Backward. Standard ring-attention backward: the block gradient with the *global* out and lse of
the rows (P = exp(S - lse)) is the block's exact share of dq, dk, dv (delta = rowsum(dO * O) -
dlse). K/V travel the same route again; each user sends its fp32 dK/dV share of the rows it read
straight back to the owner in the next step (one message in and one out per rank and step, as
with an accumulator passed along the ring, but never wider than what that user read); dq
accumulates locally.

Communication. Each step posts one ``batch_isend_irecv`` batch (this step's transfers, which
overlap this step's compute) and waits for it at the end of the step. A message is posted in
the same step on both ends, so no step waits on a later one: with non-blocking ops this cannot
deadlock. Within a batch, even ranks post sends first and odd ranks receives first, the usual
parity order, which also keeps a neighbour ring safe on backends where sends block. Messages
between one pair of ranks are posted in one canonical order (and tagged), as gloo and NCCL
match them in order. Every wait takes ``timeout``, so a peer that died or skipped the call
turns into an error instead of a hang.

The whole distributed forward and backward are two custom ops (``longattn::ring_attention``,
``longattn::ring_attention_backward``) with fake kernels and registered autograd, so
``torch.compile`` sees one opaque node per call and no graph break.
"""
from __future__ import annotations

import datetime
import math
import struct
from dataclasses import dataclass
from functools import lru_cache
from typing import List, NamedTuple, Optional, Sequence, Tuple, Union

import torch
import torch.distributed as dist

from . import _ops  # noqa: F401  (registers the attention ops' fake kernels)
from .attention import UNBOUNDED, window_bounds

ops = torch.ops.longattn

LAYOUTS = ("contiguous", "zigzag", "stripe")
MODES = ("ring", "allgather")
_NEG_INF = float("-inf")


# ----------------------------------------------------------------------------------------------
# Layout geometry
# ----------------------------------------------------------------------------------------------

class Piece(NamedTuple):
    """A run of local rows whose global positions are ``start + stride * i``."""
    offset: int   # first local row
    length: int
    start: int    # global position of the first row
    stride: int


def _split(n: int, parts: int) -> List[int]:
    # torch.tensor_split's sizes: the first n % parts parts get one extra element.
    return [n // parts + (1 if i < n % parts else 0) for i in range(parts)]


def _layout_pieces(layout: str, seq_len: int, world: int) -> Tuple[Tuple[Piece, ...], ...]:
    """Pieces of every rank for the canonical split of ``seq_len`` tokens (what :func:`shard`
    produces)."""
    if layout == "contiguous":
        sizes = _split(seq_len, world)
        starts = [sum(sizes[:r]) for r in range(world)]
        return tuple((Piece(0, sizes[r], starts[r], 1),) for r in range(world))
    if layout == "zigzag":
        sizes = _split(seq_len, 2 * world)
        starts = [sum(sizes[:c]) for c in range(2 * world)]
        out = []
        for r in range(world):
            late = 2 * world - 1 - r
            out.append((Piece(0, sizes[r], starts[r], 1),
                        Piece(sizes[r], sizes[late], starts[late], 1)))
        return tuple(out)
    if layout == "stripe":
        return tuple((Piece(0, len(range(r, seq_len, world)), r, world),) for r in range(world))
    raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")


def layout_lengths(seq_len: int, world_size: int, layout: str = "zigzag") -> List[int]:
    """Local shard lengths of every rank when :func:`shard` splits ``seq_len`` tokens."""
    return [sum(p.length for p in ps) for ps in _layout_pieces(layout, seq_len, world_size)]


def _coalesce(pieces: Tuple[Piece, ...]) -> Tuple[Piece, ...]:
    """Join pieces that continue each other (zigzag on one rank is one run): fewer calls."""
    out = []
    for p in pieces:
        if p.length == 0:
            continue
        if out and out[-1].stride == p.stride == 1 and out[-1].offset + out[-1].length == \
                p.offset and out[-1].start + out[-1].length == p.start:
            last = out.pop()
            p = Piece(last.offset, last.length + p.length, last.start, 1)
        out.append(p)
    return tuple(out)


@lru_cache(maxsize=256)
def _pieces_for_lengths(layout: str, lengths: Tuple[int, ...]) -> Tuple[Tuple[Piece, ...], ...]:
    """Pieces of every rank given the gathered local lengths; raises if they do not form the
    layout."""
    world, total = len(lengths), sum(lengths)
    if layout == "contiguous":
        # Any split works: positions are the prefix sums.
        starts = [sum(lengths[:r]) for r in range(world)]
        return tuple((Piece(0, lengths[r], starts[r], 1),) for r in range(world))
    pieces = tuple(_coalesce(ps) for ps in _layout_pieces(layout, total, world))
    expected = tuple(sum(p.length for p in ps) for ps in pieces)
    if expected != lengths:
        raise ValueError(
            f"ring_attention: the local sequence lengths {list(lengths)} of ranks 0..{world - 1} "
            f"do not form a {layout} split of a {total}-token sequence, which needs "
            f"{list(expected)} (shards of equal length up to one token, sized as "
            f"torch.tensor_split; use longattn.ring.shard to cut the sequence)")
    return pieces


def shard_positions(seq_len: int, layout: str = "zigzag", rank: int = 0, world_size: int = 1,
                    device=None) -> torch.Tensor:
    """Global positions (int64) of rank ``rank``'s local tokens: use them for RoPE on shards."""
    pieces = _layout_pieces(layout, seq_len, world_size)[rank]
    idx = [torch.arange(p.start, p.start + p.stride * p.length, p.stride, dtype=torch.int64,
                        device=device) for p in pieces]
    return torch.cat(idx) if len(idx) > 1 else idx[0]


def _rank_world(group, rank, world_size):
    if rank is not None and world_size is not None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, {world_size}), got {rank}")
        return rank, world_size
    group = _resolve_group(group)
    return dist.get_rank(group), dist.get_world_size(group)


def shard(x: torch.Tensor, group=None, layout: str = "zigzag", seq_dim: int = 1, *,
          rank: Optional[int] = None, world_size: Optional[int] = None) -> torch.Tensor:
    """This rank's shard of the full sequence ``x`` along ``seq_dim`` (a differentiable copy).

    ``rank``/``world_size`` override the group's (no process group needed then). Any length
    works: shards differ by at most one token per chunk (torch.tensor_split sizes).
    """
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    r, w = _rank_world(group, rank, world_size)
    idx = shard_positions(x.shape[seq_dim], layout, r, w, device=x.device)
    return x.index_select(seq_dim, idx)


def unshard(x_local: torch.Tensor, group=None, layout: str = "zigzag",
            seq_dim: int = 1) -> torch.Tensor:
    """The full sequence from every rank's shard (an all-gather; not differentiable)."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    group = _resolve_group(group)
    world = dist.get_world_size(group)
    seq_dim = seq_dim % x_local.dim()
    n = x_local.shape[seq_dim]
    lens_t = [torch.zeros(1, dtype=torch.int64, device=x_local.device) for _ in range(world)]
    dist.all_gather(lens_t, torch.tensor([n], dtype=torch.int64, device=x_local.device),
                    group=group)
    lengths = tuple(int(t.item()) for t in lens_t)
    pieces = _pieces_for_lengths(layout, lengths)
    n_max = max(lengths)
    pad = list(x_local.shape)
    pad[seq_dim] = n_max
    buf = x_local.new_zeros(pad)
    buf.narrow(seq_dim, 0, n).copy_(x_local)
    gathered = [torch.empty_like(buf) for _ in range(world)]
    dist.all_gather(gathered, buf.contiguous(), group=group)
    full = list(x_local.shape)
    full[seq_dim] = sum(lengths)
    out = x_local.new_empty(full)
    for r in range(world):
        for p in pieces[r]:
            if p.length == 0:
                continue
            pos = torch.arange(p.start, p.start + p.stride * p.length, p.stride,
                               device=x_local.device)
            out.index_copy_(seq_dim, pos, gathered[r].narrow(seq_dim, p.offset, p.length))
    return out


# ----------------------------------------------------------------------------------------------
# Mask-aware schedule
# ----------------------------------------------------------------------------------------------

class _Call(NamedTuple):
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
               sinks: int) -> Optional[_Call]:
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

    # Kernel coordinates from here on. Spans (q first, q last, k first, k last) of what the
    # window and the sinks make visible; the call covers their hull, so a narrow window also
    # trims the rows computed, merged and sent.
    p0, p1 = qs, qs + qp.length - 1
    s0, s1 = ks, ks + kp.length - 1
    r_eff = min(kr, 0) if causal else kr
    window_span = None
    if kl + r_eff >= 0:
        wq0, wq1 = max(p0, s0 - r_eff), min(p1, s1 + kl)
        if wq0 <= wq1:
            window_span = (wq0, wq1, max(s0, wq0 - kl), min(s1, wq1 + r_eff))
    sink_span = None
    if n_sink > 0 and (not causal or s0 <= p1):
        last_sink = min(s1, ksinks - 1, p1 if causal else s1)
        sink_span = (max(p0, s0) if causal else p0, p1, s0, last_sink)
    if window_span is None and sink_span is None:
        return None
    if window_span is None:
        # Only sink keys are visible: attend to them alone with no window, which also avoids
        # an empty (left + right < 0) window in stripe coordinates.
        spans, kl, kr, ksinks = [sink_span], UNBOUNDED, UNBOUNDED, 0
    else:
        spans = [sp for sp in (window_span, sink_span) if sp is not None]
    qlo, qhi = min(sp[0] for sp in spans), max(sp[1] for sp in spans)
    klo, khi = min(sp[2] for sp in spans), max(sp[3] for sp in spans)
    return _Call(qp.offset + qlo - qs, qp.offset + qhi - qs + 1, kp.offset + klo - ks,
                 kp.offset + khi - ks + 1, qlo, klo, kl, kr, ksinks)


class _Msg(NamedTuple):
    step: int    # the batch it travels in (posted at the start of the step, waited at its end)
    kind: int    # 0: K/V rows of a block, 1: a user's fp32 dK/dV share of them, back to the owner
    block: int   # owner rank of the block
    src: int
    dst: int
    lo: int      # the block rows [lo, hi) it carries
    hi: int


def _hull(calls: Sequence[_Call]) -> Tuple[int, int]:
    return min(c.k0 for c in calls), max(c.k1 for c in calls)


@dataclass(frozen=True)
class RingPlan:
    """The schedule every rank derives from the lengths and the mask.

    ``calls[r][o]``: kernel calls of rank r against block o (empty: hop skipped).
    ``fwd_msgs`` / ``bwd_msgs``: all transfers, forward and backward, with the rows they carry.
    """
    world_size: int
    lengths: Tuple[int, ...]
    calls: Tuple[Tuple[Tuple[_Call, ...], ...], ...]
    fwd_msgs: Tuple[_Msg, ...]
    bwd_msgs: Tuple[_Msg, ...]

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
def _make_plan(layout: str, lengths: Tuple[int, ...], causal: bool, left: int, right: int,
               sinks: int) -> RingPlan:
    pieces = _pieces_for_lengths(layout, lengths)
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
        reads = [_hull(calls[(o + h) % W][o]) for h in users]
        prev = 0
        for i, h in enumerate(users):
            # K/V from the last holder straight to the next user, landing for step h, with the
            # rows this user and the later ones read (a lambda mask's sink rows go on alone).
            lo, hi = min(a for a, _ in reads[i:]), max(b for _, b in reads[i:])
            m = _Msg(h - 1, 0, o, (o + prev) % W, (o + h) % W, lo, hi)
            fwd.append(m)
            bwd.append(m)
            # The user's dK/dV share of the rows it read goes home once its step is done.
            # Straight home rather than accumulated along the chain: a chain carries the hull
            # of all earlier users' rows, which for sinks is the whole block.
            bwd.append(_Msg(h + 1, 1, o, (o + h) % W, o, *reads[i]))
            prev = h
    key = lambda m: (m.step, m.kind, m.block)  # noqa: E731  (the canonical posting order)
    return RingPlan(W, lengths, calls, tuple(sorted(fwd, key=key)), tuple(sorted(bwd, key=key)))


def plan(lengths: Union[int, Sequence[int]], world_size: Optional[int] = None,
         layout: str = "zigzag", *, causal: bool = True, window=None, sinks: int = 0) -> RingPlan:
    """The mask-aware schedule for a sequence (its length, with ``world_size``, or the local
    lengths of every rank). Useful to see how many hops and transfers a mask skips."""
    if isinstance(lengths, int):
        if world_size is None:
            raise ValueError("plan(seq_len, world_size, ...) needs world_size")
        lengths = layout_lengths(lengths, world_size, layout)
    left, right = window_bounds(window)
    return _make_plan(layout, tuple(int(n) for n in lengths), bool(causal), left, right,
                      int(sinks))


# ----------------------------------------------------------------------------------------------
# Process group, metadata check, communication
# ----------------------------------------------------------------------------------------------

def _resolve_group(group):
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(
            "longattn ring attention needs an initialized torch.distributed process group: call "
            "torch.distributed.init_process_group(...) first (world size 1 is fine)")
    return dist.group.WORLD if group is None else group


def _group_from_name(name: str):
    from torch.distributed.distributed_c10d import _resolve_process_group
    return _resolve_process_group(name)


@dataclass
class _Comm:
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

    def exchange(self, msgs: Sequence[_Msg], payload, alloc):
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


_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
_META_NAMES = ("batch", "heads_q", "heads_kv", "head_dim", "dtype", "device type", "layout",
               "mode", "causal", "window left", "window right", "sinks", "scale", "softcap",
               "logn_base", "alibi_slopes given", "sink_logits given", "requires_grad")


def _f64_bits(x: float) -> int:
    return struct.unpack("<q", struct.pack("<d", float(x)))[0]


def _local_meta(q, k, v, alibi, sink_logits, layout, mode, causal, left, right, sinks, scale,
                softcap, logn_base, need_grad) -> Tuple[int, List[int]]:
    """Checks what a rank can check alone; returns (local length, the values all ranks must
    share). Raises ValueError."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != 4:
            raise ValueError(f"ring_attention: {name} must be (batch, local_seqlen, heads, "
                             f"head_dim), got shape {tuple(t.shape)}")
        if t.dtype not in _DTYPES:
            raise ValueError(f"ring_attention: {name} must be float32, float64, bfloat16 or "
                             f"float16, got {t.dtype}")
        if t.dtype != q.dtype or t.device != q.device:
            raise ValueError(f"ring_attention: q, k and v must share dtype and device; {name} "
                             f"is {t.dtype} on {t.device}, q is {q.dtype} on {q.device}")
    if k.shape != v.shape:
        raise ValueError(f"ring_attention: k and v must have one shape, got {tuple(k.shape)} "
                         f"and {tuple(v.shape)}")
    B, n, H, D = q.shape
    if k.shape[0] != B or k.shape[1] != n or k.shape[3] != D:
        raise ValueError(f"ring_attention: k/v {tuple(k.shape)} must match q {tuple(q.shape)} in "
                         "batch, local length (q, k and v are shards of one sequence) and "
                         "head_dim")
    if k.shape[2] < 1 or H % k.shape[2]:
        raise ValueError(f"ring_attention: q heads ({H}) must be a multiple of k/v heads "
                         f"({k.shape[2]})")
    if not 1 <= D <= 256:
        raise ValueError(f"ring_attention: head_dim must be in [1, 256], got {D}")
    for name, t in (("alibi_slopes", alibi), ("sink_logits", sink_logits)):
        # fp64 sink logits are fine with fp64 q (as longattn.attention allows, for gradcheck)
        ok = (torch.float32, torch.float64) if name == "sink_logits" and \
            q.dtype == torch.float64 else (torch.float32,)
        if t is not None and (t.dtype not in ok or tuple(t.shape) != (H,)
                              or t.device != q.device):
            raise ValueError(f"ring_attention: {name} must be float32 (or float64 sink_logits "
                             f"with float64 q) of shape ({H},) on q's device, got {t.dtype} "
                             f"{tuple(t.shape)} on {t.device}")
    if layout == "stripe" and (alibi is not None or logn_base):
        raise ValueError("ring_attention: alibi_slopes and logn_base read absolute positions "
                         "and are not supported with layout='stripe' (use 'zigzag' or "
                         "'contiguous')")
    dev = {"cpu": 0, "cuda": 1}.get(q.device.type, 2)
    shared = [B, H, k.shape[2], D, _DTYPES.index(q.dtype), dev, LAYOUTS.index(layout),
              MODES.index(mode), int(causal), left, right, sinks, _f64_bits(scale),
              _f64_bits(softcap), _f64_bits(logn_base), int(alibi is not None),
              int(sink_logits is not None), int(need_grad)]
    return n, shared


def _setup(q, k, v, alibi, sink_logits, group_name, layout, mode, causal, left, right, sinks,
           scale, softcap, logn_base, timeout_s, need_grad, arg_error):
    """Resolve the group, exchange and check metadata; every rank raises the same error on a
    mismatch (nobody is left waiting). Returns (comm, lengths)."""
    group = _group_from_name(group_name)
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    timeout = datetime.timedelta(seconds=timeout_s) if timeout_s > 0 else None
    comm = _Comm(group, rank, world, timeout)
    error = ValueError(arg_error) if arg_error else None
    n, shared = 0, [0] * len(_META_NAMES)
    if error is None:
        try:
            n, shared = _local_meta(q, k, v, alibi, sink_logits, layout, mode, causal, left,
                                    right, sinks, scale, softcap, logn_base, need_grad)
        except ValueError as e:
            error = e
    if world == 1:
        if error is not None:
            raise error
        return comm, (n,)
    backend = str(dist.get_backend(group))
    meta_dev = (torch.device("cuda", torch.cuda.current_device())
                if "nccl" in backend and "gloo" not in backend else torch.device("cpu"))
    mine = torch.tensor([int(error is not None), n] + shared, dtype=torch.int64, device=meta_dev)
    everyone = [torch.empty_like(mine) for _ in range(world)]
    work = dist.all_gather(everyone, mine, group=group, async_op=True)
    comm.wait([work], "the metadata exchange at the start of the call")
    table = torch.stack(everyone).cpu().tolist()
    if error is not None:
        raise error
    bad = [r for r in range(world) if table[r][0]]
    if bad:
        raise ValueError(f"ring_attention: rank(s) {bad} rejected their inputs (see the error "
                         "on those ranks)")
    for i, name in enumerate(_META_NAMES):
        vals = [row[2 + i] for row in table]
        if any(x != vals[0] for x in vals):
            if name == "dtype":
                vals = [str(_DTYPES[x]) for x in vals]
            elif name == "device type":
                vals = [("cpu", "cuda", "other")[x] for x in vals]
            raise ValueError(f"ring_attention: every rank must pass the same {name}; got "
                             f"{vals} on ranks 0..{world - 1}")
    return comm, tuple(row[1] for row in table)


# ----------------------------------------------------------------------------------------------
# Forward and backward passes (the bodies of the custom ops)
# ----------------------------------------------------------------------------------------------

@dataclass
class _Kernel:
    causal: bool
    scale: float
    softcap: float
    logn_base: float
    alibi: Optional[torch.Tensor]

    def fwd(self, q, k, v, c: _Call):
        return ops.attention(q, k, v, None, None, self.alibi, None, self.scale, self.softcap,
                             self.logn_base, self.causal, c.left, c.right, c.sinks, c.q_start,
                             c.k_start, q.shape[1], k.shape[1])

    def bwd(self, dout, dlse, q, k, v, out, lse, c: _Call):
        return ops.attention_backward(dout, dlse, q, k, v, out, lse, None, None, self.alibi,
                                      None, self.scale, self.softcap, self.logn_base, self.causal,
                                      c.left, c.right, c.sinks, c.q_start, c.k_start,
                                      q.shape[1], k.shape[1])


def _acc_dtype(q: torch.Tensor) -> torch.dtype:
    return torch.float64 if q.dtype == torch.float64 else torch.float32


class _Accumulator:
    """Running (out, lse) of the local queries, merged call by call in fp32 (fp64 for fp64)."""

    def __init__(self, q: torch.Tensor):
        B, n, H, D = q.shape
        self.dtype = _acc_dtype(q)
        self.out = torch.zeros(B, n, H, D, dtype=self.dtype, device=q.device)
        self.lse = torch.full((B, H, n), _NEG_INF, dtype=self.dtype, device=q.device)
        self.written = []     # row spans merged so far (host-side: the test never syncs a GPU)

    def add(self, q0: int, q1: int, out: torch.Tensor, lse: torch.Tensor):
        first = not any(a < q1 and q0 < b for a, b in self.written)
        self.written.append((q0, q1))
        if first:                      # first contribution to these rows: a copy
            self.out[:, q0:q1] = out
            self.lse[:, :, q0:q1] = lse
            return
        acc_out, acc_lse = self.out[:, q0:q1], self.lse[:, :, q0:q1]
        lse = lse.to(self.dtype)
        new = torch.logaddexp(acc_lse, lse)
        # Rows still empty on both sides stay (0, -inf): shift by 0 there instead of -inf - -inf.
        ref = new.masked_fill(new == _NEG_INF, 0.0)
        w_acc = torch.exp(acc_lse - ref).transpose(1, 2).unsqueeze(-1)
        w_new = torch.exp(lse - ref).transpose(1, 2).unsqueeze(-1)
        acc_out.mul_(w_acc).add_(out.to(self.dtype) * w_new)
        acc_lse.copy_(new)


class _Blocks:
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

    def payload(self, m: _Msg):
        """Rows [m.lo, m.hi) of the block as one contiguous K/V message."""
        if m.block == self.rank:      # the owner sends once: the one copy it makes
            return torch.stack([self.k[:, m.lo:m.hi], self.v[:, m.lo:m.hi]])
        buf, lo, hi = self.bufs[m.block]
        if (lo, hi) == (m.lo, m.hi):
            return buf
        return buf[:, :, m.lo - lo:m.hi - lo].contiguous()

    def receive(self, m: _Msg, buf):
        self.bufs[m.block] = (buf, m.lo, m.hi)
        self.held[m.block] = (buf[0], buf[1], m.lo)

    def rows(self, block, c: _Call):
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


def _alloc(m: _Msg, like: torch.Tensor, dtype: torch.dtype):
    return torch.empty((2, like.shape[0], m.hi - m.lo) + tuple(like.shape[2:]), dtype=dtype,
                       device=like.device)


def _ring_forward(comm: _Comm, plan_: RingPlan, kern: _Kernel, q, k, v):
    r, W = comm.rank, comm.world
    acc = _Accumulator(q)
    blocks = _Blocks(plan_, r, k, v, plan_.fwd_msgs)
    by_step = _by_step(plan_.fwd_msgs, W)
    for h in range(W):
        works, received, keep = comm.exchange(by_step[h], blocks.payload,
                                              lambda m: _alloc(m, k, k.dtype))
        o = (r - h) % W
        for c in plan_.calls[r][o]:
            out, lse = kern.fwd(q[:, c.q0:c.q1], *blocks.rows(o, c), c)
            acc.add(c.q0, c.q1, out, lse)
        comm.wait(works, f"K/V blocks of step {h + 1} of {W}")
        del keep
        for m, t in received:
            blocks.receive(m, t)
        blocks.release(h)
    return acc.out, acc.lse


def _ring_backward(comm: _Comm, plan_: RingPlan, kern: _Kernel, dout, dlse, q, k, v, out, lse):
    r, W = comm.rank, comm.world
    adt = _acc_dtype(q)
    dq = torch.zeros(q.shape, dtype=adt, device=q.device)
    dkv_own = torch.zeros((2,) + tuple(k.shape), dtype=adt, device=k.device)
    blocks = _Blocks(plan_, r, k, v, plan_.bwd_msgs)
    pending = {}  # block -> this rank's dK/dV share of the rows it read, sent home next step

    def payload(m):
        return blocks.payload(m) if m.kind == 0 else pending[m.block]

    def alloc(m):
        return _alloc(m, k, k.dtype if m.kind == 0 else adt)

    by_step = _by_step(plan_.bwd_msgs, W)
    for h in range(W + 1):
        works, received, keep = comm.exchange(by_step[h], payload, alloc)
        o = (r - h) % W
        if h < W and plan_.calls[r][o]:
            calls = plan_.calls[r][o]
            if h == 0:
                dkv, base = dkv_own, 0
            else:
                base, hi = _hull(calls)
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
        comm.wait(works, what)
        del keep
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


def _gather_blocks(comm: _Comm, plan_: RingPlan, k, v):
    """All-gather mode: every rank's K/V (padded to the longest shard, then cut back)."""
    kv = torch.stack([k, v])
    n_max = max(plan_.lengths)
    if kv.shape[2] < n_max:
        kv = torch.cat([kv, kv.new_zeros(kv.shape[:2] + (n_max - kv.shape[2],) + kv.shape[3:])],
                       dim=2)
    gathered = [torch.empty_like(kv) for _ in range(comm.world)]
    work = dist.all_gather(gathered, kv.contiguous(), group=comm.group, async_op=True)
    comm.wait([work], "the K/V all-gather")
    return [g[:, :, :n] for g, n in zip(gathered, plan_.lengths)]


def _allgather_forward(comm, plan_, kern, q, k, v):
    r = comm.rank
    blocks = _gather_blocks(comm, plan_, k, v) if comm.world > 1 else [torch.stack([k, v])]
    acc = _Accumulator(q)
    for o, kv in enumerate(blocks):
        for c in plan_.calls[r][o]:
            out, lse = kern.fwd(q[:, c.q0:c.q1], kv[0, :, c.k0:c.k1], kv[1, :, c.k0:c.k1], c)
            acc.add(c.q0, c.q1, out, lse)
    return acc.out, acc.lse


def _allgather_backward(comm, plan_, kern, dout, dlse, q, k, v, out, lse):
    r, W = comm.rank, comm.world
    blocks = _gather_blocks(comm, plan_, k, v) if W > 1 else [torch.stack([k, v])]
    adt = _acc_dtype(q)
    n_max = max(plan_.lengths)
    dq = torch.zeros(q.shape, dtype=adt, device=q.device)
    dkv = torch.zeros((W, 2, k.shape[0], n_max) + tuple(k.shape[2:]), dtype=adt, device=k.device)
    for o, kv in enumerate(blocks):
        for c in plan_.calls[r][o]:
            dl_c = None if dlse is None else dlse[:, :, c.q0:c.q1]
            dq_c, dk_c, dv_c, _ = kern.bwd(dout[:, c.q0:c.q1], dl_c, q[:, c.q0:c.q1],
                                           kv[0, :, c.k0:c.k1], kv[1, :, c.k0:c.k1],
                                           out[:, c.q0:c.q1], lse[:, :, c.q0:c.q1], c)
            dq[:, c.q0:c.q1] += dq_c
            dkv[o, 0, :, c.k0:c.k1] += dk_c
            dkv[o, 1, :, c.k0:c.k1] += dv_c
    if W > 1:
        if "nccl" in str(dist.get_backend(comm.group)):
            mine = torch.empty_like(dkv[0])
            work = dist.reduce_scatter_tensor(mine, dkv, group=comm.group, async_op=True)
        else:
            # gloo has no reduce-scatter: all-reduce and keep this rank's slot (W x the traffic;
            # this mode is meant for small W).
            mine, work = None, dist.all_reduce(dkv, group=comm.group, async_op=True)
        comm.wait([work], "the dK/dV reduction")
        if mine is None:
            mine = dkv[r]
    else:
        mine = dkv[0]
    n = k.shape[1]
    return (dq.to(q.dtype), mine[0, :, :n].to(k.dtype, copy=True),
            mine[1, :, :n].to(v.dtype, copy=True))


# ----------------------------------------------------------------------------------------------
# Custom ops and autograd
# ----------------------------------------------------------------------------------------------

def _state(q, k, v, alibi, sink_logits, group_name, layout, mode, causal, left, right, sinks,
           scale, softcap, logn_base, timeout_s, lengths=None, need_grad=False, arg_error=""):
    if lengths is None:
        comm, lengths = _setup(q, k, v, alibi, sink_logits, group_name, layout, mode, causal,
                               left, right, sinks, scale, softcap, logn_base, timeout_s,
                               need_grad, arg_error)
    else:
        group = _group_from_name(group_name)
        comm = _Comm(group, dist.get_rank(group), dist.get_world_size(group),
                     datetime.timedelta(seconds=timeout_s) if timeout_s > 0 else None)
    plan_ = _make_plan(layout, tuple(lengths), causal, left, right, sinks)
    kern = _Kernel(causal, scale, softcap, logn_base, alibi)
    return comm, plan_, kern


@torch.library.custom_op("longattn::ring_attention", mutates_args=())
def _ring_attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                       alibi_slopes: Optional[torch.Tensor],
                       sink_logits: Optional[torch.Tensor], group_name: str, layout: str,
                       mode: str, causal: bool, window_left: int, window_right: int, sinks: int,
                       scale: float, softcap: float, logn_base: float, timeout_s: float,
                       need_grad: bool, arg_error: str
                       ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    comm, plan_, kern = _state(q, k, v, alibi_slopes, sink_logits, group_name, layout, mode,
                               causal, window_left, window_right, sinks, scale, softcap,
                               logn_base, timeout_s, None, need_grad, arg_error)
    with torch.no_grad():
        fn = _ring_forward if mode == "ring" else _allgather_forward
        out, lse = fn(comm, plan_, kern, q, k, v)
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
    world = dist.get_world_size(_group_from_name(group_name))
    lse = q.new_empty((q.shape[0], q.shape[2], q.shape[1]), dtype=_acc_dtype(q))
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
    comm, plan_, kern = _state(q, k, v, alibi_slopes, sink_logits, group_name, layout, mode,
                               causal, window_left, window_right, sinks, scale, softcap,
                               logn_base, timeout_s, lengths.tolist())
    with torch.no_grad():
        fn = _ring_backward if mode == "ring" else _allgather_backward
        dq, dk, dv = fn(comm, plan_, kern, dout.contiguous(), dlse, q, k, v, out, lse)
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


# ----------------------------------------------------------------------------------------------
# Public API
# ----------------------------------------------------------------------------------------------

def _is_int(x) -> bool:
    return isinstance(x, (int, torch.SymInt)) and not isinstance(x, bool)


def ring_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, group=None, *,
                   causal: bool = True, window=None, sinks: int = 0, layout: str = "zigzag",
                   scale: Optional[float] = None, softcap: float = 0.0,
                   alibi_slopes: Optional[torch.Tensor] = None,
                   sink_logits: Optional[torch.Tensor] = None,
                   logn_base: Optional[float] = None, mode: str = "ring",
                   timeout: Union[None, float, datetime.timedelta] = None,
                   return_lse: bool = False):
    """Self-attention over a sequence sharded across the ranks of ``group``.

    Args:
        q, k, v: this rank's shard, ``(batch, local_len, heads, head_dim)`` (k/v with the kv
            heads: GQA sends only those). Cut the full sequence with :func:`shard` (same
            ``layout``); every rank passes the same dtype, batch, heads and options.
        group: the process group (default: the world). gloo takes CPU tensors, NCCL CUDA ones.
        causal, window, sinks, scale, softcap, alibi_slopes, sink_logits, logn_base: as
            :func:`longattn.attention`, on global positions (token t of the full sequence sits
            at position t). ``alibi_slopes`` and ``logn_base`` need a unit-stride layout.
            ``sink_logits`` (replicated on every rank) gets this rank's share of its gradient;
            sum it over the group as for any replicated parameter.
        layout: ``"zigzag"`` (default; balanced for causal), ``"contiguous"`` or ``"stripe"``.
        mode: ``"ring"`` (K/V travel rank to rank, overlapped with compute, mask-aware) or
            ``"allgather"`` (gather all K/V once, then attend locally: fewer, larger messages;
            memory grows with W, so for small world sizes).
        timeout: seconds (or a timedelta) any single wait may take before the call raises;
            default: the process group's timeout.
        return_lse: also return the lse ``(batch, heads, local_len)`` (fp32; fp64 for fp64),
            differentiable.

    Returns:
        ``out`` (this rank's rows, q's shape and dtype), or ``(out, lse)``.
    """
    group = _resolve_group(group)
    group_name = group.group_name
    # Argument errors are not raised here: they travel with the metadata so that every rank
    # raises instead of waiting for the one that did not join.
    err = ""
    left = right = UNBOUNDED
    try:
        left, right = window_bounds(window)
        if layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if not _is_int(sinks) or sinks < 0:
            raise ValueError(f"sinks must be an int >= 0, got {sinks!r}")
        if softcap is None or not softcap >= 0:
            raise ValueError(f"softcap must be >= 0 (0 disables it), got {softcap!r}")
        if logn_base is not None and not logn_base > 1:
            raise ValueError(f"logn_base must be > 1, got {logn_base!r}")
        if scale is not None and not (math.isfinite(scale) and scale > 0):
            raise ValueError(f"scale must be a positive finite number, got {scale!r}")
    except (ValueError, TypeError) as e:
        err = f"ring_attention: {e}"
    if isinstance(timeout, datetime.timedelta):
        timeout = timeout.total_seconds()
    bad_int = not _is_int(sinks) or sinks < 0
    out, lse, _ = _ring_attention_op(
        q, k, v, alibi_slopes, sink_logits, group_name, layout if layout in LAYOUTS else LAYOUTS[0],
        mode if mode in MODES else MODES[0], bool(causal), left, right,
        0 if bad_int else int(sinks),
        float(scale) if scale is not None and not err else 1.0 / math.sqrt(q.shape[-1]),
        float(softcap) if not err else 0.0, float(logn_base or 0.0) if not err else 0.0,
        float(timeout or 0.0),
        torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad),
        err)
    return (out, lse) if return_lse else out


__all__ = ["ring_attention", "shard", "unshard", "shard_positions", "layout_lengths", "plan",
           "RingPlan", "LAYOUTS", "MODES"]
