"""The rules README states for the maps, pinned against numbers worked out by hand from the papers' equations, so
that a wrong residual mix, layer order, clamp, normalisation or cross-attention term fails here."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from captioner import attention, relevance
from captioner.attention import normalise
from conftest import image_for


def _two_heads(mean: list[list[float]], spread: float = 0.1) -> torch.Tensor:
    """(1, 2, n, n) attention of two heads whose mean is `mean` (rows still sum to 1)."""
    m = torch.tensor(mean)
    shift = torch.zeros_like(m)
    shift[:, 0], shift[:, 1] = spread, -spread
    return torch.stack([m + shift, m - shift])[None]


A1 = [[0.2, 0.8], [0.6, 0.4]]  # layer 1, head mean; not symmetric, far from the identity
A2 = [[0.9, 0.1], [0.3, 0.7]]  # layer 2


def test_rollout_mixes_half_residual_and_multiplies_last_layer_on_the_left():
    # Â = 0.5 A + 0.5 I:  Â1 = [[0.6, 0.4], [0.3, 0.7]],  Â2 = [[0.95, 0.05], [0.15, 0.85]]
    # joint = Â2 Â1 = [[0.95*0.6 + 0.05*0.3, 0.95*0.4 + 0.05*0.7], [0.15*0.6 + 0.85*0.3, 0.15*0.4 + 0.85*0.7]]
    expected = torch.tensor([[0.585, 0.415], [0.345, 0.655]])
    joint = attention.rollout((_two_heads(A1), _two_heads(A2)))
    assert torch.allclose(joint, expected, atol=1e-6), joint
    # head=1 rolls out that head alone: Â1 = 0.5 (A1 - spread) + 0.5 I, and so on
    h1 = [torch.tensor(a) - torch.tensor([[0.1, -0.1], [0.1, -0.1]]) for a in (A1, A2)]
    hat = [0.5 * a + 0.5 * torch.eye(2) for a in h1]
    assert torch.allclose(attention.rollout((_two_heads(A1), _two_heads(A2)), head=1), hat[1] @ hat[0], atol=1e-6)


def test_rollout_pushes_a_cross_attention_row_through_the_encoder():
    row = torch.tensor([[0.25, 0.75]])  # a word's cross-attention over the two encoder tokens
    joint = attention.rollout((_two_heads(A1), _two_heads(A2)))
    # 0.25 * [0.585, 0.415] + 0.75 * [0.345, 0.655]
    assert torch.allclose(row @ joint, torch.tensor([[0.405, 0.595]]), atol=1e-6)


def test_relevance_weight_is_the_head_mean_of_the_positive_gradient_times_attention():
    attn = torch.tensor([[[[0.5, 0.5]], [[0.8, 0.2]]]])  # (1, H=2, q=1, k=2)
    grad = torch.tensor([[[[2.0, -1.0]], [[-1.0, 3.0]]]])
    # ∇A ⊙ A = [1.0, -0.5] and [-0.8, 0.6]; positive parts [1.0, 0] and [0, 0.6]; their mean:
    assert torch.allclose(relevance._weighted(attn, grad), torch.tensor([[[0.5, 0.3]]]))


def test_relevance_normalisation_removes_the_identity_renormalises_rows_and_puts_it_back():
    r = torch.tensor([[1.5, 0.5], [0.25, 1.0]])
    # R - I = [[0.5, 0.5], [0.25, 0]]; rows sum to 1.0 and 0.25 -> [[0.5, 0.5], [1, 0]]; + I:
    assert torch.allclose(relevance._normalised(r), torch.tensor([[1.5, 0.5], [1.0, 1.0]]))
    assert torch.equal(relevance._normalised(torch.eye(3)), torch.eye(3)), "nothing beyond I: stays I"


def test_encoder_relevance_accumulates_first_layer_first():
    a1, a2 = torch.tensor([[0.2, 0.1], [0.0, 0.3]]), torch.tensor([[0.1, 0.0], [0.2, 0.1]])
    # R = I + Ā1 = [[1.2, 0.1], [0, 1.3]];  R += Ā2 R = [[0.12, 0.01], [0.24, 0.15]]
    assert torch.allclose(relevance.encoder_relevance([a1, a2]), torch.tensor([[1.32, 0.11], [0.24, 1.45]]))


def test_decoder_relevance_self_then_cross_with_both_normalised_self_relevances():
    self1 = torch.tensor([[[0.2, 0.0], [0.4, 0.1]]])  # (B=1, T+1=2, T+1): causal
    cross1 = torch.tensor([[[0.3, 0.6], [0.5, 0.1]]])  # (1, 2, N=2)
    self2, cross2 = torch.tensor([[[0.1, 0.0], [0.3, 0.2]]]), torch.zeros(1, 2, 2)
    r_ii = torch.tensor([[1.5, 0.5], [0.25, 1.0]])  # R̂_ii = [[1.5, 0.5], [1, 1]] (test above)
    # layer 1: R_tt = I + self1 = [[1.2, 0], [0.4, 1.1]] -> R̂_tt = [[2, 0], [0.8, 1.2]]
    # R_ti = R̂_ttᵀ Ā R̂_ii = [[2, 0.8], [0, 1.2]] @ [[1.05, 0.75], [0.85, 0.35]] = [[2.78, 1.78], [1.02, 0.42]]
    one = relevance.decoder_relevance([self1], [cross1], r_ii)
    assert torch.allclose(one, torch.tensor([[[2.78, 1.78], [1.02, 0.42]]]), atol=1e-5), one
    # layer 2 (no cross-attention weight): R_ti += Ā_self R_ti = [[0.278, 0.178], [1.038, 0.618]]
    two = relevance.decoder_relevance([self1, self2], [cross1, cross2], r_ii)
    assert torch.allclose(two, torch.tensor([[[3.058, 1.958], [2.058, 1.038]]]), atol=1e-5), two
    with pytest.raises(AssertionError, match="cross-attention layers"):
        relevance.decoder_relevance([self1, self2], [cross1], r_ii)


def _reference_relevance(cap, image, text) -> tuple[np.ndarray, np.ndarray]:
    """README's relevance written out plainly: for each word its own forward and backward pass, gradients of that
    word's summed token log-probabilities (token k predicted by decoder row k) w.r.t. every decoder attention map;
    the encoder's relevance from its head-mean attention. -> (word maps, CLS map), normalised."""
    ids, groups = cap.tokenize(text)
    device = cap.device
    with torch.no_grad():
        enc = cap.model.encoder(pixel_values=cap.pixel_values(image), output_attentions=True)
    n = enc.attentions[0].shape[-1]
    r_ii = torch.eye(n, device=device)
    for a in enc.attentions:
        r_ii = r_ii + a[0].float().mean(0) @ r_ii

    def hat(r):
        bar = r - torch.eye(r.shape[-1], device=device)
        s = bar.sum(-1, keepdim=True)
        return torch.where(s > 0, bar / s, torch.zeros_like(bar)) + torch.eye(r.shape[-1], device=device)

    decoder_input_ids = torch.tensor([[cap.start_token_id, *ids]], device=device)
    words = []
    for g in groups:
        with torch.enable_grad():
            out = cap.model(encoder_outputs=(enc.last_hidden_state,), decoder_input_ids=decoder_input_ids,
                            output_attentions=True)
            logp = out.logits[0].float().log_softmax(-1)
            target = sum(logp[k, ids[k]] for k in g)  # row k predicts token k (input position k + 1)
            maps = (*out.decoder_attentions, *out.cross_attentions)
            grads = torch.autograd.grad(target, maps)
        bars = [(gr[0] * a[0].detach()).float().clamp(min=0).mean(0) for a, gr in zip(maps, grads)]
        L, t = len(out.decoder_attentions), len(ids) + 1
        r_tt, r_ti = torch.eye(t, device=device), torch.zeros(t, n, device=device)
        for s, c in zip(bars[:L], bars[L:]):
            r_tt = r_tt + s @ r_tt
            r_ti = r_ti + s @ r_ti
            r_ti = r_ti + hat(r_tt).T @ c @ hat(r_ii)
        words.append(r_ti[g].sum(0)[1:].cpu().numpy())
    gh, gw = cap.grid
    return normalise(np.stack(words).reshape(-1, gh, gw)), normalise(r_ii[0, 1:].cpu().numpy().reshape(gh, gw))


