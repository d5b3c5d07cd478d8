"""Where would the model look for a phrase? The phrase's map, the box around its hottest region, and how
concentrated the map is. numpy only for the box and the score; `Captioner.explain` makes the maps.

The rules (docs/api.md states them too):
- map: the phrase is given to the model as a caption ("a" put before it when it starts otherwise, so the model
  reads it the way its captions begin), explained by the chosen method, and its own words' maps are averaged
  (the leading "a" only sets the context) and scaled to a peak of 1;
- box: the 4-connected cells whose value is at least BOX_FRACTION of the peak, taken from the peak's own cell
  outwards, and their bounding box on the patch grid, mapped through the result's `view` onto image pixels;
- score: the share of the map's mass inside the box's cells, in [0, 1] (1: everything the model looked at is in
  the box; the box's share of the grid when the map is flat).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

BOX_FRACTION = 0.5  # a cell belongs to the hottest region when its value is at least this share of the peak
LEAD = "a"  # put before a phrase that does not start with it: captions here start with "a"


@dataclass
class Location:
    phrase: str  # as asked
    words: list[str]  # the phrase's words, whose maps were averaged
    map: np.ndarray  # (gh, gw) float32 in [0, 1], peak 1 (all zeros when the maps are)
    cells: tuple[int, int, int, int]  # (r0, c0, r1, c1) on the patch grid, r1/c1 exclusive
    box: tuple[int, int, int, int]  # (x0, y0, x1, y1) in image pixels, x1/y1 exclusive
    score: float  # share of the map's mass inside the box, in [0, 1]

    def to_json(self) -> dict:
        return {"phrase": self.phrase, "words": self.words, "box": list(self.box), "cells": list(self.cells),
                "score": round(self.score, 4), "map": np.round(self.map, 4).tolist(), "grid": list(self.map.shape)}


def hottest_region(heat: np.ndarray, fraction: float = BOX_FRACTION) -> np.ndarray:
    """(gh, gw) map -> (gh, gw) bool: the 4-connected cells >= fraction * peak that hold the peak (the first
    maximum in row-major order). A flat map (all equal) gives every cell."""
    assert heat.ndim == 2 and heat.size, f"a (gh, gw) map, got shape {heat.shape}"
    peak = np.unravel_index(int(np.argmax(heat)), heat.shape)
    above = heat >= fraction * heat[peak]
    region = np.zeros_like(above)
    stack = [peak]
    while stack:
        r, c = stack.pop()
        if not (0 <= r < heat.shape[0] and 0 <= c < heat.shape[1]) or region[r, c] or not above[r, c]:
            continue
        region[r, c] = True
        stack += [(r - 1, c), (r + 1, c), (r, c - 1), (r, c + 1)]
    return region


def cell_box(region: np.ndarray) -> tuple[int, int, int, int]:
    """(gh, gw) bool, not empty -> its bounding box (r0, c0, r1, c1), r1/c1 exclusive."""
    rows, cols = np.nonzero(region)
    return int(rows.min()), int(cols.min()), int(rows.max()) + 1, int(cols.max()) + 1


def to_pixels(cells: tuple[int, int, int, int], grid: tuple[int, int], image_size: tuple[int, int],
              view: tuple[float, float, float, float]) -> tuple[int, int, int, int]:
    """A box of grid cells -> (x0, y0, x1, y1) image pixels (x1/y1 exclusive). The grid covers `view` (fractions
    (x0, y0, x1, y1) of the image); edges are rounded outwards and kept inside the image."""
    (r0, c0, r1, c1), (gh, gw), (h, w) = cells, grid, image_size
    vx0, vy0, vx1, vy1 = view
    xs = [(vx0 + c / gw * (vx1 - vx0)) * w for c in (c0, c1)]
    ys = [(vy0 + r / gh * (vy1 - vy0)) * h for r in (r0, r1)]
    return (max(0, int(np.floor(xs[0]))), max(0, int(np.floor(ys[0]))),
            min(w, int(np.ceil(xs[1]))), min(h, int(np.ceil(ys[1]))))


def concentration(heat: np.ndarray, cells: tuple[int, int, int, int]) -> float:
    """Share of the map's mass inside the box of cells, in [0, 1]; an all-zero map gives 0."""
    r0, c0, r1, c1 = cells
    total = float(heat.sum())
    return float(heat[r0:r1, c0:c1].sum()) / total if total > 0 else 0.0


def phrase_words(phrase: str) -> tuple[str, list[int]]:
    """-> (the caption the model is given, the indices of the phrase's own words in it)."""
    words = phrase.split()
    if not words:
        raise ValueError("Give a phrase to locate, e.g. 'green star'.")
    if words[0].lower() == LEAD:
        return " ".join(words), list(range(len(words)))
    return " ".join([LEAD, *words]), list(range(1, len(words) + 1))


def locate_in(res, phrase: str, indices: list[int]) -> Location:
    """The Location of the words `indices` of an explained result `res` (a CaptionResult)."""
    heat = res.word_maps[indices].mean(axis=0).astype(np.float32)  # (gh, gw)
    peak = float(heat.max())
    heat = heat / peak if peak > 0 else heat
    cells = cell_box(hottest_region(heat))
    box = to_pixels(cells, res.grid, res.image_size, res.view)
    return Location(phrase, [res.words[k] for k in indices], heat, cells, box, concentration(heat, cells))


def locate(cap, image, phrase: str, method: str | None = None, layers: list[int] | None = None,
           head: int | None = None):
    """Where `cap` would look for `phrase` (one or more words) in `image` (PIL or (H, W, 3) uint8).
    -> (Location, the CaptionResult of the phrase as a caption). Raises ValueError for an empty phrase."""
    text, indices = phrase_words(phrase)
    res = cap.explain(image, text, method=method, layers=layers, head=head)
    return locate_in(res, phrase, indices), res
