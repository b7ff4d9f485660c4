"""Gradients through a model whose weights were loaded under torch.inference_mode (every ComfyUI node runs
there, so checkpoint weights are inference tensors and "cannot be saved for backward";
shared/design/comfyui-internals.md section 3).

`autograd_parameters(*modules)` swaps each inference-tensor parameter and buffer for a normal tensor for the
duration of a `with` block and puts the original objects back afterwards, so the shared model is left exactly
as it was. The normal tensor is a zero-copy alias of the same memory made through DLPack (a tensor rebuilt
from raw storage carries no inference flag), so no weight is copied; dtypes DLPack cannot carry (e.g. fp8)
fall back to a copy. The aliases are never written to. Use it around a whole guided run, not per step, over
every network the guided call runs (nodes._host.guided_networks finds them in a sampling run).
"""
from __future__ import annotations

import contextvars
from contextlib import contextmanager

import torch
import torch.utils.checkpoint


def normal_alias(t: torch.Tensor) -> torch.Tensor:
    """A non-inference tensor sharing t's memory (a copy only when DLPack cannot represent the dtype)."""
    try:
        alias = torch.from_dlpack(t.detach())
        if alias.data_ptr() == t.data_ptr() and not alias.is_inference():
            return alias
    except (RuntimeError, TypeError, BufferError):
        pass
    with torch.inference_mode(False):
        return t.detach().clone()


@contextmanager
def autograd_parameters(*modules: torch.nn.Module):
    """Every inference-tensor parameter and buffer of `modules` (and their submodules, each once) aliased by a
    normal tensor inside the block, the original objects put back afterwards. Give it every network the guided
    call runs: the UNet and what the conditioning or the patches bring (control models, GLIGEN, adapters)."""
    swapped, seen = [], set()
    try:
        with torch.inference_mode(False):
            for m in (sub for module in modules if module is not None for sub in module.modules()):
                if id(m) in seen:
                    continue
                seen.add(id(m))
                for name, p in list(m._parameters.items()):
                    if p is not None and p.is_inference():
                        m._parameters[name] = torch.nn.Parameter(normal_alias(p), requires_grad=False)
                        swapped.append((m._parameters, name, p))
                for name, b in list(m._buffers.items()):
                    if b is not None and b.is_inference():
                        m._buffers[name] = normal_alias(b)
                        swapped.append((m._buffers, name, b))
        yield modules[0] if len(modules) == 1 else modules
    finally:
        for table, name, original in reversed(swapped):
            table[name] = original


# --- activation checkpointing over the layers of a shared network --------------------------------------------------

_RECOMPUTING = contextvars.ContextVar("z2i_recomputing", default=False)


def recomputing() -> bool:
    """True while a checkpointed layer is being recomputed for the backward pass: captures (maps, features) skip
    storing, so a layer's second forward leaves no trace; controllers that rewrite maps (CSG's mixup) still apply,
    so the recomputed activations are the ones the forward made. Also true for any forward run while a backward
    pass is in progress (the host's own checkpointing: ComfyUI runs an MMDiT joint block under
    torch.utils.checkpoint when a "dit" block replace calls it), since only a recomputation runs then."""
    return _RECOMPUTING.get() or torch._C._current_graph_task_id() != -1


def freeze(value):
    """The per-call state a layer reads, as it is now, for its recomputation: dicts (ComfyUI's transformer_options,
    which the host mutates between layers: block, block_index, ...) are copied one level deep, and values with a
    `snapshot()` method (Z2I's per-call objects, e.g. the row a row-wise evaluation is on) are replaced by it."""
    if isinstance(value, dict):
        return {k: (v.snapshot() if hasattr(v, "snapshot") else v) for k, v in value.items()}
    return value.snapshot() if hasattr(value, "snapshot") else value


@contextmanager
def checkpointed(layers, when=None):
    """Activation checkpointing (torch.utils.checkpoint, non-reentrant) over each module of `layers` inside the
    block: while gradients are enabled, a layer keeps only its inputs for the backward pass and runs its forward
    again when the gradient reaches it, so a guided call holds about one layer's activations instead of the whole
    network's (one more forward of each layer per backward pass). Calls without gradients are untouched.

    The layers belong to a shared model: each gets an instance-level `forward` for the block only and gets its
    own back afterwards (an instance attribute another pack set is wrapped and put back too). The recomputation
    runs with the inputs frozen at forward time (`freeze`) and the global RNG state restored (torch's
    preserve_rng_state: random token merging draws the same), and torch checks that it saves tensors of the
    same shapes as the forward did. `when(*args, **kwargs)` (optional) says per call whether to checkpoint
    (e.g. only layers on large latents, where activations dominate memory); the others run as they are."""
    wrapped = []
    try:
        for layer in layers:
            had = "forward" in layer.__dict__
            original = layer.__dict__.get("forward")
            layer.forward = _checkpointing(layer.forward, when)
            wrapped.append((layer, had, original))
        yield
    finally:
        for layer, had, original in reversed(wrapped):
            if had:
                layer.forward = original
            else:
                del layer.forward


def _checkpointing(forward, when):
    def run(*args, **kwargs):
        if not torch.is_grad_enabled() or (when is not None and not when(*args, **kwargs)):
            return forward(*args, **kwargs)
        frozen = [tuple(freeze(a) for a in args), {k: freeze(v) for k, v in kwargs.items()}]
        calls = []

        def fn(*a, **k):
            if not calls:
                calls.append(1)
                return forward(*a, **k)
            token = _RECOMPUTING.set(True)
            try:
                return forward(*frozen[0], **frozen[1])
            finally:
                _RECOMPUTING.reset(token)
                # the per-call objects can lead back to this graph (a capture store holding maps with their
                # grad_fn): let them go as soon as the recomputation is done rather than at the next gc
                frozen[:] = [(), {}]

        return torch.utils.checkpoint.checkpoint(fn, *args, use_reentrant=False, **kwargs)

    return run
