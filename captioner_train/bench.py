"""How fast is the page's first answer (`Captioner.caption` with attention maps: caption + every word map + the CLS
map) against plain `generate` (the caption alone), how close to the machine's floor, what do the default map and
the map check of one word cost? Prints a table; asserts nothing.
`--markdown FILE` writes the figures as Markdown tables under a line naming machine, date, commit, torch and command.

    python -m captioner_train.bench [--model PATH] [--repeats N] [--full-size-dir DIR] [--markdown FILE]

Two models: the full-size architecture of nlpconnect/vit-gpt2-image-captioning (ViT-B/16 224 + GPT-2 small with
cross-attention, vocab 50257) built offline from default configs with random weights and a random byte-level BPE
of the same size, and `--model` (default: `captioner.default_model()`). For each, beam 4 and greedy with 16 new
tokens alternate the anchor (plain `generate` from pixels on the model loaded with default SDPA attention) and
`cap.caption(...)` on one image, and report medians, the ratio and whether the tokens were identical; the two
floors of `floors` over the steps that caption decoded: the kernel floor (the encoder, then steps that only stream
every decoder weight once through the faster kernel) and the physical floor (the encoder, then each step's weight
bytes at the best read bandwidth sampled between the timed runs); the kernels `captioner.kernels` chose on this
machine; the default map method against attention for an 11-word caption (explain, and caption + maps). Then: each
reduced precision (int8 dynamic, bf16, int8 weight-only: speed and agreement with fp32), a word click (overlay of
one word on a 1024 px image from the cached maps), cold start to first caption in a fresh process with its peak RSS, and batch mode in images/s.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from transformers import AutoTokenizer

import captioner
from captioner import decoding, kernels
from captioner.render import titled_overlay

from . import floors
from .architecture import ModelConfig, image_processor, joined
from .floors import Floor, ReadBandwidth
from .report import command_line, cpu_name, launcher, write_markdown
from .synthetic import make_scene
from .vocabulary import random_bpe_tokenizer

EXAMPLES = Path(__file__).resolve().parent.parent / "assets" / "examples"
NEW_TOKENS = 16


def build_full_size(folder: str | Path, seed: int = 0) -> str:
    """Save ViT-B/16 224 + GPT-2 small (cross-attention, vocab 50257) with random weights, its tokenizer and image
    processor to `folder`; returns it. ~1 GB, ~30 s on 2 cores."""
    from transformers import GPT2Config, ViTConfig

    tokenizer = random_bpe_tokenizer(50257, seed)
    decoder = GPT2Config(add_cross_attention=True, is_decoder=True, vocab_size=len(tokenizer),
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    model = joined(ViTConfig(), decoder, tokenizer, seed, max_new_tokens=16)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    image_processor(ModelConfig(image_size=224, patch_size=16)).save_pretrained(folder)
    return str(folder)


def _median(times: list[float]) -> float:
    return statistics.median(times)


def plain_generate(model, processor, image, num_beams: int, max_new_tokens: int = NEW_TOKENS) -> list[int]:
    """The anchor: the caption alone, from pixels, by `generate`; tokens cut before EOS."""
    pixel_values = processor(images=image, return_tensors="pt")["pixel_values"].to(model.device, model.dtype)
    with torch.no_grad():  # pixel_values (1, 3, h, w) on the model's device and dtype (a GPU's fp16 too)
        out = model.generate(pixel_values=pixel_values, max_new_tokens=max_new_tokens, max_length=None,
                             num_beams=num_beams, do_sample=False, temperature=None, top_k=None, top_p=None)
    return decoding.until_eos(out[0, 1:].tolist(), model.generation_config.eos_token_id)


@dataclass
class Comparison:
    """Plain `generate` against `cap.caption` on one image, medians in seconds."""
    plain: float  # generate: the caption alone
    ours: float  # the first answer: caption() with attention maps (what the page shows first)
    same: bool  # identical tokens
    tokens: int
    words: int
    full: float = 0.0  # caption() with the default map method (what the page shows last)


def compare(cap, anchor, image, num_beams: int, repeats: int, bandwidth: ReadBandwidth | None = None) -> Comparison:
    """Alternate plain generate, cap.caption with attention maps (the first answer: what decoding itself costs)
    and cap.caption with the default method on one image, one warm-up each; medians in seconds. Before each
    timed round, a sample of `bandwidth`."""
    plain, ours, full = [], [], []
    ids = plain_generate(anchor, cap.processor, image, num_beams, NEW_TOKENS)
    res = cap.caption(image, max_new_tokens=NEW_TOKENS, num_beams=num_beams, method="attention")
    cap.caption(image, max_new_tokens=NEW_TOKENS, num_beams=num_beams)
    for _ in range(repeats):
        if bandwidth is not None:
            bandwidth.sample()
        t = time.perf_counter()
        ids = plain_generate(anchor, cap.processor, image, num_beams, NEW_TOKENS)
        plain.append(time.perf_counter() - t)
        t = time.perf_counter()
        res = cap.caption(image, max_new_tokens=NEW_TOKENS, num_beams=num_beams, method="attention")
        ours.append(time.perf_counter() - t)
        t = time.perf_counter()
        cap.caption(image, max_new_tokens=NEW_TOKENS, num_beams=num_beams)
        full.append(time.perf_counter() - t)
    return Comparison(_median(plain), _median(ours), ids == res.token_ids, len(res.token_ids), len(res.words),
                      _median(full))


@dataclass
class CheckCost:
    """The faithfulness check of one word (`captioner.check_word`) against one caption, medians in seconds."""
    check: float  # check_word: every hidden image in one encoder batch and one forced decoder pass
    caption: float  # caption() (beam 4, default map) of the same image
    images: int  # images in the check's batch (the whole one, the hottest and the random hidden ones)


def check_cost(cap, image, repeats: int) -> CheckCost:
    """Median seconds of `check_word` on word 1 of the image's caption (default map) and of that caption."""
    res = cap.caption(image, max_new_tokens=NEW_TOKENS)
    word = min(1, len(res.words) - 1)
    c = captioner.check_word(cap, res, word)  # warm-up
    checks, captions = [], []
    for _ in range(repeats):
        t = time.perf_counter()
        captioner.check_word(cap, res, word)
        checks.append(time.perf_counter() - t)
        t = time.perf_counter()
        cap.caption(image, max_new_tokens=NEW_TOKENS)
        captions.append(time.perf_counter() - t)
    return CheckCost(_median(checks), _median(captions), 1 + len(c.fractions) * (1 + len(c.random[0])))


