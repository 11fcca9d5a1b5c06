"""Record-level differential privacy of the global phase (DP-SGD): each step draws a Poisson sample of the site's
training samples, takes every sample's gradient of the global partition, and lets Opacus's ``DPOptimizer`` clip
each to ``max_grad_norm`` and add Gaussian noise; Opacus's Rényi-DP accountant counts every step at the real
sample rate. Only the global partition's update leaves a site, so only the global phase needs it; the local phase
(the experts, which never leave) stays non-private.

The record is one training sample (a 2D slice): a case of D slices is protected as a group of D records."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from typing import Any

import torch
from opacus.accountants import RDPAccountant
from opacus.accountants.utils import get_noise_multiplier
from opacus.optimizers import DPOptimizer
from torch.func import functional_call, grad_and_value, vmap

# One release: Opacus's accountant history entry (noise multiplier, sample rate, steps).
Release = tuple[float, float, int]


def positive_number(value: Any) -> bool:
    """A finite number above 0 (not a bool)."""
    return not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value) and value > 0


@dataclass(frozen=True)
class DPConfig:
    """DP-SGD settings. Give ``noise_multiplier`` or ``target_epsilon``; with the target, the noise multiplier is
    the smallest that keeps ε at ``delta`` within it after ``rounds`` rounds of this site's global phase."""

    noise_multiplier: float | None = None
    target_epsilon: float | None = None
    delta: float = 1e-5
    max_grad_norm: float = 1.0
    rounds: int = 1

    def __post_init__(self) -> None:
        if (self.noise_multiplier is None) == (self.target_epsilon is None):
            raise ValueError("DP-SGD needs exactly one of noise_multiplier and target_epsilon")
        for name in ("noise_multiplier", "target_epsilon"):
            value = getattr(self, name)
            if value is not None and not positive_number(value):
                raise ValueError(f"DP-SGD: {name} must be a finite number above 0, got {value!r}")
        if not positive_number(self.max_grad_norm):
            raise ValueError(f"DP-SGD: max_grad_norm must be a finite number above 0, got {self.max_grad_norm!r}")
        if not positive_number(self.delta) or self.delta >= 1:
            raise ValueError(f"DP-SGD: delta must be in (0, 1), got {self.delta!r}")
        if isinstance(self.rounds, bool) or not isinstance(self.rounds, int) or self.rounds < 1:
            raise ValueError(f"DP-SGD: rounds must be a whole number ≥ 1, got {self.rounds!r}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def checked_releases(entries: Any, where: str) -> list[Release]:
    """``entries`` as releases, each checked (noise multiplier finite and > 0, sample rate in (0, 1], steps a whole
    number ≥ 1); a ValueError names ``where`` and the first bad one."""
    if not isinstance(entries, list):
        raise ValueError(f"{where}: the releases are not a list")
    releases = []
    for index, entry in enumerate(entries):
        at = f"{where}: release {index}"
        if not isinstance(entry, (list, tuple)) or len(entry) != 3:
            raise ValueError(f"{at} is not [noise multiplier, sample rate, steps]")
        noise, rate, steps = entry
        if not positive_number(noise):
            raise ValueError(f"{at} has noise multiplier {noise!r}, not a finite number above 0")
        if not positive_number(rate) or rate > 1:
            raise ValueError(f"{at} has sample rate {rate!r}, not in (0, 1]")
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise ValueError(f"{at} has steps {steps!r}, not a whole number ≥ 1")
        releases.append((float(noise), float(rate), steps))
    return releases


def epsilon_of(history: list[Release], delta: float) -> float:
    """ε at ``delta`` after the releases of ``history``."""
    if not history:
        return 0.0
    accountant = RDPAccountant()
    accountant.history = [tuple(entry) for entry in history]
    return float(accountant.get_epsilon(delta))


class PrivateSGD:
    """One site's DP-SGD: its sample rate (batch size / training samples), steps per round (an epoch is the
    expected ``1 / sample rate`` steps), noise multiplier and the accountant of every step it has taken."""

    def __init__(self, config: DPConfig, num_samples: int, batch_size: int, epochs_per_round: int) -> None:
        self.config = config
        self.sample_rate = min(1.0, batch_size / num_samples)
        self.expected_batch_size = max(1, round(self.sample_rate * num_samples))  # Opacus divides the noised sum by it
        self.steps_per_round = epochs_per_round * math.ceil(num_samples / batch_size)
        if self.steps_per_round == 0:
            raise ValueError("DP-SGD needs a global phase (global epochs ≥ 1)")
        if config.noise_multiplier is not None:
            self.noise_multiplier = float(config.noise_multiplier)
        else:
            self.noise_multiplier = float(
                get_noise_multiplier(
                    target_epsilon=config.target_epsilon,
                    target_delta=config.delta,
                    sample_rate=self.sample_rate,
                    steps=self.steps_per_round * config.rounds,
                    accountant="rdp",
                )
            )
        self.accountant = RDPAccountant()

    @property
    def history(self) -> list[Release]:
        return [tuple(entry) for entry in self.accountant.history]

    @history.setter
    def history(self, releases: list[Release]) -> None:
        self.accountant.history = [tuple(entry) for entry in releases]

    def epsilon(self) -> float:
        return epsilon_of(self.history, self.config.delta)

    def optimizer(self, optimizer: torch.optim.Optimizer, generator: torch.Generator | None = None) -> DPOptimizer:
        """``optimizer`` behind Opacus's clipping and noise; every step it takes is counted by the accountant."""
        private = DPOptimizer(
            optimizer,
            noise_multiplier=self.noise_multiplier,
            max_grad_norm=self.config.max_grad_norm,
            expected_batch_size=self.expected_batch_size,
            generator=generator,
        )
        private.attach_step_hook(self.accountant.get_optimizer_hook_fn(sample_rate=self.sample_rate))
        return private

    def poisson_batches(self, num_samples: int, generator: torch.Generator) -> list[list[int]]:
        """One round's batches: each of ``steps_per_round`` steps takes every sample with probability
        ``sample_rate``, independently (the sampling the accountant's bound assumes); a batch may be empty."""
        draws = torch.rand(self.steps_per_round, num_samples, generator=generator) < self.sample_rate
        return [row.nonzero().flatten().tolist() for row in draws]

    def report(self, steps: int) -> dict[str, Any]:
        """What a round's update carries about its privacy: this round's steps and the ε spent by all of them."""
        return {
            "mechanism": "dp-sgd",
            "noise_multiplier": self.noise_multiplier,
            "sample_rate": self.sample_rate,
            "steps": steps,
            "max_grad_norm": self.config.max_grad_norm,
            "delta": self.config.delta,
            "epsilon": self.epsilon(),
        }


def per_sample_gradients(
    model: torch.nn.Module,
    trained: Mapping[str, torch.nn.Parameter],
    sample_loss: Callable[[Callable[..., torch.Tensor], dict[str, torch.Tensor]], torch.Tensor],
    batch: Mapping[str, torch.Tensor],
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """The gradient of ``sample_loss`` with respect to ``trained`` for each sample of ``batch`` (tensors whose first
    dimension is the sample) on its own, ``{name: (B, *shape)}``, and each sample's loss (B,). ``torch.func``'s ``vmap`` over ``grad`` takes them
    in one pass, whatever the layers do with the batch dimension inside (windowed attention folds windows into
    it, which per-layer hooks would take for samples). ``sample_loss(forward, sample)`` gets the model as a
    function of its inputs (``forward(**inputs)``, with the trained weights in place) and one sample as a batch of
    one."""
    params = {name: parameter.detach() for name, parameter in trained.items()}

    def loss_of_one(weights: dict[str, torch.Tensor], sample: dict[str, torch.Tensor]) -> torch.Tensor:
        one = {key: value.unsqueeze(0) for key, value in sample.items()}
        return sample_loss(lambda **inputs: functional_call(model, weights, kwargs=inputs), one)

    return vmap(grad_and_value(loss_of_one), in_dims=(None, 0))(params, dict(batch))
