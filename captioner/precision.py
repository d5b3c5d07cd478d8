"""Reduced-precision decoder weights for CPUs: `captioner.load(..., precision="bf16" | "int8")`.

Decoding streams every decoder weight once per token, so on a CPU its speed is the weights' bytes over the memory
bandwidth. Storing them in fewer bytes is the lever: bf16 halves them, int8 quarters them. Only the decoder's
Linear / GPT-2 Conv1D layers change (what a decoding step streams); the encoder, the embeddings, the layer norms
and the maps' arithmetic stay fp32. Each new layer takes fp32 x of any leading shape and returns fp32, so the
rest of the model, `generate` and the own decoding loop (which calls any layer that is not a float nn.Linear /
Conv1D as it is) run unchanged.

- "bf16" (`Bf16Linear`): the weight in bfloat16, x cast to bf16 per call, the fp32 bias added to the fp32
  result. A few-row product (at most `PACK_ROWS` rows, a decoding step's) runs through F.linear or oneDNN's
  prepacked layout, whichever timed faster for that weight shape and row count at first use. Needs a CPU with
  BF16 instructions (AVX-512 BF16 / AMX); elsewhere it is refused. Differentiable: relevance maps work.
- "int8" (`Int8Linear`): weight-only int8, one fp32 scale per output channel (absmax / 127), multiplied by
  `torch._weight_int8pack_mm`; x in bf16 where the CPU has BF16 instructions, fp32 elsewhere. Not
  differentiable: maps default to attention and relevance is refused, as with `load(..., int8=True)`.

`load(..., int8=True)` is different: torch's dynamic quantisation (`captioner.quantize`) of every Linear, encoder
included, activations quantised to int8 on the fly too.
"""
from __future__ import annotations

import time

import torch
import torch.nn.functional as F
from torch import nn
from transformers.pytorch_utils import Conv1D

PRECISIONS = ("fp32", "bf16", "int8")
PACK_ROWS = 16  # a product with more rows (cross K/V once per image, a forced pass) is compute-bound: F.linear
_chosen: dict[tuple[int, int, int, int], bool] = {}  # (N, K, rows, threads) -> whether the packed product won


def bf16_supported() -> bool:
    """Whether this CPU computes in bf16 natively (oneDNN's check: AVX-512 BF16 or AMX)."""
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def checked(precision: str, device: str) -> str:
    """`precision` if this machine can decode in it, else a ValueError saying what to use instead."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}.")
    if precision != "fp32" and device != "cpu":
        raise ValueError(f"precision={precision!r} is for CPUs; on {device!r} the model is fp16 already: load it "
                         "with precision='fp32' (the default), or with device='cpu'.")
    if precision == "bf16" and not bf16_supported():
        raise ValueError("precision='bf16' needs a CPU with BF16 instructions (AVX-512 BF16 or AMX), which this "
                         "one lacks: use precision='int8' (int8 weights, fp32 activations here) or 'fp32'.")
    return precision


def _out_in(layer: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The layer's weight (out, in) and bias, detached."""
    w = layer.weight.t() if isinstance(layer, Conv1D) else layer.weight  # Conv1D stores (in, out)
    return w.detach(), None if layer.bias is None else layer.bias.detach().float()


