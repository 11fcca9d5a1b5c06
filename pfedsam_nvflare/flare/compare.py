"""``pfedsam compare``: methods (and ablation variants) side by side, each one a job of the same settings run in
FLARE's simulator on the same sites and the same splits; one table of what each site keeps.

Every run is an exported job folder run by ``nvflare simulator`` in its own process, so a method that fails is
reported as failed and the others still run. Results are the sites' final evaluations (test cases, the model
each site keeps), read from each job's ``pfedsam_metrics.json``.

A run longer than a session can be cut into parts (``part_rounds``): jobs of a few rounds each, every one continuing
the last (its saved global partition, and each site's own state kept in the run's state folder), so that the
rounds, their random streams and the optimisers' moments are those of one uncut job. Each completed part is
recorded with a copy of the sites' states, and ``resume`` continues after the last one.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from opacus.accountants.utils import get_noise_multiplier

from ..atomic import atomic_copy, atomic_write_text
from ..data.config import DataConfig, resolve_root
from ..data.layout import DataError, Labels, list_sites
from ..model import ModelConfig
from ..model.pfedsam import PATHS
from ..reports import FINAL_MODEL, comparison_markdown, plot_comparison
from ..training import TrainerConfig
from ..training.dp import DPConfig
from ..training.site_state import PREVIOUS_STATE_FILE, STATE_FILE
from .jobs import JOB_DATA, JOB_MODEL, JOB_PRIVACY, job_recipe, job_trainer
from .recipe import RECIPE_METHODS, method_trainer
from .site_policy import allow_pfedsam_in
from .site_storage import STATE_DIR_ENV

METRICS_FILE = "pfedsam_metrics.json"
PARTS_FILE = "parts.json"  # in a run cut into parts: what it was planned with, and each completed part
GLOBAL_FILE = Path("server", "simulate_job", "app_server", "FL_global_model.pt")  # the latest global partition
# Settings of a run that are not ModelConfig or TrainerConfig fields: differential privacy at a target ε (at
# δ=1e-5) spent over the comparison's rounds, record-level (DP-SGD) or client-level (GaussianPrivacy with the job's
# clip norm); ``inf`` (or null) for none.
PRIVACY_SETTINGS = ("dp_epsilon", "client_epsilon")
DP_DELTA = 1e-5
# Lines of a site's or the server's log worth showing while a job runs.
PROGRESS_MARKERS = ("round ", "final evaluation", "kept model", "rejected the contribution", "cannot start", "ERROR")


@dataclass(frozen=True)
class Variant:
    """One run: a method and the settings it changes (``{"kd_direction": "local_to_global"}``) from the shared ones."""

    method: str
    changes: dict[str, Any] = field(default_factory=dict)

    @property
    def label(self) -> str:
        if not self.changes:
            return self.method
        return f"{self.method}[{','.join(f'{k}={v}' for k, v in self.changes.items())}]"

    @property
    def job_name(self) -> str:
        return "".join(c if c.isalnum() or c in "-_" else "_" for c in self.label).strip("_")


def parse_value(text: str) -> Any:
    """A setting's value from the command line: JSON where it parses (``2``, ``null``, ``true``), else the text."""
    try:
        return json.loads(text)
    except ValueError:
        return text


def apply_settings(
    model: ModelConfig, trainer: TrainerConfig, changes: dict[str, Any]
) -> tuple[ModelConfig, TrainerConfig]:
    """``changes`` applied to whichever of the two configurations owns each name (``seed``, owned by both, to
    both: the adapters' initial weights and the order of the training batches)."""
    model_fields, trainer_fields = {f.name for f in fields(ModelConfig)}, {f.name for f in fields(TrainerConfig)}
    model_changes = {k: v for k, v in changes.items() if k in model_fields}
    trainer_changes = {k: v for k, v in changes.items() if k in trainer_fields}
    unknown = set(changes) - set(model_changes) - set(trainer_changes)
    if unknown:
        raise ValueError(
            f"unknown setting(s) {', '.join(sorted(unknown))}: a ModelConfig or TrainerConfig field is expected"
        )
    if "method" in trainer_changes:
        raise ValueError("choose methods with --methods, not as a setting")
    return replace(model, **model_changes), replace(trainer, **trainer_changes)


