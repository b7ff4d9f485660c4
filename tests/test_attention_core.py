"""Attention-with-probabilities, the map store, the controllers and the attn2 patch (pure torch)."""
import pytest
import torch
import torch.nn.functional as F

from z2i.attention_patches.controller import (CALL_KEY, SELF_CALL_KEY, AttentionCall, AttentionController, Capture,
                                              MapStore, Mixup, attn1_replace, attn2_replace, resize_mask)
from z2i.attention_patches.csg_mask import SelfAttentionMean
from z2i.attention_patches.probs import attention_probs, attention_with_probs, head_mean, split_heads
from z2i.attention_patches.sites import Site, select_sites
from z2i.guidance.losses import cross_attention_loss


def qkv(b=2, n=64, m=77, heads=8, d=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(b, n, heads * d, generator=g), torch.randn(b, m, heads * d, generator=g) * 2,
            torch.randn(b, m, heads * d, generator=g))


def reference_attention(q, k, v, heads):
    qh, kh, vh = (split_heads(t, heads) for t in (q, k, v))
    out = F.scaled_dot_product_attention(qh, kh, vh)
    return out.transpose(1, 2).reshape(q.shape[0], q.shape[1], -1)


def test_probs_attention_equals_sdpa_and_rows_sum_to_one():
    q, k, v = qkv()
    out, probs = attention_with_probs(q, k, v, 8)
    assert torch.allclose(out, reference_attention(q, k, v, 8), atol=1e-5)
    assert probs.shape == (2, 8, 64, 77) and probs.dtype == torch.float32
    assert torch.allclose(probs.sum(-1), torch.ones(2, 8, 64), atol=1e-6)


def test_fp16_inputs_get_fp32_maps():
    q, k, v = (t.half() for t in qkv())
    assert attention_probs(q, k, 8).dtype == torch.float32


def test_store_holds_at_most_max_steps_and_filters():
    s1, s2 = Site("input", 1, 0), Site("output", 3, 0)
    store = MapStore(sites=[s1], conds=[0], dtype=torch.float16, max_steps=1)
    for step in range(5):
        store.put(step, s1, 0, torch.rand(1, 8, 16, 77))
        store.put(step, s1, 1, torch.rand(1, 8, 16, 77))    # wrong cond: ignored
        store.put(step, s2, 0, torch.rand(1, 8, 16, 77))    # wrong site: ignored
        assert store.steps_held == 1
    assert store.peak_steps == 1 and store.get(4, s1, 0).dtype == torch.float16
    assert store.get(3, s1, 0) is None and store.get(4, s2, 0) is None
    big = MapStore(max_steps=3)
    for step in range(5):
        big.put(step, s1, 0, torch.rand(1, 8, 16, 77))
    assert big.peak_steps == 3 and big.nbytes() == 3 * 8 * 16 * 77 * 4


def test_store_concatenates_a_cond_split_over_calls():
    store = MapStore()
    s = Site("middle", 0, 0)
    store.put(0, s, 0, torch.zeros(1, 8, 4, 77))
    store.put(0, s, 0, torch.ones(1, 8, 4, 77))
    assert store.get(0, s, 0).shape == (2, 8, 4, 77)


def test_mixup_mask_one_gives_source_and_zero_gives_target():
    site = Site("output", 3, 0)
    src_maps, tgt_maps = torch.softmax(torch.randn(1, 8, 64, 77), -1), torch.softmax(torch.randn(1, 8, 64, 77), -1)
    source = MapStore()
    source.put(0, site, 0, src_maps)
    call = AttentionCall(0, [], latent_hw=(8, 8))
    ones = Mixup(source, torch.ones(1, 8, 8)).process(tgt_maps, site, 0, call)
    zeros = Mixup(source, torch.zeros(1, 8, 8)).process(tgt_maps, site, 0, call)
    assert torch.allclose(ones, src_maps) and torch.allclose(zeros, tgt_maps)
    half = torch.zeros(1, 8, 8)
    half[:, :, :4] = 1
    mixed = Mixup(source, half).process(tgt_maps, site, 0, call)
    cols = torch.arange(64) % 8
    assert torch.allclose(mixed[:, :, cols < 3], src_maps[:, :, cols < 3], atol=1e-6)
    assert torch.allclose(mixed[:, :, cols > 4], tgt_maps[:, :, cols > 4], atol=1e-6)
    assert torch.allclose(mixed.sum(-1), torch.ones(1, 8, 64), atol=1e-5)   # still probabilities


def test_resize_mask_shape():
    assert resize_mask(torch.rand(2, 16, 16), (4, 4)).shape == (2, 1, 16, 1)


def test_patch_without_call_is_plain_attention_and_capture_splits_conds():
    q, k, v = qkv(b=4)
    opts = {"n_heads": 8, "block": ("output", 3), "block_index": 0, "cond_or_uncond": [1, 0],
            "original_shape": [4, 4, 8, 8]}
    plain = attn2_replace(q, k, v, opts)
    assert torch.allclose(plain, reference_attention(q, k, v, 8), atol=1e-5)
    store = MapStore(max_steps=1)
    call = AttentionCall(7, [Capture(store)])
    out = attn2_replace(q, k, v, {**opts, CALL_KEY: call})
    assert torch.allclose(out, plain, atol=1e-5)
    site = Site("output", 3, 0)
    full = attention_probs(q, k, 8)
    assert torch.allclose(store.get(7, site, 1), full[:2]) and torch.allclose(store.get(7, site, 0), full[2:])
    assert call.latent_hw == (8, 8)


