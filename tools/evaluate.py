"""Measure every method's edits in the toy world (issue 30): how often the edit happens, how much of the source's
structure and background survives, against the baselines a user would use instead.

Like the benchmark, a tool and not a test. For each task of tools/toy_world/world.py (object swap circle ->
square, colour red -> green, background black -> striped) it draws N held-out source scenes, renders them, and
runs every method as a real ComfyUI graph in one in-process host (headless/host.py) on the toy checkpoint
(tools/toy_world/toy_model.py), with the shipped workflows' node settings (tools/build_workflows.py) except
the image, the checkpoint, the prompts and the step count. Sources that share a caption run as one batch.
The rule-based judge (tools/toy_world/judge.py) reads each result.

Rows: the ground truth (the edited scene rendered), the reconstruction (inversion and back, no edit), the
baselines (prompt swap: inversion + the target caption with no guidance; pix2pix-zero's direction without
guidance; SDEdit at strengths 0.5 and 0.75; diffusers' pix2pix-zero pipeline on the same weights) and the
methods (pix2pix-zero, pix2pix-zeroCon, CSG, AGG, Asyrp with a derived direction).

Metrics (after the papers' own): edit = the judge sees the target value; kept = the two other attributes are
the source's; IoU = the judged object mask against the source's true mask (for the object swap the ground truth
itself scores the circle/square overlap, shown in its row); centre / size = error against the ground-truth
edit's judged position (pixels) and half-extent (relative); unedited = mean absolute pixel error (0..255) to the
source where nothing should change (outside the object for object and colour edits, inside it for the background
edit); CSG's content mask IoU with the true object mask.

Usage: python tools/evaluate.py [--n 50] [--steps 50] [--tasks ...] [--methods ...] [--write]
  --write  writes EVALUATION.md and docs/evaluation.png (else out/evaluation/)
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tools"))
import build_workflows as bw  # noqa: E402
from toy_world import world  # noqa: E402
from toy_world.judge import iou, judge  # noqa: E402

CKPT = "z2i-toy-sd15.safetensors"
BANK = 100                     # sentences per side of an edit direction (the shipped Edit Direction default)


# -- graphs --------------------------------------------------------------------------------------------------------
def _api(nodes: list) -> dict:
    """build_workflows' node lists -> an API prompt (node keys as ids)."""
    out = {}
    for n in nodes:
        key, cls, inputs = n[0], n[1], n[2]
        out[key] = {"class_type": cls, "inputs": {k: (list(v) if isinstance(v, tuple) else v)
                                                  for k, v in inputs.items()}}
    return out


def _images(names: list[str]) -> list:
    """LoadImage per file, chained through ImageBatch into one batch under the key 'image'."""
    nodes = [(f"img{i}", "LoadImage", {"image": n}) for i, n in enumerate(names)]
    prev = "img0"
    for i in range(1, len(names)):
        key = "image" if i == len(names) - 1 else f"batch{i}"
        nodes.append((key, "ImageBatch", {"image1": (prev, 0), "image2": (f"img{i}", 0)}))
        prev = key
    if len(names) == 1:
        nodes[0] = ("image", "LoadImage", {"image": names[0]})
    return nodes


def _swap_image(nodes: list, names: list[str]) -> list:
    return _images(names) + [n for n in nodes if n[0] != "image"]


def _set(nodes: list, key: str, **inputs) -> list:
    out = []
    for n in nodes:
        if n[0] == key:
            n = (n[0], n[1], {**n[2], **inputs}, *n[3:])
        out.append(n)
    return out


def _steps(nodes: list, steps: int) -> list:
    out = []
    for n in nodes:
        if n[1] in ("Z2I_DDIMInversion", "BasicScheduler"):
            n = (n[0], n[1], {**n[2], "steps": steps}, *n[3:])
        elif n[1] == "Z2I_HDirectionTrain":
            n = (n[0], n[1], {**n[2], "steps": steps}, *n[3:])
        out.append(n)
    return out


