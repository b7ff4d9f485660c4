"""CLIP losses on closed forms and on a tiny random open_clip (no host): Asyrp Eq. 4, AGG Eq. 21-22, cutouts."""
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from z2i.guidance.clip_loss import ClipEncoder, agg_clip_loss, agg_target_vector, cutouts, directional_loss

REPO = Path(__file__).resolve().parents[1]


def test_directional_loss_is_one_minus_cosine_by_hand():
    g = torch.Generator().manual_seed(0)
    e_edit, e_src = F.normalize(torch.randn(3, 8, generator=g), dim=-1), F.normalize(torch.randn(3, 8, generator=g), dim=-1)
    t = F.normalize(torch.randn(1, 8, generator=g), dim=-1)
    d = e_edit - e_src
    by_hand = sum(1 - float(d[i] @ t[0]) / float(d[i].norm() * t[0].norm()) for i in range(3)) / 3
    assert abs(float(directional_loss(e_edit, e_src, t)) - by_hand) < 1e-6
    # 0 when the image moved exactly along the text direction, 2 when against it
    assert float(directional_loss(e_src + 0.3 * t, e_src, t)) < 1e-6
    assert abs(float(directional_loss(e_src - 0.3 * t, e_src, t)) - 2) < 1e-6


def test_agg_target_vector_is_eq_22():
    g = torch.Generator().manual_seed(1)
    i, s, t = (F.normalize(torch.randn(2, 8, generator=g), dim=-1) for _ in range(3))
    v = agg_target_vector(i, s[:1], t[:1], 0.2, 0.4)
    raw = t[:1] + 0.2 * i - 0.4 * s[:1]
    assert torch.allclose(v, raw / raw.norm(dim=-1, keepdim=True)) and torch.allclose(v.norm(dim=-1), torch.ones(2))


def test_cutouts_are_seeded_and_sized():
    img = torch.rand(2, 3, 40, 56)
    a = cutouts(img, 4, 16, torch.Generator().manual_seed(3))
    b = cutouts(img, 4, 16, torch.Generator().manual_seed(3))
    assert a.shape == (8, 3, 16, 16) and torch.equal(a, b)
    assert not torch.equal(a, cutouts(img, 4, 16, torch.Generator().manual_seed(4)))
    assert cutouts(img, 0, 16).shape == (2, 3, 16, 16)


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    import open_clip
    sys.path.insert(0, str(REPO / "tools"))
    from make_tiny_open_clip import NAME, build
    weights = build(tmp_path_factory.mktemp("open_clip"))
    open_clip.add_model_config(str(weights.with_suffix(".json")))
    model = open_clip.create_model(NAME, pretrained=str(weights)).eval().requires_grad_(False)
    return ClipEncoder(model, open_clip.get_tokenizer(NAME), 32)


def test_gradients_reach_the_image_and_descend(tiny_clip):
    t = tiny_clip.encode_text(["a photo of a cat", "a photo of a dog"])
    assert torch.allclose(t.norm(dim=-1), torch.ones(2), atol=1e-5)
    tdir = tiny_clip.text_direction("a photo of a cat", "a photo of a dog")
    src = torch.rand(1, 3, 48, 48, generator=torch.Generator().manual_seed(0))
    e_src = tiny_clip.encode_image(src).detach()
    delta = (0.01 * torch.randn(src.shape, generator=torch.Generator().manual_seed(1))).requires_grad_(True)
    opt = torch.optim.Adam([delta], lr=0.01)
    losses = []
    for _ in range(15):
        loss = directional_loss(tiny_clip.encode_image(src + delta), e_src, tdir)
        opt.zero_grad()
        loss.backward()
        assert delta.grad is not None and delta.grad.abs().sum() > 0
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.5 * losses[0], losses


def test_agg_clip_loss_matches_its_definition(tiny_clip):
    img = torch.rand(1, 3, 48, 48, generator=torch.Generator().manual_seed(2))
    v = F.normalize(torch.randn(1, 32, generator=torch.Generator().manual_seed(3)), dim=-1)
    loss = agg_clip_loss(tiny_clip, img, v, 3, torch.Generator().manual_seed(5))
    crops = cutouts(img, 3, 32, torch.Generator().manual_seed(5))
    e = tiny_clip.encode_image(crops)
    assert abs(float(loss) + float((e @ v[0]).mean())) < 1e-5
