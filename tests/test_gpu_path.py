"""The GPU user's path (issue 28), reproduced on the CPU where it can be: weights that become inference tensors when
ComfyUI loads them (its device move runs under inference mode), loading before aliasing, fp16 compute and the loss
scaler, fp8 weights through UNETLoader, the memory mode chosen from the free memory, an OOM inside a guided call,
and batches in one UNet call per branch."""
import os
import sys
import weakref

import pytest
import safetensors.torch
import torch

from z2i.tests import test_agg_nodes, test_asyrp_train_nodes, test_pix2pix_zero
from z2i.tests.helpers import BATCH_TOL, run_sampler_with_stats, two_image_batch, with_settings

pytestmark = pytest.mark.host


def _pack(host, name):
    """A module of the pack as the host loaded it (custom_nodes/z2i...)."""
    root = host.node_classes["Z2I_Pix2PixZeroSampler"].__module__.rsplit(".", 2)[0]
    return sys.modules[f"{root}.{name}"]


def _rel(a, b):
    return float((a - b).norm() / b.norm())


@pytest.fixture
def inference_weights_after_load(host, monkeypatch):
    """ModelPatcher.load as a CUDA load does it: ComfyUI runs every node under torch.inference_mode and a device
    move there sets each parameter's and buffer's .data to a new (inference) tensor. Counts what it converted."""
    import comfy.model_patcher
    original = comfy.model_patcher.ModelPatcher.load
    converted = {"tensors": 0, "open_clip": 0}
    import comfy.model_management
    comfy.model_management.unload_all_models()          # models earlier tests left loaded are loaded anew here

    def load(self, *args, **kwargs):
        out = original(self, *args, **kwargs)
        with torch.inference_mode():
            for m in self.model.modules():
                for table in (m._parameters, m._buffers):
                    for t in table.values():
                        if t is not None and not t.is_inference():
                            t.data = t.data.clone()
                            converted["tensors"] += 1
                            if type(self.model).__module__.startswith("open_clip"):
                                converted["open_clip"] += 1
        return out

    monkeypatch.setattr(comfy.model_patcher.ModelPatcher, "load", load)
    return converted


def test_clip_losses_run_with_weights_made_inference_tensors_by_the_load(host, checkpoints,
                                                                          inference_weights_after_load):
    """AGG's CLIP style loss and h-direction training backpropagate through open_clip and the VAE: both were loaded
    into inference tensors here (before issue 28: 'Inference tensors cannot be saved for backward')."""
    out, stats = run_sampler_with_stats(host, test_agg_nodes.style_graph(checkpoints["sd15"], lambda_reg=0.0),
                                        "src", "src", 5.0)
    assert inference_weights_after_load["open_clip"] > 0
    assert torch.isfinite(out).all() and all(b < a for a, b in zip(stats["mcg_loss"], stats["mcg_loss_after"]))
    res = host.run_prompt(test_asyrp_train_nodes.graph(checkpoints["sd15"], iterations=1, steps=4),
                          targets=["train"], fresh_cache=True)
    assert res.output("train", 0) is not None


def test_every_network_is_loaded_before_any_weight_is_aliased(host, checkpoints, monkeypatch):
    """The memory manager may offload a model to make room for another; an offloaded model whose weights are aliased
    frees nothing (the aliases keep the memory). So nothing loads while aliases exist (before issue 28 AGG's style
    loss loaded the VAE and open_clip with the UNet aliased), and the run loads VAE and open_clip itself."""
    import comfy.model_management
    autograd = _pack(host, "guidance.autograd")
    original = comfy.model_management.load_models_gpu
    calls = []

    def load(models, *args, **kwargs):
        calls.append((autograd.aliasing_active(), [type(getattr(m, "model", m)).__name__ for m in models],
                      kwargs.get("memory_required", 0)))
        return original(models, *args, **kwargs)

    monkeypatch.setattr(comfy.model_management, "load_models_gpu", load)
    run_sampler_with_stats(host, test_agg_nodes.style_graph(checkpoints["sd15"], lambda_reg=0.1), "src", "src", 5.0)
    assert calls and not any(active for active, _, _ in calls), calls
    guided = [c for c in calls if "CLIP" in c[1] and len(c[1]) > 1]        # the UNet with the VAE and open_clip
    assert guided and guided[0][2] > 0, calls        # the guided call's extra memory is asked for with the load


