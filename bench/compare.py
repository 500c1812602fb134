#!/usr/bin/env python
"""Compare longattn with PyTorch SDPA and compiled FlexAttention, same inputs, same process.

    python bench/compare.py                     # full CPU run (~10-15 min on 2 cores)
    python bench/compare.py --quick             # small subset, < 2 min (smoke check)
    python bench/compare.py --cases window lambda --reps 3
    python bench/compare.py --impls sdpa,flex   # baselines only (no longattn needed)
    python bench/compare.py --check             # correctness of every impl at small L first
    python bench/compare.py --device cuda       # bf16, L = 4K/16K/64K, head dim 64/128

Each (case, impl, mode) is warmed up (FlexAttention: first call compiles, timed separately), then
timed as the median of up to --reps calls (fewer when one call is slow, see --time-budget); the
calls of all implementations of a case are interleaved round-robin (bench/timing.py; on CUDA
triton's do_bench). Shared machine: absolute times drift, compare the ratios within one run.
Writes <out>/results.json, <out>/results.md and <out>/compare.png.
"""
from __future__ import annotations

import argparse
import gc
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import cases as C  # noqa: E402
import core  # noqa: E402
import report  # noqa: E402
import runinfo  # noqa: E402
from correctness import check  # noqa: E402
from plot import plot  # noqa: E402

# Performance targets (from the issue), checked when their cases are in the run.
# (label, case, mode, kind, other, threshold): kind "speedup" = other_ms / longattn_ms >= threshold;
# "relative" = longattn_ms(case) / longattn_ms(other case) <= threshold; "report" = no threshold.
TARGETS = [
    ("dense causal fwd: longattn vs SDPA is_causal", "causal_L4096", C.FWD, "speedup", "sdpa", None),
    ("dense causal fwd+bwd: longattn vs SDPA is_causal", "causal_L4096", C.FWDBWD, "speedup", "sdpa", None),
    ("window 512 @16K fwd: longattn vs compiled FlexAttention", "window512_L16384", C.FWD, "speedup", "flex", 2.0),
    ("window 512 @16K fwd: longattn vs SDPA dense bool mask", "window512_L16384", C.FWD, "speedup", "sdpa", 10.0),
    ("lambda (64 sinks + w1024) @32K fwd / window 1024 alone", "lambda_s64_w1024_L32768", C.FWD, "relative",
     "window1024_L32768", 1.2),
    ("lambda (64 sinks + w1024) @32K fwd+bwd / window 1024 alone", "lambda_s64_w1024_L32768", C.FWDBWD,
     "relative", "window1024_L32768", 1.2),
    ("lambda @32K fwd: longattn vs compiled FlexAttention", "lambda_s64_w1024_L32768", C.FWD, "speedup", "flex", None),
    ("dilated @8K fwd: longattn vs SDPA dense log-multiplicity masks", "dilated_L8192", C.FWD, "speedup", "sdpa", None),
    ("dilated @8K fwd+bwd: longattn vs SDPA dense masks", "dilated_L8192", C.FWDBWD, "speedup", "sdpa", None),
    ("dilated @8K fwd: longattn vs compiled FlexAttention", "dilated_L8192", C.FWD, "speedup", "flex", None),
    ("dilated @16K fwd: longattn vs SDPA dense masks", "dilated_L16384", C.FWD, "speedup", "sdpa", None),
    ("dilated @16K fwd: longattn vs compiled FlexAttention", "dilated_L16384", C.FWD, "speedup", "flex", None),
    # quick-run analogues
    ("[quick] window 256 @4K fwd: longattn vs FlexAttention", "window256_L4096", C.FWD, "speedup", "flex", None),
    ("[quick] window 256 @4K fwd: longattn vs SDPA dense mask", "window256_L4096", C.FWD, "speedup", "sdpa", None),
    ("[quick] lambda (16 sinks + w256) @4K fwd / window alone", "lambda_s16_w256_L4096", C.FWD, "relative",
     "window256_L4096", 1.2),
    ("[quick] lambda (16 sinks + w256) @4K fwd+bwd / window alone", "lambda_s16_w256_L4096", C.FWDBWD,
     "relative", "window256_L4096", 1.2),
]


