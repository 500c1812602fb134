"""Ring attention followed by other collectives and a process-group teardown, many times over,
counting the runs in which a rank did not exit cleanly.

Every run starts ``world`` fresh processes. Each rank runs ring_attention forward and backward
for every layout and mode and checks the gathered output against single-process attention,
then runs an all_reduce, an all_gather and an unshard (taking turns at being the last
collective before the teardown, which is where a late release by gloo's worker threads bites:
docs/ring_teardown.md), calls ``destroy_process_group()`` and leaves normally. A run fails when
a rank exits with anything but 0 (an abort is -6, SIGABRT) or did not report every check passed.

    python tests/ring_stress.py --runs 200                 # world sizes 2, 3 and 4, gloo
    python tests/ring_stress.py --runs 50 --world 3 --backend nccl   # one GPU per rank

tests/test_ring_teardown.py runs a short version in the suite.
"""
from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import multiprocessing
import os
import sys
import tempfile
import time
import traceback

import torch
import torch.distributed as dist

_HERE = os.path.dirname(os.path.abspath(__file__))
_PY = os.path.join(os.path.dirname(_HERE), "python")
if importlib.util.find_spec("longattn") is None and os.path.isdir(_PY):
    sys.path.insert(0, _PY)     # run by hand from a checkout

import longattn  # noqa: E402  (before init_process_group, as in any program)
from longattn import ring  # noqa: E402

LAST_COLLECTIVES = ("unshard", "all_reduce", "all_gather")
TIMEOUT_S = 30          # ring_attention's own timeout inside a run
RUN_DEADLINE_S = 180    # a run that takes longer counts as failed (a hang)


def _init(rank, world, store, backend):
    extra = {}
    if backend == "nccl":
        torch.cuda.set_device(rank)
        extra = dict(device_id=torch.device("cuda", rank))
    dist.init_process_group(backend, init_method=f"file://{store}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60), **extra)
    return torch.device("cuda", rank) if backend == "nccl" else torch.device("cpu")


def _ring_checks(rank, world, device, seed):
    """ring_attention forward and backward for every layout and mode; returns the last call's
    (local output, layout, expected full output)."""
    g = torch.Generator().manual_seed(seed)
    L = 8 * world + 3
    out = None
    for mode in ring.MODES:
        for layout in ring.LAYOUTS:
            q, k, v = (torch.randn(1, L, 2, 8, generator=g, dtype=torch.float64).to(device)
                       for _ in "qkv")
            want = longattn.attention(q, k, v, causal=True, window=(11, 0))
            local = [ring.shard(t, layout=layout).requires_grad_() for t in (q, k, v)]
            out = longattn.ring_attention(*local, layout=layout, mode=mode, causal=True,
                                          window=(11, 0), timeout=TIMEOUT_S)
            out.sum().backward()
            assert all(t.grad is not None and torch.isfinite(t.grad).all() for t in local)
            torch.testing.assert_close(ring.unshard(out.detach(), layout=layout), want,
                                       atol=1e-10, rtol=0)
    return out.detach(), layout, want


def _collective(name, rank, world, device, out, layout, want):
    if name == "all_reduce":
        t = torch.full((3,), float(rank), device=device)
        dist.all_reduce(t)
        assert t.tolist() == [world * (world - 1) / 2] * 3, t
    elif name == "all_gather":
        parts = [torch.empty(2, device=device) for _ in range(world)]
        dist.all_gather(parts, torch.full((2,), float(rank), device=device))
        assert [p[0].item() for p in parts] == list(range(world))
    else:
        torch.testing.assert_close(ring.unshard(out, layout=layout), want, atol=1e-10, rtol=0)


def stress_worker(rank, world, store, out_path, backend, run):
    """One rank of one run: the checks, the collectives (``LAST_COLLECTIVES[run % 3]`` last),
    the teardown; writes "ok" or the traceback to ``out_path``."""
    torch.set_num_threads(1)
    device = _init(rank, world, store, backend)
    status = "ok"
    try:
        checked = _ring_checks(rank, world, device, seed=1000 * world + run)
        last = LAST_COLLECTIVES[run % len(LAST_COLLECTIVES)]
        for name in [n for n in LAST_COLLECTIVES if n != last] + [last]:
            _collective(name, rank, world, device, *checked)
    except Exception:  # noqa: BLE001  (reported to the parent)
        status = traceback.format_exc()
    with open(out_path, "w") as f:
        json.dump(status, f)
    dist.destroy_process_group()
    # and leave normally: interpreter shutdown is part of what is being tested


def spawn_ranks(target, world, args_for, deadline_s=RUN_DEADLINE_S):
    """Start ``target(rank, *args_for(rank))`` in ``world`` fresh processes and wait for all of
    them (a hang past ``deadline_s`` kills them); returns their exit codes (None: killed)."""
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=target, args=(r,) + tuple(args_for(r))) for r in range(world)]
    for p in procs:
        p.start()
    deadline = time.monotonic() + deadline_s
    for p in procs:
        p.join(max(0.0, deadline - time.monotonic()))
    codes = []
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join()
            codes.append(None)
        else:
            codes.append(p.exitcode)
    return codes


def run_once(world, run, backend="gloo", workdir=None):
    """One run; returns "" when every rank checked out and exited with 0, else why not."""
    with tempfile.TemporaryDirectory(dir=workdir) as d:
        paths = [os.path.join(d, f"rank{r}.json") for r in range(world)]
        codes = spawn_ranks(stress_worker, world,
                            lambda r: (world, os.path.join(d, "store"), paths[r], backend, run))
        problems = []
        for r, (code, path) in enumerate(zip(codes, paths)):
            status = "no result"
            if os.path.exists(path):
                with open(path) as f:
                    status = json.load(f)
            if status != "ok":
                problems.append(f"rank {r}: {status}")
            if code != 0:
                problems.append(f"rank {r} exit code {code}" + (" (SIGABRT)" if code == -6 else
                                                                 " (hung, killed)" if code is None
                                                                 else ""))
        return "\n".join(problems)


def stress(worlds, runs, backend="gloo", log=None):
    """``runs`` runs for each world size; returns {world: [why each failed run failed]}."""
    failures = {}
    for world in worlds:
        failures[world] = []
        for run in range(runs):
            why = run_once(world, run, backend)
            if why:
                failures[world].append(f"run {run}: {why}")
            if log:
                log(f"world {world} run {run + 1}/{runs}: {'FAILED ' + why if why else 'ok'}")
    return failures


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", type=int, default=20, help="runs per world size")
    p.add_argument("--world", type=int, nargs="+", default=[2, 3, 4])
    p.add_argument("--backend", choices=["gloo", "nccl"], default="gloo")
    a = p.parse_args(argv)
    t0 = time.monotonic()
    failures = stress(a.world, a.runs, a.backend, log=lambda s: print(s, flush=True))
    total = sum(len(f) for f in failures.values())
    for world, f in failures.items():
        print(f"world {world}: {len(f)} of {a.runs} runs failed")
    print(f"{total} failed runs of {a.runs * len(a.world)} in {time.monotonic() - t0:.0f} s")
    return 1 if total else 0


if __name__ == "__main__":
    sys.exit(main())
