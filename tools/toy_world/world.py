"""The toy world (issue 30): small images of one simple object on a simple background, their captions, sentence
banks for edit directions, and edit tasks with known ground truth.

A scene is one object (circle, square, triangle or cross) in one saturated colour (red, green, blue, yellow) on
an achromatic background (black, white, striped, horizon), at a position and size drawn from a seed. Objects are
saturated and backgrounds are not, so a rule-based judge (tools/toy_world/judge.py) can read every attribute back
without a learned model. Everything is deterministic from the seed: the same scene renders to the same bytes.

    render(Scene(...)) -> PIL.Image (RGB, SIZE x SIZE)
    caption(scene)     -> "a red circle on a striped background"
    sample_scene(rng)  -> a random Scene
    TASKS              -> the edit tasks: object swap, colour change, background change
    sentence_bank(kind, value, n, seed) -> sentences naming one attribute value, for Z2I Edit Direction's files

Pure Python + PIL + numpy: no ComfyUI, no torch (tests/test_toy_world.py runs it without a host).
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass, replace

from PIL import Image, ImageDraw

SIZE = 64                      # pixels a side: an 8x8 latent through an SD-style VAE
SUPERSAMPLE = 4                # shapes are drawn at 4x and reduced (anti-aliased edges, as a photo would have)

SHAPES = ("circle", "square", "triangle", "cross")
COLOURS = {"red": (220, 30, 30), "green": (30, 180, 40), "blue": (40, 70, 225), "yellow": (235, 210, 30)}
BACKGROUNDS = ("black", "white", "striped", "horizon")
BG_PLAIN = {"black": (15, 15, 15), "white": (240, 240, 240)}
STRIPE = ((235, 235, 235), (60, 60, 60))        # striped: vertical stripes of these greys
STRIPE_PERIOD = 8                               # pixels per light + dark pair
HORIZON = ((200, 200, 200), (70, 70, 70))      # horizon: light grey above, dark grey below
HORIZON_ROW = 0.55                              # the horizon line, as a fraction of the height

# object size: the half-extent (radius of the circle, half the side of the square) in pixels, and the centre
# range, so every object lies inside the image with a margin
MIN_HALF, MAX_HALF = 10, 16
MARGIN = 2


@dataclass(frozen=True)
class Scene:
    shape: str
    colour: str
    background: str
    cx: float                  # centre, pixels
    cy: float
    half: float                # half-extent, pixels

    def with_(self, **kw) -> "Scene":
        return replace(self, **kw)


def sample_scene(rng: random.Random) -> Scene:
    half = rng.uniform(MIN_HALF, MAX_HALF)
    lo, hi = half + MARGIN, SIZE - half - MARGIN
    return Scene(rng.choice(SHAPES), rng.choice(sorted(COLOURS)), rng.choice(BACKGROUNDS),
                 rng.uniform(lo, hi), rng.uniform(lo, hi), half)


def scenes(n: int, seed: int) -> list[Scene]:
    rng = random.Random(seed)
    return [sample_scene(rng) for _ in range(n)]


def caption(scene: Scene) -> str:
    return f"a {scene.colour} {scene.shape} on a {scene.background} background"


def _background(name: str) -> Image.Image:
    img = Image.new("RGB", (SIZE, SIZE))
    d = ImageDraw.Draw(img)
    if name in BG_PLAIN:
        d.rectangle([0, 0, SIZE, SIZE], fill=BG_PLAIN[name])
    elif name == "striped":
        half = STRIPE_PERIOD // 2
        for x in range(0, SIZE, STRIPE_PERIOD):
            d.rectangle([x, 0, x + half - 1, SIZE], fill=STRIPE[0])
            d.rectangle([x + half, 0, x + STRIPE_PERIOD - 1, SIZE], fill=STRIPE[1])
    elif name == "horizon":
        row = round(SIZE * HORIZON_ROW)
        d.rectangle([0, 0, SIZE, row - 1], fill=HORIZON[0])
        d.rectangle([0, row, SIZE, SIZE], fill=HORIZON[1])
    else:
        raise ValueError(f"unknown background {name!r}")
    return img


def shape_polygon(shape: str, cx: float, cy: float, half: float) -> list[tuple[float, float]]:
    """The outline of a shape as a polygon (the circle as a 64-gon), in pixels."""
    if shape == "circle":
        return [(cx + half * math.cos(2 * math.pi * k / 64), cy + half * math.sin(2 * math.pi * k / 64))
                for k in range(64)]
    if shape == "square":
        h = half * 0.9            # side 1.8 half: its area (3.24 half^2) close to the circle's (3.14 half^2)
        return [(cx - h, cy - h), (cx + h, cy - h), (cx + h, cy + h), (cx - h, cy + h)]
    if shape == "triangle":       # pointing up, its box centred on (cx, cy)
        return [(cx, cy - half), (cx + half, cy + half), (cx - half, cy + half)]
    if shape == "cross":          # a plus whose arms are a third of its width
        a = half / 3
        return [(cx - a, cy - half), (cx + a, cy - half), (cx + a, cy - a), (cx + half, cy - a), (cx + half, cy + a),
                (cx + a, cy + a), (cx + a, cy + half), (cx - a, cy + half), (cx - a, cy + a), (cx - half, cy + a),
                (cx - half, cy - a), (cx - a, cy - a)]
    raise ValueError(f"unknown shape {shape!r}")


def object_mask(scene: Scene) -> Image.Image:
    """The object's true mask, L mode, 0..255 with anti-aliased edges."""
    s = SUPERSAMPLE
    big = Image.new("L", (SIZE * s, SIZE * s), 0)
    ImageDraw.Draw(big).polygon([(x * s, y * s) for x, y in shape_polygon(scene.shape, scene.cx, scene.cy,
                                                                          scene.half)], fill=255)
    return big.resize((SIZE, SIZE), Image.Resampling.BOX)


