"""Learning Asyrp directions (Kwon, Jeong & Uh, section 3.2-3.4, Eq. 7, Alg. 2, App. E;
shared/design/algorithms.md section 3.3, reference-parity.md section 5).

Two parameterisations of delta_h:
- global: one tensor delta_h [1, C, h, w] shared by every timestep (section 3.4 (c));
- implicit f_t(h_t): two 1x1 convolutions with a timestep embedding added between them, GroupNorm and SiLU
  (App. E, Fig. 16; the authors' DeltaBlock), the paper's default. The timestep embedding here is the
  sinusoidal embedding of t followed by a linear layer (ours: the official code reuses the UNet's time MLP output).

The loss at each step t of the editing interval (Eq. 7):
    L(t) = lambda_CLIP * L_direction(P_t^edit, y_tgt; P_t^src, y_src) + lambda_recon * |P_t^edit - P_t^src|
with P_t the predicted x0 (decoded to an image for Stable Diffusion), L_direction Asyrp Eq. 4, 1 - cos
(guidance/clip_loss.directional_loss; the paper's form, the official code uses -log((1 + cos) / 2)) and the L1 a
mean over pixels of images in [-1, 1], as in the official code (nn.L1Loss on the model's x0): the paper's
lambda_recon = 3 x CLIP similarity of the two texts is calibrated on that range.

Optimisers (`OPTIMIZERS`), both stepping once per timestep of the editing interval as the official code does:
- "SGD + StepLR (official code)": SGD, lr 0.5 (kwonminki/Asyrp_official script_train.sh, --lr_training 0.5),
  StepLR(step_size 3, gamma 0.1) stepped once per pass over the training images (the code's `n_iter` loop):
  lr 0.5 for passes 1-3, 0.05 for 4-6, 0.005 for 7-9, ...;
- "Adam": Adam, lr 0.05, constant (ours; the default: on the tiny test model it ends at a lower or equal loss
  than SGD + StepLR from the same seed, whose fixed lr depends on the gradient scale of the model it was tuned for).
The edited path moves with the asymmetric step (x0 term from eps(x|delta_h), direction term from eps(x)); the
source path with plain DDIM from the same x_T.
"""
from __future__ import annotations

import math
from typing import Callable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from .autograd import LossScaler
from .clip_loss import ClipEncoder, directional_loss
from .ddim import ddim_step
from .schedules import eps_from_denoised


def timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal embedding of timesteps t [B] (0..999), as in DDPM: [B, dim]."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.sin(args), torch.cos(args)], dim=-1)
    return F.pad(emb, (0, dim % 2))


