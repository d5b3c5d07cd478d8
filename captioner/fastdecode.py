"""Greedy and beam-search decoding for ViT + GPT-2 captioners: the tokens `generate` gives, in less time, together
with the cross-attention and log-probability that produced each token (so a caption needs no second pass for its
attention maps). `decoding` decides when this loop reproduces `generate` and cuts its output at EOS.

Why a loop of our own: `generate` expands the encoder output to one copy per beam, computes every layer's
cross-attention keys and values on each copy, and reorders all of them every step, though all beams of an image
read the same encoder output. Here each layer's cross-attention K/V are computed once per image and never move:
the beams of an image are the query rows of one attention call against them. Only the small self-attention cache
follows the beams. Each step also keeps its cross-attention probabilities and log-probabilities per row, with the
row each beam came from, so the winning caption's own attention is read back at the end by following those links.
Every product with a weight goes through `kernels` (the kernel timed fastest on this machine).

The bookkeeping is a transcription of transformers 5.23's `_beam_search` (top 2*beams continuations, finished
hypotheses scored by sum(logp) / length**length_penalty, its early-stopping heuristic) and of greedy `_sample`,
down to the order of the `topk` calls, so ties break the same way. The GPT-2 blocks run through their own
submodules (`c_attn`, `q_attn`, `c_proj`, `mlp`, layer norms); layers that are not float nn.Linear / Conv1D
(int8) are simply called, so a quantised model decodes here unchanged.
"""
from __future__ import annotations

import math
import weakref
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GPT2LMHeadModel
from transformers.activations import NewGELUActivation

from .kernels import Kernels, kernels_for

# Per image, as decoding left it: (tokens after the start token, EOS and anything after it included;
# cross-attention (L, H, T, N) of the query that produced each token; log-probability (T,) of each token)
Steps = tuple[list[int], torch.Tensor, torch.Tensor]

@torch.no_grad()
def cross_keys_values(model, encoder_hidden: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]] | None:
    """Each decoder layer's cross-attention keys and values for encoder outputs (B, N, D): L pairs of (B, H, N, hd),
    computed once per image and shared by all its beams. None when
    the decoder is not a GPT-2 with cross-attention."""
    dec = getattr(model, "decoder", None)
    if not isinstance(dec, GPT2LMHeadModel) or not dec.config.add_cross_attention:
        return None
    cfg = dec.config
    if model.encoder.config.hidden_size != cfg.hidden_size and \
            getattr(cfg, "cross_attention_hidden_size", None) is None:
        encoder_hidden = model.enc_to_dec_proj(encoder_hidden)  # as VisionEncoderDecoderModel.forward does
    B, N, _ = encoder_hidden.shape
    H, hd = cfg.n_head, cfg.n_embd // cfg.n_head
    if model not in _CROSS_KERNELS:  # the projections multiply every patch: timed and packed on their own
        _CROSS_KERNELS[model] = Kernels(nn.ModuleList(block.crossattention.c_attn for block in dec.transformer.h))
    linear, rows = _CROSS_KERNELS[model].linear, encoder_hidden.reshape(B * N, -1)  # (B*N, D_enc)
    cross = []
    for block in dec.transformer.h:
        k, v = linear(rows, block.crossattention.c_attn).view(B, N, -1).split(cfg.n_embd, dim=2)  # (B, N, D) each
        cross.append((k.view(B, N, H, hd).transpose(1, 2), v.view(B, N, H, hd).transpose(1, 2)))
    return cross


_CROSS_KERNELS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> Kernels of its cross K/V


def _norm(ln: nn.LayerNorm):
    """x -> ln(x) without the module call (a step makes 37 of them)."""
    shape, w, b, eps = ln.normalized_shape, ln.weight, ln.bias, ln.eps
    return lambda x: F.layer_norm(x, shape, w, b, eps)


def _activation(act: nn.Module):
    """GPT-2's "gelu_new" (tanh GELU written out in 8 tensor ops) as torch's one fused op; any other as is."""
    return partial(F.gelu, approximate="tanh") if isinstance(act, NewGELUActivation) else act


