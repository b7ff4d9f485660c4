"""SD3 (MMDiT, rectified flow) in the real host: the tiny checkpoint, DDIM inversion and the DDIM sampler on
flow sigmas, and the clear refusals that remain (issue 17; the methods on SD3: tests/test_sd3_methods.py)."""
import math

import pytest
import safetensors.torch
import torch

pytestmark = pytest.mark.host

SD3 = "z2i-tiny-sd3.safetensors"
SCALE, SHIFT = 1.5305, 0.0609          # comfy.latent_formats.SD3


def smooth_latent(seed=0, size=8, batch=1, channels=16):
    g = torch.Generator().manual_seed(seed)
    y, x = torch.meshgrid(torch.linspace(0, 1, size), torch.linspace(0, 1, size), indexing="ij")
    chans = []
    for _ in range(batch * channels):
        a, b, c, d = torch.rand(4, generator=g) * 2 * math.pi
        chans.append(torch.sin(2 * x + a) * torch.cos(3 * y + b) + 0.5 * torch.sin(4 * x * y + c + d))
    z = torch.stack(chans).reshape(batch, channels, size, size)
    return (z - z.mean()) / z.std()


@pytest.fixture(scope="module")
def latent_name(host):
    import folder_paths
    name = "z2i_test_smooth_sd3.latent"
    raw = smooth_latent() / SCALE + SHIFT                    # model space (process_latent_in) = the smooth latent
    safetensors.torch.save_file({"latent_tensor": raw.contiguous(), "latent_format_version_0": torch.tensor([])},
                                f"{folder_paths.get_input_directory()}/{name}")
    return name


def graph(latent_name, steps=8, refine=0, sampler=None, add_noise=False, scheduler="simple"):
    return {
        "ckpt": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": SD3}},
        "pos": {"class_type": "CLIPTextEncode", "inputs": {"text": "a photo of a cat on a sofa", "clip": ["ckpt", 1]}},
        "lat": {"class_type": "LoadLatent", "inputs": {"latent": latent_name}},
        "inv": {"class_type": "Z2I_DDIMInversion", "inputs": {
            "model": ["ckpt", 0], "positive": ["pos", 0], "latent": ["lat", 0], "steps": steps, "scheduler": scheduler,
            "variant": "current level", "cfg": 1.0, "denoise": 1.0, "refine_iterations": refine, "regularize": False,
            "reg_lambda": 20.0, "reg_iterations": 5, "reg_seed": 0}},
        "ddim": sampler or {"class_type": "Z2I_DDIMSampler", "inputs": {"eta": 0.0}},
        "rec": {"class_type": "SamplerCustom", "inputs": {
            "model": ["ckpt", 0], "add_noise": add_noise, "noise_seed": 3, "cfg": 1.0, "positive": ["pos", 0],
            "negative": ["pos", 0], "sampler": ["ddim", 0], "sigmas": ["inv", 2], "latent_image": ["inv", 0]}},
    }


def recon_error(host, latent_name, **kw):
    res = host.run_prompt(graph(latent_name, **kw), targets=["rec", "lat", "inv"])
    a, b = res.output("lat", 0)["samples"], res.output("rec", 0)["samples"]
    return ((a - b).norm() / a.norm()).item(), res


