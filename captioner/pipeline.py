"""The `Captioner`: caption an image (or take a caption a person typed) and explain every word with a map."""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field, fields, replace

import numpy as np
import torch

from . import attention, encoding
from .decoding import Decoded, GenerationSettings, generate_batch, generate_ids
from .forcing import forced
from .images import to_rgb
from .kernels import conv1d_out_in, route
from .maps import Maps, attention_maps, relevance_maps, rollout_maps
from .precision import Int8Linear
from .layout import FULL_VIEW, encoder_layout, image_view
from .words import group_generated, group_typed

METHODS = ("attention", "rollout", "relevance")
DEFAULT_METHOD = "relevance"  # page, API and library alike: it points best, at under 2x attention's cost (README)
MAX_CAPTION_CHARS = 500
EMPTY_CAPTION = "The model produced an empty caption; try beams or sampling."
SCENES_ONLY = "This model knows only the synthetic scenes it was trained on"


def photo_advice(photo_model: str) -> str:
    """The last sentence of the SCENES_ONLY note: which model to load for photos."""
    return f"For photos, load {photo_model}." if photo_model else ""


@dataclass
class CaptionResult:
    text: str  # the caption
    words: list[str]  # == text.split(); subword tokens grouped into words
    word_maps: np.ndarray  # (len(words), gh, gw) float32 in [0, 1]: where the decoder looked for each word
    cls_map: np.ndarray  # (gh, gw) float32 in [0, 1]: where the ViT's CLS token looked (last layer)
    word_probs: list[float]  # probability of each word under the model (product of its tokens' probabilities)
    token_ids: list[int]  # caption tokens, no start or EOS token
    tokens: list[str]  # their strings
    word_tokens: list[list[int]]  # indices into token_ids spelling each word
    token_maps: np.ndarray  # (len(token_ids), gh, gw) float32, raw per-token maps (relevance: for the caption)
    image_size: tuple[int, int]  # (H, W) of the image the maps cover
    model: str  # which model produced this
    settings: dict | None = None  # generation settings used (None for a typed caption)
    notes: list[str] = field(default_factory=list)  # anything a person should know (e.g. unknown words)
    seconds: dict = field(default_factory=dict)  # timings: encode, generate, maps
    method: str = DEFAULT_METHOD  # how the maps were made: attention | rollout | relevance
    layers: list[int] | None = None  # layers averaged (None: the method's default)
    head: int | None = None  # head shown (None: mean over heads)
    image: np.ndarray | None = field(default=None, repr=False)  # (H, W, 3) uint8 RGB the maps cover
    view: tuple[float, float, float, float] = FULL_VIEW  # where the maps lie on the image: (x0, y0, x1, y1), fractions

    @property
    def grid(self) -> tuple[int, int]:
        return tuple(self.cls_map.shape)

    def to_json(self, keys: tuple[str, ...] | None = None) -> dict:
        """Plain JSON types, as the API returns it: maps as nested lists rounded to 4 decimals, every field but the
        image (no copy of it), plus "caption" (== text) and "grid". keys: only these, in this order (a collection's
        JSON line takes a few; maps left out are never converted)."""
        keys = keys or (*(f.name for f in fields(self) if f.name != "image"), "caption", "grid")
        return {key: self._json_value(key) for key in keys}

    def _json_value(self, key: str):
        if key in ("word_maps", "cls_map", "token_maps"):
            return np.round(getattr(self, key), 4).tolist()  # (W, gh, gw), (gh, gw), (T, gh, gw) as lists
        if key in ("view", "grid", "image_size"):
            return list(getattr(self, key))
        return self.text if key == "caption" else getattr(self, key)


@dataclass(frozen=True)
class Spelling:
    """A caption as tokens and as the words a person clicks."""
    ids: list[int]  # caption tokens, no start or EOS token
    words: list[str]  # == " ".join(words).split()
    groups: list[list[int]]  # indices into ids spelling each word


