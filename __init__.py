"""Z2I: zero-shot image-to-image translation nodes for ComfyUI.

ComfyUI loads this package as a custom-node pack and calls `comfy_entrypoint`. Nothing here imports
ComfyUI or torch at import time, so `guidance/` and `attention_patches/` stay importable without a host.
"""


async def comfy_entrypoint():
    from .nodes import Z2IExtension

    return Z2IExtension()

