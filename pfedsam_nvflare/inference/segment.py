"""Segmenting whole images with a kept model: each plane prepared exactly as in training, the logits brought
back to the plane's own size before they are thresholded, the planes stacked back into the image's grid."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch

from ..data.preprocess import from_model_grid, model_input, normalise, planes, stack_planes, to_model_grid
from ..model.kept import KeptModel
from ..model.partition import GLOBAL
from ..model.pfedsam import PATHS
from ..training.compute import autocast, place, resolve_device, resolve_precision
from ..training.samples import boxes_from_masks


class Segmenter:
    """A kept model's ``personalized`` path (its experts, or Ditto's personal copy) and its ``global``-only path,
    run on ``device`` in ``precision`` (as ``TrainerConfig``'s: ``auto`` is bfloat16 where it is native)."""

    def __init__(
        self,
        kept: KeptModel,
        *,
        checkpoint: str | Path | None = None,
        device: str | torch.device = "cpu",
        batch_size: int = 4,
        precision: str = "auto",
    ) -> None:
        self.kept, self.batch_size = kept, batch_size
        self.device = resolve_device(str(device))
        self.precision = resolve_precision(precision, self.device)
        model, self.partition = kept.build(checkpoint, self.device)
        self.model = place(model, self.device)
        self.model.eval()
        settings = kept.preprocessing
        self.image_size, self.axis = int(settings["image_size"]), int(settings["axis"])
        self.clip_percentiles = tuple(settings["clip_percentiles"])
        self._loaded = "global"  # which global-partition weights the model holds

    def _path(self, path: str):
        """The model set up for ``path``: Ditto's personal copy swapped in where there is one, experts on or off."""
        wanted = "personal" if path == "personalized" and self.kept.personal_state is not None else "global"
        if wanted != self._loaded:
            state = self.kept.personal_state if wanted == "personal" else self.kept.global_state
            self.partition.load(self.model, state, GLOBAL)
            self._loaded = wanted
        return nullcontext() if path == "personalized" else self.model.global_only()

    @torch.no_grad()
    def grid_logits(
        self, inputs: torch.Tensor, paths: tuple[str, ...] = PATHS, boxes: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        """Logits (B, K, S, S) on the model's grid, per path, of model inputs (B, C, S, S) in [0, 1]; the frozen
        prefix is computed once for all paths."""
        inputs = inputs.to(self.device)
        boxes = None if boxes is None else boxes.to(self.device)
        with autocast(self.device, self.precision):
            prefix = self.model.encode_prefix(inputs)
        out = {}
        for path in paths:
            # the weights are swapped outside autocast: inside, it would reuse the cast copies of the ones before
            with self._path(path), autocast(self.device, self.precision):
                out[path] = self.model(prefix=prefix, boxes=boxes).float().cpu()
        return out

    @torch.no_grad()
    def logits(
        self,
        image: np.ndarray,
        paths: tuple[str, ...] = PATHS,
        prompt_masks: np.ndarray | None = None,
        on_planes: Callable[[int], None] | None = None,
    ) -> dict[str, torch.Tensor]:
        """Logits (K, *spatial) on ``image``'s own grid, per path. ``image``: (C, *spatial) as read from the file.
        In box-prompt mode the box of each plane comes from ``prompt_masks`` (K, *spatial), as in training.
        ``on_planes`` is told how many planes each batch segmented (a progress bar)."""
        box_mode = self.model.config.prompt == "box"
        if box_mode and prompt_masks is None:
            raise ValueError("a box-prompt model needs masks to draw its boxes from")
        image_planes = list(planes(normalise(image, self.clip_percentiles), self.axis))
        mask_planes = list(planes(prompt_masks, self.axis)) if box_mode else [None] * len(image_planes)
        height, width = image_planes[0].shape[1:]
        out: dict[str, list[torch.Tensor]] = {path: [] for path in paths}
        for start in range(0, len(image_planes), self.batch_size):
            chunk = slice(start, start + self.batch_size)
            inputs = torch.stack([model_input(plane, self.image_size) for plane in image_planes[chunk]])
            boxes = None
            if box_mode:
                grid = torch.stack([to_model_grid(m, self.image_size, "nearest") for m in mask_planes[chunk]])
                boxes = boxes_from_masks(grid)
            for path, grid_logits in self.grid_logits(inputs, paths, boxes).items():
                out[path].extend(from_model_grid(grid_logits, height, width))
            if on_planes is not None:
                on_planes(len(inputs))
        spatial_dims = image.ndim - 1
        return {
            path: torch.from_numpy(stack_planes([p.numpy() for p in values], self.axis, spatial_dims))
            for path, values in out.items()
        }
