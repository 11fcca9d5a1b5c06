"""The end-of-job evaluation of the final and best global partitions at the sites still in the federation."""

from __future__ import annotations

from nvflare.apis.fl_context import FLContext
from nvflare.apis.signal import Signal
from nvflare.app_common.workflows.global_model_eval import GlobalModelEval


class ConnectedSitesModelEval(GlobalModelEval):
    """FLARE's ``GlobalModelEval``, over the sites connected when the evaluation begins. FLARE's picks its sites
    when the job starts, so a site lost during the rounds would hold the end of the job until
    ``validation_timeout`` (100 minutes by default)."""

    def control_flow(self, abort_signal: Signal, fl_ctx: FLContext) -> None:
        connected = {client.name for client in self._engine.get_clients()}
        lost = sorted(set(self._participating_clients) - connected)
        if lost:
            self.log_warning(fl_ctx, f"final evaluation without {', '.join(lost)}: not connected any more")
            self._participating_clients = [name for name in self._participating_clients if name in connected]
        super().control_flow(abort_signal, fl_ctx)
