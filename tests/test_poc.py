"""A FLARE POC deployment on this machine, every connection mutual TLS over loopback: ``poc/run_poc.sh`` runs three
tiny pFedSAM jobs in turn on three sites, where site-3's ``privacy.json`` is the hospital policy in ``poc/``:
a DP-SGD job asking for its record-level scope (``pfedsam_dpsgd``: ``RequireDifferentialPrivacy``), a job
without DP-SGD asking for the same scope (site-3 keeps its updates; ``min_clients=2`` lets the others go on), and
the plain job in the default scope (site-3 forces ``GaussianPrivacy`` on everything it sends). Both policies
spend one budget, site-3's."""

import json
import re
from pathlib import Path

import pytest
from deployment import REPO, left_running, run_logged, service_env
from opacus.accountants import RDPAccountant
from tiny_job import MODEL, ROUNDS, export_tiny_job

from pfedsam_nvflare.cli import main
from pfedsam_nvflare.flare.jobs import DPSGD_SCOPE
from pfedsam_nvflare.flare.poc import DeploymentError, prepare_poc, read_privacy_policy
from pfedsam_nvflare.flare.privacy import ACCOUNTANT_FILE, GaussianPrivacy, RequireDifferentialPrivacy, read_accountant
from pfedsam_nvflare.flare.settings import model_config_for, reference
from pfedsam_nvflare.flare.site_policy import PACKAGE_PREFIX
from pfedsam_nvflare.training import TrainerConfig

SITES = ["site-1", "site-2", "site-3"]
PRIVATE_SITE = "site-3"
DPSGD = TrainerConfig(batch_size=4, kd_direction="global_to_local", dp={"noise_multiplier": 2.0, "max_grad_norm": 1.0})


@pytest.fixture(scope="module")
def poc(tmp_path_factory):
    root = tmp_path_factory.mktemp("poc")
    jobs = [
        export_tiny_job(root, name="dpsgd", rounds=1, trainer=DPSGD, scope=DPSGD_SCOPE),
        export_tiny_job(root, name="no_dpsgd", rounds=1, min_clients=2, scope=DPSGD_SCOPE),
        export_tiny_job(root, name="pfedsam"),
    ]
    files = sorted((root / "jobs").rglob("*"))
    env = service_env(
        root,
        POC_WORKSPACE=str(root / "workspace"),
        POC_RESULTS=str(root / "results"),
        POC_PRIVACY=f"{PRIVATE_SITE}=poc/privacy.json",
    )
    code, output = run_logged(["bash", "poc/run_poc.sh", *map(str, jobs)], root / "run_poc.log", env, timeout=1200)
    left = left_running(root)
    job_ids = dict(re.findall(r"^submitted (\S+) as \S+: job (\S+)$", output, re.M))
    downloaded = dict(re.findall(r"^results of job (\S+) in (.+)$", output, re.M))
    results = {name: Path(downloaded[job_id]) for name, job_id in job_ids.items() if job_id in downloaded}
    untouched = sorted((root / "jobs").rglob("*")) == files
    return {"root": root, "code": code, "output": output, "left": left, "results": results, "job_ids": job_ids, "untouched": untouched}


def _kits(poc):
    return next((poc["root"] / "workspace").glob("*/prod_00"))


def _metrics(poc, name: str) -> dict:
    assert name in poc["results"], poc["output"][-3000:]
    return json.loads((poc["results"][name] / "workspace" / "pfedsam_metrics.json").read_text())


def test_the_jobs_complete_over_mutual_tls(poc):
    assert poc["code"] == 0, poc["output"][-6000:]
    assert list(poc["job_ids"]) == ["dpsgd", "no_dpsgd", "pfedsam"]
    for job_id in poc["job_ids"].values():
        assert re.search(rf"job {job_id}: FINISHED:COMPLETED$", poc["output"], re.M), job_id
    assert poc["untouched"], "submitting changed the job folders"
    kits = _kits(poc)
    for site in SITES:
        startup = kits / site / "startup"
        assert json.loads((startup / "fed_client.json").read_text())["client"]["connection_security"] == "mtls"
        assert all((startup / name).stat().st_size > 0 for name in ("client.crt", "client.key", "rootCA.pem"))
    for participant in ("server", *SITES):
        allowed = json.loads((kits / participant / "local" / "resources.json").read_text())["class_allow_list"]
        assert PACKAGE_PREFIX in allowed and "*" not in allowed


