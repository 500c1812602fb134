"""How a sequence of L tokens is split over W ranks: every rank's pieces (runs of local rows
with their global positions), shard() and unshard().

    contiguous  rank r holds one run of tokens; runs may have any lengths (an uneven split is
                fine), in rank order.
    zigzag      L is cut into 2W chunks (sizes as torch.tensor_split); rank r holds chunks r and
                2W-1-r. Balances causal work: every rank gets one early and one late chunk.
    stripe      token t lives on rank t mod W (positions with stride W; schedule.py maps each
                pair of ranks to the kernel's unit-stride positions).
"""
from __future__ import annotations

from functools import lru_cache
from typing import List, NamedTuple, Optional, Tuple

import torch
import torch.distributed as dist

from .group import rank_world, resolve_group
from .release import python_refs, wait_released

LAYOUTS = ("contiguous", "zigzag", "stripe")


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
def pieces_for_lengths(layout: str, lengths: Tuple[int, ...]) -> Tuple[Tuple[Piece, ...], ...]:
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


def _positions(p: Piece, device) -> torch.Tensor:
    return torch.arange(p.start, p.start + p.stride * p.length, p.stride, dtype=torch.int64,
                        device=device)


def shard_positions(seq_len: int, layout: str = "zigzag", rank: int = 0, world_size: int = 1,
                    device=None) -> torch.Tensor:
    """Global positions (int64) of rank ``rank``'s local tokens: use them for RoPE on shards."""
    idx = [_positions(p, device) for p in _layout_pieces(layout, seq_len, world_size)[rank]]
    return torch.cat(idx) if len(idx) > 1 else idx[0]


def _check_layout(layout: str):
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")


def shard(x: torch.Tensor, group=None, layout: str = "zigzag", seq_dim: int = 1, *,
          rank: Optional[int] = None, world_size: Optional[int] = None) -> torch.Tensor:
    """This rank's shard of the full sequence ``x`` along ``seq_dim`` (a differentiable copy).

    ``rank``/``world_size`` override the group's (no process group needed then). Any length
    works: shards differ by at most one token per chunk (torch.tensor_split sizes).
    """
    _check_layout(layout)
    r, w = rank_world(group, rank, world_size)
    idx = shard_positions(x.shape[seq_dim], layout, r, w, device=x.device)
    return x.index_select(seq_dim, idx)


def _all_gather(outs, t, group):
    """dist.all_gather that returns only once the backend has released the tensors: often the
    last collective before a process tears down (see release.py)."""
    tensors = [t, *outs]
    refs = python_refs(tensors)
    work = dist.all_gather(outs, t, group=group, async_op=True)
    try:
        work.wait()
    finally:
        work = None
    wait_released(tensors, refs)


def unshard(x_local: torch.Tensor, group=None, layout: str = "zigzag",
            seq_dim: int = 1) -> torch.Tensor:
    """The full sequence from every rank's shard (an all-gather; not differentiable)."""
    _check_layout(layout)
    group = resolve_group(group)
    world = dist.get_world_size(group)
    seq_dim = seq_dim % x_local.dim()
    n = x_local.shape[seq_dim]
    lens_t = [torch.zeros(1, dtype=torch.int64, device=x_local.device) for _ in range(world)]
    _all_gather(lens_t, torch.tensor([n], dtype=torch.int64, device=x_local.device), group)
    lengths = tuple(int(t.item()) for t in lens_t)
    pieces = pieces_for_lengths(layout, lengths)
    n_max = max(lengths)
    pad = list(x_local.shape)
    pad[seq_dim] = n_max
    buf = x_local.new_zeros(pad)
    buf.narrow(seq_dim, 0, n).copy_(x_local)
    gathered = [torch.empty_like(buf) for _ in range(world)]
    _all_gather(gathered, buf, group)
    full = list(x_local.shape)
    full[seq_dim] = sum(lengths)
    out = x_local.new_empty(full)
    for r in range(world):
        for p in pieces[r]:
            if p.length == 0:
                continue
            out.index_copy_(seq_dim, _positions(p, x_local.device),
                            gathered[r].narrow(seq_dim, p.offset, p.length))
    return out
