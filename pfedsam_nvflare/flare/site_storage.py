"""Where a site keeps what outlives one job: its local partition (the L-MoE experts, Ditto's personal copy), its
optimiser states, its case split and its feature cache. Configured once per site, outside any job's run folder:

- ``PFEDSAM_STATE_DIR=/path`` in the environment the site (or the simulator) starts from, or
- ``<site workspace>/local/pfedsam_site.json`` holding ``{"state_dir": "/path"}`` (a production or POC kit).

The environment wins, as a user's ``OMP_NUM_THREADS`` does. Each site uses ``<state_dir>/<site name>``, so sites of a
simulator or POC on one machine can share one setting. Without either, the site's state lives in the job's run
folder and the next job starts from the pretrained model.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

STATE_DIR_ENV = "PFEDSAM_STATE_DIR"
SITE_CONFIG_FILE = "pfedsam_site.json"


def configured_state_dir(site_config_dir: str | Path, site: str) -> tuple[Path | None, str]:
    """The site's state folder and where the setting came from; ``(None, why)`` when nothing is configured."""
    if os.environ.get(STATE_DIR_ENV):
        return Path(os.environ[STATE_DIR_ENV]).expanduser() / site, f"${STATE_DIR_ENV}"
    config = Path(site_config_dir) / SITE_CONFIG_FILE
    if not config.is_file():
        return None, f"neither ${STATE_DIR_ENV} nor {config} is set"
    try:
        state_dir = json.loads(config.read_text())["state_dir"]
        if not isinstance(state_dir, str) or not state_dir:
            raise TypeError("state_dir must be a non-empty path")
    except (ValueError, KeyError, TypeError) as error:
        raise ValueError(f"{config}: expected {{\"state_dir\": \"/path\"}} ({type(error).__name__}: {error})") from error
    return Path(state_dir).expanduser() / site, str(config)


def write_site_config(local_dir: str | Path, state_dir: str | Path) -> Path:
    """Configure a site once: ``local_dir/pfedsam_site.json`` naming the folder its state outlives jobs in."""
    path = Path(local_dir) / SITE_CONFIG_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"state_dir": str(Path(state_dir).expanduser().resolve())}, indent=2) + "\n")
    return path
