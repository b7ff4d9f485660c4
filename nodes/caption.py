"""Z2I_BLIPCaption: a caption of the input image, the source prompt pix2pix-zero starts from (section 3)."""
from __future__ import annotations

import os
import threading

import comfy.model_management
import folder_paths
import torch
from comfy_api.latest import io

from ._host import Z2IInputError, path_name_problem, register_model_folder

BLIP = register_model_folder("blip", {".safetensors", ".bin", ".json"})
NODE = "Z2I BLIP Caption"
_cache: dict = {}
_lock = threading.Lock()


def blip_models() -> list[str]:
    """Sub-folders of models/blip that hold a saved transformers BLIP (config.json inside)."""
    names = []
    for base in folder_paths.get_folder_paths(BLIP):
        if os.path.isdir(base):
            names += [d for d in sorted(os.listdir(base)) if os.path.isfile(os.path.join(base, d, "config.json"))]
    return names


FIX = ("save one there with transformers' save_pretrained (BlipForConditionalGeneration and BlipProcessor, e.g. "
       "Salesforce/blip-image-captioning-base), one folder per model, and pick it in the list")


def model_error(name) -> Z2IInputError | None:
    """The refusal for a model name that is not a folder listed in models/blip (paths, '..', absolute, NUL)."""
    problem = path_name_problem(name, BLIP)
    if problem is None and name not in blip_models():
        problem = f"no BLIP model '{name}' in {folder_paths.get_folder_paths(BLIP)}"
    return None if problem is None else Z2IInputError(NODE, "model", problem, FIX)


def _model_dir(name: str) -> str:
    """The folder of a model listed in models/blip: resolved only among that folder's own sub-folders."""
    err = model_error(name)
    if err is not None:
        raise err
    for base in folder_paths.get_folder_paths(BLIP):
        path = os.path.join(base, name)
        inside = os.path.dirname(os.path.abspath(path)) == os.path.abspath(base)
        if inside and os.path.isfile(os.path.join(path, "config.json")):
            return path
    raise Z2IInputError(NODE, "model", f"no BLIP model '{name}' in {folder_paths.get_folder_paths(BLIP)}", FIX)


def load_blip(path: str):
    """Load once per folder (and file change); local files only, never a hub download."""
    from transformers import BlipForConditionalGeneration, BlipProcessor

    stamp = max(os.path.getmtime(os.path.join(path, f)) for f in os.listdir(path))
    key = (path, stamp)
    with _lock:
        if key not in _cache:
            _cache.clear()
            processor = BlipProcessor.from_pretrained(path, local_files_only=True)
            model = BlipForConditionalGeneration.from_pretrained(path, local_files_only=True)
            model.eval().requires_grad_(False)
            _cache[key] = (processor, model)
        return _cache[key]


class BLIPCaption(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="Z2I_BLIPCaption",
            display_name="BLIP Caption (Z2I)",
            category="Z2I/conditioning",
            description=("Writes a caption for each image, the source prompt an edit starts from. It uses a "
                         "BLIP model saved in models/blip/<name>/ (transformers format, local files only). "
                         "pix2pix-zero uses the caption as the source prompt for "
                         "inversion and as the negative prompt while editing. Greedy or beam decoding: "
                         "deterministic. A batch of images gives a LIST of captions: ComfyUI then runs every "
                         "downstream node once per caption, each over the whole image batch, so with several "
                         "images caption and edit them one at a time (one image per graph run), or every image "
                         "is edited with every caption."),
            inputs=[
                io.Image.Input("image", tooltip="Images to caption; one caption per image (a list: feed one image "
                                                "per run when the captions drive an edit, see the description)."),
                io.Combo.Input("model", options=blip_models() or ["(no BLIP model in models/blip)"],
                               tooltip="A folder directly in models/blip holding config.json, weights and processor "
                                       "files (only listed folders load: no paths, nothing downloaded)."),
                io.Int.Input("num_beams", default=3, min=1, max=16,
                             tooltip="Beam search width (1 = greedy). Deterministic either way."),
                io.Int.Input("max_new_tokens", default=30, min=1, max=200, tooltip="Longest caption in tokens."),
                io.String.Input("prefix", default="", optional=True,
                                tooltip="Optional text the caption must start with (e.g. 'a photo of'). "
                                        "Empty = free captioning."),
            ],
            outputs=[io.String.Output(display_name="caption", is_output_list=True,
                                      tooltip="One caption per input image (a list: downstream nodes run "
                                              "once per caption).")],
        )

    @classmethod
    def validate_inputs(cls, model=None):
        err = None if model is None else model_error(model)
        return True if err is None else str(err)

    @classmethod
    def execute(cls, image, model, num_beams, max_new_tokens, prefix="") -> io.NodeOutput:
        path = _model_dir(model)
        processor, blip = load_blip(path)
        device = comfy.model_management.get_torch_device()
        if device.type != "cpu":      # room for it on the GPU, as the memory manager makes for its own models
            size = sum(t.numel() * t.element_size() for t in [*blip.parameters(), *blip.buffers()])
            comfy.model_management.free_memory(1.2 * size + comfy.model_management.minimum_inference_memory(),
                                               device)
        pixels = (image.clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()
        captions = []
        blip.to(device)
        try:
            for frame in pixels:
                comfy.model_management.throw_exception_if_processing_interrupted()
                kwargs = {"text": prefix} if prefix.strip() else {}
                inputs = processor(images=frame, return_tensors="pt", **kwargs).to(device)
                with torch.inference_mode():
                    ids = blip.generate(**inputs, num_beams=num_beams, max_new_tokens=max_new_tokens,
                                        do_sample=False)
                captions.append(processor.decode(ids[0], skip_special_tokens=True).strip())
        finally:                      # success, an error, an OOM or Cancel: BLIP never stays on the GPU
            blip.to(comfy.model_management.unet_offload_device())
        return io.NodeOutput(captions)


NODES = [BLIPCaption]
