"""Edit direction, apply, save/load and BLIP caption nodes in the real host."""
import os

import pytest
import torch

from z2i.tests.helpers import make_tiny_blip

pytestmark = pytest.mark.host


def ckpt_prompt(ckpt, **extra):
    p = {"ckpt": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ckpt}}}
    p.update(extra)
    return p


def direction_node(**kw):
    inputs = {"clip": ["ckpt", 1], "source": "cat", "target": "dog", "num_sentences": 6, "seed": 0}
    inputs.update(kw)
    return {"class_type": "Z2I_EditDirection", "inputs": inputs}


def test_direction_equals_hand_computation(host, checkpoints):
    src = ["a photo of a cat", "a cat on a sofa", "a painting of a cat"]
    tgt = ["a photo of a dog", "a dog in the snow"]
    res = host.run_prompt(ckpt_prompt(checkpoints["sd15"], dir=direction_node(
        source_sentences="\n".join(src), target_sentences="\n".join(tgt))), targets=["dir", "ckpt"])
    d = res.output("dir", 0)
    clip = res.output("ckpt", 1)
    enc = lambda s: clip.encode_from_tokens(clip.tokenize(s)).float()  # noqa: E731  one sentence per call
    hand = sum(enc(s) for s in tgt) / len(tgt) - sum(enc(s) for s in src) / len(src)
    assert d.delta.shape == (1, 77, 768)
    assert (d.delta - hand).abs().max().item() < 1e-3 * max(1.0, hand.abs().max().item())
    assert d.meta["n_source"] == 3 and d.meta["n_target"] == 2 and d.meta["width"] == 768


def test_identical_banks_give_zero_and_strength_scales(host, checkpoints):
    p = ckpt_prompt(checkpoints["sd15"], dir=direction_node(target="cat"),
                    pos={"class_type": "CLIPTextEncode", "inputs": {"text": "a cat", "clip": ["ckpt", 1]}})
    for s in (0.0, 1.0, 2.0):
        p[f"apply{s}"] = {"class_type": "Z2I_ApplyEditDirection",
                          "inputs": {"conditioning": ["pos", 0], "direction": ["dir", 0], "strength": s}}
    res = host.run_prompt(p, targets=["dir", "pos", "apply0.0"])
    assert torch.count_nonzero(res.output("dir", 0).delta) == 0
    assert res.output("apply0.0", 0) is res.output("pos", 0)   # strength 0: the input, unchanged
    p["dir"] = direction_node()
    res = host.run_prompt(p, targets=["pos", "apply1.0", "apply2.0"])
    c0 = res.output("pos", 0)[0][0]
    c1, c2 = res.output("apply1.0", 0)[0][0], res.output("apply2.0", 0)[0][0]
    assert torch.count_nonzero(c1 - c0) > 0
    assert torch.allclose(c2 - c0, 2 * (c1 - c0), atol=1e-3)


def test_long_prompt_gets_the_direction_on_every_chunk(host, checkpoints):
    long = ", ".join(["a very detailed photo of a cat sitting on a red sofa in a sunny room"] * 8)
    p = ckpt_prompt(checkpoints["sd15"], dir=direction_node(),
                    pos={"class_type": "CLIPTextEncode", "inputs": {"text": long, "clip": ["ckpt", 1]}},
                    app={"class_type": "Z2I_ApplyEditDirection",
                         "inputs": {"conditioning": ["pos", 0], "direction": ["dir", 0], "strength": 1.0}})
    res = host.run_prompt(p, targets=["dir", "pos", "app"])
    c0, c1, d = res.output("pos", 0)[0][0], res.output("app", 0)[0][0], res.output("dir", 0).delta
    assert c0.shape[1] >= 154 and c0.shape[1] % 77 == 0
    for k in range(c0.shape[1] // 77):
        assert torch.allclose((c1 - c0)[:, 77 * k:77 * (k + 1)].float(), d.to(c1.dtype).float(), atol=1e-2)


def test_width_mismatch_is_a_clear_error(host, checkpoints):
    from z2i.headless.host import PromptFailed
    p = ckpt_prompt(checkpoints["sd15"], dir=direction_node(),
                    xl={"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": checkpoints["sdxl"]}},
                    pos={"class_type": "CLIPTextEncode", "inputs": {"text": "a cat", "clip": ["xl", 1]}},
                    app={"class_type": "Z2I_ApplyEditDirection",
                         "inputs": {"conditioning": ["pos", 0], "direction": ["dir", 0], "strength": 1.0}})
    with pytest.raises(PromptFailed, match=r"Z2I Apply Edit Direction: input 'direction': it was built with a "
                                           r"768-wide text encoder .* but the conditioning is 2048 wide"):
        host.run_prompt(p, targets=["app"])


def test_sdxl_direction_has_both_encoders_and_pooled(host, checkpoints):
    p = ckpt_prompt(checkpoints["sdxl"], dir=direction_node(num_sentences=2),
                    pos={"class_type": "CLIPTextEncode", "inputs": {"text": "a cat", "clip": ["ckpt", 1]}},
                    app={"class_type": "Z2I_ApplyEditDirection",
                         "inputs": {"conditioning": ["pos", 0], "direction": ["dir", 0], "strength": 1.0}})
    res = host.run_prompt(p, targets=["dir", "pos", "app"])
    d = res.output("dir", 0)
    assert d.delta.shape == (1, 77, 2048) and d.pooled is not None and d.pooled.shape == (1, 1280)
    assert torch.count_nonzero(d.delta[..., :768]) > 0 and torch.count_nonzero(d.delta[..., 768:]) > 0
    before, after = res.output("pos", 0)[0][1]["pooled_output"], res.output("app", 0)[0][1]["pooled_output"]
    assert torch.allclose(after.float() - before.float(), d.pooled, atol=1e-2)


