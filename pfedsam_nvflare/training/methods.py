"""The methods compared in this package: one trainer, switched by these presets.

Every method makes the same number of optimiser steps per round: a method without a local phase gives the
local phase's epochs to its global phase.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from ..model import ModelConfig

EXPERTS, PERSONAL = "experts", "personal"  # the two kinds of local phase


@dataclass(frozen=True)
class Method:
    """``local_phase``: what a site trains for itself before (or after) the global phase: ``experts`` (the L-MoE),
    ``personal`` (Ditto: a personal copy of the global partition, pulled toward the received one), or ``None``."""

    name: str
    local_phase: str | None
    full_finetune: bool  # every SAM weight is trained and shared, no adapters
    aggregate: bool  # the site takes the server's global partition every round

    @property
    def experts(self) -> bool:
        return self.local_phase == EXPERTS

    def model_config(self, base: ModelConfig) -> ModelConfig:
        if self.full_finetune:
            return replace(base, full_finetune=True, num_experts=0)
        if not self.experts:
            return replace(base, num_experts=0)
        if base.num_experts == 0:
            raise ValueError(f"method {self.name!r} needs num_experts >= 1")
        return base

    def global_epochs(self, local_epochs: int, global_epochs: int) -> int:
        """Epochs of the global phase: a method without a local phase spends the local phase's steps there."""
        return global_epochs if self.local_phase else global_epochs + local_epochs


METHODS = {
    "pfedsam": Method("pfedsam", local_phase=EXPERTS, full_finetune=False, aggregate=True),
    "fedavg": Method("fedavg", local_phase=None, full_finetune=False, aggregate=True),
    "local": Method("local", local_phase=EXPERTS, full_finetune=False, aggregate=False),
    "fedsam": Method("fedsam", local_phase=None, full_finetune=True, aggregate=True),
    "ditto": Method("ditto", local_phase=PERSONAL, full_finetune=False, aggregate=True),
}


def get_method(name: str) -> Method:
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; choose one of {', '.join(METHODS)}")
    return METHODS[name]
