"""The image encoder at its floor: SDPA in every layer, attention weights only for the layers a map reads.

Eager attention computes every layer's weights (B, H, N, N) on every pass, and most calls read few of them or
none: decoding reads only the encoder's output, the attention method's CLS map one layer. So the encoder's config
names `RECORDING`, an attention function registered with transformers' `AttentionInterface`, which every encoder
family here (ViT, DeiT, BEiT, Swin) calls with its queries, keys, values and mask (BEiT and Swin pass their
relative-position bias as the mask). Inside `encode` it runs SDPA and records (query, key, mask, scaling) per
call, in layer order; the output's `attentions` is then an `EncoderAttentions`, which computes a layer's weights
from what that layer recorded, with eager's own ops, the first time a map reads it. Anywhere else (training,
tests, `cap.model(..., output_attentions=True)`) it is eager attention, weights and gradients as before.

A layer's weights are a function of its queries, keys, mask and scaling alone, so the weights computed later are
the ones eager attention computes from the same inputs. What differs from an all-eager encoder is only that SDPA
rounds a layer's output differently in the last bits, which the next layer's queries carry.
"""
from __future__ import annotations

from collections.abc import Sequence
from contextvars import ContextVar
from typing import NamedTuple

import torch
from torch import nn
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.modeling_outputs import BaseModelOutput

RECORDING = "captioner_recording"  # the encoder config's attn_implementation: SDPA inside `encode`, eager outside


class Call(NamedTuple):
    """What one attention call's weights are made from."""
    query: torch.Tensor  # (B, H, N, d)
    key: torch.Tensor  # (B, H, N, d)
    mask: torch.Tensor | None  # added to the scores: (B or 1, H or 1, N, N), e.g. BEiT's relative-position bias
    scaling: float | None  # None: d ** -0.5, as eager attention takes it


_calls: ContextVar[list[Call] | None] = ContextVar("captioner_encoder_calls", default=None)


def attention_weights(query: torch.Tensor, key: torch.Tensor, mask: torch.Tensor | None,
                      scaling: float | None) -> torch.Tensor:
    """(B, H, N, d) queries and keys -> (B, H, N, N) weights, by the ops of transformers' eager attention
    (ViT, DeiT, BEiT, Swin alike): scaled scores, the mask added, softmax in float32, back to the queries' dtype."""
    scaling = query.size(-1) ** -0.5 if scaling is None else scaling
    scores = torch.matmul(query, key.transpose(2, 3)) * scaling  # (B, H, N, N)
    if mask is not None:
        scores = scores + mask
    return nn.functional.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)


def recording_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                        attention_mask: torch.Tensor | None, scaling: float | None = None, dropout: float = 0.0,
                        **kwargs) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The encoder's attention: (B, H, N, d) each -> ((B, N, H, d) output, (B, H, N, N) weights or None).

    Inside `encode`: SDPA, and (query, key, mask, scaling) recorded; no weights. Elsewhere: eager attention."""
    calls = _calls.get()
    if calls is None:
        weights = attention_weights(query, key, attention_mask, scaling)  # (B, H, N, N)
        weights = nn.functional.dropout(weights, p=dropout, training=module.training)
        return torch.matmul(weights, value).transpose(1, 2).contiguous(), weights
    calls.append(Call(query, key, attention_mask, scaling))
    # eager attention applies no causal mask of its own, so neither does SDPA here
    return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                  is_causal=False, **kwargs)


AttentionInterface.register(RECORDING, recording_attention)


class EncoderAttentions(Sequence):
    """The encoder's attention weights, one (B, H, N, N) tensor per layer, first layer first: each computed from
    its layer's recorded call when first read, then kept. Reads like the tuple eager attention returns."""

    def __init__(self, calls: list[Call]):
        self.calls = calls
        self._weights: list[torch.Tensor | None] = [None] * len(calls)

    def __len__(self) -> int:
        return len(self.calls)

    def __getitem__(self, layer):
        if isinstance(layer, slice):
            return tuple(self[i] for i in range(len(self))[layer])
        layer = range(len(self))[layer]  # negative indices; IndexError past the end ends iteration
        if self._weights[layer] is None:
            self._weights[layer] = attention_weights(*self.calls[layer])  # (B, H, N, N)
        return self._weights[layer]

    @property
    def computed(self) -> list[int]:
        """The layers whose weights have been computed so far."""
        return [i for i, w in enumerate(self._weights) if w is not None]

    def images(self, start: int, stop: int) -> EncoderAttentions:
        """The weights of images start..stop-1 of the batch, as lazy as these: (stop-start, H, N, N) per layer."""
        def part(t):  # a mask shared by the batch (leading 1) stays whole
            return t if t is None or t.shape[0] == 1 else t[start:stop]
        return EncoderAttentions([Call(c.query[start:stop], c.key[start:stop], part(c.mask), c.scaling)
                                  for c in self.calls])


def record_encoder(model) -> None:
    """Give `model.encoder` (a VisionEncoderDecoderModel's) the `RECORDING` attention, the decoder untouched."""
    model.encoder.set_attn_implementation(RECORDING)


@torch.no_grad()
def encode(encoder, pixel_values: torch.Tensor, weights: bool) -> BaseModelOutput:
    """Run `encoder` on (B, 3, h, w) pixel values -> its output: last_hidden_state (B, N, D), and with weights=True
    attentions, one (B, H, N, N) per layer (an `EncoderAttentions` computing each when read).

    An encoder without the `RECORDING` attention runs eagerly, weights and all. So does one whose layers turn out
    not to call it once each (a family that does not route through `AttentionInterface`): from then on for good,
    since correct weights matter more than the time SDPA saves."""
    if encoder.config._attn_implementation != RECORDING:
        return encoder(pixel_values=pixel_values, output_attentions=weights)
    calls = []
    token = _calls.set(calls)
    try:
        out = encoder(pixel_values=pixel_values)
    finally:
        _calls.reset(token)
    if not weights:
        return out
    if len(calls) != getattr(encoder.config, "num_hidden_layers", None):
        encoder.set_attn_implementation("eager")
        return encoder(pixel_values=pixel_values, output_attentions=True)
    out["attentions"] = EncoderAttentions(calls)
    return out


def one_image(enc: BaseModelOutput, i: int) -> BaseModelOutput:
    """Image i of a batch's encoder output: last_hidden_state (1, N, D), attentions (1, H, N, N) per layer, still
    computed only when read where the batch's were."""
    attentions = enc.attentions
    if isinstance(attentions, EncoderAttentions):
        attentions = attentions.images(i, i + 1)
    elif attentions:
        attentions = tuple(a[i:i + 1] for a in attentions)
    return BaseModelOutput(last_hidden_state=enc.last_hidden_state[i:i + 1], attentions=attentions)
