"""The fast path: `fastdecode` gives plain `generate`'s tokens (every beam-search setting, every kernel, int8) and the
attention that produced them; int8, batch mode, the CLI. No timing assertions here: `python -m captioner_train.bench`
prints the speeds (tests/test_bench.py: its figures and tables)."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from transformers import VisionEncoderDecoderModel

import captioner
from captioner import decoding, fastdecode, kernels
from captioner.decoding import GenerationSettings, generate_batch, generate_ids
from captioner.kernels import conv1d_out_in
from captioner.quantize import conv1d_to_linear
from captioner_train.vocabulary import random_bpe_tokenizer
from conftest import CAPTIONS, atol, image_for


def _pixels(cap, images):
    return cap.pixel_values(list(images))  # (B, 3, h, w) on the model's device and dtype


def _boost_eos(model, eos: int):
    with torch.no_grad():
        model.decoder.lm_head.weight[eos] *= 4  # tied: the EOS embedding scales too


def _reference(cap):
    """cap's model as plain transformers loads it: Conv1D layers, default (SDPA) attention, same device and dtype,
    the same generation config."""
    model = VisionEncoderDecoderModel.from_pretrained(cap.model.config._name_or_path, dtype=cap.model.dtype)
    model = model.to(cap.device).eval()
    model.generation_config = copy.deepcopy(cap.model.generation_config)
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
    assert decoding.unsupported(cap.model, False) is None, "these fixtures must take the fast path"
    return [d.ids for d in generate_batch(cap.model, hidden, settings, cap.eos_token_id, fast=True)]


@pytest.fixture(scope="module")
def random_eos(random_tiny):
    """random_tiny with its EOS logit scaled up 4x: random beams that sometimes end by EOS (after 12 tokens
    on some images) and sometimes run into the length limit, so finished hypotheses compete with running ones."""
    model = copy.deepcopy(random_tiny.model)
    _boost_eos(model, random_tiny.eos_token_id)
    return captioner.Captioner(model, random_tiny.tokenizer, random_tiny.processor, "random_eos")


@pytest.mark.parametrize("fixture", ["tiny", "random_tiny", "random_eos"])
def test_fast_tokens_equal_plain_generate(request, fixture, kernel):
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
def test_fast_batch_equals_plain_generate_batch(request, fixture, num_beams, kernel):
    """Several images in one call: each row's beams stay with its own image."""
    cap = request.getfixturevalue(fixture)
    images = [image_for(k) for k in (0, 1, 2, 3, 1)]
    assert _fast(cap, images, num_beams, 20) == _plain(cap, images, num_beams, 20, _reference(cap))


@pytest.mark.parametrize("num_beams", [1, 3])
def test_attention_recorded_while_decoding_equals_a_forced_pass(random_tiny, num_beams, kernel):
    """Decoding keeps the cross-attention and probability of the beam rows that produced each token; they must be
    what a forced pass over the final tokens gives, on our model and on the model as transformers loads it."""
    image = image_for(2)
    fast = random_tiny.caption(image, max_new_tokens=12, num_beams=num_beams, method="attention")
    random_tiny.fast_decoding = False  # generate, then a forced pass for the maps
    try:
        slow = random_tiny.caption(image, max_new_tokens=12, num_beams=num_beams, method="attention")
    finally:
        random_tiny.fast_decoding = True
    tol = atol(random_tiny)
    assert fast.token_ids == slow.token_ids and fast.words == slow.words
    assert np.allclose(fast.word_maps, slow.word_maps, atol=tol) and np.allclose(fast.token_maps, slow.token_maps,
                                                                                 atol=tol)
    assert np.array_equal(fast.cls_map, slow.cls_map) and np.allclose(fast.word_probs, slow.word_probs, rtol=1e-4)
    eager = VisionEncoderDecoderModel.from_pretrained(random_tiny.model.config._name_or_path,
                                                      attn_implementation="eager", dtype=random_tiny.model.dtype)
    eager = eager.to(random_tiny.device).eval()
    ids = torch.tensor([[random_tiny.start_token_id, *fast.token_ids]], device=random_tiny.device)
    with torch.no_grad():
        out = eager(pixel_values=_pixels(random_tiny, [image]), decoder_input_ids=ids, output_attentions=True)
    rows = torch.stack([a[0] for a in out.cross_attentions]).float().mean((0, 1))[:-1, 1:]  # (T, gh*gw)
    assert np.allclose(fast.token_maps, rows.reshape(-1, *random_tiny.grid).cpu().numpy(), atol=tol)


