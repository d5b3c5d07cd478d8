"""Can I trust this map? The page's faithfulness check of the selected word (`captioner.check`), the three map
methods side by side for that word, and the /check endpoint: components, handlers and the curve they draw.

`panel` builds it all inside the page's layout and wires it; `app.py` calls it once.
"""
from __future__ import annotations

import cv2
import gradio as gr
import numpy as np

from captioner import METHODS, render
from captioner.check import Check, check_word
from page.inputs import map_arguments, whole_number
from page.serving import on_gpu, page_errors

HOT, RANDOM, AXES = (220, 38, 38), (100, 116, 139), (30, 30, 30)  # RGB


def curve(c: Check, size: tuple[int, int] = (260, 480)) -> np.ndarray:
    """(H, W, 3) uint8 RGB: p(word) against the share of the patch grid hidden, hottest patches (red) and random
    ones (grey: mean, with a bar of ± one standard deviation)."""
    h, w = size
    img = np.full((h, w, 3), 255, np.uint8)
    left, right, top, bottom = 48, w - 16, 36, h - 40
    xs = [0.0, *c.fractions]

    def at(f: float, p: float) -> tuple[int, int]:
        return (round(left + f / max(xs) * (right - left)), round(bottom - p * (bottom - top)))

    font = cv2.FONT_HERSHEY_SIMPLEX
    cv2.line(img, (left, top), (left, bottom), AXES, 1)
    cv2.line(img, (left, bottom), (right, bottom), AXES, 1)
    for p in (0.0, 0.5, 1.0):
        cv2.putText(img, f"{p:.1f}", (8, at(0, p)[1] + 4), font, 0.4, AXES, 1, cv2.LINE_AA)
    for f in xs:
        x = at(f, 0)[0]
        cv2.putText(img, f"{f:.0%}", (x - 12, bottom + 16), font, 0.4, AXES, 1, cv2.LINE_AA)
    cv2.putText(img, "share of the image hidden", (left + 90, h - 6), font, 0.42, AXES, 1, cv2.LINE_AA)
    mean, std = c.random_mean, c.random_std
    random = [at(f, p) for f, p in zip(xs, [c.p, *mean])]
    for (x, _), m, s in zip(random[1:], mean, std):
        cv2.line(img, (x, at(0, min(1.0, m + s))[1]), (x, at(0, max(0.0, m - s))[1]), RANDOM, 1, cv2.LINE_AA)
    cv2.polylines(img, [np.array(random)], False, RANDOM, 2, cv2.LINE_AA)
    cv2.polylines(img, [np.array([at(f, p) for f, p in zip(xs, [c.p, *c.hottest])])], False, HOT, 2, cv2.LINE_AA)
    cv2.putText(img, f"p({c.word}): hottest hidden", (left + 8, 16), font, 0.45, HOT, 1, cv2.LINE_AA)
    cv2.putText(img, "random hidden", (left + 250, 16), font, 0.45, RANDOM, 1, cv2.LINE_AA)
    return img


def verdict_markdown(c: Check) -> str:
    """The verdict in plain words, then the figures behind it."""
    rows = "\n".join(f"| {f:.0%} ({n} patches) | {h:.2f} | {m:.2f} ± {s:.2f} |" for f, n, h, m, s in zip(
        c.fractions, c.patches, c.hottest, c.random_mean, c.random_std))
    return (f"### Verdict: {c.verdict}: '{c.word}' ({c.method} map)\n\n{c.sentence}\n\n"
            f"| hidden | p, hottest patches hidden | p, random patches hidden (mean ± sd) |\n|---|---|---|\n"
            f"| 0% | {c.p:.2f} | {c.p:.2f} |\n{rows}\n\nHidden patches are filled with the model's mean colour "
            f"{tuple(c.fill)}; {len(c.random[0])} random draws per row, seed {c.seed}.")