def _direction(task: world.Task) -> tuple:
    src = "\n".join(world.sentence_bank(task.attribute, task.source, BANK))
    tgt = "\n".join(world.sentence_bank(task.attribute, task.target, BANK))
    return ("direction", "Z2I_EditDirection", {"clip": ("ckpt", 1), "source": task.source, "target": task.target,
                                               "num_sentences": BANK, "seed": 0, "source_sentences": src,
                                               "target_sentences": tgt})


def _p2pz(sampler: str, inputs: dict, task, cap: str) -> list:
    return bw.pix2pix_zero_nodes(CKPT, sampler, inputs, "eval", direction=_direction(task),
                                 caption=("pos", "CLIPTextEncode", {"text": cap, "clip": ("ckpt", 1)}))


def _workflow_nodes(name: str) -> list:
    return [tuple(n) for n in bw.WORKFLOWS[name]["nodes"]]


def graph(method: str, task: world.Task, cap: str, tgt: str, names: list[str], steps: int,
          train: tuple | None = None) -> tuple[dict, str]:
    """The API prompt of one method on a batch of images (files in the input folder) -> (prompt, decode node id).
    train (Asyrp (trained) only): (training image names, their caption, its edited form)."""
    if method == "reconstruction":
        nodes = _set(_workflow_nodes("z2i_inversion_reconstruction"), "pos", text=cap)
    elif method == "prompt swap":
        nodes = _set(_workflow_nodes("z2i_inversion_reconstruction"), "pos", text=cap)
        nodes.append(("tgt", "CLIPTextEncode", {"text": tgt, "clip": ("ckpt", 1)}))
        nodes = _set(nodes, "sample", positive=("tgt", 0), negative=("pos", 0), cfg=5.0)
    elif method.startswith("SDEdit"):
        strength = float(method.split()[-1])
        nodes = _set(_workflow_nodes("z2i_ddim_img2img"), "pos", text=tgt)
        nodes = _set(nodes, "neg", text="")
        nodes = _set(nodes, "sigmas", denoise=strength)
    elif method == "pix2pix-zero (no guidance)":
        nodes = _p2pz("Z2I_DDIMSampler", {"eta": 0.0}, task, cap)
    elif method == "pix2pix-zero":
        nodes = _p2pz("Z2I_Pix2PixZeroSampler",
                      {"xa_guidance": 0.1, "layers": "input,middle,output", "map_precision": "fp32"}, task, cap)
    elif method == TOY_P2PZ:
        nodes = _p2pz("Z2I_Pix2PixZeroSampler",
                      {"xa_guidance": 0.001, "layers": "input,middle,output", "map_precision": "fp32"}, task, cap)
    elif method in ("pix2pix-zeroCon", TOY_ZEROCON):
        nodes = _p2pz("Z2I_Pix2PixZeroConSampler",
                      {"lambda_step": 0.1 if method == "pix2pix-zeroCon" else 0.001, "lambda_c": 1.0,
                       "lambda_e": 0.5, "feature_layers": "output",
                       "n_patches": 256, "tau": 0.07, "seed": 0, "layers": "input,middle,output"}, task, cap)
    elif method == "CSG":
        nodes = bw.csg_nodes(CKPT, "ddim_uniform", clamp_pull=False, prefix="eval")
        nodes = _set(nodes, "pos", text=cap)
        nodes = _set(nodes, "tgt", text=tgt)
        # token_level 0, not the workflow's 2: the toy UNet's cross-attention is at 8x8 and 4x4 (64 px images), so
        # level 2 (2x2) has no maps; 0 averages both levels (SD1.5 at 512 px: 16x16 and coarser)
        nodes = _set(nodes, "mask", caption=cap, word=task.source, token_level=0)
        nodes = _set(nodes, "mixup", source_prompt=cap, target_prompt=tgt)
    elif method == "AGG":
        nodes = _set(_set(_workflow_nodes("z2i_agg"), "src", text=cap), "tgt", text=tgt)
    elif method == "Asyrp (derived)":
        nodes = _set(_set(_workflow_nodes("z2i_asyrp_derived"), "src", text=cap), "tgt", text=tgt)
    elif method == "Asyrp (trained)":
        # one direction per task, trained on its own images (one caption: the training node's inputs are the same
        # for every batch, so ComfyUI's cache trains it once), with the toy-world CLIP (train_clip.py) for the
        # directional loss; then applied to each batch like a saved direction
        t_names, t_cap, t_tgt = train
        nodes = [n[:3] for n in _set(_workflow_nodes("z2i_asyrp_trained"), "src", text=cap)]
        nodes = _set(nodes, "clip_model", name=TOY_CLIP + ".safetensors",
                     architecture="auto (config beside the weights)")
        nodes = _set(nodes, "train", latent=("tencode", 0), positive=("tsrc", 0), source_text=t_cap,
                     target_text=t_tgt)
        nodes = [(f"t{k}", c, i) for k, c, i in _images(t_names)] + nodes + [
            ("tsrc", "CLIPTextEncode", {"text": t_cap, "clip": ("ckpt", 1)}),
            ("tencode", "VAEEncode", {"pixels": ("timage", 0), "vae": ("ckpt", 2)})]
        nodes = [(k, c, {n: (("t" + v[0], v[1]) if k.startswith("t") and c == "ImageBatch" else v)
                         for n, v in i.items()}) for k, c, i in nodes]
    else:
        raise KeyError(method)
    nodes = _set(nodes, "ckpt", ckpt_name=CKPT)
    nodes = [n[:3] for n in nodes if n[1] not in ("SaveImage", "PreviewImage", "Z2I_SaveHDirection",
                                              "Z2I_SaveEditDirection")]
    nodes = _steps(_swap_image(nodes, names), steps)
    return _api(nodes), "decode"


