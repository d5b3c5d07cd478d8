"""How fast is `Captioner.caption` (caption + every word map + the CLS map) against plain `generate` (the caption
alone)? Prints a table; asserts nothing.

    python -m captioner.bench [--model PATH] [--repeats N] [--full-size-dir DIR]

Two models: the full-size architecture of nlpconnect/vit-gpt2-image-captioning (ViT-B/16 224 + GPT-2 small with
cross-attention, vocab 50257) built offline from default configs with random weights and a random byte-level BPE
of the same size, and `--model` (default: `captioner.default_model()`). For each, beam 4 and greedy with 16 new
tokens alternate the anchor (plain `generate` from pixels on the model loaded with default SDPA attention) and
`cap.caption(...)` on one image, and report medians, the ratio and whether the tokens were identical. Then: the
int8 path (speed and word agreement with fp32), a word click (overlay of one word on a 1024 px image from the
cached maps), cold start to first caption in a fresh process with its peak RSS, and batch mode in images/s.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

import captioner

from .architecture import ModelConfig, image_processor
from .render import titled_overlay
from .synthetic import make_scene
from .vocabulary import random_bpe_tokenizer

EXAMPLES = Path(__file__).resolve().parent.parent / "assets" / "examples"
NEW_TOKENS = 16


def build_full_size(folder: str | Path, seed: int = 0) -> str:
    """Save ViT-B/16 224 + GPT-2 small (cross-attention, vocab 50257) with random weights, its tokenizer and image
    processor to `folder`; returns it. ~1 GB, ~30 s on 2 cores."""
    from transformers import GPT2Config, ViTConfig, VisionEncoderDecoderConfig, VisionEncoderDecoderModel

    tokenizer = random_bpe_tokenizer(50257, seed)
    decoder = GPT2Config(add_cross_attention=True, is_decoder=True, vocab_size=len(tokenizer),
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    config = VisionEncoderDecoderConfig.from_encoder_decoder_configs(ViTConfig(), decoder)
    config.decoder_start_token_id, config.pad_token_id = tokenizer.bos_token_id, tokenizer.pad_token_id
    config.eos_token_id = tokenizer.eos_token_id
    torch.manual_seed(seed)
    model = VisionEncoderDecoderModel(config)
    gen = model.generation_config
    gen.decoder_start_token_id, gen.bos_token_id = tokenizer.bos_token_id, tokenizer.bos_token_id
    gen.eos_token_id, gen.pad_token_id, gen.max_new_tokens = tokenizer.eos_token_id, tokenizer.pad_token_id, 16
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    image_processor(ModelConfig(image_size=224, patch_size=16)).save_pretrained(folder)
    return str(folder)


def _median(times: list[float]) -> float:
    return statistics.median(times)


def plain_generate(model, processor, image, num_beams: int, max_new_tokens: int = NEW_TOKENS) -> list[int]:
    """The anchor: the caption alone, from pixels, by `generate`; tokens cut before EOS."""
    pixel_values = processor(images=image, return_tensors="pt")["pixel_values"]  # (1, 3, h, w)
    with torch.no_grad():
        out = model.generate(pixel_values=pixel_values, max_new_tokens=max_new_tokens, max_length=None,
                             num_beams=num_beams, do_sample=False, temperature=None, top_k=None, top_p=None)
    ids, eos = out[0, 1:].tolist(), model.generation_config.eos_token_id
    return ids[: ids.index(eos)] if eos in ids else ids


def compare(cap, anchor, image, num_beams: int, repeats: int) -> dict:
    """Alternate plain generate and cap.caption on one image (one warm-up each); medians in seconds."""
    plain, ours = [], []
    ids = plain_generate(anchor, cap.processor, image, num_beams)
    res = cap.caption(image, max_new_tokens=NEW_TOKENS, num_beams=num_beams)
    for _ in range(repeats):
        t = time.perf_counter()
        ids = plain_generate(anchor, cap.processor, image, num_beams)
        plain.append(time.perf_counter() - t)
        t = time.perf_counter()
        res = cap.caption(image, max_new_tokens=NEW_TOKENS, num_beams=num_beams)
        ours.append(time.perf_counter() - t)
    return {"plain": _median(plain), "ours": _median(ours), "same": ids == res.token_ids,
            "tokens": len(res.token_ids), "words": len(res.words)}


def word_agreement(a: list, b: list) -> float:
    """Share of positions where two captions (words or tokens) agree, over the longer one (1.0 if both empty)."""
    n = max(len(a), len(b))
    return 1.0 if n == 0 else sum(x == y for x, y in zip(a, b)) / n


def int8_figures(cap, cap8, images: list, num_beams: int = 4) -> dict:
    """Median caption() time fp32 vs int8 over `images`, mean word and token agreement, exact-caption share."""
    fp32, int8, agree, tokens, exact = [], [], [], [], []
    cap8.caption(images[0], max_new_tokens=NEW_TOKENS, num_beams=num_beams)  # warm-up
    for image in images:
        t = time.perf_counter()
        a = cap.caption(image, max_new_tokens=NEW_TOKENS, num_beams=num_beams)
        fp32.append(time.perf_counter() - t)
        t = time.perf_counter()
        b = cap8.caption(image, max_new_tokens=NEW_TOKENS, num_beams=num_beams)
        int8.append(time.perf_counter() - t)
        agree.append(word_agreement(a.words, b.words))
        tokens.append(word_agreement(a.token_ids, b.token_ids))
        exact.append(a.words == b.words)
    return {"fp32": _median(fp32), "int8": _median(int8), "agree": float(np.mean(agree)),
            "tokens": float(np.mean(tokens)),
            "exact": float(np.mean(exact)), "n": len(images)}


def click_ms(res, clicks: int = 30) -> float:
    """Median ms to draw one word's titled overlay from cached maps on the result's image."""
    times = []
    for k in range(clicks):
        w = k % len(res.words) if res.words else 0
        heat = res.word_maps[w] if res.words else res.cls_map
        t = time.perf_counter()
        titled_overlay(res.image, heat, f"{w + 1}. word")
        times.append(time.perf_counter() - t)
    return 1000 * _median(times)


_COLD = """
import json, resource, sys, time
t0 = time.perf_counter()
import captioner
from PIL import Image
t1 = time.perf_counter()
cap = captioner.load(sys.argv[1])
t2 = time.perf_counter()
res = cap.caption(Image.open(sys.argv[2]), max_new_tokens=16, num_beams=4)
t3 = time.perf_counter()
try:  # VmHWM: this process's own peak; ru_maxrss would include the parent it was forked from
    rss = int(next(l for l in open("/proc/self/status") if l.startswith("VmHWM")).split()[1]) / 1024