def test_the_results_hold_every_sites_metrics(poc):
    metrics = _metrics(poc, "pfedsam")
    workspace = poc["results"]["pfedsam"] / "workspace"
    assert [entry["round"] for entry in metrics["rounds"]] == list(range(ROUNDS))
    for entry in metrics["rounds"]:
        assert sorted(entry["sites"]) == SITES and sorted(entry["contributors"]) == SITES
        assert all("personalized_dice" in values and "global_dice" in values for values in entry["sites"].values())
    assert sorted(metrics["final"]["SRV_FL_global_model.pt"]) == SITES
    assert (workspace / "learning_curves.png").stat().st_size > 0


def test_no_process_is_left_running(poc):
    assert poc["left"] == []
    assert "POC system stopped" in poc["output"]


def _dpsgd_release(poc) -> tuple[float, float, int]:
    (entry,) = _metrics(poc, "dpsgd")["rounds"]
    report = entry["updates"][PRIVATE_SITE]["privacy"]
    return report["noise_multiplier"], report["sample_rate"], report["steps"]


def test_the_site_whose_policy_requires_dp_sgd_sends_only_dp_sgd_updates(poc):
    policy = json.loads((REPO / "poc" / "privacy.json").read_text())
    (required,) = next(s for s in policy["scopes"] if s["name"] == DPSGD_SCOPE)["task_result_filters"]
    (entry,) = _metrics(poc, "dpsgd")["rounds"]
    assert sorted(entry["contributors"]) == SITES
    noise, rate, steps = _dpsgd_release(poc)
    independent = RDPAccountant()
    for _ in range(steps):
        independent.step(noise_multiplier=noise, sample_rate=rate)
    counted = entry["updates"][PRIVATE_SITE]["privacy"]
    assert counted["mechanism"] == "dp-sgd" and noise == 2.0
    assert counted["max_epsilon"] == required["args"]["max_epsilon"]  # the site's policy counted it
    assert counted["epsilon"] == pytest.approx(independent.get_epsilon(required["args"]["delta"]), rel=1e-9)
    for site in set(SITES) - {PRIVATE_SITE}:  # trained under DP-SGD too, with no policy of theirs
        assert entry["updates"][site]["privacy"]["mechanism"] == "dp-sgd"

    (refused,) = _metrics(poc, "no_dpsgd")["rounds"]
    assert sorted(refused["contributors"]) == ["site-1", "site-2"] and refused["missing"] == [PRIVATE_SITE]
    log = (_kits(poc) / PRIVATE_SITE / poc["job_ids"]["no_dpsgd"] / "log.txt").read_text(errors="replace")
    assert "RequireDifferentialPrivacy kept this result at the site: this site requires record-level" in log
    accountant = read_accountant(_kits(poc) / PRIVATE_SITE / ACCOUNTANT_FILE)
    assert poc["job_ids"]["no_dpsgd"] not in accountant["jobs"]  # nothing released, nothing counted
    assert poc["job_ids"]["dpsgd"] in accountant["jobs"]


