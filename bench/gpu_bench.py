#!/usr/bin/env python
"""GPU benchmark: longattn's CUDA attention against PyTorch SDPA, compiled FlexAttention and
flash_attn (when installed), forward and forward+backward TFLOP/s, within a time budget.

    python bench/gpu_bench.py                      # cuda, bf16, L = 4K/16K/64K, hd 64/128 (~3 min)
    python bench/gpu_bench.py --budget-s 120 --out $OUT
    python bench/gpu_bench.py --smoke              # tiny sizes on CPU: every code path, no GPU
    python bench/gpu_bench.py --report OUT/gpu_bench.json   # re-print the table of a saved run

Cases (bench/cases.py's Case: masks, visible-area FLOPs, SDPA dense masks, FlexAttention
BlockMasks): dense causal, causal sliding windows of 512 and 4096 keys, the lambda mask (64 sinks +
window 4096, LM-Infinite's defaults) and LongNet dilated ((2048,1),(4096,2),(8192,4)). Windows of
4096 keys equal causal at L = 4K and are left out there. Shapes fill the GPU the way the
FlashAttention-2 benchmark does: batch x seqlen = 16K tokens (batch 1 from 16K up), hidden 2048
(32 heads at hd 64, 16 at hd 128).

Implementations:
  longattn     longattn.attention / dilated_attention, LONGATTN_CUDA_BACKEND=auto
  flash, simt  the same with LONGATTN_CUDA_BACKEND=flash (tensor cores) / simt (CUDA cores);
               L <= 16K and causal / window 512 only: they show that auto picks the fast path
               and what the tensor-core path buys
  sm90         the same cases with LONGATTN_CUDA_BACKEND=sm90: the Hopper forward (wgmma + TMA;
               the backward of fwd+bwd runs as under auto), on a compute capability 9.0 GPU with a
               build that has the sm90 kernels (skipped otherwise, the reason is printed)
  sdpa         F.scaled_dot_product_attention: causal with the flash backend forced; the masks
               with a dense L x L mask (default backend), skipped when the mask would exceed
               --mask-budget-gib (the reason is printed)
  sdpa_cudnn   SDPA's cuDNN backend, causal only
  flex         torch.compile(flex_attention) with an analytic BlockMask (128 x 128 blocks)
  flash_attn   flash_attn_func (window_size) when the package imports; no sinks/dilation

Measurement (bench/timing.py): one warm-up call (FlexAttention compiles in it), then timed calls
with triton.testing.do_bench (CUDA events around each, the L2 flushed before each by zeroing
256 MiB; the same by hand without triton), as many as fit in --target-ms, between --min-reps and
--max-reps (do_bench sizes the count from its own estimate, so the bounds are approximate there);
the median is reported. On the CPU (--smoke) the calls are timed with the CPU method of
bench/timing.py. TFLOP/s count only the visible (query, key) pairs (FA2 convention: fwd+bwd =
3.5 x forward). Each measured output is compared with longattn's (max |diff|, the `diff` column
of the CSV).

The time budget: jobs run in priority order (the issue's target cases first: L = 16K, hd 128;
then the other shapes, L = 64K dense causal last among them; then flash-vs-simt; then
FlexAttention, whose compiles are slow: forward first). A job starts only while budget is left (FlexAttention jobs need
--flex-min-left-s); what did not fit is listed as 'skipped: time budget'.
Writes <out>/gpu_bench.json, .csv and .md (out: --out, else $OUT, else bench/out/gpu).
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import math
import os
import sys
import time
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import cases as C  # noqa: E402
import core  # noqa: E402
import report  # noqa: E402
import runinfo  # noqa: E402
import timing  # noqa: E402

BACKEND_ENV = "LONGATTN_CUDA_BACKEND"
IMPLS = ("longattn", "flash", "simt", "sm90", "sdpa", "sdpa_cudnn", "flex", "flash_attn")
BACKENDS = ("flash", "simt", "sm90")  # longattn itself with a forced backend, not an alternative to it
FAMILIES = ("causal", "window_short", "window_long", "lambda", "dilated")


@dataclass(frozen=True)
class Sizes:
    """Mask parameters of the case families (full run and --smoke)."""
    window_short: int
    window_long: int
    sinks: int
    segments: tuple
    tokens: int  # batch x seqlen
    hidden: int  # heads x head_dim


FULL = Sizes(512, 4096, 64, ((2048, 1), (4096, 2), (8192, 4)), tokens=16384, hidden=2048)
SMOKE = Sizes(32, 128, 8, ((64, 1), (128, 2), (256, 4)), tokens=512, hidden=128)


def _k(n: int) -> str:
    return f"{n // 1024}K" if n % 1024 == 0 else str(n)


def make_cases(Ls, Ds, families, sz: Sizes) -> list:
    out = []
    for L in Ls:
        for D in Ds:
            B, H = max(1, sz.tokens // L), max(1, sz.hidden // D)
            sfx = f"L{_k(L)}_d{D}"
            for fam in families:
                if fam == "causal":
                    out.append(C.Case(f"causal_{sfx}", "causal", B, H, L, D))
                elif fam == "window_short":
                    w = sz.window_short
                    out.append(C.Case(f"window{w}_{sfx}", "window", B, H, L, D, window=(w - 1, 0)))
                elif fam in ("window_long", "lambda"):
                    w = sz.window_long
                    if w >= L:  # the same mask as causal at this length
                        continue
                    if fam == "window_long":
                        out.append(C.Case(f"window{w}_{sfx}", "window", B, H, L, D, window=(w - 1, 0)))
                    else:
                        out.append(C.Case(f"lambda_s{sz.sinks}_w{w}_{sfx}", "lambda", B, H, L, D,
                                          window=(w - 1, 0), sinks=sz.sinks))
                elif fam == "dilated":
                    out.append(C.Case(f"dilated_{sfx}", "dilated", B, H, L, D, segments=sz.segments))
    return out


# ----------------------------------------------------------------------------------------------
# Implementations
# ----------------------------------------------------------------------------------------------
@dataclass
class Impl:
    runner: C.Runner
    env: dict = dataclasses.field(default_factory=dict)  # environment while it runs (backend)


@contextlib.contextmanager
def environ(env: dict):
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _sdpa_causal_fn(backend, layout="view"):
    from torch.nn.attention import sdpa_kernel

    def fn(q, k, v):
        with sdpa_kernel([backend]):
            return F.scaled_dot_product_attention(C._t(q, layout), C._t(k, layout), C._t(v, layout),
                                                  is_causal=True).transpose(1, 2)
    return fn


def _plain_causal(case) -> bool:
    return case.family == "causal" and case.window is None and not case.sinks


def _sm90_skip(case, device):
    """Raise C.Skip where LONGATTN_CUDA_BACKEND=sm90 cannot run the case."""
    import longattn
    if not device.startswith("cuda"):
        raise C.Skip("the sm90 forward needs CUDA")
    if not longattn.build_info().get("cuda_sm90"):
        raise C.Skip("this build has no sm90 kernels (no 9.x arch in LONGATTN_CUDA_ARCHS)")
    if torch.cuda.get_device_capability(torch.device(device)) != (9, 0):
        raise C.Skip("the sm90 forward runs on compute capability 9.0 only")


def build_impl(impl: str, case, device, dtype, args) -> Impl:
    """An Impl for (impl, case), or raise C.Skip with the reason."""
    opts = dict(device=device, dtype=dtype)
    if impl == "sm90":
        _sm90_skip(case, device)
    if impl in ("longattn", "flash", "simt", "sm90"):
        r = C.build_longattn(case, **opts)
        r.impl = impl
        return Impl(r, env={BACKEND_ENV: "auto" if impl == "longattn" else impl})
    if impl == "sdpa":
        if _plain_causal(case) and device.startswith("cuda"):
            from torch.nn.attention import SDPBackend
            return Impl(C.Runner("sdpa", case, _sdpa_causal_fn(SDPBackend.FLASH_ATTENTION),
                                 note="is_causal, flash backend"))
        return Impl(C.build_sdpa(case, mask_budget_gib=args.mask_budget_gib, max_dense_gflop=math.inf, **opts))
    if impl == "sdpa_cudnn":
        if not _plain_causal(case):
            raise C.Skip("cuDNN SDPA measured on plain causal only")
        if not device.startswith("cuda"):
            raise C.Skip("cuDNN SDPA needs CUDA")
        from torch.nn.attention import SDPBackend
        return Impl(C.Runner("sdpa_cudnn", case, _sdpa_causal_fn(SDPBackend.CUDNN_ATTENTION),
                             note="is_causal, cuDNN backend"))
    if impl == "flex":
        return Impl(C.build_flex(case, **opts))
    if impl == "flash_attn":
        try:
            from flash_attn import flash_attn_func
        except Exception as e:  # noqa: BLE001
            raise C.Skip(f"flash_attn not importable ({type(e).__name__})")
        if case.family == "dilated" or case.sinks:
            raise C.Skip("flash_attn has no sinks / dilation")
        ws = (-1, -1) if case.window is None else tuple(-1 if x is None else int(x) for x in case.window)

        def fn(q, k, v):
            return flash_attn_func(q, k, v, causal=case.causal, window_size=ws)
        return Impl(C.Runner("flash_attn", case, fn, note=f"window_size={ws}"))
    raise ValueError(impl)


# ----------------------------------------------------------------------------------------------
# Inputs
# ----------------------------------------------------------------------------------------------
def make_inputs(case, device, dtype, seed=0):
    """q, k, v, dout (B, L, H, D) drawn on the device (fresh random data, never zeros)."""
    g = torch.Generator(device=device).manual_seed(seed)
    shape = (case.B, case.L, case.H, case.D)
    return tuple(torch.randn(shape, generator=g, device=device, dtype=dtype) for _ in range(4))


def matmul_ceiling(device, dtype) -> Optional[float]:
    """TFLOP/s of one large matrix product in dtype (the chip's practical ceiling, METHOD.md)."""
    if not device.startswith("cuda"):
        return None
    n = 8192
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    m = timing.measure(lambda: a @ b, device, budget_s=0.2, min_reps=5, max_reps=30)
    return 2 * n ** 3 / m.median / 1e12


# ----------------------------------------------------------------------------------------------
# Jobs
# ----------------------------------------------------------------------------------------------
@dataclass
class Job:
    tier: int
    case: C.Case
    impl: str
    mode: str


def compares_backends(case, max_L) -> bool:
    """The cases the forced backends (flash, simt, sm90) are timed on: causal and short windows."""
    short = case.window is None or (case.window[0] is not None and case.window[0] + 1 <= FULL.window_short)
    return case.L <= max_L and case.family in ("causal", "window") and short


def plan(cases, impls, modes, headline_L, headline_D, backends_max_L) -> list:
    """Jobs in priority order (see the module docstring)."""
    jobs = []
    base = [i for i in impls if i in ("longattn", "sdpa", "sdpa_cudnn", "flash_attn")]

    def add(tier, cs, im, ms=modes):
        for c in cs:
            for i in im:
                for m in ms:
                    jobs.append(Job(tier, c, i, m))

    big_causal = [c for c in cases if c.family == "causal" and c.L > headline_L]
    head = [c for c in cases if c.L == headline_L and c.D == headline_D]
    rest = [c for c in cases if c not in head and c not in big_causal]
    add(0, head, base)
    add(1, rest, base)
    add(2, big_causal, base)
    backends = [i for i in impls if i in BACKENDS]
    if backends:
        add(3, [c for c in cases if compares_backends(c, backends_max_L)], backends)
    if "flex" in impls:  # masks before causal, forwards before forward+backward (compiles cost the most)
        head = sorted(head, key=lambda c: c.family == "causal")
        for m in modes:
            add(4, head, ["flex"], [m])
        for m in modes:
            add(5, [c for c in rest if c.L <= headline_L], ["flex"], [m])
    return jobs


class Session:
    """Runs the jobs in order within the deadline. The inputs, implementations and longattn's
    output of one case are kept while its jobs run (jobs of a case are adjacent in a tier)."""

    def __init__(self, args, device, dtype):
        self.args, self.device, self.dtype = args, device, dtype
        self.cuda = device.startswith("cuda")
        self.records = []
        self.case = None
        self.inputs, self.impls, self.ref = None, {}, None

    def switch(self, case):
        if self.case != case.name:
            self.case, self.inputs, self.impls, self.ref = case.name, None, {}, None
            if self.cuda:
                torch.cuda.empty_cache()
            self.inputs = make_inputs(case, self.device, self.dtype)

    def reference_out(self, case):
        """longattn's output (auto backend) on the case's inputs, for the `diff` column."""
        if self.ref is None:
            q, k, v, _ = self.inputs
            with torch.no_grad(), environ({BACKEND_ENV: "auto"}):
                self.ref = C.build_longattn(case).fn(q, k, v)
        return self.ref

    def impl(self, name, case):
        if name not in self.impls:
            try:
                self.impls[name] = build_impl(name, case, self.device, self.dtype, self.args)
            except C.Skip as e:
                self.impls[name] = f"skipped: {e}"
        return self.impls[name]

    def measure(self, job, rec):
        """Fill rec with the timing of job (or the reason it was not timed)."""
        case, mode, args = job.case, job.mode, self.args
        self.switch(case)
        im = self.impl(job.impl, case)
        if isinstance(im, str):
            rec["note"] = im
            return
        if mode in im.runner.skip:
            rec["note"] = f"skipped: {im.runner.skip[mode]}"
            return
        rec["note"] = im.runner.note
        q, k, v, do = self.inputs
        # extra_warmup: a timed warm call sizes the reps (the first may compile) and counts as one
        entry = core.Entry(rec, C.make_step(im.runner, mode, q, k, v, do), case.flops(mode), args.max_reps,
                           extra_warmup=True)
        out = None
        with environ(im.env):
            m, = core.measure([entry], self.device, args.target_ms / 1e3, core.GPU_FIELDS,
                              min_reps=args.min_reps)
            if m.error is not None:
                return
            if mode == C.FWD and job.impl != "longattn":
                with torch.no_grad():
                    out = im.runner.fn(q, k, v)
        if out is not None:
            rec["diff"] = (out.float() - self.reference_out(case).float()).abs().max().item()
        if job.impl == "flex":
            rec["note"] += f"; first call (compile) {m.first:.1f} s"

    def run(self, jobs, deadline):
        t_start = time.perf_counter()
        for n, job in enumerate(jobs):
            case, impl, mode = job.case, job.impl, job.mode
            rec = dict(case=case.name, family=case.family, L=case.L, D=case.D, B=case.B, H=case.H,
                       mask=case.mask_desc(), mode=mode, impl=impl, tier=job.tier, flops=case.flops(mode),
                       ms=None, tflops=None, note="")
            self.records.append(rec)
            left = deadline - time.perf_counter()
            need = self.args.flex_min_left_s * (2 if mode == C.FWDBWD else 1) if impl == "flex" else 1.0
            if left < need:
                rec["note"] = "skipped: time budget"
                continue
            try:
                self.measure(job, rec)
            except Exception as e:  # noqa: BLE001 - one failure must not lose the run
                msg = str(e).strip().splitlines()[0][:200] if str(e).strip() else ""
                rec["note"] = f"error: {type(e).__name__}: {msg}"
            if rec["note"].startswith("error") or (self.args.verbose and rec.get("ms")):
                print(f"[{n + 1}/{len(jobs)} {time.perf_counter() - t_start:4.0f}s] {case.name:28s} {impl:10s} "
                      f"{mode:6s} " + (f"{rec['ms']:9.3f} ms {rec['tflops']:7.1f} TFLOP/s"
                                       if rec.get("ms") else rec["note"]), flush=True)
            if self.cuda and "CUDA error" in rec["note"]:
                # a sticky CUDA error (illegal address, ...) breaks every later launch
                print("stopping: the CUDA context is unusable after this error", flush=True)
                return "stopped after a CUDA error"
        return None


def run(args) -> dict:
    device = args.device
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if device.startswith("cuda")
                                                           else torch.float32)
    sz = SMOKE if args.smoke else FULL
    cases = make_cases(args.L, args.D, args.families, sz)
    impls = [i for i in args.impls if i in IMPLS]
    jobs = plan(cases, impls, args.modes, args.headline_L, args.headline_D, args.simt_max_L)
    C.import_longattn()
    t_start = time.perf_counter()
    info = runinfo.collect(device, dtype)
    info.update(budget_s=args.budget_s, smoke=args.smoke)
    info["headline"] = (args.headline_L, args.headline_D)
    print(header(info), flush=True)
    if device.startswith("cuda"):
        info["matmul_tflops"] = matmul_ceiling(device, dtype)
        print(f"{info['dtype']} 8192^3 matmul: {info['matmul_tflops']:.0f} TFLOP/s (ceiling for comparison)",
              flush=True)
    session = Session(args, device, dtype)
    try:
        info["stopped"] = session.run(jobs, t_start + args.budget_s)
    except KeyboardInterrupt:  # gpu_check.sh stops a run at its cap with SIGINT: keep what finished
        info["stopped"] = f"interrupted after {time.perf_counter() - t_start:.0f} s"
        print(info["stopped"], flush=True)
    info["wall_s"] = round(time.perf_counter() - t_start, 1)
    records = session.records
    # against longattn (auto), same case and mode; jobs run one by one, so ratios of the medians
    core.set_speedups(records)
    best = core.best_alternatives(records, exclude=BACKENDS)
    return dict(meta=info, impls=impls, records=records, jobs=len(jobs), best_alternatives=best,
                flop_convention="visible (query, key) pairs only; forward = 4*D*pairs, fwd+bwd = 3.5x forward")


