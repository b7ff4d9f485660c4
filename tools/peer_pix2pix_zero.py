"""The benchmark's peer: diffusers' StableDiffusionPix2PixZeroPipeline on the weights of a ComfyUI checkpoint.

Used by tools/benchmark.py (`--peer`, on by default). diffusers is a benchmark-only dependency: it is never
installed into the test venv but, with the two small packages the venv lacks, into a folder of its own keyed
by a hash of tools/requirements-bench.txt and tools/constraints.txt (`ensure_bench_deps`), which only the
benchmark process puts on sys.path. Nothing is downloaded from a model hub: every module is built from a
config written here and loaded with the checkpoint's own tensors, converted locally:

- UNet2DConditionModel: config derived from ComfyUI's detected unet_config; keys through ComfyUI's
  `comfy.utils.unet_to_diffusers` map.
- CLIPTextModel: ComfyUI's `comfy/sd1_clip_config.json`; the checkpoint's `cond_stage_model.transformer.*`
  keys are transformers' names (less the `text_model.` prefix, which transformers 5 no longer has). CLIPTokenizer: `comfy/sd1_tokenizer` with model_max_length 77 (the
  pipeline needs one, but it is only handed embeddings).
- AutoencoderTiny: the tiny checkpoints carry a TAESD VAE (tools/make_tiny_checkpoints.py), whose two
  nn.Sequential stacks are diffusers' EncoderTiny/DecoderTiny layers (the decoder's leading Clamp is
  DecoderTiny's tanh, so its indices shift by one). TAESD works on scaled latents: scaling_factor 1 for the tiny
  checkpoints; the toy world's TAESD carries its own scale and shift (see build_pipeline).
- DDIMScheduler / DDIMInverseScheduler: SD1.5's scheduler config (scaled-linear betas 0.00085..0.012,
  steps_offset 1), whose 10-step grid (901, 801, ..., 1) is ComfyUI's 'ddim_uniform'.

`check_conversion` runs the same inputs through ComfyUI's loaded modules and the converted ones and raises
when they disagree, so a wrong conversion can never produce a timing.
"""
from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
REQUIREMENTS = REPO / "tools" / "requirements-bench.txt"
CONSTRAINTS = REPO / "tools" / "constraints.txt"
TOLERANCE = 1e-5     # max |difference| accepted between ComfyUI's and the converted modules (fp32)


def bench_deps_dir() -> Path:
    cache = Path(os.environ.get("Z2I_CACHE", Path.home() / ".cache" / "z2i"))
    key = hashlib.sha256(REQUIREMENTS.read_bytes() + CONSTRAINTS.read_bytes()
                         + f"{sys.version_info[0]}.{sys.version_info[1]}".encode()).hexdigest()[:16]
    return cache / f"bench-{key}"


def ensure_bench_deps() -> Path:
    """Install tools/requirements-bench.txt (no dependencies: the venv has the rest) into the benchmark's own
    folder once, and put that folder last on sys.path of this process only (it adds packages the venv lacks and
    shadows none of the venv's)."""
    target = bench_deps_dir()
    if not (target / ".z2i-complete").exists():
        print(f"[benchmark] installing {REQUIREMENTS.name} into {target} (once)", file=sys.stderr, flush=True)
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--disable-pip-version-check", "--no-deps",
                        "--target", str(target), "-c", str(CONSTRAINTS), "-r", str(REQUIREMENTS)], check=True)
        (target / ".z2i-complete").touch()
    if str(target) not in sys.path:
        sys.path.append(str(target))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    return target


