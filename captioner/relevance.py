"""Gradient-weighted relevance (Chefer, Gur & Wolf, ICCV 2021, "Generic Attention-model Explainability for
Interpreting Bi-Modal and Encoder-Decoder Transformers"), for a ViT encoder and a GPT-2 decoder.

For one target (a word's log-probability) every attention map A gets the weight Ā = mean_heads((∇A ⊙ A)⁺):
attention that raised the target counts, attention that lowered it does not. Relevance then flows as in the
paper: encoder self-attention R_ii += Ā R_ii; decoder self-attention R_tt += Ā R_tt and R_ti += Ā R_ti; decoder
cross-attention R_ti += R̂_ttᵀ Ā R̂_ii, where R̂ is R with its identity removed, rows renormalised and the
identity put back (the paper's normalisation of self-attention relevance before a bi-modal layer).

Gradients are needed, so this runs only when a person asks for it, never for plain captioning. All words are
computed in one batched forward/backward pass: batch element w carries word w's target, and since batch
elements do not interact, the gradient of the sum is every word's own gradient.
"""
from __future__ import annotations

import torch


def _weighted(attn: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """Ā = mean over heads of (∇A ⊙ A)⁺: (B, H, q, k) -> (B, q, k)."""
    return (grad * attn).clamp(min=0).mean(1)


def _normalised(r: torch.Tensor) -> torch.Tensor:
    """R̂ = rownorm(R - I) + I for (B, n, n); rows with no relevance beyond the identity stay the identity."""
    eye = torch.eye(r.shape[-1], dtype=r.dtype)
    bar = r - eye
    sums = bar.sum(-1, keepdim=True)
    return torch.where(sums > 0, bar / sums.clamp(min=1e-12), torch.zeros_like(bar)) + eye


def relevance_rows(model, pixel_values: torch.Tensor, decoder_input_ids: torch.Tensor,
                   targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Relevance of each encoder token for each target.

    pixel_values (1, 3, h, w); decoder_input_ids (1, T+1) = [start] + T caption tokens; targets (B, T) 0/1,
    row b selects the tokens whose summed log-probability is target b.
    Returns (R_ti (B, T+1, N): relevance of encoder tokens for each decoder position, where position k holds
    the query that predicted caption token k; R_ii (B, N, N): encoder self-relevance).
    """
    B, T = targets.shape
    ids = decoder_input_ids.expand(B, -1)  # (B, T+1)
    with torch.enable_grad():
        enc = model.encoder(pixel_values=pixel_values.expand(B, -1, -1, -1), output_attentions=True)
        out = model(encoder_outputs=(enc.last_hidden_state,), decoder_input_ids=ids, output_attentions=True)
        logp = out.logits[:, :-1].float().log_softmax(-1)  # (B, T, V): row k predicts caption token k
        token_logp = logp.gather(-1, ids[:, 1:, None])[..., 0]  # (B, T)
        target = (token_logp * targets.to(token_logp.dtype)).sum()
        maps = (*enc.attentions, *out.decoder_attentions, *out.cross_attentions)
        grads = torch.autograd.grad(target, maps)
    L_enc, L_dec = len(enc.attentions), len(out.decoder_attentions)
    weighted = [_weighted(a.detach().float(), g.float()) for a, g in zip(maps, grads)]
    enc_w, self_w, cross_w = weighted[:L_enc], weighted[L_enc:L_enc + L_dec], weighted[L_enc + L_dec:]
    N, Tq = enc_w[0].shape[-1], ids.shape[1]
    r_ii = torch.eye(N).expand(B, N, N).clone()  # (B, N, N)
    for a in enc_w:
        r_ii = r_ii + a @ r_ii
    r_tt = torch.eye(Tq).expand(B, Tq, Tq).clone()  # (B, T+1, T+1)
    r_ti = torch.zeros(B, Tq, N)  # (B, T+1, N)
    r_ii_hat = _normalised(r_ii)
    for self_a, cross_a in zip(self_w, cross_w):  # GPT-2 block order: self-attention, then cross-attention
        r_tt = r_tt + self_a @ r_tt
        r_ti = r_ti + self_a @ r_ti
        r_ti = r_ti + _normalised(r_tt).transpose(-1, -2) @ cross_a @ r_ii_hat
    return r_ti, r_ii
