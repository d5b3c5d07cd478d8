"""The bench (`python -m captioner_train.bench`): its figures, the tables and lines it writes from them, and the
arithmetic of the physical floor (`captioner_train.floors`). No timing assertions: the bench prints the speeds."""
from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from captioner import precision
from captioner_train import bench, floors, report
from conftest import CAPTIONS, image_for

BANDWIDTH = [2e9, 5e9, 3e9]  # bytes/s: given samples, so that no test times a 1 GiB sum


def _gpt2_weights(cfg) -> tuple[int, int]:
    """Weights (count) a GPT-2 decoding step multiplies by, from the config alone: per layer the self-attention's
    qkv and output projections, the cross-attention's query, key/value and output projections, the MLP's two; then
    the LM head. Returns (all of them, the cross-attention key/value projections alone)."""
    d, inner = cfg.n_embd, cfg.n_inner or 4 * cfg.n_embd
    cross_kv = d * 2 * d
    layer = d * 3 * d + d * d + d * d + cross_kv + d * d + d * inner + inner * d
    return cfg.n_layer * layer + cfg.vocab_size * d, cfg.n_layer * cross_kv


def test_bytes_per_step_are_the_decoder_weights_with_and_without_the_cross_kv_projection(tiny):
    """Every Linear / Conv1D weight in fp32, LM head included; without the cross K/V projection on request. On a
    tiny GPT-2 as transformers builds it (Conv1D), the tiny captioner's decoder, and GPT-2 small (no weights)."""
    tiny_gpt2 = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=2, n_inner=80, vocab_size=97,
                                           n_positions=16, add_cross_attention=True))
    with torch.device("meta"):  # shapes only: GPT-2 small's 600 MB are never allocated
        small = GPT2LMHeadModel(GPT2Config(add_cross_attention=True))
    for decoder in (tiny_gpt2, tiny.model.decoder, small):
        weights, cross_kv = _gpt2_weights(decoder.config)
        assert floors.decoder_weight_bytes(decoder) == 4 * weights
        assert floors.decoder_weight_bytes(decoder, cross_kv=False) == 4 * (weights - cross_kv)
    assert round(floors.decoder_weight_bytes(small) / 1e6, 1) == 607.4, "the full-size model's step"
    assert round(floors.decoder_weight_bytes(small, cross_kv=False) / 1e6, 1) == 550.8


def test_physical_floor_is_the_encoder_plus_each_steps_weight_reads_at_the_best_bandwidth():
    assert floors.physical_floor(0.25, 16, 600_000_000, 20e9) == pytest.approx(0.25 + 16 * 0.03)
    assert floors.physical_floor(0.0, 11, 4_000_000, 8e9) == pytest.approx(11 * 0.0005)
    assert [floors.steps_decoded(t, 16) for t in (10, 15, 16)] == [11, 16, 16], "the EOS step counts, up to 16"


def test_best_bandwidth_is_the_best_sample_and_each_sample_its_best_pass(monkeypatch):
    assert floors.best_bandwidth(BANDWIDTH) == 5e9
    with pytest.raises(ValueError, match="sample"):
        floors.best_bandwidth([])
    clock = iter([0.0, 0.2, 1.0, 1.1, 2.0, 2.4])  # passes of 0.2, 0.1 and 0.4 s
    monkeypatch.setattr(floors, "time", SimpleNamespace(perf_counter=lambda: next(clock)))
    sampler = floors.ReadBandwidth(nbytes=4096, passes=3)
    assert sampler.sample() == pytest.approx(4096 / 0.1) and sampler.samples == [pytest.approx(40960)]


