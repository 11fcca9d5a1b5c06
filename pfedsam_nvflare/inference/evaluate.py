"""Scoring a kept model on a site's cases as a clinician reads it: per case (the whole volume, empty slices
included), per label, Dice and HD95 in the file's units (millimetres for NIfTI and NRRD, pixels for PNG)."""

from __future__ import annotations

import csv
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..data.layout import Case, DataError, Labels
from ..data.preprocess import normalise
from ..data.reading import read_case
from ..reports import plot_overlays
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


def plot_worst_and_best(
    segmenter: Segmenter, cases: list[Case], labels: Labels, evaluation: Evaluation, path: Path, model_path: str = PATHS[0]
) -> Path | None:
    """The case with the lowest and the one with the highest mean Dice of ``model_path``, each at its slice with the
    most foreground, with true and predicted outlines; None without cases."""
    scores = evaluation.scores.get(model_path, {})
    if not scores:
        return None
    ranked = sorted(scores, key=lambda name: (_mean(scores[name]["dice"]), name))
    chosen = {"worst": ranked[0], "best": ranked[-1]} if len(ranked) > 1 else {"only": ranked[0]}
    by_name = {case.name: case for case in cases}
    images, masks, predictions, captions = [], [], [], []
    for role, name in chosen.items():
        data = read_case(by_name[name], labels)
        truth = labels.channels(data.label_map)
        found = segmenter.logits(data.image, (model_path,), prompt_masks=truth)[model_path].numpy() > 0
        image = normalise(data.image, segmenter.clip_percentiles)
        if data.image.ndim == 4:  # a volume: the slice along the model's axis with the most foreground
            axis = segmenter.axis + 1
            others = tuple(i for i in range(1, truth.ndim) if i != axis)
            index = int(truth.sum(axis=(0, *others)).argmax())
            image, truth, found = (np.take(a, index, axis=axis) for a in (image, truth, found))
            name = f"{name} slice {index}"
        images.append(torch.from_numpy(np.ascontiguousarray(image)).float())
        masks.append(torch.from_numpy(np.ascontiguousarray(truth)))
        predictions.append(torch.from_numpy(np.ascontiguousarray(found)))
        captions.append(f"{role}: {name}, Dice {_mean(scores[chosen[role]]['dice']):.3f}")
    return plot_overlays(images, masks, predictions, path, f"{model_path} model", captions)
