"""Tearing the process group down after ring attention (gloo, CPU tensors; NCCL where there are
two GPUs): every rank must exit cleanly, also after errors.

A rank used to abort now and then ("terminate called without an active exception") when it
left right after a collective: gloo releases a finished collective on a worker thread of its
own, and when that happens during interpreter shutdown the process aborts
(docs/ring_teardown.md). Aborts are rare per run, so besides the stress runs (ring_stress.py;
the long version is marked slow, or run it by hand) deterministic tests check the conditions
themselves: that longattn's collectives return only once the backend has let go of their
tensors (with a backend made to release them late), that nothing longattn does keeps the
process group alive past destroy_process_group(), and that a failed call leaves no work behind.
"""
from __future__ import annotations

import datetime
import json
import os
import threading
import time
import traceback
import weakref

import pytest
import torch
import torch.distributed as dist

import longattn
from longattn import ring
from ring_stress import run_once, spawn_ranks, stress

STRESS_RUNS = int(os.environ.get("LONGATTN_RING_STRESS_RUNS", "10"))


def _init(rank, world, store):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))


def _spawn(target, world, tmp_path, *args):
    """Run ``target`` on ``world`` ranks; returns (exit codes, what each rank reported)."""
    paths = [str(tmp_path / f"rank{r}.json") for r in range(world)]
    codes = spawn_ranks(target, world, lambda r: (world, str(tmp_path / "store"), paths[r]) + args)
    return codes, [_report(p) for p in paths]


def _report(path):
    if not os.path.exists(path):
        return "no result"
    with open(path) as f:
        return json.load(f)


def _assert_clean(codes, reports):
    bad = {r: rep for r, rep in enumerate(reports) if rep != "ok"}
    assert not bad, "\n".join(f"--- rank {r} ---\n{m}" for r, m in bad.items())
    assert codes == [0] * len(codes), f"exit codes {codes} (-6: aborted, None: hung)"


# ---- the stress runs ---------------------------------------------------------------------------

def _skip_unless(backend, world):
    if backend != "nccl":
        return
    if not (torch.cuda.is_available() and longattn.build_info().get("cuda")):
        pytest.skip("needs a GPU and a CUDA build")
    if torch.cuda.device_count() < world or not dist.is_nccl_available():
        pytest.skip(f"needs {world} GPUs and NCCL")


@pytest.mark.timeout(240)
@pytest.mark.parametrize("backend", ["gloo", "nccl"])
@pytest.mark.parametrize("world", [2, 3, 4])
def test_ring_then_collectives_then_teardown(world, backend, tmp_path):
    _skip_unless(backend, world)
    # run = world: each world size ends on another collective (all_gather, unshard, all_reduce)
    why = run_once(world, run=world, backend=backend, workdir=str(tmp_path))
    assert not why, why


@pytest.mark.slow
@pytest.mark.timeout(3600)
@pytest.mark.parametrize("backend", ["gloo", "nccl"])
@pytest.mark.parametrize("world", [2, 3, 4])
def test_teardown_stress(world, backend):
    """LONGATTN_RING_STRESS_RUNS runs (default 10) in a row; not one rank may fail or abort."""
    _skip_unless(backend, world)
    failures = stress([world], STRESS_RUNS, backend)[world]
    assert not failures, f"{len(failures)} of {STRESS_RUNS} runs failed:\n" + \
        "\n".join(failures[:3])


# ---- nothing of a call is left with gloo, and the group is not kept alive -------------------

LATE_RELEASE_S = 0.3


def _release_worker(rank, world, store, out_path):
    """longattn's collectives return only once the backend has let go of their tensors, and
    the default group dies with destroy_process_group() (no reference cycle either)."""
    _init(rank, world, store)
    # gloo drops a finished collective's tensors on a thread of its own a moment after wait()
    # has returned; how long that moment lasts is up to the scheduler, and at process exit
    # it is what aborts. Here every collective longattn calls keeps its tensors for
    # LATE_RELEASE_S more after its wait() on a thread of the test's, so a call that does not
    # wait for the release returns while they are still held, every time. Weak references
    # tell which are alive after the call: all are longattn's own, so one still alive is held
    # by the backend or by a reference cycle (which would hold the process group too).
    handed = []
    real = {n: getattr(dist, n) for n in ("all_gather", "all_reduce")}

    class LateWork:
        def __init__(self, work, tensors):
            self.work, self.tensors = work, tensors

        def wait(self, *args):
            done = self.work.wait(*args)
            held, self.tensors = self.tensors, None
            threading.Thread(target=lambda: (time.sleep(LATE_RELEASE_S), held.clear()),
                             daemon=True).start()
            return done

    def recording(name):
        def collective(*args, async_op=False, **kwargs):
            tensors = [t for a in args for t in (a if isinstance(a, list) else [a])]
            handed.extend(weakref.ref(t) for t in tensors)
            work = LateWork(real[name](*args, async_op=True, **kwargs), tensors)
            del tensors
            if async_op:
                return work
            work.wait()
        return collective

    def still_held(what):
        held = sum(w() is not None for w in handed)
        handed.clear()
        assert held == 0, f"{what}: {held} tensor(s) still held when the call returned"

    status = "ok"
    try:
        for name in real:
            setattr(dist, name, recording(name))
        ref_group = weakref.ref(dist.group.WORLD)
        g = torch.Generator().manual_seed(0)
        x = torch.randn(1, 8 * world, 2, 8, generator=g, dtype=torch.float64)
        for mode in ring.MODES:
            q = ring.shard(x).requires_grad_()
            out = longattn.ring_attention(q, q, q, mode=mode, causal=True, timeout=30)
            still_held(f"{mode} forward")
            out.sum().backward()
            still_held(f"{mode} backward")
        ring.unshard(out.detach())
        still_held("unshard")
        bad = q.detach()[0] if rank == 0 else q.detach()     # 3-D on rank 0 only
        try:
            longattn.ring_attention(bad, bad, bad, timeout=30)
            raise AssertionError("no error on bad input")
        except ValueError:
            pass
        still_held("the metadata exchange of a rejected call")
        for name, fn in real.items():
            setattr(dist, name, fn)
        dist.destroy_process_group()
        # no gc.collect(): a reference cycle holding the group counts as keeping it alive
        assert ref_group() is None, \
            "the default process group outlived destroy_process_group()"
    except Exception:  # noqa: BLE001
        status = traceback.format_exc()
    with open(out_path, "w") as f:
        json.dump(status, f)
    if dist.is_initialized():
        dist.destroy_process_group()


