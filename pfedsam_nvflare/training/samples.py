"""A dataset's samples for one model: checked once, their model inputs kept on disk (``FeatureCache``), read back
batch by batch, so that memory does not grow with the number of samples.

Everything before the first trainable encoder step never changes, so its output is computed once per image
(``PFedSAM.encode_prefix``) and each training step runs only the adapted rest. This is why samples must be
deterministic: random pixel-space augmentation cannot be combined with the cache.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..model import PFedSAM
from .feature_cache import FeatureCache, content_key

logger = logging.getLogger(__name__)


@dataclass
class Batch:
    images: torch.Tensor | None  # (B, C, S, S) in [0, 1], or None where ``prefix`` is cached
    prefix: torch.Tensor | None
    masks: torch.Tensor  # (B, K, S, S) of 0/1
    boxes: torch.Tensor | None  # (B, 4) x0, y0, x1, y1, only in box-prompt mode

    def model_inputs(self) -> dict[str, torch.Tensor | None]:
        return {"images": self.images, "boxes": self.boxes, "prefix": self.prefix}


def boxes_from_masks(masks: torch.Tensor) -> torch.Tensor:
    """The bounding box of all foreground labels of each mask; the whole image where there is none."""
    foreground = masks.amax(dim=1) > 0  # (B, H, W)
    height, width = foreground.shape[-2:]
    boxes = []
    for plane in foreground:
        rows, cols = plane.any(dim=1).nonzero(), plane.any(dim=0).nonzero()
        if rows.numel() == 0:
            boxes.append([0.0, 0.0, width - 1.0, height - 1.0])
        else:
            boxes.append([float(cols.min()), float(rows.min()), float(cols.max()), float(rows.max())])
    return torch.tensor(boxes)


def _image_and_mask(item: Any, index: int) -> tuple[torch.Tensor, torch.Tensor]:
    if isinstance(item, dict):
        if "image" not in item or "mask" not in item:
            raise ValueError(f"sample {index}: a dict sample needs 'image' and 'mask', got keys {sorted(item)}")
        return torch.as_tensor(item["image"]), torch.as_tensor(item["mask"])
    if isinstance(item, Sequence) and len(item) >= 2:
        return torch.as_tensor(item[0]), torch.as_tensor(item[1])
    raise ValueError(f"sample {index}: expected (image, mask) or {{'image', 'mask'}}, got {type(item).__name__}")


class SampleStore:
    """Validated samples of one dataset for one model; ``batches`` yields them ready for the model. Only their
    cache keys stay in memory."""

    def __init__(self, dataset: Any, model: PFedSAM, cache: FeatureCache, *, name: str, chunk: int = 4) -> None:
        if len(dataset) == 0:
            raise ValueError(f"the {name} set is empty")
        self.model, self.cache, self.name = model, cache, name
        self.cache_prefix = cache.end > 0
        self.keys = self._fill(dataset, chunk)

    def __len__(self) -> int:
        return len(self.keys)

    def _checked(self, item: Any, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """One sample, checked: shapes fit the model, image in [0, 1], mask of 0 and 1."""
        size, labels = self.model.image_size, self.model.config.num_labels
        image, mask = _image_and_mask(item, index)
        if mask.dim() == 2:
            mask = mask.unsqueeze(0)
        if image.dim() != 3 or image.shape[0] not in (1, 3) or tuple(image.shape[1:]) != (size, size):
            raise ValueError(f"{self.name} sample {index}: image of shape {tuple(image.shape)}, expected (1 or 3, {size}, {size})")
        if tuple(mask.shape) != (labels, size, size):
            raise ValueError(f"{self.name} sample {index}: mask of shape {tuple(mask.shape)}, expected ({labels}, {size}, {size})")
        if not torch.isfinite(image).all() or image.min() < 0 or image.max() > 1:
            raise ValueError(f"{self.name} sample {index}: image values must be finite and within [0, 1]")
        if not ((mask == 0) | (mask == 1)).all():
            raise ValueError(f"{self.name} sample {index}: mask values must be 0 or 1")
        # plain tensors (not MONAI's MetaTensor), grey as colour: one kind and shape for every entry
        return image.as_subclass(torch.Tensor).float().expand(3, -1, -1), mask.as_subclass(torch.Tensor).float()

    def _fill(self, dataset: Any, chunk: int) -> list[str]:
        """Every sample's key, in dataset order; the entries not yet in the cache are computed, ``chunk`` at a time."""
        keys: list[str] = []
        pending: list[tuple[str, torch.Tensor, torch.Tensor]] = []
        added = 0
        for index in range(len(dataset)):
            image, mask = self._checked(dataset[index], index)
            key = content_key(image, mask)
            keys.append(key)
            if not self.cache.has(key) and key not in {k for k, _, _ in pending}:
                pending.append((key, image, mask))
            if len(pending) == chunk or (pending and index == len(dataset) - 1):
                self.cache.store([k for k, _, _ in pending], torch.stack([i for _, i, _ in pending]), torch.stack([m for _, _, m in pending]))
                added += len(pending)
                pending.clear()
        what = "frozen encoder prefix" if self.cache_prefix else "images"
        logger.info(
            "%s set: %d samples, %s of %d computed now, %d found in %s",
            self.name, len(keys), what, added, len(keys) - added, self.cache.folder,
        )
        return keys

    def batches(self, batch_size: int, generator: torch.Generator | None = None) -> Iterator[Batch]:
        """Batches in a shuffled order drawn from ``generator``, or in dataset order without one."""
        order = torch.randperm(len(self), generator=generator) if generator is not None else torch.arange(len(self))
        for start in range(0, len(order), batch_size):
            yield self.batch(order[start : start + batch_size].tolist())

    def batch(self, indices: list[int]) -> Batch:
        """The samples at ``indices``, ready for the model."""
        device = self.model.pixel_mean.device
        entries = [self.cache.load(self.keys[i]) for i in indices]
        inputs = torch.stack([inputs for inputs, _ in entries]).to(device)
        masks = torch.stack([mask for _, mask in entries]).to(device)
        boxes = boxes_from_masks(masks).to(device) if self.model.config.prompt == "box" else None
        return Batch(
            images=None if self.cache_prefix else inputs,
            prefix=inputs if self.cache_prefix else None,
            masks=masks,
            boxes=boxes,
        )
