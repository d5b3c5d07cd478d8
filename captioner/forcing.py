"""The teacher-forced pass: the decoder run once over [start] + caption tokens, and the rule that reads it.

Row k of its outputs belongs to caption token k: the decoder state at position k (the start token is position 0)
is the one that predicted token k, so its logits give token k's probability and its cross-attention is where the
decoder looked while writing token k. The last row (after the final token) predicts what would come next and is
dropped. Every map, probability and score in this project reads a forced pass through `token_log_probs` and
`forced`, never by re-deriving the offset.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


def decoder_input(start_token_id: int, ids: list[int], device) -> torch.Tensor:
    """[start] + caption tokens as the decoder's input, (1, T+1)."""
    return torch.tensor([[start_token_id, *ids]], device=device)


def token_log_probs(logits: torch.Tensor, decoder_input_ids: torch.Tensor, then: int | None = None) -> torch.Tensor:
    """log p(caption token k) for every k, (..., T), from logits (..., T+1, V) of a forced pass over
    decoder_input_ids (..., T+1): row k predicts token k, which sits at input position k + 1. then: a token the last
    row is scored for as well (EOS, for a caption's likelihood), giving (..., T+1)."""
    targets = decoder_input_ids[..., 1:]  # (..., T)
    if then is None:
        logits = logits[..., :-1, :]  # the last row predicts what comes after the caption: unused
    else:
        targets = torch.cat((targets, torch.full_like(targets[..., :1], then)), -1)  # (..., T+1)
    return logits.float().log_softmax(-1).gather(-1, targets[..., None])[..., 0]


@dataclass
class Forced:
    cross: torch.Tensor  # (L, H, T, N) cross-attention: row k looked while writing token k
    token_logp: torch.Tensor  # (T,) log-probability of each caption token


@torch.no_grad()
def forced(model, encoder_hidden: torch.Tensor, start_token_id: int, ids: list[int]) -> Forced:
    """One forced pass of `model`'s decoder over caption tokens `ids` for one image's encoder output (1, N, D)."""
    decoder_input_ids = decoder_input(start_token_id, ids, encoder_hidden.device)  # (1, T+1)
    out = model(encoder_outputs=(encoder_hidden,), decoder_input_ids=decoder_input_ids, output_attentions=True)
    cross = torch.stack([a[0, :, :-1] for a in out.cross_attentions])  # (L, H, T, N): the last row predicts nothing
    return Forced(cross, token_log_probs(out.logits, decoder_input_ids)[0])