def word_agreement(a: list, b: list) -> float:
    """Share of positions where two captions (words or tokens) agree, over the longer one (1.0 if both empty)."""
    n = max(len(a), len(b))
    return 1.0 if n == 0 else sum(x == y for x, y in zip(a, b)) / n


PRECISIONS = (("int8 dynamic", {"int8": True}), ("bf16", {"precision": "bf16"}),
              ("int8 weight-only", {"precision": "int8"}))  # the options set against fp32: label, load() keywords


@dataclass
class PrecisionFigures:
    option: str  # a label of PRECISIONS
    fp32: float = 0.0  # median caption() seconds, fp32
    reduced: float = 0.0  # ... with the option
    agree: float = 0.0  # mean word agreement with fp32 (`word_agreement`)
    tokens: float = 0.0  # mean token agreement
    exact: float = 0.0  # share of identical captions
    n: int = 0  # images
    refused: str = ""  # why this machine cannot run the option (then no figures)


def precision_figures(option: str, cap, reduced, images: list, num_beams: int = 4) -> PrecisionFigures:
    """Median caption() time fp32 vs a reduced-precision model over `images` (the two alternate image by image),
    mean word and token agreement, exact-caption share."""
    fp32, times, agree, tokens, exact = [], [], [], [], []
    reduced.caption(images[0], max_new_tokens=NEW_TOKENS, num_beams=num_beams, method="attention")  # warm-up
    for image in images:  # attention maps on both sides: int8 has no gradients for relevance
        t = time.perf_counter()
        a = cap.caption(image, max_new_tokens=NEW_TOKENS, num_beams=num_beams, method="attention")
        fp32.append(time.perf_counter() - t)
        t = time.perf_counter()
        b = reduced.caption(image, max_new_tokens=NEW_TOKENS, num_beams=num_beams, method="attention")
        times.append(time.perf_counter() - t)
        agree.append(word_agreement(a.words, b.words))
        tokens.append(word_agreement(a.token_ids, b.token_ids))
        exact.append(a.words == b.words)
    return PrecisionFigures(option, _median(fp32), _median(times), float(np.mean(agree)), float(np.mean(tokens)),
                            float(np.mean(exact)), len(images))


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


