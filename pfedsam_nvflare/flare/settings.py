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


# DXO meta key under which the server sends the job's model settings with every global partition.
MODEL_META_KEY = "pfedsam_model"


def job_model(model: dict[str, Any] | None) -> dict[str, Any]:
    """A component's model settings in full (defaults filled in): what every component of a job must agree on."""
    return ModelConfig.from_dict(model or {}).to_dict()


def settings_mismatch(ours: dict[str, Any], theirs: Any, our_name: str, their_name: str) -> str | None:
    """None where two components of a job hold the same model settings; else one message naming every setting
    that differs with both values (a job folder holds one copy per component: an edit to one is a mismatch)."""
    if theirs == ours:
        return None
    if not isinstance(theirs, dict):
        return f"{their_name} carries no model settings ({theirs!r}) to compare with those of {our_name}"
    keys = sorted(key for key in set(ours) | set(theirs) if ours.get(key) != theirs.get(key))
    values = "; ".join(f"{key}: {ours.get(key)!r} in {our_name}, {theirs.get(key)!r} in {their_name}" for key in keys)
    return f"the job's copies of the model settings differ ({values}); make every copy in the job's config the same"


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
