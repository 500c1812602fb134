"""Ring attention across processes (gloo, CPU tensors) against single-process attention.

One process group per world size (1, 2, 3, 4) runs every case of that size and writes one
result per (case, rank) to a file; the parametrized tests below read them, so spawning stays
at four groups. Each rank builds the full inputs from a seed, runs ``longattn.attention`` on
the whole sequence as the reference, and compares its shard of out, lse, dq, dk and dv.
Tolerances (absolute, unit-variance inputs): float64 1e-10; float32 1e-5 (out, lse) and 5e-5
(gradients); bfloat16 3e-2; the CUDA-only fp16/bf16 cases at head dims 64/128: 2e-2 plus 2e-2
relative.
Every spawn has a deadline (and pytest-timeout a per-test limit), so a hang fails.

The same cases run on CUDA tensors when the build has CUDA: world size 1 on one GPU (no
communication), and 2 ranks on NCCL with two GPUs or more; the reference is then the
single-process CUDA attention.
"""
from __future__ import annotations

import datetime
import json
import os
import random
import time
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import longattn
from longattn import ring
from longattn.attention import UNBOUNDED

WORLD_SIZES = (1, 2, 3, 4)
SPAWN_DEADLINE_S = 150
TIMEOUT_S = 20  # ring_attention's own per-wait timeout inside the workers

MASKS = {
    "causal": dict(causal=True),
    "noncausal": dict(causal=False),
    "window": dict(causal=True, window=(5, 0)),
    "lambda": dict(causal=True, window=(4, 0), sinks=3),
    "window2sided": dict(causal=False, window=(3, 2)),
    # rows with no visible key at all (out 0, lse -inf): the merge must stay NaN-free
    "emptyrows": dict(causal=False, window=(6, -2), sinks=2),
}


def _cases(W: int) -> dict:
    even, uneven = 8 * W, 8 * W + 3     # uneven: not a multiple of 2W (nor of W for W > 1)
    cases = {}
    for layout in ring.LAYOUTS:
        for i, (name, mask) in enumerate(MASKS.items()):
            gqa = name in ("lambda", "noncausal")
            cases[f"{layout}-{name}-f64"] = dict(
                layout=layout, mask=mask, dtype="float64", L=uneven if i % 2 else even,
                H=4 if gqa else 2, Hk=2)
        cases[f"{layout}-causal-f32"] = dict(layout=layout, mask=MASKS["causal"],
                                             dtype="float32", L=uneven)
        cases[f"{layout}-lambda-gqa-f32"] = dict(layout=layout, mask=MASKS["lambda"],
                                                 dtype="float32", L=even, H=4, Hk=1)
        cases[f"{layout}-allgather-lambda-gqa-f64"] = dict(
            layout=layout, mask=MASKS["lambda"], dtype="float64", L=uneven, H=4, Hk=2,
            mode="allgather")
        cases[f"{layout}-allgather-noncausal-f64"] = dict(
            layout=layout, mask=MASKS["noncausal"], dtype="float64", L=even, mode="allgather")
    scores = dict(softcap=5.0, logn_base=8.0, scale=0.3, alibi=True)
    for layout in ("contiguous", "zigzag"):
        cases[f"{layout}-scores-f64"] = dict(
            layout=layout, mask=dict(causal=False, window=(6, 1)), dtype="float64", L=uneven,
            extra=scores)
    cases["stripe-softcap-window-f64"] = dict(
        layout="stripe", mask=dict(causal=True, window=(7, 0), sinks=1), dtype="float64",
        L=uneven, extra=dict(softcap=3.0, scale=0.5))
    # contiguous shards of any lengths (one rank may even hold nothing)
    lengths = [5, 0, 9, 2][:W] if W > 1 else [7]
    cases["contiguous-custom-lengths-f64"] = dict(layout="contiguous", mask=MASKS["lambda"],
                                                  dtype="float64", L=sum(lengths),
                                                  lengths=lengths)
    # the learned sink logit (gpt-oss): merged once after the ring; its gradient is summed
    # over ranks by the test
    cases["zigzag-lambda-sinklogits-f64"] = dict(layout="zigzag", mask=MASKS["lambda"],
                                                 dtype="float64", L=uneven, H=4, Hk=2,
                                                 extra=dict(sink_logits=True))
    cases["stripe-emptyrows-sinklogits-f64"] = dict(layout="stripe", mask=MASKS["emptyrows"],
                                                    dtype="float64", L=even,
                                                    extra=dict(sink_logits=True))
    cases["contiguous-allgather-sinklogits-f32"] = dict(
        layout="contiguous", mask=MASKS["window"], dtype="float32", L=uneven, mode="allgather",
        extra=dict(sink_logits=True))
    cases["zigzag-window-bf16"] = dict(layout="zigzag", mask=MASKS["window"], dtype="bfloat16",
                                       L=even, H=4, Hk=2)
    cases["contiguous-window-long-f64"] = dict(layout="contiguous", mask=dict(causal=True,
                                               window=(3, 0)), dtype="float64", L=12 * W)
    for i in range(6):                     # random draws over the option space, fixed seeds
        rnd = random.Random(1000 * W + i)
        window = rnd.choice([None, (rnd.randint(0, 20), rnd.choice([0, 3, None, -1])),
                             (None, rnd.randint(0, 6)), (rnd.randint(0, 30), None)])
        if window and None not in window and window[0] + window[1] < 0:
            window = None
        mask = dict(causal=rnd.random() < 0.6, window=window, sinks=rnd.choice([0, 1, 5]))
        cases[f"random{i}-f64"] = dict(
            layout=rnd.choice(ring.LAYOUTS), mask=mask, dtype="float64",
            L=rnd.randint(1, 12 * W), B=rnd.randint(1, 2), H=rnd.choice([2, 4]), Hk=2,
            mode=rnd.choice(ring.MODES))
    return cases


