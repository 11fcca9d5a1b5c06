"""``pfedsam compare --part-rounds``: a run cut into jobs of one round, each continuing the last in the real
simulator, is stopped in the middle of its second part (after the sites saved that round), resumed, and ends with
what one uncut job gives."""

import json
import os
import signal
import subprocess
import sys

import pytest
from deployment import start_logged, wait_logged

from pfedsam_nvflare.model.kept import load_kept_model

SITES = ["site-1", "site-2"]


def _command(out, *args):
    return [
        sys.executable, "-m", "pfedsam_nvflare.cli", "compare", "--backbone", "tiny", "--methods", "pfedsam",
        "--rounds", "2", "--sites", ",".join(SITES), "--out", out, *args,
    ]


def _stopped_in_part_two(root, env) -> str:
    """Run the cut comparison and kill it (the simulator too) once every site has finished round 2."""
    process = subprocess.Popen(
        _command("cut", "--part-rounds", "1"), cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True, start_new_session=True,
    )
    seen, in_part_two, done = [], False, set()
    for line in process.stdout:
        seen.append(line)
        in_part_two = in_part_two or "part 2: rounds 2-2 of 2" in line
        done |= {site for site in SITES if in_part_two and f"{site}: round 1 done" in line}
        if done == set(SITES):
            os.killpg(process.pid, signal.SIGKILL)
            break
    process.wait(timeout=60)
    return "".join(seen)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("parts")
    env = {**os.environ, "PFEDSAM_DATA_HOME": str(root / "data")}
    # relative --out, as a user types it: the simulator's server runs in a folder of its own; the uncut run goes on
    # beside the cut one (its own output folder, the same generated data)
    uncut = start_logged(_command("whole"), root / "whole.log", env, cwd=root)
    stopped = _stopped_in_part_two(root, env)
    whole = wait_logged(uncut, root / "whole.log", timeout=900)
    resumed = subprocess.run(
        _command("cut", "--part-rounds", "1", "--resume"), cwd=root, env=env, capture_output=True, text=True,
        timeout=900,
    )
    return root, whole, stopped, resumed


def _run(out):
    return json.loads((out / "comparison.json").read_text())["methods"]["pfedsam"]


def test_a_run_stopped_in_a_part_continues_after_its_last_completed_part(runs):
    root, _, stopped, resumed = runs
    assert "2 rounds in jobs of up to 1 on" in stopped and "part 2: rounds 2-2 of 2" in stopped
    run_dir = root / "cut" / "runs" / "pfedsam"
    assert resumed.returncode == 0, (resumed.stdout + resumed.stderr)[-4000:]
    assert "continuing after round 1 (1 part(s) completed earlier)" in resumed.stdout
    assert "part 1:" not in resumed.stdout and "part 2: rounds 2-2 of 2" in resumed.stdout
    assert "(after round 1 of the federation)" in (root / "cut" / "runs" / "pfedsam_part2.log").read_text()
    run = _run(root / "cut")
    assert [part["rounds_done"] for part in run["parts"]] == [1, 2]
    for site in SITES:
        # the sites had saved round 2 when they were stopped: resumed from that state, they would have trained 3
        kept = load_kept_model(run_dir / "part2" / site / "simulate_job" / "pfedsam" / "personalized_model.pt")
        assert kept.about["rounds_done"] == 2
    # only what continuing needs is kept: the last part's model files and the sites' states after it
    assert not list((run_dir / "part1").rglob("*.pt")) and (run_dir / "part1" / "server").is_dir()
    assert [p.name for p in run_dir.glob("states_after_part*")] == ["states_after_part2"]


def test_a_run_cut_into_parts_trains_as_one_job(runs):
    root, whole, _, resumed = runs
    assert whole[0] == 0, whole[1][-4000:]
    assert resumed.returncode == 0, (resumed.stdout + resumed.stderr)[-4000:]
    one, parts = _run(root / "whole"), _run(root / "cut")
    assert "parts" not in one
    for site in SITES:
        a, b = one["sites"][site], parts["sites"][site]
        assert a["curve"]["round"] == b["curve"]["round"] == [1, 2]
        assert b["bytes_sent_total"] == a["bytes_sent_total"] == 2 * b["bytes_sent_per_round"] > 0
        # the second part starts from the first one's global partition and from each site's own state: the same
        # validation scores every round and the same test scores of the kept model as the uncut job
        for key in ("global_dice", "personalized_dice"):
            assert b["curve"][key] == pytest.approx(a["curve"][key], abs=1e-6), (site, key)
        for path in ("personalized", "global"):
            assert b["test"][path]["dice"]["mean"] == pytest.approx(a["test"][path]["dice"]["mean"], abs=1e-6)
    assert parts["parts"][-1]["personalized_dice"] == pytest.approx(parts["mean"]["personalized_dice"])


def test_client_level_privacy_is_refused_for_a_run_cut_into_parts(tmp_path):
    """Each job's privacy filter counts only its own rounds: the ε spent over the run would be understated."""
    from pfedsam_nvflare.data.config import DataConfig
    from pfedsam_nvflare.flare.compare import Comparison, Variant

    variant = Variant("fedavg", {"client_epsilon": 8})
    assert Comparison(out=tmp_path, variants=[], rounds=4)._recipe(variant, DataConfig(), SITES) is not None
    with pytest.raises(ValueError, match="client_epsilon cannot be spent over a run cut into parts"):
        Comparison(out=tmp_path, variants=[], rounds=4, part_rounds=2)._recipe(variant, DataConfig(), SITES)
