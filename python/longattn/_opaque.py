"""Compositions that torch.compile sees as one opaque op.

Some public functions are Python compositions of the kernels whose control flow depends on
sizes or on host data (segment counts of dilated attention, the sequence table of a varlen
batch). Traced by Dynamo, each such branch becomes a guard (a recompilation per case) or a
graph break; run through ``longattn::composite``, the composition runs eagerly inside one graph
node whatever the shapes. The op's backward recomputes the composition with autograd and
differentiates it (a second forward, paid only under torch.compile: eager callers run the
composition directly).

A composition registers a function ``fn(tensors, **config) -> (out, lse)`` (``tensors`` a list
of optional tensors, ``config`` flat keywords of JSON-serializable constants) and a ``fake(tensors, **config)`` giving the
output shapes; :func:`call` runs it as the op.
"""
from __future__ import annotations

import contextlib
import json
from typing import Callable, Dict, List, Optional, Tuple

import torch

_K = torch._C.DispatchKey
# The keys excluded below an op's autograd layer (autograd itself, and the view/in-place
# tracking that autograd of views and in-place writes needs).
_AUTOGRAD_KEYS = (torch._C.DispatchKeySet(_K.AutogradFunctionality)
                  | torch._C.DispatchKeySet(_K.AutogradOther)
                  | torch._C.DispatchKeySet(_K.AutogradNestedTensor)
                  | torch._C.DispatchKeySet(_K.ADInplaceOrView))

_COMPOSITIONS: Dict[str, Tuple[Callable, Callable]] = {}


def register(kind: str, fake: Callable):
    """Decorator: ``fn`` becomes composition ``kind`` with output shapes from ``fake``."""
    def deco(fn):
        _COMPOSITIONS[kind] = (fn, fake)
        return fn
    return deco


def call(kind: str, tensors: List[Optional[torch.Tensor]], **config):
    """Composition ``kind`` as one op node: ``(out, lse)``, differentiable in every tensor."""
    # Floats travel as op arguments: Dynamo may trace them as symbolic values, which cannot
    # enter the (constant) configuration string.
    names = [k for k, v in config.items() if isinstance(v, (float, torch.SymFloat))]
    rest = [(k, v) for k, v in config.items() if k not in names]
    return _composite(kind, tensors, _encode(names, *rest), [config[k] for k in names])


def _decode(config: str, floats: List[float]) -> dict:
    names, rest = json.loads(config)
    return dict(rest, **dict(zip(names, floats)))


# Traced code cannot run the json encoder; the configuration is a constant of the graph anyway.
@torch._dynamo.assume_constant_result
def _encode(names, *items) -> str:
    return json.dumps([names, sorted(items)])


@contextlib.contextmanager
def _autograd_enabled():
    """Record autograd inside an op implementation, with grad mode on; the rest of the
    dispatch state (autocast exclusion, ...) stays as it is."""
    include = torch._C._dispatch_tls_local_include_set()
    exclude = torch._C._dispatch_tls_local_exclude_set() - _AUTOGRAD_KEYS
    with torch._C._ForceDispatchKeyGuard(include, exclude), torch.enable_grad():
        yield


@torch.library.custom_op("longattn::composite", mutates_args=())
def _composite(kind: str, tensors: List[Optional[torch.Tensor]], config: str,
               floats: List[float]) -> Tuple[torch.Tensor, torch.Tensor]:
    fn, _ = _COMPOSITIONS[kind]
    with torch.no_grad():
        out, lse = fn(tensors, **_decode(config, floats))
    return out, lse


@_composite.register_fake
def _(kind, tensors, config, floats):
    _, fake = _COMPOSITIONS[kind]
    return fake(tensors, **_decode(config, floats))


@torch.library.custom_op("longattn::composite_backward", mutates_args=())
def _composite_backward(kind: str, tensors: List[Optional[torch.Tensor]], config: str,
                        floats: List[float], dout: torch.Tensor, dlse: torch.Tensor,
                        needs_grad: List[bool]) -> List[torch.Tensor]:
    fn, _ = _COMPOSITIONS[kind]
    with _autograd_enabled():
        ins = [t.detach().requires_grad_(need) if t is not None else None
               for t, need in zip(tensors, needs_grad)]
        out, lse = fn(ins, **_decode(config, floats))
        # Rows with lse = -inf (nothing visible) have no gradient path through their lse.
        dlse = torch.where(torch.isfinite(lse), dlse, 0)
        wrt = [t for t in ins if t is not None and t.requires_grad]
        grads = iter(torch.autograd.grad((out, lse), wrt, (dout, dlse), allow_unused=True))
    # One tensor per input: its gradient, or an empty tensor where none is asked for.
    res = []
    for t in ins:
        if t is not None and t.requires_grad:
            g = next(grads)
            res.append(torch.zeros_like(t) if g is None else g)
        else:
            res.append(torch.empty(0))
    return res


@_composite_backward.register_fake
def _(kind, tensors, config, floats, dout, dlse, needs_grad):
    return [t.new_empty(t.shape) if t is not None and need else torch.empty(0)
            for t, need in zip(tensors, needs_grad)]


def _setup_context(ctx, inputs, output):
    kind, tensors, config, floats = inputs
    ctx.kind, ctx.config, ctx.floats = kind, config, floats
    ctx.present = [t is not None for t in tensors]
    ctx.needs = [t is not None and t.requires_grad for t in tensors]
    ctx.save_for_backward(*[t for t in tensors if t is not None], *output)


def _backward(ctx, dout, dlse):
    *saved, out, lse = ctx.saved_tensors
    saved = iter(saved)
    tensors = [next(saved) if p else None for p in ctx.present]
    dout = torch.zeros_like(out) if dout is None else dout
    dlse = torch.zeros_like(lse) if dlse is None else dlse
    grads = _composite_backward(ctx.kind, tensors, ctx.config, ctx.floats, dout, dlse,
                                ctx.needs)
    # A list of floats gets None; an empty list cannot be told from a tensor list, so [].
    return (None, [g if need else None for g, need in zip(grads, ctx.needs)], None,
            None if ctx.floats else [])


torch.library.register_autograd("longattn::composite", _backward, setup_context=_setup_context)
