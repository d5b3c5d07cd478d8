"""Does a word map sit on the object the word names? Shared by `evaluate` and `faithfulness`, with the held-out
scene seeds both use.

- The pointing game (`pointing_hit`): the map's single hottest patch falls on the object's box.
- Energy-based pointing (Wang et al., Score-CAM 2020): the share of the map's mass inside the box, on the patch
  grid (`energy_share`: the patches whose centre lies in the box) and on the upsampled overlay a visitor sees
  (`overlay_energy_share`: the pixels in the box). A uniform map scores the box's share of the grid or the image
  (`uniform_energy_share`, `uniform_overlay_share`), about 0.09 for the scenes.

`score_object` gives all three for one map and object, `uniform_baseline` the uniform map's, and
`records_by_seed` runs a per-scene function over held-out seeds on every rank and pools the records in seed order.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from captioner import distributed
from captioner.distributed import Ranks
from captioner.render import upsample

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


def cell_coverage(grid: tuple[int, int], box, image_size) -> np.ndarray:
    """(gh, gw): the fraction of each map cell's area that lies inside `box` (x0, y0, x1, y1 pixels, x1/y1
    exclusive) of an image of `image_size` (H, W); cell (i, j) covers [j*pw, (j+1)*pw) x [i*ph, (i+1)*ph).
    Training's grounding target (`captioner_train.train`)."""
    (gh, gw), (H, W) = grid, image_size
    x0, y0, x1, y1 = box
    xs, ys = np.arange(gw + 1) * (W / gw), np.arange(gh + 1) * (H / gh)  # cell edges
    cover_x = np.clip(np.minimum(xs[1:], x1) - np.maximum(xs[:-1], x0), 0, None) / (W / gw)  # (gw,)
    cover_y = np.clip(np.minimum(ys[1:], y1) - np.maximum(ys[:-1], y0), 0, None) / (H / gh)  # (gh,)
    return cover_y[:, None] * cover_x[None, :]


def cells_inside(grid: tuple[int, int], box, image_size) -> np.ndarray:
    """(gh, gw) bool: the patches whose centre lies inside `box` (x0 <= cx < x1, y0 <= cy < y1)."""
    (gh, gw), (H, W) = grid, image_size
    x0, y0, x1, y1 = box
    cx, cy = (np.arange(gw) + 0.5) * (W / gw), (np.arange(gh) + 0.5) * (H / gh)
    return ((y0 <= cy) & (cy < y1))[:, None] & ((x0 <= cx) & (cx < x1))[None, :]


def energy_share(word_map: np.ndarray, box, image_size) -> float:
    """Share of `word_map`'s (gh, gw) mass on the patches inside `box` (those whose centre lies in it,
    `cells_inside`). Negative values count as zero; a map with no mass scores 0."""
    m = np.clip(word_map.astype(np.float64), 0, None)
    total = m.sum()
    return float(m[cells_inside(m.shape, box, image_size)].sum() / total) if total > 0 else 0.0


def uniform_energy_share(grid: tuple[int, int], box, image_size) -> float:
    """What a uniform map scores on the grid: the share of the patches inside `box`."""
    return float(cells_inside(grid, box, image_size).mean())


def uniform_overlay_share(box, image_size) -> float:
    """What a uniform map scores on the overlay: the box's share of the image's area."""
    (H, W), (x0, y0, x1, y1) = image_size, box
    return float(max(0, min(x1, W) - max(x0, 0)) * max(0, min(y1, H) - max(y0, 0)) / (H * W))


def overlay_energy_share(word_map: np.ndarray, box, image_size) -> float:
    """Share of the overlay's mass inside `box`: the map upsampled to the image's pixels exactly as the page
    draws it (`render.upsample`), then the pixels inside the box summed. A map with no mass scores 0."""
    up = upsample(word_map, image_size).astype(np.float64)  # (H, W)
    total = up.sum()
    x0, y0, x1, y1 = box
    return float(up[y0:y1, x0:x1].sum() / total) if total > 0 else 0.0


@dataclass(frozen=True)
class ObjectScore:
    """How one word map (gh, gw) scores on the object its word names."""
    hit: bool  # pointing game: the map's peak falls on the object (`pointing_hit`)
    energy: float  # share of the map's mass on the patches inside the box (`energy_share`)
    energy_overlay: float  # the same on the upsampled overlay's pixels (`overlay_energy_share`)


def score_object(word_map: np.ndarray, box, image_size) -> ObjectScore:
    """`word_map` (gh, gw) scored on `box` (x0, y0, x1, y1 pixels) of an image of `image_size` (H, W)."""
    return ObjectScore(pointing_hit(word_map, box, image_size), energy_share(word_map, box, image_size),
                       overlay_energy_share(word_map, box, image_size))


@dataclass(frozen=True)
class UniformBaseline:
    """What a uniform map scores on one object: the baselines next to each `ObjectScore`."""
    hit: float  # expected pointing hit (`uniform_hit_rate`)
    energy: float  # share of the grid's patches inside the box (`uniform_energy_share`)
    energy_overlay: float  # share of the image's area inside the box (`uniform_overlay_share`)


def uniform_baseline(grid: tuple[int, int], box, image_size) -> UniformBaseline:
    return UniformBaseline(uniform_hit_rate(grid, box, image_size), uniform_energy_share(grid, box, image_size),
                           uniform_overlay_share(box, image_size))


def records_by_seed(ranks: Ranks, seeds: list[int], record: Callable[[int], Any], desc: str,
                    progress: bool = True) -> list | None:
    """`record(seed)` for this rank's share of `seeds`, every rank's pooled on rank 0 and sorted by their `seed`
    attribute, so the list is the one a single process makes (None on other ranks)."""
    mine = [record(seed) for seed in tqdm(ranks.share(seeds), desc=desc, disable=not (progress and ranks.main),
                                          dynamic_ncols=True)]
    gathered = distributed.gather(ranks, mine)
    if not ranks.main:
        return None
    return sorted((r for part in gathered for r in part), key=lambda r: r.seed)
