"""Client-level differential privacy on what leaves a site: its global-partition update, clipped and noised,
with the privacy spent accounted by Opacus's Rényi-DP accountant."""

from __future__ import annotations

import fcntl
import json
import math
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
from nvflare.apis.dxo import DXO, DataKind, from_shareable
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

    Only ``WEIGHT_DIFF`` (noised) and ``METRICS`` (untouched) leave: full ``WEIGHTS`` carry the site's update
    without noise, and any other kind is not known to be safe, so both are refused, as is a result that is not a
    DXO. An update that an earlier filter of the chain (the site's ``privacy.json`` runs before the job's) already
    noised is neither noised nor counted twice: it passes if that release was at least as private as this filter
    asks (noise multiplier at least, clip norm at most, ε within ``max_epsilon`` at the same δ), else it is refused.

    The accountant's state is kept in ``accountant_file``; by default ``privacy_accountant.json`` in the site's
    workspace (not a job's run folder), so every job of the site spends one budget and a restarted site resumes
    it. Jobs that run at once take turns on it (a file lock). ``pfedsam privacy status`` shows what each job spent.

    Args:
        clip_norm: the largest L2 norm of an update that is sent (before noise).
        noise_multiplier: noise standard deviation in units of ``clip_norm``.
        delta: the δ at which ε is reported and limited.
        max_epsilon: the budget; no release goes past it.
        accountant_file: where the accountant's state is kept (default: the site's workspace).
        seed: seed of the noise (tests only; the default draws from the operating system).
    """

    # an exported job names every setting, so no site falls back on the defaults of its installed version
    _always_serialize_args = ("clip_norm", "noise_multiplier", "delta", "max_epsilon")

    def __init__(
        self,
        clip_norm: float = 1.0,
        noise_multiplier: float = 1.0,
        delta: float = 1e-5,
        max_epsilon: float = 10.0,
        accountant_file: str | None = None,
        seed: int | None = None,
    ):
        super().__init__(supported_data_kinds=None, data_kinds_to_filter=None)  # every kind: unknown ones are refused
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
            if shareable.get_return_code() == ReturnCode.OK:
                try:
                    from_shareable(shareable)
                except ValueError as error:
                    raise PrivacyRefusal(f"it is not a DXO ({error}), so it cannot be checked or noised") from error
            return super().process(shareable, fl_ctx)
        except PrivacyRefusal as refusal:
            self.log_error(fl_ctx, f"GaussianPrivacy kept this result at the site: {refusal}")
            return make_reply(ReturnCode.TASK_RESULT_FILTER_ERROR)

    def process_dxo(self, dxo: DXO, shareable: Shareable, fl_ctx: FLContext) -> DXO | None:
        if dxo.data_kind == DataKind.METRICS:
            return None
        if dxo.data_kind == DataKind.WEIGHTS:
            raise PrivacyRefusal(
                f"it carries {dxo.data_kind}, and weights after local training hold the site's update without "
                f"noise; only {DataKind.WEIGHT_DIFF} updates are clipped, noised and sent"
            )
        if dxo.data_kind != DataKind.WEIGHT_DIFF:
            raise PrivacyRefusal(
                f"it carries {dxo.data_kind}; only {DataKind.WEIGHT_DIFF} (noised) and {DataKind.METRICS} leave a "
                "site under GaussianPrivacy"
            )
        earlier = dxo.get_meta_prop(PRIVACY_META_KEY)
        if earlier is not None:
            self._accept_earlier(earlier, fl_ctx)
            return None
        path = self._accountant_path(fl_ctx)
        with _locked(path):  # concurrent jobs of the site take turns: no release is lost or counted twice
            record = self._load(path)
            history = record["history"]
            after = spent_epsilon(self._step(history), self.delta)
            if after > self.max_epsilon:
                raise PrivacyRefusal(
                    f"the privacy budget is spent: updates sent so far {_releases(history)}, "
                    f"ε={spent_epsilon(history, self.delta):.3f} at δ={self.delta:g}; one more would reach "
                    f"ε={after:.3f} > max_epsilon={self.max_epsilon:g} (accountant {path})"
                )
            data = self.privatize(dxo.data)
            history = self._step(history)
            self._save(path, record, history, after, str(fl_ctx.get_job_id()))
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

    def _accept_earlier(self, earlier: Any, fl_ctx: FLContext) -> None:
        """Pass an update an earlier filter already noised and counted, if that release was at least as private
        as this filter asks; refuse it otherwise."""
        try:
            noise, clip = float(earlier["noise_multiplier"]), float(earlier["clip_norm"])
            epsilon, delta = float(earlier["epsilon"]), float(earlier["delta"])
        except (KeyError, TypeError, ValueError) as error:
            raise PrivacyRefusal(
                f"it carries an unreadable privacy report ({error!r}) from an earlier filter"
            ) from error
        weaker = []
        if not noise >= self.noise_multiplier:
            weaker.append(f"noise multiplier {noise:g} < {self.noise_multiplier:g}")
        if not clip <= self.clip_norm:
            weaker.append(f"clip norm {clip:g} > {self.clip_norm:g}")
        if delta != self.delta or not epsilon <= self.max_epsilon:
            weaker.append(
                f"ε={epsilon:.3f} at δ={delta:g}, this filter allows ε ≤ {self.max_epsilon:g} at δ={self.delta:g}"
            )
        if weaker:
            raise PrivacyRefusal(
                "an earlier filter (the site's privacy policy runs before the job's filters) already noised this "
                f"update less privately than this one asks ({'; '.join(weaker)}); noising it twice would count it "
                "twice, so it is kept at the site"
            )
        self.log_info(
            fl_ctx,
            f"GaussianPrivacy: the update was already noised and counted by an earlier filter (ε={epsilon:.3f} at "
            f"δ={delta:g}, noise multiplier {noise:g}, clip norm {clip:g}), at least as private as this filter asks; "
            "not noised or counted twice",
        )

    def _accountant_path(self, fl_ctx: FLContext) -> Path:
        if self.accountant_file:
            return Path(self.accountant_file)
        return Path(fl_ctx.get_engine().get_workspace().get_root_dir()) / ACCOUNTANT_FILE

    def _load(self, path: Path) -> dict[str, Any]:
        """The accountant's record, checked: a refusal names the file and what is wrong with it."""
        if not path.exists():
            return {"history": [], "jobs": {}}
        try:
            record = read_accountant(path)
        except ValueError as error:
            raise PrivacyRefusal(f"{error}; fix or remove it") from error
        if record["delta"] != self.delta:
            raise PrivacyRefusal(
                f"the accountant's state {path} was kept at δ={record['delta']:g}, not {self.delta:g}"
            )
        return record

    def _save(
        self, path: Path, record: dict[str, Any], history: list[tuple[float, float, int]], epsilon: float, job: str
    ) -> None:
        jobs = dict(record.get("jobs", {}))
        entry = jobs.get(job, {"releases": 0, "first": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
        jobs[job] = {**entry, "releases": entry["releases"] + 1, "epsilon_after": epsilon,
                     "last": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        new = {"history": [list(entry) for entry in history], "delta": self.delta, "epsilon": epsilon,
               "max_epsilon": self.max_epsilon, "jobs": jobs}
        try:
            atomic_write_text(json.dumps(new, indent=2) + "\n", path)  # on disk before the update leaves
        except OSError as error:
            raise PrivacyRefusal(f"the accountant's state {path} cannot be written ({error})") from error


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``<path>.lock`` (a file of its own, so that the atomic rename of ``path`` never
    replaces the locked file)."""
    lock = path.with_name(path.name + ".lock")
    try:
        lock.parent.mkdir(parents=True, exist_ok=True)
        handle = lock.open("a")
    except OSError as error:
        raise PrivacyRefusal(f"the accountant's state {path} cannot be kept there ({error})") from error
    with handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _positive_number(value: Any) -> bool:
    return not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value) and value > 0


def read_accountant(path: Path) -> dict[str, Any]:
    """An accountant file, checked: each release (noise multiplier finite and > 0, sample rate in (0, 1], steps a
    whole number ≥ 1), δ in (0, 1). A ValueError names the file and the first thing wrong."""
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise ValueError(f"the accountant's state {path} cannot be read ({error})") from error
    if not isinstance(record, dict) or not isinstance(record.get("history"), list):
        raise ValueError(f"the accountant's state {path} has no list of releases ('history')")
    history = []
    for index, entry in enumerate(record["history"]):
        where = f"the accountant's state {path}: release {index}"
        if not isinstance(entry, list) or len(entry) != 3:
            raise ValueError(f"{where} is not [noise multiplier, sample rate, steps]")
        noise, rate, steps = entry
        if not _positive_number(noise):
            raise ValueError(f"{where} has noise multiplier {noise!r}, not a finite number above 0")
        if not _positive_number(rate) or rate > 1:
            raise ValueError(f"{where} has sample rate {rate!r}, not in (0, 1]")
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise ValueError(f"{where} has steps {steps!r}, not a whole number ≥ 1")
        history.append((float(noise), float(rate), steps))
    delta = record.get("delta")
    if not _positive_number(delta) or delta >= 1:
        raise ValueError(f"the accountant's state {path} has δ={delta!r}, not in (0, 1)")
    jobs = record.get("jobs", {})
    if not isinstance(jobs, dict):
        raise ValueError(f"the accountant's state {path}: 'jobs' is not a mapping")
    return {**record, "history": history, "delta": float(delta), "jobs": jobs}


def privacy_status(location: str | Path) -> str:
    """What a site's accountant holds (``location``: the site's workspace, or the accountant file itself): each job's
    releases, and ε spent in all (computed again from the releases) against the budget of the last release."""
    path = Path(location)
    path = path / ACCOUNTANT_FILE if path.is_dir() else path
    if not path.is_file():
        raise ValueError(f"no accountant at {path}: this site has released nothing under GaussianPrivacy yet")
    record = read_accountant(path)
    delta, history = record["delta"], record["history"]
    epsilon = spent_epsilon(history, delta)
    lines = [f"accountant {path} (δ={delta:g})", f"{'job':<40} {'releases':>8} {'ε after':>8}  first / last release"]
    for job, entry in record["jobs"].items():
        lines.append(
            f"{job:<40} {entry.get('releases', '?'):>8} {entry.get('epsilon_after', float('nan')):>8.3f}  "
            f"{entry.get('first', '?')} / {entry.get('last', '?')}"
        )
    line = f"spent ε={epsilon:.3f} at δ={delta:g} over {_releases(history)} release(s)"
    budget = record.get("max_epsilon")
    if _positive_number(budget):
        line += f"; budget max_epsilon={budget:g} (as of the last release): {max(budget - epsilon, 0.0):.3f} left"
    return "\n".join([*lines, line])
