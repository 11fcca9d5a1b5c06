"""Files written atomically: into a temporary file, flushed to disk, then renamed over the target, so that a
crash never leaves half a file and readers see the old file or the new one."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

import torch


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
