"""Generation settings, checked at the API edge, and decoding: `fastdecode` where it gives `generate`'s tokens
(greedy and beam search on GPT-2 decoders, a generation config that adds no logits processor), `generate` itself
otherwise. Either way a caption is what came before the first EOS (`until_eos`), returned as a `Decoded`."""
from __future__ import annotations

import numbers
import secrets
from dataclasses import asdict, dataclass

import torch
from transformers import GPT2LMHeadModel
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
    """How to decode a caption: beam search by default, greedy with num_beams=1, sampling with do_sample=True."""
    max_new_tokens: int | None = None  # None: the model's own (`Captioner.default_max_new_tokens`)
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
            if v is None and name in ("seed", "max_new_tokens"):  # left to be drawn / to the model's own length
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


# Generation-config fields that add a logits processor or stopping rule when set. The fast path reproduces
# plain greedy and beam search only, so any of these set to something else sends decoding back to `generate`.
NEUTRAL = {
    "repetition_penalty": (None, 1.0), "encoder_repetition_penalty": (None, 1.0), "no_repeat_ngram_size": (None, 0),
    "encoder_no_repeat_ngram_size": (None, 0), "bad_words_ids": (None,), "min_length": (None, 0),
    "min_new_tokens": (None, 0), "forced_bos_token_id": (None,), "forced_eos_token_id": (None,),
    "exponential_decay_length_penalty": (None,), "suppress_tokens": (None,), "begin_suppress_tokens": (None,),
    "sequence_bias": (None,), "guidance_scale": (None, 1.0), "renormalize_logits": (None, False),
    "remove_invalid_values": (None, False), "watermarking_config": (None,), "max_time": (None,),
    "stop_strings": (None,), "num_beam_groups": (None, 1), "diversity_penalty": (None, 0.0),
    "low_memory": (None, False), "token_healing": (None, False), "penalty_alpha": (None, 0.0),
    "dola_layers": (None,), "constraints": (None,), "force_words_ids": (None,), "use_mtp": (None, False),
    "prompt_lookup_num_tokens": (None,), "assistant_early_exit": (None,), "speculation_type": (None,),
}


def unsupported(model, do_sample: bool) -> str | None:
    """Why the fast path cannot reproduce `model.generate` for these settings, or None when it can."""
    if do_sample:
        return "sampling"
    if not isinstance(getattr(model, "decoder", None), GPT2LMHeadModel):
        return f"decoder is {type(getattr(model, 'decoder', None)).__name__}, not GPT-2"
    if not model.decoder.config.add_cross_attention:
        return "decoder has no cross-attention"
    gen = model.generation_config
    for name, neutral in NEUTRAL.items():
        if getattr(gen, name, None) not in neutral:
            return f"generation config sets {name}"
    eos = gen.eos_token_id
    if isinstance(eos, list) and len(eos) != 1:
        return "several EOS tokens"
    return None


def until_eos(ids: list[int], eos_token_id: int | None) -> list[int]:
    """The caption in generated token ids: the tokens before the first EOS, all of them when none came (the limit
    ended it). The one rule for every decoding path."""
    return ids[: ids.index(eos_token_id)] if eos_token_id in ids else ids


@dataclass
class Decoded:
    """One caption as decoding produced it."""
    ids: list[int]  # caption tokens after the start token, cut before the first EOS
    cross: torch.Tensor | None  # (L, H, T, N) cross-attention of the query that produced each token; None: unknown
    logp: torch.Tensor | None  # (T,) log-probability of each token when it was chosen; None: unknown

    @classmethod
    def cut(cls, ids: list[int], eos_token_id: int | None, cross: torch.Tensor | None = None,
            logp: torch.Tensor | None = None) -> "Decoded":
        """Generated ids, with their attention (L, H, steps, N) and log-probabilities (steps,), cut to the caption
        by `until_eos`."""
        ids = until_eos(ids, eos_token_id)
        T = len(ids)
        return cls(ids, None if cross is None else cross[:, :, :T], None if logp is None else logp[:T])


def generate_ids(model, encoder_hidden: torch.Tensor, settings: GenerationSettings, eos_token_id: int,
                 fast: bool = True) -> Decoded:
    """Caption token ids (no start token, cut at the first EOS) for one image's encoder output (1, N, D), with the
    cross-attention and log-probability that produced each token when the fast path decoded it (else None).

    The encoder ran once already (its attentions give the CLS map), so decoding gets its output instead of
    pixels and never re-encodes. fast=True decodes greedy and beam search with `fastdecode` (the same tokens
    as `generate`, in less time); everything else, and fast=False, goes through `generate`.
    """
    return generate_batch(model, encoder_hidden, settings, eos_token_id, fast)[0]


@torch.no_grad()
def generate_batch(model, encoder_hidden: torch.Tensor, settings: GenerationSettings, eos_token_id: int,
                   fast: bool = True) -> list[Decoded]:
    """`generate_ids` for a batch of encoder outputs (B, N, D): one `Decoded` per image."""
    gen = model.generation_config
    start = gen.decoder_start_token_id if gen.decoder_start_token_id is not None else gen.bos_token_id
    if fast and start is not None and eos_token_id is not None and \
            unsupported(model, settings.do_sample) is None:
        if settings.num_beams == 1:
            steps = fastdecode.greedy(model, encoder_hidden, settings.max_new_tokens, start, eos_token_id)
        else:
            steps = fastdecode.beam_search(
                model, encoder_hidden, settings.max_new_tokens, settings.num_beams, start, eos_token_id,
                length_penalty=1.0 if gen.length_penalty is None else gen.length_penalty,
                early_stopping=False if gen.early_stopping is None else gen.early_stopping)
        return [Decoded.cut(ids, eos_token_id, cross, logp) for ids, cross, logp in steps]
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
    return [Decoded.cut(ids, eos_token_id) for ids in rows]
