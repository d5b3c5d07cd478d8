"""Every map method on every model family against a reference written out here from README's "What the maps mean".

The reference uses only the model, its tokenizer and processor and the result's tokens: one eager forced pass of
the whole VisionEncoderDecoderModel over [decoder start] + caption tokens with output_attentions=True (relevance:
one forward and backward per word), and the rules in plain loops. None of it calls `captioner.attention`, `maps`,
`relevance` or `forcing`, so a wrong row offset, key, head mean, residual, product order, CLS row or clamp in the
library shows here as maps that differ. Compared for `caption` (beam search), `explain` and `remap`, on the tiny
ViT + GPT-2, every family of `conftest.FAMILIES` and a beam-search caption that ends by EOS.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from transformers.pytorch_utils import Conv1D

import captioner
from conftest import CAPTIONS, FAMILIES, ROOT, atol, image_for

# method, layers, head: each method's default, and for attention and rollout one decoder layer and one head
CHOICES = [("attention", None, None), ("attention", [0], 1), ("rollout", None, None), ("rollout", [0], 1),
           ("relevance", None, None)]
SUBJECTS = ["tiny", *FAMILIES]
WINDOWED = "swin-mbart"
SHARP_STD = 0.3
FLAT = 0.02  # a reference map spanning less than this fraction of its peak counts as flat


def _scaled(maps: np.ndarray) -> np.ndarray:
    """Each (gh, gw) map of (..., gh, gw) min-max scaled to [0, 1]; a constant map becomes zeros."""
    lo = maps.min((-2, -1), keepdims=True)
    hi = maps.max((-2, -1), keepdims=True)
    return ((maps - lo) / np.where(hi > lo, hi - lo, 1.0)).astype(np.float32)


def _pick(stacked: torch.Tensor, layers, head) -> torch.Tensor:
    """(L, H, q, k) -> (q, k): mean over the chosen layers (all if None), then head `head` or the mean of heads."""
    chosen = stacked[list(range(stacked.shape[0])) if layers is None else layers].mean(0)  # (H, q, k)
    return chosen.mean(0) if head is None else chosen[head]


def _forced(cap, image, ids: list[int]):
    """The whole model run once, eager, over [start] + caption tokens, with every attention returned."""
    decoder_input_ids = torch.tensor([[cap.start_token_id, *ids]], device=cap.device)  # (1, T+1)
    with torch.no_grad():
        return cap.model(pixel_values=cap.pixel_values(image), decoder_input_ids=decoder_input_ids,
                         output_attentions=True)


def _words_on_grid(rows: torch.Tensor, groups: list[list[int]], want: dict) -> np.ndarray:
    """(T, N) rows, row k for caption token k -> (W, gh, gw) raw word maps: the prefix tokens (CLS, DeiT's
    distillation token) dropped, the patches on the grid, a word the mean of its tokens' maps."""
    patches = rows[:, want["prefix"]:].reshape(-1, *want["grid"]).numpy()  # (T, gh, gw)
    return np.stack([patches[g].mean(0) for g in groups])


def _cross_rows(out, layers, head) -> torch.Tensor:
    """(T, N): caption token k sits at input position k + 1, so the query that predicted it is row k; the last
    row predicts what would follow the caption and explains nothing."""
    cross = torch.stack([a[0] for a in out.cross_attentions]).double().cpu()  # (L, H, T+1, N)
    return _pick(cross, layers, head)[:-1]


def reference_attention(cap, image, ids, groups, want, layers=None, head=None) -> tuple[np.ndarray, np.ndarray]:
    """-> (raw word maps (W, gh, gw), raw CLS map (gh, gw)). CLS: the encoder's last layer (or the chosen layers),
    CLS query row, patch keys; zeros for an encoder without CLS."""
    out = _forced(cap, image, ids)
    words = _words_on_grid(_cross_rows(out, layers, head), groups, want)
    if not want["has_cls"]:
        return words, np.zeros(want["grid"])
    enc = torch.stack([a[0] for a in out.encoder_attentions]).double().cpu()  # (L_enc, H, N, N)
    cls = _pick(enc, [-1] if layers is None else layers, head)[0, want["prefix"]:]
    return words, cls.reshape(want["grid"]).numpy()