def test_auto_memory_mode_follows_the_free_memory(host, checkpoints, monkeypatch):
    """auto = fast (no recomputation, paired halves) when the estimate fits the free memory, else low. On this
    machine, with its real free memory, auto picks fast at 512 px (64x64 latent)."""
    import comfy.model_management
    guided = _pack(host, "nodes._guided")
    p = test_pix2pix_zero.graph(checkpoints["sd15"], 0.1, steps=3)
    host.run_prompt(p, targets=["inv", "edit"])
    free = comfy.model_management.get_free_memory
    monkeypatch.setattr(guided, "available_memory", lambda *a, **k: 2 ** 40)   # the size guard is tested apart
    monkeypatch.setattr(comfy.model_management, "get_free_memory", lambda *a, **k: 2 ** 20)     # 1 MB free
    _, small = run_sampler_with_stats(host, p, "edit", "pos", 5.0)
    monkeypatch.setattr(comfy.model_management, "get_free_memory", lambda *a, **k: 2 ** 40)     # 1 TB free
    _, large = run_sampler_with_stats(host, p, "edit", "pos", 5.0)
    assert small["memory_mode"] == "low" and large["memory_mode"] == "fast", (small, large)
    assert small["paired_steps"] == 0 and large["paired_steps"] > 0
    monkeypatch.setattr(comfy.model_management, "get_free_memory", free)
    unet = host.run_prompt({"ckpt": p["ckpt"]}, targets=["ckpt"]).output("ckpt", 0).model.diffusion_model
    est = guided.guided_bytes(unet, (64, 64), 2, torch.float32, checkpoint=False)
    assert guided.choose_mode("auto", est, free(torch.device("cpu"))) == "fast", est


@pytest.mark.numeric
def test_memory_estimate_against_what_autograd_keeps(host, checkpoints):
    """guided_bytes against the bytes a guided UNet call actually saves for its backward pass (saved_tensors_hooks,
    each storage once), on the tiny SD1.5 (SD1.5's full block layout) and SDXL UNets, fast and low. Measured
    (estimate / saved, 32x32 and 64x64 latents): SD1.5 fast 1.00 / 1.01, low 1.52 / 1.77; SDXL fast 1.05 / 1.07,
    low 1.14 / 1.27 (low's estimate also counts one layer's activations alive during its recomputation, which the
    hooks do not see at once). The estimate must stay within 0.5x..2x."""
    guided = _pack(host, "nodes._guided")
    compose = _pack(host, "nodes._compose")
    autograd = _pack(host, "guidance.autograd")
    for ckpt, ctx_dim, hw in ((checkpoints["sd15"], 768, (32, 32)), (checkpoints["sdxl"], 2048, (32, 32))):
        patcher = host.run_prompt({"ckpt": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ckpt}}},
                                  targets=["ckpt"]).output("ckpt", 0)
        base = patcher.model
        unet = base.diffusion_model
        for low in (False, True):
            seen, total = set(), [0]

            def pack(t):
                key = (t.untyped_storage().data_ptr(), t.dtype)
                if t.requires_grad or t.grad_fn is not None or key not in seen:
                    if key not in seen and t.untyped_storage().data_ptr() not in _weights:
                        seen.add(key)
                        total[0] += t.untyped_storage().nbytes()
                return t

            _weights = {p.untyped_storage().data_ptr() for p in unet.parameters()}
            x = torch.randn(1, 4, *hw)
            ctx = torch.randn(1, 77, ctx_dim)
            kw = {"y": torch.randn(1, unet.label_emb[0][0].in_features)} if unet.num_classes is not None else {}
            with torch.inference_mode(False), compose.gradients_through([unet], checkpoint=low):
                positions = compose.CHECKPOINT_POSITIONS
                compose.CHECKPOINT_POSITIONS = 16 * 16                # 32x32 and 16x16 levels checkpointed
                try:
                    xg = x.clone().requires_grad_(True)
                    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                        out = unet(xg, torch.tensor([500.0]), context=ctx, **kw)
                    out.float().pow(2).mean().backward()
                finally:
                    compose.CHECKPOINT_POSITIONS = positions
            est = guided.guided_bytes(unet, hw, 1, torch.float32, checkpoint=low, checkpoint_positions=16 * 16)
            assert autograd.aliasing_active() is False
            ratio = est / total[0]
            assert 0.5 < ratio < 2.0, (ckpt, low, est, total[0], ratio)


