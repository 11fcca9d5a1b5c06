"""``pfedsam compare`` end to end: two methods through the real FLARE simulator on generated sites, and the kept
model files it leaves at the sites, scored again in a fresh process."""

import csv
import json
import os
import subprocess
import sys

import pytest
from PIL import Image

from pfedsam_nvflare.flare.jobs import JOB_MODEL
from pfedsam_nvflare.flare.settings import model_config_for, reference

SITES = ["site-1", "site-2", "site-3"]
METHODS = ["pfedsam", "fedavg"]


def _pfedsam(*args, env):
    command = [sys.executable, "-m", "pfedsam_nvflare.cli", *args]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=900)


@pytest.fixture(scope="module")
def compared(tmp_path_factory):
    root = tmp_path_factory.mktemp("compare")
    # a state folder set for the user's own jobs: every run of a comparison must start from the pretrained model
    env = {**os.environ, "PFEDSAM_DATA_HOME": str(root / "data"), "PFEDSAM_STATE_DIR": str(root / "user_state")}
    completed = _pfedsam(
        "compare", "--backbone", "tiny", "--methods", ",".join(METHODS), "--rounds", "1", "--out", str(root / "out"), env=env
    )
    return root / "out", completed, env


def test_compare_runs_every_method_and_prints_the_table(compared):
    out, completed, _ = compared
    assert completed.returncode == 0, (completed.stdout + completed.stderr)[-4000:]
    assert "[1/2] pfedsam: completed" in completed.stdout and "[2/2] fedavg: completed" in completed.stdout
    assert "| site | pfedsam | fedavg |" in completed.stdout
    markdown = (out / "comparison.md").read_text()
    assert "Test Dice of the kept model" in markdown and "mean over sites" in markdown
    with Image.open(out / "comparison.png") as image:
        assert image.size[0] > 500


def test_every_method_and_site_has_test_dice_per_label_and_bytes(compared):
    out, _, _ = compared
    result = json.loads((out / "comparison.json").read_text())
    assert result["data"]["sites"] == SITES and result["data"]["labels"] == ["foreground"]
    for method in METHODS:
        run = result["methods"][method]
        assert run["status"] == "completed"
        model = model_config_for(JOB_MODEL.to_dict() | {"backbone": "tiny"}, method)
        values = reference(model).partition.num_values("global")
        for site in SITES:
            entry = run["sites"][site]
            assert entry["test"]["cases"] == 1
            for path in ("personalized", "global"):
                for label in ("foreground", "mean"):
                    assert 0.0 <= entry["test"][path]["dice"][label] <= 1.0
                    assert entry["test"][path]["hd95"][label] >= 0.0
            assert entry["bytes_sent_per_round"] == 4 * values and entry["bytes_sent_total"] == 4 * values
        assert set(run["mean"]) >= {"personalized_dice", "global_dice", "bytes_sent_per_round"}


def test_each_run_keeps_its_sites_state_in_its_own_run_folder(compared):
    out, _, _ = compared
    assert not (out.parent / "user_state").exists()
    for method in METHODS:
        for site in SITES:
            assert (out / "runs" / method / site / "simulate_job" / "pfedsam" / "site_state.pt").is_file()


def test_every_method_uses_the_same_disjoint_three_way_split(compared):
    out, _, _ = compared
    for site in SITES:
        splits = [
            json.loads((out / "runs" / method / site / "simulate_job" / "pfedsam" / "split.json").read_text())
            for method in METHODS
        ]
        sets = [set(splits[0][f"{name}_cases"]) for name in ("train", "val", "test")]
        assert all(sets) and not (sets[0] & sets[1] or sets[0] & sets[2] or sets[1] & sets[2])
        assert all(split == splits[0] for split in splits)


def test_the_reported_personalized_dice_is_that_of_the_saved_model_file(compared, tmp_path):
    out, _, env = compared
    result = json.loads((out / "comparison.json").read_text())
    dice = []
    for site in SITES:
        model_file = out / "runs" / "pfedsam" / site / "simulate_job" / "pfedsam" / "personalized_model.pt"
        scores = tmp_path / f"{site}.csv"
        completed = _pfedsam("evaluate", "--model", str(model_file), "--split", "test", "--out", str(scores), env=env)
        assert completed.returncode == 0, completed.stderr[-3000:]
        assert "mean of 1 cases" in completed.stdout
        rows = list(csv.DictReader(scores.open()))
        reported = result["methods"]["pfedsam"]["sites"][site]["test"]
        for path in ("personalized", "global"):
            (row,) = [row for row in rows if row["model"] == path]  # one test case, one label
            for metric in ("dice", "hd95"):
                assert float(row[metric]) == pytest.approx(reported[path][metric]["mean"], abs=1e-6)
            dice.append(float(row["dice"]))
    assert any(0 < value < 1 for value in dice)  # not an agreement of empty predictions


