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

from captioner import distributed
from captioner.distributed import Ranks
from captioner.forcing import decoder_input, token_log_probs
from captioner.loading import load
from captioner.pipeline import Captioner

from .faithfulness import compare_methods, methods_table
from .pointing import (EVAL_SEEDS_START, energy_share, overlay_energy_share, pointing_hit, uniform_energy_share,
                       uniform_hit_rate, uniform_overlay_share)
from .synthetic import COLOURS, IMAGE_SIZE, RELATIONS, SHAPES, SIZES, make_scene

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


def caption_parts(text: str) -> tuple[list[tuple[str, str, str]], list[str]] | None:
    """A scene caption's objects [(size, colour, shape)] and relations ["left of", ...] in caption order, or None
    when `text` does not follow the scene grammar (see `synthetic`)."""
    words, objects, relations, i = text.split(), [], [], 0
    while i < len(words):
        if objects:  # a relation (after "and" from the third object on) comes before every object but the first
            if len(objects) == 2:
                if words[i] != "and":
                    return None
                i += 1
            rel = next((r for r in RELATIONS if words[i:i + len(r.split())] == r.split()), None)
            if rel is None:
                return None
            relations.append(rel)
            i += len(rel.split())
        if (len(words) < i + 4 or words[i] != "a" or words[i + 1] not in SIZES or words[i + 2] not in COLOURS
                or words[i + 3] not in SHAPES):
            return None
        objects.append(tuple(words[i + 1:i + 4]))
        i += 4
    return (objects, relations) if objects and len(objects) <= 3 else None


def count_errors(errors: dict, true: str, generated: str) -> None:
    """Add one scene to `errors` {part: {value: [wrong, seen]}}: each true object's size, colour and shape, each
    true relation, and the scene's object count, right or wrong in `generated` at the same place. A generated
    caption outside the grammar gets everything wrong."""
    t, g = caption_parts(true), caption_parts(generated)
    g_objects, g_relations = g if g else ([], [])

    def add(part: str, value: str, right: bool) -> None:
        cell = errors.setdefault(part, {}).setdefault(value, [0, 0])
        cell[0] += not right
        cell[1] += 1
    for i, obj in enumerate(t[0]):
        for part, k in (("size", 0), ("colour", 1), ("shape", 2)):
            add(part, obj[k], i < len(g_objects) and g_objects[i][k] == obj[k])
    for i, rel in enumerate(t[1]):
        add("relation", rel, i < len(g_relations) and g_relations[i] == rel)
    add("objects", f"{len(t[0])} object{'s' * (len(t[0]) > 1)} (whole caption)", true == generated)


def errors_table(errors: dict) -> str:
    """Markdown: error rate of each size, colour, shape, relation and object count, worst first within each."""
    lines = ["| part | value | wrong | of | error rate |", "|---|---|---|---|---|"]
    for part in ("objects", "relation", "shape", "colour", "size"):
        for value, (wrong, seen) in sorted(errors.get(part, {}).items(), key=lambda kv: -kv[1][0] / kv[1][1]):
            lines.append(f"| {part} | {value} | {wrong} | {seen} | {wrong / seen:.1%} |")
    return "\n".join(lines)


def _rate(hits: Sequence[float]) -> float | None:
    return float(np.mean(hits)) if len(hits) else None


