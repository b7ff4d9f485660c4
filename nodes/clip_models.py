"""open_clip models for the CLIP losses (AGG's style loss, Asyrp training), read from models/open_clip, and a
differentiable VAE decode so those losses can reach the latent.

Layouts accepted in models/open_clip (never a hub, never a download):
- `name.safetensors` (or .bin/.pt/.pth) with a sidecar `name.json` holding an open_clip model config
  (embed_dim, vision_cfg, text_cfg), or with `architecture` set to a built-in open_clip name (e.g. ViT-B-32
  for OpenAI's or LAION's ViT-B/32 weights);
- a folder as Hugging Face's open_clip repositories lay it out: `open_clip_config.json` beside the weights.

Only files ComfyUI lists in models/open_clip are read. open_clip is only ever given a built-in architecture name
(one open_clip lists from its own bundled configs, never an `hf-hub:` or `local-dir:` schema) or an internal name
under which the config read from models/open_clip is registered; the user's file name is never a model name, so a
file named `hf-hub:org/model.safetensors` cannot make open_clip reach the network.
"""
from __future__ import annotations

import hashlib
import json
import os

import comfy.model_management
import comfy.model_patcher
import folder_paths
import torch
from comfy_api.latest import io

from ..guidance.clip_loss import OPENAI_MEAN, OPENAI_STD, ClipEncoder
from ._host import Z2IInputError, listed_file, listed_file_error, listed_fingerprint, register_model_folder

OPEN_CLIP = register_model_folder("open_clip", {".safetensors", ".bin", ".pt", ".pth"})
ClipLossModelType = io.Custom("Z2I_CLIP_LOSS_MODEL")
LOADER = "Z2I Load open_clip (for CLIP losses)"
AUTO = "auto (config beside the weights)"
INTERNAL = "z2i-local-"            # prefix of the names configs read from models/open_clip are registered under
NAME_FIX = "put open_clip weights there (see the README's CLIP losses section) and pick them in the list"
ARCH_FIX = ("pick a built-in architecture from the list (e.g. ViT-B-32), or 'auto' with name.json or "
            "open_clip_config.json beside the weights; nothing is downloaded")
_config_dir: list = []


def _plain_architecture(arch) -> bool:
    """A built-in open_clip name: no schema (hf-hub:, local-dir:), no path, not one of our internal names."""
    return (isinstance(arch, str) and bool(arch) and not any(c in arch for c in ":/\\\x00")
            and not arch.startswith(INTERNAL))


def builtin_architectures() -> list[str]:
    """The architectures open_clip lists from local configs (its bundled ones), schemas and internal names left out."""
    try:
        import open_clip
    except ImportError:
        return []
    return [a for a in open_clip.list_models() if _plain_architecture(a)]


def _architectures() -> list[str]:
    return [AUTO, *builtin_architectures()]


def architecture_error(architecture) -> Z2IInputError | None:
    if architecture == AUTO:
        return None
    if isinstance(architecture, str) and any(architecture.startswith(p) for p in ("hf-hub:", "local-dir:")):
        return Z2IInputError(LOADER, "architecture", f"{architecture[:80]!r} names a hub or folder location; "
                             "only architectures open_clip has built in are accepted", ARCH_FIX)
    if architecture not in builtin_architectures():
        return Z2IInputError(LOADER, "architecture", f"unknown open_clip architecture {str(architecture)[:80]!r}",
                             ARCH_FIX)
    return None


def _refuse_hub(cfg: dict, name: str) -> None:
    text = cfg.get("text_cfg", {})
    for key in ("hf_model_name", "hf_tokenizer_name"):
        if text.get(key):
            raise Z2IInputError(LOADER, "architecture", f"'{name}' uses a Hugging Face text tower ({key}="
                                f"{text[key]!r}), which would be fetched from the hub", "use a CLIP with open_clip's "
                                "own text transformer (e.g. ViT-B-32, ViT-L-14)")


def _read_config(path: str, name: str, key: str | None = None) -> tuple[dict, dict]:
    """(model config, preprocess config) from a JSON file beside the weights, checked to be an open_clip config."""
    what = os.path.basename(path)
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError) as e:
        raise Z2IInputError(LOADER, "name", f"{what} beside '{name}' is not readable JSON ({str(e)[:120]})",
                            "fix or remove that config") from None
    pre = {}
    if key is not None and isinstance(data, dict):
        pre = data.get("preprocess_cfg") or {}
        data = data.get(key)
    if not isinstance(data, dict) or not isinstance(pre, dict) or "embed_dim" not in data or not all(
            isinstance(data.get(k), dict) for k in ("vision_cfg", "text_cfg")):
        raise Z2IInputError(LOADER, "name", f"{what} beside '{name}' is not an open_clip model config (it needs "
                            "embed_dim, vision_cfg and text_cfg" + (f" under '{key}'" if key else "") + ")",
                            "fix that config, or pick the architecture in the list")
    _refuse_hub(data, name)
    return data, pre


def _register(cfg: dict) -> str:
    """Register a checked config with open_clip under an internal name (never the user's file name); returns it."""
    import atexit
    import shutil
    import tempfile

    import open_clip

    arch = INTERNAL + hashlib.sha256(json.dumps(cfg, sort_keys=True).encode()).hexdigest()[:16]
    if arch not in open_clip.list_models():
        if not _config_dir:
            _config_dir.append(tempfile.mkdtemp(prefix="z2i_open_clip_"))
            atexit.register(shutil.rmtree, _config_dir[0], True)
        path = os.path.join(_config_dir[0], arch + ".json")
        with open(path, "w", encoding="utf-8") as f:
            json.dump(cfg, f)
        open_clip.add_model_config(path)
    return arch