@pytest.mark.numeric
def test_fp16_compute_gives_the_fp32_edit_with_gradients_scaled(host, checkpoints):
    """ModelComputeDtype fp16 (core's node; on a GPU, SD loads in fp16 by default): the guidance loss is taken in
    fp32 and its gradient through the fp16 UNet with dynamic loss scaling, so pix2pix-zero's and AGG's edits equal
    the fp32 ones to fp16 rounding: measured (3 steps, relative L2) pix2pix-zero 2.9e-2 and AGG 1.6e-2, against
    1.7e-2 / 1.5e-2 for unguided DDIM in fp16 vs fp32 (the forward pass's own rounding) and a guidance effect of
    2.07 / 0.13 (AGG measured once, tools/gpu_check.py repeats it; the test runs pix2pix-zero, whose both CFG
    halves take a gradient, on the first host). On the tiny model the gradients do not reach fp16's subnormals (scaled and unscaled agree to 2e-4);
    the pure-torch test below shows what scaling prevents where they do."""
    def fp16(p):
        p["dt"] = {"class_type": "ModelComputeDtype", "inputs": {"model": ["ckpt", 0], "dtype": "fp16"}}
        for key in ("inv", "s"):
            p[key]["inputs"]["model"] = ["dt", 0]
        return p

    floor = _rel(host.run_prompt(fp16(test_pix2pix_zero.graph(checkpoints["sd15"], 0.0, steps=3)), targets=["s"])
                 .output("s", 0)["samples"], host.run_prompt(test_pix2pix_zero.graph(checkpoints["sd15"], 0.0, steps=3),
                                                             targets=["s"]).output("s", 0)["samples"])
    for build, pos, neg in ((lambda: test_pix2pix_zero.graph(checkpoints["sd15"], 0.1, steps=3), "edit", "pos"),):
        ref, ref_stats = run_sampler_with_stats(host, build(), pos, neg, 5.0)
        half, half_stats = run_sampler_with_stats(host, fp16(build()), pos, neg, 5.0)
        assert half_stats["loss_scaled"] and not ref_stats["loss_scaled"]
        assert torch.isfinite(half).all()
        assert 0 < floor and _rel(half, ref) < 2.5 * floor, (_rel(half, ref), floor)


def test_loss_scaler_keeps_gradients_an_fp16_network_would_flush():
    """Pure torch: a guidance-sized loss (input gradients near 5e-8 per element, fp16 subnormals) backpropagated
    through an fp16 network: unscaled, a third of the input gradient flushes to zero and the rest is 35% off
    (measured); with the LossScaler nothing flushes and it equals the fp32 gradient to 5.5e-4 (measured)."""
    from z2i.guidance.autograd import LossScaler
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.GELU(), torch.nn.Linear(256, 256), torch.nn.GELU(),
                              torch.nn.Linear(256, 64))
    x = torch.randn(32, 64)

    def grad(dtype, scaler):
        n = net.to(dtype)
        xg = x.clone().requires_grad_(True)
        loss = 1e-2 * n(xg.to(dtype)).float().pow(2).mean()
        return scaler.grad(loss, xg)

    ref = grad(torch.float32, LossScaler(False))
    plain = grad(torch.float16, LossScaler(False))
    scaled = grad(torch.float16, LossScaler(True))
    assert float((plain == 0).float().mean()) > 0.2                  # what unscaled fp16 gives
    assert float((scaled == 0).float().mean()) == 0.0
    assert _rel(scaled, ref) < 5e-3 and _rel(plain, ref) > 0.2, (_rel(scaled, ref), _rel(plain, ref))


def test_loss_scaler_backs_off_on_overflow_and_redoes_the_pass():
    from z2i.guidance.autograd import LossScaler
    w = torch.nn.Parameter(torch.ones(4, dtype=torch.float16))
    s = LossScaler(True, init_scale=2.0 ** 20)
    x = torch.full((4,), 100.0, dtype=torch.float16)
    g = s.grad((w * x).float().sum() * 10.0, w)           # 1000 * 2^20 overflows fp16: backs off, then succeeds
    assert s.overflows >= 1 and torch.allclose(g, torch.full((4,), 1000.0))