TOL = {"float64": (1e-10, 1e-10), "float32": (1e-5, 5e-5), "bfloat16": (3e-2, 3e-2)}


def _inputs(spec, seed):
    g = torch.Generator().manual_seed(seed)
    B, L, H, Hk = spec.get("B", 2), spec["L"], spec.get("H", 2), spec.get("Hk", 2)
    D = spec.get("D", 8)
    dtype = getattr(torch, spec["dtype"])
    mk = lambda *shape: torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype)  # noqa
    q, k, v, go = mk(B, L, H, D), mk(B, L, Hk, D), mk(B, L, Hk, D), mk(B, L, H, D)
    gl = torch.randn(B, H, L, generator=g, dtype=torch.float64)
    gl = gl.to(torch.float64 if dtype == torch.float64 else torch.float32)
    return q, k, v, go, gl


def _options(spec, device="cpu"):
    kw = dict(spec["mask"])
    extra = dict(spec.get("extra", {}))
    H = spec.get("H", 2)
    if extra.pop("alibi", False):
        kw["alibi_slopes"] = torch.linspace(0.05, 0.5, H, dtype=torch.float32, device=device)
    if extra.pop("sink_logits", False):
        kw["sink_logits"] = torch.linspace(-1.0, 2.0, H, dtype=torch.float32, device=device)
    kw.update(extra)
    return kw


def _loss(out, lse, go, gl):
    finite = torch.isfinite(lse)
    return (out * go).sum() + (torch.where(finite, lse, 0) * gl).sum()


