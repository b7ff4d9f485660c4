"""Z2I_GPUSettings: the memory mode and the batch mode of every Z2I node sampling a MODEL, as a model patch."""
from __future__ import annotations

from comfy_api.latest import io

from ._guided import BATCH_MODES, DEFAULTS, MEMORY_MODES, SETTINGS_KEY
from ._host import Z2IInputError

NODE = "Z2I GPU Settings"

MEMORY_TIP = ("How the gradient-guided samplers (pix2pix-zero, pix2pix-zeroCon, AGG, h-space training) use memory. "
              "'auto' (default): 'fast' when its estimated extra memory fits what the GPU (or RAM) has free once the "
              "models are loaded, else 'low'. 'fast': every activation of a guided UNet call kept for its backward "
              "pass, pix2pix-zero's two CFG halves guided in one call. 'low': the large layers' activations are "
              "recomputed in the backward pass instead of kept (about 1.1-1.2x the time of fast, a fraction of its "
              "memory) and the halves guided one after the other. Same edit either way (to float rounding).")
BATCH_TIP = ("'batched' (default): all images of a batch in one UNet call, as core samples (a batch of 4 costs "
             "about one call on a GPU). 'per image': one image at a time, so each image of a batch is edited "
             "exactly as it would be alone (bit for bit); the batched result differs from it only in the last "
             "digits (measured 1e-5 relative on the tiny test models; guided edits amplify it somewhat).")


class GPUSettings(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="Z2I_GPUSettings",
            display_name="GPU Settings (Z2I)",
            category="Z2I/loaders",
            description=(
                "Sets how every Z2I node that samples this model uses GPU memory and batches. Without this node "
                "Z2I uses memory 'auto' and batch 'batched'. Put it after the checkpoint loader (and LoRAs); it "
                "changes nothing for other nodes and no weights."),
            inputs=[
                io.Model.Input("model", tooltip="The model the Z2I samplers, inversion and analysis nodes will use."),
                io.Combo.Input("memory", options=list(MEMORY_MODES), default=DEFAULTS["memory"], tooltip=MEMORY_TIP),
                io.Combo.Input("batch", options=list(BATCH_MODES), default=DEFAULTS["batch"], tooltip=BATCH_TIP),
            ],
            outputs=[io.Model.Output(display_name="model", tooltip="The same model with the settings attached.")],
        )

    @classmethod
    def validate_inputs(cls, memory=None, batch=None):
        err = _error(memory, batch)
        return True if err is None else str(err)

    @classmethod
    def execute(cls, model, memory, batch) -> io.NodeOutput:
        err = _error(memory, batch)
        if err is not None:
            raise err
        m = model.clone()                         # never the cached MODEL itself
        m.model_options[SETTINGS_KEY] = {"memory": memory, "batch": batch}
        return io.NodeOutput(m)


def _error(memory, batch):
    if memory is not None and memory not in MEMORY_MODES:
        return Z2IInputError(NODE, "memory", f"unknown value {memory!r}", f"use one of {list(MEMORY_MODES)}")
    if batch is not None and batch not in BATCH_MODES:
        return Z2IInputError(NODE, "batch", f"unknown value {batch!r}", f"use one of {list(BATCH_MODES)}")
    return None


NODES = [GPUSettings]
