"""What only the CUDA registrations do, checked under the emulator (the suite's tests run with
device "cpu" and expect the CPU's behaviour there): the CUDA-specific limits, decode's NaN rows
for a bad length (no host synchronization), decode's opt-in shared memory for large head dims.

    PYTHONPATH=python:tools/simt_emu pytest -p pytest_simt_emu tools/simt_emu/test_emu_cuda_paths.py
"""
import pytest
import torch

import emu_ops
from longattn import kvcache as kvc
from longattn.reference import decode_attention_ref, merge_attention_ref
from longattn.rope import apply_rope, frequencies
from longattn.rope_reference import apply_rope_ref

pytestmark = pytest.mark.skipif(emu_ops._library is None, reason="needs -p pytest_simt_emu")


@pytest.fixture
def a100_smem():
    """The emulated device with an A100's opt-in shared memory (163 KiB)."""
    old = emu_ops.SETTINGS["smem_limit"]
    emu_ops.SETTINGS["smem_limit"] = 163 * 1024
    yield
    emu_ops.SETTINGS["smem_limit"] = old


def test_decode_bad_length_gives_nan_rows():
    k, v = torch.randn(1, 3, 10, 8), torch.randn(1, 3, 10, 8)
    q = torch.randn(1, 6, 2, 8)
    out, lse = kvc.decode_attention(q, k, v, torch.tensor([[11, 5, -1]]))
    for h in (0, 2):  # kv heads 0 and 2 hold q heads 2h, 2h + 1
        assert out[0, 2 * h:2 * h + 2].isnan().all() and lse[0, 2 * h:2 * h + 2].isnan().all()
    ref, ref_lse, _ = decode_attention_ref(q, k, v, torch.tensor([[0, 5, 0]]))
    torch.testing.assert_close(out[0, 2:4], ref[0, 2:4])
    torch.testing.assert_close(lse[0, 2:4], ref_lse[0, 2:4])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])  # tile / chunk kernel
def test_paged_decode_bad_table_gives_nan_rows(dtype):
    """A table entry naming no block of the pool for a cached slot, or a bad length: NaN rows
    for that head only (no host synchronization), no score written anywhere."""
    D, bs = 64, 16
    kp, vp = torch.randn(10, bs, 1, D, dtype=dtype), torch.randn(10, bs, 1, D, dtype=dtype)
    table = torch.arange(9, dtype=torch.int32).view(1, 3, 3)
    lens = torch.tensor([[48, 20, 40]])
    q = torch.randn(1, 6, 1, D, dtype=dtype)
    bad = table.clone()
    bad[0, 0, 2] = 10  # past the pool
    bad[0, 1, 2] = -1  # past head 1's 20 slots: never read, fine
    scores = torch.zeros(10, bs, 1)
    out, lse = kvc.decode_attention_paged(q, kp, vp, bad, lens, scores=scores)
    assert out[0, :2].isnan().all() and lse[0, :2].isnan().all()
    ref, ref_lse = kvc.decode_attention_paged(q, kp, vp, table, lens)
    torch.testing.assert_close(out[0, 2:], ref[0, 2:])
    torch.testing.assert_close(lse[0, 2:], ref_lse[0, 2:])
    assert not scores[9].any()  # nothing lands in a block no table names
    out, lse = kvc.decode_attention_paged(q, kp, vp, table, torch.tensor([[48, 49, 40]]))
    assert out[0, 2:4].isnan().all() and not out[0, 4:].isnan().any()


@pytest.mark.parametrize("D", [510, 1024])
def test_decode_large_head_dims(D, a100_smem):
    """fp64 rows past 48 KiB of shared memory: the launch opts in (kMaxDecodeHeadDim = 1024)."""
    B, Hq, Hkv, C = 1, 4, 1, 300
    k, v = torch.randn(B, Hkv, C, D, dtype=torch.float64), torch.randn(B, Hkv, C, D, dtype=torch.float64)
    q = torch.randn(B, Hq, 3, D, dtype=torch.float64)
    lens = torch.tensor([[C]])
    out, lse = kvc.decode_attention(q, k, v, lens)
    ref, ref_lse, _ = decode_attention_ref(q, k, v, lens)
    torch.testing.assert_close(out, ref, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(lse, ref_lse, atol=1e-10, rtol=1e-10)
    with pytest.raises(RuntimeError, match="head dims up to 1024"):
        kvc.decode_attention(torch.randn(B, Hq, 1, 1025), torch.randn(B, Hkv, C, 1025),
                             torch.randn(B, Hkv, C, 1025), lens)


def test_merge_partial_limit():
    outs = [torch.randn(2, 5, 3, 8) for _ in range(17)]
    lses = [torch.randn(2, 3, 5) for _ in range(17)]
    out, lse = torch.ops.longattn.merge_attention(outs[:16], lses[:16])
    ref, ref_lse = merge_attention_ref(outs[:16], lses[:16])
    torch.testing.assert_close(out, ref.float())
    torch.testing.assert_close(lse, ref_lse.float())
    with pytest.raises(ValueError, match="at most 16 partials"):
        torch.ops.longattn.merge_attention(outs, lses)


def test_rope_rotary_dim_limit():
    """The cos/sin table of rotary_dim 2048 in fp64 (16 KiB per token) caps the tokens per
    block at three."""
    x = torch.randn(1, 7, 2, 2048, dtype=torch.float64)
    pos = torch.arange(7) * 1000
    inv = frequencies(2048, 10000.0)[0]
    out = apply_rope(x, None, pos, inv)
    torch.testing.assert_close(out, apply_rope_ref(x, pos, inv), atol=1e-12, rtol=0)
    with pytest.raises(ValueError, match="exceeds the CUDA kernel's limit"):
        apply_rope(torch.randn(1, 1, 1, 2050), None, torch.zeros(1, dtype=torch.long),
                   frequencies(2050, 10000.0)[0])
