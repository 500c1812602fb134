"""RoPE attention with the training-free extension remaps: the fused op
(``torch.ops.longattn.rope_attention``, RoPE applied inside the kernel) against plain causal
attention on q and k rotated beforehand (the cost floor: one score set, no rotation) and against
the two-pass composition (``fused=False``: q and k rotated per side, two attention calls,
merged by their log-sum-exp; plain RoPE: ``apply_rope`` then ``attention``). Forward and
forward+backward times, and the peak memory each call adds.

    python bench/bench_extend.py              # CPU, fp32
    python bench/bench_extend.py --quick      # shorter sequence, fewer reps

Times: the implementations of one method and mode are interleaved round-robin and their ratios
taken round by round (bench/timing.py), so load drift on the shared machine hits them alike.

Peak memory: each (method, impl, mode) runs once in a fresh process, after a small warm-up call
(thread pool, tables); the figure is that process's peak resident set (VmHWM, reset through
/proc/self/clear_refs just before the call) minus its resident set before it, i.e. what the call
allocates beyond its inputs, outputs included. Linux only (else reported as "-").
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "python"))
sys.path.insert(0, HERE)
import core  # noqa: E402
import longattn  # noqa: E402
import timing  # noqa: E402
from longattn import extend  # noqa: E402

# name -> keyword arguments of the extend call; "rope" is plain RoPE (no remap).
METHODS = {
    "rope": None,
    "self_extend": ("self_extend_attention", dict(group_size=8, window=1024)),
    "rerope": ("rerope_attention", dict(window=1024)),
    "leaky_rerope": ("rerope_attention", dict(window=1024, leak=16.0)),
    "lm_infinite": ("lm_infinite_attention", dict(local_window=2048, global_tokens=4)),
}
IMPLS = ("fused", "two_pass", "causal_prerotated")


def make_inputs(B, L, Hq, Hk, D, grad):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, L, h, D, generator=g).requires_grad_(grad) for h in (Hq, Hk, Hk))
    inv, scaling = longattn.rope.frequencies(D, 500000.0)
    pos = torch.arange(L)[None].expand(B, L).contiguous()
    with torch.no_grad():
        qr, kr = longattn.apply_rope(q, k, pos, inv, attention_scaling=scaling)
    qr.requires_grad_(grad)
    kr.requires_grad_(grad)
    dout = torch.randn(B, L, Hq, D, generator=g)
    return dict(q=q, k=k, v=v, inv=inv, scaling=scaling, pos=pos, qr=qr, kr=kr, dout=dout)


def call(method, impl, x):
    """The forward of one implementation; its output."""
    if impl == "causal_prerotated":
        return longattn.attention(x["qr"], x["kr"], x["v"], causal=True)
    if METHODS[method] is None:
        if impl == "fused":
            return longattn.rope_attention(x["q"], x["k"], x["v"], x["inv"], causal=True,
                                           attention_scaling=x["scaling"])
        q, k = longattn.apply_rope(x["q"], x["k"], x["pos"], x["inv"], attention_scaling=x["scaling"])
        return longattn.attention(q, k, x["v"], causal=True)
    fn, kw = METHODS[method]
    return getattr(extend, fn)(x["q"], x["k"], x["v"], x["inv"], attention_scaling=x["scaling"],
                               fused=impl == "fused", **kw)


def step(method, impl, mode, x):
    if mode == "fwd":  # inputs without grad: no graph is recorded
        return lambda: call(method, impl, x)

    def fwdbwd():
        for t in (x["q"], x["k"], x["v"], x["qr"], x["kr"]):
            t.grad = None
        call(method, impl, x).backward(x["dout"])
    return fwdbwd


def _vm(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(field)


def peak_one(method, impl, mode, shape):
    """Run in the child: the bytes of resident set the call adds at its peak."""
    small = make_inputs(1, 256, 2, 1, shape[4], mode == "fwdbwd")
    step(method, impl, mode, small)()
    x = make_inputs(*shape, mode == "fwdbwd")
    run = step(method, impl, mode, x)
    before = _vm("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    run()
    return _vm("VmHWM") - before


def peak(method, impl, mode, shape, threads):
    if not sys.platform.startswith("linux"):
        return None
    out = subprocess.run([sys.executable, os.path.abspath(__file__), "--peak-one",
                          json.dumps([method, impl, mode, list(shape)]), "--threads", str(threads)],
                         capture_output=True, text=True, check=True)
    return int(out.stdout.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--no-memory", action="store_true")
    ap.add_argument("--peak-one", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.peak_one:
        method, impl, mode, shape = json.loads(args.peak_one)
        print(peak_one(method, impl, mode, tuple(shape)))
        return
    # (B, L, Hq, Hk, D): a GQA layer at head dim 128.
    shape = (1, 2048, 8, 2, 128) if args.quick else (1, 4096, 16, 4, 128)
    reps = 3 if args.quick else 5
    methods = args.methods.split(",")
    import runinfo
    info = runinfo.collect("cpu", torch.float32)
    for key in ("date", "host_cpu", "logical_cpus", "torch_threads", "torch", "loadavg", "git",
                "command"):
        print(f"{key}: {info.get(key)}")
    print(f"shape (B, L, Hq, Hkv, D) = {shape}, fp32, {reps} reps")
    print(f"{'method':<14}{'mode':<8}{'impl':<19}{'ms':>9}{'x fused':>9}{'peak MiB':>10}")
    for method in methods:
        for mode in ("fwd", "fwdbwd"):
            x = make_inputs(*shape, mode == "fwdbwd")
            ms = {impl: timing.Measurement(step(method, impl, mode, x), name=impl, max_reps=reps)
                  for impl in IMPLS}
            timing.measure_all(list(ms.values()), "cpu")
            del x
            for impl in IMPLS:
                m = ms[impl]
                mem = None if args.no_memory else peak(method, impl, mode, shape,
                                                      torch.get_num_threads())
                print(f"{method:<14}{mode:<8}{impl:<19}{1e3 * m.median:>9.1f}"
                      f"{core.ratio(m, ms['fused']):>8.2f}x"
                      f"{'-' if mem is None else f'{mem / 2**20:.0f}':>10}", flush=True)
    print("x fused: that implementation's time / the fused op's (> 1: fused faster), per round")


if __name__ == "__main__":
    main()
