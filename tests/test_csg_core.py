"""CSG math against the paper's VP-form equations, computed by hand on a closed-form denoiser."""
import math

import pytest
import torch

from z2i.attention_patches.controller import AttentionCall, MapStore, Mixup, renormalise_background, resize_mask
from z2i.attention_patches.csg_mask import content_mask
from z2i.attention_patches.sites import Site
from z2i.guidance.csg import (align_tokens, background_gate, csg_step, gamma_vp, hard_background, omega,
                              pull_coefficient, token_positions)
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


def _blobs(size=64):
    """Two soft object masks with peaks well below 1 (as CSG's smoothed word map), at different places."""
    yy, xx = torch.meshgrid(torch.linspace(0, 1, size), torch.linspace(0, 1, size), indexing="ij")
    blob = lambda cy, cx, peak: peak * torch.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / 0.02)  # noqa: E731
    return torch.stack([blob(0.3, 0.6, 0.35), blob(0.7, 0.2, 0.5)])


@pytest.mark.parametrize("side", [8, 16, 32, 64])
def test_mixup_renormalised_gives_target_maps_at_the_object_peak(side):
    """The authors' code divides the object mask by its max after resizing it to each layer: at the peak the
    mixed maps are the target maps exactly, per image; elsewhere w = M / max M weights the target maps."""
    torch.manual_seed(side)
    background = 1 - _blobs()
    site, n = Site("output", 1, 0), side * side
    src = torch.softmax(torch.randn(2, 4, n, 77), -1)
    tgt = torch.softmax(torch.randn(2, 4, n, 77), -1)
    store = MapStore()
    store.put(0, site, 0, src)
    call = AttentionCall(0, [], latent_hw=(64, 64))
    code = Mixup(store, background).process(tgt, site, 0, call)
    obj = 1 - resize_mask(background, (side, side))
    assert float(obj.max()) < 0.6                                            # far from a binary mask
    for b in range(2):
        peak = int(obj[b].flatten().argmax())
        assert torch.equal(code[b, :, peak], tgt[b, :, peak])
    w = obj / obj.flatten(1).amax(1)[:, None, None, None]
    assert torch.allclose(code, tgt * w + src * (1 - w), atol=1e-6)
    for b in range(2):                                                       # each image gets what it gets alone
        alone = MapStore()
        alone.put(0, site, 0, src[b:b + 1])
        assert torch.equal(Mixup(alone, background[b:b + 1]).process(tgt[b:b + 1], site, 0, call), code[b:b + 1])
    # paper-literal: P as given, the old formula (M_src * P + M_tgt * (1 - P), P resized)
    p = resize_mask(background, (side, side))
    paper = Mixup(store, background, normalise=False).process(tgt, site, 0, call)
    assert torch.equal(paper, src * p + tgt * (1 - p))
    half = Mixup(store, background, normalise=False, strength=0.5).process(tgt, site, 0, call)
    p_old = resize_mask(background * 0.5, (side, side))                      # the old patcher scaled P first
    assert torch.allclose(half, src * p_old + tgt * (1 - p_old), atol=1e-7)
    assert (paper - code).abs().max() > 0.1                                  # the two forms differ


def test_renormalise_background_leaves_an_empty_object_alone():
    p = torch.ones(2, 1, 16, 1)
    p[1, 0, 3] = 0.75
    out = renormalise_background(p)
    assert torch.equal(out[0], p[0])                                         # all background: no 0/0
    assert float(out[1, 0, 3]) == 0.0 and torch.equal(out[1, 0, :3], p[1, 0, :3])
    binary = (torch.rand(1, 1, 16, 1) > 0.5).float()
    binary[0, 0, 0] = 0
    assert torch.equal(renormalise_background(binary), binary)               # a binary mask is unchanged


