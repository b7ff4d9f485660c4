"""Training Asyrp directions in the real host (Alg. 2, Eq. 7 with open_clip on decoded x0): the loss falls on the
tiny model, runs are seeded, trained directions drive the sampler and survive save/load, SDXL, errors."""
import pytest
import torch

from z2i.tests.helpers import inverted_image_graph

pytestmark = pytest.mark.host


def graph(ckpt, kind="global", iterations=4, steps=6, seed=0, size=64, **overrides):
    p = inverted_image_graph(ckpt, "a photo of a face", key="src", steps=steps, size=size)
    p["oc"] = {"class_type": "Z2I_OpenCLIPLoader", "inputs": {"name": "z2i-tiny-clip.safetensors",
                                                              "architecture": "auto (config beside the weights)"}}
    p["train"] = {"class_type": "Z2I_HDirectionTrain", "inputs": {
        "model": ["ckpt", 0], "vae": ["ckpt", 2], "clip_loss_model": ["oc", 0], "latent": ["enc", 0],
        "positive": ["src", 0], "source_text": "a photo of a face", "target_text": "a photo of a smiling face",
        "kind": kind, "steps": steps, "edit_until": 0.5, "iterations": iterations, "lr": 0.05, "lambda_clip": 0.8,
        "lambda_recon": -1.0, "hidden": 32, "seed": seed, **overrides}}
    p["sampler"] = {"class_type": "Z2I_AsyrpSampler", "inputs": {
        "direction": ["train", 0], "scale": 1.0, "unit": "percent", "edit_until": 0.5, "boost_from": 1.0}}
    p["s"] = {"class_type": "SamplerCustom", "inputs": {
        "model": ["ckpt", 0], "add_noise": False, "noise_seed": 0, "cfg": 1.0, "positive": ["src", 0],
        "negative": ["src", 0], "sampler": ["sampler", 0], "sigmas": ["inv", 2], "latent_image": ["inv", 0]}}
    return p


@pytest.mark.parametrize("kind", ["global", pytest.param("implicit", marks=pytest.mark.once)])
def test_training_lowers_the_loss_and_is_seeded(host, checkpoints, kind):
    p = graph(checkpoints["sd15"], kind)
    res = host.run_prompt(p, targets=["train"])
    d, report = res.output("train", 0), res.output("train", 1)
    losses = [h["loss"] for h in d.meta["history"]]
    assert len(losses) == 4 and min(losses[1:]) < 0.9 * losses[0], losses
    assert d.meta["mode"] == f"trained-{kind}" and d.meta["steps"] == 6 and d.meta["edit_steps"] == 3
    assert d.meta["lambda_recon"] > 0 and report.count("iteration") == 4
    p["train"]["inputs"]["lr"] = 0.0500001                  # a re-run: same seed, same direction
    again = host.run_prompt(p, targets=["train"]).output("train", 0)
    h, t = torch.randn(1, 320, 1, 1), torch.tensor([600.0])
    a, b = d.delta_for(h, t), again.delta_for(h, t)
    assert ((a - b).norm() / a.norm()).item() < 1e-2        # CPU backward sums in thread order: not bit for bit


def test_optimizer_choice_and_reference_lr(host, checkpoints):
    """lr -1 = the chosen optimiser's reference lr: SGD + StepLR (official code) 0.5, 0.5, 0.5, 0.05 over four
    passes; Adam (the default) 0.05."""
    p = graph(checkpoints["sd15"], "global", lr=-1.0, optimizer="SGD + StepLR (official code)")
    res = host.run_prompt(p, targets=["train"])
    d, report = res.output("train", 0), res.output("train", 1)
    assert [h["lr"] for h in d.meta["history"]] == pytest.approx([0.5, 0.5, 0.5, 0.05])
    assert d.meta["optimizer"] == "SGD + StepLR (official code)" and d.meta["lr"] == 0.5
    assert report.splitlines()[-1].endswith("lr 0.05)")
    losses = [h["loss"] for h in d.meta["history"]]
    assert min(losses[1:]) < losses[0], losses
    p = graph(checkpoints["sd15"], "global", iterations=1, lr=-1.0)
    p["train"]["inputs"].pop("optimizer", None)
    d = host.run_prompt(p, targets=["train"]).output("train", 0)
    assert d.meta["optimizer"] == "Adam" and d.meta["lr"] == 0.05 == d.meta["history"][0]["lr"]


def test_trained_direction_edits_saves_and_loads_identically(host, checkpoints):
    p = graph(checkpoints["sd15"], "implicit", iterations=2)
    p["save"] = {"class_type": "Z2I_SaveHDirection", "inputs": {"direction": ["train", 0], "filename": "z2i_test_trained"}}
    res = host.run_prompt(p, targets=["s", "save", "train"])
    edited, trained = res.output("s", 0)["samples"], res.output("train", 0)
    plain = host.run_prompt({**p, "sampler": {"class_type": "Z2I_DDIMSampler", "inputs": {"eta": 0.0}}},
                            targets=["s"]).output("s", 0)["samples"]
    assert ((edited - plain).norm() / plain.norm()).item() > 1e-4
    name = res.ui["save"]["text"][0]
    p2 = {k: v for k, v in p.items() if k not in ("train", "save")}
    p2["load"] = {"class_type": "Z2I_LoadHDirection", "inputs": {"name": name}}
    p2["sampler"]["inputs"]["direction"] = ["load", 0]
    res2 = host.run_prompt(p2, targets=["s", "load"])
    loaded = res2.output("load", 0)
    h, t = torch.randn(2, 320, 1, 1), torch.tensor([900.0, 100.0])
    assert torch.equal(loaded.delta_for(h, t), trained.delta_for(h, t)) and loaded.meta == trained.meta
    assert torch.equal(res2.output("s", 0)["samples"], edited)


def test_sdxl(host, checkpoints):
    p = graph(checkpoints["sdxl"], "global", iterations=1, steps=4)
    res = host.run_prompt(p, targets=["train", "s"])
    assert res.output("train", 0).delta.shape[1] == 320 and torch.isfinite(res.output("s", 0)["samples"]).all()


def test_errors_name_node_and_input(host, checkpoints):
    p = graph(checkpoints["sd15"], target_text="a photo of a face")
    with pytest.raises(Exception, match="Train h-space Direction: input 'target_text'"):
        host.run_prompt(p, targets=["train"])
    p = graph(checkpoints["sd15"], edit_until=0.05)
    with pytest.raises(Exception, match="Train h-space Direction: input 'edit_until'"):
        host.run_prompt(p, targets=["train"])


def test_progress_reaches_the_host_every_optimiser_step(host, checkpoints):
    import comfy.utils
    seen = []
    comfy.utils.set_progress_bar_global_hook(lambda value, total, preview, node_id=None: seen.append((value, total)))
    try:
        host.run_prompt(graph(checkpoints["sd15"], "global", iterations=2, seed=5), targets=["train"])
    finally:
        comfy.utils.set_progress_bar_global_hook(None)
    total = 2 * 1 * 3                                        # iterations x images x edit steps
    assert [v for v, t in seen if t == total] == list(range(1, total + 1)), seen