def header(info) -> str:
    return (f"# longattn GPU benchmark {info['date']} (git {info.get('git', '?')})\n"
            f"{info.get('gpu', info['device'])}; torch {info['torch']} (CUDA {info['cuda']}), {info['dtype']}\n"
            f"longattn: {info['longattn']}")


# ----------------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------------
def table(result) -> str:
    """One row per (case, mode): TFLOP/s of each implementation, longattn's speedup over SDPA and
    FlexAttention. '-' = not measured (the reasons are in the .md/.csv)."""
    recs, impls = result["records"], result["impls"]
    fam = {"causal": 0, "window": 1, "lambda": 2, "dilated": 3}
    first = {}
    for r in recs:
        first.setdefault((r["case"], r["mode"]), (r["L"], r["D"], fam.get(r["family"], 9), len(r["case"]),
                                                  r["case"], C.MODES.index(r["mode"])))
    seen = sorted(first, key=first.get)
    rows = []
    hdr = ["case", "mode"] + [f"{i}" for i in impls] + ["x sdpa", "x flex"]
    for case, mode in seen:
        by = {r["impl"]: r for r in recs if r["case"] == case and r["mode"] == mode}
        if not any(r.get("tflops") for r in by.values()):
            continue
        sp = [by.get(o, {}).get("longattn_speedup") for o in ("sdpa", "flex")]
        tf = [by.get(i, {}).get("tflops") for i in impls]
        rows.append([case, mode] + [report.fmt(t, "{:.0f}" if t is not None and t >= 100 else "{:.3g}") for t in tf]
                    + [report.fmt(s, "{:.2f}x") for s in sp])
    out = report.markdown_table(hdr, rows, right=range(2, len(hdr)))
    m = result["meta"]
    out.append(f"TFLOP/s on the visible area ({result['flop_convention']}); x sdpa / x flex = their time / "
               f"longattn's (> 1: longattn faster). {m.get('gpu', m['device'])}, {m['dtype']}, torch {m['torch']}"
               + (f", matmul ceiling {m['matmul_tflops']:.0f} TFLOP/s" if m.get("matmul_tflops") else "")
               + f"; wall {m.get('wall_s', '?')} s.")
    skipped = [r for r in recs if r["note"] == "skipped: time budget"]
    errors = [r for r in recs if r["note"].startswith("error")]
    unrun = result.get("jobs", len(recs)) - len(recs)
    if m.get("stopped"):
        out.append(f"STOPPED: {m['stopped']}; {unrun} jobs not run")
    if skipped:
        out.append(f"not measured (time budget): {len(skipped)} jobs, e.g. "
                   + ", ".join(f"{r['case']}/{r['impl']}/{r['mode']}" for r in skipped[:4]))
    for r in errors[:6]:
        out.append(f"ERROR {r['case']} {r['impl']} {r['mode']}: {r['note']}")
    bad = [r for r in recs if (r.get("diff") or 0) > 0.1 and r["impl"] not in ("flex",)]
    for r in bad[:6]:
        out.append(f"CHECK {r['case']} {r['impl']}: max|out - longattn out| = {r['diff']:.3g}")
    return "\n".join(out)


