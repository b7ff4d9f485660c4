"""PatchNCE (pix2pix-zeroCon Eq. 15-16) against a hand-written cross-entropy; minimal for identical features."""
import math

import torch
import torch.nn.functional as F

from z2i.attention_patches.features import FEATURE_KEY, FeatureCall, attn1_output_capture
from z2i.attention_patches.sites import Site
from z2i.guidance.losses import patch_nce_loss

SITE = Site("output", 6, 0)


def feats(seed, b=2, h=4, w=4, c=8):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, h * w, c, generator=g)


def test_equals_hand_written_cross_entropy():
    ref, edit = feats(0), feats(1)
    loss = patch_nce_loss({(SITE, 0): (ref, (4, 4))}, {(SITE, 0): (edit, (4, 4))}, n_patches=16, tau=0.07,
                          scales=(1,), generator=torch.Generator().manual_seed(3))
    ids = torch.randperm(16, generator=torch.Generator().manual_seed(3))
    total = 0.0
    for b in range(2):
        q = F.normalize(ref[b, ids], dim=-1)
        e = F.normalize(edit[b, ids], dim=-1)
        for i in range(16):
            logits = [float(q[i] @ e[j]) / 0.07 for j in range(16)]
            total += -(logits[i] - math.log(sum(math.exp(v) for v in logits)))   # positive on the diagonal
    assert abs(float(loss) - total / 16) < 1e-4       # per image: mean over its 16 locations; summed over 2


def test_minimal_for_identical_features():
    ref = feats(0)
    same = patch_nce_loss({(SITE, 0): (ref, (4, 4))}, {(SITE, 0): (ref.clone(), (4, 4))}, 16,
                          generator=torch.Generator().manual_seed(0))
    for k in range(5):
        other = ref + 0.5 * feats(10 + k)
        worse = patch_nce_loss({(SITE, 0): (ref, (4, 4))}, {(SITE, 0): (other, (4, 4))}, 16,
                               generator=torch.Generator().manual_seed(0))
        assert worse > same


def test_gradient_flows_to_edit_side_only():
    ref = feats(0).requires_grad_(True)
    edit = feats(1).requires_grad_(True)
    patch_nce_loss({(SITE, 0): (ref, (4, 4))}, {(SITE, 0): (edit, (4, 4))}, 8).backward()
    assert ref.grad is None and edit.grad is not None and edit.grad.abs().sum() > 0


def test_capture_patch_stores_per_cond_and_site():
    n = torch.arange(4 * 3 * 2, dtype=torch.float32).reshape(4, 3, 2)
    call = FeatureCall(sites=frozenset({SITE}), conds=frozenset({0}))
    opts = {FEATURE_KEY: call, "block": ("output", 6), "block_index": 0, "cond_or_uncond": [1, 0],
            "activations_shape": [4, 2, 1, 3]}
    assert attn1_output_capture(n, opts) is n
    f, hw = call.features[(SITE, 0)]
    assert torch.equal(f, n[2:]) and hw == (1, 3) and (SITE, 1) not in call.features
    attn1_output_capture(n, {**opts, "block": ("input", 1)})
    assert len(call.features) == 1


def test_each_image_gets_its_single_image_loss_and_shared_locations():
    ref, edit = feats(0), feats(1)
    both = patch_nce_loss({(SITE, 0): (ref, (4, 4))}, {(SITE, 0): (edit, (4, 4))}, 8,
                          generator=torch.Generator().manual_seed(5))
    alone = sum(float(patch_nce_loss({(SITE, 0): (ref[i:i + 1], (4, 4))}, {(SITE, 0): (edit[i:i + 1], (4, 4))}, 8,
                                     generator=torch.Generator().manual_seed(5))) for i in range(2))
    assert abs(float(both) - alone) < 1e-5 * alone
    ids: dict = {}
    first = patch_nce_loss({(SITE, 0): (ref, (4, 4))}, {(SITE, 0): (edit, (4, 4))}, 8,
                           generator=torch.Generator().manual_seed(5), ids=ids)
    again = patch_nce_loss({(SITE, 0): (ref, (4, 4))}, {(SITE, 0): (edit, (4, 4))}, 8,
                           generator=torch.Generator().manual_seed(99), ids=ids)     # reuses the stored locations
    assert len(ids) == 2 and float(first) == float(again)
