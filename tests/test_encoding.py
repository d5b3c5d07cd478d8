"""The encoder at its floor (`captioner.encoding`): SDPA in every layer, each layer's attention weights computed from
its recorded queries and keys only when a map reads it, and equal to what eager attention gives."""
from __future__ import annotations

from contextlib import contextmanager

import numpy as np
import pytest
import torch
from transformers import BeitConfig, ViTImageProcessor
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

import captioner
from captioner import encoding
from captioner_train.architecture import joined
from captioner_train.vocabulary import word_tokenizer
from conftest import SMALL, WORDS, _decoder, atol, image_for

CLS_FAMILIES = ("vit384-gpt2", "vit-bert", "vit-roberta", "beit-trocr", "deit-trocr")
METHODS = ("attention", "rollout", "relevance")


@pytest.fixture(scope="module")
def relpos_dir(tmp_path_factory):
    """A tiny BEiT + TrOCR captioner whose layers each add their own relative-position bias, which BEiT passes to
    the attention function as its mask (the families fixture's BEiT has none). BEiT starts its bias tables at zero,
    so they are drawn at random here: a mask left out must show."""
    folder = tmp_path_factory.mktemp("beit-relpos")
    tok = word_tokenizer(WORDS)
    enc = BeitConfig(hidden_size=32, image_size=48, patch_size=8, use_relative_position_bias=True, **SMALL)
    model = joined(enc, _decoder("trocr", len(tok), tok), tok, seed=0, max_new_tokens=8)
    tables = [p for name, p in model.encoder.named_parameters() if name.endswith("relative_position_bias_table")]
    assert len(tables) == SMALL["num_hidden_layers"]
    with torch.no_grad():
        for table in tables:
            table.normal_(0.0, 1.0)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    ViTImageProcessor(size={"height": 48, "width": 48}, image_mean=[0.5] * 3, image_std=[0.5] * 3) \
        .save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def cap(tiny_dir):
    """The trained tiny captioner, loaded for this module alone: tests here switch its encoder to eager and back."""
    return captioner.load(tiny_dir)


@contextmanager
def all_eager(cap):
    """`cap` with the eager encoder it had before `encoding`: every layer's weights computed in every pass."""
    cap.model.encoder.set_attn_implementation("eager")
    try:
        yield cap
    finally:
        encoding.record_encoder(cap.model)


def _folder(name, families, tiny_dir, relpos_dir):
    return {"tiny": tiny_dir, "beit-relpos": relpos_dir}.get(name) or families[name][0]


def assert_same_maps(fast, eager, cap, fp32=1e-5):
    """Same caption, maps within fp32 (fp16's tolerance on a GPU). Word maps within 1e-4: each is stretched to
    [0, 1] by its own range, and a word whose relevance is nearly flat magnifies the last-bit rounding by which
    SDPA's encoder output differs from eager's (below 1e-6) up to 7e-5 (the trained tiny model; its raw token maps
    agree to 1e-7)."""
    assert fast.text == eager.text
    for key, tol in (("word_maps", max(fp32, 1e-4)), ("cls_map", fp32), ("token_maps", fp32)):
        np.testing.assert_allclose(getattr(fast, key), getattr(eager, key), rtol=0, atol=atol(cap, tol), err_msg=key)
    np.testing.assert_allclose(fast.word_probs, eager.word_probs, rtol=0, atol=atol(cap, fp32))


