"""The state a site keeps between rounds (its local partition, optimiser states, round counter), written
atomically so that a crash never leaves half a file, and read back all-or-nothing."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ..atomic import atomic_copy, atomic_save

STATE_FILE = "site_state.pt"
PREVIOUS_STATE_FILE = "site_state.prev.pt"
STATE_FORMAT = 1


class SiteStateError(RuntimeError):
    """The site's saved state is unreadable or belongs to another configuration."""


def save_site_state(site_dir: Path, state: dict[str, Any]) -> Path:
    """Write the state; the one it replaces stays beside it as ``site_state.prev.pt`` (undo one round by moving it
    back), and a crash at any point leaves a complete current file."""
    path = site_dir / STATE_FILE
    if path.exists():
        atomic_copy(path, path.with_name(PREVIOUS_STATE_FILE))
    return atomic_save({"format": STATE_FORMAT, **state}, path)


def load_site_state(site_dir: Path) -> dict[str, Any] | None:
    """The saved state, or None where the site has none yet."""
    path = site_dir / STATE_FILE
    if not path.exists():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # a truncated zip and a damaged pickle raise unrelated types
        raise SiteStateError(
            f"site state {path} cannot be read ({type(error).__name__}: {error}); it is cut short or corrupted. "
            f"Restore it from {PREVIOUS_STATE_FILE} beside it (the state one round earlier) or a backup, or delete it "
            "to start this site's local partition afresh"
        ) from error
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        raise SiteStateError(f"site state {path} is not a format-{STATE_FORMAT} pfedsam_nvflare site state")
    return state
