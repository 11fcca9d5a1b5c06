"""A task-result filter that lets only global-partition keys leave a site."""

from __future__ import annotations

from typing import Any

from nvflare.apis.dxo import DXO, DataKind
from nvflare.apis.dxo_filter import DXOFilter
from nvflare.apis.fl_context import FLContext
from nvflare.apis.fl_constant import ReturnCode
from nvflare.apis.shareable import Shareable, make_reply

from ..training.methods import METHODS
from .settings import MODEL_META_KEY, job_model, model_config_for, reference, settings_mismatch


class GlobalPartitionFilter(DXOFilter):
    """Second line of defence after the executor: drops every key that is not in the global partition of
    the job's model and logs the names it dropped (never their values)."""

    def __init__(self, model: dict[str, Any] | None = None, method: str = "pfedsam", data_kinds: list[str] | None = None):
        kinds = [DataKind.WEIGHTS, DataKind.WEIGHT_DIFF]
        super().__init__(supported_data_kinds=kinds, data_kinds_to_filter=data_kinds or kinds)
        if method not in METHODS:
            raise ValueError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
        self.model, self.method = model, method

    def process(self, shareable: Shareable, fl_ctx: FLContext) -> Shareable:
        executor = fl_ctx.get_prop(MODEL_META_KEY)  # the executor's copy, set when the run starts
        problem = None if executor is None else settings_mismatch(
            job_model(self.model), executor, "GlobalPartitionFilter", "the site's executor"
        )
        if problem:
            self.log_error(fl_ctx, f"kept this result at the site: {problem}")
            return make_reply(ReturnCode.TASK_RESULT_FILTER_ERROR)
        return super().process(shareable, fl_ctx)

    def process_dxo(self, dxo: DXO, shareable: Shareable, fl_ctx: FLContext) -> DXO | None:
        allowed = set(reference(model_config_for(self.model, self.method)).partition.global_keys)
        dropped = sorted(set(dxo.data) - allowed)
        if not dropped:
            return None
        self.log_warning(fl_ctx, f"dropped {len(dropped)} keys outside the global partition: {', '.join(dropped)}")
        return DXO(dxo.data_kind, {k: v for k, v in dxo.data.items() if k in allowed}, meta=dxo.meta)
