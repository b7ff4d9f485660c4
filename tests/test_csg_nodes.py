"""CSG in the real host: mask outputs, zero-guidance identity, mixup and guidance effects, hard masks, batch,
isolation."""
import pytest
import torch

from z2i.tests.helpers import (EXACT_BATCH_TOL, batch_spread, inverted_image_graph, sample_with_patch, two_image_batch,
                               unet_call_recorder)

pytestmark = pytest.mark.host

CAPTION, TARGET = "a photo of a cat on a sofa", "a photo of a dog on a sofa"
CODE_INVERSION = "CSG code (N-2 steps)"
PAPER_SOURCE = "inversion trajectory (paper Alg. 1)"


def graph(ckpt, lambda_pre=15.0, mixup=True, batch=1, steps=4, sampler=None, mask_level=0):
    p = inverted_image_graph(ckpt, CAPTION, steps=steps, batch=batch)
    p.update({
        "tgt": {"class_type": "CLIPTextEncode", "inputs": {"text": TARGET, "clip": ["ckpt", 1]}},
        "mask": {"class_type": "Z2I_CSGMask", "inputs": {
            "model": ["ckpt", 0], "clip": ["ckpt", 1], "inversion": ["inv", 1], "caption": CAPTION, "word": "cat",
            "token_level": 1, "mask_level": mask_level}},
        "mix": {"class_type": "Z2I_CrossAttentionMixup", "inputs": {
            "model": ["ckpt", 0], "background": ["mask", 0], "strength": 1.0 if mixup else 0.0}},
        "sampler": sampler or {"class_type": "Z2I_CSGSampler", "inputs": {
            "inversion": ["inv", 1], "background": ["mask", 0], "lambda_pre": lambda_pre, "delta": 1.5,
            "clamp_pull": False}},
        "s": {"class_type": "SamplerCustom", "inputs": {
            "model": ["mix", 0], "add_noise": False, "noise_seed": 0, "cfg": 5.0, "positive": ["tgt", 0],
            "negative": ["pos", 0], "sampler": ["sampler", 0], "sigmas": ["inv", 2], "latent_image": ["inv", 0]}},
    })
    return p


def samples(host, p, **kw):
    return host.run_prompt(p, targets=["s"], **kw).output("s", 0)["samples"]


def test_mask_outputs(host, checkpoints):
    res = host.run_prompt(graph(checkpoints["sd15"]), targets=["mask"])
    bg, obj, word = res.output("mask", 0), res.output("mask", 1), res.output("mask", 2)
    assert bg.shape == (1, 64, 64) and obj.shape == (1, 64, 64, 3) and word.shape == (1, 64, 64, 3)
    assert float(bg.min()) >= 0 and float(bg.max()) <= 1
    assert torch.allclose(bg, 1 - obj[..., 0], atol=1e-6)
    assert float(word.max()) == pytest.approx(1.0, abs=0.01)         # max-normalised word map (upsampled)


def test_wrong_word_is_named(host, checkpoints):
    from z2i.headless.host import PromptFailed
    p = graph(checkpoints["sd15"])
    p["mask"]["inputs"]["word"] = "zebra"
    with pytest.raises(PromptFailed, match=r"Z2I CSG Mask: input 'word': 'zebra' does not occur in the caption"):
        host.run_prompt(p, targets=["mask"])


def test_token_level_without_cross_attention_is_named(host, checkpoints):
    """The toy-world model (docs/TOY_MODEL.md) has cross-attention at 1/1 and 1/2 of the latent only: at the shipped
    workflows' token_level 2 (2x2 of a 64 px image's 8x8 latent) the word map would be empty; the mask node says so
    after its first step, naming the input and the fix. (The tiny SD1.5 has a middle-block transformer at 1x1, so
    every level has maps there.)"""
    from z2i.headless.host import PromptFailed
    p = graph("z2i-toy-sd15.safetensors")
    p["mask"]["inputs"]["token_level"] = 2
    with pytest.raises(PromptFailed, match=r"Z2I CSG Mask: input 'token_level': this model has no cross-attention "
                                           r"layer at 2x2 or coarser.*lower token_level"):
        host.run_prompt(p, targets=["mask"])