@pytest.fixture(scope="module")
def fp8_unet(host, checkpoints):
    """The tiny SD1.5's UNet as a diffusion-model file, for UNETLoader (removed afterwards)."""
    import folder_paths
    src = folder_paths.get_full_path("checkpoints", checkpoints["sd15"])
    sd = safetensors.torch.load_file(src)
    unet = {k[len("model.diffusion_model."):]: v for k, v in sd.items() if k.startswith("model.diffusion_model.")}
    folder = folder_paths.get_folder_paths("diffusion_models")[0]
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, "z2i-tiny-sd15-unet.safetensors")
    safetensors.torch.save_file(unet, path)
    yield os.path.basename(path)
    os.remove(path)


def test_fp8_weights_through_unetloader_guide(host, fp8_unet, checkpoints):
    """UNETLoader weight_dtype fp8_e4m3fn: the weights stay fp8 and are cast per layer (manual_cast); the guided
    samplers alias them without a copy and take their gradients through the cast."""
    def fp8(p):
        p["unet"] = {"class_type": "UNETLoader", "inputs": {"unet_name": fp8_unet, "weight_dtype": "fp8_e4m3fn"}}
        for key in ("inv", "s"):
            p[key]["inputs"]["model"] = ["unet", 0]
        return p

    p = fp8(test_pix2pix_zero.graph(checkpoints["sd15"], 0.1, steps=3))
    out, stats = run_sampler_with_stats(host, p, "edit", "pos", 5.0)
    plain = host.run_prompt(fp8(test_pix2pix_zero.graph(checkpoints["sd15"], 0.0, steps=3)), targets=["s"],
                            fresh_cache=True).output("s", 0)["samples"]
    unet = host.run_prompt(p, targets=["unet"]).output("unet", 0).model.diffusion_model
    assert any("float8" in str(q.dtype) for q in unet.parameters())
    assert torch.isfinite(out).all() and _rel(out, plain) > 1e-4 and all(v > 0 for v in stats["losses"])


def test_out_of_memory_in_a_guided_call_leaves_the_model_and_frees_the_run(host, checkpoints, monkeypatch):
    """torch.OutOfMemoryError raised inside the second guided step: the shared UNet has its own parameter objects
    back (no alias, no instance forward left by checkpointing), and every map store the run made is empty even
    while the error (and its traceback's frames) is still held."""
    losses = _pack(host, "guidance.pix2pix_zero")
    controller = _pack(host, "attention_patches.controller")
    stores = []
    init = controller.MapStore.__init__

    def tracking(self, *a, **k):
        init(self, *a, **k)
        stores.append(weakref.ref(self))

    calls = {"n": 0}
    loss = losses.cross_attention_loss

    def failing(*a, **k):
        calls["n"] += 1
        if calls["n"] == 2:
            raise torch.OutOfMemoryError("CUDA out of memory (injected by the test)")
        return loss(*a, **k)

    monkeypatch.setattr(controller.MapStore, "__init__", tracking)
    monkeypatch.setattr(losses, "cross_attention_loss", failing)
    p = with_settings(test_pix2pix_zero.graph(checkpoints["sd15"], 0.1, steps=3), memory="low")
    unet = host.run_prompt({"ckpt": p["ckpt"]}, targets=["ckpt"]).output("ckpt", 0).model.diffusion_model
    params = {n: q for n, q in unet.named_parameters()}
    with pytest.raises(torch.OutOfMemoryError) as err:
        run_sampler_with_stats(host, p, "edit", "pos", 5.0)
    held = err.value.__traceback__
    assert held is not None and calls["n"] == 2
    assert all(q is params[n] for n, q in unet.named_parameters())
    assert not any("forward" in m.__dict__ for m in unet.modules())
    live = [s() for s in stores if s() is not None]
    assert live and all(s.nbytes() == 0 for s in live), [s.nbytes() for s in live]


def _count_unet_calls(host, monkeypatch):
    import comfy.model_base
    calls = []
    original = comfy.model_base.BaseModel.apply_model

    def apply_model(self, x, t, *a, **k):
        calls.append(int(x.shape[0]))
        return original(self, x, t, *a, **k)

    monkeypatch.setattr(comfy.model_base.BaseModel, "apply_model", apply_model)
    return calls


