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
from .schedules import VE, NoiseForm

FORMAT = "z2i.h_direction.v1"


@dataclass(frozen=True)
class HDirection:
    """delta_h = a global tensor [N, C, h, w] (resized to the running h when sizes differ; may be None) plus
    coefficient-weighted implicit functions f_t(h, t) (Asyrp App. E; guidance/asyrp_train.py), and metadata.
    N = 1: one delta_h for every image; N > 1: one per image of a batch of N (row i edits image i; a direction
    derived from a batch of images, so that each image gets the edit it would get alone).
    Linear: `scaled` and `+` combine both kinds (section 5.2)."""

    delta: Optional[torch.Tensor]
    meta: dict = field(default_factory=dict)
    implicit: tuple = ()                          # ((coef, module with .channels and forward(h, t)), ...)

    @property
    def channels(self) -> int:
        if self.delta is not None:
            return int(self.delta.shape[1])
        return int(self.implicit[0][1].channels)

    @property
    def rows(self) -> int:
        """1 for a direction shared by all images, N for one row per image of a batch of N."""
        return 1 if self.delta is None else int(self.delta.shape[0])

    def row(self, i: int) -> "HDirection":
        """The direction image i of the batch gets when it is evaluated alone (itself when shared)."""
        return self if self.rows == 1 else HDirection(self.delta[i:i + 1], self.meta, self.implicit)

    def at(self, shape: torch.Size, scale: float = 1.0) -> torch.Tensor:
        """The global delta_h for an h of `shape` [R, C, H, W] (bilinear resize when the spatial size differs).
        Per-image rows (N > 1) are tiled R / N times: a UNet call stacks its cond chunks (cond, uncond, ...)
        each holding the whole batch of N images in order."""
        d = self.delta
        if d.shape[1] != shape[1]:
            raise ValueError(f"direction has {d.shape[1]} channels, the middle block {shape[1]}")
        if d.shape[-2:] != shape[-2:]:
            d = F.interpolate(d.float(), size=tuple(shape[-2:]), mode="bilinear", align_corners=False)
        if d.shape[0] > 1:
            if shape[0] % d.shape[0]:
                raise ValueError(f"direction has one row per image of a batch of {d.shape[0]}, the UNet call "
                                 f"{shape[0]} rows")
            d = d.repeat(shape[0] // d.shape[0], 1, 1, 1)
        return d * scale

    def delta_for(self, h: torch.Tensor, t: Optional[torch.Tensor], scale: float = 1.0) -> torch.Tensor:
        """delta_h_t = scale * (global + sum_i c_i f_t^i(h_t)) for the middle-block output h at timesteps t
        (0..999 per row; needed by implicit functions only)."""
        if h.shape[1] != self.channels:
            raise ValueError(f"direction has {self.channels} channels, the middle block {h.shape[1]}")
        out = self.at(h.shape, scale).to(h) if self.delta is not None else torch.zeros_like(h)
        for coef, f in self.implicit:
            if t is None:
                raise ValueError("an implicit h-space direction needs the timestep of the call")
            out = out + (scale * coef) * f(h.float(), t.to(h.device).float().reshape(-1)).to(h)
        return out

    def scaled(self, c: float) -> "HDirection":
        return HDirection(None if self.delta is None else self.delta * c, dict(self.meta),
                          tuple((k * c, f) for k, f in self.implicit))

    def __add__(self, other: "HDirection") -> "HDirection":
        a, b = self.delta, other.delta
        if a is not None and b is not None and min(a.shape[0], b.shape[0]) > 1 and a.shape[0] != b.shape[0]:
            raise ValueError(f"per-image directions of batches of {a.shape[0]} and {b.shape[0]} images")
        if a is not None and b is not None and b.shape[-2:] != a.shape[-2:]:
            b = F.interpolate(b.float(), size=tuple(a.shape[-2:]), mode="bilinear", align_corners=False)
        delta = b if a is None else (a if b is None else a + b)
        meta = dict(self.meta)
        meta["combined"] = [self.meta, other.meta]
        return HDirection(delta, meta, self.implicit + other.implicit)

    def to_safetensors(self) -> tuple[dict, dict]:
        tensors = {} if self.delta is None else {"delta": self.delta.detach().cpu().contiguous().float()}
        implicit = []
        for i, (coef, f) in enumerate(self.implicit):
            implicit.append({"coef": float(coef), "config": f.config})
            for k, v in f.state_dict().items():
                tensors[f"implicit.{i}.{k}"] = v.detach().cpu().contiguous().float()
        return tensors, {"format": FORMAT, "meta": json.dumps(self.meta, sort_keys=True, default=str),
                         "implicit": json.dumps(implicit)}

    @classmethod
    def from_safetensors(cls, tensors: dict, metadata: Optional[dict]) -> "HDirection":
        metadata = metadata or {}
        implicit_cfg = json.loads(metadata.get("implicit", "[]"))
        if metadata.get("format") != FORMAT or ("delta" not in tensors and not implicit_cfg):
            raise ValueError(f"not a Z2I h-space direction (format {metadata.get('format')!r})")
        from .asyrp_train import DeltaBlock
        implicit = []
        for i, item in enumerate(implicit_cfg):
            with torch.inference_mode(False):
                f = DeltaBlock(**item["config"])
                prefix = f"implicit.{i}."
                f.load_state_dict({k[len(prefix):]: v.clone() for k, v in tensors.items() if k.startswith(prefix)})
            implicit.append((float(item["coef"]), f.eval().requires_grad_(False)))
        return cls(tensors.get("delta"), json.loads(metadata.get("meta", "{}")), tuple(implicit))


def step_scale(steps_trained: Optional[int], steps_now: int) -> float:
    """S_train / S_gen (section 3.4): the sum of delta_h over the trajectory stays what it was trained for."""
    return 1.0 if not steps_trained else float(steps_trained) / float(steps_now)


def sample_asyrp(model_edit: Callable, model_orig: Callable, x: torch.Tensor, sigmas: torch.Tensor,
                 edit_steps: int, boost_from: int, seed: Optional[int] = None,
                 callback: Optional[Callable[[dict], None]] = None, symmetric: bool = False,
                 keep: Optional[Callable] = None, form: NoiseForm = VE) -> torch.Tensor:
    """Implements Asyrp's Alg. 1 generation (Eq. 9). model_edit/model_orig(x, sigma) -> denoised, with and
    without delta_h. `symmetric=True` uses the edited prediction in both terms (for the Theorem 1 check).
    `form`: the model's schedules.NoiseForm (FLOW on SD3: eps from D by (x - (1 - sigma) D) / sigma, flow DDIM)."""
    n = len(sigmas) - 1
    noise_sampler = seeded_noise_sampler(x, seed) if boost_from < n else None
    for i in range(n):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        if i < edit_steps:
            d_edit = model_edit(x, sigma)
            d_orig = d_edit if symmetric else model_orig(x, sigma)
            x0, eps = d_edit, form.eps(x, sigma, d_orig)
            denoised = d_edit
        else:
            denoised = model_orig(x, sigma)
            x0, eps = denoised, form.eps(x, sigma, denoised)
        if callback is not None:
            callback({"x": x, "i": i, "sigma": sigma, "sigma_hat": sigma, "denoised": denoised})
        if float(sigma_next) == 0:
            x = x0
        elif i >= boost_from:
            x = ddim_step(x0, eps, sigma, sigma_next, eta=1.0, noise=noise_sampler(sigma, sigma_next), form=form)
        else:
            x = ddim_step(x0, eps, sigma, sigma_next, form=form)
        if keep is not None:                  # inpainting (guidance.ddim.keep_outside)
            x = keep(x, sigma_next)
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
