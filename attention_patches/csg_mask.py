"""CSG's content mask (Eq. 11-12): where the edited object is, from the source pass's attention.

- TokenMapMean: the cross-attention map of the source word's tokens, averaged over heads, over the token span
  and over the layers at or coarser than the mask resolution (each upsampled to it), normalised by its
  maximum at every timestep and averaged over time (the authors' code; algorithms-review.md #8).
- SelfAttentionMean: the head-averaged self-attention map A [HW, HW] of one layer at the mask resolution,
  averaged over time as a running mean (CSG pitfall 4: never stack every step); the mean over heads is computed
  one head at a time and only at that layer once the first step has found it.
- content_mask: M_hat = A_bar @ M_bar (Eq. 11, a mat-vec per image), clamped to [0, 1]; the background
  probability is P = 1 - M_hat (Eq. 12). It is not renormalised here: the posterior pull uses it as it is, and
  the mixup divides the object mask by its maximum per layer (controller.renormalise_background), both as in
  the authors' code.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from .controller import AttentionCall, AttentionController, call_hw
from .sites import Site


RESIZE_CODE, RESIZE_OURS = "code", "ours"


class TokenMapMean(AttentionController):
    """Layers whose maps are at most `max_hw` are used.

    resize "ours": each layer's map upsampled bilinearly to `hw` (the mask resolution), averaged, normalised by the
    maximum there. resize "code" (the authors' code, Hleephilip/CSG edit_pipeline.py): the layers are averaged at
    `max_hw` (the token level, 16x16 at 512 px; coarser layers upsampled bicubically to it), normalised by the
    maximum there, and the normalised map upsampled bicubically to `hw`. Either way per step, then averaged over
    time (mean())."""

    def __init__(self, positions: Sequence[int], hw: tuple[int, int], max_hw: Optional[tuple] = None, cond: int = 0,
                 resize: str = RESIZE_OURS):
        if not positions:
            raise ValueError("no token positions for the word")
        if resize not in (RESIZE_CODE, RESIZE_OURS):
            raise ValueError(f"resize must be {RESIZE_CODE!r} or {RESIZE_OURS!r}")
        self.positions, self.hw, self.cond, self.resize = list(positions), tuple(hw), cond, resize
        self.max_hw = tuple(max_hw) if max_hw is not None else tuple(hw)
        self._layers: dict[int, list] = {}
        self.total: Optional[torch.Tensor] = None
        self.steps = 0

    def wants(self, site: Site, hw: tuple[int, int], call: AttentionCall) -> bool:
        return hw[0] <= self.max_hw[0] and hw[1] <= self.max_hw[1]

    def process(self, probs, site: Site, cond_index: int, call: AttentionCall):
        if cond_index != self.cond:
            return probs
        h, w = call_hw(call, probs.shape[2])
        if h > self.max_hw[0] or w > self.max_hw[1]:
            return probs
        m = probs[..., self.positions].mean(-1).mean(1).reshape(probs.shape[0], 1, h, w).float()
        if self.resize == RESIZE_CODE:
            if (h, w) != self.max_hw:
                m = F.interpolate(m, size=self.max_hw, mode="bicubic", align_corners=False)
        else:
            m = F.interpolate(m, size=self.hw, mode="bilinear", align_corners=False)
        self._layers.setdefault(call.step, []).append(m[:, 0].detach())
        return probs

    def end_step(self, step: int) -> None:
        layers = self._layers.pop(step, None)
        if not layers:
            return
        m = torch.stack(layers).mean(0)
        m = m / m.flatten(1).amax(1).clamp_min(1e-12)[:, None, None]
        if self.resize == RESIZE_CODE and tuple(m.shape[-2:]) != self.hw:
            m = F.interpolate(m[:, None], size=self.hw, mode="bicubic", align_corners=False)[:, 0]
        self.total = m if self.total is None else self.total + m
        self.steps += 1

    def mean(self) -> torch.Tensor:
        if self.total is None:
            raise ValueError("no cross-attention maps were seen at or below the mask resolution")
        return self.total / self.steps


class SelfAttentionMean(AttentionController):
    """Running mean of the head-averaged self-attention of the last decoder layer whose resolution is at most
    `hw` (the finest such layer; the authors' code uses the last 64x64 one). On an MMDiT: the last joint block's
    image-to-image attention, renormalised per row (attention_patches.joint)."""

    def __init__(self, hw: tuple[int, int], cond: int = 0):
        self.target, self.cond = tuple(hw), cond
        self.total: Optional[torch.Tensor] = None
        self.steps = 0
        self.hw: Optional[tuple] = None
        self.site: Optional[Site] = None
        self._current: dict[int, tuple] = {}

    head_mean_only = True       # the map is computed one head at a time (controller.head_mean)

    def wants(self, site: Site, hw: tuple[int, int], call: AttentionCall) -> bool:
        if site.block not in ("output", "joint") or hw[0] > self.target[0] or hw[1] > self.target[1]:
            return False
        # once the first step has found the layer, the other layers' maps are not computed at all
        return self.site is None or (site == self.site and tuple(hw) == tuple(self.hw))

    def process_mean(self, mean, site: Site, cond_index: int, call: AttentionCall) -> None:
        if cond_index != self.cond or not self.wants(site, call_hw(call, mean.shape[1]), call):
            return
        hw = call_hw(call, mean.shape[1])
        best = self._current.get(call.step)
        if best is None or hw[0] * hw[1] >= best[0][0] * best[0][1]:
            self._current[call.step] = (hw, site, mean.float().detach())

    def process(self, probs, site: Site, cond_index: int, call: AttentionCall):
        self.process_mean(probs.mean(1), site, cond_index, call)
        return probs

    def end_step(self, step: int) -> None:
        entry = self._current.pop(step, None)
        if entry is None:
            return
        self.hw, self.site, a = entry
        self.total = a if self.total is None or self.total.shape != a.shape else self.total + a
        self.steps += 1

    def mean(self) -> torch.Tensor:
        if self.total is None:
            raise ValueError(f"no self-attention was captured at {self.site}")
        return self.total / self.steps


class SelfAttentionSmoothing(AttentionController):
    """The linear-memory form of SelfAttentionMean + content_mask, for large latents: given the word map M_bar
    (known after a first pass), it accumulates A_t @ M_bar at the layer SelfAttentionMean found (site, hw), one head
    and a block of queries at a time (probs.head_mean_apply), and mean() is mean_t(A_t @ M_bar) = A_bar @ M_bar,
    Eq. 11 without the [HW, HW] map: memory linear in the positions (CSG's map at 128x128 latent positions is 1 GiB
    in fp32; its smoothing here a few MB). The content mask is content_mask(M_bar, None) of this mean."""

    reads_qk = True

    def __init__(self, site: Site, hw: tuple[int, int], word_map: torch.Tensor, cond: int = 0, chunk: int = 1024):
        self.site, self.hw, self.cond, self.chunk = site, tuple(hw), cond, chunk
        self.m = word_map.reshape(word_map.shape[0], -1, 1).float()      # [b, HW, 1]
        self.total: Optional[torch.Tensor] = None
        self.steps = 0
        self._current: dict[int, torch.Tensor] = {}

    def wants(self, site: Site, hw: tuple[int, int], call: AttentionCall) -> bool:
        return site == self.site and tuple(hw) == self.hw

    def process_qk(self, q, k, heads, site: Site, cond_index: int, call: AttentionCall) -> None:
        if cond_index != self.cond or not self.wants(site, call_hw(call, q.shape[1]), call):
            return
        m = self.m.to(q.device)
        if m.shape[0] != q.shape[0]:
            rows = call.row if getattr(call, "row", None) is not None else None
            m = m[rows:rows + 1] if rows is not None else m.expand(q.shape[0], -1, -1)
        from .probs import head_mean_apply
        self._current[call.step] = head_mean_apply(q, k, heads, m, self.chunk)[..., 0]

    def end_step(self, step: int) -> None:
        s = self._current.pop(step, None)
        if s is None:
            return
        self.total = s if self.total is None else self.total + s
        self.steps += 1

    def mean(self) -> torch.Tensor:
        if self.total is None:
            raise ValueError(f"no self-attention was seen at {self.site}")
        return (self.total / self.steps).reshape(-1, *self.hw)


class LayerProbe(AttentionController):
    """Finds the layer SelfAttentionMean would use (the finest decoder layer at most `hw`) from queries and keys
    alone, without computing any map: site and hw after the first call that has one."""

    reads_qk = True

    def __init__(self, hw: tuple[int, int]):
        self.target = tuple(hw)
        self.site: Optional[Site] = None
        self.hw: Optional[tuple] = None

    def wants(self, site: Site, hw: tuple[int, int], call: AttentionCall) -> bool:
        return site.block in ("output", "joint") and hw[0] <= self.target[0] and hw[1] <= self.target[1]

    def process_qk(self, q, k, heads, site: Site, cond_index: int, call: AttentionCall) -> None:
        hw = call_hw(call, q.shape[1])
        if self.hw is None or hw[0] * hw[1] >= self.hw[0] * self.hw[1]:
            self.site, self.hw = site, tuple(hw)


def content_mask(token_mean: torch.Tensor, self_attention: Optional[torch.Tensor]) -> torch.Tensor:
    """Eq. 11: M_hat[h, w] = sum_{h', w'} A[h, w, h', w'] M[h', w'] -> [B, H, W] in [0, 1]."""
    b, h, w = token_mean.shape
    if self_attention is None:
        return token_mean.clamp(0, 1)
    a = self_attention
    if a.shape[0] != b:
        a = a.expand(b, -1, -1)
    smoothed = torch.bmm(a, token_mean.reshape(b, h * w, 1)).reshape(b, h, w)
    return smoothed.clamp(0, 1)