@pytest.mark.parametrize("name", [*CLS_FAMILIES, "tiny", "beit-relpos"])
def test_each_layers_lazy_weights_equal_the_eager_encoders(name, families, tiny_dir, relpos_dir):
    """Weights from the recorded queries and keys equal eager attention's: bitwise in the first layer (same inputs),
    within SDPA's last-bit rounding of the layers before in the others; image by image as for the batch."""
    cap = captioner.load(_folder(name, families, tiny_dir, relpos_dir))
    pixel_values = cap.pixel_values([image_for(0), image_for(1)])  # (2, 3, h, w)
    with all_eager(cap):  # transformers' own eager attention
        eager = cap.model.encoder(pixel_values=pixel_values, output_attentions=True)
    lazy = encoding.encode(cap.model.encoder, pixel_values, weights=True)
    assert cap.model.config.encoder._attn_implementation == encoding.RECORDING  # no fallback to eager
    assert isinstance(lazy.attentions, encoding.EncoderAttentions) and lazy.attentions.computed == []
    assert len(lazy.attentions) == len(eager.attentions) == cap.model.config.encoder.num_hidden_layers
    torch.testing.assert_close(lazy.last_hidden_state, eager.last_hidden_state, rtol=0, atol=atol(cap))
    assert torch.equal(lazy.attentions[0], eager.attentions[0])
    for a, b in zip(lazy.attentions, eager.attentions):
        torch.testing.assert_close(a, b, rtol=0, atol=atol(cap, 1e-6))
    for i in range(2):
        one = encoding.one_image(lazy, i).attentions
        assert one.computed == []
        torch.testing.assert_close(torch.stack(list(one)), torch.stack([a[i:i + 1] for a in eager.attentions]),
                                   rtol=0, atol=atol(cap, 1e-6))


@pytest.mark.parametrize("name", [*CLS_FAMILIES, "beit-relpos"])
def test_every_familys_maps_equal_the_eager_encoders(name, families, tiny_dir, relpos_dir):
    """Random weights make near-flat maps, CLS maps too, and stretching one to [0, 1] magnifies the last-bit
    rounding by which SDPA's encoder output differs from eager's (below 1e-6) to a few 1e-5: hence 1e-4 here."""
    fast = captioner.load(_folder(name, families, tiny_dir, relpos_dir))
    for method in METHODS:
        got = fast.caption(image_for(1), num_beams=1, method=method)
        with all_eager(fast):
            assert_same_maps(got, fast.caption(image_for(1), num_beams=1, method=method), fast, fp32=1e-4)


def test_the_public_api_gives_the_eager_encoders_maps(cap):
    """caption, caption_stream, explain, remap and caption_batch, every method, chosen layers and head too."""
    choices = [dict(method=m) for m in METHODS] + [dict(method="attention", layers=[0], head=1),
                                                   dict(method="rollout", layers=[0, 1], head=0)]
    images = [image_for(k) for k in range(3)]

    def everything():
        out = []
        for how in choices:
            res = cap.caption(images[0], **how)
            out += [res, *cap.caption_stream(images[1], **how), cap.explain(images[2], "a cat on the street", **how),
                    cap.remap(res, **{**how, "method": "rollout" if how["method"] != "rollout" else "attention"}),
                    *cap.caption_batch(images, num_beams=2, **how)]
        return out

    fast = everything()
    with all_eager(cap):
        eager = everything()
    assert len(fast) == len(eager) == 38  # caption_stream answers once for attention, twice for the others
    for f, e in zip(fast, eager):
        assert_same_maps(f, e, cap)


def test_the_pipelines_encoder_runs_sdpa_in_every_layer_and_computes_no_weights(cap, monkeypatch):
    sdpa, weights = [], []
    real_sdpa, real_weights = torch.nn.functional.scaled_dot_product_attention, encoding.attention_weights
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention",
                        lambda *a, **k: sdpa.append(1) or real_sdpa(*a, **k))
    monkeypatch.setattr(encoding, "attention_weights", lambda *a: weights.append(1) or real_weights(*a))
    _, enc = cap._encode(image_for(0))
    assert len(sdpa) == cap.model.config.encoder.num_hidden_layers and weights == []
    assert enc.attentions.computed == []


