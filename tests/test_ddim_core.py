"""DDIM core against closed forms: the alpha-bar textbook form and the exact Gaussian ODE solution."""
import math

import pytest
import torch

from z2i.guidance.ddim import ddim_step, sample_ddim, seeded_noise_sampler
from z2i.guidance.schedules import (alpha_bar_from_sigma, ddim_noise_split, eps_from_denoised, from_vp,
                                    sigma_from_alpha_bar, to_vp)
from z2i.tests.helpers import GaussianDenoiser, alpha_form_ddim



@pytest.fixture(autouse=True)
def float64():
    """Closed-form comparisons in double precision; restored so host tests in the session are unaffected."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


def sd_sigmas(steps: int) -> torch.Tensor:
    """SD1.x's scaled-linear schedule, DDIM 'leading' timesteps (t = 1 + k*1000//steps), then 0."""
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2
    abar = torch.cumprod(1 - betas, 0)
    ts = list(range(1, 1000, 1000 // steps))[::-1]
    return torch.cat([((1 - abar[ts]) / abar[ts]).sqrt(), torch.zeros(1)])


def test_schedule_conversions_roundtrip():
    s = torch.tensor([0.03, 1.0, 14.6])
    assert torch.allclose(sigma_from_alpha_bar(alpha_bar_from_sigma(s)), s)
    x = torch.randn(3, 4, 8, 8)
    assert torch.allclose(from_vp(to_vp(x, s), s), x)
    assert torch.allclose(to_vp(x, s), x / (1 + s * s).sqrt().reshape(3, 1, 1, 1))


def test_noise_split_matches_ddim_sigma_eta():
    """sigma_up/sigma_down equal the VP-form sigma_eta of DDIM Eq. 16 divided by sqrt(a_s)."""
    for eta in (0.0, 0.3, 1.0):
        for s, s_next in ((14.6, 7.0), (1.0, 0.5), (0.2, 0.03)):
            a_t, a_s = 1 / (1 + s * s), 1 / (1 + s_next * s_next)
            sig_eta = eta * math.sqrt((1 - a_s) / (1 - a_t)) * math.sqrt(1 - a_t / a_s)
            down, up = ddim_noise_split(s, s_next, eta)
            assert up == pytest.approx(sig_eta / math.sqrt(a_s), rel=1e-12, abs=1e-15)
            assert down == pytest.approx(math.sqrt(1 - a_s - sig_eta ** 2) / math.sqrt(a_s), rel=1e-12)


def test_ddim_step_equals_alpha_form_with_eta():
    torch.manual_seed(0)
    x = torch.randn(2, 4, 8, 8) * 3
    den = GaussianDenoiser(mu=0.2, s=0.7)
    s, s_next = 3.0, 1.2
    z = torch.randn_like(x)
    for eta in (0.0, 0.5, 1.0):
        d = den(x, torch.tensor(s))
        ours = ddim_step(d, eps_from_denoised(x, s, d), s, s_next, eta=eta, noise=z)
        a_t, a_s = 1 / (1 + s * s), 1 / (1 + s_next * s_next)
        eps_fn = lambda xv, i: eps_from_denoised(x, s, d)  # noqa: E731
        ref_vp = alpha_form_ddim(eps_fn, to_vp(x, s), [a_t, a_s], eta=eta, noises=[z])
        # alpha_form adds s_eta * z in VP units; ours adds sigma_up * z in sigma units; both are the same z
        assert torch.allclose(to_vp(ours, s_next), ref_vp, atol=1e-10), eta


def test_sampler_matches_exact_gaussian_ode_solution():
    """For N(mu, s^2) data the PF-ODE solution is x(sigma) = mu + sqrt(s^2+sigma^2)/sqrt(s^2+sigma0^2) (x0-mu).

    DDIM is a first-order solver, so it converges to it as steps grow; with exact sigma-space Euler on
    this linear ODE the error shrinks roughly linearly in the step count.
    """
    torch.manual_seed(1)
    mu, s = 0.3, 0.5
    x_start = torch.randn(1, 4, 8, 8) * 14.6
    errs = []
    for steps in (25, 100, 400):
        sig = torch.exp(torch.linspace(math.log(14.6), math.log(0.03), steps + 1))
        out = sample_ddim(GaussianDenoiser(mu, s), x_start, sig)
        exact = mu + math.sqrt(s * s + 0.03 ** 2) / math.sqrt(s * s + 14.6 ** 2) * (x_start - mu)
        errs.append(((out - exact).norm() / exact.norm()).item())
    # first order: 4x the steps, about 4x less error; and it does converge to the exact solution
    assert errs[1] < errs[0] / 3 and errs[2] < errs[1] / 3, errs
    assert errs[2] < 5e-3, errs


def test_sampler_is_textbook_ddim_on_sd_schedule():
    torch.manual_seed(2)
    sig = sd_sigmas(25)
    den = GaussianDenoiser(mu=torch.randn(1, 4, 8, 8) * 0.1, s=0.8)
    x = torch.randn(2, 4, 8, 8) * sig[0]
    ours = sample_ddim(den, x, sig)
    abars = [1 / (1 + float(v) ** 2) for v in sig]

    def eps_fn(x_vp, i):
        xk = from_vp(x_vp, sig[i])
        return eps_from_denoised(xk, sig[i], den(xk, sig[i]))

    ref = alpha_form_ddim(eps_fn, to_vp(x, sig[0]), abars)
    assert torch.allclose(ours, ref, atol=1e-9)


def test_eta_sampling_is_seeded():
    sig = sd_sigmas(10)
    x = torch.randn(1, 4, 8, 8) * sig[0]
    den = GaussianDenoiser(0.0, 1.0)
    a = sample_ddim(den, x, sig, extra_args={"seed": 7}, eta=1.0)
    b = sample_ddim(den, x, sig, extra_args={"seed": 7}, eta=1.0)
    c = sample_ddim(den, x, sig, extra_args={"seed": 8}, eta=1.0)
    d = sample_ddim(den, x, sig, extra_args={"seed": 7}, eta=0.0)
    assert torch.equal(a, b)
    assert not torch.allclose(a, c) and not torch.allclose(a, d)


def test_step_rejects_bad_inputs():
    x = torch.zeros(1, 4, 8, 8)
    with pytest.raises(ValueError, match="noise"):
        ddim_step(x, x, 2.0, 1.0, eta=0.5)
    with pytest.raises(ValueError, match="inversion"):
        ddim_step(x, x, 1.0, 2.0, eta=0.5, noise=x)
    with pytest.raises(ValueError, match="eta"):
        ddim_noise_split(1.0, 0.5, -1)


def test_callback_reports_every_step():
    sig = sd_sigmas(10)
    seen = []
    sample_ddim(GaussianDenoiser(), torch.randn(1, 4, 8, 8) * sig[0], sig, callback=lambda d: seen.append(d["i"]))
    assert seen == list(range(10))


def test_noise_sampler_independent_of_device_dtype():
    x = torch.zeros(1, 4, 8, 8, dtype=torch.float32)
    n1 = seeded_noise_sampler(x, 3)(1.0, 0.5)
    n2 = seeded_noise_sampler(x.double(), 3)(1.0, 0.5)
    assert torch.allclose(n1.double(), n2)


class _Reads:
    """Counts reads of tensor values on the host (item, float, int, bool, tolist): on a GPU each one waits for the
    device to finish its queue."""

    NAMES = ("item", "__float__", "__int__", "__bool__", "tolist")

    def __init__(self, monkeypatch):
        self.counts = {n: 0 for n in self.NAMES}
        for name in self.NAMES:
            original = getattr(torch.Tensor, name)

            def counted(t, *a, _name=name, _original=original, **k):
                self.counts[_name] += 1
                return _original(t, *a, **k)

            monkeypatch.setattr(torch.Tensor, name, counted)

    def total(self):
        return sum(self.counts.values())


def test_sampling_loops_read_no_device_value_per_step(monkeypatch):
    """The DDIM and pix2pix-zero loops read their schedule once (one tolist) and no device value per step (issue 28:
    each such read waits for the GPU; core's own samplers compare `sigmas[i + 1] == 0` once a step): the number of
    reads is the same for 3 and for 6 steps, and small."""
    from z2i.guidance.pix2pix_zero import sample_pix2pix_zero
    den = GaussianDenoiser(0.3, 0.8)
    x = torch.randn(2, 4, 8, 8) * 14.6
    reads = _Reads(monkeypatch)
    for run in (lambda sig: sample_ddim(den, x, sig),
                lambda sig: sample_pix2pix_zero(x, sig, None, None, lambda xx, s: den(xx, s), lam=0.0)):
        per = []
        for sigmas in (torch.tensor([14.6, 4.0, 1.0, 0.0]), torch.tensor([14.6, 8.0, 4.0, 2.0, 1.0, 0.5, 0.0])):
            reads.counts = {n: 0 for n in reads.NAMES}
            run(sigmas)
            per.append(reads.total())
            assert reads.counts["tolist"] == 1, reads.counts
        assert per[0] == per[1] <= 3, per
