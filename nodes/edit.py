"""Edit directions: sentence banks -> CLIP mean difference -> added to a conditioning; save and load."""
from __future__ import annotations

import comfy.model_management
import comfy.utils
import folder_paths
import torch
from comfy_api.latest import io

from ..guidance.edit_direction import (EditDirection, apply_direction, check_file_header, check_file_tensors,
                                       construct_direction)
from ..guidance.sentences import TEMPLATES, parse_sentences, template_sentences
from ._host import (Z2IInputError, check_save_name, listed_file_error, listed_fingerprint, read_checked_safetensors,
                    register_model_folder, save_name_error, save_unique)

EditDirectionType = io.Custom("Z2I_EDIT_DIRECTION")
DIRECTIONS = register_model_folder("edit_directions", {".safetensors"})
SENTENCES = register_model_folder("z2i_sentences", {".txt"})
NO_FILE = "(none)"
BATCH = 16
SAVE, LOAD = "Z2I Save Edit Direction", "Z2I Load Edit Direction"


def _bank(node: str, which: str, word: str, text: str, file: str, n: int, seed: int) -> list[str]:
    """The user's sentences (text box, else file), else n template captions around the word."""
    own = parse_sentences(text)
    if not own and file and file != NO_FILE:
        path = folder_paths.get_full_path(SENTENCES, file)
        if path is None:
            raise Z2IInputError(node, f"{which}_file", f"'{file}' is not in the {SENTENCES} folder",
                                f"put it in {folder_paths.get_folder_paths(SENTENCES)[0]} or pick another")
        with open(path, encoding="utf-8") as f:
            own = parse_sentences(f.read())
    if own:
        return own
    if not word.strip():
        raise Z2IInputError(node, which, "no word and no sentences given",
                            f"type the {which} word (e.g. 'cat'), or give {which}_sentences, one per line")
    return template_sentences(word, n, seed)


def encode_bank(clip, sentences: list[str], node: str, which: str, pbar=None):
    """Per-token embeddings [N, 77, D] (and pooled [N, P] for dual-encoder CLIPs) of one-chunk sentences,
    with the CLIP as loaded (CLIPSetLastLayer honoured). Single-encoder CLIPs are encoded 16 at a time,
    one sentence per 77-token section of one call."""
    tokens = [clip.tokenize(s) for s in sentences]
    for s, t in zip(sentences, tokens):
        if any(len(sections) != 1 for sections in t.values()):
            raise Z2IInputError(node, f"{which}_sentences", f"the sentence '{s[:60]}...' is longer than one "
                                "77-token chunk", "shorten it (under about 60 words)")
    dual = len(tokens[0]) > 1
    embs, pooled = [], []
    step = 1 if dual else BATCH
    for i in range(0, len(tokens), step):
        comfy.model_management.throw_exception_if_processing_interrupted()
        chunk = tokens[i:i + step]
        merged = {k: [t[k][0] for t in chunk] for k in chunk[0]}
        cond, pool = clip.encode_from_tokens(merged, return_pooled=True)
        embs.append(cond.reshape(len(chunk), -1, cond.shape[-1]).float())
        if dual and pool is not None:
            pooled.append(pool.float())
        if pbar is not None:
            pbar.update(len(chunk))
    return torch.cat(embs), (torch.cat(pooled) if pooled else None)


