"""Gradio inputs that validate the way the captioner does, so page and API callers get the library's messages.

Gradio's own input checks are replaced per instance. (A subclass would do the same, but Gradio writes a .pyi stub
beside any module that defines a component class.)
"""
from __future__ import annotations

import functools
import os
import threading
from pathlib import Path

try:  # ZeroGPU Spaces: `spaces` must be imported before anything starts CUDA, so this module comes first in app.py
    import spaces
except ImportError:
    spaces = None

import gradio as gr
from gradio import processing_utils

from captioner.decoding import LIMITS
from captioner.images import read_image


def image_input(**kwargs) -> gr.Image:
    """An image upload decoded by `captioner.images.read_image` instead of Gradio, so the app sees what the library
    sees: transparent pixels on white (Gradio's RGB conversion turns them black), GIFs in colour (Gradio hands
    over their palette indices), bombs refused from the header, and a message a visitor understands for a file
    that is not an image (Gradio's names its internals, or says only "Error" when show_error is off)."""
    image = gr.Image(type="numpy", **kwargs)
    gradio_preprocess = image.preprocess

    def preprocess(payload):
        if payload is None or payload.path is None:  # no image, or a data: URL: Gradio's own decoding
            return gradio_preprocess(payload)
        try:
            return read_image(payload.path)  # (H, W, 3) uint8 RGB
        except ValueError as e:
            raise gr.Error(str(e)) from None

    image.preprocess = preprocess
    return image


def setting(param: str, **kwargs) -> gr.Slider:
    """A slider over LIMITS[param] whose out-of-range message names the API parameter; Gradio's own check says
    only "Value 10000 is greater than maximum value 8", which leaves an API caller guessing which one."""
    lo, hi = LIMITS[param]
    slider = gr.Slider(lo, hi, **kwargs)
    gradio_preprocess = slider.preprocess

    def preprocess(payload):
        try:
            return gradio_preprocess(payload)
        except (gr.Error, TypeError, ValueError):  # out of range, or not a number at all (None, "4")
            raise gr.Error(f"{param} must be between {lo} and {hi}, got {payload!r}.") from None

    slider.preprocess = preprocess
    return slider


def whole_number(param: str, **kwargs) -> gr.Number:
    """An integer field whose refusal of NaN, infinity or text from an API caller names the parameter. Gradio's
    says "Could not preprocess input component at index 12", and on a Space (show_error off) nothing at all."""
    number = gr.Number(precision=0, **kwargs)
    gradio_preprocess = number.preprocess

    def preprocess(payload):
        try:
            return gradio_preprocess(payload)
        except (TypeError, ValueError, OverflowError):
            raise gr.Error(f"{param} must be a whole number, got {payload!r}.") from None

    number.preprocess = preprocess
    return number


def page_errors(fn):
    """ValueError/RuntimeError from the library become messages on the page and AppErrors for API clients."""
    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (ValueError, RuntimeError) as e:
            raise gr.Error(str(e)) from None
    return wrapped


def on_gpu(fn):
    """On a ZeroGPU Space (the `spaces` package importable), run `fn` under `spaces.GPU`, which lends it a GPU for
    the call; elsewhere `fn` unchanged."""
    return fn if spaces is None else spaces.GPU(fn)


def write_output_images_atomically() -> None:
    """Make Gradio's output-image cache safe for visitors who get the same picture at the same time.

    Gradio 6 stores each output image under a hash of its bytes and rewrites that file in place on every save. When
    two visitors get identical images at once (the same example, say), one visitor's download can be read while the
    other's save has just truncated the file: a broken image ("Too little data for declared Content-Length").
    Here an image whose file exists is not written again (its name is its content), and a new one is written to a
    temporary file and renamed into place, so a reader always sees a whole file. Idempotent.
    """
    if getattr(processing_utils.save_pil_to_cache, "atomic", False):
        return

    def save_pil_to_cache(img, cache_dir: str, name: str = "image", format: str = "webp") -> str:
        data = processing_utils.encode_pil_to_bytes(img, format)
        folder = Path(cache_dir) / processing_utils.hash_bytes(data)
        folder.mkdir(exist_ok=True, parents=True)
        path = (folder / f"{name}.{format}").resolve()
        if not path.exists():
            tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
            tmp.write_bytes(data)
            os.replace(tmp, path)
        return str(path)

    save_pil_to_cache.atomic = True
    processing_utils.save_pil_to_cache = save_pil_to_cache