def diffusers_unet_config(uc: dict) -> dict:
    """UNet2DConditionModel config of an SD1.x/SD2.x-style ComfyUI unet_config (no ADM, no temporal layers)."""
    if uc.get("adm_in_channels") or uc.get("use_temporal_attention") or uc.get("use_temporal_resblock"):
        raise ValueError("only SD1.x/SD2.x-style UNets (no ADM, no temporal layers) are converted")
    nrb = list(uc["num_res_blocks"])
    if len(set(nrb)) != 1:
        raise ValueError(f"uneven num_res_blocks {nrb}")
    n = nrb[0]
    chans = [uc["model_channels"] * m for m in uc["channel_mult"]]
    depth_in = list(uc["transformer_depth"])
    depth_out = list(reversed(uc["transformer_depth_output"]))   # ComfyUI pops its output blocks' depths off the end
    down = ["CrossAttnDownBlock2D" if depth_in[lvl * n] > 0 else "DownBlock2D" for lvl in range(len(chans))]
    up = ["CrossAttnUpBlock2D" if depth_out[j * (n + 1)] > 0 else "UpBlock2D" for j in range(len(chans))]
    depths = {d for d in depth_in + depth_out if d > 0}
    if depths != {1} or uc.get("transformer_depth_middle", 1) != 1:
        raise ValueError("only one transformer block per attention layer is converted")
    if uc.get("num_heads", -1) > 0:
        heads = uc["num_heads"]                          # diffusers' SD1 naming: this "head dim" is the count
    else:
        heads = [c // uc["num_head_channels"] for c in chans]
    return dict(sample_size=uc.get("image_size", 32), in_channels=uc["in_channels"],
                out_channels=uc["out_channels"], down_block_types=tuple(down), up_block_types=tuple(up),
                block_out_channels=tuple(chans), layers_per_block=n, cross_attention_dim=uc["context_dim"],
                attention_head_dim=heads, use_linear_projection=bool(uc["use_linear_in_transformer"]))


def _tensors(path: str, prefix: str) -> dict:
    from safetensors import safe_open
    out = {}
    with safe_open(path, "pt") as f:
        for k in f.keys():
            if k.startswith(prefix):
                t = f.get_tensor(k)
                out[k[len(prefix):]] = t.float() if t.is_floating_point() else t
    if not out:
        raise KeyError(f"no tensors under {prefix!r} in {path}")
    return out


def _load(module, sd: dict, what: str, allow_missing=()) -> None:
    missing, unexpected = module.load_state_dict(sd, strict=False)
    missing = [k for k in missing if k not in allow_missing]
    if missing or unexpected:
        raise RuntimeError(f"{what}: converted weights do not fit (missing {missing[:5]}, unexpected {unexpected[:5]})")


def build_pipeline(ckpt_path: str, unet_config: dict, comfy_root: Path):
    """The pix2pix-zero pipeline (with its inverse scheduler) on the checkpoint's weights, fp32 on CPU.

    Modules are left as diffusers' from_pretrained leaves them: eval mode, parameters requiring grad.
    """
    import comfy.utils
    import torch
    from diffusers import (AutoencoderTiny, DDIMInverseScheduler, DDIMScheduler,
                           StableDiffusionPix2PixZeroPipeline, UNet2DConditionModel)
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    unet = UNet2DConditionModel(**diffusers_unet_config(unet_config))
    flat = _tensors(ckpt_path, "model.diffusion_model.")
    key_map = comfy.utils.unet_to_diffusers(unet_config)
    _load(unet, {dk: flat[ck] for dk, ck in key_map.items() if ck in flat}, "UNet")

    text_config = CLIPTextConfig.from_json_file(str(comfy_root / "comfy" / "sd1_clip_config.json"))
    text_encoder = CLIPTextModel(text_config)
    text_sd = _tensors(ckpt_path, "cond_stage_model.transformer.")
    if not any(k.startswith("text_model.") for k in text_encoder.state_dict()):   # transformers 5 drops it
        text_sd = {k.removeprefix("text_model."): v for k, v in text_sd.items()}
    _load(text_encoder, text_sd, "CLIP text encoder",
          allow_missing=("text_model.embeddings.position_ids", "embeddings.position_ids"))
    tokenizer = CLIPTokenizer.from_pretrained(str(comfy_root / "comfy" / "sd1_tokenizer"), model_max_length=77)

    vae_sd = _tensors(ckpt_path, "first_stage_model.")
    # ComfyUI decodes the model's latent z as decoder(z * vae_scale / 0.18215 - vae_shift * vae_scale): the tiny
    # checkpoints' TAESD has scale 0.18215 and no shift (decoder(z)); the toy world's its own (docs/TOY_MODEL.md).
    # The pipeline decodes z / scaling_factor, so scaling_factor = 0.18215 / vae_scale, and the shift goes in as a
    # constant added to the decoder's input.
    vae_scale, vae_shift = float(vae_sd.pop("vae_scale")), float(vae_sd.pop("vae_shift"))
    taesd = {}
    for k, v in vae_sd.items():
        part, idx, rest = k.split(".", 2)
        if part == "taesd_encoder":
            taesd[f"encoder.layers.{idx}.{rest}"] = v
        elif part == "taesd_decoder":
            taesd[f"decoder.layers.{int(idx) - 1}.{rest}"] = v
        else:
            raise KeyError(k)
    vae = AutoencoderTiny(latent_channels=unet_config["in_channels"], scaling_factor=0.18215 / vae_scale)
    _load(vae, taesd, "TAESD VAE")
    if vae_shift != 0.0:
        offset = -vae_shift * vae_scale
        vae.decoder.register_forward_pre_hook(lambda module, args: (args[0] + offset, *args[1:]))

    sched = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                 clip_sample=False, set_alpha_to_one=False, steps_offset=1, prediction_type="epsilon")
    pipe = StableDiffusionPix2PixZeroPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=DDIMScheduler(**sched),
        feature_extractor=None, safety_checker=None, inverse_scheduler=DDIMInverseScheduler(**sched),
        caption_generator=None, caption_processor=None, requires_safety_checker=False)
    for m in (unet, text_encoder, vae):
        m.eval()
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(torch.device("cpu"), torch.float32)


