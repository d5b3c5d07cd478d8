"""The page's inputs: Gradio components that validate the way the captioner does, so page and API callers get the
library's messages, and the map controls (method, Layers box, head) read into library arguments.

Gradio's own input checks are replaced per instance. (A subclass would do the same, but Gradio writes a .pyi stub
beside any module that defines a component class.)
"""
from __future__ import annotations

import math

import gradio as gr

from captioner import DEFAULT_METHOD, Captioner
from captioner.decoding import LIMITS
from captioner.images import open_image
from page.serving import refusal


def image_input(**kwargs) -> gr.Image:
    """An image upload decoded by `captioner.images.open_image` instead of Gradio, so the app sees what the library
    sees: transparent pixels on white (Gradio's RGB conversion turns them black), GIFs in colour (Gradio hands
    over their palette indices), bombs refused from the header, and a message a visitor understands for a file
    that is not an image (Gradio's names its internals, or says only "Error" when show_error is off). Handlers get
    the decoded PIL image, which the captioner converts to RGB (once)."""
    image = gr.Image(type="numpy", **kwargs)
    gradio_preprocess = image.preprocess

    def preprocess(payload):
        if payload is None or payload.path is None:  # no image, or a data: URL: Gradio's own decoding
            return gradio_preprocess(payload)
        try:
            return open_image(payload.path)
        except ValueError as e:
            raise refusal(str(e)) from None

    image.preprocess = preprocess
    return image


def setting(param: str, **kwargs) -> gr.Slider:
    """A slider over LIMITS[param] whose out-of-range message names the API parameter; Gradio's own check says
    only "Value 10000 is greater than maximum value 8", which leaves an API caller guessing which one."""
    lo, hi = LIMITS[param]
    if isinstance(kwargs.get("step"), int):  # whole numbers: typed "integer" in the API, handed over as int
        kwargs.setdefault("precision", 0)
    slider = gr.Slider(lo, hi, **kwargs)
    gradio_preprocess = slider.preprocess

    whole = kwargs.get("precision") == 0

    def preprocess(payload):
        # Gradio rounds a whole-number slider's 2.5 to 2 without a word: refuse it, as the library would
        if whole and isinstance(payload, float) and math.isfinite(payload) and not payload.is_integer():
            raise refusal(f"{param} must be a whole number, got {payload}.")
        try:
            return gradio_preprocess(payload)
        except (gr.Error, TypeError, ValueError):  # out of range, or not a number at all (None, "4")
            raise refusal(f"{param} must be between {lo} and {hi}, got {payload!r}.") from None

    slider.preprocess = preprocess
    return slider


def whole_number(param: str, description: str = "a whole number", **kwargs) -> gr.Number:
    """An integer field whose refusal of NaN, infinity or text from an API caller names the parameter. Gradio's
    says "Could not preprocess input component at index 12", and on a Space (show_error off) nothing at all.
    Typed "integer" in the API, with `description` (its range and meaning) beside it."""
    number = gr.Number(precision=0, **kwargs)
    gradio_preprocess = number.preprocess
    number.api_info = lambda: {"type": "integer", "description": description}

    def preprocess(payload):
        try:
            return gradio_preprocess(payload)
        except (TypeError, ValueError, OverflowError):
            raise refusal(f"{param} must be a whole number, got {payload!r}.") from None

    number.preprocess = preprocess
    return number


MAX_LAYERS = 1000


def parse_layers(spec: str | None) -> list[int] | None:
    """A person's layer choice -> indices: "all"/"" -> None (the default), "-1" -> [-1], "0-3" -> [0, 1, 2, 3],
    "1,4" -> [1, 4]. Raises ValueError with an example on anything else."""
    spec = (spec or "").strip().lower()
    if spec in ("", "all", "mean"):
        return None
    layers: list[int] = []
    try:
        for part in spec.split(","):
            lo, sep, hi = part.strip().partition("-") if not part.strip().startswith("-") else (part.strip(), "", "")
            bounds = (int(lo), int(hi)) if sep else (int(lo), int(lo))
            if max(map(abs, bounds)) > MAX_LAYERS:  # before building the range: "0-400000000" is 16 GB
                raise ValueError(f"layers {spec!r}: no model here has more than {MAX_LAYERS} layers.")
            layers += list(range(bounds[0], bounds[1] + 1))
    except ValueError:
        raise ValueError(f"layers must look like 'all', '-1', '0-3' or '1,4'; got {spec!r}.") from None
    if not layers:
        raise ValueError(f"layers {spec!r} selects no layer; use e.g. '0-3'.")
    return layers


def map_arguments(cap: Captioner, method: str | None, layers: str | None, head: int | None) -> dict:
    """The page's map controls as library arguments, checked. The page's preselected method (DEFAULT_METHOD)
    stands for the model's own default (attention for a Swin encoder or an int8 model, which cannot compute
    relevance); layers and head, hidden on the page for relevance (it weighs every layer and head itself), are
    dropped there."""
    method = cap.resolve_method(None if method in (None, "", DEFAULT_METHOD) else method)
    how = dict(method=method, layers=parse_layers(layers), head=None if head is None or head < 0 else int(head))
    return dict(method=method) if method == "relevance" else how
