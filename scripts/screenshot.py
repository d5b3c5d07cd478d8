"""Regenerate assets/page.png, the README's picture of the page after a word click.

    .venv/bin/python scripts/screenshot.py [--word star] [--out assets/page.png]
    .venv/bin/python scripts/screenshot.py --check --out assets/check.png   # with the map check open

Starts the real page (`app.build_demo` with the bundled model) on 127.0.0.1, opens it in Debian's headless
Chromium through playwright (never `playwright install`: the browser is /usr/bin/chromium), captions an example
scene, clicks the word, waits for its overlay (with --check: runs "Can I trust this map?" on it and shows the
methods side by side), stops the server and saves the page as a 256-colour PNG.
"""
from __future__ import annotations

import argparse
import io
import os
import sys
from pathlib import Path

from PIL import Image

import servers  # scripts/servers.py: this script's folder is on sys.path

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # before gradio is imported
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

CHROMIUM = "/usr/bin/chromium"
WAIT_MS = 120_000  # the model and the browser share the CPU


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--image", default=str(ROOT / "assets" / "examples" / "scene_17.png"))
    parser.add_argument("--word", default="star", help="the caption word to click")
    parser.add_argument("--out", default=str(ROOT / "assets" / "page.png"))
    parser.add_argument("--width", type=int, default=1200, help="viewport width in CSS pixels")
    parser.add_argument("--check", action="store_true", help="also check the word's map and compare the methods")
    args = parser.parse_args(argv)

    import gradio as gr
    from playwright.sync_api import expect, sync_playwright

    import app
    import captioner
    from captioner import images

    demo = app.build_demo([captioner.BUNDLED_MODEL])
    url = servers.launch(demo, theme=gr.themes.Soft(), max_file_size=images.MAX_FILE_BYTES)
    try:
        expect.set_options(timeout=WAIT_MS)
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=[
                "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-background-networking"])
            page = browser.new_page(viewport={"width": args.width, "height": 900})
            page.set_default_timeout(WAIT_MS)
            page.goto(url, wait_until="load")  # never "networkidle": the heartbeat keeps a request open
            page.locator("#image input[type=file]").set_input_files(args.image)
            page.click("#caption-btn")
            tokens = page.locator("#words [role=button]")
            expect(tokens.first).to_be_visible()
            words = [t.strip() for t in page.locator("#words [role=button] .text").all_inner_texts()]
            if args.word not in words:
                raise SystemExit(f"{args.word!r} is not in the caption {' '.join(words)!r}; pick one of its words.")
            before = page.locator("#word-map img").get_attribute("src")
            tokens.nth(words.index(args.word)).click()
            page.wait_for_function("prev => document.querySelector('#word-map img')?.src !== prev", arg=before)
            if args.check:
                page.click("#check-btn")
                expect(page.locator("#check-curve img")).to_be_visible()
                page.click("#compare-btn")
                expect(page.locator("#methods img")).to_have_count(3)
            page.wait_for_function("() => [...document.querySelectorAll('img')].every(i => i.complete)")
            page.mouse.move(0, 0)  # no hover highlight in the picture
            shot = page.screenshot(full_page=True)
            browser.close()
    finally:
        demo.close()
    # 256 colours (median cut keeps the page's near-whites apart), dithered so the heatmaps keep their gradients
    rgb = Image.open(io.BytesIO(shot)).convert("RGB")
    palette = rgb.quantize(256, method=Image.Quantize.MEDIANCUT)
    rgb.quantize(palette=palette, dither=Image.Dither.FLOYDSTEINBERG).save(args.out, optimize=True)
    print(f"{args.out}: caption {' '.join(words)!r}, clicked {args.word!r}")


if __name__ == "__main__":
    main()
