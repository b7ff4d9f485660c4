"""pix2pix-zero's noise regulariser for DDIM inversion (Parmar et al., "Zero-shot Image-to-Image
Translation", section 3.1, Eq. 3 and App. D; shared/design/algorithms.md section 4.2 and
algorithms-review.md #2, #3, #9).

DDIM inversion drifts away from Gaussian noise: the predicted eps picks up spatial structure of the image,
and editing from such a latent loses editability. The regulariser pushes each step's eps toward white,
unit-variance noise with two terms:

- L_pair, the pyramid auto-correlation loss: for each pyramid level p (eta^0 = eps, each next level 2x2
  average-pooled, down to 8x8 or the smallest level the latent has) and channel c, with one random shift
  delta per level and iteration and circular indexing,
      L_pair = sum_p sum_c (mean_xy eta_xyc * eta_(x-delta)yc)^2 + (mean_xy eta_xyc * eta_x(y-delta)c)^2
  (the text's "sum of squares of the auto-correlation coefficients"; the printed Eq. 3 lacks the square).
- L_KL = var + mean^2 - 1 - log var over all elements: a soft zero-mean, unit-variance constraint.

Schedule of the official code (review #9): lambda is a gradient *step size* for each term, not a relative
weight: `iterations` times, `rolls` L_pair steps of lambda/rolls with fresh shifts, then one L_KL step.
The regularised eps is then used in both terms of the inversion step (review #2).
Shifts are drawn from [1, S/2) rather than the code's [0, S/2): a zero shift would penalise the variance
and fight L_KL (review #3).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F


def _shift(size: int, generator: Optional[torch.Generator]) -> int:
    hi = max(size // 2, 2)
    return int(torch.randint(1, hi, (1,), generator=generator).item())


def auto_corr_loss(eta: torch.Tensor, generator: Optional[torch.Generator] = None, min_size: int = 8,
                   pool_x2: bool = False) -> torch.Tensor:
    """Pyramid auto-correlation loss of noise `eta` [B, C, H, W], summed over levels, channels and samples.

    Summing over the batch keeps each sample's gradient what it would be alone (the step sizes are per sample).
    """
    if eta.ndim != 4:
        raise ValueError(f"auto_corr_loss expects [B, C, H, W], got shape {tuple(eta.shape)}")
    loss = eta.new_zeros(())
    level = eta
    while True:
        h, w = level.shape[-2:]
        dh, dw = _shift(h, generator), _shift(w, generator)
        corr_h = (level * torch.roll(level, shifts=dh, dims=2)).mean(dim=(2, 3))
        corr_w = (level * torch.roll(level, shifts=dw, dims=3)).mean(dim=(2, 3))
        loss = loss + (corr_h.pow(2) + corr_w.pow(2)).sum()
        if h <= min_size or w <= min_size or h < 2 or w < 2:
            break
        level = F.avg_pool2d(level, kernel_size=2)
        if pool_x2:
            level = level * 2.0  # the paper's "x2 to preserve variance" (4 iid samples averaged: var / 4)
    return loss


def kl_divergence(eta: torch.Tensor) -> torch.Tensor:
    """var + mean^2 - 1 - log(var) per sample over all its elements, summed over the batch."""
    flat = eta.reshape(eta.shape[0], -1)
    var = flat.var(dim=1, unbiased=False)
    mean = flat.mean(dim=1)
    return (var + mean.pow(2) - 1 - torch.log(var)).sum()


def regularize_noise(eps: torch.Tensor, lambda_ac: float = 20.0, lambda_kl: float = 20.0, iterations: int = 5,
                     rolls: int = 5, generator: Optional[torch.Generator] = None, pool_x2: bool = False,
                     min_size: int = 8) -> torch.Tensor:
    """Gradient steps on eps against L_pair and L_KL (pix2pix-zero's schedule). Returns a new tensor.

    Works inside ComfyUI's inference mode: the steps run on a normal (non-inference) copy of eps.
    """
    if iterations <= 0 or (lambda_ac == 0 and lambda_kl == 0):
        return eps
    dtype = eps.dtype
    with torch.inference_mode(False), torch.enable_grad():
        e = eps.detach().clone().float()
        for _ in range(iterations):
            for _ in range(rolls):
                var = e.detach().requires_grad_(True)
                g, = torch.autograd.grad(auto_corr_loss(var, generator, min_size, pool_x2), var)
                e = e - lambda_ac / rolls * g
            var = e.detach().requires_grad_(True)
            g, = torch.autograd.grad(kl_divergence(var), var)
            e = e - lambda_kl * g
        out = e.detach().to(dtype)
    return out
