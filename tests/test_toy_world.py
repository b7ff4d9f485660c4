"""The toy world and its judge (issue 30; tools/toy_world): renders are deterministic, and the rule-based judge
reads every attribute of ground-truth renders back (it must be right there before it can judge edits)."""
import re
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
from toy_world.judge import iou, judge  # noqa: E402
from toy_world.world import (BACKGROUNDS, COLOURS, SHAPES, TASKS, caption, object_mask, render, scenes,  # noqa: E402
                             sentence_bank, task_sources)


def test_renders_are_deterministic_and_cover_the_world():
    a, b = scenes(64, 5), scenes(64, 5)
    assert a == b and np.array_equal(np.asarray(render(a[0])), np.asarray(render(b[0])))
    many = scenes(300, 1)
    assert {s.shape for s in many} == set(SHAPES) and {s.colour for s in many} == set(COLOURS)
    assert {s.background for s in many} == set(BACKGROUNDS)
    assert caption(a[0]) == f"a {a[0].colour} {a[0].shape} on a {a[0].background} background"


def test_judge_reads_ground_truth_renders():
    """400 seeded scenes: every shape, colour and background right (measured 400/400), the object mask's IoU with
    the true mask at least 0.8 (measured mean 0.97, min 0.84: the 3x3 smoothing that keeps the judge steady on
    blurred, noisy images rounds small objects' outlines)."""
    wrong = []
    ious = []
    for s in scenes(400, 123):
        v = judge(render(s))
        wrong += [(a, getattr(s, a), getattr(v, a)) for a in ("shape", "colour", "background")
                  if getattr(v, a) != getattr(s, a)]
        true = np.asarray(object_mask(s)) >= 128
        ious.append(iou(v.mask, true))
        ys, xs = np.nonzero(true)
        assert abs(v.cx - xs.mean()) < 1 and abs(v.cy - ys.mean()) < 1 and abs(v.half - s.half) < 2.5, (s, v)
    assert not wrong, wrong[:5]
    assert min(ious) > 0.8 and np.mean(ious) > 0.95


def test_judge_tolerates_blur_and_noise():
    """Generated images are soft and noisy: with a Gaussian blur of radius 1.5 and pixel noise of std 10 the judge
    still reads at least 98% of attributes right (measured 598/600)."""
    from PIL import ImageFilter
    rng = np.random.default_rng(0)
    right = total = 0
    for s in scenes(200, 7):
        img = np.asarray(render(s).filter(ImageFilter.GaussianBlur(1.5)), dtype=np.float64)
        v = judge(np.clip(img + rng.normal(0, 10, img.shape), 0, 255).astype(np.uint8))
        right += sum(getattr(v, a) == getattr(s, a) for a in ("shape", "colour", "background"))
        total += 3
    assert right >= 0.98 * total, (right, total)


def test_judge_reads_squares_drawn_with_bowed_or_slanted_sides():
    """The trained model draws many squares with concave or slanted sides (extent 0.79-0.88, a circle's 0.79): the
    judge's first version called them circles. Squares whose sides bow in by up to 20% of their half or lean by up
    to 15% must read as squares, ellipses of aspect 0.8-1.25 as circles (every one measured right)."""
    from PIL import ImageDraw
    from toy_world.world import _background
    rng = np.random.default_rng(3)
    for i in range(60):
        bg = BACKGROUNDS[i % len(BACKGROUNDS)]
        colour = COLOURS[list(COLOURS)[i % len(COLOURS)]]
        cx, cy, h = rng.uniform(24, 40), rng.uniform(24, 40), rng.uniform(9, 16)
        img = _background(bg)
        d = ImageDraw.Draw(img)
        if i % 2 == 0:
            bow, lean = rng.uniform(0, 0.2) * h, rng.uniform(-0.15, 0.15) * h
            pts = [(cx - h + lean, cy - h), (cx, cy - h + bow), (cx + h + lean, cy - h), (cx + h - bow, cy),
                   (cx + h - lean, cy + h), (cx, cy + h - bow), (cx - h - lean, cy + h), (cx - h + bow, cy)]
            d.polygon(pts, fill=colour)
            want = "square"
        else:
            a = rng.uniform(0.8, 1.25)
            d.ellipse((cx - h * a, cy - h / a, cx + h * a, cy + h / a), fill=colour)
            want = "circle"
        assert judge(img).shape == want, (i, want)


def test_judge_sees_no_object_on_a_bare_background():
    from toy_world.world import _background
    for bg in BACKGROUNDS:
        v = judge(_background(bg))
        assert not v.found and v.background == bg


