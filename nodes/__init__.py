"""Thin V3 adapters: the only part of Z2I that imports ComfyUI.

Each module declares its nodes and ends with `NODES = [...]`; the extension lists them all.
"""
from comfy_api.latest import ComfyExtension, io

from . import agg, attention, caption, clip_models, csg, edit, hspace, inversion, sampling

NODES: list[type[io.ComfyNode]] = [
    *sampling.NODES, *inversion.NODES, *edit.NODES, *caption.NODES, *attention.NODES, *csg.NODES, *hspace.NODES,
    *agg.NODES, *clip_models.NODES,
]


class Z2IExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return list(NODES)
