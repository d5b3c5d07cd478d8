"""How often does the map check (`captioner.check_word`) call a right map faithful, and a wrong one unfaithful?

On held-out scenes (true captions, the default map or `--method`), each object noun is checked twice: with its own
map, and with a deliberately wrong one, the map of another object's noun in the same scene (scenes with one object
have none and give only the first). Prints the share of each verdict for both.

    python -m captioner_train.check_rates [--model PATH] [--scenes 50] [--seed-start N] [--methods relevance attention]
                                          [--markdown docs/check-rates.md]
"""
from __future__ import annotations

import argparse
import sys
import dataclasses
from collections import Counter

import captioner
from captioner.check import FAITHFUL, INCONCLUSIVE, NOT_FAITHFUL, check_word

from .pointing import EVAL_SEEDS_START
from .report import command_line, launcher, write_markdown
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


def rates_table(rows: list[tuple[str, Counter, Counter]]) -> str:
    """One Markdown row per (method, map) with the share of each verdict."""
    def row(method: str, name: str, counts: Counter) -> str:
        total = sum(counts.values())
        return f"| {method} | {name} | {total} | " + \
            " | ".join(f"{counts[v] / max(total, 1):.0%}" for v in VERDICTS) + " |"
    return "\n".join(["| method | map | object nouns | faithful | not faithful | inconclusive |",
                      "|---|---|---|---|---|---|",
                      *(line for method, own, wrong in rows for line in (
                          row(method, "the noun's own map", own), row(method, "another object's map (wrong)", wrong)))])


def main(argv: list[str] | None = None) -> list[tuple[str, Counter, Counter]]:
    parser = argparse.ArgumentParser(prog="python -m captioner_train.check_rates", description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=captioner.BUNDLED_MODEL, help="model folder (default: the bundled one)")
    parser.add_argument("--scenes", type=int, default=50, help="held-out scenes")
    parser.add_argument("--seed-start", type=int, default=EVAL_SEEDS_START, help="first scene seed")
    parser.add_argument("--methods", nargs="+", choices=captioner.METHODS,
                        help="map methods, one pair of rows each (default: the model's default)")
    parser.add_argument("--markdown", metavar="FILE", help="write the table here as Markdown, under a line naming "
                        "machine, date, commit, torch and this command")
    args = parser.parse_args(argv)
    cap = captioner.load(args.model)
    rows = [(cap.resolve_method(m), *check_rates(cap, args.scenes, args.seed_start, m))
            for m in args.methods or [None]]
    about = (f"{cap.name}, {args.scenes} held-out scenes (seeds {args.seed_start}.."
             f"{args.seed_start + args.scenes - 1}), true captions: each object noun checked with its own map and "
             "with another object's map of the same scene; the share of each verdict.")
    table = rates_table(rows)
    print(f"{about}\n{table}")
    if args.markdown:
        write_markdown(args.markdown, command_line(launcher("captioner_train.check_rates"),
                                                 sys.argv[1:] if argv is None else argv), [(about, table)])
    return rows


if __name__ == "__main__":
    main()
