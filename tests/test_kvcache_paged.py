"""The paged KV cache: decode_attention_paged and compact_paged_ against the contiguous ops and
the reference, PagedKVCache against KVCache (appends, chunked prefill, policies), block
remapping and freeing, bad input. Every op test runs on each device of the build (``device``)."""
import math

import pytest
import torch

import longattn
from longattn import kvcache as kvc
from longattn.reference import attention_ref, decode_attention_ref

TOL = {torch.float32: dict(atol=2e-5, rtol=1e-4), torch.float64: dict(atol=1e-10, rtol=1e-10),
       torch.bfloat16: dict(atol=2e-2, rtol=2e-2), torch.float16: dict(atol=2e-3, rtol=2e-3)}


def _contiguous(B, H, C, D, dtype, lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    k = torch.randn(B, H, C, D, generator=g).to(dtype)
    v = torch.randn(B, H, C, D, generator=g).to(dtype)
    pos = torch.randint(1, 4, (B, H, C), generator=g).cumsum(-1)
    scores = torch.rand(B, H, C, generator=g)
    lens = torch.tensor(lengths, dtype=torch.int32).view(B, H)
    return k, v, pos, scores, lens


def _paginate(t, bs, perm, spare=3):
    """(B, H, C, ...) -> a pool (N, bs, 1, ...) whose block perm[b, h, i] holds slots
    [i * bs, (i + 1) * bs) of (b, h), plus `spare` blocks of noise nobody names."""
    B, H, C = t.shape[:3]
    M = C // bs
    pool = torch.randn((B * H * M + spare, bs) + t.shape[3:]).to(t.dtype) if t.is_floating_point() \
        else torch.randint(0, 9, (B * H * M + spare, bs) + t.shape[3:]).to(t.dtype)
    pool[perm.flatten().long()] = t.reshape((B * H * M, bs) + t.shape[3:])
    return pool.unsqueeze(2)


def _paged(k, v, pos, scores, bs, seed=1, heads_per_block=1):
    """The same cache paged: blocks in a random order in the pools. heads_per_block = H: one
    table per sequence, every head of a sequence in one block (FlashAttention's layout)."""
    B, H, C = k.shape[:3]
    M = C // bs
    g = torch.Generator().manual_seed(seed)
    if heads_per_block == 1:
        perm = torch.randperm(B * H * M, generator=g).view(B, H, M).int()
        pools = [_paginate(t, bs, perm) for t in (k, v, pos, scores)]
        return pools[0], pools[1], pools[2], pools[3], perm
    perm = torch.randperm(B * M + 2, generator=g)[: B * M].view(B, M).int()

    def per_seq(t):
        pool = torch.zeros((B * M + 2, bs, H) + t.shape[3:], dtype=t.dtype)
        pool[perm.flatten().long()] = t.reshape((B, H, M, bs) + t.shape[3:]).movedim(1, 3) \
            .reshape((B * M, bs, H) + t.shape[3:])
        return pool

    table = perm[:, None, :].expand(B, H, M)  # one table per sequence, a stride-0 head dim
    return per_seq(k), per_seq(v), per_seq(pos), per_seq(scores), table


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("layout", ["per_head", "per_sequence"])
@pytest.mark.parametrize("n_new", [1, 3])
def test_paged_decode_equals_contiguous(dtype, layout, n_new, device):
    B, Hq, H, C, D, bs = 2, 8, 2, 640, 64, 16
    k, v, pos, scores0, lens = _contiguous(B, H, C, D, dtype, [640, 37, 0, 513])
    kp, vp, pp, sp, table = _paged(k, v, pos, scores0, bs,
                                   heads_per_block=1 if layout == "per_head" else H)
    q = torch.randn(B, Hq, n_new, D).to(dtype)
    top = pos.gather(2, (lens.long() - 1).clamp(min=0)[..., None]).amax(dim=(1, 2))
    qpos = top[:, None] - torch.arange(n_new - 1, -1, -1) * 3
    kw = dict(q_positions=qpos.to(device), window=150, sinks=4)
    d = lambda t: t.to(device)  # noqa: E731
    s_contig, s_paged = d(scores0.clone()), d(sp.clone())
    out, lse = kvc.decode_attention(d(q), d(k), d(v), d(lens), positions=d(pos), scores=s_contig,
                                    **kw)
    out_p, lse_p = kvc.decode_attention_paged(d(q), d(kp), d(vp), d(table), d(lens),
                                              positions=d(pp), scores=s_paged, **kw)
    torch.testing.assert_close(out_p, out, atol=1e-6 if dtype != torch.float64 else 1e-12, rtol=0)
    torch.testing.assert_close(lse_p, lse, atol=1e-6 if dtype != torch.float64 else 1e-12, rtol=0)
    ref_o, ref_l, p = decode_attention_ref(q, k, v, lens, positions=pos, q_positions=qpos,
                                           window=150, sinks=4)
    torch.testing.assert_close(out_p.cpu(), ref_o, **TOL[dtype])
    # The scores land in the pool slots the table names, and nowhere else.
    expect = scores0 + p.view(B, H, Hq // H, n_new, C).sum((2, 3)).float()
    if layout == "per_head":
        got = s_paged.cpu()[table.flatten().long()].view(B, H, C)
        torch.testing.assert_close(got, expect, atol=1e-4, rtol=1e-4)
        spare = torch.ones(s_paged.shape[0], dtype=torch.bool)
        spare[table.flatten().long()] = False
        assert torch.equal(s_paged.cpu()[spare], sp[spare])
    else:
        got = s_paged.cpu()[table[:, 0].flatten().long()]  # (B * M, bs, H)
        got = got.view(B, C // bs, bs, H).movedim(3, 1).reshape(B, H, C)
        torch.testing.assert_close(got, expect, atol=1e-4, rtol=1e-4)


def test_paged_cache_equals_kvcache_through_steps_and_policies(device):
    """Token-by-token decoding and a chunked prompt through PagedKVCache equal KVCache's, with
    H2O evicting every few steps: the same outputs, the same live keys, blocks returned."""
    B, Hq, H, D, bs = 2, 4, 2, 16, 4
    torch.manual_seed(0)
    dense = kvc.KVCache(B, H, D, 64, track_scores=True, device=device)
    paged = kvc.PagedKVCache(B, H, D, num_blocks=40, block_size=bs, max_blocks=16,
                             track_scores=True, device=device)
    policy = kvc.H2O(budget=20, n_recent=6, n_sink=2)
    for step in range(30):
        n = 5 if step == 0 else 1  # a chunk of prompt first
        q = torch.randn(B, Hq, n, D, device=device)
        k, v = torch.randn(B, H, n, D, device=device), torch.randn(B, H, n, D, device=device)
        o1, l1 = dense.step(q, k, v, accumulate_scores=True)
        o2, l2 = paged.step(q, k, v, accumulate_scores=True)
        torch.testing.assert_close(o2, o1, atol=1e-6, rtol=0)
        torch.testing.assert_close(l2, l1, atol=1e-6, rtol=0)
        if step % 4 == 3:
            policy.compress(dense)
            policy.compress(paged)
    assert torch.equal(paged.lengths, dense.lengths)
    for b in range(B):
        for h in range(H):
            for x, y in zip(paged.live(b, h), dense.live(b, h)):
                assert torch.equal(x, y)
    need = (paged.lengths.long() + bs - 1) // bs
    assert paged.blocks_in_use() == int(need.sum())  # the evicted blocks went back to the pool
    torch.testing.assert_close(paged.scores[..., :20], dense.scores[..., :20])


def test_paged_chunked_prefill_equals_causal_attention(device):
    """A prompt appended in chunks, each chunk attending over the blocks (itself included)
    causally on positions: causal attention over the whole prompt, read in place."""
    B, Hq, H, D, L, bs = 2, 4, 2, 32, 45, 8
    q, k, v = (torch.randn(B, L, h, D, device=device) for h in (Hq, H, H))
    ref, _ = attention_ref(q, k, v, causal=True)
    cache = kvc.PagedKVCache(B, H, D, num_blocks=24, block_size=bs, device=device)
    outs, t = [], 0
    for n in (16, 13, 1, 15):
        sl = slice(t, t + n)
        o, _ = cache.step(q[:, sl].transpose(1, 2), k[:, sl].transpose(1, 2), v[:, sl].transpose(1, 2))
        outs.append(o.transpose(1, 2))
        t += n
    torch.testing.assert_close(torch.cat(outs, 1), ref, atol=2e-5, rtol=1e-4)
    assert cache.blocks_in_use() == B * H * math.ceil(L / bs)


def _keep_lists(lens, K, seed):
    g = torch.Generator().manual_seed(seed)
    B, H = lens.shape
    keep = torch.full((B, H, K), -1, dtype=torch.int64)
    counts = torch.zeros(B, H, dtype=torch.int64)
    for b in range(B):
        for h in range(H):
            L = int(lens[b, h])
            n = min(L, int(torch.randint(0, K + 1, (), generator=g)))
            keep[b, h, :n] = torch.randperm(L, generator=g)[:n].sort().values
            counts[b, h] = n
    return keep, counts


def _logical(pool, table, bs):
    B, H, M = table.shape
    return pool[table.clamp(min=0).long(), :, 0].reshape((B, H, M * bs) + pool.shape[3:])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("rerotate", [False, True])
def test_paged_compaction_equals_contiguous(dtype, rerotate, device):
    B, H, C, D, bs = 2, 3, 96, 16, 8
    k, v, pos, scores, lens = _contiguous(B, H, C, D, dtype, [96, 50, 0, 9, 95, 64])
    kp, vp, pp, sp, table = _paged(k, v, pos, scores, bs)
    keep, counts = _keep_lists(lens, 60, seed=3)
    keep[0, 0, :40] = torch.arange(40)          # a prefix kept in place: identity blocks
    keep[0, 0, 40:56] = torch.arange(56, 72)    # then two whole blocks shifted down by two
    counts[0, 0] = 56
    inv_freq = longattn.rope.frequencies(D, 10000.0)[0]
    kw = dict(inv_freq=inv_freq.to(device)) if rerotate else {}
    d = lambda t: t.to(device)  # noqa: E731
    a = [d(t.clone()) for t in (k, v, pos, scores, lens)]
    if rerotate:
        kvc.compact_rerotate_(a[0], a[1], a[4], d(keep), d(counts), a[2], inv_freq.to(device),
                              scores=a[3])
    else:
        kvc.compact_(a[0], a[1], a[4], d(keep), d(counts), positions=a[2], scores=a[3])
    p = [d(t.clone()) for t in (kp, vp, pp, sp, table, lens)]
    kvc.compact_paged_(p[0], p[1], p[4], p[5], d(keep), d(counts), positions=p[2], scores=p[3], **kw)
    assert torch.equal(p[5], a[4])
    tbl = p[4].cpu()
    for got, ref in zip((p[0], p[1], p[2], p[3]), a[:4]):
        got = _logical(got.cpu(), tbl, bs)
        for b in range(B):
            for h in range(H):
                n = int(counts[b, h])
                torch.testing.assert_close(got[b, h, :n], ref.cpu()[b, h, :n], atol=0, rtol=0)
    # The table names exactly ceil(n / bs) blocks per head, every other entry is -1, and the
    # named blocks are all distinct.
    nb = (counts + bs - 1) // bs
    col = torch.arange(tbl.shape[-1])
    assert ((tbl >= 0) == (col < nb[..., None])).all()
    named = tbl[tbl >= 0]
    assert named.unique().numel() == named.numel()


def test_paged_compaction_remaps_whole_blocks(device):
    """Evicting whole blocks moves nothing: the later blocks shift down in the table, the
    evicted ones leave it, and every pool row stays where it was."""
    B, H, C, D, bs = 1, 2, 64, 8, 8
    k, v, pos, scores, lens = _contiguous(B, H, C, D, torch.float32, [64, 61])
    kp, vp, pp, sp, table = _paged(k, v, pos, scores, bs)
    keep = torch.full((B, H, 64), -1, dtype=torch.int64)
    # Head 0 drops blocks 1 and 4; head 1 drops block 2 and keeps its partial last block.
    k0 = torch.cat([torch.arange(0, 8), torch.arange(16, 32), torch.arange(40, 64)])
    k1 = torch.cat([torch.arange(0, 16), torch.arange(24, 61)])
    keep[0, 0, :48], keep[0, 1, :53] = k0, k1
    counts = torch.tensor([[48, 53]])
    d = lambda t: t.to(device)  # noqa: E731
    p = [d(t.clone()) for t in (kp, vp, pp, sp, table, lens)]
    kvc.compact_paged_(p[0], p[1], p[4], p[5], d(keep), d(counts), positions=p[2], scores=p[3])
    for got, before in zip(p[:4], (kp, vp, pp, sp)):
        assert torch.equal(got.cpu(), before)  # nothing moved
    t0, t1 = table[0, 0], table[0, 1]
    assert p[4].cpu()[0, 0].tolist() == [t0[0], t0[2], t0[3], t0[5], t0[6], t0[7]] + [-1] * 2
    assert p[4].cpu()[0, 1].tolist() == [t1[0], t1[1], t1[3], t1[4], t1[5], t1[6], t1[7], -1]


def test_paged_cache_frees_blocks_and_reuses_them(device):
    cache = kvc.PagedKVCache(1, 2, 8, num_blocks=6, block_size=4, device=device)
    cache.append(torch.randn(1, 2, 10, 8, device=device), torch.randn(1, 2, 10, 8, device=device))
    assert cache.blocks_in_use() == 6  # 3 blocks per head
    kvc.StreamingLLM(2, 2).compress(cache)  # 4 keys per head: one block each
    assert cache.blocks_in_use() == 2 and cache.lengths.tolist() == [[4, 4]]
    cache.append(torch.randn(1, 2, 8, 8, device=device), torch.randn(1, 2, 8, 8, device=device))
    assert cache.blocks_in_use() == 6
    _, _, pos = cache.live(0, 1)
    assert pos.tolist() == [0, 1, 8, 9] + list(range(10, 18))


def test_streaming_llm_shift_on_paged_cache(device):
    """StreamingLLM's position shift (compact_paged_ with rerotation) equals the contiguous
    cache's."""
    B, H, D = 1, 2, 16
    inv_freq = longattn.rope.frequencies(D, 10000.0)[0].to(device)
    caches = [kvc.KVCache(B, H, D, 40, device=device),
              kvc.PagedKVCache(B, H, D, num_blocks=30, block_size=4, device=device)]
    k, v = torch.randn(B, H, 30, D, device=device), torch.randn(B, H, 30, D, device=device)
    for c in caches:
        c.append(k, v)
        kvc.StreamingLLM(4, 10, shift_positions=True, inv_freq=inv_freq).compress(c)
    for h in range(H):
        for x, y in zip(caches[1].live(0, h), caches[0].live(0, h)):
            torch.testing.assert_close(x, y, atol=2e-6, rtol=0)
    assert torch.equal(caches[1].next_position, caches[0].next_position)


def test_opcheck(device):
    B, Hq, H, C, D, bs = 1, 4, 2, 32, 16, 8
    k, v, pos, scores, lens = _contiguous(B, H, C, D, torch.float32, [32, 20])
    kp, vp, pp, sp, table = (t.to(device) for t in _paged(k, v, pos, scores, bs))
    lens = lens.to(device)
    q = torch.randn(B, Hq, 2, D, device=device)
    qp = torch.tensor([[60, 61]], device=device)
    torch.library.opcheck(torch.ops.longattn.decode_attention_paged,
                          (q, kp, vp, table, lens, pp, qp, 0.25, -1, 0, sp.clone()))
    torch.library.opcheck(torch.ops.longattn.decode_attention_paged,
                          (q, kp, vp, table, lens, None, None, 0.25, 8, 2, None))
    keep = torch.tensor([[[0, 3, 5, 31], [1, 2, 19, -1]]], device=device)
    kl = torch.tensor([[4, 3]], device=device)
    torch.library.opcheck(torch.ops.longattn.compact_paged_,
                          (kp, vp, pp, sp, table.clone(), lens.clone(), keep, kl, None, None, 0,
                           False))
    inv_freq = longattn.rope.frequencies(D, 10000.0)[0].to(device)
    newp = torch.arange(4, device=device).expand(B, H, 4)
    torch.library.opcheck(torch.ops.longattn.compact_paged_,
                          (kp, vp, pp, None, table.clone(), lens.clone(), keep, kl, newp, inv_freq,
                           D, False))


def test_torch_compile_fullgraph(device):
    cache = kvc.PagedKVCache(1, 2, 16, num_blocks=8, block_size=8, device=device)
    cache.append(torch.randn(1, 2, 20, 16, device=device), torch.randn(1, 2, 20, 16, device=device))
    q = torch.randn(1, 4, 1, 16, device=device)

    def f(q, kp, vp, t, lens):
        return kvc.decode_attention_paged(q, kp, vp, t, lens)

    args = (q, cache.k_pool, cache.v_pool, cache.block_table, cache.lengths)
    ref = f(*args)
    got = torch.compile(f, fullgraph=True)(*args)
    assert torch.equal(ref[0], got[0]) and torch.equal(ref[1], got[1])


# ------------------------------------------------------------------------------------------
# Bad input
# ------------------------------------------------------------------------------------------


def _small_paged(device):
    k, v, pos, scores, lens = _contiguous(1, 2, 32, 8, torch.float32, [32, 20])
    kp, vp, pp, sp, table = (t.to(device) for t in _paged(k, v, pos, scores, 8))
    return kp, vp, pp, table, lens.to(device), pos.to(device)


def test_paged_decode_shape_errors(device):
    kp, vp, pp, table, lens, pos = _small_paged(device)
    q = torch.randn(1, 4, 1, 8, device=device)
    with pytest.raises(RuntimeError, match="int32"):
        kvc.decode_attention_paged(q, kp, vp, table.long(), lens)
    with pytest.raises(RuntimeError, match="heads per block"):
        kvc.decode_attention_paged(q, kp.expand(-1, -1, 3, -1), vp.expand(-1, -1, 3, -1), table, lens)
    with pytest.raises(RuntimeError, match="positions"):
        kvc.decode_attention_paged(q, kp, vp, table, lens, positions=pos)


def test_paged_decode_value_errors(device):
    """The CPU checks the lengths and the blocks they reach (a GPU reads neither back: NaN
    rows instead, tools/simt_emu/test_emu_cuda_paths.py)."""
    kp, vp, pp, table, lens, _ = _small_paged(device)
    q = torch.randn(1, 4, 1, 8, device=device)
    with pytest.raises(RuntimeError, match="lengths must lie"):
        kvc.decode_attention_paged(q, kp, vp, table, torch.tensor([[33, 20]], device=device))
    bad = table.clone()
    bad[0, 1, 2] = -1  # slot 16..23 of head 1 is cached: its block must exist
    with pytest.raises(RuntimeError, match=r"block_table\[0, 1, 2\] = -1"):
        kvc.decode_attention_paged(q, kp, vp, bad, lens)
    bad[0, 1, 2] = kp.shape[0]
    with pytest.raises(RuntimeError, match="names no block"):
        kvc.decode_attention_paged(q, kp, vp, bad, lens)
    bad[0, 1, 2] = table[0, 1, 2]
    bad[0, 1, 3] = -1  # past head 1's 20 slots: never read
    kvc.decode_attention_paged(q, kp, vp, bad, lens)


@pytest.mark.parametrize("bad", ["shared", "missing", "keep", "heads_per_block", "broadcast"])
def test_paged_compaction_rejects_bad_input(bad, device):
    k, v, pos, scores, lens = _contiguous(1, 2, 32, 8, torch.float32, [32, 20])
    kp, vp, pp, sp, table = _paged(k, v, pos, scores, 8)
    keep = torch.tensor([[[0, 1, 2, 3], [2, 4, 6, 9]]])
    kl = torch.tensor([[4, 4]])
    match = {"shared": "also used", "missing": "names no block", "keep": r"keep\[0, 1\]",
             "heads_per_block": "blocks of one head", "broadcast": "broadcast"}[bad]
    if bad == "shared":
        table[0, 1, 1] = table[0, 0, 3]
    elif bad == "missing":
        table[0, 0, 3] = -1
    elif bad == "keep":
        keep[0, 1, 2] = 3
    elif bad == "heads_per_block":
        kp, vp = kp.expand(-1, -1, 2, -1), vp.expand(-1, -1, 2, -1)
        pp, sp = pp.expand(-1, -1, 2), sp.expand(-1, -1, 2)
    else:
        table = table[:, :1].expand(1, 2, 4)
    kp, vp, pp, table, lens, keep, kl = (t.to(device) for t in (kp, vp, pp, table, lens, keep, kl))
    before = [t.clone() for t in (kp, vp, pp, table, lens)]
    with pytest.raises(RuntimeError, match=match):
        kvc.compact_paged_(kp, vp, table, lens, keep, kl, positions=pp)
    for t, t0 in zip((kp, vp, pp, table, lens), before):
        assert torch.equal(t, t0)  # nothing moved


def test_paged_cache_append_errors():
    cache = kvc.PagedKVCache(1, 2, 4, num_blocks=3, block_size=4, max_blocks=2)
    cache.append(torch.randn(1, 2, 4, 4), torch.randn(1, 2, 4, 4))
    with pytest.raises(RuntimeError, match="2 new blocks needed, 1 free"):
        cache.append(torch.randn(1, 2, 1, 4), torch.randn(1, 2, 1, 4))
    with pytest.raises(RuntimeError, match="capacity 8"):
        cache.append(torch.randn(1, 2, 5, 4), torch.randn(1, 2, 5, 4))
    assert cache.lengths.tolist() == [[4, 4]] and cache.blocks_in_use() == 2
    with pytest.raises(TypeError, match="dtype"):
        cache.append(torch.randn(1, 2, 1, 4, dtype=torch.float64), torch.randn(1, 2, 1, 4))