def test_zero_guidance_is_plain_ddim_with_the_target_prompt(host, checkpoints):
    a = samples(host, graph(checkpoints["sd15"], lambda_pre=0.0, mixup=False))
    b = samples(host, graph(checkpoints["sd15"], mixup=False,
                            sampler={"class_type": "Z2I_DDIMSampler", "inputs": {"eta": 0.0}}))
    assert torch.equal(a, b)


def test_guidance_and_mixup_each_change_the_result(host, checkpoints):
    plain = samples(host, graph(checkpoints["sd15"], lambda_pre=0.0, mixup=False))
    guided = samples(host, graph(checkpoints["sd15"], lambda_pre=15.0, mixup=False))
    mixed = samples(host, graph(checkpoints["sd15"], lambda_pre=0.0, mixup=True))
    rel = lambda a, b: ((a - b).norm() / b.norm()).item()  # noqa: E731
    assert rel(guided, plain) > 1e-3 and rel(mixed, plain) > 1e-3


def test_guidance_pulls_the_background_toward_the_source(host, checkpoints):
    """With the mask all background the posterior term pulls the edit toward the source's reconstruction.
    (lambda_pre 1: with 4 steps the paper's 15 over-corrects; its stability needs about 50 steps.)"""
    p0 = graph(checkpoints["sd15"], lambda_pre=0.0, mixup=False)
    p1 = graph(checkpoints["sd15"], lambda_pre=1.0, mixup=False)
    for p in (p0, p1):
        p["solid"] = {"class_type": "SolidMask", "inputs": {"value": 1.0, "width": 64, "height": 64}}
        p["sampler"]["inputs"]["background"] = ["solid", 0]
    rec = graph(checkpoints["sd15"], mixup=False, sampler={"class_type": "Z2I_DDIMSampler", "inputs": {"eta": 0.0}})
    rec["s"]["inputs"]["positive"] = ["pos", 0]
    source = samples(host, rec)
    free, pulled = samples(host, p0), samples(host, p1)
    assert (pulled - source).norm() < 0.8 * (free - source).norm()


def test_batch_two_deterministic_and_model_untouched(host, checkpoints):
    p = graph(checkpoints["sd15"], batch=2)
    res = host.run_prompt(p, targets=["s", "ckpt", "mix"])
    a = res.output("s", 0)["samples"]
    # re-run only the sampler: an unused input (the seed, add_noise is off) gives it a new cache signature
    p["s"]["inputs"]["noise_seed"] = 1
    b = samples(host, p)
    assert a.shape == (2, 4, 8, 8) and torch.equal(a, b)
    base, patched = res.output("ckpt", 0), res.output("mix", 0)
    assert patched is not base
    assert "z2i_mixup" not in base.model_options.get("transformer_options", {})
    assert not base.model_options.get("transformer_options", {}).get("patches_replace", {}).get("attn2")


def test_sigmas_not_from_the_inversion_are_refused(host, checkpoints):
    from z2i.headless.host import PromptFailed
    p = graph(checkpoints["sd15"], mixup=False)
    p["other"] = {"class_type": "BasicScheduler", "inputs": {"model": ["ckpt", 0], "scheduler": "karras",
                                                             "steps": 4, "denoise": 1.0}}
    p["s"]["inputs"]["sigmas"] = ["other", 0]
    with pytest.raises(PromptFailed, match=r"Z2I CSG Sampler: input 'sigmas.*not on the inversion's schedule"):
        host.run_prompt(p, targets=["s"])


def binary_mask(p, mixup=True):
    """Background 1 with a 32 px square object (0) in the middle: a hard mask, aligned to the 8 px latent."""
    p["solid"] = {"class_type": "SolidMask", "inputs": {"value": 1.0, "width": 64, "height": 64}}
    p["hole"] = {"class_type": "SolidMask", "inputs": {"value": 0.0, "width": 32, "height": 32}}
    p["binary"] = {"class_type": "MaskComposite", "inputs": {"destination": ["solid", 0], "source": ["hole", 0],
                                                             "x": 16, "y": 16, "operation": "multiply"}}
    if mixup:
        p["mix"]["inputs"]["background"] = ["binary", 0]
    p["sampler"]["inputs"]["background"] = ["binary", 0]
    return p


