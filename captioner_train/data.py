"""Caption datasets (COCO, Flickr Karpathy splits, synthetic scenes) and the batch collator.

Every dataset yields `(PIL RGB image, caption str)`; the collator turns a list of those into model inputs, so
real and synthetic data take exactly the same path into the model.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from captioner.images import read_image

from .synthetic import make_scene


class CocoCaptions(Dataset):
    """COCO captions format (`captions_train2017.json` + its image folder): one sample per caption."""

    def __init__(self, annotations: str | Path, image_dir: str | Path, limit: int | None = None):
        data = json.loads(Path(annotations).read_text())
        files = {img["id"]: img["file_name"] for img in data["images"]}
        self.image_dir = Path(image_dir)
        self.items = [(files[a["image_id"]], a["caption"].strip()) for a in data["annotations"]][:limit]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> tuple[np.ndarray, str]:
        """(image (H, W, 3) uint8 RGB, caption): decoded by `captioner.images.read_image`, as the Space decodes an
        upload (EXIF rotation applied, transparency on white), so the model trains on what it will be shown."""
        name, caption = self.items[i]
        return read_image(self.image_dir / name), caption


class FlickrCaptions(CocoCaptions):
    """Flickr8k/30k in Karpathy's split JSON (`dataset_flickr8k.json`): one sample per sentence of `split`."""

    def __init__(self, karpathy_json: str | Path, image_dir: str | Path, split: str = "train",
                 limit: int | None = None):
        data = json.loads(Path(karpathy_json).read_text())
        splits = {"train", "restval"} if split == "train" else {split}
        self.image_dir = Path(image_dir)
        self.items = [(img["filename"], s["raw"].strip()) for img in data["images"] if img["split"] in splits
                      for s in img["sentences"]][:limit]


class SyntheticScenes(Dataset):
    """Scenes rendered on the fly from their seeds (deterministic: index i is always seed seeds[i])."""

    def __init__(self, seeds: range):
        self.seeds = seeds

    def __len__(self) -> int:
        return len(self.seeds)

    def __getitem__(self, i: int) -> tuple[Image.Image, str]:
        scene = make_scene(self.seeds[i])
        return scene.image, scene.caption


class Collator:
    """Images -> `pixel_values`; captions -> `labels` padded to the longest in the batch (not the model maximum).

    labels: (B, T) caption tokens then EOS; padding is -100 so the loss skips it. The model builds its decoder
    inputs by shifting labels right behind the start token. Masking uses lengths, not the pad id, because GPT-2
    tokenizers pad with their EOS id, which must still be learnt once per caption.
    """

    def __init__(self, processor, tokenizer, max_tokens: int):
        self.processor, self.tokenizer, self.max_tokens = processor, tokenizer, max_tokens

    def __call__(self, batch: list[tuple[Image.Image, str]]) -> dict[str, torch.Tensor]:
        images, captions = zip(*batch)
        pixel_values = self.processor(images=list(images), return_tensors="pt")["pixel_values"]  # (B, 3, H, W)
        ids = self.tokenizer(list(captions), add_special_tokens=False)["input_ids"]
        ids = [seq[: self.max_tokens - 1] + [self.tokenizer.eos_token_id] for seq in ids]
        labels = torch.full((len(ids), max(map(len, ids))), -100, dtype=torch.long)  # (B, T)
        for row, seq in zip(labels, ids):
            row[: len(seq)] = torch.tensor(seq)
        return {"pixel_values": pixel_values, "labels": labels}
