"""AGG in the real host: zero guidance = DDIM, the structure loss falls, LoRA-patched models, determinism."""
import os

import pytest
import safetensors.torch
import torch

from z2i.tests.helpers import (EXACT_BATCH_TOL, batch_spread, inverted_image_graph, run_sampler_with_stats,
                               two_image_batch)

pytestmark = pytest.mark.host


def graph(ckpt, weight=0.1, steps=4, model=("ckpt", 0), sampler=None):
    p = inverted_image_graph(ckpt, "a photo of a cat on a sofa", key="src", steps=steps, model=model)
    p.update({
        "tgt": {"class_type": "CLIPTextEncode", "inputs": {"text": "a watercolor painting of a cat on a sofa",
                                                           "clip": ["ckpt", 1]}},
        "sampler": sampler or {"class_type": "Z2I_AGGSampler", "inputs": {
            "inversion": ["inv", 1], "lambda_reg": weight, "guided_until": 1.0, "masked_until": 1.0,
            "dds_steps": 10, "dds_lr": 0.01, "eta": 0.0}},
        "s": {"class_type": "SamplerCustom", "inputs": {
            "model": list(model), "add_noise": False, "noise_seed": 0, "cfg": 5.0, "positive": ["tgt", 0],
            "negative": ["src", 0], "sampler": ["sampler", 0], "sigmas": ["inv", 2], "latent_image": ["inv", 0]}},
    })
    return p


def run_with_stats(host, p):
    return run_sampler_with_stats(host, p, "tgt", "src", 5.0)


def test_zero_guidance_is_plain_ddim(host, checkpoints):
    a = host.run_prompt(graph(checkpoints["sd15"], weight=0.0), targets=["s"]).output("s", 0)["samples"]
    b = host.run_prompt(graph(checkpoints["sd15"], sampler={"class_type": "Z2I_DDIMSampler", "inputs": {"eta": 0.0}}),
                        targets=["s"]).output("s", 0)["samples"]
    assert torch.equal(a, b)


def test_gradient_reaches_the_latent_and_each_step_descends(host, checkpoints):
    out, stats = run_with_stats(host, graph(checkpoints["sd15"], weight=1.0))
    assert len(stats["mcg_loss"]) == 3                      # the top level has no saved x0*
    assert all(b < a for a, b in zip(stats["mcg_loss"], stats["mcg_loss_after"])), stats
    for losses in stats["dds_losses"]:
        assert losses[-1] < losses[0]
    plain = host.run_prompt(graph(checkpoints["sd15"], weight=0.0), targets=["s"]).output("s", 0)["samples"]
    assert ((out - plain).norm() / plain.norm()).item() > 1e-3


@pytest.mark.numeric
def test_each_image_of_a_batch_is_guided_as_alone(host, checkpoints):
    """[A, B] in one batch gives each image the result it gets alone: the L1 is a per-image mean summed over the
    batch (a batch mean gave each image 1/B of its MCG step: spread 2e-2 at lambda_reg 1)."""
    spread = batch_spread(lambda which: host.run_prompt(two_image_batch(graph(checkpoints["sd15"], weight=1.0), which),
                                                        targets=["s"]))
    assert spread <= EXACT_BATCH_TOL, spread


def test_deterministic(host, checkpoints):
    p = graph(checkpoints["sd15"])
    a = host.run_prompt(p, targets=["s"]).output("s", 0)["samples"]
    p["s"]["inputs"]["noise_seed"] = 3      # unused with eta 0 and add_noise off: re-runs only the sampler
    assert torch.equal(a, host.run_prompt(p, targets=["s"]).output("s", 0)["samples"])


@pytest.fixture(scope="module")
def lora_file(host):
    """A LoRA on two cross-attention projections, in ComfyUI's LDM key format, written by the test."""
    import folder_paths
    g = torch.Generator().manual_seed(0)
    sd = {}
    for key in ("input_blocks_1_1_transformer_blocks_0_attn2_to_q", "output_blocks_11_1_transformer_blocks_0_attn2_to_k"):
        sd[f"lora_unet_{key}.lora_down.weight"] = torch.randn(4, 320, generator=g) * 0.1
        sd[f"lora_unet_{key}.lora_up.weight"] = torch.randn(320, 4, generator=g) * 0.1
        sd[f"lora_unet_{key}.alpha"] = torch.tensor(4.0)
    path = os.path.join(folder_paths.get_folder_paths("loras")[0], "z2i_test_lora.safetensors")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    safetensors.torch.save_file(sd, path)
    return "z2i_test_lora.safetensors"


