"""Files written atomically (and read back with errors that name them): into a temporary file, flushed to disk, then renamed over the target, so that a
crash never leaves half a file and readers see the old file or the new one."""

from __future__ import annotations

import errno
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO

import torch


def _atomic_write(target: Path, write: Callable[[BinaryIO], None]) -> Path:
    """``write`` into a temporary file, flushed to disk, then renamed over ``target``."""
    target.parent.mkdir(parents=True, exist_ok=True)
    descriptor, name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    temporary = Path(name)  # a name of its own: two writers of one target never share a temporary file
    try:
        with os.fdopen(descriptor, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, target)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    directory = os.open(target.parent, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)
    return target


def atomic_save(payload: Any, target: Path) -> Path:
    """``torch.save`` ``payload`` to ``target`` atomically."""
    return _atomic_write(target, lambda handle: torch.save(payload, handle))


def atomic_copy(source: Path, target: Path) -> Path:
    """Copy ``source`` to ``target`` atomically: a copy cut short never stands in for the file."""

    def copy(handle: BinaryIO) -> None:
        with open(source, "rb") as original:
            shutil.copyfileobj(original, handle)

    return _atomic_write(target, copy)


def atomic_write_text(text: str, target: Path) -> Path:
    """Write ``text`` (UTF-8) to ``target`` atomically."""
    return _atomic_write(target, lambda handle: handle.write(text.encode()))


def read_torch_file(path: Path, what: str, error: type[Exception]) -> Any:
    """``torch.load`` ``path`` (tensors and plain containers only); ``error`` naming ``what`` and the file where it
    is missing or cannot be read."""
    if not path.is_file():
        raise error(f"{what} {path} does not exist")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as failure:  # torch raises several unrelated types for a damaged zip or pickle
        raise error(
            f"{what} {path} cannot be read ({type(failure).__name__}: {failure}); it is truncated or corrupted"
        ) from failure


@contextmanager
def staged_folder(target: Path) -> Iterator[Path]:
    """A whole folder written under a temporary name beside ``target`` and renamed to it only once everything is
    written: a failure leaves nothing behind. ``target`` must not exist yet, or be an empty folder."""
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise FileExistsError(errno.EEXIST, "exists and is not an empty folder; choose a new one", str(target))
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.", suffix=".partial"))
    try:
        yield staging
        if target.exists():
            target.rmdir()
        os.replace(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