# tuned for the toy world: the shipped step sizes (0.1, the papers') move this model's latent by ~10% of its norm
# per step and destroy the image; 0.001 moves it ~0.1% (measured on the main job's source, EVALUATION.md)
TOY_P2PZ = "pix2pix-zero (toy: xa 0.001)"
TOY_ZEROCON = "pix2pix-zeroCon (toy: step 0.001)"
METHODS = ("reconstruction", "prompt swap", "pix2pix-zero (no guidance)", "SDEdit 0.5", "SDEdit 0.75",
           "diffusers pix2pix-zero", "pix2pix-zero", TOY_P2PZ, "pix2pix-zeroCon", TOY_ZEROCON, "CSG", "AGG",
           "Asyrp (derived)", "Asyrp (trained)")
TOY_CLIP = "z2i-toy-clip"     # tools/toy_world/train_clip.py, trained on first use into models/open_clip
BASELINES = {"reconstruction", "prompt swap", "pix2pix-zero (no guidance)", "SDEdit 0.5", "SDEdit 0.75",
             "diffusers pix2pix-zero"}


# -- metrics -------------------------------------------------------------------------------------------------------
def _dilate(mask: np.ndarray, r: int) -> np.ndarray:
    from scipy import ndimage
    return ndimage.binary_dilation(mask, iterations=r) if r > 0 else mask


def _erode(mask: np.ndarray, r: int) -> np.ndarray:
    from scipy import ndimage
    return ndimage.binary_erosion(mask, iterations=r)


def score(task: world.Task, src: world.Scene, image: np.ndarray) -> dict:
    """One edited image against its source scene and the ground-truth edit."""
    gt_scene = task.edited(src)
    src_img = np.asarray(world.render(src)).astype(np.float32)
    src_mask = np.asarray(world.object_mask(src)) >= 128
    gt_mask = np.asarray(world.object_mask(gt_scene)) >= 128
    gt = judge(np.asarray(world.render(gt_scene)))
    v = judge(image)
    others = [a for a in ("shape", "colour", "background") if a != task.attribute]
    row = {"found": v.found, "edit": bool(v.found and v.attribute(task.attribute) == task.target),
           "kept": bool(v.found and all(v.attribute(a) == getattr(src, a) for a in others)),
           "iou_src": iou(v.mask, src_mask) if v.found else 0.0}
    if v.found:
        row["centre"] = math.hypot(v.cx - gt.cx, v.cy - gt.cy)
        row["size"] = abs(v.half - gt.half) / gt.half
    diff = np.abs(image.astype(np.float32) - src_img).mean(-1)
    if task.attribute == "background":
        region = _erode(src_mask, 2)
    else:
        region = ~_dilate(src_mask | gt_mask | (v.mask if v.found else src_mask), 2)
    row["unedited"] = float(diff[region].mean()) if region.any() else float("nan")
    return row


