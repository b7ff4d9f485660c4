"""Helpers shared by the tests: API-prompt builders, the server process, closed-form toy denoisers."""
from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import torch


# -- toy denoisers with closed forms ---------------------------------------------------------------------------
class GaussianDenoiser:
    """Exact posterior mean for data x0 ~ N(mu, s^2 I): D(x, sigma) = mu + s^2/(s^2 + sigma^2) (x - mu).

    With this denoiser the probability-flow ODE has a closed-form solution, so DDIM can be checked
    against exact values, not against our own outputs.
    """

    def __init__(self, mu: torch.Tensor | float = 0.0, s: float = 1.0):
        self.mu, self.s2 = mu, s * s
        self.calls = 0

    def __call__(self, x, sigma, **kw):
        self.calls += 1
        sig = sigma.reshape(-1, *([1] * (x.ndim - 1))) if isinstance(sigma, torch.Tensor) else sigma
        return self.mu + self.s2 / (self.s2 + sig * sig) * (x - self.mu)


class FlowGaussianDenoiser:
    """The same data on rectified flow, x = (1 - sigma) x0 + sigma eps (guidance.schedules.FLOW): E[x0 | x] =
    mu + (1 - sigma) s^2 / ((1 - sigma)^2 s^2 + sigma^2) (x - (1 - sigma) mu). Its probability-flow ODE keeps each
    value's z-score: x at level sigma is (1 - sigma) mu + sqrt((1 - sigma)^2 s^2 + sigma^2) / s * (x0 - mu)."""

    def __init__(self, mu: torch.Tensor | float = 0.0, s: float = 1.0):
        from z2i.guidance.schedules import FLOW
        self.noise_form = FLOW
        self.mu, self.s2 = mu, s * s

    def __call__(self, x, sigma, **kw):
        sig = sigma.reshape(-1, *([1] * (x.ndim - 1)))
        a = 1 - sig
        return self.mu + a * self.s2 / (a * a * self.s2 + sig * sig) * (x - a * self.mu)


def flow_grid(steps: int, shift: float = 3.0) -> torch.Tensor:
    """SD3's schedule sigma(t) = shift t / (1 + (shift - 1) t), ascending from 0 to 1 over steps + 1 levels."""
    t = torch.linspace(0, 1, steps + 1)
    return shift * t / (1 + (shift - 1) * t)


def alpha_form_ddim(eps_fn, x_vp: torch.Tensor, alpha_bars: list[float], eta: float = 0.0, noises=None):
    """Textbook DDIM in the papers' alpha-bar form (Song et al. Eq. 12), independent of sigma space.

    eps_fn(x_vp, i) -> eps prediction at step i. alpha_bars[i] is the level of step i (descending noise).
    x_{t-1} = sqrt(a_prev) x0 + sqrt(1 - a_prev - s^2) eps + s z,  s = eta sqrt((1-a_prev)/(1-a_t)) sqrt(1-a_t/a_prev)
    """
    for i in range(len(alpha_bars) - 1):
        a_t, a_prev = alpha_bars[i], alpha_bars[i + 1]
        eps = eps_fn(x_vp, i)
        x0 = (x_vp - math.sqrt(1 - a_t) * eps) / math.sqrt(a_t)
        s = eta * math.sqrt((1 - a_prev) / (1 - a_t)) * math.sqrt(1 - a_t / a_prev) if a_prev < 1 else 0.0
        x_vp = math.sqrt(a_prev) * x0 + math.sqrt(max(1 - a_prev - s * s, 0.0)) * eps
        if s > 0:
            x_vp = x_vp + s * noises[i]
    return x_vp


# -- API prompts ----------------------------------------------------------------------------------------------
def txt2img_prompt(ckpt: str, sampler: dict, steps: int = 4, width: int = 64, height: int = 64, batch: int = 1,
                   cfg: float = 1.0, seed: int = 1, add_noise: bool = True, latent_from: list | None = None,
                   scheduler: str = "ddim_uniform", positive: str = "a photo of a cat",
                   negative: str = "") -> dict:
    """ckpt -> text encodes -> [EmptyLatentImage] -> SamplerCustom(sampler node) -> VAEDecode -> SaveImage."""
    p = {
        "ckpt": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ckpt}},
        "pos": {"class_type": "CLIPTextEncode", "inputs": {"text": positive, "clip": ["ckpt", 1]}},
        "neg": {"class_type": "CLIPTextEncode", "inputs": {"text": negative, "clip": ["ckpt", 1]}},
        "empty": {"class_type": "EmptyLatentImage", "inputs": {"width": width, "height": height, "batch_size": batch}},
        "sampler": sampler,
        "sigmas": {"class_type": "BasicScheduler",
                   "inputs": {"model": ["ckpt", 0], "scheduler": scheduler, "steps": steps, "denoise": 1.0}},
        "sample": {"class_type": "SamplerCustom", "inputs": {
            "model": ["ckpt", 0], "add_noise": add_noise, "noise_seed": seed, "cfg": cfg,
            "positive": ["pos", 0], "negative": ["neg", 0], "sampler": ["sampler", 0],
            "sigmas": ["sigmas", 0], "latent_image": latent_from or ["empty", 0]}},
        "decode": {"class_type": "VAEDecode", "inputs": {"samples": ["sample", 0], "vae": ["ckpt", 2]}},
        "save": {"class_type": "SaveImage", "inputs": {"images": ["decode", 0], "filename_prefix": "z2i_test"}},
    }
    return p


