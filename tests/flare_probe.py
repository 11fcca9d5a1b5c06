"""Test-only server widget: records the keys of every contribution that reaches the server."""

import json
from pathlib import Path

from nvflare.apis.dxo import from_shareable
from nvflare.apis.fl_constant import FLContextKey, ReservedKey
from nvflare.app_common.app_event_type import AppEventType
from nvflare.widgets.widget import Widget

RECORD_FILE = "contributions.jsonl"


class ContributionProbe(Widget):
    def handle_event(self, event_type, fl_ctx):
        if event_type != AppEventType.BEFORE_CONTRIBUTION_ACCEPT:
            return
        shareable = fl_ctx.get_peer_context().get_prop(FLContextKey.SHAREABLE)
        dxo = from_shareable(shareable)
        run_dir = Path(fl_ctx.get_engine().get_workspace().get_run_dir(fl_ctx.get_job_id()))
        record = {
            "site": shareable.get_peer_prop(ReservedKey.IDENTITY_NAME, "?"),
            "kind": dxo.data_kind,
            "keys": sorted(dxo.data),
        }
        with (run_dir / RECORD_FILE).open("a") as handle:
            handle.write(json.dumps(record) + "\n")
