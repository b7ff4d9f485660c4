"""Conversions between k-diffusion sigma space and the papers' alpha-bar (VP) form.

Notation (shared/design/algorithms.md section 0.1): alpha_bar_t is the cumulative product of (1 - beta).
ComfyUI's discrete schedules define sigma_t = sqrt((1 - alpha_bar_t) / alpha_bar_t), so

    alpha_bar = 1 / (1 + sigma^2),         x_t^VP = sqrt(alpha_bar) * x = x / sqrt(1 + sigma^2),

where x = x0 + sigma * eps is the k-diffusion state and x_t^VP = sqrt(a) x0 + sqrt(1 - a) eps the DDPM one
(DDIM, Song et al. 2021, arXiv:2010.02502, Eq. 4). The denoiser returns D = x0_hat, so eps_hat = (x - D)/sigma.
"""
from __future__ import annotations

import math

import torch


def append_dims(t: torch.Tensor | float, ndim: int) -> torch.Tensor:
    """Give a per-sample tensor of shape [B] (or a scalar) trailing singleton dims up to `ndim`."""
    t = torch.as_tensor(t)
    if t.ndim > ndim:
        raise ValueError(f"append_dims: tensor has {t.ndim} dims, more than the target {ndim}")
    return t.reshape(*t.shape, *([1] * (ndim - t.ndim)))


def alpha_bar_from_sigma(sigma):
    """alpha_bar = 1 / (1 + sigma^2)."""
    return 1.0 / (1.0 + sigma * sigma)


def sigma_from_alpha_bar(alpha_bar):
    """sigma = sqrt((1 - alpha_bar) / alpha_bar)."""
    if isinstance(alpha_bar, torch.Tensor):
        return ((1.0 - alpha_bar) / alpha_bar).sqrt()
    return math.sqrt((1.0 - alpha_bar) / alpha_bar)


def to_vp(x: torch.Tensor, sigma) -> torch.Tensor:
    """k-diffusion state -> DDPM/DDIM latent: x^VP = x / sqrt(1 + sigma^2)."""
    return x / append_dims(torch.as_tensor(1.0 + sigma * sigma, dtype=x.dtype, device=x.device).sqrt(), x.ndim)


def from_vp(x_vp: torch.Tensor, sigma) -> torch.Tensor:
    """DDPM/DDIM latent -> k-diffusion state: x = x^VP * sqrt(1 + sigma^2)."""
    return x_vp * append_dims(torch.as_tensor(1.0 + sigma * sigma, dtype=x_vp.dtype, device=x_vp.device).sqrt(),
                              x_vp.ndim)


def eps_from_denoised(x: torch.Tensor, sigma, denoised: torch.Tensor) -> torch.Tensor:
    """eps_hat = (x - D) / sigma (Tweedie's x0 estimate inverted; sigma must be > 0)."""
    return (x - denoised) / append_dims(torch.as_tensor(sigma, dtype=x.dtype, device=x.device), x.ndim)


def ddim_noise_split(sigma, sigma_next, eta: float):
    """Split the DDIM step's remaining noise level into its deterministic and fresh parts.

    DDIM (arXiv:2010.02502, Eq. 12 and 16) with
    sigma_eta = eta * sqrt((1 - a_s)/(1 - a_t)) * sqrt(1 - a_t/a_s) in VP units becomes, divided by
    sqrt(a_s) to reach sigma space,

        sigma_up   = eta * sigma_next * sqrt(sigma^2 - sigma_next^2) / sigma
        sigma_down = sqrt(sigma_next^2 - sigma_up^2)

    so x_next = x0_hat + sigma_down * eps_hat + sigma_up * z. eta = 0 gives (sigma_next, 0): plain DDIM.
    Returns python floats or tensors, following the inputs.
    """
    if eta < 0:
        raise ValueError(f"eta must be >= 0, got {eta}")
    if eta == 0 or float(sigma_next) == 0.0:
        return sigma_next, sigma_next * 0
    if float(sigma_next) > float(sigma):
        raise ValueError("eta > 0 is only defined for denoising steps (sigma_next < sigma), not for inversion")
    sigma_up = eta * sigma_next * ((sigma * sigma - sigma_next * sigma_next) / (sigma * sigma)) ** 0.5
    sigma_up = min(sigma_up, sigma_next) if not isinstance(sigma_up, torch.Tensor) else torch.minimum(
        sigma_up, torch.as_tensor(sigma_next))
    sigma_down = (sigma_next * sigma_next - sigma_up * sigma_up) ** 0.5
    return sigma_down, sigma_up
