"""Procedurally generated scenes: the bundled model's training data and the grounding benchmark.

A scene is 1-3 coloured shapes on a noisy, textured background with grey scribbles. Its caption follows a
canonical grammar, so one image has exactly one right caption:

    caption  := object | object REL object | object REL object "and" REL object
    object   := "a" SIZE COLOUR SHAPE
    REL      := "left of" | "right of" | "above" | "below"   (the first object relative to the other)

Objects are named largest first, then left to right. Relations always compare the first object with the one
that follows the relation, along the axis where they are clearly apart (scenes where it is ambiguous are
redrawn), so every word is decidable from the pixels.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

IMAGE_SIZE = 96  # pixels, square
SIZES = {"small": (8, 11), "large": (15, 19)}  # radius range in pixels
COLOURS = {
    "red": (220, 30, 30),
    "green": (30, 170, 40),
    "blue": (35, 70, 225),
    "yellow": (240, 215, 25),
    "purple": (150, 40, 190),
    "orange": (250, 130, 10),
}
SHAPES = ("circle", "square", "triangle", "diamond", "star")
RELATIONS = ("left of", "right of", "above", "below")
VOCABULARY = sorted({"a", "and", *SIZES, *COLOURS, *SHAPES, *" ".join(RELATIONS).split()})


@dataclass(frozen=True)
class SceneObject:
    shape: str
    colour: str
    size: str
    box: tuple[int, int, int, int]  # (x0, y0, x1, y1) in image pixels, x1/y1 exclusive
    word_index: int  # index of this object's noun in caption.split()

    @property
    def phrase_indices(self) -> tuple[int, int, int]:
        """Indices in caption.split() of the words that name this object: its size, colour and shape
        ("a SIZE COLOUR SHAPE")."""
        return self.word_index - 2, self.word_index - 1, self.word_index

    @property
    def centre(self) -> tuple[float, float]:
        x0, y0, x1, y1 = self.box
        return (x0 + x1) / 2, (y0 + y1) / 2


@dataclass(frozen=True)
class Scene:
    image: Image.Image  # RGB, IMAGE_SIZE x IMAGE_SIZE
    caption: str
    objects: tuple[SceneObject, ...]  # in caption order


def _relation(a: tuple[float, float], b: tuple[float, float]) -> str | None:
    """Where a lies relative to b, or None when neither axis clearly dominates."""
    dx, dy = a[0] - b[0], a[1] - b[1]
    if abs(dx) >= 1.5 * abs(dy) and abs(dx) >= 12:
        return "left of" if dx < 0 else "right of"
    if abs(dy) >= 1.5 * abs(dx) and abs(dy) >= 12:
        return "above" if dy < 0 else "below"
    return None


def _shape_points(shape: str, cx: float, cy: float, r: float, turn: float) -> list[tuple[float, float]]:
    if shape == "triangle":
        angles = [-math.pi / 2 + k * 2 * math.pi / 3 for k in range(3)]
        return [(cx + r * math.cos(t), cy + 1.15 * r * math.sin(t) + 0.2 * r) for t in angles]
    if shape == "diamond":
        return [(cx, cy - r), (cx + 0.8 * r, cy), (cx, cy + r), (cx - 0.8 * r, cy)]
    if shape == "star":
        pts = []
        for k in range(10):
            t = -math.pi / 2 + turn + k * math.pi / 5
            rr = r if k % 2 == 0 else 0.45 * r
            pts.append((cx + rr * math.cos(t), cy + rr * math.sin(t)))
        return pts
    raise AssertionError(f"no polygon for {shape}")


def _draw_object(draw: ImageDraw.ImageDraw, shape: str, colour: tuple[int, int, int], cx: float, cy: float,
                 r: float, rng: np.random.Generator) -> None:
    if shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=colour)
    elif shape == "square":
        s = 0.85 * r
        draw.rectangle([cx - s, cy - s, cx + s, cy + s], fill=colour)
    else:
        draw.polygon(_shape_points(shape, cx, cy, r, float(rng.uniform(-0.2, 0.2))), fill=colour)


def _background(rng: np.random.Generator, scale: int) -> Image.Image:
    n = IMAGE_SIZE
    base = rng.uniform(95, 200)
    tint = rng.uniform(-12, 12, size=3)  # a faint colour cast, never strong enough to read as an object colour
    ramp = np.linspace(0, 1, n, dtype=np.float32)
    gradient = rng.uniform(-25, 25) * ramp[None, :] + rng.uniform(-25, 25) * ramp[:, None]  # (n, n)
    img = (base + tint)[None, None, :] + gradient[..., None]  # (n, n, 3)
    img = img + rng.normal(0, rng.uniform(4, 14), size=(n, n, 1)).astype(np.float32)  # grey noise texture
    image = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8), "RGB")
    return image.resize((n * scale, n * scale), Image.Resampling.NEAREST)  # noise stays at the output scale


def _scribbles(draw: ImageDraw.ImageDraw, rng: np.random.Generator, scale: int) -> None:
    """Distractor marks: grey polylines that are not objects and must not be named."""
    for _ in range(int(rng.integers(0, 4))):
        pts = rng.uniform(0, IMAGE_SIZE * scale, size=(int(rng.integers(2, 5)), 2))
        grey = int(rng.integers(40, 230))
        draw.line([tuple(p) for p in pts], fill=(grey, grey, grey), width=int(rng.integers(1, 3)) * scale)


def _place(rng: np.random.Generator, n: int) -> list[tuple[str, float, float, float]] | None:
    """Sizes and centres for n objects that do not overlap and can be ordered and related unambiguously."""
    placed: list[tuple[str, float, float, float]] = []
    for _ in range(n):
        size = str(rng.choice(list(SIZES)))
        r = float(rng.uniform(*SIZES[size]))
        for _attempt in range(30):
            cx, cy = rng.uniform(r + 2, IMAGE_SIZE - r - 2, size=2)
            if all(max(abs(cx - px), abs(cy - py)) > r + pr + 3 for _, px, py, pr in placed):
                placed.append((size, float(cx), float(cy), r))
                break
        else:
            return None
    placed.sort(key=lambda o: (o[0] != "large", o[1]))  # canonical order: large first, then left to right
    for a, b in zip(placed, placed[1:]):
        if a[0] == b[0] and b[1] - a[1] < 6:
            return None  # same size and nearly the same x: the order would be a guess
    for other in placed[1:]:
        if _relation(placed[0][1:3], other[1:3]) is None:
            return None
    return placed


def make_scene(seed: int) -> Scene:
    """The scene for one seed (same seed, same scene)."""
    rng = np.random.default_rng(seed)
    scale = 2  # drawn at twice the size and shrunk, so edges are smooth
    n = int(rng.choice([1, 2, 3], p=[0.25, 0.4, 0.35]))
    placed = None
    while placed is None:
        placed = _place(rng, n)
    kinds: list[tuple[str, str]] = []
    while len(kinds) < n:  # no two objects share colour and shape, so each noun names one thing
        kind = (str(rng.choice(SHAPES)), str(rng.choice(list(COLOURS))))
        if kind not in kinds:
            kinds.append(kind)

    image = _background(rng, scale)
    draw = ImageDraw.Draw(image)
    _scribbles(draw, rng, scale)
    words: list[str] = []
    objects: list[SceneObject] = []
    for i, ((size, cx, cy, r), (shape, colour)) in enumerate(zip(placed, kinds)):
        jitter = rng.integers(-20, 21, size=3)
        rgb = tuple(int(np.clip(c + j, 0, 255)) for c, j in zip(COLOURS[colour], jitter))
        _draw_object(draw, shape, rgb, cx * scale, cy * scale, r * scale, rng)
        if i == 1:
            words += _relation(placed[0][1:3], (cx, cy)).split()
        elif i == 2:
            words += ["and", *_relation(placed[0][1:3], (cx, cy)).split()]
        words += ["a", size, colour, shape]
        box = (max(0, math.floor(cx - r)), max(0, math.floor(cy - r)),
               min(IMAGE_SIZE, math.ceil(cx + r)), min(IMAGE_SIZE, math.ceil(cy + r)))
        objects.append(SceneObject(shape, colour, size, box, len(words) - 1))
    image = image.resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.LANCZOS)
    return Scene(image=image, caption=" ".join(words), objects=tuple(objects))


def write_dataset(folder: str | Path, seeds: range, split: str = "train") -> Path:
    """Write scenes as PNGs plus a COCO-format captions file (`captions_<split>.json`); returns its path.

    The training code then reads synthetic data exactly as it reads COCO.
    """
    folder = Path(folder)
    (folder / split).mkdir(parents=True, exist_ok=True)
    images, annotations = [], []
    for seed in seeds:
        scene = make_scene(seed)
        name = f"{seed:08d}.png"
        scene.image.save(folder / split / name)
        images.append({"id": seed, "file_name": name, "width": IMAGE_SIZE, "height": IMAGE_SIZE})
        annotations.append({"id": seed, "image_id": seed, "caption": scene.caption,
                            "boxes": [list(o.box) for o in scene.objects],
                            "word_indices": [o.word_index for o in scene.objects]})
    path = folder / f"captions_{split}.json"
    path.write_text(json.dumps({"images": images, "annotations": annotations}))
    return path
