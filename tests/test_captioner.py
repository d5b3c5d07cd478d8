"""The Python API contract and the rules the maps must follow, on tiny models built from configs."""
from __future__ import annotations

import time

import numpy as np
import pytest
import torch
from PIL import Image

import captioner
from captioner.attention import normalise
from conftest import CAPTIONS, atol, image_for


def _pixels(cap, image):
    return cap.pixel_values(image)  # (1, 3, h, w) on the model's device and dtype


def _mean_map(rows: torch.Tensor, grid) -> np.ndarray:
    """(L, H, N) attention rows of one query -> (gh, gw) mean over layers and heads, CLS key dropped."""
    return rows.float().mean((0, 1))[1:].reshape(grid).cpu().numpy()


def test_contract(tiny):
    res = tiny.caption(image_for(0), max_new_tokens=40)
    assert isinstance(res.text, str) and res.text
    assert res.words == res.text.split()
    assert res.word_maps.dtype == np.float32 and res.word_maps.shape == (len(res.words), 4, 6)
    assert res.cls_map.dtype == np.float32 and res.cls_map.shape == (4, 6)  # non-square grid: 32x48 / 8
    for m in [*res.word_maps, res.cls_map]:
        assert m.min() == 0.0 and m.max() == pytest.approx(1.0)
    assert len(res.word_probs) == len(res.words) and all(0 < p <= 1 for p in res.word_probs)
    js = res.to_json()
    assert {"caption", "words", "word_maps", "cls_map"} <= js.keys()
    assert np.allclose(js["word_maps"], res.word_maps, atol=1e-4)


def test_trained_fixture_captions_its_images(tiny, kernel):
    """The tiny model learnt its four captions, so the tests below work on real multi-token words."""
    for k, text in enumerate(CAPTIONS):
        assert tiny.caption(image_for(k), max_new_tokens=40, num_beams=1).text == text


def test_words_group_subword_tokens(tiny, kernel):
    res = tiny.caption(image_for(0), max_new_tokens=40, method="attention")
    k = res.words.index("skateboard")
    assert len(res.word_tokens[k]) >= 2, "the BPE fixture must split 'skateboard' into several tokens"
    assert "".join(res.tokens[i] for i in res.word_tokens[k]).replace("Ġ", "") == "skateboard"
    expected = normalise(res.token_maps[res.word_tokens[k]].mean(0))
    assert np.allclose(res.word_maps[k], expected, atol=1e-6)
    assert res.word_probs[k] == pytest.approx(float(np.prod(tiny.explain(image_for(0), res.text).word_probs[k])),
                                              rel=1e-3), "same word probability from decoding and a forced pass"


def test_greedy_maps_equal_the_attentions_generate_returned(tiny, kernel):
    """Pins the rule that query row j-1 (the state that predicted token j) gives token j's map."""
    image = image_for(1)
    res = tiny.caption(image, max_new_tokens=40, num_beams=1, method="attention")
    with torch.no_grad():
        out = tiny.model.generate(pixel_values=_pixels(tiny, image), max_new_tokens=40, num_beams=1,
                                  do_sample=False, output_attentions=True, return_dict_in_generate=True)
    assert out.sequences[0, 1:len(res.token_ids) + 1].tolist() == res.token_ids
    for j in range(len(res.token_ids)):  # step j's query produced token j+1 of the sequence, i.e. caption token j
        rows = torch.stack([layer[0, :, -1] for layer in out.cross_attentions[j]])  # (L, H, N)
        assert np.allclose(res.token_maps[j], _mean_map(rows, tiny.grid), atol=atol(tiny)), f"token {j}"


