"""Finding and loading a captioner: a local folder, a hub id, or the default for this machine.

Default: `$CAPTIONER_MODEL` if set; else the hub model when it is cached or the hub answers (as on Spaces);
else the small scene captioner bundled in `assets/model`, so the demo runs with no internet at all. The decoder's
weight precision on a CPU: `$CAPTIONER_PRECISION` (fp32, bf16 or int8; default fp32).
"""
from __future__ import annotations

import json

import os
import socket
from pathlib import Path

import torch

from .pipeline import Captioner
from .precision import reduce_decoder
from .precision import checked as checked_precision

HUB_MODEL = "nlpconnect/vit-gpt2-image-captioning"
BUNDLED_MODEL = str(Path(__file__).resolve().parent.parent / "assets" / "model")
EAGER = {"encoder": "eager", "decoder": "eager"}  # attn_implementation with attention weights (SDPA returns none)


def _cached(repo_id: str) -> bool:
    from huggingface_hub import try_to_load_from_cache
    return isinstance(try_to_load_from_cache(repo_id, "config.json"), str)


def _hub_reachable(timeout: float = 2.0) -> bool:
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
        return False
    try:
        socket.create_connection(("huggingface.co", 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def model_label(name_or_path: str) -> str:
    """How a model is named to people and API callers: the bundled one by what it is, a local folder by its name
    (never a server path), a hub id as it is."""
    path = Path(name_or_path)
    if path.is_dir() and path.resolve() == Path(BUNDLED_MODEL).resolve():
        return "bundled scene captioner"
    return path.name if path.is_dir() else name_or_path


def listed_models() -> list[str]:
    """`available_models()` plus `$CAPTIONER_EXTRA_MODELS` (comma-separated folders or hub ids, e.g. an OCR model
    beside the captioner), without repeats: the models a page offers."""
    extra = [m.strip() for m in os.environ.get("CAPTIONER_EXTRA_MODELS", "").split(",") if m.strip()]
    return list(dict.fromkeys([*available_models(), *extra]))


def available_models() -> list[str]:
    """Models that can be loaded here right now, the default first."""
    models = []
    env = os.environ.get("CAPTIONER_MODEL")
    if env:
        models.append(env)
    if HUB_MODEL not in models and (_cached(HUB_MODEL) or _hub_reachable()):
        models.append(HUB_MODEL)
    if Path(BUNDLED_MODEL, "config.json").exists() and BUNDLED_MODEL not in models:
        models.append(BUNDLED_MODEL)
    return models


def default_model() -> str:
    models = available_models()
    if not models:
        raise RuntimeError(f"No captioner available: the hub is unreachable, {HUB_MODEL} is not cached, and the "
                           f"bundled model is missing from {BUNDLED_MODEL}. Restore assets/model (git checkout "
                           "assets) or set CAPTIONER_MODEL to a local model folder.")
    return models[0]


def default_precision() -> str:
    """`$CAPTIONER_PRECISION` if set, else "fp32": the decoder precision `load` uses when given none."""
    return os.environ.get("CAPTIONER_PRECISION", "").strip() or "fp32"


def load(name_or_path: str | None = None, device: str | None = None, int8: bool = False,
         precision: str | None = None) -> Captioner:
    """Load a VisionEncoderDecoderModel with its tokenizer and image processor, ready to caption and explain.

    name_or_path: a local folder or a hub id; None picks `default_model()`. device: "cuda" or "cpu" (default:
    CUDA with fp16 when present). int8=True (CPU only) is torch's dynamic quantisation of every Linear layer,
    encoder included (`quantize.int8`: int8 weights, activations quantised per call): faster decoding, words
    mostly the same as fp32's. precision (CPU only; None: `default_precision()`): "fp32"; "bf16" (decoder weights
    in bfloat16, needs BF16 instructions) or "int8" (decoder weights only, int8 per output channel, activations
    bf16 or fp32), see `captioner.precision`. Fails at once, with what to do, when a hub model is neither cached
    nor downloadable.
    """
    from transformers import AutoImageProcessor, AutoTokenizer, VisionEncoderDecoderModel

    name = name_or_path or default_model()
    local = Path(name).is_dir()
    if not local and not (_cached(name) or _hub_reachable()):
        raise RuntimeError(f"Cannot load {name!r}: it is not a local folder, not in the Hugging Face cache, and "
                           "the hub is unreachable. Call captioner.load() with no argument for the bundled "
                           f"offline model, or pass a local folder (e.g. {BUNDLED_MODEL}).")
    kwargs = {} if local or _hub_reachable() else {"local_files_only": True}
    if precision is None:
        precision = "fp32" if int8 else default_precision()
    if int8 and precision != "fp32":
        raise ValueError(f"int8=True (dynamic quantisation of every layer) and precision={precision!r} exclude "
                         "each other: pass one of them.")
    reduced = int8 or precision != "fp32"
    device = device or ("cpu" if reduced else "cuda" if torch.cuda.is_available() else "cpu")
    if int8 and device != "cpu":
        raise ValueError(f"int8 quantisation runs on the CPU only; load with device='cpu', not {device!r}.")
    checked_precision(precision, device)
    dtype = torch.float16 if device.startswith("cuda") else torch.float32
    try:
        model = VisionEncoderDecoderModel.from_pretrained(name, attn_implementation=EAGER, dtype=dtype, **kwargs)
        tokenizer = AutoTokenizer.from_pretrained(name, **kwargs)
        processor = AutoImageProcessor.from_pretrained(name, **kwargs)
    except OSError as e:
        raise RuntimeError(f"Cannot load {name!r} as an image captioner ({e}). It must be a "
                           "VisionEncoderDecoderModel folder or hub id with its tokenizer and image "
                           "processor.") from None
    _size_decoder_cache(model.config.decoder)
    model = model.to(device)
    if int8:
        from .quantize import int8 as quantize_int8
        model = quantize_int8(model)
    if precision != "fp32":
        model = reduce_decoder(model, precision)
    label = model_label(name)
    suffix = " (int8)" if int8 else {"bf16": " (bf16)", "int8": " (int8 weights)"}.get(precision, "")
    scenes_only = None
    if local and _scenes_only(name):  # its caption of a photo is a guess, and each result says so
        size = getattr(processor, "size", None) or {}
        scenes_only = size.get("height"), size.get("width")
    return Captioner(model, tokenizer, processor, name=label + suffix,
                     scenes_only=scenes_only, photo_model=HUB_MODEL if scenes_only else "")


def _size_decoder_cache(decoder_config) -> None:
    """Give a BART-family decoder config (MBart: Donut, Nougat) at least as many `encoder_layers` as
    `decoder_layers`. transformers sizes the decoder's key/value cache by `num_hidden_layers`, which these configs
    map to `encoder_layers`, so with fewer encoder than decoder layers `generate` fails with "IndexError: list
    index out of range" in the cache. In a VisionEncoderDecoderModel the decoder config's `encoder_layers`
    builds nothing (the image encoder is a separate model), so raising it changes no weight and no output."""
    encoder_layers, decoder_layers = (getattr(decoder_config, k, None) for k in ("encoder_layers", "decoder_layers"))
    if encoder_layers is not None and decoder_layers is not None and encoder_layers < decoder_layers:
        decoder_config.encoder_layers = decoder_layers


def _scenes_only(folder: str) -> bool:
    """Whether the model in `folder` was trained on the project's synthetic scenes alone (its training card says
    so)."""
    try:
        return json.loads(Path(folder, "training_card.json").read_text()).get("config", {}).get("data") == "synthetic"
    except (OSError, ValueError, AttributeError):
        return False