class Bf16Linear(nn.Module):
    """F.linear with the weight (out, in) kept in bf16; fp32 x (..., in) -> fp32 (..., out)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        self.register_buffer("weight", weight.to(torch.bfloat16).contiguous())  # (N, K)
        self.register_buffer("bias", bias)  # (N,) fp32 or None
        self.packs: dict[int, torch.Tensor | None] = {}  # rows -> oneDNN's packed weight, None where F.linear won

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, x.shape[-1]).to(torch.bfloat16)  # (M, K)
        rows = x2.shape[0]
        if rows <= PACK_ROWS and not (torch.is_grad_enabled() and x.requires_grad):  # packed: no backward
            p = self.packs[rows] if rows in self.packs else self._choose(rows)
            if p is not None:
                y = torch.ops.mkldnn._linear_pointwise(x2, p, None, "none", [], "")
                return self._out(y, x)
        return self._out(F.linear(x2, self.weight), x)

    def _out(self, y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        y = y.float()  # (M, N)
        y = y if self.bias is None else y + self.bias
        return y.view(*x.shape[:-1], y.shape[-1])  # (..., N)

    def _choose(self, rows: int) -> torch.Tensor | None:
        """The packed copy for `rows` rows where the packed product won (`packed_wins`), else None (F.linear)."""
        self.packs[rows] = packed(self.weight, rows) if packed_wins(self.weight, rows) else None
        return self.packs[rows]


def packed(w: torch.Tensor, rows: int) -> torch.Tensor:
    """w (N, K) bf16 in oneDNN's prepacked layout for products of `rows` rows (`torch.ops.mkldnn._linear_pointwise`
    reads it)."""
    return torch.ops.mkldnn._reorder_linear_weight(w, rows)


def packed_wins(w: torch.Tensor, rows: int) -> bool:
    """Whether the prepacked product of bf16 w (N, K) by `rows` rows ran at least 5 % faster than F.linear, timed
    on w at first use (best of 3 after a warm-up) and kept per (shape, rows, threads) for the process."""
    key = (*w.shape, rows, torch.get_num_threads())
    if key not in _chosen:
        x, p = torch.randn(rows, w.shape[1]).to(torch.bfloat16), packed(w, rows)
        runs = {"linear": lambda: F.linear(x, w),
                "packed": lambda: torch.ops.mkldnn._linear_pointwise(x, p, None, "none", [], "")}
        best = dict.fromkeys(runs, float("inf"))
        with torch.inference_mode():
            for _ in range(4):  # the first pass warms up
                for name, run in runs.items():
                    t = time.perf_counter()
                    run()
                    best[name] = min(best[name], time.perf_counter() - t)
        _chosen[key] = best["packed"] < 0.95 * best["linear"]
    return _chosen[key]


class Int8Linear(nn.Module):
    """Weight-only int8: weight (out, in) int8 with one scale per output channel; fp32 x (..., in) -> fp32
    (..., out). x is multiplied in `act_dtype` (bf16 where the CPU has BF16 instructions). No backward."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, act_dtype: torch.dtype):
        super().__init__()
        w = weight.float().contiguous()  # (N, K); a Conv1D weight arrives transposed
        scales = w.abs().amax(dim=1).clamp_min(1e-12) / 127  # (N,)
        self.register_buffer("weight", torch.round(w / scales[:, None]).clamp(-127, 127).to(torch.int8))  # (N, K)
        self.register_buffer("scales", scales.to(act_dtype))  # (N,)
        self.register_buffer("bias", bias)  # (N,) fp32 or None
        self.act_dtype = act_dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, x.shape[-1]).to(self.act_dtype)  # (M, K)
        y = torch._weight_int8pack_mm(x2, self.weight, self.scales).float()  # (M, N)
        y = y if self.bias is None else y + self.bias
        return y.view(*x.shape[:-1], y.shape[-1])  # (..., N)


def reduce_decoder(model: nn.Module, precision: str) -> nn.Module:
    """Replace every nn.Linear / Conv1D of `model.decoder` by its `precision` layer ("bf16" or "int8"), in place;
    returns model. The encoder and everything outside the decoder stay as they are."""
    act = torch.bfloat16 if bf16_supported() else torch.float32
    for parent in list(model.decoder.modules()):
        for name, child in list(parent.named_children()):
            if type(child) in (nn.Linear, Conv1D):
                w, b = _out_in(child)
                setattr(parent, name, Bf16Linear(w, b) if precision == "bf16" else Int8Linear(w, b, act))
    return model
