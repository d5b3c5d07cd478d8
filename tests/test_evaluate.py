"""The evaluation module: the pointing game's geometry, the caption scorers, forced-decoding NLL, and the real
`evaluate` / `main` entry points on a tiny random model."""
from __future__ import annotations

import json
import math
from dataclasses import asdict

import numpy as np
import pytest
import torch

from captioner_train.evaluate import (EVAL_SEEDS_START, caption_parts, caption_scores, count_errors, errors_table,
                                     evaluate, main, token_nll)
from captioner_train.pointing import (cell_coverage, energy_share, overlay_energy_share, pointing_hit,
                                      uniform_energy_share, uniform_hit_rate, uniform_overlay_share)
from captioner_train.report import table_rows
from captioner_train.synthetic import IMAGE_SIZE, make_scene, write_dataset
from conftest import torchrun

SQUARE = (IMAGE_SIZE, IMAGE_SIZE)  # (H, W)


def peak(grid, i, j) -> np.ndarray:
    """A (gh, gw) map whose only maximum is cell (i, j)."""
    m = np.zeros(grid, np.float32)
    m[i, j] = 1.0
    return m


def test_pointing_hit_and_miss():
    m = peak((8, 8), 2, 3)  # 12-pixel patches: cell (2, 3) covers x 36..47, y 24..35
    assert pointing_hit(m, (36, 24, 48, 36), SQUARE)
    assert pointing_hit(m, (30, 10, 60, 50), SQUARE)
    assert not pointing_hit(m, (60, 60, 80, 80), SQUARE)
    assert not pointing_hit(m, (24, 36, 36, 48), SQUARE), "row and column swapped must miss"


def test_pointing_slack_is_half_a_patch():
    m = peak((8, 8), 2, 3)  # cell centre (42, 30); half a patch is 6 pixels
    assert not pointing_hit(m, (48, 24, 60, 36), SQUARE), "box starts on the cell's right edge: no overlap"
    assert pointing_hit(m, (47, 24, 60, 36), SQUARE), "box reaches one pixel into the cell"
    assert not pointing_hit(m, (20, 24, 36, 36), SQUARE), "box ends (exclusive) on the cell's left edge"
    assert pointing_hit(m, (20, 24, 37, 36), SQUARE)
    assert not pointing_hit(m, (36, 36, 48, 50), SQUARE), "box starts on the cell's bottom edge"
    assert pointing_hit(m, (36, 35, 48, 50), SQUARE)


def test_pointing_non_square_grid_and_image():
    m = peak((4, 6), 1, 4)  # on 96x96: patches 16 wide, 24 high; centre (72, 36)
    assert pointing_hit(m, (64, 24, 80, 48), SQUARE)
    assert not pointing_hit(m, (24, 64, 48, 80), SQUARE), "x and y swapped must miss"
    assert not pointing_hit(m, (80, 24, 96, 48), SQUARE)
    assert pointing_hit(m, (79, 24, 96, 48), SQUARE), "one pixel into a 16-pixel-wide patch"
    # on a 32x48 image (H, W) the same grid has square 8-pixel patches: centre (36, 12)
    assert pointing_hit(m, (32, 8, 40, 16), (32, 48))
    assert not pointing_hit(m, (32, 8, 40, 16), (48, 32)), "image size is (H, W), not (W, H)"


def test_flat_map_never_hits():
    assert not pointing_hit(np.zeros((4, 6), np.float32), (0, 0, IMAGE_SIZE, IMAGE_SIZE), SQUARE)


@pytest.mark.parametrize("grid, box, image_size", [((8, 8), (36, 24, 48, 36), SQUARE), ((4, 6), (10, 50, 40, 90),
                                                   SQUARE), ((4, 6), (0, 0, 48, 32), (32, 48))])
def test_uniform_rate_is_mean_over_all_peaks(grid, box, image_size):
    gh, gw = grid
    hits = [pointing_hit(peak(grid, i, j), box, image_size) for i in range(gh) for j in range(gw)]
    assert uniform_hit_rate(grid, box, image_size) == pytest.approx(np.mean(hits))
    assert 0 < uniform_hit_rate(grid, box, image_size) <= 1


