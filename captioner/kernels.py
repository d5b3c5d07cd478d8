"""The matrix products decoding runs on, chosen by timing on this machine, and the weight layouts they read.

Why the products are chosen at run time: decoding multiplies a few rows (the beams) by every weight matrix, so it
is bound by how fast the weights stream from memory, and which kernel streams fastest depends on the CPU, its BLAS
and the number of rows, by several times either way (`python -m captioner_train.bench` prints what it chose and
how fast each streamed; docs/decoding.md). `Kernels` times the candidates (`KERNELS`, those `available` here) on
the model's own weights the first time a decoding step multiplies a given weight shape by a given number of rows,
and keeps the fastest for the process:

- "linear": `F.linear` on the weight laid out (out, in);
- "packed": the BLAS's own prepacked layout (MKL's `cblas_sgemm_pack`, through `torch.ops.mkl`), made once per
  weight: a GEMM library packs the weight on every call otherwise, which costs a few-row product most of its
  bandwidth;
- "bmm": `bmm_split`, one block of output rows per thread;
- "onednn": oneDNN's own prepacked layout (`torch.ops.mkldnn`), made once per weight and row count, multiplied
  by oneDNN's kernels, which it generates for the instructions of the CPU it runs on (MKL takes a generic path on
  some CPUs, AMD's among them: the bench prints every candidate's speed).

The packed kernels have no backward, so `Kernels.linear` calls the layer itself while gradients are recorded.

Packed copies ("packed", "onednn") are kept only for the shapes and row counts where that kernel won. GPT-2's
`Conv1D` weights are laid out (out, in) in memory once (`conv1d_out_in`: same shape, values and
state_dict, no extra memory). Each (layer, rows) gets a plan, a closure over its weight, bias and kernel, so a
product costs one dictionary lookup on top of the kernel; a plan is rebuilt if the layer's weight is replaced,
changed in place or given other memory (`param.data = ...`).

    kernels.kernels_for(model).linear(x, layer)          # layer(x) by the kernel timed fastest for its shape
    kernels.kernels_for(model).product("packed", x, w)   # one product by a named kernel, (M, K) -> (M, N)
    with kernels.forced("linear"): ...                   # every product in this process by one kernel
"""
from __future__ import annotations

import contextlib
import functools
import os
import time
import weakref

import torch
import torch.nn.functional as F
from torch import nn
from transformers.pytorch_utils import Conv1D

KERNELS = ("linear", "packed", "bmm", "onednn")
PACKED = ("packed", "onednn")  # the kernels that read a packed copy of the weight, made once per row count
FEW = 8  # up to this many rows (a decoding step's beams), each row count is timed and packed for on its own
_forced: str | None = None  # set by `forced`: the kernel of every product in this process


def available(device: torch.device | str = "cpu") -> tuple[str, ...]:
    """The kernels that run on `device` with this torch build: on a CPU, "linear" and "bmm", "packed" with MKL and
    "onednn" with oneDNN; "linear" elsewhere."""
    if torch.device(device).type != "cpu":
        return ("linear",)
    runs = _cpu_kernels()
    return runs if torch.backends.mkldnn.enabled else tuple(k for k in runs if k != "onednn")


@functools.cache
def _cpu_kernels() -> tuple[str, ...]:
    """The CPU kernels of this torch build that compute a small product right, tried once per process."""
    return ("linear", *(k for k in KERNELS[1:] if _runs(k)))


def _runs(kernel: str) -> bool:
    """Whether this torch build has `kernel` and it computes a small product right."""
    if kernel == "packed" and not (torch.backends.mkl.is_available() and hasattr(torch.ops.mkl, "_mkl_linear")):
        return False
    if kernel == "onednn" and not (torch.backends.mkldnn.is_available() and
                                   hasattr(torch.ops.mkldnn, "_reorder_linear_weight")):
        return False
    x = torch.arange(6, dtype=torch.float32, device="cpu").view(2, 3)  # whatever the default dtype and device
    w = torch.arange(12, dtype=torch.float32, device="cpu").view(4, 3)
    try:
        with torch.no_grad():
            return torch.equal(_product(kernel, x, w, threads=2), x @ w.t())
    except Exception:  # an op the build declares but cannot run (no kernel for this CPU, another signature)
        return False