def side_by_side(cap, res, k: int, grid: bool) -> list[tuple[np.ndarray, str]]:
    """Word k's overlay by each map method the model offers, from the caption as it is (`remap`: no new caption)."""
    shown = []
    for method in METHODS:
        try:
            other = res if res.method == method and res.layers is None and res.head is None else cap.remap(
                res, method=method)
        except ValueError:  # a method this model cannot compute (int8, windowed encoders)
            continue
        title = f"{method}: '{other.words[k]}'"
        shown.append((render.titled_overlay(other.image, other.word_maps[k], title, grid, other.view), method))
    return shown


def panel(loaded, state, grid, image, model, how, shared: dict) -> None:
    """The check and the side-by-side methods for the selected word, and the /check endpoint, built where it is
    called inside the page's layout. loaded: the page's `Models`; how: its method, layers and head controls."""

    def chosen(state):
        if state is None or not state["result"].words:
            raise gr.Error("Caption an image first, then click a word.")
        return loaded.get(state["model"]), state["result"], state["word"]

    @page_errors
    @on_gpu
    def check_map(state):
        c = check_word(*chosen(state))
        return verdict_markdown(c), curve(c)

    @page_errors
    @on_gpu
    def compare_methods(state, grid):
        cap, res, k = chosen(state)
        return side_by_side(cap, res, k, grid)

    @page_errors
    @on_gpu
    def check(image: np.ndarray, text: str, word_index: int = 0, model: str | None = None,
              method: str | None = None, layers: str = "all", head: int = -1):
        """Can I trust this map? Hide the image where one word's map is hottest (10, 25 and 50 % of the patch
        grid) and, for comparison, as many random patches (seeded draws), and recompute the word's probability
        under the same caption in one batched forced pass: about the cost of one caption.

        Args:
            image: the picture (a URL or an uploaded file).
            text: the caption the word belongs to.
            word_index: which word, 0 for the first.
            model: model id or label (empty: the page's default).
            method: attention, rollout or relevance (the default).
            layers: layers that attention and rollout average: all, -1, 0-3 or 1,4.
            head: attention head that attention and rollout show (-1: mean of all heads).
        Returns:
            the check as JSON: verdict ("faithful", "not faithful" or "inconclusive"), the sentence, p, and per
            hidden fraction p with the hottest and with random patches hidden (docs/api.md)
        """
        cap = loaded.get(model)
        res = cap.explain(image, text, **map_arguments(cap, method, layers, head))
        if not 0 <= int(word_index) < len(res.words):
            raise ValueError(f"word_index must be between 0 and {len(res.words) - 1} for a {len(res.words)}-word "
                             "caption.")
        return check_word(cap, res, int(word_index)).to_json()

    with gr.Accordion("Can I trust this map?", open=True):
        gr.Markdown("Hide the image where the selected word's map is hottest and see whether the word's "
                    "probability falls further than when as much of the image is hidden at random.")
        with gr.Row():
            run_check = gr.Button("Check this word's map", elem_id="check-btn")
            run_compare = gr.Button("Methods side by side", elem_id="compare-btn")
        verdict = gr.Markdown(elem_id="check-verdict")
        plot = gr.Image(label="Word probability as the image is hidden", show_label=False, format="png",
                        elem_id="check-curve", interactive=False)
        methods = gr.Gallery(label="The selected word by each method", columns=3, rows=1, format="png",
                             elem_id="methods", interactive=False)
    with gr.Row(visible=False):  # the /check endpoint's own inputs and output
        text, out, button = gr.Textbox(label="Caption"), gr.JSON(label="Check"), gr.Button()
        index = whole_number("word_index", "which word of the caption, 0 for the first", value=0, label="Word index")
    run_check.click(check_map, state, [verdict, plot], api_visibility="private", **shared)
    run_compare.click(compare_methods, [state, grid], methods, api_visibility="private", **shared)
    button.click(check, [image, text, index, model, *how], out, api_name="check", **shared)
