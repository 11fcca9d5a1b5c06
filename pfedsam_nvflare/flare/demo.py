"""``pfedsam demo``: the job on the bundled LiteMedSAM weights over generated sites in FLARE's simulator,
ending with a per-site table and the paths of the pictures."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from nvflare.recipe.sim_env import SimEnv

from ..reports import results_table
from .jobs import JOB_PRIVACY, dpsgd_recipe, job_recipe
from .site_policy import allow_pfedsam_in

SITES = ("site-1", "site-2", "site-3")
DEMO_DP = (None, "client", "sgd")


def summary(metrics: dict[str, Any], job_dir: Path) -> str:
    """The table a person reads at the end of a run, and where its files are."""
    server = job_dir / "server" / "simulate_job"
    lines = [results_table(metrics)]
    lines.append(f"metrics:         {server / 'pfedsam_metrics.json'}")
    lines.append(f"learning curves: {server / 'learning_curves.png'}")
    lines.append(f"TensorBoard:     tensorboard --logdir {server / 'tb_events'}")
    for site in sorted(metrics["rounds"][-1]["sites"]):
        folder = job_dir / site / "simulate_job" / "pfedsam"
        lines.append(f"{site}: kept model {folder / 'personalized_model.pt'}, overlays {folder / 'overlays.png'}")
    return "\n".join(lines)


def run_demo(workspace: str | Path, method: str = "pfedsam", num_rounds: int = 3, dp: str | None = None) -> tuple[dict, str]:
    """Run the job in the simulator under ``workspace/<job name>``; returns the metrics and the summary. With
    ``dp="client"`` every site clips and noises its updates (``GaussianPrivacy``, the ``pfedsam_dp`` job), with
    ``dp="sgd"`` every site trains the global phase under DP-SGD (the ``pfedsam_dpsgd`` job).

    The sites run side by side, one process each (fewer simulator threads than sites would make the simulator
    restart each site's app on every turn); each site takes its share of the cores.
    """
    workspace = Path(workspace).resolve()
    if dp not in DEMO_DP:
        raise ValueError(f"dp must be one of {', '.join(map(str, DEMO_DP))}, got {dp!r}")
    if dp == "sgd":
        recipe = dpsgd_recipe(method, num_rounds=num_rounds)
    else:
        recipe = job_recipe(method, num_rounds=num_rounds, privacy=JOB_PRIVACY if dp == "client" else None)
    job_dir = workspace / recipe.name
    allow_pfedsam_in(job_dir / "local")  # this simulated federation's sites accept pfedsam_nvflare components
    print(f"pFedSAM demo: job {recipe.name}, {num_rounds} rounds, {len(SITES)} simulated sites, workspace {job_dir}")
    began = time.monotonic()
    recipe.execute(
        SimEnv(clients=list(SITES), num_threads=len(SITES), workspace_root=str(workspace), log_config="concise")
    )
    elapsed = time.monotonic() - began
    metrics = json.loads((job_dir / "server" / "simulate_job" / "pfedsam_metrics.json").read_text())
    text = summary(metrics, job_dir) + f"\nfinished in {elapsed / 60:.1f} minutes"
    return metrics, text
