"""Weighted FedAvg of the sites' global-partition differences, refusing any contribution that does not fit."""

from __future__ import annotations

from typing import Any

import numpy as np
from nvflare.apis.dxo import DXO, DataKind, MetaKey, from_shareable
from nvflare.apis.event_type import EventType
from nvflare.apis.fl_constant import ReservedKey
from nvflare.apis.fl_context import FLContext
from nvflare.apis.shareable import Shareable
from nvflare.app_common.abstract.aggregator import Aggregator
from nvflare.app_common.app_constant import AppConstants

from ..model import PartitionError
from ..model.partition import is_finite
from .settings import MODEL_META_KEY, job_model, model_config_for, reference, settings_mismatch


# A contribution's weight is its site's number of training samples: more than this is no site's.
MAX_WEIGHT = 1e9


class ContributionRejected(ValueError):
    """Why a site's contribution was not aggregated."""


class GlobalPartitionAggregator(Aggregator):
    """Averages WEIGHT_DIFF contributions weighted by their ``NUM_STEPS_CURRENT_ROUND`` (training samples).

    A contribution with foreign or missing keys, wrong shapes, non-finite values, another data kind, no valid
    weight, from an earlier round or a second one from the same site in a round is rejected with a log line
    that says why; the round goes on with the others.
    """

    def __init__(
        self, model: dict[str, Any] | None = None, method: str = "pfedsam", persistor_id: str = AppConstants.DEFAULT_PERSISTOR_ID
    ):
        super().__init__()
        self.model, self.method, self.persistor_id = model, method, persistor_id
        self._sums: dict[str, np.ndarray] = {}
        self._total_weight = 0.0
        self._contributors: list[str] = []

    @property
    def _partition(self):
        return reference(model_config_for(self.model, self.method)).partition

    def handle_event(self, event_type: str, fl_ctx: FLContext) -> None:
        if event_type != EventType.START_RUN:
            return
        persistor = fl_ctx.get_engine().get_component(self.persistor_id)
        if persistor is None or not hasattr(persistor, "model"):
            return  # another persistor: the sites check the settings each global partition carries
        problem = settings_mismatch(job_model(self.model), job_model(persistor.model), "the aggregator", "the persistor")
        if problem:
            self.system_panic(problem, fl_ctx)

    def reset(self, fl_ctx: FLContext) -> None:
        self._sums, self._total_weight, self._contributors = {}, 0.0, []

    def _check(self, shareable: Shareable, fl_ctx: FLContext) -> tuple[DXO, float]:
        current_round = fl_ctx.get_prop(AppConstants.CURRENT_ROUND)
        contribution_round = shareable.get_cookie(AppConstants.CONTRIBUTION_ROUND)
        if current_round is not None and contribution_round != current_round:
            raise ContributionRejected(f"it is for round {contribution_round}, the current round is {current_round}")
        try:
            dxo = from_shareable(shareable)
        except ValueError as error:
            raise ContributionRejected(f"it is not a DXO ({error})") from error
        if dxo.data_kind != DataKind.WEIGHT_DIFF:
            raise ContributionRejected(f"its data kind is {dxo.data_kind}, expected {DataKind.WEIGHT_DIFF}")
        if not isinstance(dxo.data, dict):
            raise ContributionRejected("its data is not a dict of arrays")
        try:
            self._partition.check(dxo.data, "global")
        except PartitionError as error:
            raise ContributionRejected(str(error)) from error
        for key, value in dxo.data.items():
            if not isinstance(value, np.ndarray) or not np.issubdtype(value.dtype, np.floating):
                raise ContributionRejected(f"key {key!r} is not a floating-point array")
        weight = dxo.get_meta_prop(MetaKey.NUM_STEPS_CURRENT_ROUND)
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not 0 < weight <= MAX_WEIGHT:
            raise ContributionRejected(
                f"its weight {MetaKey.NUM_STEPS_CURRENT_ROUND}={weight!r} is not a number of training samples "
                f"(finite, above 0, at most {MAX_WEIGHT:g})"
            )
        return dxo, float(weight)

    def accept(self, shareable: Shareable, fl_ctx: FLContext) -> bool:
        site = shareable.get_peer_prop(ReservedKey.IDENTITY_NAME, "?")
        try:
            if site in self._contributors:
                raise ContributionRejected("the site already contributed to this round")
            dxo, weight = self._check(shareable, fl_ctx)
        except ContributionRejected as reason:
            self.log_error(fl_ctx, f"rejected the contribution of {site}: {reason}")
            return False
        for key, value in dxo.data.items():
            weighted = value.astype(np.float64) * weight
            self._sums[key] = self._sums[key] + weighted if key in self._sums else weighted
        self._total_weight += weight
        self._contributors.append(site)
        self.log_info(fl_ctx, f"accepted the contribution of {site} (weight {weight:g})")
        return True

    def aggregate(self, fl_ctx: FLContext) -> Shareable:
        average = {}
        if self._contributors:
            average = {key: total / self._total_weight for key, total in self._sums.items()}
            bad = next((key for key, value in average.items() if not is_finite(value)), None)
            if bad is None:
                average = {key: value.astype(np.float32) for key, value in average.items()}
                self.log_info(fl_ctx, f"averaged the contributions of {', '.join(self._contributors)}")
            else:  # the checks above keep it finite; checked before it leaves all the same
                self.log_error(
                    fl_ctx, f"the average of key {bad!r} is not finite in float32; the global partition stays as it is"
                )
                average, self._contributors = {}, []
        else:  # an empty difference: the global partition stays as it is
            self.log_error(fl_ctx, "no contribution was accepted this round; the global partition stays as it is")
        dxo = DXO(
            DataKind.WEIGHT_DIFF, average, meta={"contributors": list(self._contributors), MODEL_META_KEY: job_model(self.model)}
        )
        self.reset(fl_ctx)
        return dxo.to_shareable()
