"""Production provisioning with ``poc/project.yml``: the startup kits FLARE makes from it, and a rehearsal on
this machine that follows the README's commands verbatim (a server and two hospital sites from their kits, a job
submitted with the admin's kit)."""

import json
import subprocess

import yaml
from cryptography import x509
from deployment import REPO, left_running, readme_block, run_logged, service_env
from tiny_job import export_tiny_job

from pfedsam_nvflare.flare.site_policy import PACKAGE_PREFIX, allow_pfedsam

PROJECT = yaml.safe_load((REPO / "poc" / "project.yml").read_text())
CERTIFICATES = {"server": ("server.crt", "server.key"), "client": ("client.crt", "client.key"), "admin": ("client.crt", "client.key")}


def _common_name(path):
    certificate = x509.load_pem_x509_certificate(path.read_bytes())
    return certificate.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)[0].value, certificate.issuer


def test_provisioning_gives_every_participant_certificates_and_the_allow_list(tmp_path):
    command = ["nvflare", "provision", "-p", "poc/project.yml", "-w", str(tmp_path / "provisioned"), "--force"]
    completed = subprocess.run(command, cwd=REPO, env=service_env(tmp_path), capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0, completed.stdout + completed.stderr
    kits = tmp_path / "provisioned" / PROJECT["name"] / "prod_00"
    root_subject = x509.load_pem_x509_certificate((kits / PROJECT["participants"][0]["name"] / "startup" / "rootCA.pem").read_bytes()).subject
    for participant in PROJECT["participants"]:
        name, kind = participant["name"], participant["type"]
        startup, local = kits / name / "startup", kits / name / "local"
        certificate, key = CERTIFICATES[kind]
        assert (startup / key).stat().st_size > 0, name
        common_name, issuer = _common_name(startup / certificate)
        assert common_name == name and issuer == root_subject, name
        if kind == "admin":
            assert json.loads((startup / "fed_admin.json").read_text())["admin"]["connection_security"] == "mtls"
            continue
        resources = json.loads((local / "resources.json").read_text())
        assert resources == allow_pfedsam(json.loads((local / "resources.json.default").read_text())), name
        assert PACKAGE_PREFIX in resources["class_allow_list"] and "*" not in resources["class_allow_list"]
        if kind == "client":
            assert json.loads((startup / "fed_client.json").read_text())["client"]["connection_security"] == "mtls"
        else:
            assert json.loads((startup / "fed_server.json").read_text())["servers"][0]["connection_security"] == "mtls"


def test_the_readme_rehearsal_runs_a_job_on_a_server_and_two_sites(tmp_path):
    job = export_tiny_job(tmp_path, min_clients=2)
    files = sorted(job.rglob("*"))
    rehearsal = tmp_path / "rehearsal"
    env = service_env(tmp_path, REHEARSAL=str(rehearsal), JOB=str(job), SITES="site-1 site-2")
    code, output = run_logged(["bash", "-c", readme_block("rehearsal")], tmp_path / "rehearsal.log", env, timeout=900)
    left = left_running(rehearsal)
    assert "FINISHED:COMPLETED" in output, output[-6000:]
    results = sorted((rehearsal / "results").glob("*/workspace/pfedsam_metrics.json"))
    assert len(results) == 1, output[-3000:]
    metrics = json.loads(results[0].read_text())
    assert all(sorted(entry["contributors"]) == ["site-1", "site-2"] for entry in metrics["rounds"])
    assert left == [], "services still running after the README's shutdown"
    assert sorted(job.rglob("*")) == files, "submitting changed the job folder"
    assert code == 0, output[-3000:]
