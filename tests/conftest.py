"""Shared fixtures: tiny ViT + GPT-2 captioners, and a tiny random captioner of each published encoder-decoder
family, built from configs (no downloads, CPU only)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Decoding's products run on a named kernel everywhere in the tests, subprocesses included, never on the one the
# timing picked at that moment (two models timed apart could pick apart and break a near-tie differently); the
# token- and map-exact tests run on each kernel in turn through the `kernel` fixture.
os.environ.setdefault("CAPTIONER_KERNEL", "linear")

import numpy as np
import pytest
import torch
from transformers import (BeitConfig, BertConfig, DeiTConfig, GPT2Config, MBartConfig, RobertaConfig, SwinConfig,
                          TrOCRConfig, ViTConfig, ViTImageProcessor)

import captioner
import servers  # scripts/servers.py
from captioner import kernels
from captioner_train.architecture import PRESETS, build_model, image_processor, joined
from captioner_train.vocabulary import bpe_tokenizer, word_tokenizer

# Captions whose words the small BPE vocabulary splits into several tokens ("skateboard" -> "Ġsk" "ate" ...).
CAPTIONS = ["a dog riding a skateboard on the street", "a cat sitting under a wooden table",
            "two giraffes standing near a tall tree", "a man surfing a huge wave"]


ROOT = Path(__file__).resolve().parent.parent


def torchrun(processes: int, args: list[str], cwd, env: dict | None = None) -> subprocess.CompletedProcess:
    """`torchrun --standalone --nproc_per_node N -m ...args` on CPUs, one thread a process, the project importable;
    `env` adds variables (a PYTHONPATH given there goes before the project's). Asserts that it succeeded."""
    env = dict(env or {})
    path = os.pathsep.join(filter(None, [env.pop("PYTHONPATH", ""), str(ROOT)]))
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                          str(processes), "-m", *args], env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": path,
                                                             **env},
                         cwd=cwd, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    return run


def atol(cap, fp32: float = 1e-5) -> float:
    """Tolerance for comparing two computations of the same values on cap's model: fp32's, or fp16's on a GPU."""
    return fp32 if cap.model.dtype == torch.float32 else max(fp32, 2e-2)


def image_for(k: int, size=(32, 48)) -> np.ndarray:
    """A distinct (H, W, 3) uint8 image per caption index: a coloured block on noise."""
    rng = np.random.default_rng(k)
    img = rng.integers(0, 80, size=(*size, 3), dtype=np.uint8)
    img[:, 12 * k % size[1]: 12 * k % size[1] + 12] = np.array([[200, 60 * k, 255 - 60 * k]], dtype=np.uint8)
    return img


@pytest.fixture(params=kernels.available())
def kernel(request):
    """Each kernel decoding can run on, forced for every model in this process while the test runs."""
    with kernels.forced(request.param):
        yield request.param


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    """A tiny captioner saved as a model folder. It is trained for a few dozen steps to caption image_for(k)
    with CAPTIONS[k], so its captions are real multi-token words rather than random bytes."""
    tokenizer = bpe_tokenizer(CAPTIONS * 4, vocab_size=300)
    cfg = PRESETS["tiny"]
    model = build_model(cfg, tokenizer, seed=0)
    processor = image_processor(cfg)
    pixel_values = processor(images=[image_for(k) for k in range(len(CAPTIONS))], return_tensors="pt")["pixel_values"]
    ids = [tokenizer(c, add_special_tokens=False).input_ids + [tokenizer.eos_token_id] for c in CAPTIONS]
    labels = torch.full((len(ids), max(map(len, ids))), -100)
    for row, seq in zip(labels, ids):
        row[: len(seq)] = torch.tensor(seq)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(150):
        loss = model(pixel_values=pixel_values, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    folder = tmp_path_factory.mktemp("tiny_model")
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    processor.save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="session")
def tiny(tiny_dir):
    return captioner.load(tiny_dir)


@pytest.fixture(scope="session")
def random_tiny(tmp_path_factory):
    """An untrained tiny captioner (random weights): captions are arbitrary token strings."""
    tokenizer = bpe_tokenizer(CAPTIONS * 4, vocab_size=300)
    cfg = PRESETS["tiny"]
    folder = tmp_path_factory.mktemp("random_tiny")
    build_model(cfg, tokenizer, seed=1).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    image_processor(cfg).save_pretrained(folder)
    return captioner.load(str(folder))


@pytest.fixture(scope="session")
def bundled():
    if not os.path.exists(os.path.join(captioner.BUNDLED_MODEL, "config.json")):
        pytest.fail(f"the bundled model is missing from {captioner.BUNDLED_MODEL}")
    return captioner.load(captioner.BUNDLED_MODEL)


WORDS = "a dog cat on the street table red blue sitting riding under".split()
SMALL = dict(num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)


