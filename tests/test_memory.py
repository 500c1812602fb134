"""Long sequences never allocate anything of size L x L.

L = 65536 with a causal window: a dense score matrix would be L*L*4 bytes = 16 GiB (fp32), a
dense boolean mask 4 GiB.  On CPU the kernel runs in a subprocess whose address space is capped
(RLIMIT_AS) at the measured baseline of `import torch, longattn` plus 1 GiB, far below either;
an L x L allocation then fails with an out-of-memory error instead of succeeding slowly.
On CUDA, the peak of torch.cuda.max_memory_allocated is checked instead.
"""

import json
import os
import subprocess
import sys
import textwrap
import time

import pytest
import torch

import longattn

L = 65536
W = 256
HEADROOM = 1 << 30  # 1 GiB


_CHILD = textwrap.dedent(
    r"""
    import json, os, resource, sys, time
    sys.path[:0] = json.loads(os.environ["LONGATTN_TEST_SYSPATH"])
    import torch, longattn

    def vm_bytes():
        for line in open("/proc/self/status"):
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024
        return 0

    L, W, backward = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3] == "1"
    torch.manual_seed(0)
    q = torch.randn(1, L, 1, 64)
    k = torch.randn(1, L, 1, 64)
    v = torch.randn(1, L, 1, 64)
    # Warm up on a small problem so that lazily created thread pools / arenas exist before the
    # baseline is measured.
    s = torch.randn(1, 512, 1, 64, requires_grad=True)
    longattn.attention(s, s, s, causal=True, window=(W - 1, 0)).sum().backward()
    base = vm_bytes()
    limit = base + int(sys.argv[4])
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    res = {"baseline_vm": base, "limit": limit}
    t = time.time()
    if backward:
        q.requires_grad_(True); k.requires_grad_(True); v.requires_grad_(True)
    out, lse = longattn.attention(q, k, v, causal=True, window=(W - 1, 0), return_lse=True)
    res["fwd_s"] = time.time() - t
    res["finite"] = bool(torch.isfinite(out).all()) and bool(torch.isfinite(lse).all())
    if backward:
        t = time.time()
        (out * out).sum().backward()
        res["bwd_s"] = time.time() - t
        res["finite"] = res["finite"] and all(bool(torch.isfinite(x.grad).all()) for x in (q, k, v))
    # Spot-check a few rows against a direct computation on the visible keys only.
    with torch.no_grad():
        err = 0.0
        for i in (0, 1, W, L // 2, L - 1):
            j0 = max(0, i - W + 1)
            s_ = (q[0, i, 0] @ k[0, j0:i + 1, 0].T) / 8.0
            p = torch.softmax(s_.double(), -1)
            ref = p @ v[0, j0:i + 1, 0].double()
            err = max(err, (out[0, i, 0].double() - ref).abs().max().item())
        res["spot_err"] = err
    res["peak_vm"] = max(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmPeak:"))
    print("RESULT " + json.dumps(res))
    """
)


def _run_child(backward, headroom=HEADROOM, timeout=600):
    env = dict(os.environ)
    env["LONGATTN_TEST_SYSPATH"] = json.dumps([p for p in sys.path if p])
    env.setdefault("OMP_NUM_THREADS", str(torch.get_num_threads()))
    t = time.time()
    proc = subprocess.run(
        [sys.executable, "-c", _CHILD, str(L), str(W), "1" if backward else "0", str(headroom)],
        capture_output=True, text=True, timeout=timeout, env=env,
    )
    wall = time.time() - t
    lines = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, (
        f"child failed (rc={proc.returncode}) under an address-space cap of baseline + "
        f"{headroom >> 20} MiB (an L x L fp32 buffer is {(L * L * 4) >> 30} GiB):\n"
        f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    )
    res = json.loads(lines[-1][len("RESULT "):])
    res["wall_s"] = wall
    return res


def test_long_window_forward_no_LxL_cpu():
    res = _run_child(backward=False)
    print(res)
    assert res["finite"]
    assert res["spot_err"] < 1e-4
    assert res["limit"] - res["baseline_vm"] < (L * L) // 2  # the cap excludes even half an L x L bool mask


def test_long_window_backward_no_LxL_cpu():
    # Measured on the 2-core build machine: about 3 s (forward + backward), so not marked slow.
    res = _run_child(backward=True)
    print(res)
    assert res["finite"]
    assert res["spot_err"] < 1e-4


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_long_window_no_LxL_cuda():
    if not longattn.build_info().get("cuda"):
        pytest.skip("built without CUDA")
    dev = "cuda"
    q, k, v = (torch.randn(1, L, 1, 64, device=dev, dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    out = longattn.attention(q, k, v, causal=True, window=(W - 1, 0))
    out.float().square().sum().backward()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    assert peak < 256 << 20, f"peak extra CUDA memory {peak >> 20} MiB for L={L}"
    assert torch.isfinite(out).all()
