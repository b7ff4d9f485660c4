"""Inputs that only an API prompt (the headless runner, a script: no frontend validation) or a hand-made file can
send (issue 32): refused at queue time or from the file's header, naming the node, the input and the fix, instead of
a raw error deep inside or a silent default."""
import json
import os

import pytest
import safetensors.torch
import torch

from z2i.tests import test_asyrp_nodes, test_asyrp_train_nodes, test_pix2pix_zero
from z2i.tests.test_reliability_files import assert_message, run_error

pytestmark = pytest.mark.host


@pytest.mark.parametrize("case", ["scheduler", "variant", "map_precision", "guidance_form", "unit", "kind",
                                  "optimizer"])
def test_unknown_combo_values_are_refused_at_queue_time(host, checkpoints, case):
    """ComfyUI 0.3.75 does not check a V3 Combo's value; before: a raw ValueError (scheduler, unit, kind) or, for
    map_precision 'fp8', a silent fp32 run."""
    ck = checkpoints["sd15"]
    node, key, graph, target = {
        "scheduler": ("Z2I DDIM Inversion", "inv", test_pix2pix_zero.graph(ck, 0.1), "inv"),
        "variant": ("Z2I DDIM Inversion", "inv", test_pix2pix_zero.graph(ck, 0.1), "inv"),
        "map_precision": ("Z2I pix2pix-zero Sampler", "sampler", test_pix2pix_zero.graph(ck, 0.1), "s"),
        "guidance_form": ("Z2I pix2pix-zero Sampler", "sampler", test_pix2pix_zero.graph(ck, 0.1), "s"),
        "unit": ("Z2I Asyrp Sampler", "sampler", test_asyrp_nodes.graph(ck), "s"),
        "kind": ("Z2I Train h-space Direction", "train", test_asyrp_train_nodes.graph(ck), "train"),
        "optimizer": ("Z2I Train h-space Direction", "train", test_asyrp_train_nodes.graph(ck), "train"),
    }[case]
    bad = {"map_precision": "fp8"}.get(case, "nonsense")
    graph[key]["inputs"][case] = bad
    err = run_error(host, graph, [target])
    assert_message(err, node, case, f"unknown value '{bad}'", "use one of")


@pytest.mark.once
def test_pix2pix_zero_refuses_a_schedule_other_than_its_inversions(host, checkpoints):
    """The sampler with the inversion connected and sigmas from another step count or scheduler (before: each step
    silently paired with another level's reference)."""
    for sched, steps in (("ddim_uniform", 6), ("karras", 4)):
        p = test_pix2pix_zero.graph(checkpoints["sd15"], 0.1)
        p["sampler"]["inputs"]["inversion"] = ["inv", 1]
        p["sig"] = {"class_type": "BasicScheduler", "inputs": {"model": ["ckpt", 0], "scheduler": sched,
                                                             "steps": steps, "denoise": 1.0}}
        p["s"]["inputs"]["sigmas"] = ["sig", 0]
        err = run_error(host, p, ["s"])
        assert_message(err, "Z2I pix2pix-zero Sampler", "sigmas (of the sampler node)",
                       "steps, the inversion made 4" if steps != 4 else "is not on the inversion's schedule",
                       "connect DDIM Inversion's 'sigmas' output")
    ok = test_pix2pix_zero.graph(checkpoints["sd15"], 0.1)
    ok["sampler"]["inputs"]["inversion"] = ["inv", 1]
    assert torch.isfinite(host.run_prompt(ok, targets=["s"]).output("s", 0)["samples"]).all()


def _direction_file(host, name, channels, meta_channels):
    import folder_paths
    from z2i.guidance.asyrp import FORMAT
    folder = folder_paths.get_folder_paths("h_directions")[0]
    os.makedirs(folder, exist_ok=True)
    meta = {"family": "SD15", "channels": meta_channels, "mode": "derived", "spatial": [1, 1], "steps": None}
    safetensors.torch.save_file({"delta": torch.zeros(1, channels, 1, 1)}, os.path.join(folder, name),
                                metadata={"format": FORMAT, "implicit": "[]", "meta": json.dumps(meta)})
    return os.path.join(folder, name)


@pytest.fixture
def cleanup_files():
    made = []
    yield made
    for path in made:
        if os.path.exists(path):
            os.remove(path)


