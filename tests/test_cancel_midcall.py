"""Cancel inside a long UNet call (issue 32). Forward: ComfyUI's own ops check the interrupt flag before every
Linear / Conv (comfy/ops.py run_every_op, 0.3.75 and 0.8.0), so a Z2I call stops within one layer; the first test
pins that for the inversion and the guided samplers (it sets the flag from inside a layer and counts the layers that
start after it: counts, not seconds, so a busy machine cannot move it). Backward: a guided call's backward pass
runs no module forward, so nothing checked the flag until the next step; Z2I's guided runs now check it whenever
the backward pass takes a saved tensor back (guidance.autograd.checked_backward): the second test sets the flag as
the backward pass starts and asserts it never completes. The single op that cannot be interrupted is the attention
of one huge layer: the size guard refuses such sizes."""
import pytest
import torch

from z2i.tests import test_agg_nodes, test_pix2pix_zero

pytestmark = pytest.mark.host


def _layers(unet):
    from comfy.ldm.modules.attention import SpatialTransformer
    from comfy.ldm.modules.diffusionmodules.openaimodel import ResBlock
    return [m for m in unet.modules() if isinstance(m, (ResBlock, SpatialTransformer))]


@pytest.mark.parametrize("method,ordinal", [("pix2pix-zero", 3),
                                            pytest.param("pix2pix-zero", 30, marks=pytest.mark.once),
                                            pytest.param("inversion", 20, marks=pytest.mark.once),
                                            pytest.param("AGG", 45, marks=pytest.mark.once)])
def test_cancel_stops_the_unet_call_within_one_layer(host, checkpoints, method, ordinal):
    import comfy.model_management
    from z2i.headless.host import PromptInterrupted
    ck = checkpoints["sd15"]
    p = test_agg_nodes.graph(ck, weight=1.0, steps=3) if method == "AGG" else \
        test_pix2pix_zero.graph(ck, 0.1, steps=3)
    target = "inv" if method == "inversion" else "s"
    if method != "inversion":
        host.run_prompt(p, targets=["inv", "edit" if method != "AGG" else "tgt"])      # upstream cached
    model = host.run_prompt({"ckpt": p["ckpt"]}, targets=["ckpt"]).output("ckpt", 0)
    unet = model.model.diffusion_model
    params = {n: t for n, t in unet.named_parameters()}
    started = {"n": 0, "after": 0, "flag": False}

    def pre(module, args):
        started["n"] += 1
        if started["flag"]:
            started["after"] += 1
        if started["n"] == ordinal:
            comfy.model_management.interrupt_current_processing(True)
            started["flag"] = True

    hooks = [m.register_forward_pre_hook(pre) for m in _layers(unet)]
    try:
        p[target]["inputs"]["noise_seed" if target == "s" else "reg_seed"] = 7      # re-run only that node
        with pytest.raises(PromptInterrupted):
            host.run_prompt(p, targets=[target])
    finally:
        for h in hooks:
            h.remove()
        comfy.model_management.interrupt_current_processing(False)
    assert started["flag"], started
    assert started["after"] <= 1, started          # at most the layer between the flag and the next check
    assert all(t is params[n] for n, t in unet.named_parameters())
    assert not any("forward" in m.__dict__ for m in unet.modules())


@pytest.mark.parametrize("method", ["pix2pix-zero", pytest.param("AGG", marks=pytest.mark.once)])
def test_cancel_stops_a_guided_backward_pass(host, checkpoints, monkeypatch, method):
    """The flag is set when the guidance loss's gradient starts flowing back (a hook on the loss); the backward
    through the UNet must stop there (before issue 32 it ran to the end and the run stopped at the next step)."""
    import sys

    import comfy.model_management
    from z2i.headless.host import PromptInterrupted
    root = host.node_classes["Z2I_Pix2PixZeroSampler"].__module__.rsplit(".", 2)[0]
    autograd = sys.modules[root + ".guidance.autograd"]
    done = {"backward_started": 0, "backward_finished": 0}
    grad = autograd.LossScaler.grad

    def flagged(self, loss, inputs):
        def start(g):
            done["backward_started"] += 1
            comfy.model_management.interrupt_current_processing(True)
            return g
        loss.register_hook(start)
        out = grad(self, loss, inputs)
        done["backward_finished"] += 1
        return out

    monkeypatch.setattr(autograd.LossScaler, "grad", flagged)
    ck = checkpoints["sd15"]
    p = test_agg_nodes.graph(ck, weight=1.0, steps=3) if method == "AGG" else test_pix2pix_zero.graph(ck, 0.1, steps=3)
    host.run_prompt(p, targets=["inv"])
    p["s"]["inputs"]["noise_seed"] = 11
    try:
        with pytest.raises(PromptInterrupted):
            host.run_prompt(p, targets=["s"])
    finally:
        comfy.model_management.interrupt_current_processing(False)
    assert done == {"backward_started": 1, "backward_finished": 0}, done
