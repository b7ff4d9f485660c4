"""The h-space hook: add delta_h to (or read) the UNet middle-block output, only for calls that ask.

ComfyUI 0.3.75 has no hook right after the middle block; `output_block_patch` at block ("output", 0) sees
h = the middle-block output before the first decoder block concatenates its skip, which is the same tensor
(comfyui-internals.md section 1.4). Newer hosts also have `middle_block_after_patch`; both functions are
here. A sampler puts an `HCall` into the transformer options of the one UNet call that should be edited or
read; every other call passes through untouched, so one step can evaluate eps with and without delta_h.
Skip connections are never modified (Asyrp pitfall 3.8.1).
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from ..attention_patches.controller import call_conds
from .file_checks import check_file_tensors  # noqa: F401  (re-exported for the loaders)

HSPACE_KEY = "z2i_hspace_call"


@dataclass
class HCall:
    """add: delta_h (an HDirection-like object with .delta_for(h, t, scale)) times `scale`, row by row (a
    per-image direction's row i goes to image i of every cond chunk); capture: store h per cond index into
    `captured` (a dict cond_index -> list of tensors, each [B, ...] in batch order). `timestep(sigma) -> t`
    maps the call's sigmas to the model's 0..999 timesteps (implicit directions f_t need t)."""

    direction: Optional[object] = None
    scale: float = 1.0
    captured: Optional[dict] = None
    seen: list = field(default_factory=list)     # delta actually added, per call (for tests and stats)
    timestep: Optional[Callable] = None
    keep_seen: bool = True
    latent_hw: Optional[tuple] = None            # (H, W) of the latent: an MMDiT's image tokens laid out as h

    def __deepcopy__(self, memo):
        return self

    def apply(self, h: torch.Tensor, transformer_options: dict) -> torch.Tensor:
        if self.captured is not None:
            cou = call_conds(transformer_options)
            for ci, chunk in zip(cou, h.chunk(len(cou))):
                self.captured.setdefault(ci, []).append(chunk.detach().float())
        if self.direction is not None and self.scale != 0:
            sigmas = transformer_options.get("sigmas")
            t = None
            if sigmas is not None and self.timestep is not None:
                t = self.timestep(sigmas.reshape(-1)).reshape(-1)
                if t.numel() != h.shape[0]:
                    # `sigmas` holds one level per image; the call stacks its cond chunks, each the whole batch
                    t = t.repeat(h.shape[0] // t.numel()) if h.shape[0] % t.numel() == 0 else t[:1].expand(h.shape[0])
            delta = self.direction.delta_for(h, t, self.scale).to(h)
            if self.keep_seen:
                self.seen.append(delta.detach())
            h = h + delta
        return h


def hspace_output_block_patch(h: torch.Tensor, hsp: torch.Tensor, transformer_options: dict):
    """ComfyUI output_block_patch: acts at ("output", 0), where h is the middle-block output."""
    call = transformer_options.get(HSPACE_KEY)
    if call is not None and tuple(transformer_options.get("block", ())) == ("output", 0):
        h = call.apply(h, transformer_options)
    return h, hsp


def hspace_middle_block_after_patch(args: dict) -> dict:
    """Newer ComfyUI middle_block_after_patch: args has h and transformer_options; returns args."""
    call = args.get("transformer_options", {}).get(HSPACE_KEY)
    if call is not None:
        args = dict(args)
        args["h"] = call.apply(args["h"], args["transformer_options"])
    return args


# -- checks of a loaded h-direction file (before HDirection.from_safetensors) -----------------------------------
# Sane bounds, far above every SD family (middle block: 1280 channels; h: 1/64 of the image side; the Train node's
# hidden layer: at most 4096), checked on the header alone, so a file that declares huge layers is refused before
# anything is allocated.
MAX_CHANNELS = 4096
MAX_HIDDEN = 4096
MAX_TEMB = 4096
MAX_ROWS = 4096
MAX_SPATIAL = 1024
MAX_IMPLICIT = 64
IMPLICIT_CONFIG = {"channels": MAX_CHANNELS, "hidden": MAX_HIDDEN, "temb_dim": MAX_TEMB}


def _implicit_shapes(config: dict) -> dict:
    """Parameter name -> shape of the implicit function f_t for a checked config, built on the meta device
    (no memory), so the expected state_dict always follows guidance.asyrp_train.DeltaBlock."""
    from .asyrp_train import DeltaBlock
    with torch.device("meta"):
        block = DeltaBlock(**config)
    return {k: tuple(v.shape) for k, v in block.state_dict().items()}


def _int_in(value, low: int, high: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and low <= value <= high


def check_file_header(shapes: dict, metadata: Optional[dict]) -> dict:
    """Check an h-direction file from its header only (tensor name -> shape, string metadata): the format, the global
    delta [N, C, h, w], each implicit function's config (known keys, integer sizes within the bounds above) and its
    state_dict (exactly the tensors and shapes that config makes), one channel count for all parts, and the meta JSON.
    Returns the parsed meta; raises ValueError(problem) before anything is read or allocated."""
    from .asyrp import FORMAT
    metadata = metadata or {}
    if metadata.get("format") != FORMAT:
        raise ValueError(f"not a Z2I h-space direction (format {metadata.get('format')!r}, expected {FORMAT!r})")
    try:
        implicit = json.loads(metadata.get("implicit", "[]"))
        meta = json.loads(metadata.get("meta", "{}"))
    except ValueError:
        raise ValueError("its 'implicit' or 'meta' entry is not valid JSON") from None
    if not isinstance(meta, dict):
        raise ValueError(f"its 'meta' entry is a {type(meta).__name__}, expected a JSON object")
    if not isinstance(implicit, list) or len(implicit) > MAX_IMPLICIT:
        raise ValueError(f"its 'implicit' entry must be a list of at most {MAX_IMPLICIT} functions")
    channels = set()
    if "delta" in shapes:
        d = tuple(shapes["delta"])
        if len(d) != 4 or not (_int_in(d[0], 1, MAX_ROWS) and _int_in(d[1], 1, MAX_CHANNELS)
                               and _int_in(d[2], 1, MAX_SPATIAL) and _int_in(d[3], 1, MAX_SPATIAL)):
            raise ValueError(f"its delta has shape {list(d)}, expected [rows, channels, h, w] (rows 1..{MAX_ROWS}, "
                             f"channels 1..{MAX_CHANNELS}, h and w 1..{MAX_SPATIAL})")
        channels.add(d[1])
    elif not implicit:
        raise ValueError("it holds neither a delta tensor nor an implicit function")
    expected = {"delta"}
    for i, item in enumerate(implicit):
        what = f"implicit function {i}"
        if not isinstance(item, dict) or set(item) != {"coef", "config"}:
            keys = sorted(item) if isinstance(item, dict) else type(item).__name__
            raise ValueError(f"{what} has the entries {keys}, expected ['coef', 'config']")
        coef, config = item["coef"], item["config"]
        if isinstance(coef, bool) or not isinstance(coef, (int, float)) or not math.isfinite(coef):
            raise ValueError(f"{what} has coefficient {coef!r}, expected a finite number")
        if not isinstance(config, dict):
            raise ValueError(f"{what} has a config of type {type(config).__name__}, expected an object")
        unknown = sorted(set(config) - set(IMPLICIT_CONFIG))
        if unknown or "channels" not in config:
            raise ValueError(f"{what}'s config has the keys {sorted(config)}"
                             + (f" (unknown: {', '.join(map(repr, unknown))})" if unknown else "")
                             + ", expected channels and optionally hidden, temb_dim")
        for key, value in config.items():
            if not _int_in(value, 1, IMPLICIT_CONFIG[key]):
                raise ValueError(f"{what}'s config declares {key} = {value!r}, expected an integer 1.."
                                 f"{IMPLICIT_CONFIG[key]}")
        channels.add(config["channels"])
        want = {f"implicit.{i}.{k}": v for k, v in _implicit_shapes(config).items()}
        got = {k: tuple(v) for k, v in shapes.items() if k.startswith(f"implicit.{i}.")}
        if got != want:
            missing, extra = sorted(set(want) - set(got)), sorted(set(got) - set(want))
            wrong = sorted(k for k in set(want) & set(got) if want[k] != got[k])
            raise ValueError(f"{what}'s weights do not match its config {config} (missing {missing}, unexpected "
                             f"{extra}, wrong shape {[(k, list(got[k]), list(want[k])) for k in wrong]})")
        expected |= set(want)
    extra = sorted(set(shapes) - expected)
    if extra:
        raise ValueError(f"it holds tensors that belong to no part of a direction: {extra[:8]}")
    if len(channels) > 1:
        raise ValueError(f"its parts have different channel counts {sorted(channels)}")
    said = meta.get("channels")
    if said is not None and (not _int_in(said, 1, MAX_CHANNELS) or {said} != channels):
        raise ValueError(f"its meta says {said!r} channels, its tensors have {sorted(channels)}")
    return meta
