"""No host synchronization on the CUDA hot paths: varlen attention given max_seqlen (trusted, as
FlashAttention trusts it), the KV cache's append and attend, and one decode step of a tiny model
captured and replayed in a CUDA graph. Run under torch.cuda.set_sync_debug_mode("error"), which
raises on any synchronizing call. Needs a GPU and a CUDA build."""
import pytest
import torch

import longattn
from helpers import cu_seqlens, has_cuda_build
from longattn import kvcache as kvc

pytestmark = pytest.mark.skipif(not (torch.cuda.is_available() and has_cuda_build()),
                                reason="needs a GPU and a CUDA build")


class _SyncErrors:
    def __enter__(self):
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")

    def __exit__(self, *exc):
        torch.cuda.set_sync_debug_mode("default")


def test_varlen_with_max_seqlen_does_not_sync():
    lens = [17, 0, 130, 64]
    cu = cu_seqlens(lens, "cuda")
    q, k, v = (torch.randn(sum(lens), h, 64, device="cuda", dtype=torch.bfloat16,
                           requires_grad=True) for h in (8, 2, 2))
    with _SyncErrors():
        out = longattn.attention(q, k, v, cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=130,
                                 max_seqlen_k=130, causal=True, window=(31, 0))
        out.sum().backward()
    ref = longattn.attention(q.detach().cpu().float(), k.detach().cpu().float(),
                             v.detach().cpu().float(), cu_seqlens_q=cu.cpu(), cu_seqlens_k=cu.cpu(),
                             causal=True, window=(31, 0))
    torch.testing.assert_close(out.float().cpu(), ref, atol=2e-2, rtol=2e-2)


def test_kvcache_append_and_attend_do_not_sync():
    cache = kvc.KVCache(2, 2, 64, 256, dtype=torch.bfloat16, device="cuda", track_scores=True)
    cache.append(*(torch.randn(2, 2, 100, 64, device="cuda", dtype=torch.bfloat16) for _ in "kv"))
    with _SyncErrors():
        for _ in range(3):
            pos = cache.append(*(torch.randn(2, 2, 1, 64, device="cuda", dtype=torch.bfloat16)
                                 for _ in "kv"))
            out, lse = cache.attend(torch.randn(2, 8, 1, 64, device="cuda", dtype=torch.bfloat16),
                                    q_positions=pos, accumulate_scores=True)
    assert torch.isfinite(out).all()
    cache.check()


def test_overflowing_append_is_loud_not_silent():
    cache = kvc.KVCache(1, 1, 16, 4, device="cuda")
    cache.append(*(torch.randn(1, 1, 4, 16, device="cuda") for _ in "kv"))
    cache.append(*(torch.randn(1, 1, 1, 16, device="cuda") for _ in "kv"))
    out, _ = cache.attend(torch.randn(1, 1, 1, 16, device="cuda"))
    assert torch.isnan(out).all()
    with pytest.raises(RuntimeError, match="capacity"):
        cache.check()


class _TinyDecoder(torch.nn.Module):
    """Embedding, one attention layer over a longattn KVCache, and a head: one decode step."""

    def __init__(self, vocab=64, dim=128, heads=4, kv_heads=2):
        super().__init__()
        self.heads, self.kv_heads, self.hd = heads, kv_heads, dim // heads
        self.emb = torch.nn.Embedding(vocab, dim)
        self.q = torch.nn.Linear(dim, heads * self.hd)
        self.kv = torch.nn.Linear(dim, 2 * kv_heads * self.hd)
        self.head = torch.nn.Linear(heads * self.hd, vocab)

    def forward(self, tokens, cache):
        B = tokens.shape[0]
        x = self.emb(tokens)  # (B, 1, dim)
        q = self.q(x).view(B, 1, self.heads, self.hd).transpose(1, 2)
        k, v = self.kv(x).view(B, 1, 2, self.kv_heads, self.hd).permute(2, 0, 3, 1, 4)
        pos = cache.append(k.contiguous(), v.contiguous())
        out, _ = cache.attend(q, q_positions=pos)
        return self.head(out.transpose(1, 2).reshape(B, 1, -1))


def test_decode_step_captured_in_a_cuda_graph():
    torch.manual_seed(0)
    model = _TinyDecoder().cuda().eval()
    B = 2
    cache = kvc.KVCache(B, 2, 32, 64, device="cuda")
    eager_cache = kvc.KVCache(B, 2, 32, 64, device="cuda")
    tokens = torch.zeros(B, 1, dtype=torch.long, device="cuda")
    with torch.no_grad():
        # Warm up on a side stream (allocations, lazy init), as CUDA graph capture requires.
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            model(tokens, kvc.KVCache(B, 2, 32, 64, device="cuda"))
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with _SyncErrors(), torch.cuda.graph(graph):
            logits = model(tokens, cache)
        cache.lengths.zero_()
        cache.next_position.zero_()
        for step in range(5):
            tokens.copy_(torch.full((B, 1), step + 3, device="cuda"))
            graph.replay()
            want = model(tokens.clone(), eager_cache)
            torch.testing.assert_close(logits, want, atol=1e-4, rtol=1e-4)
    assert int(cache.lengths.max()) == 5
