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


def head_mean(q: torch.Tensor, k: torch.Tensor, heads: int) -> torch.Tensor:
    """attention_probs(q, k, heads).mean(1) -> [b, Nq, Nk] in float32, computed one head at a time: holds two
    [b, Nq, Nk] maps instead of heads + 1 (the heads are summed in order, then divided by their number)."""
    qh, kh = split_heads(q, heads), split_heads(k, heads)
    scale = 1.0 / math.sqrt(qh.shape[-1])
    total = None
    for h in range(heads):
        p = torch.softmax(qh[:, h].float() @ kh[:, h].float().transpose(-1, -2) * scale, dim=-1)
        total = p if total is None else total.add_(p)
    return total.div_(heads)


def apply_probs(probs: torch.Tensor, v: torch.Tensor, heads: int) -> torch.Tensor:
    """probs [b, h, Nq, Nk] @ v -> [b, Nq, h*d] in v's dtype."""
    vh = split_heads(v, heads)
    out = probs.to(torch.float32) @ vh.float()
    b, h, n, d = out.shape
    return out.transpose(1, 2).reshape(b, n, h * d).to(v.dtype)


def attention_with_probs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int):
    probs = attention_probs(q, k, heads)
    return apply_probs(probs, v, heads), probs


def is_periodic(m: torch.Tensor, period: int, rtol: float = 1e-5) -> bool:
    """Whether maps [..., Nk] repeat every `period` tokens: core pads a shorter prompt batched with a longer
    one by repeating its context (which leaves attention's output unchanged), so its maps repeat, each copy
    holding 1/r of a token's probability."""
    n = m.shape[-1]
    if period <= 0 or n % period or n == period:
        return n == period
    first = m[..., :period]
    return all(torch.allclose(m[..., i:i + period], first, rtol=rtol, atol=1e-8) for i in range(period, n, period))


def match_tokens(m: torch.Tensor, n: int, like: torch.Tensor = None) -> torch.Tensor:
    """Maps [..., Nk] brought to n tokens, so maps of prompts of different lengths can be compared or mixed.

    Longer (Nk > n): maps of a repeat-padded context fold back exactly (each token's copies summed); otherwise
    the first n tokens are kept (the first 77-token chunk, where the shorter prompt's tokens are) and rows
    renormalised. Shorter (Nk < n): when `like` (the maps they will be mixed with) is repeat-padded, each
    token's probability is spread over its copies as core's padding does; otherwise zero-padded (the extra
    tokens get no attention)."""
    k = m.shape[-1]
    if k == n:
        return m
    if k > n:
        if is_periodic(m, n):
            return m.reshape(*m.shape[:-1], k // n, n).sum(-2)
        head = m[..., :n]
        return head / head.sum(-1, keepdim=True).clamp_min(1e-12)
    if like is not None and is_periodic(like, k):
        return m.repeat(*([1] * (m.ndim - 1)), n // k) / (n // k)
    return torch.nn.functional.pad(m, (0, n - k))


def head_mean_apply(q: torch.Tensor, k: torch.Tensor, heads: int, m: torch.Tensor, chunk: int = 1024) -> torch.Tensor:
    """head_mean(q, k, heads) @ m without the [Nq, Nk] map: for m [b, Nk, c] -> [b, Nq, c] in float32, one head and
    `chunk` queries at a time (memory linear in the token counts: a [chunk, Nk] block at a time). Equal to
    head_mean(q, k, heads) @ m to float rounding (the same softmax, summed in another order)."""
    qh, kh = split_heads(q, heads), split_heads(k, heads)
    scale = 1.0 / math.sqrt(qh.shape[-1])
    m = m.float()
    out = None
    for h in range(heads):
        kt = kh[:, h].float().transpose(-1, -2)
        parts = [torch.softmax(qh[:, h, i:i + chunk].float() @ kt * scale, dim=-1) @ m
                 for i in range(0, qh.shape[2], chunk)]
        part = torch.cat(parts, dim=1)
        out = part if out is None else out.add_(part)
    return out.div_(heads)

