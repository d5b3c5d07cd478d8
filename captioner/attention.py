"""Attention maps: per-token cross-attention rows, the ViT CLS map, layer/head choice, rollout.

The rows come from the attention that produced each token: recorded by our decoding loop along the winning
beam's history (`fastdecode`), or from one teacher-forced pass over the final tokens (`forcing`). Not from the
attentions `generate` returns: with beam search each step's attentions belong to whichever beams were alive
then, not to the caption that won.
"""
from __future__ import annotations

import numpy as np
import torch


def normalise(maps: np.ndarray) -> np.ndarray:
    """Scale each map (..., gh, gw) to [0, 1] independently; a constant map becomes all zeros."""
    flat = maps.reshape(*maps.shape[:-2], maps.shape[-2] * maps.shape[-1])  # (..., gh*gw), also for 0 maps
    lo, hi = flat.min(-1, keepdims=True), flat.max(-1, keepdims=True)
    out = (flat - lo) / np.where(hi > lo, hi - lo, 1.0)
    return out.reshape(maps.shape).astype(np.float32)


def _layers(L: int, layers: list[int] | None) -> list[int]:
    """The layer indices `layers` names among L (None: all), checked."""
    chosen = list(range(L)) if layers is None else layers
    if not chosen or any(not -L <= i < L for i in chosen):
        raise ValueError(f"layers must be indices in 0..{L - 1}, got {layers}.")
    return chosen


def _select(stacked: torch.Tensor, layers: list[int] | None, head: int | None) -> torch.Tensor:
    """(L, H, ...) -> (...): mean over the chosen layers, then one head or the mean of all."""
    L, H = stacked.shape[:2]
    chosen = _layers(L, layers)
    if head is not None and not 0 <= head < H:
        raise ValueError(f"head must be in 0..{H - 1} (or None for the mean of all heads), got {head}.")
    picked = stacked[chosen].mean(0)  # (H, ...)
    return picked.mean(0) if head is None else picked[head]


def cross_rows(cross: torch.Tensor, layers=None, head=None) -> torch.Tensor:
    """Each caption token's cross-attention row over all encoder tokens, (T, N), CLS key included.

    cross: (L, H, T, N), recorded while decoding or from a forced pass over [start] + T caption tokens. Query row
    j-1 is the decoder state that predicted token j (row 0 sits on the start token and produces the first word),
    so in 0-based caption positions, row k belongs to token k.
    """
    return _select(cross.float(), layers, head)  # (T, N)


def rollout(encoder_attentions: tuple[torch.Tensor, ...], head=None) -> torch.Tensor:
    """Attention rollout (Abnar & Zuidema 2020) through the encoder, (N, N): row i says how much of encoder
    token i's final state came from each input patch.

    Each layer's attention (mean over heads, or one head) gets the residual added, 0.5 A + 0.5 I, rows
    renormalised, and the layers are multiplied from the first to the last.
    """
    stacked = torch.stack([a[0] for a in encoder_attentions]).float()  # (L, H, N, N)
    eye = torch.eye(stacked.shape[-1], device=stacked.device)
    joint = eye
    for layer in range(stacked.shape[0]):
        a = _select(stacked, [layer], head)  # (N, N)
        a = 0.5 * a + 0.5 * eye
        joint = (a / a.sum(-1, keepdim=True)) @ joint
    return joint


def patch_maps(rows: torch.Tensor, grid: tuple[int, int], prefix: int = 1) -> np.ndarray:
    """(..., N) rows over encoder tokens -> (..., gh, gw) maps. The `prefix` tokens before the patches (CLS, a
    distillation token, registers: `layout.EncoderLayout.prefix`) are dropped: they summarise the whole image and
    have no place on the grid."""
    gh, gw = grid
    assert rows.shape[-1] - prefix == gh * gw, \
        f"{rows.shape[-1] - prefix} patch keys (after {prefix} prefix tokens) do not fill a {gh}x{gw} grid"
    return rows[..., prefix:].reshape(*rows.shape[:-1], gh, gw).detach().float().cpu().numpy()


def cls_map(encoder_attentions: tuple[torch.Tensor, ...], grid: tuple[int, int], layers=None, head=None,
            prefix: int = 1) -> np.ndarray:
    """Where the ViT's CLS token looks, (gh, gw) in [0, 1]: last layer by default, mean over heads, patch keys.
    Reads only the chosen layers of `encoder_attentions`, so lazy weights (`encoding.EncoderAttentions`) of the
    others are never computed."""
    chosen = _layers(len(encoder_attentions), [-1] if layers is None else layers)
    stacked = torch.stack([encoder_attentions[i][0] for i in chosen]).float()  # (len(chosen), H, N, N)
    row = _select(stacked, None, head)[0]  # (N,): the CLS query
    return normalise(patch_maps(row, grid, prefix))


def word_maps(maps: np.ndarray, groups: list[list[int]]) -> np.ndarray:
    """(T, gh, gw) token maps -> (W, gh, gw) word maps in [0, 1]: a word's map is the mean of its tokens' maps,
    so a word spelt by three subwords weighs each equally."""
    gh, gw = maps.shape[1:]
    out = np.zeros((len(groups), gh, gw), np.float32)
    for w, tokens in enumerate(groups):
        if tokens:
            out[w] = maps[tokens].mean(0)
    return normalise(out)