def test_only_the_site_whose_policy_forces_dp_sends_clipped_noised_updates(poc):
    policy = json.loads((REPO / "poc" / "privacy.json").read_text())
    dp = policy["scopes"][0]["task_result_filters"][0]["args"]
    installed = _kits(poc) / PRIVATE_SITE / "local" / "privacy.json"
    assert json.loads(installed.read_text()) == policy
    values = reference(model_config_for(MODEL.to_dict(), "pfedsam")).partition.num_values("global")
    std = dp["noise_multiplier"] * dp["clip_norm"]
    noise_norm = std * values**0.5  # the norm of the noise alone; the clipped update adds at most clip_norm
    metrics = _metrics(poc, "pfedsam")
    accountant = RDPAccountant()
    accountant.history = [_dpsgd_release(poc)]  # the site's budget: the DP-SGD job spent from it first
    for entry in metrics["rounds"]:
        accountant.step(noise_multiplier=dp["noise_multiplier"], sample_rate=1.0)
        private = entry["updates"][PRIVATE_SITE]
        assert private["privacy"]["clip_norm"] == dp["clip_norm"]
        assert private["privacy"]["epsilon"] == pytest.approx(accountant.get_epsilon(dp["delta"]), rel=1e-9)
        assert abs(private["l2_norm"] - noise_norm) < dp["clip_norm"] + 5 * std
        for site in set(SITES) - {PRIVATE_SITE}:
            assert "privacy" not in entry["updates"][site]
            assert abs(entry["updates"][site]["l2_norm"] - noise_norm) > dp["clip_norm"] + 5 * std
    job_id = poc["job_ids"]["pfedsam"]
    kits = _kits(poc)
    site_accountant = read_accountant(kits / PRIVATE_SITE / ACCOUNTANT_FILE)  # in the site's workspace: one budget
    assert site_accountant["history"] == [_dpsgd_release(poc), (dp["noise_multiplier"], 1.0, ROUNDS)]
    assert not (kits / PRIVATE_SITE / job_id / ACCOUNTANT_FILE).exists()
    assert not any((kits / site / ACCOUNTANT_FILE).exists() for site in set(SITES) - {PRIVATE_SITE})


@pytest.mark.parametrize(
    "policy, named",
    [
        ("not json", "cannot be read"),
        ({"scopes": []}, "has no list of scopes"),
        ({"scopes": [{"name": "a"}, {"name": "a"}]}, "a name of its own"),
        ({"scopes": [{"name": "a", "task_result_filters": [{"args": {}}]}]}, "names no class"),
        ({"scopes": [{"name": "a"}], "default_scope": "b"}, "default_scope 'b' is not one of"),
    ],
)
def test_a_bad_privacy_policy_is_refused_before_anything_is_prepared(tmp_path, policy, named):
    path = tmp_path / "privacy.json"
    path.write_text(policy if isinstance(policy, str) else json.dumps(policy))
    with pytest.raises(DeploymentError, match=named):
        prepare_poc(tmp_path / "workspace", privacy={"site-1": path})
    assert not (tmp_path / "workspace").exists()


def test_the_hospital_policy_is_a_valid_privacy_policy():
    policy = read_privacy_policy(REPO / "poc" / "privacy.json")
    assert policy["default_scope"] == "pfedsam_dp"
    for scope, policy_filter in zip(policy["scopes"], (GaussianPrivacy, RequireDifferentialPrivacy)):
        (dp,) = scope["task_result_filters"]
        policy_filter(**dp["args"])  # the arguments the site will build it with
        assert dp["path"] == f"{policy_filter.__module__}.{policy_filter.__name__}"
    assert [scope["name"] for scope in policy["scopes"]] == ["pfedsam_dp", "pfedsam_dpsgd"]


def test_the_commands_name_what_is_wrong(tmp_path, capsys):
    assert main(["poc", "prepare", "--workspace", str(tmp_path / "w"), "--privacy", "site-9=poc/privacy.json"]) == 2
    assert "not in the deployment: site-9" in capsys.readouterr().err
    with pytest.raises(SystemExit) as refused:  # argparse names the option
        main(["poc", "prepare", "--workspace", str(tmp_path / "w"), "--sites", "0"])
    assert refused.value.code == 2 and "argument --sites: 0 is below 1" in capsys.readouterr().err
    assert main(["submit", str(tmp_path), "--poc-workspace", str(tmp_path)]) == 2
    assert "no POC deployment in" in capsys.readouterr().err
    assert main(["submit", str(tmp_path), "--startup-kit", str(tmp_path)]) == 2
    assert "is not a job folder" in capsys.readouterr().err
