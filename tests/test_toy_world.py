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
