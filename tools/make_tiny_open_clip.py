"""Write a tiny random open_clip model (config + safetensors) for tests and the example workflows.

    python tools/make_tiny_open_clip.py DEST_DIR

Creates DEST_DIR/z2i-tiny-clip.safetensors and its sidecar config DEST_DIR/z2i-tiny-clip.json (the open_clip
model-config format: embed_dim, vision_cfg, text_cfg), built from a fixed seed. The text tower keeps CLIP's
real vocabulary size so open_clip's bundled BPE tokenizer works offline. Nothing is downloaded.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

NAME = "z2i-tiny-clip"
CONFIG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "head_width": 32, "patch_size": 8},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}


def build(dest: Path, seed: int = 0) -> Path:
    import open_clip
    import safetensors.torch
    import torch

    dest.mkdir(parents=True, exist_ok=True)
    cfg_path, weights = dest / f"{NAME}.json", dest / f"{NAME}.safetensors"
    if weights.exists() and cfg_path.exists():
        return weights
    torch.manual_seed(seed)
    with torch.inference_mode(False):
        model = open_clip.CLIP(**CONFIG)
        sd = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    cfg_path.write_text(json.dumps(CONFIG, indent=1))
    safetensors.torch.save_file(sd, str(weights), metadata={"z2i": "tiny random open_clip for tests"})
    return weights


if __name__ == "__main__":
    print(build(Path(sys.argv[1])))
