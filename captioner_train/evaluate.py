"""How good are the captions, and do the word maps point at the right object? `python -m captioner_train.evaluate MODEL`.

Held-out synthetic scenes (seeds EVAL_SEEDS_START.., used by neither training nor tests) give both answers,
because each scene has exactly one right caption and a box for every object it names:

- caption quality of generated captions: BLEU-4 and CIDEr (pycocoevalcap's scorers), exact-match rate, per-word
  accuracy, and the perplexity of the true caption under forced decoding;
- grounding, the pointing game: does the argmax of an object noun's map fall on that object? Scored for the true
  caption and for generated captions that got the noun right, next to a uniform-map and a random-map baseline.

Optionally also BLEU-4/CIDEr on a COCO-format captions file (`--coco-json F --image-dir D`).
Prints the Markdown tables, writes them with `--markdown FILE` (under a line naming machine, date, commit, torch
and command) and every number with `--json-out`.
"""
from __future__ import annotations

import argparse
import json
import math
import re
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
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

from .faithfulness import METHODS_COLUMNS, MethodScores, compare_methods, methods_table
from .pointing import (EVAL_SEEDS_START, ObjectScore, UniformBaseline, pointing_hit, records_by_seed, score_object,
                       uniform_baseline)
from .report import command_line, launcher, write_markdown
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


def _rate(values: Sequence[float]) -> float | None:
    return float(np.mean(values)) if len(values) else None


@dataclass
class Evaluation:
    """Caption and grounding metrics of one model and decoding setting on held-out scenes (see `evaluate`)."""
    model: str
    scenes: int
    seed_start: int
    num_beams: int
    max_new_tokens: int
    processes: int
    bleu4: float
    cider: float  # CIDEr-D as in coco-caption, x10 scale
    exact_match: float  # share of generated captions equal to the true one
    word_accuracy: float  # position-wise agreement over all true words; missing words count as wrong
    words: int
    perplexity: float  # exp of the mean NLL per true-caption token, EOS included
    tokens: int
    pointing_true: float | None  # pointing-game hit rate, object nouns of the true caption
    pointing_true_uniform: float | None
    pointing_true_random: float | None
    objects_true: int
    pointing_generated: float | None  # the same on generated captions, nouns right at the right index
    pointing_generated_uniform: float | None
    pointing_generated_random: float | None
    objects_generated: int
    energy_true: float | None  # share of the noun map's mass on the object's patches
    energy_true_overlay: float | None  # ... on the upsampled overlay's pixels
    energy_true_uniform: float | None
    energy_true_overlay_uniform: float | None
    energy_generated: float | None
    errors: dict  # {part: {value: [wrong, seen]}} (`count_errors`)
    seconds_per_scene: float  # wall time, all processes together, divided by the scenes
    coco_images: int | None = None  # set by `evaluate_coco`'s figures when a COCO file is given
    coco_bleu4: float | None = None
    coco_cider: float | None = None


@dataclass
class SceneRecord:
    """Everything `evaluate` pools from one held-out scene."""
    seed: int
    generated: str
    reference: str
    exact: bool
    correct_words: int
    n_words: int
    nll: float  # summed over the true caption's tokens and EOS
    n_tokens: int
    true: list[ObjectScore]  # per object noun of the true caption, in object order
    uniform: list[UniformBaseline]  # per object
    random_hit: list[bool]  # per object: the argmax of uniform noise on the object
    generated_objects: list[int]  # the objects whose noun the generated caption got right at the right index
    gen: list[ObjectScore]  # their maps' scores when explaining the generated caption


