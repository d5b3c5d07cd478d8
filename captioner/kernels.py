"""The matrix products decoding runs on, chosen by timing on this machine, and the weight layout they read.

Why the products are chosen at run time: decoding multiplies a few rows (the beams) by every weight matrix, so it
is bound by how fast the weights stream from memory, and which kernel streams fastest depends on the CPU, its BLAS
and the number of rows, by several times either way (`python -m captioner_train.bench` prints what it chose and
how fast each streamed; docs/decoding.md). `Kernels` times both candidates
(`KERNELS`) on the model's own weights the first time a decoding step multiplies a given weight shape by a given
number of rows, and keeps the faster for the process. GPT-2's `Conv1D` weights are laid out (out, in) in memory
once (`conv1d_out_in`: same shape, values and state_dict, no extra memory), the layout both candidates read.

    kernels.product("bmm", x, kernels.weight(layer))     # one product by a named kernel, (M, K) -> (M, N)
    kernels.kernels_for(model).linear(x, layer)          # layer(x) by the kernel timed fastest for its shape
    with kernels.forced("linear"): ...                   # every product in this process by one kernel
"""
from __future__ import annotations

import contextlib
import os
import time
import weakref

import torch
import torch.nn.functional as F
from torch import nn
from transformers.pytorch_utils import Conv1D

KERNELS = ("linear", "bmm")  # F.linear on (out, in) weights; `bmm_split`
_forced: str | None = None  # set by `forced`: the kernel of every product in this process


def _checked(kernel: str | None) -> str | None:
    if kernel not in (None, *KERNELS):
        raise ValueError(f"kernel must be one of {', '.join(KERNELS)}, got {kernel!r}.")
    return kernel


@contextlib.contextmanager
def forced(kernel: str):
    """Inside, every decoding product in this process runs on `kernel` ("linear" or "bmm"), whatever the timing
    chose or `$CAPTIONER_KERNEL` says: for tests and comparisons whose results must not depend on the machine."""
    global _forced
    saved, _forced = _forced, _checked(kernel)
    try:
        yield kernel
    finally:
        _forced = saved


def conv1d_out_in(model: nn.Module) -> nn.Module:
    """Store every transformers `Conv1D` weight (in, out) as the transpose of a contiguous (out, in) tensor, in
    place: same shape, values and state_dict (checkpoints stay GPT-2's), the memory layout the kernels stream
    fastest. Returns model."""
    for module in model.modules():
        if isinstance(module, Conv1D) and module.weight.is_contiguous():
            w = module.weight
            module.weight = nn.Parameter(w.detach().t().contiguous().t(), requires_grad=w.requires_grad)
    return model


def weight(layer: nn.Module) -> torch.Tensor | None:
    """The float weight (out, in), contiguous, of an nn.Linear or a re-laid Conv1D; None for anything else (int8
    layers, a Conv1D still stored (in, out)), which is then simply called."""
    w = layer.weight if type(layer) is nn.Linear else layer.weight.t() if type(layer) is Conv1D else None
    return w if w is not None and w.is_floating_point() and w.is_contiguous() else None


