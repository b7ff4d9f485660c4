"""Reference parity: our nodes reproduce diffusers' StableDiffusionPix2PixZeroPipeline (invert() + __call__())
on the same tiny SD1.5 weights, converted locally (tools/peer_pix2pix_zero.py checks the conversion), with the
matching settings: the inversion's "diffusers (exact)" variant with its regulariser (lambda 20, 5 x 5 rolls, same
seed), the pix2pix-zero sampler's default "both halves (official code)" form, negative = caption on both sides,
the same edit direction, cfg and guidance step (shared/design/reference-parity.md section 2).

Compared stage by stage, each as max |difference| over the reference latent's std:
1. the inverted noise x_T (ours read in diffusers' units: x / sqrt(1 + sigma_max^2), times the latent scale);
2. the edit alone, both started from diffusers' x_T;
3. the whole edit, each from its own x_T.
diffusers is a test-and-benchmark dependency installed by tools/setup.sh into its own folder; the pack never
imports it.

The schedule: diffusers builds alphas_cumprod by a float32 cumprod, ComfyUI in float64 rounded once to float32
sigmas; the two differ by up to 1.3e-5 relative (at sigma(0), 1.6e-6 at sigma(1)). That is a property of the two
libraries, not of the algorithms, so diffusers' two schedulers are handed ComfyUI's schedule (alphas_cumprod =
1 / (1 + sigma^2) of the model's sigmas). (With diffusers' stock schedule the numbers below barely move.)

Tolerances, measured: both sides compute in float32 along different rounding paths (sigma space vs VP space),
~1e-7 relative per operation, and the tiny random UNet (q/k sharpened for peaky maps) amplifies input
differences strongly: our own regularised inversion turns a 1e-7 relative perturbation of its input latent into
3.5e-5 (64 px) to 4.1e-5 (128 px) relative change of x_T (1.1e-5 without the regulariser). Measured against
diffusers: x_T 3.7e-5 / 8.7e-5 / 5.8e-5 (64 px 10 steps / 64 px 50 steps / 128 px 10 steps), the edit alone
6.3e-6 / 3.2e-6 / 1.1e-5, end to end 5.1e-5 / 1.03e-4 / 1.14e-4. So x_T and the edit alone are held to 1e-4
(the edit alone sits 10x below it), and the end-to-end latent, which carries x_T's rounding amplified by the
guided edit, to 2e-4: about 2x the largest measured value, and far below an algorithmic difference (the test
asserts the single-latent form from the same x_T lands more than 2e-3 away).
"""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from z2i.tests.helpers import inverted_image_graph

pytestmark = [pytest.mark.host, pytest.mark.numeric]

TOOLS = Path(__file__).resolve().parents[1] / "tools"
CAPTION = "a photo of a cat on a sofa"
CFG, LAM, SEED = 5.0, 0.1, 3
TOL = 1e-4
TOL_END_TO_END = 2e-4


def _graph(ckpt: str, size: int, steps: int) -> dict:
    p = inverted_image_graph(ckpt, CAPTION, steps=steps, size=size)
    p["inv"]["inputs"].update({"variant": "diffusers (exact)", "regularize": True, "reg_lambda": 20.0,
                               "reg_iterations": 5, "reg_seed": SEED})
    p.update({
        "dir": {"class_type": "Z2I_EditDirection",
                "inputs": {"clip": ["ckpt", 1], "source": "cat", "target": "dog", "num_sentences": 4, "seed": 0}},
        "edit": {"class_type": "Z2I_ApplyEditDirection",
                 "inputs": {"conditioning": ["pos", 0], "direction": ["dir", 0], "strength": 1.0}},
        "sampler": {"class_type": "Z2I_Pix2PixZeroSampler",
                    "inputs": {"xa_guidance": LAM, "layers": "input,middle,output", "map_precision": "fp32"}},
        "s": {"class_type": "SamplerCustom", "inputs": {
            "model": ["ckpt", 0], "add_noise": False, "noise_seed": 0, "cfg": CFG, "positive": ["edit", 0],
            "negative": ["pos", 0], "sampler": ["sampler", 0], "sigmas": ["inv", 2], "latent_image": ["inv", 0]}},
    })
    return p


@pytest.fixture(scope="module")
def peer(host, checkpoints):
    if str(TOOLS) not in sys.path:
        sys.path.insert(0, str(TOOLS))
    import peer_pix2pix_zero
    peer_pix2pix_zero.ensure_bench_deps()          # installed by tools/setup.sh: here only put on sys.path
    return peer_pix2pix_zero