def evaluate(cap: Captioner, n_scenes: int = 500, seed_start: int = EVAL_SEEDS_START, num_beams: int = 1,
             progress: bool = True, max_new_tokens: int | None = None,
             map_fn: MapFn = default_maps, ranks: Ranks = Ranks()) -> Evaluation | None:
    """Caption and grounding metrics of `cap` on scenes seed_start .. seed_start + n_scenes - 1.

    Captions are decoded with `num_beams` (1: greedy) and up to `max_new_tokens` tokens (None: as many as the
    model's positions allow, since the longest scene captions are 17 words). Under torchrun each rank takes every
    world-th scene and rank 0 pools them in seed order, so the figures equal one process's; other ranks return
    None. The `Evaluation`'s fields:

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
    records = records_by_seed(ranks, list(range(seed_start, seed_start + n_scenes)),
                              lambda seed: scene_record(cap, seed, num_beams, max_new_tokens, map_fn),
                              f"evaluate (beams={num_beams})", progress)
    if records is None:
        return None
    return Evaluation(model=cap.name, scenes=n_scenes, seed_start=seed_start, num_beams=num_beams,
                      max_new_tokens=max_new_tokens, processes=ranks.world, **_caption_metrics(records),
                      **_grounding_metrics(records), errors=_errors(records),
                      seconds_per_scene=(time.perf_counter() - start) / n_scenes)


def _caption_metrics(records: list[SceneRecord]) -> dict:
    """The caption-quality fields of `Evaluation`, pooled over the scenes."""
    n_words = sum(r.n_words for r in records)
    nll, n_tokens = sum(r.nll for r in records), sum(r.n_tokens for r in records)
    scores = caption_scores({r.seed: r.generated for r in records}, {r.seed: [r.reference] for r in records})
    return dict(**scores, exact_match=sum(r.exact for r in records) / len(records),
                word_accuracy=sum(r.correct_words for r in records) / n_words, words=n_words,
                perplexity=math.exp(nll / n_tokens), tokens=n_tokens)


def _grounding_metrics(records: list[SceneRecord]) -> dict:
    """The pointing and energy fields of `Evaluation`, pooled over every scored object of every scene."""
    true = [s for r in records for s in r.true]
    uniform = [u for r in records for u in r.uniform]
    random_hit = [h for r in records for h in r.random_hit]
    gen = [s for r in records for s in r.gen]
    gen_uniform = [r.uniform[k] for r in records for k in r.generated_objects]
    gen_random = [r.random_hit[k] for r in records for k in r.generated_objects]
    return dict(pointing_true=_rate([s.hit for s in true]), pointing_true_uniform=_rate([u.hit for u in uniform]),
                pointing_true_random=_rate(random_hit), objects_true=len(true),
                pointing_generated=_rate([s.hit for s in gen]),
                pointing_generated_uniform=_rate([u.hit for u in gen_uniform]),
                pointing_generated_random=_rate(gen_random), objects_generated=len(gen),
                energy_true=_rate([s.energy for s in true]),
                energy_true_overlay=_rate([s.energy_overlay for s in true]),
                energy_true_uniform=_rate([u.energy for u in uniform]),
                energy_true_overlay_uniform=_rate([u.energy_overlay for u in uniform]),
                energy_generated=_rate([s.energy for s in gen]))


def _errors(records: list[SceneRecord]) -> dict:
    errors: dict = {}
    for r in records:
        count_errors(errors, r.reference, r.generated)
    return errors


def scene_record(cap: Captioner, seed: int, num_beams: int, max_new_tokens: int, map_fn: MapFn) -> SceneRecord:
    """Everything `evaluate` pools from one held-out scene: the generated caption, word and token counts, and
    per object noun its scores, the baselines, and its scores on the generated caption when that got it right."""
    size = (IMAGE_SIZE, IMAGE_SIZE)  # (H, W) of every scene, which the maps cover
    scene = make_scene(seed)
    true_words = scene.caption.split()
    res = cap.caption(scene.image, max_new_tokens=max_new_tokens, num_beams=num_beams)
    token_losses = token_nll(cap, scene.image, scene.caption)  # (T+1,)
    true_maps = map_fn(cap, scene.image, scene.caption)  # (W, gh, gw)
    assert len(true_maps) == len(true_words), f"{len(true_maps)} maps for {len(true_words)} words"
    grid = true_maps.shape[1:]
    rng = np.random.default_rng((RANDOM_MAP_SEED, seed))  # per scene: the same draws however scenes are split
    # drawn for every object, so the generated-caption subset reuses the very same draws
    random_hit = [pointing_hit(rng.random(grid), obj.box, size) for obj in scene.objects]
    right = [i for i, obj in enumerate(scene.objects)
             if obj.word_index < len(res.words) and res.words[obj.word_index] == true_words[obj.word_index]]
    gen_maps = map_fn(cap, scene.image, res.text) if right else None  # (W', gh, gw)
    return SceneRecord(
        seed=seed, generated=res.text, reference=scene.caption, exact=res.words == true_words,
        correct_words=sum(g == t for g, t in zip(res.words, true_words)), n_words=len(true_words),
        nll=float(token_losses.sum()), n_tokens=len(token_losses),
        true=[score_object(true_maps[obj.word_index], obj.box, size) for obj in scene.objects],
        uniform=[uniform_baseline(grid, obj.box, size) for obj in scene.objects], random_hit=random_hit,
        generated_objects=right,
        gen=[score_object(gen_maps[scene.objects[i].word_index], scene.objects[i].box, size) for i in right])


@dataclass
class CocoScores:
    coco_images: int
    coco_bleu4: float
    coco_cider: float


def evaluate_coco(cap: Captioner, annotations: str | Path, image_dir: str | Path, limit: int | None = None,
                  num_beams: int = 1, progress: bool = True) -> CocoScores:
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
    return CocoScores(len(images), scores["bleu4"], scores["cider"])


ROWS = [  # (field, label, format) of the Markdown table
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
COCO_FIELDS = {"coco_bleu4", "coco_cider", "coco_images"}  # rows shown only when a COCO file was scored


def setting(num_beams: int) -> str:
    """A decoding setting's name in the tables."""
    return "greedy" if num_beams == 1 else f"beam {num_beams}"


