"""The h-space hook: add delta_h to (or read) the UNet middle-block output, only for calls that ask.

ComfyUI 0.3.75 has no hook right after the middle block; `output_block_patch` at block ("output", 0) sees
h = the middle-block output before the first decoder block concatenates its skip, which is the same tensor
(comfyui-internals.md section 1.4). Newer hosts also have `middle_block_after_patch`; both functions are
here. A sampler puts an `HCall` into the transformer options of the one UNet call that should be edited or
read; every other call passes through untouched, so one step can evaluate eps with and without delta_h.
Skip connections are never modified (Asyrp pitfall 3.8.1).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

HSPACE_KEY = "z2i_hspace_call"


@dataclass
class HCall:
    """add: delta_h (an HDirection-like object with .delta_for(h, t, scale)) times `scale`, row by row (a
    per-image direction's row i goes to image i of every cond chunk); capture: store h per cond index into
    `captured` (a dict cond_index -> list of tensors, each [B, ...] in batch order). `timestep(sigma) -> t`
    maps the call's sigmas to the model's 0..999 timesteps (implicit directions f_t need t)."""

    direction: Optional[object] = None
    scale: float = 1.0
    captured: Optional[dict] = None
    seen: list = field(default_factory=list)     # delta actually added, per call (for tests and stats)
    timestep: Optional[Callable] = None
    keep_seen: bool = True

    def __deepcopy__(self, memo):
        return self

    def apply(self, h: torch.Tensor, transformer_options: dict) -> torch.Tensor:
        if self.captured is not None:
            cou = list(transformer_options.get("cond_or_uncond") or [0])
            for ci, chunk in zip(cou, h.chunk(len(cou))):
                self.captured.setdefault(ci, []).append(chunk.detach().float())
        if self.direction is not None and self.scale != 0:
            sigmas = transformer_options.get("sigmas")
            t = None
            if sigmas is not None and self.timestep is not None:
                t = self.timestep(sigmas.reshape(-1)).reshape(-1)
                if t.numel() != h.shape[0]:
                    # `sigmas` holds one level per image; the call stacks its cond chunks, each the whole batch
                    t = t.repeat(h.shape[0] // t.numel()) if h.shape[0] % t.numel() == 0 else t[:1].expand(h.shape[0])
            delta = self.direction.delta_for(h, t, self.scale).to(h)
            if self.keep_seen:
                self.seen.append(delta.detach())
            h = h + delta
        return h


def hspace_output_block_patch(h: torch.Tensor, hsp: torch.Tensor, transformer_options: dict):
    """ComfyUI output_block_patch: acts at ("output", 0), where h is the middle-block output."""
    call = transformer_options.get(HSPACE_KEY)
    if call is not None and tuple(transformer_options.get("block", ())) == ("output", 0):
        h = call.apply(h, transformer_options)
    return h, hsp


def hspace_middle_block_after_patch(args: dict) -> dict:
    """Newer ComfyUI middle_block_after_patch: args has h and transformer_options; returns args."""
    call = args.get("transformer_options", {}).get(HSPACE_KEY)
    if call is not None:
        args = dict(args)
        args["h"] = call.apply(args["h"], args["transformer_options"])
    return args
