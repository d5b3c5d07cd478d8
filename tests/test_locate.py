"""`captioner.locate`: the box and the score on hand-made maps, and on the bundled model a scene's object phrase
boxed where that object is."""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from captioner import locate as locating
from captioner_train.synthetic import make_scene


def test_the_box_is_the_connected_region_above_half_the_peak_that_holds_the_peak():
    heat = np.zeros((6, 8), np.float32)
    heat[1:3, 1:4] = 0.6  # joined to the peak
    heat[2, 2] = 1.0  # the peak
    heat[3, 3] = 0.4  # touches the region, below half the peak
    heat[5, 6] = 0.9  # hot but apart: another region
    region = locating.hottest_region(heat)
    assert region.sum() == 6 and not region[5, 6] and not region[3, 3]
    assert locating.cell_box(region) == (1, 1, 3, 4)


def test_a_flat_map_boxes_the_whole_grid():
    assert locating.cell_box(locating.hottest_region(np.full((4, 5), 0.3, np.float32))) == (0, 0, 4, 5)


def test_cells_map_to_pixels_through_the_view():
    assert locating.to_pixels((1, 2, 3, 4), (4, 8), (40, 80), (0.0, 0.0, 1.0, 1.0)) == (20, 10, 40, 30)
    # a centre crop: the grid covers the middle half of the width only
    assert locating.to_pixels((0, 0, 4, 8), (4, 8), (40, 80), (0.25, 0.0, 0.75, 1.0)) == (20, 0, 60, 40)


def test_a_result_from_a_centre_crop_is_boxed_on_the_part_of_the_image_the_model_saw():
    """`locate_in` maps its cells through the result's own view: with a processor that centre-crops, the grid
    covers the middle of the photo, and the box lands there, not on the whole width."""
    heat = np.zeros((4, 4), np.float32)
    heat[1, 0] = 1.0  # the grid's left column, row 1
    res = SimpleNamespace(word_maps=heat[None], words=["star"], grid=(4, 4), image_size=(40, 80),
                          view=(0.25, 0.0, 0.75, 1.0))
    where = locating.locate_in(res, "star", [0])
    assert where.cells == (1, 0, 2, 1)
    assert where.box == (20, 10, 30, 20)  # x from 0.25 * 80 = 20, one cell = 10 px wide


def test_the_score_is_the_share_of_the_mass_inside_the_box():
    heat = np.zeros((4, 4), np.float32)
    heat[0, 0], heat[1, 0], heat[0, 1], heat[3, 3] = 4.0, 2.0, 1.0, 1.0  # two of it just outside the box
    assert locating.concentration(heat, (0, 0, 1, 1)) == pytest.approx(0.5)
    assert locating.concentration(heat, (0, 0, 4, 4)) == pytest.approx(1.0)
    assert locating.concentration(np.zeros((2, 2)), (0, 0, 1, 1)) == 0.0


def test_the_phrase_is_read_as_a_caption_starting_with_a():
    assert locating.phrase_words("green star") == ("a green star", [1, 2])
    assert locating.phrase_words("a green star") == ("a green star", [0, 1, 2])
    with pytest.raises(ValueError, match="phrase"):
        locating.phrase_words("  ")


def _iou(a, b) -> float:
    ix, iy = max(0, min(a[2], b[2]) - max(a[0], b[0])), max(0, min(a[3], b[3]) - max(a[1], b[1]))
    return ix * iy / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - ix * iy)


SCENES = range(200, 230)  # small seeds: neither training's (>= 9_999_000) nor the evaluation's (>= 5_000_000)


def test_a_scenes_object_phrase_is_boxed_on_that_object(bundled):
    """The first object's "colour shape" on 30 held-out scenes: its box overlaps the object's box with IoU > 0.1
    on at least 80% of them (relevance maps; 29 of 30 when written: the margin absorbs a few scenes read
    differently), and the map's peak cell is inside the box."""
    hits = 0
    for seed in SCENES:
        scene = make_scene(seed)
        obj = scene.objects[0]
        where, res = locating.locate(bundled, scene.image, f"{obj.colour} {obj.shape}")
        assert where.words == [obj.colour, obj.shape] and 0 <= where.score <= 1
        assert where.map.max() == pytest.approx(1.0) and where.map.min() >= 0
        r, c = np.unravel_index(int(np.argmax(where.map)), where.map.shape)
        assert where.cells[0] <= r < where.cells[2] and where.cells[1] <= c < where.cells[3]
        hits += _iou(where.box, obj.box) > 0.1
    assert hits >= 0.8 * len(SCENES), f"{hits}/{len(SCENES)} boxes on the object"


def test_the_phrase_map_is_the_mean_of_its_words_maps(bundled):
    scene = make_scene(201)
    where, res = locating.locate(bundled, scene.image, "large green star", method="attention")
    mean = res.word_maps[1:4].mean(axis=0)
    np.testing.assert_allclose(where.map, mean / mean.max(), atol=1e-6)
