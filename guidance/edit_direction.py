"""Edit directions in text-embedding space (pix2pix-zero section 3.2; pix2pix-zeroCon Eq. 12).

    delta_c = mean_i E(target sentence_i) - mean_i E(source sentence_i)

E is the text encoder's full per-token output (77 x D, every position including start, end and padding,
as the pix2pix-zero code averages it), so delta_c is 77 x D. The sign is target minus source:
pix2pix-zeroCon's printed Eq. 12 has it reversed (shared/design/algorithms-review.md A.3).
For SDXL the per-token output is CLIP-L and CLIP-G side by side (D = 2048) and the pooled CLIP-G vector
gets its own mean difference.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Optional

import torch

FORMAT = "z2i.edit_direction.v1"


def construct_direction(source: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean over sentences of target embeddings minus that of source embeddings: [N, ...] -> [1, ...]."""
    if source.shape[1:] != target.shape[1:]:
        raise ValueError(f"source and target embeddings differ in shape: {tuple(source.shape[1:])} vs "
                         f"{tuple(target.shape[1:])}")
    return (target.float().mean(0, keepdim=True) - source.float().mean(0, keepdim=True))


def apply_direction(cond: torch.Tensor, delta: torch.Tensor, strength: float) -> torch.Tensor:
    """cond [B, 77k, D] + strength * delta [1, 77, D] on every 77-token chunk. Returns a new tensor."""
    if cond.shape[-1] != delta.shape[-1]:
        raise ValueError(f"width mismatch: conditioning has {cond.shape[-1]} channels, direction {delta.shape[-1]}")
    chunk = delta.shape[1]
    if cond.shape[1] % chunk:
        raise ValueError(f"conditioning has {cond.shape[1]} tokens, not a multiple of the direction's {chunk}")
    tiled = delta.to(device=cond.device, dtype=cond.dtype).repeat(1, cond.shape[1] // chunk, 1)
    return cond + strength * tiled


@dataclass(frozen=True)
class EditDirection:
    """delta [1, 77, D]; pooled [1, P] or None; meta: family, width, clip_skip, words, sentence counts."""

    delta: torch.Tensor
    pooled: Optional[torch.Tensor] = None
    meta: dict = field(default_factory=dict)

    @property
    def width(self) -> int:
        return int(self.delta.shape[-1])

    def to_safetensors(self) -> tuple[dict, dict]:
        tensors = {"delta": self.delta.detach().cpu().contiguous().float()}
        if self.pooled is not None:
            tensors["pooled"] = self.pooled.detach().cpu().contiguous().float()
        metadata = {"format": FORMAT, "meta": json.dumps(self.meta, sort_keys=True)}
        return tensors, metadata

    @classmethod
    def from_safetensors(cls, tensors: dict, metadata: Optional[dict]) -> "EditDirection":
        metadata = metadata or {}
        if metadata.get("format") != FORMAT or "delta" not in tensors:
            raise ValueError(f"not a Z2I edit direction (format {metadata.get('format')!r})")
        return cls(delta=tensors["delta"], pooled=tensors.get("pooled"), meta=json.loads(metadata.get("meta", "{}")))
