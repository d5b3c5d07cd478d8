"""The fast path: `fastdecode` gives plain `generate`'s tokens, leaves the maps alone; int8, batch mode, the CLI.
No timing assertions here: `python -m captioner.bench` prints the speeds."""
from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import VisionEncoderDecoderModel

import captioner
from captioner import fastdecode
from captioner.__main__ import main as cli
from captioner.decoding import GenerationSettings, generate_batch, generate_ids
from captioner.fastdecode import conv1d_out_in
from captioner.quantize import conv1d_to_linear
from captioner.vocabulary import random_bpe_tokenizer
from conftest import CAPTIONS, image_for


def _pixels(cap, images):
    return cap.processor(images=images, return_tensors="pt")["pixel_values"]  # (B, 3, h, w)


def _boost_eos(model, eos: int):
    with torch.no_grad():
        model.decoder.lm_head.weight[eos] *= 4  # tied: the EOS embedding scales too


def _reference(cap):
    """cap's model as plain transformers loads it: Conv1D layers, default (SDPA) attention."""
    model = VisionEncoderDecoderModel.from_pretrained(cap.model.config._name_or_path).eval()
    if cap.name == "random_eos":
        _boost_eos(model, cap.eos_token_id)
    return model


def _plain(cap, images, num_beams, max_new_tokens, model=None) -> list[list[int]]:
    """Plain `generate` from pixels (on `model`, default cap's), each row cut before EOS."""
    with torch.no_grad():
        out = (model or cap.model).generate(pixel_values=_pixels(cap, images), num_beams=num_beams,
                                            max_new_tokens=max_new_tokens, do_sample=False)
    rows = out[:, 1:].tolist()
    return [r[: r.index(cap.eos_token_id)] if cap.eos_token_id in r else r for r in rows]


def _fast(cap, images, num_beams, max_new_tokens) -> list[list[int]]:
    with torch.no_grad():
        hidden = cap.model.encoder(pixel_values=_pixels(cap, images)).last_hidden_state  # (B, N, D)
    settings = GenerationSettings(max_new_tokens=max_new_tokens, num_beams=num_beams)
    assert fastdecode.unsupported(cap.model, False) is None, "these fixtures must take the fast path"
    return generate_batch(cap.model, hidden, settings, cap.eos_token_id, fast=True)


@pytest.fixture(scope="module")
def random_eos(random_tiny):
    """random_tiny with its EOS logit scaled up 4x: random beams that sometimes end by EOS (after 12 tokens
    on some images) and sometimes run into the length limit, so finished hypotheses compete with running ones."""
    model = copy.deepcopy(random_tiny.model)
    _boost_eos(model, random_tiny.eos_token_id)
    return captioner.Captioner(model, random_tiny.tokenizer, random_tiny.processor, "random_eos")


@pytest.mark.parametrize("fixture", ["tiny", "random_tiny", "random_eos"])
def test_fast_tokens_equal_plain_generate(request, fixture):
    """Greedy and several beam widths, every image, short and long limits: the same tokens as generate on the
    model as transformers loads it, one image at a time. Except on random_tiny (whose EOS never wins), both ways
    a caption ends occur: by EOS and by the limit."""
    cap = request.getfixturevalue(fixture)
    reference = _reference(cap)
    endings = set()
    for num_beams in (1, 2, 4, 6):
        for max_new_tokens in (1, 9, 24):
            for k in range(len(CAPTIONS)):
                image = image_for(k)
                plain = _plain(cap, [image], num_beams, max_new_tokens, reference)[0]
                assert _fast(cap, [image], num_beams, max_new_tokens)[0] == plain, \
                    f"beams={num_beams} max_new_tokens={max_new_tokens} image {k}"
                endings.add("limit" if len(plain) == max_new_tokens else "eos")
    assert endings == ({"limit"} if fixture == "random_tiny" else {"limit", "eos"})


@pytest.mark.parametrize("fixture", ["tiny", "random_tiny", "random_eos"])
@pytest.mark.parametrize("num_beams", [1, 3, 4])
def test_fast_batch_equals_plain_generate_batch(request, fixture, num_beams):
    """Several images in one call: each row's beams stay with its own image."""
    cap = request.getfixturevalue(fixture)
    images = [image_for(k) for k in (0, 1, 2, 3, 1)]
    assert _fast(cap, images, num_beams, 20) == _plain(cap, images, num_beams, 20, _reference(cap))