def _run_case(spec, rank, W, device="cpu"):
    """Raise AssertionError when this rank's shard differs from the single-process result."""
    q, k, v, go, gl = (t.to(device) for t in _inputs(spec, seed=len(spec["layout"]) * 7 +
                                                     spec["L"]))
    kw = _options(spec, device)
    sink = kw.pop("sink_logits", None)
    sinks = [None, None] if sink is None else [sink.clone().requires_grad_() for _ in "ab"]
    if sink is not None and spec["layout"] == "stripe" and q.dtype == torch.float64:
        sinks[1] = sink.double().requires_grad_()    # fp64 sink logits go with fp64 q
    full = [t.clone().requires_grad_() for t in (q, k, v)]
    out, lse = longattn.attention(*full, return_lse=True, sink_logits=sinks[0], **kw)
    _loss(out, lse, go, gl).backward()

    layout = spec["layout"]
    if "lengths" in spec:                  # a custom contiguous split, not shard()'s
        start = sum(spec["lengths"][:rank])
        cut = lambda x, d=1: x.narrow(d, start, spec["lengths"][rank]).contiguous()  # noqa
    else:
        cut = lambda x, d=1: ring.shard(x, layout=layout, seq_dim=d)  # noqa: E731
    local = [cut(t).detach().requires_grad_() for t in (q, k, v)]
    out_l, lse_l = longattn.ring_attention(*local, layout=layout, mode=spec.get("mode", "ring"),
                                           timeout=TIMEOUT_S, return_lse=True,
                                           sink_logits=sinks[1], **kw)
    _loss(out_l, lse_l, cut(go), cut(gl, 2)).backward()

    tol_out, tol_grad = spec["tol"] if "tol" in spec else TOL[spec["dtype"]]
    ref_lse = cut(lse.detach(), 2)
    assert torch.equal(torch.isfinite(lse_l), torch.isfinite(ref_lse)), "fully masked rows"
    assert not torch.isnan(out_l).any(), "NaN in out"
    fin = torch.isfinite(ref_lse)
    checks = [("out", out_l, cut(out.detach()), tol_out),
              ("lse", lse_l[fin], ref_lse[fin], tol_out)]
    checks += [(f"d{n}", a.grad, cut(b.grad), tol_grad) for n, a, b in zip("qkv", local, full)]
    if sink is not None:
        dsink = sinks[1].grad.clone()
        dist.all_reduce(dsink)               # each rank holds its rows' share
        checks.append(("dsink_logits", dsink, sinks[0].grad, 1e-5))
    for name, got, want, tol in checks:
        assert not torch.isnan(got).any(), f"NaN in {name}"
        torch.testing.assert_close(got.double(), want.double(), atol=tol,
                                   rtol=spec.get("rtol", 0),
                                   msg=lambda m, name=name: f"{name}: {m}")


# ---- error handling, compile and failure cases (run inside the W=2 and W=3 groups) ----------

def _expect(fn, exc, *needles):
    try:
        fn()
    except exc as e:
        missing = [s for s in needles if s not in str(e)]
        assert not missing, f"error {e!r} lacks {missing}"
        return
    raise AssertionError(f"no {exc.__name__} raised")


def _small(rank, dtype=torch.float64, n=6, H=2, Hk=1, B=1, requires_grad=False, device="cpu"):
    g = torch.Generator().manual_seed(rank)
    t = [torch.randn(B, n, h, 8, generator=g, dtype=torch.float64).to(device, dtype)
         for h in (H, Hk, Hk)]
    return [x.requires_grad_(requires_grad) for x in t]


def _err_dtype(rank, W, device="cpu"):
    q, k, v = _small(rank, torch.float32 if rank == W - 1 else torch.float64, device=device)
    _expect(lambda: ring.ring_attention(q, k, v, timeout=TIMEOUT_S), ValueError,
            "same dtype", "torch.float32", "torch.float64")


def _err_heads(rank, W):
    q, k, v = _small(rank, H=4 if rank == 0 else 2)
    _expect(lambda: ring.ring_attention(q, k, v, timeout=TIMEOUT_S), ValueError, "heads_q")


def _err_unequal(rank, W):
    q, k, v = _small(rank, n=6 if rank == 0 else 4)
    _expect(lambda: ring.ring_attention(q, k, v, layout="zigzag", timeout=TIMEOUT_S),
            ValueError, "do not form a zigzag split")
    _expect(lambda: ring.ring_attention(q, k, v, layout="stripe", timeout=TIMEOUT_S),
            ValueError, "do not form a stripe split")


