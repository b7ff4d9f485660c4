"""AGG math on closed forms: zero gradient = DDIM, the MCG sign, DDS descent, the asymmetric update, batch
independence of the losses."""
import torch

from z2i.guidance.agg import agg_step, boundary, dds_refine, l1_regularizer, mcg_x0
from z2i.guidance.ddim import ddim_step
from z2i.guidance.schedules import eps_from_denoised
from z2i.tests.helpers import GaussianDenoiser


def setup(seed=0):
    g = torch.Generator().manual_seed(seed)
    den = GaussianDenoiser(mu=0.1, s=0.8)
    sigma = 3.0
    x = torch.randn(2, 4, 8, 8, generator=g) * sigma
    target = torch.randn(2, 4, 8, 8, generator=g) * 0.8
    return den, sigma, x, target


def test_zero_weight_is_the_ddim_step():
    den, sigma, x, target = setup()
    d = den(x, torch.tensor(sigma))
    out, x0 = agg_step(x, sigma, 1.5, lambda xx: den(xx, torch.tensor(sigma)), target, 0.0)
    assert torch.equal(out, ddim_step(d, eps_from_denoised(x, sigma, d), sigma, 1.5)) and torch.equal(x0, d)


def test_asymmetric_update_with_zero_gradient_equals_ddim():
    den, sigma, x, target = setup()
    d = den(x, torch.tensor(sigma))
    # the target equals D exactly: the L1 gradient vanishes where the residual is zero (sign(0) = 0)
    out, _ = agg_step(x, sigma, 1.5, lambda xx: den(xx, torch.tensor(sigma)), d.clone(), 1.0, dds_steps=0)
    assert torch.allclose(out, ddim_step(d, eps_from_denoised(x, sigma, d), sigma, 1.5), atol=1e-6)


def test_mcg_step_descends_the_l1_loss():
    den, sigma, x, target = setup()
    d, x0_bar, loss = mcg_x0(x, sigma, lambda xx: den(xx, torch.tensor(sigma)), target, 0.1)
    assert float(l1_regularizer(x0_bar, target, 0.1)) < loss
    # and it is sigma^2 * grad_x: the gradient through the (linear) denoiser, by hand
    k = 0.64 / (0.64 + sigma ** 2)
    grad_x = 0.1 * torch.sign(d - target) * k / d[0].numel()      # a per-image mean, summed over the batch
    assert torch.allclose(x0_bar, d - sigma ** 2 * grad_x, atol=1e-6)


def test_dds_lowers_the_loss_monotonically():
    _, _, _, target = setup()
    start = target + 0.05 * torch.randn_like(target)
    losses = []
    out = dds_refine(start, target, 1.0, lr=0.01, steps=10, losses=losses)
    assert all(b < a for a, b in zip(losses, losses[1:])), losses
    assert float(l1_regularizer(out, target, 1.0)) < losses[0]


def test_object_mask_keeps_the_unguided_x0_on_the_object():
    den, sigma, x, target = setup()
    mask = torch.zeros(1, 8, 8)
    mask[:, :4] = 1
    d = den(x, torch.tensor(sigma))
    _, x0 = agg_step(x, sigma, 1.5, lambda xx: den(xx, torch.tensor(sigma)), target, 1.0, object_mask=mask)
    assert torch.allclose(x0[:, :, :4], d[:, :, :4]) and not torch.allclose(x0[:, :, 4:], d[:, :, 4:])


def test_boundary():
    assert boundary(0.3, 50) == 15 and boundary(20, 50) == 20 and boundary(80, 50) == 50


def test_each_image_gets_the_step_it_gets_alone():
    """The L1 is a per-image mean summed over the batch: MCG + DDS on [A, B] equal A alone and B alone."""
    den, sigma, x, target = setup()
    step = lambda xx, tt: agg_step(xx, sigma, 1.5, lambda v: den(v, torch.tensor(sigma)), tt, 1.0)  # noqa: E731
    both, x0_both = step(x, target)
    alone = [step(x[i:i + 1], target[i:i + 1]) for i in range(2)]
    assert torch.allclose(both, torch.cat([a[0] for a in alone]), atol=1e-6)
    assert torch.allclose(x0_both, torch.cat([a[1] for a in alone]), atol=1e-6)
    assert torch.allclose(l1_regularizer(x, target, 0.1), l1_regularizer(x[:1], target[:1], 0.1)
                          + l1_regularizer(x[1:], target[1:], 0.1))


def test_style_loss_is_a_per_image_mean_of_cutouts_summed_over_images():
    from z2i.guidance.clip_loss import ClipEncoder, agg_clip_loss

    class Tower(torch.nn.Module):       # a stand-in for open_clip: a fixed 3 -> 4 projection of pooled colours
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Conv2d(3, 4, 1)

        def encode_image(self, x):
            return self.proj(x).mean((-2, -1))

    torch.manual_seed(0)
    enc = ClipEncoder(Tower().requires_grad_(False), None, 8)
    img = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    v = torch.nn.functional.normalize(torch.randn(2, 4, generator=torch.Generator().manual_seed(2)), dim=-1)
    both = agg_clip_loss(enc, img, v, 3, torch.Generator().manual_seed(5))
    alone = [agg_clip_loss(enc, img[i:i + 1], v[i:i + 1], 3, torch.Generator().manual_seed(5)) for i in range(2)]
    assert torch.allclose(both, alone[0] + alone[1], atol=1e-6)
