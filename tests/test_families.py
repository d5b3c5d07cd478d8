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
from transformers import (BeitConfig, BertConfig, DeiTConfig, GPT2Config, MBartConfig, RobertaConfig, SwinConfig,
                          TrOCRConfig, ViTConfig, ViTImageProcessor, VisionEncoderDecoderModel)

import captioner
from captioner import decoding
from captioner_train.architecture import joined
from captioner_train.vocabulary import word_tokenizer
from conftest import atol, free_port, image_for

WORDS = "a dog cat on the street table red blue sitting riding under".split()
SMALL = dict(num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)


def _encoder(kind: str):
    """-> (config, image side, expected grid, expected prefix tokens, has CLS)."""
    if kind == "vit384":
        return ViTConfig(hidden_size=48, image_size=384, patch_size=32, **SMALL), 384, (12, 12), 1, True
    if kind == "vit":
        return ViTConfig(hidden_size=32, image_size=48, patch_size=8, **SMALL), 48, (6, 6), 1, True
    if kind == "beit":
        return BeitConfig(hidden_size=32, image_size=48, patch_size=8, **SMALL), 48, (6, 6), 1, True
    if kind == "deit":
        return DeiTConfig(hidden_size=32, image_size=48, patch_size=8, **SMALL), 48, (6, 6), 2, True
    if kind == "swin":  # 64 px, patches of 4, two stages: 16x16 then 8x8 tokens of width 32
        return SwinConfig(image_size=64, patch_size=4, embed_dim=16, depths=[1, 1], num_heads=[2, 2],
                          window_size=4), 64, (8, 8), 0, False
    raise ValueError(kind)


def _decoder(kind: str, vocab: int, tok):
    ids = dict(pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    if kind == "gpt2":
        return GPT2Config(n_embd=64, n_layer=2, n_head=2, n_inner=128, vocab_size=vocab, n_positions=64, **ids)
    if kind == "bert":
        return BertConfig(hidden_size=32, vocab_size=vocab, max_position_embeddings=64, **SMALL, **ids)
    if kind == "roberta":
        return RobertaConfig(hidden_size=32, vocab_size=vocab, max_position_embeddings=70, **SMALL, **ids)
    if kind == "trocr":
        return TrOCRConfig(d_model=32, decoder_layers=2, decoder_attention_heads=2, decoder_ffn_dim=64,
                           vocab_size=vocab, max_position_embeddings=64, **ids)
    if kind == "mbart":
        return MBartConfig(d_model=32, decoder_layers=2, encoder_layers=2, decoder_attention_heads=2,
                           encoder_attention_heads=2, decoder_ffn_dim=64, encoder_ffn_dim=64, vocab_size=vocab,
                           max_position_embeddings=64, **ids)
    raise ValueError(kind)


FAMILIES = {  # name: (encoder, decoder)
    "vit384-gpt2": ("vit384", "gpt2"), "vit-bert": ("vit", "bert"), "vit-roberta": ("vit", "roberta"),
    "beit-trocr": ("beit", "trocr"), "deit-trocr": ("deit", "trocr"), "swin-mbart": ("swin", "mbart"),
}


def build_family(name: str, folder) -> dict:
    """Save a tiny random captioner of family `name` to `folder`; returns what its layout must be."""
    enc_kind, dec_kind = FAMILIES[name]
    tok = word_tokenizer(WORDS)
    enc, side, grid, prefix, has_cls = _encoder(enc_kind)
    model = joined(enc, _decoder(dec_kind, len(tok), tok), tok, seed=0, max_new_tokens=8)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    ViTImageProcessor(size={"height": side, "width": side}, image_mean=[0.5] * 3, image_std=[0.5] * 3) \
        .save_pretrained(folder)
    return {"grid": grid, "prefix": prefix, "has_cls": has_cls, "windowed": enc_kind == "swin"}


@pytest.fixture(scope="module")
def families(tmp_path_factory):
    out = {}
    for name in FAMILIES:
        folder = tmp_path_factory.mktemp(name)
        out[name] = (str(folder), build_family(name, folder))
    return out


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

    folders = [folder for folder, _ in families.values()]
    demo = app.build_demo(folders)
    _, url, _ = demo.launch(server_name="127.0.0.1", server_port=free_port(), prevent_thread_lock=True, quiet=True,
                            show_error=True, share=False, ssr_mode=False)
    try:
        client = Client(url, analytics_enabled=False, verbose=False)
        path = tmp_path / "image.png"
        Image.fromarray(image_for(3)).save(path)
        for (folder, want), label in zip(families.values(), app.Models(folders).paths):
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
