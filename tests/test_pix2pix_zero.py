"""pix2pix-zero guidance in the real host: attention patch fidelity, zero-guidance identity, the gradient step,
lockstep memory bound, batch, determinism and isolation from other graphs."""
import pytest
import torch

from z2i.attention_patches.probs import attention_with_probs
from z2i.tests.helpers import (BATCH_TOL, EXACT_BATCH_TOL, with_settings, batch_spread, inverted_image_graph, run_sampler_with_stats,
                               two_image_batch)

pytestmark = pytest.mark.host


def graph(ckpt, lam, steps=4, batch=1, sampler=None):
    p = inverted_image_graph(ckpt, "a photo of a cat on a sofa", steps=steps, batch=batch)
    p.update({
        "dir": {"class_type": "Z2I_EditDirection",
                "inputs": {"clip": ["ckpt", 1], "source": "cat", "target": "dog", "num_sentences": 4, "seed": 0}},
        "edit": {"class_type": "Z2I_ApplyEditDirection",
                 "inputs": {"conditioning": ["pos", 0], "direction": ["dir", 0], "strength": 1.0}},
        "sampler": sampler or {"class_type": "Z2I_Pix2PixZeroSampler",
                               "inputs": {"xa_guidance": lam, "layers": "input,middle,output", "map_precision": "fp32"}},
        "s": {"class_type": "SamplerCustom", "inputs": {
            "model": ["ckpt", 0], "add_noise": False, "noise_seed": 0, "cfg": 5.0, "positive": ["edit", 0],
            "negative": ["pos", 0], "sampler": ["sampler", 0], "sigmas": ["inv", 2], "latent_image": ["inv", 0]}},
    })
    return p


def test_replacement_attention_equals_comfy_optimized(host, checkpoints):
    import comfy.ldm.modules.attention as attention
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, n, 320, generator=g) for n in (64, 77, 77))
    ours, probs = attention_with_probs(q, k, v, 8)
    theirs = attention.optimized_attention(q, k, v, 8)
    assert (ours - theirs).abs().max().item() < 1e-5
    assert torch.allclose(probs.sum(-1), torch.ones_like(probs.sum(-1)), atol=1e-5)


def test_sd15_sites_are_sd15s_own(host, checkpoints):
    from z2i.attention_patches.sites import cross_attention_sites
    model = host.run_prompt({"c": {"class_type": "CheckpointLoaderSimple",
                                   "inputs": {"ckpt_name": checkpoints["sd15"]}}}, targets=["c"]).output("c", 0)
    sites = [str(s) for s in cross_attention_sites(model.model.diffusion_model)]
    assert sites == ["input.1.0", "input.2.0", "input.4.0", "input.5.0", "input.7.0", "input.8.0", "middle.0.0",
                     *[f"output.{i}.0" for i in range(3, 12)]]


def test_zero_guidance_is_plain_ddim_with_the_edited_prompt(host, checkpoints):
    a = host.run_prompt(graph(checkpoints["sd15"], 0.0), targets=["s"]).output("s", 0)["samples"]
    b = host.run_prompt(graph(checkpoints["sd15"], 0.0, sampler={"class_type": "Z2I_DDIMSampler",
                                                                 "inputs": {"eta": 0.0}}),
                        targets=["s"]).output("s", 0)["samples"]
    assert torch.equal(a, b)


def _run_with_stats(host, checkpoints, lam, batch=1, steps=4):
    """The node's own sampler function with stats and the after-step loss probe switched on."""
    return run_sampler_with_stats(host, graph(checkpoints["sd15"], lam, steps=steps, batch=batch), "edit", "pos",
                                  5.0, check_loss=True)


def test_one_step_lowers_the_cross_attention_loss_and_memory_is_one_step(host, checkpoints):
    # The random tiny UNet is far more curved than SD (sharpened attention): at the paper's 0.1 its first step
    # overshoots. A smaller step shows the sign: every step descends the loss it is computed from.
    out, stats = _run_with_stats(host, checkpoints, 0.01)
    assert len(stats["losses"]) == 4
    assert all(a < b for a, b in zip(stats["losses_after"], stats["losses"])), stats
    assert stats["ref_peak_steps"] == 1          # lockstep: never more than one step of reference maps