def test_clip_skip_is_honoured_and_recorded(host, checkpoints):
    p = ckpt_prompt(checkpoints["sd15"], skip={"class_type": "CLIPSetLastLayer",
                                                "inputs": {"clip": ["ckpt", 1], "stop_at_clip_layer": -2}})
    p["a"] = direction_node()
    p["b"] = direction_node(clip=["skip", 0])
    res = host.run_prompt(p, targets=["a", "b"])
    a, b = res.output("a", 0), res.output("b", 0)
    assert b.meta["clip_skip"] == -2 and a.meta["clip_skip"] in (None, -1)
    assert not torch.allclose(a.delta, b.delta)


def test_save_then_load_is_identical(host, checkpoints):
    import folder_paths
    p = ckpt_prompt(checkpoints["sd15"], dir=direction_node(num_sentences=3),
                    save={"class_type": "Z2I_SaveEditDirection", "inputs": {"direction": ["dir", 0],
                                                                            "filename": "z2i_test_cat_dog"}})
    res = host.run_prompt(p)
    saved = res.ui["save"]["text"][0]
    assert saved.startswith("z2i_test_cat_dog_") and saved.endswith(".safetensors")
    loaded = host.run_prompt({"load": {"class_type": "Z2I_LoadEditDirection", "inputs": {"name": saved}}},
                             targets=["load"]).output("load", 0)
    original = res.output("dir", 0)
    assert torch.equal(loaded.delta, original.delta.float()) and loaded.meta == original.meta
    with open(folder_paths.get_full_path("edit_directions", saved), "rb") as f:
        assert b"pickle" not in f.read(200)


def test_sentence_file_from_model_folder(host, checkpoints):
    import folder_paths
    base = folder_paths.get_folder_paths("z2i_sentences")[0]
    os.makedirs(base, exist_ok=True)
    with open(os.path.join(base, "z2i_test_dogs.txt"), "w") as f:
        f.write("a dog\n# comment\na dog on a sofa\n")
    p = ckpt_prompt(checkpoints["sd15"], dir=direction_node(target_file="z2i_test_dogs.txt"))
    assert host.run_prompt(p, targets=["dir"]).output("dir", 0).meta["n_target"] == 2


@pytest.fixture(scope="module")
def tiny_blip(host):
    import folder_paths
    path = os.path.join(folder_paths.get_folder_paths("blip")[0], "z2i-tiny-blip")
    if not os.path.isfile(os.path.join(path, "config.json")):
        make_tiny_blip(path)
    return "z2i-tiny-blip"


def test_blip_caption_runs_and_is_deterministic(host, tiny_blip):
    p = {"img": {"class_type": "LoadImage", "inputs": {"image": "z2i_example.png"}},
         "batch": {"class_type": "RepeatImageBatch", "inputs": {"image": ["img", 0], "amount": 2}},
         "cap": {"class_type": "Z2I_BLIPCaption", "inputs": {"image": ["batch", 0], "model": tiny_blip,
                                                             "num_beams": 2, "max_new_tokens": 8}}}
    a = host.run_prompt(p, targets=["cap"], fresh_cache=True).output("cap", 0)
    b = host.run_prompt(p, targets=["cap"], fresh_cache=True).output("cap", 0)
    assert isinstance(a, list) and len(a) == 2 and all(isinstance(c, str) and c for c in a)
    assert a == b


def test_blip_goes_back_to_the_offload_device_when_captioning_fails(host, tiny_blip, monkeypatch):
    """An error (or Cancel) while BLIP generates still moves it back to the offload device (issue 28: it stayed on
    the GPU after an error). The moves are recorded: on the CPU both devices are the CPU."""
    import comfy.model_management
    from transformers import BlipForConditionalGeneration
    moves = []
    to = BlipForConditionalGeneration.to

    def record(self, *a, **k):
        moves.append(a[0] if a else k.get("device"))
        return to(self, *a, **k)

    def boom(self, *a, **k):
        raise comfy.model_management.InterruptProcessingException()

    monkeypatch.setattr(BlipForConditionalGeneration, "to", record)
    monkeypatch.setattr(BlipForConditionalGeneration, "generate", boom)
    monkeypatch.setattr(comfy.model_management, "unet_offload_device", lambda: "offload-marker")
    p = {"img": {"class_type": "LoadImage", "inputs": {"image": "z2i_example.png"}},
         "cap": {"class_type": "Z2I_BLIPCaption", "inputs": {"image": ["img", 0], "model": tiny_blip,
                                                             "num_beams": 1, "max_new_tokens": 4}}}
    with pytest.raises(Exception):
        host.run_prompt(p, targets=["cap"], fresh_cache=True)
    monkeypatch.undo()
    assert moves and moves[-1] == "offload-marker", moves


def test_blip_missing_model_names_the_folder(host):
    node = host.node_classes["Z2I_BLIPCaption"]
    with pytest.raises(ValueError, match=r"Z2I BLIP Caption: input 'model': no BLIP model 'nope' in .*blip"):
        node.execute(image=torch.zeros(1, 32, 32, 3), model="nope", num_beams=1, max_new_tokens=4)