# -- the real server ----------------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ComfyServer:
    """ComfyUI's own main.py on a free loopback port, with the pack in its custom_nodes."""

    def __init__(self, host_dir: Path, output_dir: Path, startup_timeout: float = 120.0,
                 user_dir: Path | None = None, settings: dict | None = None, extra_args: list[str] | None = None):
        """user_dir: a user folder of its own (`--user-directory`, so the host's stays untouched); settings:
        frontend settings seeded into its default/comfy.settings.json before start; extra_args: more flags."""
        self.host_dir, self.output_dir = Path(host_dir), Path(output_dir)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.timeout = startup_timeout
        self.proc: subprocess.Popen | None = None
        self.log_path = self.output_dir / "server.log"
        self.user_dir = Path(user_dir) if user_dir is not None else None
        self.settings = dict(settings or {})
        self.extra_args = list(extra_args or [])

    def start(self) -> None:
        self.output_dir.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "HF_HUB_OFFLINE": "1"}
        extra = list(self.extra_args)
        if self.user_dir is not None:
            (self.user_dir / "default").mkdir(parents=True, exist_ok=True)
            if self.settings:
                (self.user_dir / "default" / "comfy.settings.json").write_text(json.dumps(self.settings, indent=2))
            extra += ["--user-directory", str(self.user_dir.resolve())]
        self._log = open(self.log_path, "wb")
        from z2i.headless.host import device_args
        self.proc = subprocess.Popen(
            [sys.executable, "main.py", *device_args(), "--listen", "127.0.0.1", "--port", str(self.port),
             "--disable-api-nodes", "--database-url", "sqlite:///:memory:", "--use-pytorch-cross-attention",
             "--output-directory", str(self.output_dir), "--disable-auto-launch", *extra],
            cwd=self.host_dir, env=env, stdout=self._log, stderr=subprocess.STDOUT)
        deadline = time.time() + self.timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ComfyUI server exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                self.get_json("/system_stats")
                return
            except (urllib.error.URLError, ConnectionError, OSError):
                time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"ComfyUI server not ready after {self.timeout}s:\n{self.log_tail()}")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        if getattr(self, "_log", None):
            self._log.close()

    def log_tail(self, n: int = 60) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def get_json(self, path: str):
        with urllib.request.urlopen(self.url + path, timeout=30) as r:
            return json.loads(r.read())

    def get_bytes(self, path: str) -> bytes:
        with urllib.request.urlopen(self.url + path, timeout=30) as r:
            return r.read()

    def post_json(self, path: str, payload: dict):
        req = urllib.request.Request(self.url + path, data=json.dumps(payload).encode(),
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=30) as r:
                return json.loads(r.read())
        except urllib.error.HTTPError as e:
            raise AssertionError(f"POST {path} -> {e.code}: {e.read().decode(errors='replace')}") from None

    def run(self, prompt: dict, timeout: float = 300.0) -> dict:
        """POST /prompt, poll /history until done; return the history entry (raises on error)."""
        pid = self.post_json("/prompt", {"prompt": prompt, "client_id": "z2i-tests"})["prompt_id"]
        deadline = time.time() + timeout
        while time.time() < deadline:
            hist = self.get_json(f"/history/{pid}")
            if pid in hist:
                entry = hist[pid]
                status = entry.get("status", {})
                if status.get("status_str") == "error" or not status.get("completed", True):
                    raise AssertionError(f"prompt failed: {json.dumps(status)[:4000]}")
                return entry
            if self.proc.poll() is not None:
                raise RuntimeError(f"server died:\n{self.log_tail()}")
            time.sleep(0.3)
        raise TimeoutError(f"prompt {pid} not finished after {timeout}s:\n{self.log_tail()}")


