"""The model a site keeps: one standalone file holding the global partition, the site's local partition (and,
for Ditto, its personal copy of the global partition), the settings that rebuild the model and prepare its
input, and the SHA-256 of the backbone checkpoint. No frozen SAM weight is inside: the backbone is rebuilt from
its checkpoint, which must be the one the model was trained on."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..atomic import atomic_save, read_torch_file
from .backbones import backbone_sha256
from .checkpoints import CheckpointError
from .partition import GLOBAL, LOCAL, Partition, is_finite
from .pfedsam import ModelConfig, PFedSAM, build_pfedsam

KEPT_MODEL_FORMAT = "pfedsam_nvflare.kept_model/1"


class KeptModelError(ValueError):
    """A kept-model file is unreadable, incomplete, non-finite, or does not fit its backbone."""


@dataclass
class KeptModel:
    """``personal`` (Ditto only) replaces the global partition on the personalized path. ``preprocessing``:
    ``image_size``, ``axis``, ``clip_percentiles``, ``labels`` and ``nested``, as the data was prepared in
    training. ``about``: where the model comes from (site, method, rounds, the global model it was built on)."""

    config: ModelConfig
    global_state: dict[str, torch.Tensor]
    local_state: dict[str, torch.Tensor]
    personal_state: dict[str, torch.Tensor] | None
    preprocessing: dict[str, Any]
    about: dict[str, Any] = field(default_factory=dict)
    backbone_sha256: str | None = None

    @property
    def labels(self) -> list[str]:
        return list(self.preprocessing["labels"])

    def save(self, path: str | Path) -> Path:
        payload = {
            "format": KEPT_MODEL_FORMAT,
            "model": self.config.to_dict(),
            "global": self.global_state,
            "local": self.local_state,
            "personal": self.personal_state,
            "preprocessing": self.preprocessing,
            "about": self.about,
            "backbone_sha256": self.backbone_sha256,
        }
        return atomic_save(payload, Path(path))

    def build(self, checkpoint: str | Path | None = None, device: str = "cpu") -> tuple[PFedSAM, Partition]:
        """The model with its global and local partitions loaded. ``checkpoint`` overrides the path recorded in the
        settings (a site may keep the backbone elsewhere); its SHA-256 must match the recorded one."""
        config = self.config
        if checkpoint is not None:
            config = ModelConfig.from_dict({**config.to_dict(), "checkpoint": str(checkpoint)})
        actual = backbone_sha256(config.backbone, config.checkpoint)
        if actual != self.backbone_sha256:
            raise CheckpointError(
                f"the backbone checkpoint {config.checkpoint or '(bundled)'} has SHA-256 {actual}, but this model was "
                f"trained on {self.backbone_sha256}; pass the checkpoint it was trained on"
            )
        model = build_pfedsam(config).to(device)
        partition = Partition.of(model)
        partition.load(model, self.global_state, GLOBAL)
        partition.load(model, self.local_state, LOCAL)
        return model, partition


def _check_finite(states: dict[str, dict[str, torch.Tensor] | None], path: Path) -> None:
    for name, state in states.items():
        for key, value in (state or {}).items():
            if not isinstance(value, torch.Tensor):
                raise KeptModelError(f"{path}: {name} key {key!r} is not a tensor")
            if not is_finite(value):
                raise KeptModelError(f"{path}: {name} key {key!r} has non-finite values")


def load_kept_model(path: str | Path) -> KeptModel:
    """Read a kept-model file; every part must be there and every value finite."""
    path = Path(path)
    payload = read_torch_file(path, "model file", KeptModelError)
    if not isinstance(payload, dict) or payload.get("format") != KEPT_MODEL_FORMAT:
        raise KeptModelError(f"{path} is not a pfedsam_nvflare model file ({KEPT_MODEL_FORMAT})")
    try:
        kept = KeptModel(
            config=ModelConfig.from_dict(payload["model"]),
            global_state=dict(payload["global"]),
            local_state=dict(payload["local"]),
            personal_state=None if payload["personal"] is None else dict(payload["personal"]),
            preprocessing=dict(payload["preprocessing"]),
            about=dict(payload["about"]),
            backbone_sha256=payload["backbone_sha256"],
        )
        for key in ("image_size", "axis", "clip_percentiles", "labels", "nested"):
            kept.preprocessing[key]  # noqa: B018  (a missing setting is a KeyError, reported below)
    except (KeyError, TypeError, ValueError) as error:
        raise KeptModelError(f"model file {path} is incomplete: {type(error).__name__}: {error}") from error
    _check_finite({"global": kept.global_state, "local": kept.local_state, "personal": kept.personal_state}, path)
    return kept
