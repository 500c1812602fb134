"""Benchmark cases for longattn and the builders of every implementation compared.

One place defines *what* is measured (shapes, mask, visible-area FLOPs) and *how* each
implementation is called, so the CLI (``bench/compare.py``) and the pytest-benchmark suite
(``bench/bench_attention.py``) measure exactly the same things.

Implementations
---------------
``longattn``  ``longattn.attention`` / ``longattn.dilated_attention`` on ``(B, L, H, D)`` inputs.
``sdpa``      ``F.scaled_dot_product_attention`` on ``q.transpose(1, 2)`` views (same storage):
              ``is_causal=True`` for plain causal, otherwise a dense ``(L, L)`` mask (bool for
              window/lambda, an additive float mask for dilated, see below). Skipped with a reason
              when the mask would exceed a memory budget or the dense work a FLOP budget.
``flex``      ``torch.compile(flex_attention)`` with a ``BlockMask`` (128x128 blocks) built from a
              ``mask_mod``; on CPU FlexAttention has no backward, so fwd+bwd is skipped there.

FLOP convention (FlashAttention-2)
----------------------------------
forward  = 4 * D * visible_pairs   (QK^T and PV, 2 FLOPs per multiply-add), summed over B and H;
backward = 2.5 * forward, so fwd+bwd = 3.5 * forward.
``visible_pairs`` counts only the (query, key) pairs the mask lets through ("visible area"), computed
analytically (per query row, never an L x L tensor), so a dense-mask baseline that computes the full
L x L square gets no credit for the masked work. For dilated attention the pairs of every
(w, r) config are summed (the work of the mixture; a pair visible in two configs counts twice).

Dilated attention as one dense mask
-----------------------------------
The lse merge of per-config attentions over key sets S_1..S_n is exactly one softmax over the union
with each key weighted by its multiplicity m_s (the number of configs in which s is visible):
``out = sum_s m_s e^{x_s} v_s / sum_s m_s e^{x_s}``. So the SDPA baseline is one call per head
pattern with the additive float mask ``log(m)`` (``-inf`` where m = 0), and the FlexAttention
baseline uses the union as ``mask_mod`` and ``score + log(m)`` as ``score_mod``. Both are
differentiable and checked against a literal per-config + merge reference (``compare.py --check``).
"""
from __future__ import annotations

import dataclasses
import math
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

FWD, FWDBWD = "fwd", "fwdbwd"
MODES = (FWD, FWDBWD)
BWD_FACTOR = 2.5  # FA2 convention: backward FLOPs = 2.5 x forward
MODE_FLOP_FACTOR = {FWD: 1.0, FWDBWD: 1.0 + BWD_FACTOR}
IMPLS = ("longattn", "sdpa", "flex")
FLEX_BLOCK = 128

GiB = 1024 ** 3


# ----------------------------------------------------------------------------------------------
# Cases
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Case:
    name: str
    family: str  # "causal" | "window" | "lambda" | "dilated"
    B: int
    H: int
    L: int
    D: int
    causal: bool = True
    window: Optional[tuple] = None  # (left, right), None on a side = unbounded
    sinks: int = 0
    segments: Optional[tuple] = None  # dilated: ((w, r), ...)
    modes: tuple = MODES
    impls: tuple = IMPLS
    max_reps: Optional[int] = None  # cap on timed repetitions for the big cases
    relative_to: Optional[str] = None  # a case of the same size to report a cost ratio against
    desc: str = ""

    # -- the longattn call ------------------------------------------------------------------
    def longattn_kwargs(self) -> dict:
        if self.family == "dilated":
            return dict(segments=[tuple(s) for s in self.segments], causal=self.causal)
        kw = dict(causal=self.causal)
        if self.window is not None:
            kw["window"] = tuple(self.window)
        if self.sinks:
            kw["sinks"] = self.sinks
        return kw

    def mask_desc(self) -> str:
        if self.family == "dilated":
            return "dilated " + ",".join(f"({w},{r})" for w, r in self.segments) + (" causal" if self.causal else "")
        parts = []
        if self.causal:
            parts.append("causal")
        if self.window is not None:
            parts.append(f"window={tuple(self.window)}")
        if self.sinks:
            parts.append(f"sinks={self.sinks}")
        return " ".join(parts) or "full"

    def shape_desc(self) -> str:
        return f"B={self.B} H={self.H} L={self.L} D={self.D}"

    # -- work ----------------------------------------------------------------------------------
    def visible_pairs(self) -> int:
        """Visible (query, key) pairs summed over B and H (per-config sum for dilated)."""
        if self.family == "dilated":
            return self.B * dilated_pairs(self.L, self.H, self.segments, self.causal)
        return self.B * self.H * mask_pairs(self.L, self.L, self.causal, self.window, self.sinks)

    def density(self) -> float:
        """Visible pairs / full L x L area."""
        return self.visible_pairs() / (self.B * self.H * self.L * self.L)

    def flops(self, mode: str) -> float:
        return 4.0 * self.D * self.visible_pairs() * MODE_FLOP_FACTOR[mode]

    def dense_flops(self, mode: str) -> float:
        """FLOPs of the full L x L square (what a dense-mask kernel computes)."""
        return 4.0 * self.D * self.B * self.H * self.L * self.L * MODE_FLOP_FACTOR[mode]

    def causal_pairs(self) -> int:
        return self.B * self.H * self.L * (self.L + 1) // 2


