"""The pointing game: does a word map's peak fall on the object the word names? Shared by `evaluate` and
`faithfulness`, and the held-out scene seeds both use."""
from __future__ import annotations

import numpy as np

EVAL_SEEDS_START = 5_000_000  # training uses seeds >= 9_999_000 (validation included), tests use small seeds


def _expanded_box(box, image_size, grid) -> tuple[float, float, float, float, float, float]:
    """(x0, y0, x1, y1) grown by half a patch on each side, plus the patch size (pw, ph) in pixels."""
    (H, W), (gh, gw) = image_size, grid
    pw, ph = W / gw, H / gh
    x0, y0, x1, y1 = box
    return x0 - pw / 2, y0 - ph / 2, x1 + pw / 2, y1 + ph / 2, pw, ph


def pointing_hit(word_map: np.ndarray, box, image_size) -> bool:
    """Whether the peak of `word_map` (gh, gw) falls on `box` (x0, y0, x1, y1 pixels, x1/y1 exclusive) of an
    image of `image_size` (H, W).

    Map cell (i, j) covers pixels [j*pw, (j+1)*pw) x [i*ph, (i+1)*ph), pw = W/gw, ph = H/gh. A hit means the
    argmax cell's centre lies strictly inside the box grown by half a patch on each side, which is the same as
    the argmax cell overlapping the box: a box that ends exactly on a cell's edge does not count for that cell.
    Ties go to the first cell in row-major order; a constant map has no peak and never hits.
    """
    gh, gw = word_map.shape
    if word_map.max() == word_map.min():
        return False
    i, j = np.unravel_index(int(np.argmax(word_map)), (gh, gw))
    ex0, ey0, ex1, ey1, pw, ph = _expanded_box(box, image_size, (gh, gw))
    cx, cy = (j + 0.5) * pw, (i + 0.5) * ph
    return bool(ex0 < cx < ex1 and ey0 < cy < ey1)


def uniform_hit_rate(grid: tuple[int, int], box, image_size) -> float:
    """Expected pointing hit of a uniform map (its argmax is a random cell): the fraction of the grid's cells
    that `pointing_hit` would accept for `box`."""
    gh, gw = grid
    ex0, ey0, ex1, ey1, pw, ph = _expanded_box(box, image_size, grid)
    cx = (np.arange(gw) + 0.5) * pw  # (gw,) cell centres
    cy = (np.arange(gh) + 0.5) * ph  # (gh,)
    return float(((ex0 < cx) & (cx < ex1)).sum() * ((ey0 < cy) & (cy < ey1)).sum() / (gh * gw))