def csg_mask_iou(background: np.ndarray, src: world.Scene) -> float:
    """CSG Content Mask's background MASK (1 = background) -> object = below 0.5, IoU with the true mask."""
    from PIL import Image
    obj = background < 0.5
    if obj.shape != (world.SIZE, world.SIZE):
        obj = np.asarray(Image.fromarray(obj.astype(np.uint8) * 255).resize((world.SIZE, world.SIZE),
                                                                                Image.Resampling.NEAREST)) >= 128
    return iou(obj, np.asarray(world.object_mask(src)) >= 128)


# -- running -------------------------------------------------------------------------------------------------------
class Runner:
    """Runs the graphs in one in-process host (the process's own, e.g. a test's); sources go to a subfolder of its
    input folder, nothing is saved to its output folder."""

    SUBFOLDER = "z2i_eval"

    def __init__(self, steps: int, host=None):
        if host is None:
            from z2i.headless.host import Host
            host = Host.get()
        self.steps = steps
        self.host = host
        self.peer = None
        self.folder = Path(host.folder_paths.get_input_directory()) / self.SUBFOLDER
        self.folder.mkdir(parents=True, exist_ok=True)

    def images(self, task, scenes: list[world.Scene], tag: str) -> list[str]:
        names = []
        for i, s in enumerate(scenes):
            name = f"{tag}_{i:03d}.png"
            world.render(s).save(self.folder / name)
            names.append(f"{self.SUBFOLDER}/{name}")
        return names

    def training_set(self, task) -> tuple:
        """Asyrp (trained): 8 training scenes of the task's source value with one caption, drawn apart from the
        held-out sources (seed 1000), and the toy-world CLIP in the host's models/open_clip (trained on first use)."""
        from toy_world import train_clip
        train_clip.ensure(Path(self.host.folder_paths.get_folder_paths("open_clip")[0]))
        scenes = world.task_sources(task, 8, 1000, captions=1)
        names = self.images(task, scenes, task.name.replace(" ", "_") + "_train")
        return names, world.caption(scenes[0]), world.caption(task.edited(scenes[0]))

    def run(self, method: str, task, cap: str, tgt: str, names: list[str]):
        """-> (uint8 images [B, H, W, 3], extra outputs)"""
        if method == "diffusers pix2pix-zero":
            return self.run_peer(task, cap, names), {}
        train = self.training_set(task) if method == "Asyrp (trained)" else None
        prompt, out = graph(method, task, cap, tgt, names, self.steps, train)
        targets = [out] + (["mask"] if method == "CSG" else [])
        res = self.host.run_prompt(prompt, targets=targets)
        imgs = (res.output(out, 0).clamp(0, 1).cpu().numpy() * 255).round().astype(np.uint8)
        extra = {"mask": res.output("mask", 0).cpu().numpy()} if method == "CSG" else {}
        return imgs, extra

    def run_peer(self, task, cap: str, names: list[str]) -> np.ndarray:
        """diffusers' StableDiffusionPix2PixZeroPipeline on the toy checkpoint's weights (tools/peer_pix2pix_zero.py),
        with our graph's caption, direction and VAE-encoded latent (regularised inversion, cfg 5, xa 0.1)."""
        import peer_pix2pix_zero as peer
        import torch
        peer.ensure_bench_deps()
        nodes = _p2pz("Z2I_DDIMSampler", {"eta": 0.0}, task, cap)
        nodes = _steps(_swap_image(nodes, names), self.steps)
        prompt = _api([n for n in nodes if n[1] != "SaveImage"])
        res = self.host.run_prompt(prompt, targets=["ckpt", "pos", "encode", "direction"])
        model, vae = res.output("ckpt", 0), res.output("ckpt", 2)
        src = res.output("pos", 0)[0][0].float()
        raw = res.output("encode", 0)["samples"].float()
        delta = res.output("direction", 0).delta.float()
        scale = model.get_model_object("latent_format").scale_factor
        if self.peer is None:
            ckpt = self.host.folder_paths.get_full_path("checkpoints", CKPT)
            self.peer = peer.build_pipeline(ckpt, model.model.model_config.unet_config, self.host.host_dir)
            # the conversion agrees with ComfyUI's modules (UNet, CLIP, TAESD with its scale and shift) or raises
            self.peer_check = peer.check_conversion(self.peer, model, vae, cap, src[:1], raw[:1])
        out = []
        for i in range(raw.shape[0]):
            peer.reset(self.peer)
            img = peer.edit(self.peer, (raw[i:i + 1] * scale).contiguous(), src, src, delta, self.steps, 5.0, 0.1,
                            0, world.SIZE)
            out.append((img[0].permute(1, 2, 0).clamp(0, 1).cpu().numpy() * 255).round().astype(np.uint8))
            del img
        torch.set_grad_enabled(True)
        return np.stack(out)


