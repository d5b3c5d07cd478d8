"""Reduced-precision decoder weights (`captioner.precision`, `load(..., precision=...)`): each layer against fp32
F.linear, what `load` replaces and what it leaves, the own loop against `generate` on the same reduced model, the
maps each precision allows, and the ways a precision is chosen (argument, CLI flag, environment) or refused."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers.pytorch_utils import Conv1D

import captioner
from captioner import precision
from captioner.__main__ import main
from conftest import CAPTIONS, image_for
from test_speed import _fast, _plain

BF16 = pytest.mark.skipif(not precision.bf16_supported(), reason="this CPU has no BF16 instructions")
REDUCED = {"bf16": precision.Bf16Linear, "int8": precision.Int8Linear}


def _float_layers(decoder: nn.Module) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
    """(weight (out, in), bias) of every decoder Linear / Conv1D, one per distinct shape."""
    by_shape = {}
    for m in decoder.modules():
        if type(m) in (nn.Linear, Conv1D):
            w = m.weight.detach().t() if isinstance(m, Conv1D) else m.weight.detach()
            by_shape.setdefault(tuple(w.shape), (w, None if m.bias is None else m.bias.detach()))
    return list(by_shape.values())


def _inputs(K: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(K)
    return [torch.randn(rows, K, generator=g) for rows in (1, 3, 4)] + [torch.randn(2, 3, K, generator=g)]


def _bound(x: torch.Tensor, w: torch.Tensor, weight_step: torch.Tensor | None) -> torch.Tensor:
    """Elementwise error bound of a product computed from bf16 x (and bf16 output): 2^-9 relative rounding of x,
    of w where it is bf16 and of the result, so 4 * 2^-9 of |x| @ |w|^T; plus, for int8 weights, half a
    quantisation step (`weight_step`, (N,)) times sum |x|."""
    bound = 4 * 2 ** -9 * (x.abs() @ w.abs().t()) + 1e-6
    return bound if weight_step is None else bound + x.abs().sum(-1, keepdim=True) * weight_step / 2


@pytest.mark.parametrize("packed", [False, True], ids=["F.linear", "packed"])
@BF16
def test_bf16_layer_equals_fp32_linear_within_bf16_rounding(tiny, monkeypatch, packed):
    """Every decoder weight shape of the tiny model, 1/3/4 rows and a 3-D input, both products."""
    monkeypatch.setattr(precision, "packed_wins", lambda w, rows: packed)
    for w, b in _float_layers(tiny.model.decoder):
        layer = precision.Bf16Linear(w, b)
        for x in _inputs(w.shape[1]):
            want, got = F.linear(x, w, b), layer(x)
            assert got.dtype == torch.float32 and got.shape == want.shape
            assert ((got - want).abs() <= _bound(x, w, None)).all(), (tuple(w.shape), tuple(x.shape))
            assert bool(layer.packs[min(x.reshape(-1, x.shape[-1]).shape[0], 16)] is not None) == packed


@pytest.mark.parametrize("act", [torch.bfloat16, torch.float32], ids=["bf16 x", "fp32 x"])
def test_int8_layer_equals_fp32_linear_within_half_a_quantisation_step(tiny, act):
    if act == torch.bfloat16 and not precision.bf16_supported():
        pytest.skip("this CPU has no BF16 instructions")
    for w, b in _float_layers(tiny.model.decoder):
        layer = precision.Int8Linear(w, b, act)
        step = w.abs().amax(1) / 127  # (N,)
        assert layer.weight.dtype == torch.int8 and layer.weight.shape == w.shape
        for x in _inputs(w.shape[1]):
            want, got = F.linear(x, w, b), layer(x)
            assert got.dtype == torch.float32 and got.shape == want.shape
            assert ((got - want).abs() <= _bound(x, w, step)).all(), (tuple(w.shape), tuple(x.shape))


@pytest.mark.parametrize("name", [pytest.param("bf16", marks=BF16), "int8"])
def test_load_with_a_precision_replaces_the_decoder_layers_and_leaves_the_encoder(tiny, tiny_dir, name):
    cap = captioner.load(tiny_dir, precision=name)
    float_layers = [n for n, m in tiny.model.decoder.named_modules() if type(m) in (nn.Linear, Conv1D)]
    assert [n for n, m in cap.model.decoder.named_modules() if isinstance(m, REDUCED[name])] == float_layers
    assert not any(type(m) in (nn.Linear, Conv1D) for m in cap.model.decoder.modules())
    assert [type(m) for m in cap.model.encoder.modules()] == [type(m) for m in tiny.model.encoder.modules()]
    fp32 = tiny.model.encoder.state_dict()
    assert all(torch.equal(t, fp32[k]) for k, t in cap.model.encoder.state_dict().items())
    assert cap.name.endswith({"bf16": "(bf16)", "int8": "(int8 weights)"}[name])


@pytest.mark.parametrize("name", [pytest.param("bf16", marks=BF16), "int8"])
def test_own_loop_equals_generate_on_the_same_reduced_model(tiny_dir, name):
    cap = captioner.load(tiny_dir, precision=name)
    for num_beams in (1, 4):
        for k in range(len(CAPTIONS)):
            assert _fast(cap, [image_for(k)], num_beams, 24) == _plain(cap, [image_for(k)], num_beams, 24), k


@BF16
def test_bf16_keeps_relevance_maps_close_to_fp32(tiny, tiny_dir, monkeypatch):
    """bf16 layers are differentiable: relevance stays the default and maps nearly what fp32 maps (relevance
    amplifies bf16's rounding, so not to rounding's tolerance). The packed product wherever it may run, so that
    relevance must avoid it (it has no backward: gradients would silently stop there)."""
    monkeypatch.setattr(precision, "packed_wins", lambda w, rows: True)
    cap = captioner.load(tiny_dir, precision="bf16")
    assert cap.default_method == "relevance"
    for text in (CAPTIONS[0], "a dog riding"):  # over and under PACK_ROWS tokens
        want, got = tiny.explain(image_for(0), text), cap.explain(image_for(0), text)
        assert got.method == "relevance" and np.abs(got.word_maps - want.word_maps).mean() < 0.1, text
        assert min(np.corrcoef(a.ravel(), b.ravel())[0, 1] for a, b in zip(want.word_maps, got.word_maps)) > 0.8


def test_int8_weights_default_to_attention_maps_and_refuse_relevance(tiny_dir):
    cap = captioner.load(tiny_dir, precision="int8")
    assert cap.default_method == "attention" and cap.caption(image_for(0)).method == "attention"
    with pytest.raises(ValueError, match="gradients"):
        cap.explain(image_for(0), CAPTIONS[0], method="relevance")


def test_the_cli_flag_and_the_environment_variable_choose_the_precision(tiny_dir, tmp_path, monkeypatch):
    """`--precision int8` names the model "(int8 weights)" in every line; without it `$CAPTIONER_PRECISION` does."""
    from PIL import Image
    Image.fromarray(image_for(0)).save(tmp_path / "a.png")
    for args, env in ((["--precision", "int8"], None), ([], "int8")):
        if env:
            monkeypatch.setenv("CAPTIONER_PRECISION", env)
        out = tmp_path / f"{env}.jsonl"
        assert main(["caption", str(tmp_path / "a.png"), "--out", str(out), "--model", tiny_dir, "--maps", "none",
                     "--no-progress", *args]) == 0
        assert json.loads(out.read_text())["model"].endswith("(int8 weights)"), args
    assert isinstance(captioner.load(tiny_dir).model.decoder.lm_head, precision.Int8Linear)
    monkeypatch.setenv("CAPTIONER_PRECISION", "fp32")
    assert type(captioner.load(tiny_dir).model.decoder.lm_head) is nn.Linear


def test_a_precision_this_machine_cannot_run_is_refused_with_what_to_use(tiny_dir, monkeypatch):
    with pytest.raises(ValueError, match="fp32, bf16, int8"):
        captioner.load(tiny_dir, precision="fp16")
    monkeypatch.setenv("CAPTIONER_PRECISION", "int4")
    with pytest.raises(ValueError, match="int4"):
        captioner.load(tiny_dir)
    with pytest.raises(ValueError, match="exclude each other"):
        captioner.load(tiny_dir, int8=True, precision="bf16")
    with pytest.raises(ValueError, match="device='cpu'"):
        captioner.load(tiny_dir, device="cuda", precision="int8")
    monkeypatch.setattr(precision, "bf16_supported", lambda: False)
    with pytest.raises(ValueError, match="precision='int8'"):
        captioner.load(tiny_dir, precision="bf16")
    layer = captioner.load(tiny_dir, precision="int8").model.decoder.lm_head
    assert layer.act_dtype == torch.float32, "int8 weights meet fp32 activations on a CPU without BF16"


def test_the_bench_lists_a_refused_option_with_the_reason(tiny, tiny_dir, monkeypatch):
    """On a CPU without BF16 instructions the bench's precision table names bf16 with load's reason."""
    from captioner_train import bench
    monkeypatch.setattr(precision, "bf16_supported", lambda: False)
    monkeypatch.setattr(bench, "PRECISIONS", (("bf16", {"precision": "bf16"}),))
    (row,) = bench._precisions(tiny_dir, tiny, [image_for(0)])
    assert row.option == "bf16" and "BF16 instructions" in row.refused and row.n == 0
