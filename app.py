"""Where did the captioner look? A thin Gradio UI over the `captioner` package (layout and wiring only).

Everything a visitor's page holds lives in their own `gr.State`; models live in the `Models` object that
`build_demo` makes, so two demos in one process share nothing. Controls that only change the drawing (the patch
grid) redraw from the cached result and never call the model; clicking a word does the same.
"""
from __future__ import annotations

import os
from pathlib import Path

from page.serving import (mcp_tools_return_every_output, on_gpu, page_errors,  # first: it imports `spaces`
                          write_output_images_atomically)

import gradio as gr

import captioner
from captioner import images
from page import api, check, views
from page.inputs import image_input, map_arguments, setting, whole_number

EXAMPLES = sorted(str(p) for p in (Path(__file__).parent / "assets" / "examples").glob("*.*") if p.suffix != ".md")
COLOURS = {views.SELECTED: "#fde047", views.SURE: "#86efac", views.LIKELY: "#bfdbfe", views.UNSURE: "#fecaca"}


def build_demo(models: list[str] | None = None) -> gr.Blocks:
    """The page for `models` (default: `captioner.listed_models()`), the first one preselected."""
    loaded = api.Models(models or captioner.listed_models())
    write_output_images_atomically()  # visitors who get the same picture at once each get a whole file
    mcp_tools_return_every_output()  # Gradio 6.31 returns several outputs as one string, or fails on a State
    public = api.endpoints(loaded)  # /caption, /explain, /heatmap, /locate: described in their docstrings

    @page_errors
    @on_gpu
    def remap(state, grid, method, layers, head):
        """Other maps for the caption on the page: no new generation."""
        if state is None:  # nothing on the page yet: the choice applies to the next caption
            return (gr.skip(),) * 7
        cap = loaded.get(state["model"])
        return api.publish(cap, cap.remap(state["result"], **map_arguments(cap, method, layers, head)), grid,
                           state["model"], toast=False, word=state["word"])  # the same caption: the word stays

    def on_select(state, grid, evt: gr.SelectData):
        if state is None:
            raise gr.Error("Caption an image first.")
        k = min(max(int(evt.index), 0), max(len(state["result"].words) - 1, 0))
        state["word"] = k  # in place, not an output: a caption still streaming its default map reads it
        return views.word_view(state["result"], k, grid)

    def reselect(state, grid):
        """After a streamed caption: the word a click selected while it streamed. Gradio's completion message
        repeats the stream's last answer, drawn for the word selected then, and would undo a later click."""
        if state is None or not state["result"].words:
            return gr.skip(), gr.skip()
        return views.word_view(state["result"], state["word"], grid)

    def redraw(state, grid):
        """The grid checkbox: the same result drawn again, with or without the patch grid."""
        if state is None:
            return gr.skip(), gr.skip(), gr.skip(), gr.skip()
        return views.pictures(state["result"], state["word"], grid)

    def show_method_controls(method):
        return [gr.update(visible=method != "relevance")] * 2

    first = loaded.get(None)
    shared = dict(concurrency_id="model", concurrency_limit=1)  # one model call at a time
    with gr.Blocks(title="Where did the captioner look?") as demo:
        gr.Markdown("# Where did the captioner look?\nCaption an image, then **click any word** to see where the "
                    "decoder looked while writing it (cross-attention), beside where the ViT's CLS token looked.")
        state = gr.State(None, time_to_live=3600)  # a visitor's caption and maps; freed an hour after last use
        with gr.Row():
            with gr.Column(scale=2):
                image = image_input(label="Image", sources=["upload", "webcam", "clipboard"], elem_id="image")
                choices = list(loaded.paths)
                model = gr.Dropdown(choices, value=choices[0], label="Model", visible=len(choices) > 1,
                                    allow_custom_value=True)  # a model id (`model_label`) as well: api.Models
                with gr.Accordion("Generation settings", open=False):
                    max_new = setting("max_new_tokens", value=first.default_max_new_tokens, step=1,
                                      label="Max new tokens")
                    beams = setting("num_beams", value=4, step=1, label="Beams")
                    sample = gr.Checkbox(False, label="Sample instead of searching")
                    temp = setting("temperature", value=1.0, step=0.05, label="Temperature")
                    top_k = setting("top_k", value=50, step=1, label="Top-k (0 = off)")
                    top_p = setting("top_p", value=1.0, step=0.01, label="Top-p")
                    seed = whole_number("seed", "random seed, 0 to 2**32-1 (-1: random)", value=-1,
                                        label="Seed (-1 = random; used when sampling)")
                with gr.Accordion("Map method", open=True):
                    method = gr.Radio(list(captioner.METHODS), value=captioner.DEFAULT_METHOD, label="Method",
                                      info="attention: raw cross-attention · rollout: through the ViT's "
                                      "mixing · relevance: gradient-weighted (Chefer et al.)")
                    with gr.Row():
                        shown = method.value != "relevance"  # relevance weighs every layer and head itself
                        layers = gr.Textbox("all", label="Layers", info="all, -1, 0-3 or 1,4", visible=shown)
                        head = whole_number("head", "attention head (-1: mean of all heads)", value=-1, label="Head",
                                            info="-1 = mean of all heads", visible=shown)
                    grid = gr.Checkbox(False, label="Draw the ViT patch grid")
                run = gr.Button("Caption", variant="primary", elem_id="caption-btn")
                typed = gr.Textbox(label="…or explain your own caption", placeholder="a red circle left of a blue "
                                   "square", elem_id="typed")
                run_typed = gr.Button("Explain this caption", elem_id="explain-btn")
                gr.Examples(EXAMPLES, inputs=image)
            with gr.Column(scale=3):
                words = gr.HighlightedText(label="Caption: click a word", color_map=COLOURS, show_legend=True,
                                           elem_id="words")
                with gr.Row():
                    word_view = gr.Image(label="Decoder cross-attention for the word", format="png",
                                         elem_id="word-map", interactive=False)
                    cls_view = gr.Image(label="ViT CLS-token attention", format="png", elem_id="cls-map",
                                        interactive=False)
                check.panel(loaded, state, grid, image, model, [method, layers, head], shared)
                gr.Markdown("**Every word at once** (download the PNG from its corner)")
                strip = gr.Image(label="Every word at once", show_label=False, format="png", elem_id="strip",
                                 interactive=False)
                info = gr.Markdown(label="Summary", value=f"**Model** `{first.name}` on {first.device} · patch grid "
                                   f"{first.grid[0]}×{first.grid[1]}")
                with gr.Accordion("Result as JSON (what the API returns)", open=False):
                    result = gr.JSON(label="Result")
                    result.api_info = lambda: api.RESULT_SCHEMA  # typed for API clients, not "any valid json"
        # the /heatmap and /locate endpoints' own inputs and outputs, hidden from the page
        with gr.Row(visible=False):
            hm_text, hm_out = gr.Textbox(label="Caption"), gr.Image(label="Word overlay", format="png")
            hm_index = whole_number("word_index", "which word of the caption, 0 for the first", value=0,
                                    label="Word index")
            phrase, located = gr.Textbox(label="Phrase"), gr.Image(label="Phrase overlay with box", format="png")
            location = gr.JSON(label="Location")
            location.api_info = lambda: api.LOCATION_SCHEMA
            hm_btn, locate_btn = gr.Button(), gr.Button()

        outputs = [words, word_view, cls_view, strip, result, info, state]
        how = [method, layers, head]
        settings = [max_new, beams, sample, temp, top_k, top_p, seed]
        run.click(public["caption"], [image, *settings, model, grid, *how], outputs, api_name="caption", **shared) \
            .then(reselect, [state, grid], [words, word_view], api_visibility="private")
        run_typed.click(public["explain"], [image, typed, model, grid, *how], outputs, api_name="explain", **shared)
        typed.submit(public["explain"], [image, typed, model, grid, *how], outputs, api_visibility="private", **shared)
        hm_btn.click(public["heatmap"], [image, hm_text, hm_index, model, grid, *how], hm_out, api_name="heatmap",
                     **shared)
        locate_btn.click(public["locate"], [image, phrase, model, *how], [located, location], api_name="locate",
                         **shared)
        words.select(on_select, [state, grid], [words, word_view], api_visibility="private")
        grid.change(redraw, [state, grid], [words, word_view, cls_view, strip], api_visibility="private")
        method.change(show_method_controls, method, [layers, head], api_visibility="private")
        method.change(remap, [state, grid, *how], outputs, api_visibility="private", **shared)
        for control in (layers, head):  # re-map the caption on the page; never regenerate it
            control.submit(remap, [state, grid, *how], outputs, api_visibility="private", **shared)
    api.describe_components(demo)  # each input and output described for API clients
    demo.queue(max_size=32, default_concurrency_limit=1)
    return demo


if __name__ == "__main__":
    # refuse oversized uploads at the door, before Gradio writes them to disk (open_image would refuse them later)
    # the MCP server (tools at /gradio_api/mcp/) costs visitors nothing; CAPTIONER_MCP=0 turns it off
    build_demo().launch(theme=gr.themes.Soft(), max_file_size=images.MAX_FILE_BYTES,
                        mcp_server=os.environ.get("CAPTIONER_MCP", "1") != "0")
