"""Caption folders of images from the command line, with every word's map, one JSON line per image.

    python -m captioner caption photos/ extra.jpg --out captions.jsonl
    torchrun --nproc_per_node 2 -m captioner caption photos/ --out captions.jsonl    # two processes share the work
    python -m captioner caption photos/ --out captions.jsonl --overlays overlays/   # PNG overlays as well

Images go through the model in batches (`Captioner.caption_batch`: one encoder pass and one beam search per
batch). Each line carries path, caption, words, word_probs, grid, image_size, model and settings, plus where its
maps are (word maps (W, gh, gw) and the CLS map (gh, gw) in [0, 1], float16 in `.npz` files beside the output;
`--maps json` puts them in the line as nested lists instead). A file that is not a readable image gets a line with
its path and an "error". Rerunning the same command skips the images already done (see `captioner.collection`).
"""
from __future__ import annotations

import argparse
from pathlib import Path

from .collection import MAP_FORMATS, CollectionSettings, caption_collection, image_paths


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m captioner", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    c = commands.add_parser("caption", help="caption image files and folders into a JSONL file")
    c.add_argument("paths", nargs="+", help="image files or folders (searched recursively)")
    c.add_argument("--out", required=True, type=Path, help="JSONL file to write, one line per image")
    c.add_argument("--maps", choices=MAP_FORMATS, default="npz",
                   help="npz: float16 arrays beside the output (default); json: nested lists in each line; none")
    c.add_argument("--overlays", type=Path, help="also write PNG overlays (one per word and the CLS map) here")
    c.add_argument("--model", help="model folder or hub id (default: captioner.default_model())")
    c.add_argument("--batch-size", type=int, default=8, help="images per batched pass (default 8)")
    c.add_argument("--beams", type=int, default=4, help="beam width; 1 for greedy (default 4)")
    c.add_argument("--max-new-tokens", type=int, help="caption length limit (default: the model's)")
    c.add_argument("--int8", action="store_true", help="int8 dynamic quantisation (CPU): faster, words mostly same")
    c.add_argument("--precision", choices=("fp32", "bf16", "int8"),
                   help="decoder weights on a CPU: bf16, or int8 weight-only (default: $CAPTIONER_PRECISION or fp32)")
    c.add_argument("--device", help="cpu or cuda (default: cuda when present; under torchrun one GPU per process)")
    c.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    args = parser.parse_args(argv)
    if args.batch_size < 1:
        parser.error("--batch-size must be at least 1")
    try:
        paths = image_paths(args.paths)
    except ValueError as e:
        parser.error(str(e))

    import captioner
    from . import distributed

    ranks, device = distributed.start(args.device)
    try:
        cap = captioner.load(args.model, device=device, int8=args.int8, precision=args.precision)
        settings = CollectionSettings(batch_size=args.batch_size, num_beams=args.beams,
                                      max_new_tokens=args.max_new_tokens, maps=args.maps, overlays=args.overlays,
                                      progress=not args.no_progress)
        summary = caption_collection(cap, paths, args.out, ranks=ranks, settings=settings)
        if ranks.main:
            print(f"{summary} -> {args.out}" + (f" on {ranks.world} processes" if ranks.world > 1 else ""))
    finally:
        distributed.stop(ranks)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