def test_caption_scores_rank_identical_above_different():
    truth = {s: [make_scene(s).caption] for s in range(8)}
    same = caption_scores({s: refs[0] for s, refs in truth.items()}, truth)
    assert same["bleu4"] == pytest.approx(1.0, abs=1e-6)
    assert same["cider"] > 5  # CIDEr-D of a perfect match is 10 up to n-grams every reference shares
    shifted = caption_scores({s: truth[(s + 1) % 8][0] for s in truth}, truth)
    assert shifted["bleu4"] < same["bleu4"] and shifted["cider"] < same["cider"]
    upper = caption_scores({s: refs[0].upper() + "." for s, refs in truth.items()}, truth)
    assert upper == pytest.approx(same), "case and COCO-style punctuation are normalised away"
    with pytest.raises(ValueError, match="same"):
        caption_scores({0: "a"}, {1: ["a"]})


def test_token_nll_matches_explain(random_tiny):
    scene = make_scene(3)
    nll = token_nll(random_tiny, scene.image, scene.caption)  # BPE: several tokens per word, then EOS
    res = random_tiny.explain(scene.image, scene.caption)
    assert nll.shape == (len(res.token_ids) + 1,), "every caption token and the EOS"
    # word_probs multiply the tokens that spell each word (a lone space token belongs to none of them)
    spelled = sorted(set().union(*res.word_tokens))
    assert nll[spelled].sum() == pytest.approx(-np.log(res.word_probs).sum(), rel=1e-4)
    assert (nll >= 0).all()


def oracle_maps(seeds):
    """A map_fn that peaks on the true object's centre for true captions and is flat for anything else."""
    scenes = {make_scene(s).caption: make_scene(s) for s in seeds}

    def map_fn(cap, image, text):
        gh, gw = cap.grid
        maps = np.zeros((len(text.split()), gh, gw), np.float32)  # (W, gh, gw)
        for obj in getattr(scenes.get(text), "objects", ()):
            cx, cy = obj.centre
            maps[obj.word_index, int(cy * gh / IMAGE_SIZE), int(cx * gw / IMAGE_SIZE)] = 1.0
        return maps
    return map_fn


def short_scenes_start(cap, n: int) -> int:
    """The first seed from EVAL_SEEDS_START that starts n scenes whose captions fit the tiny model: its small BPE
    vocabulary spells scene words nearly letter by letter, and it reads at most 39 tokens."""
    def fits(seed: int) -> bool:
        return len(cap.tokenizer(make_scene(seed).caption, add_special_tokens=False).input_ids) < cap.max_tokens

    start = EVAL_SEEDS_START
    while not all(fits(start + k) for k in range(n)):
        start += 1
    return start


def test_evaluate_end_to_end(random_tiny):
    start = short_scenes_start(random_tiny, 3)
    seeds = range(start, start + 3)
    out = evaluate(random_tiny, n_scenes=3, seed_start=start, progress=False, max_new_tokens=8)
    scenes = [make_scene(s) for s in seeds]
    assert (out.scenes, out.seed_start, out.num_beams, out.max_new_tokens) == (3, start, 1, 8)
    assert out.objects_true == sum(len(s.objects) for s in scenes)
    assert 0 <= out.objects_generated <= out.objects_true
    assert out.words == sum(len(s.caption.split()) for s in scenes)
    assert out.tokens > out.words, "BPE splits words, and every caption adds an EOS"
    for key in ("bleu4", "exact_match", "word_accuracy", "pointing_true", "pointing_true_uniform",
                "pointing_true_random"):
        assert 0 <= getattr(out, key) <= 1, key
    assert out.cider >= 0 and out.perplexity >= 1
    if out.objects_generated == 0:
        assert out.pointing_generated is None and out.pointing_generated_uniform is None
    assert json.loads(json.dumps(asdict(out))) == asdict(out), "plain JSON types only"

    oracle = evaluate(random_tiny, n_scenes=3, seed_start=start, progress=False, max_new_tokens=8,
                      map_fn=oracle_maps(seeds))
    assert oracle.pointing_true == 1.0, "a map that peaks on each object must always hit"
    for key in ("pointing_true_uniform", "pointing_true_random", "perplexity", "bleu4"):
        assert getattr(oracle, key) == getattr(out, key), f"{key} must not depend on the map source or the run"


