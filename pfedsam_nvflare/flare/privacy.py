"""Client-level differential privacy on what leaves a site: its global-partition update, clipped and noised,
with the privacy spent accounted by Opacus's Rényi-DP accountant."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
from nvflare.apis.dxo import DXO, DataKind
from nvflare.apis.dxo_filter import DXOFilter
from nvflare.apis.fl_constant import ReturnCode
from nvflare.apis.fl_context import FLContext
from nvflare.apis.shareable import Shareable, make_reply
from opacus.accountants import RDPAccountant

from ..atomic import atomic_write_text
from .settings import PRIVACY_META_KEY

ACCOUNTANT_FILE = "privacy_accountant.json"


class PrivacyRefusal(RuntimeError):
    """Why a result was kept at the site instead of being sent."""


def l2_norm(arrays: dict[str, np.ndarray]) -> float:
    """The L2 norm of all values of ``arrays`` taken as one vector."""
    return float(np.sqrt(sum(np.sum(np.square(value, dtype=np.float64)) for value in arrays.values())))


def spent_epsilon(history: list[tuple[float, float, int]], delta: float) -> float:
    """ε at ``delta`` after the releases in ``history`` (Opacus's ``(noise_multiplier, sample_rate, steps)``)."""
    if not history:
        return 0.0
    accountant = RDPAccountant()
    accountant.history = [tuple(entry) for entry in history]
    return float(accountant.get_epsilon(delta))


def _releases(history: list[tuple[float, float, int]]) -> int:
    return sum(steps for _, _, steps in history)


class GaussianPrivacy(DXOFilter):
    """The Gaussian mechanism on a site's weight difference: its L2 norm is clipped to ``clip_norm`` and noise
    of standard deviation ``noise_multiplier * clip_norm`` is added to every value. Each release is one step of
    the accountant (sample rate 1: the site's whole data, every round); the ε spent at ``delta`` goes into the
    DXO meta (``pfedsam_privacy``) and the log. A release that would take ε past ``max_epsilon`` is not made:
    the result is replaced by an error reply and nothing leaves the site.

    Full ``WEIGHTS`` are refused: weights after local training carry the site's update without noise. Other
    kinds (validation metrics) pass untouched.

    The accountant's state is kept in ``accountant_file``; by default ``privacy_accountant.json`` in the job's
    run folder, so a restarted site app resumes its spending. Point several jobs at one file to give a site one
    budget across jobs.

    Args:
        clip_norm: the largest L2 norm of an update that is sent (before noise).
        noise_multiplier: noise standard deviation in units of ``clip_norm``.
        delta: the δ at which ε is reported and limited.
        max_epsilon: the budget; no release goes past it.
        accountant_file: where the accountant's state is kept (default: the run folder).
        seed: seed of the noise (tests only; the default draws from the operating system).
    """

    def __init__(
        self,
        clip_norm: float = 1.0,
        noise_multiplier: float = 1.0,
        delta: float = 1e-5,
        max_epsilon: float = 10.0,
        accountant_file: str | None = None,
        seed: int | None = None,
    ):
        kinds = [DataKind.WEIGHT_DIFF, DataKind.WEIGHTS]  # WEIGHTS only to refuse them
        super().__init__(supported_data_kinds=kinds, data_kinds_to_filter=kinds)
        for name, value in (("clip_norm", clip_norm), ("noise_multiplier", noise_multiplier), ("max_epsilon", max_epsilon)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < float("inf"):
                raise ValueError(f"GaussianPrivacy: {name} must be a positive number, got {value!r}")
        if isinstance(delta, bool) or not isinstance(delta, (int, float)) or not 0 < delta < 1:
            raise ValueError(f"GaussianPrivacy: delta must be in (0, 1), got {delta!r}")
        self.clip_norm, self.noise_multiplier = float(clip_norm), float(noise_multiplier)
        self.delta, self.max_epsilon = float(delta), float(max_epsilon)
        self.accountant_file = accountant_file
        self._rng = np.random.default_rng(seed)

    def process(self, shareable: Shareable, fl_ctx: FLContext) -> Shareable:
        try:
            return super().process(shareable, fl_ctx)
        except PrivacyRefusal as refusal:
            self.log_error(fl_ctx, f"GaussianPrivacy kept this result at the site: {refusal}")
            return make_reply(ReturnCode.TASK_RESULT_FILTER_ERROR)

    def process_dxo(self, dxo: DXO, shareable: Shareable, fl_ctx: FLContext) -> DXO:
        if dxo.data_kind != DataKind.WEIGHT_DIFF:
            raise PrivacyRefusal(
                f"it carries {dxo.data_kind}, and weights after local training hold the site's update without "
                f"noise; only {DataKind.WEIGHT_DIFF} updates are clipped, noised and sent"
            )
        path = self._accountant_path(fl_ctx)
        history = self._load(path)
        after = spent_epsilon(self._step(history), self.delta)
        if after > self.max_epsilon:
            raise PrivacyRefusal(
                f"the privacy budget is spent: updates sent so far {_releases(history)}, ε={spent_epsilon(history, self.delta):.3f} "
                f"at δ={self.delta:g}; one more would reach ε={after:.3f} > max_epsilon={self.max_epsilon:g}"
            )
        data = self.privatize(dxo.data)
        history = self._step(history)
        self._save(path, history, after)
        releases = _releases(history)
        report = {
            "mechanism": "gaussian",
            "epsilon": after,
            "delta": self.delta,
            "max_epsilon": self.max_epsilon,
            "clip_norm": self.clip_norm,
            "noise_multiplier": self.noise_multiplier,
            "releases": releases,
        }
        self.log_info(
            fl_ctx,
            f"GaussianPrivacy: update clipped to L2 {self.clip_norm:g} and noised (std "
            f"{self.noise_multiplier * self.clip_norm:g}); ε={after:.3f} at δ={self.delta:g} after {releases} "
            f"updates (budget {self.max_epsilon:g})",
        )
        return DXO(dxo.data_kind, data, meta={**dxo.meta, PRIVACY_META_KEY: report})

    def privatize(self, update: dict[str, Any]) -> dict[str, np.ndarray]:
        """``update`` scaled to an L2 norm of at most ``clip_norm``, plus Gaussian noise on every value."""
        for key, value in update.items():
            if not isinstance(value, np.ndarray) or not np.issubdtype(value.dtype, np.floating):
                raise PrivacyRefusal(f"key {key!r} is not a floating-point array, so it cannot be noised")
        norm = l2_norm(update)
        if not np.isfinite(norm):
            raise PrivacyRefusal("the update has non-finite values, so it cannot be clipped")
        scale = min(1.0, self.clip_norm / norm) if norm > 0 else 1.0
        std = self.noise_multiplier * self.clip_norm
        return {
            key: (value.astype(np.float64) * scale + self._rng.normal(0.0, std, value.shape)).astype(value.dtype)
            for key, value in update.items()
        }

    def _step(self, history: list[tuple[float, float, int]]) -> list[tuple[float, float, int]]:
        """``history`` with one more release at this filter's noise multiplier."""
        if history and history[-1][:2] == (self.noise_multiplier, 1.0):
            return [*history[:-1], (self.noise_multiplier, 1.0, history[-1][2] + 1)]
        return [*history, (self.noise_multiplier, 1.0, 1)]

    def _accountant_path(self, fl_ctx: FLContext) -> Path:
        if self.accountant_file:
            return Path(self.accountant_file)
        return Path(fl_ctx.get_engine().get_workspace().get_run_dir(fl_ctx.get_job_id())) / ACCOUNTANT_FILE

    def _load(self, path: Path) -> list[tuple[float, float, int]]:
        if not path.exists():
            return []
        try:
            record = json.loads(path.read_text())
            history = [(float(z), float(q), int(steps)) for z, q, steps in record["history"]]
        except (OSError, ValueError, KeyError, TypeError) as error:
            raise PrivacyRefusal(f"the accountant's state {path} cannot be read ({error}); fix or remove it") from error
        if record.get("delta") != self.delta:
            raise PrivacyRefusal(f"the accountant's state {path} was kept at δ={record.get('delta')}, not {self.delta:g}")
        return history

    def _save(self, path: Path, history: list[tuple[float, float, int]], epsilon: float) -> None:
        record = {"history": [list(entry) for entry in history], "delta": self.delta, "epsilon": epsilon}
        atomic_write_text(json.dumps(record, indent=2) + "\n", path)  # on disk before the update leaves
