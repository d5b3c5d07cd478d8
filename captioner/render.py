"""Heatmap overlays with OpenCV. Everything in and out is `(H, W, 3) uint8 RGB`; BGR stays inside this module.

Maps are `(gh, gw)` float arrays in [0, 1] on the encoder's patch grid, which covers the model's input canvas.
Where that canvas lay on the photo is the `view` (`layout.image_view`): the whole photo for processors that
squash it (ViT's), its middle for ones that centre-crop, more than the photo for ones that pad. The grid is
stretched over the view, so every patch lands on the pixels it saw; what the model never saw is dimmed.
"""
from __future__ import annotations

import cv2
import numpy as np

COLORMAP = cv2.COLORMAP_TURBO  # perceptually ordered, readable on photos; low = blue, high = red
DISPLAY_MIN_SIDE = 384  # small inputs (the 96-px scenes) are enlarged for display so a patch is visible
PAGE_MAX_SIDE = 1024  # the page draws on at most this: a 2048 px photo's overlays show no more in a browser


def shrink(image: np.ndarray, max_side: int = PAGE_MAX_SIDE) -> np.ndarray:
    """(H, W, 3) -> the same picture with its longer side at most max_side (area-averaged); smaller ones as they are."""
    h, w = image.shape[:2]
    if max(h, w) <= max_side:
        return image
    scale = max_side / max(h, w)
    return cv2.resize(image, (max(1, round(w * scale)), max(1, round(h * scale))), interpolation=cv2.INTER_AREA)


def display_image(image: np.ndarray, min_side: int = DISPLAY_MIN_SIDE) -> np.ndarray:
    """Enlarge small images (nearest neighbour, so pixels stay crisp) for display; others pass through."""
    h, w = image.shape[:2]
    factor = int(np.ceil(min_side / min(h, w)))
    if factor <= 1:
        return image
    return cv2.resize(image, (w * factor, h * factor), interpolation=cv2.INTER_NEAREST)