def _rel(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return float((ours.float() - ref.float()).abs().max() / ref.float().std())


# ~40-150 s each on 2 idle cores; a busy machine made the 50-step case pass 900 s (the suite's default timeout)
@pytest.mark.timeout(2700)
# the 128 px / 10 steps case (measured in the docstring) left the suite for time (2026-12-07, 57 s): the 64 px /
# 50 steps case runs every stage; benchmark.py's peer comparison runs the same pipeline at 256 and 512 px
@pytest.mark.parametrize("size,steps", [(64, 50)])
def test_pix2pix_zero_matches_diffusers_stage_by_stage(host, checkpoints, peer, size, steps):
    import comfy.sample
    import comfy.samplers
    ckpt = checkpoints["sd15"]
    res = host.run_prompt(_graph(ckpt, size, steps), targets=["s", "inv", "enc", "pos", "edit", "dir", "ckpt", "sampler"])
    model, vae = res.output("ckpt", 0), res.output("ckpt", 2)
    scale = model.get_model_object("latent_format").scale_factor
    sigma_min = float(model.get_model_object("model_sampling").sigma_min)
    raw = res.output("enc", 0)["samples"].float()
    src = res.output("pos", 0)[0][0].float()
    delta = res.output("dir", 0).delta.float()
    sigmas = res.output("inv", 2)
    assert float(sigmas[-1]) == pytest.approx(sigma_min, rel=1e-6)      # the edit ends at abar_0, as diffusers'
    k_max = float((1 + sigmas[0].double() ** 2).sqrt())

    pipe = peer.build_pipeline(host.folder_paths.get_full_path("checkpoints", ckpt),
                               model.model.model_config.unet_config, host.host_dir)
    peer.check_conversion(pipe, model, vae, CAPTION, src, raw)          # raises when the weights disagree
    abar = (1 / (1 + model.get_model_object("model_sampling").sigmas.double() ** 2)).float()
    assert float(((abar - pipe.scheduler.alphas_cumprod) / abar).abs().max()) < 1e-4     # the same schedule...
    for sched in (pipe.scheduler, pipe.inverse_scheduler):                   # ...rounded as ComfyUI rounds it
        sched.alphas_cumprod = abar.clone()
    pipe.scheduler.final_alpha_cumprod = abar[0].clone()                  # set_alpha_to_one=False: abar_0
    pipe.inverse_scheduler.initial_alpha_cumprod = abar[0].clone()
    g = torch.Generator().manual_seed(SEED)
    inv = pipe.invert(image=(raw * scale).contiguous(), prompt_embeds=src, num_inference_steps=steps,
                      guidance_scale=1.0, generator=g, output_type="latent")
    ref_t = inv.latents.detach().clone()
    ref = pipe(prompt_embeds=src, negative_prompt_embeds=src, source_embeds=torch.zeros_like(delta),
               target_embeds=delta, latents=ref_t.clone(), num_inference_steps=steps, guidance_scale=CFG,
               cross_attention_guidance_amount=LAM, generator=g, output_type="latent").images

    # 1. inversion
    ours_t = res.output("inv", 0)["samples"].float() * scale / k_max
    err_t = _rel(ours_t, ref_t)
    # 2. the edit alone, from diffusers' x_T (our sampler node through core's sample_custom)
    node = res.output("sampler", 0)
    with torch.inference_mode():
        edit_only = comfy.sample.sample_custom(
            model, torch.zeros_like(raw), CFG, comfy.samplers.KSAMPLER(node.sampler_function, node.extra_options),
            sigmas, res.output("edit", 0), res.output("pos", 0), ref_t * k_max / scale)
    err_edit = _rel(edit_only.float() * scale, ref)
    # the comparison can tell forms apart: the single-latent form from the same x_T is far from diffusers
    with torch.inference_mode():
        single = comfy.sample.sample_custom(
            model, torch.zeros_like(raw), CFG,
            comfy.samplers.KSAMPLER(node.sampler_function, {**node.extra_options, "form": "single"}),
            sigmas, res.output("edit", 0), res.output("pos", 0), ref_t * k_max / scale)
    err_single = _rel(single.float() * scale, ref)
    # 3. end to end
    err_all = _rel(res.output("s", 0)["samples"].float() * scale, ref)
    print(f"{size}px {steps} steps: x_T {err_t:.2e}, edit from the same x_T {err_edit:.2e}, end to end {err_all:.2e}"
          f" (single-latent form: {err_single:.2e})")
    assert err_t < TOL and err_edit < TOL and err_all < TOL_END_TO_END, (err_t, err_edit, err_all)
    assert err_single > 10 * TOL_END_TO_END, err_single


def _diffusers_pipeline_class():
    if str(TOOLS) not in sys.path:
        sys.path.insert(0, str(TOOLS))
    import peer_pix2pix_zero
    peer_pix2pix_zero.ensure_bench_deps()
    from diffusers import StableDiffusionPix2PixZeroPipeline
    return StableDiffusionPix2PixZeroPipeline


@pytest.mark.parametrize("shape", [(1, 4, 8, 8), (1, 4, 16, 16), (1, 4, 32, 24)])
def test_regulariser_losses_equal_diffusers_functions(shape):
    """Our diffusers-style regulariser terms against the pipeline's own auto_corr_loss / kl_divergence, called
    on the same eps with generators in the same state (same shifts drawn), values and gradients."""
    from z2i.guidance.regularizers import auto_corr_loss_diffusers, kl_divergence_diffusers
    cls = _diffusers_pipeline_class()
    eps = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    for seed in range(3):
        a = eps.clone().requires_grad_(True)
        b = eps.clone().requires_grad_(True)
        theirs = cls.auto_corr_loss(None, a, generator=torch.Generator().manual_seed(seed))
        ours = auto_corr_loss_diffusers(b, [torch.Generator().manual_seed(seed)])
        theirs.backward()
        ours.backward()
        assert abs(float(ours) - float(theirs)) <= 1e-6 * float(theirs)
        assert torch.allclose(a.grad, b.grad, rtol=1e-5, atol=1e-9)
    assert abs(float(kl_divergence_diffusers(eps)) - float(cls.kl_divergence(None, eps))) < 1e-6
