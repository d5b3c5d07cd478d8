"""Can I trust this map? Hide the image where a word's map is hottest, and see whether the word's probability falls.

A map that shows what a word depends on has its hottest patches where the evidence for the word is: hiding them
should make the word far less likely than hiding as many patches chosen at random. `check_word` hides the hottest
10 %, 25 % and 50 % of the patch grid (counted in patches), and for comparison DRAWS seeded random sets of the same
size, and recomputes the word's probability (the product of its tokens' probabilities) under the same caption by
one forced pass: every hidden image in one encoder batch and one decoder pass.

Hiding fills a patch's pixels on the image with the processor's mean colour, which the processor turns into zeros:
the input carries nothing there (the offline deletion curves of `captioner_train.faithfulness` grey patches out
the same way). Patches map to image pixels through the result's `view`, as the overlay draws them.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch

from .forcing import decoder_input, token_log_probs
from .images import to_rgb

FRACTIONS = (0.10, 0.25, 0.50)  # of the patch grid's area, hidden in turn
DRAWS = 2  # random sets per fraction: the verdict barely moves with more (docs/maps.md), the cost does
SEED = 0  # of the random draws, reported with the result
MARGIN = 0.20  # faithful: hiding the hottest tenth lowers p by this much (a share of p) more than random tenths
LOW_P = 0.05  # a word the model hardly believes has no probability to lose: inconclusive
NO_EFFECT = 0.10  # no hiding changes p by this share of p: the word barely looks at the image (or the map misses)
FAITHFUL, NOT_FAITHFUL, INCONCLUSIVE = "faithful", "not faithful", "inconclusive"


@dataclass
class Check:
    """The faithfulness check of one word's map; `to_json` is what the API returns."""
    word: str
    word_index: int
    method: str  # the map method checked
    p: float  # the word's probability on the whole image
    fractions: list[float]  # shares of the patch grid hidden
    patches: list[int]  # patches hidden at each fraction (of gh * gw)
    hottest: list[float]  # p with the map's hottest patches hidden, per fraction
    random: list[list[float]]  # (fractions, draws): p with random patches hidden
    seed: int  # of the random draws
    verdict: str  # FAITHFUL | NOT_FAITHFUL | INCONCLUSIVE
    sentence: str  # the verdict in plain words
    fill: list[int]  # the RGB colour hidden patches are filled with

    @property
    def random_mean(self) -> list[float]:
        return [float(np.mean(r)) for r in self.random]

    @property
    def random_std(self) -> list[float]:
        return [float(np.std(r)) for r in self.random]

    def to_json(self) -> dict:
        return {**asdict(self), "random_mean": self.random_mean, "random_std": self.random_std}


def fill_colour(processor) -> np.ndarray:
    """(3,) uint8: the colour the processor normalises to zero (its image_mean), grey 128 without normalisation."""
    if getattr(processor, "do_normalize", False) and getattr(processor, "image_mean", None) is not None:
        return np.round(np.asarray(processor.image_mean, np.float64) * 255).astype(np.uint8)
    return np.full(3, 128, np.uint8)


def patch_boxes(grid: tuple[int, int], size: tuple[int, int], view) -> list[tuple[int, int, int, int]]:
    """Each patch's pixels on an image of `size` (H, W) as (x0, y0, x1, y1), clipped to it, row-major; the canvas
    lies on the image at `view` (fractions), rounded as `render.blend_heatmap` draws it."""
    (gh, gw), (h, w), (vx0, vy0, vx1, vy1) = grid, size, view
    left, top = round(vx0 * w), round(vy0 * h)
    cw, ch = max(1, round(vx1 * w) - left), max(1, round(vy1 * h) - top)
    boxes = []
    for i in range(gh):
        for j in range(gw):
            x0, x1 = left + round(j * cw / gw), left + round((j + 1) * cw / gw)
            y0, y1 = top + round(i * ch / gh), top + round((i + 1) * ch / gh)
            boxes.append((max(x0, 0), max(y0, 0), min(x1, w), min(y1, h)))
    return boxes


def hide(image: np.ndarray, patches, boxes, fill: np.ndarray) -> np.ndarray:
    """A copy of `image` (H, W, 3) uint8 with the pixels of `patches` (flat indices into `boxes`) set to `fill`."""
    out = image.copy()
    for k in patches:
        x0, y0, x1, y1 = boxes[int(k)]
        out[y0:y1, x0:x1] = fill
    return out


def hidden_sets(word_map: np.ndarray, fractions=FRACTIONS, draws: int = DRAWS, seed: int = SEED):
    """(hottest, random): per fraction the flat indices of the map's hottest patches, and `draws` random sets of as
    many patches each, drawn by numpy's default_rng(seed)."""
    order = np.argsort(-word_map.ravel(), kind="stable")  # hottest first; ties by position
    n = word_map.size
    rng = np.random.default_rng(seed)
    counts = [max(1, round(f * n)) for f in fractions]
    return ([order[:c] for c in counts], [[rng.choice(n, c, replace=False) for _ in range(draws)] for c in counts])


