"""pytest-benchmark suite: longattn vs SDPA vs compiled FlexAttention on the quick cases of cases.py.

    pytest bench/bench_attention.py --benchmark-only
    pytest bench/bench_attention.py --benchmark-only -k "window and fwd"
    pytest bench/bench_attention.py --benchmark-only --benchmark-columns=min,median,rounds

One benchmark group per (case, mode), so the implementations are listed side by side. Each test
warms up first (FlexAttention compiles during its warm-up; on CPU it has no backward, skipped).
LONGATTN_BENCH_DEVICE=cuda runs the same small cases on the GPU (bf16).
The GFLOP count of the visible area is in extra_info["gflop"] (fwd+bwd = 3.5x forward, FA2 convention).
A few minutes on the 2-core build machine; use bench/compare.py for the full comparison.
"""
from __future__ import annotations

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import cases as C  # noqa: E402
import timing  # noqa: E402

DEVICE = os.environ.get("LONGATTN_BENCH_DEVICE", "cpu")
DTYPE = torch.float32 if DEVICE == "cpu" else torch.bfloat16
ROUNDS = int(os.environ.get("LONGATTN_BENCH_ROUNDS", "3"))
CASES = C.default_cases("cpu", quick=True)  # small sizes on any device

# torch's own internals warn (torch.jit deprecations) on every compile; keep the report readable
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

_inputs: dict = {}


def _get_inputs(case):
    if case.name not in _inputs:
        _inputs.clear()  # keep one case's tensors alive at a time
        _inputs[case.name] = C.make_inputs(case, DEVICE, DTYPE)
    return _inputs[case.name]


@pytest.mark.parametrize("mode", C.MODES)
@pytest.mark.parametrize("impl", C.IMPLS)
@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_attention(benchmark, case, impl, mode):
    if DEVICE.startswith("cuda") and not torch.cuda.is_available():
        pytest.skip("LONGATTN_BENCH_DEVICE=cuda but no GPU")
    if mode not in case.modes:
        pytest.skip(f"{mode} not part of {case.name}")
    try:
        runner = C.build(impl, case, device=DEVICE, dtype=DTYPE)
    except ImportError as e:
        pytest.skip(str(e))
    except C.Skip as e:
        pytest.skip(str(e))
    if mode in runner.skip:
        pytest.skip(runner.skip[mode])
    q, k, v, do = _get_inputs(case)
    step = C.make_step(runner, mode, q, k, v, do)

    def timed():
        step()
        timing.sync(DEVICE)

    benchmark.group = f"{case.name} {mode} ({case.mask_desc()}, {case.shape_desc()})"
    benchmark.extra_info.update(gflop=case.flops(mode) / 1e9, visible_fraction=case.density(),
                                impl=impl, note=runner.note)
    benchmark.pedantic(timed, rounds=ROUNDS, iterations=1, warmup_rounds=2 if impl == "flex" else 1)
