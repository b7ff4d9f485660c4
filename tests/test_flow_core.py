"""The DDIM step and DDIM inversion on rectified flow (SD3's form), against closed forms (pure torch).

State x = (1 - sigma) x0 + sigma eps, sigma in [0, 1] (guidance.schedules.FLOW). For data x0 ~ N(mu, s^2 I) the
exact denoiser and the probability-flow ODE's solution are closed forms, so inversion is checked against exact
values as on the DDPM schedule: the reconstruction and ODE tests run on both forms in tests/test_inversion_core.py.
"""
import math

import pytest
import torch

from z2i.guidance.ddim import ddim_step, flow_ddim_step
from z2i.guidance.inversion import sample_ddim_invert
from z2i.guidance.schedules import FLOW, VE, noise_form_of
from z2i.tests.helpers import FlowGaussianDenoiser, flow_grid

pytestmark = pytest.mark.usefixtures("float64")


def test_the_flow_ddim_step_is_the_euler_step_of_the_flow_ode():
    """With the model's own x0 and eps, eta 0: x + (sigma' - sigma) v, v = (x - D) / sigma (ComfyUI's CONST
    denoiser D = x - sigma v)."""
    g = torch.Generator().manual_seed(0)
    x, d = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    for sigma, nxt in ((1.0, 0.8), (0.7, 0.3), (0.3, 0.0), (0.2, 0.6)):
        eps = FLOW.eps(x, sigma, d)
        v = (x - d) / sigma
        assert torch.allclose(ddim_step(d, eps, sigma, nxt, form=FLOW), x + (nxt - sigma) * v, rtol=0, atol=1e-12)


def test_flow_step_with_eta_is_the_ve_step_in_other_units():
    """Divided by 1 - sigma a flow state is the VE state at s = sigma / (1 - sigma); the stochastic step agrees
    with the VE one there, and stays finite from pure noise (sigma = 1, where s is infinite)."""
    g = torch.Generator().manual_seed(1)
    x0, eps, z = (torch.randn(1, 4, 8, 8, generator=g) for _ in range(3))
    for sigma, nxt in ((0.9, 0.5), (0.5, 0.2)):
        s, s_next = sigma / (1 - sigma), nxt / (1 - nxt)
        ve = ddim_step(x0, eps, s, s_next, eta=0.7, noise=z)
        flow = flow_ddim_step(x0, eps, sigma, nxt, eta=0.7, noise=z)
        assert torch.allclose(flow / (1 - nxt), ve, rtol=0, atol=1e-12)
    top = flow_ddim_step(x0, eps, 1.0, 0.5, eta=0.7, noise=z)
    limit = 0.5 * x0 + 0.5 * (math.sqrt(1 - 0.49) * eps + 0.7 * z)      # q = s'/s = 0 at the top
    assert torch.allclose(top, limit, rtol=0, atol=1e-12)
    with pytest.raises(ValueError):
        flow_ddim_step(x0, eps, 0.2, 0.5, eta=0.5, noise=z)


def test_diffusers_variant_is_refused_on_flow():
    with pytest.raises(ValueError, match="rectified flow"):
        sample_ddim_invert(FlowGaussianDenoiser(), torch.zeros(1, 4, 8, 8), flow_grid(5), variant="diffusers")


class _EPS:           # the host's definitions of the state (comfy/model_sampling.py), for the form detection
    def noise_scaling(self, sigma, noise, latent_image, max_denoise=False):
        return noise * (torch.sqrt(1.0 + sigma ** 2.0) if max_denoise else sigma.reshape(-1, 1, 1, 1)) + latent_image


class _CONST:
    def noise_scaling(self, sigma, noise, latent_image, max_denoise=False):
        s = sigma.reshape(-1, 1, 1, 1)
        return s * noise + (1.0 - s) * latent_image


class _EDM:
    def noise_scaling(self, sigma, noise, latent_image, max_denoise=False):
        return noise * sigma.reshape(-1, 1, 1, 1) * 0.5 + latent_image


def test_noise_form_is_read_off_the_hosts_noise_scaling():
    assert noise_form_of(_EPS()) is VE and noise_form_of(_CONST()) is FLOW
    assert noise_form_of(_EDM()) is None and noise_form_of(object()) is None