def check_conversion(pipe, comfy_model, comfy_vae, prompt: str, comfy_cond, latent_like) -> dict:
    """Max |difference| between ComfyUI's modules and the converted ones on the same inputs; raises when off.

    UNet eps at three timesteps and TAESD decode of one unit-variance latent shaped like `latent_like`; the
    text encoder's output for `prompt` against `comfy_cond`, ComfyUI's CLIPTextEncode of it. Must run before
    the pipeline's first call (which swaps the UNet's attention processors for its own).
    """
    import torch
    errors = {}
    g = torch.Generator().manual_seed(0)
    with torch.inference_mode():
        x = torch.randn(latent_like.shape, generator=g)
        cond = comfy_cond.float()
        for t in (901.0, 501.0, 1.0):
            ref = comfy_model.model.diffusion_model(x, timesteps=torch.tensor([t]), context=cond)
            got = pipe.unet(x, torch.tensor([t]), encoder_hidden_states=cond).sample
            errors["unet"] = max(errors.get("unet", 0.0), (ref.float() - got).abs().max().item())
        ids = pipe.tokenizer(prompt, padding="max_length", max_length=77, truncation=True,
                             return_tensors="pt").input_ids
        got = pipe.text_encoder(ids)[0]
        errors["text_encoder"] = (got - cond).abs().max().item()
        # ComfyUI's TAESD.decode (before VAE Decode's clamp to [0, 1]) of a unit-variance scaled latent x
        taesd = comfy_vae.first_stage_model
        ref = taesd.decode((x / 0.18215).to(next(taesd.parameters()).dtype)).float()
        got = pipe.vae.decode(x / pipe.vae.config.scaling_factor, return_dict=False)[0]   # as the pipeline does
        errors["vae_decode"] = (got - ref).abs().max().item()
    bad = {k: v for k, v in errors.items() if not v <= TOLERANCE}
    if bad:
        raise RuntimeError(f"the diffusers conversion disagrees with ComfyUI's modules: {bad} > {TOLERANCE}")
    return errors


def reset(pipe) -> None:
    """What a freshly loaded pipeline holds: no stored reference maps, no parameter gradients."""
    for proc in pipe.unet.attn_processors.values():
        getattr(proc, "reference_cross_attn_map", {}).clear()
    pipe.unet.zero_grad(set_to_none=True)


def edit(pipe, latent_scaled, source_cond, uncond, delta, steps: int, cfg: float, xa_guidance: float,
         seed: int, size: int):
    """pix2pix-zero as the pipeline does it: invert (with its default noise regulariser), then edit.

    The inversion is given the scaled latent (ComfyUI's VAE Encode takes the posterior's mode; the pipeline
    would sample it), every prompt as embeddings (the caption's, the empty prompt's) and the edit direction
    as target minus a zero source. Returns the decoded image [1, 3, H, W] in [0, 1].
    """
    import torch
    g = torch.Generator().manual_seed(seed)
    inv = pipe.invert(image=latent_scaled, prompt_embeds=source_cond, num_inference_steps=steps,
                      guidance_scale=1.0, generator=g, output_type="latent")
    out = pipe(prompt_embeds=source_cond, negative_prompt_embeds=uncond, source_embeds=torch.zeros_like(delta),
               target_embeds=delta, latents=inv.latents, height=size, width=size, num_inference_steps=steps,
               guidance_scale=cfg, cross_attention_guidance_amount=xa_guidance, generator=g, output_type="pt")
    return out.images
