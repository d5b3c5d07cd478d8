"""What a page shows for a `CaptionResult`, drawn from the result alone (no model call): the caption's words
labelled by confidence, a word's overlay, the CLS overlay, the per-word strip, a summary line, and the library's
notes in the page's words. numpy, OpenCV and the library only: `app.py` wires these to Gradio."""
from __future__ import annotations

import dataclasses

from captioner import CaptionResult, Captioner, render
from captioner.pipeline import SCENES_ONLY, photo_advice

SELECTED, SURE, LIKELY, UNSURE = "selected", "sure (≥ 90%)", "likely (50–90%)", "unsure (< 50%)"


def confidence(p: float) -> str:
    return SURE if p >= 0.9 else LIKELY if p >= 0.5 else UNSURE


def labelled_words(res: CaptionResult, selected: int | None) -> list[tuple[str, str]]:
    """(word, label) for each word: SELECTED for word `selected`, else its confidence."""
    return [(w, SELECTED if k == selected else confidence(p)) for k, (w, p) in enumerate(zip(res.words,
                                                                                               res.word_probs))]


def word_view(res: CaptionResult, k: int, grid: bool):
    """(labelled words with word k selected, word k's titled overlay or None for an empty caption)."""
    if not res.words:
        return labelled_words(res, None), None
    title = f"'{res.words[k]}'  p={res.word_probs[k]:.2f}"
    return labelled_words(res, k), render.titled_overlay(res.image, res.word_maps[k], title, grid, res.view)


def pictures(res: CaptionResult, k: int, grid: bool):
    """(labelled words, word k's overlay, CLS overlay, per-word strip)."""
    words, overlay = word_view(res, k, grid)
    title = f"ViT CLS token ({res.method})" if res.cls_map.any() else "no CLS map for this encoder"
    cls = render.titled_overlay(res.image, res.cls_map, title, grid, res.view)
    return words, overlay, cls, render.word_strip(res.image, res.words, res.word_maps, grid=grid, view=res.view)


def worded(note: str, cap: Captioner) -> str:
    """A library note as the page says it: a photo given to the scene model names the Model menu entry to choose
    instead of the model to load."""
    if not (cap.photo_model and note.startswith(SCENES_ONLY)):
        return note
    return note.replace(photo_advice(cap.photo_model), f"For photos, choose {cap.photo_model} in the Model menu (on "
                        "the Space, or wherever the hub is reachable).")


def for_page(res: CaptionResult, cap: Captioner) -> CaptionResult:
    """The result as a visitor's page holds it: its image at most PAGE_MAX_SIDE px (2.4 MB at 1024x768; a 2048 px
    photo would be 9 MB a visitor for an hour) and its notes in the page's words."""
    return dataclasses.replace(res, image=render.shrink(res.image), notes=[worded(n, cap) for n in res.notes])


def summary(res: CaptionResult, device) -> str:
    """Markdown: notes first (a photo given to the scene model, unknown words: what must not be missed), then word
    probabilities, model, device, method, grid and timings."""
    probs = " · ".join(f"{w} {p:.0%}" for w, p in zip(res.words, res.word_probs))
    timings = " · ".join(f"{k} {v * 1000:.0f} ms" for k, v in res.seconds.items())
    notes = "".join(f"⚠️ **{n}**\n\n" for n in res.notes)
    return f"{notes}**Word probabilities** {probs}\n\n**Model** `{res.model}` on {device} · maps: {res.method} · " \
        f"grid {res.grid[0]}×{res.grid[1]} · {timings}"