def _strip(path: Path, images: list) -> None:
    from PIL import Image
    s = world.SIZE
    out = Image.new("RGB", (4 * s, s), "white")
    for i, im in enumerate(images[:4]):
        if im is not None:
            out.paste(Image.fromarray(im), (i * s, 0))
    out.save(path)


def _unstrip(path: Path) -> list:
    from PIL import Image
    a = np.asarray(Image.open(path).convert("RGB"))
    return [a[:, i * world.SIZE:(i + 1) * world.SIZE] for i in range(a.shape[1] // world.SIZE)]


def evaluate(n: int, steps: int, tasks, methods, seed: int = 0, host=None, log=print, captions: int = 0,
             partial: Path | None = None, peer_n: int = 0, resume: dict | None = None,
             few_rows: tuple = ("diffusers pix2pix-zero",)):
    """-> (results, grids, seconds). partial: a JSON file rewritten after every row, with the first four sources'
    images of each row beside it (partial.stem + "_shown/"), so a long run cut short keeps the rows it finished;
    resume: such a file's results (same n, steps, seed, captions): its rows are kept, not rerun (their shown
    images rerun on the four sources if missing). peer_n > 0: the rows in few_rows (by default diffusers' pipeline,
    one image per call) on the first peer_n sources only."""
    runner = Runner(steps, host)
    results = {}
    grids = {}
    t_all = time.time()
    for task in tasks:
        scenes = world.task_sources(task, n, seed, captions)
        names = runner.images(task, scenes, task.name.replace(" ", "_"))
        groups = defaultdict(list)
        for i, s in enumerate(scenes):
            groups[world.caption(s)].append(i)
        rows = {"ground truth": [score(task, s, np.asarray(world.render(task.edited(s)))) for s in scenes]}
        shown = {"source": [np.asarray(world.render(s)) for s in scenes[:4]],
                 "ground truth": [np.asarray(world.render(task.edited(s))) for s in scenes[:4]]}
        times = {}
        shown_dir = None if partial is None else partial.parent / (partial.stem + "_shown")
        if shown_dir is not None:
            shown_dir.mkdir(parents=True, exist_ok=True)
        for method in methods:
            t0 = time.time()
            per = [None] * n
            mask_iou = []
            images = [None] * n
            done = (resume or {}).get(task.name, {})
            strip = None if shown_dir is None else shown_dir / f"{task.name}__{method}.png".replace(" ", "_")
            if method in done.get("rows", {}):
                rows[method] = done["rows"][method]
                if method + " mask" in done["rows"]:
                    rows[method + " mask"] = done["rows"][method + " mask"]
                times[method] = done["seconds"][method]
                if strip is not None and strip.exists():
                    shown[method] = _unstrip(strip)
                    log(f"{task.name}: {method}: kept from the earlier run")
                    continue
                todo = {c: [i for i in idx if i < 4] for c, idx in groups.items()}     # the grid's four only
            else:
                todo = groups
            for cap, idx in todo.items():
                if not idx:
                    continue
                if method in few_rows and peer_n:       # diffusers': one image per call, the slowest row
                    idx = [i for i in idx if i < peer_n]
                    if not idx:
                        continue
                tgt = world.caption(task.edited(scenes[idx[0]]))
                imgs, extra = runner.run(method, task, cap, tgt, [names[i] for i in idx])
                for j, i in enumerate(idx):
                    per[i] = score(task, scenes[i], imgs[j])
                    images[i] = imgs[j]
                    if "mask" in extra:
                        m = extra["mask"]
                        mask_iou.append(csg_mask_iou(m[j if m.shape[0] > 1 else 0], scenes[i]))
            shown[method] = images[:4]
            if strip is not None:
                _strip(strip, images[:4])
            if method in done.get("rows", {}):
                log(f"{task.name}: {method}: kept from the earlier run (grid images rerun)")
                continue
            rows[method] = per
            if mask_iou:
                rows[method + " mask"] = mask_iou
            times[method] = time.time() - t0
            log(f"{task.name}: {method}: {summarise(per)['edit']:.0%} edited, {times[method]:.0f} s")
            results[task.name] = {"rows": rows, "seconds": times}
            if partial is not None:
                partial.write_text(json.dumps(results, default=float))
        results[task.name] = {"rows": rows, "seconds": times}
        grids[task.name] = shown
    return results, grids, time.time() - t_all


def summarise(per: list) -> dict:
    per = [r for r in per if r is not None]        # sources a row did not run (diffusers' row with --peer-n)

    def mean(key):
        vals = [r[key] for r in per if key in r and not (isinstance(r[key], float) and math.isnan(r[key]))]
        return float(np.mean(vals)) if vals else float("nan")
    return {"n": len(per), "edit": mean("edit"), "kept": mean("kept"), "iou_src": mean("iou_src"),
            "centre": mean("centre"), "size": mean("size"), "unedited": mean("unedited"), "found": mean("found")}


SHORT = {"ground truth": "truth", "reconstruction": "reconstruct", "pix2pix-zero (no guidance)": "direction",
         "SDEdit 0.5": "SDEdit .5", "SDEdit 0.75": "SDEdit .75", "diffusers pix2pix-zero": "diffusers",
         "pix2pix-zero": "p2pz", TOY_P2PZ: "p2pz toy", "pix2pix-zeroCon": "zeroCon", TOY_ZEROCON: "zeroCon toy",
         "Asyrp (derived)": "Asyrp der.", "Asyrp (trained)": "Asyrp tr."}       # the grid's column labels


def grid_png(grids: dict, path: Path) -> None:
    """One block per task: a column per method (source, ground truth, each method), four sources as rows."""
    from PIL import Image, ImageDraw
    s, pad, label = world.SIZE, 2, 14
    blocks = []
    for task, shown in grids.items():
        cols = list(shown)
        rows = len(shown["source"])
        img = Image.new("RGB", (len(cols) * (s + pad), label + 12 + rows * (s + pad)), "white")
        d = ImageDraw.Draw(img)
        d.text((2, 0), task, fill="black")
        for c, name in enumerate(cols):
            d.text((c * (s + pad), 12), SHORT.get(name, name)[:11], fill="black")
            for r, im in enumerate(shown[name]):
                if im is not None:
                    img.paste(Image.fromarray(im), (c * (s + pad), label + 12 + r * (s + pad)))
        blocks.append(img)
    w = max(b.width for b in blocks)
    out = Image.new("RGB", (w, sum(b.height for b in blocks)), "white")
    y = 0
    for b in blocks:
        out.paste(b, (0, y))
        y += b.height
    out.quantize(256).save(path, optimize=True)      # a palette keeps the committed PNG small


def markdown(results: dict, n: int, steps: int, seconds: float, grid: str) -> str:
    lines = [f"N = {n} held-out sources per task, {steps} steps, {seconds / 60:.0f} minutes in all on this machine.",
             "", f"![sources, ground truth and each method's edit]({grid})", ""]
    for task, res in results.items():
        t = next(x for x in world.TASKS if x.name == task)
        lines += [f"### {task}: {t.source} -> {t.target}", "",
                  "| row | n | edit | others kept | IoU with source | centre err (px) | size err | unedited err | "
                  "seconds |", "|---|---|---|---|---|---|---|---|---|"]
        for name, per in res["rows"].items():
            if name.endswith(" mask"):
                continue
            s = summarise(per)
            secs = res["seconds"].get(name)
            lines.append(f"| {name} | {s['n']} | {s['edit']:.0%} | {s['kept']:.0%} | {s['iou_src']:.2f} | "
                         f"{s['centre']:.1f} | "
                         f"{s['size']:.2f} | {s['unedited']:.1f} | {'' if secs is None else f'{secs:.0f}'} |")
        if "CSG mask" in res["rows"]:
            lines.append(f"\nCSG content mask IoU with the true object mask: "
                         f"{np.mean(res['rows']['CSG mask']):.2f}")
        lines.append("")
    return "\n".join(lines)


def write_outputs(results: dict, grids: dict, secs: float, args) -> None:
    """results.json, the grid (docs/evaluation.png with --write) and the tables (tables.md, printed)."""
    (args.out / "results.json").write_text(json.dumps(results, indent=1, default=float))
    grid = (REPO / "docs" / "evaluation.png") if args.write else args.out / "evaluation.png"
    grid_png(grids, grid)
    md = markdown(results, args.n, args.steps, secs, "docs/evaluation.png" if args.write else "evaluation.png")
    (args.out / "tables.md").write_text(md)
    print(md)


def report(partials: list, args) -> None:
    """Tables and grid from the partial.json files (and their _shown folders) of runs that split the tasks or the
    rows (a row in a later file replaces the same row of an earlier one)."""
    results, grids, secs = {}, {}, 0.0
    for p in partials:
        part = json.loads(p.read_text())
        for task_name, res in part.items():
            task = next(t for t in world.TASKS if t.name == task_name)
            if task_name not in results:
                scenes = world.task_sources(task, args.n, args.seed, args.captions)[:4]
                results[task_name] = {"rows": {}, "seconds": {}}
                grids[task_name] = {"source": [np.asarray(world.render(s)) for s in scenes],
                                    "ground truth": [np.asarray(world.render(task.edited(s))) for s in scenes]}
            for method in res["rows"]:
                results[task_name]["rows"][method] = res["rows"][method]
                strip = p.parent / (p.stem + "_shown") / f"{task_name}__{method}.png".replace(" ", "_")
                if strip.exists():
                    grids[task_name][method] = _unstrip(strip)
            results[task_name]["seconds"].update(res["seconds"])
    secs = sum(sum(r["seconds"].values()) for r in results.values())
    args.out.mkdir(parents=True, exist_ok=True)
    write_outputs(results, grids, secs, args)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=50)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--resume", type=Path, default=None, help="a cut run's partial.json: its rows are kept")
    ap.add_argument("--peer-n", type=int, default=0, help="the --few-rows on the first N sources only (0: all)")
    ap.add_argument("--few-rows", default="diffusers pix2pix-zero", help="rows --peer-n applies to (comma-separated)")
    ap.add_argument("--captions", type=int, default=4, help="caption combinations per task (0: random; sources "
                    "that share a caption run as one batch)")
    ap.add_argument("--tasks", default=",".join(t.name for t in world.TASKS))
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--out", type=Path, default=REPO / "out" / "evaluation")
    ap.add_argument("--write", action="store_true", help="write EVALUATION.md's tables and docs/evaluation.png")
    ap.add_argument("--report", type=Path, nargs="+", default=None, metavar="PARTIAL_JSON",
                    help="run nothing: merge these runs' partial.json files (tasks split over runs) into one report")
    args = ap.parse_args()
    if args.report:
        report(args.report, args)
        return
    tasks = [t for t in world.TASKS if t.name in args.tasks.split(",")]
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    for m in methods:
        if m not in METHODS:
            raise SystemExit(f"unknown method {m!r}; known: {', '.join(METHODS)}")
    args.out.mkdir(parents=True, exist_ok=True)
    results, grids, secs = evaluate(args.n, args.steps, tasks, methods, args.seed, captions=args.captions,
                                    partial=args.out / "partial.json", peer_n=args.peer_n,
                                    few_rows=tuple(m.strip() for m in args.few_rows.split(",")),
                                    resume=json.loads(args.resume.read_text()) if args.resume else None)
    write_outputs(results, grids, secs, args)


if __name__ == "__main__":
    main()
