"""Caption folders of images from the command line, with every word's map, one JSON line per image.

    python -m captioner caption photos/ extra.jpg --out captions.jsonl
    python -m captioner caption photos/ --out captions.jsonl --overlays overlays/   # PNGs instead of maps

Images go through the model in batches (`Captioner.caption_batch`: one encoder pass and one beam search per
batch). Each line carries path, caption, words, word_probs, grid and image_size, plus either the maps (word_maps
(W, gh, gw) and cls_map (gh, gw) in [0, 1] as nested lists) or, with --overlays, the PNG files drawn from them.
A file that is not a readable image gets a line with its path and an "error" instead.
"""
from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff"}


def image_paths(paths: list[str]) -> list[Path]:
    """Files as given, folders searched recursively for image files (sorted); raises ValueError if none."""
    found = []
    for p in map(Path, paths):
        if p.is_dir():
            found += sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES)
        elif p.is_file():
            found.append(p)
        else:
            raise ValueError(f"{p} is neither a file nor a folder.")
    if not found:
        raise ValueError(f"No image files ({', '.join(sorted(IMAGE_SUFFIXES))}) under {', '.join(paths)}.")
    return found


def _write_overlays(res, folder: Path) -> tuple[list[str], str]:
    """One titled PNG per word and one for the CLS map in `folder`; their paths."""
    from .render import encode_png, titled_overlay

    folder.mkdir(parents=True, exist_ok=True)
    words = []
    for k, (word, heat) in enumerate(zip(res.words, res.word_maps)):
        path = folder / f"{k:02d}_{re.sub(r'[^A-Za-z0-9]+', '_', word).strip('_')[:32] or 'word'}.png"
        path.write_bytes(encode_png(titled_overlay(res.image, heat, f"{k + 1}. {word}", view=res.view)))
        words.append(str(path))
    cls = folder / "cls.png"
    cls.write_bytes(encode_png(titled_overlay(res.image, res.cls_map, "CLS: whole image", view=res.view)))
    return words, str(cls)


def record(path: Path, res, overlays: Path | None, index: int) -> dict:
    """The JSON line for one captioned image."""
    line = {"path": str(path), "caption": res.text, "words": res.words,
            "word_probs": [round(p, 6) for p in res.word_probs], "grid": list(res.grid),
            "image_size": list(res.image_size), "model": res.model, "settings": res.settings}
    if overlays is None:
        line["word_maps"] = np.round(res.word_maps, 4).tolist()
        line["cls_map"] = np.round(res.cls_map, 4).tolist()
    else:
        line["overlays"], line["cls_overlay"] = _write_overlays(res, overlays / f"{index:05d}_{path.stem}")
    return line


def caption_files(cap, paths: list[Path], out: Path, overlays: Path | None = None, batch_size: int = 8,
                  num_beams: int = 4, max_new_tokens: int | None = None, progress: bool = True) -> int:
    """Caption `paths` in batches into the JSONL file `out`; returns how many images were captioned."""
    from .images import read_image

    done = 0
    with out.open("w") as f, tqdm(total=len(paths), unit="img", desc="caption", disable=not progress,
                                  dynamic_ncols=True) as bar:
        for start in range(0, len(paths), batch_size):
            batch, images = [], []
            for i, path in enumerate(paths[start:start + batch_size], start):
                try:
                    images.append(read_image(path))
                    batch.append((i, path))
                except ValueError as e:
                    f.write(json.dumps({"path": str(path), "error": str(e)}) + "\n")
                    bar.update(1)
            for (i, path), res in zip(batch, cap.caption_batch(images, max_new_tokens, num_beams)):
                f.write(json.dumps(record(path, res, overlays, i)) + "\n")
                done += 1
                bar.update(1)
    return done


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m captioner", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    c = commands.add_parser("caption", help="caption image files and folders into a JSONL file")
    c.add_argument("paths", nargs="+", help="image files or folders (searched recursively)")
    c.add_argument("--out", required=True, type=Path, help="JSONL file to write, one line per image")
    c.add_argument("--overlays", type=Path, help="write PNG overlays here instead of putting maps in the JSONL")
    c.add_argument("--model", help="model folder or hub id (default: captioner.default_model())")
    c.add_argument("--batch-size", type=int, default=8, help="images per batched pass (default 8)")
    c.add_argument("--beams", type=int, default=4, help="beam width; 1 for greedy (default 4)")
    c.add_argument("--max-new-tokens", type=int, help="caption length limit (default: the model's)")
    c.add_argument("--int8", action="store_true", help="int8 dynamic quantisation (CPU): faster, words mostly same")
    c.add_argument("--device", help="cpu or cuda (default: cuda when present)")
    args = parser.parse_args(argv)
    if args.batch_size < 1:
        parser.error("--batch-size must be at least 1")

    import captioner

    try:
        paths = image_paths(args.paths)
    except ValueError as e:
        parser.error(str(e))
    cap = captioner.load(args.model, device=args.device, int8=args.int8)
    n = caption_files(cap, paths, args.out, args.overlays, args.batch_size, args.beams, args.max_new_tokens)
    print(f"{n} of {len(paths)} images captioned -> {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
