"""The two floors the bench sets the page's first answer against.

- The **kernel floor** (`floor_seconds`): the faster encoder (the anchor's or the project's), each layer's
  cross-attention keys/values once, then per decoding step one product of the beam rows by every other decoder
  weight, through the kernel `captioner.kernels` chose. The least this project's own products could cost.
- The **physical floor** (`physical_floor`): that encoder, measured, plus the time the machine needs to read
  every decoder weight once per step (`decoder_weight_bytes`) at the best read bandwidth it showed during the bench
  (`ReadBandwidth`). No decoder reading these weights in fp32 on this machine can go faster.
"""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from captioner import encoding, fastdecode, kernels

SAMPLE_BYTES = 1 << 30  # 1 GiB: far beyond every cache, so a sum over it reads memory
PASSES = 5  # sums per sample (~35 ms each on a fast machine); the best one counts
FP32 = 4  # bytes per weight: the bench decodes in fp32


class ReadBandwidth:
    """The machine's read bandwidth, sampled now and then: each `sample()` fills a fresh fp32 tensor of `nbytes`,
    times `passes` sums of it and keeps the best pass. Bandwidth moves by 2x from minute to minute on a shared
    machine, and from one allocation to the next (23 to 31 GB/s for four 1 GiB tensors in a row on one Xeon VM: the
    pages land on different memory), so the bench samples between its timed runs, each time in new memory, and
    takes the best sample as the machine's limit (`best_bandwidth`)."""

    def __init__(self, nbytes: int | None = None, passes: int = PASSES):
        self.nbytes, self.passes = nbytes or SAMPLE_BYTES, passes
        self.samples: list[float] = []  # bytes/s, the best pass of each sample

    def sample(self) -> float:
        """Time `passes` sums of a new tensor; append and return the best pass's bytes/s."""
        data = torch.ones(self.nbytes // FP32)  # ones() touches every page before the clock starts
        nbytes, best = data.numel() * data.element_size(), 0.0
        for _ in range(self.passes):
            t = time.perf_counter()
            data.sum()
            best = max(best, nbytes / (time.perf_counter() - t))
        self.samples.append(best)
        return best


def best_bandwidth(samples: list[float]) -> float:
    """The machine's read limit in bytes/s: the best sample (a slower one only saw a busier machine)."""
    if not samples:
        raise ValueError("no bandwidth samples: call ReadBandwidth.sample() between the timed runs")
    return max(samples)


def is_cross_kv(name: str) -> bool:
    """GPT-2's cross-attention key/value projection, which runs once per image, not once per step."""
    return name.endswith("crossattention.c_attn")


def decoder_weight_bytes(decoder: nn.Module, cross_kv: bool = True) -> int:
    """Bytes of fp32 weights a decoding step reads: every nn.Linear / GPT-2 Conv1D weight of `decoder`, the LM head
    included (tied to the token embedding, it is read whole every step; the embedding lookup reads one row and
    is not counted). cross_kv=False leaves out the cross-attention key/value projection (`is_cross_kv`)."""
    return sum(m.weight.numel() * FP32 for name, m in decoder.named_modules()
               if isinstance(m, (nn.Linear, Conv1D)) and (cross_kv or not is_cross_kv(name)))


def physical_floor(encoder: float, steps: int, bytes_per_step: int, bandwidth: float) -> float:
    """Seconds: the encoder's measured seconds, then `steps` reads of `bytes_per_step` at `bandwidth` bytes/s."""
    return encoder + steps * bytes_per_step / bandwidth


@dataclass
class Floor:
    floor: float  # the kernel floor: median seconds, each weight through the kernel kernels.Kernels chose
    linear: float  # ... through F.linear alone
    encoder: float  # median seconds of the faster encoder of each run (stock SDPA or the project's), in every floor
    steps: int  # decoding steps the floors stand for
    stock_encoder: float = 0.0  # median seconds of the anchor's encoder (transformers' SDPA, no attentions)
    own_encoder: float = 0.0  # median seconds of the project's encoder (SDPA, timed kernels, no attentions)


def floor_seconds(cap, anchor, image, rows: int, repeats: int, steps: int) -> Floor:
    """The kernel floor: the encoder, the cross-attention keys and values once for the image (any decoder with a
    cache computes them once), then `steps` steps that only multiply `rows` rows by every other decoder weight once
    (LM head included), each weight through the kernel `captioner.kernels` chose for it, and through `F.linear`
    alone. The encoder is the faster, in each run, of the anchor's (transformers' SDPA) and the project's
    (`encoding.encode` without weights: SDPA, its products through timed kernels), so that no floor charges an
    encoder slower than one this machine has run. Medians in seconds, and the encoders' own medians."""
    weights = [w for name, m in cap.model.decoder.named_modules() if not is_cross_kv(name)
               for w in [kernels.weight(m)] if w is not None]
    timed = kernels.kernels_for(cap.model)  # its products keep the packed copies the choice made
    pixel_values = cap.pixel_values(image)
    xs = {k: torch.randn(rows, k) for k in {w.shape[1] for w in weights}}
    threads = torch.get_num_threads()
    encoder, stock, own = [], [], []

    def run(chosen: bool) -> float:
        with torch.inference_mode():
            t = time.perf_counter()
            anchor.encoder(pixel_values=pixel_values)
            stock.append(time.perf_counter() - t)
            t = time.perf_counter()
            hidden = encoding.encode(cap.model.encoder, pixel_values, weights=False).last_hidden_state  # (1, N, D)
            own.append(time.perf_counter() - t)
            encoder.append(min(stock[-1], own[-1]))
            t = time.perf_counter()
            fastdecode.cross_keys_values(cap.model, hidden)
            for _ in range(steps):
                for w in weights:
                    x = xs[w.shape[1]]
                    timed.product(timed.choose(w, rows) if chosen else "linear", x, w, threads)
        return encoder[-1] + time.perf_counter() - t

    run(True), run(False)  # warm-up (and the kernels' timing, if not done yet)
    for times in (encoder, stock, own):
        times.clear()
    best, linear = [], []
    for _ in range(repeats):
        best.append(run(True))
        linear.append(run(False))
    median = statistics.median
    return Floor(median(best), median(linear), median(encoder), steps, median(stock), median(own))


def steps_decoded(tokens: int, max_new_tokens: int) -> int:
    """Decoding steps behind a caption of `tokens` tokens (cut before EOS): one per token, plus the step that chose
    EOS when the caption ended before `max_new_tokens`."""
    return min(tokens + 1, max_new_tokens)