def test_a_map_computes_only_the_layers_it_reads(cap, monkeypatch):
    """(batch size of the queries) of each layer's weights computed, per call of the public API."""
    computed, real = [], encoding.attention_weights
    monkeypatch.setattr(encoding, "attention_weights", lambda q, *a: computed.append(q.shape[0]) or real(q, *a))
    L = cap.model.config.encoder.num_hidden_layers
    assert L > 1

    def count(call):
        computed.clear()
        call()
        return list(computed)

    image, images = image_for(0), [image_for(k) for k in range(3)]
    assert count(lambda: cap.caption(image, method="attention")) == [1]  # the last layer's CLS map
    assert count(lambda: cap.caption(image, method="attention", layers=[0])) == [1]
    assert count(lambda: cap.caption(image, method="attention", layers=[0, 1])) == [1, 1]
    assert count(lambda: cap.caption(image, method="rollout")) == [1] * L
    assert count(lambda: cap.caption(image, method="relevance")) == [1] * L
    assert count(lambda: list(cap.caption_stream(image, method="relevance"))) == [1] * L  # attention's layer kept
    assert count(lambda: cap.caption_batch(images, method="attention")) == [1] * len(images)  # image by image


def test_an_encoder_whose_layers_do_not_all_call_the_interface_falls_back_to_eager(tiny_dir, monkeypatch):
    """Simulated: only the first layer's attention goes through the interface, the others run SDPA themselves."""
    cap = captioner.load(tiny_dir)
    image = image_for(2)
    with all_eager(cap):
        eager = [cap.caption(image, method=m) for m in METHODS]
    first = []

    def first_layer_only(module, *args, **kwargs):
        first[:] = first or [module]
        attend = encoding.recording_attention if module is first[0] else sdpa_attention_forward
        return attend(module, *args, **kwargs)

    monkeypatch.setitem(ALL_ATTENTION_FUNCTIONS, encoding.RECORDING, first_layer_only)
    for method, e in zip(METHODS, eager):
        assert_same_maps(cap.caption(image, method=method), e, cap)
    assert first, "the simulated attention never ran"
    assert cap.model.config.encoder._attn_implementation == "eager"  # for good: the next call skips SDPA


def test_weights_outside_the_pipeline_are_eager_with_gradients(cap):
    """Training and the tests call the model with output_attentions=True: outputs and weights exactly as
    transformers' eager attention returns them, and gradients flow through the weights to the pixels."""
    pixel_values = cap.pixel_values(image_for(0)).requires_grad_()
    out = cap.model.encoder(pixel_values=pixel_values, output_attentions=True)
    with all_eager(cap):
        eager = cap.model.encoder(pixel_values=pixel_values, output_attentions=True)
    assert torch.equal(out.last_hidden_state, eager.last_hidden_state)
    assert len(out.attentions) == len(eager.attentions) == cap.model.config.encoder.num_hidden_layers
    assert all(torch.equal(a, b) for a, b in zip(out.attentions, eager.attentions))
    out.attentions[-1][0, :, 0].sum().backward()
    assert pixel_values.grad is not None and pixel_values.grad.abs().sum() > 0


def test_a_mask_with_one_row_per_image_is_cut_image_by_image():
    """A per-image mask (B, 1, N, N) is sliced with the queries; a shared one (1, H, N, N) is kept whole; the
    recorded scaling is the one applied."""
    torch.manual_seed(0)
    q, k = torch.randn(3, 2, 5, 4), torch.randn(3, 2, 5, 4)  # (B, H, N, d)
    own, shared = torch.randn(3, 1, 5, 5), torch.randn(1, 2, 5, 5)
    lazy = encoding.EncoderAttentions([encoding.Call(q, k, own, None), encoding.Call(q, k, shared, 0.3)])
    for i in range(3):
        one = lazy.images(i, i + 1)
        for layer in range(2):
            torch.testing.assert_close(one[layer], lazy[layer][i:i + 1], rtol=0, atol=1e-6)
    torch.testing.assert_close(lazy[1], torch.softmax(q @ k.transpose(-1, -2) * 0.3 + shared, -1), rtol=0, atol=1e-6)
    assert lazy[-1] is lazy[1] and len(lazy[:]) == 2 and lazy
