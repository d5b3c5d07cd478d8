"""The real app, launched on 127.0.0.1 and called the way API users call it: with `gradio_client`."""
from __future__ import annotations

import httpx
import numpy as np
import pytest
from gradio_client import handle_file
from gradio_client.exceptions import AppError
from PIL import Image

from captioner.images import read_image
from conftest import CAPTIONS, image_for

# /caption and /explain return (words, word overlay, CLS overlay, strip, result JSON, info); gr.State is not sent
RESULT = 4



@pytest.fixture(scope="session")
def captioned(client, image_file):
    """The result JSON of /caption with every setting left at the page's default."""
    return client.predict(handle_file(image_file), api_name="/caption")[RESULT]


def test_named_endpoints_are_exactly_caption_explain_heatmap_locate_check(client):
    api = client.view_api(print_info=False, return_format="dict")
    assert set(api["named_endpoints"]) == {"/caption", "/explain", "/heatmap", "/locate", "/check"}
    assert not api["unnamed_endpoints"]  # the select handler and Enter-in-textbox are private


def test_caption_returns_words_and_maps(captioned):
    res = captioned
    assert isinstance(res, dict) and res["caption"]
    assert res["words"] == res["caption"].split()
    gh, gw = res["grid"]
    maps, cls = np.array(res["word_maps"]), np.array(res["cls_map"])
    assert maps.shape == (len(res["words"]), gh, gw)
    assert cls.shape == (gh, gw)
    for m in (maps, cls):
        assert m.min() >= 0.0 and m.max() <= 1.0


def test_caption_maps_equal_the_library_on_the_same_image(captioned, tiny, app_settings):
    assert set(app_settings) == {"max_new_tokens", "num_beams", "do_sample", "temperature", "top_k", "top_p",
                                 "method"}
    assert app_settings["method"] == "relevance", "the page defaults to the method that measured best"
    res = tiny.caption(image_for(0), **app_settings)
    assert captioned["caption"] == res.text
    np.testing.assert_allclose(np.array(captioned["word_maps"]), res.word_maps, atol=1e-3)
    np.testing.assert_allclose(np.array(captioned["cls_map"]), res.cls_map, atol=1e-3)


def test_explain_of_the_caption_gives_the_same_maps(client, image_file, captioned):
    res = client.predict(handle_file(image_file), captioned["caption"], api_name="/explain")[RESULT]
    assert res["words"] == captioned["words"]
    np.testing.assert_allclose(np.array(res["word_maps"]), np.array(captioned["word_maps"]), atol=1e-3)


def test_heatmap_is_a_png_that_depends_on_the_word(client, image_file):
    text = CAPTIONS[0]
    paths = [client.predict(handle_file(image_file), text, k, api_name="/heatmap") for k in (0, 3)]
    images = []
    for path in paths:
        with Image.open(path) as im:
            assert im.format == "PNG"
            images.append(np.asarray(im.convert("RGB")).astype(int))
    a, b = images
    assert a.shape == b.shape and min(a.shape[:2]) >= 64
    assert a.std() > 10  # a picture, not a blank
    assert np.abs(a - b).mean() > 1  # a different word is a different map (and title)


@pytest.mark.parametrize("api_name, args, name", [
    ("/caption", dict(num_beams=10000), "num_beams"),
    ("/caption", dict(max_new_tokens=10**6), "max_new_tokens"),
    ("/caption", dict(temperature=-1, do_sample=True), "temperature"),
    ("/caption", dict(top_p=5, do_sample=True), "top_p"),
    ("/heatmap", dict(text=CAPTIONS[0], word_index=99), "word_index"),
    ("/explain", dict(text=""), "caption"),
    ("/explain", dict(text="a dog " * 17_000), "caption"),  # 102 kB
])
def test_out_of_range_inputs_are_refused_naming_the_parameter(client, image_file, api_name, args, name):
    with pytest.raises(AppError) as info:
        client.predict(handle_file(image_file), **args, api_name=api_name)
    assert name in str(info.value)


