"""Tiny random transformers models (built from configs, no downloads) and a recorder of what
the "longattn" attention function receives; used by test_transformers_integration.py and
test_transformers_cache.py.

Every model has 2 layers, 4 query heads over 2 kv heads of dim 16, a vocabulary of 128 and
``initializer_range=0.2`` (well above the usual 0.02: attention is peaked and logits far from
ties, so greedy tokens and the scores eviction ranks by are stable under rounding). Sliding
windows are 6 keys, shorter than every test sequence. Layer 0 of Gemma 2/3 and gpt-oss slides,
layer 1 is global; Qwen2 the other way round; Mistral slides everywhere.
"""
from __future__ import annotations

import contextlib
import copy
import inspect
from dataclasses import dataclass
from typing import List, Optional

import torch

MODELS = ("llama", "mistral", "gemma2", "gemma3", "gpt_oss", "qwen2")
WINDOW = 6


def tiny_model(name: str, attn: str = "eager", dtype=torch.float32):
    """A randomly initialised ``*ForCausalLM`` from torch's global RNG (seeded per test)."""
    import transformers as T

    common = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                  max_position_embeddings=256, initializer_range=0.2)
    alternating = ["sliding_attention", "full_attention"]
    if name == "llama":
        cfg, cls = T.LlamaConfig(**common), T.LlamaForCausalLM
    elif name == "mistral":
        cfg, cls = T.MistralConfig(sliding_window=WINDOW, **common), T.MistralForCausalLM
    elif name == "gemma2":
        # A softcap of 2 bends the logits (50, the real one, would leave random ones linear).
        cfg = T.Gemma2Config(sliding_window=WINDOW, attn_logit_softcapping=2.0,
                             query_pre_attn_scalar=16, layer_types=alternating,
                             tie_word_embeddings=False, **common)
        cls = T.Gemma2ForCausalLM
    elif name == "gemma3":
        cfg = T.Gemma3TextConfig(sliding_window=WINDOW, query_pre_attn_scalar=16,
                                 layer_types=alternating, tie_word_embeddings=False, **common)
        cls = T.Gemma3ForCausalLM
    elif name == "gpt_oss":
        # The real YaRN settings need max_position_embeddings >= their original 4096.
        kw = dict(common, intermediate_size=32, max_position_embeddings=131072)
        cfg = T.GptOssConfig(sliding_window=WINDOW, num_local_experts=4, num_experts_per_tok=2,
                             layer_types=alternating, **kw)
        cls = T.GptOssForCausalLM
    elif name == "qwen2":
        cfg = T.Qwen2Config(use_sliding_window=True, sliding_window=WINDOW, max_window_layers=1,
                            **common)
        cls = T.Qwen2ForCausalLM
    else:
        raise ValueError(name)
    model = cls(cfg).to(dtype).eval()
    model.set_attn_implementation(attn)
    return model


def fp64_copy(model):
    """The same model in float64, the truth of the tolerance rule (experts run by the eager
    loop: grouped_mm has no float64)."""
    ref = copy.deepcopy(model).double()
    if hasattr(ref, "set_experts_implementation") and ref._can_set_experts_implementation():
        ref.set_experts_implementation("eager")
    return ref


def cache_kw(model) -> str:
    """The generate()/forward keyword for a cache: ``cache`` since transformers 5.3, before
    that ``past_key_values``."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def left_padded(batch: int, length: int, pads: List[int]):
    """Random tokens (batch, length) and a mask with ``pads[b]`` padding tokens on the left."""
    ids = torch.randint(0, 128, (batch, length))
    mask = torch.ones(batch, length, dtype=torch.long)
    for b, p in enumerate(pads):
        mask[b, :p] = 0
    return ids, mask


def positions_of(mask: torch.Tensor) -> torch.Tensor:
    """generate()'s position_ids for a padded batch."""
    return (mask.long().cumsum(-1) - 1).clamp(min=0)


@dataclass
class Call:
    layer: int
    query: torch.Tensor            # (B, Hq, n, D), rotated as the model rotated it
    key: torch.Tensor              # (B, Hkv, n_k, D)
    mask: Optional[torch.Tensor]   # what the mask function handed over
    position_ids: Optional[torch.Tensor]
    scaling: Optional[float]


@contextlib.contextmanager
def recording():
    """Record every call of the "longattn" attention function (a list of :class:`Call`)."""
    from transformers import AttentionInterface

    from longattn.integrations import transformers as lt

    lt.register()
    calls: List[Call] = []

    def rec(module, query, key, value, attention_mask, **kw):
        calls.append(Call(module.layer_idx, query.detach().clone(), key.detach().clone(),
                          attention_mask, kw.get("position_ids"), kw.get("scaling")))
        return lt.longattn_attention_forward(module, query, key, value, attention_mask, **kw)

    mapping = AttentionInterface._global_mapping
    mapping[lt.NAME] = rec
    try:
        yield calls
    finally:
        mapping[lt.NAME] = lt.longattn_attention_forward
