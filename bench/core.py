"""The comparison core shared by bench/compare.py (CPU) and bench/gpu_bench.py (GPU): steps of
(case, impl, mode) measured into records, and the ratios between the records of one run.

A record is a plain dict (it is what results.json / gpu_bench.json hold): the CLI makes it with
the case's fields, measure() adds the timing, set_speedups() the ratio against longattn,
best_alternatives() the ratio against the fastest other implementation. Ratios are only taken
between records of the same run: the machine's speed changes between runs.
"""
from __future__ import annotations

import statistics
from dataclasses import dataclass
from typing import Callable, Optional

import timing

# Records saved before records carried their group: compare.py interleaved all implementations
# of a case, so such records count as measured in the same rounds.
_LEGACY = "legacy"


@dataclass(frozen=True)
class Fields:
    """Key names and units of a CLI's records; each keeps those its files have always had."""
    rate: str  # throughput key
    scale: float  # FLOP/s per unit of rate
    first: str  # key of the first call's seconds
    digits: int  # decimals of times_ms


CPU_FIELDS = Fields("gflops", 1e9, "first_call_s", 3)
GPU_FIELDS = Fields("tflops", 1e12, "first_s", 4)


@dataclass(eq=False)
class Entry:
    """A step to time and the record its timing goes into."""
    rec: dict
    step: Callable
    flops: float
    max_reps: int
    extra_warmup: bool = False

    @property
    def label(self) -> str:
        return f"{self.rec['case']} {self.rec['impl']} {self.rec['mode']}"


def error_note(ex: BaseException) -> str:
    """A record's note for a call that raised: the exception's first line."""
    text = str(ex).strip()
    msg = text.splitlines()[0][:200] if text else ""
    return f"error: {type(ex).__name__}: {msg}"


def fill(rec: dict, m: timing.Measurement, flops: float, f: Fields) -> None:
    med = m.median
    rec.update(ms=med * 1e3, min_ms=min(m.times) * 1e3,
               times_ms=[round(t * 1e3, f.digits) for t in m.times], reps=len(m.times))
    rec[f.first] = round(m.first, 3)
    rec[f.rate] = flops / med / f.scale
    rec.update(group=m.group, timer=m.method)


def measure(entries: list, device, budget_s: Optional[float], fields: Fields, min_reps: int = 1,
            progress: Optional[Callable[[str], None]] = None) -> list:
    """Time the entries together (interleaved on the CPU) and fill their records; a step that
    raises leaves its record's note, not the run. Returns the Measurements."""
    ms = [timing.Measurement(e.step, name=e.label, max_reps=e.max_reps, extra_warmup=e.extra_warmup)
          for e in entries]
    timing.measure_all(ms, device, budget_s, min_reps=min_reps, keep_going=True, progress=progress)
    for e, m in zip(entries, ms):
        if m.error is not None:
            e.rec["note"] = error_note(m.error)
        else:
            fill(e.rec, m, e.flops, fields)
    return ms


# ----------------------------------------------------------------------------------------------
# Ratios
# ----------------------------------------------------------------------------------------------
def paired(num_times, den_times, num_med: float, den_med: float, same_rounds: bool) -> float:
    """num / den time: the median of the per-round ratios when both were timed in the same
    rounds (drift cancels within a round), else the ratio of the medians. With fewer than 3
    pairs (a slow baseline timed once) one pair is fragile: the ratio of the medians then too."""
    if same_rounds:
        pairs = [a / b for a, b in zip(num_times, den_times)]
        if len(pairs) >= 3:
            return statistics.median(pairs)
    return num_med / den_med


def paired_ratio(num: Optional[dict], den: Optional[dict]) -> Optional[float]:
    """num's time / den's time for two records (None when either was not measured)."""
    if not num or not den or not num.get("ms") or not den.get("ms"):
        return None
    ga, gb = num.get("group", _LEGACY), den.get("group", _LEGACY)
    return paired(num["times_ms"], den["times_ms"], num["ms"], den["ms"], ga is not None and ga == gb)


def ratio(num: timing.Measurement, den: timing.Measurement) -> float:
    """num's time / den's time for two Measurements."""
    same = num.group is not None and num.group == den.group
    return paired(num.times, den.times, num.median, den.median, same)


def _by_case_mode(records, impl):
    out = {}
    for r in records:
        if r["impl"] == impl and r.get("ms"):
            out.setdefault((r["case"], r["mode"]), r)
    return out


def set_speedups(records: list, base: str = "longattn", key: str = "longattn_speedup") -> None:
    """r[key] = r's time / base's time, same case and mode (> 1: base faster)."""
    ref = _by_case_mode(records, base)
    for r in records:
        r[key] = paired_ratio(r, ref.get((r["case"], r["mode"])))


def best_alternatives(records: list, base: str = "longattn", exclude=()) -> list:
    """Per (case, mode) where base was measured: the fastest other implementation (those in
    exclude are base's own variants) and its time / base's. Stored on base's record as
    best_alternative / best_alternative_speedup; returns (case, mode, impl, ratio) rows."""
    ref = _by_case_mode(records, base)
    best = {}
    for r in records:
        if r["impl"] == base or r["impl"] in exclude or not r.get("ms"):
            continue
        k = (r["case"], r["mode"])
        if k in ref and (k not in best or r["ms"] < best[k]["ms"]):
            best[k] = r
    case_at, mode_at = {}, {}
    for i, r in enumerate(records):  # rows in the order cases and modes first appear
        case_at.setdefault(r["case"], i)
        mode_at.setdefault(r["mode"], i)
    rows = []
    for k, b in sorted(best.items(), key=lambda kb: (case_at[kb[0][0]], mode_at[kb[0][1]])):
        val = paired_ratio(b, ref[k])
        ref[k].update(best_alternative=b["impl"], best_alternative_speedup=val)
        rows.append((k[0], k[1], b["impl"], val))
    return rows


def best_alternative_lines(rows: list, base: str = "longattn") -> list:
    if not rows:
        return []
    out = [f"{base} against the fastest other implementation measured in the same run "
           f"(its time / {base}'s, > 1: {base} faster):"]
    for case, mode, impl, val in rows:
        out.append(f"- {case} {mode}: {impl} {val:.2f}x")
    return out
