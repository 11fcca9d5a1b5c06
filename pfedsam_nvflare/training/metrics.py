"""Dice and HD95 from MONAI: per 2D slice on the model grid for the training curves (``SegmentationScores``), and
per whole case in the case's own geometry and units for reported results (``case_scores``)."""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence

import torch
from monai.metrics import compute_dice, compute_hausdorff_distance


_MONAI_NOTICES = (
    # empty masks are handled by the callers; MONAI's own deprecation notice is not ours to act on
    ".* is all 0, this may result in nan/inf distance",
    ".*always_return_as_numpy",
)


def _hd95(predictions: torch.Tensor, targets: torch.Tensor, spacing: Sequence[float] | None = None) -> torch.Tensor:
    with warnings.catch_warnings():
        for message in _MONAI_NOTICES:
            warnings.filterwarnings("ignore", message=message)
        return compute_hausdorff_distance(predictions, targets, include_background=True, percentile=95, spacing=spacing)


class SegmentationScores:
    """Accumulates per-image, per-label Dice and HD95 (in pixels of the model's input grid).

    A label whose ground truth is empty in an image is left out of that label's averages. Where the ground
    truth has foreground but the prediction is empty, MONAI's HD95 is undefined; it counts as the image
    diagonal, the worst distance possible, so that missed structures are not silently ignored.
    """

    def __init__(self) -> None:
        self._dice: list[torch.Tensor] = []
        self._hd95: list[torch.Tensor] = []

    def update(self, predictions: torch.Tensor, targets: torch.Tensor) -> None:
        predictions, targets = predictions.float().cpu(), targets.float().cpu()
        dice = compute_dice(predictions, targets, include_background=True, ignore_empty=True)
        hd95 = _hd95(predictions, targets)
        has_target = targets.flatten(2).sum(-1) > 0
        missed = has_target & (predictions.flatten(2).sum(-1) == 0)
        diagonal = math.hypot(*targets.shape[-2:])
        hd95 = torch.where(missed, torch.full_like(hd95, diagonal), hd95)
        hd95 = torch.where(has_target, hd95, torch.full_like(hd95, float("nan")))
        self._dice.append(dice)
        self._hd95.append(hd95)

    def result(self) -> dict[str, float]:
        """Mean Dice and HD95 over labels (each label averaged over its images first); NaN if nothing counted."""
        if not self._dice:
            return {"dice": float("nan"), "hd95": float("nan")}
        dice, hd95 = torch.cat(self._dice), torch.cat(self._hd95)
        return {"dice": _mean_over_labels(dice), "hd95": _mean_over_labels(hd95)}


def _mean_over_labels(values: torch.Tensor) -> float:
    per_label = values.nanmean(dim=0)
    return float(per_label.nanmean()) if not torch.isnan(per_label).all() else float("nan")


def case_scores(prediction: torch.Tensor, truth: torch.Tensor, spacing: Sequence[float]) -> tuple[list[float], list[float]]:
    """Dice and HD95 per label of one whole case: masks (K, *spatial) of 0/1, every slice included (so false
    positives on slices without the structure count), HD95 in the units of ``spacing`` (mm for NIfTI and NRRD).

    A label absent from both truth and prediction scores Dice 1 and HD95 0; present in only one of them, Dice 0
    and HD95 the case's diagonal, the worst distance possible. Axes of size 1 (a single-slice volume) are dropped
    before the distances: a surface along them would make every voxel an edge.
    """
    kept_axes = [axis for axis, size in enumerate(truth.shape[1:]) if size > 1] or [0]
    shape = [truth.shape[0], *(truth.shape[1 + axis] for axis in kept_axes)]
    spacing = [float(spacing[axis]) for axis in kept_axes]
    prediction, truth = prediction.float().reshape(shape).unsqueeze(0), truth.float().reshape(shape).unsqueeze(0)
    dice = compute_dice(prediction, truth, include_background=True, ignore_empty=False)[0]
    hd95 = _hd95(prediction, truth, spacing=spacing)[0]
    has_truth, has_prediction = truth[0].flatten(1).any(1), prediction[0].flatten(1).any(1)
    diagonal = math.hypot(*(size * step for size, step in zip(shape[1:], spacing)))
    hd95 = torch.where(has_truth & has_prediction, hd95, torch.full_like(hd95, diagonal))
    hd95 = torch.where(~has_truth & ~has_prediction, torch.zeros_like(hd95), hd95)
    return dice.tolist(), hd95.tolist()
