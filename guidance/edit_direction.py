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

from .file_checks import check_file_tensors  # noqa: F401  (re-exported for the loaders)

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


# -- checks of a loaded file (before EditDirection.from_safetensors) ----------------------------------------
TOKENS = 77                 # one CLIP chunk: every SD text encoder's per-token output
MAX_WIDTH = 8192            # SD1.x 768, SD2.x 1024, SDXL 2048 (pooled 1280): far above any of them


def check_file_header(shapes: dict, metadata: Optional[dict]) -> dict:
    """Check a direction file from its header only (tensor name -> shape, string metadata): the format, the tensors
    it holds and their shapes (delta [1, 77, D], pooled [1, P]), and the meta JSON. Returns the parsed meta; raises
    ValueError(problem) before anything is read or allocated."""
    metadata = metadata or {}
    if metadata.get("format") != FORMAT:
        raise ValueError(f"not a Z2I edit direction (format {metadata.get('format')!r}, expected {FORMAT!r})")
    extra = sorted(set(shapes) - {"delta", "pooled"})
    if "delta" not in shapes or extra:
        raise ValueError(f"holds the tensors {sorted(shapes)}, expected 'delta' and optionally 'pooled'")
    delta = tuple(shapes["delta"])
    if len(delta) != 3 or delta[0] != 1 or delta[1] != TOKENS or not 1 <= delta[2] <= MAX_WIDTH:
        raise ValueError(f"its delta has shape {list(delta)}, expected [1, {TOKENS}, width] (width 1..{MAX_WIDTH})")
    if "pooled" in shapes:
        pooled = tuple(shapes["pooled"])
        if len(pooled) != 2 or pooled[0] != 1 or not 1 <= pooled[1] <= MAX_WIDTH:
            raise ValueError(f"its pooled vector has shape {list(pooled)}, expected [1, width] (width 1..{MAX_WIDTH})")
    try:
        meta = json.loads(metadata.get("meta", "{}"))
    except ValueError:
        raise ValueError("its 'meta' entry is not valid JSON") from None
    if not isinstance(meta, dict):
        raise ValueError(f"its 'meta' entry is a {type(meta).__name__}, expected a JSON object")
    width = meta.get("width")
    if width is not None and width != delta[2]:
        raise ValueError(f"its metadata says width {width!r} but the delta is {delta[2]} wide")
    return meta