def test_tiny_sd3_loads_as_sd3_with_flow_sampling(host):
    res = host.run_prompt({"ckpt": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": SD3}}},
                          targets=["ckpt"])
    model, clip, vae = (res.output("ckpt", i) for i in range(3))
    assert type(model.model.model_config).__name__ == "SD3" and model.model.model_type.name == "FLOW"
    assert hasattr(model.model.diffusion_model, "joint_blocks") and len(model.model.diffusion_model.joint_blocks) == 2
    assert model.get_model_object("latent_format").latent_channels == 16 and vae.latent_channels == 16
    enc = clip.cond_stage_model
    assert enc.clip_l is not None and enc.clip_g is not None and enc.t5xxl is None   # no T5
    ms = model.get_model_object("model_sampling")
    assert abs(float(ms.sigma_max) - 1.0) < 1e-6 and abs(float(ms.shift) - 3.0) < 1e-6


def test_inversion_reaches_pure_noise_and_reconstructs(host, latent_name):
    """The inverted latent at sigma 1 is the flow state itself (unit-variance noise, finite), the trajectory is in
    model space, and DDIM sampling from it reconstructs; the error falls with the step count and with refinement.
    Measured on the tiny SD3 (relative to the latent): 8 steps 5.3e-2, 32 steps 1.4e-2, 8 steps with 4 refinements
    6.4e-4."""
    e8, res = recon_error(host, latent_name, steps=8)
    inv = res.output("inv", 1)
    noise = res.output("inv", 0)["samples"]
    assert torch.isfinite(noise).all() and noise.shape == (1, 16, 8, 8)
    assert float(inv.sigmas[0]) == 1.0 and float(inv.sigmas[-1]) == 0.0
    assert torch.allclose(inv.trajectory.latents[-1], (noise - SHIFT) * SCALE, rtol=1e-5, atol=1e-5)
    assert 0.3 < float(inv.trajectory.latents[-1].std()) < 3.0
    e32, _ = recon_error(host, latent_name, steps=32)
    refined, _ = recon_error(host, latent_name, steps=8, refine=4)
    assert e32 < 0.5 * e8, (e8, e32)
    assert refined < 0.5 * e8, (e8, refined)


def test_ddim_sampler_at_eta_0_is_cores_euler_on_flow(host, latent_name):
    """From the same noise (add_noise on, core's noise scaling), the Z2I DDIM sampler's flow step equals core's
    Euler sampler to float rounding (the same update written as (1 - sigma') x0 + sigma' eps): measured 1.4e-7
    relative, asserted to 1e-5."""
    ours = host.run_prompt(graph(latent_name, add_noise=True), targets=["rec"]).output("rec", 0)["samples"]
    euler = host.run_prompt(graph(latent_name, add_noise=True, sampler={
        "class_type": "KSamplerSelect", "inputs": {"sampler_name": "euler"}}), targets=["rec"]).output("rec", 0)["samples"]
    rel = ((ours - euler).norm() / euler.norm()).item()
    assert rel < 1e-5, rel


def test_the_node_that_needs_a_unet_refuses_sd3_clearly(host, latent_name):
    """h-direction training is the one node not ported to SD3: it says so, naming what to use instead."""
    res = host.run_prompt(graph(latent_name), targets=["ckpt"])
    node = host.node_classes["Z2I_HDirectionTrain"]
    with pytest.raises(ValueError) as err:
        node.execute(model=res.output("ckpt", 0), vae=None, clip_loss_model=None, latent=None, positive=None,
                     source_text="a", target_text="b", kind="global", steps=4, edit_until=0.5, iterations=1, lr=0.1,
                     lambda_clip=1.0, lambda_recon=1.0, hidden=8, seed=0)
    text = str(err.value)
    assert "h-space Direction Train" in text and "SD3" in text and "Direction From Prompts" in text


def test_diffusers_variant_is_refused_on_sd3(host, latent_name):
    p = graph(latent_name)
    p["inv"]["inputs"]["variant"] = "diffusers (exact)"
    with pytest.raises(Exception) as err:
        host.run_prompt(p, targets=["inv"])
    assert "SD3" in str(err.value) and "current level" in str(err.value)


def test_edit_direction_on_sd3_conditioning_moves_the_clip_parts_only(host, latent_name):
    """SD3's context is CLIP-L (768) and CLIP-G (1280) side by side, zero-padded to 4096 without T5, plus the
    pooled L+G vector (2048). The direction (target minus source sentence means) lives in the two CLIP parts and
    the pooled vector, is exactly zero on the padding, and an edit with it (unguided, from the inverted noise)
    differs from the reconstruction."""
    p = graph(latent_name, steps=4)
    p["dir"] = {"class_type": "Z2I_EditDirection", "inputs": {"clip": ["ckpt", 1], "source": "cat", "target": "dog",
                                                              "num_sentences": 4, "seed": 0}}
    p["edit"] = {"class_type": "Z2I_ApplyEditDirection", "inputs": {"conditioning": ["pos", 0],
                                                                      "direction": ["dir", 0], "strength": 1.0}}
    p["edited"] = {"class_type": "SamplerCustom", "inputs": {**p["rec"]["inputs"], "positive": ["edit", 0]}}
    res = host.run_prompt(p, targets=["rec", "edited", "dir", "edit", "pos"])
    d = res.output("dir", 0)
    assert d.delta.shape[-1] == 4096 and d.pooled is not None and d.pooled.shape[-1] == 2048
    assert float(d.delta[..., :768].abs().max()) > 0 and float(d.delta[..., 768:2048].abs().max()) > 0
    assert float(d.delta[..., 2048:].abs().max()) == 0.0
    base, edited = res.output("pos", 0)[0], res.output("edit", 0)[0]
    assert torch.allclose(edited[0] - base[0], d.delta.reshape(edited[0].shape[1:]).to(base[0]), atol=1e-5)
    assert torch.allclose(edited[1]["pooled_output"] - base[1]["pooled_output"], d.pooled.to(base[0]), atol=1e-5)
    a, b = res.output("rec", 0)["samples"], res.output("edited", 0)["samples"]
    assert ((a - b).norm() / a.norm()).item() > 1e-3
