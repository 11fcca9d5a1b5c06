"""The server's record of a run: every site's metrics of every round, and of the final evaluation, in one
JSON file, drawn as learning curves at the end."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from nvflare.apis.dxo import DataKind, from_shareable
from nvflare.apis.event_type import EventType
from nvflare.apis.fl_constant import FLContextKey, ReservedKey
from nvflare.apis.fl_context import FLContext
from nvflare.apis.shareable import Shareable
from nvflare.app_common.app_constant import AppConstants
from nvflare.app_common.app_event_type import AppEventType
from nvflare.widgets.widget import Widget

from ..reports import plot_learning_curves
from .settings import METRICS_META_KEY


class RoundMetricsWriter(Widget):
    """Writes ``<run dir>/<file_name>``: ``{"job", "method", "rounds": [{"round", "seconds", "sites": {site:
    metrics}, "contributors"}], "final": {model: {site: metrics}}}`` after every round, and ``learning_curves.png``
    beside it when the run ends."""

    def __init__(self, method: str = "pfedsam", file_name: str = "pfedsam_metrics.json"):
        super().__init__()
        self.method, self.file_name = method, file_name
        self._path: Path | None = None
        self._record: dict[str, Any] = {}
        self._round: dict[str, Any] | None = None
        self._round_began = 0.0

    def handle_event(self, event_type: str, fl_ctx: FLContext) -> None:
        if event_type == EventType.START_RUN:
            run_dir = Path(fl_ctx.get_engine().get_workspace().get_run_dir(fl_ctx.get_job_id()))
            self._path = run_dir / self.file_name
            self._record = {"job": fl_ctx.get_job_id(), "method": self.method, "rounds": [], "final": {}}
        elif event_type == AppEventType.ROUND_STARTED:
            self._round = {"round": fl_ctx.get_prop(AppConstants.CURRENT_ROUND), "sites": {}}
            self._round_began = time.monotonic()
        elif event_type == AppEventType.BEFORE_CONTRIBUTION_ACCEPT and self._round is not None:
            self._contribution(fl_ctx)
        elif event_type == AppEventType.AFTER_AGGREGATION and self._round is not None:
            aggregated = fl_ctx.get_prop(AppConstants.AGGREGATION_RESULT)
            if isinstance(aggregated, Shareable):
                self._round["contributors"] = from_shareable(aggregated).get_meta_prop("contributors", [])
            self._round["seconds"] = round(time.monotonic() - self._round_began, 2)
            self._record["rounds"].append(self._round)
            self._round = None
            self._write()
        elif event_type == AppEventType.VALIDATION_RESULT_RECEIVED:
            self._validation(fl_ctx)
        elif event_type == EventType.END_RUN and self._path is not None:
            self._write()
            path = plot_learning_curves(self._record, self._path.with_name("learning_curves.png"))
            self.log_info(fl_ctx, f"metrics in {self._path}, learning curves in {path}")

    def _contribution(self, fl_ctx: FLContext) -> None:
        shareable = fl_ctx.get_peer_context().get_prop(FLContextKey.SHAREABLE)
        site = shareable.get_peer_prop(ReservedKey.IDENTITY_NAME, "?")
        try:
            metrics = from_shareable(shareable).get_meta_prop(METRICS_META_KEY)
        except ValueError:
            metrics = None
        if isinstance(metrics, dict):
            self._round["sites"][site] = metrics
        else:
            self.log_warning(fl_ctx, f"the contribution of {site} carries no {METRICS_META_KEY}")

    def _validation(self, fl_ctx: FLContext) -> None:
        result = fl_ctx.get_prop(AppConstants.VALIDATION_RESULT)
        model = fl_ctx.get_prop(AppConstants.MODEL_OWNER)
        site = fl_ctx.get_prop(AppConstants.DATA_CLIENT)
        try:
            dxo = from_shareable(result)
        except (ValueError, TypeError):
            return
        if dxo.data_kind == DataKind.METRICS:
            self._record["final"].setdefault(str(model), {})[site] = dxo.data
            self._write()

    def _write(self) -> None:
        if self._path is None:
            return
        temporary = self._path.with_name(self._path.name + ".tmp")
        temporary.write_text(json.dumps(self._record, indent=2, default=str) + "\n")
        os.replace(temporary, self._path)
