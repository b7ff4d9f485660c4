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

from .schedules import FLOW, VE, NoiseForm, append_dims, ddim_noise_split, noise_form_of, to_vp

NoiseSampler = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def ddim_step(x0_pred: torch.Tensor, eps_dir: torch.Tensor, sigma, sigma_next, eta: float = 0.0,
              noise: Optional[torch.Tensor] = None, form: NoiseForm = VE) -> torch.Tensor:
    """One DDIM update in sigma space: x_next = x0_pred + sigma_down * eps_dir + sigma_up * noise.

    sigma, sigma_next: scalars or [B] tensors (the level now and the level to reach; sigma_next > sigma
    is an inversion step and needs eta = 0). `noise` is required when eta > 0 and sigma_next > 0.
    form: the model's NoiseForm; on FLOW the same update in its units (flow_ddim_step).
    """
    if form is FLOW:
        return flow_ddim_step(x0_pred, eps_dir, sigma, sigma_next, eta, noise)
    sigma_down, sigma_up = ddim_noise_split(sigma, sigma_next, eta)
    nd = x0_pred.ndim
    out = x0_pred + append_dims(torch.as_tensor(sigma_down, dtype=x0_pred.dtype, device=x0_pred.device), nd) * eps_dir
    if eta > 0 and float(torch.as_tensor(sigma_up).max()) > 0:
        if noise is None:
            raise ValueError("ddim_step: eta > 0 needs a noise tensor")
        out = out + append_dims(torch.as_tensor(sigma_up, dtype=x0_pred.dtype, device=x0_pred.device), nd) * noise
    return out


def flow_ddim_step(x0_pred: torch.Tensor, eps_dir: torch.Tensor, sigma, sigma_next, eta: float = 0.0,
                   noise: Optional[torch.Tensor] = None) -> torch.Tensor:
    """ddim_step on a rectified-flow state x = (1 - sigma) x0 + sigma eps (schedules.FLOW).

    Divided by 1 - sigma the state is the VE state at s = sigma / (1 - sigma), where ddim_step's split applies:
    s_up = eta s' sqrt(1 - (s'/s)^2), s_down = sqrt(s'^2 - s_up^2). Multiplied back by 1 - sigma':

        x_next = (1 - sigma') x0_pred + sigma' (r_down eps_dir + r_up z),  r_up = min(1, eta sqrt(1 - q^2)),
        r_down = sqrt(1 - r_up^2), q = s'/s = sigma' (1 - sigma) / (sigma (1 - sigma')),

    finite at pure noise (sigma = 1: s infinite, q = 0). eta = 0: (1 - sigma') x0_pred + sigma' eps_dir, the
    Euler step of the flow ODE when x0_pred and eps_dir are the model's own."""
    nd = x0_pred.ndim
    t = lambda v: append_dims(torch.as_tensor(v, dtype=x0_pred.dtype, device=x0_pred.device), nd)  # noqa: E731
    s, s_next = t(sigma), t(sigma_next)
    if eta < 0:
        raise ValueError(f"eta must be >= 0, got {eta}")
    out = (1 - s_next) * x0_pred
    if eta == 0 or float(torch.as_tensor(sigma_next).max()) == 0.0:
        return out + s_next * eps_dir
    if bool((torch.as_tensor(sigma_next) > torch.as_tensor(sigma)).any()):
        raise ValueError("eta > 0 is only defined for denoising steps (sigma_next < sigma), not for inversion")
    if noise is None:
        raise ValueError("ddim_step: eta > 0 needs a noise tensor")
    q = s_next * (1 - s) / (s * (1 - s_next)).clamp_min(1e-30)
    r_up = (eta * (1 - q * q).clamp_min(0).sqrt()).clamp(max=1.0)
    r_down = (1 - r_up * r_up).sqrt()
    return out + s_next * (r_down * eps_dir + r_up * noise)


def noise_form_of_model(model) -> NoiseForm:
    """The NoiseForm of a k-diffusion-wrapped ComfyUI model (KSAMPLER's `model`) or of a test denoiser with a
    `noise_form` attribute; VE when it has neither (the form of every UNet family)."""
    inner = model
    for _ in range(4):
        form = getattr(inner, "noise_form", None)
        if isinstance(form, NoiseForm):
            return form
        ms = getattr(inner, "model_sampling", None)
        if ms is not None:
            return noise_form_of(ms) or VE
        inner = getattr(inner, "inner_model", None)
        if inner is None:
            break
    return VE


def schedule_levels(sigmas) -> list[float]:
    """The schedule as Python floats, read once before a loop: comparing a device tensor inside a loop (`float(s)`,
    `if s == 0`) makes the host wait for the GPU at every step."""
    return [float(v) for v in (sigmas.tolist() if isinstance(sigmas, torch.Tensor) else sigmas)]


def ends_at_floor(sigmas: torch.Tensor, sigma_floor: Optional[float]) -> bool:
    """True when a descending schedule ends at the model's lowest trained level sigma(0) > 0 instead of at 0:
    the grid of diffusers' DDIMScheduler with set_alpha_to_one=False, whose last step lands on abar_0."""
    last = float(sigmas[-1])
    return sigma_floor is not None and last > 0 and abs(last - float(sigma_floor)) <= 1e-5 * float(sigma_floor)


