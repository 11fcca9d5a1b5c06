"""How a case becomes model input, and how the model's output goes back to the case's own grid. Training,
evaluation and prediction all use these functions, so a slice is always prepared the same way.

A case is clipped to its intensity percentiles and scaled to [0, 1] (LiteMedSAM's min-max input); a 3D volume
is cut into 2D planes along one spatial axis; each plane is padded to a square (keeping its aspect ratio) and
resized to the backbone's input size. ``from_model_grid`` undoes the resize and the padding.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from monai.transforms import Resize, SpatialPad


@dataclass(frozen=True)
class SliceOptions:
    """How cases become model samples. ``axis`` is the spatial axis 3D volumes are cut along;
    ``empty_slice_fraction`` keeps that share of the slices without foreground (all by default); the site
    applies it to its training slices only."""

    image_size: int = 256
    axis: int = 2
    empty_slice_fraction: float = 1.0
    clip_percentiles: tuple[float, float] = (0.5, 99.5)

    def __post_init__(self) -> None:
        if self.axis not in (0, 1, 2):
            raise ValueError(f"axis must be 0, 1 or 2, got {self.axis}")
        if not 0.0 <= self.empty_slice_fraction <= 1.0:
            raise ValueError(f"empty_slice_fraction must be within [0, 1], got {self.empty_slice_fraction}")


def normalise(image: np.ndarray, percentiles: tuple[float, float]) -> np.ndarray:
    """Clip a whole case to its intensity percentiles and scale it to [0, 1] (LiteMedSAM's min-max input)."""
    low, high = np.percentile(image, percentiles)
    if high <= low:
        return np.zeros_like(image)
    return (np.clip(image, low, high) - low) / (high - low)


def planes(array: np.ndarray, axis: int) -> Iterator[np.ndarray]:
    """2D planes (channels, H, W) of a (channels, *spatial) array; a 2D array is its own single plane."""
    if array.ndim == 3:
        yield array
        return
    moved = np.moveaxis(array, axis + 1, 1)
    for index in range(moved.shape[1]):
        yield moved[:, index]


def stack_planes(parts: list[np.ndarray], axis: int, spatial_dims: int) -> np.ndarray:
    """The inverse of ``planes``: (channels, *spatial) from its planes (channels, H, W)."""
    if spatial_dims == 2:
        (plane,) = parts
        return plane
    return np.moveaxis(np.stack(parts, axis=1), 1, axis + 1)


def _padding(height: int, width: int) -> tuple[int, int, int]:
    """Side of the square, and the rows and columns ``SpatialPad`` adds before the plane."""
    side = max(height, width)
    return side, (side - height) // 2, (side - width) // 2


def to_model_grid(plane: np.ndarray, size: int, mode: str) -> torch.Tensor:
    """Pad a plane (C, H, W) to a square, then resize it to (C, size, size): ``bilinear`` (anti-aliased) for
    images, ``nearest`` for masks. A plain tensor: MONAI's ``MetaTensor`` would route every operation of the model
    through its metadata handling."""
    side, _, _ = _padding(*plane.shape[1:])
    square = SpatialPad((side, side))(torch.from_numpy(np.ascontiguousarray(plane)))
    resized = Resize((size, size), mode=mode, **({"anti_aliasing": True} if mode == "bilinear" else {}))(square)
    return torch.as_tensor(resized).as_subclass(torch.Tensor).float()


def model_input(plane: np.ndarray, size: int) -> torch.Tensor:
    """A normalised image plane (C, H, W) as the model takes it: (C, size, size) in [0, 1]."""
    return to_model_grid(plane, size, "bilinear").clamp(0, 1)


def from_model_grid(logits: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Logits (B, K, S, S) on the model grid back to the plane's own (B, K, height, width): resized to the padded
    square (bilinearly, before any threshold), then the padding cut away."""
    side, top, left = _padding(height, width)
    square = F.interpolate(torch.as_tensor(logits).float(), size=(side, side), mode="bilinear", align_corners=False)
    return square[..., top : top + height, left : left + width]
