"""CSG math against the paper's VP-form equations, computed by hand on a closed-form denoiser."""
import math

import pytest
import torch

from z2i.attention_patches.csg_mask import content_mask
from z2i.guidance.csg import (align_tokens, background_gate, csg_step, gamma_vp, omega, pull_coefficient,
                              token_positions)
from z2i.guidance.schedules import to_vp
from z2i.tests.helpers import GaussianDenoiser


def test_csg_step_equals_eq18_by_hand():
    torch.manual_seed(0)
    den = GaussianDenoiser(mu=0.1, s=0.9)
    for sigma, sigma_next in ((14.6, 9.0), (2.0, 1.5), (0.3, 0.0)):
        x = torch.randn(2, 4, 8, 8, dtype=torch.float64) * sigma
        x_src = torch.randn(2, 4, 8, 8, dtype=torch.float64) * sigma
        bg = torch.rand(2, 8, 8, dtype=torch.float64)
        om = omega(bg, 15.0, step=3, steps=10)
        d = den(x, torch.tensor(sigma, dtype=torch.float64))
        ours = csg_step(x, sigma, sigma_next, d, x_src, om)
        # Eq. 18 in the VP form, alpha-bars from the sigmas, Eq. 6 for gamma
        a_t, a_s = 1 / (1 + sigma ** 2), 1 / (1 + sigma_next ** 2)
        xt, xs = to_vp(x, sigma), to_vp(x_src, sigma)
        eps = (xt - math.sqrt(a_t) * to_vp(d, 0.0)) / math.sqrt(1 - a_t)
        ddim = math.sqrt(a_s) * (xt - math.sqrt(1 - a_t) * eps) / math.sqrt(a_t) + math.sqrt(1 - a_s) * eps
        gamma = math.sqrt(a_s / a_t) - math.sqrt((1 - a_s) / (1 - a_t))
        ref_vp = ddim - gamma * om[:, None] * (xt - xs)
        assert torch.allclose(to_vp(ours, sigma_next), ref_vp, atol=1e-9), (sigma, sigma_next)
        assert gamma_vp(sigma, sigma_next) * math.sqrt(1 + sigma_next ** 2) / math.sqrt(1 + sigma ** 2) == \
            pytest.approx(pull_coefficient(sigma, sigma_next))


def test_zero_omega_is_plain_ddim():
    x, xs = torch.randn(1, 4, 8, 8), torch.randn(1, 4, 8, 8)
    d = GaussianDenoiser()(x, torch.tensor(2.0))
    plain = d + 1.0 * (x - d) / 2.0
    assert torch.allclose(csg_step(x, 2.0, 1.0, d, xs, torch.zeros(1, 8, 8)), plain, atol=1e-6)


def test_background_gate_schedule():
    p = torch.linspace(0, 1, 11)
    assert torch.equal(background_gate(p, 0, 50), torch.ones(11))           # threshold 0 at the start
    late = background_gate(p, 49, 50)
    assert late.sum() == 1 and late[-1] == 1                                 # threshold capped at 1 at the end
    mid = background_gate(p, 25, 50)
    assert 0 < mid.sum() < 11 and torch.all(mid[1:] >= mid[:-1])            # monotone in P


def test_token_positions_and_alignment():
    assert token_positions([1, 5, 6, 7, 2], [6, 7]) == [2, 3]
    assert token_positions([1, 5, 6, 2], [9]) == []
    same = align_tokens([1, 5, 6, 7, 2], [1, 5, 9, 7, 2])
    assert same.tolist() == [0, 1, 2, 3, 4]
    longer = align_tokens([1, 5, 6, 7, 2], [1, 5, 8, 9, 7, 2])               # "cat" -> a two-token word
    assert longer.tolist() == [0, 1, 2, 2, 3, 4]
    shorter = align_tokens([1, 5, 6, 8, 7, 2], [1, 5, 9, 7, 2], length=8)
    assert shorter.tolist()[:5] == [0, 1, 2, 4, 5] and len(shorter) == 8


def test_content_mask_is_self_attention_times_word_map():
    m = torch.zeros(1, 2, 2)
    m[0, 0, 0] = 1
    a = torch.full((1, 4, 4), 0.25)
    assert torch.allclose(content_mask(m, a), torch.full((1, 2, 2), 0.25))
    assert torch.equal(content_mask(m, torch.eye(4)[None]), m)
