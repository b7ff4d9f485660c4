"""Small bridges between the pure core and ComfyUI's runtime: progress, interruption, input checks."""
from __future__ import annotations

from typing import Callable, Optional

import comfy.model_management
import comfy.model_sampling
import comfy.samplers
import torch

from ..guidance.schedules import FLOW, noise_form_of
from .types import ModelSignature


class Z2IInputError(ValueError):
    """A bad input, with a message that names the node, the input and the fix.

    ComfyUI shows an error as `<module>.<class>: message` unless the module is "builtins"
    (execution.full_type_name); the pack's module path (`.../custom_nodes/z2i.nodes._host`) means nothing to a
    user, so the class reports itself as a builtin and the UI reads `Z2IInputError: <node>: input ...`."""

    def __init__(self, node: str, input_name: str, problem: str, fix: str):
        super().__init__(f"{node}: input '{input_name}': {problem}. {fix}")
        self.node, self.input_name, self.problem, self.fix = node, input_name, problem, fix

    def __reduce__(self):      # pickled through this module's function (builtins has no Z2IInputError)
        return _rebuild_input_error, (self.node, self.input_name, self.problem, self.fix)


Z2IInputError.__module__ = "builtins"


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


UNET_ONLY = "h-space Direction Train"     # the one Z2I node that does not run on SD3 (rectified flow)


def is_sd3(model) -> bool:
    """An SD3-family MMDiT with rectified-flow sampling (ComfyUI's SD3 model class and CONST sampling)."""
    unet = model.get_model_object("diffusion_model")
    ms = model.get_model_object("model_sampling")
    return (type(model.model).__name__ == "SD3" and hasattr(unet, "joint_blocks")
            and isinstance(ms, comfy.model_sampling.CONST) and noise_form_of(ms) is FLOW)


def denoiser_of(model, node: str, input_name: str = "model"):
    """The diffusion model of a MODEL for the nodes that only call the denoiser (inversion, the DDIM sampler):
    a UNet family (unet_of) or SD3 (rectified flow), else a clear refusal."""
    if is_sd3(model):
        return model.get_model_object("diffusion_model")
    return unet_of(model, node, input_name)


def unet_of(model, node: str, input_name: str = "model"):
    """The UNet of a MODEL, or a clear refusal for models without one (DiT/flow families)."""
    unet = model.get_model_object("diffusion_model")
    if not all(hasattr(unet, a) for a in ("input_blocks", "middle_block", "output_blocks")):
        if is_sd3(model):
            raise Z2IInputError(node, input_name, "this node needs a UNet (SD1.x, SD2.x, SDXL); on SD3 (MMDiT, "
                                f"rectified flow) every Z2I node runs except {UNET_ONLY} (its trainer is built on a "
                                "UNet's middle block and is not ported to SD3)", "load an SD1.x/SD2.x/SDXL "
                                "checkpoint to train a direction, or on SD3 use h-space Direction From Prompts")
        raise Z2IInputError(node, input_name, f"this {type(model.model).__name__} model has no UNet "
                            f"({type(unet).__name__})", "Z2I works with Stable Diffusion 1.x, 2.x, SDXL and SD3 "
                            "checkpoints (Flux and other DiTs are untested here: they "
                            "need a T5 text encoder this project cannot test with); load one of those")
    ms = model.get_model_object("model_sampling")
    if not isinstance(ms, comfy.model_sampling.ModelSamplingDiscrete) or not isinstance(
            ms, (comfy.model_sampling.EPS, comfy.model_sampling.V_PREDICTION)) or isinstance(
            ms, comfy.model_sampling.CONST):
        raise Z2IInputError(node, input_name, f"its sampling ({type(ms).__name__}) is not discrete-time "
                            "eps or v-prediction", "use an SD1.x/SD2.x/SDXL model without flow or EDM "
                            "model-sampling patches")
    return unet


