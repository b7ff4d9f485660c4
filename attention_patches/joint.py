"""The attention-controller protocol on an MMDiT (SD3): joint attention as cross- and self-attention.

An MMDiT joint block (comfy/ldm/modules/diffusionmodules/mmdit.py, `_block_mixing`) concatenates the text
tokens and the image tokens and runs one attention over [text; image] queries and keys, one softmax per row.
For an image query the row splits into two blocks:

    P[img, :] = [ P_it | P_ii ],   P_it = P[n_txt:, :n_txt] (image -> text),  P_ii = P[n_txt:, n_txt:]

P_it stands in for a UNet's cross-attention map (pix2pix-zero Eq. 4, CSG Eq. 11-13): it is what the image
attends to in the prompt. It is handed to the controllers of the call under CALL_KEY exactly as it is in the
softmax (its rows sum to the image query's text mass, below 1). P_ii stands in for a UNet's self-attention map:
the controllers of the call under SELF_CALL_KEY see it renormalised per row (P_ii / sum(P_ii)), the image
query's attention given that it looks at the image, so it averages like a self-attention map (CSG Eq. 11).

A controller that rewrites P_it (CSG's mixup) changes the image rows only: the new block is rescaled per row to
the text mass the row had (so P_ii keeps its probabilities and every row still sums to 1), the image rows'
output is computed from the new probabilities, and the text rows' output is the host kernel's. Where the
controllers only read, the layer's output is the host kernel's (or another pack's override's).

Hooks, both in ComfyUI 0.3.75 and 0.8.0 (shared/design/comfyui-internals.md):
- `joint_block`, a "dit" ("double_block", i) replace: puts (i, n_txt) into a copy of the block's transformer
  options, so the attention call inside knows its site; it also hands the block's image-stream output to a
  FeatureCall (pix2pix-zeroCon's features) and to an h-space call at the middle joint block (Asyrp). It is
  composed over another pack's replace at the same block (that function runs the block; it receives the copy).
- `joint_attention`, an `optimized_attention_override`: computes the maps and hands them to the controllers;
  composed over another pack's override (which keeps producing the output where Z2I only reads).
Both are plain functions (functools.partial over the block index and the function they wrap), stateless: the
per-call objects live in the transformer options of one model call, as for the UNet's patches.
"""
from __future__ import annotations

import functools
import logging
from typing import Optional

import torch

from ..guidance.autograd import recomputing
from .controller import CALL_KEY, SELF_CALL_KEY, AttentionCall, call_conds, hand_maps, hand_means
from .features import FEATURE_KEY, FeatureCall, store_features
from .probs import split_heads
from .sites import Site

JOINT_KEY = "z2i_joint_block"          # (block index, number of text tokens) for the attention inside a joint block
HSPACE_KEY = "z2i_hspace_call"         # guidance.hspace.HSPACE_KEY (the same per-call object as on a UNet)
OVERRIDE = "optimized_attention_override"
PATCH = 2                              # SD3's patch size: an image token covers 2 x 2 latent positions