def _sd_sigmas(steps):
    """SD1.x's discrete sigmas on ComfyUI's ddim_uniform grid (t = 981, 961, ..., 1 for 50 steps), then 0."""
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2
    a = torch.cumprod(1 - betas, 0)
    sigmas = ((1 - a) / a).sqrt()
    ts = list(range(1, 1000, 1000 // steps))[::-1]
    return [float(sigmas[t]) for t in ts] + [0.0]


def _step_factors(p_value, steps, clamp, lambda_pre=15.0):
    """What each CSG step multiplies x - x^src by at a pixel of background probability p_value (the
    denoised prediction held fixed): 1 - c - c * Omega_t, c = 1 - sigma_next / sigma."""
    sigmas = _sd_sigmas(steps)
    bg, one, zero = torch.full((1, 1, 1), p_value), torch.ones(1, 1, 1, 1), torch.zeros(1, 1, 1, 1)
    return [float(csg_step(one, sigmas[i], sigmas[i + 1], zero, zero, omega(bg, lambda_pre, i, steps), clamp=clamp))
            for i in range(steps)]


def test_pull_clamp_decision_soft_masks_follow_the_paper_hard_masks_diverge():
    """Why the cap is on for hard masks only. With 50 steps and lambda_pre 15 a soft pixel (P < 1) leaves B_t
    before the pull coefficient grows again, so Eq. 18 contracts x - x^src at every step (over-correcting
    early: factor -0.76 at the first step); a cap would change that (-0.11). A P = 1 pixel stays gated to the
    end, where the coefficient reaches 4.5, 10.6, 15: the last steps amplify x - x^src about 2000 times. The
    capped steps never amplify it."""
    soft, soft_capped = _step_factors(0.999, 50, clamp=False), _step_factors(0.999, 50, clamp=True)
    assert max(abs(f) for f in soft) < 1
    assert soft[0] == pytest.approx(-0.76, abs=0.01) and soft_capped[0] == pytest.approx(-0.11, abs=0.01)
    for steps in (50, 10):
        hard, hard_capped = _step_factors(1.0, steps, clamp=False), _step_factors(1.0, steps, clamp=True)
        assert math.prod(abs(f) for f in hard if abs(f) > 1) > 1e3, steps
        assert max(abs(f) for f in hard_capped) <= 1, steps
    assert hard[-1] == pytest.approx(-15.0)                                  # the last step: -lambda_pre
    assert hard_background(torch.tensor([[[1.0, 0.0]], [[0.999, 0.2]]])).tolist() == [True, False]


def test_csg_step_clamps_per_image():
    torch.manual_seed(1)
    x, x_src, d = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    om = torch.full((2, 8, 8), 15.0)
    both = csg_step(x, 0.2, 0.1, d, x_src, om, clamp=True)
    none = csg_step(x, 0.2, 0.1, d, x_src, om, clamp=False)
    first = csg_step(x, 0.2, 0.1, d, x_src, om, clamp=torch.tensor([True, False]))
    assert torch.equal(first[0], both[0]) and torch.equal(first[1], none[1]) and not torch.equal(both, none)


def test_head_mean_apply_equals_the_map_times_the_vector():
    """probs.head_mean_apply (linear memory, query blocks) against head_mean(q, k) @ m (the [Nq, Nk] map)."""
    from z2i.attention_patches.probs import head_mean, head_mean_apply
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 300, 64, generator=g), torch.randn(2, 300, 64, generator=g)
    m = torch.rand(2, 300, 1, generator=g)
    ref = head_mean(q, k, 4) @ m
    got = head_mean_apply(q, k, 4, m, chunk=64)
    assert float((got - ref).abs().max() / ref.abs().max()) < 1e-6


def test_token_map_code_resize_follows_the_official_path():
    """TokenMapMean resize "code" (Hleephilip/CSG edit_pipeline.py:143-161): layers averaged at the token level
    (a coarser layer upsampled bicubically to it), normalised by the maximum there, then upsampled bicubically to
    the mask resolution; "ours" differs (bilinear to the mask resolution first)."""
    import torch.nn.functional as F
    from z2i.attention_patches.csg_mask import TokenMapMean
    g = torch.Generator().manual_seed(0)
    fine = torch.rand(1, 2, 16, 5, generator=g).softmax(-1)       # a 4x4 layer: [b, heads, Nq, Nk]
    coarse = torch.rand(1, 2, 4, 5, generator=g).softmax(-1)      # a 2x2 layer
    maps = {}
    for resize in ("code", "ours"):
        tm = TokenMapMean([1], hw=(8, 8), max_hw=(4, 4), resize=resize)
        for i, probs in enumerate((fine, coarse)):
            tm.process(probs, Site("output", i, 0), 0, AttentionCall(0, [tm], latent_hw=(8, 8)))
        tm.end_step(0)
        maps[resize] = tm.mean()
    a = fine[..., 1].mean(1).reshape(1, 1, 4, 4)
    b = F.interpolate(coarse[..., 1].mean(1).reshape(1, 1, 2, 2), size=(4, 4), mode="bicubic", align_corners=False)
    m = (a + b) / 2
    m = m / m.max()
    expected = F.interpolate(m, size=(8, 8), mode="bicubic", align_corners=False)[:, 0]
    assert torch.allclose(maps["code"], expected, atol=1e-6)
    assert float((maps["ours"] - expected).abs().max()) > 1e-3


def test_two_pass_mixup_mixes_the_first_pass_maps_not_its_own():
    """With `current` (the official code's inject_attn): the mixed maps are the first pass's target maps mixed with
    the source maps; the call's own maps (computed from hidden states the mixing may already have changed) are
    discarded. Without first-pass maps for a layer, the call's own maps pass unchanged."""
    site = Site("output", 3, 0)
    g = torch.Generator().manual_seed(1)
    src, first, own = (torch.rand(1, 2, 16, 5, generator=g).softmax(-1) for _ in range(3))
    source, current = MapStore(), MapStore()
    source.put(0, site, 0, src)
    current.put(0, site, 1, first)
    mask = torch.full((1, 4, 4), 0.25)
    mix = Mixup(source, mask, normalise=False, current=current)
    call = AttentionCall(0, [mix], latent_hw=(4, 4))
    out = mix.process(own, site, 1, call)
    assert torch.allclose(out, src * 0.25 + first * 0.75, atol=1e-7)
    assert mix.process(own, site, 0, call) is own                  # no first-pass maps for cond 0
    one_pass = Mixup(source, mask, normalise=False).process(own, site, 1, call)
    assert torch.allclose(one_pass, src * 0.25 + own * 0.75, atol=1e-7)