@torch.no_grad()
def word_probabilities(cap, images: list[np.ndarray], ids: list[int], group: list[int]) -> np.ndarray:
    """(B,): the probability of the word spelled by tokens `group` of caption `ids` on each image: one encoder batch
    and one forced decoder pass."""
    return pixel_word_probabilities(cap, cap.pixel_values(images), ids, group)


@torch.no_grad()
def pixel_word_probabilities(cap, pixel_values: torch.Tensor, ids: list[int], group: list[int]) -> np.ndarray:
    """`word_probabilities` for model inputs (B, 3, h, w) already made (and hidden) by the caller."""
    decoder_input_ids = decoder_input(cap.start_token_id, ids, cap.device).repeat(len(pixel_values), 1)  # (B, T+1)
    logits = cap.model(pixel_values=pixel_values, decoder_input_ids=decoder_input_ids).logits  # (B, T+1, V)
    return token_log_probs(logits, decoder_input_ids)[:, group].sum(-1).exp().float().cpu().numpy()  # (B,)


def check_word(cap, res, word: int, fractions=FRACTIONS, draws: int = DRAWS, seed: int = SEED) -> Check:
    """Check word `word`'s map of `res` (a CaptionResult of `cap`, carrying its image): its probability with the
    map's hottest patches hidden against random patches hidden, per fraction of the grid, and a verdict."""
    if res.image is None:
        raise ValueError("This result carries no image; caption or explain the image again.")
    if not 0 <= word < len(res.words):
        raise ValueError(f"word must be between 0 and {len(res.words) - 1} for a {len(res.words)}-word caption, "
                         f"got {word}.")
    if draws < 1 or not fractions or not all(0 < f <= 1 for f in fractions):
        raise ValueError("draws must be at least 1 and fractions between 0 and 1.")
    rgb = to_rgb(res.image)
    fill = fill_colour(cap.processor)
    boxes = patch_boxes(res.word_maps.shape[1:], rgb.shape[:2], res.view)
    hottest, randoms = hidden_sets(res.word_maps[word], fractions, draws, seed)
    images = [rgb, *(hide(rgb, s, boxes, fill) for s in hottest),
              *(hide(rgb, s, boxes, fill) for draw in randoms for s in draw)]
    p = word_probabilities(cap, images, res.token_ids, res.word_tokens[word])  # (1 + F + F * draws,)
    f = len(fractions)
    hot, rand = p[1:1 + f], p[1 + f:].reshape(f, draws)  # (F,), (F, draws)
    verdict, sentence = judge(res.words[word], float(p[0]), list(fractions), hot, rand)
    return Check(res.words[word], word, res.method, float(p[0]), list(fractions), [len(s) for s in hottest],
                 hot.tolist(), rand.tolist(), seed, verdict, sentence, fill.tolist())


def _share(f: float) -> str:
    return {0.1: "tenth", 0.25: "quarter", 0.5: "half"}.get(round(f, 4), f"{f:.0%}")


def judge(word: str, p: float, fractions: list[float], hottest: np.ndarray, random: np.ndarray) -> tuple[str, str]:
    """(verdict, sentence): FAITHFUL when hiding the hottest patches of the smallest fraction lowers the word's
    probability by at least MARGIN of p more than hiding as many random ones does on average; NOT_FAITHFUL when it
    does not; INCONCLUSIVE when p < LOW_P, or when no hiding at all, hottest or random, moves p by NO_EFFECT of it
    (then either the word depends on no one region or the map misses it everywhere).

    The smallest fraction decides: the larger ones also cover what the word does not depend on (other objects in
    a caption that names them), and there another word's map beats random too. On held-out scenes of the bundled
    model a wrong map (another object's) passes at 10 % a few times in a hundred, at the mean over 10/25/50 % a
    third of the time (relevance maps, docs/maps.md)."""
    at = 0  # the fraction the verdict rests on, and the sentence quotes
    mean, std = random.mean(1), random.std(1)  # (F,)
    told = (f"hiding the hottest {_share(fractions[at])} of the map changes p({word}) from {p:.2f} to "
            f"{hottest[at]:.2f}; hiding random patches as large leaves {mean[at]:.2f} ± {std[at]:.2f}")
    if p < LOW_P:
        return INCONCLUSIVE, f"The model gives '{word}' only p={p:.2f} here, so there is no probability to lose: " \
            "this check cannot tell."
    if max(np.abs(p - hottest).max(), np.abs(p - mean).max()) < NO_EFFECT * p:
        return INCONCLUSIVE, f"Hiding up to {_share(fractions[-1])} of the image, hottest or random, hardly changes " \
            f"p({word}) ({p:.2f}): either the word does not depend on any one region or this map misses it, and " \
            "this check cannot tell which."
    gap = float(mean[at] - hottest[at]) / p
    if gap >= MARGIN:
        return FAITHFUL, f"{told[0].upper()}{told[1:]}: this map points at what the word depends on."
    return NOT_FAITHFUL, f"{told[0].upper()}{told[1:]}: hiding where this map is hottest hurts the word no more " \
        "than hiding random patches, so the map does not show what the word depends on."
