"""The VisionEncoderDecoder families people publish, as tiny random folders built from configs: ViT + GPT-2 at
384 px with encoder and decoder of different widths (so the decoder reads the encoder through a projection), ViT + BERT (manga-ocr), ViT + RoBERTa, BEiT + TrOCR
(trocr-base), DeiT + TrOCR (trocr-small: a distillation token after CLS), Swin + MBart (Donut: no CLS, windowed
attention, the grid of the last stage). Each captions (beam, greedy, sampled), explains and re-maps with every
method through the library and the three endpoints, or answers a method that cannot apply with a clear message."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from gradio_client import Client, handle_file
from gradio_client.exceptions import AppError
from PIL import Image
from transformers import VisionEncoderDecoderModel

import captioner
from captioner import decoding
from conftest import FAMILIES, atol, build_family, image_for
from servers import launch


def _check_maps(res, grid):
    assert res.words == res.text.split() and res.word_maps.shape == (len(res.words), *grid)
    assert res.cls_map.shape == grid and np.isfinite(res.word_maps).all() and np.isfinite(res.cls_map).all()


@pytest.mark.parametrize("name", list(FAMILIES))
def test_every_family_captions_explains_and_remaps(families, name):
    folder, want = families[name]
    cap = captioner.load(folder)
    layout = cap.layout
    assert (layout.grid, layout.prefix, layout.has_cls, layout.windowed) == \
        (want["grid"], want["prefix"], want["has_cls"], want["windowed"])
    image = np.asarray(Image.fromarray(image_for(1)).resize((80, 60)))
    usable = ["attention"] if want["windowed"] else list(captioner.METHODS)
    assert cap.default_method == ("attention" if want["windowed"] else captioner.DEFAULT_METHOD)
    for kwargs in (dict(num_beams=4), dict(num_beams=1), dict(num_beams=1, do_sample=True, seed=3)):
        res = cap.caption(image, max_new_tokens=8, **kwargs)
        _check_maps(res, want["grid"])
        assert res.method == cap.default_method
    text = "a dog riding under the red table"
    for method in captioner.METHODS:
        if method in usable:
            _check_maps(cap.explain(image, text, method=method), want["grid"])
            _check_maps(cap.remap(res, method=method), want["grid"])
        else:
            with pytest.raises(ValueError, match="windows"):
                cap.explain(image, text, method=method)
    if not want["has_cls"]:
        res = cap.explain(image, text)
        assert not res.cls_map.any() and "no CLS token" in res.notes[-1]
        assert cap.remap(cap.remap(res)).notes == res.notes, "the note is not repeated by each re-map"
    if FAMILIES[name][1] == "gpt2":  # our decoding loop, through the encoder-to-decoder projection
        reference = VisionEncoderDecoderModel.from_pretrained(folder).to(cap.device).eval()
        with torch.no_grad():
            plain = reference.generate(pixel_values=cap.pixel_values(image), num_beams=4, max_new_tokens=8)
        ids = plain[0, 1:].tolist()
        ids = ids[: ids.index(cap.eos_token_id)] if cap.eos_token_id in ids else ids
        assert decoding.unsupported(cap.model, False) is None
        assert cap.caption(image, max_new_tokens=8, num_beams=4).token_ids == ids


def test_an_mbart_decoder_deeper_than_its_config_encoder_captions_as_generate_without_cache(tmp_path):
    """transformers sizes an MBart decoder's cache by the config's `encoder_layers`; with fewer of those than
    decoder layers, plain `generate` fails in the cache. `load` raises `encoder_layers` (it builds nothing here):
    the same weights, and the tokens of `generate` run without a cache on the model as transformers loads it."""
    build_family("vit-mbart-deep", tmp_path)
    reference = VisionEncoderDecoderModel.from_pretrained(tmp_path).eval()
    assert (reference.config.decoder.encoder_layers, reference.config.decoder.decoder_layers) == (1, 3)
    cap = captioner.load(str(tmp_path), device="cpu")
    want = reference.state_dict()
    assert cap.model.state_dict().keys() == want.keys()
    assert all(torch.equal(v, want[k]) for k, v in cap.model.state_dict().items())
    image = image_for(1)
    for num_beams in (1, 4):
        with torch.no_grad():
            plain = reference.generate(pixel_values=cap.pixel_values(image), num_beams=num_beams, max_new_tokens=8,
                                       use_cache=False)
        ids = plain[0, 1:].tolist()
        ids = ids[: ids.index(cap.eos_token_id)] if cap.eos_token_id in ids else ids
        res = cap.caption(image, max_new_tokens=8, num_beams=num_beams)
        assert res.token_ids == ids, num_beams
        _check_maps(res, (6, 6))
    _check_maps(cap.explain(image, "a dog riding under the red table"), (6, 6))


def test_deit_maps_skip_the_distillation_token(families):
    """Token 1 of DeiT is the distillation token: a word's map is the attention on tokens 2.., on the grid."""
    cap = captioner.load(families["deit-trocr"][0])
    res = cap.explain(image_for(2), "a red dog", method="attention")
    with torch.no_grad():
        enc = cap.model.encoder(pixel_values=cap.pixel_values(image_for(2)))
        ids = torch.tensor([[cap.start_token_id, *res.token_ids]], device=cap.device)
        out = cap.model(encoder_outputs=(enc.last_hidden_state,), decoder_input_ids=ids, output_attentions=True)
    rows = torch.stack([a[0] for a in out.cross_attentions]).float().mean((0, 1))[:-1]  # (T, 2 + 36)
    np.testing.assert_allclose(res.token_maps, rows[:, 2:].reshape(-1, 6, 6).cpu().numpy(), atol=atol(cap, 1e-6))