def eleven_words(tokenizer) -> str:
    """An 11-word caption whose every word is one token of `tokenizer` (the random BPE spells English words in
    many pieces, so a real sentence would be several times longer than a real caption's 11-13 tokens)."""
    words = []
    for token, _ in sorted(tokenizer.get_vocab().items(), key=lambda item: item[1]):
        word = token[1:]
        if token.startswith("\u0120") and word.isascii() and word.isalpha() and 2 <= len(word) <= 6 and \
                len(tokenizer(" " + word, add_special_tokens=False).input_ids) == 1:
            words.append(word)
        if len(words) == 11:
            break
    return " ".join(words)


@dataclass
class MapCost:
    """Median seconds of the default map method against attention."""
    method: str  # the default method
    words: int  # in the explained caption
    explain: float  # explain(image, text), default method
    explain_attention: float
    caption: float  # caption(image), beam 4, 16 tokens, default method
    caption_attention: float


def map_cost(cap, image, text: str, repeats: int) -> MapCost:
    """Median seconds of explain(image, text) and caption(image) (beam 4, 16 tokens) with the default method and
    with attention, alternated in one run."""
    times = {(kind, m): [] for kind in ("explain", "caption") for m in (captioner.DEFAULT_METHOD, "attention")}
    calls = {"explain": lambda m: cap.explain(image, text, method=m),
             "caption": lambda m: cap.caption(image, max_new_tokens=NEW_TOKENS, num_beams=4, method=m)}
    for kind, m in times:  # warm-up
        calls[kind](m)
    for _ in range(repeats):
        for kind, m in times:
            t = time.perf_counter()
            calls[kind](m)
            times[kind, m].append(time.perf_counter() - t)
    d = captioner.DEFAULT_METHOD
    return MapCost(d, len(text.split()), _median(times["explain", d]), _median(times["explain", "attention"]),
                   _median(times["caption", d]), _median(times["caption", "attention"]))


_COLD = """
import json, resource, sys, time
t0 = time.perf_counter()
import captioner
from PIL import Image
t1 = time.perf_counter()
cap = captioner.load(sys.argv[1])
t2 = time.perf_counter()
image = Image.open(sys.argv[2])
res = cap.caption(image, max_new_tokens=16, num_beams=4)
t3 = time.perf_counter()
for method in captioner.METHODS:  # what a visitor can ask for next, so that the peak is a server's
    cap.explain(image, sys.argv[3], method=method)
try:  # VmHWM: this process's own peak; ru_maxrss would include the parent it was forked from
    rss = int(next(l for l in open("/proc/self/status") if l.startswith("VmHWM")).split()[1]) / 1024
except OSError:
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps({"wall": t3 - t0, "import": t1 - t0, "load": t2 - t1, "caption": t3 - t2, "rss_mb": rss}))
"""


@dataclass
class ColdStart:
    """A fresh process to its first caption, in seconds, and its peak resident memory."""
    wall: float  # from process start to the first caption
    imports: float  # import captioner
    load: float  # captioner.load
    caption: float  # the first caption
    rss_mb: float  # peak RSS, after an explain with each method too


def cold_start(folder: str, image_path: str, text: str) -> ColdStart:
    """A fresh interpreter: import, load from the local folder, first caption (beam 4, default map). Seconds from
    process start (the weights are in the OS file cache by then) and its parts; then `text` explained with every
    method, and the process's peak resident memory over all of it."""
    out = subprocess.run([sys.executable, "-c", _COLD, folder, image_path, text], capture_output=True, text=True,
                         check=True)
    c = json.loads(out.stdout.strip().splitlines()[-1])
    return ColdStart(c["wall"], c["import"], c["load"], c["caption"], c["rss_mb"])


@dataclass
class BatchFigures:
    single: float  # images/s, caption() one at a time
    batched: float  # images/s, caption_batch
    same: float  # share of images with the same tokens both ways
    n: int  # images


def batch_figures(cap, images: list, batch_size: int = 8, num_beams: int = 4) -> BatchFigures:
    """Images per second: caption() one at a time vs caption_batch in batches of `batch_size`."""
    # warm-up with a whole batch: its row count is timed for the kernels on first use, outside the timed runs
    cap.caption_batch(images[:batch_size], max_new_tokens=NEW_TOKENS, num_beams=num_beams)
    t = time.perf_counter()
    one = [cap.caption(image, max_new_tokens=NEW_TOKENS, num_beams=num_beams) for image in images]
    single = time.perf_counter() - t
    t = time.perf_counter()
    batched = [r for i in range(0, len(images), batch_size)
               for r in cap.caption_batch(images[i:i + batch_size], max_new_tokens=NEW_TOKENS, num_beams=num_beams)]
    many = time.perf_counter() - t
    same = float(np.mean([a.token_ids == b.token_ids for a, b in zip(one, batched)]))
    return BatchFigures(len(images) / single, len(images) / many, same, len(images))


