"""The three map methods, one function each, all returning `Maps`: word maps, raw token maps, the CLS map and
the token probabilities they were made with.

- `attention_maps`: the decoder's cross-attention rows, mean over layers and heads (or the ones chosen).
- `rollout_maps`: those rows pushed back through the encoder's rolled-out self-attention.
- `relevance_maps`: Chefer et al.'s gradient-weighted relevance (`relevance.py`).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from . import attention
from .forcing import decoder_input
from .layout import EncoderLayout
from .relevance import relevance_rows


@dataclass
class Maps:
    words: np.ndarray  # (W, gh, gw) float32 in [0, 1]
    tokens: np.ndarray  # (T, gh, gw) float32, raw per-token maps (relevance: for the whole caption)
    cls: np.ndarray  # (gh, gw) float32 in [0, 1]
    probs: np.ndarray  # (T,) probability of each caption token


def attention_maps(cross: torch.Tensor, encoder_attentions: tuple[torch.Tensor, ...], token_logp: torch.Tensor,
                   groups: list[list[int]], layout: EncoderLayout, layers=None, head=None) -> Maps:
    """cross: (L, H, T, N), row k written while producing token k; encoder_attentions: L_enc tensors (1, H, N, N),
    or None for an encoder without a CLS token (its CLS map is then all zeros); token_logp (T,)."""
    rows = attention.cross_rows(cross, layers, head)  # (T, N)
    tokens = attention.patch_maps(rows, layout.grid, layout.prefix)  # (T, gh, gw)
    cls = attention.cls_map(encoder_attentions, layout.grid, layers, head, layout.prefix) if layout.has_cls \
        else np.zeros(layout.grid, np.float32)
    return Maps(attention.word_maps(tokens, groups), tokens, cls, _probs(token_logp))


def rollout_maps(cross: torch.Tensor, encoder_attentions: tuple[torch.Tensor, ...], token_logp: torch.Tensor,
                 groups: list[list[int]], layout: EncoderLayout, layers=None, head=None) -> Maps:
    """As `attention_maps`, each row pushed back through the encoder's patch mixing; CLS: the rollout's CLS row."""
    joint = attention.rollout(encoder_attentions, head)  # (N, N)
    rows = attention.cross_rows(cross, layers, head).to(joint)  # (T, N)
    tokens = attention.patch_maps(rows @ joint, layout.grid, layout.prefix)  # (T, gh, gw)
    return Maps(attention.word_maps(tokens, groups), tokens,
                attention.normalise(attention.patch_maps(joint[0], layout.grid, layout.prefix)), _probs(token_logp))


def relevance_maps(model, enc, start_token_id: int, ids: list[int], groups: list[list[int]],
                   layout: EncoderLayout, through_encoder: bool = True) -> Maps:
    """enc: the encoder output with attentions. One target per word plus the whole caption (its row gives the raw
    token maps); CLS: the encoder relevance's CLS row. through_encoder=False: see `relevance.relevance_rows`."""
    device = enc.last_hidden_state.device
    targets = torch.zeros(len(groups) + 1, len(ids), device=device)  # (W+1, T)
    for w, g in enumerate(groups):
        targets[w, g] = 1
    targets[-1] = 1
    r_ti, r_ii, token_logp = relevance_rows(model, enc, decoder_input(start_token_id, ids, device), targets,
                                            through_encoder)
    words = torch.stack([r_ti[w, g].sum(0) if g else torch.zeros_like(r_ti[0, 0])
                         for w, g in enumerate(groups)]) if groups else r_ti[:0, 0]  # (W, N)
    grid, prefix = layout.grid, layout.prefix
    return Maps(attention.normalise(attention.patch_maps(words, grid, prefix)),
                attention.patch_maps(r_ti[-1, :len(ids)], grid, prefix),
                attention.normalise(attention.patch_maps(r_ii[0], grid, prefix)), _probs(token_logp))


def _probs(token_logp: torch.Tensor) -> np.ndarray:
    return token_logp.detach().float().exp().cpu().numpy()