def _err_local_input(rank, W):
    q, k, v = _small(rank)
    if rank == 1:
        q = q[0]                            # 3-D on one rank only
        _expect(lambda: ring.ring_attention(q, k, v, timeout=TIMEOUT_S), ValueError,
                "q must be (batch")
    else:
        _expect(lambda: ring.ring_attention(q, k, v, timeout=TIMEOUT_S), ValueError,
                "rank(s) [1] rejected")


def _err_local_arg(rank, W):
    q, k, v = _small(rank)
    layout = "zigzg" if rank == 1 else "zigzag"
    needle = "layout must be one of" if rank == 1 else "rank(s) [1] rejected"
    _expect(lambda: ring.ring_attention(q, k, v, layout=layout, timeout=TIMEOUT_S), ValueError,
            needle)


def _err_stripe_alibi(rank, W):
    q, k, v = _small(rank)
    slopes = torch.ones(2)
    _expect(lambda: ring.ring_attention(q, k, v, layout="stripe", alibi_slopes=slopes,
                                        timeout=TIMEOUT_S), ValueError, "not supported")


def _err_requires_grad(rank, W):
    q, k, v = _small(rank, requires_grad=rank == 0)
    _expect(lambda: ring.ring_attention(q, k, v, timeout=TIMEOUT_S), ValueError,
            "same requires_grad")


def _healthy_after_errors(rank, W):
    q, k, v = _small(rank, n=6)
    out = ring.ring_attention(q, k, v, layout="stripe", timeout=TIMEOUT_S)
    assert out.shape == q.shape and torch.isfinite(out).all()


def _unshard_roundtrip(rank, W, device="cpu"):
    x = torch.arange(3 * (5 * W + 2), dtype=torch.float64, device=device).reshape(3, -1, 1)
    for layout in ring.LAYOUTS:
        part = ring.shard(x, layout=layout, seq_dim=1)
        assert torch.equal(ring.unshard(part, layout=layout, seq_dim=1), x), layout


def _subgroup(rank, W):
    """A ring over ranks 0 and 2 of three: group ranks differ from global ranks."""
    sub = dist.new_group([0, 2])
    try:
        if rank == 1:
            return
        g = torch.Generator().manual_seed(5)
        q, k, v = (torch.randn(1, 14, 2, 8, generator=g, dtype=torch.float64) for _ in "qkv")
        want = longattn.attention(q, k, v, causal=True, window=(4, 0))
        local = [ring.shard(t, sub, layout="zigzag") for t in (q, k, v)]
        got = longattn.ring_attention(*local, group=sub, causal=True, window=(4, 0),
                                      timeout=TIMEOUT_S)
        torch.testing.assert_close(got, ring.shard(want, sub), atol=1e-12, rtol=0)
        torch.testing.assert_close(ring.unshard(got, sub), want, atol=1e-12, rtol=0)
    finally:
        dist.barrier()      # rank 1 must not tear the world down under the others


def _compile(rank, W):
    q, k, v = _small(rank, dtype=torch.float32, n=8, requires_grad=True)

    def f(q, k, v):
        out, lse = longattn.ring_attention(q * 2, k, v, causal=True, window=(3, 0), sinks=1,
                                           return_lse=True, timeout=TIMEOUT_S)
        return out.sin().sum() + lse.sum()

    torch._dynamo.reset()
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    loss_c = compiled(q, k, v)
    grads_c = torch.autograd.grad(loss_c, (q, k, v))
    loss_e = f(q, k, v)
    grads_e = torch.autograd.grad(loss_e, (q, k, v))
    torch.testing.assert_close(loss_c, loss_e)
    for a, b in zip(grads_c, grads_e):
        torch.testing.assert_close(a, b)