def test_guidance_changes_the_result_measurably(host, checkpoints):
    a = host.run_prompt(graph(checkpoints["sd15"], 0.0), targets=["s"]).output("s", 0)["samples"]
    b = host.run_prompt(graph(checkpoints["sd15"], 0.1), targets=["s"]).output("s", 0)["samples"]
    assert ((a - b).norm() / a.norm()).item() > 0.01


def test_batch_two_and_determinism(host, checkpoints):
    p = graph(checkpoints["sd15"], 0.1, batch=2)
    a = host.run_prompt(p, targets=["s"]).output("s", 0)["samples"]
    p["s"]["inputs"]["noise_seed"] = 1      # unused (add_noise off): re-runs only the sampler
    b = host.run_prompt(p, targets=["s"]).output("s", 0)["samples"]
    assert a.shape == (2, 4, 8, 8) and torch.isfinite(a).all()
    assert torch.equal(a, b)
    # identical images in one batched UNet call (the default) edit alike to BATCH_TOL; per image, bit for bit
    assert float((a[0] - a[1]).abs().max() / a.std()) <= BATCH_TOL
    c = host.run_prompt(with_settings(graph(checkpoints["sd15"], 0.1, batch=2), batch="per image"),
                        targets=["s"]).output("s", 0)["samples"]
    assert torch.equal(c[0], c[1])


@pytest.mark.numeric
@pytest.mark.parametrize("form", ["both halves (official code)", "single latent (paper Alg. 1)", "zeroCon"])
def test_each_image_of_a_batch_edits_as_alone(host, checkpoints, form):
    """Two different images in one batch: each gets its single-image result (guidance strength per image does
    not shrink with the batch; the inversion and every guided UNet call run row by row)."""
    if form == "zeroCon":
        sampler = {"class_type": ZEROCON["class_type"], "inputs": {**ZEROCON["inputs"]}}
    else:
        sampler = {"class_type": "Z2I_Pix2PixZeroSampler", "inputs": {
            "xa_guidance": 0.1, "layers": "input,middle,output", "map_precision": "fp32", "guidance_form": form}}
    spread = batch_spread(lambda which: host.run_prompt(
        two_image_batch(graph(checkpoints["sd15"], 0.1, sampler=sampler), which), targets=["s"]))
    # zeroCon too: its PatchNCE loss is computed image by image (a batched bmm/normalize differed by 1e-13)
    assert spread <= EXACT_BATCH_TOL, (form, spread)


def test_other_graphs_sharing_the_model_are_unaffected(host, checkpoints):
    plain = graph(checkpoints["sd15"], 0.0, sampler={"class_type": "Z2I_DDIMSampler", "inputs": {"eta": 0.0}})
    before = host.run_prompt(plain, targets=["s", "ckpt"])
    model = before.output("ckpt", 0)
    params = {n: p for n, p in model.model.diffusion_model.named_parameters()}
    options = repr(model.model_options)
    host.run_prompt(graph(checkpoints["sd15"], 0.1), targets=["s"])
    after = host.run_prompt(plain, targets=["s", "ckpt"])
    assert after.output("ckpt", 0) is model and repr(model.model_options) == options
    assert all(p is params[n] for n, p in model.model.diffusion_model.named_parameters())
    plain["s"]["inputs"]["noise_seed"] = 2  # re-run the sampler after the guided run, upstream cached
    again = host.run_prompt(plain, targets=["s"]).output("s", 0)["samples"]
    assert torch.equal(again, before.output("s", 0)["samples"])


def test_missing_negative_is_named(host, checkpoints):
    import comfy.sample
    res = host.run_prompt(graph(checkpoints["sd15"], 0.1), targets=["sampler", "inv", "edit", "ckpt"])
    noise = res.output("inv", 0)["samples"]
    with pytest.raises(ValueError, match="pix2-?pix-zero Sampler: input 'negative"):
        with torch.inference_mode():
            comfy.sample.sample_custom(res.output("ckpt", 0), torch.zeros_like(noise), 1.0, res.output("sampler", 0),
                                       res.output("inv", 2), res.output("edit", 0), [], noise)


