"""A public Space survives the public: bad and odd files, hostile parameters and several visitors at once.

Every file goes through the library (`read_image`, then `caption`) and through the launched app as a Space runs
it, with show_error off, so a visitor sees only the messages the app means to show. Each input gets a correct
result or a message a person understands, and the app still serves a normal request afterwards.
"""
from __future__ import annotations

import io
import json
import math
import re
import struct
import subprocess
import sys
import threading
import time
import zlib
from datetime import timedelta
from pathlib import Path

import httpx
import numpy as np
import psutil
import pytest
from gradio_client import Client, handle_file
from gradio_client.exceptions import AppError
from hypothesis import given, settings, strategies as st
from hypothesis.extra import numpy as hnp
from PIL import Image

from captioner import images
from captioner.decoding import LIMITS, GenerationSettings
from conftest import CAPTIONS, image_for
from page.inputs import parse_layers
from servers import app_running, launch

ROOT = Path(__file__).resolve().parent.parent
RESULT = 4  # /caption and /explain return (words, word overlay, CLS overlay, strip, result JSON, info)
TIMEOUT = 60  # seconds any call may take: a hostile input must be answered, never left hanging in the queue


def _encoded(img: Image.Image, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kwargs)
    return buf.getvalue()


def _png_bomb(w: int, h: int) -> bytes:
    """A valid 1-bit PNG of w x h black pixels, written row by row so that making it costs no memory (PIL's
    Image.new would allocate the w*h bytes the bomb is meant to make the server allocate)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    packer, row = zlib.compressobj(9), b"\0" * (1 + (w + 7) // 8)  # filter byte + w bits
    idat = b"".join(packer.compress(row) for _ in range(h)) + packer.flush()
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 1, 0, 0, 0, 0))
            + chunk(b"IDAT", idat) + chunk(b"IEND", b""))


def _corpus() -> dict[str, bytes]:
    rng = np.random.default_rng(0)
    jpeg = _encoded(Image.fromarray(image_for(1)), "JPEG", quality=95)
    frames = [Image.fromarray(image_for(k)) for k in (0, 2)]  # animations: describe frame 0, never frame 1
    sideways = Image.new("RGB", (60, 30), (20, 20, 120))  # stored 60 wide; upright it is 30 wide, 60 tall
    sideways.paste((255, 0, 0), (0, 0, 60, 10))  # stored top rows: the upright right-hand columns
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation 6: rotate 90° clockwise to show upright (how phones store portrait photos)
    rgba = np.dstack([image_for(3), np.tile(np.linspace(0, 255, 48), (32, 1)).astype(np.uint8)])  # clear on the left
    return {
        "empty.jpg": b"",
        "page.jpg": b"<!DOCTYPE html><html><body>not a photo</body></html>",
        "letter.jpg": b"Dear visitor, this letter was saved with a .jpg name.\n" * 20,
        "truncated.jpg": jpeg[: len(jpeg) // 2],
        "noise.jpg": rng.bytes(4096),
        "drawing.svg": b'<svg xmlns="http://www.w3.org/2000/svg" width="9" height="9"><rect width="9"/></svg>',
        "dot-1x1.png": _encoded(Image.new("RGB", (1, 1), (255, 0, 0)), "PNG"),
        "line-1x4000.png": _encoded(Image.new("RGB", (1, 4000)), "PNG"),
        "strip-3x4000.png": _encoded(Image.new("RGB", (3, 4000)), "PNG"),
        "deep-16bit.png": _encoded(Image.fromarray((np.arange(48 * 64).reshape(48, 64) * 21).astype(np.uint16)), "PNG"),
        "float.tiff": _encoded(Image.fromarray(np.linspace(0, 1, 48 * 64, dtype=np.float32).reshape(48, 64)), "TIFF"),
        "print-cmyk.jpg": _encoded(Image.fromarray(image_for(1)).convert("CMYK"), "JPEG", quality=95),
        "palette.png": _encoded(Image.fromarray(image_for(2)).quantize(16), "PNG"),
        "gray.png": _encoded(Image.fromarray(image_for(3)).convert("L"), "PNG"),
        "rgba.png": _encoded(Image.fromarray(rgba), "PNG"),
        "animated.gif": _encoded(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100),
        "animated.webp": _encoded(frames[0], "WEBP", save_all=True, append_images=frames[1:], lossless=True),
        "sideways.jpg": _encoded(sideways, "JPEG", exif=exif, quality=95),
        "large-photo.jpg": _encoded(Image.fromarray(image_for(1)).resize((5000, 3000), Image.Resampling.NEAREST),
                                    "JPEG", quality=85),
        "bomb.png": _png_bomb(20000, 20000),  # 400 MP in 60 kB
    }


# What each file must give: the (H, W) of the upright, downscaled image, or words the refusal must contain.
EXPECT: dict[str, tuple[int, int] | str] = {
    "empty.jpg": "file is empty",
    "page.jpg": "HTML",
    "letter.jpg": "Could not read this file as an image",
    "truncated.jpg": "damaged or truncated",
    "noise.jpg": "Could not read this file as an image",
    "drawing.svg": "SVG",
    "dot-1x1.png": "too small",
    "line-1x4000.png": "too small",
    "strip-3x4000.png": "too thin",
    "deep-16bit.png": (48, 64),
    "float.tiff": (48, 64),
    "print-cmyk.jpg": (32, 48),
    "palette.png": (32, 48),
    "gray.png": (32, 48),
    "rgba.png": (32, 48),
    "animated.gif": (32, 48),
    "animated.webp": (32, 48),
    "sideways.jpg": (60, 30),
    "large-photo.jpg": (1229, 2048),  # 5000x3000 with its longer side brought down to MAX_SIDE
    "bomb.png": "megapixels",
}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> dict[str, str]:
    folder = tmp_path_factory.mktemp("corpus")
    files = _corpus()
    assert set(files) == set(EXPECT)
    for name, data in files.items():
        (folder / name).write_bytes(data)
    return {name: str(folder / name) for name in files}


@pytest.fixture(scope="module")
def normal_image(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("normal") / "scene0.png"
    Image.fromarray(image_for(0)).save(path)
    return str(path)


@pytest.fixture(scope="module")
def space(tiny_dir):
    """(demo, url): the app as a Space runs it. show_error is off there, so an exception the app does not turn
    into a gr.Error reaches a visitor as a bare "Error"."""
    import app

    demo = app.build_demo([tiny_dir])
    url = launch(demo, show_error=False)
    yield demo, url
    demo.close()


@pytest.fixture(scope="module")
def client(space):
    return Client(space[1], analytics_enabled=False, verbose=False)


def _call(client: Client, *args, api_name: str, **kwargs):
    return client.submit(*args, api_name=api_name, **kwargs).result(timeout=TIMEOUT)


def _still_serves(client: Client, image: str) -> None:
    assert _call(client, handle_file(image), api_name="/caption")[RESULT]["caption"]


def _rgb(path: str) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def _assert_upright_overlay(overlay: np.ndarray, size: tuple[int, int]) -> None:
    """The overlay is the photo, at the overlay's width and the photo's own aspect, over a colour scale of at most
    a tenth of its height: a photo left sideways or squashed has no room for the scale."""
    h, w = size
    oh, ow = overlay.shape[:2]
    photo_h = ow * h / w  # the photo's height at the overlay's width
    assert 0 < oh - photo_h <= max(30.0, 0.1 * photo_h), f"overlay {ow}x{oh} does not hold a {w}x{h} photo"


class PeakRSS:
    """Samples this process's resident memory (the launched app's server runs in it too) every 2 ms."""

    def __enter__(self):
        self.proc, self.stop = psutil.Process(), threading.Event()
        self.before = self.peak = self.proc.memory_info().rss
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        return self

    def _sample(self):
        while not self.stop.wait(0.002):
            self.peak = max(self.peak, self.proc.memory_info().rss)

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join()
        self.growth_mb = (self.peak - self.before) / 1e6


# ---------------------------------------------------------------------------------------------- bad and odd files

@pytest.mark.parametrize("name", list(EXPECT))
def test_library_gives_a_result_or_a_clear_message(tiny, corpus, name):
    expect = EXPECT[name]
    if isinstance(expect, str):
        with pytest.raises(ValueError, match=expect):
            tiny.caption(images.read_image(corpus[name]))
        return
    rgb = images.read_image(corpus[name])
    assert rgb.shape == (*expect, 3) and rgb.dtype == np.uint8
    res = tiny.caption(rgb)
    assert res.image_size == expect and len(res.word_maps) == len(res.words)


def test_library_decodes_odd_files_to_the_right_pixels(corpus):
    frame0, frame1 = image_for(0).astype(int), image_for(2).astype(int)
    for name in ("animated.gif", "animated.webp"):
        rgb = images.read_image(corpus[name]).astype(int)
        assert np.abs(rgb - frame0).mean() < 8 < np.abs(rgb - frame1).mean(), f"{name}: not its first frame"
    upright = images.read_image(corpus["sideways.jpg"]).astype(int)
    assert upright[:, -8:, 0].mean() > 200 > upright[:, :20, 0].mean(), "the red band must end up on the right"
    deep = images.read_image(corpus["deep-16bit.png"])
    assert deep[0, 0, 0] == 0 and deep[-1, -1, 0] >= 245 and len(np.unique(deep)) > 200  # all 16 bits, scaled
    ramp = images.read_image(corpus["float.tiff"])
    assert ramp[0, 0, 0] == 0 and ramp[-1, -1, 0] == 255
    cmyk = images.read_image(corpus["print-cmyk.jpg"]).astype(int)
    assert np.abs(cmyk - image_for(1)).mean() < 12
    rgba = images.read_image(corpus["rgba.png"])
    assert (rgba[:, 0] == 255).all(), "fully transparent pixels are white, not black"


@pytest.mark.parametrize("name", list(EXPECT))
def test_app_gives_a_result_or_a_clear_message_and_keeps_serving(client, tiny, app_settings, corpus, normal_image,
                                                                 name):
    expect, upload = EXPECT[name], handle_file(corpus[name])
    if isinstance(expect, str):
        for api_name, args in (("/caption", ()), ("/explain", (CAPTIONS[0],)), ("/heatmap", (CAPTIONS[0], 2))):
            with pytest.raises(AppError, match=expect):
                _call(client, upload, *args, api_name=api_name)
    else:
        want = tiny.caption(images.read_image(corpus[name]), **app_settings)
        got = _call(client, upload, api_name="/caption")[RESULT]
        assert got["caption"] == want.text and tuple(got["image_size"]) == expect
        np.testing.assert_allclose(np.array(got["cls_map"]), want.cls_map, atol=1e-3)
        explained = _call(client, upload, CAPTIONS[0], api_name="/explain")[RESULT]
        assert explained["words"] == CAPTIONS[0].split() and tuple(explained["image_size"]) == expect
        _assert_upright_overlay(_rgb(_call(client, upload, CAPTIONS[0], 2, api_name="/heatmap")), expect)
    _still_serves(client, normal_image)


def test_sideways_and_large_photos_keep_their_shape_on_the_heatmap(client, corpus):
    """Spelled out for the two files whose shape matters most: a phone's portrait photo (stored sideways plus an
    EXIF tag) and a 5000x3000 photo (downscaled before the model)."""
    sideways = _rgb(_call(client, handle_file(corpus["sideways.jpg"]), CAPTIONS[0], 0, api_name="/heatmap"))
    assert sideways.shape[0] > 1.5 * sideways.shape[1], "a portrait photo gives a portrait overlay"
    large = _rgb(_call(client, handle_file(corpus["large-photo.jpg"]), CAPTIONS[0], 0, api_name="/heatmap"))
    assert large.shape[1] == images.MAX_SIDE
    _assert_upright_overlay(large, (3000, 5000))


def test_a_decompression_bomb_is_refused_with_its_size(client, corpus):
    """400 MP would be 400 MB decoded (1.2 GB as RGB); the library and the app refuse it, saying why."""
    with pytest.raises(ValueError, match="megapixels"):
        images.read_image(corpus["bomb.png"])
    with pytest.raises(AppError, match="megapixels"):
        _call(client, handle_file(corpus["bomb.png"]), api_name="/caption")


@pytest.mark.slow
def test_a_decompression_bomb_is_refused_fast_without_memory(client, corpus):
    """Refused from its header: within 5 s and 100 MB of this process's memory (the launched app's server runs
    in it too). Slow: a figure of the machine and its load, not of the code alone."""
    for refuse in (lambda: images.read_image(corpus["bomb.png"]),
                   lambda: _call(client, handle_file(corpus["bomb.png"]), api_name="/caption")):
        start = time.perf_counter()
        with PeakRSS() as rss, pytest.raises((ValueError, AppError), match="megapixels"):
            refuse()
        assert time.perf_counter() - start < 5
        assert rss.growth_mb < 100, f"refusing the bomb took {rss.growth_mb:.0f} MB"


def _sparse_file(path: Path, size: int) -> Path:
    with open(path, "wb") as f:
        f.truncate(size)  # sparse: claims `size` bytes, occupies nothing on disk
    return path


def test_a_huge_file_is_refused_with_the_limit(tmp_path):
    path = _sparse_file(tmp_path / "huge.jpg", 2_000_000_000)
    with pytest.raises(ValueError, match=f"larger than {images.MAX_FILE_BYTES // 1_000_000} MB"):
        images.read_image(path)


@pytest.mark.slow
def test_a_huge_file_is_refused_without_reading_it(tmp_path):
    """2 GB on disk: refused from its size, so this process grows by less than three file limits."""
    path = _sparse_file(tmp_path / "huge.jpg", 2_000_000_000)
    with PeakRSS() as rss, pytest.raises(ValueError, match=f"larger than {images.MAX_FILE_BYTES // 1_000_000} MB"):
        images.read_image(path)
    assert rss.growth_mb < 3 * images.MAX_FILE_BYTES / 1e6


def test_the_projects_pixel_limit_refuses_what_pillow_would_decode(client, tmp_path):
    """48 MP: under Pillow's own bomb limit (179 MP), so only the project's 40 MP check stands in the way."""
    w, h = 8000, 6000
    assert images.MAX_PIXELS < w * h < 2 * Image.MAX_IMAGE_PIXELS
    path = tmp_path / "48mp.png"
    path.write_bytes(_png_bomb(w, h))
    with pytest.raises(ValueError, match=f"limit is {images.MAX_PIXELS // 1_000_000} megapixels"):
        images.read_image(path)
    with pytest.raises(AppError, match="megapixels"):
        _call(client, handle_file(str(path)), api_name="/caption")
    small = tmp_path / "39mp.png"  # just under the limit: decoded (and brought down to MAX_SIDE)
    small.write_bytes(_png_bomb(7800, 5000))
    assert images.read_image(small).shape == (round(5000 * images.MAX_SIDE / 7800), images.MAX_SIDE, 3)


def test_a_file_one_byte_over_50_mb_is_refused_and_one_of_50_mb_is_read(client, tmp_path):
    """The project's file limit at its own threshold, through the library and the app (whose server here has no
    max_file_size: `python app.py` adds one, tested slow below)."""
    png = _encoded(Image.fromarray(image_for(1)), "PNG")  # trailing bytes after IEND are ignored by decoders
    at_limit, over = tmp_path / "at.png", tmp_path / "over.png"
    at_limit.write_bytes(png + bytes(images.MAX_FILE_BYTES - len(png)))
    over.write_bytes(png + bytes(images.MAX_FILE_BYTES + 1 - len(png)))
    assert images.MAX_FILE_BYTES == 50_000_000, "README promises 50 MB"
    assert images.read_image(at_limit).shape == (*image_for(1).shape[:2], 3)
    with pytest.raises(ValueError, match="larger than 50 MB"):
        images.read_image(over)
    with pytest.raises(AppError, match="larger than 50 MB"):
        _call(client, handle_file(str(over)), api_name="/caption")


# ------------------------------------------------------------------------------------------- hostile parameters

@pytest.mark.parametrize("api_name, args, words", [  # tests/test_app.py covers the sliders' plain range errors
    ("/caption", dict(layers="banana"), "layers must look like"),
    ("/caption", dict(layers="0-99", method="attention"), "layers must be indices"),
    ("/caption", dict(head=99, method="attention"), "head must be in"),
    ("/explain", dict(text=CAPTIONS[0], head=99, method="rollout"), "head must be in"),
    ("/caption", dict(head="3"), "head must be a whole number"),
    ("/caption", dict(num_beams="4"), "num_beams must be between"),
    ("/caption", dict(num_beams=None), "num_beams must be between"),
    ("/caption", dict(num_beams=2.5), "num_beams must be a whole number"),
    ("/caption", dict(top_k=-5), "top_k must be between"),
    ("/caption", dict(max_new_tokens=0), "max_new_tokens must be between"),
    ("/caption", dict(seed=2**70, do_sample=True), "seed must be between"),
    ("/caption", dict(method="nonsense"), "not in the list of choices"),
    ("/caption", dict(model="/etc"), "Unknown model"),  # never a path or Hub name the caller picks: only listed ones
    ("/caption", dict(model="gpt2"), "Unknown model"),
    ("/heatmap", dict(text=CAPTIONS[0], word_index=-1), "word_index must be between 0 and 7"),
    ("/heatmap", dict(text=CAPTIONS[0], word_index=10**30), "word_index must be between 0 and 7"),
    ("/heatmap", dict(text=CAPTIONS[0], layers="banana"), "layers must look like"),
    ("/heatmap", dict(text="   "), "Type a caption"),
    ("/explain", dict(text="x" * 100_000), "The caption has 100000 characters"),
])
def test_hostile_parameters_get_a_message_naming_them(client, normal_image, api_name, args, words):
    with pytest.raises(AppError, match=re.escape(words)):
        _call(client, handle_file(normal_image), **args, api_name=api_name)


def _raw_call(url: str, api: str, data: list) -> tuple[str, object]:
    """Call an endpoint over plain HTTP, as any script can, with JSON gradio_client refuses to send (NaN,
    Infinity). -> (the last event's name, its data)."""
    r = httpx.post(f"{url}/gradio_api/call/{api}", content=json.dumps({"data": data}),
                   headers={"content-type": "application/json"}, timeout=TIMEOUT)
    r.raise_for_status()
    with httpx.stream("GET", f"{url}/gradio_api/call/{api}/{r.json()['event_id']}", timeout=TIMEOUT) as stream:
        lines = [line for line in stream.iter_lines() if line.startswith(("event:", "data:"))]
    return lines[-2].removeprefix("event:").strip(), json.loads(lines[-1].removeprefix("data:"))


@pytest.mark.parametrize("api, name, value, sample", [
    ("caption", "temperature", math.nan, True),
    ("caption", "top_p", math.nan, True),
    ("caption", "top_k", math.inf, True),
    ("caption", "num_beams", math.nan, False),
    ("caption", "max_new_tokens", math.inf, False),
    ("caption", "seed", math.nan, True),
    ("caption", "head", math.nan, False),
    ("caption", "head", -math.inf, False),
    ("heatmap", "word_index", math.nan, False),
    ("heatmap", "word_index", math.inf, False),
])
def test_nan_and_infinity_over_http_get_a_message_naming_the_parameter(space, client, normal_image, api, name,
                                                                       value, sample):
    url = space[1]
    params = client.view_api(print_info=False, return_format="dict")["named_endpoints"][f"/{api}"]["parameters"]
    data = {p["parameter_name"]: p["parameter_default"] for p in params}
    with open(normal_image, "rb") as f:
        uploaded = httpx.post(f"{url}/gradio_api/upload", files={"files": f}, timeout=TIMEOUT)
    data.update(image={"path": uploaded.json()[0], "meta": {"_type": "gradio.FileData"}}, text=CAPTIONS[0])
    data.update({name: value} | ({"do_sample": True} if sample else {}))
    event, payload = _raw_call(url, api, [data[p["parameter_name"]] for p in params])
    assert event == "error" and name in (payload or {}).get("error", ""), payload
    _still_serves(client, normal_image)


def test_a_server_path_sent_as_the_image_is_refused(space, client, normal_image):
    params = client.view_api(print_info=False, return_format="dict")["named_endpoints"]["/caption"]["parameters"]
    data = [p["parameter_default"] for p in params]
    data[0] = {"path": "/etc/passwd", "meta": {"_type": "gradio.FileData"}}
    event, payload = _raw_call(space[1], "caption", data)
    assert event == "error" and "root:" not in json.dumps(payload)
    _still_serves(client, normal_image)


@pytest.mark.parametrize("path", ["app.py", "assets/model/model.safetensors", "assets/examples/scene_3.png"])
def test_the_server_serves_no_file_of_its_own_by_path(space, path):
    """allowed_paths is unset: Gradio serves only its cache (uploads, results, examples copied there)."""
    for name in (path, str(ROOT / path)):
        r = httpx.get(f"{space[1]}/gradio_api/file={name}", timeout=TIMEOUT)
        assert r.status_code == 403, (name, r.status_code)


@pytest.mark.parametrize("text", ["🐶🐱 on a skateboard", "a\x00dog\x07", "\u202ereversed text",
                                  "<script>alert(1)</script>", "a " * 250, "ﬁ ﬂ Ａ ｄｏｇ"])
def test_odd_typed_captions_are_explained_or_refused(client, normal_image, text):
    try:
        res = _call(client, handle_file(normal_image), text, api_name="/explain")[RESULT]
    except AppError as e:
        assert "caption" in str(e).lower(), e
    else:
        assert res["words"] == text.split() and len(res["word_maps"]) == len(res["words"])
    _still_serves(client, normal_image)


def test_a_huge_layer_range_is_refused_before_it_is_expanded():
    """'0-400000000' from a visitor's Layers box would build a ~16 GB list if expanded before checking."""
    with pytest.raises(ValueError, match="layers"):
        parse_layers("0-400000000")


def test_num_beams_none_is_refused_naming_it(tiny):
    with pytest.raises(ValueError, match="num_beams"):
        tiny.caption(image_for(0), num_beams=None)


# ---------------------------------------------------------------------------------------- visitors, one at a time

def test_each_visitor_gets_their_own_results_and_state_is_freed_after_its_ttl(space, tiny, app_settings, tmp_path):
    import gradio as gr

    demo, url = space
    files = {}
    for k in (0, 2):
        files[k] = str(tmp_path / f"scene{k}.png")
        Image.fromarray(image_for(k)).save(files[k])
    want = {k: tiny.caption(image_for(k), **app_settings).text for k in files}
    assert want[0] != want[2]
    visitors = {0: Client(url, analytics_enabled=False, verbose=False),
                2: Client(url, analytics_enabled=False, verbose=False)}
    jobs = [(k, visitors[k].submit(handle_file(files[k]), api_name="/caption")) for _ in range(3) for k in files]
    for k, job in jobs:  # submitted together, interleaved in the queue: each visitor still gets its own caption
        assert job.result(timeout=TIMEOUT)[RESULT]["caption"] == want[k]

    # The page keeps each visitor's result in gr.State (for clicks on words); it is held per session.
    state_id = next(i for i, block in demo.blocks.items() if isinstance(block, gr.State))
    sessions = {k: demo.state_holder.session_data[c.session_hash] for k, c in visitors.items()}
    for k, session in sessions.items():
        assert session.state_data[state_id]["result"].text == want[k]
        ttl, _ = session._state_ttl[state_id]
        assert ttl == 3600
    # Gradio deletes expired State every second; make visitor 0's an hour and a second old and it goes.
    sessions[0]._state_ttl[state_id] = (3600, sessions[0]._state_ttl[state_id][1] - timedelta(seconds=3601))
    deadline = time.monotonic() + TIMEOUT  # a guard against waiting for ever: the loop ends when the state goes
    while state_id in sessions[0].state_data and time.monotonic() < deadline:
        time.sleep(0.2)
    assert state_id not in sessions[0].state_data, "an expired visitor's state is released"
    assert sessions[2].state_data[state_id]["result"].text == want[2], "another visitor's state is untouched"


def test_an_output_image_already_cached_is_never_rewritten_while_visitors_may_be_reading_it(space, tmp_path):
    """Gradio rewrote each cached output in place, so a visitor downloading a picture while another visitor got the
    same one could read a truncated file (seen in the test above as "Too little data for declared Content-Length").
    With the page built, a second save of the same picture leaves the first file as it was, and a new one appears
    whole under its final name (written beside it and renamed)."""
    from gradio import processing_utils
    assert processing_utils.save_pil_to_cache.atomic, "build_demo() installed the atomic save"
    picture = Image.fromarray(image_for(1))
    first = Path(processing_utils.save_pil_to_cache(picture, str(tmp_path), format="png"))
    before = first.stat()
    assert first.read_bytes() == processing_utils.encode_pil_to_bytes(picture, "png")
    again = Path(processing_utils.save_pil_to_cache(picture, str(tmp_path), format="png"))
    after = again.stat()
    assert again == first and (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
    assert [f.name for f in first.parent.iterdir()] == [first.name], "no temporary file left behind"


# --------------------------------------------------------------------------------------------- property-based

@st.composite
def _arrays(draw):
    h, w = draw(st.integers(1, 64)), draw(st.integers(1, 64))
    shape = draw(st.sampled_from([(h, w), (h, w, 1), (h, w, 3), (h, w, 4)]))
    return draw(hnp.arrays(draw(st.sampled_from([np.uint8, np.uint16, np.float32, np.bool_])), shape))  # NaN, inf too


@settings(max_examples=100, deadline=None)
@given(_arrays())
def test_to_rgb_gives_rgb_uint8_or_a_value_error(arr):
    before = arr.copy()
    h, w = arr.shape[:2]
    try:
        out = images.to_rgb(arr)
    except ValueError:
        assert min(h, w) < images.MIN_SIDE or max(h, w) > images.MAX_ASPECT * min(h, w), "refused a usable image"
    else:
        assert out.shape == (h, w, 3) and out.dtype == np.uint8
    np.testing.assert_array_equal(arr, before)  # the caller's array is untouched


_FILES = [_encoded(Image.fromarray(image_for(1)), fmt) for fmt in ("PNG", "JPEG", "GIF", "WEBP", "BMP", "TIFF")]
_EXIF = Image.Exif()
_EXIF[0x0112] = 8
_FILES.append(_encoded(Image.fromarray(image_for(1)), "JPEG", exif=_EXIF))


@st.composite
def _damaged(draw):
    """A small valid image file with a few bytes changed and maybe its tail cut off."""
    data = bytearray(draw(st.sampled_from(_FILES)))
    for _ in range(draw(st.integers(1, 6))):
        data[draw(st.integers(0, len(data) - 1))] = draw(st.integers(0, 255))
    return bytes(data[: draw(st.integers(1, len(data)))])


_MAGIC = [b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff\xe0", b"GIF89a", b"RIFF\0\0\0\0WEBPVP8 ", b"II*\0", b"MM\0*", b"BM",
          b"<svg", b"  <?xml"]


@settings(max_examples=100, deadline=None)
@given(st.one_of(st.binary(max_size=2048), _damaged(),
                 st.builds(lambda magic, tail: magic + tail, st.sampled_from(_MAGIC), st.binary(max_size=512))))
def test_read_image_gives_rgb_or_a_value_error(data):
    try:
        out = images.read_image(data)
    except ValueError as e:
        assert str(e)
    else:
        assert out.ndim == 3 and out.shape[2] == 3 and out.dtype == np.uint8 and min(out.shape[:2]) >= 2


_ANY = st.one_of(st.none(), st.booleans(), st.integers(), st.integers(-10, 2000),
                 st.floats(allow_nan=True, allow_infinity=True), st.floats(-1, 10))


def _acceptable(name: str, v) -> bool:
    """LIMITS as a person reads them: a real number (not a bool, not NaN) in range, whole for whole ranges; only
    the seed may be None (drawn when sampling)."""
    lo, hi = LIMITS[name]
    if v is None:
        return name == "seed"  # the only setting that may be left out
    if isinstance(v, bool) or not isinstance(v, (int, float)) or v != v or not lo <= v <= hi:
        return False
    return not isinstance(lo, int) or float(v).is_integer()


@settings(max_examples=100, deadline=None)
@given(values=st.fixed_dictionaries({name: _ANY for name in LIMITS}), do_sample=st.booleans())
def test_settings_are_within_limits_or_a_value_error_names_the_field(values, do_sample):
    wrong = [name for name in LIMITS if not _acceptable(name, values[name])]
    try:
        got = GenerationSettings(**values, do_sample=do_sample).checked()
    except ValueError as e:
        assert str(e).split()[0] in wrong, f"{e} names no wrong field of {wrong}"
        return
    assert not wrong, f"accepted {wrong}"
    for name, (lo, hi) in LIMITS.items():
        v = getattr(got, name)
        if name == "seed":
            assert (v is None) == (not do_sample)  # drawn when sampling, dropped otherwise
        if v is None:
            assert name == "seed"
        else:
            assert lo <= v <= hi and type(v) is (int if isinstance(lo, int) else float)


@settings(max_examples=100, deadline=None)
@given(st.text(max_size=30))
def test_parse_layers_gives_none_a_list_or_a_value_error(text):
    try:
        got = parse_layers(text)
    except ValueError as e:
        assert "layers" in str(e)
    else:
        assert got is None or (isinstance(got, list) and got and all(type(i) is int for i in got))


@settings(max_examples=100, deadline=None)
@given(st.lists(st.one_of(st.integers(-12, 12).map(lambda i: (str(i), [i])),
                          st.tuples(st.integers(0, 12), st.integers(0, 12)).map(
                              lambda r: (f"{r[0]}-{r[1]}", list(range(r[0], r[1] + 1))))), min_size=1, max_size=5),
       st.sampled_from([",", ", ", " ,"]))
def test_parse_layers_reads_what_the_page_promises(parts, sep):
    """The Layers box says "all, -1, 0-3 or 1,4"."""
    text, want = sep.join(p for p, _ in parts), [i for _, layers in parts for i in layers]
    if want:
        assert parse_layers(text) == want
    else:
        with pytest.raises(ValueError, match="selects no layer"):
            parse_layers(text)


# ----------------------------------------------------------------------------------- the load test, as a smoke test

@pytest.mark.slow
def test_loadtest_runs_two_visitors_without_errors():
    """scripts/loadtest.py end to end (python app.py, bundled model), with 2 visitors instead of 20."""
    run = subprocess.run([sys.executable, "scripts/loadtest.py", "--clients", "2", "--images", "1"], cwd=ROOT,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0 and "| all | 4 | 0 |" in run.stdout and "peak" in run.stdout \
        and "round 1" in run.stdout, run.stdout + run.stderr


@pytest.mark.slow
def test_app_py_refuses_an_oversized_upload_at_the_door(tmp_path):
    """`python app.py` (what a Space runs) sets max_file_size, so Gradio refuses the upload before writing it."""
    path = tmp_path / "huge.jpg"
    path.write_bytes(b"\xff\xd8\xff" + bytes(images.MAX_FILE_BYTES))
    with app_running({"CAPTIONER_MODEL": None, "CAPTIONER_EXTRA_MODELS": None}) as server, open(path, "rb") as f:
        r = httpx.post(f"{server.url}gradio_api/upload", files={"files": f}, timeout=TIMEOUT)
        assert r.status_code == 413 and "maximum allowed size" in r.text, (r.status_code, r.text[:500])
