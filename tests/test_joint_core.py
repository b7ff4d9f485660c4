"""Joint attention (MMDiT) for the controller protocol: the override and the block replace, pure torch (issue 17)."""
import functools

import pytest
import torch
import torch.nn.functional as F

from z2i.attention_patches.controller import CALL_KEY, SELF_CALL_KEY, AttentionCall, AttentionController, Capture, MapStore
from z2i.attention_patches.csg_mask import SelfAttentionMean
from z2i.attention_patches.joint import (JOINT_KEY, OVERRIDE, joint_attention, joint_block, middle_block,
                                         with_joint_patches)
from z2i.attention_patches.features import FEATURE_KEY, FeatureCall
from z2i.attention_patches.sites import Site, joint_sites, select_sites

HEADS, D, N_TXT, LATENT = 2, 16, 7, (8, 12)      # an 8 x 12 latent: a 4 x 6 patch grid, 24 image tokens
N_IMG = (LATENT[0] // 2) * (LATENT[1] // 2)


def kernel(q, k, v, heads, **kwargs):
    """The host's kernel as ComfyUI calls it (attention_pytorch's layout; v may come as [b, N, heads, d])."""
    b, n, _ = q.shape
    qh, kh, vh = (t.reshape(b, n, heads, -1).transpose(1, 2) for t in (q, k, v))
    return F.scaled_dot_product_attention(qh, kh, vh).transpose(1, 2).reshape(b, n, -1)


def qkv(b=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    n = N_TXT + N_IMG
    return (torch.randn(b, n, HEADS * D, generator=g) * 2, torch.randn(b, n, HEADS * D, generator=g) * 2,
            torch.randn(b, n, HEADS, D, generator=g))


def call_attention(q, k, v, options, index=1, inner=None):
    to = {**options, JOINT_KEY: (index, N_TXT), "cond_or_uncond": options.get("cond_or_uncond", [0])}
    return joint_attention(kernel, q, k, v, inner=inner, heads=HEADS, transformer_options=to)


def reference_probs(q, k):
    b, n, _ = q.shape
    qh = q.double().reshape(b, n, HEADS, D).transpose(1, 2)
    kh = k.double().reshape(b, n, HEADS, D).transpose(1, 2)
    return torch.softmax(qh @ kh.transpose(-1, -2) / D ** 0.5, -1)


def test_capture_sees_the_image_to_text_block_and_leaves_the_output_to_the_kernel():
    q, k, v = qkv()
    store = MapStore()
    out = call_attention(q, k, v, {CALL_KEY: AttentionCall(0, [Capture(store)], latent_hw=LATENT)})
    assert torch.equal(out, kernel(q, k, v, HEADS))
    got = store.get(0, Site("joint", 1, 0), 0)
    ref = reference_probs(q, k)[:, :, N_TXT:, :N_TXT]
    assert got.shape == (2, HEADS, N_IMG, N_TXT)
    assert float((got.double() - ref).abs().max() / ref.abs().max()) < 1e-5
    assert float(got.sum(-1).max()) < 1.0           # the text mass of an image row, not a distribution


def test_cond_chunks_and_sites_and_area_crops():
    q, k, v = qkv(b=2)
    store = MapStore()
    call = AttentionCall(0, [Capture(store)], latent_hw=LATENT)
    call_attention(q, k, v, {CALL_KEY: call, "cond_or_uncond": [1, 0]})
    assert store.get(0, Site("joint", 1, 0), 1).shape[0] == 1 and store.get(0, Site("joint", 1, 0), 0).shape[0] == 1
    other = MapStore()
    call_attention(q, k, v, {CALL_KEY: AttentionCall(0, [Capture(other)], sites=frozenset({Site("joint", 0, 0)}),
                                                     latent_hw=LATENT)})
    assert other.nbytes() == 0                        # a site the call does not ask for runs plain
    crop = MapStore()
    call_attention(q, k, v, {CALL_KEY: AttentionCall(0, [Capture(crop)], latent_hw=(16, 16))})
    assert crop.nbytes() == 0                         # another token count than the latent's: plain attention


class Rewrite(AttentionController):
    def process(self, probs, site, cond_index, call):
        return torch.ones_like(probs)                 # a uniform text block (any scale): rescaled by the patch


def test_rewritten_text_block_is_rescaled_to_the_rows_text_mass_and_the_image_block_kept():
    q, k, v = qkv()
    out = call_attention(q, k, v, {CALL_KEY: AttentionCall(0, [Rewrite()], latent_hw=LATENT)})
    p = reference_probs(q, k)
    img = p[:, :, N_TXT:]
    mass = img[..., :N_TXT].sum(-1, keepdim=True)
    new = torch.cat([mass.expand(-1, -1, -1, N_TXT) / N_TXT, img[..., N_TXT:]], -1)
    assert torch.allclose(new.sum(-1), torch.ones_like(mass[..., 0]), atol=1e-9)
    vh = v.double().transpose(1, 2)
    want = (new @ vh).transpose(1, 2).reshape(2, N_IMG, -1)
    assert float((out[:, N_TXT:].double() - want).abs().max()) < 1e-5
    assert torch.equal(out[:, :N_TXT], kernel(q, k, v, HEADS)[:, :N_TXT])     # text rows: the kernel's


def test_self_role_sees_the_renormalised_image_block_head_mean():
    q, k, v = qkv(b=1)
    sa = SelfAttentionMean((LATENT[0] // 2, LATENT[1] // 2))
    out = call_attention(q, k, v, {SELF_CALL_KEY: AttentionCall(0, [sa], latent_hw=LATENT)})
    assert torch.equal(out, kernel(q, k, v, HEADS))
    sa.end_step(0)
    block = reference_probs(q, k)[:, :, N_TXT:, N_TXT:]
    ref = (block / block.sum(-1, keepdim=True)).mean(1)
    assert sa.site == Site("joint", 1, 0) and sa.hw == (4, 6)
    assert float((sa.mean().double() - ref).abs().max()) < 1e-6


def test_other_override_keeps_the_output_where_maps_are_only_read():
    q, k, v = qkv()
    calls = []

    def foreign(func, *a, **kw):
        calls.append(1)
        return func(*a, **kw) * 2

    out = call_attention(q, k, v, {CALL_KEY: AttentionCall(0, [Capture(MapStore())], latent_hw=LATENT)},
                         inner=foreign)
    assert calls and torch.equal(out, 2 * kernel(q, k, v, HEADS))
    plain = call_attention(q, k, v, {}, inner=foreign)                     # no call: the foreign override alone
    assert torch.equal(plain, 2 * kernel(q, k, v, HEADS))


def test_block_replace_names_the_site_and_hands_the_image_stream_to_features():
    seen = {}

    def original(args):
        seen["to"] = args["transformer_options"]
        return {"txt": args["txt"] + 1, "img": args["img"] * 3}

    img, txt = torch.randn(2, N_IMG, 32), torch.randn(2, N_TXT, 32)
    feats = FeatureCall(sites=None, conds=frozenset({0, 1}), latent_hw=LATENT)
    out = joint_block({"img": img, "txt": txt, "vec": None, "transformer_options": {
        FEATURE_KEY: feats, "cond_or_uncond": [0, 1]}}, {"original_block": original}, index=3, n_blocks=4)
    assert seen["to"][JOINT_KEY] == (3, N_TXT) and torch.equal(out["img"], img * 3)
    f, hw = feats.features[(Site("joint", 3, 0), 1)]
    assert hw == (4, 6) and torch.equal(f, img[1:] * 3)


def test_patches_compose_over_other_packs_and_keep_theirs():
    def theirs(args, extra):
        return extra["original_block"](args)

    def their_override(func, *a, **kw):
        return func(*a, **kw)

    mo = {"transformer_options": {OVERRIDE: their_override,
                                  "patches_replace": {"dit": {("double_block", 1): theirs}}}}
    new = with_joint_patches(mo, 3)
    to = new["transformer_options"]
    assert to[OVERRIDE].keywords["inner"] is their_override
    assert to["patches_replace"]["dit"][("double_block", 1)].keywords["inner"] is theirs
    assert to["patches_replace"]["dit"][("double_block", 0)].keywords["inner"] is None
    assert mo["transformer_options"][OVERRIDE] is their_override          # the input options are not touched
    again = with_joint_patches(new, 3)["transformer_options"]
    assert again[OVERRIDE] is to[OVERRIDE]                                # installed once, not nested


@pytest.mark.parametrize("depth,parts", [(2, {"input": [], "middle": [0], "output": [1]}),
                                         (5, {"input": [0, 1], "middle": [2], "output": [3, 4]})])
def test_unet_block_names_keep_their_place_on_an_mmdit(depth, parts):
    sites = joint_sites(torch.nn.Module()) or [Site("joint", i, 0) for i in range(depth)]
    assert middle_block(depth) == parts["middle"][0]
    assert [s.id for s in select_sites(sites, "input,middle,output")] == list(range(depth))
    assert [s.id for s in select_sites(sites, "joint")] == list(range(depth))
    for name, ids in parts.items():
        if ids:
            assert [s.id for s in select_sites(sites, name)] == ids
        else:
            with pytest.raises(ValueError, match="matches no joint block"):
                select_sites(sites, name)
    assert [s.id for s in select_sites(sites, "joint.1.0")] == [1]
    with pytest.raises(ValueError):
        select_sites(sites, "output.3.0")


def test_partials_are_plain_functions_of_the_index():
    fn = with_joint_patches({}, 2)["transformer_options"]["patches_replace"]["dit"][("double_block", 1)]
    assert isinstance(fn, functools.partial) and fn.func is joint_block and fn.keywords["index"] == 1
