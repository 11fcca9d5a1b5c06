"""A site's samples, checked once and kept in memory, with the frozen encoder prefix cached.

Everything before the first trainable encoder step never changes, so its output is computed once per
image (``PFedSAM.encode_prefix``) and each training step runs only the adapted rest. This is why samples
must be deterministic: random pixel-space augmentation cannot be combined with the cache.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..model import PFedSAM

logger = logging.getLogger(__name__)


@dataclass
class Batch:
    indices: torch.Tensor
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
    """Validated samples of one dataset for one model; ``batches`` yields them ready for the model."""

    def __init__(self, dataset: Any, model: PFedSAM, *, cache_prefix: bool, name: str) -> None:
        if len(dataset) == 0:
            raise ValueError(f"the {name} set is empty")
        self.model, self.name = model, name
        self.cache_prefix = cache_prefix and model.cache_start > 0
        images, self.masks = self._read(dataset)
        if self.cache_prefix:
            logger.info("%s set: caching the frozen encoder prefix of %d images", name, len(images))
            self._inputs = self._encode(images)
        else:
            self._inputs = images

    def __len__(self) -> int:
        return len(self.masks)

    def _read(self, dataset: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """Every sample, checked: shapes fit the model, images in [0, 1], masks of 0 and 1."""
        size, labels = self.model.image_size, self.model.config.num_labels
        images, masks = [], []
        for index in range(len(dataset)):
            image, mask = _image_and_mask(dataset[index], index)
            if mask.dim() == 2:
                mask = mask.unsqueeze(0)
            if image.dim() != 3 or image.shape[0] not in (1, 3) or tuple(image.shape[1:]) != (size, size):
                raise ValueError(
                    f"{self.name} sample {index}: image of shape {tuple(image.shape)}, expected (1 or 3, {size}, {size})"
                )
            if tuple(mask.shape) != (labels, size, size):
                raise ValueError(
                    f"{self.name} sample {index}: mask of shape {tuple(mask.shape)}, expected ({labels}, {size}, {size})"
                )
            if not torch.isfinite(image).all() or image.min() < 0 or image.max() > 1:
                raise ValueError(f"{self.name} sample {index}: image values must be finite and within [0, 1]")
            if not ((mask == 0) | (mask == 1)).all():
                raise ValueError(f"{self.name} sample {index}: mask values must be 0 or 1")
            images.append(image.float())
            masks.append(mask.float())
        if len({image.shape[0] for image in images}) > 1:  # grey and colour mixed: store all as colour
            images = [image.expand(3, -1, -1) for image in images]
        return torch.stack(images), torch.stack(masks)

    @torch.no_grad()
    def _encode(self, images: torch.Tensor, chunk: int = 8) -> torch.Tensor:
        device = self.model.pixel_mean.device
        return torch.cat([self.model.encode_prefix(images[i : i + chunk].to(device)).cpu() for i in range(0, len(images), chunk)])

    def batches(self, batch_size: int, generator: torch.Generator | None = None) -> Iterator[Batch]:
        """Batches in a shuffled order drawn from ``generator``, or in dataset order without one."""
        order = torch.randperm(len(self), generator=generator) if generator is not None else torch.arange(len(self))
        device = self.model.pixel_mean.device
        for start in range(0, len(order), batch_size):
            indices = order[start : start + batch_size]
            inputs = self._inputs[indices].to(device)
            masks = self.masks[indices].to(device)
            boxes = boxes_from_masks(masks).to(device) if self.model.config.prompt == "box" else None
            yield Batch(
                indices=indices,
                images=None if self.cache_prefix else inputs,
                prefix=inputs if self.cache_prefix else None,
                masks=masks,
                boxes=boxes,
            )