def _encoder(kind: str):
    """-> (config, image side, expected grid, expected prefix tokens, has CLS)."""
    if kind == "vit384":
        return ViTConfig(hidden_size=48, image_size=384, patch_size=32, **SMALL), 384, (12, 12), 1, True
    if kind == "vit":
        return ViTConfig(hidden_size=32, image_size=48, patch_size=8, **SMALL), 48, (6, 6), 1, True
    if kind == "beit":
        return BeitConfig(hidden_size=32, image_size=48, patch_size=8, **SMALL), 48, (6, 6), 1, True
    if kind == "deit":
        return DeiTConfig(hidden_size=32, image_size=48, patch_size=8, **SMALL), 48, (6, 6), 2, True
    if kind == "swin":  # 64 px, patches of 4, two stages: 16x16 then 8x8 tokens of width 32
        return SwinConfig(image_size=64, patch_size=4, embed_dim=16, depths=[1, 1], num_heads=[2, 2],
                          window_size=4), 64, (8, 8), 0, False
    raise ValueError(kind)


def _decoder(kind: str, vocab: int, tok):
    ids = dict(pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    if kind == "gpt2":
        return GPT2Config(n_embd=64, n_layer=2, n_head=2, n_inner=128, vocab_size=vocab, n_positions=64, **ids)
    if kind == "bert":
        return BertConfig(hidden_size=32, vocab_size=vocab, max_position_embeddings=64, **SMALL, **ids)
    if kind == "roberta":
        return RobertaConfig(hidden_size=32, vocab_size=vocab, max_position_embeddings=70, **SMALL, **ids)
    if kind == "trocr":
        return TrOCRConfig(d_model=32, decoder_layers=2, decoder_attention_heads=2, decoder_ffn_dim=64,
                           vocab_size=vocab, max_position_embeddings=64, **ids)
    if kind in ("mbart", "mbart-deep"):  # deep: more decoder layers than the config's (unbuilt) encoder has
        layers = dict(decoder_layers=3, encoder_layers=1) if kind == "mbart-deep" else dict(decoder_layers=2,
                                                                                            encoder_layers=2)
        return MBartConfig(d_model=32, **layers, decoder_attention_heads=2, encoder_attention_heads=2,
                           decoder_ffn_dim=64, encoder_ffn_dim=64, vocab_size=vocab, max_position_embeddings=64, **ids)
    raise ValueError(kind)


FAMILIES = {  # name: (encoder, decoder)
    "vit384-gpt2": ("vit384", "gpt2"), "vit-bert": ("vit", "bert"), "vit-roberta": ("vit", "roberta"),
    "beit-trocr": ("beit", "trocr"), "deit-trocr": ("deit", "trocr"), "swin-mbart": ("swin", "mbart"),
}
DEEP_MBART = {"vit-mbart-deep": ("vit", "mbart-deep")}  # built on its own: see its test in test_families


def build_family(name: str, folder) -> dict:
    """Save a tiny random captioner of family `name` to `folder`; returns what its layout must be."""
    enc_kind, dec_kind = (FAMILIES | DEEP_MBART)[name]
    tok = word_tokenizer(WORDS)
    enc, side, grid, prefix, has_cls = _encoder(enc_kind)
    model = joined(enc, _decoder(dec_kind, len(tok), tok), tok, seed=0, max_new_tokens=8)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    ViTImageProcessor(size={"height": side, "width": side}, image_mean=[0.5] * 3, image_std=[0.5] * 3) \
        .save_pretrained(folder)
    return {"grid": grid, "prefix": prefix, "has_cls": has_cls, "windowed": enc_kind == "swin"}


@pytest.fixture(scope="session")
def families(tmp_path_factory):
    """Every family in FAMILIES saved to its own folder: name -> (folder, what its layout must be)."""
    out = {}
    for name in FAMILIES:
        folder = tmp_path_factory.mktemp(name)
        out[name] = (str(folder), build_family(name, folder))
    return out


@pytest.fixture(scope="session")
def app_url(tiny_dir):
    """The real app (`app.build_demo`) serving the tiny model on 127.0.0.1; its base URL, without a trailing /."""
    import app  # imports gradio (~5 s): only for the tests that need the app

    demo = app.build_demo([tiny_dir])
    yield servers.launch(demo, show_error=True)
    demo.close()


@pytest.fixture(scope="session")
def app_settings(app_url):
    """The generation settings the page starts with (its /caption defaults), to run the library the same way."""
    from gradio_client import Client

    api = Client(app_url, analytics_enabled=False, verbose=False).view_api(print_info=False, return_format="dict")
    names = ("max_new_tokens", "num_beams", "do_sample", "temperature", "top_k", "top_p", "method")
    return {p["parameter_name"]: p["parameter_default"] for p in api["named_endpoints"]["/caption"]["parameters"]
            if p["parameter_name"] in names}


@pytest.fixture(scope="session")
def client(app_url):
    """A `gradio_client` session with the app of `app_url`."""
    from gradio_client import Client

    return Client(app_url, analytics_enabled=False, verbose=False)


@pytest.fixture(scope="session")
def image_file(tmp_path_factory):
    """image_for(0) as a PNG (lossless, so the app decodes exactly the array the library gets)."""
    from PIL import Image

    path = tmp_path_factory.mktemp("images") / "scene0.png"
    Image.fromarray(image_for(0)).save(path)
    return str(path)