def bmm_split(x: torch.Tensor, w: torch.Tensor, threads: int) -> torch.Tensor:
    """x (M, K) @ w (N, K)^T -> (M, N), as one block of output rows per thread (bmm parallelises over blocks), the
    rows that do not divide evenly over the threads (vocab 50257) in one product of their own."""
    (N, K), M = w.shape, x.shape[0]
    n = N - N % threads
    out = torch.bmm(w[:n].view(threads, n // threads, K), x.t().expand(threads, K, M)).view(n, M)  # (n, M)
    if n < N:
        out = torch.cat((out, w[n:] @ x.t()))  # (N, M)
    return out.t().contiguous()  # (M, N)


def product(kernel: str, x: torch.Tensor, w: torch.Tensor, threads: int | None = None) -> torch.Tensor:
    """x (M, K) @ w (N, K)^T -> (M, N) by `kernel`; threads: the bmm split's blocks (default: torch's threads)."""
    if _checked(kernel) == "linear":
        return F.linear(x, w)
    return bmm_split(x, w, threads or torch.get_num_threads())


class Kernels:
    """For each (weight shape, number of rows, threads): the faster of `F.linear` and the bmm split on this machine.

    The first product of a shape and row count times both candidates over all of the model's weights of that
    shape (so the weights stream from memory as in decoding, not from cache), best of 3 each, and keeps the faster
    for the life of the model; the bmm split must win by 5 % to replace the stock kernel. GPUs use `F.linear`.
    force ("linear" or "bmm", or $CAPTIONER_KERNEL) skips the timing; `forced` overrides both.
    """

    def __init__(self, model: nn.Module, force: str | None = None):
        self.force = _checked(force or os.environ.get("CAPTIONER_KERNEL") or None)
        self.by_shape: dict[tuple[int, int], list[torch.Tensor]] = {}  # (N, K) -> the weights of that shape
        for module in model.modules():
            w = weight(module)
            if w is not None:
                self.by_shape.setdefault(tuple(w.shape), []).append(w)
        self.chosen: dict[tuple[int, int, int, int], tuple[str, dict[str, float]]] = {}  # key -> (kernel, GB/s)

    def linear(self, x: torch.Tensor, layer: nn.Module) -> torch.Tensor:
        """layer(x) for a few rows x (M, K) -> (M, N), by the kernel chosen for this shape and M."""
        w = weight(layer)
        if w is None:
            return layer(x)
        out = product(_forced or self.force or self.choose(w, x.shape[0]), x, w)  # (M, N)
        return out if layer.bias is None else out.add_(layer.bias)

    def choose(self, w: torch.Tensor, rows: int) -> str:
        """The kernel timed fastest for weight w (N, K) times `rows` rows on this machine (timed on first use)."""
        if w.device.type != "cpu":
            return "linear"
        key = (*w.shape, rows, torch.get_num_threads())
        if key not in self.chosen:
            self.chosen[key] = self._time(w, rows)
        return self.chosen[key][0]

    def _time(self, w: torch.Tensor, rows: int) -> tuple[str, dict[str, float]]:
        weights = self.by_shape.get(tuple(w.shape), [w])
        x = torch.randn(rows, w.shape[1], dtype=w.dtype)
        threads = torch.get_num_threads()
        best = {name: float("inf") for name in KERNELS}
        with torch.inference_mode():
            for name in KERNELS:  # warm-up
                product(name, x, weights[0], threads)
            for _ in range(3):
                for name in KERNELS:  # alternate, so neither always finds the other's data in cache
                    t = time.perf_counter()
                    for m in weights:
                        product(name, x, m, threads)
                    best[name] = min(best[name], time.perf_counter() - t)
        nbytes = sum(m.numel() * m.element_size() for m in weights)
        speed = {name: nbytes / seconds / 1e9 for name, seconds in best.items()}  # GB/s
        return ("bmm" if best["bmm"] < 0.95 * best["linear"] else "linear"), speed

    def summary(self) -> list[str]:
        """One line per choice made so far: shape, rows, threads, kernel, and both candidates' GB/s."""
        return [f"{n}x{k} weight, {m} row{'s' if m > 1 else ''}, {t} threads: {kernel} "
                f"({', '.join(f'{name} {v:.1f} GB/s' for name, v in speed.items())})"
                for (n, k, m, t), (kernel, speed) in sorted(self.chosen.items())]


_KERNELS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> its Kernels


def kernels_for(model: nn.Module) -> Kernels:
    """The model's `Kernels`, made once per model (its timings are kept with it)."""
    if model not in _KERNELS:
        _KERNELS[model] = Kernels(model.decoder if hasattr(model, "decoder") else model)
    return _KERNELS[model]
