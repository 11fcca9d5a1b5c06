"""Record-level privacy required by the sites, in the real ``nvflare simulator`` (3 sites, 1 round, the tiny
backbone): every site applies ``RequireDifferentialPrivacy``. A job trained without DP-SGD sends nothing; a DP-SGD
job's updates leave, counted in each site's accountant, their ε in the server's metrics.

FLARE 2.9's simulator applies a ``privacy.json`` only at its server (its sites get no privacy scope), so the filter
runs here as the sites' result filter, and the same policy in the workspace's ``local/privacy.json`` (which the
simulator gives the server) checks that the filter passes results on unchanged there."""

import json
import os
import subprocess
from pathlib import Path

import pytest
from deployment import start_logged, wait_logged
from opacus.accountants import RDPAccountant

from pfedsam_nvflare.data.config import DataConfig, SyntheticConfig
from pfedsam_nvflare.flare import PFedSAMRecipe
from pfedsam_nvflare.flare.privacy import ACCOUNTANT_FILE, RequireDifferentialPrivacy, read_accountant
from pfedsam_nvflare.flare.site_policy import allow_pfedsam_in
from pfedsam_nvflare.model import ModelConfig
from pfedsam_nvflare.training import TrainerConfig

SITES = ["site-1", "site-2", "site-3"]
POLICY = {
    "scopes": [
        {
            "name": "record_level",
            "properties": {},
            "task_result_filters": [
                {"path": "pfedsam_nvflare.flare.privacy.RequireDifferentialPrivacy", "args": {"max_epsilon": 50.0, "delta": 1e-5}}
            ],
        }
    ],
    "default_scope": "record_level",
}
DP = {"noise_multiplier": 1.0, "max_grad_norm": 1.0}


def _start(root: Path, name: str, dp: dict | None) -> tuple[subprocess.Popen, Path]:
    """Start the job in the simulator, its output in ``root/<name>.log``."""
    trainer = TrainerConfig(batch_size=4, kd_direction="none", dp=dp)
    data = DataConfig(synthetic=SyntheticConfig(cases=4, size=48, depth=3))
    recipe = PFedSAMRecipe(name=name, num_rounds=1, model=ModelConfig(backbone="tiny"), trainer=trainer, data=data)
    (policy,) = POLICY["scopes"][0]["task_result_filters"]
    recipe.add_weights_output_filter(RequireDifferentialPrivacy(**policy["args"]))
    recipe.export(str(root / "jobs"))
    workspace = root / name
    (allow_pfedsam_in(workspace / "local").parent / "privacy.json").write_text(json.dumps(POLICY))
    env = {**os.environ, "PFEDSAM_DATA_HOME": str(root / "data")}
    command = ["nvflare", "simulator", str(root / "jobs" / name), "-w", str(workspace), "-n", "3", "-t", "3"]
    return start_logged(command, root / f"{name}.log", env, cwd=root), workspace


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("dp_policy")
    # both jobs at once, each in a simulator workspace of its own
    started = {name: _start(root, name, dp) for name, dp in (("plain", None), ("dpsgd", DP))}
    return {name: (wait_logged(process, root / f"{name}.log", 900), workspace) for name, (process, workspace) in started.items()}


def _metrics(workspace: Path) -> dict:
    return json.loads((workspace / "server" / "simulate_job" / "pfedsam_metrics.json").read_text())


def test_a_site_that_requires_dp_keeps_an_update_trained_without_it(runs):
    """Every site refuses; FLARE ends the run at the first refusal, since the round can no longer reach
    ``min_clients`` (3) answers."""
    (_, output), workspace = runs["plain"]
    refusal = "RequireDifferentialPrivacy kept this result at the site: this site requires record-level differential privacy"
    assert refusal in output, output[-5000:]
    assert "Result from site-" in output and "TASK_RESULT_FILTER_ERROR. Cannot reach min_response" in output
    assert "RequireDifferentialPrivacy is a site's filter; at the server it passes results on unchanged" in output
    assert _metrics(workspace)["rounds"] == []  # nothing was averaged
    assert list(workspace.rglob(ACCOUNTANT_FILE)) == []  # nothing released, nothing counted


def test_a_dp_sgd_update_leaves_counted_in_the_sites_budget(runs):
    (code, output), workspace = runs["dpsgd"]
    assert code == 0, output[-5000:]
    assert "kept this result at the site" not in output
    (entry,) = _metrics(workspace)["rounds"]
    assert sorted(entry["contributors"]) == SITES
    accountants = {path.relative_to(workspace).parts[0]: read_accountant(path) for path in workspace.rglob(ACCOUNTANT_FILE)}
    assert sorted(accountants) == SITES
    for site in SITES:
        report = entry["updates"][site]["privacy"]
        assert report["mechanism"] == "dp-sgd" and report["noise_multiplier"] == 1.0 and report["max_epsilon"] == 50.0
        (release,) = accountants[site]["history"]
        assert release == (1.0, report["sample_rate"], report["steps"])
        independent = RDPAccountant()
        for _ in range(report["steps"]):
            independent.step(noise_multiplier=1.0, sample_rate=report["sample_rate"])
        assert report["epsilon"] == pytest.approx(independent.get_epsilon(1e-5), rel=1e-9) == accountants[site]["epsilon"]
        sent = entry["sites"][site]
        assert sent["dp_epsilon"] == pytest.approx(report["epsilon_training"])
        # numbers that depend on the training records outside DP-SGD stay at the site
        assert not [key for key in sent if key.endswith("_loss") or key.startswith("personalized_")]
