"""Where each encoder token sits: worked out once per model at load, for every encoder family the page serves.

The decoder's cross-attention reads the encoder's output tokens. For ViT and BEiT they are [CLS] + a grid of
patches; DeiT puts a distillation token after CLS; ViTs with registers put those after CLS; Swin (Donut) has no
CLS and its output is the grid of its last, coarsest stage. The grid comes from the config (image size over patch
size, halved per Swin stage after the first); the number of tokens before the patches is what one encoder pass
on a blank image shows beyond the grid, so an encoder the config alone would mislead is caught at load.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

WINDOWED = ("swin", "swinv2", "donut-swin")  # attention only within local windows: no token-to-token matrix


@dataclass(frozen=True)
class EncoderLayout:
    grid: tuple[int, int]  # (gh, gw): patch tokens the decoder reads, row-major after the prefix
    prefix: int  # tokens before the patches: CLS, DeiT's distillation token, registers (0 for Swin)
    has_cls: bool  # token 0 is a CLS token summarising the image
    windowed: bool  # windowed self-attention (Swin): no CLS map, no rollout, no encoder relevance
    model_type: str  # the encoder's config.model_type, for messages

    @property
    def tokens(self) -> int:
        return self.prefix + self.grid[0] * self.grid[1]


def _pair(v) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else tuple(v)


def config_grid(encoder_config) -> tuple[int, int]:
    """(gh, gw) of the encoder's output patches from its config (non-square images and patches allowed)."""
    (ih, iw), (ph, pw) = _pair(encoder_config.image_size), _pair(encoder_config.patch_size)
    down = 2 ** (len(encoder_config.depths) - 1) if getattr(encoder_config, "depths", None) else 1  # Swin stages
    return ih // (ph * down), iw // (pw * down)


@torch.no_grad()
def encoder_layout(model, processor) -> EncoderLayout:
    """The layout of `model.encoder`'s output tokens, checked against one pass on a blank image."""
    cfg = model.config.encoder
    gh, gw = config_grid(cfg)
    blank = np.full((32, 32, 3), 128, np.uint8)
    pixel_values = processor(images=blank, return_tensors="pt")["pixel_values"]  # (1, 3, h, w)
    device, dtype = next(model.parameters()).device, next(model.parameters()).dtype
    n = model.encoder(pixel_values=pixel_values.to(device, dtype)).last_hidden_state.shape[1]
    prefix = n - gh * gw
    if prefix < 0 or prefix > 16:
        raise RuntimeError(f"Cannot place this {cfg.model_type} encoder's {n} output tokens on its {gh}x{gw} patch "
                           "grid (from image_size and patch_size in its config).")
    windowed = cfg.model_type in WINDOWED
    return EncoderLayout((gh, gw), prefix, prefix >= 1 and not windowed, windowed, cfg.model_type)


FULL_VIEW = (0.0, 0.0, 1.0, 1.0)


def _crops_or_pads(processor) -> bool:
    size = getattr(processor, "size", None) or {}
    return bool(getattr(processor, "do_center_crop", False) or getattr(processor, "do_pad", False) or
                getattr(processor, "do_thumbnail", False) or "shortest_edge" in size or "longest_edge" in size)


def image_view(processor, size: tuple[int, int]) -> tuple[float, float, float, float]:
    """Where the model's input canvas lies on a photo of `size` (H, W): (x0, y0, x1, y1) as fractions of the photo's
    width and height. (0, 0, 1, 1) when the processor squashes the whole photo; inside it when it centre-crops
    (the map covers only the crop); beyond it when it pads.

    Measured, not read from the processor's settings: a photo-sized probe whose red channel ramps with x and green
    with y goes through the processor, and straight lines fitted to what comes out give the canvas's edges, for
    any mix of resizing, cropping and padding.
    """
    if not _crops_or_pads(processor):
        return FULL_VIEW
    H, W = size
    scale = min(1.0, 512 / max(H, W))  # the fractions do not depend on the resolution
    h, w = max(2, round(H * scale)), max(2, round(W * scale))
    probe = np.zeros((h, w, 3), np.uint8)
    probe[..., 0] = np.round(np.linspace(0, 255, w))[None, :]  # x ramp
    probe[..., 1] = np.round(np.linspace(0, 255, h))[:, None]  # y ramp
    probe[..., 2] = 255  # the photo, as opposed to padding
    out = processor(images=probe, return_tensors="np")["pixel_values"][0].astype(np.float64)  # (3, ch, cw)
    if getattr(processor, "do_normalize", False):
        mean, std = np.asarray(processor.image_mean)[:, None, None], np.asarray(processor.image_std)[:, None, None]
        out = out * std + mean
    if getattr(processor, "do_rescale", False):
        out = out / processor.rescale_factor
    ch, cw = out.shape[1:]
    inside = out[2] > 127  # (ch, cw)
    edges = []
    for ramp, axis, n in ((out[0], 1, w), (out[1], 0, h)):  # x along columns, y along rows
        seen = inside.any(1 - axis)  # (cw,) or (ch,): canvas columns (rows) showing some of the photo
        line = (ramp * inside).sum(1 - axis) / np.maximum(inside.sum(1 - axis), 1)  # the ramp there, padding left out
        u = (np.arange(line.shape[0]) + 0.5) / line.shape[0]  # canvas pixel centres, as fractions
        a, b = np.polyfit(u[seen], line[seen] / 255 * (n - 1) / n + 0.5 / n, 1)  # photo fraction = a u + b
        edges.append((b, a + b))
    (x0, x1), (y0, y1) = edges
    # the probe's 8-bit ramp measures to about 1/255: an edge that close to the photo's own is the photo's edge
    return tuple(float(round(v)) if abs(v - round(v)) < 0.004 else round(float(v), 4) for v in (x0, y0, x1, y1))