@pytest.mark.timeout(240)
def test_collectives_release_their_tensors_and_the_group(tmp_path):
    _assert_clean(*_spawn(_release_worker, 2, tmp_path))


# ---- a rank that fails ------------------------------------------------------------------------

def _works_reachable(exc):
    """torch.distributed Work objects the exception (its frames' locals, a few levels deep,
    and its causes) still holds."""
    found, seen = [], set()

    def visit(v, depth):
        if id(v) in seen:
            return
        seen.add(id(v))
        if isinstance(v, dist.Work):
            found.append(v)
        elif depth and isinstance(v, (list, tuple, set)):
            for x in v:
                visit(x, depth - 1)
        elif depth and isinstance(v, dict):
            for x in v.values():
                visit(x, depth - 1)
        elif depth and hasattr(v, "__dict__") and not isinstance(v, type) and \
                not callable(v) and type(v).__module__.startswith("longattn"):
            for x in vars(v).values():
                visit(x, depth - 1)

    while exc is not None:
        tb = exc.__traceback__
        while tb is not None:
            for v in tb.tb_frame.f_locals.values():
                visit(v, 3)
            tb = tb.tb_next
        exc = exc.__cause__ or exc.__context__
    return found


def _failure_worker(rank, world, store, out_path, where):
    """Bad input on one rank (every rank raises, the group stays usable), a healthy call, then
    rank 1 failing in the middle of a ring pass (``where``: "forward" or "backward"): it gets
    its own error, the others a timeout error; no work is left behind; teardown."""
    _init(rank, world, store)
    status = "ok"
    try:
        g = torch.Generator().manual_seed(0)
        x = torch.randn(1, 8 * world, 2, 8, generator=g, dtype=torch.float64)
        q = ring.shard(x)
        bad = q[:, :, :, :4] if rank == world - 1 else q          # head_dim differs on one rank
        try:
            longattn.ring_attention(bad, bad, bad, timeout=30)
            raise AssertionError("no error on bad input")
        except ValueError as e:
            assert "head_dim" in str(e), e
        out = longattn.ring_attention(q, q, q, causal=True, timeout=30)
        torch.testing.assert_close(ring.unshard(out), longattn.attention(x, x, x, causal=True),
                                   atol=1e-12, rtol=0)

        real_rows = ring.ring_mode.Blocks.rows

        def rows(self, block, c):
            # a block received from a peer: the step's transfers are posted and in flight
            if block != self.rank:
                raise RuntimeError("injected failure")
            return real_rows(self, block, c)

        qg = q.clone().requires_grad_()
        if where == "backward":
            out = longattn.ring_attention(qg, q, q, causal=True, timeout=3)
        if rank == 1:
            ring.ring_mode.Blocks.rows = rows
        try:
            if where == "forward":
                out = longattn.ring_attention(qg, q, q, causal=True, timeout=3)
            out.sum().backward()
            raise AssertionError("no error")
        except RuntimeError as e:
            want = "injected failure" if rank == 1 else "ring_attention: rank"
            assert want in str(e), e
            left = _works_reachable(e)
            assert not left, f"{len(left)} work(s) still held by the error"
        finally:
            ring.ring_mode.Blocks.rows = real_rows
    except Exception:  # noqa: BLE001
        status = traceback.format_exc()
    with open(out_path, "w") as f:
        json.dump(status, f)
    dist.destroy_process_group()


@pytest.mark.timeout(240)
@pytest.mark.parametrize("world,where", [(3, "forward"), (2, "backward")])
def test_rank_failing_mid_pass_then_teardown(world, where, tmp_path):
    _assert_clean(*_spawn(_failure_worker, world, tmp_path, where))