@pytest.mark.parametrize("sampler", ["agg", "p2pz", "zerocon"])
def test_lora_patched_model(host, checkpoints, lora_file, sampler):
    p = graph(checkpoints["sd15"], model=("lora", 0))
    p["lora"] = {"class_type": "LoraLoaderModelOnly", "inputs": {"model": ["ckpt", 0], "lora_name": lora_file,
                                                                 "strength_model": 1.0}}
    if sampler == "p2pz":
        p["sampler"] = {"class_type": "Z2I_Pix2PixZeroSampler", "inputs": {"xa_guidance": 0.1,
                                                                          "layers": "input,middle,output",
                                                                          "map_precision": "fp32"}}
    if sampler == "zerocon":
        p["sampler"] = {"class_type": "Z2I_Pix2PixZeroConSampler", "inputs": {
            "lambda_step": 0.05, "lambda_c": 1.0, "lambda_e": 0.5, "feature_layers": "output", "n_patches": 16,
            "tau": 0.07, "seed": 0, "layers": "input,middle,output"}}
    res = host.run_prompt(p, targets=["s"])
    out = res.output("s", 0)["samples"]
    assert torch.isfinite(out).all()
    base = host.run_prompt(graph(checkpoints["sd15"]) if sampler == "agg" else {
        **p, "s": {**p["s"], "inputs": {**p["s"]["inputs"], "model": ["ckpt", 0]}}}, targets=["s"]).output("s", 0)
    assert not torch.equal(out, base["samples"])            # the LoRA is in effect


def style_graph(ckpt, lambda_reg=0.1, lambda_style=1.0, cutouts=0):
    p = graph(ckpt, weight=lambda_reg)
    p["oc"] = {"class_type": "Z2I_OpenCLIPLoader", "inputs": {"name": "z2i-tiny-clip.safetensors",
                                                              "architecture": "auto (config beside the weights)"}}
    p["sampler"]["inputs"].update({"style_clip": ["oc", 0], "vae": ["ckpt", 2], "style_source": "a photo",
                                   "style_target": "an oil painting", "lambda_style": lambda_style,
                                   "cutouts": cutouts})
    p["s"]["inputs"]["positive"] = ["src", 0]          # text-guided without a target prompt
    return p


def test_clip_style_loss_descends_through_vae_and_unet(host, checkpoints):
    out, stats = run_sampler_with_stats(host, style_graph(checkpoints["sd15"], lambda_reg=0.0), "src", "src", 5.0)
    assert len(stats["mcg_loss"]) == 4                      # the style loss also guides the top step
    assert all(b < a for a, b in zip(stats["mcg_loss"], stats["mcg_loss_after"])), stats
    assert all(losses[-1] < losses[0] for losses in stats["dds_losses"]), stats["dds_losses"]
    plain = host.run_prompt(graph(checkpoints["sd15"], weight=0.0), targets=["s"]).output("s", 0)["samples"]
    plain_src = host.run_prompt({**graph(checkpoints["sd15"], weight=0.0), "s": {**style_graph(checkpoints["sd15"])["s"]}},
                                targets=["s"]).output("s", 0)["samples"]
    assert ((out - plain_src).norm() / plain_src.norm()).item() > 1e-3 and not torch.equal(out, plain)


def test_clip_style_loss_is_seeded(host, checkpoints):
    p = style_graph(checkpoints["sd15"], cutouts=2)
    a = host.run_prompt(p, targets=["s"]).output("s", 0)["samples"]
    # Re-run everything with the same inputs (a fresh cache): the same seed draws the same cutouts, and the guided
    # steps, their backward passes included, are bit-for-bit repeatable at a fixed thread count, idle or busy
    # (tests/conftest.py; the spread measured under load is in docs/DEVELOPING.md). The old version nudged dds_lr
    # by 1e-5 to force a re-run: a real change that AGG's DDS loop amplified to 2.9e-3 on a busy machine.
    b = host.run_prompt(p, targets=["s"], fresh_cache=True).output("s", 0)["samples"]
    rel = lambda u, v: ((u - v).norm() / v.norm()).item()  # noqa: E731
    assert torch.equal(a, b), rel(a, b)
    p["s"]["inputs"]["noise_seed"] = 7                      # other cutouts
    assert rel(host.run_prompt(p, targets=["s"]).output("s", 0)["samples"], a) > 1e-3


def test_clip_style_loss_errors_name_the_input(host, checkpoints):
    p = style_graph(checkpoints["sd15"])
    del p["sampler"]["inputs"]["vae"]
    with pytest.raises(Exception, match="AGG Sampler.*'vae'"):
        host.run_prompt(p, targets=["s"])
    p = style_graph(checkpoints["sd15"])
    p["oc"]["inputs"]["architecture"] = "RN50"
    with pytest.raises(Exception, match="open_clip.*'architecture'.*do not fit RN50"):
        host.run_prompt(p, targets=["oc"])


def test_open_clip_loader_reads_the_file(host):
    import folder_paths
    import safetensors.torch
    res = host.run_prompt({"oc": {"class_type": "Z2I_OpenCLIPLoader", "inputs": {
        "name": "z2i-tiny-clip.safetensors", "architecture": "auto (config beside the weights)"}}}, targets=["oc"])
    enc = res.output("oc", 0)
    ref = safetensors.torch.load_file(folder_paths.get_full_path("open_clip", "z2i-tiny-clip.safetensors"))
    sd = enc.model.state_dict()
    assert all(torch.equal(sd[k].cpu(), v) for k, v in ref.items()) and enc.image_size == 32
    assert not any(p.requires_grad or p.is_inference() for p in enc.model.parameters())
