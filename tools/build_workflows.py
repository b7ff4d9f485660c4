"""Write the UI-format workflows in workflows/ from compact graph descriptions.

Hand-editing UI JSON (node ids, link tables, slot indices, widget order) is error-prone, so each shipped
workflow is described here once and laid out by this script, using the live node schemas of the real host
for input order, widget order and output types. The files it writes are what users load; the tests run
every one of them through the host and its HTTP API.

Usage: python tools/build_workflows.py [--check]   (--check: fail if a file on disk differs)
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "workflows"
STANDARD_CKPT = "v1-5-pruned-emaonly.safetensors"
EXAMPLE_IMAGE = "z2i_example.png"


def swap_in(prompts: str, checkpoint: str = f"your SD1.x / SD2.x / SDXL checkpoint ({STANDARD_CKPT} is named "
            "here)", extra: str = "") -> str:
    """The closing paragraph every Note carries: what to swap in before a real run (image, checkpoint, prompts)."""
    return ("\n\nSwap in:\n"
            f"- Load Image: your picture. {EXAMPLE_IMAGE} is a placeholder the Z2I pack copies into ComfyUI's "
            "input folder when it loads (a red square on a gradient), so that the workflow runs as shipped.\n"
            f"- Load Checkpoint: {checkpoint}.\n"
            f"- Prompts: {prompts}" + (f"\n- {extra}" if extra else ""))


P2P_PROMPTS = ("the Source prompt (caption) describes your image and contains the word to change; Edit Direction "
               "source / target are that word and what it becomes (cat -> dog here).")



def inversion(positive: str, steps: int = 50, regularize: bool = False, scheduler: str = "ddim_uniform") -> dict:
    """The DDIM Inversion inputs every editing workflow shares (caption, VAE-encoded image, cfg 1). SD3 workflows
    use "simple" (its shifted flow schedule, as SD3's own workflows)."""
    return {"model": ("ckpt", 0), "positive": (positive, 0), "latent": ("encode", 0), "steps": steps,
            "scheduler": scheduler, "variant": "current level", "cfg": 1.0, "denoise": 1.0,
            "refine_iterations": 0, "regularize": regularize, "reg_lambda": 20.0, "reg_iterations": 5, "reg_seed": 0}


CAT_TO_DOG = ("direction", "Z2I_EditDirection", {"clip": ("ckpt", 1), "source": "cat", "target": "dog",
                                                 "num_sentences": 100, "seed": 0})
CAPTION = ("pos", "CLIPTextEncode", {"text": "a photo of a cat sitting on a sofa", "clip": ("ckpt", 1)},
           "Source prompt (caption)")
# Save Edit Direction writes <filename>_00001.safetensors first (never overwrites; nodes/_host.save_unique).
SAVED_DIRECTION = "cat_to_dog_00001.safetensors"


def pix2pix_zero_nodes(ckpt: str, sampler: str, sampler_inputs: dict, prefix: str, direction: tuple = CAT_TO_DOG,
                       caption: tuple = CAPTION, extra: tuple = (), apply_clip: bool = False,
                       scheduler: str = "ddim_uniform") -> list:
    """The pix2pix-zero family graph: caption inversion (regularised), cat -> dog edit direction on the caption,
    SamplerCustom with the caption as negative (cfg 5), `sampler` the only difference between the methods.
    `direction` and `caption` (key "direction" / "pos") may come from other nodes; `extra` nodes go after the
    image (their keys may feed `caption`). apply_clip connects Apply Edit Direction's clip (a loaded direction is
    then checked against the text encoder)."""
    return [
        ("ckpt", "CheckpointLoaderSimple", {"ckpt_name": ckpt}),
        ("image", "LoadImage", {"image": EXAMPLE_IMAGE}),
        *extra,
        caption,
        ("encode", "VAEEncode", {"pixels": ("image", 0), "vae": ("ckpt", 2)}),
        ("invert", "Z2I_DDIMInversion", inversion("pos", steps=50, regularize=True, scheduler=scheduler)),
        direction,
        ("edited", "Z2I_ApplyEditDirection", {"conditioning": ("pos", 0), "direction": ("direction", 0),
                                              "strength": 1.0, **({"clip": ("ckpt", 1)} if apply_clip else {})}),
        ("sampler", sampler, sampler_inputs),
        ("sample", "SamplerCustom", {"model": ("ckpt", 0), "add_noise": False, "noise_seed": 0, "cfg": 5.0,
                                     "positive": ("edited", 0), "negative": ("pos", 0), "sampler": ("sampler", 0),
                                     "sigmas": ("invert", 2), "latent_image": ("invert", 0)}),
        ("decode", "VAEDecode", {"samples": ("sample", 0), "vae": ("ckpt", 2)}),
        ("save", "SaveImage", {"images": ("decode", 0), "filename_prefix": prefix}),
    ]


def csg_nodes(ckpt: str, scheduler: str, clamp_pull: bool, prefix: str, code_inversion: bool = True) -> list:
    """The CSG graph: caption inversion, content mask of 'cat', cross-attention mixup, CSG sampler with the
    word-swapped caption and the mask's source maps, the object map previewed. Every choice the official code's
    (issue 29): its inversion (UNet families; SD3 has no such form and inverts at the current level), the
    reconstruction source, its word map, the two-pass mixup, lambda_pre 10."""
    code = "reconstruction (official code)"
    invert = inversion("pos", steps=50, regularize=False, scheduler=scheduler)
    if code_inversion:
        invert["variant"] = "CSG code (N-2 steps)"
    return [
        ("ckpt", "CheckpointLoaderSimple", {"ckpt_name": ckpt}),
        ("image", "LoadImage", {"image": EXAMPLE_IMAGE}),
        ("pos", "CLIPTextEncode", {"text": "a photo of a cat sitting on a sofa", "clip": ("ckpt", 1)},
         "Source prompt (caption)"),
        ("tgt", "CLIPTextEncode", {"text": "a photo of a dog sitting on a sofa", "clip": ("ckpt", 1)},
         "Target prompt (word swapped)"),
        ("encode", "VAEEncode", {"pixels": ("image", 0), "vae": ("ckpt", 2)}),
        ("invert", "Z2I_DDIMInversion", invert),
        ("mask", "Z2I_CSGMask", {"model": ("ckpt", 0), "clip": ("ckpt", 1), "inversion": ("invert", 1),
                                 "caption": "a photo of a cat sitting on a sofa", "word": "cat",
                                 "token_level": 2, "mask_level": 0, "source_pass": code,
                                 "word_map": "first token, bicubic at token level (official code)"}),
        ("mixup", "Z2I_CrossAttentionMixup", {"model": ("ckpt", 0), "background": ("mask", 0), "strength": 1.0,
                                              "clip": ("ckpt", 1),
                                              "source_prompt": "a photo of a cat sitting on a sofa",
                                              "target_prompt": "a photo of a dog sitting on a sofa",
                                              "passes": "two passes (official code)"}),
        ("sampler", "Z2I_CSGSampler", {"inversion": ("invert", 1), "background": ("mask", 0), "lambda_pre": 10.0,
                                       "delta": 1.5, "clamp_pull": clamp_pull, "source_maps": ("mask", 3),
                                       "source_trajectory": code}),
        ("sample", "SamplerCustom", {"model": ("mixup", 0), "add_noise": False, "noise_seed": 0, "cfg": 5.0,
                                     "positive": ("tgt", 0), "negative": ("pos", 0), "sampler": ("sampler", 0),
                                     "sigmas": ("invert", 2), "latent_image": ("invert", 0)}),
        ("decode", "VAEDecode", {"samples": ("sample", 0), "vae": ("ckpt", 2)}),
        ("save", "SaveImage", {"images": ("decode", 0), "filename_prefix": prefix}),
        ("preview_mask", "PreviewImage", {"images": ("mask", 1)}, "Object map (what CSG edits)"),
    ]


# Each node: (key, class_type, {input: value | (key, output_slot)}, optional title)
WORKFLOWS: dict[str, dict] = {
    "z2i_ddim_img2img": {
        "note": (
            "Z2I DDIM sampler: image-to-image with true DDIM steps (SDEdit-style).\n\n"
            "What to change:\n"
            "- BasicScheduler denoise: how far from the input the result may move (0.3-0.8).\n"
            "- DDIM Sampler eta: 0 = deterministic, 1 = DDPM-like (seeded by noise_seed).\n"
            "- scheduler 'ddim_uniform' visits the same timesteps as diffusers' DDIM."
            + swap_in("the Positive prompt says what the result shows, the Negative prompt what to avoid.")),
        "nodes": [
            ("ckpt", "CheckpointLoaderSimple", {"ckpt_name": STANDARD_CKPT}),
            ("image", "LoadImage", {"image": EXAMPLE_IMAGE}),
            ("pos", "CLIPTextEncode", {"text": "an oil painting of a red square in a garden", "clip": ("ckpt", 1)},
             "Positive prompt"),
            ("neg", "CLIPTextEncode", {"text": "blurry, low quality", "clip": ("ckpt", 1)}, "Negative prompt"),
            ("encode", "VAEEncode", {"pixels": ("image", 0), "vae": ("ckpt", 2)}),
            ("sampler", "Z2I_DDIMSampler", {"eta": 0.0}),
            ("sigmas", "BasicScheduler", {"model": ("ckpt", 0), "scheduler": "ddim_uniform", "steps": 20,
                                          "denoise": 0.6}),
            ("sample", "SamplerCustom", {"model": ("ckpt", 0), "add_noise": True, "noise_seed": 42, "cfg": 5.0,
                                         "positive": ("pos", 0), "negative": ("neg", 0), "sampler": ("sampler", 0),
                                         "sigmas": ("sigmas", 0), "latent_image": ("encode", 0)}),
            ("decode", "VAEDecode", {"samples": ("sample", 0), "vae": ("ckpt", 2)}),
            ("save", "SaveImage", {"images": ("decode", 0), "filename_prefix": "z2i_ddim_img2img"}),
        ],
    },
    "z2i_inversion_reconstruction": {
        "note": (
            "Z2I DDIM inversion: invert a real image to noise, then sample it back.\n\n"
            "The reconstruction should match the input; every Z2I editing method starts from this inversion.\n"
            "What to change:\n"
            "- steps: 50 (papers: 50-100); the sampler reuses the inversion's sigmas output.\n"
            "- refine_iterations 2-3 reconstructs more exactly (one extra UNet call per iteration).\n"
            "- regularize (pix2pix-zero) makes the noise more editable but reconstruction less exact.\n"
            "- Keep cfg at 1 in both nodes: guidance breaks the inversion."
            + swap_in("the Source prompt (caption) describes your image; it drives both the inversion and the "
                      "sampling.")),
        "nodes": [
            ("ckpt", "CheckpointLoaderSimple", {"ckpt_name": STANDARD_CKPT}),
            ("image", "LoadImage", {"image": EXAMPLE_IMAGE}),
            ("pos", "CLIPTextEncode", {"text": "a red square in a garden", "clip": ("ckpt", 1)},
             "Source prompt (caption)"),
            ("encode", "VAEEncode", {"pixels": ("image", 0), "vae": ("ckpt", 2)}),
            ("invert", "Z2I_DDIMInversion", inversion("pos", steps=50, regularize=False)),
            ("sampler", "Z2I_DDIMSampler", {"eta": 0.0}),
            ("sample", "SamplerCustom", {"model": ("ckpt", 0), "add_noise": False, "noise_seed": 0, "cfg": 1.0,
                                         "positive": ("pos", 0), "negative": ("pos", 0), "sampler": ("sampler", 0),
                                         "sigmas": ("invert", 2), "latent_image": ("invert", 0)}),
            ("decode", "VAEDecode", {"samples": ("sample", 0), "vae": ("ckpt", 2)}),
            ("save", "SaveImage", {"images": ("decode", 0), "filename_prefix": "z2i_reconstruction"}),
        ],
    },
    "z2i_pix2pix_zero": {
        "note": (
            "pix2pix-zero (Parmar et al. 2023): cat -> dog while the structure stays put.\n\n"
            "1. The caption of the image is the source prompt; the image is inverted with it (regularised).\n"
            "2. Edit Direction: mean CLIP embedding of 'dog' sentences minus 'cat' sentences, added to the "
            "caption (Apply Edit Direction).\n"
            "3. The pix2pix-zero sampler runs a reference branch with the caption beside the edit and steers the "
            "edit's cross-attention maps toward the reference's (xa_guidance 0.1, as the paper's code).\n\n"
            "What to change: strength, xa_guidance (raise by 0.05 if structure is lost), steps (50-100). Keep the "
            "caption as the negative prompt and cfg about 5." + swap_in(P2P_PROMPTS)),
        "nodes": pix2pix_zero_nodes(
            STANDARD_CKPT, "Z2I_Pix2PixZeroSampler",
            {"xa_guidance": 0.1, "layers": "input,middle,output", "map_precision": "fp32"}, "z2i_pix2pix_zero"),
    },
    "z2i_csg": {
        "note": (
            "CSG, Conditional Score Guidance (Lee et al. 2023): cat -> dog with the background kept.\n\n"
            "Every setting follows the authors' official code (what the paper's figures show; the paper's "
            "readings are options on each node).\n"
            "1. Invert the image with its caption (variant 'CSG code (N-2 steps)', the code's inversion).\n"
            "2. CSG Content Mask reconstructs the image from the noise with the caption and finds the word 'cat' "
            "from its attention (Eq. 11-12); its outputs show the object map and the background mask.\n"
            "3. Cross-Attention Mixup patches the model: background pixels attend as in the source (Eq. 13), in "
            "two UNet passes per step as the code does.\n"
            "4. The CSG sampler samples with the word-swapped caption, pulling the background toward the "
            "reconstruction (Eq. 18). No backpropagation. Its source_maps input reuses "
            "the caption's attention maps the mask kept, skipping one UNet pass per step (the mask keeps up to "
            "1 GB by default; 50 steps at 512 px need about 3.3 GB, so set its source_maps to keep).\n\n"
            "What to change: the image; the caption and the same caption with the word swapped; the word; "
            "lambda_pre (10, the code's default; its README once advised 15 for real images, 5 for generated); "
            "steps 50 (with far fewer steps turn clamp_pull "
            "on, the pull over-corrects). Keep the caption as the negative prompt, cfg about 5."
            + swap_in("the Source prompt (caption) describes your image and contains the word; the Target prompt "
                      "is the same caption with the word swapped; CSG Content Mask (caption, word) and "
                      "Cross-Attention Mixup (source / target prompt) repeat the same texts.")),
        "nodes": csg_nodes(STANDARD_CKPT, "ddim_uniform", clamp_pull=False, prefix="z2i_csg"),
    },
    "z2i_asyrp_derived": {
        "note": (
            "Asyrp h-space editing (Kwon et al. 2023) with a direction derived without training.\n\n"
            "1. Invert the image with a plain caption.\n"
            "2. h-space Direction From Prompts: the mean over the inversion trajectory of the UNet middle-block "
            "output with the target prompt minus that with the caption.\n"
            "3. The Asyrp sampler adds scale x delta_h to the middle block and uses the edited prediction in "
            "DDIM's x0 term only (asymmetric), for the first edit_until of the steps; optional eta=1 boosting "
            "at the end (boost_from < 1).\n\n"
            "What to change: the image and both prompts; scale (negative inverts the edit); edit_until "
            "(0.3-0.6); steps. Save h-space Direction keeps a direction for reuse (Load / Combine)."
            + swap_in("the Caption (source) is a plain caption of your image, the Target the same caption with "
                      "the attribute (smiling here); Asyrp works best within one domain (faces, churches, dogs).")),
        "nodes": [
            ("ckpt", "CheckpointLoaderSimple", {"ckpt_name": STANDARD_CKPT}),
            ("image", "LoadImage", {"image": EXAMPLE_IMAGE}),
            ("src", "CLIPTextEncode", {"text": "a photo of a face", "clip": ("ckpt", 1)}, "Caption (source)"),
            ("tgt", "CLIPTextEncode", {"text": "a photo of a smiling face", "clip": ("ckpt", 1)}, "Target"),
            ("encode", "VAEEncode", {"pixels": ("image", 0), "vae": ("ckpt", 2)}),
            ("invert", "Z2I_DDIMInversion", inversion("src", steps=40, regularize=False)),
            ("direction", "Z2I_HDirectionFromPrompts", {"model": ("ckpt", 0), "inversion": ("invert", 1),
                                                        "target": ("tgt", 0)}),
            ("sampler", "Z2I_AsyrpSampler", {"direction": ("direction", 0), "scale": 1.0, "unit": "percent",
                                             "edit_until": 0.5, "boost_from": 1.0}),
            ("sample", "SamplerCustom", {"model": ("ckpt", 0), "add_noise": False, "noise_seed": 0, "cfg": 1.0,
                                         "positive": ("src", 0), "negative": ("src", 0), "sampler": ("sampler", 0),
                                         "sigmas": ("invert", 2), "latent_image": ("invert", 0)}),
            ("decode", "VAEDecode", {"samples": ("sample", 0), "vae": ("ckpt", 2)}),
            ("save", "SaveImage", {"images": ("decode", 0), "filename_prefix": "z2i_asyrp"}),
        ],
    },
    "z2i_asyrp_trained": {
        "note": (
            "Asyrp with a trained direction (Kwon et al. 2023, Alg. 2, Eq. 7): learn delta_h from your own images, "
            "then edit.\n\n"
            "1. Train h-space Direction inverts each training image and optimises delta_h over the editing "
            "interval so that the decoded x0 moves along the CLIP text direction source_text -> target_text "
            "(directional CLIP loss) while an L1 term keeps the rest. kind 'implicit' is the paper's f_t (two "
            "1x1 convs with the timestep); 'global' is one delta_h.\n"
            "2. The Asyrp sampler applies it asymmetrically to an inverted image (any image: directions transfer).\n"
            "3. Save h-space Direction keeps it in models/h_directions (Load / Combine later).\n\n"
            "Needs an open_clip model in models/open_clip (e.g. OpenAI or LAION ViT-B/32 weights saved as "
            "safetensors; architecture ViT-B-32). What to change: the training images (a batch of 20-100 similar "
            "images trains a reusable direction; LoadImage gives one), the two texts, iterations, lr, "
            "lambda_clip. Training backpropagates through the UNet decoder, the VAE decoder and CLIP: GPU only "
            "for real sizes."
            + swap_in("the Caption is a neutral prompt for inversion and sampling; Train h-space Direction's "
                      "source_text / target_text name the attribute change.",
                      extra="Z2I OpenCLIP Loader: your open_clip weights in models/open_clip.")),
        "nodes": [
            ("ckpt", "CheckpointLoaderSimple", {"ckpt_name": STANDARD_CKPT}),
            ("clip_model", "Z2I_OpenCLIPLoader", {"name": "open_clip_vit_b_32.safetensors",
                                                  "architecture": "ViT-B-32"}),
            ("image", "LoadImage", {"image": EXAMPLE_IMAGE}, "Training images"),
            ("src", "CLIPTextEncode", {"text": "a photo of a face", "clip": ("ckpt", 1)}, "Caption (no CFG)"),
            ("encode", "VAEEncode", {"pixels": ("image", 0), "vae": ("ckpt", 2)}),
            ("train", "Z2I_HDirectionTrain", {
                "model": ("ckpt", 0), "vae": ("ckpt", 2), "clip_loss_model": ("clip_model", 0),
                "latent": ("encode", 0), "positive": ("src", 0), "source_text": "a photo of a face",
                "target_text": "a photo of a smiling face", "kind": "implicit", "steps": 40, "edit_until": 0.5,
                "iterations": 10, "lr": 0.05, "lambda_clip": 0.8, "lambda_recon": -1.0, "hidden": 512, "seed": 0}),
            ("keep", "Z2I_SaveHDirection", {"direction": ("train", 0), "filename": "smile"}),
            ("invert", "Z2I_DDIMInversion", inversion("src", steps=40, regularize=False)),
            ("sampler", "Z2I_AsyrpSampler", {"direction": ("train", 0), "scale": 1.0, "unit": "percent",
                                             "edit_until": 0.5, "boost_from": 1.0}),
            ("sample", "SamplerCustom", {"model": ("ckpt", 0), "add_noise": False, "noise_seed": 0, "cfg": 1.0,
                                         "positive": ("src", 0), "negative": ("src", 0), "sampler": ("sampler", 0),
                                         "sigmas": ("invert", 2), "latent_image": ("invert", 0)}),
            ("decode", "VAEDecode", {"samples": ("sample", 0), "vae": ("ckpt", 2)}),
            ("save", "SaveImage", {"images": ("decode", 0), "filename_prefix": "z2i_asyrp_trained"}),
        ],
    },
    "z2i_sdxl_pix2pix_zero": {
        "note": (
            "pix2pix-zero on SDXL. The same graph as the SD1.5 one with an SDXL checkpoint: the edit direction "
            "covers both text encoders (CLIP-L and CLIP-G, 2048 wide) and SDXL's pooled vector, and the "
            "cross-attention guidance uses every transformer block of every attention layer.\n\n"
            "What to change: the image (1024 px works best), its caption, the words, xa_guidance, steps. "
            "SDXL's cross-attention is far larger than SD1.5's: on small GPUs restrict 'layers' (e.g. "
            "'middle,output') or use map_precision fp16."
            + swap_in(P2P_PROMPTS, checkpoint="your SDXL checkpoint (sd_xl_base_1.0.safetensors is named here)")),
        "nodes": pix2pix_zero_nodes(
            "sd_xl_base_1.0.safetensors", "Z2I_Pix2PixZeroSampler",
            {"xa_guidance": 0.1, "layers": "input,middle,output", "map_precision": "fp32"}, "z2i_sdxl_pix2pix_zero"),
    },
    "z2i_sd3_pix2pix_zero": {
        "note": (
            "pix2pix-zero on SD3 (MMDiT, rectified flow). The same graph as the SD1.5 one with an SD3 checkpoint and "
            "SD3's 'simple' schedule: the inversion runs the flow ODE's Euler step backwards, the edit direction "
            "covers CLIP-L, CLIP-G and the pooled vector (and T5 when the checkpoint has one), and the guidance "
            "matches the image-to-text block of every joint block's attention (image queries over the prompt's "
            "tokens, the part of MMDiT's one softmax that stands in for cross-attention).\n\n"
            "What to change: the image (1024 px for SD3 medium), its caption, the words, xa_guidance, steps; cfg "
            "about 5. The joint attention's maps cover every image token against every token, so on small GPUs "
            "restrict 'layers' (e.g. 'output', the later half of the joint blocks) or use map_precision fp16."
            + swap_in(P2P_PROMPTS, checkpoint="your SD3 checkpoint with its CLIP encoders included "
                      "(sd3_medium_incl_clips.safetensors is named here)")),
        "nodes": pix2pix_zero_nodes(
            "sd3_medium_incl_clips.safetensors", "Z2I_Pix2PixZeroSampler",
            {"xa_guidance": 0.1, "layers": "input,middle,output", "map_precision": "fp32"}, "z2i_sd3_pix2pix_zero",
            scheduler="simple"),
    },
    "z2i_sd3_csg": {
        "note": (
            "CSG on SD3 (MMDiT, rectified flow): cat -> dog with the background kept, as the SD1.5 CSG workflow.\n\n"
            "On SD3 the content mask reads the word from the image-to-text block of every joint block's attention "
            "and smooths it with the last joint block's image-to-image attention; Cross-Attention Mixup mixes that "
            "text block (rescaled to each image token's attention on the prompt, so the image part of the "
            "attention is untouched); the CSG sampler's pull works in flow units. clamp_pull is on: on SD3's "
            "shifted schedule the paper's per-step pull near pure noise is about four times SD1.5's and "
            "over-corrects without the cap.\n\n"
            "What to change: the image; the caption and the same caption with the word swapped; the word; "
            "lambda_pre; steps. Keep the caption as the negative prompt, cfg about 5."
            + swap_in("the Source prompt (caption) describes your image and contains the word; the Target prompt "
                      "is the same caption with the word swapped; CSG Content Mask (caption, word) and "
                      "Cross-Attention Mixup (source / target prompt) repeat the same texts.",
                      checkpoint="your SD3 checkpoint with its CLIP encoders included "
                      "(sd3_medium_incl_clips.safetensors is named here)")),
        "nodes": csg_nodes("sd3_medium_incl_clips.safetensors", "simple", clamp_pull=True, prefix="z2i_sd3_csg",
                           code_inversion=False),
    },
    "z2i_agg": {
        "note": (
            "AGG, Asymmetric Gradient Guidance (Kwon & Ye 2023), latent-diffusion form: photo -> watercolor.\n\n"
            "1. Invert the image with its caption; the inversion keeps its x0 estimate at every step.\n"
            "2. Sample with the target prompt; for the first guided_until of the steps an L1 loss to those x0 "
            "estimates keeps the structure: one gradient through the UNet (MCG), then AdamW refinement of x0 "
            "(DDS), used in DDIM's x0 term only (asymmetric).\n\n"
            "What to change: the image, both prompts, lambda_reg (higher keeps more structure; lower gives "
            "style transfer), guided_until (10-20 of 50 steps in the paper), eta (the paper: 0.8). Connect an "
            "object mask (e.g. from CSG Content Mask, inverted) to guide only the background until masked_until."
            + swap_in("the Source prompt (caption) describes your image; the Target prompt is the same caption in "
                      "the new style.")),
        "nodes": [
            ("ckpt", "CheckpointLoaderSimple", {"ckpt_name": STANDARD_CKPT}),
            ("image", "LoadImage", {"image": EXAMPLE_IMAGE}),
            ("src", "CLIPTextEncode", {"text": "a photo of a red square in a garden", "clip": ("ckpt", 1)},
             "Source prompt (caption)"),
            ("tgt", "CLIPTextEncode", {"text": "a watercolor painting of a red square in a garden",
                                       "clip": ("ckpt", 1)}, "Target prompt"),
            ("encode", "VAEEncode", {"pixels": ("image", 0), "vae": ("ckpt", 2)}),
            ("invert", "Z2I_DDIMInversion", inversion("src", steps=50, regularize=False)),
            ("sampler", "Z2I_AGGSampler", {"inversion": ("invert", 1), "lambda_reg": 0.1, "guided_until": 0.3,
                                           "masked_until": 0.8, "dds_steps": 10, "dds_lr": 0.01, "eta": 0.0}),
            ("sample", "SamplerCustom", {"model": ("ckpt", 0), "add_noise": False, "noise_seed": 0, "cfg": 7.5,
                                         "positive": ("tgt", 0), "negative": ("src", 0), "sampler": ("sampler", 0),
                                         "sigmas": ("invert", 2), "latent_image": ("invert", 0)}),
            ("decode", "VAEDecode", {"samples": ("sample", 0), "vae": ("ckpt", 2)}),
            ("save", "SaveImage", {"images": ("decode", 0), "filename_prefix": "z2i_agg"}),
        ],
    },
    "z2i_agg_clip_style": {
        "note": (
            "AGG with its CLIP text style loss (Kwon & Ye 2023, App. B Eq. 21-22): photo -> oil painting by text "
            "alone, without a target prompt.\n\n"
            "1. Invert the image with its caption.\n"
            "2. Sample with the caption itself as the prompt (cfg 1: the text edit comes from CLIP); in the guided steps the decoded x0 is pushed toward "
            "the CLIP direction style_source -> style_target (open_clip, random cutouts) while the L1 loss to "
            "the inversion's x0 estimates keeps the structure; MCG + DDS + asymmetric update as in plain AGG.\n\n"
            "Needs an open_clip model in models/open_clip (e.g. ViT-B-32 weights as safetensors). What to change: "
            "style_target (and style_source), lambda_style against lambda_reg, guided_until, cutouts. Every guided "
            "step decodes x0 and backpropagates through the VAE decoder and CLIP: use a GPU."
            + swap_in("the Caption describes your image (both passes); the AGG sampler's style_source / "
                      "style_target say the style change in words.",
                      extra="Z2I OpenCLIP Loader: your open_clip weights in models/open_clip.")),
        "nodes": [
            ("ckpt", "CheckpointLoaderSimple", {"ckpt_name": STANDARD_CKPT}),
            ("clip_model", "Z2I_OpenCLIPLoader", {"name": "open_clip_vit_b_32.safetensors",
                                                  "architecture": "ViT-B-32"}),
            ("image", "LoadImage", {"image": EXAMPLE_IMAGE}),
            ("src", "CLIPTextEncode", {"text": "a photo of a red square in a garden", "clip": ("ckpt", 1)},
             "Caption (prompt for both passes)"),
            ("encode", "VAEEncode", {"pixels": ("image", 0), "vae": ("ckpt", 2)}),
            ("invert", "Z2I_DDIMInversion", inversion("src", steps=50, regularize=False)),
            ("sampler", "Z2I_AGGSampler", {"inversion": ("invert", 1), "lambda_reg": 0.1, "guided_until": 0.3,
                                           "masked_until": 0.8, "dds_steps": 10, "dds_lr": 0.01, "eta": 0.0,
                                           "style_clip": ("clip_model", 0), "vae": ("ckpt", 2),
                                           "style_source": "a photo", "style_target": "an oil painting",
                                           "lambda_style": 1.0, "cutouts": 8}),
            ("sample", "SamplerCustom", {"model": ("ckpt", 0), "add_noise": False, "noise_seed": 0, "cfg": 1.0,
                                         "positive": ("src", 0), "negative": ("src", 0), "sampler": ("sampler", 0),
                                         "sigmas": ("invert", 2), "latent_image": ("invert", 0)}),
            ("decode", "VAEDecode", {"samples": ("sample", 0), "vae": ("ckpt", 2)}),
            ("save", "SaveImage", {"images": ("decode", 0), "filename_prefix": "z2i_agg_clip_style"}),
        ],
    },
    "z2i_pix2pix_zerocon": {
        "note": (
            "pix2pix-zeroCon (Si et al.): pix2pix-zero plus a contrastive (PatchNCE / CUT) loss between UNet "
            "features of the reference and the edit at the same locations, which keeps local content.\n\n"
            "What to change: the image, its caption, the words; lambda_step (0.05-0.15; the paper finds smaller "
            "better), lambda_c / lambda_e (the weights of the two losses), feature_layers ('output' = decoder "
            "self-attention as the CDS code; 'input' = encoder, as the paper says). Keep the caption as the "
            "negative prompt and cfg about 5." + swap_in(P2P_PROMPTS)),
        "nodes": pix2pix_zero_nodes(
            STANDARD_CKPT, "Z2I_Pix2PixZeroConSampler",
            {"lambda_step": 0.1, "lambda_c": 1.0, "lambda_e": 0.5, "feature_layers": "output", "n_patches": 256,
             "tau": 0.07, "seed": 0, "layers": "input,middle,output"}, "z2i_pix2pix_zerocon"),
    },
    "z2i_pix2pix_zero_naive": {
        "note": (
            "pix2pix-zero without cross-attention guidance (the paper's ablation D): invert the image with its "
            "caption, add the cat -> dog edit direction to the caption's embedding, and sample back.\n\n"
            "What to change:\n"
            "- Edit Direction: your own sentences instead of the words; more sentences = smoother.\n"
            "- strength: how far to edit (1 = the paper).\n"
            "- cfg 5 with the caption as negative prompt, as the pix2pix-zero code does.\n"
            "- Without guidance the structure can drift; the guided pix2pix-zero workflow keeps it."
            + swap_in(P2P_PROMPTS + " The auto-caption workflow writes the caption with BLIP.")),
        "nodes": pix2pix_zero_nodes(STANDARD_CKPT, "Z2I_DDIMSampler", {"eta": 0.0}, "z2i_pix2pix_zero_naive"),
    },
    "z2i_pix2pix_zero_auto_caption": {
        "note": (
            "pix2pix-zero with an automatic caption: Z2I BLIP Caption writes the source prompt, as the "
            "pix2pix-zero paper does (section 3), so only the words of the edit are typed.\n\n"
            "1. BLIP Caption describes the image (Preview Any shows the caption); its text feeds the CLIP Text "
            "Encode's text input (the text box is replaced by the link).\n"
            "2. The image is inverted with that caption (regularised), the cat -> dog direction is added to it, "
            "and the pix2pix-zero sampler edits with the caption as the negative prompt.\n\n"
            "Needs a BLIP captioning model saved with transformers' save_pretrained in models/blip/<name>/ "
            "(e.g. Salesforce/blip-image-captioning-base as models/blip/blip-image-captioning-base): the node "
            "loads local files only, nothing is downloaded. prefix (e.g. 'a photo of a') steers the caption. "
            "Captions are lists: caption one image per run."
            + swap_in("none to type for the caption; Edit Direction source / target are the word to change and "
                      "what it becomes (cat -> dog here). Check in Preview Any that the caption contains the "
                      "source word.", extra="Z2I BLIP Caption model: the folder name of your BLIP model in "
                      "models/blip.")),
        "nodes": pix2pix_zero_nodes(
            STANDARD_CKPT, "Z2I_Pix2PixZeroSampler",
            {"xa_guidance": 0.1, "layers": "input,middle,output", "map_precision": "fp32"},
            "z2i_pix2pix_zero_auto_caption",
            extra=(("caption", "Z2I_BLIPCaption", {"image": ("image", 0), "model": "blip-image-captioning-base",
                                                   "num_beams": 3, "max_new_tokens": 30, "prefix": ""}),
                   ("show", "PreviewAny", {"source": ("caption", 0)}, "The caption")),
            caption=("pos", "CLIPTextEncode", {"text": ("caption", 0), "clip": ("ckpt", 1)},
                     "Source prompt (from the caption)")),
    },
    "z2i_edit_direction_save": {
        "note": (
            "Build an edit direction once and keep it: the pix2pix-zero cat -> dog edit, plus Save Edit "
            "Direction, which writes the direction to models/edit_directions/cat_to_dog_00001.safetensors "
            "(the next save becomes _00002: files are never overwritten).\n\n"
            "Building a direction encodes num_sentences sentences per word with the checkpoint's CLIP (100 here; "
            "thousands give a smoother direction). The saved file is reused by the workflow "
            "z2i_edit_direction_reuse (Load Edit Direction), so that later edits skip that work. A direction "
            "belongs to the text encoder it was built with: reuse it with the same checkpoint family and clip "
            "skip.\n\n"
            "What to change: filename (the saved name), the words or your own sentences, num_sentences."
            + swap_in(P2P_PROMPTS)),
        "nodes": [
            *pix2pix_zero_nodes(STANDARD_CKPT, "Z2I_Pix2PixZeroSampler",
                                {"xa_guidance": 0.1, "layers": "input,middle,output", "map_precision": "fp32"},
                                "z2i_edit_direction_save"),
            ("keep", "Z2I_SaveEditDirection", {"direction": ("direction", 0), "filename": "cat_to_dog"},
             "Save the direction (models/edit_directions)")],
    },
    "z2i_edit_direction_reuse": {
        "note": (
            "Reuse a saved edit direction: Load Edit Direction reads a file written by Save Edit Direction "
            "(run z2i_edit_direction_save once first: it writes models/edit_directions/" + SAVED_DIRECTION
            + ") and pix2pix-zero applies it to a new image; no sentences are encoded.\n\n"
            "Apply Edit Direction's clip input is connected, so a direction built with another text encoder or "
            "clip skip is refused with a message instead of giving a silent wrong edit. strength scales the "
            "edit (negative reverses it: dog -> cat).\n\n"
            "What to change: Load Edit Direction name (press R to refresh the list after saving), strength, "
            "xa_guidance."
            + swap_in("the Source prompt (caption) describes your image and contains the direction's source "
                      "word (cat here).", checkpoint=f"the checkpoint the direction was built with ({STANDARD_CKPT} "
                      "is named here)")),
        "nodes": pix2pix_zero_nodes(
            STANDARD_CKPT, "Z2I_Pix2PixZeroSampler",
            {"xa_guidance": 0.1, "layers": "input,middle,output", "map_precision": "fp32"}, "z2i_edit_direction_reuse",
            direction=("direction", "Z2I_LoadEditDirection", {"name": SAVED_DIRECTION}, "Load the saved direction"),
            apply_clip=True),
    },
    "z2i_asyrp_combined": {
        "note": (
            "Asyrp with two h-space directions combined (Kwon et al. 2023, section 5.2: directions are linear "
            "and add up).\n\n"
            "1. Invert the image with a plain caption.\n"
            "2. Two h-space Direction From Prompts nodes derive one direction each (smiling, with glasses) from "
            "the same inversion.\n"
            "3. Combine h-space Directions makes coef_a x a + coef_b x b; the Asyrp sampler applies the sum "
            "asymmetrically for the first edit_until of the steps.\n\n"
            "What to change: coef_a / coef_b (the weight of each attribute; negative removes it), scale, "
            "edit_until. Load h-space Direction can replace either deriving node with a saved or trained "
            "direction."
            + swap_in("the Caption (source) is a plain caption of your image; Target A and Target B are the same "
                      "caption with one attribute each.")),
        "nodes": [
            ("ckpt", "CheckpointLoaderSimple", {"ckpt_name": STANDARD_CKPT}),
            ("image", "LoadImage", {"image": EXAMPLE_IMAGE}),
            ("src", "CLIPTextEncode", {"text": "a photo of a face", "clip": ("ckpt", 1)}, "Caption (source)"),
            ("tgt_a", "CLIPTextEncode", {"text": "a photo of a smiling face", "clip": ("ckpt", 1)}, "Target A"),
            ("tgt_b", "CLIPTextEncode", {"text": "a photo of a face with glasses", "clip": ("ckpt", 1)},
             "Target B"),
            ("encode", "VAEEncode", {"pixels": ("image", 0), "vae": ("ckpt", 2)}),
            ("invert", "Z2I_DDIMInversion", inversion("src", steps=40, regularize=False)),
            ("dir_a", "Z2I_HDirectionFromPrompts", {"model": ("ckpt", 0), "inversion": ("invert", 1),
                                                    "target": ("tgt_a", 0)}, "Direction A (smiling)"),
            ("dir_b", "Z2I_HDirectionFromPrompts", {"model": ("ckpt", 0), "inversion": ("invert", 1),
                                                    "target": ("tgt_b", 0)}, "Direction B (glasses)"),
            ("combine", "Z2I_HDirectionCombine", {"a": ("dir_a", 0), "coef_a": 1.0, "b": ("dir_b", 0),
                                                  "coef_b": 0.7}),
            ("sampler", "Z2I_AsyrpSampler", {"direction": ("combine", 0), "scale": 1.0, "unit": "percent",
                                             "edit_until": 0.5, "boost_from": 1.0}),
            ("sample", "SamplerCustom", {"model": ("ckpt", 0), "add_noise": False, "noise_seed": 0, "cfg": 1.0,
                                         "positive": ("src", 0), "negative": ("src", 0), "sampler": ("sampler", 0),
                                         "sigmas": ("invert", 2), "latent_image": ("invert", 0)}),
            ("decode", "VAEDecode", {"samples": ("sample", 0), "vae": ("ckpt", 2)}),
            ("save", "SaveImage", {"images": ("decode", 0), "filename_prefix": "z2i_asyrp_combined"}),
        ],
    },
}

WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}