def _load_anchor(folder: str):
    from transformers import VisionEncoderDecoderModel

    return VisionEncoderDecoderModel.from_pretrained(folder).eval()  # default attention: SDPA


@dataclass
class DecodingRow:
    mode: str  # "beam 4" or "greedy"
    comparison: Comparison
    floor: Floor


@dataclass
class ModelBench:
    """Every figure of one model."""
    label: str
    decoding: list[DecodingRow]  # beam 4, then greedy
    decoded_by: str  # captioner's own loop, or generate and why
    kernels: list[str]  # the kernels kernels.Kernels chose on this machine (`Kernels.summary`)
    step_bytes: int  # fp32 decoder weights a step reads, LM head and cross K/V projection included
    step_bytes_no_cross: int  # ... without the cross K/V projection, which runs once per image
    maps: MapCost
    precision: list[PrecisionFigures]  # each of PRECISIONS against fp32
    batch: BatchFigures
    check: CheckCost | None = None  # the faithfulness check of one word
    cold: ColdStart | None = None  # measured separately (`cold_start`), in a fresh process


@dataclass
class Bench:
    threads: int  # torch threads
    repeats: int  # timed runs per side, after one warm-up
    models: list[ModelBench] = field(default_factory=list)
    click_ms: float | None = None  # one word's overlay on a 1024x1024 image from cached maps (`click_ms`)
    bandwidth: list[float] = field(default_factory=list)  # read bandwidth samples, bytes/s (`floors.ReadBandwidth`)
    passes: int = floors.PASSES  # sums per bandwidth sample


def physical(bench: Bench, m: ModelBench, row: DecodingRow) -> float:
    """The physical floor of one decoding row, in seconds: its measured encoder, then its steps' weight reads at the
    bench's best read bandwidth."""
    return floors.physical_floor(row.floor.encoder, row.floor.steps, m.step_bytes,
                                 floors.best_bandwidth(bench.bandwidth))


def _decoding_rows(cap, folder: str, image, repeats: int, bandwidth: ReadBandwidth | None) -> list[DecodingRow]:
    """Beam 4 and greedy: caption() against generate on the model as transformers loads it (a bandwidth sample
    before each timed round), and the kernel floor over the steps that caption decoded."""
    anchor = _load_anchor(folder)
    rows = []
    for beams, mode in ((4, "beam 4"), (1, "greedy")):
        c = compare(cap, anchor, image, beams, repeats, bandwidth)
        steps = floors.steps_decoded(c.tokens, NEW_TOKENS)
        rows.append(DecodingRow(mode, c, floors.floor_seconds(cap, anchor, image, beams, repeats, steps)))
    return rows


def _decoded_by(cap) -> str:
    why_not = decoding.unsupported(cap.model, do_sample=False)
    return "captioner's own loop (fastdecode)" if why_not is None else f"generate ({why_not})"


def _precisions(folder: str, cap, images: list) -> list[PrecisionFigures]:
    """Every option of PRECISIONS against fp32, or why this machine refuses it."""
    rows = []
    for option, how in PRECISIONS:
        try:
            reduced = captioner.load(folder, device="cpu", **how)
        except ValueError as e:
            rows.append(PrecisionFigures(option, refused=str(e)))
            continue
        rows.append(precision_figures(option, cap, reduced, images))
        del reduced
    return rows


def bench_model(label: str, folder: str, image, precision_images: list, batch_images: list, repeats: int, text: str,
                bandwidth: ReadBandwidth | None = None):
    """Every figure of the model in `folder` but its cold start (`bandwidth` sampled between the decoding's timed
    rounds); returns them and its fp32 Captioner."""
    cap = captioner.load(folder, device="cpu")
    rows = _decoding_rows(cap, folder, image, repeats, bandwidth)
    chosen = kernels.kernels_for(cap.model).summary()  # what decoding and the floor chose
    decoder = cap.model.decoder
    result = ModelBench(label, rows, _decoded_by(cap), chosen, floors.decoder_weight_bytes(decoder),
                        floors.decoder_weight_bytes(decoder, cross_kv=False), map_cost(cap, image, text, repeats),
                        _precisions(folder, cap, precision_images), batch_figures(cap, batch_images),
                        check_cost(cap, image, repeats))
    return result, cap


