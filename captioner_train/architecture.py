"""Small ViT + GPT-2 captioners built from configs: the bundled scene model and the tiny test models."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import (GPT2Config, PreTrainedTokenizerBase, ViTConfig, ViTImageProcessorPil,
                          VisionEncoderDecoderConfig, VisionEncoderDecoderModel)

from captioner.layout import config_grid


@dataclass
class ModelConfig:
    image_size: int | tuple[int, int] = 96  # (height, width) or square side, pixels
    patch_size: int = 12  # pixels; grid = image_size / patch_size, 8x8 for the scenes
    hidden_size: int = 128  # shared by encoder and decoder, so cross-attention needs no projection
    encoder_layers: int = 4
    decoder_layers: int = 3
    heads: int = 4
    mlp_ratio: int = 4  # feed-forward width = mlp_ratio * hidden_size
    max_positions: int = 32  # longest decoder sequence, start token included
    dropout: float = 0.0  # synthetic data never repeats, so nothing to regularise


PRESETS = {
    "scenes": ModelConfig(),
    "scenes-p8": ModelConfig(patch_size=8),
    "scenes-p8-l3": ModelConfig(patch_size=8, encoder_layers=3),
    "scenes-p8-l2": ModelConfig(patch_size=8, encoder_layers=2),
    # tests: a non-square 4x6 grid, so a swapped height/width cannot go unnoticed
    "tiny": ModelConfig(image_size=(32, 48), patch_size=8, hidden_size=32, encoder_layers=2, decoder_layers=2,
                        heads=2, max_positions=40),
}


def _sincos_2d(gh: int, gw: int, dim: int) -> torch.Tensor:
    """Fixed 2-D sine-cosine position code, (gh*gw, dim): an initialisation that lets the ViT tell left from
    above from the first step instead of learning it."""
    assert dim % 4 == 0, f"hidden size {dim} must be divisible by 4 for 2-D sincos"
    ys, xs = torch.meshgrid(torch.arange(gh, dtype=torch.float32), torch.arange(gw, dtype=torch.float32),
                            indexing="ij")
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float32) / (dim // 4))
    out = [f(p.flatten()[:, None] * omega[None, :]) for p in (ys, xs) for f in (torch.sin, torch.cos)]
    return torch.cat(out, dim=1)  # (gh*gw, dim)


def set_special_tokens(model: VisionEncoderDecoderModel, tokenizer: PreTrainedTokenizerBase) -> None:
    """Make `tokenizer`'s special tokens the model's, in its config and its generation config: a caption starts
    with BOS (the decoder start token), ends with EOS, and is padded with PAD."""
    config = model.config
    config.decoder_start_token_id, config.pad_token_id = tokenizer.bos_token_id, tokenizer.pad_token_id
    config.eos_token_id = tokenizer.eos_token_id
    gen = model.generation_config
    gen.decoder_start_token_id, gen.bos_token_id = tokenizer.bos_token_id, tokenizer.bos_token_id
    gen.eos_token_id, gen.pad_token_id = tokenizer.eos_token_id, tokenizer.pad_token_id


def joined(encoder, decoder, tokenizer: PreTrainedTokenizerBase, seed: int = 0,
           max_new_tokens: int = 16) -> VisionEncoderDecoderModel:
    """A randomly initialised VisionEncoderDecoderModel of these encoder and decoder configs, its special tokens
    `tokenizer`'s (`set_special_tokens`)."""
    config = VisionEncoderDecoderConfig.from_encoder_decoder_configs(encoder, decoder)
    torch.manual_seed(seed)
    model = VisionEncoderDecoderModel(config)
    set_special_tokens(model, tokenizer)
    model.generation_config.max_new_tokens = max_new_tokens
    return model


def build_model(cfg: ModelConfig, tokenizer: PreTrainedTokenizerBase, seed: int = 0) -> VisionEncoderDecoderModel:
    """A randomly initialised ViT + GPT-2 captioner of preset `cfg` whose special tokens match `tokenizer`."""
    encoder = ViTConfig(hidden_size=cfg.hidden_size, num_hidden_layers=cfg.encoder_layers,
                        num_attention_heads=cfg.heads, intermediate_size=cfg.mlp_ratio * cfg.hidden_size,
                        image_size=cfg.image_size, patch_size=cfg.patch_size,
                        hidden_dropout_prob=cfg.dropout, attention_probs_dropout_prob=cfg.dropout)
    decoder = GPT2Config(n_embd=cfg.hidden_size, n_layer=cfg.decoder_layers, n_head=cfg.heads,
                         n_inner=cfg.mlp_ratio * cfg.hidden_size, vocab_size=len(tokenizer),
                         n_positions=cfg.max_positions, add_cross_attention=True, is_decoder=True,
                         resid_pdrop=cfg.dropout, embd_pdrop=cfg.dropout, attn_pdrop=cfg.dropout,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    # room for the longest caption the data has, plus EOS
    model = joined(encoder, decoder, tokenizer, seed, max_new_tokens=cfg.max_positions - 8)
    gh, gw = config_grid(model.config.encoder)
    with torch.no_grad():
        pos = model.encoder.embeddings.position_embeddings  # (1, 1 + gh*gw, D), CLS first
        pos[0, 1:] = _sincos_2d(gh, gw, cfg.hidden_size)
    return model


def image_processor(cfg: ModelConfig) -> ViTImageProcessorPil:
    h, w = (cfg.image_size, cfg.image_size) if isinstance(cfg.image_size, int) else cfg.image_size
    return ViTImageProcessorPil(size={"height": h, "width": w}, do_resize=True, do_rescale=True, do_normalize=True,
                             image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5])