ZEROCON = {"class_type": "Z2I_Pix2PixZeroConSampler", "inputs": {
    "lambda_step": 0.05, "lambda_c": 1.0, "lambda_e": 0.5, "feature_layers": "output", "n_patches": 16,
    "tau": 0.07, "seed": 0, "layers": "input,middle,output"}}


def test_zerocon_zero_step_is_plain_ddim(host, checkpoints):
    zc = {"class_type": ZEROCON["class_type"], "inputs": {**ZEROCON["inputs"], "lambda_step": 0.0}}
    a = host.run_prompt(graph(checkpoints["sd15"], 0.0, sampler=zc), targets=["s"]).output("s", 0)["samples"]
    b = host.run_prompt(graph(checkpoints["sd15"], 0.0, sampler={"class_type": "Z2I_DDIMSampler",
                                                                 "inputs": {"eta": 0.0}}),
                        targets=["s"]).output("s", 0)["samples"]
    assert torch.equal(a, b)


def test_zerocon_contrastive_term_reaches_the_latent(host, checkpoints):
    """Through the real UNet in inference mode: the PatchNCE weight changes the edit, deterministically."""
    no_nce = {"class_type": ZEROCON["class_type"], "inputs": {**ZEROCON["inputs"], "lambda_e": 0.0}}
    a = host.run_prompt(graph(checkpoints["sd15"], 0.0, sampler=ZEROCON), targets=["s"]).output("s", 0)["samples"]
    b = host.run_prompt(graph(checkpoints["sd15"], 0.0, sampler=no_nce), targets=["s"]).output("s", 0)["samples"]
    assert torch.isfinite(a).all() and not torch.allclose(a, b)
    p = graph(checkpoints["sd15"], 0.0, sampler=ZEROCON)
    p["s"]["inputs"]["noise_seed"] = 4
    again = host.run_prompt(p, targets=["s"]).output("s", 0)["samples"]
    # same seeds, same patches; the CPU backward through the decoder's self-attention sums in a thread-dependent
    # order, so a rerun agrees to float rounding rather than bit for bit
    assert ((again - a).norm() / a.norm()).item() < 1e-4


def test_zerocon_bad_feature_layer_is_named(host, checkpoints):
    from z2i.headless.host import PromptFailed
    bad = {"class_type": ZEROCON["class_type"], "inputs": {**ZEROCON["inputs"], "feature_layers": "output.99.0"}}
    with pytest.raises(PromptFailed, match=r"pix2pix-zeroCon Sampler: input 'feature_layers'"):
        host.run_prompt(graph(checkpoints["sd15"], 0.0, sampler=bad), targets=["s"])


@pytest.mark.numeric          # Z2I's two evaluation paths of the same call: no host changes their equality
def test_paired_halves_equal_one_call_per_half(host, checkpoints):
    """The code form batches its two guided halves (and their re-evaluation) into one UNet call; the result is
    what one call per half gives (the rows do not interact; only the kernels' batch partition differs)."""
    p = graph(checkpoints["sd15"], 0.1, steps=6)
    a, sa = run_sampler_with_stats(host, p, "edit", "pos", 5.0, pair=True)
    b, sb = run_sampler_with_stats(host, p, "edit", "pos", 5.0, pair=False)
    assert sa["paired_steps"] == 5 and sb["paired_steps"] == 0      # every step after the first
    rel = float((a - b).abs().max() / b.std())
    print("paired vs separate", rel)
    assert rel < 1e-4, rel
    assert max(abs(x - y) / abs(y) for x, y in zip(sa["losses"], sb["losses"])) < 1e-4
    off = host.run_prompt(graph(checkpoints["sd15"], 0.0, steps=6), targets=["s"]).output("s", 0)["samples"]
    assert float((a - off).abs().max() / off.std()) > 1e-2     # and the guidance acts
