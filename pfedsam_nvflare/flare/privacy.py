"""Client-level differential privacy on what leaves a site: its global-partition update, clipped and noised,
with the privacy spent accounted by Opacus's Rényi-DP accountant."""

from __future__ import annotations

import fcntl
import json
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
from nvflare.apis.dxo import DXO, DataKind, from_shareable
from nvflare.apis.dxo_filter import DXOFilter
from nvflare.apis.fl_constant import ReturnCode
from nvflare.apis.fl_context import FLContext
from nvflare.apis.server_engine_spec import ServerEngineSpec
from nvflare.apis.shareable import Shareable, make_reply

from ..atomic import atomic_write_text
from ..training.dp import Release, checked_releases, epsilon_of, positive_number
from .settings import PRIVACY_META_KEY

ACCOUNTANT_FILE = "privacy_accountant.json"


class PrivacyRefusal(RuntimeError):
    """Why a result was kept at the site instead of being sent."""


def l2_norm(arrays: dict[str, np.ndarray]) -> float:
    """The L2 norm of all values of ``arrays`` taken as one vector."""
    return float(np.sqrt(sum(np.sum(np.square(value, dtype=np.float64)) for value in arrays.values())))


def _releases(history: list[Release]) -> int:
    return sum(steps for _, _, steps in history)


def _merged(history: list[Release], releases: list[Release]) -> list[Release]:
    """``history`` followed by ``releases``, a release of the same noise and sample rate as the last one adding to
    its steps (the accountant's bound is the same; the file stays short)."""
    merged = list(history)
    for noise, rate, steps in releases:
        if merged and merged[-1][:2] == (noise, rate):
            merged[-1] = (noise, rate, merged[-1][2] + steps)
        else:
            merged.append((noise, rate, steps))
    return merged


class SitePrivacyBudget(DXOFilter):
    """What both privacy filters share: one budget per site (ε at ``delta`` within ``max_epsilon``) kept in
    ``accountant_file``, by default ``privacy_accountant.json`` in the site's workspace (not a job's run folder), so
    that every job of the site spends it and a restarted site resumes it; jobs that run at once take turns on it (a
    file lock). A result the filter refuses is replaced by an error reply: nothing leaves the site."""

    def __init__(self, delta: float, max_epsilon: float, accountant_file: str | None) -> None:
        super().__init__(supported_data_kinds=None, data_kinds_to_filter=None)  # every kind: unknown ones are refused
        name = type(self).__name__
        if not positive_number(max_epsilon):
            raise ValueError(f"{name}: max_epsilon must be a positive number, got {max_epsilon!r}")
        if not positive_number(delta) or delta >= 1:
            raise ValueError(f"{name}: delta must be in (0, 1), got {delta!r}")
        self.delta, self.max_epsilon = float(delta), float(max_epsilon)
        self.accountant_file = accountant_file

    def process(self, shareable: Shareable, fl_ctx: FLContext) -> Shareable:
        if isinstance(fl_ctx.get_engine(), ServerEngineSpec):  # a policy file shared with the server (the simulator)
            self.log_warning(
                fl_ctx, f"{type(self).__name__} is a site's filter; at the server it passes results on unchanged"
            )
            return shareable
        try:
            if shareable.get_return_code() == ReturnCode.OK:
                try:
                    from_shareable(shareable)
                except ValueError as error:
                    raise PrivacyRefusal(f"it is not a DXO ({error}), so it cannot be checked") from error
            return super().process(shareable, fl_ctx)
        except PrivacyRefusal as refusal:
            self.log_error(fl_ctx, f"{type(self).__name__} kept this result at the site: {refusal}")
            return make_reply(ReturnCode.TASK_RESULT_FILTER_ERROR)

    def _spend(
        self, releases: list[Release], fl_ctx: FLContext, release: Callable[[], Any] = lambda: None
    ) -> tuple[float, int, Any]:
        """Count ``releases`` in the site's accountant and call ``release`` (what makes the update), unless ε would
        pass ``max_epsilon``: then nothing is counted or made. Returns ε after, the steps counted in all and what
        ``release`` returned."""
        path = self._accountant_path(fl_ctx)
        with _locked(path):  # concurrent jobs of the site take turns: no release is lost or counted twice
            record = self._load(path)
            history = record["history"]
            after_history = _merged(history, releases)
            after = epsilon_of(after_history, self.delta)
            if after > self.max_epsilon:
                raise PrivacyRefusal(
                    f"the privacy budget is spent: steps counted so far {_releases(history)}, "
                    f"ε={epsilon_of(history, self.delta):.3f} at δ={self.delta:g}; this update would reach "
                    f"ε={after:.3f} > max_epsilon={self.max_epsilon:g} (accountant {path})"
                )
            made = release()
            self._save(path, record, after_history, after, str(fl_ctx.get_job_id()))
        return after, _releases(after_history), made

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


