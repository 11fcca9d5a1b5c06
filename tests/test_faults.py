"""Faults in a running federation, on a real FLARE POC deployment (mutual TLS over loopback, the tiny job, every
site keeping its state in a state folder): site-3 killed mid-round in job 1 (``min_clients=2``), then started
again; job 2 aborted mid-round through the FLARE API; job 3 continuing from what job 2's last complete round saved,
until the server is killed mid-round and started again; job 4 continuing from job 3's last saved round (FLARE 2.9
no longer resumes a job from a snapshot). Jobs 2 and 3 are stopped from outside long before their end. The server declares a silent site dead after
``heart_beat_timeout`` (shortened here from FLARE's 600 s)."""

import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from deployment import left_running, processes_under, service_env
from nvflare.fuel.flare_api.api_spec import TargetType
from nvflare.fuel.flare_api.flare_api import new_secure_session

from pfedsam_nvflare.data.config import DataConfig, SyntheticConfig
from pfedsam_nvflare.flare import PFedSAMRecipe
from pfedsam_nvflare.flare.executor import _digest
from pfedsam_nvflare.flare.poc import poc_deployment, prepare_poc, start_poc, stop_poc
from pfedsam_nvflare.model import ModelConfig
from pfedsam_nvflare.training import TrainerConfig
from pfedsam_nvflare.training.site_state import load_site_state

SITES = ["site-1", "site-2", "site-3"]
ROUNDS = 3
# jobs stopped from outside (an abort, a killed server): an abort that takes a round or two to reach the sites
# still lands mid-job
LONG_ROUNDS = 20
HEARTBEAT_TIMEOUT = 45  # seconds without a heartbeat (sites send one every 30 s) before the server drops a site
DATA = DataConfig(synthetic=SyntheticConfig(cases=4, size=48, depth=3))


def _export(root: Path, name: str, rounds: int, min_clients: int, initial_global: Path | None = None) -> Path:
    """The tiny job; a round waits 20 s for a site slower than the first ``min_clients`` (a loaded test machine),
    so that only the killed site goes missing, and the final evaluation waits at most 30 s for a site (a killed one
    included)."""
    recipe = PFedSAMRecipe(
        name=name, min_clients=min_clients, num_rounds=rounds, model=ModelConfig(backbone="tiny"),
        trainer=TrainerConfig(batch_size=4), data=DATA, wait_time_after_min_received=20, validation_timeout=30,
        initial_global=None if initial_global is None else str(initial_global),
    )
    recipe.export(str(root / "jobs"))
    return root / "jobs" / name


def _site_log(kits: Path, site: str, job_id: str) -> str:
    path = kits / site / job_id / "log.txt"
    return path.read_text(errors="replace") if path.exists() else ""


def _wait(condition, seconds: float, what: str):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(2)
    raise AssertionError(f"waited {seconds:g} s for {what}")


def _finished(session, job_id: str) -> str | None:
    status = session.get_job_meta(job_id).get("status", "")
    return status if status.startswith("FINISHED") else None


def _states(root: Path) -> dict[str, dict]:
    return {site: load_site_state(root / "state" / site) for site in SITES}


def _kill(kit: Path) -> None:
    """SIGKILL every process of ``kit`` (FLARE's watchdog script included), as a crash of its machine would; then,
    as FLARE's start script asks after a crash, remove the watchdog's pid files (a killed process that nobody
    reaps still answers ``kill -0``, and the script would take it for a running instance)."""
    for line in processes_under(kit):
        os.kill(int(line.split(":")[0]), signal.SIGKILL)
    _wait(lambda: not processes_under(kit), 30, f"the processes of {kit.name} to end")
    for name in ("daemon_pid.fl", "pid.fl"):
        (kit / name).unlink(missing_ok=True)


def _start(kit: Path, log: Path) -> None:
    with log.open("w") as handle:
        subprocess.Popen(["bash", "startup/start.sh"], cwd=kit, stdout=handle, stderr=subprocess.STDOUT, start_new_session=True)


def _saved_rounds(path: Path) -> int:
    return torch.load(path, weights_only=True)["rounds_done"] if path.exists() else 0