def test_settings_the_fast_path_cannot_reproduce_go_to_generate(random_tiny):
    model = random_tiny.model
    assert decoding.unsupported(model, do_sample=True) == "sampling"
    with torch.no_grad():
        hidden = model.encoder(pixel_values=_pixels(random_tiny, [image_for(0)])).last_hidden_state
    model.generation_config.no_repeat_ngram_size = 1  # a logits processor fastdecode does not implement
    try:
        assert "no_repeat_ngram_size" in decoding.unsupported(model, do_sample=False)
        decoded = generate_ids(model, hidden, GenerationSettings(max_new_tokens=12, num_beams=3),
                               random_tiny.eos_token_id)
        assert decoded.cross is None, "generate decoded, so nothing was recorded"
        assert len(set(decoded.ids)) == len(decoded.ids), "no_repeat_ngram_size=1 was applied, so generate decoded"
        assert decoded.ids == _plain(random_tiny, [image_for(0)], 3, 12)[0]
        res = random_tiny.caption(image_for(0), max_new_tokens=12, num_beams=3, method="attention")
        assert res.token_ids == decoded.ids and res.word_maps.shape == (len(res.words), *random_tiny.grid)
    finally:
        model.generation_config.no_repeat_ngram_size = 0


@pytest.mark.parametrize("length_penalty, early_stopping", [(0.5, False), (2.0, True), (1.5, "never"),
                                                            (-1.0, False), (0.0, True), (3.0, "never")])
def test_beam_search_follows_length_penalty_and_early_stopping(random_eos, tiny, length_penalty, early_stopping,
                                                                kernel):
    """generate's scoring (sum of logp / length ** length_penalty) and its three stopping rules, on a model whose
    beams end both by EOS and by the length limit."""
    for cap in (random_eos, tiny):
        gen = cap.model.generation_config
        saved = gen.length_penalty, gen.early_stopping
        gen.length_penalty, gen.early_stopping = length_penalty, early_stopping
        try:
            reference = _reference(cap)
            for k in range(len(CAPTIONS)):
                for num_beams, max_new_tokens in ((2, 24), (3, 14), (4, 24)):
                    assert _fast(cap, [image_for(k)], num_beams, max_new_tokens) == \
                        _plain(cap, [image_for(k)], num_beams, max_new_tokens, reference), (cap.name, k, num_beams)
        finally:
            gen.length_penalty, gen.early_stopping = saved


@pytest.mark.parametrize("setting, values", [("length_penalty", (-2.0, 3.0)), ("early_stopping", (False, "never"))])
def test_the_settings_above_change_which_beam_wins(random_eos, setting, values, kernel):
    """The test above has power: on these images the length penalty, and "never" against False, pick other
    captions (with 2 beams: "never" keeps searching after False would have stopped)."""
    gen = random_eos.model.generation_config
    saved, picked = getattr(gen, setting), {}
    for value in values:
        setattr(gen, setting, value)
        try:
            picked[value] = [_fast(random_eos, [image_for(k)], 2, 24)[0] for k in range(len(CAPTIONS))]
        finally:
            setattr(gen, setting, saved)
    assert picked[values[0]] != picked[values[1]]


