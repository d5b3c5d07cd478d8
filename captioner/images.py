"""Turning whatever a visitor sends into an `(H, W, 3) uint8 RGB` array, or a clear `ValueError`.

Handles PIL images of every mode (RGBA/LA/P composited on white, 16-bit and float scaled, CMYK converted),
arrays of any dtype, files and bytes (first frame of animations, EXIF orientation applied), and refuses
decompression bombs from the header, before any pixel is decoded, files too big to read, and strips too thin to
describe.
"""
from __future__ import annotations

import io
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

MAX_PIXELS = 40_000_000  # refuse larger images before decoding them (a 40 MP photo is ~120 MB as RGB)
MAX_SIDE = 2048  # downscale larger images before anything else touches them; maps still align
MIN_SIDE = 2  # a 1-pixel-wide image has no shape to describe
MAX_ASPECT = 20  # longer side / shorter side; wider than phone panoramas. A thin strip is enlarged for display
# (render.display_image) until its short side is 384 px: a 2x2048 strip became a 384x393216 overlay (0.5 GB, 11 s)
MAX_FILE_BYTES = 50_000_000  # phone and camera photos are 2-15 MB; never read gigabytes into memory


def _to_uint8(arr: np.ndarray) -> np.ndarray:
    """Scale any numeric array to 0..255: floats are taken as 0..1 (or 0..255 if larger), ints by their range."""
    if arr.dtype == np.uint8:
        return arr
    if arr.dtype == bool:
        return arr.astype(np.uint8) * 255
    if np.issubdtype(arr.dtype, np.floating):
        arr = np.nan_to_num(arr.astype(np.float32), nan=0.0, posinf=1.0, neginf=0.0)
        scale = 255.0 if arr.max(initial=0.0) <= 1.0 else 1.0
        return np.clip(arr * scale, 0, 255).astype(np.uint8)
    if np.issubdtype(arr.dtype, np.integer):
        top = 65535 if arr.max(initial=0) > 255 else 255
        return np.clip(arr.astype(np.float64) * (255.0 / top), 0, 255).astype(np.uint8)
    raise ValueError(f"Unsupported pixel type {arr.dtype}; send an 8-bit or 16-bit RGB image.")


def _from_pil(img: Image.Image) -> np.ndarray:
    if getattr(img, "n_frames", 1) > 1:
        img.seek(0)  # animated GIF/WebP/PNG: describe the first frame
    img = ImageOps.exif_transpose(img) or img  # phones store photos sideways plus an orientation tag
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return np.asarray(Image.alpha_composite(white, rgba).convert("RGB"))
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        return to_rgb(np.asarray(img))
    return np.asarray(img.convert("RGB"))


def to_rgb(image) -> np.ndarray:
    """Any PIL image or array -> (H, W, 3) uint8 RGB, downscaled so its longer side is at most MAX_SIDE."""
    if isinstance(image, Image.Image):
        arr = _from_pil(image)
    elif isinstance(image, np.ndarray):
        arr = image
        if arr.ndim == 3 and arr.shape[2] == 1:
            arr = arr[..., 0]
        if arr.ndim == 2:
            arr = np.stack([arr] * 3, axis=-1)  # grayscale (H, W) -> (H, W, 3)
        if arr.ndim != 3 or arr.shape[2] not in (3, 4):
            raise ValueError(f"Expected an (H, W, 3) RGB image, got an array of shape {arr.shape}.")
        if arr.shape[2] == 4:  # RGBA array: composite on white like PIL images
            rgb, alpha = _to_uint8(arr[..., :3]).astype(np.float32), _to_uint8(arr[..., 3:]).astype(np.float32)
            arr = (rgb * alpha / 255 + 255 * (1 - alpha / 255)).round().astype(np.uint8)
        arr = _to_uint8(arr)
    elif image is None:
        raise ValueError("No image given: upload a photo (JPEG, PNG, WebP, GIF, BMP or TIFF) first.")
    else:
        raise ValueError(f"Expected a PIL image or an (H, W, 3) uint8 array, got {type(image).__name__}.")
    h, w = arr.shape[:2]
    if min(h, w) < MIN_SIDE:
        raise ValueError(f"The image is {w}x{h} pixels: too small to describe. Send one at least "
                         f"{MIN_SIDE} pixels on each side.")
    if h * w > MAX_PIXELS:
        raise ValueError(f"The image is {w}x{h} pixels; the limit is {MAX_PIXELS // 1_000_000} megapixels.")
    if max(h, w) > MAX_ASPECT * min(h, w):
        raise ValueError(f"The image is {w}x{h} pixels: a strip too thin to describe. Crop it to a shape no "
                         f"longer than {MAX_ASPECT}:1.")
    if max(h, w) > MAX_SIDE:
        scale = MAX_SIDE / max(h, w)
        size = (max(1, round(w * scale)), max(1, round(h * scale)))
        arr = np.asarray(Image.fromarray(arr).resize(size, Image.Resampling.LANCZOS))
    return np.ascontiguousarray(arr)


def read_image(source: str | Path | bytes) -> np.ndarray:
    """Decode an image file or its bytes -> (H, W, 3) uint8 RGB, with a message a person understands on failure."""
    return to_rgb(open_image(source))


def open_image(source: str | Path | bytes) -> Image.Image:
    """Decode an image file or its bytes -> a loaded PIL image, refused (ValueError saying why) before decoding when
    it is too large, not an image, or damaged. `to_rgb` makes it the (H, W, 3) uint8 RGB the library reads; a
    caller that hands it to `Captioner` leaves that to the captioner, so it is converted once."""
    if isinstance(source, bytes):
        data = source
    else:
        with open(source, "rb") as f:  # at most one byte past the limit, whatever size the file (or device) claims
            data = f.read(MAX_FILE_BYTES + 1)
    if len(data) > MAX_FILE_BYTES:
        raise ValueError(f"The file is larger than {MAX_FILE_BYTES // 1_000_000} MB. Send a smaller photo (a JPEG "
                         "from a phone is 2-15 MB).")
    if not data:
        raise ValueError("The file is empty: upload a photo (JPEG, PNG, WebP, GIF, BMP or TIFF).")
    head = data[:512].lstrip().lower()
    if head.startswith((b"<svg", b"<?xml", b"<!doctype", b"<html")):
        raise ValueError("That is an SVG/HTML/XML text file, not a photo: export it as PNG or JPEG first.")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            w, h = img.size
            if w * h > MAX_PIXELS:
                raise ValueError(f"The image claims {w}x{h} pixels; the limit is "
                                 f"{MAX_PIXELS // 1_000_000} megapixels. Send a smaller version.")
            img.load()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ValueError(f"The image is too large to decode safely (limit {MAX_PIXELS // 1_000_000} "
                         "megapixels). Send a smaller version.") from None
    except UnidentifiedImageError:
        raise ValueError("Could not read this file as an image: upload a JPEG, PNG, WebP, GIF, BMP or TIFF.") \
            from None
    except (OSError, SyntaxError) as e:  # truncated or corrupt data
        raise ValueError(f"The image file is damaged or truncated ({e}). Re-save or re-export it and try again.") \
            from None
    return img
