"""The state a site keeps between rounds (its local partition, optimiser states, round counter), written
atomically so that a crash never leaves half a file, and read back all-or-nothing."""

from __future__ import annotations

import os
from pathlib import Path
from collections.abc import Callable
from typing import Any, BinaryIO

import torch

STATE_FILE = "site_state.pt"
STATE_FORMAT = 1


class SiteStateError(RuntimeError):
    """The site's saved state is unreadable or belongs to another configuration."""


def _atomic_write(target: Path, write: Callable[[BinaryIO], None]) -> Path:
    """``write`` into a temporary file, flushed to disk, then renamed over ``target``."""
    target.parent.mkdir(parents=True, exist_ok=True)
    temporary = target.with_name(target.name + ".tmp")
    with temporary.open("wb") as handle:
        write(handle)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, target)
    directory = os.open(target.parent, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)
    return target


def atomic_save(payload: Any, target: Path) -> Path:
    """``torch.save`` ``payload`` to ``target`` atomically."""
    return _atomic_write(target, lambda handle: torch.save(payload, handle))


def atomic_write_text(text: str, target: Path) -> Path:
    """Write ``text`` (UTF-8) to ``target`` atomically."""
    return _atomic_write(target, lambda handle: handle.write(text.encode()))


def save_site_state(site_dir: Path, state: dict[str, Any]) -> Path:
    return atomic_save({"format": STATE_FORMAT, **state}, site_dir / STATE_FILE)


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
            "Restore it from a backup, or delete it to start this site's local partition afresh"
        ) from error
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        raise SiteStateError(f"site state {path} is not a format-{STATE_FORMAT} pfedsam_nvflare site state")
    return state
