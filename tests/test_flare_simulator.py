"""End to end through the real ``nvflare simulator``: 3 sites, 2 rounds, the tiny backbone."""

import json
import os
import re
import subprocess
from pathlib import Path

import pytest
import torch
from flare_probe import RECORD_FILE
from opacus.accountants import RDPAccountant
from PIL import Image
from tiny_job import MODEL, export_tiny_job

from pfedsam_nvflare.flare.settings import model_config_for, reference
from pfedsam_nvflare.flare.site_policy import PACKAGE_PREFIX, allow_pfedsam, allow_pfedsam_in
from pfedsam_nvflare.reports import results_table

TESTS = Path(__file__).parent
SITES = ["site-1", "site-2", "site-3"]


def _simulate(job: Path, workspace: Path, data_home: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PFEDSAM_DATA_HOME": str(data_home), "PYTHONPATH": str(TESTS)}
    command = ["nvflare", "simulator", str(job), "-w", str(workspace), "-n", "3", "-t", "3"]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=900)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("simulation")
    job = export_tiny_job(root, probe=True)
    workspace = root / "workspace"
    resources = allow_pfedsam_in(workspace / "local")
    policy = json.loads(resources.read_text())
    policy["class_allow_list"].append("flare_probe.")  # the test's own probe, nothing wider
    resources.write_text(json.dumps(policy))
    completed = _simulate(job, workspace, root / "data")
    return workspace, completed


def test_the_job_completes(run):
    _, completed = run
    output = completed.stdout + completed.stderr
    assert completed.returncode == 0, output[-5000:]
    assert "cannot start pFedSAM" not in output and "rejected the contribution" not in output
    assert "Traceback" not in output, output[output.find("Traceback") :][:3000]
    for site in SITES:  # the three simulated sites share this machine's cores
        assert re.search(rf"{site}: \d+ torch threads \(\d+ cores shared by 3 site\(s\) on this machine\)", output)


def test_the_server_keeps_exactly_the_global_partition(run):
    workspace, _ = run
    partition = reference(model_config_for(MODEL.to_dict(), "pfedsam")).partition
    app = workspace / "server" / "simulate_job" / "app_server"
    for name in ("FL_global_model.pt", "best_FL_global_model.pt"):
        saved = torch.load(app / name, weights_only=True)
        assert sorted(saved["global"]) == sorted(partition.global_keys), name
        assert saved["method"] == "pfedsam"


def test_each_site_keeps_its_local_partition(run):
    workspace, _ = run
    partition = reference(model_config_for(MODEL.to_dict(), "pfedsam")).partition
    local_states = []
    for site in SITES:
        folder = workspace / site / "simulate_job" / "pfedsam"
        state = torch.load(folder / "site_state.pt", weights_only=True)
        assert state["rounds_done"] == 2
        assert sorted(state["local"]) == sorted(partition.local_keys)
        local_states.append(state["local"])
        split = json.loads((folder / "split.json").read_text())
        assert split["site"] == site and not set(split["train_cases"]) & set(split["val_cases"])
        assert split["test_cases"] and not set(split["test_cases"]) & set(split["train_cases"] + split["val_cases"])
        assert (folder / "personalized_model.pt").exists() and (folder / "best_personalized_model.pt").exists()
        with Image.open(folder / "overlays.png") as image:
            assert image.size[0] > 100
    key = partition.local_keys[0]
    assert not torch.equal(local_states[0][key], local_states[1][key])  # personal, not shared


def test_the_metrics_file_has_every_site_for_every_round(run):
    workspace, _ = run
    server = workspace / "server" / "simulate_job"
    metrics = json.loads((server / "pfedsam_metrics.json").read_text())
    assert [entry["round"] for entry in metrics["rounds"]] == [0, 1] and metrics["dropped"] == {}
    for entry in metrics["rounds"]:
        assert sorted(entry["sites"]) == SITES and sorted(entry["contributors"]) == SITES
        assert entry["missing"] == []  # every site connected to the server sent its update
        for values in entry["sites"].values():
            for key in ("personalized_dice", "personalized_hd95", "global_dice", "global_hd95", "global_loss", "bytes_sent", "bytes_received", "train_seconds"):
                assert key in values, key
            assert values["bytes_sent"] == 4 * reference(model_config_for(MODEL.to_dict(), "pfedsam")).partition.num_values("global")
            # the site's own work is part of the round the server timed (benchmarks/flare_overhead.py)
            assert values["train_seconds"] < values["task_seconds"] < entry["seconds"]
    final = metrics["final"]["SRV_FL_global_model.pt"]
    assert sorted(final) == SITES
    for site in SITES:
        assert final[site]["model_file"] == "personalized_model.pt" and final[site]["test"]["cases"] == 1
        assert set(final[site]["test"]["personalized"]["dice"]) == {"foreground", "mean"}
    table = results_table(metrics).splitlines()
    assert table[0].split()[:5] == ["site", "label", "test", "cases", "kept"]
    for site in SITES:  # the end-of-run table: test Dice of the kept model and of the global model per site
        row = next(line.split() for line in table if line.startswith(site))
        kept, global_ = float(row[3]), float(row[4])
        assert kept == pytest.approx(final[site]["test"]["personalized"]["dice"]["mean"], abs=1e-3)
        assert global_ == pytest.approx(final[site]["test"]["global"]["dice"]["mean"], abs=1e-3)
    with Image.open(server / "learning_curves.png") as image:
        assert image.size[0] > 500
    assert sorted(p.name for p in (server / "tb_events").iterdir()) == SITES


