"""How good are the captions, and do the word maps point at the right object? `python -m captioner_train.evaluate MODEL`.

Held-out synthetic scenes (seeds EVAL_SEEDS_START.., used by neither training nor tests) give both answers,
because each scene has exactly one right caption and a box for every object it names:

- caption quality of generated captions: BLEU-4 and CIDEr (pycocoevalcap's scorers), exact-match rate, per-word
  accuracy, and the perplexity of the true caption under forced decoding;
- grounding, the pointing game: does the argmax of an object noun's map fall on that object? Scored for the true
  caption and for generated captions that got the noun right, next to a uniform-map and a random-map baseline.

Optionally also BLEU-4/CIDEr on a COCO-format captions file (`--coco-json F --image-dir D`).
Prints a Markdown table (for the README) and writes every number with `--json-out`.
"""
from __future__ import annotations

import argparse
import json
import math
import re
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider
from tqdm.auto import tqdm

from captioner.forcing import decoder_input, token_log_probs
from captioner.loading import load
from captioner.pipeline import Captioner

from .faithfulness import compare_methods, methods_table
from .pointing import EVAL_SEEDS_START, pointing_hit, uniform_hit_rate
from .synthetic import IMAGE_SIZE, make_scene

RANDOM_MAP_SEED = 0  # the random-map baseline draws the same noise on every run

MapFn = Callable[[Captioner, Image.Image, str], np.ndarray]  # (cap, image, caption) -> (W, gh, gw) word maps


def default_maps(cap: Captioner, image, text: str) -> np.ndarray:
    """The pipeline's word maps for `text` on `image` by its default method, (W, gh, gw): the pointing game's
    default map source."""
    return cap.explain(image, text).word_maps


def normalise_caption(text: str) -> str:
    """Lower-case, whitespace-separated words, with the punctuation that COCO references carry removed (a light
    stand-in for coco-caption's PTB tokenizer, which needs Java); scene captions pass through unchanged."""
    return " ".join(re.sub(r"[.,!?;:\"()]", " ", text.lower()).split())


def caption_scores(generated: dict, references: dict) -> dict[str, float]:
    """Corpus BLEU-4 and CIDEr(-D) of `generated` {id: caption} against `references` {id: [captions]}.

    CIDEr weighs n-grams by their document frequency over the references given, so it needs several distinct
    images and is only comparable between runs on the same image set.
    """
    if set(generated) != set(references) or not generated:
        raise ValueError("generated and references need the same, non-empty set of ids")
    res = {k: [normalise_caption(v)] for k, v in generated.items()}
    gts = {k: [normalise_caption(r) for r in refs] for k, refs in references.items()}
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    cider, _ = Cider().compute_score(gts, res)
    return {"bleu4": float(bleu[3]), "cider": float(cider)}


@torch.no_grad()
def token_nll(cap: Captioner, image, text: str) -> np.ndarray:
    """Negative log-likelihood (nats) of each token of `text` and then of EOS, (T+1,), under forced decoding.

    Tokenised exactly as `explain` and the training collator do, so the first T values are the -log of the
    token probabilities behind `explain(...).word_probs`, and the mean matches training's validation loss.
    """
    ids, _ = cap.tokenize(text)
    pixel_values = cap.pixel_values(image)  # (1, 3, h, w)
    decoder_input_ids = decoder_input(cap.start_token_id, ids, cap.device)  # (1, T+1)
    logits = cap.model(pixel_values=pixel_values, decoder_input_ids=decoder_input_ids).logits  # (1, T+1, V)
    return -token_log_probs(logits, decoder_input_ids, then=cap.eos_token_id)[0].cpu().numpy()  # (T+1,): then EOS


def _rate(hits: Sequence[float]) -> float | None:
    return float(np.mean(hits)) if len(hits) else None