def _connect(deployment):
    """An admin session once the server answers and every site is registered with it."""

    def attempt():
        try:
            session = new_secure_session(deployment.admin, str(deployment.kit(deployment.admin)), timeout=30)
        except Exception:  # the server is still starting
            return None
        if len(session.get_system_info().client_info) == len(SITES):
            return session
        session.close()
        return None

    return _wait(attempt, 300, "the server and every site")


def _global_digest(path: Path) -> str:
    return _digest({key: value.numpy() for key, value in torch.load(path, weights_only=True)["global"].items()})


@pytest.fixture(scope="module")
def faults(tmp_path_factory):
    root = tmp_path_factory.mktemp("faults")
    outcome: dict = {"root": root}
    with pytest.MonkeyPatch.context() as patch:
        for key, value in service_env(root, NVFLARE_DEAD_CLIENT_GRACE_PERIOD="5").items():
            patch.setenv(key, value)
        deployment = prepare_poc(root / "workspace", sites=len(SITES), state_dir=root / "state")
        kits = deployment.kits
        server_config = kits / deployment.server / "startup" / "fed_server.json"
        config = json.loads(server_config.read_text())
        config["servers"][0]["heart_beat_timeout"] = HEARTBEAT_TIMEOUT
        server_config.write_text(json.dumps(config, indent=2))
        session = None
        try:
            start_poc(root / "workspace")
            session = new_secure_session(deployment.admin, str(deployment.kit(deployment.admin)), timeout=60)
            # job 1: site-3 is killed in round 2 (it may still send round 2, never round 3); the others finish the job
            first = session.submit_job(str(_export(root, "kill", ROUNDS, min_clients=2)))
            _wait(lambda: f"round 2/{ROUNDS} starts" in _site_log(kits, "site-3", first), 300, "site-3 to start round 2")
            _kill(kits / "site-3")
            outcome["killed_at_round"] = _site_log(kits, "site-3", first).count("starts from global partition")
            outcome["first"] = _wait(lambda: _finished(session, first), 600, "job 1 to finish")
            results = Path(session.download_job_result(first, str(root / "results"))) / "workspace"
            outcome["first_metrics"] = json.loads((results / "pfedsam_metrics.json").read_text())
            # the server drops the silent site, which then starts again and registers with it
            _wait(lambda: len(session.get_system_info().client_info) == len(SITES) - 1, 180, "the server to drop site-3")
            _start(kits / "site-3", root / "site-3-restart.log")
            _wait(lambda: len(session.get_system_info().client_info) == len(SITES), 180, "site-3 to register again")
            outcome["after_first"] = _states(root)
            # job 2: aborted while the sites train round 2
            second = session.submit_job(str(_export(root, "abort", LONG_ROUNDS, min_clients=3)))
            _wait(lambda: f"round 2/{LONG_ROUNDS} starts" in _site_log(kits, "site-1", second), 300, "job 2's round 2")
            session.abort_job(second)
            outcome["second"] = _wait(lambda: _finished(session, second), 300, "job 2 to end")
            outcome["after_second"] = _states(root)
            outcome["temporary"] = [str(p) for p in (root / "state").rglob("*") if p.name.endswith((".tmp", ".copying", ".partial"))]
            # job 3 continues from job 2's last complete round; the server is killed once job 3 saved a round, while
            # the sites train the next
            saved = Path(session.download_job_result(second, str(root / "results"))) / "workspace" / "app_server" / "FL_global_model.pt"
            outcome["saved"], outcome["saved_rounds"] = saved, _saved_rounds(saved)
            third = session.submit_job(str(_export(root, "continue", LONG_ROUNDS, min_clients=3, initial_global=saved)))
            kept = kits / deployment.server / third / "app_server" / "FL_global_model.pt"
            _wait(lambda: _saved_rounds(kept) > outcome["saved_rounds"], 300, "job 3 to save its first round")
            outcome["third_logs"] = {site: _site_log(kits, site, third) for site in SITES}
            session.close()
            session = None
            _kill(kits / deployment.server)
            outcome["server_saved"] = root / "server_saved.pt"
            shutil.copy(kept, outcome["server_saved"])  # what a user copies before cleaning up the dead job
            outcome["server_metrics"] = json.loads((kits / deployment.server / third / "pfedsam_metrics.json").read_text())
            _start(kits / deployment.server, root / "server-restart.log")
            session = _connect(deployment)
            outcome["third_after_restart"] = session.get_job_meta(third).get("status")
            try:
                session.abort_job(third)
            except Exception as error:  # FLARE 2.9: the job has no process left to abort
                outcome["third_abort"] = str(error)
            # job 4 continues from job 3's last saved round
            fourth = session.submit_job(str(_export(root, "after_server", 1, min_clients=3, initial_global=outcome["server_saved"])))
            outcome["fourth"] = _wait(lambda: _finished(session, fourth), 600, "job 4 to finish")
            outcome["fourth_logs"] = {site: _site_log(kits, site, fourth) for site in SITES}
            fourth_saved = Path(session.download_job_result(fourth, str(root / "results"))) / "workspace" / "app_server" / "FL_global_model.pt"
            outcome["fourth_saved_rounds"] = _saved_rounds(fourth_saved)
            outcome["third_at_end"] = session.get_job_meta(third).get("status")
            # `nvflare poc stop` first aborts the jobs it lists as running, and fails on job 3: shut down directly.
            # FLARE's own wait for the server to go can take a refused connection for a running server: wait for
            # its processes to end instead
            session.shutdown(TargetType.ALL, wait=False)
            _wait(lambda: not processes_under(kits / deployment.server), 120, "the server to stop")
        finally:
            if session is not None:
                session.close()
            stop_poc(root / "workspace")
    outcome["left"] = left_running(root)
    return outcome


