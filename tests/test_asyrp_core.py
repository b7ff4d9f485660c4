"""Asyrp core: Theorem 1 (symmetric vs asymmetric eps shifts), phases, intervals, directions (pure)."""
import pytest
import torch

from z2i.guidance.asyrp import HDirection, interval_index, sample_asyrp, step_scale
from z2i.guidance.hspace import HSPACE_KEY, HCall, hspace_output_block_patch
from z2i.tests.helpers import GaussianDenoiser


def sd_sigmas(steps):
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2
    abar = torch.cumprod(1 - betas, 0)
    ts = list(range(1, 1000, 1000 // steps))[::-1]
    return torch.cat([((1 - abar[ts]) / abar[ts]).sqrt(), torch.zeros(1, dtype=torch.float64)])


def test_theorem1_symmetric_shift_nearly_cancels():
    """Shifting eps by the same delta in both DDIM terms moves x far less than shifting it in the x0 term only."""
    sig = sd_sigmas(50)
    den = GaussianDenoiser(0.0, 1.0)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 4, 8, 8, generator=g, dtype=torch.float64) * sig[0]
    d_eps = torch.randn(1, 4, 8, 8, generator=g, dtype=torch.float64) * 0.1

    def shifted(xx, s):          # denoiser whose eps is eps + d_eps  <=>  D - sigma * d_eps
        return den(xx, s) - s * d_eps

    plain = sample_asyrp(den, den, x, sig, 0, 50)
    asym = sample_asyrp(shifted, den, x, sig, 20, 50)
    sym = sample_asyrp(shifted, den, x, sig, 20, 50, symmetric=True)
    change_asym, change_sym = (asym - plain).norm(), (sym - plain).norm()
    assert change_sym < 0.25 * change_asym, (float(change_sym), float(change_asym))


def test_zero_delta_and_no_edit_steps_is_plain_ddim():
    from z2i.guidance.ddim import sample_ddim
    sig = sd_sigmas(10)
    den = GaussianDenoiser(0.2, 0.7)
    x = torch.randn(1, 4, 8, 8, dtype=torch.float64) * sig[0]
    assert torch.equal(sample_asyrp(den, den, x, sig, 5, 10), sample_ddim(den, x, sig))


def test_boost_phase_is_seeded_stochastic():
    sig = sd_sigmas(10)
    den = GaussianDenoiser()
    x = torch.randn(1, 4, 8, 8, dtype=torch.float64) * sig[0]
    a = sample_asyrp(den, den, x, sig, 0, 7, seed=1)
    assert torch.equal(a, sample_asyrp(den, den, x, sig, 0, 7, seed=1))
    assert not torch.equal(a, sample_asyrp(den, den, x, sig, 0, 7, seed=2))
    assert not torch.equal(a, sample_asyrp(den, den, x, sig, 0, 10, seed=1))


def test_intervals():
    sig = sd_sigmas(10)
    assert interval_index(sig, 0.5, "percent") == 5 and interval_index(sig, 1.0, "percent") == 10
    table = {t: float(((1 - a) / a).sqrt()) for t, a in enumerate(torch.cumprod(
        1 - torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2, 0))}
    # timesteps 901, 801, ..., 1: t >= 500 holds for 901..501 = 5 steps
    assert interval_index(sig, 500, "timestep", lambda t: table[int(t)]) == 5
    with pytest.raises(ValueError):
        interval_index(sig, 1.5, "percent")
    assert step_scale(40, 20) == 2.0 and step_scale(None, 20) == 1.0


def test_direction_resizes_adds_and_roundtrips():
    d = HDirection(torch.ones(1, 8, 2, 2), {"steps": 40})
    assert d.at(torch.Size([2, 8, 4, 4]), 2.0).shape == (1, 8, 4, 4)
    assert torch.allclose(d.at(torch.Size([1, 8, 4, 4]), 2.0), torch.full((1, 8, 4, 4), 2.0))
    with pytest.raises(ValueError, match="channels"):
        d.at(torch.Size([1, 4, 2, 2]))
    s = d.scaled(-1) + d
    assert torch.equal(s.delta, torch.zeros(1, 8, 2, 2))
    t, m = d.to_safetensors()
    back = HDirection.from_safetensors(t, m)
    assert torch.equal(back.delta, d.delta) and back.meta == d.meta


def test_hook_acts_only_at_the_middle_output_and_only_when_asked():
    h, hsp = torch.zeros(2, 8, 2, 2), torch.zeros(2, 8, 2, 2)
    d = HDirection(torch.ones(1, 8, 2, 2))
    call = HCall(direction=d, scale=3.0)
    out, skip = hspace_output_block_patch(h, hsp, {"block": ("output", 0), HSPACE_KEY: call})
    assert torch.equal(out, torch.full_like(h, 3.0)) and skip is hsp
    out, _ = hspace_output_block_patch(h, hsp, {"block": ("output", 1), HSPACE_KEY: call})
    assert torch.equal(out, h)
    out, _ = hspace_output_block_patch(h, hsp, {"block": ("output", 0)})
    assert torch.equal(out, h)
    cap = HCall(captured={})
    hspace_output_block_patch(torch.arange(4.).reshape(4, 1, 1, 1), hsp, {"block": ("output", 0), HSPACE_KEY: cap,
                                                                         "cond_or_uncond": [1, 0]})
    assert cap.captured[1][0].flatten().tolist() == [0, 1] and cap.captured[0][0].flatten().tolist() == [2, 3]


def test_per_image_direction_rows_follow_the_images_of_every_cond_chunk():
    """A direction derived from a batch of N holds one row per image; a UNet call stacks cond chunks, each the
    whole batch in order, so row i goes to image i of every chunk. Timesteps are per image too."""
    d = HDirection(torch.arange(2.0).reshape(2, 1, 1, 1).expand(2, 8, 2, 2).clone())
    assert d.rows == 2 and HDirection(torch.ones(1, 8, 2, 2)).rows == 1
    assert d.at(torch.Size([4, 8, 2, 2]))[:, 0, 0, 0].tolist() == [0, 1, 0, 1]
    with pytest.raises(ValueError, match="batch of 2"):
        d.at(torch.Size([3, 8, 2, 2]))
    with pytest.raises(ValueError, match="batches of 2 and 3"):
        d + HDirection(torch.ones(3, 8, 2, 2))
    assert (d + HDirection(torch.ones(1, 8, 2, 2))).delta[:, 0, 0, 0].tolist() == [1, 2]

    class Probe:                # records the timesteps it is given per row
        channels = 8
        t = None

        def delta_for(self, h, t, scale=1.0):
            Probe.t = t
            return torch.zeros_like(h)

    call = HCall(direction=Probe(), timestep=lambda s: s * 100)
    options = {"block": ("output", 0), HSPACE_KEY: call, "cond_or_uncond": [1, 0], "sigmas": torch.tensor([1., 2.])}
    hspace_output_block_patch(torch.zeros(4, 8, 2, 2), None, options)
    assert Probe.t.tolist() == [100, 200, 100, 200]
