"""Turning what visitors send into (H, W, 3) uint8 RGB, or a clear ValueError."""
from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from captioner import images


def _png(img: Image.Image, fmt="PNG", **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


@pytest.mark.parametrize("mode", ["RGB", "L", "P", "CMYK", "I;16", "I", "F", "1", "LA", "RGBA"])
def test_every_pil_mode_becomes_rgb_uint8(mode):
    img = Image.new("RGB", (20, 10), (200, 100, 50)).convert(mode)
    out = images.to_rgb(img)
    assert out.shape == (10, 20, 3) and out.dtype == np.uint8


def test_transparency_is_composited_on_white():
    img = Image.new("RGBA", (4, 4), (255, 0, 0, 0))
    assert images.to_rgb(img)[0, 0].tolist() == [255, 255, 255]
    arr = np.zeros((4, 4, 4), np.uint8)
    assert images.to_rgb(arr)[0, 0].tolist() == [255, 255, 255]


def test_arrays_of_other_dtypes_are_scaled():
    assert images.to_rgb(np.full((5, 5, 3), 0.5, np.float32))[0, 0, 0] == 127
    assert images.to_rgb(np.full((5, 5), 65535, np.uint16))[0, 0].tolist() == [255, 255, 255]
    assert images.to_rgb(np.full((5, 5, 1), 3, np.uint8)).shape == (5, 5, 3)


def test_exif_rotation_is_applied():
    img = Image.new("RGB", (30, 12), (0, 0, 0))
    img.paste((255, 0, 0), (0, 0, 30, 4))  # the stored top rows: upright, the right-hand columns
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise to show upright (how phones store portrait photos)
    out = images.read_image(_png(img, "JPEG", exif=exif, quality=95))
    assert out.shape == (30, 12, 3)
    assert out[:, -2:, 0].mean() > 200 > 50 > out[:, :6, 0].mean(), "the red band must end up on the right"


def test_first_frame_of_an_animation():
    frames = [Image.new("RGB", (8, 8), c) for c in ((255, 0, 0), (0, 0, 255))]
    buf = io.BytesIO()
    frames[0].save(buf, "GIF", save_all=True, append_images=frames[1:])
    out = images.read_image(buf.getvalue())
    assert out[0, 0, 0] > 200 and out[0, 0, 2] < 50


def test_large_images_are_downscaled():
    out = images.to_rgb(np.zeros((3000, 6000, 3), np.uint8))
    assert max(out.shape[:2]) == images.MAX_SIDE and out.shape[1] / out.shape[0] == pytest.approx(2, rel=0.01)


@pytest.mark.parametrize("data, match", [
    (b"", "empty"), (b"<svg xmlns='http://www.w3.org/2000/svg'/>", "SVG"), (b"<html><body>hi</body></html>", "HTML"),
    (b"\x00\x01garbage" * 50, "Could not read"),
])
def test_bad_files_get_a_clear_message(data, match):
    with pytest.raises(ValueError, match=match):
        images.read_image(data)


def test_truncated_and_bomb_files_are_refused():
    whole = _png(Image.new("RGB", (64, 64), (1, 2, 3)), "JPEG")
    with pytest.raises(ValueError, match="damaged|truncated"):
        images.read_image(whole[: len(whole) // 2])
    bomb = _png(Image.new("1", (20000, 20000)))  # 400 MP, a few kB on disk
    with pytest.raises(ValueError, match="megapixels"):
        images.read_image(bomb)


@pytest.mark.parametrize("shape", [(1, 1, 3), (1, 500, 3), (0, 5, 3)])
def test_degenerate_sizes_are_refused(shape):
    with pytest.raises(ValueError, match="too small"):
        images.to_rgb(np.zeros(shape, np.uint8))


def test_none_and_wrong_types():
    with pytest.raises(ValueError, match="No image"):
        images.to_rgb(None)
    with pytest.raises(ValueError, match="PIL image"):
        images.to_rgb("cat.jpg")
    with pytest.raises(ValueError, match="shape"):
        images.to_rgb(np.zeros((4, 4, 5), np.uint8))
