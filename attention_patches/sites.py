"""Where the cross-attention layers of a UNet are, named the way ComfyUI's patch keys name them.

A site is (block, id, index): block in {"input", "middle", "output"}, id the UNet block number and index the
transformer block inside that block's SpatialTransformer (ComfyUI matches attn2 replace patches on exactly
this triple, comfy/ldm/modules/attention.py). Sites are discovered from the module tree, never hard-coded,
so SD1.x (16 sites), SD2.x and SDXL (several transformer blocks per site) all work.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import torch

BLOCKS = ("input", "middle", "output")


@dataclass(frozen=True, order=True)
class Site:
    block: str
    id: int
    index: int

    @property
    def key(self) -> tuple:
        return (self.block, self.id, self.index)

    def __str__(self) -> str:
        return f"{self.block}.{self.id}.{self.index}"


def _transformer_blocks(module: torch.nn.Module):
    for m in module.modules():
        if type(m).__name__ == "SpatialTransformer":
            return list(m.transformer_blocks)
    return []


def cross_attention_sites(unet: torch.nn.Module) -> list[Site]:
    """Every (block, id, index) whose transformer block has a cross-attention (attn2) layer."""
    sites = []
    groups = (("input", list(enumerate(unet.input_blocks))), ("middle", [(0, unet.middle_block)]),
              ("output", list(enumerate(unet.output_blocks))))
    for block, items in groups:
        for i, module in items:
            for j, tb in enumerate(_transformer_blocks(module)):
                if getattr(tb, "attn2", None) is not None:
                    sites.append(Site(block, i, j))
    return sites


def select_sites(sites: Iterable[Site], spec: str) -> list[Site]:
    """Filter sites by a comma list of block names ("input,middle,output") or explicit "output.3.0" ids."""
    sites = list(sites)
    wanted = [s.strip() for s in spec.split(",") if s.strip()]
    if not wanted:
        raise ValueError("empty layer selection: use e.g. 'input,middle,output' or 'output.3.0'")
    out = []
    for w in wanted:
        if w in BLOCKS:
            hits = [s for s in sites if s.block == w]
        else:
            hits = [s for s in sites if str(s) == w]
        if not hits:
            raise ValueError(f"'{w}' matches no cross-attention layer; this model has: "
                             + ", ".join(str(s) for s in sites))
        out += [h for h in hits if h not in out]
    return sorted(out, key=lambda s: (BLOCKS.index(s.block), s.id, s.index))