def plan_variants(methods: list[str], ablate: dict[str, list[Any]] | None) -> list[Variant]:
    """Every method once; with ``ablate`` (one setting and its values) every method once per value."""
    unknown = [m for m in methods if m not in RECIPE_METHODS]
    if unknown:
        raise ValueError(f"unknown method(s) {', '.join(unknown)}; choose from {', '.join(RECIPE_METHODS)}")
    if not methods:
        raise ValueError("name at least one method")
    if not ablate:
        return [Variant(method) for method in methods]
    if len(ablate) != 1:
        raise ValueError("ablate one setting at a time")
    (name, values), = ablate.items()
    return [Variant(method, {name: value}) for method in methods for value in values]


@dataclass
class Comparison:
    """What ``pfedsam compare`` runs: ``variants`` on ``sites`` of ``data`` for ``rounds`` rounds, under ``out``."""

    out: Path
    variants: list[Variant]
    rounds: int
    data: DataConfig = JOB_DATA
    model: ModelConfig = JOB_MODEL
    changes: dict[str, Any] = field(default_factory=dict)  # settings every variant changes (``--set``)
    sites: list[str] | None = None
    resume: bool = False  # keep the completed runs of an earlier comparison of the same settings in ``out``
    part_rounds: int | None = None  # cut each run into jobs of at most this many rounds, each continuing the last

    def run(self) -> dict[str, Any]:
        self.out = self.out.resolve()  # the simulator's server and sites run in folders of their own
        self.out.mkdir(parents=True, exist_ok=True)
        root = resolve_root(self.data)  # generated once here, not raced by the sites
        data = replace(self.data, root=str(root))
        available = list_sites(root)
        sites = self.sites or available
        missing = [site for site in sites if site not in available]
        if missing:
            raise DataError(f"site(s) {', '.join(missing)} not in {root} (it has {', '.join(available)})")
        labels = list(Labels.of_root(root).names)
        if "num_labels" not in self.changes:  # one output channel per label of the data, unless set explicitly
            self.model = replace(self.model, num_labels=len(labels))
        result: dict[str, Any] = {
            "data": {"root": str(root), "sites": sites, "labels": labels},
            "rounds": self.rounds,
            "settings": {"model": self.model.to_dict(), "changes": self.changes, "data": data.to_dict()},
            "methods": {},
        }
        earlier = self._earlier(result)
        result["methods"].update(earlier)  # every completed run of the same settings stays in the table
        for index, variant in enumerate(self.variants, start=1):
            if variant.label in earlier:
                trainer = self._trainer_settings(variant, data, sites)
                if earlier[variant.label].get("trainer") == trainer:
                    print(f"[{index}/{len(self.variants)}] {variant.label}: completed earlier, kept", flush=True)
                    continue
                print(
                    f"[{index}/{len(self.variants)}] {variant.label}: completed earlier with other training settings "
                    f"({earlier[variant.label].get('trainer')}), run again",
                    flush=True,
                )
            cut = f" in jobs of up to {self.part_rounds}" if self._cut else ""
            print(f"[{index}/{len(self.variants)}] {variant.label}: {self.rounds} rounds{cut} on {', '.join(sites)}",
                  flush=True)
            outcome = self._run_variant(variant, data, sites)
            result["methods"][variant.label] = outcome
            status = outcome["status"]
            print(f"[{index}/{len(self.variants)}] {variant.label}: {status} in {outcome['wall_seconds'] / 60:.1f} min"
                  + (f" ({outcome['error']})" if status != "completed" else ""), flush=True)
            self._write(result)
        return result

    def _earlier(self, result: dict[str, Any]) -> dict[str, Any]:
        """With ``resume``, the completed runs of ``out/comparison.json`` (so a long comparison can be run in parts,
        one method at a time); refused if that file was made with other settings."""
        path = self.out / "comparison.json"
        if not self.resume or not path.exists():
            return {}
        earlier = json.loads(path.read_text())
        for key in ("data", "rounds", "settings"):
            if earlier.get(key) != result[key]:
                raise ValueError(
                    f"{path} was made with other {key} ({earlier.get(key)!r}, now {result[key]!r}); use another --out"
                )
        return {label: run for label, run in earlier["methods"].items() if run.get("status") == "completed"}

    def _recipe(
        self, variant: Variant, data: DataConfig, sites: list[str], part: tuple[str, int, str | None] | None = None
    ) -> Any:
        """The job of ``variant``; with ``part`` (its job name, its rounds, the global partition it continues from)
        one part of it. Privacy is spent over the whole run's rounds either way."""
        changes = {**self.changes, **variant.changes}
        preset = RECIPE_METHODS[variant.method][1]
        # stricter than the recipe: a comparison knows which settings were asked for, even the default
        if preset is not None and "kd_direction" in changes:
            raise ValueError(
                f"method {variant.method} always runs kd_direction={preset!r}; set or ablate kd_direction with the "
                "method pfedsam"
            )
        epsilons = {name: target_epsilon(changes.pop(name), name) for name in PRIVACY_SETTINGS if name in changes}
        model, trainer = apply_settings(self.model, job_trainer(variant.method), changes)
        if epsilons.get("dp_epsilon") is not None:
            dp = DPConfig(target_epsilon=epsilons["dp_epsilon"], delta=DP_DELTA, rounds=self.rounds)
            # the method's own trainer settings first (the recipe sets them too), so that DP-SGD is checked against them
            trainer = replace(method_trainer(variant.method, trainer), dp=dp)
        privacy = None
        if epsilons.get("client_epsilon") is not None:
            epsilon = epsilons["client_epsilon"]
            noise = get_noise_multiplier(target_epsilon=epsilon, target_delta=DP_DELTA, sample_rate=1.0, steps=self.rounds)
            privacy = {**JOB_PRIVACY, "noise_multiplier": noise, "delta": DP_DELTA, "max_epsilon": epsilon}
            if part is not None or self._cut:
                raise ValueError(
                    "client_epsilon cannot be spent over a run cut into parts: each job's privacy filter would count "
                    "only its own rounds; run it without --part-rounds"
                )
        name, rounds, initial_global = part or (variant.job_name, self.rounds, None)
        return job_recipe(
            variant.method, num_rounds=rounds, model=model, trainer=trainer, data=data, min_clients=len(sites),
            name=name, privacy=privacy, initial_global=initial_global,
        )

    def _trainer_settings(self, variant: Variant, data: DataConfig, sites: list[str]) -> dict[str, Any] | None:
        """The training settings ``variant`` runs with now (every field, the precision among them), or None if it
        cannot be built; a run made with others is not kept by ``resume``."""
        try:
            return self._recipe(variant, data, sites).trainer.to_dict()
        except (ValueError, TypeError):
            return None

    @property
    def _cut(self) -> bool:
        return self.part_rounds is not None and self.part_rounds < self.rounds

    def _run_variant(self, variant: Variant, data: DataConfig, sites: list[str]) -> dict[str, Any]:
        try:
            recipe = self._recipe(variant, data, sites)
        except (ValueError, TypeError) as error:
            return _failed(error)
        run_dir = self.out / "runs" / variant.job_name
        if not self._cut and not (self.resume and (run_dir / PARTS_FILE).exists()):
            # one job; its sites keep their state in the job's run folder, so every run starts from the pretrained
            # model whatever the environment says
            outcome = self._run_job(recipe, variant.job_name, run_dir, sites, state_dir=None)
            return {**outcome, "trainer": recipe.trainer.to_dict()}
        return self._run_in_parts(variant, recipe, data, sites, run_dir)

    def _run_job(
        self, recipe: Any, name: str, workspace: Path, sites: list[str], state_dir: Path | None
    ) -> dict[str, Any]:
        """Export ``recipe`` (the job ``name``) and run it in the simulator in ``workspace``, emptied first so that
        nothing of an earlier attempt is read as this one's result."""
        began = time.monotonic()
        try:
            recipe.export(str(self.out / "jobs"))
        except (ValueError, TypeError) as error:
            return _failed(error)
        shutil.rmtree(workspace, ignore_errors=True)
        allow_pfedsam_in(workspace / "local")
        log = self.out / "runs" / f"{name}.log"
        try:
            returncode = _simulate(self.out / "jobs" / name, workspace, sites, log, state_dir)
        except OSError as error:
            return {"status": "failed", "error": f"the simulator did not run: {error}", "wall_seconds": 0.0}
        outcome: dict[str, Any] = {"wall_seconds": round(time.monotonic() - began, 1), "log": str(log)}
        metrics_file = workspace / "server" / "simulate_job" / METRICS_FILE
        try:
            metrics = json.loads(metrics_file.read_text())
        except (OSError, ValueError) as error:
            reason = f"no readable {METRICS_FILE} ({type(error).__name__}; simulator exit {returncode}); see {log}"
            return {**outcome, "status": "failed", "error": reason}
        summary = summarise_run(metrics, sites)
        missing = [site for site in sites if not summary[site].get("test", {}).get("cases")]
        if returncode != 0 or missing:
            reason = f"simulator exit {returncode}" + (f", no test results from {', '.join(missing)}" if missing else "")
            return {**outcome, "status": "failed", "error": f"{reason}; see {log}", "sites": summary}
        return {**outcome, "status": "completed", "sites": summary, "mean": mean_over_sites(summary)}

    def _run_in_parts(
        self, variant: Variant, recipe: Any, data: DataConfig, sites: list[str], run_dir: Path
    ) -> dict[str, Any]:
        """The run as jobs of at most ``part_rounds`` rounds (the rest in one job where that is unset), each
        continuing the last; with ``resume``, after the last part completed earlier."""
        trainer = recipe.trainer.to_dict()
        plan = {"rounds": self.rounds, "sites": sites, "data": data.to_dict(), "model": recipe.model.to_dict(),
                "trainer": trainer}
        state_dir = run_dir / "state"
        parts = self._completed_parts(run_dir, plan)
        if parts:
            print(f"    continuing after round {parts[-1]['rounds_done']} ({len(parts)} part(s) completed earlier)",
                  flush=True)
            for folder in run_dir.glob("states_after_part*"):  # left by a stop between two writes
                if folder.name != parts[-1]["states"]:
                    shutil.rmtree(folder)
        else:
            shutil.rmtree(run_dir, ignore_errors=True)
        restore_site_states(state_dir, run_dir / parts[-1]["states"] if parts else None, sites)
        while (done := parts[-1]["rounds_done"] if parts else 0) < self.rounds:
            number, rounds = len(parts) + 1, min(self.part_rounds or self.rounds, self.rounds - done)
            print(f"    part {number}: rounds {done + 1}-{done + rounds} of {self.rounds}", flush=True)
            name = f"{variant.job_name}_part{number}"
            previous = str(run_dir / parts[-1]["workspace"] / GLOBAL_FILE) if parts else None
            try:
                part_recipe = self._recipe(variant, data, sites, part=(name, rounds, previous))
            except (ValueError, TypeError) as error:
                return _failed(error)
            outcome = self._run_job(part_recipe, name, run_dir / f"part{number}", sites, state_dir)
            if outcome["status"] != "completed":
                wall = sum(part["wall_seconds"] for part in parts) + outcome["wall_seconds"]
                error = f"part {number} (rounds {done + 1}-{done + rounds}): {outcome['error']}"
                return {**outcome, "error": error, "wall_seconds": wall, "trainer": trainer}
            states = f"states_after_part{number}"
            copy_site_states(state_dir, run_dir / states, sites)
            parts.append({
                "workspace": f"part{number}", "rounds": rounds, "rounds_done": done + rounds, "states": states,
                "wall_seconds": outcome["wall_seconds"], "log": outcome["log"], "sites": outcome["sites"],
            })
            atomic_write_text(json.dumps({"plan": plan, "parts": parts}, indent=2) + "\n", run_dir / PARTS_FILE)
            if number > 1:  # the part before is no longer needed to continue: its states and model files go
                shutil.rmtree(run_dir / parts[-2]["states"], ignore_errors=True)
                for model_file in (run_dir / parts[-2]["workspace"]).rglob("*.pt"):
                    model_file.unlink()
        summary = join_parts(parts)
        return {
            "wall_seconds": round(sum(part["wall_seconds"] for part in parts), 1),
            "log": parts[-1]["log"],
            "trainer": trainer,
            # each part ends with the sites' kept models scored on their test cases: test Dice after so many rounds
            "parts": [
                {"rounds_done": part["rounds_done"], "wall_seconds": part["wall_seconds"],
                 "personalized_dice": mean_over_sites(part["sites"])["personalized_dice"]}
                for part in parts
            ],
            "status": "completed",
            "sites": summary,
            "mean": mean_over_sites(summary),
        }

    def _completed_parts(self, run_dir: Path, plan: dict[str, Any]) -> list[dict[str, Any]]:
        """With ``resume``, the parts of this run completed earlier with the same plan; else none."""
        path = run_dir / PARTS_FILE
        if not self.resume or not path.exists():
            return []
        earlier = json.loads(path.read_text())
        if earlier.get("plan") != plan:
            print(f"    {path} was made with other settings: starting the run over", flush=True)
            return []
        parts = earlier["parts"]
        if not parts:
            return []
        needed = [run_dir / parts[-1]["workspace"] / GLOBAL_FILE]
        needed += [run_dir / parts[-1]["states"] / site / STATE_FILE for site in plan["sites"]]
        missing = [str(path) for path in needed if not path.exists()]
        if missing:
            print(f"    {', '.join(missing)} of part {len(parts)} are gone: starting the run over", flush=True)
            return []
        return parts

    def _write(self, result: dict[str, Any]) -> None:
        atomic_write_text(json.dumps(result, indent=2) + "\n", self.out / "comparison.json")
        atomic_write_text(comparison_markdown(result) + "\n", self.out / "comparison.md")
        plot_comparison(result, self.out / "comparison.png")


