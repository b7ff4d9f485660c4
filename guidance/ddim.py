"""The one DDIM step every Z2I method calls, and the plain DDIM sampler built on it.

DDIM (Song et al. 2021, arXiv:2010.02502, Eq. 12), in the VP form the papers use:

    x_s = sqrt(a_s) * P + sqrt(1 - a_s - sigma_eta^2) * eps_D + sigma_eta * z,   P = x0_hat(x_t, eps_P)

Dividing by sqrt(a_s) gives sigma space (shared/design/comfyui-internals.md section 2.3):

    x_next = P + sigma_down * eps_D + sigma_up * z          (see schedules.ddim_noise_split)

`P` (the x0 term) and `eps_D` (the direction term) are separate arguments so that one function covers
  - plain DDIM:            P = D(x), eps_D = (x - D(x)) / sigma;
  - inversion (sigma_next > sigma, eta = 0): the same formula run up the schedule (pix2pix-zero Eq. 1);
  - asymmetric steps:      AGG (Kwon & Ye, "Improving Diffusion-based Image Translation using Asymmetric
    Gradient Guidance", Eq. 14-16) and Asyrp (Kwon, Jeong & Uh, "Diffusion Models Already Have a Semantic
    Latent Space", Eq. 9) put the edited prediction in P only and keep the original eps in the direction term.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch

from .schedules import append_dims, ddim_noise_split, eps_from_denoised

NoiseSampler = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def ddim_step(x0_pred: torch.Tensor, eps_dir: torch.Tensor, sigma, sigma_next, eta: float = 0.0,
              noise: Optional[torch.Tensor] = None) -> torch.Tensor:
    """One DDIM update in sigma space: x_next = x0_pred + sigma_down * eps_dir + sigma_up * noise.

    sigma, sigma_next: scalars or [B] tensors (the level now and the level to reach; sigma_next > sigma
    is an inversion step and needs eta = 0). `noise` is required when eta > 0 and sigma_next > 0.
    """
    sigma_down, sigma_up = ddim_noise_split(sigma, sigma_next, eta)
    nd = x0_pred.ndim
    out = x0_pred + append_dims(torch.as_tensor(sigma_down, dtype=x0_pred.dtype, device=x0_pred.device), nd) * eps_dir
    if eta > 0 and float(torch.as_tensor(sigma_up).max()) > 0:
        if noise is None:
            raise ValueError("ddim_step: eta > 0 needs a noise tensor")
        out = out + append_dims(torch.as_tensor(sigma_up, dtype=x0_pred.dtype, device=x0_pred.device), nd) * noise
    return out


def seeded_noise_sampler(x: torch.Tensor, seed: Optional[int]) -> NoiseSampler:
    """Fresh Gaussian noise per call from a CPU generator seeded once, so results match on any device."""
    gen = torch.Generator(device="cpu")
    gen.manual_seed(0 if seed is None else int(seed))

    def sample(sigma, sigma_next):
        return torch.randn(x.shape, generator=gen, dtype=torch.float32).to(device=x.device, dtype=x.dtype)

    return sample


def sample_ddim(model, x: torch.Tensor, sigmas: torch.Tensor, extra_args: Optional[dict] = None,
                callback: Optional[Callable[[dict], None]] = None, disable: Optional[bool] = None,
                eta: float = 0.0, noise_sampler: Optional[NoiseSampler] = None) -> torch.Tensor:
    """Implements DDIM sampling (arXiv:2010.02502, Eq. 12) over any descending sigma schedule.

    eta = 0 is deterministic; eta > 0 adds fresh noise drawn from `noise_sampler` (default: seeded with
    extra_args["seed"], the noise seed ComfyUI's SamplerCustom passes).
    """
    extra_args = {} if extra_args is None else extra_args
    if eta > 0 and noise_sampler is None:
        noise_sampler = seeded_noise_sampler(x, extra_args.get("seed"))
    s_in = x.new_ones([x.shape[0]])
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = model(x, sigma * s_in, **extra_args)
        if callback is not None:
            callback({"x": x, "i": i, "sigma": sigma, "sigma_hat": sigma, "denoised": denoised})
        if float(sigma_next) == 0.0:
            x = denoised
            continue
        eps = eps_from_denoised(x, sigma, denoised)
        noise = noise_sampler(sigma, sigma_next) if eta > 0 else None
        x = ddim_step(denoised, eps, sigma, sigma_next, eta=eta, noise=noise)
    return x