def mask_pairs(Lq: int, Lk: int, causal: bool, window, sinks: int, q_start=None, k_start: int = 0) -> int:
    """Visible pairs per (batch, head) of causal/window/sinks, one vector op per query row.

    Follows docs/semantics.md: query row i is at p = q_start + i (default Lk - Lq), key j at
    s = k_start + j; window (left, right): p - left <= s <= p + right; causal: s <= p; keys s < sinks
    are visible regardless of the window (still causal)."""
    if q_start is None:
        q_start = Lk - Lq
    p = np.arange(Lq, dtype=np.int64) + q_start
    k_lo, k_hi = k_start, k_start + Lk - 1
    lo = np.full(Lq, k_lo, dtype=np.int64)
    hi = np.full(Lq, k_hi, dtype=np.int64)
    if causal:
        hi = np.minimum(hi, p)
    cap = hi.copy()  # highest key allowed by causal + range (sinks obey these)
    if window is not None:
        left, right = window
        if left is not None:
            lo = np.maximum(lo, p - left)
        if right is not None:
            hi = np.minimum(hi, p + right)
    n_win = np.clip(hi - lo + 1, 0, None)
    n = n_win
    if sinks:
        s_lo = k_lo
        s_hi = np.minimum(cap, sinks - 1)
        n_sink = np.clip(s_hi - s_lo + 1, 0, None)
        overlap = np.where(n_win > 0, np.clip(np.minimum(s_hi, hi) - np.maximum(s_lo, lo) + 1, 0, None), 0)
        n = n_win + n_sink - overlap
    return int(n.sum())


def _kept(n: int, c: int, r: int) -> int:
    """How many t in [0, n) have t % r == c."""
    return (n - c + r - 1) // r if n > c else 0


def dilated_pairs(L: int, H: int, segments, causal: bool) -> int:
    total = 0
    for w, r in segments:
        for h in range(H):
            c = h % r
            for start in range(0, L, w):
                k = _kept(min(w, L - start), c, r)
                total += k * (k + 1) // 2 if causal else k * k
    return total


def _dilated_head_patterns(H: int, segments) -> dict:
    """Heads grouped by their dilation pattern: {(h % r for each config): [heads]}."""
    groups: dict = {}
    for h in range(H):
        groups.setdefault(tuple(h % r for _, r in segments), []).append(h)
    return groups


