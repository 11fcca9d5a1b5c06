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

from ..atomic import atomic_save
from .settings import model_config_for, reference


class GlobalPartitionPersistor(ModelPersistor):
    """Starts the job from the initial global partition of the configured model and saves the latest and the
    best global partition as ``{"global": {key: tensor}, "model": settings, "method": method}`` in the server's app
    folder."""

    def __init__(
        self,
        model: dict[str, Any] | None = None,
        method: str = "pfedsam",
        global_model_file_name: str = DefaultCheckpointFileName.GLOBAL_MODEL,
        best_global_model_file_name: str = DefaultCheckpointFileName.BEST_GLOBAL_MODEL,
    ):
        super().__init__()
        self.model, self.method = model, method
        self.global_model_file_name = global_model_file_name
        self.best_global_model_file_name = best_global_model_file_name
        self._folder: Path | None = None

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
                path = self._write(learnable, self.best_global_model_file_name)
                self.log_info(fl_ctx, f"saved the best global partition to {path}")

    def load_model(self, fl_ctx: FLContext) -> ModelLearnable:
        weights = {key: value.numpy() for key, value in self._reference.initial_global.items()}
        self.log_info(fl_ctx, f"initial global partition: {len(weights)} keys")
        return make_model_learnable(weights, {})

    def save_model(self, model: ModelLearnable, fl_ctx: FLContext) -> None:
        self._write(model, self.global_model_file_name)

    def _write(self, learnable: ModelLearnable, name: str) -> Path:
        weights = learnable[ModelLearnableKey.WEIGHTS]
        self._reference.partition.check(weights, "global")  # nothing but the global partition is ever written
        assert self._folder is not None
        payload = {
            "global": {key: torch.as_tensor(value) for key, value in weights.items()},
            "model": model_config_for(self.model, self.method).to_dict(),
            "method": self.method,
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
        saved = torch.load(self._folder / model_file, map_location="cpu", weights_only=True)
        return make_model_learnable({key: value.numpy() for key, value in saved["global"].items()}, {})


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