@dataclass(frozen=True)
class MapChoice:
    """How to make the maps: the method, and for attention and rollout the layers and head to average."""
    method: str | None = None  # None: the captioner's default_method
    layers: list[int] | None = None
    head: int | None = None


class Captioner:
    """A VisionEncoderDecoderModel with its tokenizer and image processor, loaded with eager attention so that
    attention weights exist (transformers 5's SDPA path returns none); the encoder then gets `encoding`'s attention,
    which runs SDPA in the pipeline's encoder passes and computes a layer's weights only when a map reads it.
    GPT-2's Conv1D weights are laid out (out, in) in memory, in place (same shape, values and state_dict): the
    layout `kernels` reads fastest."""

    def __init__(self, model, tokenizer, processor, name: str, scenes_only: tuple[int, int] | None = None,
                 photo_model: str = ""):
        """scenes_only: (H, W) of the synthetic scenes the model was trained on alone (`load` reads its training
        card), or None; a result for an image of another size then says its caption is a guess, and names
        photo_model as the one to load for photos."""
        self.model, self.tokenizer, self.processor, self.name = model.eval(), tokenizer, processor, name
        self.scenes_only, self.photo_model = scenes_only, photo_model
        conv1d_out_in(model.decoder)
        route(model.encoder)  # the encoder's products through kernels chosen by timing, packed where that wins
        encoding.record_encoder(model)
        self.device = next(model.parameters()).device
        self.layout = encoder_layout(model, processor)  # patch grid, prefix tokens, CLS or not, windowed or not
        self.grid = self.layout.grid  # (gh, gw)
        self.max_tokens = model.config.decoder.n_positions if hasattr(model.config.decoder, "n_positions") \
            else model.config.decoder.max_position_embeddings
        self.eos_token_id = model.generation_config.eos_token_id
        if isinstance(self.eos_token_id, list):
            self.eos_token_id = self.eos_token_id[0]
        self.start_token_id = model.config.decoder_start_token_id
        self.default_max_new_tokens = model.generation_config.max_new_tokens or 16
        self.fast_decoding = True  # greedy and beam search by `fastdecode` (generate's tokens, faster); False: generate
        # int8 layers have no gradients and windowed encoders (Swin) no token-to-token attention, so their maps
        # default to attention; every other model's to relevance
        self.int8 = any("quantized" in type(m).__module__ or isinstance(m, Int8Linear) for m in model.modules())
        self.default_method = "attention" if self.int8 or self.layout.windowed else DEFAULT_METHOD

    def __repr__(self) -> str:
        return f"Captioner({self.name!r}, device={self.device}, grid={self.grid})"

    def resolve_method(self, method: str | None = None) -> str:
        """The map method a call with `method` uses: None stands for this model's `default_method`."""
        return self.default_method if method is None else method

    def pixel_values(self, image) -> torch.Tensor:
        """Any image the API accepts (or a list of them) -> the model's input (B, 3, h, w) on its device and dtype."""
        return self._pixels([to_rgb(i) for i in image] if isinstance(image, list) else [to_rgb(image)])

    def _pixels(self, rgbs: list[np.ndarray]) -> torch.Tensor:
        """(H, W, 3) uint8 RGB images, already converted -> (B, 3, h, w) on the model's device and dtype."""
        pixel_values = self.processor(images=rgbs, return_tensors="pt")["pixel_values"]  # (B, 3, h, w)
        return pixel_values.to(self.device, self.model.dtype)

    def tokenize(self, text: str) -> tuple[list[int], list[list[int]]]:
        """A caption a person typed -> (token ids, token indices of each word of text.split()), validated."""
        if not isinstance(text, str) or not text.strip():
            raise ValueError("Type a caption to explain, e.g. 'a red circle left of a blue square'.")
        if len(text) > MAX_CAPTION_CHARS:
            raise ValueError(f"The caption has {len(text)} characters; the limit is {MAX_CAPTION_CHARS}.")
        ids, _, groups = group_typed(self.tokenizer, " ".join(text.split()))
        if len(ids) > self.max_tokens - 1:
            raise ValueError(f"The caption is {len(ids)} tokens long; this model reads at most "
                             f"{self.max_tokens - 1}. Shorten it.")
        return ids, groups

    @torch.no_grad()
    def _encode(self, image):
        """-> (rgb (H, W, 3) uint8, encoder output with attentions (1, H, N, N) per layer, each computed when read);
        the one conversion of `image` to RGB a call makes."""
        rgb = to_rgb(image)
        return rgb, encoding.encode(self.model.encoder, self._pixels([rgb]), weights=not self.layout.windowed)

    def _maps(self, enc, spelling: Spelling, how: MapChoice, decoded: Decoded | None = None) -> Maps:
        """Maps by `method` for caption tokens `ids`. decoded: what decoding recorded for these tokens; its
        cross-attention and log-probabilities are exactly what a forced pass would recompute, so attention and
        rollout read them instead of running one."""
        (ids, groups), (method, layers, head) = (spelling.ids, spelling.groups), (how.method, how.layers, how.head)
        if method not in METHODS:
            raise ValueError(f"method must be one of {', '.join(METHODS)}, got {method!r}.")
        if method == "relevance" and (layers is not None or head is not None):
            raise ValueError("relevance weighs every layer and head itself; layers and head apply to the attention "
                             "and rollout methods.")
        if method in ("rollout", "relevance") and self.layout.windowed:
            raise ValueError(f"{method} follows attention from token to token through the encoder, and this "
                             f"{self.layout.model_type} encoder attends only within local windows: use "
                             "method='attention'.")
        if method == "relevance" and self.int8:
            raise ValueError("relevance needs gradients, which int8 layers do not have: use method='attention' or "
                             "'rollout', or load the model without int8.")
        gh, gw = self.grid
        if not ids:
            empty = np.zeros((0, gh, gw), np.float32)
            cls = attention.cls_map(enc.attentions, self.grid, layers, head, self.layout.prefix) \
                if self.layout.has_cls else np.zeros(self.grid, np.float32)
            return Maps(empty, empty, cls, np.zeros(0))
        if method == "relevance":
            return relevance_maps(self.model, enc, self.start_token_id, ids, groups, self.layout)
        if decoded is not None and decoded.cross is not None:
            cross, logp = decoded.cross, decoded.logp  # (L, H, T, N), (T,)
        else:
            f = forced(self.model, enc.last_hidden_state.detach(), self.start_token_id, ids)
            cross, logp = f.cross, f.token_logp  # (L, H, T, N), (T,)
        fn = attention_maps if method == "attention" else rollout_maps
        return fn(cross, enc.attentions, logp, groups, self.layout, layers, head)

    def _mapped(self, rgb, enc, spelling: Spelling, how: MapChoice, settings: dict | None, notes: list[str],
                seconds: dict, decoded: Decoded | None = None) -> CaptionResult:
        """The maps of `spelling` on the encoded image `rgb`, and the result that carries them."""
        t = time.perf_counter()
        how = MapChoice(self.resolve_method(how.method), how.layers, how.head)
        no_cls = f"This {self.layout.model_type} encoder has no CLS token, so there is no CLS map."
        if not self.layout.has_cls and no_cls not in notes:
            notes = [*notes, no_cls]
        if self.scenes_only and tuple(rgb.shape[:2]) != self.scenes_only and not any(
                n.startswith(SCENES_ONLY) for n in notes):
            h, w = self.scenes_only
            note = f"{SCENES_ONLY} ({h}×{w} px scenes of coloured shapes); this {rgb.shape[1]}×{rgb.shape[0]} px " \
                   f"image is not one, so the caption is a guess. {photo_advice(self.photo_model)}"
            notes = [*notes, note.rstrip()]
        maps = self._maps(enc, spelling, how, decoded)
        seconds["maps"] = time.perf_counter() - t
        ids, groups = spelling.ids, spelling.groups
        return CaptionResult(
            text=" ".join(spelling.words), words=spelling.words, word_maps=maps.words, cls_map=maps.cls,
            word_probs=[float(np.prod(maps.probs[g])) if g else 0.0 for g in groups], token_ids=list(ids),
            tokens=self.tokenizer.convert_ids_to_tokens(list(ids)), word_tokens=groups, token_maps=maps.tokens,
            image_size=tuple(rgb.shape[:2]), model=self.name, settings=settings, notes=notes, seconds=seconds,
            method=how.method, layers=how.layers, head=how.head, image=rgb,
            view=image_view(self.processor, rgb.shape[:2]))

    def remap(self, res: CaptionResult, method: str | None = None, layers: list[int] | None = None,
              head: int | None = None) -> CaptionResult:
        """The same caption with its maps recomputed by another method/layers/head: no new generation."""
        if res.image is None:
            raise ValueError("This result carries no image; caption or explain the image again.")
        t = time.perf_counter()
        rgb, enc = self._encode(res.image)
        spelling = Spelling(res.token_ids, res.words, res.word_tokens)
        return self._mapped(rgb, enc, spelling, MapChoice(method, layers, head), res.settings, res.notes,
                            {"encode": time.perf_counter() - t})

    def caption(self, image, settings: GenerationSettings | None = None, method: str | None = None,
                layers: list[int] | None = None, head: int | None = None, **overrides) -> CaptionResult:
        """Caption `image` (PIL or (H, W, 3) uint8) and map every word; any decoding mode, beam search included.

        settings: how to decode (default `GenerationSettings()`: beam 4); keyword arguments named after its fields
        override it (`caption(image, num_beams=1, max_new_tokens=20)`). max_new_tokens=None uses the model's own
        default (`default_max_new_tokens`: 16 unless its generation config says otherwise; the bundled scene model
        says 24, as its longest captions have 17 words).
        method: "relevance" (Chefer et al.'s gradient-weighted relevance, one batched backward pass through the
        decoder; the default, `default_method`, except for int8 models, which have no gradients), "attention"
        (raw cross-attention; CLS self-attention of the last layer) or "rollout" (pushed through the encoder's
        rolled-out self-attention); None: the default. layers: decoder layers to average for word maps and encoder
        layers for the CLS map (None: all decoder layers, the last encoder layer); head: one head or None for the mean.
        """
        rgb, enc, spelling, settings, notes, seconds, decoded = self._decoded(image, settings, overrides)
        return self._mapped(rgb, enc, spelling, MapChoice(method, layers, head), settings, notes, seconds, decoded)

    def caption_stream(self, image, settings: GenerationSettings | None = None, method: str | None = None,
                       layers: list[int] | None = None, head: int | None = None, **overrides):
        """`caption`, the first answer first: yields the caption with its attention maps as soon as decoding ends
        (they cost nothing beyond decoding), then, when `method` resolves to another method, the same caption with
        that method's maps (the image encoded and the caption decoded once). The last result equals `caption`'s."""
        rgb, enc, spelling, settings, notes, seconds, decoded = self._decoded(image, settings, overrides)
        how = MapChoice(self.resolve_method(method), layers, head)
        first = MapChoice("attention", layers, head) if how.method != "attention" else how
        fast = self._mapped(rgb, enc, spelling, first, settings, notes, dict(seconds), decoded)
        yield fast
        if how != first:
            yield self._mapped(rgb, enc, spelling, how, settings, notes, seconds, decoded)

    def _decoded(self, image, settings: GenerationSettings | None, overrides: dict):
        """Encode and decode: what `_mapped` takes before the map choice."""
        settings = self._settings(settings, overrides)
        seconds = {}
        t = time.perf_counter()
        rgb, enc = self._encode(image)
        seconds["encode"] = time.perf_counter() - t
        t = time.perf_counter()
        decoded = generate_ids(self.model, enc.last_hidden_state, settings, self.eos_token_id,
                               self.fast_decoding)
        seconds["generate"] = time.perf_counter() - t
        _, words, groups = group_generated(self.tokenizer, decoded.ids)
        notes = [] if words else [EMPTY_CAPTION]
        return rgb, enc, Spelling(decoded.ids, words, groups), asdict(settings), notes, seconds, decoded

    @torch.no_grad()
    def caption_batch(self, images: list, settings: GenerationSettings | None = None, method: str | None = None,
                      layers: list[int] | None = None, head: int | None = None, **overrides) -> list[CaptionResult]:
        """`caption` for several images at once (greedy or beam search): one encoder pass and one decoding for
        the batch, then each image's maps from what its decoding recorded. Batched matrix products round
        differently from single ones, so a near-tie may now and then resolve to another word than `caption` picks."""
        settings = self._settings(settings, overrides)
        if settings.do_sample:
            raise ValueError("caption_batch decodes by greedy or beam search; sample with caption(), one image at "
                             "a time.")
        if not images:
            return []
        t = time.perf_counter()
        rgbs = [to_rgb(image) for image in images]
        pixel_values = self._pixels(rgbs)  # (B, 3, h, w)
        enc = encoding.encode(self.model.encoder, pixel_values, weights=not self.layout.windowed)
        encode = (time.perf_counter() - t) / len(rgbs)
        t = time.perf_counter()
        batch = generate_batch(self.model, enc.last_hidden_state, settings, self.eos_token_id, self.fast_decoding)
        generate = (time.perf_counter() - t) / len(rgbs)
        results = []
        for i, (rgb, decoded) in enumerate(zip(rgbs, batch)):
            one = encoding.one_image(enc, i)
            _, words, groups = group_generated(self.tokenizer, decoded.ids)
            notes = [] if words else [EMPTY_CAPTION]
            results.append(self._mapped(rgb, one, Spelling(decoded.ids, words, groups),
                                        MapChoice(method, layers, head), asdict(settings), notes,
                                        {"encode": encode, "generate": generate}, decoded))
        return results

    def _settings(self, settings: GenerationSettings | None, overrides: dict) -> GenerationSettings:
        """`settings` with keyword overrides applied, checked, max_new_tokens defaulted to the model's and capped
        by its position table."""
        if settings is not None and not isinstance(settings, GenerationSettings):
            raise TypeError(f"settings must be a GenerationSettings, got {type(settings).__name__}; pass "
                            "max_new_tokens, num_beams and the rest by keyword.")
        unknown = sorted(set(overrides) - {f.name for f in fields(GenerationSettings)})
        if unknown:
            raise TypeError(f"unexpected keyword argument {', '.join(map(repr, unknown))}; the generation settings "
                            f"are {', '.join(f.name for f in fields(GenerationSettings))}.")
        settings = replace(settings or GenerationSettings(), **overrides)
        if settings.max_new_tokens is None:
            settings = replace(settings, max_new_tokens=self.default_max_new_tokens)
        settings = settings.checked()
        return replace(settings, max_new_tokens=min(settings.max_new_tokens, self.max_tokens - 1))

    def explain(self, image, text: str, method: str | None = None, layers: list[int] | None = None,
                head: int | None = None) -> CaptionResult:
        """Maps and word probabilities for a caption a person gives (forced decoding), e.g. "a dog on a bed"."""
        ids, groups = self.tokenize(text)
        words = text.split()
        unk = self.tokenizer.unk_token_id
        unknown = [w for w, g in zip(words, groups) if unk is not None and any(ids[k] == unk for k in g)]
        notes = [f"Not in the model's vocabulary: {', '.join(unknown)}."] if unknown else []
        t = time.perf_counter()
        rgb, enc = self._encode(image)
        return self._mapped(rgb, enc, Spelling(ids, words, groups), MapChoice(method, layers, head), None, notes,
                            {"encode": time.perf_counter() - t})
