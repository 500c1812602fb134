"""How every script in bench/ times the implementations it compares.

CPU. The build machine is shared: other jobs come and go, and absolute times drift by 2x or
more within minutes. So the calls of the compared implementations are interleaved round-robin
(each round starting one implementation later), every one warmed up first; a median is
reported per implementation, and a ratio between two of them is taken round by round
(core.ratio), so a load change hits both sides of each ratio alike. torch.utils.benchmark is
not used: it times one statement to the end before the next, which turns drift into a speed
difference.

CUDA. The GPU is not shared, so there is no drift to pair against, but a kernel's time depends
on what the L2 cache holds and on launch queueing: each implementation is timed on its own
with triton.testing.do_bench (L2 flushed before each call, CUDA events) when triton imports,
else with the same procedure written out here; also when a call needs an untimed reset before
it, which do_bench cannot interleave.

Exceptions: bench_rope.py times its implementations one after the other (interleaved, an
out-of-place call can reuse the pages another just freed); bench_attention.py is the
pytest-benchmark suite, timed by pytest-benchmark (sync() after each call).
"""
from __future__ import annotations

import itertools
import math
import statistics
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

FLUSH_BYTES = 256 << 20  # larger than any GPU's L2 (H100/H200: 50 MiB), as do_bench's flush

_groups = itertools.count()
_flush: dict = {}


def is_cuda(device) -> bool:
    return str(device).startswith("cuda")


def sync(device) -> None:
    if is_cuda(device):
        torch.cuda.synchronize()


def wall(fn: Callable, device="cpu") -> float:
    """Seconds of one call, bracketed by synchronizations: launches and compiles included."""
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0


@dataclass(eq=False)
class Measurement:
    """One implementation's timing. Measurements of one measure_all call on the CPU share a
    group: their times[i] were taken in the same round."""

    fn: Callable
    name: str = ""
    max_reps: int = 5
    # the first call compiles (FlexAttention, torch.compile): a second, warm call gives the
    # estimate the reps are sized by, and counts as a rep
    extra_warmup: bool = False
    # untimed, before every call: destructive ops (compaction) get fresh inputs
    reset: Optional[Callable] = None
    # fn times itself and returns seconds: a distributed call whose time is the slowest rank's
    self_timed: bool = False
    times: list = field(default_factory=list)  # seconds per call
    first: Optional[float] = None  # the first call (compile included)
    n: int = 0  # reps planned
    inner: int = 1  # calls per rep (very short calls are timed in batches)
    error: Optional[BaseException] = None
    group: Optional[int] = None
    method: str = ""

    @property
    def median(self) -> Optional[float]:
        return statistics.median(self.times) if self.times else None


def plan_reps(est_s: float, budget_s: Optional[float], min_reps: int, max_reps: int) -> int:
    """Reps that fit budget_s at est_s each, within [min_reps, max_reps] (at least one); None:
    max_reps exactly. Slow calls get fewer reps so that one measurement cannot eat the run."""
    if budget_s is None:
        return max(1, max_reps)
    return max(1, min_reps, min(max_reps, int(budget_s / max(est_s, 1e-6))))


def inner_calls(est_s: float, min_sample_s: float) -> int:
    """Calls per rep so that one rep lasts min_sample_s: the clock's and the loop's overhead then
    stay small against microsecond calls."""
    if min_sample_s <= 0 or est_s >= min_sample_s:
        return 1
    return math.ceil(min_sample_s / max(est_s, 1e-9))


def cuda_rep_ms(est_s: float, budget_s: Optional[float], min_reps: int, max_reps: int) -> float:
    """do_bench's `rep` (milliseconds of timed calls; it sizes the count from its own estimate)
    that asks for about plan_reps(...) calls."""
    return 1e3 * est_s * plan_reps(est_s, budget_s, min_reps, max_reps)


def _call(m: Measurement, device) -> float:
    if m.reset is not None:
        m.reset()
    if m.self_timed:
        return m.fn()
    if m.inner == 1:
        return wall(m.fn, device)
    sync(device)
    t0 = time.perf_counter()
    for _ in range(m.inner):
        m.fn()
    sync(device)
    return (time.perf_counter() - t0) / m.inner


def _calibrate(m: Measurement, device, min_sample_s: float) -> float:
    """Seconds per call, averaged over a loop of min_sample_s after another such loop: a single
    call of a few microseconds is too noisy to size the batches by, and the first few calls of
    a small op can take milliseconds (allocations, thread pools, tables)."""
    for _ in range(2):
        sync(device)
        t0, n = time.perf_counter(), 0
        while time.perf_counter() - t0 < min_sample_s:
            m.fn()
            n += 1
        sync(device)
    return (time.perf_counter() - t0) / n