# (the 50-step case, measured as stated below, left the suite on 2026-12-07 to keep it within its 45 minutes)
@pytest.mark.parametrize("steps", [10])
def test_binary_mask_stays_finite_with_default_settings(host, checkpoints, steps, caplog):
    """A binary mask keeps its P = 1 pixels under B_t to the last step, where Eq. 18's pull is 15x the
    difference: the default hard-mask guard caps it (with a warning) and the background stays at the source.
    Measured on the tiny model (max abs error over the background against the encoded source, whose max is
    0.22): guarded 0.22 at 10 steps and 0.25 at 50; no guidance 33; Eq. 18 as written (guard off) 2e7 at 10
    steps and 112 at 50. (Mixup only at 10 steps, to keep the 50-step run shorter.) With the paper's source, the
    inversion's latents, whose last is the encoded source; the code's reconstruction source pulls the background to
    the reconstruction instead (13 away from the source on this random model at 10 steps, its round-trip error)."""
    p = binary_mask(graph(checkpoints["sd15"], steps=steps), mixup=steps == 10)   # clamp_pull off, guard on
    p["sampler"]["inputs"]["source_trajectory"] = PAPER_SOURCE
    p["mask"]["inputs"]["source_pass"] = PAPER_SOURCE
    with caplog.at_level("WARNING"):
        res = host.run_prompt(p, targets=["s", "enc"])
    guarded, source = res.output("s", 0)["samples"], res.output("enc", 0)["samples"]
    assert "the background mask is hard" in caplog.text
    background = torch.ones(8, 8, dtype=torch.bool)
    background[2:6, 2:6] = False
    error = lambda out: float((out - source)[..., background].abs().max())  # noqa: E731
    assert torch.isfinite(guarded).all()
    assert error(guarded) < 5 * float(source.abs().max()), (error(guarded), float(source.abs().max()))
    if steps == 10:
        p["sampler"]["inputs"]["hard_mask_guard"] = False
        assert error(samples(host, p)) > 1e3 * error(guarded)


def two_images(p, which, second="flip"):
    """The example image and its mirror image (second="flip") or its colour inverse ("invert"): both in one
    batch ("pair"), or one alone ("scale" = the example image, or the second)."""
    p["flip"] = {"class_type": "ImageFlip", "inputs": {"image": ["scale", 0], "flip_method": "y-axis: horizontally"}}
    p["invert"] = {"class_type": "ImageInvert", "inputs": {"image": ["scale", 0]}}
    p["pair"] = {"class_type": "ImageBatch", "inputs": {"image1": ["scale", 0], "image2": [second, 0]}}
    p["enc"]["inputs"]["pixels"] = [which, 0]
    return p


@pytest.mark.numeric
def test_batch_rows_are_independent(host, checkpoints):
    """Two different images in one batch (content mask, per-image mask renormalisation in the mixup, pull).

    No coupling: the first row's result does not depend on the second image (bit for bit here, at every stage;
    asserted to 1e-5 of its spread). It also matches its single-image run up to the host's batch-size noise on
    CPU: measured 3.5e-5 and 4.6e-5 of the spread (max abs diff / std, rows 1 and 2) after 4 steps, 4.9e-5
    with plain DDIM and no CSG at all, 1e-5 already in the inversion's noise and 1.7e-6 in the VAE encoding,
    the same at torch.set_num_threads(1) (CPU kernels block a batch of 2 otherwise than a batch of 1), so that
    comparison is asserted to 3e-4."""
    rel = lambda a, b: float((a - b).abs().max() / b.std())  # noqa: E731
    with_mirror = samples(host, two_images(graph(checkpoints["sd15"]), "pair"))
    with_inverse = samples(host, two_images(graph(checkpoints["sd15"]), "pair", second="invert"))
    alone = samples(host, two_images(graph(checkpoints["sd15"]), "scale"))
    assert with_mirror.shape == (2, 4, 8, 8)
    assert rel(with_mirror[1], with_inverse[1]) > 0.1                        # the second images differ
    assert rel(with_mirror[0], with_inverse[0]) < 1e-5                       # no coupling
    assert rel(with_mirror[0], alone[0]) < 3e-4                              # batch-size noise only


