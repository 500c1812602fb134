"""The two CUDA attention backends (docs/cuda_simt.md), each forced with LONGATTN_CUDA_BACKEND:
both against the float64 reference on the dtypes and head dims the flash kernels take (the rest
of the suite runs whatever `auto` picks, i.e. SIMT for fp32/fp64 and odd head dims), the SIMT
backward's run-to-run determinism, the fallback for misaligned inputs, and the env var's errors.
CUDA only: skipped on CPU-only machines and builds."""

import pytest
import torch

import longattn
from helpers import check_backward, check_forward, cu_seqlens, randn

pytestmark = pytest.mark.skipif(
    not (torch.cuda.is_available() and longattn.build_info()["cuda"]),
    reason="needs a GPU and a CUDA build")

ERRS = (ValueError, RuntimeError)
COMBOS = {
    "causal": dict(causal=True),
    "lambda": dict(causal=True, window=(40, 0), sinks=5),
    "all": dict(causal=True, window=(50, 0), sinks=2, softcap=2.0, logn_base=16.0, scale=0.3),
}


def _qkv(dtype, D, B=2, Lq=97, Lk=130, Hq=4, Hkv=2, layout="bshd"):
    return (randn(B, Lq, Hq, D, dtype=dtype, device="cuda", layout=layout),
            randn(B, Lk, Hkv, D, dtype=dtype, device="cuda", layout=layout),
            randn(B, Lk, Hkv, D, dtype=dtype, device="cuda", layout=layout))


@pytest.mark.parametrize("backend", ["simt", "flash"])
@pytest.mark.parametrize("combo", list(COMBOS))
@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_backend_matches_reference(backend, combo, D, dtype, monkeypatch):
    monkeypatch.setenv("LONGATTN_CUDA_BACKEND", backend)
    q, k, v = _qkv(dtype, D, layout="bhsd")
    kw = dict(COMBOS[combo])
    sink = torch.randn(4, device="cuda") + 0.5 if combo == "all" else None
    check_forward(q, k, v, sink_logits=sink, **kw)
    check_backward(q, k, v, sink_logits=sink, **kw)


@pytest.mark.parametrize("backend", ["simt", "flash"])
def test_backend_varlen(backend, monkeypatch):
    monkeypatch.setenv("LONGATTN_CUDA_BACKEND", backend)
    lens_q, lens_k = [5, 0, 70, 33], [9, 4, 70, 1]
    q = randn(sum(lens_q), 4, 64, dtype=torch.bfloat16, device="cuda")
    k = randn(sum(lens_k), 1, 64, dtype=torch.bfloat16, device="cuda")
    v = randn(sum(lens_k), 1, 64, dtype=torch.bfloat16, device="cuda")
    kw = dict(causal=True, window=(20, 0), cu_seqlens_q=cu_seqlens(lens_q, "cuda"),
              cu_seqlens_k=cu_seqlens(lens_k, "cuda"))
    check_forward(q, k, v, **kw)
    check_backward(q, k, v, **kw)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_simt_backward_is_deterministic(dtype, monkeypatch):
    monkeypatch.setenv("LONGATTN_CUDA_BACKEND", "simt")
    q, k, v = (t.requires_grad_() for t in _qkv(dtype, 80, Lq=300, Lk=300, Hq=8, Hkv=2))
    sink = (torch.randn(8, device="cuda") + 0.5).requires_grad_()

    def grads():
        out = longattn.attention(q, k, v, causal=True, window=(100, 0), sinks=4, sink_logits=sink)
        return torch.autograd.grad(out, (q, k, v, sink), torch.ones_like(out))

    first = grads()
    for _ in range(3):
        for a, b in zip(first, grads()):
            assert torch.equal(a, b)


def test_misaligned_inputs_fall_back(monkeypatch):
    # q starts one element into its storage: not 16-byte aligned, so auto runs SIMT.
    base = randn(1, 64 * 4 * 64 + 1, 1, 1, dtype=torch.bfloat16, device="cuda").flatten()
    q = base[1:].view(1, 64, 4, 64)
    _, k, v = _qkv(torch.bfloat16, 64, B=1, Lq=64, Lk=64)
    check_forward(q, k, v, causal=True)
    monkeypatch.setenv("LONGATTN_CUDA_BACKEND", "flash")
    with pytest.raises(ERRS, match="aligned"):
        longattn.attention(q, k, v, causal=True)


def test_backend_env_errors(monkeypatch):
    q, k, v = _qkv(torch.float32, 64)
    monkeypatch.setenv("LONGATTN_CUDA_BACKEND", "flash")  # fp32: the flash kernels cannot run
    with pytest.raises(ERRS, match="LONGATTN_CUDA_BACKEND=flash.*float16/bfloat16"):
        longattn.attention(q, k, v)
    monkeypatch.setenv("LONGATTN_CUDA_BACKEND", "tensorcore")
    with pytest.raises(ERRS, match="LONGATTN_CUDA_BACKEND must be"):
        longattn.attention(q, k, v)
    monkeypatch.setenv("LONGATTN_CUDA_BACKEND", "simt")
    check_forward(q, k, v, causal=True)


def test_tensors_on_two_gpus():
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two GPUs")
    q, k, v = _qkv(torch.float32, 32)
    with pytest.raises(ERRS, match=r"\bk\b.*cuda:1"):
        longattn.attention(q, k.to("cuda:1"), v)