def reference_rollout(cap, image, ids, groups, want, layers=None, head=None) -> tuple[np.ndarray, np.ndarray]:
    """Rollout through every encoder layer (the head choice applies to it, the layer choice to the decoder's
    cross-attention rows): Â = 0.5 A + 0.5 I, rows renormalised, joint = Â_L ... Â_1; a word's rows pushed
    through it (row @ joint); CLS: the joint matrix's CLS row."""
    out = _forced(cap, image, ids)
    n = out.encoder_attentions[0].shape[-1]
    eye = torch.eye(n, dtype=torch.float64)
    joint = eye
    for layer in out.encoder_attentions:  # first layer first, each later one multiplied on the left
        a = layer[0].double().cpu().mean(0) if head is None else layer[0, head].double().cpu()  # (N, N)
        a = 0.5 * a + 0.5 * eye
        joint = (a / a.sum(-1, keepdim=True)) @ joint
    words = _words_on_grid(_cross_rows(out, layers, head) @ joint, groups, want)
    return words, joint[0, want["prefix"]:].reshape(want["grid"]).numpy()


def _without_identity_normalised(r: torch.Tensor) -> torch.Tensor:
    """R̂: R - I with each row scaled to sum 1 (rows with nothing beyond I stay zero), plus I."""
    eye = torch.eye(r.shape[-1], dtype=r.dtype)
    bar = r - eye
    out = torch.zeros_like(bar)
    for i in range(bar.shape[0]):
        if bar[i].sum() > 0:
            out[i] = bar[i] / bar[i].sum()
    return out + eye


def reference_relevance(cap, image, ids, groups, want) -> tuple[np.ndarray, np.ndarray]:
    """Chefer et al. as README states it, one full forward and backward of the model per word.

    Ā = mean over heads of (∇A ⊙ A)⁺ for the word's log-probability (the sum over its tokens). Encoder: R_ii = I,
    R_ii += Ā R_ii first layer first, with Ā the head-mean attention (no gradients; shared by all words).
    Decoder, per layer: R_tt += Ā R_tt, R_ti += Ā R_ti through self-attention, then R_ti += R̂_ttᵀ Ā R̂_ii
    through cross-attention. A word's map: its tokens' rows of R_ti; CLS map: R_ii's CLS row."""
    decoder_input_ids = torch.tensor([[cap.start_token_id, *ids]], device=cap.device)  # (1, T+1)
    pixel_values = cap.pixel_values(image)
    words, r_ii = [], None
    for g in groups:
        with torch.enable_grad():
            out = cap.model(pixel_values=pixel_values, decoder_input_ids=decoder_input_ids, output_attentions=True)
            logp = out.logits[0].float().log_softmax(-1)  # (T+1, V)
            target = sum(logp[k, ids[k]] for k in g)  # token k at input position k + 1, predicted by row k
            selfs, crosses = out.decoder_attentions, out.cross_attentions
            grads = torch.autograd.grad(target, (*selfs, *crosses))
        bars = [(gr[0].double() * a[0].detach().double()).clamp(min=0).mean(0).cpu()
                for a, gr in zip((*selfs, *crosses), grads)]  # (q, k) each
        if r_ii is None:
            n = out.encoder_attentions[0].shape[-1]
            r_ii = torch.eye(n, dtype=torch.float64)
            for a in out.encoder_attentions:
                r_ii = r_ii + a[0].detach().double().mean(0).cpu() @ r_ii
        t1 = len(ids) + 1
        r_tt = torch.eye(t1, dtype=torch.float64)
        r_ti = torch.zeros(t1, r_ii.shape[0], dtype=torch.float64)
        for s, c in zip(bars[:len(selfs)], bars[len(selfs):]):
            r_tt = r_tt + s @ r_tt
            r_ti = r_ti + s @ r_ti
            r_ti = r_ti + _without_identity_normalised(r_tt).T @ c @ _without_identity_normalised(r_ii)
        words.append(_words_on_grid(r_ti[:-1], [g], want)[0])
    return np.stack(words), r_ii[0, want["prefix"]:].reshape(want["grid"]).numpy()