def _config_fingerprint(name) -> str:
    """Content hash of the configs beside a listed weights file (so editing them re-runs the loader)."""
    if listed_file_error(OPEN_CLIP, name, "", "", "") is not None:
        return ""
    path = folder_paths.get_full_path(OPEN_CLIP, name)
    h = hashlib.sha256()
    for cfg in (os.path.splitext(path)[0] + ".json", os.path.join(os.path.dirname(path), "open_clip_config.json")):
        if os.path.isfile(cfg):
            with open(cfg, "rb") as f:
                h.update(f.read())
    return h.hexdigest()


def load_open_clip(name: str, architecture: str) -> ClipEncoder:
    try:
        import open_clip
    except ImportError:
        raise Z2IInputError(LOADER, "name", "open_clip_torch is not installed", "pip install -r "
                            "custom_nodes/z2i/requirements.txt") from None
    path = os.path.abspath(listed_file(OPEN_CLIP, name, LOADER, "name", NAME_FIX))
    err = architecture_error(architecture)
    if err is not None:
        raise err
    stem, folder = os.path.splitext(path)[0], os.path.dirname(path)
    sidecar, hf_config = stem + ".json", os.path.join(folder, "open_clip_config.json")
    with torch.inference_mode(False):        # normal tensors: gradients flow to the images through the towers
        if architecture == AUTO:
            if os.path.isfile(sidecar):
                cfg, pre = _read_config(sidecar, name)
            elif os.path.isfile(hf_config):
                cfg, pre = _read_config(hf_config, name, key="model_cfg")
            else:
                raise Z2IInputError(LOADER, "architecture", f"no config found for '{name}' (looked for "
                                    f"{os.path.basename(sidecar)} and open_clip_config.json beside it)",
                                    "pick the model's architecture in the list (e.g. ViT-B-32)")
            arch = _register(cfg)
            try:
                model = open_clip.create_model(arch, pretrained=path, weights_only=True,
                                               force_preprocess_cfg=pre or None)
            except (RuntimeError, AssertionError, KeyError, ValueError, TypeError, OSError) as e:
                raise Z2IInputError(LOADER, "name", f"the weights in '{name}' do not fit the config beside them "
                                    f"({(str(e).splitlines() or [type(e).__name__])[0][:200]})", "use the config "
                                    "they were saved with, or pick their architecture in the list") from None
            tokenizer = open_clip.get_tokenizer(arch)
        else:
            cfg = open_clip.get_model_config(architecture)
            if cfg is None:
                raise Z2IInputError(LOADER, "architecture", f"unknown open_clip architecture {architecture!r}",
                                    ARCH_FIX)
            _refuse_hub(cfg, name)
            try:
                model = open_clip.create_model(architecture, pretrained=path, weights_only=True)
            except (RuntimeError, AssertionError, KeyError, ValueError, TypeError, OSError) as e:
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
                "Loads an open_clip model that judges how well an image matches a text, for AGG's text style "
                "loss and for training h-space directions. It is read from models/open_clip (from disk only, "
                "nothing downloaded) and is not the Stable Diffusion text encoder."),
            inputs=[
                io.Combo.Input("name", options=folder_paths.get_filename_list(OPEN_CLIP),
                               tooltip=f"Weights in models/{OPEN_CLIP} (safetensors preferred)."),
                io.Combo.Input("architecture", options=_architectures(), default=AUTO,
                               tooltip="open_clip architecture of the weights (built-in names only; no hub or "
                                       "folder locations); 'auto' reads name.json or open_clip_config.json beside "
                                       "the weights."),
            ],
            outputs=[ClipLossModelType.Output(
                display_name="clip_loss_model",
                tooltip="The open_clip model, for the AGG Sampler's style_clip or Train h-space Direction.")],
        )

    @classmethod
    def validate_inputs(cls, name=None, architecture=None):
        err = None if name is None else listed_file_error(OPEN_CLIP, name, LOADER, "name", NAME_FIX)
        err = err or (None if architecture is None else architecture_error(architecture))
        return True if err is None else str(err)

    @classmethod
    def fingerprint_inputs(cls, name, architecture):
        return f"{listed_fingerprint(OPEN_CLIP, name)}:{_config_fingerprint(name)}:{architecture}"

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


def image_decoder(vae, base_model, node: str, input_name: str = "vae", load: bool = True):
    """fn(x0 in the diffusion model's latent space) -> image [B, 3, H, W] in about [0, 1], differentiable.

    For gradients, use it inside nodes._guided.guided_run with the VAE as a helper (loaded by the memory manager,
    then its inference-tensor weights aliased) and load=False: nothing may load while weights are aliased.
    No clamp: clamping would zero the gradient of saturated pixels.
    """
    if vae is None or not hasattr(vae, "first_stage_model") or getattr(vae, "latent_dim", 2) != 2:
        raise Z2IInputError(node, input_name, "needs the image VAE of the checkpoint", "connect the checkpoint "
                            "loader's VAE output")
    if getattr(vae, "latent_channels", None) != base_model.latent_format.latent_channels:
        raise Z2IInputError(node, input_name, f"this VAE has {vae.latent_channels} latent channels, the model "
                            f"{base_model.latent_format.latent_channels}", "use the VAE of the same checkpoint")
    if load:
        comfy.model_management.load_models_gpu([vae.patcher])

    def decode(x0: torch.Tensor) -> torch.Tensor:
        z = base_model.process_latent_out(x0).to(vae.device, vae.vae_dtype)
        return (vae.first_stage_model.decode(z).float() + 1.0) / 2.0

    return decode


NODES = [OpenCLIPLoader]
