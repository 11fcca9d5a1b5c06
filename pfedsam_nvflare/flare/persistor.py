"""Server persistence of the global partition only (never a frozen or local key), and the locator that
hands the saved models to FLARE's evaluation workflows."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from nvflare.apis.dxo import DXO
from nvflare.apis.event_type import EventType
from nvflare.apis.fl_context import FLContext
from nvflare.app_common.abstract.model import ModelLearnable, ModelLearnableKey, make_model_learnable, model_learnable_to_dxo
from nvflare.app_common.abstract.model_locator import ModelLocator
from nvflare.app_common.abstract.model_persistor import ModelPersistor
from nvflare.app_common.app_constant import AppConstants, DefaultCheckpointFileName
from nvflare.app_common.app_event_type import AppEventType
from nvflare.app_common.model_desc import ModelDescriptor

from ..atomic import atomic_save, read_torch_file
from .settings import MODEL_META_KEY, job_model, model_config_for, reference


class GlobalPartitionPersistor(ModelPersistor):
    """Starts the job from the initial global partition of the configured model, or from ``initial_global`` (a
    global partition an earlier job saved, to continue that federation), and saves the latest and the best global
    partition as ``{"global": {key: tensor}, "model": settings, "method": method, "rounds_done": n}`` in the
    server's app folder; ``rounds_done`` counts the federation's rounds behind it, over continued jobs too."""

    def __init__(
        self,
        model: dict[str, Any] | None = None,
        method: str = "pfedsam",
        global_model_file_name: str = DefaultCheckpointFileName.GLOBAL_MODEL,
        best_global_model_file_name: str = DefaultCheckpointFileName.BEST_GLOBAL_MODEL,
        initial_global: str | None = None,
    ):
        super().__init__()
        self.model, self.method, self.initial_global = model, method, initial_global
        self.global_model_file_name = global_model_file_name
        self.best_global_model_file_name = best_global_model_file_name
        self._folder: Path | None = None
        self._rounds_before = 0  # rounds of the federation that ``initial_global`` already holds

    @property
    def _reference(self):
        return reference(model_config_for(self.model, self.method))

    def handle_event(self, event_type: str, fl_ctx: FLContext) -> None:
        if event_type == EventType.START_RUN:
            workspace = fl_ctx.get_engine().get_workspace()
            self._folder = Path(workspace.get_app_dir(fl_ctx.get_job_id()))
        elif event_type == AppEventType.GLOBAL_BEST_MODEL_AVAILABLE:
            learnable = fl_ctx.get_prop(AppConstants.GLOBAL_MODEL)
            if learnable:
                # the model the sites scored was sent at the start of this round
                path = self._write(learnable, self.best_global_model_file_name, _round(fl_ctx))
                self.log_info(fl_ctx, f"saved the best global partition to {path}")

    def load_model(self, fl_ctx: FLContext) -> ModelLearnable:
        if self.initial_global:
            weights = {key: value.numpy() for key, value in self._continued().items()}
            self.log_info(
                fl_ctx,
                f"initial global partition: {len(weights)} keys from {self.initial_global} "
                f"(after round {self._rounds_before} of the federation)",
            )
        else:
            weights = {key: value.numpy() for key, value in self._reference.initial_global.items()}
            self.log_info(fl_ctx, f"initial global partition: {len(weights)} keys of the pretrained model")
        return make_model_learnable(weights, {MODEL_META_KEY: job_model(self.model)})

    def _continued(self) -> dict[str, torch.Tensor]:
        """The global partition of ``initial_global``, refused unless it was saved for this job's model settings
        and method and fits their partition exactly, with finite values."""
        path = Path(self.initial_global)
        saved = read_saved(path)
        expected = model_config_for(self.model, self.method).to_dict()
        if saved.get("model") != expected or saved.get("method") != self.method:
            changed = sorted(k for k in expected if (saved.get("model") or {}).get(k) != expected[k])
            raise ValueError(
                f"initial global partition {path} was saved by a {saved.get('method')!r} job with other model "
                f"settings ({', '.join(changed) or 'method'} differ); a job continues only a federation of the same "
                "model and method"
            )
        self._rounds_before = saved_rounds(saved, path)
        state = saved["global"]
        try:
            self._reference.partition.check(state, "global")
        except ValueError as error:
            raise ValueError(f"initial global partition {path}: {error}") from error
        return {key: torch.as_tensor(value, dtype=torch.float32) for key, value in state.items()}

    def save_model(self, model: ModelLearnable, fl_ctx: FLContext) -> None:
        self._write(model, self.global_model_file_name, _round(fl_ctx) + 1)

    def _write(self, learnable: ModelLearnable, name: str, rounds_done: int) -> Path:
        weights = learnable[ModelLearnableKey.WEIGHTS]
        self._reference.partition.check(weights, "global")  # nothing but the global partition is ever written
        assert self._folder is not None
        payload = {
            "global": {key: torch.as_tensor(value) for key, value in weights.items()},
            "model": model_config_for(self.model, self.method).to_dict(),
            "method": self.method,
            "rounds_done": self._rounds_before + rounds_done,
        }
        return atomic_save(payload, self._folder / name)

    def get_model_inventory(self, fl_ctx: FLContext) -> dict[str, ModelDescriptor]:
        assert self._folder is not None
        names = (self.global_model_file_name, self.best_global_model_file_name)
        return {
            name: ModelDescriptor(name=name, location=str(self._folder / name), model_format="pfedsam_global_partition")
            for name in names
            if (self._folder / name).exists()
        }

    def get_model(self, model_file: str, fl_ctx: FLContext) -> ModelLearnable:
        assert self._folder is not None
        saved = read_saved(self._folder / model_file)
        return make_model_learnable(
            {key: value.numpy() for key, value in saved["global"].items()}, {MODEL_META_KEY: job_model(self.model)}
        )


def read_saved(path: Path) -> dict[str, Any]:
    """A global partition file the persistor wrote (``FL_global_model.pt``), or a clear error naming it."""
    saved = read_torch_file(path, "global partition file", ValueError)
    if not isinstance(saved, dict) or not isinstance(saved.get("global"), dict):
        raise ValueError(f"{path} is not a global partition saved by a pfedsam_nvflare job (FL_global_model.pt)")
    return saved


def saved_rounds(saved: dict[str, Any], path: Path) -> int:
    """The federation's rounds behind a saved global partition (0 for a file written before they were recorded)."""
    rounds = saved.get("rounds_done", 0)
    if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 0:
        raise ValueError(f"{path}: 'rounds_done' is {rounds!r}, not a count of rounds")
    return rounds


def _round(fl_ctx: FLContext) -> int:
    """The 0-based round ``ScatterAndGather`` is in."""
    return int(fl_ctx.get_prop(AppConstants.CURRENT_ROUND, 0) or 0)


class GlobalPartitionLocator(ModelLocator):
    """Offers the persistor's saved global partitions (latest and best) to ``GlobalModelEval``."""

    def __init__(self, persistor_id: str = AppConstants.DEFAULT_PERSISTOR_ID):
        super().__init__()
        self.persistor_id = persistor_id

    def _persistor(self, fl_ctx: FLContext) -> GlobalPartitionPersistor:
        persistor = fl_ctx.get_engine().get_component(self.persistor_id)
        if not isinstance(persistor, GlobalPartitionPersistor):
            raise ValueError(f"component {self.persistor_id!r} is not a GlobalPartitionPersistor")
        return persistor

    def get_model_names(self, fl_ctx: FLContext) -> list[str]:
        return list(self._persistor(fl_ctx).get_model_inventory(fl_ctx))

    def locate_model(self, model_name: str, fl_ctx: FLContext) -> DXO:
        return model_learnable_to_dxo(self._persistor(fl_ctx).get_model(model_name, fl_ctx))
