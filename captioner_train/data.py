"""Caption datasets (COCO, Flickr Karpathy splits, synthetic scenes) and the batch collator.

Every dataset yields `(image, caption str)`, synthetic scenes optionally `(image, caption, objects)` with the
boxes of the words that name each object; the collator turns a list of those into model inputs, so real and
synthetic data take exactly the same path into the model.
"""
from __future__ import annotations

import json
import multiprocessing
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from captioner.images import read_image

from .pointing import cell_coverage
from .synthetic import IMAGE_SIZE, make_scene

# the words naming one object and its box: ((size, colour, shape word indices), (x0, y0, x1, y1))
Objects = tuple[tuple[tuple[int, ...], tuple[int, int, int, int]], ...]


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


def _rendered(seed: int) -> tuple[np.ndarray, str, Objects]:
    scene = make_scene(seed)
    return np.asarray(scene.image), scene.caption, tuple((o.phrase_indices, o.box) for o in scene.objects)


class SyntheticScenes(Dataset):
    """Scenes from their seeds (deterministic: index i is always seed seeds[i]).

    processes=0 renders each scene when it is asked for; processes=N renders all of them once, up front, on N
    processes and keeps them in memory (96x96 RGB: 27 kB a scene), so later epochs cost no rendering.
    objects=True adds each object's naming words and box as a third item (the grounding target).
    """

    def __init__(self, seeds: range, processes: int = 0, objects: bool = False, progress: bool = True):
        self.seeds, self.objects, self.rendered = seeds, objects, None
        if processes:
            self.rendered = np.empty((len(seeds), IMAGE_SIZE, IMAGE_SIZE, 3), np.uint8)
            self.captions, self.boxes = [""] * len(seeds), [()] * len(seeds)
            with multiprocessing.get_context("fork").Pool(processes) as pool:
                items = pool.imap(_rendered, seeds, chunksize=256)
                for i, (image, caption, boxes) in enumerate(tqdm(items, total=len(seeds), desc="render",
                                                                  disable=not progress, dynamic_ncols=True)):
                    self.rendered[i], self.captions[i], self.boxes[i] = image, caption, boxes

    def __len__(self) -> int:
        return len(self.seeds)

    def __getitem__(self, i: int) -> tuple:
        if self.rendered is not None:
            item = (self.rendered[i], self.captions[i], self.boxes[i])
        else:
            item = _rendered(self.seeds[i])
        return item if self.objects else item[:2]


class Collator:
    """Images -> `pixel_values`; captions -> `labels` padded to the longest in the batch (not the model maximum).

    labels: (B, T) caption tokens then EOS; padding is -100 so the loss skips it. The model builds its decoder
    inputs by shifting labels right behind the start token. Masking uses lengths, not the pad id, because GPT-2
    tokenizers pad with their EOS id, which must still be learnt once per caption.

    With `grid` (gh, gw) and samples that carry objects, also `ground` (B, T, gh*gw): for each token that names an
    object (row k of the decoder predicts token k), the share of each patch's area inside that object's box; zero
    rows elsewhere. Only for word-level tokenizers (one token per word): other samples get no target.
    """

    def __init__(self, processor, tokenizer, max_tokens: int, grid: tuple[int, int] | None = None):
        self.processor, self.tokenizer, self.max_tokens, self.grid = processor, tokenizer, max_tokens, grid

    def __call__(self, batch: list[tuple]) -> dict[str, torch.Tensor]:
        images, captions = [b[0] for b in batch], [b[1] for b in batch]
        pixel_values = self.processor(images=list(images), return_tensors="pt")["pixel_values"]  # (B, 3, H, W)
        ids = self.tokenizer(list(captions), add_special_tokens=False)["input_ids"]
        ids = [seq[: self.max_tokens - 1] + [self.tokenizer.eos_token_id] for seq in ids]
        labels = torch.full((len(ids), max(map(len, ids))), -100, dtype=torch.long)  # (B, T)
        for row, seq in zip(labels, ids):
            row[: len(seq)] = torch.tensor(seq)
        out = {"pixel_values": pixel_values, "labels": labels}
        if self.grid is not None and all(len(b) == 3 for b in batch):
            ground = torch.zeros(*labels.shape, self.grid[0] * self.grid[1])  # (B, T, gh*gw)
            for b, ((_, caption, objects), seq) in enumerate(zip(batch, ids)):
                if len(seq) - 1 != len(caption.split()):
                    continue  # not one token per word: the word indices do not name rows
                for words, box in objects:
                    cover = torch.from_numpy(cell_coverage(self.grid, box, (IMAGE_SIZE, IMAGE_SIZE)).ravel())
                    for k in words:
                        if k < len(seq) - 1:
                            ground[b, k] = cover
            out["ground"] = ground
        return out