def markdown_table(results: list[Evaluation]) -> str:
    """One column per result (decoding setting), one row per metric (COCO's only when one of them has it)."""
    head = ["metric"] + [setting(r.num_beams) for r in results]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for key, label, fmt in ROWS:
        values = [getattr(r, key) for r in results]
        if key not in COCO_FIELDS or any(v is not None for v in values):
            cells = ["–" if v is None else fmt.format(v) for v in values]
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


METRICS_COLUMNS = ("Each column is one decoding setting (greedy, or beam search with that many beams) over the "
                   "same scenes; each row one metric (defined in `captioner_train.evaluate.evaluate`), – where no "
                   "object could be scored.")
ERRORS_COLUMNS = ("Columns: the part of the true caption (objects: the whole caption, by how many objects it "
                  "names), its value, how many generated captions got it wrong, of how many that had it, and the "
                  "error rate.")


@dataclass
class Report:
    """What `python -m captioner_train.evaluate` found: one `Evaluation` per decoding setting, and the map methods
    compared on `method_scenes` scenes (None when no methods were asked for)."""
    results: list[Evaluation]
    methods: dict[str, MethodScores] | None
    method_scenes: int

    def to_json(self) -> list[dict]:
        """The `--json-out` list: each evaluation's fields (COCO's only when scored), then {"methods": {method:
        scores}, "method_scenes"}."""
        out = [{k: v for k, v in asdict(r).items() if k not in COCO_FIELDS or v is not None} for r in self.results]
        if self.methods is not None:
            out.append({"methods": {m: asdict(s) for m, s in self.methods.items()},
                        "method_scenes": self.method_scenes})
        return out

    def tables(self) -> list[tuple[str, str, str]]:
        """(title, what the columns mean, Markdown table) of each table, in printing order."""
        first = self.results[0]
        processes = f" on {first.processes} processes" if first.processes > 1 else ""
        title = (f"{first.model}: {first.scenes} held-out scenes (seeds {first.seed_start}.."
                 f"{first.seed_start + first.scenes - 1}){processes}")
        out = [(title, METRICS_COLUMNS, markdown_table(self.results))]
        for r in self.results:
            out.append((f"Errors by part, {setting(r.num_beams)} (a caption outside the grammar counts every part "
                        "wrong)", ERRORS_COLUMNS, errors_table(r.errors)))
        if self.methods is not None:
            out.append((f"Map methods on the object nouns of {self.method_scenes} held-out scenes (true captions)",
                        METHODS_COLUMNS, methods_table(self.methods)))
        return out

    def printed(self) -> str:
        """What the command prints: each table under its title."""
        return "\n\n".join(f"{title}\n\n{table}" for title, _, table in self.tables())

    def markdown_tables(self) -> list[tuple[str, str]]:
        """(title and what the columns mean, table) of each table, for `report.write_markdown`."""
        return [(f"{title} {columns}", table) for title, columns, table in self.tables()]


def main(argv=None) -> Report | None:
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
    parser.add_argument("--markdown", metavar="FILE",
                        help="write the tables here as Markdown, under a line naming machine, date, commit, torch "
                             "and this command")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    from_shell = argv is None  # run as a command, not called from Python
    argv = sys.argv[1:] if from_shell else list(argv)
    args = parser.parse_args(argv)
    if bool(args.coco_json) != bool(args.image_dir):
        parser.error("--coco-json and --image-dir go together")

    ranks, device = distributed.start(args.device)
    try:
        report = _run(args, ranks, load(args.model, device=device))
        if report is not None and args.markdown:
            prog = launcher("captioner_train.evaluate", ranks.world) if from_shell else \
                "python -m captioner_train.evaluate"  # called from Python: the command that does the same
            write_markdown(args.markdown, command_line(prog, argv), report.markdown_tables())
        return report
    finally:
        distributed.stop(ranks)


def _evaluations(args, ranks: Ranks, cap: Captioner) -> list[Evaluation] | None:
    """One evaluation per beam count; COCO's scores joined to each on rank 0 (other ranks: None)."""
    progress = not args.no_progress
    results = []
    for beams in args.beams:
        result = evaluate(cap, args.scenes, args.seed_start, num_beams=beams, progress=progress, ranks=ranks)
        if args.coco_json and ranks.main:  # COCO images are not split: rank 0 alone
            coco = evaluate_coco(cap, args.coco_json, args.image_dir, args.limit, beams, progress=progress)
            result = replace(result, **asdict(coco))
        results.append(result)
    return results if ranks.main else None


def _run(args, ranks: Ranks, cap: Captioner) -> Report | None:
    """Every rank evaluates its share; rank 0 prints the tables and returns the report (others None)."""
    results = _evaluations(args, ranks, cap)
    by_method = compare_methods(cap, args.method_scenes, args.seed_start, args.methods,
                                progress=not args.no_progress, ranks=ranks) if args.methods else None
    if not ranks.main:
        return None
    report = Report(results, by_method, args.method_scenes)
    print(report.printed())
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(report.to_json(), indent=2))
    return report


if __name__ == "__main__":
    main()