def upsample(heat: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """(gh, gw) map in [0, 1] -> (h, w) float32 in [0, 1], smoothly resized to size=(h, w) as overlays draw it
    (bicubic, with its overshoot clipped)."""
    h, w = size
    return np.clip(cv2.resize(heat.astype(np.float32), (w, h), interpolation=cv2.INTER_CUBIC), 0.0, 1.0)


def colourize(heat: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """(gh, gw) map in [0, 1] -> (h, w, 3) uint8 RGB colours, smoothly resized to size=(h, w)."""
    up = upsample(heat, size)  # (h, w)
    bgr = cv2.applyColorMap((up * 255).astype(np.uint8), COLORMAP)  # (h, w, 3) BGR
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


FULL_VIEW = (0.0, 0.0, 1.0, 1.0)  # as `layout.FULL_VIEW`; repeated so that this module needs only numpy and cv2
UNSEEN = 0.35  # brightness of the parts of the photo the model never saw (cropped away by its processor)


def blend_heatmap(image: np.ndarray, heat: np.ndarray, alpha: float = 0.5, grid: bool = False,
                  view: tuple[float, float, float, float] = FULL_VIEW) -> np.ndarray:
    """Overlay a (gh, gw) map on an (H, W, 3) uint8 RGB image -> new (H, W, 3) uint8 RGB; the input is untouched.

    view (x0, y0, x1, y1): where the model's input lay on the photo, as fractions of its width and height
    (`layout.image_view`): the map is drawn there only, and what the model never saw is dimmed. grid=True draws
    the patch grid the ViT reads (its "words") on top.
    """
    assert image.ndim == 3 and image.shape[2] == 3 and image.dtype == np.uint8, "image must be (H, W, 3) uint8"
    assert heat.ndim == 2, f"heat must be (gh, gw), got {heat.shape}"
    h, w = image.shape[:2]
    x0, y0, x1, y1 = view
    left, top = round(x0 * w), round(y0 * h)  # the canvas's corner on the photo (negative: padded)
    cw, ch = max(1, round(x1 * w) - left), max(1, round(y1 * h) - top)  # so its far edge rounds as its near one
    colours = colourize(heat, (ch, cw))  # (ch, cw, 3): the map over the whole canvas
    px0, py0, px1, py1 = max(left, 0), max(top, 0), min(left + cw, w), min(top + ch, h)  # the part on the photo
    out = (image * UNSEEN).astype(np.uint8) if (px0, py0, px1, py1) != (0, 0, w, h) else image.copy()
    seen = image[py0:py1, px0:px1]
    out[py0:py1, px0:px1] = cv2.addWeighted(seen, 1.0 - alpha, colours[py0 - top:py1 - top, px0 - left:px1 - left],
                                            alpha, 0.0)
    if grid:
        gh, gw = heat.shape
        for i in range(1, gh):
            y = top + round(i * ch / gh)
            if py0 <= y < py1:
                out[y, px0:px1] = (255, 255, 255)
        for j in range(1, gw):
            x = left + round(j * cw / gw)
            if px0 <= x < px1:
                out[py0:py1, x] = (255, 255, 255)
    return out


def _label(img: np.ndarray, text: str, y: int, x: int = 6, scale: float = 0.5) -> None:
    cv2.putText(img, text, (x, y), cv2.FONT_HERSHEY_SIMPLEX, scale, (0, 0, 0), 3, cv2.LINE_AA)
    cv2.putText(img, text, (x, y), cv2.FONT_HERSHEY_SIMPLEX, scale, (255, 255, 255), 1, cv2.LINE_AA)


def with_colour_scale(overlay: np.ndarray, title: str = "") -> np.ndarray:
    """Append a colour bar (low -> high attention) and an optional title under an overlay."""
    h, w = overlay.shape[:2]
    bar_h = max(28, h // 14)
    ramp = np.tile(np.linspace(0, 1, w, dtype=np.float32), (bar_h // 2, 1))  # (bar_h/2, w)
    bar = np.full((bar_h, w, 3), 32, np.uint8)
    bar[: bar_h // 2] = colourize(ramp, ramp.shape)
    scale = max(0.35, min(0.6, w / 900))
    _label(bar, "low", bar_h - 4, 4, scale)
    (tw, _), _ = cv2.getTextSize("high", cv2.FONT_HERSHEY_SIMPLEX, scale, 1)
    _label(bar, "high", bar_h - 4, w - tw - 4, scale)
    if title:
        (tw, _), _ = cv2.getTextSize(title, cv2.FONT_HERSHEY_SIMPLEX, scale, 1)
        _label(bar, title, bar_h - 4, max(4, (w - tw) // 2), scale)
    return np.concatenate([overlay, bar], axis=0)


def titled_overlay(image: np.ndarray, heat: np.ndarray, title: str, grid: bool = False,
                   view: tuple[float, float, float, float] = FULL_VIEW) -> np.ndarray:
    """What the page shows for one map: the (display-sized) image with the map blended in where the model looked
    (`view`), a colour scale and a title underneath. (H, W, 3) uint8 RGB -> (H', W', 3) uint8 RGB."""
    return with_colour_scale(blend_heatmap(display_image(image), heat, grid=grid, view=view), title)


def boxed_overlay(image: np.ndarray, heat: np.ndarray, box: tuple[int, int, int, int], title: str,
                  view: tuple[float, float, float, float] = FULL_VIEW) -> np.ndarray:
    """`titled_overlay` with a box drawn on it: box (x0, y0, x1, y1) in the pixels of `image`, x1/y1 exclusive
    (scaled with the picture when a small image is enlarged for display). (H, W, 3) uint8 RGB -> (H', W', 3)."""
    shown = display_image(image)
    s = shown.shape[1] / image.shape[1]  # display_image enlarges by a whole factor, the same on both sides
    out = blend_heatmap(shown, heat, view=view)
    x0, y0, x1, y1 = (round(v * s) for v in box)
    thick = max(2, round(min(out.shape[:2]) / 160))
    cv2.rectangle(out, (x0, y0), (x1 - 1, y1 - 1), (0, 0, 0), thick + 2, cv2.LINE_AA)  # dark rim: visible on any map
    cv2.rectangle(out, (x0, y0), (x1 - 1, y1 - 1), (255, 255, 255), thick, cv2.LINE_AA)
    return with_colour_scale(out, title)


def word_strip(image: np.ndarray, words: list[str], maps: np.ndarray, tile: int = 160,
               columns: int = 6, grid: bool = False, view: tuple[float, float, float, float] = FULL_VIEW
               ) -> np.ndarray:
    """The classic per-word attention figure: one labelled overlay per word, `columns` to a row.

    image (H, W, 3) uint8, maps (len(words), gh, gw) -> (rows*(tile+label), columns*tile, 3) uint8 RGB.
    """
    if not words:
        return np.full((tile // 2, tile, 3), 255, np.uint8)
    h, w = image.shape[:2]
    th, tw = (tile, max(1, round(tile * w / h))) if h >= w else (max(1, round(tile * h / w)), tile)
    small = cv2.resize(image, (tw, th), interpolation=cv2.INTER_AREA)
    label_h = 22
    columns = min(columns, len(words))
    rows = -(-len(words) // columns)
    sheet = np.full((rows * (th + label_h), columns * tw, 3), 255, np.uint8)
    for k, (word, heat) in enumerate(zip(words, maps)):
        r, c = divmod(k, columns)
        y, x = r * (th + label_h), c * tw
        sheet[y + label_h: y + label_h + th, x: x + tw] = blend_heatmap(small, heat, grid=grid, view=view)
        cv2.putText(sheet, f"{k + 1}. {word}"[:22], (x + 4, y + 16), cv2.FONT_HERSHEY_SIMPLEX, 0.5, (0, 0, 0), 1,
                    cv2.LINE_AA)
    return sheet


def encode_png(image: np.ndarray) -> bytes:
    """(H, W, 3) uint8 RGB -> PNG bytes."""
    ok, buf = cv2.imencode(".png", cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
    assert ok, "PNG encoding failed"
    return buf.tobytes()
