"""Dice and HD95 of binary masks (B, K, H, W), from MONAI, averaged over the cases that have foreground."""

from __future__ import annotations

import math
import warnings

import torch
from monai.metrics import compute_dice, compute_hausdorff_distance


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
        with warnings.catch_warnings():
            # empty masks are handled below; MONAI's own deprecation notice is not ours to act on
            warnings.filterwarnings("ignore", message=".* is all 0, this may result in nan/inf distance")
            warnings.filterwarnings("ignore", message=".*always_return_as_numpy", category=FutureWarning)
            hd95 = compute_hausdorff_distance(predictions, targets, include_background=True, percentile=95)
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