def reference(cap, image, res, want, method, layers=None, head=None) -> tuple[np.ndarray, np.ndarray]:
    """(raw word maps, raw CLS map) for the caption `res` carries, by `method`."""
    ids, groups = res.token_ids, res.word_tokens
    for word, g in zip(res.words, groups):  # the spelling the reference groups by is the caption's
        assert cap.tokenizer.decode([ids[k] for k in g], skip_special_tokens=True).strip() == word, (word, g)
    if method == "attention":
        return reference_attention(cap, image, ids, groups, want, layers, head)
    if method == "rollout":
        return reference_rollout(cap, image, ids, groups, want, layers, head)
    return reference_relevance(cap, image, ids, groups, want)


def assert_maps_equal(res, ref: tuple[np.ndarray, np.ndarray], want: dict, tol: float, label: str):
    """The library's word and CLS maps equal the scaled reference; the reference maps are not constant."""
    words, cls = ref
    assert res.words and res.word_maps.shape == (len(res.words), *want["grid"]), label
    spread = (words.max((1, 2)) - words.min((1, 2))) / np.abs(words).max((1, 2))  # (W,) span over peak
    assert (spread > FLAT).all(), f"{label}: reference word maps this flat cannot tell a constant map apart: {spread}"
    np.testing.assert_allclose(res.word_maps, _scaled(words), atol=tol, err_msg=f"{label}: word maps")
    if want["has_cls"]:
        assert (cls.max() - cls.min()) / np.abs(cls).max() > FLAT, f"{label}: the reference CLS map is flat"
    np.testing.assert_allclose(res.cls_map, _scaled(cls), atol=tol, err_msg=f"{label}: CLS map")


def _sharpened(cap, seed: int = 0):
    """Redraw the weights of every linear layer but the LM head at std SHARP_STD, and the CLS and distillation
    tokens at std 1. A random model's attention (std 0.02 weights) is nearly uniform: its maps span less than float
    rounding, so after scaling they would compare as noise, and a constant map would pass; and BEiT's and DeiT's
    CLS tokens start at zero, so their first layer's CLS query attends uniformly. Sharp attention gives maps that
    differ from patch to patch."""
    gen = torch.Generator().manual_seed(seed)
    lm_head = cap.model.decoder.get_output_embeddings()
    with torch.no_grad():
        for module in cap.model.modules():
            if isinstance(module, (torch.nn.Linear, Conv1D)) and module is not lm_head:
                module.weight.copy_(torch.randn(module.weight.shape, generator=gen) * SHARP_STD)
        for name, p in cap.model.encoder.named_parameters():
            if name.endswith(("cls_token", "distillation_token")):
                p.copy_(torch.randn(p.shape, generator=gen))
    return cap


