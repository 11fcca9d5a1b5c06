"""A FLARE POC deployment on this machine, ready for pFedSAM jobs: FLARE's ``nvflare poc`` provisions a server,
N sites and admins with their own certificates (every connection is mutual TLS); each site's ``local/`` then gets
the allow-list entry and, where asked, a privacy scope."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import yaml

from .site_policy import allow_pfedsam_in
from .site_storage import write_site_config


class DeploymentError(RuntimeError):
    """A deployment step failed; the message says which and why."""


@dataclass(frozen=True)
class PocDeployment:
    workspace: Path
    kits: Path  # the folder of the startup kits, one per participant
    server: str
    sites: tuple[str, ...]
    admin: str  # the project admin, who submits jobs

    def kit(self, participant: str) -> Path:
        return self.kits / participant


def _nvflare_poc(workspace: Path, *arguments: str) -> None:
    """Run ``nvflare poc ...`` on ``workspace`` (FLARE finds it in ``NVFLARE_POC_WORKSPACE``)."""
    command = ["nvflare", "poc", *arguments]
    completed = subprocess.run(command, check=False, env={**os.environ, "NVFLARE_POC_WORKSPACE": str(workspace)})
    if completed.returncode != 0:
        raise DeploymentError(f"`{' '.join(command)}` failed with exit code {completed.returncode} (workspace {workspace})")


def poc_deployment(workspace: str | Path) -> PocDeployment:
    """The deployment ``prepare_poc`` made in ``workspace``, read from the project file FLARE keeps there."""
    workspace = Path(workspace).resolve()
    project_file = workspace / "project.yml"
    if not project_file.exists():
        raise DeploymentError(f"no POC deployment in {workspace}: prepare one with `pfedsam poc prepare`")
    broken = f"the POC project file {project_file} is broken ({{}}): prepare the deployment again"
    try:
        project = yaml.safe_load(project_file.read_text())
        participants = project["participants"]
        kits = sorted((workspace / project["name"]).glob("prod_*"))

        def named(kind: str, role: str | None = None) -> list[str]:
            return [p["name"] for p in participants if p["type"] == kind and (role is None or p.get("role") == role)]

        server, clients, admins = named("server"), tuple(named("client")), named("admin", "project_admin")
    except (yaml.YAMLError, KeyError, TypeError, AttributeError) as error:
        raise DeploymentError(broken.format(f"{type(error).__name__}: {error}")) from error
    if not server or not admins:
        raise DeploymentError(broken.format("it names no server or no project admin"))
    if not kits:
        raise DeploymentError(f"the POC deployment in {workspace} has no startup kits: prepare it again")
    return PocDeployment(workspace, kits[-1], server[0], clients, admins[0])


def read_privacy_policy(path: str | Path) -> dict:
    """A site's ``privacy.json``, checked: scopes with unique names, filters with a path, an existing default."""
    path = Path(path)
    try:
        policy = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise DeploymentError(f"privacy policy {path} cannot be read: {error}") from error
    scopes = policy.get("scopes") if isinstance(policy, dict) else None
    if not isinstance(scopes, list) or not scopes:
        raise DeploymentError(f"privacy policy {path} has no list of scopes")
    names = [scope.get("name") for scope in scopes]
    if None in names or len(set(names)) != len(names):
        raise DeploymentError(f"privacy policy {path}: every scope needs a name of its own, got {names}")
    for scope in scopes:
        for chain in ("task_result_filters", "task_data_filters"):
            for entry in scope.get(chain, []):
                if not ("path" in entry or "name" in entry):
                    raise DeploymentError(f"privacy policy {path}: a filter of scope {scope['name']!r} names no class")
    if policy.get("default_scope") not in (None, *names):
        raise DeploymentError(f"privacy policy {path}: default_scope {policy['default_scope']!r} is not one of {names}")
    return policy


def prepare_poc(
    workspace: str | Path,
    sites: int = 3,
    privacy: dict[str, str | Path] | None = None,
    state_dir: str | Path | None = None,
) -> PocDeployment:
    """Provision a fresh POC deployment of ``sites`` sites in ``workspace`` (an older one there is removed),
    allow pFedSAM components at the server and every site, install ``privacy[site]`` as that site's
    ``local/privacy.json`` and, with ``state_dir``, keep every site's state there across jobs (``site_storage``)."""
    if sites < 1:
        raise DeploymentError(f"a POC deployment needs at least one site, got {sites}")
    privacy = privacy or {}
    names = [f"site-{i}" for i in range(1, sites + 1)]
    unknown = sorted(set(privacy) - set(names))
    if unknown:
        raise DeploymentError(f"privacy policies for sites that are not in the deployment: {', '.join(unknown)}")
    policies = {site: read_privacy_policy(path) for site, path in privacy.items()}
    workspace = Path(workspace).resolve()
    _nvflare_poc(workspace, "prepare", "--clients", *names, "--force")
    deployment = poc_deployment(workspace)
    for participant in (deployment.server, *deployment.sites):
        allow_pfedsam_in(deployment.kit(participant) / "local")
    for site, policy in policies.items():
        (deployment.kit(site) / "local" / "privacy.json").write_text(json.dumps(policy, indent=2) + "\n")
        print(f"{site}: privacy scopes {[scope['name'] for scope in policy['scopes']]} from {privacy[site]}")
    if state_dir is not None:
        for site in deployment.sites:
            write_site_config(deployment.kit(site) / "local", state_dir)
        print(f"every site keeps its local partition across jobs in {Path(state_dir).resolve()}/<site>")
    return deployment


def start_poc(workspace: str | Path, timeout: int = 120) -> None:
    """Start the server and the sites; returns once every site is connected. The services run with the
    ``python3`` on PATH, which must be the one pfedsam_nvflare is installed in."""
    python3 = shutil.which("python3")
    if python3 is None or subprocess.run([python3, "-c", "import pfedsam_nvflare"], check=False, capture_output=True).returncode:
        raise DeploymentError(
            f"the python3 on PATH ({python3}) cannot import pfedsam_nvflare, and FLARE starts every service with it: "
            "activate the environment pfedsam_nvflare is installed in"
        )
    print(f"starting the POC deployment in {workspace} with {python3}")
    _nvflare_poc(Path(workspace).resolve(), "start", "--timeout", str(timeout))


def stop_poc(workspace: str | Path) -> None:
    """Stop every service of the deployment and wait until they are gone."""
    _nvflare_poc(Path(workspace).resolve(), "stop")