# -- a tiny random BLIP captioner, saved locally (no hub) ----------------------------------------------------
def make_tiny_blip(out_dir) -> None:
    """A 2-layer BLIP with a 20-word vocabulary, in transformers' save_pretrained layout."""
    import os

    from transformers import (BertTokenizer, BlipConfig, BlipForConditionalGeneration, BlipImageProcessor,
                              BlipProcessor)

    os.makedirs(out_dir, exist_ok=True)
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]", "a", "photo", "of", "cat", "dog", "red",
             "square", "in", "the", "garden", "painting", "on", "sofa", "with"]
    vocab = os.path.join(out_dir, "vocab.txt")
    with open(vocab, "w") as f:
        f.write("\n".join(words) + "\n")
    tok = BertTokenizer(vocab, do_lower_case=True, bos_token="[DEC]", model_max_length=512)
    cfg = BlipConfig(
        text_config=dict(vocab_size=len(words), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, encoder_hidden_size=32, bos_token_id=5, sep_token_id=3,
                         pad_token_id=0, eos_token_id=3, max_position_embeddings=64),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           image_size=32, patch_size=8),
        projection_dim=32)
    torch.manual_seed(0)
    BlipForConditionalGeneration(cfg).save_pretrained(out_dir)
    BlipProcessor(image_processor=BlipImageProcessor(size={"height": 32, "width": 32}), tokenizer=tok).save_pretrained(out_dir)


# -- editing graphs -------------------------------------------------------------------------------------------
def inverted_image_graph(ckpt: str, caption: str, key: str = "pos", steps: int = 4, batch: int = 1, size: int = 64,
                         model=("ckpt", 0)) -> dict:
    """ckpt -> caption `key` -> the example image scaled to `size` and repeated `batch` times -> VAEEncode ->
    Z2I DDIM Inversion ("inv": noise, inversion, sigmas). Editing tests add their sampler on top."""
    return {
        "ckpt": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ckpt}},
        key: {"class_type": "CLIPTextEncode", "inputs": {"text": caption, "clip": ["ckpt", 1]}},
        "img": {"class_type": "LoadImage", "inputs": {"image": "z2i_example.png"}},
        "scale": {"class_type": "ImageScale", "inputs": {"image": ["img", 0], "upscale_method": "bilinear",
                                                         "width": size, "height": size, "crop": "disabled"}},
        "rep": {"class_type": "RepeatImageBatch", "inputs": {"image": ["scale", 0], "amount": batch}},
        "enc": {"class_type": "VAEEncode", "inputs": {"pixels": ["rep", 0], "vae": ["ckpt", 2]}},
        "inv": {"class_type": "Z2I_DDIMInversion", "inputs": {
            "model": list(model), "positive": [key, 0], "latent": ["enc", 0], "steps": steps,
            "scheduler": "ddim_uniform", "variant": "current level", "cfg": 1.0, "denoise": 1.0,
            "refine_iterations": 0, "regularize": False, "reg_lambda": 20.0, "reg_iterations": 1, "reg_seed": 0}},
    }


# Batch independence on 2 CPU cores: a single UNet call differs by ~1.5e-6 relative between batch sizes (CPU
# kernels pick other blockings, even at torch.set_num_threads(1)), and after 4 inversion + 4 DDIM steps the same
# image alone and in a batch of two differs by max|diff| / std = 3e-5 (cfg 1) to 6e-5 (cfg 5) when the UNet sees
# the batch whole. Every Z2I sampler, the inversion and the analysis nodes (CSG mask, h-direction from prompts)
# evaluate the UNet one row at a time (guidance.ddim.per_row, GuidedCalls rowwise, the mixup and the h-space
# delta reading the row's own mask/direction), and per-image losses are computed image by image, so a batch
# equals the images alone to EXACT_BATCH_TOL (bit-equal in practice). BATCH_TOL is what a batched call gives:
# 5x above the measured 2.6e-5..6e-5 and 6x below the smallest real coupling measured (2e-3, Asyrp's old
# batch-mean direction; 2e-2, AGG's old batch-mean L1 at lambda_reg 1).
EXACT_BATCH_TOL = 1e-5
BATCH_TOL = 3e-4


def with_settings(p: dict, memory: str = "auto", batch: str = "batched", model=("ckpt", 0)) -> dict:
    """Insert a Z2I GPU Settings node after the graph's model output `model` and rewire every input that took it."""
    src = list(model)
    for n in p.values():
        for k, v in n["inputs"].items():
            if isinstance(v, list) and v == src:
                n["inputs"][k] = ["z2i_settings", 0]
    p["z2i_settings"] = {"class_type": "Z2I_GPUSettings", "inputs": {"model": src, "memory": memory, "batch": batch}}
    return p


