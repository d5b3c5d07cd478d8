"""Caption a whole collection into one JSONL file, on one process or many, resumably.

For an output `captions.jsonl` a run keeps, beside it:

- `captions.parts/`: each process's own JSONL shard, one per launch (`<launch>-r<rank>.jsonl`). A line is written
  only once its maps are on disk, so whatever a shard holds is done. These are what a rerun reads to skip work.
- `captions.maps/`: the maps as float16 arrays, one `.npz` per batch, which each line references
  ({"file": "captions.maps/....npz", "words": key, "cls": key}; `read_maps` loads them). Which file holds an
  image's maps depends on how the work was split; the values do not.

Work is split by batches: the images still to do, in input order, are cut into batches and rank r takes batches
r, r + world, ..., so every image is read by exactly one process and batches are the ones a single process would
make. When all ranks are done, rank 0 merges every shard into the output in input order, each image once.
"""
from __future__ import annotations

import json
import math
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from . import distributed
from .distributed import Ranks

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff"}
MAP_FORMATS = ("npz", "json", "none")  # maps beside the JSONL, nested lists inside it, or no maps
LINE_KEYS = ("caption", "words", "word_probs", "grid", "image_size", "model", "settings")  # of CaptionResult.to_json


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


def parts_dir(out: Path) -> Path:
    return out.with_name(out.stem + ".parts")


def maps_dir(out: Path) -> Path:
    return out.with_name(out.stem + ".maps")


def read_lines(files) -> dict[str, str]:
    """{path: its JSONL line, as written} from shard files; a line cut short by a killed process is skipped, the
    first line of a path wins. Lines stay text: the merge copies them, and a million parsed lines would not fit."""
    lines: dict[str, str] = {}
    for file in files:
        with open(file) as f:
            for text in f:
                try:
                    path = json.loads(text)["path"]
                except (json.JSONDecodeError, KeyError):
                    continue
                lines.setdefault(path, text if text.endswith("\n") else text + "\n")
    return lines


def read_maps(line: dict, base: str | Path = ".") -> tuple[np.ndarray, np.ndarray]:
    """(word_maps (W, gh, gw), cls_map (gh, gw)) float32 of one JSONL line, whichever way they were stored;
    `base`: the folder of the JSONL file (npz paths are relative to it)."""
    if "word_maps" in line:
        return np.asarray(line["word_maps"], np.float32), np.asarray(line["cls_map"], np.float32)
    ref = line["maps"]
    with np.load(Path(base) / ref["file"]) as z:
        return z[ref["words"]].astype(np.float32), z[ref["cls"]].astype(np.float32)


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


def record(path: Path, res, maps: str = "npz", overlays: Path | None = None, index: int = 0) -> dict:
    """The JSON line for one captioned image (maps="json" puts the maps in it as nested lists; "npz" leaves that
    to `_write_batch`)."""
    line = {"path": str(path), **res.to_json(LINE_KEYS)}
    line["word_probs"] = [round(p, 6) for p in res.word_probs]  # a million lines: six decimals are plenty
    if res.notes:  # e.g. a photo given to the scene model
        line["notes"] = res.notes
    if maps == "json":
        line.update(res.to_json(("word_maps", "cls_map")))
    if overlays is not None:
        line["overlays"], line["cls_overlay"] = _write_overlays(res, overlays / f"{index:05d}_{path.stem}")
    return line


@dataclass
class Summary:
    images: int  # in the input
    done: int  # captioned by this run, all ranks
    failed: int  # unreadable, recorded with their error by this run
    skipped: int  # already in the output's shards from an earlier run
    seconds: float

    def __str__(self) -> str:
        rate = self.done / self.seconds if self.seconds > 0 else 0.0
        return (f"{self.images} images: {self.done} captioned, {self.failed} failed, {self.skipped} skipped as "
                f"already done; {rate:.2f} images/s over {self.seconds:.1f} s")


def _write_batch(out: Path, shard, launch: str, rank: int, batch_no: int, lines: list[dict], results: list,
                 maps: str) -> None:
    """Maps first (npz, renamed into place when complete), then the lines that point at them, flushed to disk."""
    if maps == "npz" and results:
        folder = maps_dir(out)
        name = f"{launch}-r{rank}-{batch_no:06d}.npz"
        arrays = {}
        for k, (line, res) in enumerate(zip(lines, results)):  # the first len(results) lines are theirs
            arrays[f"m{k}_words"] = res.word_maps.astype(np.float16)  # (W, gh, gw)
            arrays[f"m{k}_cls"] = res.cls_map.astype(np.float16)  # (gh, gw)
            line["maps"] = {"file": f"{folder.name}/{name}", "words": f"m{k}_words", "cls": f"m{k}_cls"}
        tmp = folder / f".{name}"
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)
        os.replace(tmp, folder / name)
    for line in lines:
        shard.write(json.dumps(line) + "\n")
    shard.flush()
    os.fsync(shard.fileno())