def render(scene: Scene) -> Image.Image:
    if scene.colour not in COLOURS:
        raise ValueError(f"unknown colour {scene.colour!r}")
    img = _background(scene.background)
    solid = Image.new("RGB", (SIZE, SIZE), COLOURS[scene.colour])
    return Image.composite(solid, img, object_mask(scene))


# -- edit tasks ----------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Task:
    """An edit of one attribute from `source` to `target` (e.g. shape circle -> square)."""

    name: str
    attribute: str             # "shape", "colour" or "background"
    source: str
    target: str

    def applies(self, scene: Scene) -> bool:
        return getattr(scene, self.attribute) == self.source

    def edited(self, scene: Scene) -> Scene:
        """The ground truth: the same scene with the attribute changed, everything else kept."""
        return scene.with_(**{self.attribute: self.target})

    def words(self) -> tuple[str, str]:
        return self.source, self.target


TASKS = (
    Task("object swap", "shape", "circle", "square"),
    Task("colour change", "colour", "red", "green"),
    Task("background change", "background", "black", "striped"),
)


def task_sources(task: Task, n: int, seed: int, captions: int = 0) -> list[Scene]:
    """n held-out source scenes for a task (the attribute at its source value, the rest random). captions > 0: the
    two other attributes take only that many (random, distinct) combinations, in turn, so that sources share
    captions and an evaluation can run them in batches (position and size stay random)."""
    rng = random.Random(f"{task.name}:{seed}")
    out = []
    while len(out) < n:
        s = sample_scene(rng)
        out.append(s.with_(**{task.attribute: task.source}))
    if captions > 0:
        others = [a for a in ("shape", "colour", "background") if a != task.attribute]
        values = {"shape": SHAPES, "colour": tuple(COLOURS), "background": BACKGROUNDS}
        combos = [(x, y) for x in values[others[0]] for y in values[others[1]]]
        picked = random.Random(f"{task.name}:{seed}:captions").sample(combos, min(captions, len(combos)))
        out = [s.with_(**dict(zip(others, picked[i % len(picked)]))) for i, s in enumerate(out)]
    return out


# -- sentence banks for edit directions ----------------------------------------------------------------------------
PHRASES = {
    "shape": ("a {colour} {v} on a {background} background", "a picture of a {colour} {v}",
              "a {v} drawn in {colour} over a {background} background", "one {colour} {v}", "a simple {v} shape",
              "a {colour} {v} in the middle of a {background} background", "an image showing a {v}",
              "a flat {colour} {v}"),
    "colour": ("a {v} {shape} on a {background} background", "a {v} shape", "something {v} on a {background} "
               "background", "a {shape} painted {v}", "a {v} {shape}", "a bright {v} {shape} over a {background} "
               "background", "an image of a {v} object", "a {v} coloured {shape}"),
    "background": ("a {colour} {shape} on a {v} background", "a {v} background", "a {shape} in front of a {v} "
                   "background", "an object on a {v} backdrop", "a {colour} shape over a {v} background",
                   "a picture with a {v} background", "a {v} scene with a {shape}", "a {colour} {shape} against a "
                   "{v} background"),
}


def sentence_bank(attribute: str, value: str, n: int, seed: int = 0) -> list[str]:
    """n sentences that name `value` of `attribute` in varied phrasings, the other attributes drawn at random: the
    same draws for every value of an attribute (seeded by attribute and seed, not by value), so the direction
    target - source is the attribute's change with the rest averaged out, as pix2pix-zero's banks intend."""
    rng = random.Random(f"{attribute}:{seed}")
    out = []
    for i in range(n):
        template = PHRASES[attribute][i % len(PHRASES[attribute])]
        fill = {"shape": rng.choice(SHAPES), "colour": rng.choice(sorted(COLOURS)),
                "background": rng.choice(BACKGROUNDS)}
        fill[attribute] = value
        out.append(template.format(v=value, **{k: v for k, v in fill.items() if k != attribute},
                                   **{attribute: value}))
    return out
