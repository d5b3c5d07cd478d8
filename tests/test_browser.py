"""The real page in headless Chromium: caption, click words, explain a typed caption, survive a bad upload.

Needs Debian's /usr/bin/chromium (`make test` installs it when run as root) and playwright (requirements-dev.txt);
playwright's own browser downloads are never used. Without them these tests fail, saying what to install: they are
never skipped, so a suite that cannot open the page cannot pass.
"""
from __future__ import annotations

import os
import re
import sys

import pytest
from PIL import Image

from conftest import CAPTIONS, image_for

pytestmark = pytest.mark.browser

CHROMIUM = "/usr/bin/chromium"
SELECTED = "253, 224, 71"  # app.COLOURS["selected"] (#fde047) as the rgba() the page styles the token with
WAIT_MS = 60_000  # the model shares two CPU cores with everything else here


def _check_browser() -> None:
    """Fail, saying how to install it, when Chromium or playwright is missing."""
    if not os.path.exists(CHROMIUM):
        pytest.fail(f"{CHROMIUM} is missing: run `make chromium` as root, or `apt-get install -y "
                    "--no-install-recommends chromium`", pytrace=False)
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError as e:
        pytest.fail(f"playwright is missing ({e}): `.venv/bin/python -m pip install -r requirements-dev.txt` "
                    "(never `playwright install`: the tests use Debian's Chromium)", pytrace=False)


@pytest.fixture(scope="module")
def browser():
    _check_browser()
    from playwright.sync_api import expect, sync_playwright

    expect.set_options(timeout=WAIT_MS)
    with sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=[
            "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-background-networking"])
        yield chromium
        chromium.close()


@pytest.fixture
def page(browser, app_url):
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    page.set_default_timeout(WAIT_MS)
    page.goto(app_url, wait_until="load")  # never "networkidle": the heartbeat keeps a request open
    yield page
    page.close()


@pytest.fixture(scope="module")
def scene(tmp_path_factory):
    path = tmp_path_factory.mktemp("browser") / "scene0.png"
    Image.fromarray(image_for(0)).save(path)
    return str(path)


def _upload(page, path: str) -> None:
    clear = page.locator("#image button[aria-label='Clear']")
    if clear.count():  # an image is showing: remove it so the upload input comes back
        clear.first.click()
    page.locator("#image input[type=file]").set_input_files(path)


def _words(page) -> list[str]:
    return [t.strip() for t in page.locator("#words [role=button] .text").all_inner_texts()]


def _is_selected(token) -> bool:
    return SELECTED in (token.get_attribute("style") or "")


def _word_map(page) -> str:
    """The src of the word overlay once it is showing."""
    img = page.locator("#word-map img")
    img.wait_for()
    return img.get_attribute("src")


def _caption(page, expected: list[str]) -> None:
    from playwright.sync_api import expect

    page.click("#caption-btn")
    expect(page.locator("#words [role=button]")).to_have_count(len(expected))
    assert _words(page) == expected


def test_a_missing_chromium_or_playwright_fails_with_how_to_install_it(monkeypatch):
    """A failure, not a skip (pytest.skip raises an exception of its own, caught here too)."""
    monkeypatch.setattr(sys.modules[__name__], "CHROMIUM", "/nonexistent/chromium")
    with pytest.raises(BaseException) as missing:
        _check_browser()
    assert missing.type is pytest.fail.Exception and "make chromium" in str(missing.value)
    monkeypatch.undo()
    monkeypatch.setitem(sys.modules, "playwright.sync_api", None)  # None in sys.modules: the import fails
    with pytest.raises(BaseException) as missing:
        _check_browser()
    assert missing.type is pytest.fail.Exception and "requirements-dev.txt" in str(missing.value)


