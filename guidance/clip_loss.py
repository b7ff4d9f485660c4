"""CLIP losses on decoded images, for text-driven edits (pure torch; any open_clip-like model).

Two published forms (shared/design/algorithms.md sections 1.4 and 3.3):

- Asyrp Eq. 4 / Eq. 7 (the StyleGAN-NADA directional loss):
      L_direction = 1 - cos(E_I(x_edit) - E_I(x_src), E_T(y_tgt) - E_T(y_src))
- AGG App. B Eq. 21-22 (DiffuseIT's text loss):
      l_CLIP = -cos(v_trg, v_src),  v_trg = E_T(d_trg) + lambda_i E_I(x_src) - lambda_s E_T(d_src)  (normalised),
                                    v_src = E_I(aug(x0_hat))
  with lambda_i = 0.2, lambda_s = 0.4 [AGG code] and `aug` = random cutouts (seeded here). The pixel-space
  "noisy aug" of the AGG code (mixing x0_hat with x_t) has no meaning for a latent model and is left out.

Embeddings are L2-normalised before they are subtracted, as in the authors' code. Images are [B, 3, H, W] in
[0, 1]; `ClipEncoder` resizes and normalises them differentiably for the CLIP image tower.
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


class ClipEncoder:
    """Differentiable image/text encoding around an open_clip model (encode_image / encode_text) and its
    tokenizer. The model's weights are frozen by the caller; gradients flow to the images only."""

    def __init__(self, model, tokenizer: Callable, image_size: int, mean: Sequence[float] = OPENAI_MEAN,
                 std: Sequence[float] = OPENAI_STD, name: str = "open_clip"):
        self.model, self.tokenizer, self.image_size, self.name = model, tokenizer, int(image_size), name
        self.mean, self.std = tuple(float(m) for m in mean), tuple(float(s) for s in std)

    def __deepcopy__(self, memo):       # a loaded model: shared, never copied by ComfyUI's caches
        return self

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        x = images.float()
        if x.shape[-2:] != (self.image_size, self.image_size):
            x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bicubic", align_corners=False,
                              antialias=True)
        # built per call: a tensor kept from the loader would be an inference tensor inside ComfyUI
        mean = torch.tensor(self.mean, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, device=x.device).view(1, 3, 1, 1)
        return (x - mean) / std

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        x = self.preprocess(images.to(self.device))
        return F.normalize(self.model.encode_image(x).float(), dim=-1)

    @torch.no_grad()
    def encode_text(self, texts: Sequence[str]) -> torch.Tensor:
        tokens = self.tokenizer(list(texts)).to(self.device)
        return F.normalize(self.model.encode_text(tokens).float(), dim=-1)

    def text_direction(self, source: str, target: str) -> torch.Tensor:
        """Delta T = E_T(target) - E_T(source), normalised [1, D]."""
        e = self.encode_text([source, target])
        return F.normalize(e[1:] - e[:1], dim=-1)


def directional_loss(e_edit: torch.Tensor, e_src: torch.Tensor, text_dir: torch.Tensor) -> torch.Tensor:
    """Asyrp Eq. 4: mean over the batch of 1 - cos(E_I(edit) - E_I(src), Delta T). Inputs normalised."""
    delta_i = e_edit - e_src
    return (1 - F.cosine_similarity(delta_i, text_dir.to(delta_i).expand_as(delta_i), dim=-1, eps=1e-8)).mean()


def cutouts(images: torch.Tensor, n: int, size: int, generator: Optional[torch.Generator] = None,
            min_frac: float = 0.5) -> torch.Tensor:
    """n random square crops per image (side min_frac..1 of the short side), resized to size: [n * B, 3, s, s].
    With n == 0 the whole image is returned resized."""
    b, _, h, w = images.shape
    if n <= 0:
        return F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    short = min(h, w)
    out = []
    for _ in range(n):
        frac = float(torch.empty(()).uniform_(min_frac, 1.0, generator=generator))
        side = max(1, int(round(short * frac)))
        top = int(torch.randint(0, h - side + 1, (), generator=generator))
        left = int(torch.randint(0, w - side + 1, (), generator=generator))
        crop = images[:, :, top:top + side, left:left + side]
        out.append(F.interpolate(crop, size=(size, size), mode="bilinear", align_corners=False, antialias=True))
    return torch.cat(out)


def agg_target_vector(e_src_image: torch.Tensor, t_src: torch.Tensor, t_trg: torch.Tensor,
                      lambda_i: float = 0.2, lambda_s: float = 0.4) -> torch.Tensor:
    """AGG Eq. 22: v_trg = normalise(E_T(d_trg) + lambda_i E_I(x_src) - lambda_s E_T(d_src)), per image."""
    return F.normalize(t_trg + lambda_i * e_src_image - lambda_s * t_src, dim=-1)


def agg_clip_loss(encoder: ClipEncoder, images: torch.Tensor, v_trg: torch.Tensor, n_cuts: int = 8,
                  generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """AGG Eq. 21: -cos(v_trg, E_I(cutout(x0_hat))), a mean over each image's cutouts, summed over the images
    (an image's gradient does not depend on the batch size; the authors' code is batch 1)."""
    b = images.shape[0]
    crops = cutouts(images, n_cuts, encoder.image_size, generator)
    e = encoder.encode_image(crops)                              # [n * B, D], cutout-major
    v = v_trg.to(e).expand(b, -1).repeat(max(1, n_cuts), 1)
    return -F.cosine_similarity(e, v, dim=-1).view(max(1, n_cuts), b).mean(0).sum()