@pytest.mark.parametrize("threads", [1, 2, 3, 7])
@pytest.mark.parametrize("rows", [1, 3, 4])
def test_every_kernel_computes_the_layer(random_tiny, threads, rows):
    """Every linear layer of the decoder through each kernel, with thread counts that leave rows over (a weight's
    output size not divisible by the threads: 32 by 3 or 7, the 300-token head by 7) and that do not."""
    saved = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        decoder = copy.deepcopy(random_tiny.model.decoder)
        layers = [m for m in decoder.modules() if kernels.weight(m) is not None]
        assert any(kernels.weight(m).shape[0] % threads for m in layers) == (threads in (3, 7))
        with torch.no_grad():  # GPT-2 starts with zero biases: give them values a dropped bias would miss
            for m in layers:
                if m.bias is not None:
                    m.bias.normal_()
        for layer in layers:
            x = torch.randn(rows, kernels.weight(layer).shape[1], device=random_tiny.device,
                            dtype=random_tiny.model.dtype, requires_grad=True)
            want = layer(x)  # the module's own forward (Conv1D: x @ W + b)
            for kernel in kernels.available():
                timed = kernels.Kernels(decoder, force=kernel)
                with torch.no_grad():  # as decoding runs them
                    got = timed.linear(x, layer)
                assert got.shape == want.shape and torch.allclose(got, want, atol=atol(random_tiny)), kernel
                # while gradients are recorded, the layer itself: the packed kernels have no backward
                grad, = torch.autograd.grad(timed.linear(x, layer).sum(), x)
                assert torch.allclose(grad, kernels.weight(layer).sum(0).expand_as(x), atol=atol(random_tiny)), kernel
                with pytest.raises(RuntimeError, match="no backward"):  # a named kernel's product refuses instead
                    timed.product(kernel, x, kernels.weight(layer))
    finally:
        torch.set_num_threads(saved)


@pytest.mark.parametrize("fixture", ["tiny", "bundled"])
def test_each_decoding_step_gives_the_models_own_logits(request, fixture, kernel):
    """The loop's step (its own layer norms, attention, GELU and products) against the model's forward over the same
    tokens: every position's logits, on the trained tiny model (16-wide heads: a scaling of 1/4, applied to the keys
    once) and on the bundled model (32-wide heads: 1/sqrt(32), applied to the scores)."""
    cap = request.getfixturevalue(fixture)
    assert [b.crossattention.scaling for b in cap.model.decoder.transformer.h][0] == \
        {"tiny": 0.25, "bundled": 32 ** -0.5}[fixture]
    pixels = _pixels(cap, [image_for(2)])
    with torch.inference_mode():
        hidden = cap.model.encoder(pixel_values=pixels).last_hidden_state  # (1, N, D)
        ids = torch.tensor([[cap.start_token_id, 5, 9, 7, 3]], device=cap.device)
        want = cap.model(encoder_outputs=(hidden,), decoder_input_ids=ids).logits[0].float()  # (T, V)
        steps = fastdecode._GPT2Steps(cap.model, fastdecode.cross_keys_values(cap.model, hidden), 1, ids.shape[1])
        got = torch.cat([steps.step(ids[:, t]) for t in range(ids.shape[1])])  # (T, V)
    assert torch.allclose(got, want, atol=atol(cap, 1e-5), rtol=0), (got - want).abs().max()


