"""A FLARE POC deployment on this machine, every connection mutual TLS over loopback: ``poc/run_poc.sh`` runs the
tiny pFedSAM job on three sites; site-3's ``privacy.json`` (the hospital policy in ``poc/``) forces
``GaussianPrivacy`` on everything it sends."""

import json

import pytest
from deployment import REPO, left_running, run_logged, service_env
from opacus.accountants import RDPAccountant
from tiny_job import MODEL, ROUNDS, export_tiny_job

from pfedsam_nvflare.cli import main
from pfedsam_nvflare.flare.poc import DeploymentError, prepare_poc, read_privacy_policy
from pfedsam_nvflare.flare.privacy import GaussianPrivacy, RequireDifferentialPrivacy
from pfedsam_nvflare.flare.settings import model_config_for, reference
from pfedsam_nvflare.flare.site_policy import PACKAGE_PREFIX

SITES = ["site-1", "site-2", "site-3"]
PRIVATE_SITE = "site-3"


@pytest.fixture(scope="module")
def poc(tmp_path_factory):
    root = tmp_path_factory.mktemp("poc")
    job = export_tiny_job(root)
    files = sorted(job.rglob("*"))
    env = service_env(
        root,
        POC_WORKSPACE=str(root / "workspace"),
        POC_RESULTS=str(root / "results"),
        POC_PRIVACY=f"{PRIVATE_SITE}=poc/privacy.json",
    )
    code, output = run_logged(["bash", "poc/run_poc.sh", str(job)], root / "run_poc.log", env, timeout=900)
    left = left_running(root)
    results = sorted((root / "results").glob("*"))
    untouched = sorted(job.rglob("*")) == files
    return {"root": root, "code": code, "output": output, "left": left, "result": results[0] if results else None, "untouched": untouched}


def _kits(poc):
    return next((poc["root"] / "workspace").glob("*/prod_00"))


def test_the_job_completes_over_mutual_tls(poc):
    assert poc["code"] == 0, poc["output"][-6000:]
    assert "FINISHED:COMPLETED" in poc["output"]
    assert poc["untouched"], "submitting changed the job folder"
    kits = _kits(poc)
    for site in SITES:
        startup = kits / site / "startup"
        assert json.loads((startup / "fed_client.json").read_text())["client"]["connection_security"] == "mtls"
        assert all((startup / name).stat().st_size > 0 for name in ("client.crt", "client.key", "rootCA.pem"))
    for participant in ("server", *SITES):
        allowed = json.loads((kits / participant / "local" / "resources.json").read_text())["class_allow_list"]
        assert PACKAGE_PREFIX in allowed and "*" not in allowed


def test_the_results_hold_every_sites_metrics(poc):
    assert poc["result"] is not None, poc["output"][-3000:]
    workspace = poc["result"] / "workspace"
    metrics = json.loads((workspace / "pfedsam_metrics.json").read_text())
    assert [entry["round"] for entry in metrics["rounds"]] == list(range(ROUNDS))
    for entry in metrics["rounds"]:
        assert sorted(entry["sites"]) == SITES and sorted(entry["contributors"]) == SITES
        assert all("personalized_dice" in values and "global_dice" in values for values in entry["sites"].values())
    assert sorted(metrics["final"]["SRV_FL_global_model.pt"]) == SITES
    assert (workspace / "learning_curves.png").stat().st_size > 0


def test_no_process_is_left_running(poc):
    assert poc["left"] == []
    assert "POC system stopped" in poc["output"]


def test_only_the_site_whose_policy_forces_dp_sends_clipped_noised_updates(poc):
    policy = json.loads((REPO / "poc" / "privacy.json").read_text())
    dp = policy["scopes"][0]["task_result_filters"][0]["args"]
    installed = _kits(poc) / PRIVATE_SITE / "local" / "privacy.json"
    assert json.loads(installed.read_text()) == policy
    values = reference(model_config_for(MODEL.to_dict(), "pfedsam")).partition.num_values("global")
    std = dp["noise_multiplier"] * dp["clip_norm"]
    noise_norm = std * values**0.5  # the norm of the noise alone; the clipped update adds at most clip_norm
    metrics = json.loads((poc["result"] / "workspace" / "pfedsam_metrics.json").read_text())
    accountant = RDPAccountant()
    for entry in metrics["rounds"]:
        accountant.step(noise_multiplier=dp["noise_multiplier"], sample_rate=1.0)
        private = entry["updates"][PRIVATE_SITE]
        assert private["privacy"]["clip_norm"] == dp["clip_norm"]
        assert private["privacy"]["epsilon"] == pytest.approx(accountant.get_epsilon(dp["delta"]), rel=1e-9)
        assert abs(private["l2_norm"] - noise_norm) < dp["clip_norm"] + 5 * std
        for site in set(SITES) - {PRIVATE_SITE}:
            assert "privacy" not in entry["updates"][site]
            assert abs(entry["updates"][site]["l2_norm"] - noise_norm) > dp["clip_norm"] + 5 * std
    job_id = poc["result"].name
    kits = _kits(poc)
    assert (kits / PRIVATE_SITE / "privacy_accountant.json").exists()  # in the site's workspace: one budget for all jobs
    assert not (kits / PRIVATE_SITE / job_id / "privacy_accountant.json").exists()
    assert not any((kits / site / "privacy_accountant.json").exists() for site in set(SITES) - {PRIVATE_SITE})


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