def _failed(error: Exception) -> dict[str, Any]:
    """The outcome of a run that could not be built or started."""
    return {"status": "failed", "error": f"{type(error).__name__}: {error}", "wall_seconds": 0.0}


def _simulate(job: Path, workspace: Path, sites: list[str], log: Path, state_dir: Path | None) -> int:
    """Run ``job`` in ``nvflare simulator`` with one process per site (each takes its share of the cores), the
    sites keeping their state in ``state_dir`` (in the job's run folder where it is None); the log goes to ``log``
    and its progress lines to the console."""
    env = {key: value for key, value in os.environ.items() if key != STATE_DIR_ENV}
    if state_dir is not None:
        env[STATE_DIR_ENV] = str(state_dir.resolve())
    command = [
        sys.executable, "-m", "nvflare.cli", "simulator", str(job), "-w", str(workspace),
        "-c", ",".join(sites), "-t", str(len(sites)), "-l", "concise",
    ]
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("w") as handle, subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env
    ) as process:
        assert process.stdout is not None
        for line in process.stdout:
            handle.write(line)
            if any(marker in line for marker in PROGRESS_MARKERS):
                print("    " + line.rstrip()[:200], flush=True)
    return process.returncode


def target_epsilon(value: Any, name: str) -> float | None:
    """A privacy setting's ε: a finite number above 0, or None for ``inf``/null (no privacy)."""
    if value is None or value in ("inf", float("inf")):
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < float("inf"):
        raise ValueError(f"{name} must be a number above 0 or inf, got {value!r}")
    return float(value)


