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
- "csg": the official CSG code's inversion (Hleephilip/CSG src/utils/ddim_inv.py, pix2pix-zero's scheduler loop over
  `timesteps.flip(0)[1:-1]`): on a grid of timesteps T_0 < ... < T_{N-1} (diffusers' T_k = 1 + k r) it takes N - 2
  steps; step k (1 <= k <= N-2) predicts eps at timestep T_k from the VP latent held at level abar[T_k - 1] and
  moves it to abar[T_{k+1} - 1]. The clean latent starts at abar[T_1 - 1] (= abar[r]), x_T ends at abar[T_{N-1} - 1],
  one training step less noisy than the level sampling starts it at (T_{N-1}). Given as `sigmas` = those levels
  (ascending, N - 1 of them) and `eval_sigmas` = the grid's sigma(T_k) of each step. Reproduced because CSG's
  figures come from it; it looks like an off-by-one in their code, not a design (docs/METHODS.md).
A step that starts from the clean latent (sigma 0) evaluates the "current" eps at the lowest trained level
(t = 0, `sigma_floor`) with the same rescaling, since the denoiser cannot give eps at sigma 0.
(The official pix2pix-zero repository inverts differently again: eps near the current level over 48 steps.)

On rectified flow (SD3; schedules.FLOW) the same update runs in the flow's units: x_u = (1 - sigma_u) x0_hat +
sigma_u eps with x0_hat = (x_t - sigma_t eps) / (1 - sigma_t), i.e. the Euler step of the flow ODE run up the
schedule, ending at pure noise (sigma 1) where the state is eps itself; "refine" makes it the exact inverse of
the Euler sampling step. Its fixed point x' solving x = (1 - sigma) D(x', sigma') + sigma eps(x', sigma') is
iterated eps-anchored (as on VE) while sigma < (1 - sigma) sigma' (the map's contraction factor there is about
(sigma' - sigma) / ((1 - sigma) sigma')), and x0-anchored above, x' <- (1 - sigma') D' + sigma' (x - (1 - sigma) D')
/ sigma with D' = D(x', sigma') (factor about (sigma' - sigma) / sigma), since at sigma' = 1 the eps-anchored map is
the identity. The "diffusers" variant is DDPM-specific and refused there.

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

from .ddim import ddim_step, noise_form_of_model
from .schedules import FLOW, VE, NoiseForm, append_dims, from_vp

VARIANTS = ("current", "target", "diffusers", "csg")


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

    def to(self, device) -> "Trajectory":
        """The same trajectory with its tensors on `device` (Tensor.to copies nothing already there)."""
        return Trajectory(*(t.to(device) for t in (self.sigmas, self.latents, self.x0, self.eps)))

    def index_of_sigma(self, sigma: float, rtol: float = 1e-4) -> int:
        """The step whose level equals `sigma` (caches are keyed by level, never by step count)."""
        diffs = (self.sigmas.double() - float(sigma)).abs()
        i = int(torch.argmin(diffs))
        if diffs[i] > rtol * max(abs(float(sigma)), 1e-8):
            raise KeyError(f"sigma {float(sigma):.6g} is not on this inversion's schedule")
        return i


def rescale_input(x: torch.Tensor, sigma_from, sigma_to, form: NoiseForm = VE) -> torch.Tensor:
    """The input at level sigma_to whose VP form equals x's VP form at sigma_from (x / norm(sigma) is the VP
    latent: sqrt(1 + sigma^2) on VE, sqrt((1 - sigma)^2 + sigma^2) on FLOW)."""
    f = form.norm(sigma_to) / form.norm(sigma_from)
    return x * append_dims(torch.as_tensor(f, dtype=x.dtype, device=x.device), x.ndim)


def predict_eps(model, x: torch.Tensor, sigma, sigma_eval, extra_args: dict, form: NoiseForm = VE) -> torch.Tensor:
    """eps_theta at level `sigma_eval` for the latent x (at level `sigma`), through the denoiser API."""
    s_in = x.new_ones([x.shape[0]])
    x_in = x if float(sigma_eval) == float(sigma) else rescale_input(x, sigma, sigma_eval, form)
    denoised = model(x_in, sigma_eval * s_in, **extra_args)
    return form.eps(x_in, sigma_eval, denoised)