def test_relevance_maps_equal_the_rules_applied_one_word_at_a_time(tiny):
    text = "a dog riding a skateboard on the street"  # "skateboard" is several tokens
    res = tiny.explain(image_for(0), text, method="relevance")
    words, cls = _reference_relevance(tiny, image_for(0), text)
    atol = 1e-4 if tiny.model.dtype == torch.float32 else 2e-2
    np.testing.assert_allclose(res.word_maps, words, atol=atol)
    np.testing.assert_allclose(res.cls_map, cls, atol=atol)


def test_cls_map_reads_the_cls_query_row_of_the_chosen_layers_and_head(tiny):
    res = tiny.explain(image_for(1), "a cat sitting under a wooden table", method="attention", layers=[0], head=1)
    with torch.no_grad():
        enc = tiny.model.encoder(pixel_values=tiny.pixel_values(image_for(1)), output_attentions=True)
    row = enc.attentions[0][0, 1, 0, 1:].float().cpu().numpy()  # layer 0, head 1, CLS query, patch keys
    np.testing.assert_allclose(res.cls_map, normalise(row.reshape(tiny.grid)), atol=1e-5)
    both = tiny.explain(image_for(1), "a cat", method="attention", layers=[0, 1])
    rows = torch.stack([a[0, :, 0, 1:] for a in enc.attentions]).float().mean((0, 1)).cpu().numpy()
    np.testing.assert_allclose(both.cls_map, normalise(rows.reshape(tiny.grid)), atol=1e-5)
