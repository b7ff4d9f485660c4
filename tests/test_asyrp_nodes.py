"""Asyrp in the real host: derived directions, zero-delta identity, linear scaling at the hook, SDXL, errors."""
import pytest
import torch

from z2i.tests.helpers import EXACT_BATCH_TOL, batch_spread, inverted_image_graph, run_sampler_with_stats, two_image_batch

pytestmark = pytest.mark.host


def graph(ckpt, scale=1.0, steps=4, boost_from=1.0, sampler=None, size=64):
    p = inverted_image_graph(ckpt, "a photo of a face", key="src", steps=steps, size=size)
    p.update({
        "tgt": {"class_type": "CLIPTextEncode", "inputs": {"text": "a photo of a smiling face", "clip": ["ckpt", 1]}},
        "dir": {"class_type": "Z2I_HDirectionFromPrompts", "inputs": {"model": ["ckpt", 0], "inversion": ["inv", 1],
                                                                      "target": ["tgt", 0]}},
        "sampler": sampler or {"class_type": "Z2I_AsyrpSampler", "inputs": {
            "direction": ["dir", 0], "scale": scale, "unit": "percent", "edit_until": 0.5,
            "boost_from": boost_from}},
        "s": {"class_type": "SamplerCustom", "inputs": {
            "model": ["ckpt", 0], "add_noise": False, "noise_seed": 0, "cfg": 1.0, "positive": ["src", 0],
            "negative": ["src", 0], "sampler": ["sampler", 0], "sigmas": ["inv", 2], "latent_image": ["inv", 0]}},
    })
    return p


def run_with_stats(host, p):
    return run_sampler_with_stats(host, p, "src", "src", 1.0)


def test_derived_direction_shape_and_meta(host, checkpoints):
    d = host.run_prompt(graph(checkpoints["sd15"]), targets=["dir"]).output("dir", 0)
    assert d.delta.shape == (1, 320, 1, 1) and torch.count_nonzero(d.delta) > 0
    assert d.meta["mode"] == "derived" and d.meta["family"] == "SD15"


def test_zero_scale_is_plain_ddim_bit_for_bit(host, checkpoints):
    a = host.run_prompt(graph(checkpoints["sd15"], scale=0.0), targets=["s"]).output("s", 0)["samples"]
    b = host.run_prompt(graph(checkpoints["sd15"], sampler={"class_type": "Z2I_DDIMSampler", "inputs": {"eta": 0.0}}),
                        targets=["s"]).output("s", 0)["samples"]
    assert torch.equal(a, b)


def test_doubling_the_scale_doubles_the_delta_at_the_hook(host, checkpoints):
    out1, s1 = run_with_stats(host, graph(checkpoints["sd15"], scale=1.0))
    out2, s2 = run_with_stats(host, graph(checkpoints["sd15"], scale=2.0))
    assert s1["edit_steps"] == 2 and len(s1["deltas"]) >= 2
    assert torch.allclose(s2["deltas"][0], 2 * s1["deltas"][0])
    plain = host.run_prompt(graph(checkpoints["sd15"], scale=0.0), targets=["s"]).output("s", 0)["samples"]
    assert ((out1 - plain).norm() / plain.norm()).item() > 1e-4      # the edit changes the image


@pytest.mark.numeric
def test_each_image_of_a_batch_is_edited_as_alone(host, checkpoints):
    """[A, B] inverted, derived and edited in one batch gives each image what it gets alone: the derived direction
    has one row per image (the batch mean coupled the images: spread 2e-3)."""
    spread = batch_spread(lambda which: host.run_prompt(two_image_batch(graph(checkpoints["sd15"]), which),
                                                        targets=["s"]))
    assert spread <= EXACT_BATCH_TOL, spread      # every UNet call row by row, each row its own direction


def test_derived_direction_per_image_or_mean(host, checkpoints):
    from z2i.guidance.asyrp import HDirection
    per = host.run_prompt(two_image_batch(graph(checkpoints["sd15"]), "ab"), targets=["dir"]).output("dir", 0)
    p = two_image_batch(graph(checkpoints["sd15"]), "ab")
    p["dir"]["inputs"]["images"] = "mean over the images"
    mean = host.run_prompt(p, targets=["dir"]).output("dir", 0)
    assert per.delta.shape == (2, 320, 1, 1) and mean.delta.shape == (1, 320, 1, 1)
    assert torch.allclose(mean.delta, per.delta.mean(0, keepdim=True), atol=1e-6)
    assert per.meta["images"] == 2 and per.meta["per_image"] and not mean.meta["per_image"]
    one = graph(checkpoints["sd15"])                        # a one-image batch cannot take a two-image direction
    with pytest.raises(ValueError, match="Asyrp Sampler: input 'direction': .*batch of 2, the latent has 1"):
        run_sampler_with_stats(host, one, "src", "src", 1.0, direction=HDirection(per.delta, per.meta))


