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

Two forms (shared/design/reference-parity.md section 2):
- "paper" (ours, the default of the "current level"/"target timestep" inversion variants): one shift per
  pyramid level for H and one for W, drawn from [1, S/2) and shared by every sample and channel (a zero shift
  would penalise the variance and fight L_KL, review #3); L_KL with the biased variance per sample.
- "diffusers" (`regularize_noise(..., style="diffusers")`, what StableDiffusionPix2PixZeroPipeline.invert
  does): one shift per (sample, channel, level), the same for H and W, d = randint(S // 2) (0 allowed), drawn
  sample -> channel -> level, a fresh set every roll; the pyramid stops when H <= 8; L_KL = var + mean^2 - 1 -
  log(var + 1e-7) with the unbiased variance. diffusers draws every sample's shifts from one generator and takes
  L_KL over the whole batch; here each sample has its own generator (all seeded alike) and its own L_KL, so an
  image in a batch is regularised exactly as alone, and a batch of one is exactly diffusers.
(The official pix2pix-zero repository draws shifts from [1, S/2) per channel; neither form copies it.)
Losses are summed over the batch, so each sample's gradient is what it would be alone.
"""
from __future__ import annotations

from typing import Optional, Sequence

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


def auto_corr_loss_diffusers(eta: torch.Tensor, generators: Sequence[torch.Generator], min_size: int = 8) -> torch.Tensor:
    """diffusers' pyramid auto-correlation loss: per (sample, channel, level) one shift d = randint(S // 2) used for
    both axes, drawn sample -> channel -> level from the sample's generator; levels stop once H <= min_size."""
    if eta.ndim != 4:
        raise ValueError(f"auto_corr_loss expects [B, C, H, W], got shape {tuple(eta.shape)}")
    b, c, h, w = eta.shape
    if len(generators) != b:
        raise ValueError(f"one generator per sample is needed ({b} samples, {len(generators)} generators)")
    sizes = [(h, w)]
    while sizes[-1][0] > min_size:
        sizes.append((sizes[-1][0] // 2, sizes[-1][1] // 2))
    shifts = torch.tensor([[[int(torch.randint(max(hl // 2, 1), (1,), generator=g).item())
                             for hl, _ in sizes] for _ in range(c)] for g in generators], dtype=torch.long)
    loss = eta.new_zeros(())
    level = eta
    for li, (hl, wl) in enumerate(sizes):
        d = shifts[:, :, li].to(eta.device)[:, :, None]                                    # [B, C, 1]
        ih = (torch.arange(hl, device=eta.device)[None, None] - d) % hl                    # roll along H
        iw = (torch.arange(wl, device=eta.device)[None, None] - d) % wl                    # roll along W
        rolled_h = torch.gather(level, 2, ih[..., None].expand(b, c, hl, wl))
        rolled_w = torch.gather(level, 3, iw[:, :, None, :].expand(b, c, hl, wl))
        loss = loss + (level * rolled_h).mean(dim=(2, 3)).pow(2).sum() + (level * rolled_w).mean(dim=(2, 3)).pow(2).sum()
        if li + 1 < len(sizes):
            level = F.avg_pool2d(level, kernel_size=2)
    return loss


def kl_divergence_diffusers(eta: torch.Tensor) -> torch.Tensor:
    """diffusers' L_KL per sample (unbiased variance, +1e-7 in the log), summed over the batch."""
    flat = eta.reshape(eta.shape[0], -1)
    var = flat.var(dim=1, unbiased=True)
    return (var + flat.mean(dim=1).pow(2) - 1 - torch.log(var + 1e-7)).sum()


def regularize_noise(eps: torch.Tensor, lambda_ac: float = 20.0, lambda_kl: float = 20.0, iterations: int = 5,
                     rolls: int = 5, generator=None, pool_x2: bool = False,
                     min_size: int = 8, style: str = "paper") -> torch.Tensor:
    """Gradient steps on eps against L_pair and L_KL (pix2pix-zero's schedule). Returns a new tensor.

    style "paper": `generator` is one torch.Generator; style "diffusers": a sequence of one generator per sample.
    Works inside ComfyUI's inference mode: the steps run on a normal (non-inference) copy of eps.
    """
    if style not in ("paper", "diffusers"):
        raise ValueError(f"style must be 'paper' or 'diffusers', got {style!r}")
    if iterations <= 0 or (lambda_ac == 0 and lambda_kl == 0):
        return eps
    if style == "diffusers":
        gens = list(generator) if isinstance(generator, (list, tuple)) else [generator] * eps.shape[0]
        ac = lambda v: auto_corr_loss_diffusers(v, gens, min_size)  # noqa: E731
        kl = kl_divergence_diffusers
    else:
        ac = lambda v: auto_corr_loss(v, generator, min_size, pool_x2)  # noqa: E731
        kl = kl_divergence
    dtype = eps.dtype
    with torch.inference_mode(False), torch.enable_grad():
        e = eps.detach().clone().float()
        for _ in range(iterations):
            if lambda_ac > 0:
                for _ in range(rolls):
                    var = e.detach().requires_grad_(True)
                    g, = torch.autograd.grad(ac(var), var)
                    e = e - lambda_ac * (g / rolls) if style == "diffusers" else e - lambda_ac / rolls * g
            if lambda_kl > 0:
                var = e.detach().requires_grad_(True)
                g, = torch.autograd.grad(kl(var), var)
                e = e - lambda_kl * g
        out = e.detach().to(dtype)
    return out