except OSError:
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps({"import": t1 - t0, "load": t2 - t1, "caption": t3 - t2, "rss_mb": rss}))
"""


def cold_start(folder: str, image_path: str) -> dict:
    """A fresh interpreter: import, load from the local folder, first caption (beam 4). Wall seconds from process
    start (the weights are in the OS file cache by then), its parts, and the process's peak resident memory."""
    t = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", _COLD, folder, image_path], capture_output=True, text=True,
                         check=True)
    return {"wall": time.perf_counter() - t, **json.loads(out.stdout.strip().splitlines()[-1])}


def batch_figures(cap, images: list, batch_size: int = 8, num_beams: int = 4) -> dict:
    """Images per second: caption() one at a time vs caption_batch in batches of `batch_size`."""
    cap.caption_batch(images[:2], NEW_TOKENS, num_beams)  # warm-up
    t = time.perf_counter()
    one = [cap.caption(image, max_new_tokens=NEW_TOKENS, num_beams=num_beams) for image in images]
    single = time.perf_counter() - t
    t = time.perf_counter()
    batched = [r for i in range(0, len(images), batch_size)
               for r in cap.caption_batch(images[i:i + batch_size], NEW_TOKENS, num_beams)]
    many = time.perf_counter() - t
    same = float(np.mean([a.token_ids == b.token_ids for a, b in zip(one, batched)]))
    return {"single": len(images) / single, "batched": len(images) / many, "same": same, "n": len(images)}


def _load_anchor(folder: str):
    from transformers import VisionEncoderDecoderModel

    return VisionEncoderDecoderModel.from_pretrained(folder).eval()  # default attention: SDPA