@pytest.mark.parametrize("V", [5, 300, 50257])
def test_beam_topk_equals_torch_topk_over_the_flattened_beams(V):
    """The loop's two-stage top-k (each row's best first, the beam score added to those alone) gives torch.topk's
    values and indices over the whole sum, ties included: beams that start at -1e9 (whose scores tie in fp32), one
    row for all beams (step 0), whole rows of equal scores, a vocabulary smaller than k."""
    g = torch.Generator().manual_seed(V)
    scores = torch.randn(2, 4, generator=g)
    start = torch.tensor([[0.0, -1e9, -1e9, -1e9]] * 2)
    cases = [(torch.randn(2, 4, V, generator=g), scores), (torch.randn(2, 1, V, generator=g), start),
             (torch.randn(2, 4, V, generator=g), start), (torch.zeros(2, 4, V), scores),
             (torch.randn(2, 4, V, generator=g).round(), scores.round()), (torch.randn(2, 1, V, generator=g), scores)]
    for logp, running in cases:
        want = torch.topk((logp.expand(2, 4, V) + running[:, :, None]).reshape(2, 4 * V), 8)
        got = fastdecode._topk(logp, running, 8)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def test_the_routed_encoder_computes_what_the_stock_encoder_does(tiny, tiny_dir, kernel):
    """Captioner routes the encoder's Linear layers through the kernels (packed where timing says so): same
    parameters and state_dict, the stock encoder's output under every kernel, plain F.linear (with gradients) when
    gradients are recorded, and a copy in another dtype still runs (its weights are no kernel's: F.linear)."""
    stock = VisionEncoderDecoderModel.from_pretrained(tiny_dir).eval().to(tiny.device, tiny.model.dtype).encoder
    routed = tiny.model.encoder
    assert any(type(m) is kernels.RoutedLinear for m in routed.modules())
    assert not any(type(m) is kernels.RoutedLinear for m in tiny.model.decoder.modules())
    a, b = stock.state_dict(), routed.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    pixels = _pixels(tiny, [image_for(0), image_for(1)])  # a batch: (2 * N) rows per product
    with torch.no_grad():
        want, got = stock(pixel_values=pixels).last_hidden_state, routed(pixel_values=pixels).last_hidden_state
    assert torch.allclose(got, want, atol=atol(tiny, 1e-5))
    layer = next(m for m in routed.modules() if type(m) is kernels.RoutedLinear)
    x = torch.randn(3, 5, layer.in_features, device=tiny.device, dtype=tiny.model.dtype, requires_grad=True)
    out = layer(x)
    out.sum().backward()  # recorded: F.linear, whose gradient is right
    assert torch.allclose(x.grad, layer.weight.sum(0).expand_as(x), atol=atol(tiny, 1e-5))
    other = copy.deepcopy(layer).to(torch.float64)
    with torch.no_grad():
        assert torch.allclose(other(x.detach().double()), F.linear(x.detach().double(), other.weight, other.bias))


def test_a_plan_follows_its_layers_weight_when_it_changes(random_tiny):
    """A product's plan (weight, bias, packed copy) is rebuilt when its layer's weight is changed in place, replaced
    or given other memory (`param.data = ...`), so a model whose weights are edited after decoding never decodes
    with the old ones."""
    decoder = copy.deepcopy(random_tiny.model.decoder)
    for layer in (decoder.transformer.h[0].mlp.c_fc, decoder.lm_head):  # a re-laid Conv1D, an nn.Linear
        for kernel in kernels.available():
            timed = kernels.Kernels(decoder, force=kernel)
            x = torch.randn(4, kernels.weight(layer).shape[1], device=random_tiny.device,
                            dtype=random_tiny.model.dtype)
            with torch.no_grad():  # as decoding runs them: through the plans
                timed.linear(x, layer)  # the plan is made
                layer.weight.mul_(2)  # in place
                assert torch.allclose(timed.linear(x, layer), layer(x), atol=atol(random_tiny)), kernel
                w = layer.weight.detach()
                layer.weight = torch.nn.Parameter((w.t().contiguous().t() if w.stride(0) == 1 else w.clone()) * 0.5)
                assert torch.allclose(timed.linear(x, layer), layer(x), atol=atol(random_tiny)), kernel
                other = layer.weight.detach().clone() * 3  # the same layout, in other memory
                layer.weight.data = other
                assert torch.allclose(timed.linear(x, layer), layer(x), atol=atol(random_tiny)), kernel


