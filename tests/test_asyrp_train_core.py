"""Trained Asyrp directions without the host: f_t (App. E), linearity and serialisation of implicit directions,
Alg. 2's loop lowering a closed-form loss, the L1 on [-1, 1] and the optimisers (reference-parity.md section 5)."""
import pytest
import torch

from z2i.guidance.asyrp import HDirection
from z2i.guidance.asyrp_train import (ADAM, SGD_STEPLR, DeltaBlock, asyrp_loss, make_optimizer, make_trainable,
                                      recon_l1, timestep_embedding, train_direction)
from z2i.tests.helpers import GaussianDenoiser


def test_delta_block_shapes_and_timestep_dependence():
    torch.manual_seed(0)
    f = DeltaBlock(16, hidden=24, temb_dim=10)
    h = torch.randn(3, 16, 2, 2)
    out = f(h, torch.tensor([100.0, 100.0, 900.0]))
    assert out.shape == h.shape
    assert torch.allclose(out[0], f(h[:1], torch.tensor([100.0]))[0], atol=1e-6)   # row-wise
    assert not torch.allclose(f(h[:1], torch.tensor([100.0])), f(h[:1], torch.tensor([900.0])))
    assert timestep_embedding(torch.tensor([0.0, 5.0]), 7).shape == (2, 7)


def test_implicit_direction_is_linear_and_combines_with_global():
    torch.manual_seed(0)
    f = DeltaBlock(8, hidden=16)
    implicit = HDirection(None, {"mode": "trained-implicit"}, ((1.0, f),))
    glob = HDirection(torch.randn(1, 8, 1, 1), {"mode": "derived"})
    h, t = torch.randn(2, 8, 4, 4), torch.tensor([300.0, 300.0])
    one = implicit.delta_for(h, t)
    assert torch.allclose(implicit.scaled(2.0).delta_for(h, t), 2 * one)
    assert torch.allclose(implicit.scaled(-0.5).delta_for(h, t, scale=2.0), -one)
    both = implicit + glob.scaled(3.0)
    assert torch.allclose(both.delta_for(h, t), one + 3 * glob.delta.expand_as(h), atol=1e-6)
    assert both.channels == 8


def test_implicit_direction_round_trips_through_safetensors(tmp_path):
    import safetensors.torch
    torch.manual_seed(1)
    d = HDirection(torch.randn(1, 8, 2, 2), {"steps": 40}, ((0.7, DeltaBlock(8, hidden=16)), (-1.0, DeltaBlock(8, 32))))
    tensors, meta = d.to_safetensors()
    path = tmp_path / "d.safetensors"
    safetensors.torch.save_file(tensors, str(path), metadata=meta)
    with safetensors.safe_open(str(path), framework="pt") as fh:
        loaded = HDirection.from_safetensors({k: fh.get_tensor(k) for k in fh.keys()}, fh.metadata())
    h, t = torch.randn(1, 8, 2, 2), torch.tensor([500.0])
    assert torch.equal(loaded.delta_for(h, t), d.delta_for(h, t)) and loaded.meta == {"steps": 40}


def test_make_trainable_is_seeded():
    a, _ = make_trainable("implicit", 8, (2, 2), seed=3, hidden=16)
    b, _ = make_trainable("implicit", 8, (2, 2), seed=3, hidden=16)
    c, _ = make_trainable("global", 8, (2, 2), seed=3)
    h, t = torch.randn(1, 8, 2, 2), torch.tensor([10.0])
    assert torch.equal(a.delta_for(h, t), b.delta_for(h, t)) and c.delta.shape == (1, 8, 2, 2)


def test_training_loop_lowers_a_closed_form_loss():
    """A toy 'UNet' whose x0 prediction is shifted by delta_h (its h is x itself); the loss asks x0_edit to be the
    unedited x0 plus a fixed offset. Alg. 2 must find it: the mean loss falls over iterations."""
    den = GaussianDenoiser(0.0, 1.0)
    direction, params = make_trainable("global", 4, (8, 8), seed=0)
    offset = 0.3 * torch.ones(1, 4, 8, 8)

    def denoise(x, sigma, edited):
        d = den(x, torch.as_tensor(sigma))
        return d + direction.delta_for(x, None) if edited else d

    def loss_fn(x0_edit, x0_src):
        parts = (x0_edit - x0_src - offset).abs().mean()
        return parts, {"clip": float(parts.detach()), "recon": 0.0}

    sigmas = torch.tensor([10.0, 5.0, 2.0, 1.0, 0.0])
    starts = [torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(i)) * 10 for i in range(2)]
    seen = []
    history = train_direction(denoise, starts, sigmas, 3, loss_fn, params, iterations=5, lr=0.05, optimizer=ADAM,
                              callback=lambda info: seen.append(info["done"]))
    losses = [h["loss"] for h in history]
    assert losses[1] < losses[0] and losses[-1] < 0.4 * losses[0], losses    # Adam on an L1 hovers near 0
    assert seen == list(range(1, 5 * 2 * 3 + 1))
    assert torch.allclose(direction.delta, offset, atol=0.1)