def test_main_writes_json_and_table(random_tiny, tmp_path, capsys):
    model_dir = tmp_path / "model"
    random_tiny.model.save_pretrained(model_dir)
    random_tiny.tokenizer.save_pretrained(model_dir)
    random_tiny.processor.save_pretrained(model_dir)
    coco = write_dataset(tmp_path / "coco", range(2), "val")
    out, md = tmp_path / "metrics.json", tmp_path / "docs" / "evaluation.md"
    argv = [str(model_dir), "--scenes", "2", "--seed-start", str(short_scenes_start(random_tiny, 2)), "--beams", "1",
            "--coco-json", str(coco), "--image-dir", str(tmp_path / "coco" / "val"), "--json-out", str(out),
            "--no-progress", "--methods", "attention", "relevance", "--method-scenes", "2", "--markdown", str(md)]
    report = main(argv)
    results = json.loads(out.read_text())
    assert len(results) == 2 and results[0]["scenes"] == 2 and results[0]["coco_images"] == 2
    assert set(results[1]["methods"]) == {"attention", "relevance"} and results[1]["method_scenes"] == 2
    assert math.isfinite(results[0]["perplexity"]) and 0 <= results[0]["coco_bleu4"] <= 1
    table = capsys.readouterr().out
    assert "| metric | greedy |" in table and "| BLEU-4 |" in table and "| COCO CIDEr |" in table
    assert results == report.to_json()

    # the Markdown file: the header line, then the very tables printed, each after what its columns mean
    written = md.read_text()
    first = written.splitlines()[0]
    assert first.startswith("Machine: ") and f"torch {torch.__version__}" in first
    assert first.endswith(f"command: `python -m captioner_train.evaluate {' '.join(argv)}`")
    for printed in table.strip().split("\n\n")[1::2]:
        assert f"\n\n{printed}\n" in written, printed
    assert "Columns: the map method" in written and "Each column is one decoding setting" in written
    rows = table_rows(written)
    r = report.results[0]
    assert ["BLEU-4", f"{r.bleu4:.3f}"] in rows and ["exact match", f"{r.exact_match:.1%}"] in rows
    assert ["COCO images", str(r.coco_images)] in rows and ["perplexity (true caption + EOS)", f"{r.perplexity:.3f}"] \
        in rows
    relevance = report.methods["relevance"]
    assert ["relevance", f"{relevance.pointing:.1%}", f"{relevance.energy:.3f}", f"{relevance.energy_overlay:.3f}",
            f"{relevance.deletion_auc:.3f}", f"{relevance.deletion_auc_random:.3f}",
            f"{relevance.rank_corr_random_weights:.2f}"] in rows


def test_energy_counts_the_mass_on_patches_whose_centre_is_in_the_box():
    grid = (8, 8)  # 12-pixel patches on 96x96: centres at 6, 18, 30, ...
    m = np.zeros(grid, np.float32)
    m[2, 3], m[2, 4], m[5, 5] = 3.0, 1.0, 4.0  # cell (2, 3) centre (42, 30), (2, 4) centre (54, 30)
    box = (36, 24, 54, 36)  # holds the centre of (2, 3); (2, 4)'s centre x = 54 is on the exclusive edge
    assert energy_share(m, box, SQUARE) == pytest.approx(3 / 8)
    assert energy_share(m, (36, 24, 55, 36), SQUARE) == pytest.approx(4 / 8)
    assert energy_share(m.T, box, SQUARE) == pytest.approx(0.0), "rows are y, columns x"
    assert energy_share(np.zeros(grid), box, SQUARE) == 0.0
    flat = np.ones(grid, np.float32)
    for b in [(36, 24, 54, 36), (0, 0, 96, 40), (10, 50, 70, 90)]:
        assert energy_share(flat, b, SQUARE) == pytest.approx(uniform_energy_share(grid, b, SQUARE))
    assert uniform_energy_share(grid, (0, 0, 96, 48), SQUARE) == pytest.approx(0.5)


