"""Helpers of the deployment tests: real FLARE services on this machine, found and cleaned up by their folder."""

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).parent.parent


def service_env(root: Path, **extra: str) -> dict[str, str]:
    """The environment the services start in: this interpreter's ``python3`` first on PATH (FLARE starts every
    service with it), FLARE's per-user settings and the generated data kept under ``root``."""
    return {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        "HOME": str(root / "home"),
        "PFEDSAM_DATA_HOME": str(root / "data"),
        **extra,
    }


def start_logged(command: list[str], log: Path, env: dict[str, str], cwd: Path = REPO) -> subprocess.Popen:
    """Start ``command`` with its output in ``log`` (a file, not a pipe: the services it starts outlive it and would
    hold a pipe open, and a pipe nobody reads while the test waits on another process fills and stalls it)."""
    with log.open("w") as handle:
        return subprocess.Popen(command, cwd=cwd, env=env, stdout=handle, stderr=subprocess.STDOUT)


def wait_logged(process: subprocess.Popen, log: Path, timeout: float) -> tuple[int, str]:
    """The exit code (-1 if it ran past ``timeout`` seconds and was killed) and the output of ``start_logged``."""
    try:
        code = process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
        code = -1
    return code, log.read_text()


def run_logged(command: list[str], log: Path, env: dict[str, str], timeout: int) -> tuple[int, str]:
    """Run ``command`` from the repository with its output in ``log``."""
    return wait_logged(start_logged(command, log, env), log, timeout)


def processes_under(folder: Path) -> list[str]:
    """``pid: command line`` of every process whose command line names ``folder``."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            command = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if str(folder) in command:
            found.append(f"{entry.name}: {command.strip()}")
    return found


def left_running(folder: Path, grace: float = 60) -> list[str]:
    """The processes under ``folder`` still running after ``grace`` seconds; they are then killed, so that a
    failing test leaves nothing behind either."""
    deadline = time.monotonic() + grace
    while (left := processes_under(folder)) and time.monotonic() < deadline:
        time.sleep(1)
    for line in left:
        try:
            os.kill(int(line.split(":")[0]), signal.SIGKILL)
        except ProcessLookupError:
            pass
    return left


def readme_block(name: str) -> str:
    """The commands between ``<!-- name:begin -->`` and ``<!-- name:end -->`` in the README."""
    text = (REPO / "README.md").read_text()
    match = re.search(rf"<!-- {name}:begin -->\s*```\w*\n(.*?)```\s*<!-- {name}:end -->", text, re.S)
    assert match, f"the README has no {name} block"
    return match.group(1)
