"""torch.compile with dynamic shapes: every public op and composition compiles once for all
sequence lengths, batch sizes and token counts (no size becomes a constant in the graph), and
gives what eager gives, forward and backward.

Each case runs a function at ten or more shapes through one compiled callable and counts the
frames Dynamo compiled: the count after the first call must not grow. Two ways to ask for
dynamic shapes: ``torch.compile(dynamic=True)``, and the default ``dynamic=None`` with the
varying dims marked by ``torch._dynamo.mark_dynamic`` before the first call.

The first shape of each case shares no size with another dim of the inputs: Dynamo's duck
sizing would otherwise tie the two (a guard of the test's making, not of the op's).
"""
from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from torch._dynamo.testing import CompileCounterWithBackend

import longattn
from helpers import cu_seqlens
from longattn import kvcache as kvc
from longattn.extend import lm_infinite_attention, rerope_attention, self_extend_attention
from longattn.rope import apply_rope, frequencies

LENGTHS = (23, 64, 100, 129, 200, 257, 300, 381, 450, 513, 77)
MODES = ["dynamic", "mark_dynamic"]


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _detach(x):
    if isinstance(x, torch.Tensor):
        y = x.detach().clone()
        return y.requires_grad_(x.requires_grad)
    return x


def _tensors(out):
    out = out if isinstance(out, (tuple, list)) else (out,)
    return [o for o in out if isinstance(o, torch.Tensor)]


def _loss(outs):
    # Fixed pseudo-random weights per output, so every element's gradient path is exercised.
    total = 0
    for o in outs:
        if o.is_floating_point():
            w = torch.cos(torch.arange(o.numel(), dtype=torch.float64)).view(o.shape).to(o.dtype)
            total = total + (torch.where(torch.isfinite(o), o, 0) * w).sum()
    return total


def _run(fn, args, grad):
    outs = _tensors(fn(*args))
    leaves = [a for a in args if isinstance(a, torch.Tensor) and a.requires_grad]
    grads = torch.autograd.grad(_loss(outs), leaves) if grad and leaves else []
    return outs, list(grads)


def assert_one_graph(fn, make_args, shapes, mode, *, grad=True, mark=None, atol=1e-6):
    """Compile ``fn`` once (``mode``), run it on ``make_args(shape)`` for every shape, compare
    with eager, and require no recompilation after the first call. ``mark(args)`` lists the
    (tensor, dims) to mark dynamic in "mark_dynamic" mode."""
    cc = CompileCounterWithBackend("aot_eager")
    if mode == "dynamic":
        compiled = torch.compile(fn, backend=cc, fullgraph=True, dynamic=True)
    else:
        compiled = torch.compile(fn, backend=cc, fullgraph=True)
    frames = None
    for shape in shapes:
        args = make_args(shape)
        eager_args = [_detach(a) for a in args]
        if mode == "mark_dynamic":
            for t, dims in mark(args):
                torch._dynamo.mark_dynamic(t, dims)
        got, got_g = _run(compiled, args, grad)
        want, want_g = _run(fn, eager_args, grad)
        for a, b in zip(got + got_g, want + want_g):
            torch.testing.assert_close(a, b, atol=atol, rtol=1e-5, equal_nan=True)
        if frames is None:
            frames = cc.frame_count
            assert frames >= 1
    assert cc.frame_count == frames, (
        f"recompiled: {cc.frame_count - frames} extra frame(s) over {len(shapes)} shapes")


def _qkv(B, Lq, Lk, Hq=4, Hkv=2, D=16, grad=True):
    return (torch.randn(B, Lq, Hq, D, requires_grad=grad),
            torch.randn(B, Lk, Hkv, D, requires_grad=grad),
            torch.randn(B, Lk, Hkv, D, requires_grad=grad))


def _mark_seq(args, dims=(1,)):
    return [(a, list(dims)) for a in args if isinstance(a, torch.Tensor) and a.dim() == 4]


@pytest.mark.parametrize("mode", MODES)
def test_attention_dense_lengths(mode):
    z = torch.randn(4, requires_grad=True)

    def fn(q, k, v, z):
        return longattn.attention(q, k, v, causal=True, window=(31, 0), sinks=2, sink_logits=z,
                                  softcap=20.0, return_lse=True)

    assert_one_graph(fn, lambda L: (*_qkv(1, L, L), z), LENGTHS, mode, mark=_mark_seq)


@pytest.mark.parametrize("mode", MODES)
def test_attention_dense_batch_and_cross_lengths(mode):
    def fn(q, k, v):  # Lq != Lk: the default q_start (bottom-right) depends on both
        return longattn.attention(q, k, v, causal=True, return_lse=True)

    shapes = [(b, lq, lq + extra) for b, lq, extra in
              ((3, 17, 30), (5, 40, 5), (2, 64, 64), (4, 9, 100), (2, 33, 1), (3, 120, 7),
               (5, 50, 50), (2, 80, 13), (3, 11, 200), (4, 70, 2))]
    assert_one_graph(fn, lambda s: _qkv(s[0], s[1], s[2]), shapes, mode,
                     mark=lambda a: _mark_seq(a, (0, 1)))


