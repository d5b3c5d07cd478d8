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
