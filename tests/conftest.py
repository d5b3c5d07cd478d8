"""Shared fixtures: tiny random ViT + GPT-2 captioners built from configs (no downloads, CPU only)."""
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

import captioner
from captioner import kernels
from captioner_train.architecture import PRESETS, build_model, image_processor
from captioner_train.vocabulary import bpe_tokenizer

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


@pytest.fixture(params=kernels.KERNELS)
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


def free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def app_url(tiny_dir):
    """The real app (`app.build_demo`) serving the tiny model on 127.0.0.1; its base URL, without a trailing /."""
    import app  # imports gradio (~5 s): only for the tests that need the app

    demo = app.build_demo([tiny_dir])
    _, url, _ = demo.launch(server_name="127.0.0.1", server_port=free_port(), prevent_thread_lock=True, quiet=True,
                            show_error=True, share=False, ssr_mode=False)
    yield url.rstrip("/")
    demo.close()


@pytest.fixture(scope="session")
def app_settings(app_url):
    """The generation settings the page starts with (its /caption defaults), to run the library the same way."""
    from gradio_client import Client

    api = Client(app_url, analytics_enabled=False, verbose=False).view_api(print_info=False, return_format="dict")
    names = ("max_new_tokens", "num_beams", "do_sample", "temperature", "top_k", "top_p", "method")
    return {p["parameter_name"]: p["parameter_default"] for p in api["named_endpoints"]["/caption"]["parameters"]
            if p["parameter_name"] in names}