@pytest.mark.parametrize("mode", MODES)
def test_attention_varlen_tokens_and_batch(mode):
    def fn(q, k, v, cu):
        return longattn.attention(q, k, v, cu_seqlens_q=cu, cu_seqlens_k=cu, causal=True,
                                  window=(15, 0), return_lse=True)

    gen = torch.Generator().manual_seed(0)

    def make(i):
        lens = torch.randint(1, 60, (2 + i % 4,), generator=gen).tolist()
        T = sum(lens)
        return (torch.randn(T, 4, 16, requires_grad=True), torch.randn(T, 2, 16, requires_grad=True),
                torch.randn(T, 2, 16, requires_grad=True), cu_seqlens(lens))

    assert_one_graph(fn, make, range(10), mode,
                     mark=lambda a: [(t, [0]) for t in a])


@pytest.mark.parametrize("mode", MODES)
def test_merge_attention_lengths(mode):
    def fn(o1, l1, o2, l2):
        return longattn.merge_attention([o1, o2], [l1, l2])

    def make(L):
        return (torch.randn(2, L, 3, 8, requires_grad=True), torch.randn(2, 3, L, requires_grad=True),
                torch.randn(2, L, 3, 8, requires_grad=True), torch.randn(2, 3, L, requires_grad=True))

    assert_one_graph(fn, make, LENGTHS, mode,
                     mark=lambda a: [(a[0], [1]), (a[1], [2]), (a[2], [1]), (a[3], [2])])


@pytest.mark.parametrize("mode", MODES)
def test_apply_rope_lengths(mode):
    inv = frequencies(16, 10000.0)[0].requires_grad_()

    def fn(q, k, pos, inv):
        return apply_rope(q, k, pos, inv)

    def make(L):
        return (torch.randn(2, L, 4, 16, requires_grad=True), torch.randn(2, L, 2, 16, requires_grad=True),
                torch.arange(L)[None] + 5, inv)

    assert_one_graph(fn, make, LENGTHS, mode,
                     mark=lambda a: [(a[0], [1]), (a[1], [1]), (a[2], [1])])


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("method", ["self_extend", "rerope", "lm_infinite"])
def test_extend_dense_lengths(mode, method):
    inv = frequencies(16, 10000.0)[0]
    fns = {
        "self_extend": lambda q, k, v: self_extend_attention(q, k, v, inv, group_size=4, window=16),
        "rerope": lambda q, k, v: rerope_attention(q, k, v, inv, window=16),
        "lm_infinite": lambda q, k, v: lm_infinite_attention(q, k, v, inv, local_window=32,
                                                             global_tokens=4),
    }
    assert_one_graph(fns[method], lambda L: _qkv(1, L, L), LENGTHS, mode, mark=_mark_seq)


@pytest.mark.parametrize("mode", MODES)
def test_decode_attention_capacity_and_batch(mode):
    def fn(q, kc, vc, lengths, pos, qpos, scores):
        return kvc.decode_attention(q, kc, vc, lengths, positions=pos, q_positions=qpos,
                                    window=40, sinks=2, scores=scores)

    def make(shape):
        B, C = shape
        lengths = torch.randint(1, C + 1, (B, 2), dtype=torch.int32)
        pos = torch.arange(C).expand(B, 2, C).contiguous()
        return (torch.randn(B, 4, 1, 16), torch.randn(B, 2, C, 16), torch.randn(B, 2, C, 16),
                lengths, pos, torch.full((B, 1), C, dtype=torch.int64), torch.zeros(B, 2, C))

    shapes = [(b, c) for b, c in zip((3, 2, 5, 4, 2, 3, 6, 2, 3, 7), LENGTHS)]
    assert_one_graph(fn, make, shapes, mode, grad=False,
                     mark=lambda a: [(a[0], [0]), (a[1], [0, 2]), (a[2], [0, 2]), (a[3], [0]),
                                     (a[4], [0, 2]), (a[5], [0]), (a[6], [0, 2])])


@pytest.mark.parametrize("mode", MODES)
def test_compaction_capacity_and_kept(mode):
    inv = frequencies(16, 10000.0)[0]

    def fn(kc, vc, lengths, keep, keep_lengths, pos):
        kc2, vc2, lengths2 = kc.clone(), vc.clone(), lengths.clone()
        kvc.compact_rerotate_(kc, vc, lengths, keep, keep_lengths, pos, inv)
        kvc.compact_(kc2, vc2, lengths2, keep, keep_lengths)
        return kc, vc, lengths, pos, kc2, vc2, lengths2

    def make(C):
        K = C // 3 + 2
        keep = torch.stack([torch.randperm(C)[:K].sort().values for _ in range(4)]).view(2, 2, K)
        return (torch.randn(2, 2, C, 16), torch.randn(2, 2, C, 16),
                torch.full((2, 2), C, dtype=torch.int32), keep,
                torch.full((2, 2), K, dtype=torch.int32),
                torch.arange(C).expand(2, 2, C).contiguous())

    assert_one_graph(fn, make, LENGTHS, mode, grad=False,
                     mark=lambda a: [(a[0], [2]), (a[1], [2]), (a[3], [2]), (a[5], [2])])


