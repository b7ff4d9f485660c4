"""Thin V3 adapters: the only part of Z2I that imports ComfyUI.

Each module declares its nodes and ends with `NODES = [...]`; the extension lists them all.
"""
import logging
from pathlib import Path

import folder_paths
from comfy_api.latest import ComfyExtension, io

from . import agg, attention, caption, clip_models, csg, edit, hspace, inversion, sampling, settings

NODES: list[type[io.ComfyNode]] = [
    *sampling.NODES, *inversion.NODES, *edit.NODES, *caption.NODES, *attention.NODES, *csg.NODES, *hspace.NODES,
    *agg.NODES, *clip_models.NODES, *settings.NODES,
]

# The image every shipped workflow's Load Image names (made by tools/make_example_image.py). In assets/, not
# examples/: ComfyUI serves a folder of that name as the pack's workflow templates, shadowing workflows/.
EXAMPLE_IMAGE = Path(__file__).resolve().parents[1] / "assets" / "z2i_example.png"


def install_example_image() -> Path | None:
    """Copy the pack's example image into ComfyUI's input folder, so that the workflows open and run on a stock
    ComfyUI. Only when no file of that name is there: a user's file (or an earlier copy) is never overwritten.
    Returns the path written, else None. A read-only or missing input folder only logs a warning."""
    try:
        dest = Path(folder_paths.get_input_directory()) / EXAMPLE_IMAGE.name
        if dest.exists() or dest.is_symlink():
            return None
        data = EXAMPLE_IMAGE.read_bytes()
        dest.parent.mkdir(parents=True, exist_ok=True)
        with open(dest, "xb") as f:      # exclusive create: another process writing it first wins, never clobbered
            try:
                f.write(data)
            except BaseException:
                f.close()
                dest.unlink(missing_ok=True)   # no half-written image left behind to be kept forever
                raise
        return dest
    except FileExistsError:
        return None
    except OSError as e:
        logging.warning("Z2I: could not copy the example image %s into the input folder: %s", EXAMPLE_IMAGE.name, e)
        return None


class Z2IExtension(ComfyExtension):
    async def on_load(self) -> None:
        install_example_image()

    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        # ComfyUI 0.3.75 and 0.8.0 call get_node_list once per load but never on_load: install here too (idempotent)
        install_example_image()
        return list(NODES)
