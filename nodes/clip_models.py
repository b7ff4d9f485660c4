"""open_clip models for the CLIP losses (AGG's style loss, Asyrp training), read from models/open_clip, and a
differentiable VAE decode so those losses can reach the latent.

Layouts accepted in models/open_clip (never a hub, never a download):
- `name.safetensors` (or .bin/.pt/.pth) with a sidecar `name.json` holding an open_clip model config
  (embed_dim, vision_cfg, text_cfg), or with `architecture` set to a built-in open_clip name (e.g. ViT-B-32
  for OpenAI's or LAION's ViT-B/32 weights);
- a folder as Hugging Face's open_clip repositories lay it out: `open_clip_config.json` beside the weights.
"""
from __future__ import annotations

import json
import os

import comfy.model_management
import comfy.model_patcher
import folder_paths
import torch
from comfy_api.latest import io

from ..guidance.clip_loss import OPENAI_MEAN, OPENAI_STD, ClipEncoder
from ._host import Z2IInputError, file_fingerprint, register_model_folder

OPEN_CLIP = register_model_folder("open_clip", {".safetensors", ".bin", ".pt", ".pth"})
ClipLossModelType = io.Custom("Z2I_CLIP_LOSS_MODEL")
LOADER = "Z2I Load open_clip (for CLIP losses)"
AUTO = "auto (config beside the weights)"


def _architectures() -> list[str]:
    try:
        import open_clip
        return [AUTO, *open_clip.list_models()]
    except ImportError:
        return [AUTO]


def _refuse_hub(cfg: dict, name: str) -> None:
    text = cfg.get("text_cfg", {})
    for key in ("hf_model_name", "hf_tokenizer_name"):
        if text.get(key):
            raise Z2IInputError(LOADER, "architecture", f"'{name}' uses a Hugging Face text tower ({key}="
                                f"{text[key]!r}), which would be fetched from the hub", "use a CLIP with open_clip's "
                                "own text transformer (e.g. ViT-B-32, ViT-L-14)")


def load_open_clip(name: str, architecture: str) -> ClipEncoder:
    try:
        import open_clip
    except ImportError:
        raise Z2IInputError(LOADER, "name", "open_clip_torch is not installed", "pip install -r "
                            "custom_nodes/z2i/requirements.txt") from None
    path = folder_paths.get_full_path(OPEN_CLIP, name)
    if path is None:
        raise Z2IInputError(LOADER, "name", f"'{name}' is not in models/{OPEN_CLIP}",
                            "put open_clip weights there (see the README's CLIP losses section)")
    stem, folder = os.path.splitext(path)[0], os.path.dirname(path)
    sidecar, hf_config = stem + ".json", os.path.join(folder, "open_clip_config.json")
    with torch.inference_mode(False):        # normal tensors: gradients flow to the images through the towers
        if architecture == AUTO:
            if os.path.isfile(sidecar):
                with open(sidecar, encoding="utf-8") as f:
                    cfg = json.load(f)
                _refuse_hub(cfg, name)
                arch = os.path.basename(stem)
                open_clip.add_model_config(sidecar)
                model = open_clip.create_model(arch, pretrained=path, weights_only=True)
                tokenizer = open_clip.get_tokenizer(arch)
            elif os.path.isfile(hf_config):
                with open(hf_config, encoding="utf-8") as f:
                    _refuse_hub(json.load(f).get("model_cfg", {}), name)
                model = open_clip.create_model("local-dir:" + folder, weights_only=True)
                tokenizer = open_clip.get_tokenizer("local-dir:" + folder)
            else:
                raise Z2IInputError(LOADER, "architecture", f"no config found for '{name}' (looked for "
                                    f"{os.path.basename(sidecar)} and open_clip_config.json beside it)",
                                    "pick the model's architecture in the list (e.g. ViT-B-32)")
        else:
            cfg = open_clip.get_model_config(architecture)
            if cfg is None:
                raise Z2IInputError(LOADER, "architecture", f"unknown open_clip architecture {architecture!r}",
                                    "pick one from the list")
            _refuse_hub(cfg, name)
            try:
                model = open_clip.create_model(architecture, pretrained=path, weights_only=True)
            except (RuntimeError, AssertionError, KeyError, ValueError) as e:
                raise Z2IInputError(LOADER, "architecture", f"the weights in '{name}' do not fit {architecture} "
                                    f"({(str(e).splitlines() or [type(e).__name__])[0][:200]})", "pick the architecture they were "
                                    "trained with") from None
            tokenizer = open_clip.get_tokenizer(architecture)
        model = model.eval().requires_grad_(False)
    pp = getattr(model.visual, "preprocess_cfg", {}) or {}
    size = pp.get("size", getattr(model.visual, "image_size", 224))
    size = size[0] if isinstance(size, (tuple, list)) else size
    return ClipEncoder(model, tokenizer, int(size), pp.get("mean", OPENAI_MEAN), pp.get("std", OPENAI_STD),
                       name=name)


class OpenCLIPLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="Z2I_OpenCLIPLoader",
            display_name="Load open_clip for CLIP Losses (Z2I)",
            category="Z2I/loaders",
            description=(
                "Loads an open_clip model from models/open_clip for the CLIP losses on decoded images: AGG's "
                "text style loss and Asyrp direction training. Not the Stable Diffusion text encoder. Weights are "
                "read from disk only."),
            inputs=[
                io.Combo.Input("name", options=folder_paths.get_filename_list(OPEN_CLIP),
                               tooltip=f"Weights in models/{OPEN_CLIP} (safetensors preferred)."),
                io.Combo.Input("architecture", options=_architectures(), default=AUTO,
                               tooltip="open_clip architecture of the weights; 'auto' reads name.json or "
                                       "open_clip_config.json beside the weights."),
            ],
            outputs=[ClipLossModelType.Output(display_name="clip_loss_model")],
        )

    @classmethod
    def fingerprint_inputs(cls, name, architecture):
        return f"{file_fingerprint(OPEN_CLIP, name)}:{architecture}"

    @classmethod
    def execute(cls, name, architecture) -> io.NodeOutput:
        enc = load_open_clip(name, architecture)
        # a ModelPatcher lets ComfyUI's memory manager load it to the GPU when used and offload it after
        enc.patcher = comfy.model_patcher.ModelPatcher(
            enc.model, load_device=comfy.model_management.get_torch_device(),
            offload_device=comfy.model_management.text_encoder_offload_device())
        return io.NodeOutput(enc)


def ready(encoder):
    """Load the open_clip model onto the compute device through ComfyUI's memory manager; returns it."""
    if getattr(encoder, "patcher", None) is not None:
        comfy.model_management.load_models_gpu([encoder.patcher])
    return encoder


def image_decoder(vae, base_model, node: str, input_name: str = "vae"):
    """fn(x0 in the diffusion model's latent space) -> image [B, 3, H, W] in about [0, 1], differentiable.

    Call it inside guidance.autograd.autograd_parameters(vae.first_stage_model) (VAE weights are inference
    tensors). No clamp: clamping would zero the gradient of saturated pixels.
    """
    if vae is None or not hasattr(vae, "first_stage_model") or getattr(vae, "latent_dim", 2) != 2:
        raise Z2IInputError(node, input_name, "needs the image VAE of the checkpoint", "connect the checkpoint "
                            "loader's VAE output")
    if getattr(vae, "latent_channels", None) != base_model.latent_format.latent_channels:
        raise Z2IInputError(node, input_name, f"this VAE has {vae.latent_channels} latent channels, the model "
                            f"{base_model.latent_format.latent_channels}", "use the VAE of the same checkpoint")
    comfy.model_management.load_models_gpu([vae.patcher])

    def decode(x0: torch.Tensor) -> torch.Tensor:
        z = base_model.process_latent_out(x0).to(vae.device, vae.vae_dtype)
        return (vae.first_stage_model.decode(z).float() + 1.0) / 2.0

    return decode


NODES = [OpenCLIPLoader]