def test_fast_path_leaves_maps_and_probabilities_unchanged(random_tiny):
    image = image_for(2)
    fast = random_tiny.caption(image, max_new_tokens=12, num_beams=3)
    random_tiny.fast_decoding = False
    try:
        slow = random_tiny.caption(image, max_new_tokens=12, num_beams=3)
    finally:
        random_tiny.fast_decoding = True
    assert fast.token_ids == slow.token_ids and fast.words == slow.words
    assert np.array_equal(fast.word_maps, slow.word_maps) and np.array_equal(fast.token_maps, slow.token_maps)
    assert np.array_equal(fast.cls_map, slow.cls_map) and fast.word_probs == slow.word_probs
    # and the forced pass on the model as transformers loads it (Conv1D, eager) gives the same maps
    eager = VisionEncoderDecoderModel.from_pretrained(random_tiny.model.config._name_or_path,
                                                      attn_implementation="eager").eval()
    ids = torch.tensor([[random_tiny.start_token_id, *fast.token_ids]])
    with torch.no_grad():
        out = eager(pixel_values=_pixels(random_tiny, [image]), decoder_input_ids=ids, output_attentions=True)
    rows = torch.stack([a[0] for a in out.cross_attentions]).mean((0, 1))[:-1, 1:]  # (T, gh*gw)
    assert np.allclose(fast.token_maps, rows.reshape(-1, *random_tiny.grid).numpy(), atol=1e-6)


def test_settings_the_fast_path_cannot_reproduce_go_to_generate(random_tiny):
    model = random_tiny.model
    assert fastdecode.unsupported(model, do_sample=True) == "sampling"
    with torch.no_grad():
        hidden = model.encoder(pixel_values=_pixels(random_tiny, [image_for(0)])).last_hidden_state
    model.generation_config.no_repeat_ngram_size = 1  # a logits processor fastdecode does not implement
    try:
        assert "no_repeat_ngram_size" in fastdecode.unsupported(model, do_sample=False)
        ids = generate_ids(model, hidden, GenerationSettings(max_new_tokens=12, num_beams=3),
                           random_tiny.eos_token_id)
        assert len(set(ids)) == len(ids), "no_repeat_ngram_size=1 was applied, so generate decoded"
        assert ids == _plain(random_tiny, [image_for(0)], 3, 12)[0]
    finally:
        model.generation_config.no_repeat_ngram_size = 0


def test_caption_batch_equals_caption(tiny):
    images = [image_for(k) for k in range(len(CAPTIONS))]
    batch = tiny.caption_batch(images, max_new_tokens=40, num_beams=3)
    for image, res in zip(images, batch):
        one = tiny.caption(image, max_new_tokens=40, num_beams=3)
        assert res.token_ids == one.token_ids and res.words == one.words
        assert np.allclose(res.word_maps, one.word_maps, atol=1e-5)
        assert np.allclose(res.cls_map, one.cls_map, atol=1e-5)
    assert tiny.caption_batch([]) == []


def test_conv1d_out_in_keeps_shapes_values_and_function(tiny, tiny_dir):
    """The layout change Captioner makes leaves the state_dict (so checkpoints) and the logits as they were."""
    original = VisionEncoderDecoderModel.from_pretrained(tiny_dir).eval()
    laid = conv1d_out_in(copy.deepcopy(original))
    a, b = original.state_dict(), laid.state_dict()
    assert a.keys() == b.keys() and all(a[k].shape == b[k].shape and torch.equal(a[k], b[k]) for k in a)
    assert laid.decoder.transformer.h[0].attn.c_attn.weight.t().is_contiguous()
    assert tiny.model.decoder.transformer.h[0].mlp.c_fc.weight.t().is_contiguous(), "Captioner lays them out"
    ids = torch.tensor([[original.config.decoder_start_token_id, 5, 9, 7]])
    pixels = _pixels(tiny, [image_for(1)])
    with torch.no_grad():
        assert torch.allclose(original(pixel_values=pixels, decoder_input_ids=ids).logits,
                              laid(pixel_values=pixels, decoder_input_ids=ids).logits, atol=1e-5)


