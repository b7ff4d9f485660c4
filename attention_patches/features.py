"""Capture of UNet token features for contrastive guidance (pix2pix-zeroCon Eq. 15-16; CDS's choice of layer).

`attn1_output_capture` is a ComfyUI attn1_output_patch (after the self-attention's output projection, before
the residual add). It stores the features of the sites a per-call `FeatureCall` asks for, per cond index,
with their spatial size; with keep_graph the autograd graph is kept for the guidance loss.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch

from ..guidance.autograd import recomputing
from .controller import call_conds
from .sites import Site

FEATURE_KEY = "z2i_feature_call"


@dataclass
class FeatureCall:
    sites: Optional[frozenset] = None
    keep_graph: bool = False
    conds: frozenset = frozenset({0})
    features: dict = field(default_factory=dict)     # (site, cond) -> (tensor [b, N, C], (h, w))
    latent_hw: Optional[tuple] = None                 # set: sub-calls on another size (area crops) are skipped

    def __deepcopy__(self, memo):
        return self


def attn1_output_capture(n: torch.Tensor, extra_options: dict) -> torch.Tensor:
    call: Optional[FeatureCall] = extra_options.get(FEATURE_KEY)
    if call is None or recomputing():         # a checkpointed layer's second forward stores nothing
        return n
    block = extra_options.get("block", ("?", -1))
    site = Site(block[0], int(block[1]), int(extra_options.get("block_index", 0)))
    if call.sites is not None and site not in call.sites:
        return n
    shape = extra_options.get("original_shape")
    if call.latent_hw is not None and shape is not None and tuple(shape[-2:]) != tuple(call.latent_hw):
        return n
    hw = tuple(extra_options.get("activations_shape", [0, 0, 0, 0])[-2:])
    store_features(call, site, n, hw, call_conds(extra_options))
    return n


def store_features(call: FeatureCall, site: Site, n: torch.Tensor, hw: tuple, conds) -> None:
    """Keep the token features n [batch, N, C] of one layer call, split by its chunks' logical conds (call_conds), for the conds
    the call asks for (shared by the UNet's attn1 output and the MMDiT's image stream, attention_patches.joint)."""
    cou = list(conds or [0])
    for ci, chunk in zip(cou, n.chunk(len(cou))):
        if ci in call.conds:
            t = chunk if call.keep_graph else chunk.detach()
            old = call.features.get((site, ci))
            # a cond split over several calls (per-image rows, or core's memory chunking) is concatenated
            call.features[(site, ci)] = (torch.cat([old[0], t]) if old is not None else t, tuple(hw))