def _text_rows(m: ModelBench) -> list[str]:
    rows = []
    for row in m.decoding:
        r, f = row.comparison, row.floor
        rows.append(f"{m.label:<22} {row.mode:<7} {r.plain:>9.3f} s {r.ours:>9.3f} s {r.plain / r.ours:>6.2f}x"
                    f"  {'yes' if r.same else 'NO':<4} {f.floor:>7.3f} s {r.ours / f.floor:>6.2f}x"
                    f"   {f.linear:>7.3f} s {r.full:>9.3f} s  {r.tokens:>3} tokens, {r.words} words")
    return rows


def _text_floor_rows(bench: Bench, m: ModelBench) -> list[str]:
    rows = []
    for row in m.decoding:
        r, f, p = row.comparison, row.floor, physical(bench, m, row)
        rows.append(f"{m.label:<22} {row.mode:<7} {r.ours:>9.3f} s {f.floor:>7.3f} s {p:>8.3f} s {r.ours / p:>8.2f}x"
                    f" {f.floor / p:>8.2f}x {f.encoder:>7.3f} s {f.encoder / p:>7.0%} {f.steps:>6}  "
                    f"{'yes' if r.same else 'NO'}")
    return rows


def _text_physical(bench: Bench) -> list[str]:
    best, gb = floors.best_bandwidth(bench.bandwidth) / 1e9, [b / 1e9 for b in bench.bandwidth]
    return [f"read bandwidth (sum of a new 1 GiB fp32 tensor, best of {bench.passes} passes a sample): best "
            f"{best:.1f} GB/s, samples {min(gb):.1f}-{max(gb):.1f} GB/s ({len(gb)} samples)",
            *(f"{m.label}: fp32 decoder weights a step reads, LM head included: {m.step_bytes / 1e6:.1f} MB with the "
              f"cross K/V projection (standing for its one product per image), {m.step_bytes_no_cross / 1e6:.1f} MB "
              "without" for m in bench.models)]


def _text_extras(m: ModelBench) -> list[str]:
    c, b, k = m.maps, m.batch, m.check
    checked = [] if k is None else [
        f"{m.label}: map check of one word ({k.images} images, one batch) {k.check:.3f} s vs one caption (beam 4, "
        f"default map) {k.caption:.3f} s ({k.check / k.caption:.2f}x)"]
    return [*checked, f"{m.label}: greedy and beam search decoded by {m.decoded_by}",
            f"{m.label}: kernels chosen on this machine (kernels.Kernels):",
            *(f"    {line}" for line in m.kernels),
            f"{m.label}: default map ({c.method}) vs attention, {c.words}-word caption: explain "
            f"{c.explain:.3f} s vs {c.explain_attention:.3f} s ({c.explain / c.explain_attention:.2f}x); caption + "
            f"maps (beam 4) {c.caption:.3f} s vs {c.caption_attention:.3f} s "
            f"({c.caption / c.caption_attention:.2f}x)",
            *(f"{m.label}: {q.option} not run: {q.refused}" if q.refused else
              f"{m.label}: {q.option} beam 4 caption()+maps {q.reduced:.3f} s vs fp32 {q.fp32:.3f} s "
              f"({q.fp32 / q.reduced:.2f}x); word agreement {q.agree:.1%} (tokens {q.tokens:.1%}), identical "
              f"captions {q.exact:.0%} over {q.n} images" for q in m.precision),
            f"{m.label}: batch mode beam 4, {b.n} images: {b.batched:.2f} img/s batched (8) vs "
            f"{b.single:.2f} img/s one at a time ({b.batched / b.single:.2f}x); "
            f"same tokens as one at a time {b.same:.0%}"]


def _text_cold(m: ModelBench) -> list[str]:
    c = m.cold
    return [] if c is None else [
        f"{m.label}: cold start to first caption {c.wall:.1f} s (import {c.imports:.1f} s, load {c.load:.1f} s, "
        f"caption {c.caption:.2f} s); peak RSS {c.rss_mb:.0f} MB after that caption and an explain with each method"]


