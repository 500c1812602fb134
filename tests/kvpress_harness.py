"""Run NVIDIA kvpress's presses on a tiny random transformers Llama and recover what they keep.

Used by test_kvcache_kvpress.py. Two facts about kvpress shape this module:

* ``kvpress/__init__.py`` imports every press and the pipeline, which pull in datasets, requests,
  cachetools, fire (and so pandas, pyarrow). StreamingLLMPress, SnapKVPress and
  KeyRerotationPress need only torch and transformers, so :func:`load_presses` imports their modules under a bare ``kvpress``
  package object instead: ``pip install --no-deps kvpress`` is all they need.
* kvpress's forward hook reads the attention call's ``past_key_values`` and ``cache_position``
  keyword arguments, which transformers 5.3 renamed (``cache``) and dropped; kvpress pins
  ``transformers<5.3``. With a transformers it supports, :func:`run_press` uses kvpress's own
  ``with press(model):`` hooks; with a newer one it calls ``press.compress`` from a hook of its
  own that hands over the same arguments (``hidden_states``, the layer's cached keys and values,
  the attention weights the layer returned, the call's kwargs) and stores the result back.
"""
from __future__ import annotations

import functools
import importlib
import importlib.util
import inspect
import sys
import types
from dataclasses import dataclass
from typing import List, Optional

import torch


_PRESSES = {"StreamingLLMPress": "streaming_llm_press", "SnapKVPress": "snapkv_press",
            "KeyRerotationPress": "key_rerotation_press"}


@functools.lru_cache(maxsize=None)
def load_presses() -> Optional[types.SimpleNamespace]:
    """kvpress's StreamingLLMPress, SnapKVPress and KeyRerotationPress (attributes of the
    returned namespace), or None when kvpress or transformers is missing. The bare package
    object is removed from ``sys.modules`` again, so a later ``import kvpress`` still gets the
    real package."""
    if importlib.util.find_spec("transformers") is None:
        return None
    if "kvpress" in sys.modules:
        real = sys.modules["kvpress"]
        return types.SimpleNamespace(**{name: getattr(real, name) for name in _PRESSES})
    spec = importlib.util.find_spec("kvpress")
    if spec is None or not spec.submodule_search_locations:
        return None
    pkg = types.ModuleType("kvpress")
    pkg.__path__ = list(spec.submodule_search_locations)
    before = set(sys.modules)
    sys.modules["kvpress"] = pkg
    try:
        return types.SimpleNamespace(**{
            name: getattr(importlib.import_module(f"kvpress.presses.{mod}"), name)
            for name, mod in _PRESSES.items()})
    finally:
        for name in set(sys.modules) - before:
            if name == "kvpress" or name.startswith("kvpress."):
                del sys.modules[name]


def hooks_supported() -> bool:
    """Whether the installed transformers satisfies kvpress's own requirement on it (then
    kvpress's forward hook finds the keyword arguments it reads)."""
    from importlib.metadata import PackageNotFoundError, requires, version

    from packaging.requirements import Requirement

    try:
        reqs = requires("kvpress") or []
    except PackageNotFoundError:
        reqs = []
    for r in reqs:
        req = Requirement(r)
        if req.name == "transformers" and req.marker is None:
            return req.specifier.contains(version("transformers"), prereleases=True)
    return True


def tiny_llama(*, heads: int = 4, kv_heads: int = 2, head_dim: int = 16, layers: int = 2,
               attn_implementation: str = "eager", init_std: float = 0.2):
    """A randomly initialised LlamaForCausalLM in fp32. ``init_std`` well above Llama's 0.02
    makes the attention peaked, so attention-based scores are far from ties."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=96,
                      num_hidden_layers=layers, num_attention_heads=heads,
                      num_key_value_heads=kv_heads, head_dim=head_dim,
                      max_position_embeddings=512, initializer_range=init_std)
    model = LlamaForCausalLM(cfg)  # from torch's global RNG (the test suite seeds it per test)
    model.set_attn_implementation(attn_implementation)
    return model.eval()


@dataclass
class LayerRun:
    """One attention layer's prefill under a press."""
    keys: torch.Tensor              # (B, Hkv, L, D) the layer's cached (rotated) keys before the press
    values: torch.Tensor            # (B, Hkv, L, D)
    queries: torch.Tensor           # (B, Hq, L, D) the layer's rotated queries
    scores: Optional[torch.Tensor]  # (B, Hkv, L) what the press's scorer returned
    kept: torch.Tensor              # (B, Hkv, n_kept) the kept indices, ascending
    kept_keys: torch.Tensor         # (B, Hkv, n_kept, D) the press's cached keys, in that order


