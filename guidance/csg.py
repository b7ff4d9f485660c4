"""Conditional Score Guidance (Lee, Kang & Han, "Conditional Score Guidance for Text-Driven Image-to-Image
Translation", section 4, Alg. 1; shared/design/algorithms.md section 2 and algorithms-review.md A.5, #8, #13).

The update (Eq. 18), VP form, from t to the previous grid point s:

    x_s = DDIM(x_t, eps_hat) - gamma_t * Omega_t * (x_t - x_t^src)
    gamma_t = sqrt(a_s / a_t) - sqrt((1 - a_s) / (1 - a_t))                         (Eq. 6)
    Omega_t = lambda_pre * B_t * P                                                (Eq. 15)
    B_t = 1[P >= 1 - max(cos(pi * i / (delta * (N - 1))), 0)],  delta = 1.5        (Eq. 16, code's step form)

with P = 1 - M_hat the background probability (Eq. 11-12, see attention_patches/csg_mask.py); the pull uses P
as it is (the authors' code too: only the cross-attention mixup renormalises the mask, per layer).
In sigma space (x = x^VP * sqrt(1 + sigma^2), a = 1 / (1 + sigma^2)) the pull term becomes
gamma_t * sqrt(1 + sigma_s^2) / sqrt(1 + sigma_t^2) = 1 - sigma_s / sigma_t, so

    x_s = DDIM_sigma(x_t) - (1 - sigma_s / sigma_t) * Omega_t * (x_t - x_t^src).

On a rectified-flow state x = (1 - sigma) x0 + sigma eps (SD3) the same VP pull is a'/a - b'/b with a = 1 - sigma,
b = sigma (pull_coefficient). No gradient and no backpropagation are involved.

Capping the pull (csg_step's `clamp`) is ours, not the paper's. With 50 steps and lambda_pre 15 the paper's
pull is 1.65 * P at the first step (it over-corrects but contracts) and a soft mask is off the gate B_t before
the coefficient grows again, so an always-on cap would change the paper's soft-mask results; it is used on
images whose mask is hard (hard_background), where Eq. 18 as written diverges, and everywhere on request.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from .ddim import ddim_step
from .schedules import VE, NoiseForm


def gamma_vp(sigma, sigma_next) -> float:
    """Eq. 6 with the alpha-bars of the actual DDIM neighbours."""
    a_t, a_s = 1 / (1 + float(sigma) ** 2), 1 / (1 + float(sigma_next) ** 2)
    return math.sqrt(a_s / a_t) - math.sqrt((1 - a_s) / (1 - a_t))


def pull_coefficient(sigma, sigma_next, form: NoiseForm = VE) -> float:
    """gamma_t converted to the state's units: a'/a - b'/b for a state x = a x0 + b eps (schedules.NoiseForm), i.e.
    1 - sigma_next / sigma on VE. On FLOW, (1 - sigma')/(1 - sigma) - sigma'/sigma; at pure noise (sigma = 1, a = 0)
    the state holds no image and the VP pull is unbounded, so it is 0 there: the sampler starts from the
    inversion's own noise, where x - x^src = 0 anyway."""
    if form is VE:
        return 1.0 - float(sigma_next) / float(sigma)
    a, a_next = float(form.a(float(sigma))), float(form.a(float(sigma_next)))
    if a <= 0:
        return 0.0
    return a_next / a - float(sigma_next) / float(sigma)


def background_gate(background: torch.Tensor, step: int, steps: int, delta: float = 1.5) -> torch.Tensor:
    """B_t of Eq. 16: guide pixels whose background probability reaches a threshold rising from 0 to 1."""
    phase = step / max(steps - 1, 1)
    threshold = 1.0 - max(math.cos(math.pi * phase / delta), 0.0)
    return (background >= threshold).to(background.dtype)


def omega(background: torch.Tensor, lambda_pre: float, step: int, steps: int, delta: float = 1.5) -> torch.Tensor:
    """Diag(Omega_t) = lambda_pre * B_t * P (Eq. 15), per pixel, shared by all channels."""
    return lambda_pre * background_gate(background, step, steps, delta) * background


def hard_background(background: torch.Tensor) -> torch.Tensor:
    """[B or 1, H, W] -> [B or 1] bool: images whose mask has pixels with P = 1 (a binary or painted mask).

    The gate's threshold is capped at 1 for the last quarter of the steps (B_t, code's step form), so exactly
    these pixels stay guided to the end, where the pull coefficient (1 - sigma_s / sigma_t) * lambda_pre
    grows to 4.5, 10.6, 15 (50 steps, lambda_pre 15): each step multiplies x - x^src by about 1 - that, and
    the run diverges. A soft mask (P < 1 everywhere, as CSG's own Eq. 12 gives) is off the gate by then.
    """
    return background.flatten(1).amax(1) >= 1


def csg_step(x: torch.Tensor, sigma, sigma_next, denoised: torch.Tensor, x_src: torch.Tensor,
             omega_t: torch.Tensor, clamp=False, form: NoiseForm = VE) -> torch.Tensor:
    """Eq. 18 in sigma space. omega_t: [B or 1, H, W] (broadcast over channels).

    `clamp` caps the pull coefficient times Omega at 1: True everywhere, or a bool tensor [B or 1] for the
    images to cap (e.g. hard_background). Ours, not the paper (algorithms.md CSG pitfall 2):
    a capped step removes at most the whole x - x^src instead of over-correcting it. False = Eq. 18 as written.
    """
    eps = form.eps(x, sigma, denoised)
    base = ddim_step(denoised, eps, sigma, sigma_next, form=form) if float(sigma_next) > 0 else denoised
    pull = pull_coefficient(sigma, sigma_next, form) * omega_t[:, None].to(x)
    if isinstance(clamp, torch.Tensor):
        where = clamp.to(device=x.device, dtype=torch.bool)
        pull = torch.where(where.reshape(where.shape[0], *([1] * (pull.ndim - 1))), pull.clamp(max=1.0), pull)
    elif clamp:
        pull = pull.clamp(max=1.0)
    return base - pull * (x - x_src)


def token_positions(caption_ids: list[int], word_ids: list[int]) -> list[int]:
    """Positions of the word's token span inside the caption's token ids (first occurrence)."""
    n = len(word_ids)
    if n == 0:
        return []
    for i in range(len(caption_ids) - n + 1):
        if caption_ids[i:i + n] == word_ids:
            return list(range(i, i + n))
    return []


def align_tokens(src_ids: list[int], tgt_ids: list[int], length: Optional[int] = None) -> torch.Tensor:
    """For each target token, the source token it corresponds to (word-swap prompts).

    The common prefix and suffix map one to one; the differing middle of the target (the swapped word) maps
    onto the differing middle of the source, proportionally. Returns LongTensor [len(tgt_ids)].
    """
    n_s, n_t = len(src_ids), len(tgt_ids)
    p = 0
    while p < min(n_s, n_t) and src_ids[p] == tgt_ids[p]:
        p += 1
    q = 0
    while q < min(n_s, n_t) - p and src_ids[n_s - 1 - q] == tgt_ids[n_t - 1 - q]:
        q += 1
    mapping = []
    mid_s, mid_t = n_s - p - q, n_t - p - q
    for j in range(n_t):
        if j < p:
            mapping.append(j)
        elif j >= n_t - q:
            mapping.append(n_s - (n_t - j))
        else:
            k = j - p
            mapping.append(p + (min(int(k * mid_s / max(mid_t, 1)), mid_s - 1) if mid_s > 0 else max(p - 1, 0) - p))
    out = torch.tensor(mapping, dtype=torch.long)
    if length is not None and len(out) < length:
        out = torch.cat([out, torch.arange(len(out), length)])
    return out
