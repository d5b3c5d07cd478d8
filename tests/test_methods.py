"""Map methods (attention with layer/head choice, rollout, relevance) and the faithfulness measures."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from captioner import attention
from captioner_train import faithfulness
from captioner.relevance import relevance_rows
from conftest import image_for


@pytest.mark.parametrize("method", ["attention", "rollout", "relevance"])
def test_every_method_gives_maps_of_the_contract(tiny, method):
    res = tiny.caption(image_for(0), max_new_tokens=40, method=method)
    assert res.method == method
    assert res.word_maps.shape == (len(res.words), 4, 6) and res.cls_map.shape == (4, 6)
    for m in [*res.word_maps, res.cls_map]:
        assert m.dtype == np.float32 and m.min() == 0.0 and m.max() == pytest.approx(1.0)
    again = tiny.explain(image_for(0), res.text, method=method)
    assert np.allclose(again.word_maps, res.word_maps, atol=1e-5)


def test_methods_differ(tiny):
    maps = {m: tiny.explain(image_for(1), "a cat sitting under a wooden table", method=m).word_maps
            for m in ("attention", "rollout", "relevance")}
    assert not np.allclose(maps["attention"], maps["rollout"])
    assert not np.allclose(maps["attention"], maps["relevance"])


def test_layer_and_head_choice(tiny):
    image, text = image_for(2), "two giraffes standing near a tall tree"
    full = tiny.explain(image, text, method="attention")
    per_layer = [tiny.explain(image, text, method="attention", layers=[k]).token_maps for k in range(2)]
    assert np.allclose(full.token_maps, np.mean(per_layer, axis=0), atol=1e-6), "all layers = mean of layers"
    per_head = [tiny.explain(image, text, method="attention", head=h).token_maps for h in range(2)]
    assert np.allclose(full.token_maps, np.mean(per_head, axis=0), atol=1e-6), "no head = mean of heads"
    assert not np.allclose(per_head[0], per_head[1])
    with pytest.raises(ValueError, match="head"):
        tiny.explain(image, text, head=5)
    with pytest.raises(ValueError, match="layers"):
        tiny.explain(image, text, layers=[7])
    with pytest.raises(ValueError, match="method"):
        tiny.explain(image, text, method="gradcam")
    with pytest.raises(ValueError, match="every layer and head"):
        tiny.explain(image, text, method="relevance", layers=[0])


def test_rollout_of_identity_attention_leaves_maps_unchanged():
    N, H = 1 + 4 * 6, 2
    identity = tuple(torch.eye(N).expand(1, H, N, N) for _ in range(3))
    assert torch.allclose(attention.rollout(identity), torch.eye(N))
    rows = torch.rand(5, N)
    assert torch.allclose(rows @ attention.rollout(identity), rows)


def test_rollout_rows_are_distributions(tiny):
    with torch.no_grad():
        enc = tiny.model.encoder(pixel_values=tiny.pixel_values(image_for(0)), output_attentions=True)
    joint = attention.rollout(enc.attentions)
    assert torch.allclose(joint.sum(-1), torch.ones(joint.shape[0]), atol=1e-5)
    assert (joint >= 0).all()


def test_gradients_only_when_relevance_is_asked(tiny, monkeypatch):
    calls = []
    real = torch.autograd.grad
    monkeypatch.setattr(torch.autograd, "grad", lambda *a, **k: calls.append(1) or real(*a, **k))
    tiny.caption(image_for(0), method="attention")
    tiny.caption(image_for(0), method="rollout")
    assert not calls
    tiny.caption(image_for(0), method="relevance")
    assert calls


def test_relevance_batch_equals_one_word_at_a_time(tiny):
    """The batched backward (one target per row) must equal separate passes per word."""
    res = tiny.caption(image_for(3), max_new_tokens=40)
    with torch.no_grad():
        enc = tiny.model.encoder(pixel_values=tiny.pixel_values(image_for(3)), output_attentions=True)
    ids = torch.tensor([[tiny.start_token_id, *res.token_ids]], device=tiny.device)
    targets = torch.zeros(len(res.words), len(res.token_ids), device=tiny.device)
    for w, g in enumerate(res.word_tokens):
        targets[w, g] = 1
    r_ti, r_ii, logp = relevance_rows(tiny.model, enc, ids, targets)
    for w in (0, len(res.words) - 1):
        one_ti, one_ii, _ = relevance_rows(tiny.model, enc, ids, targets[w:w + 1])
        assert torch.allclose(r_ti[w], one_ti[0], atol=1e-5)
    assert (r_ti >= 0).all(), "relevance only accumulates positive contributions"
    probs = logp.exp().cpu().numpy()
    assert np.allclose([np.prod(probs[g]) for g in res.word_tokens], res.word_probs, atol=1e-4), \
        "the relevance pass's token probabilities are the caption's"


def test_remap_changes_maps_not_caption(tiny):
    res = tiny.caption(image_for(1), max_new_tokens=40)
    other = tiny.remap(res, "rollout")
    assert other.text == res.text and other.token_ids == res.token_ids and other.settings == res.settings
    assert other.method == "rollout" and not np.allclose(other.word_maps, res.word_maps)


def test_deletion_curve_and_randomisation(tiny):
    text = "a dog riding a skateboard on the street"
    order = np.arange(24)
    curve = faithfulness.deletion_curve(tiny, image_for(0), text, 4, order)
    assert curve.shape == (faithfulness.STEPS + 1,) and ((curve > 0) & (curve <= 1)).all()
    full = tiny.explain(image_for(0), text).word_probs[4]
    assert curve[0] == pytest.approx(full, rel=1e-4), "nothing removed: the word's own probability"
    assert faithfulness._spearman(np.arange(10.0), np.arange(10.0)) == pytest.approx(1.0)
    random_cap = faithfulness.randomised(tiny)
    assert not torch.allclose(random_cap.model.decoder.lm_head.weight, tiny.model.decoder.lm_head.weight)


def test_compare_methods_runs_on_scenes(random_tiny):
    results = faithfulness.compare_methods(random_tiny, n_scenes=1, seed_start=3, progress=False)
    assert set(results) == {"attention", "rollout", "relevance"}
    for r in results.values():
        assert 0 <= r.pointing <= 1 and r.words >= 1 and -1 <= r.rank_corr_random_weights <= 1
    assert "| relevance |" in faithfulness.methods_table(results)
