"""Generation with longattn's KV cache on a tiny randomly initialised Llama-style model.

    python examples/kvcache_generation.py [--stream 4000]

1. A 64-token prompt + greedy decoding through per-layer KVCaches large enough for the whole
   sequence: the logits of every step equal a full causal forward of the whole sequence.
2. A long stream with StreamingLLM (4 sinks + 60 recent, positions shifted into the cache):
   the cache's memory stays flat however long the stream runs.
"""
from __future__ import annotations

import argparse
import math

import torch
import torch.nn.functional as F

import longattn
from longattn import kvcache as kvc


class TinyLlama(torch.nn.Module):
    def __init__(self, vocab=256, dim=64, layers=2, heads=4, kv_heads=2, theta=10000.0):
        super().__init__()
        self.heads, self.kv_heads, self.hd = heads, kv_heads, dim // heads
        self.emb = torch.nn.Embedding(vocab, dim)
        self.layers = torch.nn.ModuleList()
        for _ in range(layers):
            self.layers.append(torch.nn.ModuleDict(dict(
                n1=torch.nn.RMSNorm(dim), n2=torch.nn.RMSNorm(dim),
                q=torch.nn.Linear(dim, heads * self.hd, bias=False),
                kv=torch.nn.Linear(dim, 2 * kv_heads * self.hd, bias=False),
                o=torch.nn.Linear(heads * self.hd, dim, bias=False),
                up=torch.nn.Linear(dim, 4 * dim, bias=False),
                gate=torch.nn.Linear(dim, 4 * dim, bias=False),
                down=torch.nn.Linear(4 * dim, dim, bias=False))))
        self.norm = torch.nn.RMSNorm(dim)
        self.head = torch.nn.Linear(dim, vocab, bias=False)
        self.inv_freq, _ = longattn.rope.frequencies(self.hd, theta)

    def _qkv(self, layer, x, positions):
        B, L, _ = x.shape
        h = layer["n1"](x)
        q = layer["q"](h).view(B, L, self.heads, self.hd)
        k, v = layer["kv"](h).view(B, L, 2, self.kv_heads, self.hd).unbind(2)
        q, k = longattn.apply_rope(q, k, positions, self.inv_freq)
        return q, k, v

    def _mlp(self, layer, x):
        h = layer["n2"](x)
        return x + layer["down"](F.silu(layer["gate"](h)) * layer["up"](h))

    @torch.no_grad()
    def forward_full(self, tokens):
        """Reference: causal attention over the whole sequence, no cache."""
        B, L = tokens.shape
        x = self.emb(tokens)
        pos = torch.arange(L).expand(B, L)
        for layer in self.layers:
            q, k, v = self._qkv(layer, x, pos)
            a = longattn.attention(q, k, v, causal=True)
            x = self._mlp(layer, x + layer["o"](a.reshape(B, L, -1)))
        return self.head(self.norm(x))

    def new_caches(self, batch, capacity):
        return [kvc.KVCache(batch, self.kv_heads, self.hd, capacity) for _ in self.layers]

    @torch.no_grad()
    def forward_cached(self, tokens, caches, policy=None):
        """n new tokens through the caches (positions continue from the cache's)."""
        B, n = tokens.shape
        if policy is not None and caches[0].max_length() + n > caches[0].capacity:
            for c in caches:
                policy.compress(c)
        pos = caches[0].next_position[:, None] + torch.arange(n)
        x = self.emb(tokens)
        for layer, cache in zip(self.layers, caches):
            q, k, v = self._qkv(layer, x, pos)
            cache.append(k.transpose(1, 2), v.transpose(1, 2), pos)
            a, _ = cache.attend(q.transpose(1, 2), q_positions=pos)
            x = self._mlp(layer, x + layer["o"](a.transpose(1, 2).reshape(B, n, -1)))
        return self.head(self.norm(x))


def check_full_cache(model, prompt_len=64, new=32, batch=2):
    """Greedy decoding through full-size caches; returns max |logits - full-forward logits|."""
    tokens = torch.randint(0, 256, (batch, prompt_len))
    caches = model.new_caches(batch, prompt_len + new)
    logits = [model.forward_cached(tokens, caches)]
    for _ in range(new - 1):
        nxt = logits[-1][:, -1].argmax(-1, keepdim=True)
        tokens = torch.cat([tokens, nxt], 1)
        logits.append(model.forward_cached(nxt, caches))
    got = torch.cat(logits, 1)
    ref = model.forward_full(tokens)
    return (got - ref).abs().max().item()


def stream(model, steps, n_sink=4, n_recent=60):
    policy = kvc.StreamingLLM(n_sink, n_recent, shift_positions=True, inv_freq=model.inv_freq)
    caches = model.new_caches(1, n_sink + n_recent + 1)
    tok = torch.zeros(1, 1, dtype=torch.long)
    sizes = []
    for t in range(steps):
        logits = model.forward_cached(tok, caches, policy)
        tok = logits[:, -1].argmax(-1, keepdim=True)
        if t % max(1, steps // 8) == 0 or t == steps - 1:
            sizes.append((t, sum(c.nbytes() for c in caches), caches[0].max_length(),
                          bool(torch.isfinite(logits).all())))
    return sizes


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--stream", type=int, default=2000)
    a = ap.parse_args()
    torch.manual_seed(0)
    model = TinyLlama().eval()
    err = check_full_cache(model)
    print(f"full-size cache vs full causal forward: max |dlogits| = {err:.2e}")
    for t, nbytes, length, finite in stream(model, a.stream):
        print(f"step {t:6d}: cache {nbytes/1024:.1f} KiB, {length} keys per head, finite {finite}")


if __name__ == "__main__":
    main()
