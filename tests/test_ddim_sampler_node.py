"""Z2I_DDIMSampler through core SamplerCustom, against an independent alpha-bar DDIM on the raw UNet.

The reference never touches sigma space or ComfyUI's samplers: it calls the UNet (`diffusion_model`) on
x_t^VP with integer timesteps, turns its output into eps (v-prediction: eps = sqrt(a) v + sqrt(1-a) x_t),
and applies x_{t-1} = sqrt(a_{t-1}) x0 + sqrt(1 - a_{t-1} - s^2) eps + s z.
"""
import math

import pytest
import torch

from z2i.tests.helpers import alpha_form_ddim, txt2img_prompt

pytestmark = pytest.mark.host


def _reference(res, steps_sigmas, seed, batch, size, eta=0.0):
    import comfy.sample

    model = res.output("ckpt", 0)
    base = model.model
    ms = base.model_sampling
    ctx = res.output("pos", 0)[0][0].float()
    if ctx.shape[0] != batch:
        ctx = ctx.repeat(batch, 1, 1)
    sig = steps_sigmas.double()
    # SD's own training schedule, written from its definition (scaled linear betas 0.00085 -> 0.012)
    abar_table = torch.cumprod(1 - torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2, 0)
    sigma_table = ((1 - abar_table) / abar_table).sqrt()
    assert torch.allclose(sigma_table.float(), ms.sigmas.float(), rtol=1e-5)
    ts = [int(torch.argmin((sigma_table.log() - s.log()).abs())) if s > 0 else -1 for s in sig]
    abars = [float(abar_table[t]) if t >= 0 else 1.0 for t in ts]
    zeros = torch.zeros(batch, 4, size // 8, size // 8)
    noise = comfy.sample.prepare_noise(zeros, seed)
    max_denoise = math.isclose(float(ms.sigma_max), float(sig[0]), rel_tol=1e-5) or float(sig[0]) > float(ms.sigma_max)
    x_k = noise * (math.sqrt(1 + float(sig[0]) ** 2) if max_denoise else float(sig[0]))
    x_vp = x_k / math.sqrt(1 + float(sig[0]) ** 2)
    v_pred = base.model_type.name == "V_PREDICTION"

    def eps_fn(x, i):
        out = base.diffusion_model(x, torch.full((batch,), float(ts[i])), context=ctx)
        if v_pred:
            a = abars[i]
            return math.sqrt(a) * out + math.sqrt(1 - a) * x
        return out

    noises = None
    if eta > 0:
        gen = torch.Generator().manual_seed(seed)
        noises = [torch.randn(x_vp.shape, generator=gen) for _ in range(len(sig) - 1)]
    with torch.inference_mode():
        x0 = alpha_form_ddim(eps_fn, x_vp, abars, eta=eta, noises=noises)
    return base.process_latent_out(x0)


@pytest.mark.parametrize("kind, batch, eta", [("sd15", 2, 0.0), ("sd2v", 1, 0.0), ("sd15", 1, 1.0)])
def test_matches_alpha_form_ddim(host, checkpoints, kind, batch, eta):
    size, seed = 64, 123
    p = txt2img_prompt(checkpoints[kind], {"class_type": "Z2I_DDIMSampler", "inputs": {"eta": eta}},
                       steps=10, width=size, height=size, batch=batch, seed=seed, cfg=1.0)
    res = host.run_prompt(p, targets=["sample", "sigmas", "pos", "ckpt"])
    ours = res.output("sample", 0)["samples"]
    ref = _reference(res, res.output("sigmas", 0), seed, batch, size, eta=eta)
    assert ours.shape == ref.shape == (batch, 4, size // 8, size // 8)
    scale = max(1.0, ref.abs().max().item())
    assert (ours - ref).abs().max().item() <= 1e-4 * scale


def test_sdxl_runs_and_is_deterministic(host, checkpoints):
    p = txt2img_prompt(checkpoints["sdxl"], {"class_type": "Z2I_DDIMSampler", "inputs": {"eta": 0.0}},
                       steps=4, width=64, height=64, cfg=3.0)
    a = host.run_prompt(p, targets=["sample"], fresh_cache=True).output("sample", 0)["samples"]
    b = host.run_prompt(p, targets=["sample"], fresh_cache=True).output("sample", 0)["samples"]
    assert torch.isfinite(a).all() and a.shape == (1, 4, 8, 8)
    assert torch.equal(a, b)


def test_eta_noise_follows_the_seed(host, checkpoints):
    def run(seed, eta):
        p = txt2img_prompt(checkpoints["sd15"], {"class_type": "Z2I_DDIMSampler", "inputs": {"eta": eta}},
                           steps=4, seed=seed, cfg=2.0)
        return host.run_prompt(p, targets=["sample"], fresh_cache=True).output("sample", 0)["samples"]

    a, b, c = run(5, 0.7), run(5, 0.7), run(6, 0.7)
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)


def test_equals_core_ddim_alias_at_eta_zero(host, checkpoints):
    """Core's 'ddim' (Euler) and ours agree at eta 0: same update, written two ways."""
    def run(sampler):
        p = txt2img_prompt(checkpoints["sd15"], sampler, steps=6, cfg=4.0, seed=9)
        return host.run_prompt(p, targets=["sample"]).output("sample", 0)["samples"]

    ours = run({"class_type": "Z2I_DDIMSampler", "inputs": {"eta": 0.0}})
    core = run({"class_type": "KSamplerSelect", "inputs": {"sampler_name": "ddim"}})
    assert (ours - core).abs().max().item() <= 1e-5 * core.abs().max().item()


def test_progress_callback_reaches_the_host(host, checkpoints):
    """Every step goes through ComfyUI's callback (progress bar and previews)."""
    import comfy.utils

    seen = []
    comfy.utils.set_progress_bar_global_hook(lambda value, total, preview, node_id=None: seen.append((value, total)))
    try:
        p = txt2img_prompt(checkpoints["sd15"], {"class_type": "Z2I_DDIMSampler", "inputs": {"eta": 0.0}},
                           steps=5, seed=11)
        host.run_prompt(p, targets=["sample"], fresh_cache=True)
    finally:
        comfy.utils.set_progress_bar_global_hook(None)
    assert (5, 5) in seen and len([s for s in seen if s[1] == 5]) >= 5
