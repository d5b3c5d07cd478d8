"""Overlays: sizes, colours where the map is high, inputs untouched, the strip and the colour scale."""
from __future__ import annotations

import cv2
import numpy as np

from captioner import render


def _hot_corner(gh=4, gw=6):
    heat = np.zeros((gh, gw), np.float32)
    heat[0, gw - 1] = 1.0  # top-right patch
    return heat


def test_blend_matches_image_size_and_leaves_input_alone():
    image = np.full((300, 500, 3), 128, np.uint8)
    before = image.copy()
    out = render.blend_heatmap(image, _hot_corner())
    assert out.shape == image.shape and out.dtype == np.uint8
    assert np.array_equal(image, before)
    # TURBO: high = red, low = blue; the map is stretched over the whole image (the processor squashes)
    top_right, bottom_left = out[20, 480].astype(int), out[280, 20].astype(int)
    assert top_right[0] > top_right[2] and bottom_left[2] > bottom_left[0]


def test_grid_lines_drawn_on_patch_borders():
    image = np.zeros((40, 60, 3), np.uint8)
    out = render.blend_heatmap(image, np.zeros((4, 6), np.float32), alpha=0.0, grid=True)
    assert (out[10] == 255).all() and (out[:, 10] == 255).all() and (out[5, 5] == 0).all()


def test_small_images_are_enlarged_for_display_only():
    small = np.zeros((96, 96, 3), np.uint8)
    assert render.display_image(small).shape == (384, 384, 3)
    big = np.zeros((500, 700, 3), np.uint8)
    assert render.display_image(big) is big


def test_titled_overlay_adds_a_colour_scale():
    out = render.titled_overlay(np.zeros((96, 96, 3), np.uint8), _hot_corner(8, 8), "'circle'")
    assert out.shape[1] == 384 and out.shape[0] > 384
    bar = out[384:]
    assert bar[2, 2, 2] > bar[2, 2, 0] and bar[2, -3, 0] > bar[2, -3, 2], "scale runs from blue to red"


def test_word_strip_has_one_tile_per_word():
    image = np.zeros((100, 200, 3), np.uint8)
    maps = np.random.default_rng(0).random((7, 4, 6)).astype(np.float32)
    sheet = render.word_strip(image, ["w"] * 7, maps, tile=100, columns=3)
    assert sheet.shape == (3 * (50 + 22), 3 * 100, 3)
    assert render.word_strip(image, [], maps[:0]).ndim == 3


def test_png_round_trip_keeps_rgb_order():
    image = np.zeros((10, 10, 3), np.uint8)
    image[..., 0] = 255
    decoded = cv2.imdecode(np.frombuffer(render.encode_png(image), np.uint8), cv2.IMREAD_COLOR)
    assert decoded[0, 0].tolist() == [0, 0, 255]  # BGR on disk means red survived
