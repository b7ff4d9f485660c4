"""Memory of a guided call (issues 19, 28): in memory mode low the large layers' activations are recomputed in the
backward pass instead of kept (guidance.autograd.checkpointed via nodes._compose.gradients_through), and
pix2pix-zero guides its two halves one after the other. The tests lower the size from which this applies to every layer of the tiny
64 px graphs and check that every gradient-guided method gives the same edit as with every activation kept, alone
and inside a graph with a ControlNet, FreeU_V2 (an in-place foreign patch) and ToMe (random token merging).
"""
import sys

import pytest
import torch

from z2i.tests import test_agg_nodes, test_asyrp_train_nodes, test_pix2pix_zero
from z2i.tests.helpers import two_image_batch
from z2i.tests.test_agg_nodes import lora_file  # noqa: F401  (fixture: writes the test LoRA)
from z2i.tests.test_composition import _at_128, _samples as composed_samples, freeu_v2, patched_after_checkpoint, \
    splice_controlnet, splice_lora

pytestmark = pytest.mark.host


def _compose(host):
    name = host.node_classes["Z2I_Pix2PixZeroSampler"].__module__          # the pack as the host loaded it
    return sys.modules[name.rsplit(".", 1)[0] + "._compose"]


@pytest.fixture
def checkpoint_everything(host, monkeypatch):
    """Every layer of every guided call checkpointed (CHECKPOINT_POSITIONS 1), counting the recomputations."""
    compose = _compose(host)
    mod = sys.modules[compose.__name__.rsplit(".", 2)[0] + ".guidance.autograd"]
    counts = {"recomputed": 0}
    original = mod._RECOMPUTING

    class Counting:
        def get(self):
            return original.get()

        def set(self, v):
            counts["recomputed"] += 1
            return original.set(v)

        def reset(self, token):
            original.reset(token)

    monkeypatch.setattr(mod, "_RECOMPUTING", Counting())

    guided = sys.modules[compose.__name__.rsplit(".", 1)[0] + "._guided"]

    def switch(value):           # memory mode low with every layer checkpointed, or fast
        monkeypatch.setattr(compose, "CHECKPOINT_POSITIONS", 1 if value else 32 * 32)
        monkeypatch.setitem(guided.DEFAULTS, "memory", "low" if value else "fast")
    switch(False)
    return switch, counts


def _mode_of_defaults(host, p):
    """The GPU Settings node two_image_batch inserts, set to the memory mode the fixture switched to."""
    guided = sys.modules[_compose(host).__name__.rsplit(".", 1)[0] + "._guided"]
    p["z2i_settings"]["inputs"]["memory"] = guided.DEFAULTS["memory"]
    return p


def _rel(a, b):
    return float((a - b).norm() / b.norm())


def _samples(host, p):
    return host.run_prompt(p, targets=["s"], fresh_cache=True).output("s", 0)["samples"]


# 3 steps: the first step of pix2pix-zero's code form has no caption-half gradient (x_u = the reference), so the
# later steps carry both halves' backward passes
P2P = lambda ckpt: test_pix2pix_zero.graph(ckpt, 0.1, steps=3)  # noqa: E731
ZEROCON = lambda ckpt: test_pix2pix_zero.graph(ckpt, 0.1, steps=3,  # noqa: E731
                                               sampler=dict(test_pix2pix_zero.ZEROCON))
AGG = lambda ckpt: test_agg_nodes.graph(ckpt, weight=1.0, steps=3)  # noqa: E731


@pytest.mark.parametrize("method", ["pix2pix-zero", *(pytest.param(m, marks=pytest.mark.once)
                                                     for m in ("zeroCon", "AGG", "pix2pix-zero, two images"))])
def test_recomputed_activations_give_the_same_edit(host, checkpoints, checkpoint_everything, method):
    """Checkpointing recomputes the same operations on the same frozen per-call state: the edit is the same to
    float rounding (pix2pix-zero also guides its halves one by one then, which changes the kernels' batch). With a
    batch of two different images each row is evaluated alone, and its recomputation must see its own row."""
    switch, counts = checkpoint_everything
    build = {"pix2pix-zero": P2P, "zeroCon": ZEROCON, "AGG": AGG,
             "pix2pix-zero, two images":
                 lambda ckpt: _mode_of_defaults(host, two_image_batch(P2P(ckpt), "ab"))}[method]
    kept = _samples(host, build(checkpoints["sd15"]))
    assert counts["recomputed"] == 0
    switch(True)
    recomputed = _samples(host, build(checkpoints["sd15"]))
    assert counts["recomputed"] > 0, "no layer was recomputed"
    assert _rel(recomputed, kept) < 1e-5, _rel(recomputed, kept)


def test_h_direction_training_with_recomputed_activations(host, checkpoints, checkpoint_everything):
    switch, counts = checkpoint_everything
    p = test_asyrp_train_nodes.graph(checkpoints["sd15"], iterations=2, steps=4)
    kept = host.run_prompt(p, targets=["train"], fresh_cache=True).output("train", 0)
    switch(True)
    recomputed = host.run_prompt(p, targets=["train"], fresh_cache=True).output("train", 0)
    assert counts["recomputed"] > 0
    h, t = torch.randn(1, 320, 1, 1, generator=torch.Generator().manual_seed(0)), torch.tensor([600.0])
    a, b = kept.delta_for(h, t), recomputed.delta_for(h, t)
    assert _rel(b, a) < 1e-4, _rel(b, a)           # a trained MLP: backward sums in thread order


@pytest.mark.parametrize("method", ["pix2pix-zero", "AGG"])
def test_recomputation_inside_a_graph_with_controlnet_lora_freeu_and_tome(host, checkpoints, checkpoint_everything,
                                                                          method, monkeypatch, lora_file):
    """A LoRA on the MODEL (its patched weights are what the recomputation runs); the ControlNet's layers are checkpointed too (it runs inside the guided call); FreeU_V2 writes in place into
    activations; ToMe draws random token merges from the global RNG inside the layers, which the recomputation must
    draw again identically (torch's preserve_rng_state). 128 px: FreeU needs a deepest level larger than 1x1.
    pix2pix-zero guides its halves one by one in both runs here (paired or not, ToMe draws different merges): the
    graph's ControlNet makes each half its own call."""
    switch, counts = checkpoint_everything
    build = _at_128({"pix2pix-zero": P2P, "AGG": AGG}[method])
    p = patched_after_checkpoint(splice_lora(splice_controlnet(build(checkpoints["sd15"]))), "ToMe")

    def run():        # the upstream nodes take no gradient: only the sampling (not cached) differs
        return composed_samples(host, p, freeu_v2)

    kept = run()
    switch(True)
    recomputed = run()
    assert counts["recomputed"] > 0
    assert torch.isfinite(kept).all() and torch.isfinite(recomputed).all()
    assert _rel(recomputed, kept) < 1e-5, _rel(recomputed, kept)
