"""The public endpoints (/caption, /explain, /heatmap, /locate) as functions whose docstrings and type hints
describe them to API clients (`view_api()`) and to MCP clients (one tool each), the models behind them, and the
schema of the JSON they return (docs/api.md spells it out)."""
from __future__ import annotations

import functools

import gradio as gr
from gradio import utils as gradio_utils
import numpy as np

import captioner
from captioner import locate as locating
from captioner import render
from page import views
from page.inputs import map_arguments
from page.serving import on_gpu, page_errors, refusal

API_VERSION = 1  # the result JSON's "version": raised when a field changes meaning or goes away

_MAP = {"type": "array", "items": {"type": "array", "items": {"type": "number", "minimum": 0, "maximum": 1}},
        "description": "gh rows of gw values in [0, 1]"}
RESULT_SCHEMA = {
    "type": "object", "description": "the caption, every word's map and what made them (docs/api.md)",
    "properties": {
        "version": {"type": "integer"}, "caption": {"type": "string"},
        "words": {"type": "array", "items": {"type": "string"}},
        "word_maps": {"type": "array", "items": _MAP, "description": "one gh x gw map per word"},
        "cls_map": _MAP, "word_probs": {"type": "array", "items": {"type": "number", "minimum": 0, "maximum": 1}},
        "grid": {"type": "array", "items": {"type": "integer"}, "description": "[gh, gw]"},
        "image_size": {"type": "array", "items": {"type": "integer"}, "description": "[H, W] pixels"},
        "view": {"type": "array", "items": {"type": "number"}, "description": "[x0, y0, x1, y1] fractions"},
        "model": {"type": "string", "description": "model id, accepted as the model input"},
        "method": {"type": "string"}, "notes": {"type": "array", "items": {"type": "string"}},
    },
}
LOCATION_SCHEMA = {
    "type": "object", "description": "where the model would look for the phrase (docs/api.md)",
    "properties": {
        "version": {"type": "integer"}, "phrase": {"type": "string"},
        "box": {"type": "array", "items": {"type": "integer"}, "description": "[x0, y0, x1, y1] image pixels"},
        "score": {"type": "number", "minimum": 0, "maximum": 1, "description": "share of the map inside the box"},
        "words": {"type": "array", "items": {"type": "string"}, "description": "the words whose maps were averaged"},
        "cells": {"type": "array", "items": {"type": "integer"}, "description": "[r0, c0, r1, c1] on the grid"},
        "map": _MAP, "grid": {"type": "array", "items": {"type": "integer"}},
        "image_size": {"type": "array", "items": {"type": "integer"}, "description": "[H, W] pixels"},
        "model": {"type": "string"}, "method": {"type": "string"},
        "notes": {"type": "array", "items": {"type": "string"}},
    },
}


def _label(path: str) -> str:
    return captioner.model_label(path) + (" (offline)" if path == captioner.BUNDLED_MODEL else "")


class Models:
    """Model names -> models, loaded on first use, at most two in memory; the page and the API never see paths.
    A model is named by its dropdown label or by its id (`captioner.model_label`: the hub id, the folder's name,
    "bundled scene captioner"), which is what results call it."""

    def __init__(self, models: list[str]):
        self.paths = {_label(m): m for m in models}  # the dropdown's labels, in order
        self.ids = {captioner.model_label(m): m for m in models}
        self.default = _label(models[0])
        self.load = functools.lru_cache(maxsize=2)(captioner.load)

    def get(self, name: str | None) -> captioner.Captioner:
        path = self.paths.get(name or self.default) or self.ids.get(name)
        if path is None:
            raise refusal(f"Unknown model {name!r}; available: {', '.join(self.ids)}.")
        return self.load(path)


def result_json(res: captioner.CaptionResult) -> dict:
    return {"version": API_VERSION, **res.to_json()}


def publish(cap: captioner.Captioner, res: captioner.CaptionResult, grid: bool, model: str | None,
            toast: bool = True, word: int = 0):
    """Everything a caption shows, word `word` selected; the state keeps the (display-sized) result, its model and
    the selected word. toast: the result's notes also pop up (not again when only the maps of the same caption
    change)."""
    res = views.for_page(res, cap)
    for note in res.notes if toast else ():  # also at the top of the summary; a toast is hard to miss
        gr.Warning(note)
    return (*views.pictures(res, word, grid), result_json(res), views.summary(res, cap.device),
            {"result": res, "model": model, "word": word})