def _peer_failure(rank, W, device="cpu"):
    """Rank 1 fails inside the ring; rank 0 must raise promptly, not wait forever."""
    q, k, v = _small(rank, n=6, device=device)
    if rank == 1:
        def boom(*args, **kwargs):
            raise RuntimeError("injected failure")
        ring.comm.Comm.exchange = boom
        _expect(lambda: ring.ring_attention(q, k, v, causal=False, timeout=3), RuntimeError,
                "injected failure")
        time.sleep(1)   # stay alive a moment: rank 0 must get out by its timeout alone
        return
    t0 = time.monotonic()
    _expect(lambda: ring.ring_attention(q, k, v, causal=False, timeout=3), RuntimeError,
            "failed waiting for K/V blocks")
    elapsed = time.monotonic() - t0
    assert elapsed < 15, f"took {elapsed:.1f} s to fail"


SPECIAL = {
    2: ["err_dtype", "err_heads", "err_unequal", "err_local_input", "err_local_arg",
        "err_stripe_alibi", "err_requires_grad", "healthy_after_errors", "unshard_roundtrip",
        "compile",
        "peer_failure"],   # peer_failure breaks the group: keep it last
    3: ["err_dtype", "err_unequal", "healthy_after_errors", "unshard_roundtrip", "subgroup"],
}
_SPECIAL_FNS = {name: globals()["_" + name] for names in SPECIAL.values() for name in names}


# ---- the same on CUDA tensors: one GPU (W=1), and NCCL across two GPUs --------------------------

CUDA_WORLD_SIZES = (1, 2)
# on NCCL, peer_failure checks that the one timed wait at the end of a pass (the hops wait on
# the stream) still turns a peer that never joined into an error
CUDA_SPECIAL = {1: ["unshard_roundtrip"], 2: ["err_dtype", "unshard_roundtrip", "peer_failure"]}


def _cuda_cases(W: int) -> dict:
    cases = _cases(W)
    # fp16/bf16 at head dims 64 and 128 reach the tensor-core kernels (D=8 runs on CUDA cores)
    half = dict(tol=(2e-2, 2e-2), rtol=2e-2)
    cases["zigzag-causal-bf16-d64"] = dict(layout="zigzag", mask=MASKS["causal"],
                                           dtype="bfloat16", L=40 * W + 3, H=4, Hk=2, D=64,
                                           **half)
    cases["contiguous-lambda-f16-d128"] = dict(layout="contiguous", mask=MASKS["lambda"],
                                               dtype="float16", L=40 * W, H=4, Hk=1, D=128,
                                               **half)
    return cases


def _cuda_missing(W: int):
    """Why the W-rank CUDA group cannot run here, or None."""
    if not torch.cuda.is_available() or not longattn.build_info().get("cuda"):
        return "needs a GPU and a CUDA build"
    if torch.cuda.device_count() < W:
        return f"needs {W} GPUs"
    if W > 1 and not dist.is_nccl_available():
        return "needs NCCL"
    return None


def _save(results, out_dir, rank):
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(results, f)


def _worker(rank, W, store, out_dir, device="cpu"):
    torch.set_num_threads(1)
    if device == "cuda":
        torch.cuda.set_device(rank)
        backend = "nccl" if dist.is_nccl_available() else "gloo"
        extra = dict(device_id=torch.device("cuda", rank)) if backend == "nccl" else {}
        cases, special, kw = _cuda_cases(W), CUDA_SPECIAL.get(W, []), dict(device=device)
    else:
        backend, extra, cases, special, kw = "gloo", {}, _cases(W), SPECIAL.get(W, []), {}
    dist.init_process_group(backend, init_method=f"file://{store}", rank=rank, world_size=W,
                            timeout=datetime.timedelta(seconds=60), **extra)
    results = {}
    for name, spec in cases.items():
        try:
            _run_case(spec, rank, W, device)
            results[name] = "ok"
        except Exception:  # noqa: BLE001  (reported to the parent, one entry per case)
            results[name] = traceback.format_exc()
    _save(results, out_dir, rank)
    for name in special:
        try:
            _SPECIAL_FNS[name](rank, W, **kw)
            results[name] = "ok"
        except Exception:  # noqa: BLE001
            results[name] = traceback.format_exc()
        _save(results, out_dir, rank)   # what a rank that dies in a later case has done
    # Tear down as a program would and leave normally: a rank that aborts at teardown or at
    # interpreter shutdown fails test_group_exits_cleanly (docs/ring_teardown.md).
    dist.destroy_process_group()