def targets(result) -> list:
    """The issue's performance targets (bf16, hd 128, L = 16K), where measured."""
    lines = []
    if result["meta"].get("smoke"):
        return lines
    L, D = result["meta"].get("headline", (16384, 128))
    recs = [r for r in result["records"] if r["L"] == L and r["D"] == D]
    for r in recs:
        if r["impl"] == "longattn" and r["family"] == "causal" and r["mode"] == C.FWD and r.get("tflops"):
            lines.append(f"{r['case']} fwd: {r['tflops']:.0f} TFLOP/s (target >= 350, FA2 level)")
    for r in recs:
        if r["impl"] == "flex" and r["family"] != "causal" and r.get("longattn_speedup"):
            ok = "ok" if r["longattn_speedup"] >= 1.5 else "MISS"
            lines.append(f"{r['case']} {r['mode']}: {r['longattn_speedup']:.2f}x FlexAttention "
                         f"(target >= 1.5x) {ok}")
    return lines


def details(result) -> str:
    """Every record with its note (skip reasons, SDPA/flex setup, errors)."""
    out = ["| case | mode | impl | ms | TFLOP/s | reps | max diff vs longattn | note |",
           "|---|---|---|---|---|---|---|---|"]
    for r in result["records"]:
        ms, tflops, diff = (report.fmt(r.get(k), f) for k, f in (("ms", "{:.3f}"), ("tflops", "{:.1f}"),
                                                                   ("diff", "{:.2g}")))
        out.append(f"| {r['case']} | {r['mode']} | {r['impl']} | {ms} | {tflops} | {r.get('reps', '-')} | {diff} | "
                   f"{r['note']} |")
    return "\n".join(out)