def _checked(kernel: str | None) -> str | None:
    if kernel not in (None, *KERNELS):
        raise ValueError(f"kernel must be one of {', '.join(KERNELS)}, got {kernel!r}.")
    if kernel is not None and kernel not in available():
        needs = {"packed": "MKL", "onednn": "oneDNN (and torch.backends.mkldnn.enabled)"}.get(kernel, "a CPU")
        raise ValueError(f"kernel {kernel!r} needs {needs}, which this torch build lacks or cannot run here; it "
                         f"has {', '.join(available())}.")
    return kernel


@contextlib.contextmanager
def forced(kernel: str):
    """Inside, every decoding product in this process runs on `kernel` (one of `available()`), whatever the
    timing chose or `$CAPTIONER_KERNEL` says: for tests and comparisons whose results must not depend on the
    machine. On a GPU, products stay on `F.linear`."""
    global _forced
    saved, _forced = _forced, _checked(kernel)
    try:
        yield kernel
    finally:
        _forced = saved


def conv1d_out_in(model: nn.Module) -> nn.Module:
    """Store every transformers `Conv1D` weight (in, out) as the transpose of a contiguous (out, in) tensor, in
    place: same shape, values and state_dict (checkpoints stay GPT-2's), the layout the kernels read. Returns
    model."""
    for module in model.modules():
        if isinstance(module, Conv1D) and module.weight.is_contiguous():
            w = module.weight
            module.weight = nn.Parameter(w.detach().t().contiguous().t(), requires_grad=w.requires_grad)
    return model


def weight(layer: nn.Module) -> torch.Tensor | None:
    """The float weight (out, in), contiguous, of an nn.Linear or a re-laid Conv1D; None for anything else (int8
    or bf16 layers, a Conv1D still stored (in, out)), which is then simply called."""
    w = layer.weight if type(layer) in (nn.Linear, RoutedLinear) else layer.weight.t() if type(layer) is Conv1D \
        else None
    return w if w is not None and w.dtype == torch.float32 and w.is_contiguous() else None