class DeltaBlock(nn.Module):
    """f_t(h): conv1x1(C -> hidden) + Linear(temb) -> GroupNorm -> SiLU -> conv1x1(hidden -> C) (App. E)."""

    def __init__(self, channels: int, hidden: int = 512, temb_dim: int = 128):
        super().__init__()
        self.config = {"channels": int(channels), "hidden": int(hidden), "temb_dim": int(temb_dim)}
        self.channels = int(channels)
        self.conv1 = nn.Conv2d(channels, hidden, 1)
        self.temb = nn.Linear(temb_dim, hidden)
        # at least two channels per group: SD's h is 1x1 at small sizes, where one value per group is undefined
        self.norm = nn.GroupNorm(math.gcd(32, max(1, hidden // 2)), hidden)
        self.conv2 = nn.Conv2d(hidden, channels, 1)

    def forward(self, h: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        p = next(self.parameters())
        x = self.conv1(h.to(p))
        x = x + self.temb(timestep_embedding(t.to(p.device), self.config["temb_dim"]).to(p))[:, :, None, None]
        return self.conv2(F.silu(self.norm(x)))


def make_trainable(kind: str, channels: int, spatial: tuple, seed: int, hidden: int = 512, init_scale: float = 1e-3,
                   device=None):
    """(HDirection-like object to train, its parameters). kind: 'implicit' or 'global'. Seeded, no global RNG use;
    initialised on the CPU (the same values on every device) and then moved to `device` (the model's), fp32."""
    from .asyrp import HDirection
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if kind == "implicit":
            f = DeltaBlock(channels, hidden).to(device=device)
            return HDirection(None, {}, ((1.0, f),)), list(f.parameters())
        if kind == "global":
            # small, not zero: the directional loss has no direction at delta_I = 0
            delta = nn.Parameter((init_scale * torch.randn(1, channels, *spatial)).to(device=device))
            return HDirection(delta, {}), [delta]
    raise ValueError(f"kind must be 'implicit' or 'global', got {kind!r}")


SGD_STEPLR, ADAM = "SGD + StepLR (official code)", "Adam"
OPTIMIZERS = {SGD_STEPLR: {"lr": 0.5, "step_size": 3, "gamma": 0.1}, ADAM: {"lr": 0.05}}


def recon_l1(img_edit: torch.Tensor, img_src: torch.Tensor) -> torch.Tensor:
    """Mean |P_edit - P_src| of images given in [0, 1], measured on [-1, 1] (2 img - 1) as the official code
    does: twice the [0, 1] value."""
    return ((2 * img_edit - 1) - (2 * img_src - 1)).abs().mean()


def asyrp_loss(img_edit: torch.Tensor, img_src: torch.Tensor, encoder: ClipEncoder, text_dir: torch.Tensor,
               lambda_clip: float, lambda_recon: float) -> tuple[torch.Tensor, dict]:
    """Eq. 7 for decoded images in [0, 1] (the CLIP encoder's input): lambda_clip * directional + lambda_recon *
    the mean L1 on [-1, 1] (`recon_l1`). Returns (loss, parts)."""
    with torch.no_grad():
        e_src = encoder.encode_image(img_src)
    clip = directional_loss(encoder.encode_image(img_edit), e_src, text_dir)
    recon = recon_l1(img_edit, img_src.detach())
    loss = lambda_clip * clip + lambda_recon * recon
    return loss, {"clip": float(clip.detach()), "recon": float(recon.detach())}


def make_optimizer(name: str, params: list, lr: Optional[float] = None):
    """(optimizer, scheduler or None) for one of `OPTIMIZERS`; lr None (or < 0) = that optimiser's reference lr.
    The scheduler is meant to step once per pass over the training images."""
    if name not in OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {list(OPTIMIZERS)}, got {name!r}")
    cfg = OPTIMIZERS[name]
    lr = cfg["lr"] if lr is None or lr < 0 else float(lr)
    if name == SGD_STEPLR:
        opt = torch.optim.SGD(params, lr=lr, weight_decay=0)
        return opt, torch.optim.lr_scheduler.StepLR(opt, step_size=cfg["step_size"], gamma=cfg["gamma"])
    return torch.optim.Adam(params, lr=lr), None


def train_direction(denoise: Callable, starts: list, sigmas: torch.Tensor, edit_steps: int, loss_fn: Callable,
                    params: list, iterations: int, lr: Optional[float] = None, optimizer: str = ADAM,
                    callback: Optional[Callable[[dict], None]] = None,
                    scaler: Optional[LossScaler] = None) -> list[dict]:
    """Alg. 2 with one optimiser step per timestep. denoise(x, sigma, edited: bool) -> predicted x0 (edited = with
    delta_h, differentiable in the direction's parameters); starts: x_T per training image (batch 1 each);
    loss_fn(x0_edit, x0_src) -> (loss, parts); optimizer: a key of `OPTIMIZERS`, lr None = its reference lr (a
    StepLR schedule steps once per iteration, i.e. per pass over `starts`). `scaler`: guidance.autograd.LossScaler
    for gradients through a half-precision UNet / VAE / CLIP. Returns per iteration the mean loss, its parts and
    the lr used."""
    scaler = scaler or LossScaler(False)
    if edit_steps < 1:
        raise ValueError("the editing interval is empty: raise edit_until")
    opt, scheduler = make_optimizer(optimizer, params, lr)
    history, done = [], 0
    total = iterations * len(starts) * edit_steps
    for it in range(iterations):
        sums: dict = {}
        lr_now = float(opt.param_groups[0]["lr"])
        for start in starts:
            x = x_src = start.detach()
            for i in range(edit_steps):
                sigma, sigma_next = sigmas[i], sigmas[i + 1]
                with torch.no_grad():
                    d_src = denoise(x_src, sigma, False)
                    d_orig = d_src if i == 0 else denoise(x, sigma, False)
                d_edit = denoise(x, sigma, True)
                loss, parts = loss_fn(d_edit, d_src)
                opt.zero_grad(set_to_none=True)
                scaler.backward(loss, params)
                opt.step()
                for k, v in {"loss": float(loss.detach()), **parts}.items():
                    sums[k] = sums.get(k, 0.0) + v
                with torch.no_grad():
                    x = ddim_step(d_edit.detach(), eps_from_denoised(x, sigma, d_orig), sigma, sigma_next)
                    x_src = ddim_step(d_src, eps_from_denoised(x_src, sigma, d_src), sigma, sigma_next)
                done += 1
                if callback is not None:
                    callback({"iteration": it, "step": i, "done": done, "total": total, "loss": float(loss.detach()),
                              "x0_edit": d_edit.detach()})
        history.append({**{k: v / (len(starts) * edit_steps) for k, v in sums.items()}, "lr": lr_now})
        if scheduler is not None:
            scheduler.step()
    return history