def test_conv1d_to_linear_keeps_the_function(tiny, tiny_dir):
    original = VisionEncoderDecoderModel.from_pretrained(tiny_dir).eval()
    assert any(type(m).__name__ == "Conv1D" for m in original.modules())
    converted = conv1d_to_linear(copy.deepcopy(original))
    assert not any(type(m).__name__ == "Conv1D" for m in converted.modules())
    ids = torch.tensor([[original.config.decoder_start_token_id, 5, 9, 7]])
    pixels = _pixels(tiny, [image_for(1)])
    with torch.no_grad():
        a = original(pixel_values=pixels, decoder_input_ids=ids).logits
        b = converted(pixel_values=pixels, decoder_input_ids=ids).logits
    assert torch.allclose(a, b, atol=1e-5)


def test_int8_path_runs_and_mostly_keeps_the_words(tiny, tiny_dir):
    cap8 = captioner.load(tiny_dir, int8=True)
    assert "int8" in cap8.name
    assert any("quantized" in type(m).__module__ for m in cap8.model.modules())
    agree = []
    for k in range(len(CAPTIONS)):
        a = tiny.caption(image_for(k), max_new_tokens=40)
        b = cap8.caption(image_for(k), max_new_tokens=40)
        assert b.word_maps.shape == (len(b.words), *tiny.grid) and np.isfinite(b.word_maps).all()
        n = max(len(a.words), len(b.words))
        agree.append(sum(x == y for x, y in zip(a.words, b.words)) / n)
    assert np.mean(agree) >= 0.75, agree
    with pytest.raises(ValueError, match="CPU"):
        captioner.load(tiny_dir, device="cuda", int8=True)


def _image_folder(tmp_path):
    folder = tmp_path / "images"
    (folder / "sub").mkdir(parents=True)
    for k in range(3):
        Image.fromarray(image_for(k)).save(folder / f"img{k}.png")
    Image.fromarray(image_for(3)).save(folder / "sub" / "deep.jpg")
    (folder / "notes.txt").write_text("not an image")  # not an image suffix: skipped
    single = tmp_path / "single.png"
    Image.fromarray(image_for(0)).save(single)
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG not really")
    return folder, single, broken


def test_batch_cli_writes_one_line_per_image_with_maps(tiny, tiny_dir, tmp_path):
    folder, single, broken = _image_folder(tmp_path)
    out = tmp_path / "captions.jsonl"
    assert cli(["caption", str(folder), str(single), str(broken), "--out", str(out), "--model", tiny_dir,
                "--batch-size", "2", "--max-new-tokens", "40"]) == 0
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(lines) == 6  # 4 in the folder (recursively), the single file, the broken one
    errors = [line for line in lines if "error" in line]
    assert [e["path"] for e in errors] == [str(broken)]
    good = [line for line in lines if "error" not in line]
    for line in good:
        assert {"path", "caption", "words", "word_maps", "cls_map", "grid", "word_probs"} <= line.keys()
        assert line["words"] == line["caption"].split()
        assert np.array(line["word_maps"]).shape == (len(line["words"]), *tiny.grid)
        assert np.array(line["cls_map"]).shape == tiny.grid
    by_path = {line["path"]: line for line in good}
    assert by_path[str(folder / "img1.png")]["caption"] == tiny.caption(image_for(1), max_new_tokens=40).text


def test_batch_cli_overlays_write_pngs_instead_of_maps(tiny_dir, tmp_path):
    folder, _, _ = _image_folder(tmp_path)
    out, overlays = tmp_path / "captions.jsonl", tmp_path / "overlays"
    assert cli(["caption", str(folder / "img0.png"), str(folder / "img2.png"), "--out", str(out), "--model",
                tiny_dir, "--overlays", str(overlays), "--beams", "1", "--max-new-tokens", "40"]) == 0
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(lines) == 2
    for line in lines:
        assert "word_maps" not in line and len(line["overlays"]) == len(line["words"])
        for png in [*line["overlays"], line["cls_overlay"]]:
            assert Image.open(png).size[0] >= 384  # display-sized, as the page shows it


def test_random_bpe_tokenizer_has_the_requested_size():
    tok = random_bpe_tokenizer(400, seed=3)
    assert len(tok) == 400
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id, tok.unk_token_id) == (0, 1, 2, 3)
    text = "a dog riding a skateboard, 42 ünïcode"
    assert tok.decode(tok(text, add_special_tokens=False).input_ids) == text
    with pytest.raises(ValueError, match="vocab_size"):
        random_bpe_tokenizer(100)
