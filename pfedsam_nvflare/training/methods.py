"""The methods compared in this package: one trainer, switched by these presets."""

from __future__ import annotations

from dataclasses import dataclass, replace

from ..model import ModelConfig


@dataclass(frozen=True)
class Method:
    name: str
    experts: bool  # the L-MoE local partition exists
    full_finetune: bool  # every SAM weight is trained and shared, no adapters
    aggregate: bool  # the site takes the server's global partition every round

    def model_config(self, base: ModelConfig) -> ModelConfig:
        if self.full_finetune:
            return replace(base, full_finetune=True, num_experts=0)
        if not self.experts:
            return replace(base, num_experts=0)
        if base.num_experts == 0:
            raise ValueError(f"method {self.name!r} needs num_experts >= 1")
        return base


METHODS = {
    "pfedsam": Method("pfedsam", experts=True, full_finetune=False, aggregate=True),
    "fedavg": Method("fedavg", experts=False, full_finetune=False, aggregate=True),
    "local": Method("local", experts=True, full_finetune=False, aggregate=False),
    "fedsam": Method("fedsam", experts=False, full_finetune=True, aggregate=True),
}


def get_method(name: str) -> Method:
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; choose one of {', '.join(METHODS)}")
    return METHODS[name]