class EditDirectionNode(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        files = [NO_FILE] + folder_paths.get_filename_list(SENTENCES)
        return io.Schema(
            node_id="Z2I_EditDirection",
            display_name="Edit Direction (Z2I)",
            category="Z2I/conditioning",
            description=(
                "Turns a change of words, such as cat -> dog, into an edit direction that Apply Edit Direction "
                "adds to your image's caption. The direction lives in text-embedding space: the mean CLIP "
                "embedding of many target sentences minus that of many source sentences. Use the CLIP loaded "
                "with the checkpoint (after CLIPSetLastLayer if you use it). Without your own sentences, a "
                f"built-in bank of {len(TEMPLATES)} caption templates is filled with each word in the same "
                "order, so only the word differs on average. Reference: pix2pix-zero section 3.2."),
            inputs=[
                io.Clip.Input("clip", tooltip="The checkpoint's CLIP, exactly as it encodes your prompts."),
                io.String.Input("source", default="cat", tooltip="The word or phrase to change (e.g. 'cat')."),
                io.String.Input("target", default="dog", tooltip="What it becomes (e.g. 'dog')."),
                io.Int.Input("num_sentences", default=100, min=1, max=10000,
                             tooltip="Template sentences per side when no sentences are given. More is "
                                     "smoother (the paper uses about 1000); the built-in bank repeats after "
                                     f"{len(TEMPLATES)}."),
                io.Int.Input("seed", default=0, min=0, max=0xffffffff,
                             tooltip="Order of the template bank (the same for both sides)."),
                io.String.Input("source_sentences", default="", multiline=True, optional=True,
                                tooltip="Your own source sentences, one per line (overrides the templates)."),
                io.String.Input("target_sentences", default="", multiline=True, optional=True,
                                tooltip="Your own target sentences, one per line (overrides the templates)."),
                io.Combo.Input("source_file", options=files, default=NO_FILE, optional=True,
                               tooltip=f"A .txt of source sentences from models/{SENTENCES} (one per line)."),
                io.Combo.Input("target_file", options=files, default=NO_FILE, optional=True,
                               tooltip=f"A .txt of target sentences from models/{SENTENCES} (one per line)."),
            ],
            outputs=[EditDirectionType.Output(
                display_name="direction",
                tooltip="The edit (target minus source), for Apply Edit Direction or Save Edit Direction.")],
        )

    @classmethod
    def execute(cls, clip, source, target, num_sentences, seed, source_sentences="", target_sentences="",
                source_file=NO_FILE, target_file=NO_FILE) -> io.NodeOutput:
        node = "Z2I Edit Direction"
        if clip is None:
            raise Z2IInputError(node, "clip", "no CLIP (the checkpoint has no text encoder)",
                                "load a checkpoint with one, or a CLIP with CLIPLoader")
        src = _bank(node, "source", source, source_sentences, source_file, num_sentences, seed)
        tgt = _bank(node, "target", target, target_sentences, target_file, num_sentences, seed)
        pbar = comfy.utils.ProgressBar(len(src) + len(tgt))
        e_src, p_src = encode_bank(clip, src, node, "source", pbar)
        e_tgt, p_tgt = encode_bank(clip, tgt, node, "target", pbar)
        pooled = construct_direction(p_src, p_tgt) if p_src is not None and p_tgt is not None else None
        meta = {"encoder": type(clip.cond_stage_model).__name__, "width": int(e_src.shape[-1]),
                "clip_skip": getattr(clip, "layer_idx", None), "source": source, "target": target,
                "n_source": len(src), "n_target": len(tgt)}
        return io.NodeOutput(EditDirection(delta=construct_direction(e_src, e_tgt), pooled=pooled, meta=meta))


class ApplyEditDirection(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="Z2I_ApplyEditDirection",
            display_name="Apply Edit Direction (Z2I)",
            category="Z2I/conditioning",
            description="Adds an edit direction to your image's caption, turning it into the edited prompt "
                        "(a photo of a cat -> a photo of a dog) for the editing sampler's positive input. "
                        "Computes c_edit = c + strength * delta_c on every 77-token chunk of the prompt (and on "
                        "SDXL's pooled vector), as pix2pix-zero does. Use on the positive (source caption) "
                        "conditioning.",
            inputs=[
                io.Conditioning.Input("conditioning", tooltip="The source caption's conditioning."),
                EditDirectionType.Input("direction", tooltip="From Edit Direction or Load Edit Direction."),
                io.Float.Input("strength", default=1.0, min=-10.0, max=10.0, step=0.05,
                               tooltip="Multiplier of the direction. 0 = the conditioning unchanged; "
                                       "negative values edit the other way."),
                io.Clip.Input("clip", optional=True,
                              tooltip="Optional: the CLIP the conditioning was encoded with. A CONDITIONING does "
                                      "not record its clip skip (CLIPSetLastLayer); with this connected, a "
                                      "direction built at another clip skip is refused instead of applied."),
            ],
            outputs=[io.Conditioning.Output(
                display_name="conditioning",
                tooltip="The caption with the edit applied: the positive prompt of the editing sampler (keep the "
                        "plain caption as its negative).")],
        )

    @classmethod
    def execute(cls, conditioning, direction, strength, clip=None) -> io.NodeOutput:
        if clip is not None and "clip_skip" in direction.meta and \
                getattr(clip, "layer_idx", None) != direction.meta["clip_skip"]:
            skip = lambda v: "the last layer" if v is None else f"layer {v}"  # noqa: E731
            raise Z2IInputError("Z2I Apply Edit Direction", "clip", f"the direction was built at clip skip "
                                f"{skip(direction.meta['clip_skip'])}, this CLIP encodes at "
                                f"{skip(getattr(clip, 'layer_idx', None))}", "build the direction with the same "
                                "CLIPSetLastLayer setting as the prompt it is applied to")
        if strength == 0:
            return io.NodeOutput(conditioning)
        out = []
        node = "Z2I Apply Edit Direction"
        for c, d in conditioning:
            if not isinstance(c, torch.Tensor) or c.ndim != 3 or not c.is_floating_point() or c.numel() == 0:
                raise Z2IInputError(node, "conditioning", "expected a text conditioning [batch, tokens, width], got "
                                    f"{getattr(c, 'dtype', type(c).__name__)} of shape "
                                    f"{tuple(getattr(c, 'shape', ()))}", "connect a CLIP Text Encode output")
            if c.shape[1] % direction.delta.shape[1]:
                raise Z2IInputError(node, "conditioning", f"it has {c.shape[1]} tokens, not whole "
                                    f"{direction.delta.shape[1]}-token chunks", "connect a CLIP Text Encode output "
                                    "(core's text encoders make 77-token chunks)")
            if not bool(torch.isfinite(c).all()):
                raise Z2IInputError(node, "conditioning", "it holds NaN or infinite values",
                                    "check the node that made it")
            if c.shape[-1] != direction.width:
                raise Z2IInputError(
                    "Z2I Apply Edit Direction", "direction",
                    f"it was built with a {direction.width}-wide text encoder ({direction.meta.get('encoder')}) "
                    f"but the conditioning is {c.shape[-1]} wide",
                    "build the direction with the CLIP of the checkpoint you sample with")
            d = dict(d)
            if direction.pooled is not None and d.get("pooled_output") is not None \
                    and d["pooled_output"].shape[-1] == direction.pooled.shape[-1]:
                d["pooled_output"] = d["pooled_output"] + strength * direction.pooled.to(d["pooled_output"])
            out.append([apply_direction(c, direction.delta, strength), d])
        return io.NodeOutput(out)


class SaveEditDirection(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="Z2I_SaveEditDirection",
            display_name="Save Edit Direction (Z2I)",
            category="Z2I/conditioning",
            description=f"Saves an edit direction to a file, so you can reuse it later without encoding the "
                        f"sentences again. Writes models/{DIRECTIONS} as safetensors with its metadata (encoder, "
                        "width, clip skip, words, sentence counts). Never overwrites: a counter is added.",
            inputs=[
                EditDirectionType.Input("direction", tooltip="The direction to save."),
                io.String.Input("filename", default="cat_to_dog",
                                tooltip=f"Name inside models/{DIRECTIONS} (folders and '..' are dropped: only the "
                                        "last part is used; at most 255 characters, no NUL byte)."),
            ],
            outputs=[],
            is_output_node=True,
        )

    @classmethod
    def validate_inputs(cls, filename=None):
        err = None if filename is None else save_name_error(filename, SAVE)
        return True if err is None else str(err)

    @classmethod
    def execute(cls, direction, filename) -> io.NodeOutput:
        check_save_name(filename, SAVE)
        return io.NodeOutput(ui={"text": [save_unique(DIRECTIONS, filename, *direction.to_safetensors())]})


class LoadEditDirection(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="Z2I_LoadEditDirection",
            display_name="Load Edit Direction (Z2I)",
            category="Z2I/conditioning",
            description=f"Loads an edit direction you saved earlier, ready for Apply Edit Direction. Reads a "
                        f"direction saved by Save Edit Direction from models/{DIRECTIONS} (safetensors, no "
                        "pickle).",
            inputs=[io.Combo.Input("name", options=folder_paths.get_filename_list(DIRECTIONS),
                                   tooltip=f"A file in models/{DIRECTIONS}.")],
            outputs=[EditDirectionType.Output(display_name="direction",
                                              tooltip="The saved edit direction, for Apply Edit Direction.")],
        )

    @classmethod
    def validate_inputs(cls, name=None):
        err = None if name is None else listed_file_error(DIRECTIONS, name, LOAD, "name", _load_fix())
        return True if err is None else str(err)

    @classmethod
    def fingerprint_inputs(cls, name):
        return listed_fingerprint(DIRECTIONS, name)

    @classmethod
    def execute(cls, name) -> io.NodeOutput:
        tensors, metadata = read_checked_safetensors(DIRECTIONS, name, LOAD, _load_fix(), check_file_header,
                                                     check_file_tensors)
        try:
            return io.NodeOutput(EditDirection.from_safetensors(tensors, metadata))
        except ValueError as e:
            raise Z2IInputError(LOAD, "name", f"'{name}': {e}", _load_fix()) from None


def _load_fix() -> str:
    return (f"pick a file written by Save Edit Direction (or save one again) in "
            f"{folder_paths.get_folder_paths(DIRECTIONS)[0]}")


NODES = [EditDirectionNode, ApplyEditDirection, SaveEditDirection, LoadEditDirection]