def text_report(bench: Bench) -> str:
    """The table and lines the command prints after its progress lines."""
    extras = []
    for k, m in enumerate(bench.models):
        extras += _text_extras(m)
        if k == 0 and bench.click_ms is not None:
            extras.append(f"word click, 1024x1024 image, titled_overlay from cached maps: {bench.click_ms:.1f} ms "
                          "median")
        extras += _text_cold(m)
    return "\n".join([
        f"\n{'model':<22} {'mode':<7} {'generate':>11} {'first':>11} {'ratio':>7}  {'same':<4} {'kernel':>9} "
        f"{'/kernel':>7}   {'F.linear':>9} {'default':>11}",
        f"{'':<22} {'':<7} {'(caption)':>11} {'answer':>11} {'':>7}  {'':<4} {'floor':>9} {'floor':>7}   "
        f"{'floor':>9} {'map':>11}",
        *(row for m in bench.models for row in _text_rows(m)), "",
        f"{'model':<22} {'mode':<7} {'first':>11} {'kernel':>9} {'physical':>10} {'first /':>9} {'kernel /':>9} "
        f"{'encoder':>9} {'encoder':>7} {'steps':>6}  same",
        f"{'':<22} {'':<7} {'answer':>11} {'floor':>9} {'floor':>10} {'physical':>9} {'physical':>9} {'':>9} "
        f"{'share':>7}",
        *(row for m in bench.models for row in _text_floor_rows(bench, m)), "", *_text_physical(bench), "",
        *extras])


def _table(head: list[str], rows: list[list[str]]) -> str:
    return "\n".join(["| " + " | ".join(head) + " |", "|" + "---|" * len(head),
                      *("| " + " | ".join(row) + " |" for row in rows)])


def _floor_tables(bench: Bench) -> list[tuple[str, str]]:
    """The first answer against both floors, and what the physical floor is made of."""
    best, gb = floors.best_bandwidth(bench.bandwidth) / 1e9, [b / 1e9 for b in bench.bandwidth]
    return [(
        "The first answer against the floors, in seconds. Kernel floor as above; physical floor is the encoder "
        "(measured: per run the faster of the anchor's, transformers' SDPA, and the project's, SDPA with its "
        "products through the timed kernels; median; both encoders' own medians follow) plus steps x the decoder's "
        "fp32 weight bytes per step / the best read bandwidth (both below); steps are the decoding steps of the "
        "timed caption, the step that chose EOS included (both floors use them); the ratios are over the physical "
        "floor; encoder share is the encoder's part of the physical floor; same: whether the first answer's tokens "
        "equal `generate`'s.",
        _table(["model", "mode", "first answer (s)", "kernel floor (s)", "physical floor (s)",
                "first answer / physical", "kernel floor / physical", "encoder (s)", "encoder share",
                "stock encoder (s)", "own encoder (s)", "steps", "same"],
               [[m.label, row.mode, f"{row.comparison.ours:.3f}", f"{row.floor.floor:.3f}", f"{p:.3f}",
                 f"{row.comparison.ours / p:.2f}x", f"{row.floor.floor / p:.2f}x", f"{row.floor.encoder:.3f}",
                 f"{row.floor.encoder / p:.0%}", f"{row.floor.stock_encoder:.3f}", f"{row.floor.own_encoder:.3f}",
                 str(row.floor.steps), "yes" if row.comparison.same else "NO"]
                for m in bench.models for row in m.decoding for p in [physical(bench, m, row)]])), (
        f"The physical floor's inputs. Read bandwidth: `t.sum()` over a new 1 GiB fp32 tensor, sampled before each timed "
        f"round of the decoding comparisons, each sample the best of {bench.passes} passes; the best sample is the "
        "machine's limit. Weights per step: every nn.Linear / GPT-2 Conv1D weight of the decoder in fp32, LM head "
        "included; the count with the cross-attention K/V projection (which runs once per image, not per step) "
        "stands for that one product per image, and is the one the physical floor uses.",
        _table(["model", "weights per step, with cross K/V (MB)", "without cross K/V (MB)",
                "read bandwidth, best (GB/s)", "samples, min-max (GB/s)", "samples"],
               [[m.label, f"{m.step_bytes / 1e6:.1f}", f"{m.step_bytes_no_cross / 1e6:.1f}", f"{best:.1f}",
                 f"{min(gb):.1f}-{max(gb):.1f}", str(len(gb))] for m in bench.models]))]


