"""Which map method is right? Pointing game, deletion curves and a weight-randomisation check, per method.

- Pointing game: does the peak of an object noun's map fall on that object (see `evaluate.pointing_hit`)?
- Deletion (Petsiuk et al. 2018): grey out the patches the map ranks highest, 1/STEPS of the grid at a time,
  and follow the probability of the word; the area under that curve is low when the map found what the word
  depends on. A random patch order on the same words is the baseline.
- Randomisation (Adebayo et al. 2018): maps of a model with re-initialised weights should not resemble the
  trained model's; we report the Spearman rank correlation between the two (lower is better; a method that only
  echoes the image, like an edge detector, scores high).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from captioner.check import pixel_word_probabilities
from captioner.distributed import Ranks
from captioner.loading import EAGER
from captioner.pipeline import METHODS, Captioner

from .candidates import CANDIDATES
from .pointing import (EVAL_SEEDS_START, ObjectScore, UniformBaseline, records_by_seed, score_object,
                       uniform_baseline)
from .synthetic import IMAGE_SIZE, make_scene

STEPS = 8  # deletion steps: 0, 1/8, ..., 8/8 of the patches greyed out


@torch.no_grad()
def deletion_curve(cap: Captioner, image, text: str, word: int, order: np.ndarray) -> np.ndarray:
    """Probability of word `word` of `text` as the patches in `order` (flat indices, most relevant first) are
    greyed out, (STEPS + 1,): entry s has s/STEPS of the grid removed. One batched forward pass."""
    ids, groups = cap.tokenize(text)
    gh, gw = cap.grid
    pixel_values = cap.pixel_values(image)  # (1, 3, h, w)
    h, w = pixel_values.shape[-2:]
    batch = pixel_values.repeat(STEPS + 1, 1, 1, 1)  # (S+1, 3, h, w)
    for s in range(1, STEPS + 1):
        for flat in order[: round(s * gh * gw / STEPS)]:
            i, j = divmod(int(flat), gw)
            # 0 is the processor's mean colour: the patch carries no information any more
            batch[s, :, i * h // gh:(i + 1) * h // gh, j * w // gw:(j + 1) * w // gw] = 0
    return pixel_word_probabilities(cap, batch, ids, groups[word])  # (S+1,)


def _auc(curve: np.ndarray) -> float:
    return float(np.trapezoid(curve, dx=1.0 / (len(curve) - 1)))


def _spearman(a: np.ndarray, b: np.ndarray) -> float:
    ra, rb = a.ravel().argsort().argsort(), b.ravel().argsort().argsort()
    return float(np.corrcoef(ra, rb)[0, 1])


def randomised(cap: Captioner, seed: int = 0) -> Captioner:
    """The same architecture, tokenizer and processor with freshly initialised weights."""
    torch.manual_seed(seed)
    model = type(cap.model)(cap.model.config)
    model.set_attn_implementation(EAGER)
    return Captioner(model.to(cap.device), cap.tokenizer, cap.processor, name=f"{cap.name} (random weights)")


@dataclass
class MethodScores:
    """One map method over the object nouns of the true captions (means over those nouns)."""
    pointing: float  # pointing-game hit rate
    energy: float  # share of the map's mass on the object's patches
    energy_overlay: float  # ... on the upsampled overlay's pixels
    deletion_auc: float  # area under the deletion curve in the map's patch order (lower: the map found it)
    deletion_auc_random: float  # the same in a random patch order
    rank_corr_random_weights: float  # Spearman correlation with a weight-randomised model's maps (lower is better)
    energy_uniform: float  # what a uniform map scores for energy, on the grid
    energy_overlay_uniform: float  # ... and on the overlay
    words: int  # object nouns scored


@dataclass
class MethodObject:
    """One method's figures on one object noun of one scene."""
    score: ObjectScore
    auc: float  # deletion AUC, the map's patch order
    auc_random: float  # deletion AUC, a random patch order
    rank_corr: float  # Spearman correlation with the weight-randomised model's map


@dataclass
class MethodRecord:
    """One scene's figures: per method, per object noun in object order."""
    seed: int
    uniform: list[UniformBaseline]  # per object
    methods: dict[str, list[MethodObject]]