@pytest.mark.parametrize("mode", MODES)
def test_dilated_attention_lengths(mode):
    def fn(q, k, v):
        return longattn.dilated_attention(q, k, v, segments=[(16, 1), (32, 2)], causal=True)

    # Multiples of the longest segment, and lengths that end in a shorter segment.
    assert_one_graph(fn, lambda L: _qkv(1, L, L), LENGTHS, mode, mark=_mark_seq)


@pytest.fixture
def world_of_one():
    """A one-rank gloo process group in this process (ring attention needs a group)."""
    if dist.is_initialized():
        pytest.skip("a process group is already initialized in this process")
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield dist.group.WORLD
    dist.destroy_process_group()


@pytest.mark.parametrize("mode", MODES)
def test_ring_attention_lengths(mode, world_of_one):
    def fn(q, k, v):
        return longattn.ring_attention(q, k, v, world_of_one, causal=True, window=(63, 0),
                                       return_lse=True)

    assert_one_graph(fn, lambda L: _qkv(1, L, L), LENGTHS, mode, mark=_mark_seq)


@pytest.mark.parametrize("mode", MODES)
def test_attention_dilation_lengths(mode):
    def fn(q, k, v):
        return longattn.attention(q, k, v, causal=True, window=(40, 0), dilation=3, return_lse=True)

    assert_one_graph(fn, lambda L: _qkv(1, L, L), LENGTHS, mode, mark=_mark_seq)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("method", ["self_extend", "rerope", "lm_infinite"])
def test_extend_varlen_tokens(mode, method):
    inv = frequencies(16, 10000.0)[0]
    fns = {
        "self_extend": lambda q, k, v, cu: self_extend_attention(
            q, k, v, inv, group_size=4, window=16, cu_seqlens_q=cu, cu_seqlens_k=cu),
        # Floats (leak, scale) travel beside the constant configuration.
        "rerope": lambda q, k, v, cu: rerope_attention(q, k, v, inv, window=16, leak=2.0, scale=0.3,
                                                       cu_seqlens_q=cu, cu_seqlens_k=cu),
        "lm_infinite": lambda q, k, v, cu: lm_infinite_attention(
            q, k, v, inv, local_window=32, global_tokens=4, cu_seqlens_q=cu, cu_seqlens_k=cu),
    }
    gen = torch.Generator().manual_seed(1)

    def make(i):
        lens = torch.randint(1, 80, (2 + i % 3,), generator=gen).tolist()
        T = sum(lens)
        return (torch.randn(T, 4, 16, requires_grad=True), torch.randn(T, 2, 16, requires_grad=True),
                torch.randn(T, 2, 16, requires_grad=True), cu_seqlens(lens))

    assert_one_graph(fns[method], make, range(10), mode, mark=lambda a: [(t, [0]) for t in a])


def _composite_cases():
    inv = frequencies(16, 10000.0)[0]
    q, k, v = _qkv(1, 40, 40)
    lens = [7, 0, 20]
    T = sum(lens)
    qv, kv, vv = (torch.randn(T, h, 16, requires_grad=True) for h in (4, 2, 2))
    cu = cu_seqlens(lens)
    return {
        "dilated": ("dilated", [q, k, v], dict(segments=[[16, 1], [32, 2]], causal=True, scale=None)),
        "extend_varlen": ("extend_varlen", [qv, kv, vv, inv, cu, cu],
                          dict(method="rerope", window=8, leak=2.0, attention_scaling=1.0,
                               rotary_dim=None, interleaved=False, scale=0.25, q_start=None,
                               max_seqlen_q=None, max_seqlen_k=None)),
    }


@pytest.mark.parametrize("case", ["dilated", "extend_varlen"])
def test_opcheck_composite(case):
    from longattn import _opaque

    kind, tensors, config = _composite_cases()[case]
    names = [n for n, val in config.items() if isinstance(val, float)]
    encoded = _opaque._encode(names, *[(n, val) for n, val in config.items() if n not in names])
    args = (kind, tensors, encoded, [config[n] for n in names])
    torch.library.opcheck(torch.ops.longattn.composite.default, args)
    out, lse = torch.ops.longattn.composite(*args)
    needs = [t.requires_grad for t in tensors]
    bwd = (kind, [t.detach() for t in tensors], encoded, args[3], torch.randn_like(out),
           torch.where(torch.isfinite(lse), torch.randn_like(lse), 0), needs)
    torch.library.opcheck(torch.ops.longattn.composite_backward.default, bwd)