def evaluate(cap: Captioner, n_scenes: int = 500, seed_start: int = EVAL_SEEDS_START, num_beams: int = 1,
             progress: bool = True, max_new_tokens: int | None = None,
             map_fn: MapFn = default_maps, ranks: Ranks = Ranks()) -> dict | None:
    """Caption and grounding metrics of `cap` on scenes seed_start .. seed_start + n_scenes - 1.

    Captions are decoded with `num_beams` (1: greedy) and up to `max_new_tokens` tokens (None: as many as the
    model's positions allow, since the longest scene captions are 17 words). Under torchrun each rank takes every
    world-th scene and rank 0 pools them in seed order, so the figures equal one process's; other ranks return
    None. Returns a flat dict:

    - bleu4, cider (CIDEr-D as in coco-caption, x10 scale), exact_match (generated == true caption),
      word_accuracy (position-wise agreement over all true words; missing words count as wrong), words;
    - perplexity: exp of the mean NLL over every token of every true caption plus one EOS per caption (the
      start token is given, not predicted), pooled over scenes; tokens: how many were counted;
    - pointing_true / objects_true: pointing-game hit rate of the object nouns when explaining the true
      caption with `map_fn`, and how many nouns were scored; pointing_generated / objects_generated: the same
      on generated captions, counting only nouns the caption got right at the right word index;
    - pointing_{true,generated}_uniform and _random: baselines on those same objects, a uniform map (expected
      hit rate) and the argmax of uniform noise (seeded with RANDOM_MAP_SEED). Rates are None with no objects;
    - energy_true / energy_generated: mean share of the noun map's mass on the patches inside the object's box
      (`pointing.energy_share`), energy_true_overlay the same on the upsampled overlay's pixels; _uniform: what a
      uniform map scores on those objects, on the grid and on the overlay;
    - errors: {part: {value: [wrong, seen]}} by object count, relation, shape, colour and size (`count_errors`);
    - model, scenes, seed_start, num_beams, max_new_tokens, processes, seconds_per_scene (wall time, all
      processes together, divided by the scenes).
    """
    if n_scenes < 1:
        raise ValueError(f"n_scenes must be at least 1, got {n_scenes}.")
    max_new_tokens = max_new_tokens or min(64, cap.max_tokens - 1)
    start = time.perf_counter()
    seeds = ranks.share(list(range(seed_start, seed_start + n_scenes)))
    mine = [scene_record(cap, seed, num_beams, max_new_tokens, map_fn)
            for seed in tqdm(seeds, desc=f"evaluate (beams={num_beams})", disable=not (progress and ranks.main),
                             dynamic_ncols=True)]
    gathered = distributed.gather(ranks, mine)
    if not ranks.main:
        return None
    records = sorted((r for part in gathered for r in part), key=lambda r: r["seed"])  # as one process has them

    def pooled(key: str) -> list:
        return [x for r in records for x in r[key]]
    errors: dict = {}
    for r in records:
        count_errors(errors, r["reference"], r["generated"])
    n_words = sum(r["n_words"] for r in records)
    nll, n_tokens = sum(r["nll"] for r in records), sum(r["n_tokens"] for r in records)
    scores = caption_scores({r["seed"]: r["generated"] for r in records},
                            {r["seed"]: [r["reference"]] for r in records})
    return {
        "model": cap.name, "scenes": n_scenes, "seed_start": seed_start, "num_beams": num_beams,
        "max_new_tokens": max_new_tokens, "processes": ranks.world,
        **scores, "exact_match": sum(r["exact"] for r in records) / n_scenes,
        "word_accuracy": sum(r["correct_words"] for r in records) / n_words, "words": n_words,
        "perplexity": math.exp(nll / n_tokens), "tokens": n_tokens,
        "pointing_true": _rate(pooled("true")), "pointing_true_uniform": _rate(pooled("true_uniform")),
        "pointing_true_random": _rate(pooled("true_random")), "objects_true": len(pooled("true")),
        "pointing_generated": _rate(pooled("gen")), "pointing_generated_uniform": _rate(pooled("gen_uniform")),
        "pointing_generated_random": _rate(pooled("gen_random")), "objects_generated": len(pooled("gen")),
        "energy_true": _rate(pooled("energy_true")), "energy_true_overlay": _rate(pooled("energy_true_overlay")),
        "energy_true_uniform": _rate(pooled("energy_true_uniform")),
        "energy_true_overlay_uniform": _rate(pooled("energy_true_overlay_uniform")),
        "energy_generated": _rate(pooled("energy_gen")),
        "errors": errors, "seconds_per_scene": (time.perf_counter() - start) / n_scenes,
    }


