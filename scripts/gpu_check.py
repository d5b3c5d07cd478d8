"""The bench's main figures on a CUDA GPU: plain `generate` against `caption()` on the full-size random ViT-GPT2
architecture and the bundled model (fp16, as `captioner.load` puts a model on a GPU), the cost of each map
method, and the peak GPU memory. `python scripts/gpu_check.py [--full-size-dir D]`; the CPU figures come from
`python -m captioner_train.bench`.
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from transformers import VisionEncoderDecoderModel

import captioner
from captioner_train.bench import EXAMPLES, NEW_TOKENS, build_full_size, eleven_words, plain_generate
from captioner_train.synthetic import make_scene


def _timed(fn, repeats: int) -> tuple[float, object]:
    fn()  # warm-up
    times, out = [], None
    for _ in range(repeats):
        torch.cuda.synchronize()
        t = time.perf_counter()
        out = fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return statistics.median(times), out


def check(label: str, folder: str, image, text: str, repeats: int) -> list[str]:
    cap = captioner.load(folder, device="cuda")
    anchor = VisionEncoderDecoderModel.from_pretrained(folder, dtype=cap.model.dtype).to("cuda").eval()
    lines = []
    for beams in (4, 1):
        t_plain, ids = _timed(lambda: plain_generate(anchor, cap.processor, image, beams), repeats)
        t_ours, res = _timed(lambda: cap.caption(image, max_new_tokens=NEW_TOKENS, num_beams=beams,
                                                 method="attention"), repeats)
        lines.append(f"| {label} | {'beam 4' if beams == 4 else 'greedy'} | {t_plain * 1e3:.0f} ms | "
                     f"{t_ours * 1e3:.0f} ms | {t_plain / t_ours:.2f}x | {'yes' if ids == res.token_ids else 'no'} |")
    for method in captioner.METHODS:
        try:
            t, _ = _timed(lambda: cap.explain(image, text, method=method), repeats)
            lines.append(f"| {label} | explain, {method}, {len(text.split())} words | | {t * 1e3:.0f} ms | | |")
        except ValueError as e:
            lines.append(f"| {label} | explain, {method} | | {e} | | |")
    lines.append(f"| {label} | peak GPU memory (torch.cuda.max_memory_allocated) | | "
                 f"{torch.cuda.max_memory_allocated() / 2**20:.0f} MiB | | |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--full-size-dir", help="keep the full-size random model here (built if missing)")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run `python -m captioner_train.bench` for the CPU figures")
    print(f"{torch.cuda.get_device_name()}; torch {torch.__version__}; {NEW_TOKENS} new tokens, fp16, medians of "
          f"{args.repeats} after a warm-up\n")
    print("| model | what | plain generate | captioner | ratio | same tokens |\n|---|---|---|---|---|---|")
    photo = np.asarray(Image.open(sorted(EXAMPLES.glob("*.jpg"))[0]).convert("RGB"))
    with tempfile.TemporaryDirectory() as tmp:
        full = args.full_size_dir or tmp
        if not Path(full, "config.json").exists():
            build_full_size(full)
        text = eleven_words(captioner.load(full, device="cpu").tokenizer)
        print("\n".join(check("vit-gpt2 size (random)", full, photo, text, args.repeats)))
    torch.cuda.reset_peak_memory_stats()
    scene = make_scene(1_000_000)
    print("\n".join(check("bundled scene model", captioner.BUNDLED_MODEL, scene.image, scene.caption,
                          args.repeats)))


if __name__ == "__main__":
    main()