def downsample_factor(unet) -> int:
    if hasattr(unet, "joint_blocks"):            # MMDiT: latents in whole patches
        return int(getattr(unet, "patch_size", 2))
    n = sum(1 for m in unet.input_blocks.modules() if type(m).__name__ == "Downsample")
    return 2 ** n


def check_latent(model, samples: torch.Tensor, node: str, input_name: str = "latent", flow_ok: bool = False) -> None:
    """flow_ok: the node also runs on SD3 (denoiser_of); otherwise a UNet is required (unet_of)."""
    unet = denoiser_of(model, node) if flow_ok else unet_of(model, node)
    if samples.ndim != 4:
        raise Z2IInputError(node, input_name, f"expected an image latent [B, C, H, W], got shape "
                            f"{tuple(samples.shape)}", "connect a VAE Encode or Empty Latent Image output")
    if not samples.is_floating_point() or samples.numel() == 0:
        raise Z2IInputError(node, input_name, f"expected a non-empty floating-point latent, got {samples.dtype} of "
                            f"shape {tuple(samples.shape)}", "connect a VAE Encode or Empty Latent Image output")
    if not bool(torch.isfinite(samples).all()):
        raise Z2IInputError(node, input_name, "the latent holds NaN or infinite values", "check the node that made "
                            "it (a VAE Encode of a broken image, latent math that divided by zero)")
    channels = int(getattr(model.get_model_object("latent_format"), "latent_channels", samples.shape[1]))
    if samples.shape[1] != channels:
        raise Z2IInputError(node, input_name, f"the latent has {samples.shape[1]} channels, this "
                            f"{type(model.model.model_config).__name__} model's latents have {channels}",
                            "encode the image with this model's VAE (VAE Encode), or load the checkpoint the "
                            "latent was made for")
    f = downsample_factor(unet)
    h, w = samples.shape[-2:]
    if h % f or w % f:
        raise Z2IInputError(node, input_name, f"latent is {w}x{h}, but this model needs multiples of {f} "
                            f"(images in multiples of {8 * f} px)", "scale or crop the image first "
                            "(ImageScale / ImageCrop)")
    side = getattr(unet, "pos_embed_max_size", None)
    if side and (h // f > side or w // f > side):
        raise Z2IInputError(node, input_name, f"latent is {w}x{h}, larger than this model's positional embedding "
                            f"covers ({side * f}x{side * f} latent, {8 * side * f} px a side)",
                            f"scale the image to at most {8 * side * f} px a side (ImageScale)")


def combo_check(cls, node: str, **values):
    """validate_inputs for a node's Combo inputs: True, or the message of a Z2IInputError naming the node, the
    input, the value and the choices. ComfyUI checks a V3 Combo's value only in the frontend, so an API prompt (the
    headless runner, a script) could pass anything and meet a raw error deep inside, or a silent default. List
    only the Combo inputs in the node's validate_inputs signature: ComfyUI skips its own min/max checks for inputs
    a validate function takes."""
    options = {i.id: list(i.options or []) for i in cls.define_schema().inputs if hasattr(i, "options")}
    for name, value in values.items():
        choices = options.get(name)
        if value is None or choices is None or value in choices:
            continue
        shown = ", ".join(repr(c) for c in choices[:12]) + (", ..." if len(choices) > 12 else "")
        return str(Z2IInputError(node, name, f"unknown value {str(value)[:80]!r}", f"use one of {shown}"))
    return True


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


# -- file names and file contents (issue 18): only files inside their model folder, nothing unreadable ---------
NAME_MAX_BYTES = 255        # longest file name (one path component) on the usual file systems


def path_name_problem(name, folder: str) -> Optional[str]:
    """Why `name` cannot name something inside models/<folder> (None when it can): it must be a plain relative name,
    no NUL, no absolute path or drive, no '..' component."""
    import re

    if not isinstance(name, str) or not name.strip():
        return f"expected the name of a file in models/{folder}, got {name!r}"
    if "\x00" in name:
        return "the name contains a NUL byte"
    if name.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", name):
        return f"{name[:80]!r} is an absolute path; only files inside models/{folder} can be loaded"
    if ".." in re.split(r"[\\/]", name):
        return f"{name[:80]!r} leads out of models/{folder} ('..')"
    return None


def listed_file_error(folder: str, name, node: str, input_name: str, fix: str) -> Optional[Z2IInputError]:
    """The refusal for a `name` that is not one of the files ComfyUI lists in models/<folder>, else None. Use it in
    validate_inputs (V3 Combo values are not checked by ComfyUI 0.3.75) and again at run time."""
    import folder_paths

    problem = path_name_problem(name, folder)
    if problem is None and name not in folder_paths.get_filename_list(folder):
        problem = f"'{name}' is not in models/{folder}"
    return None if problem is None else Z2IInputError(node, input_name, problem, fix)


def listed_file(folder: str, name, node: str, input_name: str, fix: str) -> str:
    """Full path of `name`, one of the files ComfyUI lists in models/<folder>; a Z2IInputError otherwise."""
    import os

    import folder_paths

    err = listed_file_error(folder, name, node, input_name, fix)
    path = None if err is not None else folder_paths.get_full_path(folder, name)
    bases = [os.path.abspath(b) for b in folder_paths.get_folder_paths(folder)]
    if path is None or not any(os.path.commonpath([os.path.abspath(path), b]) == b for b in bases):
        raise err or Z2IInputError(node, input_name, f"'{name}' is not in models/{folder}", fix)
    return path


def listed_fingerprint(folder: str, name) -> str:
    """file_fingerprint for listed files only (anything else is refused by validation; its name is its key)."""
    if listed_file_error(folder, name, "", "", "") is not None:
        return repr(name)
    return file_fingerprint(folder, name)


def save_name_error(filename, node: str, input_name: str = "filename") -> Optional[Z2IInputError]:
    """The refusal for a save name the file system cannot take (NUL byte, over 255 characters, a file name over 255
    bytes once save_unique adds _NNNNN.safetensors), else None. '../', absolute paths and backslashes are not
    refused: save_unique keeps only the last path component."""
    import os

    if not isinstance(filename, str):
        return Z2IInputError(node, input_name, f"expected a text, got {type(filename).__name__}", "type a file name")
    if "\x00" in filename:
        return Z2IInputError(node, input_name, "the name contains a NUL byte, which no file name can hold",
                             "remove it (type the name again instead of pasting it)")
    if len(filename) > NAME_MAX_BYTES:
        return Z2IInputError(node, input_name, f"the name is {len(filename)} characters long, more than "
                             f"{NAME_MAX_BYTES}", "use a shorter name")
    stem = os.path.basename(filename.strip()) or "direction"
    size = len(stem.encode("utf-8", "surrogatepass")) + len("_00000.safetensors")
    if size > NAME_MAX_BYTES:
        return Z2IInputError(node, input_name, f"the file name would be {size} bytes (with _NNNNN.safetensors), "
                             f"more than the {NAME_MAX_BYTES} a file system allows", "use a shorter name")
    return None


def check_save_name(filename, node: str, input_name: str = "filename") -> None:
    err = save_name_error(filename, node, input_name)
    if err is not None:
        raise err


def read_checked_safetensors(folder: str, name, node: str, fix: str, check_header: Callable[[dict, dict], None],
                             check_tensors: Callable[[dict], None], input_name: str = "name") -> tuple[dict, dict]:
    """(tensors, metadata) of a listed file in models/<folder>, checked in two steps: `check_header(shapes,
    metadata)` sees only the header (tensor name -> shape, and the metadata), before any tensor is read, so a file
    that declares something absurd is refused before anything is allocated; `check_tensors(tensors)` then sees the
    loaded values (dtype, NaN/Inf). Either raises ValueError(problem); an unreadable file (corrupt, truncated, not
    safetensors) and every problem become a Z2IInputError naming the node, the input and `fix`."""
    import safetensors

    path = listed_file(folder, name, node, input_name, fix)

    def refuse(problem: str) -> Z2IInputError:
        return Z2IInputError(node, input_name, f"'{name}': {problem}", fix)

    try:
        with safetensors.safe_open(path, framework="pt") as f:
            metadata = dict(f.metadata() or {})
            shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
            try:
                check_header(shapes, metadata)
            except ValueError as e:
                raise refuse(str(e)) from None
            tensors = {k: f.get_tensor(k) for k in shapes}
    except Z2IInputError:
        raise
    except Exception as e:           # safetensors' own errors (header too large, incomplete metadata, ...) and OSError
        first = (str(e).splitlines() or [type(e).__name__])[0][:200]
        raise refuse(f"not a readable safetensors file, corrupt or truncated ({first})") from None
    try:
        check_tensors(tensors)
    except ValueError as e:
        raise refuse(str(e)) from None
    return tensors, metadata


def _rebuild_input_error(node: str, input_name: str, problem: str, fix: str) -> Z2IInputError:
    return Z2IInputError(node, input_name, problem, fix)


def check_inversion(node: str, inversion, model, x: torch.Tensor = None, input_name: str = "inversion",
                    latent_name: str = "latent_image (of the sampler node)") -> None:
    """An INVERSION used with `model` (a ModelPatcher) and, at sampling time, with the latent x: the same model
    family and checkpoint, and the same batch and size, or a Z2IInputError saying which and what to do."""
    why = inversion.model.mismatch(model_signature(model))
    if why:
        raise Z2IInputError(node, input_name, why, "invert the image with the model you edit with (the same "
                            "checkpoint; LoRAs and other patches may differ)")
    if x is None:
        return
    inv = tuple(inversion.latent_shape)
    if tuple(x.shape[-2:]) != inv[-2:]:
        raise Z2IInputError(node, latent_name, f"the latent is {x.shape[-1]}x{x.shape[-2]}, the inversion's "
                            f"{inv[-1]}x{inv[-2]}", "sample the inversion's own noise output (or invert this "
                            "latent)")
    if x.shape[0] != inv[0]:
        raise Z2IInputError(node, latent_name, f"the latent holds {x.shape[0]} image(s), the inversion "
                            f"{inv[0]}", "sample the inversion's own noise output (one inversion per batch)")


def paired_trajectory(node: str, inversion, input_name: str = "inversion"):
    """The inversion's trajectory for a node that pairs each sampling step with the latent (or maps) of its level;
    the 'CSG code (N-2 steps)' inversion has none (its latents sit one training step off the sampling levels)."""
    if not inversion.paired:
        raise Z2IInputError(node, input_name, "the 'CSG code (N-2 steps)' inversion's latents are not on the "
                            "sampling schedule (each sits one training step below the level the sampler gives "
                            "it), so no step can be paired with its source latent", "invert with 'current level' "
                            "(or another variant) for this node; the CSG nodes take the CSG code inversion with "
                            "their 'reconstruction (official code)' source")
    return inversion.trajectory


def check_schedule(node: str, inversion, sigmas, input_name: str = "sigmas (of the sampler node)") -> None:
    """The sampler's schedule is the connected inversion's, reversed: as many steps, every level on the inversion's
    trajectory. Another step count or scheduler would pair each step with another level's latent or maps: a wrong
    edit with no error."""
    from ..guidance.ddim import schedule_levels
    levels = schedule_levels(sigmas)
    fix = ("connect DDIM Inversion's 'sigmas' output to the sampler node's sigmas (or give both the same steps, "
           "scheduler and denoise)")
    if not inversion.paired:          # the CSG code's inversion: its own reverse schedule, not its latents' levels
        own = schedule_levels(inversion.sigmas)
        if len(levels) != len(own):
            raise Z2IInputError(node, input_name, f"{len(levels) - 1} steps, the inversion's schedule has "
                                f"{len(own) - 1}", fix)
        for s, o in zip(levels[:-1], own[:-1]):
            if abs(s - o) > 1e-4 * max(abs(o), 1e-8):
                raise Z2IInputError(node, input_name, f"sigma {s:.4g} is not on the inversion's schedule", fix)
        return
    traj = inversion.trajectory
    if len(levels) - 1 != traj.steps:
        raise Z2IInputError(node, input_name, f"{len(levels) - 1} steps, the inversion made {traj.steps}", fix)
    for s in levels[:-1]:
        try:
            traj.index_of_sigma(s)
        except KeyError:
            raise Z2IInputError(node, input_name, f"sigma {s:.4g} is not on the inversion's schedule", fix) from None


def check_sampler_inputs(node: str, model_k, x: torch.Tensor, inversion=None, flow_ok: bool = False) -> None:
    """The checks every Z2I SAMPLER makes first: `model_k` is what core hands a KSAMPLER function."""
    patcher = model_k.inner_model.model_patcher
    check_latent(patcher, x, node, "latent_image (of the sampler node)", flow_ok=flow_ok)
    if inversion is not None:
        check_inversion(node, inversion, patcher, x)


class Z2IKSampler(comfy.samplers.KSAMPLER):
    """core's KSAMPLER with one rule added for rectified flow at pure noise, used for every Z2I SAMPLER.

    Between samplers ComfyUI carries a flow latent as x / (1 - sigma) (KSAMPLER.sample: noise_scaling at the
    start, inverse_noise_scaling at the end), which is infinite at sigma = 1. A Z2I inversion that ends at pure
    noise therefore returns the state x itself (there x = eps, unit variance), and a Z2I sampler that starts at
    sigma = 1 with no noise added (SamplerCustom's add_noise off) takes its latent_image as that state; core would
    scale it by 1 - sigma = 0. Everything else (VE models, any other sigma, added noise) is core's own path."""

    def sample(self, model_wrap, sigmas, extra_args, callback, noise, latent_image=None, denoise_mask=None,
               disable_pbar=False):
        self.check_size(model_wrap, noise, extra_args)
        ms = model_wrap.inner_model.model_sampling
        flow = noise_form_of(ms) is FLOW
        top_in = flow and latent_image is not None and float(sigmas[0]) >= 1.0 and not bool(noise.any())
        top_out = flow and float(sigmas[-1]) >= 1.0
        if not (top_in or top_out):
            return super().sample(model_wrap, sigmas, extra_args, callback, noise, latent_image=latent_image,
                                  denoise_mask=denoise_mask, disable_pbar=disable_pbar)
        extra_args["denoise_mask"] = denoise_mask
        model_k = comfy.samplers.KSamplerX0Inpaint(model_wrap, sigmas)
        model_k.latent_image, model_k.noise = latent_image, noise
        x = latent_image if top_in else ms.noise_scaling(sigmas[0], noise, latent_image,
                                                         self.max_denoise(model_wrap, sigmas))
        total = len(sigmas) - 1
        k_callback = (lambda d: callback(d["i"], d["denoised"], d["x"], total)) if callback is not None else None
        out = self.sampler_function(model_k, x, sigmas, extra_args=extra_args, callback=k_callback,
                                    disable=disable_pbar, **self.extra_options)
        return out if top_out else ms.inverse_noise_scaling(sigmas[-1], out)

    def check_size(self, guider, x, extra_args) -> None:
        """The size guard (nodes._guided.check_fits) for one UNet call of this run: the batch (one image in 'per image'
        mode) times 2 for CFG, before the first step. The guided samplers check their guided calls again."""
        from ._guided import check_fits, per_image
        if x.ndim != 4 or not hasattr(getattr(guider, "inner_model", None), "memory_required"):
            return
        node = self.extra_options.get("node") or getattr(self.sampler_function, "z2i_node", "Z2I sampler")
        rows = (1 if per_image(extra_args or {}) else int(x.shape[0])) * (1 if float(guider.cfg) == 1.0 else 2)
        check_fits(node, guider.inner_model, x, rows, keep=[guider.model_patcher],
                   input_name=getattr(self.sampler_function, "z2i_input", "latent_image (of the sampler node)"))