def test_overlay_energy_is_the_share_of_upsampled_pixels_in_the_box():
    flat = np.ones((8, 8), np.float32)
    box = (10, 20, 58, 44)
    assert overlay_energy_share(flat, box, SQUARE) == pytest.approx(uniform_overlay_share(box, SQUARE))
    assert uniform_overlay_share(box, SQUARE) == pytest.approx(48 * 24 / 96 ** 2)
    m = np.zeros((8, 8), np.float32)
    m[3:5, 3:5] = 1.0  # pixels 36..60 both ways
    inside, outside = overlay_energy_share(m, (30, 30, 66, 66), SQUARE), overlay_energy_share(m, (0, 0, 30, 30), SQUARE)
    assert inside > 0.9 and outside < 0.02
    assert overlay_energy_share(m, (30, 30, 66, 66), (48, 96)) < inside, "image size is (H, W)"


def test_cell_coverage_is_the_area_share_of_each_patch():
    cover = cell_coverage((8, 8), (6, 12, 30, 24), SQUARE)  # x 6..30 over cells 0-2, y 12..24 = row 1 exactly
    assert cover.shape == (8, 8)
    np.testing.assert_allclose(cover[1, :3], [0.5, 1.0, 0.5])
    assert cover.sum() == pytest.approx((24 * 12) / 144)
    assert cover[0].sum() == 0 and cover[2].sum() == 0


def test_caption_parts_and_the_error_table():
    assert caption_parts("a large red star left of a small blue circle and above a small green square") == (
        [("large", "red", "star"), ("small", "blue", "circle"), ("small", "green", "square")], ["left of", "above"])
    assert caption_parts("a small red star") == ([("small", "red", "star")], [])
    for bad in ["a red star", "a large red star left a small blue circle", "a large red star and above a small "
                "blue circle", "", "a large red star above"]:
        assert caption_parts(bad) is None, bad
    errors = {}
    count_errors(errors, "a large red star left of a small blue circle", "a large red star above a small blue square")
    assert errors["relation"] == {"left of": [1, 1]}
    assert errors["shape"] == {"star": [0, 1], "circle": [1, 1]}
    assert errors["colour"] == {"red": [0, 1], "blue": [0, 1]}
    assert errors["objects"] == {"2 objects (whole caption)": [1, 1]}
    count_errors(errors, "a small red star", "nonsense")
    assert errors["shape"]["star"] == [1, 2] and errors["size"]["small"] == [1, 2]
    assert "| relation | left of | 1 | 1 | 100.0% |" in errors_table(errors)


def test_evaluate_reports_energy_with_its_baselines(random_tiny):
    start = short_scenes_start(random_tiny, 2)
    seeds = range(start, start + 2)
    oracle = evaluate(random_tiny, n_scenes=2, seed_start=start, progress=False, max_new_tokens=8,
                      map_fn=oracle_maps(seeds))
    assert oracle.energy_true == 1.0, "a single-cell map on the object's centre has all its mass inside"
    assert 0 < oracle.energy_true_uniform < 0.5 and 0 < oracle.energy_true_overlay_uniform < 0.5
    assert sum(sum(v[1] for v in by.values()) for part, by in oracle.errors.items() if part == "objects") == 2


def test_torchrun_evaluation_equals_one_process(random_tiny, tmp_path):
    model_dir = tmp_path / "model"
    random_tiny.model.save_pretrained(model_dir)
    random_tiny.tokenizer.save_pretrained(model_dir)
    random_tiny.processor.save_pretrained(model_dir)
    args = [str(model_dir), "--scenes", "5", "--seed-start", str(short_scenes_start(random_tiny, 5)), "--beams",
            "1", "--methods", "attention", "--method-scenes", "3", "--device", "cpu", "--no-progress"]
    out = {}
    for n in (1, 2):
        out[n] = tmp_path / f"{n}.json"
        torchrun(n, ["captioner_train.evaluate", *args, "--json-out", str(out[n]), "--markdown",
                     str(tmp_path / f"{n}.md")], tmp_path)
    one, two = json.loads(out[1].read_text()), json.loads(out[2].read_text())
    header = (tmp_path / "2.md").read_text().splitlines()[0]
    assert header.endswith(f"command: `torchrun --nproc_per_node 2 -m captioner_train.evaluate {' '.join(args)} --json-out "
                           f"{out[2]} --markdown {tmp_path / '2.md'}`"), "the command as it was launched"
    assert (one[0]["processes"], two[0]["processes"]) == (1, 2)
    for a, b in zip(one, two):
        for key in set(a) - {"seconds_per_scene", "processes"}:
            assert a[key] == pytest.approx(b[key]) if isinstance(a[key], float) else a[key] == b[key], key