def bench_model(label: str, folder: str, image, int8_images: list, batch_images: list, repeats: int,
                rows: list, extras: list):
    """Append this model's table rows and extra lines; returns its fp32 Captioner."""
    cap, anchor = captioner.load(folder, device="cpu"), _load_anchor(folder)
    for beams, mode in ((4, "beam 4"), (1, "greedy")):
        r = compare(cap, anchor, image, beams, repeats)
        rows.append(f"{label:<22} {mode:<7} {r['plain']:>9.3f} s {r['ours']:>9.3f} s {r['plain'] / r['ours']:>6.2f}x"
                    f"  {'yes' if r['same'] else 'NO':<4} {r['tokens']:>3} tokens, {r['words']} words")
    del anchor
    cap8 = captioner.load(folder, device="cpu", int8=True)
    q = int8_figures(cap, cap8, int8_images)
    extras.append(f"{label}: int8 beam 4 caption()+maps {q['int8']:.3f} s vs fp32 {q['fp32']:.3f} s "
                  f"({q['fp32'] / q['int8']:.2f}x); word agreement {q['agree']:.1%} (tokens "
                  f"{q['tokens']:.1%}), identical captions "
                  f"{q['exact']:.0%} over {q['n']} images")
    del cap8
    b = batch_figures(cap, batch_images)
    extras.append(f"{label}: batch mode beam 4, {b['n']} images: {b['batched']:.2f} img/s batched (8) vs "
                  f"{b['single']:.2f} img/s one at a time ({b['batched'] / b['single']:.2f}x); "
                  f"same tokens as one at a time {b['same']:.0%}")
    return cap


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m captioner.bench", description=__doc__.split("\n")[0])
    parser.add_argument("--model", help="second model to bench (default: captioner.default_model())")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per side, after one warm-up (default 3)")
    parser.add_argument("--full-size-dir", help="keep the full-size random model here (built if missing)")
    args = parser.parse_args(argv)
    second = args.model or captioner.default_model()
    photos = sorted(EXAMPLES.glob("*.jpg"))
    photo = np.asarray(Image.open(photos[0]).convert("RGB"))
    scenes = [np.asarray(make_scene(1_000_000 + k).image) for k in range(24)]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; {NEW_TOKENS} new tokens, fp32, "
          f"{args.repeats} timed repeats after a warm-up, medians")
    rows, extras = [], []
    with tempfile.TemporaryDirectory() as tmp:
        full = args.full_size_dir or tmp
        if not Path(full, "config.json").exists():
            t = time.perf_counter()
            build_full_size(full)
            print(f"built the full-size random model in {time.perf_counter() - t:.0f} s -> {full}")
        photo_images = [np.asarray(Image.open(p).convert("RGB")) for p in photos]
        cap = bench_model("vit-gpt2 size (random)", full, photo, photo_images, (photo_images * 2)[:8],
                          args.repeats, rows, extras)
        big = np.asarray(Image.open(photos[0]).convert("RGB").resize((1024, 1024)))
        res = cap.caption(big, max_new_tokens=NEW_TOKENS)
        del cap
        extras.append(f"word click, 1024x1024 image, titled_overlay from cached maps: {click_ms(res):.1f} ms median")
        c = cold_start(full, str(photos[0]))
        extras.append(f"vit-gpt2 size (random): cold start to first caption {c['wall']:.1f} s wall (import "
                      f"{c['import']:.1f} s, load {c['load']:.1f} s, caption {c['caption']:.1f} s), peak RSS "
                      f"{c['rss_mb']:.0f} MB")
    label = "bundled scene model" if second == captioner.BUNDLED_MODEL else Path(second).name[-22:]
    bench_model(label, second, scenes[0], scenes, scenes[:16], args.repeats, rows, extras)
    scene_png = EXAMPLES / "scene_17.png"
    c = cold_start(second, str(scene_png))
    extras.append(f"{label}: cold start to first caption {c['wall']:.1f} s wall (import {c['import']:.1f} s, "
                  f"load {c['load']:.1f} s, caption {c['caption']:.2f} s), peak RSS {c['rss_mb']:.0f} MB")
    print(f"\n{'model':<22} {'mode':<7} {'generate':>11} {'caption()':>11} {'ratio':>7}  same tokens")
    print(f"{'':<22} {'':<7} {'(caption)':>11} {'(+ maps)':>11}")
    print("\n".join(rows))
    print()
    print("\n".join(extras))


if __name__ == "__main__":
    main()
