"""The end of a site's federation: the model it keeps, written as one standalone file, and its scores on the
site's own cases, computed from that file (so the reported numbers are those of the file)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..data.layout import Case, Labels
from ..data.preprocess import SliceOptions
from ..model.backbones import backbone_sha256
from ..model.kept import KeptModel, load_kept_model
from ..training import LocalTrainer
from .evaluate import Evaluation, evaluate_cases
from .segment import Segmenter


def keep_model(
    trainer: LocalTrainer,
    global_state: Any,
    labels: Labels,
    options: SliceOptions,
    about: dict[str, Any],
    should_abort: Callable[[], bool] = lambda: False,
) -> KeptModel:
    """The model the site keeps with ``global_state``: that global partition, and the site's own part fitted to it
    by one more local phase (``LocalTrainer.personalize``)."""
    personalized = trainer.personalize(global_state, should_abort)
    config = trainer.model_config
    return KeptModel(
        config=config,
        global_state=personalized.global_state,
        local_state=personalized.local_state,
        personal_state=personalized.personal_state,
        preprocessing={
            "image_size": options.image_size,
            "axis": options.axis,
            "clip_percentiles": list(options.clip_percentiles),
            "labels": list(labels.names),
            "nested": labels.nested,
        },
        about={"method": trainer.method.name, "rounds_done": personalized.rounds_done, **about},
        backbone_sha256=backbone_sha256(config.backbone, config.checkpoint),
    )


def evaluate_model_file(
    path: str | Path,
    case_sets: dict[str, list[Case]],
    labels: Labels,
    *,
    device: str = "cpu",
    batch_size: int = 4,
    precision: str = "auto",
) -> dict[str, Evaluation]:
    """Load a kept-model file once and score both of its paths on each named set of cases."""
    segmenter = Segmenter(load_kept_model(path), device=device, batch_size=batch_size, precision=precision)
    return {name: evaluate_cases(segmenter, cases, labels) for name, cases in case_sets.items()}
