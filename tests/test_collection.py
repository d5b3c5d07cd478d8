"""Captioning a collection (`python -m captioner caption`): one line per image in input order, compact maps,
bad files recorded, resuming after a cut, and the work split between torchrun processes."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import captioner.collection as collection
import captioner.images as images
from captioner.__main__ import main as cli
from captioner.collection import parts_dir, read_maps
from captioner.distributed import Ranks
from conftest import ROOT, atol, image_for, torchrun



def image_folder(tmp_path, n: int = 4):
    """images/img0..img{n-2}.png, images/sub/deep.jpg and a text file; a single file and a broken 'PNG' beside."""
    folder = tmp_path / "images"
    (folder / "sub").mkdir(parents=True)
    for k in range(n - 1):
        Image.fromarray(image_for(k % 4)).save(folder / f"img{k}.png")
    Image.fromarray(image_for(3)).save(folder / "sub" / "deep.jpg")
    (folder / "notes.txt").write_text("not an image")  # not an image suffix: skipped
    single = tmp_path / "single.png"
    Image.fromarray(image_for(0)).save(single)
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG not really")
    return folder, single, broken


def lines_of(out: Path) -> list[dict]:
    return [json.loads(line) for line in out.read_text().splitlines()]


def test_one_line_per_image_in_input_order_with_npz_maps(tiny, tiny_dir, tmp_path):
    folder, single, broken = image_folder(tmp_path)
    out = tmp_path / "captions.jsonl"
    assert cli(["caption", str(folder), str(broken), str(single), "--out", str(out), "--model", tiny_dir,
                "--batch-size", "2", "--max-new-tokens", "40", "--no-progress"]) == 0
    lines = lines_of(out)
    expected = [*(str(folder / f"img{k}.png") for k in range(3)), str(folder / "sub" / "deep.jpg"), str(broken),
                str(single)]
    assert [line["path"] for line in lines] == expected
    assert "error" in lines[4] and "caption" not in lines[4]
    for line in lines[:4] + lines[5:]:
        assert line["words"] == line["caption"].split() and "word_maps" not in line
        word_maps, cls = read_maps(line, out.parent)
        assert word_maps.shape == (len(line["words"]), *tiny.grid) and cls.shape == tiny.grid
    res = tiny.caption(image_for(1), max_new_tokens=40)
    assert lines[1]["caption"] == res.text
    word_maps, cls = read_maps(lines[1], out.parent)
    np.testing.assert_allclose(word_maps, res.word_maps, atol=1e-3)  # float16 storage
    np.testing.assert_allclose(cls, res.cls_map, atol=1e-3)
    np.testing.assert_allclose(lines[1]["word_probs"], res.word_probs, atol=max(1e-5, atol(tiny)))


def test_json_maps_and_overlays(tiny_dir, tmp_path):
    folder, _, _ = image_folder(tmp_path)
    out, overlays = tmp_path / "captions.jsonl", tmp_path / "overlays"
    assert cli(["caption", str(folder / "img0.png"), str(folder / "img2.png"), "--out", str(out), "--model",
                tiny_dir, "--maps", "json", "--overlays", str(overlays), "--beams", "1", "--max-new-tokens", "40",
                "--no-progress"]) == 0
    lines = lines_of(out)
    assert len(lines) == 2
    for line in lines:
        assert np.array(line["word_maps"]).shape[0] == len(line["words"]) == len(line["overlays"])
        for png in [*line["overlays"], line["cls_overlay"]]:
            assert Image.open(png).size[0] >= 384  # display-sized, as the page shows it


def test_compact_maps_are_much_smaller_than_nested_lists(tiny_dir, tmp_path):
    folder, _, _ = image_folder(tmp_path, n=9)
    sizes = {}
    for maps in ("json", "npz"):
        out = tmp_path / maps / "captions.jsonl"
        out.parent.mkdir()
        assert cli(["caption", str(folder), "--out", str(out), "--model", tiny_dir, "--maps", maps,
                    "--max-new-tokens", "40", "--no-progress"]) == 0
        sizes[maps] = sum(f.stat().st_size for f in out.parent.rglob("*") if f.is_file() and "parts" not in str(f))
    assert sizes["npz"] < sizes["json"] / 2, sizes


def test_a_rerun_after_a_cut_skips_what_was_done(tiny_dir, tmp_path, monkeypatch):
    folder, _, broken = image_folder(tmp_path, n=7)
    out = tmp_path / "captions.jsonl"
    args = ["caption", str(folder), str(broken), "--out", str(out), "--model", tiny_dir, "--batch-size", "2",
            "--max-new-tokens", "40", "--no-progress"]
    real = collection.caption_collection
    calls = []

    def cut_after_two_batches(cap, *a, **k):
        batch = cap.caption_batch

        def counted(images, *rest, **settings):
            calls.append(len(images))
            if len(calls) > 2:
                raise KeyboardInterrupt  # the process is stopped in the middle of its third batch
            return batch(images, *rest, **settings)
        cap.caption_batch = counted
        return real(cap, *a, **k)
    monkeypatch.setattr("captioner.__main__.caption_collection", cut_after_two_batches)
    with pytest.raises(KeyboardInterrupt):
        cli(args)
    assert not out.exists()
    shards = list(parts_dir(out).glob("*.jsonl"))
    assert sum(len(p.read_text().splitlines()) for p in shards) == 4  # two batches of two written

    monkeypatch.setattr("captioner.__main__.caption_collection", real)
    read = []
    monkeypatch.setattr("captioner.images.read_image", lambda f, *a, _read=images.read_image: (read.append(str(f)),
                                                                                             _read(f, *a))[1])
    assert cli(args) == 0
    paths = [line["path"] for line in lines_of(out)]
    assert len(paths) == len(set(paths)) == 8  # 6 in the folder + deep.jpg ... each once, the broken one too
    assert sorted(read) == sorted(paths[4:]), "only the images not done before are read again"
    fresh = tmp_path / "fresh.jsonl"
    assert cli([*args[:3], "--out", str(fresh), *args[5:]]) == 0
    assert [(a["path"], a.get("caption")) for a in lines_of(out)] == \
           [(b["path"], b.get("caption")) for b in lines_of(fresh)]


def test_shard_lines_cut_short_are_skipped_and_unterminated_ones_end_in_a_newline(tmp_path):
    """What a rerun reads from the shards of a killed run: a line cut mid-write is not done, the first line of a path
    wins, and a whole line without its newline still ends in one, or the merge would glue it to the next."""
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    a.write_text('{"path": "x.png", "caption": "first"}\n{"path": "y.png", "capt')  # killed mid-line
    b.write_text('{"path": "x.png", "caption": "again"}\n{"path": "z.png", "caption": "z"}')  # no final newline
    assert collection.read_lines([a, b]) == {"x.png": '{"path": "x.png", "caption": "first"}\n',
                                             "z.png": '{"path": "z.png", "caption": "z"}\n'}


def test_each_batch_goes_to_exactly_one_process_round_robin():
    """Process r of N takes batches r, r + N, ...: each batch once, and the batches a single process makes."""
    batches = list(range(11))
    assert [Ranks(r, 3).share(batches) for r in range(3)] == [[0, 3, 6, 9], [1, 4, 7, 10], [2, 5, 8]]
    assert Ranks().share(batches) == batches


SPY = """
import os, captioner.images
_read = captioner.images.read_image
def _spy(source, *a, **k):
    with open(os.environ["READ_LOG"], "a") as f:
        f.write(f"{os.getpid()}\\t{source}\\n")
    return _read(source, *a, **k)