def evaluate(cap: Captioner, n_scenes: int = 500, seed_start: int = EVAL_SEEDS_START, num_beams: int = 1,
             progress: bool = True, max_new_tokens: int | None = None,
             map_fn: MapFn = default_maps) -> dict:
    """Caption and grounding metrics of `cap` on scenes seed_start .. seed_start + n_scenes - 1.

    Captions are decoded with `num_beams` (1: greedy) and up to `max_new_tokens` tokens (None: as many as the
    model's positions allow, since the longest scene captions are 17 words). Returns a flat dict:

    - bleu4, cider (CIDEr-D as in coco-caption, x10 scale), exact_match (generated == true caption),
      word_accuracy (position-wise agreement over all true words; missing words count as wrong), words;
    - perplexity: exp of the mean NLL over every token of every true caption plus one EOS per caption (the
      start token is given, not predicted), pooled over scenes; tokens: how many were counted;
    - pointing_true / objects_true: pointing-game hit rate of the object nouns when explaining the true
      caption with `map_fn`, and how many nouns were scored; pointing_generated / objects_generated: the same
      on generated captions, counting only nouns the caption got right at the right word index;
    - pointing_{true,generated}_uniform and _random: baselines on those same objects, a uniform map (expected
      hit rate) and the argmax of uniform noise (seeded with RANDOM_MAP_SEED). Rates are None with no objects;
    - model, scenes, seed_start, num_beams, max_new_tokens, seconds_per_scene.
    """
    if n_scenes < 1:
        raise ValueError(f"n_scenes must be at least 1, got {n_scenes}.")
    max_new_tokens = max_new_tokens or min(64, cap.max_tokens - 1)
    rng = np.random.default_rng(RANDOM_MAP_SEED)
    generated, references = {}, {}
    exact, correct_words, n_words, nll, n_tokens = 0, 0, 0, 0.0, 0
    hits = {key: [] for key in ("true", "true_uniform", "true_random", "gen", "gen_uniform", "gen_random")}
    size = (IMAGE_SIZE, IMAGE_SIZE)  # (H, W) of every scene, which the maps cover
    start = time.perf_counter()
    for seed in tqdm(range(seed_start, seed_start + n_scenes), desc=f"evaluate (beams={num_beams})",
                     disable=not progress, dynamic_ncols=True):
        scene = make_scene(seed)
        true_words = scene.caption.split()
        res = cap.caption(scene.image, max_new_tokens=max_new_tokens, num_beams=num_beams)
        generated[seed], references[seed] = res.text, [scene.caption]
        exact += res.words == true_words
        correct_words += sum(g == t for g, t in zip(res.words, true_words))
        n_words += len(true_words)
        token_losses = token_nll(cap, scene.image, scene.caption)  # (T+1,)
        nll, n_tokens = nll + float(token_losses.sum()), n_tokens + len(token_losses)

        true_maps = map_fn(cap, scene.image, scene.caption)  # (W, gh, gw)
        assert len(true_maps) == len(true_words), f"{len(true_maps)} maps for {len(true_words)} words"
        gen_maps = None
        for obj in scene.objects:
            k, grid = obj.word_index, true_maps.shape[1:]
            uniform = uniform_hit_rate(grid, obj.box, size)
            # drawn for every object, so the generated-caption subset reuses the very same draws
            noise_hit = pointing_hit(rng.random(grid), obj.box, size)
            hits["true"].append(pointing_hit(true_maps[k], obj.box, size))
            hits["true_uniform"].append(uniform)
            hits["true_random"].append(noise_hit)
            if k < len(res.words) and res.words[k] == true_words[k]:
                if gen_maps is None:
                    gen_maps = map_fn(cap, scene.image, res.text)  # (W', gh, gw)
                hits["gen"].append(pointing_hit(gen_maps[k], obj.box, size))
                hits["gen_uniform"].append(uniform)
                hits["gen_random"].append(noise_hit)

    scores = caption_scores(generated, references)
    return {
        "model": cap.name, "scenes": n_scenes, "seed_start": seed_start, "num_beams": num_beams,
        "max_new_tokens": max_new_tokens,
        **scores, "exact_match": exact / n_scenes, "word_accuracy": correct_words / n_words, "words": n_words,
        "perplexity": math.exp(nll / n_tokens), "tokens": n_tokens,
        "pointing_true": _rate(hits["true"]), "pointing_true_uniform": _rate(hits["true_uniform"]),
        "pointing_true_random": _rate(hits["true_random"]), "objects_true": len(hits["true"]),
        "pointing_generated": _rate(hits["gen"]), "pointing_generated_uniform": _rate(hits["gen_uniform"]),
        "pointing_generated_random": _rate(hits["gen_random"]), "objects_generated": len(hits["gen"]),
        "seconds_per_scene": (time.perf_counter() - start) / n_scenes,
    }