def finish(x: torch.Tensor, sigmas: torch.Tensor, sigma_floor: Optional[float]) -> torch.Tensor:
    """The sampler's result. A schedule that ends at sigma(0) (the Z2I inversion's "diffusers" variant) ends as
    diffusers' DDIM does: the latent at abar_0 read in VP units, x / sqrt(1 + sigma(0)^2), the clean latent the
    inversion started from. Any other schedule (every core scheduler ends at 0) returns x unchanged."""
    return to_vp(x, sigmas[-1]) if ends_at_floor(sigmas, sigma_floor) else x


def model_sigma_floor(model) -> Optional[float]:
    """sigma(0) of a k-diffusion-wrapped ComfyUI model (KSAMPLER's `model`), or None when it has no schedule."""
    inner = model
    for _ in range(4):
        ms = getattr(inner, "model_sampling", None)
        if ms is not None and hasattr(ms, "sigma_min"):
            return float(ms.sigma_min)
        inner = getattr(inner, "inner_model", None)
        if inner is None:
            return None
    return None


def per_row(model):
    """The denoiser evaluated one batch row at a time (results concatenated in order), so that every image of a
    batch is computed with exactly the kernels it gets alone: CPU and GPU kernels may partition a batch
    differently from a single row, and inversion or guidance amplifies those last-digit differences. With an
    inpainting mask (`denoise_mask`, whose companions are held batch-wide by core) the batch is evaluated whole."""
    def call(x, sigma, **kwargs):
        if x.shape[0] == 1 or kwargs.get("denoise_mask") is not None:
            return model(x, sigma, **kwargs)
        s = torch.as_tensor(sigma)
        s = s.expand(x.shape[0]) if s.ndim == 0 else s
        return torch.cat([model(x[i:i + 1], s[i:i + 1], **kwargs) for i in range(x.shape[0])])

    for name in ("inner_model", "model_sampling", "noise_form"):   # what samplers and helpers look up on a denoiser
        if hasattr(model, name):
            setattr(call, name, getattr(model, name))
    return call


def seeded_noise_sampler(x: torch.Tensor, seed: Optional[int]) -> NoiseSampler:
    """Fresh Gaussian noise per call from a CPU generator seeded once, so results match on any device."""
    gen = torch.Generator(device="cpu")
    gen.manual_seed(0 if seed is None else int(seed))

    def sample(sigma, sigma_next):
        return torch.randn(x.shape, generator=gen, dtype=torch.float32).to(device=x.device, dtype=x.dtype)

    return sample


def keep_outside(mask: torch.Tensor, level: Callable[[float], torch.Tensor]) -> Callable:
    """Inpainting from an inversion: keep(x, sigma) is x where `mask` is 1 (the sampler edits there) and the
    source's inverted latent at level sigma (`level(sigma)`) where it is 0, so the kept region retraces the
    inversion's trajectory and ends at its clean latent (the reconstruction), and the edited region sees that
    context at every step. Samplers apply it after each step, at the level they stepped to."""
    def keep(x: torch.Tensor, sigma) -> torch.Tensor:
        m = mask.to(x)
        return x * m + level(float(sigma)).to(x) * (1 - m)

    return keep


def sample_ddim(model, x: torch.Tensor, sigmas: torch.Tensor, extra_args: Optional[dict] = None,
                callback: Optional[Callable[[dict], None]] = None, disable: Optional[bool] = None,
                eta: float = 0.0, noise_sampler: Optional[NoiseSampler] = None,
                keep: Optional[Callable] = None) -> torch.Tensor:
    """Implements DDIM sampling (arXiv:2010.02502, Eq. 12) over any descending sigma schedule, in the model's
    NoiseForm (VE for the UNet families; FLOW for rectified flow, where eta 0 is the flow ODE's Euler step).

    eta = 0 is deterministic; eta > 0 adds fresh noise drawn from `noise_sampler` (default: seeded with
    extra_args["seed"], the noise seed ComfyUI's SamplerCustom passes). `keep` (keep_outside): inpainting.
    """
    extra_args = {} if extra_args is None else extra_args
    if eta > 0 and noise_sampler is None:
        noise_sampler = seeded_noise_sampler(x, extra_args.get("seed"))
    s_in = x.new_ones([x.shape[0]])
    floor = model_sigma_floor(model)
    form = noise_form_of_model(model)
    levels = schedule_levels(sigmas)
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = model(x, sigma * s_in, **extra_args)
        if callback is not None:
            callback({"x": x, "i": i, "sigma": sigma, "sigma_hat": sigma, "denoised": denoised})
        if levels[i + 1] == 0.0:
            x = denoised
        else:
            eps = form.eps(x, sigma, denoised)
            noise = noise_sampler(sigma, sigma_next) if eta > 0 else None
            x = ddim_step(denoised, eps, sigma, sigma_next, eta=eta, noise=noise, form=form)
        if keep is not None:
            x = keep(x, sigma_next)
    return finish(x, sigmas, floor)
