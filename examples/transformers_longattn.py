"""A transformers Llama through longattn: speed and KV-cache memory against eager attention.

    python examples/transformers_longattn.py [--prompt 1024] [--new 32] [--layers 6]

The model is built from a Llama config (GQA, RoPE; about 16M parameters by default) with random
weights: nothing is downloaded, and the generated text means nothing, but every shape and code
path is the real one. Each row is one greedy ``generate()`` of a batch of prompts:

* eager / longattn with transformers' DynamicCache: the attention kernel alone;
* longattn with LongattnCache: decode steps through decode_attention, no eviction (the tokens
  must equal eager's);
* with eviction: a kvpress-style press (SnapKV, half the prompt) and absolute budgets
  (StreamingLLM, H2O): the cache holds a fixed number of keys whatever the length.
"""
from __future__ import annotations

import argparse
import time

import torch
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM, LogitsProcessor

from longattn import kvcache as kvc
from longattn.integrations import transformers as lt


def build(layers: int) -> LlamaForCausalLM:
    cfg = LlamaConfig(vocab_size=8192, hidden_size=384, intermediate_size=1024,
                      num_hidden_layers=layers, num_attention_heads=6, num_key_value_heads=2,
                      max_position_embeddings=8192, initializer_range=0.02)
    return LlamaForCausalLM(cfg).eval()


class Clock(LogitsProcessor):
    """Timestamps of the logits of every step: the first one ends the prefill."""

    def __init__(self):
        self.stamps = []

    def __call__(self, input_ids, scores):
        self.stamps.append(time.perf_counter())
        return scores


def held(cache) -> int:
    """Bytes of the cache's key/value buffers (the allocation, not only the live keys)."""
    if isinstance(cache, lt.LongattnCache):
        return cache.nbytes()
    return sum(layer.keys.nbytes + layer.values.nbytes for layer in cache.layers)


def run(model, attn, cache, ids, mask, new):
    model.set_attn_implementation(attn)
    clock = Clock()
    with torch.no_grad():
        start = time.perf_counter()
        out = model.generate(ids, attention_mask=mask, max_new_tokens=new, do_sample=False,
                             pad_token_id=0, cache=cache, logits_processor=[clock])
    steps = clock.stamps
    tokens_per_s = ids.shape[0] * (len(steps) - 1) / (steps[-1] - steps[0])
    return out[:, ids.shape[1]:], steps[0] - start, tokens_per_s, held(cache)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--prompt", type=int, default=1024)
    ap.add_argument("--new", type=int, default=32)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--layers", type=int, default=6)
    a = ap.parse_args()
    torch.manual_seed(0)
    lt.register()
    model = build(a.layers)
    n_params = sum(p.numel() for p in model.parameters())
    ids = torch.randint(0, model.config.vocab_size, (a.batch, a.prompt))
    mask = torch.ones_like(ids)
    mask[1:, : a.prompt // 8] = 0  # left padding: sequences of different lengths
    inv_freq = model.model.rotary_emb.inv_freq
    rows = [
        ("eager, DynamicCache", "eager", lambda: DynamicCache()),
        ("longattn, DynamicCache", "longattn", lambda: DynamicCache()),
        ("longattn, LongattnCache", "longattn",
         lambda: lt.LongattnCache(model.config, capacity=a.prompt + a.new)),
        ("  + SnapKVPress(0.5)", "longattn",
         lambda: lt.LongattnCache(model.config, press=lt.SnapKVPress(0.5, window_size=32))),
        ("  + StreamingLLM(4 + 252, shifted)", "longattn",
         lambda: lt.LongattnCache(model.config, policy=kvc.StreamingLLM(
             4, 252, shift_positions=True, inv_freq=inv_freq))),
        ("  + H2O(256)", "longattn",
         lambda: lt.LongattnCache(model.config, policy=kvc.H2O(256, n_recent=64, n_sink=4))),
    ]
    print(f"Llama, {a.layers} layers, {n_params / 1e6:.0f}M parameters, fp32, "
          f"{torch.get_num_threads()} threads; batch {a.batch} x {a.prompt} prompt tokens "
          f"(left-padded), {a.new} new tokens")
    print(f"{'':36s}{'prefill s':>10s}{'decode tok/s':>14s}{'cache MiB':>11s}  tokens == eager")
    expect = None
    for label, attn, make in rows:
        tokens, prefill, tps, nbytes = run(model, attn, make(), ids, mask, a.new)
        if expect is None:
            expect = tokens
        same = (tokens == expect).float().mean().item()
        print(f"{label:36s}{prefill:10.2f}{tps:14.1f}{nbytes / 2**20:11.2f}  {same:6.0%}")


if __name__ == "__main__":
    main()