def test_bench_figures_and_the_markdown_tables_written_from_them(tiny, tiny_dir, tmp_path, monkeypatch):
    """`bench_model` on the tiny model (one timed run a side), and the file `--markdown` writes: the header, then
    tables whose cells are the returned figures, the physical floor computed here from its parts."""
    monkeypatch.setattr(bench, "NEW_TOKENS", 40)  # room for the tiny captions' EOS, so that steps < NEW_TOKENS
    images = [image_for(k) for k in range(len(CAPTIONS))]
    figures, cap = bench.bench_model("tiny", tiny_dir, images[0], images[:2], images[:3], 1, CAPTIONS[0])
    assert [row.mode for row in figures.decoding] == ["beam 4", "greedy"]
    assert all(row.comparison.same for row in figures.decoding), "caption() decodes generate's tokens"
    assert figures.decoded_by == "captioner's own loop (fastdecode)" and figures.kernels
    assert (figures.maps.words, figures.batch.n) == (len(CAPTIONS[0].split()), 3)
    assert [(q.option, q.n if not q.refused else 0) for q in figures.precision] == [
        (option, 2 if option != "bf16" or precision.bf16_supported() else 0) for option, _ in bench.PRECISIONS]
    weights, cross_kv = _gpt2_weights(cap.model.decoder.config)
    assert (figures.step_bytes, figures.step_bytes_no_cross) == (4 * weights, 4 * (weights - cross_kv))
    figures.cold = bench.ColdStart(1.5, 0.5, 0.25, 0.75, 321.0)  # a fresh interpreter is too slow for this suite
    figures.precision.append(bench.PrecisionFigures("fp8", refused="this CPU has no FP8 instructions"))
    results = bench.Bench(threads=torch.get_num_threads(), repeats=1, models=[figures],
                          click_ms=bench.click_ms(cap.caption(images[0]), clicks=2), bandwidth=BANDWIDTH)
    command = f"python -m captioner_train.bench --markdown {tmp_path / 'bench.md'}"
    report.write_markdown(tmp_path / "bench.md", command, bench.markdown_tables(results))
    text = (tmp_path / "bench.md").read_text()
    assert text.splitlines()[0] == report.header(command)
    rows = report.table_rows(text)
    assert ["model", "mode", "first answer (s)", "kernel floor (s)", "physical floor (s)", "first answer / physical",
            "kernel floor / physical", "encoder (s)", "encoder share", "stock encoder (s)", "own encoder (s)", "steps",
            "same"] in rows
    for row in figures.decoding:
        c, f = row.comparison, row.floor
        assert f.steps == c.tokens + 1 < bench.NEW_TOKENS, "the tiny captions end by EOS: their steps, EOS's too"
        assert 0 < f.encoder < f.floor and f.encoder <= max(f.stock_encoder, f.own_encoder)
        assert min(f.stock_encoder, f.own_encoder) > 0, "both encoders are timed; the floors take the faster"
        assert ["tiny", row.mode, f"{c.plain:.3f}", f"{c.ours:.3f}", f"{c.plain / c.ours:.2f}x", "yes",
                f"{f.floor:.3f}", f"{c.ours / f.floor:.2f}x", f"{f.linear:.3f}", f"{c.full:.3f}", str(c.tokens),
                str(c.words)] in rows
        assert c.full > 0, "the default map's time is measured"
        p = f.encoder + f.steps * 4 * weights / 5e9
        assert ["tiny", row.mode, f"{c.ours:.3f}", f"{f.floor:.3f}", f"{p:.3f}", f"{c.ours / p:.2f}x",
                f"{f.floor / p:.2f}x", f"{f.encoder:.3f}", f"{f.encoder / p:.0%}", f"{f.stock_encoder:.3f}",
                f"{f.own_encoder:.3f}", str(f.steps), "yes"] in rows
    assert ["tiny", f"{4 * weights / 1e6:.1f}", f"{4 * (weights - cross_kv) / 1e6:.1f}", "5.0", "2.0-5.0",
            "3"] in rows
    k = figures.check
    assert k.images == 1 + 3 * 3 and ["tiny", str(k.images), f"{k.check:.3f}", f"{k.caption:.3f}",
                                      f"{k.check / k.caption:.2f}x"] in rows
    printed = bench.text_report(results)
    assert f"tiny: map check of one word ({k.images} images, one batch) {k.check:.3f} s" in printed
    assert "best 5.0 GB/s, samples 2.0-5.0 GB/s (3 samples)" in printed
    assert f"{4 * weights / 1e6:.1f} MB with the cross K/V projection" in printed
    m, b = figures.maps, figures.batch
    assert ["tiny", m.method, str(m.words), f"{m.explain:.3f}", f"{m.explain_attention:.3f}",
            f"{m.explain / m.explain_attention:.2f}x", f"{m.caption:.3f}", f"{m.caption_attention:.3f}",
            f"{m.caption / m.caption_attention:.2f}x"] in rows
    for q in figures.precision:
        if q.refused:
            assert ["tiny", q.option, *["–"] * 7, q.refused] in rows
            assert f"tiny: {q.option} not run: {q.refused}" in printed
            continue
        assert ["tiny", q.option, f"{q.fp32:.3f}", f"{q.reduced:.3f}", f"{q.fp32 / q.reduced:.2f}x", f"{q.agree:.1%}",
                f"{q.tokens:.1%}", f"{q.exact:.0%}", "2", ""] in rows
        assert f"tiny: {q.option} beam 4 caption()+maps {q.reduced:.3f} s vs fp32 {q.fp32:.3f} s" in printed
    assert ["tiny", f"{b.single:.2f}", f"{b.batched:.2f}", f"{b.batched / b.single:.2f}x", f"{b.same:.0%}", "3"] in rows
    assert ["tiny", "1.5", "0.5", "0.2", "0.75", "321"] in rows and ["1024x1024", f"{results.click_ms:.1f}"] in rows
    assert ["tiny", figures.decoded_by, "; ".join(figures.kernels)] in rows


def test_bench_command_writes_the_tables_of_the_figures_it_returns(tiny_dir, tmp_path, monkeypatch, capsys):
    """`python -m captioner_train.bench --markdown FILE` with the tiny model in both places: the file is the header
    with the exact command, then the tables of the very figures the command returns; the read bandwidth is sampled
    before every timed round of the decoding comparisons."""
    # a fresh interpreter per model is too slow for this suite; its figures are fixed instead
    monkeypatch.setattr(bench, "cold_start", lambda *a: bench.ColdStart(2.0, 1.0, 0.5, 0.5, 100.0))
    # scenes whose captions the tiny model can read (a scene caption is longer than its 39 tokens)
    monkeypatch.setattr(bench, "make_scene", lambda seed: SimpleNamespace(image=image_for(seed % 4),
                                                                         caption=CAPTIONS[seed % 4]))
    monkeypatch.setattr(floors, "SAMPLE_BYTES", 1 << 20)  # 1 MiB: the same code, not the 1 GiB
    argv = ["--model", tiny_dir, "--full-size-dir", tiny_dir, "--repeats", "1", "--markdown", str(tmp_path / "b.md")]
    results = bench.main(argv)
    assert [m.label for m in results.models] == ["vit-gpt2 size (random)", Path(tiny_dir).name[-22:]]
    assert len(results.bandwidth) == 2 * 2 * 1 and results.passes == floors.PASSES, "models x modes x repeats"
    command = "python -m captioner_train.bench " + " ".join(argv)
    assert (tmp_path / "b.md").read_text() == report.markdown(command, bench.markdown_tables(results))
    assert bench.text_report(results) in capsys.readouterr().out
