"""Scoring a kept model on a site's cases as a clinician reads it: per case (the whole volume, empty slices
included), per label, Dice and HD95 in the file's units (millimetres for NIfTI and NRRD, pixels for PNG)."""

from __future__ import annotations

import csv
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..data.layout import Case, DataError, Labels
from ..data.reading import read_case
from ..training.metrics import case_scores
from ..model.pfedsam import PATHS
from .segment import Segmenter

logger = logging.getLogger(__name__)
METRICS = ("dice", "hd95")


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else math.nan


@dataclass
class Evaluation:
    """``scores[path][case][metric]``: one value per label."""

    labels: list[str]
    scores: dict[str, dict[str, dict[str, list[float]]]] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        """Per path and metric: the mean over cases of each label, and the mean over labels."""
        result: dict[str, Any] = {"labels": list(self.labels), "cases": 0}
        for path, cases in self.scores.items():
            result["cases"] = len(cases)
            result[path] = {}
            for metric in METRICS:
                per_label = {
                    label: _mean([values[metric][k] for values in cases.values()]) for k, label in enumerate(self.labels)
                }
                result[path][metric] = {**per_label, "mean": _mean(list(per_label.values()))}
        return result

    def write_csv(self, path: str | Path) -> Path:
        """One row per case, path and label."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["case", "model", "label", "dice", "hd95"])
            for model_path, cases in self.scores.items():
                for case, values in sorted(cases.items()):
                    for k, label in enumerate(self.labels):
                        writer.writerow([case, model_path, label, f"{values['dice'][k]:.6f}", f"{values['hd95'][k]:.6f}"])
        return path


def evaluate_cases(
    segmenter: Segmenter, cases: list[Case], labels: Labels, paths: tuple[str, ...] = PATHS
) -> Evaluation:
    """Segment every case whole with each path of ``segmenter`` and score it against its mask."""
    trained_on = Labels(tuple(segmenter.kept.labels), bool(segmenter.kept.preprocessing["nested"]))
    if labels != trained_on:
        raise DataError(f"the data's labels {labels} are not the labels the model was trained on: {trained_on}")
    evaluation = Evaluation(list(labels.names), {path: {} for path in paths})
    for index, case in enumerate(cases, start=1):
        data = read_case(case, labels)
        truth = torch.from_numpy(labels.channels(data.label_map))
        logits = segmenter.logits(data.image, paths, prompt_masks=truth.numpy())
        for path in paths:
            dice, hd95 = case_scores(logits[path] > 0, truth, data.spacing)
            evaluation.scores[path][case.name] = {"dice": dice, "hd95": hd95}
        logger.info(
            "evaluated case %s (%d/%d): %s", case.name, index, len(cases),
            ", ".join(f"{path} Dice {_mean(evaluation.scores[path][case.name]['dice']):.3f}" for path in paths),
        )
    return evaluation