def test_a_site_killed_mid_round_is_named_and_the_others_complete_the_job(faults):
    assert faults["first"] == "FINISHED:COMPLETED"
    metrics = faults["first_metrics"]
    dropped = metrics["dropped"]
    assert list(dropped) == ["site-3"] and dropped["site-3"]["round"] >= faults["killed_at_round"] - 1
    for entry in metrics["rounds"]:
        expected = ["site-3"] if entry["round"] >= dropped["site-3"]["round"] else []
        assert entry["missing"] == expected
        assert sorted(entry["contributors"]) == sorted(set(SITES) - set(expected))
    assert sorted(metrics["final"]["SRV_FL_global_model.pt"]) == ["site-1", "site-2"]


def test_a_job_aborted_mid_round_leaves_complete_states_and_a_new_job_continues_from_them(faults):
    assert faults["second"] == "FINISHED:ABORTED"
    assert faults["temporary"] == []
    before, after = faults["after_first"], faults["after_second"]
    assert before["site-3"]["rounds_done"] < before["site-1"]["rounds_done"] == ROUNDS
    # every site completed round 1 (round 2 started) and whichever rounds ended before the abort reached it: whole
    # rounds only, and no site more than one round ahead of another (a round waits for all three)
    done = {site: after[site]["rounds_done"] - before[site]["rounds_done"] for site in SITES}
    assert 1 <= min(done.values()) and max(done.values()) < LONG_ROUNDS, done
    assert max(done.values()) - min(done.values()) <= 1, done
    digest = _global_digest(faults["saved"])
    state = faults["root"] / "state"
    for site, log in faults["third_logs"].items():
        assert f"{site}: round 1/{LONG_ROUNDS} starts from global partition {digest[:16]}" in log
        assert f"{site}: resumed after round {after[site]['rounds_done']} from {state / site}" in log


def test_after_a_server_restart_a_new_job_continues_from_the_last_saved_round(faults):
    """FLARE 2.9 does not resume the job the server was running: it stays RUNNING in the job store and cannot be
    aborted (no process is left to abort); the round it last saved is what the next job starts from."""
    assert faults["third_after_restart"] == faults["third_at_end"] == "RUNNING"
    assert "is not running" in faults["third_abort"]
    saved_rounds = torch.load(faults["server_saved"], weights_only=True)["rounds_done"]
    averaged = len(faults["server_metrics"]["rounds"])  # written just before the model: the kill may fall between
    assert saved_rounds > faults["saved_rounds"] and averaged - (saved_rounds - faults["saved_rounds"]) in (0, 1)
    assert faults["fourth"] == "FINISHED:COMPLETED"
    digest = _global_digest(faults["server_saved"])
    for site, log in faults["fourth_logs"].items():
        assert f"{site}: round 1/1 starts from global partition {digest[:16]}" in log
    assert faults["fourth_saved_rounds"] == saved_rounds + 1


def test_no_process_is_left_running(faults):
    assert faults["left"] == []