def test_beam_search_maps_equal_a_teacher_forced_pass(tiny, kernel):
    image = image_for(2)
    res = tiny.caption(image, max_new_tokens=40, num_beams=4, method="attention")
    with torch.no_grad():
        plain = tiny.model.generate(pixel_values=_pixels(tiny, image), max_new_tokens=40, num_beams=4)
        ids = [tiny.start_token_id, *res.token_ids]
        forced = tiny.model(pixel_values=_pixels(tiny, image), decoder_input_ids=torch.tensor([ids], device=tiny.device),
                            output_attentions=True)
    assert plain[0, 1:len(res.token_ids) + 1].tolist() == res.token_ids, "same tokens as plain generate"
    for j in range(len(res.token_ids)):
        rows = torch.stack([layer[0, :, j] for layer in forced.cross_attentions])  # (L, H, N)
        assert np.allclose(res.token_maps[j], _mean_map(rows, tiny.grid), atol=atol(tiny))


def test_beam_search_on_random_model_matches_plain_generate(random_tiny, kernel):
    """Even where beams disagree a lot (random weights), the tokens are plain generate's."""
    image = image_for(3)
    res = random_tiny.caption(image, max_new_tokens=12, num_beams=3)
    with torch.no_grad():
        plain = random_tiny.model.generate(pixel_values=_pixels(random_tiny, image), max_new_tokens=12,
                                           num_beams=3)[0, 1:].tolist()
    eos = random_tiny.eos_token_id
    assert res.token_ids == (plain[:plain.index(eos)] if eos in plain else plain)


def test_explain_of_own_caption_gives_the_same_maps(tiny, kernel):
    image = image_for(3)
    for method in ("attention", "relevance"):
        res = tiny.caption(image, max_new_tokens=40, method=method)
        again = tiny.explain(image, res.text, method=method)
        assert again.token_ids == res.token_ids and again.words == res.words
        assert np.allclose(again.word_maps, res.word_maps, atol=atol(tiny)), method
        assert np.allclose(again.word_probs, res.word_probs, atol=atol(tiny)), method


def test_cls_map_is_last_layer_cls_row_mean_over_heads(tiny):
    image = image_for(0)
    res = tiny.caption(image, method="attention")
    with torch.no_grad():
        enc = tiny.model.encoder(pixel_values=_pixels(tiny, image), output_attentions=True)
    row = enc.attentions[-1][0, :, 0, 1:].float().mean(0).reshape(tiny.grid).cpu().numpy()
    assert np.allclose(res.cls_map, normalise(row), atol=atol(tiny, 1e-6))


def test_pil_and_array_inputs_agree_and_input_is_not_mutated(tiny, kernel):
    image = image_for(1)
    before = image.copy()
    a = tiny.caption(image)
    b = tiny.caption(Image.fromarray(image))
    assert np.array_equal(image, before)
    assert a.text == b.text and np.allclose(a.word_maps, b.word_maps)


def test_sampling_is_reproducible_and_leaves_global_rng_alone(random_tiny):
    torch.manual_seed(123)
    expected_next = torch.rand(1)
    torch.manual_seed(123)
    a = random_tiny.caption(image_for(0), do_sample=True, seed=7, num_beams=1, top_k=0, temperature=2.0)
    assert torch.rand(1) == expected_next, "sampling must not consume the process-wide generator"
    b = random_tiny.caption(image_for(0), do_sample=True, seed=7, num_beams=1, top_k=0, temperature=2.0)
    assert a.token_ids == b.token_ids and a.settings["seed"] == 7
    c = random_tiny.caption(image_for(0), do_sample=True, num_beams=1, top_k=0, temperature=2.0)
    assert isinstance(c.settings["seed"], int), "a drawn seed is reported so the result can be reproduced"
    assert random_tiny.caption(image_for(0), do_sample=True, seed=c.settings["seed"], num_beams=1, top_k=0,
                               temperature=2.0).token_ids == c.token_ids


