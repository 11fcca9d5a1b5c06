"""What the server and the sites both derive from a job's settings: the model of a method, its partition
and its initial global partition."""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import torch

from ..model import ModelConfig, Partition, build_pfedsam
from ..model.partition import GLOBAL
from ..training.methods import get_method

# DXO meta key under which a site reports its round metrics (numbers only, never data).
METRICS_META_KEY = "pfedsam_metrics"
# DXO meta key under which ``GaussianPrivacy`` reports the privacy a site has spent.
PRIVACY_META_KEY = "pfedsam_privacy"


def model_config_for(model: dict[str, Any] | None, method: str) -> ModelConfig:
    return get_method(method).model_config(ModelConfig.from_dict(model or {}))


@dataclass(frozen=True)
class Reference:
    partition: Partition
    initial_global: dict[str, torch.Tensor]


@lru_cache(maxsize=4)
def reference(config: ModelConfig) -> Reference:
    """The partition and initial global partition of ``config``'s model, built once per process."""
    model = build_pfedsam(config)
    partition = Partition.of(model)
    return Reference(partition, partition.state(model, GLOBAL))