def test_kernels_are_chosen_by_timing_and_decode_the_same(random_eos):
    """The timed choice records every candidate's speed; forcing any kernel decodes the same tokens and maps."""
    timed = kernels.Kernels(random_eos.model.decoder)
    w = kernels.weight(random_eos.model.decoder.lm_head)
    if random_eos.device.type != "cpu":
        assert timed.choose(w, 4) == "linear"
        return
    kernel = timed.choose(w, 4)
    chosen, speeds = timed.chosen[(*w.shape, 4, torch.get_num_threads())]
    assert kernel == chosen in kernels.available() and set(speeds) == set(kernels.available())
    assert all(v > 0 for v in speeds.values())
    assert any(line.startswith(f"{w.shape[0]}x{w.shape[1]} weight, 4 rows") for line in timed.summary())
    # one timing pass chooses for every weight shape of the model at that row count
    assert {key[:2] for key in timed.chosen} == set(timed.by_shape)
    with pytest.raises(ValueError, match="kernel"):
        kernels.Kernels(random_eos.model.decoder, force="magic")
    results = {}
    for kernel in kernels.available():
        with kernels.forced(kernel):
            results[kernel] = [random_eos.caption(image_for(k), max_new_tokens=24, num_beams=4, method="attention")
                               for k in range(len(CAPTIONS))]
    # The kernels sum in different orders, and how far apart that leaves them depends on the CPU's BLAS: 2e-5 in
    # a map on an AMX Xeon, under 1e-5 on an AMD EPYC. Tokens must agree exactly.
    for kernel, got in results.items():
        for a, b in zip(results["linear"], got, strict=True):
            assert a.token_ids == b.token_ids and np.allclose(a.word_maps, b.word_maps, atol=atol(random_eos, 1e-4)), \
                kernel


def test_int8_fast_decoding_equals_generate_on_the_same_int8_model(tiny_dir):
    cap8 = captioner.load(tiny_dir, int8=True)
    assert decoding.unsupported(cap8.model, False) is None
    for num_beams in (1, 4):
        for k in range(len(CAPTIONS)):
            assert _fast(cap8, [image_for(k)], num_beams, 24) == _plain(cap8, [image_for(k)], num_beams, 24), k


def test_a_decoder_that_is_not_gpt2_decodes_through_generate(tmp_path):
    """A ViT + BERT captioner (manga-ocr's layout): the fast path says why not and `generate` decodes."""
    from transformers import BertConfig, ViTConfig, VisionEncoderDecoderConfig
    from captioner_train.architecture import image_processor, PRESETS
    from captioner_train.vocabulary import bpe_tokenizer

    tok = bpe_tokenizer(CAPTIONS * 4, vocab_size=300)
    cfg = PRESETS["tiny"]
    enc = ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                    image_size=cfg.image_size, patch_size=cfg.patch_size)
    dec = BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                     vocab_size=len(tok), is_decoder=True, add_cross_attention=True, pad_token_id=tok.pad_token_id)
    config = VisionEncoderDecoderConfig.from_encoder_decoder_configs(enc, dec)
    config.decoder_start_token_id, config.pad_token_id, config.eos_token_id = tok.bos_token_id, tok.pad_token_id, \
        tok.eos_token_id
    torch.manual_seed(0)
    model = VisionEncoderDecoderModel(config)
    model.generation_config.decoder_start_token_id = tok.bos_token_id
    model.generation_config.eos_token_id, model.generation_config.pad_token_id = tok.eos_token_id, tok.pad_token_id
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    image_processor(cfg).save_pretrained(tmp_path)
    cap = captioner.load(str(tmp_path))
    assert "BertLMHeadModel" in decoding.unsupported(cap.model, False)
    for method in captioner.METHODS:
        res = cap.caption(image_for(1), max_new_tokens=8, num_beams=3, method=method)
        assert res.token_ids == _plain(cap, [image_for(1)], 3, 8)[0]
        assert res.word_maps.shape == (len(res.words), *cap.grid) and np.isfinite(res.word_maps).all()


@pytest.mark.parametrize("method", ["attention", None])  # attention: the rows beam search recorded per image
def test_caption_batch_equals_caption(tiny, kernel, method):
    images = [image_for(k) for k in range(len(CAPTIONS))]
    batch = tiny.caption_batch(images, max_new_tokens=40, num_beams=3, method=method)
    for image, res in zip(images, batch):
        one = tiny.caption(image, max_new_tokens=40, num_beams=3, method=method)
        assert res.token_ids == one.token_ids and res.words == one.words
        assert np.allclose(res.word_maps, one.word_maps, atol=atol(tiny))
        assert np.allclose(res.cls_map, one.cls_map, atol=atol(tiny))
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
    pixels = _pixels(tiny, [image_for(1)]).cpu().float()  # `original` is fp32 on the CPU
    with torch.no_grad():
        assert torch.allclose(original(pixel_values=pixels, decoder_input_ids=ids).logits,
                              laid(pixel_values=pixels, decoder_input_ids=ids).logits, atol=1e-5)