def test_call_site_filter():
    q, k, v = qkv(b=1)
    store = MapStore()
    call = AttentionCall(0, [Capture(store)], sites=frozenset({Site("input", 1, 0)}))
    attn2_replace(q, k, v, {"n_heads": 8, "block": ("output", 3), "block_index": 0, CALL_KEY: call})
    assert store.steps_held == 0


def test_head_mean_one_head_at_a_time_equals_the_mean_of_the_maps():
    q, k, _ = qkv(b=2, n=64, m=64)
    full = attention_probs(q, k, 8).mean(1)
    got = head_mean(q, k, 8)
    assert got.shape == (2, 64, 64) and got.dtype == torch.float32
    assert ((got - full).abs().max() / full.abs().max()).item() < 1e-6


class Counting(AttentionController):
    def __init__(self, want):
        self.want, self.seen = want, []

    def wants(self, site, hw, call):
        return self.want(site, hw)

    def process(self, probs, site, cond_index, call):
        self.seen.append((site, tuple(probs.shape)))
        return probs * 0 + 1.0 / probs.shape[-1]        # a rewrite, so a wanted layer's output visibly changes


def test_a_layer_no_controller_wants_runs_plain_attention():
    """wants() is asked before any map is computed: an unwanted layer gets the plain kernel's output and its
    controllers never see it; a wanted one is processed as before."""
    q, k, v = qkv(b=1)
    opts = {"n_heads": 8, "block": ("output", 3), "block_index": 0, "original_shape": [1, 4, 8, 8]}
    plain = attn2_replace(q, k, v, opts)
    skip = Counting(lambda site, hw: site.block == "input")
    out = attn2_replace(q, k, v, {**opts, CALL_KEY: AttentionCall(0, [skip])})
    assert torch.equal(out, plain) and skip.seen == []
    take = Counting(lambda site, hw: hw == (8, 8))
    out = attn2_replace(q, k, v, {**opts, CALL_KEY: AttentionCall(0, [take])})
    assert take.seen == [(Site("output", 3, 0), (1, 8, 64, 77))] and not torch.allclose(out, plain, atol=1e-3)


def test_self_attention_mean_reads_one_head_at_a_time_and_only_its_layer_after_the_first_step(monkeypatch):
    """The content mask's self-attention reader: the layer's output is the plain kernel's (the [b, heads, N, N]
    maps are never built: attention_probs is not called), its map equals the mean of the full maps, and from the
    second step on only the layer found in the first step is read."""
    import z2i.attention_patches.controller as ctl
    q, k, v = qkv(b=1, n=64, m=64)
    first, second = Site("output", 3, 0), Site("output", 3, 1)
    opts = lambda site: {"n_heads": 8, "block": (site.block, site.id), "block_index": site.index,  # noqa: E731
                         "original_shape": [1, 4, 8, 8]}
    full = attention_probs(q, k, 8).mean(1)
    calls = []
    real = ctl.attention_probs
    monkeypatch.setattr(ctl, "attention_probs", lambda *a: calls.append(1) or real(*a))
    sa = SelfAttentionMean((8, 8))
    for step in range(2):
        for site, scale in ((first, 1.0), (second, 0.5)):
            call = AttentionCall(step, [sa])
            out = attn1_replace(q * scale, k, v, {**opts(site), SELF_CALL_KEY: call})
            assert torch.allclose(out, reference_attention(q * scale, k, v, 8), atol=1e-5)
        if step == 0:
            assert sa.wants(first, (8, 8), call) and sa.wants(second, (8, 8), call)
        sa.end_step(step)
        assert sa.site == second and not sa.wants(first, (8, 8), call) and not sa.wants(second, (4, 4), call)
    assert calls == []
    want = attention_probs(q * 0.5, k, 8).mean(1)
    assert ((sa.mean() - want).abs().max() / want.abs().max()).item() < 1e-6
    assert not torch.allclose(sa.mean(), full, atol=1e-3)


def test_select_sites():
    sites = [Site("input", 1, 0), Site("middle", 0, 0), Site("output", 3, 0), Site("output", 4, 0)]
    assert select_sites(sites, "output") == sites[2:]
    assert select_sites(sites, "middle, output.4.0") == [sites[1], sites[3]]
    with pytest.raises(ValueError, match="'output.9.0' matches no cross-attention layer"):
        select_sites(sites, "output.9.0")


def test_cross_attention_loss_is_squared_l2_summed_over_layers():
    a, b = Site("input", 1, 0), Site("output", 3, 0)
    e = {(a, 0): torch.ones(2, 8, 4, 77), (b, 0): torch.zeros(1, 8, 4, 77)}
    r = {(a, 0): torch.zeros(2, 8, 4, 77), (b, 0): torch.ones(1, 8, 4, 77)}
    # per image: sum over (queries, tokens), mean over heads; summed over the batch and the layers
    assert cross_attention_loss(e, r).item() == pytest.approx(2 * 4 * 77 + 1 * 4 * 77)
    assert cross_attention_loss(e, e).item() == 0
    with pytest.raises(ValueError):
        cross_attention_loss(e, {})


def test_cross_attention_loss_gives_each_image_its_single_image_gradient():
    a = Site("input", 1, 0)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 8, 4, 77, generator=g, requires_grad=True)
    ref = torch.randn(2, 8, 4, 77, generator=g)
    grad_batch, = torch.autograd.grad(cross_attention_loss({(a, 0): x}, {(a, 0): ref}), x)
    for i in range(2):
        xi = x[i:i + 1].detach().clone().requires_grad_(True)
        gi, = torch.autograd.grad(cross_attention_loss({(a, 0): xi}, {(a, 0): ref[i:i + 1]}), xi)
        assert torch.equal(gi, grad_batch[i:i + 1])