def scene_record(cap: Captioner, seed: int, num_beams: int, max_new_tokens: int, map_fn: MapFn) -> dict:
    """Everything `evaluate` pools from one held-out scene: the generated caption, word and token counts, and
    per object noun its pointing hit, energy shares and baselines (lists, in object order)."""
    size = (IMAGE_SIZE, IMAGE_SIZE)  # (H, W) of every scene, which the maps cover
    scene = make_scene(seed)
    true_words = scene.caption.split()
    res = cap.caption(scene.image, max_new_tokens=max_new_tokens, num_beams=num_beams)
    token_losses = token_nll(cap, scene.image, scene.caption)  # (T+1,)
    r = {"seed": seed, "generated": res.text, "reference": scene.caption, "exact": res.words == true_words,
         "correct_words": sum(g == t for g, t in zip(res.words, true_words)), "n_words": len(true_words),
         "nll": float(token_losses.sum()), "n_tokens": len(token_losses),
         **{key: [] for key in ("true", "true_uniform", "true_random", "gen", "gen_uniform", "gen_random",
                                "energy_true", "energy_true_overlay", "energy_true_uniform",
                                "energy_true_overlay_uniform", "energy_gen")}}
    rng = np.random.default_rng((RANDOM_MAP_SEED, seed))  # per scene: the same draws however scenes are split
    true_maps = map_fn(cap, scene.image, scene.caption)  # (W, gh, gw)
    assert len(true_maps) == len(true_words), f"{len(true_maps)} maps for {len(true_words)} words"
    gen_maps = None
    for obj in scene.objects:
        k, grid = obj.word_index, true_maps.shape[1:]
        uniform = uniform_hit_rate(grid, obj.box, size)
        # drawn for every object, so the generated-caption subset reuses the very same draws
        noise_hit = pointing_hit(rng.random(grid), obj.box, size)
        r["true"].append(pointing_hit(true_maps[k], obj.box, size))
        r["true_uniform"].append(uniform)
        r["true_random"].append(noise_hit)
        r["energy_true"].append(energy_share(true_maps[k], obj.box, size))
        r["energy_true_overlay"].append(overlay_energy_share(true_maps[k], obj.box, size))
        r["energy_true_uniform"].append(uniform_energy_share(grid, obj.box, size))
        r["energy_true_overlay_uniform"].append(uniform_overlay_share(obj.box, size))
        if k < len(res.words) and res.words[k] == true_words[k]:
            if gen_maps is None:
                gen_maps = map_fn(cap, scene.image, res.text)  # (W', gh, gw)
            r["gen"].append(pointing_hit(gen_maps[k], obj.box, size))
            r["energy_gen"].append(energy_share(gen_maps[k], obj.box, size))
            r["gen_uniform"].append(uniform)
            r["gen_random"].append(noise_hit)
    return r


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
    ("energy_true", "energy pointing (map mass on the object), true caption", "{:.3f}"),
    ("energy_true_overlay", "... on the upsampled overlay", "{:.3f}"),
    ("energy_true_uniform", "... uniform-map baseline", "{:.3f}"),
    ("energy_true_overlay_uniform", "... uniform-map baseline on the overlay", "{:.3f}"),
    ("energy_generated", "energy pointing, generated caption (noun right)", "{:.3f}"),
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
                        help="map methods to compare (pointing game, energy, deletion AUC, randomisation check): "
                             "the library's, and candidates from captioner_train.candidates (gradxinput, "
                             "decoder-relevance)")
    parser.add_argument("--method-scenes", type=int, default=200, help="scenes for the method comparison")
    parser.add_argument("--device", help="cpu or cuda (default: cuda when present)")
    parser.add_argument("--json-out", help="write the metrics here as JSON")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    args = parser.parse_args(argv)
    if bool(args.coco_json) != bool(args.image_dir):
        parser.error("--coco-json and --image-dir go together")

    ranks, device = distributed.start(args.device)
    try:
        return _run(args, ranks, load(args.model, device=device))
    finally:
        distributed.stop(ranks)


def _run(args, ranks: Ranks, cap: Captioner) -> list[dict] | None:
    """Every rank evaluates its share; rank 0 prints the tables and returns the results (others None)."""
    progress = not args.no_progress
    results = []
    for beams in args.beams:
        result = evaluate(cap, args.scenes, args.seed_start, num_beams=beams, progress=progress, ranks=ranks)
        if args.coco_json and ranks.main:  # COCO images are not split: rank 0 alone
            result.update(evaluate_coco(cap, args.coco_json, args.image_dir, args.limit, beams, progress=progress))
        results.append(result)
    by_method = compare_methods(cap, args.method_scenes, args.seed_start, args.methods, progress=progress,
                                ranks=ranks) if args.methods else None
    if not ranks.main:
        return None
    processes = f" on {ranks.world} processes" if ranks.world > 1 else ""
    print(f"{cap.name}: {args.scenes} held-out scenes (seeds {args.seed_start}..{args.seed_start + args.scenes - 1})"
          f"{processes}\n")
    print(markdown_table(results))
    for r in results:
        setting = "greedy" if r["num_beams"] == 1 else f"beam {r['num_beams']}"
        print(f"\nErrors by part, {setting} (a caption outside the grammar counts every part wrong)\n")
        print(errors_table(r["errors"]))
    if by_method is not None:
        print(f"\nMap methods on the object nouns of {args.method_scenes} held-out scenes (true captions)\n")
        print(methods_table(by_method))
        results.append({"methods": by_method, "method_scenes": args.method_scenes})
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
