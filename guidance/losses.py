"""Guidance losses on captured quantities (pure torch)."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from ..attention_patches.probs import match_tokens


def cross_attention_loss(edit: dict, reference: dict) -> torch.Tensor:
    """pix2pix-zero L_xa (Eq. 5): squared L2 distance of the cross-attention maps, summed over query positions
    and tokens, averaged over heads (the official code averages over its rows, heads x CFG halves: the code form
    of guidance.pix2pix_zero halves each branch's loss to match), summed over the batch and over layers. Summing
    over the batch gives each image the gradient it would get alone.

    `edit` and `reference` map a key (site, cond index) to maps [b, heads, Nq, Nk]; keys missing from the
    reference are skipped. The reference is treated as a constant. Maps over different token counts (prompts of
    different lengths, batched by core with repeat padding) are compared on the shorter count
    (attention_patches.probs.match_tokens: repeat padding folded back exactly, else the first chunk).
    """
    total = None
    for key, m_edit in edit.items():
        m_ref = reference.get(key)
        if m_ref is None:
            continue
        m_ref = m_ref.detach()
        if m_ref.shape[-1] != m_edit.shape[-1]:          # prompts of different lengths (probs.match_tokens)
            n = min(m_ref.shape[-1], m_edit.shape[-1])
            m_edit, m_ref = match_tokens(m_edit, n), match_tokens(m_ref, n)
        d = (m_edit.float() - m_ref.float().to(m_edit.device)).pow(2).sum(dim=(-2, -1)).mean(dim=-1).sum()
        total = d if total is None else total + d
    if total is None:
        raise ValueError("no cross-attention maps in common between the edit and the reference pass")
    return total


def patch_nce_loss(reference: dict, edit: dict, n_patches: int = 256, tau: float = 0.07, scales=(1, 2),
                   generator: Optional[torch.Generator] = None, ids: Optional[dict] = None) -> torch.Tensor:
    """PatchNCE (pix2pix-zeroCon Eq. 15-16, CUT/CDS form), summed over layers and scales; per image the mean
    over its drawn locations, summed over the batch (each image's gradient is what it would be alone).

    For each layer, features [b, N, C] with their (h, w) are average-pooled by each scale, L2-normalised per
    location, and `n_patches` locations are drawn (the same for both sides). The query is the reference (source)
    feature at a location, the positive the edited feature at the same location, the negatives the edited
    features at the other drawn locations: cross-entropy over logits q_i . e_j / tau with targets on the diagonal.
    The reference side is a constant. `ids` (optional dict): locations drawn for a (layer, scale) are stored
    there and reused when the key is already present, so two passes of one step share them.
    """
    total = None
    for key, (f_edit, hw) in edit.items():
        if key not in reference:
            continue
        f_ref = reference[key][0].detach()
        for s in scales:
            sel = None
            for b in range(f_edit.shape[0]):    # image by image: each gets exactly the arithmetic it gets alone
                e = _pool(f_edit[b:b + 1].float(), hw, s)
                r = _pool(f_ref[b:b + 1].float().to(f_edit.device), hw, s)
                e, r = F.normalize(e, dim=-1), F.normalize(r, dim=-1)
                n = e.shape[1]
                k = min(n_patches, n)
                if sel is None:
                    if ids is not None and (key, s) in ids:
                        sel = ids[(key, s)]
                    else:
                        sel = torch.randperm(n, generator=generator)[:k].to(e.device)
                        if ids is not None:
                            ids[(key, s)] = sel
                q, pos = r[0].index_select(0, sel), e[0].index_select(0, sel)
                logits = q @ pos.transpose(0, 1) / tau                  # [k, k]
                loss = F.cross_entropy(logits, torch.arange(k, device=e.device), reduction="sum") / k
                total = loss if total is None else total + loss
    if total is None:
        raise ValueError("no features in common between the edit and the reference pass")
    return total


def _pool(f: torch.Tensor, hw, s: int) -> torch.Tensor:
    if s == 1:
        return f
    b, n, c = f.shape
    h, w = hw
    if h * w != n or h < s or w < s:
        return f
    g = f.transpose(1, 2).reshape(b, c, h, w)
    g = F.avg_pool2d(g, s)
    return g.reshape(b, c, -1).transpose(1, 2)
