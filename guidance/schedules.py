"""Conversions between k-diffusion sigma space and the papers' alpha-bar (VP) form.

Notation (shared/design/algorithms.md section 0.1): alpha_bar_t is the cumulative product of (1 - beta).
ComfyUI's discrete schedules define sigma_t = sqrt((1 - alpha_bar_t) / alpha_bar_t), so

    alpha_bar = 1 / (1 + sigma^2),         x_t^VP = sqrt(alpha_bar) * x = x / sqrt(1 + sigma^2),

where x = x0 + sigma * eps is the k-diffusion state and x_t^VP = sqrt(a) x0 + sqrt(1 - a) eps the DDPM one
(DDIM, Song et al. 2021, arXiv:2010.02502, Eq. 4). The denoiser returns D = x0_hat, so eps_hat = (x - D)/sigma.
"""
from __future__ import annotations

import math
from typing import Optional

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


class NoiseForm:
    """How a model's state mixes the clean latent and the noise at level sigma: x = a(sigma) x0 + b(sigma) eps.

    - VE ("ve", every discrete eps / v-prediction model in k-diffusion space): a = 1, b = sigma; the papers' VP
      latent is x / sqrt(1 + sigma^2) (above).
    - FLOW ("flow", rectified flow: SD3, ComfyUI's CONST model sampling): a = 1 - sigma, b = sigma, sigma in
      [0, 1]; the model predicts the velocity v = eps - x0 and ComfyUI's denoiser returns D = x - sigma v.
      Dividing by a gives the VE state of level s = sigma / (1 - sigma): the same DDIM update in other units,
      finite up to pure noise (sigma = 1, x = eps), where the VE level is infinite.

    The DDIM update keeps x0_hat and eps_hat and moves b/a: x_next = a' x0_hat + b' eps_hat (eta = 0). On FLOW
    that is exactly the Euler step of the flow ODE, x_next = x + (sigma' - sigma) v (the issue's "at eta 0 it is
    the Euler step"), and DDIM inversion is the same update run up the schedule.
    """

    def __init__(self, name: str):
        if name not in ("ve", "flow"):
            raise ValueError(f"unknown noise form {name!r}")
        self.name = name

    def __repr__(self) -> str:
        return f"NoiseForm({self.name!r})"

    def a(self, sigma):
        return 1.0 - sigma if self.name == "flow" else sigma * 0 + 1.0

    def b(self, sigma):
        return sigma

    def norm(self, sigma):
        """sqrt(a^2 + b^2): the state's scale against a unit-variance VP latent (sqrt(1 + sigma^2) on VE)."""
        a, b = self.a(sigma), self.b(sigma)
        return (a * a + b * b) ** 0.5

    def eps(self, x: torch.Tensor, sigma, denoised: torch.Tensor) -> torch.Tensor:
        """eps_hat = (x - a D) / b (sigma > 0)."""
        if self.name == "ve":
            return eps_from_denoised(x, sigma, denoised)
        s = append_dims(torch.as_tensor(sigma, dtype=x.dtype, device=x.device), x.ndim)
        return (x - (1 - s) * denoised) / s

    def x0(self, x: torch.Tensor, sigma, eps: torch.Tensor) -> torch.Tensor:
        """x0_hat = (x - b eps) / a (sigma below the top of a FLOW schedule)."""
        s = append_dims(torch.as_tensor(sigma, dtype=x.dtype, device=x.device), x.ndim)
        return x - s * eps if self.name == "ve" else (x - s * eps) / (1 - s)


VE, FLOW = NoiseForm("ve"), NoiseForm("flow")


def noise_form_of(model_sampling) -> Optional[NoiseForm]:
    """The NoiseForm of a ComfyUI model_sampling object, read off its noise_scaling (the host's own definition of
    the state: noise_scaling(sigma, noise, latent) = b noise + a latent without max_denoise); None for a form Z2I
    does not implement (e.g. EDM's or a video model's)."""
    scaling = getattr(model_sampling, "noise_scaling", None)
    if scaling is None:
        return None
    one, sigma = torch.ones(1, 1, 1, 1), torch.full((1,), 0.25)
    try:
        a = float(scaling(sigma, torch.zeros_like(one), one, max_denoise=False).flatten()[0])
        b = float(scaling(sigma, one, torch.zeros_like(one), max_denoise=False).flatten()[0])
    except Exception:       # noqa: BLE001 - a model sampling Z2I does not know
        return None
    if abs(b - 0.25) > 1e-6:
        return None
    if abs(a - 1.0) <= 1e-6:
        return VE
    if abs(a - 0.75) <= 1e-6:
        return FLOW
    return None