@pytest.mark.numeric
def test_each_image_of_a_batch_is_edited_as_alone(host, checkpoints):
    """[A, B] inverted, masked and edited with the mixup in one batch gives each image what it gets alone (the
    sampler's UNet calls run row by row; the mixup reads the row's own mask and source maps)."""
    spread = batch_spread(lambda which: host.run_prompt(two_image_batch(graph(checkpoints["sd15"]), which),
                                                        targets=["s"]))
    assert spread <= EXACT_BATCH_TOL, spread


# -- cached source maps (issue 19): the mask pass's caption maps stand in for the sampler's source row --------------
def _count_rows(host, p):
    """Run the graph (upstream cached first), then only the sampler, counting UNet batch rows in that run."""
    res = host.run_prompt(p, targets=["s", "ckpt"])
    unet = res.output("ckpt", 0).model.diffusion_model
    rows = []
    handle = unet.register_forward_hook(lambda m, args, out: rows.append(int(args[0].shape[0])))
    try:
        p["s"]["inputs"]["noise_seed"] += 1            # unused (add_noise off): re-runs the sampler alone
        out = samples(host, p)
    finally:
        handle.remove()
    assert torch.equal(out, res.output("s", 0)["samples"])
    return out, sum(rows)


@pytest.mark.parametrize("precision,tol", [("fp32 (as the source row)", 1e-5), ("fp16 (half the memory)", 1e-4)])
def test_cached_source_maps_replace_the_source_row(host, checkpoints, precision, tol):
    """Same edit with the mask pass's maps as with the lockstep source row, one UNet row per step fewer. In fp32
    the maps are the source row's: measured bit-equal results (the mask pass reads its self-attention one head at a
    time and computes that layer's output with the host's kernel, as the source row does; asserted to 1e-5, as
    before that change, when 2e-7 was measured). In fp16 (the default) the maps keep 3 significant digits:
    measured 7e-6 relative on the result, asserted to 1e-4."""
    lock = graph(checkpoints["sd15"])
    out_lock, rows_lock = _count_rows(host, lock)
    cached = graph(checkpoints["sd15"])
    cached["sampler"]["inputs"]["source_maps"] = ["mask", 3]
    cached["mask"]["inputs"]["source_maps_precision"] = precision
    out_cached, rows_cached = _count_rows(host, cached)
    steps = 4
    assert rows_lock - rows_cached == steps, (rows_lock, rows_cached)     # cfg 5: 3 rows/step -> 2 rows/step
    rel = ((out_cached - out_lock).norm() / out_lock.norm()).item()
    assert rel < tol, rel
    maps = host.run_prompt(cached, targets=["mask"]).output("mask", 3)
    assert maps is not None and maps.store.steps_held == steps and maps.nbytes > 0
    dtype = torch.float16 if precision.startswith("fp16") else torch.float32
    assert all(t.dtype == dtype for m in maps.store._steps.values() for t in m.values())


def test_cached_source_maps_fall_back_when_they_do_not_fit(host, checkpoints, caplog):
    """Another negative prompt, or the maps not kept: the sampler says why and runs its source row (the same result
    as without the maps, bit for bit)."""
    lock = graph(checkpoints["sd15"])
    lock["neg"] = {"class_type": "CLIPTextEncode", "inputs": {"text": "a photo of a cat on a chair",
                                                              "clip": ["ckpt", 1]}}
    lock["s"]["inputs"]["negative"] = ["neg", 0]
    expected = samples(host, lock)
    p = {k: {**v, "inputs": dict(v["inputs"])} for k, v in lock.items()}
    p["sampler"]["inputs"]["source_maps"] = ["mask", 3]
    with caplog.at_level("WARNING"):
        got = samples(host, p)
    assert "not using the CSG Content Mask's source maps" in caplog.text and "negative" in caplog.text
    assert torch.equal(got, expected)
    p["mask"]["inputs"]["source_maps"] = "don't keep"
    assert host.run_prompt(p, targets=["mask"]).output("mask", 3) is None
    assert torch.equal(samples(host, p), expected)


