"""Generation settings, checked at the API edge, and decoding: `fastdecode` where it gives `generate`'s tokens
(greedy and beam search on GPT-2 decoders), `generate` itself otherwise."""
from __future__ import annotations

import numbers
import secrets
from dataclasses import asdict, dataclass

import torch
from transformers.modeling_outputs import BaseModelOutput

from . import fastdecode

LIMITS = {  # inclusive ranges a public Space accepts; larger values only cost other visitors time
    "max_new_tokens": (1, 64),
    "num_beams": (1, 8),
    "temperature": (0.05, 5.0),
    "top_k": (0, 1000),  # 0 turns top-k filtering off
    "top_p": (0.01, 1.0),
    "seed": (0, 2**32 - 1),
}


@dataclass(frozen=True)
class GenerationSettings:
    max_new_tokens: int = 16
    num_beams: int = 4
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 50
    top_p: float = 1.0
    seed: int | None = None  # sampling only; None draws one, reported back so a result can be reproduced

    def checked(self) -> "GenerationSettings":
        """These settings with types coerced and ranges enforced; raises ValueError saying what to change."""
        values = asdict(self)
        for name, (lo, hi) in LIMITS.items():
            v = values[name]
            if v is None and name == "seed":  # the only setting that may be left out
                continue
            if isinstance(v, bool) or not isinstance(v, numbers.Real) or v != v:
                raise ValueError(f"{name} must be a number between {lo} and {hi}, got {v!r}.")
            if not lo <= v <= hi:
                raise ValueError(f"{name} must be between {lo} and {hi}, got {v}.")
            if isinstance(lo, int) and isinstance(hi, int):
                if v != int(v):
                    raise ValueError(f"{name} must be a whole number, got {v}.")
                values[name] = int(v)
            else:
                values[name] = float(v)
        values["do_sample"] = bool(values["do_sample"])
        if values["do_sample"] and values["seed"] is None:
            values["seed"] = secrets.randbelow(2**31)
        if not values["do_sample"]:
            values["seed"] = None
        return GenerationSettings(**values)


def generate_ids(model, encoder_hidden: torch.Tensor, settings: GenerationSettings, eos_token_id: int,
                 fast: bool = True) -> fastdecode.Decoded:
    """Caption token ids (no start token, cut at the first EOS) for one image's encoder output (1, N, D), with the
    cross-attention and log-probability that produced each token when the fast path decoded it (else None).

    The encoder ran once already (its attentions give the CLS map), so decoding gets its output instead of
    pixels and never re-encodes. fast=True decodes greedy and beam search with `fastdecode` (the same tokens
    as `generate`, in less time); everything else, and fast=False, goes through `generate`.
    """
    return generate_batch(model, encoder_hidden, settings, eos_token_id, fast)[0]


@torch.no_grad()
def generate_batch(model, encoder_hidden: torch.Tensor, settings: GenerationSettings, eos_token_id: int,
                   fast: bool = True) -> list[fastdecode.Decoded]:
    """`generate_ids` for a batch of encoder outputs (B, N, D): one `Decoded` per image."""
    gen = model.generation_config
    start = gen.decoder_start_token_id if gen.decoder_start_token_id is not None else gen.bos_token_id
    if fast and start is not None and eos_token_id is not None and \
            fastdecode.unsupported(model, settings.do_sample) is None:
        if settings.num_beams == 1:
            return fastdecode.greedy(model, encoder_hidden, settings.max_new_tokens, start, eos_token_id)
        return fastdecode.beam_search(
            model, encoder_hidden, settings.max_new_tokens, settings.num_beams, start, eos_token_id,
            length_penalty=1.0 if gen.length_penalty is None else gen.length_penalty,
            early_stopping=False if gen.early_stopping is None else gen.early_stopping)
    kwargs = dict(max_new_tokens=settings.max_new_tokens, max_length=None, num_beams=settings.num_beams,
                  do_sample=settings.do_sample, num_return_sequences=1)
    if settings.do_sample:
        kwargs.update(temperature=settings.temperature, top_k=settings.top_k or None, top_p=settings.top_p)
    else:  # leave the sampling knobs unset, or transformers warns that they are ignored
        kwargs.update(temperature=None, top_k=None, top_p=None)
    with torch.random.fork_rng(devices=[]):  # seeding must not disturb the process-wide generator
        if settings.seed is not None:
            torch.manual_seed(settings.seed)
        out = model.generate(encoder_outputs=BaseModelOutput(last_hidden_state=encoder_hidden), **kwargs)
    rows = out[:, 1:].tolist()  # drop the decoder start token
    return [fastdecode.Decoded(ids[: ids.index(eos_token_id)] if eos_token_id in ids else ids, None, None)
            for ids in rows]