@pytest.mark.parametrize("task", TASKS, ids=[t.name for t in TASKS])
def test_tasks_have_ground_truth_and_sentence_banks(task):
    sources = task_sources(task, 20, 0)
    assert all(task.applies(s) for s in sources) and len(set(sources)) == 20
    for s in sources[:5]:
        target = task.edited(s)
        assert judge(render(target)).attribute(task.attribute) == task.target
        assert {a: getattr(target, a) for a in ("cx", "cy", "half")} == {a: getattr(s, a) for a in ("cx", "cy", "half")}
    src, tgt = sentence_bank(task.attribute, task.source, 16), sentence_bank(task.attribute, task.target, 16)
    assert all(re.search(rf"\b{task.source}\b", x) for x in src)
    assert all(re.search(rf"\b{task.target}\b", x) for x in tgt)
    # the same phrasings and other attributes on both sides: the direction is the attribute's change alone
    blank = lambda xs, w: [re.sub(rf"\b{w}\b", "#", x) for x in xs]  # noqa: E731
    assert blank(src, task.source) == blank(tgt, task.target)


# -- the trained model, end to end (needs the toy checkpoint tools/setup.sh builds from tools/toy_world/weights) --
TOY = "z2i-toy-sd15.safetensors"


def _toy_path(host):
    path = host.folder_paths.get_full_path("checkpoints", TOY)
    if path is None:
        pytest.fail(f"{TOY} is missing from models/checkpoints: run `bash tools/setup.sh` (it builds it from "
                    "tools/toy_world/weights)")
    return path


@pytest.mark.host
@pytest.mark.slow
def test_toy_model_generates_the_world(host):
    """Plain text-to-image on the trained toy model, through ComfyUI's loader and sampler (DDIM, 20 steps, cfg 5):
    the judge finds the captioned colour and background in every one of 16 seeded samples and all three
    attributes in most (docs/TOY_MODEL.md: 100 samples at 30 steps, colour 100, background 100, all three 96; these
    16 measured: colour 16, background 16, shape 15; the bound leaves two for other CPUs' rounding). A random or
    mis-scaled model fails both (the VAE's latents off by 30x gave blobs)."""
    from toy_world.toy_model import generate, load
    model, clip, vae = load(_toy_path(host))
    wanted = scenes(16, 2024)
    imgs = generate(model, clip, vae, [caption(s) for s in wanted], seed=7, steps=20)
    verdicts = [judge(im) for im in imgs]
    assert all(v.found and (v.colour, v.background) == (s.colour, s.background) for s, v in zip(wanted, verdicts)), \
        [(caption(s), v.colour, v.background) for s, v in zip(wanted, verdicts)]
    right = [v.shape == s.shape for s, v in zip(wanted, verdicts)]
    assert sum(right) >= 13, [(caption(s), v.shape) for s, v in zip(wanted, verdicts)]


@pytest.mark.host
@pytest.mark.slow
def test_evaluation_harness_end_to_end(host, monkeypatch):
    """tools/evaluate.py's graphs, judge and metrics on two sources of the object swap at 10 steps: the
    reconstruction keeps the source (found, the same shape, colour and background, small pixel error) and is
    scored as no edit; pix2pix-zero at the toy world's guidance step edits: the circles judged squares, colour,
    background and layout kept (the first test in which an edit happens); every row has a score per source; the
    ground truth scores a full edit."""
    import evaluate
    monkeypatch.setattr(evaluate, "BANK", 20)     # edit-direction sentences per side (shipped 100): CLIP time
    task = TASKS[0]
    results, grids, _ = evaluate.evaluate(2, 10, [task], ["reconstruction", "prompt swap", evaluate.TOY_P2PZ],
                                          host=host, log=lambda *a: None, captions=1)
    rows = results[task.name]["rows"]
    assert set(rows) == {"ground truth", "reconstruction", "prompt swap", evaluate.TOY_P2PZ}
    # measured: both edited, IoU with the source 0.68 / 0.78, 0.5 / 0.5 grey levels outside the object; one of
    # the two may flip on another CPU's rounding, none may lose the colour, background or layout
    p2pz = rows[evaluate.TOY_P2PZ]
    assert sum(r["edit"] for r in p2pz) >= 1 and all(r["kept"] for r in p2pz), p2pz
    assert all(r["iou_src"] > 0.5 and r["unedited"] < 5 for r in p2pz), p2pz
    assert all(len(v) == 2 for v in rows.values())
    gt, rec = evaluate.summarise(rows["ground truth"]), evaluate.summarise(rows["reconstruction"])
    assert gt["edit"] == 1.0 and gt["kept"] == 1.0
    assert rec["found"] == 1.0 and rec["edit"] == 0.0 and rec["kept"] == 1.0, rows["reconstruction"]
    assert rec["iou_src"] > 0.7 and rec["unedited"] < 20, rec
    assert len(grids[task.name]["prompt swap"]) == 2
