"""Continuing a federation in the real simulator: job 2 starts from job 1's global partition and from each site's
own local partition, kept in the site's state folder (``PFEDSAM_STATE_DIR``); a site whose stored state was made for
other settings refuses to start instead of silently starting over."""

import os
import subprocess
from pathlib import Path

import pytest
import torch

from pfedsam_nvflare.data.config import DataConfig, SyntheticConfig
from pfedsam_nvflare.flare import PFedSAMRecipe
from pfedsam_nvflare.flare.executor import _digest
from pfedsam_nvflare.flare.site_policy import allow_pfedsam_in
from pfedsam_nvflare.model import ModelConfig
from pfedsam_nvflare.training import TrainerConfig

SITES = ["site-1", "site-2"]
MODEL = ModelConfig(backbone="tiny")
DATA = DataConfig(synthetic=SyntheticConfig(sites=2, cases=5, size=48, depth=3))


def _run_job(root: Path, name: str, rounds: int, model: ModelConfig = MODEL, initial_global: Path | None = None):
    recipe = PFedSAMRecipe(
        name=name, min_clients=len(SITES), num_rounds=rounds, model=model, trainer=TrainerConfig(batch_size=4),
        data=DATA, initial_global=None if initial_global is None else str(initial_global),
    )
    recipe.export(str(root / "jobs"))
    workspace = root / name
    allow_pfedsam_in(workspace / "local")
    env = {**os.environ, "PFEDSAM_DATA_HOME": str(root / "data"), "PFEDSAM_STATE_DIR": str(root / "state")}
    command = ["nvflare", "simulator", str(root / "jobs" / name), "-w", str(workspace), "-n", "2", "-t", "2"]
    completed = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900)
    return workspace, completed.stdout + completed.stderr, completed.returncode


@pytest.fixture(scope="module")
def jobs(tmp_path_factory):
    root = tmp_path_factory.mktemp("continue")
    first = _run_job(root, "job1", rounds=2)
    saved = first[0] / "server" / "simulate_job" / "app_server" / "FL_global_model.pt"
    states = {site: torch.load(root / "state" / site / "site_state.pt", weights_only=True) for site in SITES}
    second = _run_job(root, "job2", rounds=1, initial_global=saved)
    return root, first, second, saved, states


def test_job_two_starts_from_job_ones_global_partition(jobs):
    _, first, second, saved, _ = jobs
    assert first[2] == 0 and second[2] == 0, (first[1] + second[1])[-5000:]
    log = second[1]
    assert f"keys from {saved} (after round 2 of the federation)" in log
    job2_saved = second[0] / "server" / "simulate_job" / "app_server" / "FL_global_model.pt"
    assert torch.load(saved, weights_only=True)["rounds_done"] == 2
    assert torch.load(job2_saved, weights_only=True)["rounds_done"] == 3  # the federation's count goes on
    digest = _digest({key: value.numpy() for key, value in torch.load(saved, weights_only=True)["global"].items()})
    for site in SITES:
        assert f"{site}: round 1/1 starts from global partition {digest[:16]}" in log


def test_each_site_continues_with_its_own_local_partition(jobs):
    root, first, second, _, states = jobs
    for site in SITES:
        assert states[site]["rounds_done"] == 2  # job 1 wrote the state outside its run folder
        assert f"{site}: resumed after round 2 from {root / 'state' / site}" in second[1]
        after = torch.load(root / "state" / site / "site_state.pt", weights_only=True)
        assert after["rounds_done"] == 3
        changed = [key for key in after["local"] if not torch.equal(after["local"][key], states[site]["local"][key])]
        assert changed  # job 2 trained the experts job 1 left
        assert not (first[0] / site / "simulate_job" / "pfedsam" / "site_state.pt").exists()


def test_a_site_whose_stored_state_fits_other_settings_refuses_to_start(jobs):
    root, _, _, _, _ = jobs
    _, log, _ = _run_job(root, "job3", rounds=1, model=ModelConfig(backbone="tiny", num_experts=2))
    assert "cannot start pFedSAM" in log and "was written for model" in log
    assert "use another site directory for another configuration" in log
    for site in SITES:
        assert torch.load(root / "state" / site / "site_state.pt", weights_only=True)["rounds_done"] == 3