def test_every_family_through_the_three_endpoints(families, tmp_path):
    import app
    from page import api

    folders = [folder for folder, _ in families.values()]
    demo = app.build_demo(folders)
    url = launch(demo, show_error=True)
    try:
        client = Client(url, analytics_enabled=False, verbose=False)
        path = tmp_path / "image.png"
        Image.fromarray(image_for(3)).save(path)
        for (folder, want), label in zip(families.values(), api.Models(folders).paths):
            method = captioner.DEFAULT_METHOD  # the page's default stands for each model's own
            result = client.predict(handle_file(str(path)), model=label, method=method, api_name="/caption")[4]
            assert result["method"] == ("attention" if want["windowed"] else captioner.DEFAULT_METHOD), label
            maps = np.array(result["word_maps"], np.float32).reshape(-1, *want["grid"])  # a random model may say nothing
            assert len(maps) == len(result["words"]) and result["grid"] == list(want["grid"]), label
            result = client.predict(handle_file(str(path)), "a red dog", model=label, method=method,
                                    api_name="/explain")[4]
            assert result["words"] == ["a", "red", "dog"] and result["grid"] == list(want["grid"])
            png = client.predict(handle_file(str(path)), "a red dog", 2, model=label, method=method,
                                 api_name="/heatmap")
            assert Image.open(png).format == "PNG"
            if want["windowed"]:
                with pytest.raises(AppError, match="windows"):
                    client.predict(handle_file(str(path)), "a red dog", model=label, method="rollout",
                                   api_name="/explain")
    finally:
        demo.close()


@pytest.mark.parametrize("name", list(FAMILIES))
def test_staged_training_finds_each_familys_cross_attention(families, name):
    from captioner_train import train

    model = VisionEncoderDecoderModel.from_pretrained(families[name][0])
    cfg = train.TrainConfig(stage_decoder=10, stage_all=20)
    assert train._set_stage(model, 0, cfg) == "cross"
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(n.startswith(("decoder.", "enc_to_dec_proj")) for n in trainable), trainable[:3]
    assert len(trainable) < len(list(model.parameters())) / 2
    assert train._set_stage(model, 10, cfg) == "decoder"
    assert all(p.requires_grad == n.startswith(("decoder.", "enc_to_dec_proj")) for n, p in model.named_parameters())


def test_staged_training_refuses_a_decoder_without_known_cross_attention(families, monkeypatch):
    from captioner_train import train

    model = VisionEncoderDecoderModel.from_pretrained(families["vit-bert"][0])
    monkeypatch.setattr(train, "CROSS_ATTENTION_NAMES", ("no_such_layer",))
    with pytest.raises(RuntimeError, match="No cross-attention parameters"):
        train._set_stage(model, 0, train.TrainConfig(stage_decoder=10, stage_all=20))
