"""Opt-in int8 for CPUs: dynamic quantisation of the model's Linear layers (int8 weights, activations quantised
on the fly per call), for `captioner.load(..., int8=True)`.

Decoding a caption reads every decoder weight once per token for a handful of beam rows, so on a CPU it is
bound by memory traffic, and int8 weights are a quarter of it. GPT-2 keeps its projections in transformers'
`Conv1D` (x @ W + b with W stored (in, out)), which `quantize_dynamic` does not know; they become `nn.Linear`
first, with W transposed, computing the same function.

Not to be confused with `load(..., precision="int8")` (`captioner.precision`): int8 weights for the decoder only,
activations left in bf16 or fp32, no quantisation error on the activations.
"""
from __future__ import annotations

import warnings

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D


def conv1d_to_linear(model: nn.Module) -> nn.Module:
    """Replace every transformers `Conv1D` in `model` by the equivalent `nn.Linear`, in place; returns model."""
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, Conv1D):
                d_in, d_out = child.weight.shape  # Conv1D stores (in, out)
                linear = nn.Linear(d_in, d_out, device=child.weight.device, dtype=child.weight.dtype)
                with torch.no_grad():
                    linear.weight.copy_(child.weight.t())  # (out, in)
                    linear.bias.copy_(child.bias)
                setattr(parent, name, linear)
    return model


def int8(model: nn.Module) -> nn.Module:
    """`model` (fp32, on the CPU) with every Linear layer, GPT-2's Conv1D ones included, quantised to int8
    per output channel; modified in place and returned. Embeddings and layer norms stay fp32."""
    if next(model.parameters()).device.type != "cpu":
        raise ValueError("int8 dynamic quantisation runs on the CPU only; load the model with device='cpu'.")
    from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

    conv1d_to_linear(model)
    with warnings.catch_warnings():  # torch.ao.quantization warns that it is deprecated; torch 2.13 still has it
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.filterwarnings("ignore", message=".*quantize_per_channel.*", category=UserWarning)
        return quantize_dynamic(model, {nn.Linear: per_channel_dynamic_qconfig}, dtype=torch.qint8, inplace=True)