def test_caption_click_a_word_then_explain_a_typed_caption(page, scene, tiny, app_settings, tmp_path):
    from playwright.sync_api import expect

    _upload(page, scene)
    expected = tiny.caption(image_for(0), **app_settings).words  # the page shows what the library says
    assert len(expected) >= 3
    _caption(page, expected)
    tokens = page.locator("#words [role=button]")
    assert _is_selected(tokens.nth(0)) and not _is_selected(tokens.nth(2))
    before = _word_map(page)

    tokens.nth(2).click()
    page.wait_for_function("prev => document.querySelector('#word-map img')?.src !== prev", arg=before)
    after = _word_map(page)
    assert page.request.get(after).body() != page.request.get(before).body()  # another picture, not a new name
    tokens = page.locator("#words [role=button]")
    expect(tokens.nth(2)).to_have_attribute("style", re.compile(re.escape(SELECTED)))
    assert [_is_selected(tokens.nth(k)) for k in range(tokens.count())] == [k == 2 for k in range(len(expected))]

    typed = CAPTIONS[1]
    page.fill("#typed textarea", typed)
    page.click("#explain-btn")
    expect(page.locator("#words [role=button] .text")).to_have_text(typed.split())
    assert _words(page) == typed.split()
    page.screenshot(path=tmp_path / "explained.png", full_page=True)


def test_a_bad_upload_shows_an_error_and_the_page_still_works(page, scene, tiny, app_settings, tmp_path):
    from playwright.sync_api import expect

    bad = tmp_path / "not-a-photo.png"
    bad.write_text("this is a text file wearing a .png name\n" * 20)
    _upload(page, str(bad))
    page.click("#caption-btn")
    toast = page.locator("[data-testid=toast-body]").filter(has_text="Could not read this file as an image")
    expect(toast.first).to_be_visible()
    # to_be_visible ignores opacity, and the toast fades in: wait until a person could read it
    page.wait_for_function("e => getComputedStyle(e).opacity === '1'", arg=toast.first.element_handle())
    page.screenshot(path=tmp_path / "bad-upload.png")  # the viewport, where the toast is

    _upload(page, scene)
    _caption(page, tiny.caption(image_for(0), **app_settings).words)
    _word_map(page)
    page.screenshot(path=tmp_path / "recovered.png", full_page=True)


def test_click_a_word_then_check_its_map_and_see_the_methods_side_by_side(page, scene, tiny, app_settings):
    from playwright.sync_api import expect

    from captioner import check_word

    _upload(page, scene)
    _caption(page, tiny.caption(image_for(0), **app_settings).words)
    page.locator("#words [role=button]").nth(1).click()
    expect(page.locator("#words [role=button]").nth(1)).to_have_attribute("style", re.compile(re.escape(SELECTED)))
    page.click("#check-btn")
    res = tiny.remap(tiny.caption(image_for(0), **app_settings))  # the page's default map of its caption
    want = check_word(tiny, res, 1)
    verdict = page.locator("#check-verdict")
    expect(verdict).to_contain_text(f"{want.verdict}: '{res.words[1]}'")
    expect(page.locator("#check-curve img")).to_be_visible()
    page.click("#compare-btn")
    expect(page.locator("#methods img")).to_have_count(3)


def test_a_word_clicked_after_the_last_answer_stays_selected_when_the_caption_ends(page, scene, monkeypatch):
    """The caption streams (attention maps, then the default map), and Gradio's completion message repeats the last
    answer, drawn for the word selected when it was made. A click between the last answer and the end (held open
    here for a few seconds) must still be what the page shows once the caption has ended."""
    import time

    from playwright.sync_api import expect

    import captioner

    real = captioner.Captioner.caption_stream

    def ends_late(self, *args, **kwargs):
        yield from real(self, *args, **kwargs)
        time.sleep(3)  # the stream's last answer is out; its completion comes later

    monkeypatch.setattr(captioner.Captioner, "caption_stream", ends_late)
    _upload(page, scene)
    page.click("#caption-btn")
    expect(page.get_by_text("maps: relevance")).to_be_visible()  # the last answer, the default map, is showing
    tokens = page.locator("#words [role=button]")
    tokens.nth(1).click()
    expect(tokens.nth(1)).to_have_attribute("style", re.compile(re.escape(SELECTED)))
    page.wait_for_timeout(5000)  # past the completion and what follows it
    expect(tokens.nth(1)).to_have_attribute("style", re.compile(re.escape(SELECTED)))
    assert not _is_selected(tokens.first)