def test_boost_phase_follows_the_seed(host, checkpoints):
    p = graph(checkpoints["sd15"], boost_from=0.5)
    a = host.run_prompt(p, targets=["s"]).output("s", 0)["samples"]
    p["s"]["inputs"]["noise_seed"] = 5
    b = host.run_prompt(p, targets=["s"]).output("s", 0)["samples"]
    assert not torch.equal(a, b)


def test_sdxl(host, checkpoints):
    res = host.run_prompt(graph(checkpoints["sdxl"], steps=3), targets=["s", "dir"])
    assert res.output("dir", 0).delta.shape[1] == 320 and torch.isfinite(res.output("s", 0)["samples"]).all()


def test_save_then_load_identical(host, checkpoints):
    p = graph(checkpoints["sd15"])
    p["save"] = {"class_type": "Z2I_SaveHDirection", "inputs": {"direction": ["dir", 0], "filename": "z2i_test_smile"}}
    res = host.run_prompt(p, targets=["save", "dir"])
    name = res.ui["save"]["text"][0]
    loaded = host.run_prompt({"l": {"class_type": "Z2I_LoadHDirection", "inputs": {"name": name}}},
                             targets=["l"]).output("l", 0)
    assert torch.equal(loaded.delta, res.output("dir", 0).delta.float()) and loaded.meta == res.output("dir", 0).meta


def test_combine_is_linear(host, checkpoints):
    p = graph(checkpoints["sd15"])
    p["comb"] = {"class_type": "Z2I_HDirectionCombine", "inputs": {"a": ["dir", 0], "coef_a": 2.0, "b": ["dir", 0],
                                                                    "coef_b": -0.5}}
    res = host.run_prompt(p, targets=["comb", "dir"])
    assert torch.allclose(res.output("comb", 0).delta, 1.5 * res.output("dir", 0).delta, atol=1e-6)


def test_model_without_middle_block_is_refused(host, checkpoints):
    model = host.run_prompt({"c": {"class_type": "CheckpointLoaderSimple",
                                   "inputs": {"ckpt_name": checkpoints["sd15"]}}}, targets=["c"]).output("c", 0)

    class NoMiddle(torch.nn.Module):
        def __init__(self, unet):
            super().__init__()
            self.input_blocks, self.output_blocks, self.middle_block = unet.input_blocks, unet.output_blocks, None

    m = model.clone()
    m.add_object_patch("diffusion_model", NoMiddle(model.model.diffusion_model))
    node = host.node_classes["Z2I_HDirectionFromPrompts"]
    with pytest.raises(ValueError, match=r"input 'model': this UNet has no middle block"):
        node.execute(model=m, inversion=None, target=[])


def test_both_hspace_hook_paths_give_the_same_edit(host, checkpoints, monkeypatch):
    """The h-space delta goes in through `middle_block_after_patch` where the host has it (newer ComfyUI) and through
    the first `output_block_patch` where it does not (0.3.75, 0.8.0). Each path is forced here on this host: the
    missing one is provided the way newer ComfyUI calls it (after the middle block and its control, with
    {"h", ..., "transformer_options"}), and both give the same edit and the same deltas."""
    import comfy.ldm.modules.diffusionmodules.openaimodel as unet_mod
    import comfy.model_patcher
    native = hasattr(comfy.model_patcher.ModelPatcher, "set_model_middle_block_after_patch")
    p = graph(checkpoints["sd15"], scale=1.0)
    out_native, s_native = run_with_stats(host, p)

    calls = []
    if native:      # force the older path
        monkeypatch.delattr(comfy.model_patcher.ModelPatcher, "set_model_middle_block_after_patch")
    else:           # force the newer path: the hook and its call site as newer ComfyUI has them
        monkeypatch.setattr(comfy.model_patcher.ModelPatcher, "set_model_middle_block_after_patch",
                            lambda self, patch: self.set_model_patch(patch, "middle_block_after_patch"), raising=False)
        original = unet_mod.forward_timestep_embed

        def forward_timestep_embed(ts, x, emb, context=None, transformer_options={}, *args, **kwargs):  # noqa: B006
            h = original(ts, x, emb, context, transformer_options, *args, **kwargs)
            if tuple(transformer_options.get("block", ())) == ("middle", 0):
                for patch in transformer_options.get("patches", {}).get("middle_block_after_patch", []):
                    calls.append(patch)
                    h = patch({"h": h, "x": x, "emb": emb, "context": context,
                               "transformer_options": transformer_options})["h"]
            return h
        monkeypatch.setattr(unet_mod, "forward_timestep_embed", forward_timestep_embed)
    out_forced, s_forced = run_with_stats(host, p)
    if not native:
        assert calls, "the forced newer path was not taken"
    assert len(s_forced["deltas"]) == len(s_native["deltas"]) >= 2
    assert all(torch.equal(a, b) for a, b in zip(s_forced["deltas"], s_native["deltas"]))
    assert torch.equal(out_forced, out_native)
    plain = host.run_prompt(graph(checkpoints["sd15"], scale=0.0), targets=["s"]).output("s", 0)["samples"]
    assert ((out_forced - plain).norm() / plain.norm()).item() > 1e-4      # the forced path edits too
