"""Row layouts of ``longattn.extend``: dense ``(B, L, H, D)`` or varlen ``(T, H, D)`` with
``cu_seqlens``, the absolute position of every query and key row, and the arguments that make
``longattn.attention`` place the rows at those same positions (docs/semantics.md): query row i
of a sequence at ``q_start + i`` (default ``Lk - Lq`` of that sequence: bottom-right aligned),
key row j at ``j``, restarting at 0 in every sequence.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, List, Optional

import torch

from .attention import attention


@dataclass
class Layout:
    p: torch.Tensor  # positions of the query rows: (Lq,) dense (shared by the batch), (Tq,) varlen
    s: torch.Tensor  # positions of the key rows: (Lk,) or (Tk,)
    attn: dict  # q_start (and cu_seqlens, max_seqlen in varlen) for longattn.attention
    q_start: Optional[int]  # as given (None: bottom-right per sequence)
    cu_q: List[int] = field(default_factory=list)  # varlen: cu_seqlens on the host
    cu_k: List[int] = field(default_factory=list)

    @property
    def varlen(self) -> bool:
        return bool(self.cu_q)


def _check_cu(cu, name, total, fn):
    if not isinstance(cu, torch.Tensor) or cu.dtype != torch.int32 or cu.dim() != 1 or cu.numel() < 1:
        raise ValueError(f"{fn}: {name} must be a 1-D int32 tensor (batch + 1,), got "
                         f"{getattr(cu, 'dtype', type(cu).__name__)} of shape "
                         f"{tuple(getattr(cu, 'shape', ()))}")
    host = cu.tolist()
    if host[0] != 0 or host[-1] != total or any(b < a for a, b in zip(host, host[1:])):
        raise ValueError(f"{fn}: {name} must start at 0, be non-decreasing and end at {total} "
                         f"(the rows of its tensor), got {host}")
    return host


def make_layout(q, k, v, q_start, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                fn: str) -> Layout:
    for n, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{fn}: {n} must be a torch.Tensor, got {type(t).__name__}")
    if q_start is not None and (isinstance(q_start, bool) or not isinstance(q_start, int)):
        raise ValueError(f"{fn}: q_start must be an int or None, got {q_start!r}")
    dev = q.device
    if cu_seqlens_q is None and cu_seqlens_k is None:
        if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
            raise ValueError(f"{fn}: q, k, v must be (batch, seqlen, heads, head_dim), or "
                             f"(tokens, heads, head_dim) with cu_seqlens_q/k; got shapes "
                             f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
        Lq, Lk = q.shape[1], k.shape[1]
        q0 = Lk - Lq if q_start is None else q_start
        p = torch.arange(Lq, device=dev, dtype=torch.int64) + q0
        s = torch.arange(Lk, device=dev, dtype=torch.int64)
        return Layout(p, s, dict(q_start=q0), q_start)
    if cu_seqlens_q is None or cu_seqlens_k is None:
        raise ValueError(f"{fn}: cu_seqlens_q and cu_seqlens_k must be given together")
    if q.dim() != 3 or k.dim() != 3 or v.dim() != 3:
        raise ValueError(f"{fn}: with cu_seqlens, q, k, v must be (tokens, heads, head_dim); got "
                         f"shapes {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    cu_q = _check_cu(cu_seqlens_q, "cu_seqlens_q", q.shape[0], fn)
    cu_k = _check_cu(cu_seqlens_k, "cu_seqlens_k", k.shape[0], fn)
    if len(cu_q) != len(cu_k):
        raise ValueError(f"{fn}: cu_seqlens_q and cu_seqlens_k must have the same length "
                         f"(batch + 1), got {len(cu_q)} and {len(cu_k)}")
    lens_q = [b - a for a, b in zip(cu_q, cu_q[1:])]
    lens_k = [b - a for a, b in zip(cu_k, cu_k[1:])]
    starts = [lk - lq if q_start is None else q_start for lq, lk in zip(lens_q, lens_k)]
    p = _row_positions(cu_q, starts, dev)
    s = _row_positions(cu_k, [0] * len(lens_k), dev)
    attn = dict(q_start=q_start, cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k,
                max_seqlen_q=max(lens_q, default=0) if max_seqlen_q is None else max_seqlen_q,
                max_seqlen_k=max(lens_k, default=0) if max_seqlen_k is None else max_seqlen_k)
    return Layout(p, s, attn, q_start, cu_q, cu_k)


def _row_positions(cu: List[int], starts: List[int], device) -> torch.Tensor:
    """Row r of sequence n (cu[n] <= r < cu[n+1]) at starts[n] + r - cu[n]."""
    lens = torch.tensor([b - a for a, b in zip(cu, cu[1:])], dtype=torch.int64, device=device)
    offset = torch.tensor([st - a for st, a in zip(starts, cu)], dtype=torch.int64, device=device)
    rows = torch.arange(cu[-1], dtype=torch.int64, device=device)
    return rows + torch.repeat_interleave(offset, lens, output_size=cu[-1])


def _rows(cu: List[int], seqs: List[int], counts: List[int], device) -> torch.Tensor:
    """Rows cu[n] .. cu[n] + counts[i] of the sequences seqs[i], concatenated."""
    idx = [torch.arange(cu[n], cu[n] + c, device=device) for n, c in zip(seqs, counts)]
    return torch.cat(idx) if idx else torch.zeros(0, dtype=torch.int64, device=device)


def _cumsum(counts: List[int]) -> List[int]:
    acc = [0]
    for c in counts:
        acc.append(acc[-1] + c)
    return acc


def _cu(counts: List[int], device) -> torch.Tensor:
    return torch.tensor(_cumsum(counts), dtype=torch.int32, device=device)


def first_keys_attention(lay: Layout, q_rot: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                         n_first: int, rotate_keys: Callable[[torch.Tensor], torch.Tensor],
                         **attn_kw):
    """Attention of every query (q_rot, already rotated) over the first ``n_first`` keys of its
    sequence (rotated by ``rotate_keys``), at their true positions, with ``attn_kw`` (window,
    causal, scale, return_lse=True). Returns (out, lse) in the layout's shapes, or None when no
    sequence has such keys.

    Varlen: attention takes one q_start for every sequence, and the bottom-right default would
    align the queries to the shortened key lists; so the sequences are grouped by their query
    offset (one group, one call, in the usual case of equal offsets, e.g. packed prefill) and
    each group runs with that offset as q_start.
    """
    dev = q_rot.device
    if not lay.varlen:
        n = min(n_first, k.shape[1])
        if n == 0:
            return None
        kf = rotate_keys(k[:, :n])
        return attention(q_rot, kf, v[:, :n], q_start=lay.attn["q_start"], k_start=0, **attn_kw)
    lens_q = [b - a for a, b in zip(lay.cu_q, lay.cu_q[1:])]
    lens_k = [b - a for a, b in zip(lay.cu_k, lay.cu_k[1:])]
    firsts = [min(n_first, lk) for lk in lens_k]
    if sum(firsts) == 0:
        return None
    nseq = len(lens_q)
    key_rows = _rows(lay.cu_k, list(range(nseq)), firsts, dev)
    kf, vf = rotate_keys(k[key_rows]), v[key_rows]
    cu_first = _cumsum(firsts)
    starts = [lk - lq if lay.q_start is None else lay.q_start for lq, lk in zip(lens_q, lens_k)]
    groups = {}
    for n, st in enumerate(starts):
        groups.setdefault(st, []).append(n)
    if len(groups) == 1:
        return attention(q_rot, kf, vf, q_start=starts[0], k_start=0,
                         cu_seqlens_q=lay.attn["cu_seqlens_q"], cu_seqlens_k=_cu(firsts, dev),
                         max_seqlen_q=lay.attn["max_seqlen_q"], max_seqlen_k=max(firsts),
                         **attn_kw)
    heads = q_rot.shape[1]
    out = q_rot.new_zeros(q_rot.shape)
    lse_dtype = torch.float64 if q_rot.dtype == torch.float64 else torch.float32
    lse = torch.full((heads, q_rot.shape[0]), float("-inf"), dtype=lse_dtype, device=dev)
    for st, seqs in groups.items():
        gq = [lens_q[n] for n in seqs]
        gk = [firsts[n] for n in seqs]
        q_rows = _rows(lay.cu_q, seqs, gq, dev)
        k_rows = _rows(cu_first, seqs, gk, dev)
        o, l = attention(q_rot[q_rows], kf[k_rows], vf[k_rows], q_start=st, k_start=0,
                         cu_seqlens_q=_cu(gq, dev), cu_seqlens_k=_cu(gk, dev),
                         max_seqlen_q=max(gq), max_seqlen_k=max(gk), **attn_kw)
        out = out.index_copy(0, q_rows, o)
        lse = lse.index_copy(1, q_rows, l)
    return out, lse