def markdown_tables(bench: Bench) -> list[tuple[str, str]]:
    """(what the columns mean, Markdown table) of every figure, for `report.write_markdown`."""
    ms = bench.models
    setup = (f"{bench.threads} torch threads, {NEW_TOKENS} new tokens, fp32, medians of {bench.repeats} timed runs "
             "after a warm-up.")
    tables = [(
        f"Decoding, {setup} Columns: generate is plain `generate` (the caption alone, default SDPA attention); "
        "first answer is the time to the page's first answer, `Captioner.caption` with attention maps (caption and "
        "maps); ratio is generate / first answer; same: whether the tokens are identical; kernel floor is the "
        "encoder, the cross-attention keys/values once, then one pass over every other decoder weight per decoding "
        "step through the kernels kernels.Kernels chose, and /kernel floor the first answer over it; F.linear floor "
        "the same pass through F.linear alone; default map is `caption` with the default map method (the page's last "
        "answer); then the caption's length.",
        _table(["model", "mode", "generate (s)", "first answer (s)", "ratio", "same", "kernel floor (s)",
                "/kernel floor",
                "F.linear floor (s)", "default map (s)", "tokens", "words"],
               [[m.label, row.mode, f"{row.comparison.plain:.3f}", f"{row.comparison.ours:.3f}",
                 f"{row.comparison.plain / row.comparison.ours:.2f}x", "yes" if row.comparison.same else "NO",
                 f"{row.floor.floor:.3f}", f"{row.comparison.ours / row.floor.floor:.2f}x",
                 f"{row.floor.linear:.3f}", f"{row.comparison.full:.3f}", str(row.comparison.tokens),
                 str(row.comparison.words)]
                for m in ms for row in m.decoding])), *_floor_tables(bench), (
        "How each model is decoded, and the kernel kernels.Kernels chose for each weight shape on this machine (its "
        "timed bandwidth for every candidate).",
        _table(["model", "decoded by", "kernels chosen"], [[m.label, m.decoded_by, "; ".join(m.kernels) or "–"]
                                                           for m in ms])), (
        "The default map method against attention, in seconds: `explain` of a caption of that many words, and "
        "`caption` (beam 4) with its maps; ratios are default / attention.",
        _table(["model", "default method", "words", "explain (s)", "explain, attention (s)", "ratio",
                "caption + maps (s)", "caption + maps, attention (s)", "ratio"],
               [[m.label, m.maps.method, str(m.maps.words), f"{m.maps.explain:.3f}", f"{m.maps.explain_attention:.3f}",
                 f"{m.maps.explain / m.maps.explain_attention:.2f}x", f"{m.maps.caption:.3f}",
                 f"{m.maps.caption_attention:.3f}", f"{m.maps.caption / m.maps.caption_attention:.2f}x"]
                for m in ms])), (
        "Reduced precision against fp32 (docs/decoding.md#precision): int8 dynamic is `load(..., int8=True)` (every "
        "Linear, activations quantised per call), bf16 and int8 weight-only are `load(..., precision=...)` (decoder "
        "weights only). Median seconds of caption() (beam 4, attention maps) in fp32 and with the option, the "
        "speed-up, the mean share of words and of tokens that agree with fp32, and the share of identical captions "
        "over the images; an option this machine refuses says why instead.",
        _table(["model", "option", "fp32 (s)", "option (s)", "speed-up", "word agreement", "token agreement",
                "identical captions", "images", "not run because"],
               [[m.label, q.option, *(["–"] * 7 + [q.refused] if q.refused else
                                      [f"{q.fp32:.3f}", f"{q.reduced:.3f}", f"{q.fp32 / q.reduced:.2f}x",
                                       f"{q.agree:.1%}", f"{q.tokens:.1%}", f"{q.exact:.0%}", str(q.n), ""])]
                for m in ms for q in m.precision])), (
        "Batch mode (beam 4): images per second captioned one at a time and by `caption_batch` in batches of 8, the "
        "speed-up, and the share of images whose tokens are the same both ways.",
        _table(["model", "one at a time (img/s)", "batched (img/s)", "speed-up", "same tokens", "images"],
               [[m.label, f"{m.batch.single:.2f}", f"{m.batch.batched:.2f}", f"{m.batch.batched / m.batch.single:.2f}x",
                 f"{m.batch.same:.0%}", str(m.batch.n)] for m in ms]))]
    checked = [m for m in ms if m.check is not None]
    if checked:
        tables.append((
            "The map check of one word (`captioner.check_word`: the hottest 10/25/50 % of the map hidden and random "
            "patches as many, in one encoder batch and one forced decoder pass) against one caption (beam 4, default "
            "map) of the same image, in seconds; ratio is check / caption.",
            _table(["model", "images in the batch", "check (s)", "caption (s)", "ratio"],
                   [[m.label, str(m.check.images), f"{m.check.check:.3f}", f"{m.check.caption:.3f}",
                     f"{m.check.check / m.check.caption:.2f}x"] for m in checked])))
    cold = [m for m in ms if m.cold is not None]
    if cold:
        tables.append((
            "Cold start: seconds from a fresh process's start to its first caption (beam 4, default map), then its "
            "parts (import, load from the local folder, the caption), and the process's peak resident memory after "
            "an explain with each method as well.",
            _table(["model", "first caption (s)", "import (s)", "load (s)", "caption (s)", "peak RSS (MB)"],
                   [[m.label, f"{m.cold.wall:.1f}", f"{m.cold.imports:.1f}", f"{m.cold.load:.1f}",
                     f"{m.cold.caption:.2f}", f"{m.cold.rss_mb:.0f}"] for m in cold])))
    if bench.click_ms is not None:
        tables.append(("A word click: milliseconds (median) to draw one word's titled overlay on a 1024x1024 image "
                       "from the maps a caption cached.",
                       _table(["image", "overlay from cached maps (ms)"], [["1024x1024", f"{bench.click_ms:.1f}"]])))
    return tables