def measure_all(ms: list, device="cpu", budget_s: Optional[float] = None, min_reps: int = 1,
                min_sample_s: float = 0.0, keep_going: bool = False,
                progress: Optional[Callable[[str], None]] = None) -> list:
    """Time every Measurement of ms (see the module docstring for the method). Each gets
    plan_reps(estimate, budget_s, min_reps, max_reps) reps. keep_going: a call that raises in
    its warm-up is recorded in .error and the others go on (one failure must not lose a run)."""
    if is_cuda(device):
        for m in ms:
            if progress:
                progress(f"{m.name} cuda")
            try:
                _measure_cuda(m, device, budget_s, min_reps)
            except Exception as ex:  # noqa: BLE001
                if not keep_going:
                    raise
                m.error = ex
        return ms
    group = next(_groups)
    for m in ms:
        m.group, m.method = group, "round-robin"
        if progress:
            progress(f"{m.name} warm-up")
        try:
            m.first = _call(m, device)
            est = m.first
            if m.extra_warmup:
                est = _call(m, device)
                m.times.append(est)
        except Exception as ex:  # noqa: BLE001
            if not keep_going:
                raise
            m.error = ex
            continue
        if min_sample_s > 0 and not (m.reset or m.self_timed):
            est = _calibrate(m, device, min_sample_s)
            m.inner = inner_calls(est, min_sample_s)
            if m.inner > 1:
                m.times.clear()  # a single call is not a rep of inner calls
        m.n = plan_reps(est * m.inner, budget_s, min_reps, m.max_reps)
    live = [m for m in ms if m.error is None]
    rnd = 0
    while any(len(m.times) < m.n for m in live):
        todo = [m for m in live if len(m.times) < m.n]
        k = rnd % len(todo)
        for m in todo[k:] + todo[:k]:
            if progress:
                progress(f"{m.name} rep {len(m.times) + 1}/{m.n}")
            m.times.append(_call(m, device))
        rnd += 1
    return ms


def compare(fns: dict, reps: int, device="cpu", reset: Optional[Callable] = None,
            extra_warmup: bool = False, min_sample_s: float = 0.0) -> dict:
    """{name: Measurement} of fns (zero-argument callables) with exactly `reps` reps each."""
    ms = {k: Measurement(f, name=k, max_reps=reps, reset=reset, extra_warmup=extra_warmup)
          for k, f in fns.items()}
    measure_all(list(ms.values()), device, None, min_sample_s=min_sample_s)
    return ms


def measure(fn: Callable, device="cpu", budget_s: Optional[float] = None, min_reps: int = 1,
            max_reps: int = 5, extra_warmup: bool = False) -> Measurement:
    """One implementation alone."""
    m = Measurement(fn, max_reps=max_reps, extra_warmup=extra_warmup)
    measure_all([m], device, budget_s, min_reps)
    return m


# ----------------------------------------------------------------------------------------------
# CUDA
# ----------------------------------------------------------------------------------------------
def _flush_buffer(device):
    key = str(device)
    if key not in _flush:
        _flush[key] = torch.empty(FLUSH_BYTES, dtype=torch.int8, device=device)
    return _flush[key]


def _event_time(m: Measurement, device) -> float:
    if m.reset is not None:
        m.reset()
    _flush_buffer(device).zero_()  # the call starts with a cold L2, as it would in a model
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    m.fn()
    b.record()
    b.synchronize()
    return a.elapsed_time(b) / 1e3


def _do_bench():
    try:
        from triton.testing import do_bench
    except Exception:  # noqa: BLE001 - no triton (or a broken one): CUDA events by hand
        return None
    return do_bench


def _measure_cuda(m: Measurement, device, budget_s, min_reps) -> None:
    if m.self_timed:
        raise ValueError("self-timed calls are CPU-only")
    if m.reset is not None:
        m.reset()
    m.first = wall(m.fn, device)
    est = _event_time(m, device)  # warm: the first call may have compiled
    do_bench = None if m.reset is not None else _do_bench()
    if do_bench is not None:
        try:
            # warmup=1: already warm; return_mode="all": every call's time, for the median
            ts = do_bench(m.fn, warmup=1, rep=cuda_rep_ms(est, budget_s, min_reps, m.max_reps),
                          return_mode="all")
            m.times, m.method = [t / 1e3 for t in ts], "triton do_bench"
            m.n = len(m.times)
            return
        except (TypeError, AssertionError, ValueError):  # a triton without return_mode="all"
            pass
    m.method = "cuda events"
    m.n = plan_reps(est, budget_s, min_reps, m.max_reps)
    m.times = [est]
    while len(m.times) < m.n:
        m.times.append(_event_time(m, device))
