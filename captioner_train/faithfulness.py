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

import numpy as np
import torch
from tqdm.auto import tqdm

from captioner import distributed
from captioner.distributed import Ranks
from captioner.forcing import decoder_input, token_log_probs
from captioner.loading import EAGER
from captioner.pipeline import METHODS, Captioner

from .candidates import CANDIDATES
from .pointing import (EVAL_SEEDS_START, energy_share, overlay_energy_share, pointing_hit, uniform_energy_share,
                       uniform_overlay_share)
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
    decoder_input_ids = decoder_input(cap.start_token_id, ids, cap.device).repeat(STEPS + 1, 1)  # (S+1, T+1)
    logits = cap.model(pixel_values=batch, decoder_input_ids=decoder_input_ids).logits
    logp = token_log_probs(logits, decoder_input_ids)  # (S+1, T)
    return logp[:, groups[word]].sum(-1).exp().cpu().numpy()


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


def compare_methods(cap: Captioner, n_scenes: int = 200, seed_start: int = EVAL_SEEDS_START,
                    methods=METHODS, progress: bool = True, ranks: Ranks = Ranks()) -> dict[str, dict] | None:
    """Per method: pointing game, energy pointing (grid and overlay, with the uniform map's), deletion AUC (with
    the random-order AUC on the same words) and the rank correlation with a weight-randomised model's maps, over
    the object nouns of the true captions. Under torchrun the scenes are split between ranks and pooled on rank 0
    in seed order (other ranks return None)."""
    random_cap = randomised(cap)
    seeds = ranks.share(list(range(seed_start, seed_start + n_scenes)))
    mine = [_method_record(cap, random_cap, seed, methods)
            for seed in tqdm(seeds, desc="methods", disable=not (progress and ranks.main), dynamic_ncols=True)]
    gathered = distributed.gather(ranks, mine)
    if not ranks.main:
        return None
    records = sorted((r for part in gathered for r in part), key=lambda r: r["seed"])

    def mean(values) -> float:
        return float(np.mean(list(values)))
    uniform = mean(x for r in records for x in r["uniform"])
    uniform_overlay = mean(x for r in records for x in r["uniform_overlay"])
    keys = {"pointing": "hits", "energy": "energy", "energy_overlay": "energy_overlay", "deletion_auc": "auc",
            "deletion_auc_random": "auc_random", "rank_corr_random_weights": "rank_corr"}
    return {m: {**{name: mean(x for r in records for x in r[m][key]) for name, key in keys.items()},
                "energy_uniform": uniform, "energy_overlay_uniform": uniform_overlay,
                "words": sum(len(r[m]["hits"]) for r in records)}
            for m in methods}


def word_maps(cap: Captioner, image, text: str, method: str) -> np.ndarray:
    """(W, gh, gw) word maps by a library method (`explain`) or a candidate (`candidates.CANDIDATES`)."""
    if method in METHODS:
        return cap.explain(image, text, method=method).word_maps
    if method in CANDIDATES:
        return CANDIDATES[method](cap, image, text)
    raise ValueError(f"unknown map method {method!r}; library: {', '.join(METHODS)}; candidates: "
                     f"{', '.join(CANDIDATES)}")


def _method_record(cap: Captioner, random_cap: Captioner, seed: int, methods) -> dict:
    """One scene's per-object figures for each method (lists in object order)."""
    size = (IMAGE_SIZE, IMAGE_SIZE)
    scene = make_scene(seed)
    rng = np.random.default_rng((0, seed))  # per scene: the same random orders however scenes are split
    record = {"seed": seed, "uniform": [uniform_energy_share(cap.grid, o.box, size) for o in scene.objects],
              "uniform_overlay": [uniform_overlay_share(o.box, size) for o in scene.objects]}
    for m in methods:
        maps = word_maps(cap, scene.image, scene.caption, m)  # (W, gh, gw)
        random_maps = word_maps(random_cap, scene.image, scene.caption, m)
        s = record[m] = {"hits": [], "energy": [], "energy_overlay": [], "auc": [], "auc_random": [],
                         "rank_corr": []}
        for obj in scene.objects:
            k = obj.word_index
            s["hits"].append(pointing_hit(maps[k], obj.box, size))
            s["energy"].append(energy_share(maps[k], obj.box, size))
            s["energy_overlay"].append(overlay_energy_share(maps[k], obj.box, size))
            order = np.argsort(-maps[k].ravel(), kind="stable")
            s["auc"].append(_auc(deletion_curve(cap, scene.image, scene.caption, k, order)))
            shuffled = rng.permutation(order.size)
            s["auc_random"].append(_auc(deletion_curve(cap, scene.image, scene.caption, k, shuffled)))
            s["rank_corr"].append(_spearman(maps[k], random_maps[k]))
    return record


def methods_table(results: dict[str, dict]) -> str:
    lines = ["| method | pointing game | energy pointing (grid) | energy pointing (overlay) | deletion AUC (lower "
             "is better) | random-order AUC | rank corr. with random-weight maps (lower is better) |",
             "|---|---|---|---|---|---|---|"]
    for m, r in results.items():
        lines.append(f"| {m} | {r['pointing']:.1%} | {r['energy']:.3f} | {r['energy_overlay']:.3f} | "
                     f"{r['deletion_auc']:.3f} | {r['deletion_auc_random']:.3f} | "
                     f"{r['rank_corr_random_weights']:.2f} |")
    if results:
        first = next(iter(results.values()))
        lines.append(f"| uniform map | – | {first['energy_uniform']:.3f} | {first['energy_overlay_uniform']:.3f} | "
                     "– | – | – |")
    return "\n".join(lines)
