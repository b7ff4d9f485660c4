"""Where the cross-attention layers of a UNet are, named the way ComfyUI's patch keys name them.

A site is (block, id, index): block in {"input", "middle", "output"}, id the UNet block number and index the
transformer block inside that block's SpatialTransformer (ComfyUI matches attn2 replace patches on exactly
this triple, comfy/ldm/modules/attention.py). Sites are discovered from the module tree, never hard-coded,
so SD1.x (16 sites), SD2.x and SDXL (several transformer blocks per site) all work.

An MMDiT (SD3) has no cross-attention layer: its joint blocks attend over [text; image] tokens in one softmax
(attention_patches/joint.py). Its sites are ("joint", i, 0), one per joint block, in the order they run.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import torch

BLOCKS = ("input", "middle", "output", "joint")
UNET_BLOCKS = BLOCKS[:3]


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


def joint_sites(dit: torch.nn.Module) -> list[Site]:
    """One site per joint block of an MMDiT: ("joint", i, 0)."""
    return [Site("joint", i, 0) for i in range(len(getattr(dit, "joint_blocks", [])))]


def select_sites(sites: Iterable[Site], spec: str) -> list[Site]:
    """Filter sites by a comma list of block names ("input,middle,output", "joint") or explicit "output.3.0" ids.

    On an MMDiT (every site a joint block, "joint" names them all) the UNet's block names keep their place in the
    network: "input" the joint blocks before the middle one (joint.middle_block: (n - 1) // 2), "middle" that one,
    "output" those after it, so the nodes' defaults ("input,middle,output": every layer; zeroCon's "output": the
    later half, as a UNet's decoder) mean the same on both."""
    sites = list(sites)
    wanted = [s.strip() for s in spec.split(",") if s.strip()]
    if not wanted:
        raise ValueError("empty layer selection: use e.g. 'input,middle,output' or 'output.3.0'")
    if sites and all(s.block == "joint" for s in sites):
        mid = max(0, (len(sites) - 1) // 2)
        part = {"input": lambda s: s.id < mid, "middle": lambda s: s.id == mid, "output": lambda s: s.id > mid}
        out = []
        for w in wanted:
            hits = [s for s in sites if (part[w](s) if w in part else w == "joint" or str(s) == w)]
            if not hits and w not in part:        # a part may be empty on a shallow MMDiT (input at depth 2)
                raise ValueError(f"'{w}' matches no joint block; this model has: " + ", ".join(str(s) for s in sites))
            out += [h for h in hits if h not in out]
        if not out:
            raise ValueError(f"'{spec}' matches no joint block; this model has: " + ", ".join(str(s) for s in sites)
                             + f" (input = before joint.{mid}.0, middle = joint.{mid}.0, output = after it)")
        return sorted(out, key=lambda s: s.id)
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