def compare_methods(cap: Captioner, n_scenes: int = 200, seed_start: int = EVAL_SEEDS_START,
                    methods=METHODS, progress: bool = True, ranks: Ranks = Ranks()) -> dict[str, MethodScores] | None:
    """Per method: pointing game, energy pointing (grid and overlay, with the uniform map's), deletion AUC (with
    the random-order AUC on the same words) and the rank correlation with a weight-randomised model's maps, over
    the object nouns of the true captions. Under torchrun the scenes are split between ranks and pooled on rank 0
    in seed order (other ranks return None)."""
    random_cap = randomised(cap)
    records = records_by_seed(ranks, list(range(seed_start, seed_start + n_scenes)),
                              lambda seed: _method_record(cap, random_cap, seed, methods), "methods", progress)
    if records is None:
        return None
    return {m: _pool_method(records, m) for m in methods}


def _pool_method(records: list[MethodRecord], method: str) -> MethodScores:
    objects = [o for r in records for o in r.methods[method]]
    uniform = [u for r in records for u in r.uniform]

    def mean(values) -> float:
        return float(np.mean(list(values)))
    return MethodScores(pointing=mean(o.score.hit for o in objects), energy=mean(o.score.energy for o in objects),
                        energy_overlay=mean(o.score.energy_overlay for o in objects),
                        deletion_auc=mean(o.auc for o in objects),
                        deletion_auc_random=mean(o.auc_random for o in objects),
                        rank_corr_random_weights=mean(o.rank_corr for o in objects),
                        energy_uniform=mean(u.energy for u in uniform),
                        energy_overlay_uniform=mean(u.energy_overlay for u in uniform), words=len(objects))


def word_maps(cap: Captioner, image, text: str, method: str) -> np.ndarray:
    """(W, gh, gw) word maps by a library method (`explain`) or a candidate (`candidates.CANDIDATES`)."""
    if method in METHODS:
        return cap.explain(image, text, method=method).word_maps
    if method in CANDIDATES:
        return CANDIDATES[method](cap, image, text)
    raise ValueError(f"unknown map method {method!r}; library: {', '.join(METHODS)}; candidates: "
                     f"{', '.join(CANDIDATES)}")


def _method_record(cap: Captioner, random_cap: Captioner, seed: int, methods) -> MethodRecord:
    """One scene's per-object figures for each method."""
    size = (IMAGE_SIZE, IMAGE_SIZE)
    scene = make_scene(seed)
    rng = np.random.default_rng((0, seed))  # per scene: the same random orders however scenes are split
    record = MethodRecord(seed, [uniform_baseline(cap.grid, o.box, size) for o in scene.objects], {})
    for m in methods:
        maps = word_maps(cap, scene.image, scene.caption, m)  # (W, gh, gw)
        random_maps = word_maps(random_cap, scene.image, scene.caption, m)
        record.methods[m] = []
        for obj in scene.objects:
            k = obj.word_index
            order = np.argsort(-maps[k].ravel(), kind="stable")
            auc = _auc(deletion_curve(cap, scene.image, scene.caption, k, order))
            shuffled = rng.permutation(order.size)
            auc_random = _auc(deletion_curve(cap, scene.image, scene.caption, k, shuffled))
            record.methods[m].append(MethodObject(score_object(maps[k], obj.box, size), auc, auc_random,
                                                  _spearman(maps[k], random_maps[k])))
    return record


METHODS_COLUMNS = ("Columns: the map method; the pointing game's hit rate; the share of the map's mass on the "
                   "object's patches (grid) and on the upsampled overlay's pixels (overlay); the area under the "
                   "deletion curve when the map's hottest patches are greyed out first, and when random ones are; the "
                   "Spearman rank correlation with the maps of the same model with random weights. The last row is "
                   "what a uniform map scores.")


def methods_table(results: dict[str, MethodScores]) -> str:
    lines = ["| method | pointing game | energy pointing (grid) | energy pointing (overlay) | deletion AUC (lower "
             "is better) | random-order AUC | rank corr. with random-weight maps (lower is better) |",
             "|---|---|---|---|---|---|---|"]
    for m, r in results.items():
        lines.append(f"| {m} | {r.pointing:.1%} | {r.energy:.3f} | {r.energy_overlay:.3f} | "
                     f"{r.deletion_auc:.3f} | {r.deletion_auc_random:.3f} | "
                     f"{r.rank_corr_random_weights:.2f} |")
    if results:
        first = next(iter(results.values()))
        lines.append(f"| uniform map | – | {first.energy_uniform:.3f} | {first.energy_overlay_uniform:.3f} | "
                     "– | – | – |")
    return "\n".join(lines)
