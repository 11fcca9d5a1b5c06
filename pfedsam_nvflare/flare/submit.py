"""Submit a job with an admin's startup kit through the FLARE API, follow it to its end and download its
results: the same for a POC deployment on this machine and a provisioned one across hospitals."""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from nvflare.fuel.flare_api.flare_api import new_secure_session

from ..reports import results_table
from .poc import DeploymentError

METRICS_FILE = "pfedsam_metrics.json"


@dataclass(frozen=True)
class JobOutcome:
    job_id: str
    status: str
    result_dir: Path  # the server's run folder of the job, downloaded

    @property
    def metrics_file(self) -> Path:
        return self.result_dir / "workspace" / METRICS_FILE


def run_job(
    job_dir: str | Path,
    startup_kit: str | Path,
    results: str | Path,
    username: str | None = None,
    timeout: float = 0,
    poll_interval: float = 5,
) -> JobOutcome:
    """Submit ``job_dir`` as the admin of ``startup_kit`` (by default the kit's folder name, as FLARE's
    provisioning names it), print each change of the job's status, wait until it ends (``timeout`` seconds at
    most; 0 waits as long as it takes) and download the server's results into ``results/<job id>``."""
    job_dir, startup_kit = Path(job_dir).resolve(), Path(startup_kit).resolve()
    if not (job_dir / "meta.json").exists():
        raise DeploymentError(f"{job_dir} is not a job folder: it has no meta.json")
    if not (startup_kit / "startup" / "fed_admin.json").exists():
        raise DeploymentError(f"{startup_kit} is not an admin startup kit: it has no startup/fed_admin.json")
    username = username or startup_kit.name
    session = new_secure_session(username, str(startup_kit), timeout=60)
    try:
        with tempfile.TemporaryDirectory() as staging:  # FLARE signs the folder it submits, in place: not yours
            submitted = Path(staging) / job_dir.name
            shutil.copytree(job_dir, submitted)
            job_id = session.submit_job(str(submitted))
        began = time.monotonic()
        print(f"submitted {job_dir.name} as {username}: job {job_id}")
        status = None
        while True:
            meta = session.get_job_meta(job_id)
            if meta.get("status") != status:
                status = meta.get("status")
                print(f"[{time.monotonic() - began:7.1f} s] job {job_id}: {status}")
            if status and status.startswith("FINISHED"):
                break
            if timeout and time.monotonic() - began > timeout:
                session.abort_job(job_id)
                raise DeploymentError(f"job {job_id} did not finish within {timeout:g} s; it was aborted")
            time.sleep(poll_interval)
        result_dir = Path(session.download_job_result(job_id, str(Path(results).resolve())))
    finally:
        session.close()
    print(f"results of job {job_id} in {result_dir}")
    return JobOutcome(job_id, status, result_dir)


def report(outcome: JobOutcome) -> str:
    """The per-site table of a finished job, and where its files are."""
    if not outcome.metrics_file.exists():
        return f"job {outcome.job_id} ended {outcome.status} without {METRICS_FILE}; see {outcome.result_dir}"
    lines = [results_table(json.loads(outcome.metrics_file.read_text()))]
    lines.append(f"metrics:         {outcome.metrics_file}")
    lines.append(f"learning curves: {outcome.metrics_file.with_name('learning_curves.png')}")
    lines.append(f"server log:      {outcome.metrics_file.with_name('log.txt')}")
    return "\n".join(lines)
