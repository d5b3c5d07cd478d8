"""The real training entry point on tiny data: synthetic scenes, COCO and Flickr formats, resume, masking."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

import captioner
from captioner_train import synthetic, train
from captioner_train.architecture import PRESETS, ModelConfig, build_model, image_processor
from captioner_train.data import CocoCaptions, Collator, FlickrCaptions, SyntheticScenes
from captioner_train.pointing import cell_coverage, energy_share
from captioner_train.vocabulary import bpe_tokenizer, word_tokenizer
from conftest import torchrun


def _config(tmp_path, **kw) -> train.TrainConfig:
    base = dict(out=str(tmp_path / "model"), preset="tiny", train_size=64, val_size=16, batch_size=16, epochs=2,
                lr=3e-3, warmup_steps=2, ema=0.9, checkpoint_every=4)
    return train.TrainConfig(**{**base, **kw})


def test_collate_pads_to_the_batch_and_masks_with_minus_100():
    tok = bpe_tokenizer(["a dog on a skateboard", "a cat"] * 5, 280)
    tok.pad_token = tok.eos_token  # as GPT-2 does: padding must still not hide the real EOS
    collate = Collator(image_processor(PRESETS["tiny"]), tok, max_tokens=40)
    images = [Image.new("RGB", (50, 30), c) for c in ("red", "blue")]
    batch = collate(list(zip(images, ["a dog on a skateboard", "a cat"])))
    long_ids = tok("a dog on a skateboard", add_special_tokens=False).input_ids
    short_ids = tok("a cat", add_special_tokens=False).input_ids
    assert batch["pixel_values"].shape == (2, 3, 32, 48)
    assert batch["labels"].shape == (2, len(long_ids) + 1), "padded to the longest caption, not the model max"
    assert batch["labels"][0].tolist() == long_ids + [tok.eos_token_id]
    row = batch["labels"][1].tolist()
    assert row[: len(short_ids) + 1] == short_ids + [tok.eos_token_id]
    assert set(row[len(short_ids) + 1:]) == {-100}
    truncated = Collator(image_processor(PRESETS["tiny"]), tok, max_tokens=3)(list(zip(images, ["a dog on a "
                                                                                              "skateboard"] * 2)))
    assert truncated["labels"].shape[1] == 3 and truncated["labels"][0, -1] == tok.eos_token_id


def test_synthetic_training_learns_resumes_and_saves_a_loadable_model(tmp_path):
    cfg = _config(tmp_path, epochs=3)
    first = train.main(_config(tmp_path, epochs=3, stop_after=8))
    card = json.loads((tmp_path / "model" / "training_card.json").read_text())
    assert card["history"][0]["step"] == 4 and first["step"] == 8
    resumed = train.main(train.TrainConfig(**{**cfg.__dict__, "resume": True}))
    assert resumed["step"] == 12, "resume continues from the checkpoint instead of starting over"
    history = json.loads((tmp_path / "model" / "training_card.json").read_text())["history"]
    assert history[-1]["train_loss"] < first["train_loss"] and history[-1]["val_loss"] < card["history"][0]["val_loss"]
    assert history[-1]["val_perplexity"] == pytest.approx(np.exp(history[-1]["val_loss"]))
    cap = captioner.load(str(tmp_path / "model"))
    res = cap.caption(synthetic.make_scene(1).image)
    assert res.cls_map.shape == (4, 6) and all(w in synthetic.VOCABULARY for w in res.words)


def test_resume_gives_the_same_weights_as_an_uninterrupted_run(tmp_path):
    train.main(_config(tmp_path / "a", epochs=2))
    train.main(_config(tmp_path / "b", epochs=2, stop_after=4))
    train.main(train.TrainConfig(**{**_config(tmp_path / "b", epochs=2).__dict__, "resume": True}))
    a = captioner.load(str(tmp_path / "a" / "model")).model.state_dict()
    b = captioner.load(str(tmp_path / "b" / "model")).model.state_dict()
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-5), k


def _write_images(folder, n):
    folder.mkdir(parents=True, exist_ok=True)
    names = []
    for i in range(n):
        scene = synthetic.make_scene(i)
        scene.image.save(folder / f"{i}.jpg")
        names.append((f"{i}.jpg", scene.caption))
    return names


def test_coco_format_training(tmp_path):
    names = _write_images(tmp_path / "images", 12)
    coco = {"images": [{"id": i, "file_name": n} for i, (n, _) in enumerate(names)],
            "annotations": [{"id": 100 + i, "image_id": i, "caption": c + " ."} for i, (_, c) in enumerate(names)]}
    (tmp_path / "captions.json").write_text(json.dumps(coco))
    ds = CocoCaptions(tmp_path / "captions.json", tmp_path / "images")
    assert len(ds) == 12 and ds[0][1] == names[0][1] + " ." and ds[0][0].shape[2] == 3 and ds[0][0].dtype == np.uint8
    out = train.main(_config(tmp_path, data="coco", train_json=str(tmp_path / "captions.json"),
                             val_json=str(tmp_path / "captions.json"), image_dir=str(tmp_path / "images"),
                             batch_size=4, epochs=1))
    assert out["step"] == 3 and np.isfinite(out["val_loss"])


def test_flickr_karpathy_format_training(tmp_path):
    names = _write_images(tmp_path / "images", 12)
    split = ["train"] * 6 + ["restval"] * 2 + ["val"] * 2 + ["test"] * 2
    karpathy = {"images": [{"filename": n, "split": s, "sentences": [{"raw": c}, {"raw": c.upper()}]}
                           for (n, c), s in zip(names, split)]}
    (tmp_path / "dataset_flickr8k.json").write_text(json.dumps(karpathy))
    ds = FlickrCaptions(tmp_path / "dataset_flickr8k.json", tmp_path / "images", "train")
    assert len(ds) == 16, "train + restval, every sentence"
    assert len(FlickrCaptions(tmp_path / "dataset_flickr8k.json", tmp_path / "images", "val")) == 4
    out = train.main(_config(tmp_path, data="flickr", train_json=str(tmp_path / "dataset_flickr8k.json"),
                             image_dir=str(tmp_path / "images"), batch_size=4, epochs=1))
    assert out["step"] == 4 and np.isfinite(out["val_loss"])


def test_staged_training_freezes_by_step():
    tok = word_tokenizer(synthetic.VOCABULARY)
    model = build_model(PRESETS["tiny"], tok)
    cfg = train.TrainConfig(stage_decoder=10, stage_all=20)
    trainable = lambda: {n for n, p in model.named_parameters() if p.requires_grad}  # noqa: E731
    assert train._set_stage(model, 0, cfg) == "cross"
    assert trainable() and all("crossattention" in n or "ln_cross" in n for n in trainable())
    assert train._set_stage(model, 10, cfg) == "decoder"
    assert all(n.startswith("decoder.") for n in trainable()) and any("mlp" in n for n in trainable())
    assert train._set_stage(model, 20, cfg) == "all"
    assert any(n.startswith("encoder.") for n in trainable())


def test_scenes_are_deterministic_and_consistent():
    a, b = synthetic.make_scene(42), synthetic.make_scene(42)
    assert a.caption == b.caption and np.array_equal(np.asarray(a.image), np.asarray(b.image))
    for seed in range(60):
        scene = synthetic.make_scene(seed)
        words = scene.caption.split()
        assert set(words) <= set(synthetic.VOCABULARY) and 1 <= len(scene.objects) <= 3
        for obj in scene.objects:
            assert words[obj.word_index] == obj.shape and words[obj.word_index - 1] == obj.colour
            x0, y0, x1, y1 = obj.box
            assert 0 <= x0 < x1 <= synthetic.IMAGE_SIZE and 0 <= y0 < y1 <= synthetic.IMAGE_SIZE
            pixels = np.asarray(scene.image)[y0:y1, x0:x1].astype(int)
            target = np.array(synthetic.COLOURS[obj.colour])
            assert (np.abs(pixels - target).max(-1) < 60).mean() > 0.15, "the box holds the named colour"
        sizes = [o.size for o in scene.objects]
        assert sizes == sorted(sizes), "canonical order: large before small"


def test_write_dataset_reads_back_as_coco(tmp_path):
    path = synthetic.write_dataset(tmp_path, range(5))
    ds = CocoCaptions(path, tmp_path / "train")
    assert [c for _, c in ds] == [synthetic.make_scene(s).caption for s in range(5)]
    assert [c for _, c in SyntheticScenes(range(5))] == [c for _, c in ds]


def test_scenes_rendered_ahead_equal_scenes_rendered_on_the_fly():
    ahead = SyntheticScenes(range(100, 106), processes=2, objects=True, progress=False)
    fly = SyntheticScenes(range(100, 106), objects=True)
    for (a_img, a_cap, a_obj), (b_img, b_cap, b_obj) in zip(ahead, fly):
        assert np.array_equal(a_img, b_img) and a_cap == b_cap and a_obj == b_obj
    assert len(SyntheticScenes(range(3))[0]) == 2, "objects only when asked for"


def test_grounding_targets_sit_on_the_rows_that_name_each_object():
    tok = word_tokenizer(synthetic.VOCABULARY)
    grid = (8, 8)
    collate = Collator(image_processor(ModelConfig()), tok, max_tokens=24, grid=grid)
    items = [SyntheticScenes(range(s, s + 1), objects=True)[0] for s in (5, 6)]
    batch = collate(items)
    for b, (_, caption, objects) in enumerate(items):
        named = {k for words, _ in objects for k in words}
        ground = batch["ground"][b]  # (T, gh*gw)
        assert {k for k in range(ground.shape[0]) if ground[k].sum() > 0} == named
        scene = synthetic.make_scene((5, 6)[b])
        for obj in scene.objects:
            words = caption.split()
            assert [words[k] for k in obj.phrase_indices] == [obj.size, obj.colour, obj.shape]
            expected = torch.from_numpy(cell_coverage(grid, obj.box, (96, 96)).ravel()).float()
            assert torch.allclose(ground[obj.word_index], expected)
            assert batch["labels"][b, obj.word_index] == tok.convert_tokens_to_ids(obj.shape), \
                "row k predicts token k: the label at the noun's index is the noun"
    assert "ground" not in Collator(image_processor(ModelConfig()), tok, 24)(items), "no grid, no target"


def test_grounding_loss_is_zero_on_the_object_and_large_off_it():
    ground = torch.zeros(1, 3, 4)  # (B, T, gh*gw) on a 2x2 grid
    ground[0, 1] = torch.tensor([1.0, 0.5, 0.0, 0.0])
    on = torch.zeros(1, 2, 3, 5)  # (B, H, T, 1 + 4): CLS key first
    on[..., 1] = 1.0
    assert train.grounding_loss((on, on), ground).item() == pytest.approx(0.0, abs=1e-5)
    half = torch.zeros(1, 2, 3, 5)
    half[..., 2] = 1.0  # all on a patch the box covers by half
    assert train.grounding_loss((half,), ground).item() == pytest.approx(-np.log(0.5), abs=1e-4)
    cls = torch.zeros(1, 2, 3, 5)
    cls[..., 0] = 1.0  # all on CLS: off the object
    assert train.grounding_loss((cls,), ground).item() > 10
    mixed = torch.zeros(1, 2, 3, 5)
    mixed[:, 0, :, 1], mixed[:, 1, :, 4] = 1.0, 1.0  # heads split: the head mean has half on the object
    assert train.grounding_loss((mixed,), ground).item() == pytest.approx(-np.log(0.5), abs=1e-4)
    assert train.grounding_loss((on,), torch.zeros(1, 3, 4)).item() == 0.0, "no named object, no loss"


def test_grounded_training_runs_and_pulls_attention_onto_objects(tmp_path):
    cfg = dict(train_size=256, val_size=16, epochs=2, render_processes=2, batch_size=16, lr=3e-3)
    plain = train.main(_config(tmp_path / "plain", **cfg))
    grounded = train.main(_config(tmp_path / "grounded", **cfg, ground_weight=1.0))
    assert np.isfinite(grounded["train_loss"]) and grounded["train_loss"] > plain["train_loss"] * 0.5
    caps = {k: captioner.load(str(tmp_path / k / "model")) for k in ("plain", "grounded")}
    shares = {}
    for k, cap in caps.items():
        share = []
        for seed in range(10_000_000, 10_000_016):  # training scenes: what the loss saw
            scene = synthetic.make_scene(seed)
            maps = cap.explain(scene.image, scene.caption, method="attention").word_maps
            share += [energy_share(maps[o.word_index], o.box, (96, 96)) for o in scene.objects]
        shares[k] = np.mean(share)
    assert shares["grounded"] > shares["plain"] + 0.05, shares


def test_the_schedule_is_transformers_warmup_cosine_when_the_horizon_stays():
    from transformers import get_cosine_schedule_with_warmup
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    reference = get_cosine_schedule_with_warmup(opt, 30, 200).lr_lambdas[0]
    for step in (0, 1, 29, 30, 31, 100, 199, 200):
        assert train.lr_factor(step, 30, 200) == pytest.approx(reference(step)), step
    assert train.lr_factor(250, 30, 200) == 0.0, "past the horizon it stays at 0 (transformers rises again)"
    assert train.lr_factor(120, 30, 120) == 0.0 and train.lr_factor(60, 30, 120) > train.lr_factor(60, 30, 90)
    assert train.lr_factor(10, 30, 20) == 1.0 and train.lr_factor(20, 30, 20) == 0.0, \
        "a horizon inside the warm-up halves the warm-up, so the run still ends annealed"


def test_plan_steps_fits_the_time_left_and_never_passes_the_cap():
    assert train.plan_steps(100, 5600, 2.0, 600.0) == 1300
    assert train.plan_steps(100, 1000, 2.0, 600.0) == 1000, "a fast machine trains the full recipe"
    assert train.plan_steps(100, 1000, 2.0, -5.0) == 100, "out of time: end now"
    # 1 step/s, 10-step epochs, 1 s a validation, from step 5: h - 5 steps and ceil(h / 10) validations in 100 s
    assert train.plan_steps(5, 1000, 1.0, 100.0, steps_per_epoch=10, validation_s=1.0) == 95
    assert train.validations_to_come(10, 25, 10) == 3, "step 10's own, step 20's and the last one at 25"
    assert train.validations_to_come(12, 30, 10) == 2


def test_a_minutes_budget_ends_in_time_with_the_learning_rate_annealed(tmp_path, monkeypatch):
    now = [0.0]

    def clock():  # every reading moves a simulated clock on by 0.25 s, so each step "costs" time
        now[0] += 0.25
        return now[0]
    validate = train._validate

    def slow_validate(*args):  # and each validation 1 s more: the plan must keep time for the ones to come
        now[0] += 1.0
        return validate(*args)
    monkeypatch.setattr(train, "_clock", clock)
    monkeypatch.setattr(train, "_validate", slow_validate)
    monkeypatch.setattr(train, "REPLAN_EVERY", 2)
    monkeypatch.setattr(train, "SAVE_RESERVE_S", 1.0)
    cfg = _config(tmp_path, epochs=20, minutes=0.2, checkpoint_every=1000)  # cap: 20 epochs x 4 batches = 80 steps
    train.main(cfg)
    card = json.loads((tmp_path / "model" / "training_card.json").read_text())
    assert card["step_cap"] == 80 and 8 < card["steps"] < 80, card["steps"]
    assert 0.9 * 0.2 < card["minutes"] <= 0.2, "the run ended within its budget and used most of it (simulated clock)"
    assert card["final"]["step"] == card["steps"] and card["final"]["lr"] < 0.05 * cfg.lr, \
        "the schedule anneals to the step the budget allowed, not to the cap"
    assert captioner.load(str(tmp_path / "model")).caption(synthetic.make_scene(1).image).words


def test_torchrun_training_splits_the_batches_and_anneals_once(tmp_path):
    """Two processes: each takes half the batches of an epoch, and the schedule ends at the run's last step
    (a scheduler prepared by accelerate would be stepped once per process and reach 0 halfway)."""
    out = tmp_path / "model"
    args = ["--out", str(out), "--preset", "tiny", "--train-size", "64", "--val-size", "16", "--batch-size", "16",
            "--epochs", "3", "--warmup-steps", "1", "--ema", "0"]
    torchrun(2, ["captioner_train.train", *args], tmp_path)
    card = json.loads((out / "training_card.json").read_text())
    assert [h["step"] for h in card["history"]] == [2, 4, 6], "4 batches an epoch, 2 per process"
    assert card["history"][1]["lr"] > 0, "a schedule stepped once per process would be at 0 by step 3"
    assert card["history"][-1]["lr"] == pytest.approx(1.5e-3 * train.lr_factor(5, 1, 6)), "the last step's rate"


def test_resume_with_more_epochs_carries_on_to_the_new_end(tmp_path):
    train.main(_config(tmp_path, epochs=2))
    more = train.main(train.TrainConfig(**{**_config(tmp_path, epochs=3).__dict__, "resume": True}))
    assert more["step"] == 12 and more["lr"] > 0, "the schedule aims at the new cap, not the finished run's end"