def test_nothing_local_reaches_the_server(run):
    workspace, _ = run
    partition = reference(model_config_for(MODEL.to_dict(), "pfedsam")).partition
    server = workspace / "server"
    records = [json.loads(line) for line in (server / "simulate_job" / RECORD_FILE).read_text().splitlines()]
    assert len(records) == 3 * 2
    for record in records:
        assert record["keys"] == sorted(partition.global_keys), record["site"]
    local_names = [key.encode() for key in partition.local_keys]
    for path in server.rglob("*"):
        if path.is_file():
            content = path.read_bytes()
            assert not any(name in content for name in local_names), path


def test_once_the_dp_budget_is_spent_the_sites_keep_their_updates_and_the_job_ends(tmp_path):
    # GaussianPrivacy as a job filter; noise multiplier 1: ε at δ=1e-5 is 4.73 after round 1, 7.08 after round 2
    job = export_tiny_job(tmp_path, privacy={"noise_multiplier": 1.0, "delta": 1e-5, "max_epsilon": 5.0})
    workspace = tmp_path / "workspace"
    allow_pfedsam_in(workspace / "local")
    _simulate(job, workspace, tmp_path / "data")
    metrics = json.loads((workspace / "server" / "simulate_job" / "pfedsam_metrics.json").read_text())
    assert len(metrics["rounds"]) == 1, "a round after the budget was spent was aggregated"
    accountant = RDPAccountant()
    accountant.step(noise_multiplier=1.0, sample_rate=1.0)
    logs = []
    for site in SITES:
        report = metrics["rounds"][0]["updates"][site]["privacy"]
        assert report["releases"] == 1 and report["epsilon"] == pytest.approx(accountant.get_epsilon(1e-5))
        state = json.loads((workspace / site / "privacy_accountant.json").read_text())  # the site's, not the job's
        assert state["history"] == [[1.0, 1.0, 1]]  # no site released a second update
        logs.append((workspace / site / "log.txt").read_text())
    # the first refusal ends the job (3 sites, min_clients 3), so a slower site may be stopped before its filter
    assert any("the privacy budget is spent: steps counted so far 1, ε=4.729" in log and "max_epsilon=5" in log for log in logs)
    assert "Aborting current RUN" in (workspace / "server" / "log.txt").read_text()


def test_a_site_that_does_not_allow_the_package_refuses_the_job(tmp_path):
    job = export_tiny_job(tmp_path)
    completed = _simulate(job, tmp_path / "workspace", tmp_path / "data")
    output = completed.stdout + completed.stderr
    assert "is not in allow_list" in output
    assert not (tmp_path / "workspace" / "server" / "simulate_job" / "pfedsam_metrics.json").exists()


def test_the_committed_simulator_workspace_allows_only_the_package():
    committed = json.loads((TESTS.parent / "workspace" / "local" / "resources.json").read_text())
    assert committed == allow_pfedsam({"format_version": 2})
    assert "*" not in committed["class_allow_list"] and PACKAGE_PREFIX in committed["class_allow_list"]
    assert "class_list_enforcement_mode" not in committed


def test_a_job_whose_copies_of_the_model_settings_differ_stops_at_start_naming_both(tmp_path):
    """The job folder holds one copy of the model settings per component; an edit to one of them stops the job before
    any round, with one error that names the setting and both values (not a rejection every round)."""
    job = export_tiny_job(tmp_path)
    server_config = job / "app" / "config" / "config_fed_server.json"
    config = json.loads(server_config.read_text())
    aggregator = next(c for c in config["components"] if c["id"] == "aggregator")
    aggregator["args"]["model"]["lora_rank"] = 2
    server_config.write_text(json.dumps(config, indent=2))
    workspace = tmp_path / "workspace"
    allow_pfedsam_in(workspace / "local")
    _simulate(job, workspace, tmp_path / "data")
    log = (workspace / "server" / "log.txt").read_text()
    assert "lora_rank: 2 in the aggregator, 4 in the persistor" in log
    assert not (workspace / "server" / "simulate_job" / "app_server" / "FL_global_model.pt").exists()
    metrics = workspace / "server" / "simulate_job" / "pfedsam_metrics.json"
    assert not metrics.exists() or not json.loads(metrics.read_text())["rounds"]