def test_recon_l1_is_measured_on_minus_one_one():
    """The official code's L1 sees images in [-1, 1]: twice the L1 of the same images in [0, 1]."""
    g = torch.Generator().manual_seed(0)
    a, b = torch.rand(2, 3, 16, 16, generator=g), torch.rand(2, 3, 16, 16, generator=g)
    assert torch.allclose(recon_l1(a, b), 2 * (a - b).abs().mean(), rtol=1e-6)


def test_asyrp_loss_uses_the_doubled_l1_and_feeds_clip_zero_one_images():
    seen = []

    class Encoder:          # a stand-in for ClipEncoder: a fixed linear embedding of the mean colour
        def encode_image(self, img):
            seen.append((float(img.min()), float(img.max())))
            return torch.nn.functional.normalize(img.mean((-2, -1)) @ torch.eye(3)[:, :2] + 0.1, dim=-1)

    g = torch.Generator().manual_seed(1)
    src = torch.rand(1, 3, 8, 8, generator=g)
    edit = (src + 0.1 * torch.randn(1, 3, 8, 8, generator=g)).clamp(0, 1)
    loss, parts = asyrp_loss(edit, src, Encoder(), torch.tensor([[1.0, 0.0]]), 0.0, 1.0)
    assert abs(parts["recon"] - 2 * float((edit - src).abs().mean())) < 1e-6
    assert abs(float(loss) - parts["recon"]) < 1e-6
    assert all(0 <= lo and hi <= 1 for lo, hi in seen)      # the CLIP input stays in [0, 1]


def test_official_optimizer_is_sgd_with_steplr_per_pass():
    """SGD lr 0.5, StepLR(3, 0.1) stepped once per pass over the images: 0.5, 0.5, 0.5, 0.05, 0.05, 0.05, 0.005;
    one optimiser step per timestep."""
    direction, params = make_trainable("global", 4, (2, 2), seed=0)
    steps = []

    def denoise(x, sigma, edited):
        return x + direction.delta_for(x, None) if edited else x

    def loss_fn(x0_edit, x0_src):
        loss = ((x0_edit - x0_src - 1.0) ** 2).mean()
        return loss, {"clip": float(loss.detach()), "recon": 0.0}

    starts = [torch.zeros(1, 4, 2, 2), torch.ones(1, 4, 2, 2)]
    history = train_direction(denoise, starts, torch.tensor([3.0, 2.0, 1.0, 0.0]), 2, loss_fn, params, iterations=7,
                              optimizer=SGD_STEPLR, callback=lambda info: steps.append(info["done"]))
    assert [h["lr"] for h in history] == pytest.approx([0.5, 0.5, 0.5, 0.05, 0.05, 0.05, 0.005])
    assert steps == list(range(1, 7 * 2 * 2 + 1))
    opt, sched = make_optimizer(SGD_STEPLR, params)
    assert isinstance(opt, torch.optim.SGD) and isinstance(sched, torch.optim.lr_scheduler.StepLR)
    opt, sched = make_optimizer(ADAM, params)
    assert isinstance(opt, torch.optim.Adam) and sched is None and opt.param_groups[0]["lr"] == 0.05
    assert make_optimizer(SGD_STEPLR, params, lr=0.2)[0].param_groups[0]["lr"] == 0.2
    assert make_optimizer(SGD_STEPLR, params, lr=-1)[0].param_groups[0]["lr"] == 0.5


@pytest.mark.parametrize("kind", ["implicit", "global"])
def test_trainable_direction_on_the_given_device(kind):
    """The trained block lives on the model's device (issue 28: it stayed on the CPU, so every UNet call on a GPU
    copied h to the host and back); its values are drawn on the CPU first, so every device starts the same."""
    cpu, params = make_trainable(kind, 8, (2, 2), seed=3, hidden=16)
    meta, mparams = make_trainable(kind, 8, (2, 2), seed=3, hidden=16, device=torch.device("meta"))
    assert all(p.device.type == "meta" for p in mparams) and all(p.device.type == "cpu" for p in params)
    assert [p.shape for p in params] == [p.shape for p in mparams]