@pytest.mark.parametrize("kind", ["transparent.png", "palette.gif"])
def test_uploads_are_decoded_as_the_library_decodes_files(client, tiny, app_settings, tmp_path, kind):
    """The app must read an upload as `captioner.images.read_image` does: transparent pixels on white (not
    black), GIFs in colour (not as palette indices)."""
    rgba = np.dstack([image_for(1), np.full(image_for(1).shape[:2], 255, np.uint8)])
    rgba[:, :16] = 0  # a fully transparent black band
    path = tmp_path / kind
    img = Image.fromarray(rgba)
    (img if kind.endswith(".png") else img.convert("RGB").quantize(64)).save(path)
    got = client.predict(handle_file(str(path)), api_name="/caption")[RESULT]
    want = tiny.caption(read_image(path), **app_settings)
    np.testing.assert_allclose(np.array(got["cls_map"]), want.cls_map, atol=1e-3)
    np.testing.assert_allclose(np.array(got["word_maps"]), want.word_maps, atol=1e-3)


@pytest.mark.parametrize("content, message", [
    (b"this is not a picture\n" * 10, "Could not read this file as an image"),
    (None, "too small"),  # a 1x1 PNG
])
def test_unusable_uploads_get_a_message_a_person_understands(client, tmp_path, content, message):
    path = tmp_path / "upload.png"
    if content is None:
        Image.new("RGB", (1, 1), (255, 0, 0)).save(path)
    else:
        path.write_bytes(content)
    with pytest.raises(AppError, match=message):
        client.predict(handle_file(str(path)), api_name="/caption")


def test_files_outside_the_allowed_paths_are_refused(app_url):
    r = httpx.get(f"{app_url}/gradio_api/file=/etc/passwd", follow_redirects=True, timeout=30)
    assert r.status_code != 200 or "root:" not in r.text


def test_heatmap_for_word_k_is_the_librarys_overlay_for_word_k(client, tiny, image_file):
    from captioner import render

    text = CAPTIONS[0]
    lib = tiny.explain(read_image(image_file), text)  # the page's default method, as /heatmap's
    for k in (0, 3, len(lib.words) - 1):
        with Image.open(client.predict(handle_file(image_file), text, k, api_name="/heatmap")) as im:
            got = np.asarray(im.convert("RGB")).astype(int)
        want = render.titled_overlay(lib.image, lib.word_maps[k], f"'{lib.words[k]}'  p={lib.word_probs[k]:.2f}")
        assert got.shape == want.shape and np.abs(got - want).max() <= 2, f"word {k}"


@pytest.fixture(scope="module")
def demo(tiny_dir):
    """The page, built in-process and never launched."""
    import app

    return app.build_demo([tiny_dir])


@pytest.fixture(scope="module")
def page(demo):
    """The page's handlers, called in-process as Gradio calls them (no server), by function name."""
    return {f.fn.__name__: f.fn for f in demo.fns.values() if f.fn is not None}


def _streamed(page, *args) -> list[tuple]:
    """Every update the streaming caption handler yields, in order."""
    return list(page["caption"](*args))


