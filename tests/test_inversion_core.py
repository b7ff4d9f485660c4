"""DDIM inversion against closed forms, and the pix2pix-zero noise regulariser."""
import math

import pytest
import torch
import torch.nn.functional as F

from z2i.guidance.ddim import sample_ddim
from z2i.guidance.inversion import Trajectory, sample_ddim_invert
from z2i.guidance.regularizers import auto_corr_loss, kl_divergence, regularize_noise
from z2i.tests.helpers import FlowGaussianDenoiser, GaussianDenoiser, flow_grid


@pytest.fixture(autouse=True)
def float64():
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


def sd_grid(steps):
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000) ** 2
    abar = torch.cumprod(1 - betas, 0)
    table = ((1 - abar) / abar).sqrt()
    ts = list(range(1, 1000, 1000 // steps))
    return torch.cat([torch.zeros(1), table[ts]]), float(table[0])   # ascending, from the clean latent


class TimeOnlyEps:
    """D(x, sigma) = x - sigma * e(sigma): the exact x0 estimate of a model whose noise depends only on t."""

    def __init__(self, shape):
        g = torch.Generator().manual_seed(3)
        self.base = torch.randn(shape, generator=g)

    def __call__(self, x, sigma, **kw):
        s = sigma.reshape(-1, 1, 1, 1)
        return x - s * (self.base * torch.cos(3 * s) + 0.1 * s)


FORMS = {   # the DDPM schedule in k-diffusion (VE) units, and rectified flow (SD3's schedule, shift 3)
    "ve": (GaussianDenoiser, sd_grid),
    "flow": (FlowGaussianDenoiser, lambda steps: (flow_grid(steps), float(flow_grid(1000)[1]))),
}


def exact_ode(form, mu, s, x0, sigma):
    """Where the probability-flow ODE takes x0 (data N(mu, s^2)) at level sigma."""
    if form == "ve":
        return mu + math.sqrt(s * s + sigma * sigma) / s * (x0 - mu)
    return (1 - sigma) * mu + math.sqrt((1 - sigma) ** 2 * s * s + sigma * sigma) / s * (x0 - mu)


def roundtrip(model, x0, steps, variant, refine=0, grid=sd_grid):
    up, floor = grid(steps)
    rec = []
    xt = sample_ddim_invert(model, x0, up, variant=variant, sigma_floor=floor, refine=refine, record=rec)
    back = sample_ddim(model, xt, up.flip(0))
    return (back - x0).norm().item() / x0.norm().item(), rec[0], xt


def test_target_variant_is_exact_when_eps_depends_only_on_t():
    x0 = torch.randn(2, 4, 8, 8)
    err, _, _ = roundtrip(TimeOnlyEps(x0.shape), x0, 25, "target")
    assert err < 1e-12


@pytest.mark.parametrize("form", list(FORMS))
@pytest.mark.parametrize("variant", ["current", "target"])
def test_gaussian_data_reconstruction_converges(variant, form):
    """Plain inversion is a first-order approximation: the error falls with the step count (both noise forms)."""
    torch.manual_seed(0)
    make, grid = FORMS[form]
    x0 = 0.1 + 0.8 * torch.randn(1, 4, 8, 8)
    e25, _, _ = roundtrip(make(mu=0.1, s=0.8), x0, 25, variant, grid=grid)
    e100, _, _ = roundtrip(make(mu=0.1, s=0.8), x0, 100, variant, grid=grid)
    assert e100 < e25 / 2.5, (e25, e100)


@pytest.mark.parametrize("form", list(FORMS))
@pytest.mark.parametrize("variant", ["current", "target"])
def test_gaussian_data_reconstructs_to_1e5_with_refinement(variant, form):
    """With fixed-point refinement each inversion step is the exact inverse of the DDIM step (on flow also the
    last step into pure noise, guidance.inversion's x0-anchored iteration)."""
    torch.manual_seed(0)
    make, grid = FORMS[form]
    x0 = 0.1 + 0.8 * torch.randn(2, 4, 8, 8)
    err, _, _ = roundtrip(make(mu=0.1, s=0.8), x0, 25, variant, refine=6, grid=grid)
    assert err < 1e-5, err


@pytest.mark.parametrize("form", list(FORMS))
def test_inverted_noise_matches_exact_ode_solution(form):
    """For N(mu, s^2) data the PF-ODE maps x0 to a closed form at level sigma (helpers; on flow at sigma 1 it is
    (x0 - mu) / s)."""
    torch.manual_seed(1)
    mu, s = 0.2, 0.6
    make, grid = FORMS[form]
    x0 = mu + s * torch.randn(1, 4, 8, 8)
    errs = []
    for steps in (50, 200):
        _, traj, xt = roundtrip(make(mu, s), x0, steps, "current", grid=grid)
        exact = exact_ode(form, mu, s, x0, float(traj.sigmas[-1]))
        errs.append(((xt - exact).norm() / exact.norm()).item())
    assert errs[1] < errs[0] / 2.5 and errs[1] < 0.02, errs


def test_trajectory_records_every_step():
    x0 = torch.randn(2, 4, 8, 8)
    _, traj, xt = roundtrip(GaussianDenoiser(), x0, 10, "current")
    assert isinstance(traj, Trajectory) and traj.steps == 10
    assert traj.latents.shape == (11, 2, 4, 8, 8) and traj.x0.shape == (10, 2, 4, 8, 8)
    assert torch.equal(traj.latents[0], x0) and torch.equal(traj.latents[-1], xt)
    assert traj.index_of_sigma(float(traj.sigmas[4])) == 4
    with pytest.raises(KeyError):
        traj.index_of_sigma(123.0)
    with pytest.raises(Exception):
        traj.sigmas = None   # frozen


def test_rejects_descending_sigmas_and_unknown_variant():
    up, floor = sd_grid(10)
    with pytest.raises(ValueError, match="ascending"):
        sample_ddim_invert(GaussianDenoiser(), torch.zeros(1, 4, 8, 8), up.flip(0), sigma_floor=floor)
    with pytest.raises(ValueError, match="variant"):
        sample_ddim_invert(GaussianDenoiser(), torch.zeros(1, 4, 8, 8), up, variant="x", sigma_floor=floor)


# -- the regulariser ----------------------------------------------------------------------------------------
def correlated_noise(shape, gen):
    n = torch.randn(shape, generator=gen)
    k = torch.ones(shape[1], 1, 5, 5) / 25
    n = F.conv2d(F.pad(n, (2, 2, 2, 2), mode="circular"), k, groups=shape[1])
    return n / n.std()


def test_white_noise_scores_far_lower_than_correlated():
    g = torch.Generator().manual_seed(0)
    white = torch.randn(4, 4, 64, 64, generator=g)
    corr = correlated_noise((4, 4, 64, 64), g)
    lw = auto_corr_loss(white, torch.Generator().manual_seed(1))
    lc = auto_corr_loss(corr, torch.Generator().manual_seed(1))
    assert lc > 10 * lw, (lw.item(), lc.item())
    assert abs(kl_divergence(white).item()) < 0.01 * 4


def test_regularizer_whitens_and_is_seeded():
    g = torch.Generator().manual_seed(0)
    corr = correlated_noise((1, 4, 32, 32), g) * 1.5 + 0.3
    out1 = regularize_noise(corr, generator=torch.Generator().manual_seed(5))
    out2 = regularize_noise(corr, generator=torch.Generator().manual_seed(5))
    assert torch.equal(out1, out2)
    probe = lambda t: sum(auto_corr_loss(t, torch.Generator().manual_seed(k)).item() for k in range(8))  # noqa: E731
    assert probe(out1) < 0.5 * probe(corr)
    assert kl_divergence(out1) < kl_divergence(corr)


def test_regularizer_works_on_inference_tensors():
    with torch.inference_mode():
        eps = torch.randn(1, 4, 16, 16)
        out = regularize_noise(eps, iterations=1)
    assert out.shape == eps.shape and not torch.equal(out, eps)


def test_batch_members_are_regularised_independently():
    g = torch.Generator().manual_seed(0)
    a = correlated_noise((1, 4, 16, 16), g)
    b = correlated_noise((1, 4, 16, 16), g)
    alone = regularize_noise(a, iterations=2, generator=torch.Generator().manual_seed(1))
    # the same shifts apply to the whole batch, and the losses are summed over it: sample a is unaffected by b
    both = regularize_noise(torch.cat([a, b]), iterations=2, generator=torch.Generator().manual_seed(1))
    assert torch.allclose(both[:1], alone, atol=1e-10)


def test_diffusers_variant_round_trip_is_exact_and_ends_in_vp_units():
    """A denoiser whose eps depends on the level only: the diffusers variant (clean latent at abar_0 = sigma(0),
    eps at the target level) and DDIM sampling back to sigma(0) are exact inverses, and the sampler returns the
    latent at sigma(0) in VP units, i.e. the clean latent z it started from (diffusers' convention)."""
    from types import SimpleNamespace

    from z2i.guidance.ddim import ends_at_floor, sample_ddim
    from z2i.guidance.inversion import sample_ddim_invert

    floor = 0.0292
    e = lambda s: torch.sin(3 * s) + 0.5          # noqa: E731

    class Model:
        model_sampling = SimpleNamespace(sigma_min=floor)

        def __call__(self, x, sigma, **kw):
            s = sigma.reshape(-1, 1, 1, 1).to(x)
            return x - s * e(s)

    z = torch.randn(2, 4, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    sigmas = torch.tensor([floor, 0.05, 0.3, 1.2, 5.0, 14.6], dtype=torch.float64)
    record = []
    x_t = sample_ddim_invert(Model(), z, sigmas, variant="diffusers", record=record)
    assert torch.allclose(record[0].latents[0], z * (1 + floor ** 2) ** 0.5)
    back = sample_ddim(Model(), x_t, sigmas.flip(0))
    assert ends_at_floor(sigmas.flip(0), floor) and not ends_at_floor(torch.tensor([1.0, 0.0]), floor)
    assert torch.allclose(back, z, rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="lowest trained level"):
        sample_ddim_invert(Model(), z, torch.tensor([0.0, 1.0], dtype=torch.float64), variant="diffusers")


def _sd_alphas_cumprod():
    """SD1.x's scaled-linear schedule (betas 0.00085..0.012 over 1000 steps), float64."""
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2
    return torch.cumprod(1 - betas, 0)


@pytest.mark.parametrize("steps", [10, 25])
def test_csg_code_variant_is_the_official_vp_loop(steps):
    """The "csg" variant against the official CSG code's loop written out in its own VP terms (Hleephilip/CSG
    src/utils/ddim_inv.py + scheduler.py step(reverse=True), docs/CSG_OFFICIAL_CODE.md section 1): for t in
    timesteps.flip(0)[1:-1], eps = eps_theta(x, t), a_t = abar[t - 1], a_next = abar[t + r - 1]; on a closed-form
    nonlinear eps model, in float64. Also: exactly N - 2 evaluations, at the timesteps 1 + k r, k = 1..N-2."""
    ac = _sd_alphas_cumprod()
    table = ((1 - ac) / ac).sqrt()                      # sigma of every trained timestep
    r = 1000 // steps
    grid = [1 + k * r for k in range(steps)]            # the code's (and ComfyUI's ddim_uniform) grid, ascending
    g = torch.Generator().manual_seed(0)
    z0 = torch.randn(1, 4, 8, 8, generator=g, dtype=torch.float64)
    w = torch.randn(4, 4, generator=g, dtype=torch.float64) * 0.3

    def eps_model(x_vp, t):                             # any smooth nonlinear function of (x, t) will do
        return torch.tanh(torch.einsum("oc,bchw->bohw", w, x_vp)) + 0.5 * x_vp * (t / 1000.0)

    x = z0.clone()
    for t in grid[1:-1]:
        eps = eps_model(x, t)
        a_t, a_next = ac[t - 1], ac[t + r - 1]
        x0 = (x - (1 - a_t).sqrt() * eps) / a_t.sqrt()
        x = a_next.sqrt() * x0 + (1 - a_next).sqrt() * eps
    official = x

    seen = []

    def denoiser(x_in, sigma, **_):                      # the same eps model behind ComfyUI's denoiser API
        s = float(sigma[0])
        t = int(torch.argmin((table - s).abs()))
        assert abs(float(table[t]) - s) <= 1e-9 * s, "evaluated off the trained timesteps"
        seen.append(t)
        x_vp = x_in / math.sqrt(1 + s * s)
        return x_in - s * eps_model(x_vp, t)

    levels = table[[t - 1 for t in grid[1:]]]            # abar[T_k - 1], k = 1..N-1
    evals = table[grid[1:-1]]                            # sigma(T_k), k = 1..N-2
    ours = sample_ddim_invert(denoiser, z0.clone(), levels, variant="csg", eval_sigmas=evals)
    assert seen == grid[1:-1]
    ours_vp = ours / math.sqrt(1 + float(levels[-1]) ** 2)
    assert float((ours_vp - official).norm() / official.norm()) < 1e-12
    # and the other variants are not it
    plain = sample_ddim_invert(denoiser, z0.clone(), levels, variant="current")
    assert float((plain / math.sqrt(1 + float(levels[-1]) ** 2) - official).norm() / official.norm()) > 1e-3
