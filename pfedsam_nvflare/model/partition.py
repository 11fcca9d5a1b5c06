"""The single source of truth for which state keys are global (averaged across sites), local (never leave
the site) and frozen (never sent, never saved in federated artifacts)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

GLOBAL, LOCAL = "global", "local"


def _copy(tensor: torch.Tensor) -> torch.Tensor:
    """A detached copy in the standard memory layout, whatever layout the model computes in (channels-last
    convolution weights): what is sent, saved and averaged does not depend on how a site computes."""
    return tensor.detach().clone(memory_format=torch.contiguous_format)


class PartitionError(ValueError):
    """A state does not match a partition's key set exactly, or holds a number no model can run with."""


def is_finite(value: Any) -> bool:
    """Every element finite once stored as float32: NaN, infinities and float64 values beyond float32's range
    (which become infinite when a model loads them) are not."""
    tensor = torch.as_tensor(value)
    return not tensor.is_floating_point() or bool(torch.isfinite(tensor.to(torch.float32)).all())


@dataclass(frozen=True)
class Partition:
    global_keys: tuple[str, ...]
    local_keys: tuple[str, ...]
    frozen_keys: tuple[str, ...]
    shapes: Mapping[str, tuple[int, ...]]

    @classmethod
    def of(cls, model: nn.Module) -> Partition:
        """Name the model's ``global_parameters()`` and ``local_parameters()``; every other key is frozen."""
        names = {id(parameter): name for name, parameter in model.named_parameters()}
        global_ids = [id(p) for p in model.global_parameters()]
        local_ids = [id(p) for p in model.local_parameters()]
        shared = set(global_ids) & set(local_ids)
        if shared:
            raise PartitionError(f"parameters in both partitions: {sorted(names[i] for i in shared)}")
        global_keys = tuple(sorted(names[i] for i in set(global_ids)))
        local_keys = tuple(sorted(names[i] for i in set(local_ids)))
        state = model.state_dict()
        trainable = set(global_keys) | set(local_keys)
        return cls(
            global_keys=global_keys,
            local_keys=local_keys,
            frozen_keys=tuple(key for key in state if key not in trainable),
            shapes={key: tuple(value.shape) for key, value in state.items()},
        )

    def keys(self, role: str) -> tuple[str, ...]:
        if role == GLOBAL:
            return self.global_keys
        if role == LOCAL:
            return self.local_keys
        raise ValueError(f"role must be {GLOBAL!r} or {LOCAL!r}, got {role!r}")

    def num_values(self, role: str) -> int:
        total = 0
        for key in self.keys(role):
            count = 1
            for size in self.shapes[key]:
                count *= size
            total += count
        return total

    def split(self, state: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """The (global, local) parts of a full model state, as detached copies."""
        return (
            {key: _copy(state[key]) for key in self.global_keys},
            {key: _copy(state[key]) for key in self.local_keys},
        )

    def state(self, model: nn.Module, role: str) -> dict[str, torch.Tensor]:
        parameters = dict(model.named_parameters())
        return {key: _copy(parameters[key]) for key in self.keys(role)}

    def parameters(self, model: nn.Module, role: str) -> list[nn.Parameter]:
        parameters = dict(model.named_parameters())
        return [parameters[key] for key in self.keys(role)]

    def check(self, state: Mapping[str, Any], role: str) -> None:
        """Raise ``PartitionError`` naming the first missing, foreign, mis-shaped or non-finite key of ``state``."""
        expected = self.keys(role)
        missing = [key for key in expected if key not in state]
        if missing:
            raise PartitionError(f"{role} state is missing key {missing[0]!r} ({len(missing)} missing in all)")
        foreign = sorted(set(state) - set(expected))
        if foreign:
            raise PartitionError(
                f"{role} state has unexpected key {foreign[0]!r}, {self._describe(foreign[0])} "
                f"({len(foreign)} unexpected in all)"
            )
        for key in expected:
            shape = tuple(getattr(state[key], "shape", ()))
            if shape != self.shapes[key]:
                raise PartitionError(f"{role} state key {key!r} has shape {shape}, expected {self.shapes[key]}")
            if not is_finite(state[key]):
                raise PartitionError(
                    f"{role} state key {key!r} has non-finite values (NaN, infinity or beyond float32's range)"
                )

    def _describe(self, key: str) -> str:
        if key in self.local_keys:
            return "a local-partition key, which never leaves its site"
        if key in self.global_keys:
            return "a global-partition key"
        if key in self.shapes:
            return "a frozen key"
        return "not a key of this model"

    def load(self, model: nn.Module, state: Mapping[str, Any], role: str) -> None:
        """Copy ``state`` into the model's ``role`` parameters; nothing is written unless every key fits."""
        self.check(state, role)
        parameters = dict(model.named_parameters())
        with torch.no_grad():
            for key in self.keys(role):
                parameters[key].copy_(torch.as_tensor(state[key]))
        model.train(model.training)  # refresh caches derived from weights

    def load_global(self, model: nn.Module, state: Mapping[str, Any]) -> None:
        self.load(model, state, GLOBAL)

    def load_local(self, model: nn.Module, state: Mapping[str, Any]) -> None:
        self.load(model, state, LOCAL)