def test_conv1d_to_linear_keeps_the_function(tiny, tiny_dir):
    original = VisionEncoderDecoderModel.from_pretrained(tiny_dir).eval()
    assert any(type(m).__name__ == "Conv1D" for m in original.modules())
    converted = conv1d_to_linear(copy.deepcopy(original))
    assert not any(type(m).__name__ == "Conv1D" for m in converted.modules())
    ids = torch.tensor([[original.config.decoder_start_token_id, 5, 9, 7]])
    pixels = _pixels(tiny, [image_for(1)]).cpu().float()  # `original` is fp32 on the CPU
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


def test_random_bpe_tokenizer_has_the_requested_size():
    tok = random_bpe_tokenizer(400, seed=3)
    assert len(tok) == 400
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id, tok.unk_token_id) == (0, 1, 2, 3)
    text = "a dog riding a skateboard, 42 ünïcode"
    assert tok.decode(tok(text, add_special_tokens=False).input_ids) == text
    with pytest.raises(ValueError, match="vocab_size"):
        random_bpe_tokenizer(100)


def test_a_forced_kernel_runs_every_product_of_the_decoding(random_tiny, monkeypatch):
    """`kernels.forced` is what the exact tests rely on: under it, decoding's products run on that kernel only."""
    calls = {"bmm": [], "packed": [], "onednn": []}
    split, packed, onednn = kernels.bmm_split, kernels.packed_linear, kernels.onednn_linear
    monkeypatch.setattr(kernels, "bmm_split", lambda *args: calls["bmm"].append(args) or split(*args))
    monkeypatch.setattr(kernels, "packed_linear", lambda *args: calls["packed"].append(args) or packed(*args))
    monkeypatch.setattr(kernels, "onednn_linear", lambda *args: calls["onednn"].append(args) or onednn(*args))
    for kernel in kernels.available():
        for seen in calls.values():
            seen.clear()
        with kernels.forced(kernel):
            random_tiny.caption(image_for(0), max_new_tokens=4, num_beams=2, method="attention")
        assert {name for name, seen in calls.items() if seen} == ({kernel} & set(calls)), kernel
    with pytest.raises(ValueError, match="kernel"):
        with kernels.forced("magic"):
            pass


def test_a_kernel_is_available_only_where_it_computes_a_product_right(monkeypatch):
    """`available()` lists a packed kernel only where this build has it and it runs: one that raises (an op the
    build declares but cannot run on this CPU) or computes a wrong product is left out; "linear" always stays."""
    assert kernels.available()[0] == "linear" and kernels.available("meta") == ("linear",)
    for name in ("onednn", "packed"):
        has = {"onednn": torch.backends.mkldnn.is_available(), "packed": torch.backends.mkl.is_available()}[name]
        assert (name in kernels.available()) == has == kernels._runs(name)
    saved = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)  # the trial product is fp32 whatever the process's default
    try:
        assert all(kernels._runs(name) for name in kernels.available())
    finally:
        torch.set_default_dtype(saved)
    if "onednn" in kernels.available():
        torch.backends.mkldnn.enabled = False  # a process that turned oneDNN off never gets it
        try:
            assert "onednn" not in kernels.available()
            with pytest.raises(ValueError, match="oneDNN"):
                kernels.Kernels(torch.nn.Linear(2, 2), force="onednn")
        finally:
            torch.backends.mkldnn.enabled = True
    def broken(*args):
        raise TypeError("another signature")
    monkeypatch.setattr(kernels, "onednn_linear", broken)
    assert not kernels._runs("onednn")
    monkeypatch.setattr(kernels, "bmm_split", lambda x, w, threads, bias=None: torch.zeros(x.shape[0], w.shape[0]))
    assert not kernels._runs("bmm")
