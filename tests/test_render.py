"""Overlays: sizes, colours where the map is high, inputs untouched, the strip and the colour scale."""
from __future__ import annotations

import cv2
import numpy as np
from PIL import Image

from captioner import render
from conftest import image_for


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


# ----------------------------------------------------------------------- processors that centre-crop or pad

def _clip_style(side: int = 48, width: int | None = None):
    """A processor that resizes the shorter side to `side`, then centre-crops side x width (CLIP's and DeiT's
    way)."""
    from transformers import CLIPImageProcessor
    return CLIPImageProcessor(size={"shortest_edge": side}, crop_size={"height": side, "width": width or side},
                              do_convert_rgb=True)


def test_the_view_of_a_centre_cropping_processor_is_measured():
    from captioner.layout import FULL_VIEW, image_view
    from captioner_train.architecture import image_processor, ModelConfig

    # 60 x 120 photo: shorter side 60 -> 48 (x 0.8), so 96 wide; the middle 48 columns are kept: x from 1/4 to 3/4
    np.testing.assert_allclose(image_view(_clip_style(), (60, 120)), (0.25, 0.0, 0.75, 1.0), atol=0.01)
    np.testing.assert_allclose(image_view(_clip_style(), (200, 50)), (0.0, 0.375, 1.0, 0.625), atol=0.01)
    assert image_view(image_processor(ModelConfig()), (60, 120)) == FULL_VIEW, "a squashing processor sees it all"


def test_an_overlay_lands_on_the_crop_and_dims_what_the_model_never_saw():
    from captioner import render

    photo = np.full((60, 120, 3), 200, np.uint8)
    heat = np.zeros((4, 4), np.float32)
    heat[0, 0] = 1.0  # the crop's top-left patch
    out = render.blend_heatmap(photo, heat, view=(0.25, 0.0, 0.75, 1.0))
    assert (out[:, :29] == int(200 * render.UNSEEN)).all() and (out[:, 91:] == int(200 * render.UNSEEN)).all(), \
        "left and right of the crop: the photo dimmed, no colour"
    hot = render.colourize(np.ones((1, 1), np.float32), (1, 1))[0, 0].astype(int)
    blended_hot = (photo[0, 0].astype(int) + hot) / 2
    assert np.abs(out[2, 31].astype(int) - blended_hot).max() <= 3, "the hottest colour at the crop's corner"
    assert np.abs(out[2, 2].astype(int) - blended_hot).max() > 40, "not at the photo's corner"
    full = render.blend_heatmap(photo, heat)  # a squashing processor: the hot patch at the photo's corner
    assert np.abs(full[2, 2].astype(int) - blended_hot).max() <= 3
    with_grid = render.blend_heatmap(photo, heat, grid=True, view=(0.25, 0.0, 0.75, 1.0))
    assert (with_grid[15, 30:90] == 255).all() and (with_grid[15, :30] != 255).all(), "grid lines on the crop only"


def test_a_captioner_with_a_cropping_processor_reports_and_draws_its_view(tiny_dir, tmp_path):
    import shutil

    import captioner
    from captioner import render

    folder = tmp_path / "cropping"
    shutil.copytree(tiny_dir, folder)
    for name in ("preprocessor_config.json",):
        (folder / name).unlink()
    _clip_style(32, 48).save_pretrained(folder)  # the tiny model reads 32 x 48
    cap = captioner.load(str(folder))
    photo = np.asarray(Image.fromarray(image_for(1)).resize((128, 64)))  # 64 x 128 -> 32 x 64 -> middle 48 columns
    res = cap.explain(photo, "a cat sitting", method="attention")
    np.testing.assert_allclose(res.view, (0.125, 0.0, 0.875, 1.0), atol=0.01)
    assert res.to_json()["view"] == list(res.view)
    overlay = render.titled_overlay(res.image, res.word_maps[0], "x", view=res.view)  # displayed 384 x 768
    assert (overlay[:384, :90] <= 255 * render.UNSEEN + 1).all(), "the cropped-away left eighth is dimmed"
    assert (overlay[:384, 100:660] > 255 * render.UNSEEN + 1).any(axis=-1).mean() > 0.5, "the crop is not"


def test_a_padding_processor_puts_the_photo_inside_the_canvas_and_dims_nothing():
    """Donut's processor shrinks a wide photo into its square canvas and pads above and below: the canvas reaches
    beyond the photo, the whole photo was seen, and only the middle rows of the map lie on it."""
    from transformers import DonutImageProcessorPil

    from captioner.layout import image_view

    donut = DonutImageProcessorPil(size={"height": 48, "width": 48}, do_thumbnail=True, do_pad=True,
                                   do_align_long_axis=False)
    view = image_view(donut, (30, 60))
    np.testing.assert_allclose(view, (0.0, -0.5, 1.0, 1.5), atol=0.01)
    photo = np.full((30, 60, 3), 200, np.uint8)
    heat = np.zeros((8, 4), np.float32)
    heat[0] = 1.0  # the canvas's top row of patches: padding (canvas rows 0-7 of 60; the photo starts at row 15)
    out = render.blend_heatmap(photo, heat, view=view)
    assert (out > 200 * render.UNSEEN + 5).all(), "nothing of the photo is dimmed"
    cold = render.colourize(np.zeros((1, 1), np.float32), (1, 1))[0, 0].astype(int)
    hot = render.colourize(np.ones((1, 1), np.float32), (1, 1))[0, 0].astype(int)
    assert np.abs(out[1, 30].astype(int) - (200 + cold) / 2).max() <= 25, "the photo's top is below the hot padding"
    squashed = render.blend_heatmap(photo, heat)  # the map stretched over the photo would put the hot row on it
    assert np.abs(squashed[1, 30].astype(int) - (200 + hot) / 2).max() <= 25


def test_the_locate_box_is_drawn_where_it_is_on_an_enlarged_image():
    """A box in the image's pixels lands on the same place of the picture enlarged for display; input untouched."""
    image = np.full((96, 96, 3), 128, np.uint8)
    before = image.copy()
    out = render.boxed_overlay(image, np.zeros((8, 8), np.float32), (48, 24, 72, 60), "x")
    np.testing.assert_array_equal(image, before)
    s = render.DISPLAY_MIN_SIDE // 96  # 4: the scene is shown four times larger
    assert out.shape[1] == 96 * s and out.shape[0] > 96 * s  # a colour scale under it
    row = out[40 * s, :96 * s].astype(int).sum(axis=1)  # a row through the box's middle
    white = np.nonzero(row == 3 * 255)[0]
    assert abs(white.min() - 48 * s) <= 3 and abs(white.max() - (72 * s - 1)) <= 3, (white.min(), white.max())
