"""Gradients through a model whose weights were loaded under torch.inference_mode (every ComfyUI node runs
there, so checkpoint weights are inference tensors and "cannot be saved for backward";
shared/design/comfyui-internals.md section 3).

`autograd_parameters(module)` swaps each inference-tensor parameter and buffer for a normal tensor for the
duration of a `with` block and puts the original objects back afterwards, so the shared model is left exactly
as it was. The normal tensor is a zero-copy alias of the same memory made through DLPack (a tensor rebuilt
from raw storage carries no inference flag), so no weight is copied; dtypes DLPack cannot carry (e.g. fp8)
fall back to a copy. The aliases are never written to. Use it around a whole guided run, not per step.
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
def autograd_parameters(module: torch.nn.Module):
    swapped = []
    try:
        with torch.inference_mode(False):
            for m in module.modules():
                for name, p in list(m._parameters.items()):
                    if p is not None and p.is_inference():
                        m._parameters[name] = torch.nn.Parameter(normal_alias(p), requires_grad=False)
                        swapped.append((m._parameters, name, p))
                for name, b in list(m._buffers.items()):
                    if b is not None and b.is_inference():
                        m._buffers[name] = normal_alias(b)
                        swapped.append((m._buffers, name, b))
        yield module
    finally:
        for table, name, original in reversed(swapped):
            table[name] = original
