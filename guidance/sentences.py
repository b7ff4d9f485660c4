"""Sentence banks for edit directions (pix2pix-zero section 3.2).

The paper asks GPT-3 for many captions containing a word ("Provide many captions for images containing
{word}"). No language model is available here, so a deterministic bank of caption templates stands in: the
varied settings, media, poses and framings of captions are what average out in the CLIP mean, leaving the
difference between the two words. Users can also give their own sentences (one per line).
"""
from __future__ import annotations

import random
import re

TEMPLATES: tuple[str, ...] = (
    # photos
    "a photo of {a}", "a close-up photo of {a}", "a blurry photo of {a}", "a black and white photo of {a}",
    "a high resolution photo of {a}", "a cropped photo of {a}", "a bright photo of {a}", "a dark photo of {a}",
    "a photo of {a} taken with a phone", "a professional photograph of {a}", "an old photo of {a}",
    "a candid snapshot of {a}", "a photo of a small {w}", "a photo of a large {w}", "a photo of the {w}",
    "a photo of my {w}", "a close-up of the face of {a}", "a portrait of {a}", "a studio portrait of {a}",
    # art
    "a painting of {a}", "an oil painting of {a}", "a watercolor painting of {a}", "a sketch of {a}",
    "a pencil drawing of {a}", "a cartoon of {a}", "an illustration of {a}", "a digital painting of {a}",
    "a rendering of {a}", "a sculpture of {a}", "a toy {w}", "a plush {w} on a shelf", "an embroidery of {a}",
    # scenes
    "{a} in a garden", "{a} on the grass", "{a} on a sofa", "{a} on a wooden floor", "{a} in the snow",
    "{a} on a beach", "{a} in a forest", "{a} in a city street", "{a} in a living room", "{a} in a kitchen",
    "{a} next to a window", "{a} on a bed", "{a} in a field of flowers", "{a} by a lake", "{a} in the rain",
    "{a} at night", "{a} in the sunlight", "{a} on a table", "{a} in front of a white background",
    "{a} in a park on a sunny day", "{a} near a fence", "{a} on a blanket",
    # poses and actions
    "{a} sitting on the ground", "{a} lying down", "{a} looking at the camera", "{a} looking to the side",
    "{a} standing still", "{a} resting", "{a} sleeping in the sun", "{a} turning its head",
    "a side view of {a}", "a front view of {a}", "{a} seen from above",
    # framing and count
    "a picture of {a}", "an image of {a}", "there is {a} in this picture", "this is {a}",
    "a close view of {a}", "{a} in the middle of the frame", "a cute {w}", "a beautiful {w}",
    "a happy {w}", "a curious {w}", "a single {w}",
)

_VOWEL_SOUND = re.compile(r"^(?:[aeio]|u(?!ni|se|sa|ro|ti))", re.IGNORECASE)


def with_article(word: str) -> str:
    """'cat' -> 'a cat', 'owl' -> 'an owl'; phrases that already start with an article are kept."""
    w = word.strip()
    if re.match(r"^(a|an|the|my|some|two|three)\s", w, re.IGNORECASE):
        return w
    return ("an " if _VOWEL_SOUND.match(w) else "a ") + w


def template_sentences(word: str, n: int, seed: int = 0) -> list[str]:
    """`n` captions around `word`, deterministic for (word, n, seed). Templates are used in a seeded order
    and repeat only when n exceeds the bank; a repeat is never adjacent to itself."""
    word = word.strip()
    if not word:
        raise ValueError("the word to build sentences around is empty")
    if n < 1:
        raise ValueError(f"number of sentences must be at least 1, got {n}")
    order = list(TEMPLATES)
    random.Random(seed).shuffle(order)
    out = []
    for i in range(n):
        t = order[i % len(order)]
        out.append(t.format(a=with_article(word), w=word))
    return out


def parse_sentences(text: str) -> list[str]:
    """One sentence per non-empty line; lines starting with '#' are comments."""
    return [line.strip() for line in (text or "").splitlines() if line.strip() and not line.strip().startswith("#")]