# ----------------------------------------------------------------------------------------------
def groups_of(cases):
    """Cases measured together: a case with relative_to joins the group of that case."""
    names = {c.name: c for c in cases}
    groups, where = [], {}
    for c in cases:
        if c.relative_to in names and c.relative_to in where:
            groups[where[c.relative_to]].append(c)
            where[c.name] = where[c.relative_to]
        else:
            where[c.name] = len(groups)
            groups.append([c])
    return groups


def run(args) -> dict:
    device = args.device
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.float32 if device == "cpu" else torch.bfloat16)
    cases = C.default_cases(device, args.quick)
    if args.cases:
        sel = [c for c in cases if any(s == c.name or s == c.family or s in c.name for s in args.cases)]
        if not sel:
            sys.exit(f"error: no case matches {args.cases}; cases: {', '.join(c.name for c in cases)}")
        cases = sel
    impls = [i.strip() for i in args.impls.split(",") if i.strip()]
    for i in impls:
        if i not in C.IMPLS:
            sys.exit(f"error: unknown impl {i!r} (known: {', '.join(C.IMPLS)})")
    if "longattn" in impls:
        try:
            C.import_longattn()
        except ImportError as e:
            sys.exit(f"error: {e}\n  build/install it first (pip install -e . in the repo), or measure the "
                     f"baselines alone with --impls sdpa,flex")

    info = runinfo.collect(device, dtype)
    print(f"# longattn benchmark  {info['date']}")
    print(f"machine: {info['host_cpu']} ({info['cpu_flags']}), {info['logical_cpus']} logical CPUs, "
          f"torch threads {info['torch_threads']}, load {info.get('loadavg', '?')}"
          + (f", GPU {info['gpu']}" if "gpu" in info else ""))
    print(f"torch {info['torch']}, python {info['python']}, device {device}, dtype {info['dtype']}")
    print(f"longattn: {info['longattn']}")
    print(f"command: {info['command']}\n", flush=True)

    if args.check:
        ok = check(cases, impls, device, dtype, args)
        if args.check_only:
            sys.exit(0 if ok else 1)
        if not ok and not args.keep_going:
            sys.exit("error: correctness check failed (use --keep-going to time anyway)")

    opts = dict(device=device, dtype=dtype, mask_budget_gib=args.mask_budget_gib,
                max_dense_gflop=args.sdpa_max_gflop, layout=args.baseline_layout)
    tasks = [(c, i, m) for c in cases for i in impls for m in c.modes]
    records = []
    try:
        from tqdm import tqdm
        bar = tqdm(total=len(tasks), unit="run", dynamic_ncols=True, disable=args.no_progress)
    except ImportError:  # pragma: no cover
        bar = None
    t_start = time.perf_counter()
    for group in groups_of(cases):
        inputs, runners = {}, {}
        for case in group:
            inputs[case.name] = C.make_inputs(case, device, dtype)
            for impl in impls:
                if bar:
                    bar.set_postfix_str(f"{case.name} {impl} setup")
                try:
                    runners[case.name, impl] = C.build(impl, case, **opts)
                except C.Skip as e:
                    runners[case.name, impl] = f"skipped: {e}"
        for mode in C.MODES:
            entries, recs = [], {}
            for case in group:
                if mode not in case.modes:
                    continue
                q, k, v, do = inputs[case.name]
                for impl in impls:
                    runner = runners[case.name, impl]
                    rec = dict(case=case.name, family=case.family, impl=impl, mode=mode, shape=case.shape_desc(),
                               mask=case.mask_desc(), density=case.density(), visible_pairs=case.visible_pairs(),
                               flops=case.flops(mode), ms=None)
                    recs[case.name, impl] = rec
                    records.append(rec)
                    if isinstance(runner, str):
                        rec["note"] = runner
                    elif mode in runner.skip:
                        rec.update(note=f"skipped: {runner.skip[mode]}", setup_s=round(runner.setup_s, 3))
                    else:
                        rec.update(note=runner.note, setup_s=round(runner.setup_s, 3))
                        reps = min(args.reps, case.max_reps or args.reps)
                        entries.append(core.Entry(rec, C.make_step(runner, mode, q, k, v, do), case.flops(mode),
                                                  reps, extra_warmup=(impl == "flex")))
                        continue
                    bar and bar.update(1)
            core.measure(entries, device, args.time_budget, core.CPU_FIELDS,
                         progress=bar.set_postfix_str if bar else None)
            for e in entries:
                rec = e.rec
                if rec["ms"] is not None and rec["impl"] == "flex":
                    rec["compile_s"] = round(max(0.0, rec["first_call_s"] - rec["ms"] / 1e3), 2)
                    rec["note"] += f"; compile {rec['compile_s']:.1f} s, mask {rec['setup_s']:.1f} s"
                bar and bar.update(1)
            del entries
            gc.collect()
        del inputs, runners
        gc.collect()
    if bar:
        bar.close()
    wall = time.perf_counter() - t_start

    core.set_speedups(records)
    best = core.best_alternatives(records)
    targets = evaluate_targets(records, cases)
    result = dict(meta=info, wall_s=round(wall, 1),
                  flop_convention="forward = 4*D*visible_pairs (summed over B,H); fwd+bwd = 3.5x forward "
                                  "(FA2: backward = 2.5x forward); dilated: pairs summed over configs",
                  cases=[dict(name=c.name, family=c.family, shape=c.shape_desc(), mask=c.mask_desc(),
                              visible_pairs=c.visible_pairs(), density=c.density(),
                              work_reduction_vs_causal=c.causal_pairs() / c.visible_pairs(),
                              desc=c.desc) for c in cases],
                  records=records, targets=targets, best_alternatives=best)
    return result