captioner.images.read_image = _spy
"""


def test_torchrun_two_processes_split_the_work_and_equal_one_process(tiny_dir, tmp_path):
    folder, _, broken = image_folder(tmp_path, n=7)
    spy = tmp_path / "spy"
    spy.mkdir()
    (spy / "sitecustomize.py").write_text(SPY)  # every process logs each image it reads
    log = tmp_path / "reads.log"
    env = {"PYTHONPATH": str(spy), "READ_LOG": str(log)}
    common = [str(folder), str(broken), "--model", tiny_dir, "--batch-size", "2", "--max-new-tokens", "40",
              "--device", "cpu", "--no-progress"]
    two, one = tmp_path / "two.jsonl", tmp_path / "one.jsonl"
    run = torchrun(2, ["captioner", "caption", *common, "--out", str(two)], tmp_path, env)
    assert "on 2 processes" in run.stdout
    reads = [line.split("\t") for line in log.read_text().splitlines()]
    assert len({pid for pid, _ in reads}) == 2, "both processes captioned"
    opened = [path for _, path in reads]
    assert sorted(opened) == sorted(set(opened)), "each image opened by exactly one process"
    assert len(opened) == 8

    run = subprocess.run([sys.executable, "-m", "captioner", "caption", *common, "--out", str(one)],
                         env={**os.environ, **env, "PYTHONPATH": f"{spy}{os.pathsep}{ROOT}", "OMP_NUM_THREADS": "1"},
                         cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    a, b = lines_of(one), lines_of(two)
    assert [x["path"] for x in a] == [x["path"] for x in b]
    for x, y in zip(a, b):
        assert {k: v for k, v in x.items() if k not in ("maps", "word_probs")} == \
               {k: v for k, v in y.items() if k not in ("maps", "word_probs")}
        if "error" not in x:
            np.testing.assert_allclose(x["word_probs"], y["word_probs"], atol=1e-5)
            for m, n in zip(read_maps(x, tmp_path), read_maps(y, tmp_path)):
                np.testing.assert_allclose(m, n, atol=1e-3)
