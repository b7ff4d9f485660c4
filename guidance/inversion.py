"""DDIM inversion: run the deterministic DDIM update up the noise schedule to find the x_T that DDIM
sampling maps back to a given image (pix2pix-zero section 3.1 Eq. 1, CSG section 3.1 Eq. 1, AGG Eq. 16;
shared/design/algorithms.md sections 0.1 and 4.2, comfyui-internals.md section 2.3).

VP form (the papers'):  x_u = sqrt(a_u) * x0_hat(x_t, eps) + sqrt(1 - a_u) * eps,  u > t.
Sigma space (ours):     x_u = (x_t - sigma_t * eps) + sigma_u * eps   = guidance.ddim.ddim_step(...)

Where eps is predicted is the only difference between the two variants:
- "current": eps = eps_theta(x_t, t), at the level the latent is at (Euler on the flipped schedule; ODE
  consistent; what core's FlipSigmas + euler "unsampler" does).
- "target":  eps = eps_theta(x_t, u), the UNet sees the same VP input x_t^VP but the next timestep u
  (the evaluation rule of diffusers' DDIMInverseScheduler). In sigma space the input is rescaled:
  x' = x_t / sqrt(1 + sigma_t^2) * sqrt(1 + sigma_u^2).
- "diffusers": the "target" rule on diffusers' grid, reproducing DDIMInverseScheduler with
  set_alpha_to_one=False (shared/design/reference-parity.md section 2): the clean latent is read as the VP latent
  at the lowest trained level abar_0, so the schedule starts at sigmas[0] = sigma(0) > 0 and x starts at
  z * sqrt(1 + sigma(0)^2). Samplers that end a schedule at that level return x / sqrt(1 + sigma(0)^2)
  (guidance.ddim.finish), so the pair round-trips and matches diffusers' output latents.
A step that starts from the clean latent (sigma 0) evaluates the "current" eps at the lowest trained level
(t = 0, `sigma_floor`) with the same rescaling, since the denoiser cannot give eps at sigma 0.
(The official pix2pix-zero repository inverts differently again: eps near the current level over 48 steps.)

Optional on every step:
- `refine` fixed-point iterations x_u <- x_t + (sigma_u - sigma_t) * eps(x_u, u), which make the step the
  exact inverse of the DDIM sampling step from u back to t (implicit inversion; converges when the step is
  small against the denoiser's Lipschitz constant);
- the pix2pix-zero noise regulariser (guidance.regularizers), whose eps is used in both terms.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch

from .ddim import ddim_step
from .schedules import append_dims, eps_from_denoised, from_vp

VARIANTS = ("current", "target", "diffusers")


@dataclass(frozen=True)
class Trajectory:
    """What an inversion saw, in model space (k-diffusion, after process_latent_in), ascending noise.

    sigmas   [N+1]            the levels visited, sigmas[0] the clean latent's (usually 0)
    latents  [N+1, B, C, H, W] x at each level; latents[-1] is the inverted noise x_T
    x0       [N, B, C, H, W]  x0_hat predicted at step i (from latents[i])
    eps      [N, B, C, H, W]  the eps used for step i -> i+1 (after regularisation)
    """

    sigmas: torch.Tensor
    latents: torch.Tensor
    x0: torch.Tensor
    eps: torch.Tensor

    @property
    def steps(self) -> int:
        return int(self.sigmas.shape[0]) - 1

    def index_of_sigma(self, sigma: float, rtol: float = 1e-4) -> int:
        """The step whose level equals `sigma` (caches are keyed by level, never by step count)."""
        diffs = (self.sigmas.double() - float(sigma)).abs()
        i = int(torch.argmin(diffs))
        if diffs[i] > rtol * max(abs(float(sigma)), 1e-8):
            raise KeyError(f"sigma {float(sigma):.6g} is not on this inversion's schedule")
        return i


def rescale_input(x: torch.Tensor, sigma_from, sigma_to) -> torch.Tensor:
    """The k-space input at level sigma_to whose VP form equals x's VP form at sigma_from."""
    f = ((1 + sigma_to * sigma_to) / (1 + sigma_from * sigma_from)) ** 0.5
    return x * append_dims(torch.as_tensor(f, dtype=x.dtype, device=x.device), x.ndim)