def test_auto_keeps_source_maps_only_within_the_budget(host, checkpoints, monkeypatch):
    import sys
    csg = sys.modules[host.node_classes["Z2I_CSGMask"].__module__]       # the module the host loaded
    p = graph(checkpoints["sd15"])
    maps = host.run_prompt(p, targets=["mask"]).output("mask", 3)
    assert maps is not None                                       # a 64 px image: a few MB
    monkeypatch.setattr(csg, "KEEP_BUDGET", maps.nbytes - 1)
    assert host.run_prompt(p, targets=["mask"], fresh_cache=True).output("mask", 3) is None
    p["mask"]["inputs"]["source_maps"] = "keep"
    assert host.run_prompt(p, targets=["mask"]).output("mask", 3) is not None


@pytest.mark.numeric
def test_cached_source_maps_batch_edits_each_image_as_alone(host, checkpoints):
    def run(which):
        p = two_image_batch(graph(checkpoints["sd15"]), which)
        p["sampler"]["inputs"]["source_maps"] = ["mask", 3]
        return host.run_prompt(p, targets=["s"])
    assert batch_spread(run) <= EXACT_BATCH_TOL


@pytest.mark.numeric
@pytest.mark.parametrize("batch", [2])
def test_linear_memory_smoothing_gives_the_same_mask(host, checkpoints, monkeypatch, batch):
    """Above SA_BUDGET the mask's self-attention smoothing runs as a second pass that applies each step's
    head-averaged map to the word map a block of queries at a time (never the [HW, HW] map: issue 32, 1 GiB at a
    128x128 mask): forced here at 64 px, it gives the single-pass mask to float rounding (the same softmax, summed
    in another order), on a batch of two different images (each its own word map and smoothing)."""
    import sys
    csg = sys.modules[host.node_classes["Z2I_CSGMask"].__module__]
    from z2i.tests.helpers import two_image_batch
    p = graph(checkpoints["sd15"])
    if batch == 2:
        p = two_image_batch(p, "ab", batch="batched")

    def mask():
        res = host.run_prompt(p, targets=["mask"], fresh_cache=True)
        return res.output("mask", 0), res.output("mask", 1)

    one_bg, one_obj = mask()
    monkeypatch.setattr(csg, "SA_BUDGET", 0)
    two_bg, two_obj = mask()
    assert two_bg.shape == one_bg.shape and two_bg.shape[0] == batch
    assert float((two_obj - one_obj).abs().max()) < 1e-5, float((two_obj - one_obj).abs().max())
    assert float((one_obj - one_obj.mean()).abs().max()) > 1e-3       # the mask is not flat: the check means something


# -- the official code's form (issue 29): each of its behaviours pinned -------------------------------------------


def test_defaults_are_the_official_codes():
    """The nodes default to the authors' code (what the paper's figures show), the paper's reading an option."""
    from z2i.nodes import csg
    inputs = lambda node: {i.id: i for i in node.define_schema().inputs}  # noqa: E731
    mask, mix, sampler = inputs(csg.CSGMask), inputs(csg.CrossAttentionMixup), inputs(csg.CSGSampler)
    assert mask["source_pass"].default == csg.SOURCE_CODE and mask["word_map"].default == csg.WORD_MAP_CODE
    assert mix["passes"].default == csg.PASSES_CODE and mix["mask_normalisation"].default == csg.NORMALISE_CODE
    assert sampler["source_trajectory"].default == csg.SOURCE_CODE
    assert sampler["lambda_pre"].default == 10.0            # the script's --posterior_guidance