def evaluate_coco(cap: Captioner, annotations: str | Path, image_dir: str | Path, limit: int | None = None,
                  num_beams: int = 1, progress: bool = True) -> dict:
    """BLEU-4 and CIDEr of generated captions against all references of each image in a COCO-format captions
    file (e.g. captions_val2017.json), over its first `limit` images."""
    data = json.loads(Path(annotations).read_text())
    refs: dict[int, list[str]] = {}
    for a in data["annotations"]:
        refs.setdefault(a["image_id"], []).append(a["caption"])
    images = [img for img in data["images"] if img["id"] in refs][:limit]
    if not images:
        raise ValueError(f"{annotations} has no image with a caption; pass a COCO captions file.")
    generated = {}
    for img in tqdm(images, desc=f"coco (beams={num_beams})", disable=not progress, dynamic_ncols=True):
        with Image.open(Path(image_dir) / img["file_name"]) as pil:
            generated[img["id"]] = cap.caption(pil.convert("RGB"), num_beams=num_beams).text
    scores = caption_scores(generated, {k: refs[k] for k in generated})
    return {"coco_images": len(images), "coco_bleu4": scores["bleu4"], "coco_cider": scores["cider"]}


ROWS = [  # (key, label, format) of the Markdown table
    ("bleu4", "BLEU-4", "{:.3f}"), ("cider", "CIDEr", "{:.3f}"), ("exact_match", "exact match", "{:.1%}"),
    ("word_accuracy", "word accuracy", "{:.1%}"), ("perplexity", "perplexity (true caption + EOS)", "{:.3f}"),
    ("pointing_true", "pointing game, true caption", "{:.1%}"),
    ("pointing_true_uniform", "... uniform-map baseline", "{:.1%}"),
    ("pointing_true_random", "... random-map baseline", "{:.1%}"), ("objects_true", "... objects", "{}"),
    ("pointing_generated", "pointing game, generated caption (noun right)", "{:.1%}"),
    ("pointing_generated_uniform", "... uniform-map baseline", "{:.1%}"),
    ("pointing_generated_random", "... random-map baseline", "{:.1%}"),
    ("objects_generated", "... objects", "{}"),
    ("coco_bleu4", "COCO BLEU-4", "{:.3f}"), ("coco_cider", "COCO CIDEr", "{:.3f}"),
    ("coco_images", "COCO images", "{}"), ("seconds_per_scene", "seconds per scene", "{:.3f}"),
]


def markdown_table(results: list[dict]) -> str:
    """One column per result (decoding setting), one row per metric any of them has."""
    head = ["metric"] + ["greedy" if r["num_beams"] == 1 else f"beam {r['num_beams']}" for r in results]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for key, label, fmt in ROWS:
        if any(key in r for r in results):
            cells = ["–" if r.get(key) is None else fmt.format(r[key]) for r in results]
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", help="model folder or hub id, as captioner.load takes")
    parser.add_argument("--scenes", type=int, default=500, help="held-out synthetic scenes to evaluate")
    parser.add_argument("--seed-start", type=int, default=EVAL_SEEDS_START, help="first scene seed")
    parser.add_argument("--beams", type=int, nargs="+", default=[1, 4],
                        help="beam counts to decode with (1: greedy), one table column and one full pass each")
    parser.add_argument("--coco-json", help="COCO-format captions file, e.g. captions_val2017.json")
    parser.add_argument("--image-dir", help="its images, e.g. val2017/")
    parser.add_argument("--limit", type=int, default=None, help="COCO images to caption (default: all)")
    parser.add_argument("--methods", nargs="*", default=["attention", "rollout", "relevance"],
                        help="map methods to compare (pointing game, deletion AUC, randomisation check)")
    parser.add_argument("--method-scenes", type=int, default=200, help="scenes for the method comparison")
    parser.add_argument("--json-out", help="write the metrics here as JSON")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    args = parser.parse_args(argv)
    if bool(args.coco_json) != bool(args.image_dir):
        parser.error("--coco-json and --image-dir go together")

    cap = load(args.model)
    results = []
    for beams in args.beams:
        result = evaluate(cap, args.scenes, args.seed_start, num_beams=beams, progress=not args.no_progress)
        if args.coco_json:
            result.update(evaluate_coco(cap, args.coco_json, args.image_dir, args.limit, beams,
                                        progress=not args.no_progress))
        results.append(result)
    print(f"{cap.name}: {args.scenes} held-out scenes (seeds {args.seed_start}..{args.seed_start + args.scenes - 1})\n")
    print(markdown_table(results))
    if args.methods:
        by_method = compare_methods(cap, args.method_scenes, args.seed_start, args.methods,
                                    progress=not args.no_progress)
        print(f"\nMap methods on the object nouns of {args.method_scenes} held-out scenes (true captions)\n")
        print(methods_table(by_method))
        results.append({"methods": by_method, "method_scenes": args.method_scenes})
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
