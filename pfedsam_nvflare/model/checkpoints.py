"""Reading SAM checkpoint files with errors that name the file and what is wrong with it."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from ..atomic import read_torch_file
from .partition import is_finite


class CheckpointError(ValueError):
    """A checkpoint file is missing, damaged or does not fit the model it is loaded into."""


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_state_dict(path: str | Path, *, expected_sha256: str | None = None) -> dict[str, torch.Tensor]:
    """Load a state dict from ``path``, unwrapping the ``model``/``state_dict`` containers trainers use."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    if expected_sha256 is not None:
        actual = sha256_of(path)
        if actual != expected_sha256:
            raise CheckpointError(
                f"checkpoint {path} has SHA-256 {actual}, expected {expected_sha256}: the file is damaged or not "
                "the checkpoint it claims to be"
            )
    loaded = read_torch_file(path, "checkpoint", CheckpointError)
    for container in ("model", "state_dict"):
        if isinstance(loaded, Mapping) and isinstance(loaded.get(container), Mapping):
            loaded = loaded[container]
    if not isinstance(loaded, Mapping) or not all(isinstance(v, torch.Tensor) for v in loaded.values()):
        raise CheckpointError(f"checkpoint {path} does not hold a state dict of tensors")
    return dict(loaded)


def _first(keys: set[str], limit: int = 5) -> str:
    shown = sorted(keys)[:limit]
    more = f" and {len(keys) - limit} more" if len(keys) > limit else ""
    return ", ".join(shown) + more


def load_checkpoint(module: nn.Module, path: str | Path, *, expected_sha256: str | None = None) -> None:
    """Load ``path`` into ``module`` strictly: every key present, none extra, every shape equal."""
    state = read_state_dict(path, expected_sha256=expected_sha256)
    own = module.state_dict()
    missing, unexpected = set(own) - set(state), set(state) - set(own)
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing keys ({_first(missing)})")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected keys ({_first(unexpected)})")
    misshaped = {
        f"{key} {tuple(state[key].shape)} vs {tuple(own[key].shape)}"
        for key in set(own) & set(state)
        if state[key].shape != own[key].shape
    }
    if misshaped:
        problems.append(f"{len(misshaped)} keys of the wrong shape ({_first(misshaped)})")
    non_finite = {key for key, value in state.items() if isinstance(value, torch.Tensor) and not is_finite(value)}
    if non_finite:
        problems.append(f"{len(non_finite)} keys with non-finite values ({_first(non_finite)})")
    if problems:
        raise CheckpointError(f"checkpoint {path} does not fit this model: " + "; ".join(problems))
    module.load_state_dict(state)