def bmm_split(x: torch.Tensor, w: torch.Tensor, threads: int, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x (M, K) @ w (N, K)^T + bias -> (M, N), as one block of output rows per thread (bmm parallelises over
    blocks), the rows that do not divide evenly over the threads (vocab 50257) in one product of their own; the
    bias is added by the products themselves (baddbmm, addmm), and both write into one output."""
    (N, K), M = w.shape, x.shape[0]
    n = N - N % threads
    out = x.new_empty(N, M)  # (N, M): each product writes its rows
    blocks, xt = w[:n].view(threads, n // threads, K), x.t().expand(threads, K, M)
    if bias is None:
        torch.bmm(blocks, xt, out=out[:n].view(threads, n // threads, M))
    else:
        torch.baddbmm(bias[:n].view(threads, n // threads, 1), blocks, xt, out=out[:n].view(threads, n // threads, M))
    if n < N:
        if bias is None:
            torch.mm(w[n:], x.t(), out=out[n:])
        else:
            torch.addmm(bias[n:, None], w[n:], x.t(), out=out[n:])
    return out.t().contiguous()  # (M, N); no copy for one row


def pack(w: torch.Tensor, rows: int) -> torch.Tensor:
    """w (N, K) fp32 in MKL's packed GEMM layout for products with `rows` rows (an opaque tensor as large as w),
    for `packed_linear`. Any row count can read it, but at the speed of the count it was packed for (1 row's
    layout halves a 4-row product's speed)."""
    return torch.ops.mkl._mkl_reorder_linear_weight(w, rows)


def packed_linear(x: torch.Tensor, packed: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """F.linear(x, w, bias) for x (M, K) with w read from `pack(w)`: (M, N). No backward."""
    return torch.ops.mkl._mkl_linear(x, packed, w, bias, x.shape[0])


def onednn_pack(w: torch.Tensor, rows: int) -> torch.Tensor:
    """w (N, K) fp32 in oneDNN's prepacked layout for products with `rows` rows (an opaque tensor as large as w),
    for `onednn_linear`; like `pack`, any row count can read it."""
    return torch.ops.mkldnn._reorder_linear_weight(w, batch_size=rows)


def onednn_linear(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """F.linear(x, w, bias) for x (M, K) with w read from `onednn_pack(w)`: (M, N). No backward (its gradient
    would silently be missing): for products without gradients only, as every caller here is."""
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")


def _packer(kernel: str):
    return pack if kernel == "packed" else onednn_pack


def packed_product(kernel: str, x: torch.Tensor, packed: torch.Tensor, w: torch.Tensor,
                   bias: torch.Tensor | None) -> torch.Tensor:
    """F.linear(x, w, bias) for x (M, K) by a packed kernel ("packed" or "onednn") from its packed copy of w."""
    return packed_linear(x, packed, w, bias) if kernel == "packed" else onednn_linear(x, packed, bias)


def rows_class(rows: int) -> int:
    """The row count a choice and a packed copy stand for: itself up to `FEW`; above, one class for all (an
    encoder's patches, batches of them: every such product is bound by arithmetic, not by reading the weight)."""
    return rows if rows <= FEW else FEW + 1


class _Plan:
    """How one layer multiplies a given number of rows: a closure over its weight, valid while the weight is (a
    layer without a float weight, called as it is, always)."""
    __slots__ = ("layer", "param", "version", "address", "run")

    def __init__(self, layer: nn.Module, run, float_weight: bool = True):
        self.layer, self.run = layer, run
        self.param = layer.weight if float_weight else None
        self.version = layer.weight._version if float_weight else 0
        self.address = layer.weight.data_ptr() if float_weight else 0

    def valid(self) -> bool:  # the same weight, unchanged in place, in the same memory (`param.data = ...` moves it)
        return self.param is None or self.layer.weight is self.param and self.param._version == self.version \
            and self.param.data_ptr() == self.address


class Kernels:
    """For each (weight shape, number of rows, threads): the fastest `available` kernel on this machine.

    The first product with a given row count times every candidate on every weight of the model, in passes like
    a decoding step's (`_time`), and keeps the fastest per shape for the life of the model; another kernel must
    beat `F.linear` by 5 % to replace it. GPUs use `F.linear`. force (a kernel name, or $CAPTIONER_KERNEL) skips the timing; `forced` overrides both.
    """

    def __init__(self, model: nn.Module, force: str | None = None, skip=lambda name: False):
        self.force = _checked(force or os.environ.get("CAPTIONER_KERNEL") or None)
        self.by_shape: dict[tuple[int, int], list[torch.Tensor]] = {}  # (N, K) -> the weights of that shape
        self._rank: dict[int, int] = {}  # a weight's address -> its place in the model's order
        for name, module in model.named_modules():
            w = None if skip(name) else weight(module)
            if w is not None:
                self.by_shape.setdefault(tuple(w.shape), []).append(w)
                self._rank.setdefault(w.untyped_storage().data_ptr(), len(self._rank))
        self.chosen: dict[tuple[int, int, int, int], tuple[str, dict[str, float]]] = {}  # key -> (kernel, GB/s)
        self.packs: dict[tuple[int, int, str], tuple] = {}  # (w's address, rows, kernel) -> (w, version, packed copy)
        self.plans: dict[tuple, _Plan] = {}  # (layer, rows, threads, forced) -> plan

    def linear(self, x: torch.Tensor, layer: nn.Module) -> torch.Tensor:
        """layer(x) for rows x (M, K) -> (M, N), by the kernel chosen for this shape and M; by the layer itself while
        gradients are recorded (the packed kernels have no backward, and the bmm split writes into an output,
        which autograd refuses)."""
        if torch.is_grad_enabled():
            return layer(x)
        key = (layer, x.shape[0], torch.get_num_threads(), _forced)
        plan = self.plans.get(key)
        if plan is None or not plan.valid():
            if len(self.plans) > 4096:  # row counts seen in batches of every size: keep the plans bounded
                self.plans.clear()
            plan = self.plans[key] = self._plan(layer, x.shape[0])
        return plan.run(x)

    def _plan(self, layer: nn.Module, rows: int) -> _Plan:
        w = weight(layer)
        if w is None:
            return _Plan(layer, layer, float_weight=False)
        kernel, bias = _forced or self.force or self.choose(w, rows), layer.bias
        if w.device.type != "cpu":
            kernel = "linear"
        if kernel == "packed":  # MKL's product takes the weight beside its packed copy
            p = self.pack(w, rows)
            return _Plan(layer, lambda x: packed_linear(x, p, w, bias))
        if kernel == "onednn":
            p = self.pack(w, rows, "onednn")
            return _Plan(layer, lambda x: onednn_linear(x, p, bias))
        if kernel == "bmm":
            threads = torch.get_num_threads()
            return _Plan(layer, lambda x: bmm_split(x, w, threads, bias))
        return _Plan(layer, lambda x: F.linear(x, w, bias))

    def pack(self, w: torch.Tensor, rows: int, kernel: str = "packed") -> torch.Tensor:
        """w packed for `kernel` ("packed": `pack`, "onednn": `onednn_pack`) for `rows` rows, made once per weight,
        kernel and row count and kept while the weight's values stay the same (the weight is held, so its memory
        cannot be reused by another while the packed copy is kept)."""
        key = (w.untyped_storage().data_ptr(), rows_class(rows), kernel)
        kept = self.packs.get(key)
        if kept is None or kept[0].shape != w.shape or kept[1] != w._version:
            kept = self.packs[key] = (w.detach(), w._version, _packer(kernel)(w, rows))  # holds w's memory itself
        return kept[2]

    def product(self, kernel: str, x: torch.Tensor, w: torch.Tensor, threads: int | None = None) -> torch.Tensor:
        """x (M, K) @ w (N, K)^T -> (M, N) by `kernel`, "packed" and "onednn" from the kept packed copy of w. No
        backward: refused while gradients are recorded."""
        _no_grad(x, w)
        if _checked(kernel) in PACKED:
            return packed_product(kernel, x, self.pack(w, x.shape[0], kernel), w, None)
        return _product(kernel, x, w, threads)

    def choose(self, w: torch.Tensor, rows: int) -> str:
        """The kernel timed fastest for weight w (N, K) times `rows` rows on this machine (timed on first use)."""
        if w.device.type != "cpu":
            return "linear"
        key = (*w.shape, rows_class(rows), torch.get_num_threads())
        if key not in self.chosen:
            self._time(rows)
        if key not in self.chosen:  # a weight that is not the model's
            self.chosen[key] = ("linear", {})
        return self.chosen[key][0]

    def _time(self, rows: int) -> None:
        """Time every candidate for every weight shape at `rows` rows, and choose.

        Each timed pass multiplies every weight of the model, in the model's order, by one candidate, as a
        decoding step does, so that each weight comes from wherever a step finds it (from memory, or from a
        cache as large as the model), and each product is timed on its own; best of 3 passes per candidate,
        alternating. Packed copies are kept only for the shapes where a packed kernel won."""
        threads, candidates = torch.get_num_threads(), available()
        if rows > FEW:  # the bmm split is for a few rows: one block per thread leaves no room for more
            candidates = tuple(name for name in candidates if name != "bmm")
        order = [w for ws in self.by_shape.values() for w in ws]
        order.sort(key=lambda w: self._rank[w.untyped_storage().data_ptr()])
        xs = {k: torch.randn(rows, k) for k in {w.shape[1] for w in order}}
        best = {(shape, name): float("inf") for shape in self.by_shape for name in candidates}
        with torch.inference_mode():
            for name in candidates:  # warm-up (and the packed copies)
                for w in order:
                    self.product(name, xs[w.shape[1]], w, threads)
            for _ in range(3 if rows <= FEW else 2):  # many rows: each pass takes a good part of a second
                for name in candidates:
                    spent = dict.fromkeys(self.by_shape, 0.0)
                    for w in order:
                        t = time.perf_counter()
                        self.product(name, xs[w.shape[1]], w, threads)
                        spent[tuple(w.shape)] += time.perf_counter() - t
                    for shape, seconds in spent.items():
                        best[shape, name] = min(best[shape, name], seconds)
        for shape, ws in self.by_shape.items():
            nbytes = sum(w.numel() * w.element_size() for w in ws)
            speed = {name: nbytes / best[shape, name] / 1e9 for name in candidates}  # GB/s
            fastest = max(speed, key=speed.get)
            kernel = fastest if speed[fastest] > speed["linear"] / 0.95 else "linear"
            self.chosen[(*shape, rows_class(rows), threads)] = (kernel, speed)
            for w in ws:  # packed copies only where they are used
                for name in PACKED:
                    if name != kernel:
                        self.packs.pop((w.untyped_storage().data_ptr(), rows_class(rows), name), None)

    def summary(self) -> list[str]:
        """One line per choice made so far: shape, rows, threads, kernel, and every candidate's GB/s."""
        return [f"{n}x{k} weight, {m if m <= FEW else f'over {FEW}'} row{'s' if m > 1 else ''}, {t} threads: {kernel} "
                f"({', '.join(f'{name} {v:.1f} GB/s' for name, v in speed.items())})"
                for (n, k, m, t), (kernel, speed) in sorted(self.chosen.items())]


def product(kernel: str, x: torch.Tensor, w: torch.Tensor, threads: int | None = None) -> torch.Tensor:
    """x (M, K) @ w (N, K)^T -> (M, N) by `kernel` ("packed" and "onednn" pack w on the spot: `Kernels.product`
    keeps the packed copy); threads: the bmm split's blocks (default: torch's threads). No backward: refused while
    gradients are recorded."""
    _no_grad(x, w)
    return _product(_checked(kernel), x, w, threads)


def _no_grad(x: torch.Tensor, w: torch.Tensor) -> None:
    if torch.is_grad_enabled() and (x.requires_grad or w.requires_grad):
        raise RuntimeError("the kernels' products have no backward: call them under torch.no_grad(), or call the "
                           "layer itself")


def _product(kernel: str, x: torch.Tensor, w: torch.Tensor, threads: int | None = None) -> torch.Tensor:
    if kernel == "linear":
        return F.linear(x, w)
    if kernel in PACKED:
        return packed_product(kernel, x, _packer(kernel)(w, x.shape[0]), w, None)
    return bmm_split(x, w, threads or torch.get_num_threads())


class RoutedLinear(nn.Linear):
    """An nn.Linear (same parameters, state_dict and function) whose products, when no gradient is recorded and on
    the CPU, go through the `Kernels` of the module it was `route`d in."""
    _kernels: weakref.ref  # -> Kernels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        timed = self._kernels() if not torch.is_grad_enabled() and x.device.type == "cpu" else None
        if timed is None or weight(self) is None:
            return F.linear(x, self.weight, self.bias)
        return timed.linear(x.reshape(-1, x.shape[-1]), self).view(*x.shape[:-1], -1)  # (..., K) -> (..., N)


def route(module: nn.Module) -> Kernels:
    """Make every fp32 nn.Linear in `module` (an image encoder: its products multiply every patch, so packing the
    weight once, not on every call, saves the GEMM's own packing) a `RoutedLinear` of one `Kernels` made for
    `module`, in place; returns that Kernels (kept with the module)."""
    timed = Kernels(module)
    for m in module.modules():
        if type(m) is nn.Linear and weight(m) is not None:
            m.__class__ = RoutedLinear
            m._kernels = weakref.ref(timed)
    _ROUTED[module] = timed
    return timed


_ROUTED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # routed module -> its Kernels
_KERNELS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> its Kernels


def kernels_for(model: nn.Module) -> Kernels:
    """The model's `Kernels`, made once per model (its timings and packed weights are kept with it)."""
    if model not in _KERNELS:  # GPT-2's cross-attention K/V projections run once per image, not in a step
        _KERNELS[model] = Kernels(model.decoder if hasattr(model, "decoder") else model,
                                  skip=lambda name: name.endswith("crossattention.c_attn"))
    return _KERNELS[model]