def default_cases(device: str = "cpu", quick: bool = False) -> list:
    """The benchmark cases. CPU: fp32 sizes for the 2-core build machine (full run ~10-15 min);
    cuda: L = 4K/16K/64K, head dim 64/128."""
    B, H = 1, 8
    segs = ((2048, 1), (4096, 2), (8192, 4))
    if device == "cpu" and quick:
        D = 64
        return [
            Case("causal_L2048", "causal", B, H, 2048, D, causal=True, desc="dense causal"),
            Case("window256_L4096", "window", B, H, 4096, D, window=(255, 0),
                 desc="causal sliding window 256"),
            Case("lambda_s16_w256_L4096", "lambda", B, H, 4096, D, window=(255, 0), sinks=16,
                 relative_to="window256_L4096", desc="lambda: 16 sinks + window 256"),
            Case("dilated_L4096", "dilated", B, H, 4096, D,
                 segments=((1024, 1), (2048, 2), (4096, 4)), desc="LongNet dilated"),
        ]
    if device == "cpu":
        D = 64
        return [
            Case("causal_L4096", "causal", B, H, 4096, D, desc="dense causal"),
            Case("window512_L4096", "window", B, H, 4096, D, window=(511, 0),
                 desc="causal sliding window 512"),
            Case("window512_L16384", "window", B, H, 16384, D, window=(511, 0), modes=(FWD,),
                 max_reps=5, desc="causal sliding window 512"),
            Case("window1024_L32768", "window", B, H, 32768, D, window=(1023, 0),
                 desc="causal sliding window 1024 (lambda's reference)"),
            Case("lambda_s64_w1024_L32768", "lambda", B, H, 32768, D, window=(1023, 0), sinks=64,
                 relative_to="window1024_L32768", desc="lambda: 64 sinks + window 1024"),
            Case("dilated_L8192", "dilated", B, H, 8192, D, segments=segs, max_reps=3,
                 desc="LongNet dilated"),
            Case("dilated_L16384", "dilated", B, H, 16384, D, segments=segs, max_reps=3,
                 desc="LongNet dilated"),
        ]
    # GPU sizes (bf16 by default); kept simple, extend when a GPU run is planned.
    cases = []
    for L in (4096, 16384, 65536):
        for D in (64, 128):
            sfx = f"L{L // 1024}K_d{D}"
            cases += [
                Case(f"causal_{sfx}", "causal", B, H, L, D),
                Case(f"window512_{sfx}", "window", B, H, L, D, window=(511, 0)),
                Case(f"window1024_{sfx}", "window", B, H, L, D, window=(1023, 0)),
                Case(f"lambda_s64_w1024_{sfx}", "lambda", B, H, L, D, window=(1023, 0), sinks=64,
                     relative_to=f"window1024_{sfx}"),
                Case(f"dilated_{sfx}", "dilated", B, H, L, D, segments=segs),
            ]
    return cases


def scaled_case(case: Case, L: int) -> Case:
    """A small version of a case (same family, window/sinks/segments scaled) for correctness checks."""
    f = L / case.L
    kw = dict(name=case.name + f"@L{L}", L=L, max_reps=None)
    if case.window is not None:
        def sc(x):  # keep the window's key count (x + 1) proportional; 0 and None stay
            return x if x is None or x <= 0 else max(1, round((x + 1) * f)) - 1
        kw["window"] = tuple(sc(x) for x in case.window)
    if case.sinks:
        kw["sinks"] = max(1, int(round(case.sinks * f * 4)))  # keep a few sinks outside the window
    if case.segments is not None:
        kw["segments"] = tuple((max(1, int(w * f)), r) for w, r in case.segments)
    return dataclasses.replace(case, **kw)


# ----------------------------------------------------------------------------------------------
# Masks (shared by the SDPA dense masks, the FlexAttention mask_mods and the reference)
# ----------------------------------------------------------------------------------------------
def _visible(case: Case, q_idx, kv_idx):
    """Boolean visibility of causal/window/sinks on (broadcastable) index tensors."""
    vis = None

    def _and(a, b):
        return b if a is None else a & b

    win = None
    if case.window is not None:
        left, right = case.window
        if left is not None:
            win = _and(win, kv_idx >= q_idx - left)
        if right is not None:
            win = _and(win, kv_idx <= q_idx + right)
        if case.sinks and win is not None:
            win = win | (kv_idx < case.sinks)
    vis = _and(vis, win)
    if case.causal:
        vis = _and(vis, kv_idx <= q_idx)
    if vis is None:
        vis = (kv_idx >= 0) & (q_idx >= 0)
    return vis