def main(argv: list[str] | None = None) -> Bench:
    parser = argparse.ArgumentParser(prog="python -m captioner_train.bench", description=__doc__.split("\n")[0])
    parser.add_argument("--model", help="second model to bench (default: captioner.default_model())")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per side, after one warm-up (default 3)")
    parser.add_argument("--full-size-dir", help="keep the full-size random model here (built if missing)")
    parser.add_argument("--markdown", metavar="FILE",
                        help="write the tables here as Markdown, under a line naming machine, date, commit, torch "
                             "and this command")
    from_shell = argv is None  # run as a command, not called from Python
    argv = sys.argv[1:] if from_shell else list(argv)
    args = parser.parse_args(argv)
    second = args.model or captioner.default_model()
    photos = sorted(EXAMPLES.glob("*.jpg"))
    photo = np.asarray(Image.open(photos[0]).convert("RGB"))
    scenes = [np.asarray(make_scene(1_000_000 + k).image) for k in range(24)]
    print(f"{cpu_name()}; torch {torch.__version__}, {torch.get_num_threads()} threads; {NEW_TOKENS} new tokens, "
          f"fp32, {args.repeats} timed repeats after a warm-up, medians")
    bench = Bench(torch.get_num_threads(), args.repeats)
    bandwidth = ReadBandwidth()  # each sample sums a new 1 GiB tensor
    with tempfile.TemporaryDirectory() as tmp:
        full = args.full_size_dir or tmp
        if not Path(full, "config.json").exists():
            t = time.perf_counter()
            build_full_size(full)
            print(f"built the full-size random model in {time.perf_counter() - t:.0f} s -> {full}")
        photo_images = [np.asarray(Image.open(p).convert("RGB")) for p in photos]
        text = eleven_words(AutoTokenizer.from_pretrained(full))  # the tokenizer alone: not the 1 GB model twice
        figures, cap = bench_model("vit-gpt2 size (random)", full, photo, photo_images, (photo_images * 2)[:8],
                                   args.repeats, text, bandwidth)
        big = np.asarray(Image.open(photos[0]).convert("RGB").resize((1024, 1024)))
        bench.click_ms = click_ms(cap.caption(big, max_new_tokens=NEW_TOKENS))
        del cap
        figures.cold = cold_start(full, str(photos[0]), text)
        bench.models.append(figures)
    label = "bundled scene model" if second == captioner.BUNDLED_MODEL else Path(second).name[-22:]
    scene_text = make_scene(1_000_000).caption
    figures, _ = bench_model(label, second, scenes[0], scenes, scenes[:16], args.repeats, scene_text, bandwidth)
    figures.cold = cold_start(second, str(EXAMPLES / "scene_17.png"), scene_text)
    bench.models.append(figures)
    bench.bandwidth, bench.passes = bandwidth.samples, bandwidth.passes
    del bandwidth
    print(text_report(bench))
    if args.markdown:
        prog = launcher("captioner_train.bench") if from_shell else "python -m captioner_train.bench"
        write_markdown(args.markdown, command_line(prog, argv), markdown_tables(bench))
    return bench


if __name__ == "__main__":
    main()