def middle_block(n_blocks: int) -> int:
    """The joint block whose image-stream output is Asyrp's h-space on an MMDiT: the middle one, (n - 1) // 2,
    so at least half of the blocks run on the edited stream."""
    return max(0, (n_blocks - 1) // 2)


def joint_block(args: dict, extra: dict, index: int, inner=None, n_blocks: int = 0) -> dict:
    """ComfyUI "dit" ("double_block", index) replace (see the module docstring)."""
    to = args.get("transformer_options") or {}
    n_txt = int(args["txt"].shape[1]) if args.get("txt") is not None else 0
    to = {**to, JOINT_KEY: (index, n_txt)}
    args = {**args, "transformer_options": to}
    out = inner(args, extra) if inner is not None else extra["original_block"](args)
    img = out["img"]
    hcall = to.get(HSPACE_KEY)
    if hcall is not None and index == middle_block(n_blocks):
        out = {**out, "img": _apply_hspace(hcall, img, to)}
        img = out["img"]
    feats: Optional[FeatureCall] = to.get(FEATURE_KEY)
    if feats is not None:
        site = Site("joint", index, 0)
        hw = _image_hw(feats.latent_hw, img.shape[1])
        if (feats.sites is None or site in feats.sites) and hw is not None and not recomputing():
            store_features(feats, site, img, hw, call_conds(to))
    return out


def _image_hw(latent_hw, n_img: int) -> Optional[tuple]:
    """(h, w) of the patch grid of n_img image tokens; None when they are not the full latent's (an area crop)."""
    if latent_hw is None:
        side = int(round(n_img ** 0.5))
        return (side, n_img // side) if side * (n_img // side) == n_img else None
    h, w = (int(latent_hw[0]) + PATCH - 1) // PATCH, (int(latent_hw[1]) + PATCH - 1) // PATCH
    return (h, w) if h * w == n_img else None


def _apply_hspace(hcall, img: torch.Tensor, to: dict) -> torch.Tensor:
    """The image stream [b, N, C] as an image-shaped h [b, C, h, w] for the h-space call, and back."""
    b, n, c = img.shape
    hw = _image_hw(getattr(hcall, "latent_hw", None), n)
    if hw is None:
        return img
    h = img.transpose(1, 2).reshape(b, c, *hw)
    h = hcall.apply(h, to)
    return h.reshape(b, c, n).transpose(1, 2)


def joint_attention(func, q, k, v, *args, inner=None, **kwargs):
    """ComfyUI `optimized_attention_override` (called as override(func, q, k, v, heads=..., ...))."""
    to = kwargs.get("transformer_options") or {}
    plain = (lambda: inner(func, q, k, v, *args, **kwargs)) if inner is not None else \
        (lambda: func(q, k, v, *args, **kwargs))
    joint = to.get(JOINT_KEY)
    call: Optional[AttentionCall] = to.get(CALL_KEY)
    self_call: Optional[AttentionCall] = to.get(SELF_CALL_KEY)
    if joint is None or (call is None and self_call is None) or kwargs.get("skip_reshape") or \
            kwargs.get("skip_output_reshape") or kwargs.get("mask") is not None or q.ndim != 3:
        return plain()
    index, n_txt = joint
    n_img = q.shape[1] - n_txt
    if n_img <= 0 or k.shape[1] != q.shape[1]:
        return plain()          # not the joint attention (SD3.5's image-only second attention, say)
    heads = kwargs["heads"] if "heads" in kwargs else args[0]
    site = Site("joint", int(index), 0)
    cross = _wanted(call, site, n_img)
    selfs = _wanted(self_call, site, n_img)
    if not cross and not selfs:
        return plain()
    cou = call_conds(to)
    v3 = v.reshape(v.shape[0], v.shape[1], -1)
    if selfs and all(c.head_mean_only for c in selfs):
        hand_means(image_block_mean(q, k, heads, n_txt), cou, selfs, site, self_call)
        selfs = []
    if selfs:            # a reader of the whole image-to-image block (no Z2I controller is one; kept general)
        block = image_row_probs(q, k, heads, n_txt)[..., n_txt:]
        hand_maps(block / block.sum(-1, keepdim=True).clamp_min(1e-30), cou, selfs, site, self_call)
    if not cross:
        return plain()
    text = image_text_probs(q, k, heads, n_txt)                     # [b, h, n_img, n_txt] fp32
    new, changed = hand_maps(text, cou, cross, site, call)
    if not changed:
        return plain()
    new = new.to(text)
    new = new * (text.sum(-1, keepdim=True) / new.sum(-1, keepdim=True).clamp_min(1e-30))
    out = plain()
    img = image_rows_output(q, k, v3, heads, n_txt, new).to(out.dtype)
    if inner is not None and (id(call), site) not in _WARNED:
        _WARNED.add((id(call), site))
        logging.warning("Z2I: the joint attention's image-to-text maps at %s are rewritten (CSG mixup), so another "
                        "pack's attention override is not applied to its image rows in this call", site)
    return torch.cat([out[:, :n_txt], img], 1)


_WARNED: set = set()


def _wanted(call: Optional[AttentionCall], site: Site, n_img: int) -> list:
    if call is None or not call.controllers or (call.sites is not None and site not in call.sites):
        return []
    hw = _image_hw(call.latent_hw, n_img)
    if hw is None:
        return []                # an area-conditioned crop (another token count): plain attention
    return [c for c in call.controllers if c.wants(site, hw, call)]


def image_row_probs(q: torch.Tensor, k: torch.Tensor, heads: int, n_txt: int) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) in float32 for the image queries over every key: [b, h, n_img, n_txt + n_img]."""
    qh, kh = split_heads(q[:, n_txt:], heads).float(), split_heads(k, heads).float()
    return torch.softmax(qh @ kh.transpose(-1, -2) * qh.shape[-1] ** -0.5, dim=-1)


def _head_rows(q: torch.Tensor, k: torch.Tensor, heads: int, n_txt: int):
    """(head index, that head's softmax rows of the image queries over every key [b, n_img, n_txt + n_img] float32),
    one head at a time: the readers below hold one head's full rows, never every head's."""
    qh, kh = split_heads(q[:, n_txt:], heads), split_heads(k, heads)
    scale = qh.shape[-1] ** -0.5
    for h in range(heads):
        yield h, torch.softmax(qh[:, h].float() @ kh[:, h].float().transpose(-1, -2) * scale, dim=-1)


def image_text_probs(q: torch.Tensor, k: torch.Tensor, heads: int, n_txt: int) -> torch.Tensor:
    """The image-to-text block of the joint softmax, [b, h, n_img, n_txt] float32."""
    return torch.stack([p[..., :n_txt] for _, p in _head_rows(q, k, heads, n_txt)], 1)


def image_rows_output(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, n_txt: int,
                      text: torch.Tensor) -> torch.Tensor:
    """The image queries' attention output [b, n_img, h*d] (float32) with their image-to-text block replaced by
    `text` [b, h, n_img, n_txt] and their image-to-image block as the softmax gives it."""
    vh = split_heads(v, heads)
    outs = []
    for h, p in _head_rows(q, k, heads, n_txt):
        vf = vh[:, h].float()
        outs.append(text[:, h].float() @ vf[:, :n_txt] + p[..., n_txt:] @ vf[:, n_txt:])
    out = torch.stack(outs, 1)                                      # [b, h, n_img, d]
    b, h, n, d = out.shape
    return out.transpose(1, 2).reshape(b, n, h * d)


def image_block_mean(q: torch.Tensor, k: torch.Tensor, heads: int, n_txt: int) -> torch.Tensor:
    """The image->image block of the joint softmax, renormalised per row and averaged over heads: [b, n_img, n_img]
    float32 (attention_patches.probs.head_mean for the joint layout)."""
    total = None
    for _, p in _head_rows(q, k, heads, n_txt):
        p = p[..., n_txt:]
        p = p / p.sum(-1, keepdim=True).clamp_min(1e-30)
        total = p if total is None else total.add_(p)
    return total.div_(heads)


def is_own(fn) -> bool:
    return isinstance(fn, functools.partial) and fn.func in (joint_block, joint_attention)


def block_over(existing, index: int, n_blocks: int):
    """The "dit" ("double_block", index) replace to install where the current one is `existing` (None: none)."""
    if is_own(existing):
        return existing
    return functools.partial(joint_block, index=index, inner=existing, n_blocks=n_blocks)


def attention_over(existing):
    """The optimized_attention_override to install where the current one is `existing` (None: none)."""
    if is_own(existing):
        return existing
    return functools.partial(joint_attention, inner=existing)


def with_joint_patches(model_options: dict, n_blocks: int) -> dict:
    """A copy of model options with Z2I's joint-block replaces and attention override, composed over others'."""
    mo = dict(model_options or {})
    to = dict(mo.get("transformer_options") or {})
    replace = dict(to.get("patches_replace") or {})
    dit = dict(replace.get("dit") or {})
    for i in range(n_blocks):
        dit[("double_block", i)] = block_over(dit.get(("double_block", i)), i, n_blocks)
    replace["dit"] = dit
    to["patches_replace"] = replace
    to[OVERRIDE] = attention_over(to.get(OVERRIDE))
    mo["transformer_options"] = to
    return mo


def foreign_joint_patches(model_options: dict, n_blocks: int) -> bool:
    """Whether another pack replaced Z2I's joint patches after they were installed (so they must be composed
    again for a run)."""
    to = (model_options or {}).get("transformer_options") or {}
    dit = (to.get("patches_replace") or {}).get("dit") or {}
    return not is_own(to.get(OVERRIDE)) or any(not is_own(dit.get(("double_block", i))) for i in range(n_blocks))


__all__ = ["JOINT_KEY", "joint_block", "joint_attention", "with_joint_patches", "image_row_probs",
           "image_block_mean", "middle_block", "foreign_joint_patches"]