def sample_ddim_invert(model, x: torch.Tensor, sigmas: torch.Tensor, extra_args: Optional[dict] = None,
                       callback: Optional[Callable[[dict], None]] = None, disable: Optional[bool] = None,
                       variant: str = "current", sigma_floor: Optional[float] = None, refine: int = 0,
                       regularize: Optional[Callable[[torch.Tensor, int], torch.Tensor]] = None,
                       record: Optional[list] = None, eval_sigmas: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Implements DDIM inversion over an ascending sigma schedule; returns x at sigmas[-1].

    `eval_sigmas` ("csg" only): the level each step's eps is predicted at (the VP latent rescaled to it).
    `sigma_floor`: the lowest level the model was trained at (needed when sigmas[0] == 0).
    `regularize(eps, step) -> eps`: applied to each step's eps (pix2pix-zero), used in both terms.
    `record`: a list that receives one Trajectory at the end.
    """
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    if len(sigmas) < (1 if variant == "csg" else 2):   # the code's loop is empty at 2 sampling steps
        raise ValueError("inversion needs at least two sigmas")
    if bool((sigmas[1:] <= sigmas[:-1]).any()):
        raise ValueError("inversion sigmas must be strictly ascending (flip the sampling schedule)")
    extra_args = {} if extra_args is None else extra_args
    form = noise_form_of_model(model)
    if form is FLOW and variant in ("diffusers", "csg"):
        raise ValueError(f"the {variant} variant is defined on the DDPM schedule, not on rectified flow")
    if (variant == "csg") != (eval_sigmas is not None) or (
            eval_sigmas is not None and len(eval_sigmas) != len(sigmas) - 1):
        raise ValueError("eval_sigmas: one per step, for the csg variant only")
    if variant in ("diffusers", "csg"):
        if not float(sigmas[0]) > 0:
            raise ValueError(f"the {variant} variant starts at a trained level > 0 (diffusers: the lowest trained level "
                             "sigma(0)), not at 0")
        x = from_vp(x, sigmas[0])
    latents, x0s, epss = [x], [], []
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        if variant == "csg":
            sigma_eval = eval_sigmas[i]
        elif variant in ("target", "diffusers"):
            sigma_eval = sigma_next
        elif float(sigma) > 0:
            sigma_eval = sigma
        else:
            if sigma_floor is None:
                raise ValueError("inversion from sigma 0 needs sigma_floor (the model's lowest level)")
            sigma_eval = torch.as_tensor(sigma_floor, dtype=sigmas.dtype, device=sigmas.device)
        eps = predict_eps(model, x, sigma, sigma_eval, extra_args, form)
        x_next = ddim_step(form.x0(x, sigma, eps), eps, sigma, sigma_next, form=form)
        anchor_x0 = form is FLOW and float(sigma) > 0 and float(sigma) >= (1 - float(sigma)) * float(sigma_next)
        for _ in range(refine):
            if anchor_x0:
                # near pure noise the flow's eps-anchored map below stops contracting (at sigma' = 1 it is the
                # identity); the same fixed point anchored on x0: x0' = D(x', sigma'), eps from x with it
                s_in = x.new_ones([x.shape[0]])
                d = model(x_next, sigma_next * s_in, **extra_args)
                eps = form.eps(x, sigma, d)
                x_next = ddim_step(d, eps, sigma, sigma_next, form=form)
                continue
            eps = predict_eps(model, x_next, sigma_next, sigma_next, extra_args, form)
            x_next = ddim_step(form.x0(x, sigma, eps), eps, sigma, sigma_next, form=form)
        if regularize is not None:
            eps = regularize(eps, i)
            x_next = ddim_step(form.x0(x, sigma, eps), eps, sigma, sigma_next, form=form)
        x0 = form.x0(x, sigma, eps)
        if callback is not None:
            callback({"x": x, "i": i, "sigma": sigma, "sigma_hat": sigma, "denoised": x0})
        x = x_next
        if record is not None:
            latents.append(x)
            x0s.append(x0)
            epss.append(eps)
    if record is not None:
        none = x.new_zeros((0, *x.shape))
        record.append(Trajectory(sigmas=sigmas.detach().clone(), latents=torch.stack(latents),
                                 x0=torch.stack(x0s) if x0s else none, eps=torch.stack(epss) if epss else none))
    return x