def _cache_of(kwargs):
    return kwargs["past_key_values"] if "past_key_values" in kwargs else kwargs["cache"]


def _kept_indices(full: torch.Tensor, pruned: torch.Tensor):
    """kvpress gathers the kept rows (in top-k order for a plain ScorerPress): find each row of
    ``pruned`` among the rows of ``full`` (bitwise equal: a gather copies them). Values, not
    keys: KeyRerotationPress re-rotates the kept keys. Returns the indices ascending and the
    permutation that sorts ``pruned``'s rows that way."""
    match = (pruned[:, :, :, None, :] == full[:, :, None, :, :]).all(-1)  # (B, H, n, L)
    if not bool((match.sum(-1) == 1).all()):
        raise AssertionError("a kept value matches no row, or several rows, of the full cache")
    idx, order = match.to(torch.int64).argmax(-1).sort(-1)
    return idx, order


@torch.no_grad()
def run_press(model, input_ids: torch.Tensor, press) -> List[LayerRun]:
    """Prefill ``input_ids`` with ``press`` active; returns what every layer held and kept."""
    from transformers import DynamicCache
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    attn_layers = [layer.self_attn for layer in model.model.layers]
    seen = {}
    scores = {}

    def capture(module, args, kwargs, output):  # runs before the press's hook
        layer = _cache_of(kwargs).layers[module.layer_idx]
        h = kwargs["hidden_states"]
        B, L, _ = h.shape
        q = module.q_proj(h).view(B, L, -1, module.head_dim).transpose(1, 2)
        cos, sin = kwargs["position_embeddings"]
        seen[module.layer_idx] = (layer.keys.clone(), layer.values.clone(),
                                  apply_rotary_pos_emb(q, q, cos, sin)[0])

    scorer = getattr(press, "press", press)  # KeyRerotationPress wraps a ScorerPress
    score = scorer.score

    def recording_score(module, *a, **kw):
        s = score(module, *a, **kw)
        scores[module.layer_idx] = s.detach().clone()
        return s

    def compress_hook(module, args, kwargs, output):  # kvpress's hook for a newer transformers
        layer = _cache_of(kwargs).layers[module.layer_idx]
        layer.keys, layer.values = press.compress(module, kwargs["hidden_states"], layer.keys,
                                                  layer.values, output[1], kwargs)
        return output

    handles = [m.register_forward_hook(capture, with_kwargs=True) for m in attn_layers]
    scorer.score = recording_score
    cache = DynamicCache()
    cache_kw = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    try:
        if hooks_supported():
            with press(model):
                model(input_ids, use_cache=True, **{cache_kw: cache})
        else:
            press.post_init_from_model(model)
            for m in attn_layers:  # as kvpress's press(model) does (KeyRerotationPress reads it)
                m.rotary_emb = model.model.rotary_emb
            handles += [m.register_forward_hook(compress_hook, with_kwargs=True) for m in attn_layers]
            model(input_ids, use_cache=True, **{cache_kw: cache})
    finally:
        for hd in handles:
            hd.remove()
        del scorer.score
    runs = []
    for i in range(len(attn_layers)):
        k, v, q = seen[i]
        layer = cache.layers[i]
        kept, order = _kept_indices(v, layer.values)
        kept_keys = layer.keys.gather(2, order[..., None].expand(-1, -1, -1, k.shape[-1]))
        runs.append(LayerRun(k, v, q, scores.get(i), kept, kept_keys))
    return runs
