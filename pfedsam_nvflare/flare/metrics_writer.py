"""The server's record of a run: every site's metrics of every round, and of the final evaluation, in one
JSON file, drawn as learning curves at the end."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from nvflare.apis.dxo import DataKind, from_shareable
from nvflare.apis.event_type import EventType
from nvflare.apis.fl_constant import ReservedKey
from nvflare.apis.fl_context import FLContext
from nvflare.apis.shareable import Shareable
from nvflare.app_common.app_constant import AppConstants
from nvflare.app_common.app_event_type import AppEventType
from nvflare.widgets.widget import Widget

from ..reports import plot_learning_curves
from ..atomic import atomic_write_text
from .privacy import l2_norm
from .settings import METRICS_META_KEY, PRIVACY_META_KEY


MAX_ENTRIES, MAX_KEY_LENGTH, MAX_TEXT_LENGTH = 64, 64, 256  # a site's metrics: a few dozen named numbers


def _unbounded(value: Any) -> str | None:
    """Why ``value`` is not a small flat mapping of names to numbers (or short texts, or None); None if it is."""
    if not isinstance(value, dict):
        return f"it is a {type(value).__name__}, not a mapping"
    if len(value) > MAX_ENTRIES:
        return f"{len(value)} entries, more than {MAX_ENTRIES}"
    for key, item in value.items():
        if not isinstance(key, str) or len(key) > MAX_KEY_LENGTH:
            return f"key {str(key)[:MAX_KEY_LENGTH]!r} is not a name of at most {MAX_KEY_LENGTH} characters"
        if isinstance(item, str) and len(item) > MAX_TEXT_LENGTH:
            return f"{key!r} is a text of {len(item)} characters, more than {MAX_TEXT_LENGTH}"
        if item is not None and not isinstance(item, (bool, int, float, str)):
            return f"{key!r} is a {type(item).__name__}, not a number"
    return None


class RoundMetricsWriter(Widget):
    """Writes ``<run dir>/<file_name>`` after every round, and ``learning_curves.png`` beside it when the run ends:
    ``{"job", "method", "rounds": [{"round", "seconds", "sites": {site: metrics}, "updates": {site: {"l2_norm",
    "privacy"}}, "contributors", "missing"}], "dropped": {site: {"round", "time"}}, "final": {model: {site:
    metrics}}}``. ``updates`` is what the server received: the L2 norm of each site's update and, where it carries
    one, its privacy report (DP-SGD's, with the site's ε where its ``RequireDifferentialPrivacy`` counted it, or
    ``GaussianPrivacy``'s). ``missing``: the job's sites (as the server's engine lists them
    when a round begins, and every earlier contributor) whose update is not in the round's average; ``dropped``: the
    first round each of them went missing, and when (UTC), so that a site lost mid-job is named with its round."""

    def __init__(self, method: str = "pfedsam", file_name: str = "pfedsam_metrics.json"):
        super().__init__()
        self.method, self.file_name = method, file_name
        self._path: Path | None = None
        self._record: dict[str, Any] = {}
        self._round: dict[str, Any] | None = None
        self._round_began = 0.0
        self._known_sites: set[str] = set()  # the job's sites: listed by the engine at a round's start, or contributing

    def handle_event(self, event_type: str, fl_ctx: FLContext) -> None:
        if event_type == EventType.START_RUN:
            run_dir = Path(fl_ctx.get_engine().get_workspace().get_run_dir(fl_ctx.get_job_id()))
            self._path = run_dir / self.file_name
            self._record = {"job": fl_ctx.get_job_id(), "method": self.method, "rounds": [], "dropped": {}, "final": {}}
        elif event_type == AppEventType.ROUND_STARTED:
            self._round = {"round": fl_ctx.get_prop(AppConstants.CURRENT_ROUND), "sites": {}, "updates": {}}
            self._round_began = time.monotonic()
            engine = fl_ctx.get_engine()
            if engine is not None:
                self._known_sites.update(client.name for client in engine.get_clients())
        elif event_type == AppEventType.AFTER_CONTRIBUTION_ACCEPT and self._round is not None:
            if fl_ctx.get_prop(AppConstants.AGGREGATION_ACCEPTED):
                self._contribution(fl_ctx)
            else:  # late, rejected or refused: not part of this round (the aggregator logged why)
                shareable = fl_ctx.get_prop(AppConstants.TRAINING_RESULT)
                site = shareable.get_peer_prop(ReservedKey.IDENTITY_NAME, "?") if isinstance(shareable, Shareable) else "?"
                self._round.setdefault("rejected", []).append(site)
        elif event_type == AppEventType.AFTER_AGGREGATION and self._round is not None:
            aggregated = fl_ctx.get_prop(AppConstants.AGGREGATION_RESULT)
            if isinstance(aggregated, Shareable):
                self._round["contributors"] = from_shareable(aggregated).get_meta_prop("contributors", [])
            self._missing(fl_ctx)
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

    def _missing(self, fl_ctx: FLContext) -> None:
        """Name the known sites whose update is not in this round's average; the first time, record them as dropped."""
        contributors = set(self._round.get("contributors", []))
        missing = sorted(self._known_sites - contributors)
        self._known_sites |= contributors
        self._round["missing"] = missing
        for site in missing:
            if site not in self._record["dropped"]:
                when = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
                self._record["dropped"][site] = {"round": self._round["round"], "time": when}
                self.log_warning(fl_ctx, f"{site} sent no update in round {self._round['round']} (first missed at {when})")

    def _contribution(self, fl_ctx: FLContext) -> None:
        """Record an accepted contribution: its metrics and privacy report, each checked to be a small flat
        mapping of numbers (what does not fit is left out, with a warning that names the site)."""
        shareable = fl_ctx.get_prop(AppConstants.TRAINING_RESULT)
        site = shareable.get_peer_prop(ReservedKey.IDENTITY_NAME, "?")
        dxo = from_shareable(shareable)  # the aggregator accepted it: a DXO of arrays
        update: dict[str, Any] = {"l2_norm": l2_norm(dxo.data)}
        metrics = self._bounded(dxo.get_meta_prop(METRICS_META_KEY), f"the metrics of {site}", fl_ctx)
        if metrics is not None:
            self._round["sites"][site] = metrics
        privacy = self._bounded(dxo.get_meta_prop(PRIVACY_META_KEY), f"the privacy report of {site}", fl_ctx)
        if privacy is not None:
            update["privacy"] = privacy
        self._round["updates"][site] = update

    def _bounded(self, value: Any, what: str, fl_ctx: FLContext) -> dict[str, Any] | None:
        problem = None if value is None else _unbounded(value)
        if problem:
            self.log_warning(fl_ctx, f"left out {what}: {problem}")
            return None
        return value

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
        atomic_write_text(json.dumps(self._record, indent=2, default=str) + "\n", self._path)