def _ordered(info: dict):
    for section in ("required", "optional"):
        for name, spec in (info["input"].get(section) or {}).items():
            typ = spec[0]
            opts = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
            yield name, typ, opts


def build(name: str, spec: dict, node_info) -> dict:
    keys = [n[0] for n in spec["nodes"]]
    ids = {k: i + 2 for i, k in enumerate(keys)}  # id 1 is the Note
    depth: dict[str, int] = {}
    for key, _, inputs, *_ in spec["nodes"]:
        parents = [v[0] for v in inputs.values() if isinstance(v, tuple)]
        depth[key] = 1 + max((depth[p] for p in parents), default=-1)
    column_y: dict[int, float] = {}
    nodes, links = [], []
    out_links: dict[tuple[int, int], list[int]] = {}
    for order, (key, kind, inputs, *title) in enumerate(spec["nodes"]):
        info = node_info(kind)
        unknown = set(inputs) - {n for n, _, _ in _ordered(info)}
        if unknown:
            raise SystemExit(f"{name}: {kind} has no inputs {sorted(unknown)}")
        sockets, widgets = [], []
        for iname, typ, opts in _ordered(info):
            value = inputs.get(iname)
            is_widget = (isinstance(typ, list) or typ in WIDGET_TYPES) and not opts.get("forceInput")
            if isinstance(value, tuple):
                src, slot = value
                link_id = len(links) + 1
                ltype = node_info(spec_kind(spec, src))["output"][slot]
                links.append([link_id, ids[src], slot, ids[key], len(sockets), ltype])
                out_links.setdefault((ids[src], slot), []).append(link_id)
                entry = {"name": iname, "type": typ if not isinstance(typ, list) else "COMBO", "link": link_id}
                if is_widget:
                    entry["widget"] = {"name": iname}
                sockets.append(entry)
                if is_widget:  # the frontend keeps a value for a widget fed by a link; a STRING's is ""
                    widgets.append(opts.get("default", "" if typ == "STRING" else None))
                continue
            if is_widget:
                if value is None:
                    value = opts.get("default", typ[0] if isinstance(typ, list) and typ else None)
                widgets.append(value)
                if typ == "INT" and (opts.get("control_after_generate") or iname in ("seed", "noise_seed")):
                    widgets.append("fixed")
                if opts.get("image_upload"):
                    widgets.append("image")
            elif iname in (info["input"].get("required") or {}):
                sockets.append({"name": iname, "type": typ, "link": None})
        d = depth[key]
        y = column_y.get(d, 80.0)
        outs = len(info["output"])
        extra = {"LoadImage": 330, "CLIPTextEncode": 90, "SaveImage": 260, "PreviewImage": 260, "PreviewAny": 120}.get(kind, 0)
        height = 40 + 26 * (max(len(sockets), outs) + len(widgets)) + extra
        column_y[d] = y + height + 70
        node = {"id": ids[key], "type": kind, "pos": [440 + 380 * d, y], "size": [330, height], "flags": {},
                "order": order + 1, "mode": 0, "inputs": sockets,
                "outputs": [{"name": oname, "type": otype, "links": [], "slot_index": i}
                            for i, (oname, otype) in enumerate(zip(info.get("output_name") or info["output"],
                                                                   info["output"]))],
                "properties": {"Node name for S&R": kind}, "widgets_values": widgets}
        if title:
            node["title"] = title[0]
        nodes.append(node)
    for node in nodes:
        for i, out in enumerate(node["outputs"]):
            out["links"] = out_links.get((node["id"], i), [])
    note = {"id": 1, "type": "Note", "pos": [40, 80], "size": [340, 300], "flags": {}, "order": 0, "mode": 0,
            "inputs": [], "outputs": [], "properties": {"text": ""}, "widgets_values": [spec["note"]],
            "title": "Read me", "color": "#432", "bgcolor": "#653"}
    return {"last_node_id": len(nodes) + 1, "last_link_id": len(links), "nodes": [note, *nodes], "links": links,
            "groups": [], "config": {}, "extra": {"ds": {"scale": 0.8, "offset": [0, 0]}}, "version": 0.4}


def spec_kind(spec: dict, key: str) -> str:
    return next(n[1] for n in spec["nodes"] if n[0] == key)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--check", action="store_true")
    args = ap.parse_args()
    from z2i.headless.host import Host
    host = Host.get()
    OUT.mkdir(exist_ok=True)
    stale = []
    for name, spec in WORKFLOWS.items():
        text = json.dumps(build(name, spec, host.node_info), indent=2) + "\n"
        path = OUT / f"{name}.json"
        if args.check:
            if not path.exists() or path.read_text() != text:
                stale.append(path.name)
        else:
            path.write_text(text)
            print(f"wrote {path.relative_to(REPO)}")
    if stale:
        sys.exit("out of date (run python tools/build_workflows.py): " + ", ".join(stale))


if __name__ == "__main__":
    main()