def test_code_inversion_visits_the_codes_timesteps_and_hands_x_T_one_level_up(host, checkpoints):
    """10 steps: N - 2 = 8 UNet calls at timesteps 101, 201, ..., 801 (Hleephilip/CSG ddim_inv.py
    timesteps.flip(0)[1:-1]); the reverse schedule is diffusers' grid 901, ..., 1 ending at abar_0; the noise is the
    VP latent at abar[900] handed to the sampler at t = 901."""
    import comfy.model_management
    p = inverted_image_graph(checkpoints["sd15"], CAPTION, steps=10)
    res = host.run_prompt(p, targets=["ckpt", "pos", "enc"])
    model = res.output("ckpt", 0).clone()
    ms = model.get_model_object("model_sampling")
    seen = []

    def recorder(apply_model, args):
        seen.extend(round(float(t)) for t in ms.timestep(args["timestep"]))    # the wrapper sees sigmas
        return apply_model(args["input"], args["timestep"], **args["c"])

    model.set_model_unet_function_wrapper(recorder)
    node = host.node_classes["Z2I_DDIMInversion"]
    with torch.inference_mode():       # as ComfyUI runs a node
        out = node.execute(model=model, positive=res.output("pos", 0), latent=res.output("enc", 0), steps=10,
                           scheduler="ddim_uniform", variant=CODE_INVERSION, cfg=1.0, denoise=1.0,
                           refine_iterations=0, regularize=False, reg_lambda=20.0, reg_iterations=1, reg_seed=0)
    noise, inversion, sigmas = out.result if hasattr(out, "result") else out
    assert seen == [100 * k + 1 for k in range(1, 9)]
    expected = torch.cat([ms.sigma(torch.tensor([901.0 - 100 * k for k in range(10)])),
                          ms.sigma(torch.tensor([0.0]))])
    assert torch.allclose(sigmas.float(), expected.float(), rtol=1e-5)
    traj = inversion.trajectory
    assert traj.steps == 8 and not inversion.paired
    assert torch.allclose(traj.sigmas.float(), ms.sigma(torch.tensor([100.0 * k for k in range(1, 10)])).float(),
                          rtol=1e-5)
    top = float(traj.sigmas[-1])
    x_t = model.model.process_latent_in(noise["samples"].to(comfy.model_management.intermediate_device()))
    assert torch.allclose(x_t / (1 + float(sigmas[0]) ** 2) ** 0.5, traj.latents[-1] / (1 + top ** 2) ** 0.5,
                          rtol=1e-5, atol=1e-6)


def _code_form(p, inversion=CODE_INVERSION):
    p["inv"]["inputs"]["variant"] = inversion
    return p


@pytest.mark.once            # Z2I's arithmetic; its node path runs on every host in the other CSG tests
def test_reconstruction_source_makes_x_src_by_a_ddim_pass_from_the_noise(host, checkpoints):
    """Edit prompt = caption: the edit itself is the code's reconstruction pass, so with the reconstruction source
    x_t^tgt = x_t^src at every step, the pull vanishes for any lambda and the result is plain DDIM with the caption;
    with the paper's source (the inversion's latents) the pull acts on the inversion's round-trip error."""
    def build(source):
        p = _code_form(graph(checkpoints["sd15"], lambda_pre=10.0, mixup=False), "current level")
        p["s"]["inputs"]["positive"] = ["pos", 0]
        p["sampler"]["inputs"]["source_trajectory"] = source
        p["mask"]["inputs"]["source_pass"] = source
        return p
    plain = graph(checkpoints["sd15"], mixup=False, sampler={"class_type": "Z2I_DDIMSampler", "inputs": {"eta": 0.0}})
    plain["s"]["inputs"]["positive"] = ["pos", 0]
    ref = samples(host, plain)
    rel = lambda a, b: float((a - b).norm() / b.norm())  # noqa: E731
    code, paper = rel(samples(host, build("reconstruction (official code)")), ref), rel(samples(host, build(PAPER_SOURCE)), ref)
    assert code < 1e-4, code          # measured 1.5e-5: the CFG call's rows and the source row's round apart
    assert paper > 1e-1, paper        # measured 1.7


