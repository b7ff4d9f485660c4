"""Guidance losses on captured quantities (pure torch)."""
from __future__ import annotations

import torch


def cross_attention_loss(edit: dict, reference: dict) -> torch.Tensor:
    """pix2pix-zero L_xa (Eq. 5, as the official code reduces it): squared L2 distance of the cross-attention
    maps, summed over query positions and tokens, averaged over batch and heads, summed over layers.

    `edit` and `reference` map a key (site, cond index) to maps [b, heads, Nq, Nk]; keys missing from the
    reference are skipped. The reference is treated as a constant.
    """
    total = None
    for key, m_edit in edit.items():
        m_ref = reference.get(key)
        if m_ref is None:
            continue
        d = (m_edit.float() - m_ref.detach().float().to(m_edit.device)).pow(2).sum(dim=(-2, -1)).mean()
        total = d if total is None else total + d
    if total is None:
        raise ValueError("no cross-attention maps in common between the edit and the reference pass")
    return total
