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

from contextlib import contextmanager

import torch


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