def endpoints(loaded: Models) -> dict:
    """The public endpoint functions over `loaded`, by endpoint name."""

    @page_errors
    @on_gpu
    def caption(image: np.ndarray, max_new_tokens: int | None = None, num_beams: int = 4, do_sample: bool = False,
                temperature: float = 1.0, top_k: int = 50, top_p: float = 1.0, seed: int = -1,
                model: str | None = None, grid: bool = False, method: str | None = None, layers: str = "all",
                head: int = -1):
        """Caption an image and map every word: where the decoder looked while writing it. One generation (beam
        search by default) plus one map per word: about a second on a CPU for the scene model, a few for photos.
        The page first shows the caption with its attention maps, then the chosen method's; an API call returns
        the final answer (method="attention" is the fast one).

        Args:
            image: the picture (a URL or an uploaded file).
            max_new_tokens: longest caption in tokens, 1-64 (empty: the model's default).
            num_beams: beam width, 1-8 (1: greedy).
            do_sample: sample instead of searching.
            temperature: sampling temperature, 0.05-5.
            top_k: sample among the k likeliest tokens, 0-1000 (0: off).
            top_p: sample among the likeliest tokens of this total probability, 0.01-1.
            seed: random seed for sampling, 0 to 2**32-1 (-1: random).
            model: model id or label (empty: the page's default).
            grid: draw the ViT patch grid on the pictures.
            method: attention, rollout or relevance (the default).
            layers: layers that attention and rollout average: all, -1, 0-3 or 1,4.
            head: attention head that attention and rollout show (-1: mean of all heads).
        Returns:
            the words with their confidence labels
            the first word's overlay, the CLS overlay and every word's overlay in one picture (PNGs)
            the result JSON with caption, words, word_maps and word_probs (schema in docs/api.md)
            a Markdown summary
        """
        cap = loaded.get(model)
        settings = captioner.GenerationSettings(max_new_tokens, num_beams, do_sample, temperature, top_k, top_p,
                                                None if seed is None or seed < 0 else seed)
        # the caption with its attention maps as soon as decoding ends, then the chosen method's maps
        shown = None  # the page's state from the first answer on: the page's word click sets its word in place
        for res in cap.caption_stream(image, settings, **map_arguments(cap, method, layers, head)):
            first = shown is None
            word = 0 if first else shown["word"]
            *pictures, state = publish(cap, res, grid, model, toast=first, word=word)
            if not first:  # the default map goes into the same state, so that no click is lost
                if shown["word"] != word:  # clicked while these were drawn
                    pictures[:2] = views.word_view(state["result"], shown["word"], grid)
                shown["result"] = state["result"]
                state = shown
            shown = state
            yield *pictures, state

    @page_errors
    @on_gpu
    def explain(image: np.ndarray, text: str, model: str | None = None, grid: bool = False, method: str | None = None,
                layers: str = "all", head: int = -1):
        """Explain a caption you give for an image: each word's map and probability under the model (one forced
        pass, no generation: cheaper than /caption).

        Args:
            image: the picture (a URL or an uploaded file).
            text: the caption to explain, e.g. "a large green star".
            model: model id or label (empty: the page's default).
            grid: draw the ViT patch grid on the pictures.
            method: attention, rollout or relevance (the default).
            layers: layers that attention and rollout average: all, -1, 0-3 or 1,4.
            head: attention head that attention and rollout show (-1: mean of all heads).
        Returns:
            the same six outputs as /caption, for the given caption.
        """
        cap = loaded.get(model)
        return publish(cap, cap.explain(image, text, **map_arguments(cap, method, layers, head)), grid, model)

    @page_errors
    @on_gpu
    def heatmap(image: np.ndarray, text: str, word_index: int = 0, model: str | None = None, grid: bool = False,
                method: str | None = None, layers: str = "all", head: int = -1):
        """The overlay picture of one word of a caption you give: where the model looked for it (one forced pass,
        like /explain).

        Args:
            image: the picture (a URL or an uploaded file).
            text: the caption the word belongs to.
            word_index: which word, 0 for the first.
            model: model id or label (empty: the page's default).
            grid: draw the ViT patch grid on the picture.
            method: attention, rollout or relevance (the default).
            layers: layers that attention and rollout average: all, -1, 0-3 or 1,4.
            head: attention head that attention and rollout show (-1: mean of all heads).
        Returns:
            a PNG: the image with word word_index's map blended in, a colour scale and the word under it.
        """
        cap = loaded.get(model)
        res = cap.explain(image, text, **map_arguments(cap, method, layers, head))
        if not 0 <= int(word_index) < len(res.words):
            raise ValueError(f"word_index must be between 0 and {len(res.words) - 1} for a {len(res.words)}-word "
                             "caption.")
        return views.word_view(res, int(word_index), grid)[1]

    @page_errors
    @on_gpu
    def locate(image: np.ndarray, phrase: str, model: str | None = None, method: str | None = None,
               layers: str = "all", head: int = -1):
        """Where the model would look for a phrase in an image: the phrase's map (the mean of its words' maps
        when it is read as a caption), the box around its hottest region in image pixels, and how concentrated the
        map is. One forced pass, like /explain.

        Args:
            image: the picture (a URL or an uploaded file).
            phrase: one or more words to look for, e.g. "green star".
            model: model id or label (empty: the page's default).
            method: attention, rollout or relevance (the default).
            layers: layers that attention and rollout average: all, -1, 0-3 or 1,4.
            head: attention head that attention and rollout show (-1: mean of all heads).
        Returns:
            a PNG of the phrase's map with the box drawn
            the location JSON with box [x0, y0, x1, y1] in image pixels (ends exclusive)
            its score in [0, 1] (the share of the map inside the box) and its map, grid, model and method
        """
        cap = loaded.get(model)
        where, res = locating.locate(cap, image, phrase, **map_arguments(cap, method, layers, head))
        shown = views.for_page(res, cap)
        scale = shown.image.shape[1] / res.image.shape[1]  # the page draws on the image brought down to 1024 px
        title = f"'{phrase}' score {where.score:.2f}"
        picture = render.boxed_overlay(shown.image, where.map, tuple(round(v * scale) for v in where.box), title,
                                       res.view)
        return picture, {"version": API_VERSION, **where.to_json(), "model": res.model, "method": res.method,
                         "image_size": list(res.image_size), "notes": shown.notes}

    return {"caption": caption, "explain": explain, "heatmap": heatmap, "locate": locate}