def summarise_run(metrics: dict[str, Any], sites: list[str]) -> dict[str, Any]:
    """Per site: the final evaluation of the model it keeps (test and validation), the bytes it sent, and its
    per-round validation curves (training curves; never used for the reported numbers)."""
    final = metrics.get("final", {}).get(FINAL_MODEL, {})
    summary: dict[str, Any] = {}
    for site in sites:
        rounds = [entry for entry in metrics.get("rounds", []) if site in entry.get("sites", {})]
        sent = [entry["sites"][site].get("bytes_sent", 0) for entry in rounds]
        entry: dict[str, Any] = {
            "bytes_sent_per_round": sent[-1] if sent else 0,
            "bytes_sent_total": sum(sent),
            "curve": {
                "round": [e["round"] + 1 for e in rounds],
                "global_dice": [e["sites"][site].get("global_dice") for e in rounds],
                "personalized_dice": [e["sites"][site].get("personalized_dice") for e in rounds],
            },
        }
        report = final.get(site, {})
        for split in ("val", "test"):
            if isinstance(report.get(split), dict):
                entry[split] = report[split]
        summary[site] = entry
    return summary


def copy_site_states(state_dir: Path, to: Path, sites: list[str]) -> None:
    """Each site's saved state (``site_state.pt``: its own partition, optimisers and round count), copied to
    ``to/<site>``."""
    for site in sites:
        atomic_copy(state_dir / site / STATE_FILE, to / site / STATE_FILE)


