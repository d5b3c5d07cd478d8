"""Every limit the docs state (docs/robustness.md) (and the ones the code adds at the edge), at its own threshold: the value at the limit
is accepted, one step outside is refused with a message naming the limit. Where a real-size input would be heavy
(a 40 MP image, a 500-character caption that the tiny model could not tokenise within its 39 positions) the
constant is made smaller and the real comparison still runs; the real constant is pinned beside it."""
from __future__ import annotations

import io
import re
import threading
import time

import numpy as np
import pytest
from gradio_client import Client, handle_file
from gradio_client.exceptions import AppError
from PIL import Image

from captioner import images, pipeline, render
from captioner.decoding import LIMITS, GenerationSettings
from conftest import CAPTIONS, image_for
from page.inputs import parse_layers
from servers import launch

RESULT = 4  # /caption returns (words, word overlay, CLS overlay, strip, result JSON, info)
# docs/robustness.md (the limits): beams 1-8, max new tokens 1-64, temperature 0.05-5, top-k 0-1000,
# top-p 0.01-1; the seed is any 32-bit value. Each with the step of its control on the page.
README_LIMITS = {"max_new_tokens": (1, 64, 1), "num_beams": (1, 8, 1), "temperature": (0.05, 5.0, 0.05),
                 "top_k": (0, 1000, 1), "top_p": (0.01, 1.0, 0.01), "seed": (0, 2**32 - 1, 1)}


def _refusal(name: str) -> str:
    lo, hi, _ = README_LIMITS[name]
    return re.escape(f"{name} must be between {lo} and {hi}")


@pytest.mark.parametrize("name", list(README_LIMITS))
def test_generation_limits_hold_at_both_ends_in_the_library(name):
    lo, hi, step = README_LIMITS[name]
    for v in (lo, hi):
        assert getattr(GenerationSettings(do_sample=True, **{name: v}).checked(), name) == v
    for v in (round(lo - step, 2), round(hi + step, 2)):
        with pytest.raises(ValueError, match=_refusal(name)):
            GenerationSettings(do_sample=True, **{name: v}).checked()
    assert LIMITS[name] == (lo, hi)  # what the page's sliders are built from



def test_generation_limits_hold_at_both_ends_through_the_page(client, image_file):
    for end in (0, 1):  # every setting at its lower end at once, then at its upper end
        settings = {name: bounds[end] for name, bounds in README_LIMITS.items()}
        got = client.predict(handle_file(image_file), **settings, do_sample=True, method="attention",
                             api_name="/caption")[RESULT]["settings"]
        assert {name: got[name] for name in settings} == {**settings, "max_new_tokens": min(
            settings["max_new_tokens"], 39)}  # the tiny model's position table holds 39 new tokens
    for name, (lo, hi, step) in README_LIMITS.items():
        outside = [round(hi + step, 2)] if name == "seed" else [round(lo - step, 2), round(hi + step, 2)]
        for v in outside:  # (the page's seed -1 means "draw one")
            with pytest.raises(AppError, match=_refusal(name)):
                client.predict(handle_file(image_file), **{name: v}, do_sample=True, api_name="/caption")


def _png(w: int, h: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (w, h), (30, 60, 90)).save(buf, "PNG")
    return buf.getvalue()


def test_the_pixel_limit_holds_at_its_threshold_in_the_header_and_the_array(monkeypatch):
    assert images.MAX_PIXELS == 40_000_000, "README promises 40 MP"
    monkeypatch.setattr(images, "MAX_PIXELS", 99 * 101)  # 9999: 99x101 is at the limit, 100x100 one pixel over
    assert images.read_image(_png(99, 101)).shape == (101, 99, 3)
    assert images.to_rgb(np.zeros((101, 99, 3), np.uint8)).shape == (101, 99, 3)
    with pytest.raises(ValueError, match="claims 100x100 pixels; the limit is"):  # from the header
        images.read_image(_png(100, 100))
    with pytest.raises(ValueError, match="100x100 pixels; the limit is"):
        images.to_rgb(np.zeros((100, 100, 3), np.uint8))


def test_photos_over_2048_px_are_downscaled_to_2048_and_ones_of_2048_are_kept():
    at = np.random.default_rng(0).integers(0, 256, (2048, 1000, 3), dtype=np.uint8)
    assert np.array_equal(images.to_rgb(at), at)
    assert images.to_rgb(np.zeros((2049, 1000, 3), np.uint8)).shape == (2048, 1000, 3)
    assert images.to_rgb(np.zeros((700, 2049, 3), np.uint8)).shape == (700, 2048, 3)


def test_sides_and_aspect_hold_at_their_thresholds():
    """README: 1-pixel images and strips thinner than 20:1 are refused; 2 pixels and 20:1 are not."""
    for shape in ((2, 40), (40, 2), (2, 2)):
        assert images.to_rgb(np.zeros((*shape, 3), np.uint8)).shape == (*shape, 3)
    for shape in ((1, 20), (20, 1)):
        with pytest.raises(ValueError, match="too small"):
            images.to_rgb(np.zeros((*shape, 3), np.uint8))
    for shape in ((2, 41), (41, 2)):
        with pytest.raises(ValueError, match="too thin .* no longer than 20:1"):
            images.to_rgb(np.zeros((*shape, 3), np.uint8))