@pytest.mark.once
def test_h_direction_channels_are_checked(host, checkpoints, cleanup_files):
    """A 7-channel direction: refused from the header when its meta says otherwise; when it says 7 too, the Asyrp
    Sampler names the mismatch with the model's h-space (before: loaded, then a raw error while sampling)."""
    cleanup_files.append(_direction_file(host, "z2i_test_7ch_lied.safetensors", 7, 1280))
    lied = os.path.basename(cleanup_files[-1])
    err = run_error(host, {"load": {"class_type": "Z2I_LoadHDirection", "inputs": {"name": lied}}}, ["load"])
    assert "Z2I_LoadHDirection" in err or "h-space" in err
    assert "its meta says 1280 channels, its tensors have [7]" in err, err
    cleanup_files.append(_direction_file(host, "z2i_test_7ch.safetensors", 7, 7))
    honest = os.path.basename(cleanup_files[-1])
    p = test_asyrp_nodes.graph(checkpoints["sd15"])
    p["load"] = {"class_type": "Z2I_LoadHDirection", "inputs": {"name": honest}}
    p["sampler"]["inputs"]["direction"] = ["load", 0]
    err = run_error(host, p, ["s"])
    assert_message(err, "Z2I Asyrp Sampler", "direction", "it has 7 channels, this model's h-space has 320",
                   "derive or train the direction with this model")


def _large(p, side):
    p["scale"]["inputs"].update(width=side, height=side)
    return p


def test_size_guard_names_node_size_estimate_and_what_fits(host, checkpoints, monkeypatch):
    """Before any UNet call, a latent whose calls cannot fit the memory at hand is refused (issue 32: a 4096 px image
    ran the first inversion call for tens of minutes, or tried a 20 GiB allocation). The free memory is what ComfyUI
    reports (monkeypatched to 100 MB here); the need is ComfyUI's own estimate of one call (BaseModel.memory_required:
    about 0.6 GB at 512 px in fp32 on the CPU), and the largest side that fits scales with sqrt(free / need)."""
    import math

    import comfy.model_management
    p = _large(test_pix2pix_zero.graph(checkpoints["sd15"], 0.1, steps=2), 512)
    res = host.run_prompt(p, targets=["enc", "edit", "ckpt"])
    need = res.output("ckpt", 0).model.memory_required([1, 4, 64, 64])
    fits = int(512 * math.sqrt(100 * 2 ** 20 / need) // 64 * 64)
    monkeypatch.setattr(comfy.model_management, "get_free_memory", lambda *a, **k: 100 * 2 ** 20)
    err = run_error(host, p, ["inv"])
    assert_message(err, "Z2I DDIM Inversion", "latent", "a 512x512 px image (64x64 latent, 1 UNet row(s) per call)",
                   f"scale the image to at most {fits} px a side")
    assert f"needs about {need / 2 ** 30:.2f} GB, and 0.10 GB is available" in err, err
    monkeypatch.undo()
    host.run_prompt(p, targets=["inv"])                                     # fits with the real free memory
    monkeypatch.setattr(comfy.model_management, "get_free_memory", lambda *a, **k: 2 * need)
    err = run_error(host, p, ["s"])        # a plain call would fit; with the guided call's activations it does not
    assert_message(err, "Z2I pix2pix-zero Sampler", "latent_image (of the sampler node)",
                   "memory mode low) needs about", "at most")


@pytest.mark.parametrize("sampler", ["pix2pix-zero", pytest.param("zeroCon", marks=pytest.mark.once),
                                     pytest.param("pix2pix-zero batch 2", marks=pytest.mark.once)])
def test_region_masked_prompts_are_refused_by_name(host, checkpoints, sampler):
    """ConditioningSetMask (regional prompts) with the attention-guided samplers (issue 32: pix2pix-zero gave a
    silently wrong edit, two edit rows against one reference row, and crashed with a batch of two; zeroCon raised an
    IndexError): refused, naming the sampler, the input and the alternative."""
    from z2i.tests.helpers import two_image_batch
    p = test_pix2pix_zero.graph(checkpoints["sd15"], 0.1)
    if sampler == "zeroCon":
        p["sampler"] = dict(test_pix2pix_zero.ZEROCON)
    if sampler.endswith("batch 2"):
        p = two_image_batch(p, "ab", batch="batched")
    p["solid"] = {"class_type": "SolidMask", "inputs": {"value": 1.0, "width": 32, "height": 64}}
    p["region"] = {"class_type": "ConditioningSetMask", "inputs": {
        "conditioning": ["edit", 0], "mask": ["solid", 0], "set_cond_area": "default", "strength": 1.0}}
    p["both"] = {"class_type": "ConditioningCombine", "inputs": {"conditioning_1": ["region", 0],
                                                                 "conditioning_2": ["pos", 0]}}
    p["s"]["inputs"]["positive"] = ["both", 0]
    err = run_error(host, p, ["s"])
    node = "Z2I pix2pix-zeroCon Sampler" if sampler == "zeroCon" else "Z2I pix2pix-zero Sampler"
    assert_message(err, node, "positive (of the sampler node)", "carries a region mask (ConditioningSetMask)",
                   "Set Latent Noise Mask")