class _GPT2Steps:
    """One GPT-2 decoding step at a time for R rows (beams of B images), with its own self-attention cache.

    Row r belongs to image r // (R // B): rows of an image are contiguous, so its beams' cross-attention is one
    batched product (B*H, R/B, hd) x (B*H, hd, N) against K/V computed once. Each step's cross-attention
    probabilities are kept in `attn` ((L, B, H, R/B, N) per step, rows as they were at that step; `row_attention`
    reads one row back).
    """

    def __init__(self, model, cross: list[tuple[torch.Tensor, torch.Tensor]], max_rows: int, max_len: int):
        dec = model.decoder
        self.gpt, self.lm_head = dec.transformer, dec.lm_head
        self.linear = kernels_for(model).linear
        self.H, self.D = dec.config.n_head, dec.config.n_embd
        self.hd = self.D // self.H
        # per layer K^T (B*H, hd, N) and V (B*H, N, hd), contiguous (a batched product copies strided operands on
        # every call), and the scaling of the scores. A scaling that is a power of two (GPT-2's 1/8 for 64-wide
        # heads) is applied to K^T once: scaling by a power of two is exact, so the scores are eager's to the bit;
        # any other is applied to the scores, as eager does
        self.B, N = cross[0][0].shape[0], cross[0][0].shape[2]
        self.cross = []
        for (k, v), block in zip(cross, self.gpt.h):
            scaling = block.crossattention.scaling
            exact = math.frexp(scaling)[0] == 0.5  # a power of two
            kt = (k.transpose(-1, -2) * scaling if exact else k.transpose(-1, -2)).reshape(-1, self.hd, N)
            self.cross.append((kt.contiguous(), v.reshape(-1, N, self.hd).contiguous(), None if exact else scaling))
        like = cross[0][0]
        L = len(self.gpt.h)
        self.cache = like.new_empty(L, 2, max_rows, self.H, max_len, self.hd)  # (L, keys/values, R, H, T, hd)
        self.layers = [(_norm(b.ln_1), b.attn.c_attn, b.attn.scaling, b.attn.c_proj, _norm(b.ln_cross_attn),
                        b.crossattention.q_attn, b.crossattention.c_proj, _norm(b.ln_2), b.mlp.c_fc,
                        _activation(b.mlp.act), b.mlp.c_proj) for b in self.gpt.h]  # what a step calls, per layer
        self.ln_f = _norm(self.gpt.ln_f)
        self.attn: list[torch.Tensor] = []  # per step (L, B, H, R/B, N)
        self.t = 0  # tokens already in the cache

    def step(self, ids: torch.Tensor) -> torch.Tensor:
        """Next-token logits (R, V) float32 for token ids (R,) at position self.t."""
        R, t, H, hd, D, B, linear = ids.shape[0], self.t, self.H, self.hd, self.D, self.B, self.linear
        x = self.gpt.wte(ids) + self.gpt.wpe.weight[t]  # (R, D)
        probs = []
        for (ln_1, c_attn, scaling, c_proj, ln_cross, q_attn, cross_proj, ln_2, c_fc, act, mlp_proj), \
                (ckt, cv, cross_scaling), cache in zip(self.layers, self.cross, self.cache):
            qkv = linear(ln_1(x), c_attn)  # (R, 3D): queries, keys, values
            cache[:, :R, :, t] = qkv[:, D:].view(R, 2, H, hd).transpose(0, 1)  # (2, R, H, hd) into (2, R, H, T, hd)
            a = F.scaled_dot_product_attention(qkv[:, :D].view(R, H, 1, hd), cache[0, :R, :, :t + 1],
                                               cache[1, :R, :, :t + 1], scale=scaling)  # (R, H, 1, hd)
            x += linear(a.view(R, D), c_proj)
            q = linear(ln_cross(x), q_attn).view(B, R // B, H, hd).transpose(1, 2)  # (B, H, R/B, hd): an image's beams
            scores = torch.bmm(q.reshape(B * H, R // B, hd), ckt)  # (B*H, R/B, N)
            p = (scores if cross_scaling is None else scores * cross_scaling).softmax(-1)  # as eager
            probs.append(p)
            a = torch.bmm(p, cv).view(B, H, R // B, hd).transpose(1, 2)  # (B, R/B, H, hd)
            x += linear(a.reshape(R, D), cross_proj)  # (R, D)
            x += linear(act(linear(ln_2(x), c_fc)), mlp_proj)  # dropout: eval, none
        self.attn.append(torch.stack(probs).view(len(probs), B, H, R // B, -1))  # (L, B, H, R/B, N)
        self.t += 1
        return linear(self.ln_f(x), self.lm_head).float()  # (R, V)

    def row_attention(self, step: int, row: int) -> torch.Tensor:
        """The cross-attention (L, H, N) of decoder row `row` at step `step`."""
        a = self.attn[step]  # (L, B, H, R/B, N)
        per_image = a.shape[3]
        return a[:, row // per_image, :, row % per_image]

    def reorder(self, rows: torch.Tensor) -> None:
        """Row i of the cache becomes old row rows[i] (beams that survived, possibly duplicated)."""
        if any(r != i for i, r in enumerate(rows.tolist())):  # a row continues another row's history
            kept = self.cache[:, :, :len(rows), :, :self.t]  # (L, 2, R, H, t, hd)
            kept.copy_(kept.index_select(2, rows))  # index_select copies before the write


def _topk(logp: torch.Tensor, running_scores: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`torch.topk((logp.expand(B, nb, V) + running_scores[:, :, None]).reshape(B, nb * V), k)` for log-probabilities
    logp (B, rows, V) (rows: nb, or 1 when all beams are one row) and beam scores (B, nb): the same values and
    indices, found from each row's own k+1 best first (a row at a time is several times faster on a 50k-word
    vocabulary), the beam score added to those alone (the same fp32 sum as on the whole row; a sum never reorders
    a row, at most ties two of it). When two of the k+1 best are equal, the order among them is the kernel's
    choice, so the plain call over the whole sum decides."""
    (B, rows, V), nb = logp.shape, running_scores.shape[1]
    if k + 1 <= V:
        v, i = torch.topk(logp, k + 1)  # (B, rows, k+1), i within a row
        v = v.expand(B, nb, k + 1) + running_scores[:, :, None]  # (B, nb, k+1): the best of each beam
        i = i.expand(B, nb, k + 1) + torch.arange(nb, device=logp.device)[:, None] * V  # in the flattened beams
        v, j = torch.topk(v.reshape(B, nb * (k + 1)), k + 1)  # (B, k+1)
        if bool((v[:, :-1] > v[:, 1:]).all()):  # k+1 distinct values: the top k and their order are unique
            return v[:, :k], i.reshape(B, -1).gather(1, j[:, :k])
    return torch.topk((logp.expand(B, nb, V) + running_scores[:, :, None]).reshape(B, nb * V), k)


@torch.inference_mode()
def greedy(model, encoder_hidden: torch.Tensor, max_new_tokens: int, start_token_id: int, eos_token_id: int,
           cross: list | None = None) -> list[Steps]:
    """Greedy captions for a batch of encoder outputs (B, N, D): per image the tokens after the start token (all
    steps; a row that met EOS ran on until every row had), with their attention and log-probabilities. cross:
    `cross_keys_values` of these outputs, if already computed."""
    B = encoder_hidden.shape[0]
    steps = _GPT2Steps(model, cross or cross_keys_values(model, encoder_hidden), B, max_new_tokens)
    ids = torch.full((B,), start_token_id, dtype=torch.long, device=encoder_hidden.device)
    out, logps = [], []  # per step (B,)
    unfinished = torch.ones(B, dtype=torch.bool, device=ids.device)
    for _ in range(max_new_tokens):
        logits = steps.step(ids)  # (B, V)
        ids = logits.argmax(-1)  # (B,): generate's argmax over float32 logits
        out.append(ids)
        logps.append(logits.log_softmax(-1).gather(1, ids[:, None])[:, 0])
        unfinished &= ids != eos_token_id
        if not unfinished.any():
            break
    tokens = torch.stack(out, 1).tolist()  # (B, steps)
    attn, logp = torch.stack(steps.attn, 3)[..., 0, :], torch.stack(logps, 1)  # (L, B, H, steps, N), (B, steps)
    return [(row, attn[:, b], logp[b]) for b, row in enumerate(tokens)]


@torch.inference_mode()
def beam_search(model, encoder_hidden: torch.Tensor, max_new_tokens: int, num_beams: int, start_token_id: int,
                eos_token_id: int, length_penalty: float = 1.0, early_stopping: bool | str = False,
                cross: list | None = None) -> list[Steps]:
    """The best beam per image for a batch of encoder outputs (B, N, D), as `generate(num_beams=...)` picks it:
    tokens after the start token (its EOS included, when it ended by one), with the attention and log-probability
    of the beam rows that produced them. cross: as for `greedy`."""
    B, nb, device = encoder_hidden.shape[0], num_beams, encoder_hidden.device
    K = 2 * nb  # continuations kept per step: enough that nb survive even if nb of them end in EOS
    max_length = 1 + max_new_tokens  # the start token is the decoder prompt
    steps = _GPT2Steps(model, cross or cross_keys_values(model, encoder_hidden), B * nb, max_length)
    running = torch.full((B, nb, max_length), eos_token_id, dtype=torch.long, device=device)  # token histories
    running[:, :, 0] = start_token_id
    running_scores = torch.zeros(B, nb, device=device)  # sum of logp of each running beam
    running_scores[:, 1:] = -1e9  # all beams start identical: only the first may propose continuations
    finished = running.clone()  # the best nb finished hypotheses per image
    finished_scores = torch.full((B, nb), -1e9, device=device)
    finished_len = torch.ones(B, nb, dtype=torch.long, device=device)  # tokens incl. start
    finished_row = torch.zeros(B, nb, dtype=torch.long, device=device)  # the decoder row of its last step
    is_finished = torch.zeros(B, nb, dtype=torch.bool, device=device)
    can_improve = torch.ones(B, 1, dtype=torch.bool, device=device)
    top_nb = torch.arange(K, device=device) < nb  # only the top nb continuations may be finalised
    image_offset = torch.arange(B, device=device)[:, None]  # (B, 1)
    ids = torch.full((B,), start_token_id, dtype=torch.long, device=device)  # step 0: one row per image
    logps, parents = [], [None]  # per step: (R, V) log-probabilities; the row each row continues (step 0: none)
    cur_len = 1
    while True:
        logp = steps.step(ids).log_softmax(-1)  # (R, V), R = B at step 0 and B*nb after
        logps.append(logp)
        V, rows_per_image = logp.shape[-1], ids.shape[0] // B  # 1 at step 0 (all beams are one row), else nb
        # (B, K): generate's torch.topk((logp + running_scores).reshape(B, nb * V), k=K)
        top_scores, top_index = _topk(logp.view(B, rows_per_image, V), running_scores, K)
        top_beam, top_ids = top_index // V, top_index % V  # (B, K) each
        top_row = image_offset * rows_per_image + top_beam.clamp(max=rows_per_image - 1)  # (B, K): its decoder row
        top_seqs = torch.take_along_dim(running, top_beam[:, :, None], dim=1)  # (B, K, max_length)
        top_seqs[:, :, cur_len] = top_ids
        done = (top_ids == eos_token_id) | (cur_len + 1 >= max_length)  # (B, K): EOS or length limit
        # the nb best unfinished continuations run on
        running_candidates = top_scores + done.to(torch.float32) * -1.0e9
        keep = torch.topk(running_candidates, k=nb)[1]  # (B, nb)
        running = torch.take_along_dim(top_seqs, keep[:, :, None], dim=1)
        running_scores = torch.take_along_dim(running_candidates, keep, dim=1)
        source_row = torch.take_along_dim(top_row, keep, dim=1)  # (B, nb)
        # finished continuations among the top nb join the finished set if they beat its worst
        just_finished = done & top_nb[None, :]
        scores = top_scores / (cur_len ** length_penalty)  # length: the tokens after the start token
        scores += (torch.all(is_finished, dim=-1, keepdim=True) & (early_stopping is True)).to(torch.float32) * -1.0e9
        scores += (~can_improve).to(torch.float32) * -1.0e9
        scores += (~just_finished) * -1.0e9
        best = torch.topk(torch.cat((finished_scores, scores), dim=1), k=nb)[1]  # (B, nb)
        finished = torch.take_along_dim(torch.cat((finished, top_seqs), dim=1), best[:, :, None], dim=1)
        finished_scores = torch.take_along_dim(torch.cat((finished_scores, scores), dim=1), best, dim=1)
        finished_len = torch.take_along_dim(
            torch.cat((finished_len, torch.full_like(top_ids, cur_len + 1)), dim=1), best, dim=1)
        finished_row = torch.take_along_dim(torch.cat((finished_row, top_row), dim=1), best, dim=1)
        is_finished = torch.take_along_dim(torch.cat((is_finished, just_finished), dim=1), best, dim=1)
        cur_len += 1
        # generate's heuristic: could the best running beam still beat the worst finished one?
        length = max_length - 1 if early_stopping == "never" and length_penalty > 0.0 else cur_len - 1
        best_possible = running_scores[:, :1] / (length ** length_penalty)
        worst = torch.where(is_finished, torch.min(finished_scores, dim=1, keepdim=True)[0], -1.0e9)
        can_improve = can_improve & torch.any(best_possible > worst, dim=-1, keepdim=True)
        if not (can_improve.any() and not (is_finished.all() and early_stopping is True) and not done.all()):
            break
        parents.append(source_row.view(-1))  # (B*nb,): next step's row i continues this step's row parents[i]
        steps.reorder(parents[-1])
        ids = running[:, :, cur_len - 1].reshape(-1)  # (B*nb,)
    results = []
    for seq, n, row in zip(finished[:, 0].tolist(), finished_len[:, 0].tolist(), finished_row[:, 0].tolist()):
        tokens = seq[1:n]  # token k was chosen at step k
        rows = [row]  # the winner's row at each step, found backwards from its last one
        for s in range(len(tokens) - 1, 0, -1):
            rows.append(int(parents[s][rows[-1]]))
        rows.reverse()
        cross = torch.stack([steps.row_attention(s, r) for s, r in enumerate(rows)], 2)  # (L, H, T, N)
        logp = torch.stack([logps[s][r, tok] for s, (r, tok) in enumerate(zip(rows, tokens))])  # (T,)
        results.append((tokens, cross, logp))
    return results
