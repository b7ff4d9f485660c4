"""Small bridges between the pure core and ComfyUI's runtime: progress, interruption, input checks."""
from __future__ import annotations

from typing import Callable, Optional

import comfy.model_management
import comfy.model_sampling
import comfy.samplers
import torch

from .types import ModelSignature


class Z2IInputError(ValueError):
    """A bad input, with a message that names the node, the input and the fix."""

    def __init__(self, node: str, input_name: str, problem: str, fix: str):
        super().__init__(f"{node}: input '{input_name}': {problem}. {fix}")


def interruptible(callback: Optional[Callable[[dict], None]]) -> Callable[[dict], None]:
    """Wrap a KSAMPLER step callback so every step honours ComfyUI's Cancel button first.

    The server's progress hook also checks for interruption, but headless runs have no hook; checking
    here makes every Z2I loop stoppable in both.
    """
    def step(info: dict) -> None:
        comfy.model_management.throw_exception_if_processing_interrupted()
        if callback is not None:
            callback(info)

    return step


def unet_of(model, node: str, input_name: str = "model"):
    """The UNet of a MODEL, or a clear refusal for models without one (DiT/flow families)."""
    unet = model.get_model_object("diffusion_model")
    if not all(hasattr(unet, a) for a in ("input_blocks", "middle_block", "output_blocks")):
        raise Z2IInputError(node, input_name, f"this {type(model.model).__name__} model has no UNet "
                            f"({type(unet).__name__})", "Z2I works with Stable Diffusion 1.x, 2.x and SDXL "
                            "checkpoints; load one of those")
    ms = model.get_model_object("model_sampling")
    if not isinstance(ms, comfy.model_sampling.ModelSamplingDiscrete) or not isinstance(
            ms, (comfy.model_sampling.EPS, comfy.model_sampling.V_PREDICTION)) or isinstance(
            ms, comfy.model_sampling.CONST):
        raise Z2IInputError(node, input_name, f"its sampling ({type(ms).__name__}) is not discrete-time "
                            "eps or v-prediction", "use an SD1.x/SD2.x/SDXL model without flow or EDM "
                            "model-sampling patches")
    return unet


def downsample_factor(unet) -> int:
    n = sum(1 for m in unet.input_blocks.modules() if type(m).__name__ == "Downsample")
    return 2 ** n


def check_latent(model, samples: torch.Tensor, node: str, input_name: str = "latent") -> None:
    unet = unet_of(model, node)
    if samples.ndim != 4:
        raise Z2IInputError(node, input_name, f"expected an image latent [B, C, H, W], got shape "
                            f"{tuple(samples.shape)}", "connect a VAE Encode or Empty Latent Image output")
    f = downsample_factor(unet)
    h, w = samples.shape[-2:]
    if h % f or w % f:
        raise Z2IInputError(node, input_name, f"latent is {w}x{h}, but this model needs multiples of {f} "
                            f"(images in multiples of {8 * f} px)", "scale or crop the image first "
                            "(ImageScale / ImageCrop)")


def check_cond_batch(conditioning, batch: int, node: str, input_name: str) -> None:
    for c in conditioning or []:
        b = c[0].shape[0]
        if b not in (1, batch):
            raise Z2IInputError(node, input_name, f"conditioning has batch {b} but the latent has batch {batch}",
                                "use one prompt (batch 1) or one per latent")


def schedule_sigmas(model, scheduler: str, steps: int, denoise: float = 1.0) -> torch.Tensor:
    """Descending sigmas exactly as core BasicScheduler makes them (so the two can be paired)."""
    total = steps if denoise >= 1.0 else int(steps / denoise)
    sigmas = comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), scheduler, total).cpu()
    return sigmas[-(steps + 1):]


def model_signature(model) -> ModelSignature:
    base = model.model
    return ModelSignature(family=type(base.model_config).__name__, model_type=base.model_type.name,
                          latent_format=type(base.latent_format).__name__, unet_id=id(base.diffusion_model),
                          patches=str(getattr(model, "patches_uuid", "")))


def register_model_folder(name: str, extensions: set[str]) -> str:
    """Make models/<name> a ComfyUI model folder (kept as is when extra_model_paths.yaml already set it)."""
    import os

    import folder_paths

    if name not in folder_paths.folder_names_and_paths:
        folder_paths.folder_names_and_paths[name] = ([os.path.join(folder_paths.models_dir, name)], set(extensions))
    else:
        paths, exts = folder_paths.folder_names_and_paths[name]
        folder_paths.folder_names_and_paths[name] = (paths, set(exts) | set(extensions))
    return name


def save_unique(folder: str, filename: str, tensors: dict, metadata: dict) -> str:
    """Write safetensors to models/<folder>/<name>_NNNNN.safetensors, never overwriting; returns the file name."""
    import os

    import folder_paths
    import safetensors.torch

    base = folder_paths.get_folder_paths(folder)[0]
    os.makedirs(base, exist_ok=True)
    name, counter = os.path.basename(filename.strip()) or "direction", 1
    while os.path.exists(path := os.path.join(base, f"{name}_{counter:05}.safetensors")):
        counter += 1
    safetensors.torch.save_file(tensors, path, metadata=metadata)
    return os.path.basename(path)


def file_fingerprint(folder: str, name: str) -> str:
    """Content hash of a model-folder file (so edits to the file re-run the loader)."""
    import hashlib

    import folder_paths

    path = folder_paths.get_full_path(folder, name)
    if path is None:
        return name
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def load_safetensors(folder: str, name: str, node: str, hint: str) -> tuple[dict, dict]:
    """(tensors, metadata) of models/<folder>/<name>, or a Z2IInputError naming the node and the fix."""
    import safetensors

    import folder_paths

    path = folder_paths.get_full_path(folder, name)
    if path is None:
        raise Z2IInputError(node, "name", f"'{name}' is not in models/{folder}", hint)
    with safetensors.safe_open(path, framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()