def evaluate_targets(records, cases):
    recs = {(r["case"], r["mode"], r["impl"]): r for r in records}
    names = {c.name for c in cases}
    out = []
    for label, case, mode, kind, other, thr in TARGETS:
        if case not in names:
            continue
        a = recs.get((case, mode, "longattn"))
        if kind == "speedup":
            val = core.paired_ratio(recs.get((case, mode, other)), a)
            txt = None if val is None else f"longattn {val:.2f}x faster" if val >= 1 else f"longattn {1 / val:.2f}x slower"
            ok = None if (val is None or thr is None) else val >= thr
            goal = f">= {thr:g}x" if thr else "report"
        elif kind == "relative":
            val = core.paired_ratio(a, recs.get((other, mode, "longattn")))
            txt = None if val is None else f"{val:.3f}x the window's cost"
            ok = None if (val is None or thr is None) else val <= thr
            goal = f"<= {thr:g}x"
        else:
            continue
        if val is None:
            want = {(case, "longattn"), (other, "longattn") if kind == "relative" else (case, other)}
            missing = [r for r in records if (r["case"], r["impl"]) in want and r["mode"] == mode and r["ms"] is None]
            txt = "n/a" + (f" ({missing[0]['impl']}: {missing[0]['note']})" if missing else " (not measured)")
        out.append(dict(label=label, case=case, mode=mode, value=val, goal=goal, ok=ok, text=txt))
    return out