OUTPUTS = {  # output label -> what API clients are told it is
    "Caption: click a word": "the caption's words, each labelled with its confidence (the first one 'selected')",
    "Decoder cross-attention for the word": "PNG: the first word's map over the image, with a colour scale",
    "ViT CLS-token attention": "PNG: where the encoder's CLS token looked",
    "Every word at once": "PNG: every word's map, one tile per word",
    "Summary": "Markdown: notes, word probabilities, model, device, method and timings",
    "Word overlay": "PNG: the word's map over the image, with a colour scale and the word",
    "Phrase overlay with box": "PNG: the phrase's map over the image with its box drawn, and the score",
    "Check": "the map check of the word: verdict, sentence, p, and p per hidden fraction, hottest and random",
}


def _described(component, text: str, as_input: bool) -> None:
    """Put `text` in the component's API type info, where `view_api()` shows it: JavaScript's as "description",
    Python's as "additional_description" for an input (after Gradio's own, e.g. an image's "A local filepath or
    publicly available URL.") and as "description" for an output."""
    def info(original):
        got = original()
        if got.get("description") == text:  # api_info_as_input calls api_info, described already
            return got
        extra = {"additional_description": f"{text.rstrip('.')}. {got.get('additional_description', '')}".strip()} \
            if as_input else {}
        return {**got, "description": text, **extra}

    for name in ("api_info", "api_info_as_input", "api_info_as_output"):
        original = getattr(component, name, None)
        if original is not None:
            setattr(component, name, lambda original=original: info(original))


def describe_components(demo: gr.Blocks) -> None:
    """Describe every input and output of the public endpoints for API clients: inputs from their function's
    docstring (its Args, which the MCP tools show too), outputs from OUTPUTS. An input shared by several endpoints
    keeps the first description."""
    done = set()
    for block_fn in demo.fns.values():
        if block_fn.api_visibility != "public" or block_fn.fn is None:
            continue
        _, params, _ = gradio_utils.get_function_description(block_fn.fn)
        for component, text in zip(block_fn.inputs, params.values()):
            if component._id not in done and text:
                _described(component, text, as_input=True)
                done.add(component._id)
        for component in block_fn.outputs:
            if getattr(component, "label", None) in OUTPUTS and component._id not in done:
                _described(component, OUTPUTS[component.label], as_input=False)
                done.add(component._id)