def test_settings_and_their_keyword_overrides_decode_alike(random_tiny):
    """caption(image, settings) and caption(image, **fields) are one call; keywords override the settings."""
    settings = captioner.GenerationSettings(max_new_tokens=9, num_beams=1)
    a = random_tiny.caption(image_for(1), settings, method="attention")
    b = random_tiny.caption(image_for(1), max_new_tokens=9, num_beams=1, method="attention")
    c = random_tiny.caption(image_for(1), captioner.GenerationSettings(num_beams=3), max_new_tokens=9, num_beams=1,
                            method="attention")
    assert a.token_ids == b.token_ids == c.token_ids and a.settings == b.settings == c.settings
    assert a.settings["num_beams"] == 1 and a.settings["max_new_tokens"] == 9
    assert random_tiny.caption(image_for(1), method="attention").settings["max_new_tokens"] == \
        random_tiny.default_max_new_tokens, "max_new_tokens left out: the model's own"
    batch = random_tiny.caption_batch([image_for(1)], settings, method="attention")
    assert batch[0].token_ids == a.token_ids and batch[0].settings == a.settings
    with pytest.raises(TypeError, match="keyword"):
        random_tiny.caption(image_for(1), 9)
    with pytest.raises(TypeError, match="beams"):
        random_tiny.caption(image_for(1), beams=2)


@pytest.mark.parametrize("kwargs, name", [
    ({"num_beams": 10_000}, "num_beams"), ({"num_beams": 0}, "num_beams"),
    ({"max_new_tokens": 10**6}, "max_new_tokens"), ({"temperature": -1}, "temperature"),
    ({"top_p": 5}, "top_p"), ({"top_k": -3}, "top_k"), ({"seed": -2}, "seed"),
    ({"num_beams": 2.5}, "num_beams"), ({"temperature": float("nan")}, "temperature"),
])
def test_bad_settings_are_refused_with_the_parameter_named(random_tiny, kwargs, name):
    with pytest.raises(ValueError, match=name):
        random_tiny.caption(image_for(0), **kwargs)


def test_explain_refuses_empty_and_huge_captions(random_tiny):
    with pytest.raises(ValueError, match="caption"):
        random_tiny.explain(image_for(0), "   ")
    with pytest.raises(ValueError, match="limit"):
        random_tiny.explain(image_for(0), "dog " * 25_000)
    with pytest.raises(ValueError, match="tokens"):
        random_tiny.explain(image_for(0), "skateboard " * 40)


def test_unknown_hub_model_fails_with_advice():
    with pytest.raises(RuntimeError, match="bundled"):
        captioner.load("someone/not-a-real-captioner")


@pytest.mark.slow
def test_unknown_hub_model_fails_within_10_seconds():
    """Offline, the hub is not waited for. Slow: a figure of the machine and its load, not of the code alone."""
    start = time.perf_counter()
    with pytest.raises(RuntimeError, match="bundled"):
        captioner.load("someone/not-a-real-captioner")
    assert time.perf_counter() - start < 10


def test_offline_default_is_the_bundled_model(monkeypatch):
    monkeypatch.delenv("CAPTIONER_MODEL", raising=False)
    assert captioner.default_model() == captioner.BUNDLED_MODEL
    monkeypatch.setenv("CAPTIONER_MODEL", "/some/folder")
    assert captioner.default_model() == "/some/folder"


def test_caption_stream_gives_the_attention_maps_first_and_ends_with_caption(tiny):
    """The first answer is the caption with its attention maps; the last equals `caption` with the default map."""
    first, last = list(tiny.caption_stream(image_for(2), num_beams=1))
    want = tiny.caption(image_for(2), num_beams=1)
    assert first.method == "attention" and last.method == want.method == "relevance"
    assert first.token_ids == last.token_ids == want.token_ids
    np.testing.assert_allclose(first.word_maps, tiny.caption(image_for(2), num_beams=1, method="attention").word_maps,
                               atol=1e-6)
    np.testing.assert_allclose(last.word_maps, want.word_maps, atol=1e-6)
    assert len(list(tiny.caption_stream(image_for(2), num_beams=1, method="attention"))) == 1
