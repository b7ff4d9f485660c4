"""Cross-attention with its probabilities: softmax(Q K^T / sqrt(d)) per head, in fp32 (pix2pix-zero Eq. 4).

ComfyUI's optimised kernels never materialise the probabilities, so a replace patch that must read or edit
them recomputes attention itself. `attention_with_probs` returns the same output as the optimised attention
(to float rounding) together with the maps; `apply_probs` finishes attention from (possibly edited) maps.
Layout follows ComfyUI's attention_basic: q [b, Nq, h*d], k/v [b, Nk, h*d] -> probs [b, h, Nq, Nk].
"""
from __future__ import annotations

import math

import torch


def split_heads(t: torch.Tensor, heads: int) -> torch.Tensor:
    b, n, hd = t.shape
    if hd % heads:
        raise ValueError(f"width {hd} is not divisible by {heads} heads")
    return t.reshape(b, n, heads, hd // heads).transpose(1, 2)


def attention_probs(q: torch.Tensor, k: torch.Tensor, heads: int) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) in float32: [b, h, Nq, Nk]; each row sums to 1 over the keys (tokens)."""
    qh, kh = split_heads(q, heads).float(), split_heads(k, heads).float()
    scale = 1.0 / math.sqrt(qh.shape[-1])
    return torch.softmax(qh @ kh.transpose(-1, -2) * scale, dim=-1)


def apply_probs(probs: torch.Tensor, v: torch.Tensor, heads: int) -> torch.Tensor:
    """probs [b, h, Nq, Nk] @ v -> [b, Nq, h*d] in v's dtype."""
    vh = split_heads(v, heads)
    out = probs.to(torch.float32) @ vh.float()
    b, h, n, d = out.shape
    return out.transpose(1, 2).reshape(b, n, h * d).to(v.dtype)


def attention_with_probs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int):
    probs = attention_probs(q, k, heads)
    return apply_probs(probs, v, heads), probs