_RESULTS = {}


def _world(W, tmp_path_factory, device="cpu"):
    """Spawn the W-rank group once; ({case: {rank: "ok" or a traceback}}, why a rank died)."""
    if (W, device) not in _RESULTS:
        d = tmp_path_factory.mktemp(f"ring_{device}_w{W}")
        ctx = mp.start_processes(_worker, args=(W, str(d / "store"), str(d), device), nprocs=W,
                                 join=False, start_method="spawn")
        deadline = time.monotonic() + SPAWN_DEADLINE_S
        died = ""
        while True:
            try:
                if ctx.join(timeout=1):
                    break
            except (mp.ProcessExitedException, mp.ProcessRaisedException) as e:
                died = f"a rank died: {e}"   # keep what the ranks saved
                break
            if time.monotonic() > deadline:
                for p in ctx.processes:
                    p.kill()
                pytest.fail(f"the {W}-rank group did not finish in {SPAWN_DEADLINE_S} s")
        per_rank = []
        for r in range(W):
            f = d / f"rank{r}.json"
            per_rank.append(json.load(open(f)) if f.exists() else {})
        names = set().union(*per_rank)
        _RESULTS[(W, device)] = ({name: {r: per_rank[r].get(name, f"no result ({died})")
                                         for r in range(W)} for name in names}, died)
    return _RESULTS[(W, device)]


def _check(W, name, tmp_path_factory, device="cpu"):
    results, died = _world(W, tmp_path_factory, device)
    res = results.get(name)
    assert res is not None, f"no rank reported {name} ({died or 'not run'})"
    bad = {r: msg for r, msg in res.items() if msg != "ok"}
    assert not bad, "\n".join(f"--- rank {r} ---\n{m}" for r, m in bad.items())


@pytest.mark.timeout(SPAWN_DEADLINE_S + 30)
@pytest.mark.parametrize("W,name", [(W, n) for W in WORLD_SIZES for n in _cases(W)])
def test_matches_single_process(W, name, tmp_path_factory):
    _check(W, name, tmp_path_factory)


@pytest.mark.timeout(SPAWN_DEADLINE_S + 30)
@pytest.mark.parametrize("W,name", [(W, n) for W, names in SPECIAL.items() for n in names])
def test_errors_compile_and_failure(W, name, tmp_path_factory):
    _check(W, name, tmp_path_factory)


@pytest.mark.timeout(SPAWN_DEADLINE_S + 30)
@pytest.mark.parametrize("W", WORLD_SIZES)
def test_group_exits_cleanly(W, tmp_path_factory):
    """Every rank of the group, after all its cases (errors and a broken ring included), tore
    its process group down and exited with 0."""
    _, died = _world(W, tmp_path_factory)
    assert not died, died


@pytest.mark.timeout(SPAWN_DEADLINE_S + 30)
@pytest.mark.parametrize("W,name", [(W, n) for W in CUDA_WORLD_SIZES
                                    for n in list(_cuda_cases(W)) + CUDA_SPECIAL[W]])
def test_cuda_matches_single_process(W, name, tmp_path_factory):
    why = _cuda_missing(W)
    if why:
        pytest.skip(why)
    _check(W, name, tmp_path_factory, "cuda")


@pytest.mark.timeout(SPAWN_DEADLINE_S + 30)
@pytest.mark.parametrize("W", CUDA_WORLD_SIZES)
def test_cuda_group_exits_cleanly(W, tmp_path_factory):
    why = _cuda_missing(W)
    if why:
        pytest.skip(why)
    _, died = _world(W, tmp_path_factory, "cuda")
    assert not died, died


# ---- single-process tests: geometry, schedule, bad input --------------------------------------

def _visible(p, s, causal, left, right, sinks):
    in_window = (left >= UNBOUNDED or s >= p - left) and (right >= UNBOUNDED or s <= p + right)
    return (in_window or s < sinks) and (not causal or s <= p)


