"""``pfedsam compare --part-rounds``: a run cut into jobs of a few rounds, each continuing the last in the real
simulator, trains as one uncut job does, and a run cut short continues after its last completed part."""

import json
import os
import subprocess
import sys

import pytest

from pfedsam_nvflare.model.kept import load_kept_model

SITES = ["site-1", "site-2"]


def _compare(out, *args, env):
    command = [
        sys.executable, "-m", "pfedsam_nvflare.cli", "compare", "--backbone", "tiny", "--methods", "pfedsam",
        "--rounds", "2", "--sites", ",".join(SITES), "--out", str(out), *args,
    ]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=900)


def _run(out):
    return json.loads((out / "comparison.json").read_text())["methods"]["pfedsam"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("parts")
    env = {**os.environ, "PFEDSAM_DATA_HOME": str(root / "data")}
    whole = _compare(root / "whole", env=env)
    cut = _compare(root / "cut", "--part-rounds", "1", env=env)
    return root, env, whole, cut


def test_a_run_cut_into_parts_trains_as_one_job(runs):
    root, _, whole, cut = runs
    assert whole.returncode == 0, (whole.stdout + whole.stderr)[-4000:]
    assert cut.returncode == 0, (cut.stdout + cut.stderr)[-4000:]
    assert "2 rounds in jobs of up to 1 on" in cut.stdout and "part 2: rounds 2-2 of 2" in cut.stdout
    one, parts = _run(root / "whole"), _run(root / "cut")
    assert [part["rounds_done"] for part in parts["parts"]] == [1, 2]
    part2_log = (root / "cut" / "runs" / "pfedsam_part2.log").read_text()
    assert "(after round 1 of the federation)" in part2_log
    for site in SITES:
        a, b = one["sites"][site], parts["sites"][site]
        assert b["curve"]["round"] == [1, 2]
        assert b["bytes_sent_total"] == a["bytes_sent_total"] == 2 * b["bytes_sent_per_round"] > 0
        # the second part starts from the first one's global partition and from each site's own state: the same
        # validation scores every round and the same test scores of the kept model as the uncut job
        for key in ("global_dice", "personalized_dice"):
            assert b["curve"][key] == pytest.approx(a["curve"][key], abs=1e-6), (site, key)
        for path in ("personalized", "global"):
            assert b["test"][path]["dice"]["mean"] == pytest.approx(a["test"][path]["dice"]["mean"], abs=1e-6)
        kept = load_kept_model(root / "cut" / "runs" / "pfedsam" / "part2" / site / "simulate_job" / "pfedsam"
                               / "personalized_model.pt")
        assert kept.about["rounds_done"] == 2


def test_a_run_cut_short_continues_after_its_last_completed_part(runs):
    """Part 2 is taken as cut short after its sites saved their round-2 state: ``--resume`` puts back each site's
    state as it was after part 1 and runs part 2 again, so the kept models have trained 2 rounds, not 3."""
    root, env, _, _ = runs
    out = root / "cut"
    expected = _run(out)
    parts_file = out / "runs" / "pfedsam" / "parts.json"
    record = json.loads(parts_file.read_text())
    record["parts"] = record["parts"][:1]
    parts_file.write_text(json.dumps(record))
    # the second part's states were dropped once it completed; a run cut short in part 2 still has part 1's
    (out / "runs" / "pfedsam" / "states_after_part1").mkdir()
    for site in SITES:
        saved = out / "runs" / "pfedsam" / "states_after_part1" / site
        saved.mkdir()
        # part 1's state: the one the sites kept before round 2 overwrote it
        (out / "runs" / "pfedsam" / "state" / site / "site_state.prev.pt").rename(saved / "site_state.pt")
    comparison = json.loads((out / "comparison.json").read_text())
    comparison["methods"]["pfedsam"]["status"] = "failed"
    (out / "comparison.json").write_text(json.dumps(comparison))

    resumed = _compare(out, "--part-rounds", "1", "--resume", env=env)
    assert resumed.returncode == 0, (resumed.stdout + resumed.stderr)[-4000:]
    assert "continuing after round 1 (1 part(s) completed earlier)" in resumed.stdout
    assert "part 1:" not in resumed.stdout
    run = _run(out)
    assert [part["rounds_done"] for part in run["parts"]] == [1, 2]
    for site in SITES:
        assert run["sites"][site]["curve"]["round"] == [1, 2]
        assert run["sites"][site]["test"]["personalized"]["dice"]["mean"] == pytest.approx(
            expected["sites"][site]["test"]["personalized"]["dice"]["mean"], abs=1e-6
        )
        kept = load_kept_model(out / "runs" / "pfedsam" / "part2" / site / "simulate_job" / "pfedsam"
                               / "personalized_model.pt")
        assert kept.about["rounds_done"] == 2


def test_client_level_privacy_is_refused_for_a_run_cut_into_parts(tmp_path):
    """Each job's privacy filter counts only its own rounds: the ε spent over the run would be understated."""
    from pfedsam_nvflare.data.config import DataConfig
    from pfedsam_nvflare.flare.compare import Comparison, Variant

    comparison = Comparison(out=tmp_path, variants=[], rounds=4, part_rounds=2)
    variant = Variant("fedavg", {"client_epsilon": 8})
    assert comparison._recipe(variant, DataConfig(), SITES) is not None  # the uncut job is fine
    with pytest.raises(ValueError, match="client_epsilon cannot be spent over a run cut into parts"):
        comparison._recipe(variant, DataConfig(), SITES, part=("fedavg_client_epsilon_8_part1", 2, None))