def two_image_batch(p: dict, which: str, batch: str = "per image") -> dict:
    """Rewire an `inverted_image_graph` to image A (the example), image B (A mirrored and inverted: a different
    image of the same size) or the batch [A, B]: which in "a", "b", "ab". Each image is VAE-encoded on its own and
    the latents batched (LatentBatch), so the batch holds the same bits as the single-image runs. batch: the Z2I
    GPU Settings batch mode ("per image": each image exactly as alone; "batched": the default, one UNet call)."""
    with_settings(p, batch=batch)
    p["flip"] = {"class_type": "ImageFlip", "inputs": {"image": ["scale", 0], "flip_method": "y-axis: horizontally"}}
    p["other"] = {"class_type": "ImageInvert", "inputs": {"image": ["flip", 0]}}
    p["enc_a"] = {"class_type": "VAEEncode", "inputs": {"pixels": ["scale", 0], "vae": ["ckpt", 2]}}
    p["enc_b"] = {"class_type": "VAEEncode", "inputs": {"pixels": ["other", 0], "vae": ["ckpt", 2]}}
    p["pair"] = {"class_type": "LatentBatch", "inputs": {"samples1": ["enc_a", 0], "samples2": ["enc_b", 0]}}
    p["inv"]["inputs"]["latent"] = {"a": ["enc_a", 0], "b": ["enc_b", 0], "ab": ["pair", 0]}[which]
    return p


def batch_spread(run, node: str = "s") -> float:
    """max |[A alone, B alone] - [A, B] batched| / std of the batched result, for run(which) -> the prompt's result
    (a RunResult) with `two_image_batch(..., which)`."""
    a, b, ab = (run(w).output(node, 0)["samples"] for w in ("a", "b", "ab"))
    return float((torch.cat([a, b]) - ab).abs().max() / ab.std())


def run_sampler_with_stats(host, prompt: dict, positive: str, negative: str, cfg: float, **options):
    """Run the graph's "sampler" node function directly through ComfyUI's sample_custom from the graph's
    inversion, with extra sampler options (stats, probes): returns (samples, stats)."""
    import comfy.sample
    import comfy.samplers
    model = prompt["s"]["inputs"]["model"] if "s" in prompt else ["ckpt", 0]     # the sampling node's MODEL
    res = host.run_prompt(prompt, targets=["sampler", "inv", positive, negative, model[0]])
    node = res.output("sampler", 0)
    stats: dict = {}
    # the node's own class (Z2IKSampler: a flow latent at sigma 1 is carried as the state, not scaled to zero)
    sampler = type(node)(node.sampler_function, extra_options={**node.extra_options, "stats": stats, **options})
    noise = res.output("inv", 0)["samples"]
    with torch.inference_mode():
        out = comfy.sample.sample_custom(res.output(model[0], model[1]), torch.zeros_like(noise), cfg, sampler,
                                         res.output("inv", 2), res.output(positive, 0), res.output(negative, 0),
                                         noise)
    return out, stats


def sample_with_patch(host, p: dict, model_patch=None, sampler_node: str = "s"):
    """Run graph `p` up to its SamplerCustom `sampler_node`, then core's sample_custom (what SamplerCustom does) with
    model_patch(the sampler's MODEL): a patch that is not a node (a recording wrapper, a foreign attention
    replace). Returns the samples."""
    import comfy.sample
    import torch
    s = p[sampler_node]["inputs"]
    targets = [s["sampler"][0], s["model"][0], s["positive"][0], s["negative"][0], s["latent_image"][0],
               s["sigmas"][0]]
    res = host.run_prompt(p, targets=targets)
    out = lambda ref: res.output(ref[0], ref[1])  # noqa: E731
    model = out(s["model"])
    latent = out(s["latent_image"])["samples"]
    with torch.inference_mode():
        return comfy.sample.sample_custom(model_patch(model) if model_patch else model, torch.zeros_like(latent),
                                          s["cfg"], out(s["sampler"]), out(s["sigmas"]), out(s["positive"]),
                                          out(s["negative"]), latent)


def unet_call_recorder():
    """(patch, calls): patch(model) -> a clone whose UNet function wrapper appends (cond_or_uncond, input, c) of
    every UNet call to `calls` and runs the call unchanged."""
    calls: list = []

    def wrapper(apply_model, args):
        calls.append((tuple(args["cond_or_uncond"]), args["input"].detach().clone(),
                      {k: v.detach().clone() if hasattr(v, "detach") else v for k, v in args["c"].items()}))
        return apply_model(args["input"], args["timestep"], **args["c"])

    def patch(model):
        m = model.clone()
        m.set_model_unet_function_wrapper(wrapper)
        return m

    return patch, calls
