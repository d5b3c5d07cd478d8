"""How often does the map check (`captioner.check_word`) call a right map faithful, and a wrong one unfaithful?

On held-out scenes (true captions, the default map or `--method`), each object noun is checked twice: with its own
map, and with a deliberately wrong one, the map of another object's noun in the same scene (scenes with one object
have none and give only the first). Prints the share of each verdict for both.

    python -m captioner_train.check_rates [--model PATH] [--scenes 50] [--seed-start N] [--method relevance]
"""
from __future__ import annotations

import argparse
import dataclasses
from collections import Counter

import captioner
from captioner.check import FAITHFUL, INCONCLUSIVE, NOT_FAITHFUL, check_word

from .pointing import EVAL_SEEDS_START
from .synthetic import make_scene

VERDICTS = (FAITHFUL, NOT_FAITHFUL, INCONCLUSIVE)


def check_rates(cap, n_scenes: int = 50, seed_start: int = EVAL_SEEDS_START, method: str | None = None
                ) -> tuple[Counter, Counter]:
    """(verdicts of object nouns' own maps, verdicts of the same nouns under another object's map)."""
    own, wrong = Counter(), Counter()
    for seed in range(seed_start, seed_start + n_scenes):
        scene = make_scene(seed)
        res = cap.explain(scene.image, scene.caption, method=method)
        nouns = [o.word_index for o in scene.objects]
        for n, k in enumerate(nouns):
            own[check_word(cap, res, k).verdict] += 1
            if len(nouns) > 1:
                other = nouns[(n + 1) % len(nouns)]
                maps = res.word_maps.copy()
                maps[k] = res.word_maps[other]  # word k now carries another object's map
                wrong[check_word(cap, dataclasses.replace(res, word_maps=maps), k).verdict] += 1
    return own, wrong


def rates_table(own: Counter, wrong: Counter) -> str:
    def row(name: str, counts: Counter) -> str:
        total = sum(counts.values())
        return f"| {name} | {total} | " + " | ".join(f"{counts[v] / max(total, 1):.0%}" for v in VERDICTS) + " |"
    return "\n".join(["| map | object nouns | faithful | not faithful | inconclusive |", "|---|---|---|---|---|",
                      row("the noun's own map", own), row("another object's map (wrong)", wrong)])


def main(argv: list[str] | None = None) -> tuple[Counter, Counter]:
    parser = argparse.ArgumentParser(prog="python -m captioner_train.check_rates", description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=captioner.BUNDLED_MODEL, help="model folder (default: the bundled one)")
    parser.add_argument("--scenes", type=int, default=50, help="held-out scenes")
    parser.add_argument("--seed-start", type=int, default=EVAL_SEEDS_START, help="first scene seed")
    parser.add_argument("--method", choices=captioner.METHODS, help="map method (default: the model's default)")
    args = parser.parse_args(argv)
    cap = captioner.load(args.model)
    own, wrong = check_rates(cap, args.scenes, args.seed_start, args.method)
    print(f"{cap.name}, {args.scenes} held-out scenes (seeds {args.seed_start}..{args.seed_start + args.scenes - 1}), "
          f"{cap.resolve_method(args.method)} maps:\n{rates_table(own, wrong)}")
    return own, wrong


if __name__ == "__main__":
    main()