def test_clicks_and_the_grid_redraw_from_the_state_and_a_method_change_never_regenerates(page, tiny, monkeypatch):
    import gradio as gr

    import captioner
    from captioner import pipeline, render

    calls = {"encode": 0, "generate": 0}
    encode, generate = captioner.Captioner._encode, pipeline.generate_ids

    def counting(name, fn):
        def wrapped(*args, **kwargs):
            calls[name] += 1
            return fn(*args, **kwargs)
        return wrapped

    monkeypatch.setattr(captioner.Captioner, "_encode", counting("encode", encode))
    monkeypatch.setattr(pipeline, "generate_ids", counting("generate", generate))
    state = _streamed(page, image_for(0), 40)[-1][-1]
    res = state["result"]
    assert calls == {"encode": 1, "generate": 1} and len(res.words) > 3

    def title(k):
        return f"'{res.words[k]}'  p={res.word_probs[k]:.2f}"

    for k in range(len(res.words)):
        words, overlay = page["on_select"](state, False, gr.SelectData(None, {"index": k, "value": None}))
        assert np.array_equal(overlay, render.titled_overlay(res.image, res.word_maps[k], title(k)))
        assert [label for _, label in words].count("selected") == 1 and words[k][1] == "selected"
    k = len(res.words) - 1  # the word selected last stays selected when the grid is drawn
    words, overlay, cls, strip = page["redraw"](state, True)
    assert np.array_equal(overlay, render.titled_overlay(res.image, res.word_maps[k], title(k), True))
    assert words[k][1] == "selected" and not np.array_equal(overlay, render.titled_overlay(
        res.image, res.word_maps[k], title(k), False))
    assert calls == {"encode": 1, "generate": 1}, "a click and the grid never call the model"
    remapped = page["remap"](state, False, "attention", "all", -1)[-1]["result"]
    assert calls == {"encode": 2, "generate": 1}, "a method change maps again without generating"
    assert remapped.token_ids == res.token_ids and remapped.method == "attention"
    want = tiny.explain(image_for(0), res.text, method="attention")
    np.testing.assert_allclose(remapped.word_maps, want.word_maps, atol=1e-5)


def test_the_page_keeps_at_most_a_display_sized_image_per_visitor(page):
    from captioner import render

    big = np.asarray(Image.fromarray(image_for(2)).resize((2048, 1365)))
    state = _streamed(page, big, 8, 1)[-1][-1]
    assert max(state["result"].image.shape[:2]) == render.PAGE_MAX_SIDE


def test_an_upload_is_converted_to_rgb_once_on_its_way_to_a_caption(demo, page, image_file, monkeypatch):
    """The upload component decodes the file; the captioner converts it to RGB, and no one converts it again."""
    from gradio.data_classes import FileData

    from captioner import images, pipeline

    calls = []
    to_rgb = images.to_rgb

    def counting(image):
        calls.append(type(image).__name__)
        return to_rgb(image)

    monkeypatch.setattr(images, "to_rgb", counting)
    monkeypatch.setattr(pipeline, "to_rgb", counting)
    upload = next(block for block in demo.blocks.values() if getattr(block, "elem_id", None) == "image")
    state = _streamed(page, upload.preprocess(FileData(path=image_file)), 8, 1)[-1][-1]
    assert len(calls) == 1, calls
    assert np.array_equal(state["result"].image, read_image(image_file))


def test_the_page_names_its_model_menu_where_the_library_names_the_model_to_load(tiny):
    """A scene model's note on a photo: the library says which model to load, the page where to choose it."""
    import captioner
    from captioner.pipeline import SCENES_ONLY
    from page import views

    scenes = captioner.Captioner(tiny.model, tiny.tokenizer, tiny.processor, "scenes", scenes_only=(64, 64),
                                 photo_model=captioner.HUB_MODEL)
    res = scenes.explain(image_for(0), CAPTIONS[0], method="attention")
    note, = [n for n in res.notes if n.startswith(SCENES_ONLY)]
    assert f"load {captioner.HUB_MODEL}." in note and "Model menu" not in note
    shown, = [n for n in views.for_page(res, scenes).notes if n.startswith(SCENES_ONLY)]
    assert shown == note.replace(f"load {captioner.HUB_MODEL}.", f"choose {captioner.HUB_MODEL} in the Model menu "
                                 "(on the Space, or wherever the hub is reachable).")
    assert views.for_page(res, tiny).notes == res.notes, "a model with no photo model to suggest: notes as they are"