@pytest.mark.once
@pytest.mark.parametrize("method", ["plain", "ddim", "pix2pix-zero", "AGG"])
def test_a_batch_of_four_costs_the_calls_of_one_image(host, checkpoints, monkeypatch, method):
    """UNet calls of the sampling (SamplerCustom only; the inversion is counted apart) for batch 1 and batch 4 of
    the same image: the same number of calls, each holding the whole batch (the default 'batched' mode)."""
    def build(batch):
        if method == "AGG":
            p = test_agg_nodes.graph(checkpoints["sd15"], weight=1.0, steps=3)
        else:
            p = test_pix2pix_zero.graph(checkpoints["sd15"], 0.1 if method == "pix2pix-zero" else 0.0, steps=3)
        if method == "plain":
            p["sampler"] = {"class_type": "KSamplerSelect", "inputs": {"sampler_name": "euler"}}
        elif method == "ddim":
            p["sampler"] = {"class_type": "Z2I_DDIMSampler", "inputs": {"eta": 0.0}}
        p["rep"]["inputs"]["amount"] = batch
        return p

    counts = {}
    for batch in (1, 4):
        p = build(batch)
        host.run_prompt(p, targets=["inv"], fresh_cache=True)
        calls = _count_unet_calls(host, monkeypatch)
        host.run_prompt(p, targets=["s"])
        monkeypatch.undo()
        counts[batch] = list(calls)
    assert len(counts[4]) == len(counts[1]), counts
    assert all(b4 == 4 * b1 for b1, b4 in zip(counts[1], counts[4])), counts


# Measured (tests/helpers.py two_image_batch, 3-4 steps, 2 threads): batched against each image alone,
# max|diff| / std and relative L2: DDIM 4.6e-5 / 1.4e-5, pix2pix-zero 8.7e-5 / 2.1e-5, CSG 5.1e-5 / 1.2e-5, Asyrp
# 3.3e-5 / 9.1e-6, AGG 4.9e-3 / 2.2e-4 at lambda_reg 1 and 9.5e-3 / 4.4e-4 at 0.1 (its AdamW refinement normalises
# each element's gradient, so last-digit differences in near-zero gradients flip the sign of a few elements' steps).
AGG_BATCHED_L2 = 2e-3


@pytest.mark.numeric
@pytest.mark.parametrize("method", ["pix2pix-zero", "AGG"])
def test_batched_mode_edits_each_image_as_alone_to_the_stated_tolerance(host, checkpoints, method):
    """The default 'batched' mode: a batch of two different images against each alone, within BATCH_TOL (max|diff|
    over std; helpers.py) and, for AGG, AGG_BATCHED_L2 (relative L2). 'per image' is bit-equal (each method's own
    batch test runs that mode)."""
    build = {"pix2pix-zero": lambda: test_pix2pix_zero.graph(checkpoints["sd15"], 0.1, steps=3),
             "AGG": lambda: test_agg_nodes.graph(checkpoints["sd15"], weight=1.0, steps=3)}[method]
    a, b, ab = (host.run_prompt(two_image_batch(build(), w, batch="batched"), targets=["s"]).output("s", 0)["samples"]
                for w in ("a", "b", "ab"))
    alone = torch.cat([a, b])
    if method == "AGG":
        assert 0 < _rel(ab, alone) <= AGG_BATCHED_L2, _rel(ab, alone)
    else:
        spread = float((alone - ab).abs().max() / ab.std())
        assert 0 < spread <= BATCH_TOL, spread


def test_device_switch(monkeypatch):
    """Z2I_DEVICE picks ComfyUI's device flags for the runner and the test hosts; cuda without a GPU is an error."""
    from z2i.headless.host import device_args, resolve_device
    monkeypatch.setenv("Z2I_DEVICE", "cpu")
    assert device_args() == ["--cpu"]
    monkeypatch.setenv("Z2I_DEVICE", "auto")
    assert resolve_device() == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ValueError):
        resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError):
            resolve_device("cuda")


def test_gpu_check_dry_run_prints_its_plan():
    """tools/gpu_check.sh --dry-run prints the plan (and without a GPU the script says so and exits 0)."""
    import subprocess
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    res = subprocess.run(["bash", os.path.join(repo, "tools", "gpu_check.sh"), "--dry-run"], capture_output=True,
                         text=True, timeout=60)
    assert res.returncode == 0 and "plan:" in res.stdout and "gpu_check.py" in res.stdout, res.stdout + res.stderr