class GaussianPrivacy(SitePrivacyBudget):
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

    The budget is the site's (``SitePrivacyBudget``); ``pfedsam privacy status`` shows what each job spent.

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
        super().__init__(delta, max_epsilon, accountant_file)
        for name, value in (("clip_norm", clip_norm), ("noise_multiplier", noise_multiplier)):
            if not positive_number(value):
                raise ValueError(f"GaussianPrivacy: {name} must be a positive number, got {value!r}")
        self.clip_norm, self.noise_multiplier = float(clip_norm), float(noise_multiplier)
        self._rng = np.random.default_rng(seed)

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
        after, releases, data = self._spend([(self.noise_multiplier, 1.0, 1)], fl_ctx, lambda: self.privatize(dxo.data))
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

    def _accept_earlier(self, earlier: Any, fl_ctx: FLContext) -> None:
        """Pass an update an earlier filter already noised and counted, if that release was at least as private
        as this filter asks; refuse it otherwise."""
        if isinstance(earlier, dict) and earlier.get("mechanism") == "dp-sgd":
            raise PrivacyRefusal(
                "it was trained under DP-SGD (record-level) and carries that mechanism's report; client-level noise "
                "on top of it in the same job is not supported: use one of the two mechanisms in a job"
            )
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

class RequireDifferentialPrivacy(SitePrivacyBudget):
    """A site's policy (a ``privacy.json`` scope) for record-level privacy: only updates trained under DP-SGD
    (``TrainerConfig(dp=...)``, reported in the DXO meta ``pfedsam_privacy``) leave the site, and only while the
    site's budget holds: each update's DP-SGD steps are counted in the site's accountant (shared with
    ``GaussianPrivacy``: one budget per site, across jobs), and one that would take ε at ``delta`` past
    ``max_epsilon`` is kept at the site. ``METRICS`` pass; any other result is refused.

    Args:
        max_epsilon: the site's budget.
        delta: the δ at which ε is counted and limited.
        accountant_file: where the accountant's state is kept (default: the site's workspace).
    """

    _always_serialize_args = ("max_epsilon", "delta")

    def __init__(self, max_epsilon: float = 8.0, delta: float = 1e-5, accountant_file: str | None = None):
        super().__init__(delta, max_epsilon, accountant_file)

    def process_dxo(self, dxo: DXO, shareable: Shareable, fl_ctx: FLContext) -> DXO | None:
        if dxo.data_kind == DataKind.METRICS:
            return None
        if dxo.data_kind != DataKind.WEIGHT_DIFF:
            raise PrivacyRefusal(
                f"it carries {dxo.data_kind}; only {DataKind.WEIGHT_DIFF} trained under DP-SGD and {DataKind.METRICS} "
                "leave this site"
            )
        report = dxo.get_meta_prop(PRIVACY_META_KEY)
        if not isinstance(report, dict) or report.get("mechanism") != "dp-sgd":
            raise PrivacyRefusal(
                "this site requires record-level differential privacy and the update was not trained under DP-SGD "
                "(its meta has no 'dp-sgd' privacy report): run the job with TrainerConfig(dp=...), e.g. jobs/pfedsam_dpsgd"
            )
        try:
            releases = checked_releases(
                [[report.get("noise_multiplier"), report.get("sample_rate"), report.get("steps")]], "its DP-SGD report"
            )
            if not positive_number(report.get("max_grad_norm")):
                raise ValueError(f"its DP-SGD report has max_grad_norm {report.get('max_grad_norm')!r}")
        except ValueError as error:
            raise PrivacyRefusal(str(error)) from error
        after, steps, _ = self._spend(releases, fl_ctx)
        noise, rate, taken = releases[0]
        self.log_info(
            fl_ctx,
            f"RequireDifferentialPrivacy: update trained under DP-SGD ({taken} steps, noise multiplier {noise:.4g}, "
            f"sample rate {rate:.4g}, clip {report['max_grad_norm']:g}); the site's ε={after:.3f} at δ={self.delta:g} "
            f"after {steps} steps in all (budget {self.max_epsilon:g})",
        )
        site = {"epsilon": after, "delta": self.delta, "max_epsilon": self.max_epsilon, "epsilon_training": report.get("epsilon")}
        return DXO(dxo.data_kind, dxo.data, meta={**dxo.meta, PRIVACY_META_KEY: {**report, **site}})


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


def read_accountant(path: Path) -> dict[str, Any]:
    """An accountant file, checked: each release (noise multiplier finite and > 0, sample rate in (0, 1], steps a
    whole number ≥ 1), δ in (0, 1). A ValueError names the file and the first thing wrong."""
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise ValueError(f"the accountant's state {path} cannot be read ({error})") from error
    if not isinstance(record, dict) or not isinstance(record.get("history"), list):
        raise ValueError(f"the accountant's state {path} has no list of releases ('history')")
    history = checked_releases(record["history"], f"the accountant's state {path}")
    delta = record.get("delta")
    if not positive_number(delta) or delta >= 1:
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
        raise ValueError(
            f"no accountant at {path}: this site has released nothing under GaussianPrivacy or "
            "RequireDifferentialPrivacy yet"
        )
    record = read_accountant(path)
    delta, history = record["delta"], record["history"]
    epsilon = epsilon_of(history, delta)
    lines = [f"accountant {path} (δ={delta:g})", f"{'job':<40} {'releases':>8} {'ε after':>8}  first / last release"]
    for job, entry in record["jobs"].items():
        lines.append(
            f"{job:<40} {entry.get('releases', '?'):>8} {entry.get('epsilon_after', float('nan')):>8.3f}  "
            f"{entry.get('first', '?')} / {entry.get('last', '?')}"
        )
    line = f"spent ε={epsilon:.3f} at δ={delta:g} over {_releases(history)} accountant step(s)"
    budget = record.get("max_epsilon")
    if positive_number(budget):
        line += f"; budget max_epsilon={budget:g} (as of the last release): {max(budget - epsilon, 0.0):.3f} left"
    return "\n".join([*lines, line])
