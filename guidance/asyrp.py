"""Asyrp: h-space edits with the asymmetric reverse process (Kwon, Jeong & Uh, "Diffusion Models Already
Have a Semantic Latent Space", sections 3-4, Eq. 6-9, Alg. 1; shared/design/algorithms.md section 3).

h-space on Stable Diffusion is the UNet middle-block output (1280 x H/8 x W/8 latent pixels on SD1.x at its
native depth). An edit adds delta_h there. Shifting eps in both DDIM terms nearly cancels (Theorem 1), so the
edited prediction enters the x0 term only (Eq. 8):

    x_{t-1} = sqrt(a_{t-1}) P_t(eps(x_t | delta_h)) + sqrt(1 - a_{t-1}) eps(x_t)

The three phases of Eq. 9 over a descending schedule of N steps:
    steps [0, edit_steps)           asymmetric edit (eta 0)
    steps [edit_steps, boost_from)  plain DDIM (eta 0)
    steps [boost_from, N)           DDIM with eta 1 (quality boosting; breaks exact reconstruction by design)
delta_h is scaled by S_train / S_gen when it was learned with another number of steps (section 3.4).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from .ddim import ddim_step, seeded_noise_sampler
from .schedules import eps_from_denoised

FORMAT = "z2i.h_direction.v1"


@dataclass(frozen=True)
class HDirection:
    """A global delta_h [1, C, h, w] (resized to the running h when sizes differ) and its metadata."""

    delta: torch.Tensor
    meta: dict = field(default_factory=dict)

    @property
    def channels(self) -> int:
        return int(self.delta.shape[1])

    def at(self, shape: torch.Size, scale: float = 1.0) -> torch.Tensor:
        """delta_h for an h of `shape` [B, C, H, W] (bilinear resize when the spatial size differs)."""
        d = self.delta
        if d.shape[1] != shape[1]:
            raise ValueError(f"direction has {d.shape[1]} channels, the middle block {shape[1]}")
        if d.shape[-2:] != shape[-2:]:
            d = F.interpolate(d.float(), size=tuple(shape[-2:]), mode="bilinear", align_corners=False)
        return d * scale

    def scaled(self, c: float) -> "HDirection":
        return HDirection(self.delta * c, dict(self.meta))

    def __add__(self, other: "HDirection") -> "HDirection":
        o = other.delta
        if o.shape != self.delta.shape:
            o = F.interpolate(o.float(), size=tuple(self.delta.shape[-2:]), mode="bilinear", align_corners=False)
        meta = dict(self.meta)
        meta["combined"] = [self.meta, other.meta]
        return HDirection(self.delta + o, meta)

    def to_safetensors(self) -> tuple[dict, dict]:
        return ({"delta": self.delta.detach().cpu().contiguous().float()},
                {"format": FORMAT, "meta": json.dumps(self.meta, sort_keys=True, default=str)})

    @classmethod
    def from_safetensors(cls, tensors: dict, metadata: Optional[dict]) -> "HDirection":
        metadata = metadata or {}
        if metadata.get("format") != FORMAT or "delta" not in tensors:
            raise ValueError(f"not a Z2I h-space direction (format {metadata.get('format')!r})")
        return cls(tensors["delta"], json.loads(metadata.get("meta", "{}")))


def step_scale(steps_trained: Optional[int], steps_now: int) -> float:
    """S_train / S_gen (section 3.4): the sum of delta_h over the trajectory stays what it was trained for."""
    return 1.0 if not steps_trained else float(steps_trained) / float(steps_now)


def sample_asyrp(model_edit: Callable, model_orig: Callable, x: torch.Tensor, sigmas: torch.Tensor,
                 edit_steps: int, boost_from: int, seed: Optional[int] = None,
                 callback: Optional[Callable[[dict], None]] = None, symmetric: bool = False) -> torch.Tensor:
    """Implements Asyrp's Alg. 1 generation (Eq. 9). model_edit/model_orig(x, sigma) -> denoised, with and
    without delta_h. `symmetric=True` uses the edited prediction in both terms (for the Theorem 1 check)."""
    n = len(sigmas) - 1
    noise_sampler = seeded_noise_sampler(x, seed) if boost_from < n else None
    for i in range(n):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        if i < edit_steps:
            d_edit = model_edit(x, sigma)
            d_orig = d_edit if symmetric else model_orig(x, sigma)
            x0, eps = d_edit, eps_from_denoised(x, sigma, d_orig)
            denoised = d_edit
        else:
            denoised = model_orig(x, sigma)
            x0, eps = denoised, eps_from_denoised(x, sigma, denoised)
        if callback is not None:
            callback({"x": x, "i": i, "sigma": sigma, "sigma_hat": sigma, "denoised": denoised})
        if float(sigma_next) == 0:
            x = x0
        elif i >= boost_from:
            x = ddim_step(x0, eps, sigma, sigma_next, eta=1.0, noise=noise_sampler(sigma, sigma_next))
        else:
            x = ddim_step(x0, eps, sigma, sigma_next)
    return x


def interval_index(sigmas: torch.Tensor, value: float, unit: str, sigma_of_timestep: Optional[Callable] = None) -> int:
    """Steps [0, index) lie before the boundary. unit 'percent': fraction of the steps; 'timestep': a training
    timestep 0-999 (steps whose level is at or above that timestep's)."""
    n = len(sigmas) - 1
    if unit == "percent":
        if not 0 <= value <= 1:
            raise ValueError(f"a percent boundary must be within 0..1, got {value}")
        return int(round(value * n))
    if unit == "timestep":
        if sigma_of_timestep is None:
            raise ValueError("timestep boundaries need the model's schedule")
        s = float(sigma_of_timestep(value))
        return int(sum(1 for i in range(n) if float(sigmas[i]) >= s * (1 - 1e-6)))
    raise ValueError(f"unit must be 'percent' or 'timestep', got {unit!r}")