def _vit_layout(cap) -> dict:
    cfg = cap.model.config.encoder
    size = cfg.image_size if isinstance(cfg.image_size, (tuple, list)) else (cfg.image_size, cfg.image_size)
    return {"grid": (size[0] // cfg.patch_size, size[1] // cfg.patch_size), "prefix": 1, "has_cls": True}


@pytest.fixture(scope="module")
def subjects(request):
    """name -> (captioner, its expected layout, image, a typed caption, caption settings), loaded on first use:
    the trained tiny ViT + GPT-2 as it is, each family's random model sharpened (a copy of its own)."""
    cache = {}

    def get(name: str):
        if name not in cache:
            if name == "tiny":
                cap = request.getfixturevalue("tiny")
                cache[name] = (cap, _vit_layout(cap), image_for(0), CAPTIONS[1], dict(max_new_tokens=40))
            else:
                folder, want = request.getfixturevalue("families")[name]
                image = np.asarray(Image.fromarray(image_for(1)).resize((80, 60)))
                cache[name] = (_sharpened(captioner.load(folder)), want, image, "a dog riding under the red table",
                               dict(max_new_tokens=8))
        return cache[name]
    return get


CASES = [(name, choice) for name in SUBJECTS for choice in CHOICES if name != WINDOWED or choice[0] == "attention"]


@pytest.mark.parametrize("name,choice", CASES, ids=[f"{n}-{m}-{'layers0-head1' if h is not None else 'default'}"
                                                    for n, (m, _, h) in CASES])
def test_caption_explain_and_remap_maps_equal_the_reference(subjects, name, choice):
    cap, want, image, text, settings = subjects(name)
    method, layers, head = choice
    how = dict(method=method, layers=layers, head=head)
    tol = atol(cap, 1e-4)
    res = cap.caption(image, num_beams=2, **settings, **how)
    assert_maps_equal(res, reference(cap, image, res, want, *choice), want, tol, f"{name} caption")
    typed = cap.explain(image, text, **how)
    assert typed.words == text.split()
    assert_maps_equal(typed, reference(cap, image, typed, want, *choice), want, tol, f"{name} explain")
    other = "rollout" if method == "attention" and name != WINDOWED else "attention"
    again = cap.remap(cap.explain(image, text, method=other), **how)
    assert_maps_equal(again, reference(cap, image, again, want, *choice), want, tol, f"{name} remap")


def test_windowed_encoder_has_attention_maps_only_and_no_cls_map(subjects):
    """Swin attends within windows and has no CLS token: the library refuses rollout and relevance, saying why,
    defaults to attention, and its CLS map is zeros with a note."""
    cap, want, image, text, _ = subjects(WINDOWED)
    assert not want["has_cls"] and cap.default_method == "attention"
    res = cap.explain(image, text)
    assert res.method == "attention" and not res.cls_map.any() and "no CLS token" in res.notes[-1]
    for method in ("rollout", "relevance"):
        with pytest.raises(ValueError, match="windows"):
            cap.explain(image, text, method=method)
        with pytest.raises(ValueError, match="windows"):
            cap.remap(res, method=method)


RECORDED = [c for c in CHOICES if c[0] != "relevance"]  # the methods that read what decoding recorded


@pytest.mark.parametrize("choice", RECORDED, ids=[f"{m}-{'layers0-head1' if h is not None else 'default'}"
                                                  for m, _, h in RECORDED])
@pytest.mark.parametrize("name", ["tiny", "bundled"])
def test_beam_caption_ending_by_eos_has_the_reference_maps(request, name, choice):
    """A beam-search caption that stops by EOS before max_new_tokens: its maps (attention and rollout read what
    the decoding loop recorded along the winning beam) equal the forced pass's."""
    cap = request.getfixturevalue(name)
    scene = ROOT / "assets" / "examples" / "scene_17.png"  # the bundled model's own kind of image
    image = image_for(0) if name == "tiny" else np.asarray(Image.open(scene).convert("RGB"))
    method, layers, head = choice
    max_new_tokens = 30
    res = cap.caption(image, max_new_tokens=max_new_tokens, num_beams=4, method=method, layers=layers, head=head)
    with torch.no_grad():  # transformers' own beam search, as a witness that this caption ends by EOS
        seq = cap.model.generate(pixel_values=cap.pixel_values(image), num_beams=4,
                                 max_new_tokens=max_new_tokens)[0].tolist()
    ended = [cap.start_token_id, *res.token_ids, cap.eos_token_id]
    assert len(res.token_ids) + 1 < max_new_tokens and seq[:len(ended)] == ended, (seq, res.token_ids)
    want = _vit_layout(cap)
    assert_maps_equal(res, reference(cap, image, res, want, *choice), want, atol(cap, 1e-4), f"{name} beam")