def _dilated_count(case: Case, h, q_idx, kv_idx):
    """Multiplicity m(h, q, k): in how many (w, r) configs key k is visible from query q, head h."""
    cnt = None
    for w, r in case.segments:
        c = h % r
        term = ((q_idx // w) == (kv_idx // w)) & ((q_idx % w) % r == c) & ((kv_idx % w) % r == c)
        if case.causal:
            term = term & (kv_idx <= q_idx)
        term = term.to(torch.int32)
        cnt = term if cnt is None else cnt + term
    return cnt


def make_mask_mod(case: Case) -> Callable:
    if case.family == "dilated":
        def mask_mod(b, h, q_idx, kv_idx):
            return _dilated_count(case, h, q_idx, kv_idx) > 0
    else:
        def mask_mod(b, h, q_idx, kv_idx):
            return _visible(case, q_idx, kv_idx)
    mask_mod.__name__ = f"mask_{case.family}"
    return mask_mod


def make_score_mod(case: Case) -> Optional[Callable]:
    if case.family != "dilated":
        return None

    def score_mod(score, b, h, q_idx, kv_idx):
        # log(multiplicity); -inf where m == 0, but those pairs are masked by the BlockMask anyway
        return score + torch.log(_dilated_count(case, h, q_idx, kv_idx).to(score.dtype))
    return score_mod


def dense_mask(case: Case, heads: Optional[Sequence[int]] = None, device="cpu", dtype=torch.float32):
    """(L, L) mask: bool for causal/window/lambda; float log-multiplicity for dilated (heads given,
    all of one pattern)."""
    L = case.L
    i = torch.arange(L, device=device)
    qi, kj = i[:, None], i[None, :]
    if case.family != "dilated":
        return _visible(case, qi, kj)
    h = torch.tensor(heads[0], device=device)
    cnt = _dilated_count(case, h, qi, kj)
    m = torch.log(cnt.to(dtype))  # log(0) = -inf
    del cnt
    return m


# ----------------------------------------------------------------------------------------------
# Runners
# ----------------------------------------------------------------------------------------------
class Skip(Exception):
    """An implementation/mode that is not measured, with the reason."""


@dataclass
class Runner:
    impl: str
    case: Case
    fn: Callable  # (q, k, v) in (B, L, H, D) -> out in (B, L, H, D) (may be a transposed view)
    setup_s: float = 0.0
    skip: dict = field(default_factory=dict)  # mode -> reason
    note: str = ""
    layout: str = "BLHD"


_LONGATTN = None
_LONGATTN_ERR = None


def import_longattn():
    """Import longattn, falling back to <repo>/python; raise ImportError with a clear message."""
    global _LONGATTN, _LONGATTN_ERR
    if _LONGATTN is not None:
        return _LONGATTN
    try:
        import longattn  # noqa: F401
    except Exception as e1:  # noqa: BLE001
        repo_py = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "python")
        if os.path.isdir(repo_py) and repo_py not in sys.path:
            sys.path.insert(0, repo_py)
            try:
                import longattn  # noqa: F401,F811
            except Exception as e2:  # noqa: BLE001
                _LONGATTN_ERR = f"{type(e1).__name__}: {e1}; from {repo_py}: {type(e2).__name__}: {e2}"
                raise ImportError(f"longattn is not importable ({_LONGATTN_ERR})") from e2
        else:
            _LONGATTN_ERR = f"{type(e1).__name__}: {e1}"
            raise ImportError(f"longattn is not importable ({_LONGATTN_ERR})") from e1
    import longattn
    _LONGATTN = longattn
    return longattn


def longattn_build_info() -> str:
    try:
        la = import_longattn()
    except ImportError as e:
        return f"(not importable: {e})"
    try:
        return str(la.build_info())
    except Exception as e:  # noqa: BLE001
        return f"(build_info() failed: {type(e).__name__}: {e})"


def build_longattn(case: Case, device="cpu", **_) -> Runner:
    la = import_longattn()
    kw = case.longattn_kwargs()
    if case.family == "dilated":
        def fn(q, k, v):
            return la.dilated_attention(q, k, v, **kw)
    else:
        def fn(q, k, v):
            return la.attention(q, k, v, **kw)
    return Runner("longattn", case, fn)


def _t(x, layout):
    x = x.transpose(1, 2)
    return x.contiguous() if layout == "contiguous" else x


def build_sdpa(case: Case, device="cpu", dtype=torch.float32, mask_budget_gib: float = 2.0,
               max_dense_gflop: float = 1000.0, layout: str = "view", **_) -> Runner:
    """SDPA: is_causal for plain causal, else dense masks (bool, or float log-multiplicity for
    dilated, one call per head pattern). Mask memory counts the internal float conversion of a bool
    mask (SDPA turns a bool mask into an additive mask of the query dtype)."""
    skip = {}
    if case.family == "causal" and case.window is None and not case.sinks:
        def fn(q, k, v):
            return F.scaled_dot_product_attention(_t(q, layout), _t(k, layout), _t(v, layout),
                                                  is_causal=True).transpose(1, 2)
        return Runner("sdpa", case, fn, note="is_causal=True")

    elt = torch.finfo(dtype).bits // 8
    L = case.L
    if case.family == "dilated":
        groups = _dilated_head_patterns(case.H, case.segments)
        mask_bytes = len(groups) * L * L * elt  # one resident float mask per head pattern
        kind = f"{len(groups)} float log-multiplicity masks (one per head pattern)"
    else:
        groups = None
        mask_bytes = L * L * (1 + elt)  # bool mask + SDPA's internal float copy
        kind = "bool mask (+ the float copy SDPA makes of it)"
    if mask_bytes > mask_budget_gib * GiB:
        raise Skip(f"dense {L}x{L} {kind}: {mask_bytes / GiB:.1f} GiB "
                   f"(> --mask-budget-gib {mask_budget_gib:g})")
    for mode in case.modes:
        g = case.dense_flops(mode) / 1e9
        if g > max_dense_gflop:
            skip[mode] = (f"dense mask computes the full {L}x{L} square: {g:.0f} GFLOP "
                          f"(> --sdpa-max-gflop {max_dense_gflop:g})")
    if len(skip) == len(case.modes):
        raise Skip("; ".join(sorted(set(skip.values()))))

    t0 = time.perf_counter()
    if groups is None:
        m = dense_mask(case, device=device)

        def fn(q, k, v):
            return F.scaled_dot_product_attention(_t(q, layout), _t(k, layout), _t(v, layout),
                                                  attn_mask=m).transpose(1, 2)
    else:
        heads = [torch.tensor(hs, device=device) for hs in groups.values()]
        masks = [dense_mask(case, hs, device=device, dtype=dtype) for hs in groups.values()]
        order = torch.cat(heads)
        inv = torch.empty_like(order)
        inv[order] = torch.arange(len(order), device=device)

        def fn(q, k, v):
            qt, kt, vt = _t(q, layout), _t(k, layout), _t(v, layout)
            outs = [F.scaled_dot_product_attention(qt[:, hs], kt[:, hs], vt[:, hs], attn_mask=mk)
                    for hs, mk in zip(heads, masks)]
            return torch.cat(outs, dim=1)[:, inv].transpose(1, 2)
    return Runner("sdpa", case, fn, setup_s=time.perf_counter() - t0, skip=skip,
                  note=f"dense {kind.split(' (')[0]}, {mask_bytes / GiB:.2f} GiB")


def _iv(a, b, s0, s1):
    """Size of [a, b] intersected with [s0, s1] (broadcasting int64 tensors)."""
    return (torch.minimum(b, s1) - torch.maximum(a, s0) + 1).clamp_min(0)


def _iv_mod(a, b, m, r):
    """How many x in [a, b] have x % r == m % r (m may be a tensor)."""
    n = torch.div(b - m, r, rounding_mode="floor") - torch.div(a - 1 - m, r, rounding_mode="floor")
    return torch.where(b >= a, n, torch.zeros_like(n))


def block_counts(case: Case, block: int = FLEX_BLOCK, device="cpu"):
    """Per (head pattern, query block, key block): (visible count, largest single-term count).

    Computed from each query row's visible key intervals (O(L * L / block), no L x L tensor):
    causal/window/sinks is a union of two intervals per row; a dilated config (w, r) is an arithmetic
    progression inside the row's segment. Rows/keys past L (padding) are not visible, as in
    torch's create_block_mask. Returns (heads_per_pattern or None, visible, best_single)."""
    L = case.L
    nb = (L + block - 1) // block
    p = torch.arange(nb * block, device=device)[:, None]  # query rows (padded)
    s0 = torch.arange(nb, device=device)[None, :] * block  # key block starts
    s1 = torch.clamp(s0 + block - 1, max=L - 1)
    valid = p < L
    if case.family != "dilated":
        zero = torch.zeros_like(p)
        cap = torch.minimum(p, torch.full_like(p, L - 1)) if case.causal else torch.full_like(p, L - 1)
        lo, hi = zero, cap.clone()
        if case.window is not None:
            left, right = case.window
            if left is not None:
                lo = torch.maximum(lo, p - left)
            if right is not None:
                hi = torch.minimum(hi, p + right)
        n = _iv(lo, hi, s0, s1)
        if case.sinks and case.window is not None:
            sh = torch.minimum(cap, torch.full_like(cap, case.sinks - 1))
            both_lo, both_hi = torch.maximum(lo, zero), torch.minimum(hi, sh)
            n = n + _iv(zero, sh, s0, s1) - torch.where(hi >= lo, _iv(both_lo, both_hi, s0, s1), 0)
        n = torch.where(valid, n, 0).view(nb, block, nb).sum(1)
        return None, n[None], n[None]
    groups = _dilated_head_patterns(case.H, case.segments)
    vis, best = [], []
    for pattern in groups:
        tot, top = 0, None
        for (w, r), c in zip(case.segments, pattern):
            seg0 = torch.div(p, w, rounding_mode="floor") * w
            hi = torch.minimum(seg0 + w - 1, torch.full_like(p, L - 1))
            if case.causal:
                hi = torch.minimum(hi, p)
            kept = ((p - seg0) % r) == c
            a, b = torch.maximum(seg0, s0), torch.minimum(hi, s1)
            n = torch.where(kept & valid, _iv_mod(a, b, seg0 + c, r), 0).view(nb, block, nb).sum(1)
            tot = tot + n
            top = n if top is None else torch.maximum(top, n)
        vis.append(tot)
        best.append(top)
    return list(groups.values()), torch.stack(vis), torch.stack(best)


def make_block_mask(case: Case, device="cpu", block: int = FLEX_BLOCK):
    """The BlockMask of a case, classified analytically by block_counts (torch's create_block_mask
    evaluates the mask_mod on the whole L x L grid, ~10 s at L = 32K here and more per head).
    Empty: no visible pair; full: one mask term covers the whole block; else partial (mask_mod
    applied). compare.py --check verifies it equals create_block_mask at small L."""
    from torch.nn.attention.flex_attention import BlockMask

    heads, vis, best = block_counts(case, block, device)
    full = best == block * block
    partial = (vis > 0) & ~full
    if heads is not None:  # expand head patterns to heads
        idx = torch.empty(case.H, dtype=torch.long)
        for g, hs in enumerate(heads):
            idx[hs] = g
        full, partial = full[idx.to(full.device)], partial[idx.to(full.device)]

    def ordered(d):
        d = d[None].to(torch.int32)  # (1, H, nq, nk)
        num = d.sum(-1).to(torch.int32)
        ix = torch.argsort(d, dim=-1, descending=True, stable=True).to(torch.int32)
        return num.contiguous(), ix.contiguous()

    kn, ki = ordered(partial)
    fn_, fi = ordered(full)
    return BlockMask.from_kv_blocks(kn, ki, fn_, fi, BLOCK_SIZE=block, mask_mod=make_mask_mod(case),
                                    seq_lengths=(case.L, case.L))


_FLEX_COMPILED: dict = {}


def _flex_compiled(family: str):
    if family not in _FLEX_COMPILED:
        from torch.nn.attention.flex_attention import flex_attention
        import torch._dynamo
        # every case's mask/score closure and shape is a guard; let them all compile
        torch._dynamo.config.recompile_limit = max(64, torch._dynamo.config.recompile_limit)
        _FLEX_COMPILED[family] = torch.compile(flex_attention, dynamic=False)
    return _FLEX_COMPILED[family]


def build_flex(case: Case, device="cpu", dtype=torch.float32, layout: str = "view", **_) -> Runner:
    skip = {}
    if device == "cpu" and FWDBWD in case.modes:
        skip[FWDBWD] = "FlexAttention on CPU is inference-only (no backward in torch 2.13)"
    if len(skip) == len(case.modes):
        raise Skip(skip[FWDBWD])
    t0 = time.perf_counter()
    bm = make_block_mask(case, device=device)
    setup = time.perf_counter() - t0
    score_mod = make_score_mod(case)
    flex = _flex_compiled(case.family)

    def fn(q, k, v):
        return flex(_t(q, layout), _t(k, layout), _t(v, layout), score_mod=score_mod,
                    block_mask=bm).transpose(1, 2)
    sparsity = 1.0 - (bm.kv_num_blocks.sum().item() + bm.full_kv_num_blocks.sum().item()) / (
        bm.kv_num_blocks.shape[1] * (bm.kv_num_blocks.shape[-1] ** 2))
    return Runner("flex", case, fn, setup_s=setup, skip=skip,
                  note=f"BlockMask {FLEX_BLOCK}, {100 * sparsity:.1f}% blocks skipped")


BUILDERS = {"longattn": build_longattn, "sdpa": build_sdpa, "flex": build_flex}


def build(impl: str, case: Case, **opts) -> Runner:
    """Build a runner or raise Skip / ImportError."""
    if impl not in case.impls:
        raise Skip(f"{impl} not part of this case")
    return BUILDERS[impl](case, **opts)


# ----------------------------------------------------------------------------------------------
# Inputs and steps (timed by bench/timing.py)
# ----------------------------------------------------------------------------------------------
def make_inputs(case: Case, device="cpu", dtype=torch.float32, seed: int = 0):
    """q, k, v in (B, L, H, D) and a fixed output gradient, all contiguous."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    shape = (case.B, case.L, case.H, case.D)
    q, k, v, do = (torch.randn(shape, generator=g, dtype=torch.float32).to(device=device, dtype=dtype)
                   for _ in range(4))
    return q, k, v, do


def make_step(runner: Runner, mode: str, q, k, v, do) -> Callable:
    """A zero-argument callable performing one forward (no autograd) or forward+backward."""
    fn = runner.fn
    if mode == FWD:
        def step():
            with torch.no_grad():
                return fn(q, k, v)
        return step
    qg, kg, vg = (x.detach().clone().requires_grad_(True) for x in (q, k, v))

    def step():
        qg.grad = kg.grad = vg.grad = None
        out = fn(qg, kg, vg)
        out.backward(do)
        return out
    step.leaves = (qg, kg, vg)
    return step



# ----------------------------------------------------------------------------------------------
# Reference (fp64, literal semantics) for the correctness check of every implementation
# ----------------------------------------------------------------------------------------------
def _ref_masked(q, k, v, mask):
    """q, k, v (B, H, L, D) fp64; mask (H or 1, L, L) bool. Returns out, lse."""
    s = (q @ k.transpose(-1, -2)) / math.sqrt(q.shape[-1])
    s = s.masked_fill(~mask, float("-inf"))
    lse = torch.logsumexp(s, dim=-1)
    p = torch.exp(s - lse[..., None].clamp_min(-1e300))
    p = torch.nan_to_num(p, nan=0.0)
    return p @ v, lse


def reference(case: Case, q, k, v):
    """Reference output (B, L, H, D) in fp64. Dilated: per-config attention + lse merge, literally."""
    qt, kt, vt = (x.double().transpose(1, 2) for x in (q, k, v))
    L = case.L
    i = torch.arange(L)
    qi, kj = i[:, None], i[None, :]
    if case.family != "dilated":
        out, _ = _ref_masked(qt, kt, vt, _visible(case, qi, kj)[None])
        return out.transpose(1, 2)
    outs, lses = [], []
    for w, r in case.segments:
        h = torch.arange(case.H)[:, None, None]
        t_q, t_k = (qi % w)[None], (kj % w)[None]
        m = ((qi // w) == (kj // w))[None] & (t_q % r == h % r) & (t_k % r == h % r)
        if case.causal:
            m = m & (kj <= qi)[None]
        o, lse = _ref_masked(qt, kt, vt, m)
        outs.append(o)
        lses.append(lse)
    lse = torch.logsumexp(torch.stack(lses), dim=0)
    out = sum(torch.exp(l_ - lse)[..., None].nan_to_num(0.0) * o for o, l_ in zip(outs, lses))
    return out.transpose(1, 2)