# ----------------------------------------------------------------------------------------------
def print_table(result, file=sys.stdout):
    recs = result["records"]
    cases = result["cases"]
    hdr = ("case", "mode", "impl", "ms", "GFLOP/s", "longattn speedup", "note")
    rows = []
    for c in cases:
        first = True
        for mode in C.MODES:
            for r in [r for r in recs if r["case"] == c["name"] and r["mode"] == mode]:
                sp = r.get("longattn_speedup")
                rows.append((c["name"] if first else "", mode, r["impl"], report.fmt_ms(r["ms"]),
                             "-" if r.get("gflops") is None else f"{r['gflops']:.1f}",
                             "-" if sp is None else f"{sp:.2f}x", r.get("note", "")))
                first = False
    for line in report.markdown_table(hdr, rows, free_last=True):
        print(line, file=file)
    print(file=file)
    print("Cases:", file=file)
    for c in cases:
        print(f"- {c['name']}: {c['shape']}, {c['mask']}; visible {100 * c['density']:.2f}% of LxL, "
              f"work reduction vs dense causal {c['work_reduction_vs_causal']:.2f}x", file=file)
    print(f"\nGFLOP/s on the visible area: {result['flop_convention']}. "
          f"'longattn speedup' = median over the interleaved rounds of impl time / longattn time (> 1: longattn faster; ratio of the medians when under 3 rounds); ratios between cases likewise. ms = median.", file=file)
    if result["targets"]:
        print("\nTargets:", file=file)
        for t in result["targets"]:
            mark = {True: "PASS", False: "MISS", None: "    "}[t["ok"]]
            print(f"- [{mark}] {t['label']} ({t['mode']}): {t['text']}  (goal {t['goal']})", file=file)
    best = core.best_alternative_lines(result.get("best_alternatives", []))
    if best:
        print("\n" + "\n".join(best), file=file)
    comp = [r for r in recs if r.get("compile_s") is not None]
    if comp:
        print("\nFlexAttention first call (compile + one run) / BlockMask build:", file=file)
        for r in comp:
            print(f"- {r['case']} {r['mode']}: first call {r['first_call_s']:.1f} s "
                  f"(compile ~{r['compile_s']:.1f} s), block mask {r['setup_s']:.1f} s", file=file)
    print(f"\nwall time {result['wall_s']:.0f} s", file=file)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small subset, < 2 min")
    ap.add_argument("--cases", nargs="+", help="case names, families (causal/window/lambda/dilated) or substrings")
    ap.add_argument("--impls", default=",".join(C.IMPLS), help="comma list of longattn,sdpa,flex")
    ap.add_argument("--reps", type=int, default=5, help="max timed reps per measurement (median reported)")
    ap.add_argument("--time-budget", type=float, default=15.0,
                    help="seconds of timed reps per measurement; slow calls get fewer reps (min 1)")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "out"))
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default=None, help="float32 (cpu default) / bfloat16 (cuda default) / float16")
    ap.add_argument("--mask-budget-gib", type=float, default=2.0, help="max dense SDPA mask memory")
    ap.add_argument("--sdpa-max-gflop", type=float, default=1000.0,
                    help="skip dense-mask SDPA when the full LxL work of a call exceeds this")
    ap.add_argument("--baseline-layout", choices=("view", "contiguous"), default="view",
                    help="baselines get q.transpose(1,2) views (default) or (B,H,L,D) contiguous copies")
    ap.add_argument("--check", action="store_true", help="check every impl against a reference first")
    ap.add_argument("--check-only", action="store_true", help="run the check and exit (status 1 on failure)")
    ap.add_argument("--check-L", type=int, default=512)
    ap.add_argument("--cold-compile", action="store_true",
                    help="use an empty inductor cache, so the reported FlexAttention compile times are cold "
                         "(default: the on-disk cache of earlier runs makes them shorter)")
    ap.add_argument("--keep-going", action="store_true")
    ap.add_argument("--no-progress", action="store_true")
    ap.add_argument("--report", metavar="RESULTS_JSON", help="re-render the table/plot of a saved run (no timing)")
    args = ap.parse_args(argv)
    args.check = args.check or args.check_only
    if args.cold_compile:  # a fresh inductor cache: FlexAttention first calls show the full compile time
        import tempfile
        import atexit
        import shutil
        tmp = tempfile.mkdtemp(prefix="longattn_bench_inductor_")
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = tmp
        atexit.register(shutil.rmtree, tmp, True)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        sys.exit("error: --device cuda but torch.cuda.is_available() is False")

    if args.report:  # re-render a saved run (recomputing the ratios and targets)
        result = report.read_json(args.report)
        recs = result["records"]
        core.set_speedups(recs)
        result["best_alternatives"] = core.best_alternatives(recs)
        names = [argparse.Namespace(name=c["name"]) for c in result["cases"]]
        result["targets"] = evaluate_targets(recs, names)
    else:
        result = run(args)
    print()
    print_table(result)
    os.makedirs(args.out, exist_ok=True)
    jpath = os.path.join(args.out, "results.json")
    report.write_json(jpath, result)
    mpath = os.path.join(args.out, "results.md")
    with open(mpath, "w") as f:  # the same report, ready to paste into bench/RESULTS.md
        m = result["meta"]
        f.write(f"- date: {m['date']}\n- machine: {m['host_cpu']} ({m['cpu_flags']}), {m['logical_cpus']} logical "
                f"CPUs, torch threads {m['torch_threads']}, load at start {m.get('loadavg', '?')}\n"
                f"- torch {m['torch']}, device {m['device']}, dtype {m['dtype']}\n- longattn: `{m['longattn']}`\n"
                f"- command: `{m['command']}`\n\n")
        print_table(result, file=f)
    ppath = os.path.join(args.out, "compare.png")
    wrote = plot(result, ppath)
    print(f"\nwrote {jpath}, {mpath}" + (f" and {ppath}" if wrote else ""))


if __name__ == "__main__":
    main()