def _call_mask(c, nq, nk, causal):
    m = torch.zeros(nq, nk, dtype=torch.bool)
    for i in range(c.q0, c.q1):
        for j in range(c.k0, c.k1):
            m[i, j] = _visible(c.q_start + i - c.q0, c.k_start + j - c.k0, causal, c.left,
                               c.right, c.sinks)
    return m


@pytest.mark.timeout(60)
@pytest.mark.parametrize("seed", range(40))
def test_schedule_reproduces_the_global_mask(seed):
    """The per-pair calls (positions and masks translated to kernel coordinates, stripe
    included) select exactly the globally visible (query, key) pairs; skipped hops see none."""
    rnd = random.Random(seed)
    W, layout = rnd.randint(1, 5), rnd.choice(ring.LAYOUTS)
    L = rnd.randint(0, 40)
    causal = rnd.random() < 0.6
    window = rnd.choice([None, (rnd.randint(0, 12), rnd.choice([0, 2, None, -1])),
                         (None, rnd.randint(0, 5)), (rnd.randint(0, 20), None)])
    if window and None not in window and window[0] + window[1] < 0:
        window = None
    sinks = rnd.choice([0, 0, 1, 3, 9])
    left, right = longattn.window_bounds(window)
    p = ring.plan(L, W, layout, causal=causal, window=window, sinks=sinks)
    pos = [ring.shard_positions(L, layout, r, W).tolist() for r in range(W)]
    assert sorted(x for ps in pos for x in ps) == list(range(L))
    for r in range(W):
        for o in range(W):
            want = torch.tensor([[_visible(a, b, causal, left, right, sinks) for b in pos[o]]
                                 for a in pos[r]], dtype=torch.bool).reshape(len(pos[r]),
                                                                            len(pos[o]))
            got = torch.zeros_like(want)
            for c in p.calls[r][o]:
                m = _call_mask(c, len(pos[r]), len(pos[o]), causal)
                assert not (got & m).any(), "two calls cover one pair"
                got |= m
            assert torch.equal(got, want), (r, o, p.calls[r][o])
    # K/V: every user receives the block once, with the rows it reads, from a rank that holds
    # them; dK/dV: every user sends its share home once.
    held = {(r, r): (0, len(pos[r])) for r in range(W)}
    for m in p.fwd_msgs:
        assert m.kind == 0 and (m.dst, m.block) not in held
        lo, hi = held[(m.src, m.block)]
        assert lo <= m.lo and m.hi <= hi
        held[(m.dst, m.block)] = (m.lo, m.hi)
    for r in range(W):
        for o in range(W):
            if p.calls[r][o]:
                lo, hi = held[(r, o)]
                assert all(lo <= c.k0 and c.k1 <= hi for c in p.calls[r][o])
    homes = sorted((m.src, m.block) for m in p.bwd_msgs if m.kind == 1)
    assert homes == sorted((r, o) for r in range(W) for o in range(W)
                           if r != o and p.calls[r][o])


@pytest.mark.parametrize("mask", list(MASKS))
def test_block_backward_with_global_lse_is_exact(mask):
    """The identity the ring backward rests on: the kernel's backward on one key block, given the
    rows' global out and lse (and dlse), is that block's exact share of dq, dk and dv."""
    g = torch.Generator().manual_seed(1)
    q = torch.randn(2, 30, 4, 8, generator=g, dtype=torch.float64, requires_grad=True)
    k, v = (torch.randn(2, 30, 2, 8, generator=g, dtype=torch.float64, requires_grad=True)
            for _ in "kv")
    kw = MASKS[mask]
    out, lse = longattn.attention(q, k, v, return_lse=True, **kw)
    fin = torch.isfinite(lse)
    go, gl = torch.randn_like(out), torch.randn_like(lse)
    dq, dk, dv = torch.autograd.grad(_loss(out, lse, go, gl), (q, k, v))
    left, right = longattn.window_bounds(kw.get("window"))
    dq_sum = torch.zeros_like(dq)
    for a, b in ((0, 7), (7, 19), (19, 30)):
        dq_b, dk_b, dv_b, _ = torch.ops.longattn.attention_backward(
            go, torch.where(fin, gl, 0), q.detach(), k.detach()[:, a:b], v.detach()[:, a:b],
            out.detach(), lse.detach(), None, None, None, None, 8 ** -0.5, 0.0, 0.0,
            kw["causal"], left, right, kw.get("sinks", 0), 0, a, 30, b - a)
        dq_sum += dq_b
        torch.testing.assert_close(dk_b, dk[:, a:b], atol=1e-12, rtol=0)
        torch.testing.assert_close(dv_b, dv[:, a:b], atol=1e-12, rtol=0)
    torch.testing.assert_close(dq_sum, dq, atol=1e-12, rtol=0)