def restore_site_states(state_dir: Path, saved: Path | None, sites: list[str]) -> None:
    """Put back each site's state as it was after the last completed part (``saved``), or none before the first,
    undoing whatever a part cut short had saved; the split and the feature cache stay."""
    for site in sites:
        folder = state_dir / site
        folder.mkdir(parents=True, exist_ok=True)
        (folder / PREVIOUS_STATE_FILE).unlink(missing_ok=True)
        if saved is None:
            (folder / STATE_FILE).unlink(missing_ok=True)
        else:
            atomic_copy(saved / site / STATE_FILE, folder / STATE_FILE)


def join_parts(parts: list[dict[str, Any]]) -> dict[str, Any]:
    """One run's per-site summary from its parts': curves numbered over the whole run, bytes summed, and the
    final evaluations of the last part (the model each site keeps)."""
    joined: dict[str, Any] = {}
    for site, last in parts[-1]["sites"].items():
        curve: dict[str, list] = {key: [] for key in last["curve"]}
        for part in parts:
            before = part["rounds_done"] - part["rounds"]
            for key, values in part["sites"][site]["curve"].items():
                curve[key] += [value + before for value in values] if key == "round" else values
        joined[site] = {
            **last,
            "bytes_sent_total": sum(part["sites"][site]["bytes_sent_total"] for part in parts),
            "curve": curve,
        }
    return joined


def mean_over_sites(summary: dict[str, Any]) -> dict[str, float | None]:
    """The mean over sites of each site's mean over labels, for both paths (``None`` if a site has none); and the
    bytes."""
    means: dict[str, float | None] = {}
    for path in PATHS:
        for metric in ("dice", "hd95"):
            values = [site["test"][path][metric]["mean"] for site in summary.values()]
            means[f"{path}_{metric}"] = None if None in values else sum(values) / len(values)
    means["bytes_sent_per_round"] = sum(site["bytes_sent_per_round"] for site in summary.values()) / len(summary)
    means["bytes_sent_total"] = sum(site["bytes_sent_total"] for site in summary.values())
    return means