def test_a_method_that_fails_is_reported_and_the_others_still_run(tmp_path):
    env = {**os.environ, "PFEDSAM_DATA_HOME": str(tmp_path / "data")}
    completed = _pfedsam(
        "compare", "--backbone", "tiny", "--methods", "pfedsam", "--ablate", "top_k=9,1", "--rounds", "1",
        "--out", str(tmp_path / "out"), "--sites", "site-1,site-2", env=env,
    )
    assert completed.returncode == 1
    result = json.loads((tmp_path / "out" / "comparison.json").read_text())
    failed, passed = result["methods"]["pfedsam[top_k=9]"], result["methods"]["pfedsam[top_k=1]"]
    assert failed["status"] == "failed" and passed["status"] == "completed"
    assert "top_k must be between 1 and num_experts=4, got 9" in failed["error"]
    assert sorted(passed["sites"]) == ["site-1", "site-2"]
    assert "**Failed**" in (tmp_path / "out" / "comparison.md").read_text()


def test_resume_keeps_a_run_only_if_it_was_made_with_the_same_training_settings(compared, tmp_path):
    out, _, env = compared
    result = json.loads((out / "comparison.json").read_text())
    result["methods"]["fedavg"]["trainer"]["precision"] = "float32"  # as if run before a default changed
    resumed = tmp_path / "out"
    resumed.mkdir()
    (resumed / "comparison.json").write_text(json.dumps(result))
    completed = _pfedsam(
        "compare", "--backbone", "tiny", "--methods", ",".join(METHODS), "--rounds", "1", "--out", str(resumed),
        "--resume", env=env,
    )
    assert completed.returncode == 0, (completed.stdout + completed.stderr)[-4000:]
    assert "[1/2] pfedsam: completed earlier, kept" in completed.stdout
    assert "[2/2] fedavg: completed earlier with other training settings" in completed.stdout
    assert "[2/2] fedavg: completed in" in completed.stdout
    rerun = json.loads((resumed / "comparison.json").read_text())["methods"]["fedavg"]
    assert rerun["trainer"]["precision"] == "auto"


def test_privacy_settings_become_dp_sgd_or_a_client_filter_at_the_target_epsilon(tmp_path):
    from opacus.accountants import RDPAccountant

    from pfedsam_nvflare.data.config import DataConfig
    from pfedsam_nvflare.flare.compare import Comparison, Variant
    from pfedsam_nvflare.training.dp import DPConfig

    comparison = Comparison(out=tmp_path, variants=[], rounds=4)
    record = comparison._recipe(Variant("pfedsam_nokd", {"dp_epsilon": 3}), DataConfig(), SITES)
    assert record.trainer.dp == DPConfig(target_epsilon=3.0, delta=1e-5, rounds=4)
    assert comparison._recipe(Variant("fedavg", {"dp_epsilon": "inf"}), DataConfig(), SITES).trainer.dp is None
    assert comparison._recipe(Variant("fedavg", {"dp_epsilon": 8}), DataConfig(), SITES).trainer.dp.target_epsilon == 8
    client = comparison._recipe(Variant("fedavg", {"client_epsilon": 8}), DataConfig(), SITES)
    assert client.trainer.dp is None
    client.export(str(tmp_path / "jobs"))
    config = json.loads((tmp_path / "jobs" / "fedavg_client_epsilon_8" / "app" / "config" / "config_fed_client.json").read_text())
    (privacy,) = {f["path"]: f for chain in config["task_result_filters"] for f in chain["filters"]
                  if f["path"].endswith("GaussianPrivacy")}.values()
    accountant = RDPAccountant()
    for _ in range(4):
        accountant.step(noise_multiplier=privacy["args"]["noise_multiplier"], sample_rate=1.0)
    assert 7.9 < accountant.get_epsilon(1e-5) <= privacy["args"]["max_epsilon"] == 8
    with pytest.raises(ValueError, match="dp_epsilon must be a number above 0 or inf, got -1"):
        comparison._recipe(Variant("fedavg", {"dp_epsilon": -1}), DataConfig(), SITES)
    with pytest.raises(ValueError, match="the teacher is trained without DP"):  # the preset, not the default
        comparison._recipe(Variant("pfedsam_kd", {"dp_epsilon": 3}), DataConfig(), SITES)
    with pytest.raises(ValueError, match="method pfedsam_kd always runs kd_direction='local_to_global'"):
        comparison._recipe(Variant("pfedsam_kd", {"kd_direction": "none"}), DataConfig(), SITES)
    distilling = comparison._recipe(Variant("pfedsam", {"kd_direction": "local_to_global"}), DataConfig(), SITES)
    assert distilling.trainer.kd_direction == "local_to_global"