def save(result, out_dir):
    """gpu_bench.json (every rep), .csv (one row per job), .md (table, targets, every job's note)."""
    os.makedirs(out_dir, exist_ok=True)
    report.write_json(os.path.join(out_dir, "gpu_bench.json"), result)
    cols = ["case", "family", "L", "D", "B", "H", "mode", "impl", "ms", "min_ms", "reps", "tflops",
            "longattn_speedup", "diff", "first_s", "tier", "note"]
    report.write_csv(os.path.join(out_dir, "gpu_bench.csv"), result["records"], cols)
    md = header(result["meta"]) + "\n\n" + table(result) + "\n\n"
    t = targets(result)
    if t:
        md += "Targets:\n" + "\n".join(f"- {x}" for x in t) + "\n\n"
    best = core.best_alternative_lines(result.get("best_alternatives", []))
    if best:
        md += "\n".join(best) + "\n\n"
    md += "All measurements:\n\n" + details(result) + "\n"
    report.write_text(os.path.join(out_dir, "gpu_bench.md"), md)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default=None, help="cuda (default) or cpu (--smoke default)")
    ap.add_argument("--dtype", default=None, help="bfloat16 (cuda default) / float16 / float32 (cpu default)")
    ap.add_argument("--smoke", action="store_true", help="tiny sizes (CPU unless --device), ~1 min")
    ap.add_argument("--L", type=int, nargs="+", default=None, help="sequence lengths")
    ap.add_argument("--D", type=int, nargs="+", default=None, help="head dims")
    ap.add_argument("--families", nargs="+", default=list(FAMILIES), choices=FAMILIES)
    ap.add_argument("--impls", default=",".join(IMPLS), help="comma list of " + ",".join(IMPLS))
    ap.add_argument("--modes", nargs="+", default=list(C.MODES), choices=C.MODES)
    ap.add_argument("--budget-s", type=float, default=None, help="start no job after this (default 180; smoke 120)")
    ap.add_argument("--flex-min-left-s", type=float, default=None,
                    help="start a FlexAttention fwd job only with this much budget left (x2 for fwd+bwd)")
    ap.add_argument("--target-ms", type=float, default=150.0, help="timed calls per measurement: ~this long")
    ap.add_argument("--min-reps", type=int, default=3)
    ap.add_argument("--max-reps", type=int, default=50)
    ap.add_argument("--simt-max-L", type=int, default=16384, help="longest L the backends are compared at")
    ap.add_argument("--mask-budget-gib", type=float, default=4.0, help="largest dense SDPA mask")
    ap.add_argument("--headline-L", type=int, default=None, help="the first-priority shape (default 16K)")
    ap.add_argument("--headline-D", type=int, default=128)
    ap.add_argument("--out", default=None)
    ap.add_argument("--report", metavar="JSON", help="print the table of a saved run (no timing)")
    ap.add_argument("--list", action="store_true", help="print the jobs in priority order and exit")
    ap.add_argument("-v", "--verbose", action="store_true", help="one line per job as it finishes")
    args = ap.parse_args(argv)

    if args.report:
        result = report.read_json(args.report)
        print(table(result))
        for t in targets(result):
            print("- " + t)
        return
    args.device = args.device or ("cpu" if args.smoke else "cuda")
    if args.device.startswith("cuda") and not torch.cuda.is_available() and not args.list:
        sys.exit("gpu_bench: --device cuda but torch.cuda.is_available() is False (use --smoke on CPU)")
    args.L = args.L or ([256, 512] if args.smoke else [4096, 16384, 65536])
    args.D = args.D or ([64] if args.smoke else [64, 128])
    args.headline_L = args.headline_L or (512 if args.smoke else 16384)
    if args.smoke and args.headline_D == 128 and 128 not in args.D:
        args.headline_D = args.D[0]
    args.budget_s = args.budget_s if args.budget_s is not None else (120.0 if args.smoke else 180.0)
    if args.flex_min_left_s is None:
        args.flex_min_left_s = 20.0 if args.device.startswith("cuda") else 5.0
    args.impls = [i.strip() for i in args.impls.split(",") if i.strip()]
    unknown = [i for i in args.impls if i not in IMPLS]
    if unknown:
        sys.exit(f"gpu_bench: unknown impl(s) {unknown} (known: {', '.join(IMPLS)})")
    if args.list:
        cases = make_cases(args.L, args.D, args.families, SMOKE if args.smoke else FULL)
        jobs = plan(cases, args.impls, args.modes, args.headline_L, args.headline_D, args.simt_max_L)
        for j in jobs:
            c = j.case
            print(f"tier {j.tier}  {c.name:28s} B={c.B:<2d} H={c.H:<2d} {j.impl:10s} {j.mode:6s} "
                  f"{c.flops(j.mode) / 1e12:8.3f} TFLOP")
        print(f"{len(jobs)} jobs, {len(cases)} cases")
        return
    out_dir = args.out or os.environ.get("OUT") or os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                                                 "out", "gpu")
    result = run(args)
    save(result, out_dir)
    print()
    print(table(result))
    for t in targets(result):
        print("- " + t)
    print(f"(all measurements and skip reasons: {os.path.join(out_dir, 'gpu_bench.md')})")


if __name__ == "__main__":
    main()