def predict_eps(model, x: torch.Tensor, sigma, sigma_eval, extra_args: dict) -> torch.Tensor:
    """eps_theta at level `sigma_eval` for the latent x (at level `sigma`), through the denoiser API."""
    s_in = x.new_ones([x.shape[0]])
    x_in = x if float(sigma_eval) == float(sigma) else rescale_input(x, sigma, sigma_eval)
    denoised = model(x_in, sigma_eval * s_in, **extra_args)
    return eps_from_denoised(x_in, sigma_eval, denoised)


def sample_ddim_invert(model, x: torch.Tensor, sigmas: torch.Tensor, extra_args: Optional[dict] = None,
                       callback: Optional[Callable[[dict], None]] = None, disable: Optional[bool] = None,
                       variant: str = "current", sigma_floor: Optional[float] = None, refine: int = 0,
                       regularize: Optional[Callable[[torch.Tensor, int], torch.Tensor]] = None,
                       record: Optional[list] = None) -> torch.Tensor:
    """Implements DDIM inversion over an ascending sigma schedule; returns x at sigmas[-1].

    `sigma_floor`: the lowest level the model was trained at (needed when sigmas[0] == 0).
    `regularize(eps, step) -> eps`: applied to each step's eps (pix2pix-zero), used in both terms.
    `record`: a list that receives one Trajectory at the end.
    """
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    if len(sigmas) < 2:
        raise ValueError("inversion needs at least two sigmas")
    if bool((sigmas[1:] <= sigmas[:-1]).any()):
        raise ValueError("inversion sigmas must be strictly ascending (flip the sampling schedule)")
    extra_args = {} if extra_args is None else extra_args
    if variant == "diffusers":
        if not float(sigmas[0]) > 0:
            raise ValueError("the diffusers variant starts at the lowest trained level sigma(0) > 0, not at 0")
        x = from_vp(x, sigmas[0])
    latents, x0s, epss = [x], [], []
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        if variant in ("target", "diffusers"):
            sigma_eval = sigma_next
        elif float(sigma) > 0:
            sigma_eval = sigma
        else:
            if sigma_floor is None:
                raise ValueError("inversion from sigma 0 needs sigma_floor (the model's lowest level)")
            sigma_eval = torch.as_tensor(sigma_floor, dtype=sigmas.dtype, device=sigmas.device)
        eps = predict_eps(model, x, sigma, sigma_eval, extra_args)
        x_next = ddim_step(x - _col(sigma, x) * eps, eps, sigma, sigma_next)
        for _ in range(refine):
            eps = predict_eps(model, x_next, sigma_next, sigma_next, extra_args)
            x_next = ddim_step(x - _col(sigma, x) * eps, eps, sigma, sigma_next)
        if regularize is not None:
            eps = regularize(eps, i)
            x_next = ddim_step(x - _col(sigma, x) * eps, eps, sigma, sigma_next)
        x0 = x - _col(sigma, x) * eps
        if callback is not None:
            callback({"x": x, "i": i, "sigma": sigma, "sigma_hat": sigma, "denoised": x0})
        x = x_next
        if record is not None:
            latents.append(x)
            x0s.append(x0)
            epss.append(eps)
    if record is not None:
        record.append(Trajectory(sigmas=sigmas.detach().clone(), latents=torch.stack(latents),
                                 x0=torch.stack(x0s), eps=torch.stack(epss)))
    return x


def _col(sigma, x: torch.Tensor) -> torch.Tensor:
    return append_dims(torch.as_tensor(sigma, dtype=x.dtype, device=x.device), x.ndim)