def test_windowed_schedule_skips_hops_and_transfers():
    # causal window of 16 over 8 contiguous shards of 64: each rank needs its block and the
    # previous one only, and every transfer goes one hop.
    p = ring.plan(512, 8, "contiguous", causal=True, window=(15, 0))
    assert p.computed_hops == 8 + 7
    assert p.transfers == 7
    assert all(m.dst == (m.src + 1) % 8 for m in p.fwd_msgs)
    # and only the last 15 rows of a block are sent on: traffic 7 * 15 of a full ring's 7 * 512
    assert {(m.lo, m.hi) for m in p.fwd_msgs} == {(64 - 15, 64)}
    assert p.traffic_fraction == pytest.approx(15 / 512)
    # plain causal contiguous: half the ring, blocks never wrap around
    p = ring.plan(512, 8, "contiguous", causal=True)
    assert p.computed_hops == 36 and p.transfers == 28
    # zigzag causal: nothing is skipped and every hop does the same work (two 32 x 32 chunk
    # pairs; rank 7's chunks 7 and 8 touch and go as one 64 x 32 call)
    p = ring.plan(512, 8, "zigzag", causal=True)
    assert p.computed_hops == 64
    area = {sum((c.q1 - c.q0) * (c.k1 - c.k0) for c in p.calls[r][o])
            for r in range(8) for o in range(8) if r != o}
    assert area == {2 * 32 * 32}
    # sinks keep block 0 visible to everyone; after rank 1 (window + sinks) only the 4 sink
    # rows travel on, and each user sends home only the dK/dV rows it read
    p = ring.plan(512, 8, "contiguous", causal=True, window=(15, 0), sinks=4)
    assert all(p.need(r, 0) for r in range(8))
    assert [m.hi - m.lo for m in p.fwd_msgs if m.block == 0] == [64] + [4] * 6
    assert [(m.lo, m.hi) for m in p.bwd_msgs if m.block == 0 and m.kind == 1] == \
        [(0, 64)] + [(0, 4)] * 6


def test_shard_unshard_layouts_without_a_group():
    x = torch.arange(2 * 11).reshape(2, 11)
    for layout in ring.LAYOUTS:
        parts = [ring.shard(x, layout=layout, seq_dim=1, rank=r, world_size=3) for r in range(3)]
        assert [p.shape[1] for p in parts] == ring.layout_lengths(11, 3, layout)
        got = torch.cat(parts, 1).sort(dim=1).values
        assert torch.equal(got, x)
    z = ring.shard(torch.arange(8), layout="zigzag", seq_dim=0, rank=0, world_size=2)
    assert z.tolist() == [0, 1, 6, 7]
    s = ring.shard(torch.arange(8), layout="stripe", seq_dim=0, rank=1, world_size=3)
    assert s.tolist() == [1, 4, 7]


def test_uninitialized_process_group_is_a_clear_error():
    assert not dist.is_initialized()
    q = torch.randn(1, 4, 2, 8)
    with pytest.raises(RuntimeError, match="init_process_group"):
        longattn.ring_attention(q, q, q)
    with pytest.raises(RuntimeError, match="init_process_group"):
        ring.shard(q)
    with pytest.raises(ValueError, match="layout must be one of"):
        ring.shard(q, layout="spiral", rank=0, world_size=2)