def test_the_caption_handler_shows_attention_maps_first_then_the_default_map(page, tiny):
    stream = page["caption"](image_for(1), 40)
    first = next(stream)
    assert first[-1]["result"].method == first[RESULT]["method"] == "attention"
    last = next(stream)
    assert last[-1]["result"].method == last[RESULT]["method"] == "relevance"
    assert last[-1] is first[-1], "one state for both answers: a click on the first is not lost"
    assert next(stream, None) is None
    assert first[RESULT]["words"] == last[RESULT]["words"] == tiny.caption(image_for(1), max_new_tokens=40).words
    assert len(_streamed(page, image_for(1), 40, 4, False, 1.0, 50, 1.0, -1, None, False, "attention")) == 1


def test_a_word_clicked_on_the_first_answer_stays_selected_when_the_default_map_replaces_it(page):
    import gradio as gr

    from captioner import render

    stream = page["caption"](image_for(0), 40)
    first = next(stream)
    assert first[-1]["result"].method == "attention"
    words, overlay = page["on_select"](first[-1], False, gr.SelectData(None, {"index": 2, "value": None}))
    res = first[-1]["result"]
    assert np.array_equal(overlay, render.titled_overlay(res.image, res.word_maps[2], f"'{res.words[2]}'  "
                                                         f"p={res.word_probs[2]:.2f}")), "the click drew attention"
    last = next(stream)
    res = last[-1]["result"]
    assert res.method == "relevance" and last[-1]["word"] == 2 and last[0][2][1] == "selected"
    assert np.array_equal(last[1], render.titled_overlay(res.image, res.word_maps[2], f"'{res.words[2]}'  "
                                                         f"p={res.word_probs[2]:.2f}"))


def test_the_check_endpoint_is_the_library_check_of_the_explained_caption(client, tiny, image_file):
    from captioner import check_word

    got = client.predict(handle_file(image_file), CAPTIONS[0], 1, api_name="/check")
    want = check_word(tiny, tiny.explain(image_for(0), CAPTIONS[0]), 1)
    assert got["verdict"] == want.verdict and got["word"] == "dog" and got["seed"] == want.seed
    assert got["method"] == "relevance" and got["fractions"] == want.fractions
    np.testing.assert_allclose(got["hottest"], want.hottest, atol=1e-4)
    np.testing.assert_allclose(got["random"], want.random, atol=1e-4)


def test_the_check_and_the_methods_side_by_side_use_the_selected_word_of_the_shown_caption(page, tiny):
    import gradio as gr

    from captioner import METHODS, check_word, render

    state = _streamed(page, image_for(0), 40)[-1][-1]
    res = state["result"]
    page["on_select"](state, False, gr.SelectData(None, {"index": 2, "value": None}))  # selects in place
    verdict, curve = page["check_map"](state)
    c = check_word(tiny, res, 2)
    assert c.sentence in verdict and c.verdict in verdict and curve.ndim == 3
    shown = page["compare_methods"](state, False)
    assert [m for _, m in shown] == list(METHODS)
    for (overlay, m) in shown:
        mapped = tiny.remap(res, method=m)
        want = render.titled_overlay(res.image, mapped.word_maps[2], f"{m}: '{res.words[2]}'")
        assert np.array_equal(overlay, want), m


def test_a_word_clicked_while_the_default_map_is_drawn_is_the_one_it_shows(page, monkeypatch):
    from page import views

    stream = page["caption"](image_for(0), 40)
    first = next(stream)
    pictures = views.pictures

    def clicked_meanwhile(res, k, grid):  # the visitor clicks word 3 of the first answer while these are drawn
        drawn = pictures(res, k, grid)
        first[-1]["word"] = 3
        return drawn

    monkeypatch.setattr(views, "pictures", clicked_meanwhile)
    last = next(stream)
    res = last[-1]["result"]
    assert res.method == "relevance" and last[-1]["word"] == 3 and last[0][3][1] == "selected"
    assert np.array_equal(last[1], views.word_view(res, 3, False)[1])