@dataclass(frozen=True)
class CollectionSettings:
    batch_size: int = 8  # images per `Captioner.caption_batch` call
    num_beams: int = 4  # beam width; 1 for greedy
    max_new_tokens: int | None = None  # caption length limit (None: the model's)
    maps: str = "npz"  # one of MAP_FORMATS: npz beside the JSONL, json inside each line, or none
    overlays: Path | None = None  # also write titled PNG overlays here (one folder per image)
    progress: bool = True  # show a progress bar on rank 0

    def __post_init__(self):
        if self.maps not in MAP_FORMATS:
            raise ValueError(f"maps must be one of {', '.join(MAP_FORMATS)}, not {self.maps!r}")


def _read_done(out: Path, ranks: Ranks) -> tuple[list[Path], dict[str, str]]:
    """Make the shard and map folders, then read every shard an earlier run left: (those shard files, their lines
    by path). Every rank reads them before any rank writes a new one."""
    parts = parts_dir(out)
    if ranks.main:
        parts.mkdir(parents=True, exist_ok=True)
        maps_dir(out).mkdir(parents=True, exist_ok=True)
    distributed.barrier(ranks)
    shards_before = sorted(parts.glob("*.jsonl"))
    done_before = read_lines(shards_before)
    distributed.barrier(ranks)  # everyone has read the shards before anyone adds to them
    return shards_before, done_before


def _caption_paths(cap, paths: list[Path], index: dict[Path, int], settings: CollectionSettings):
    """Read and caption one batch: (its JSON lines, the results behind the first len(results) of them); a file
    that is not a readable image gets a line with its error instead, after the others."""
    from .images import read_image

    images, readable, errors = [], [], []
    for path in paths:
        try:
            images.append(read_image(path))
            readable.append(path)
        except (ValueError, OSError) as e:  # not an image, too large, unreadable: recorded, never fatal
            errors.append({"path": str(path), "error": str(e)})
    results = cap.caption_batch(images, max_new_tokens=settings.max_new_tokens,
                                num_beams=settings.num_beams) if images else []
    lines = [record(p, r, settings.maps, settings.overlays, index[p]) for p, r in zip(readable, results)]
    return lines + errors, results


def _merge(out: Path, paths: list[Path], done_before: dict[str, str], shards_before: list[Path]) -> None:
    """Rank 0: every shard's lines into `out` in input order, each image once, replacing `out` whole."""
    merged = done_before  # read once at the start; only this run's shards are new
    new_shards = sorted(set(parts_dir(out).glob("*.jsonl")) - set(shards_before))
    for path, text in read_lines(new_shards).items():
        merged.setdefault(path, text)
    tmp = out.with_name(f".{out.name}.tmp")
    with open(tmp, "w") as f:
        f.writelines(merged[str(p)] for p in paths if str(p) in merged)
    os.replace(tmp, out)


def caption_collection(cap, paths: list[Path], out: Path, *, ranks: Ranks = Ranks(),
                       settings: CollectionSettings = CollectionSettings()) -> Summary:
    """Caption this rank's share of `paths` not yet in `out`'s shards, then (rank 0) merge all shards into `out`.
    Every rank must call this with the same arguments; the summary counts all ranks."""
    start = time.perf_counter()
    index = {p: i for i, p in enumerate(paths)}
    shards_before, done_before = _read_done(out, ranks)
    todo = [p for p in paths if str(p) not in done_before]
    batches = [todo[i:i + settings.batch_size] for i in range(0, len(todo), settings.batch_size)]
    mine = ranks.share(batches)
    rounds = math.ceil(len(batches) / ranks.world)  # the same on every rank: they count progress in lockstep
    launch = f"{time.strftime('%Y%m%d-%H%M%S')}-{time.time_ns() % 10**9:09d}-{os.getpid()}"  # unique per launch
    done = failed = 0
    with open(parts_dir(out) / f"{launch}-r{ranks.rank}.jsonl", "w") as shard, \
            tqdm(total=len(paths), initial=len(paths) - len(todo), unit="img", desc="caption", dynamic_ncols=True,
                 disable=not (settings.progress and ranks.main)) as bar:
        for batch_no in range(rounds):
            n_done = n_failed = 0
            if batch_no < len(mine):
                lines, results = _caption_paths(cap, mine[batch_no], index, settings)
                _write_batch(out, shard, launch, ranks.rank, batch_no, lines, results, settings.maps)
                n_done, n_failed = len(results), len(lines) - len(results)
            n_done, n_failed = distributed.total(ranks, n_done, n_failed)
            done, failed = done + n_done, failed + n_failed
            bar.update(n_done + n_failed)
            bar.set_postfix(failed=failed)
    distributed.barrier(ranks)
    if ranks.main:
        _merge(out, paths, done_before, shards_before)
    distributed.barrier(ranks)
    return Summary(len(paths), done, failed, len(paths) - len(todo), time.perf_counter() - start)