def test_max_new_tokens_is_capped_by_the_models_position_table(random_tiny):
    assert random_tiny.max_tokens == 40  # the tiny preset's positions, start token included
    res = random_tiny.caption(image_for(0), max_new_tokens=64, num_beams=1, method="attention")
    assert res.settings["max_new_tokens"] == 39 and len(res.token_ids) <= 39


def test_typed_captions_hold_at_the_character_and_token_limits(tiny, monkeypatch):
    at = " ".join(["a"] * 39)  # 39 tokens: with the start token, every one of the tiny model's 40 positions
    assert len(tiny.tokenize(at)[0]) == 39 and tiny.max_tokens == 40
    assert tiny.explain(image_for(0), at, method="attention").words == at.split()
    with pytest.raises(ValueError, match="40 tokens long; this model reads at most 39"):
        tiny.explain(image_for(0), at + " a", method="attention")
    assert pipeline.MAX_CAPTION_CHARS == 500
    monkeypatch.setattr(pipeline, "MAX_CAPTION_CHARS", len(CAPTIONS[0]))  # 500 characters are ~100 tokens here
    assert tiny.tokenize(CAPTIONS[0])[1]
    with pytest.raises(ValueError, match=f"has {len(CAPTIONS[0]) + 1} characters; the limit is {len(CAPTIONS[0])}"):
        tiny.tokenize(CAPTIONS[0] + "s")


def test_layer_and_head_choices_hold_at_the_models_edges(tiny):
    assert len(parse_layers("0-1000")) == 1001 and parse_layers("-1000") == [-1000]
    for spec in ("0-1001", "-1001"):
        with pytest.raises(ValueError, match="layers"):
            parse_layers(spec)
    layers, heads = tiny.model.config.decoder.n_layer, tiny.model.config.decoder.n_head
    assert tiny.model.config.encoder.num_hidden_layers == layers  # so one choice fits the CLS map's layers too
    text = CAPTIONS[1]
    for ok in (dict(layers=[layers - 1]), dict(layers=[-layers]), dict(head=heads - 1)):
        assert tiny.explain(image_for(1), text, method="attention", **ok).words == text.split()
    for bad, message in ((dict(layers=[layers]), "layers must be indices"),
                         (dict(layers=[-layers - 1]), "layers must be indices"),
                         (dict(head=heads), f"head must be in 0..{heads - 1}")):
        with pytest.raises(ValueError, match=message):
            tiny.explain(image_for(1), text, method="attention", **bad)


def test_heatmap_word_index_holds_at_the_last_word(client, image_file):
    last = len(CAPTIONS[0].split()) - 1
    with Image.open(client.predict(handle_file(image_file), CAPTIONS[0], last, api_name="/heatmap")) as im:
        assert im.format == "PNG"
    with pytest.raises(AppError, match=f"word_index must be between 0 and {last}"):
        client.predict(handle_file(image_file), CAPTIONS[0], last + 1, api_name="/heatmap")


def test_the_page_keeps_1024_px_and_shrinks_1025():
    """README: a visitor's state keeps the image at most 1024 px on its longer side."""
    at = np.zeros((1024, 700, 3), np.uint8)
    assert render.shrink(at) is at
    assert render.shrink(np.zeros((1025, 700, 3), np.uint8)).shape == (1024, 699, 3)
    assert render.shrink(np.zeros((300, 1025, 3), np.uint8)).shape == (300, 1024, 3)


def test_the_queue_holds_32_waiting_visitors_and_refuses_the_33rd(tiny_dir, image_file, monkeypatch):
    """One model call at a time and a queue of at most 32. With the model call held, 32 more requests wait
    and the next is told the queue is full; all 33 are answered once the call goes on."""
    import app
    import captioner

    running, release, real = threading.Event(), threading.Event(), captioner.Captioner.caption_stream

    def held(self, *args, **kwargs):  # the page's /caption streams: the first answer, then the default map
        running.set()
        release.wait(120)
        yield from real(self, *args, **kwargs)

    monkeypatch.setattr(captioner.Captioner, "caption_stream", held)
    demo = app.build_demo([tiny_dir])
    url = launch(demo, show_error=True)
    client, jobs = Client(url, analytics_enabled=False, verbose=False), []
    cheap = dict(num_beams=1, max_new_tokens=4, method="attention", api_name="/caption")
    try:
        jobs.append(client.submit(handle_file(image_file), **cheap))
        assert running.wait(60), "the first request reached the model"
        jobs += [client.submit(handle_file(image_file), **cheap) for _ in range(32)]
        for _ in range(600):  # until all 32 wait in the queue
            if len(demo._queue) == 32:
                break
            time.sleep(0.05)
        assert len(demo._queue) == 32
        with pytest.raises(Exception, match="Queue is full"):
            client.submit(handle_file(image_file), **cheap).result(timeout=30)
    finally:
        release.set()
        answered = [job.result(timeout=120)[RESULT]["caption"] for job in jobs]
        demo.close()
    assert len(answered) == 33


def test_a_visitors_state_is_kept_an_hour(tiny_dir):
    """Each visitor's state released an hour after last use (tests/test_robustness.py watches one expire)."""
    import gradio as gr

    import app

    demo = app.build_demo([tiny_dir])
    states = [b for b in demo.blocks.values() if isinstance(b, gr.State)]
    assert [s.time_to_live for s in states] == [3600]
