"""Map methods measured against the library's three before any is adopted (`evaluate --methods ... gradxinput
decoder-relevance`).

- `gradient_x_input`: per patch, the positive part of ⟨∂ log p(word) / ∂e, e⟩ at the patch embeddings e (the ViT's
  patch projection, before positions and attention): the input-side attribution of Simonyan et al. / Shrikumar et
  al., with no attention in it. One backward per word through the whole model.
- `decoder_relevance`: Chefer et al.'s relevance stopped at the encoder's output tokens (R_ii = I): the gradient-
  weighted cross-attention the decoder propagates, without the encoder's mixing. Sharper by construction; whether
  it stays faithful to the pixels is what the deletion curve says.

Each takes (cap, image, text) and returns (W, gh, gw) word maps in [0, 1], like `Captioner.explain(...).word_maps`.
"""
from __future__ import annotations

import numpy as np
import torch

from captioner import attention
from captioner.forcing import decoder_input, token_log_probs
from captioner.maps import relevance_maps
from captioner.pipeline import Captioner


def gradient_x_input(cap: Captioner, image, text: str) -> np.ndarray:
    ids, groups = cap.tokenize(text)
    pixel_values = cap.pixel_values(image)  # (1, 3, h, w)
    seen = []
    hook = cap.model.encoder.embeddings.patch_embeddings.register_forward_hook(lambda m, a, out: seen.append(out))
    try:
        with torch.enable_grad():
            dec = decoder_input(cap.start_token_id, ids, cap.device)  # (1, T+1)
            logits = cap.model(pixel_values=pixel_values, decoder_input_ids=dec).logits
            logp = token_log_probs(logits, dec)[0]  # (T,)
            e = seen[-1]  # (1, gh*gw, D)
            maps = []
            for g in groups:
                grad = torch.autograd.grad(logp[g].sum(), e, retain_graph=True)[0]  # (1, gh*gw, D)
                maps.append((grad * e.detach()).sum(-1)[0].clamp(min=0).float().reshape(cap.grid).cpu().numpy())
    finally:
        hook.remove()
    return attention.normalise(np.stack(maps)) if maps else np.zeros((0, *cap.grid), np.float32)


def decoder_relevance(cap: Captioner, image, text: str) -> np.ndarray:
    ids, groups = cap.tokenize(text)
    with torch.no_grad():
        enc = cap.model.encoder(pixel_values=cap.pixel_values(image), output_attentions=True)
    return relevance_maps(cap.model, enc, cap.start_token_id, ids, groups, cap.layout, through_encoder=False).words


CANDIDATES = {"gradxinput": gradient_x_input, "decoder-relevance": decoder_relevance}