def test_paper_source_with_the_code_inversion_is_refused(host, checkpoints):
    from z2i.headless.host import PromptFailed
    p = _code_form(graph(checkpoints["sd15"], mixup=False, steps=4))
    p["sampler"]["inputs"]["source_trajectory"] = PAPER_SOURCE
    with pytest.raises(PromptFailed, match=r"Z2I CSG Sampler: input 'inversion': the 'CSG code \(N-2 steps\)' "
                                           r"inversion's latents are not on the sampling schedule"):
        host.run_prompt(p, targets=["s"])


@pytest.mark.once            # Z2I's arithmetic; its node path runs on every host in the other CSG tests
def test_code_word_map_gives_the_latent_mask_in_blocks(host, checkpoints):
    """word_map (official code): the MASK holds the latent-resolution mask exactly, each latent pixel an 8x8 block
    (the sampler's area resize returns the mask the code uses); ours is a smooth, different map."""
    res = {}
    for form in ("first token, bicubic at token level (official code)", "token span, bilinear at mask level (ours)"):
        p = graph(checkpoints["sd15"])
        p["mask"]["inputs"]["word_map"] = form
        res[form] = host.run_prompt(p, targets=["mask"]).output("mask", 0)
    code, ours = res.values()
    blocks = code.reshape(1, 8, 8, 8, 8)
    assert torch.equal(blocks, blocks[:, :, :1, :, :1].expand_as(blocks))
    assert float((code - ours).abs().max()) > 1e-3


@pytest.mark.parametrize("passes,calls_per_step", [("two passes (official code)", 3),
                                                   pytest.param("one pass (ours)", 2, marks=pytest.mark.once)])
def test_two_pass_mixup_runs_an_unmixed_first_pass(host, checkpoints, passes, calls_per_step):
    """The code's mixup: per step the source row, a first CFG pass (its eps discarded) and the injecting pass, both
    passes at the same latent; one pass: the source row and one CFG call."""
    p = graph(checkpoints["sd15"], lambda_pre=10.0)
    p["mix"]["inputs"]["passes"] = passes
    patch, calls = unet_call_recorder()
    sample_with_patch(host, p, patch)
    assert len(calls) == 4 * calls_per_step
    for step in range(4):
        mine = calls[step * calls_per_step:(step + 1) * calls_per_step]
        assert mine[0][0] == (1,)                               # the source row: the caption, labelled uncond
        if calls_per_step == 3:
            assert torch.equal(mine[1][1], mine[2][1]) and sorted(mine[1][0]) == [0, 1]


def test_code_inversion_refuses_levels_off_the_trained_timesteps(host, checkpoints):
    from z2i.headless.host import PromptFailed
    p = _code_form(graph(checkpoints["sd15"], mixup=False))
    p["inv"]["inputs"]["scheduler"] = "sgm_uniform"      # levels at fractional timesteps (749.25, ...)
    with pytest.raises(PromptFailed, match=r"Z2I DDIM Inversion: input 'scheduler': the CSG code's inversion steps "
                                           r"between trained timesteps"):
        host.run_prompt(p, targets=["inv"])


@pytest.mark.once            # Z2I's wiring of the mixup's input; its node path runs on every host elsewhere
def test_mixup_mixes_by_its_own_background(host, checkpoints):
    """The mixup mixes by the mask given to Cross-Attention Mixup, not by the sampler's (which gates the pull): with
    the pull off, another mask on the mixup node alone changes the edit."""
    a = graph(checkpoints["sd15"], lambda_pre=0.0)
    b = graph(checkpoints["sd15"], lambda_pre=0.0)
    b["half"] = {"class_type": "SolidMask", "inputs": {"value": 0.5, "width": 64, "height": 64}}
    b["mix"]["inputs"]["background"] = ["half", 0]
    rel = float((samples(host, a) - samples(host, b)).norm() / samples(host, a).norm())
    assert rel > 1e-4, rel
