"""Gradients through a model whose weights were loaded under torch.inference_mode (every ComfyUI node runs
there, so checkpoint weights are inference tensors and "cannot be saved for backward";
shared/design/comfyui-internals.md section 3).

`autograd_parameters(module)` swaps each inference-tensor parameter and buffer for a normal copy for the
duration of a `with` block and puts the originals back afterwards, so the shared model is left exactly as it
was (same objects, same values). Costs one copy of the swapped weights while active. Use it around a whole
guided sampling run, not per step.
"""
from __future__ import annotations

from contextlib import contextmanager

import torch


@contextmanager
def autograd_parameters(module: torch.nn.Module):
    swapped = []
    try:
        with torch.inference_mode(False):
            for m in module.modules():
                for name, p in list(m._parameters.items()):
                    if p is not None and p.is_inference():
                        m._parameters[name] = torch.nn.Parameter(p.detach().clone(), requires_grad=False)
                        swapped.append((m._parameters, name, p))
                for name, b in list(m._buffers.items()):
                    if b is not None and b.is_inference():
                        m._buffers[name] = b.detach().clone()
                        swapped.append((m._buffers, name, b))
        yield module
    finally:
        for table, name, original in reversed(swapped):
            table[name] = original
