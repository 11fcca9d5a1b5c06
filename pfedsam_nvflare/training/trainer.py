"""One site's training: one call of ``LocalTrainer.run_round`` is one federated round.

Round: load the received global partition (strictly) → local phase (the site's own part learns: the L-MoE
experts and routers, or Ditto's personal copy; the global partition is frozen) → global phase (the global
partition learns, the experts are frozen; with ``kd_direction="local_to_global"`` the personalized model teaches
it) → return the global partition's difference. ``phase_order="global_first"`` swaps the two phases. The local
part stays in the site directory.
"""

from __future__ import annotations

import copy
import logging
import math
import os
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch

from ..model import ModelConfig, Partition, PFedSAM, build_pfedsam
from ..model.partition import GLOBAL, LOCAL, is_finite
from ..model.pfedsam import PATHS
from .compute import autocast, check_device, check_precision, place, resolve_device, resolve_precision
from .dp import DPConfig, PrivateSGD, checked_releases, per_sample_gradients
from .losses import SegmentationLoss, distillation_loss
from .methods import PERSONAL, get_method
from .metrics import SegmentationScores
from .feature_cache import CACHE_DTYPES, FeatureCache
from .samples import Batch, SampleStore
from .site_state import STATE_FILE, SiteStateError, load_site_state, save_site_state

logger = logging.getLogger(__name__)

KD_DIRECTIONS = ("local_to_global", "global_to_local", "none")
PHASE_ORDERS = ("local_first", "global_first")


def _float_state(state: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """A received global partition (tensors or numpy arrays, maybe half precision) as float32 tensors."""
    return {key: torch.as_tensor(value, dtype=torch.float32) for key, value in state.items()}


class TrainingAborted(RuntimeError):
    """``should_abort`` asked the round to stop; nothing of the round was kept."""


class NonFiniteTraining(RuntimeError):
    """A round produced a non-finite loss or weight; it was rolled back and nothing of it was saved."""


@dataclass(frozen=True)
class TrainerConfig:
    """How a site trains. ``kd_direction``: ``none`` (the default: distillation lowered test Dice in the measured
    ablations, BENCHMARK.md), ``local_to_global`` distils the personalized model (teacher) into the global-only
    path, ``global_to_local`` distils the received global model into the personalized one.
    ``phase_order``: ``local_first`` (the local phase, then the global phase) or ``global_first``.
    ``ditto_lambda``: the weight of Ditto's proximal term λ/2·‖w − w_global‖². ``cache_features`` keeps the frozen
    encoder prefix of every sample on disk (else the images), in ``cache_dtype``. ``precision``: the autocast dtype
    (``auto``: bfloat16 where the device computes it natively, float32 elsewhere; see ``compute``). ``dp``: record-
    level DP-SGD of the global phase (``DPConfig`` or its dict; see ``dp``)."""

    method: str = "pfedsam"
    kd_direction: str = "none"
    kd_weight: float = 1.0
    kd_temperature: float = 2.0
    balance_weight: float = 0.01
    phase_order: str = "local_first"
    ditto_lambda: float = 0.1
    lr_global: float = 1e-3
    lr_local: float = 1e-3
    weight_decay: float = 1e-4
    local_epochs: int = 1
    global_epochs: int = 1
    batch_size: int = 4
    seed: int = 0
    cache_features: bool = True
    cache_dtype: str = "float16"
    device: str = "auto"
    precision: str = "auto"
    log_every: int = 10
    dp: DPConfig | None = None

    def __post_init__(self) -> None:
        get_method(self.method)
        if isinstance(self.dp, Mapping):
            unknown = set(self.dp) - {f.name for f in fields(DPConfig)}
            if unknown:
                raise ValueError(f"unknown DP-SGD settings: {', '.join(sorted(unknown))}")
            object.__setattr__(self, "dp", DPConfig(**self.dp))
        if self.dp is not None and get_method(self.method).experts and self.kd_direction == "local_to_global":
            raise ValueError(
                "DP-SGD cannot distil the personalized model into the global phase (kd_direction='local_to_global'): "
                "the teacher is trained without DP on every record of the site, so its outputs would carry all of "
                "them into each sample's loss and void the per-sample bound; use kd_direction 'none' (the default) or "
                "'global_to_local', and a method other than pfedsam_kd, whose preset distils local_to_global"
            )
        if self.kd_direction not in KD_DIRECTIONS:
            raise ValueError(f"kd_direction must be one of {KD_DIRECTIONS}, got {self.kd_direction!r}")
        if self.phase_order not in PHASE_ORDERS:
            raise ValueError(f"phase_order must be one of {PHASE_ORDERS}, got {self.phase_order!r}")
        if self.kd_temperature <= 0:
            raise ValueError(f"kd_temperature must be positive, got {self.kd_temperature}")
        if self.ditto_lambda < 0:
            raise ValueError(f"ditto_lambda must be at least 0, got {self.ditto_lambda}")
        check_device(self.device)
        check_precision(self.precision)
        if self.cache_dtype not in CACHE_DTYPES:
            raise ValueError(f"cache_dtype must be one of {', '.join(CACHE_DTYPES)}, got {self.cache_dtype!r}")
        if self.batch_size < 1 or self.local_epochs < 0 or self.global_epochs < 0:
            raise ValueError("batch_size must be at least 1 and the epoch counts at least 0")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> TrainerConfig:
        unknown = set(values) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f"unknown trainer settings: {', '.join(sorted(unknown))}")
        return cls(**values)


@dataclass
class RoundResult:
    round: int
    global_diff: dict[str, torch.Tensor]  # after − received, global-partition keys only
    num_samples: int
    metrics: dict[str, float] = field(default_factory=dict)
    privacy: dict[str, Any] | None = None  # under DP-SGD: this round's steps, their noise and the ε spent


@dataclass
class KeptWeights:
    """The weights of the model a site keeps: the global partition it runs with, its local partition and, for
    Ditto, its personal copy of the global partition (used on the personalized path instead of ``global_state``)."""

    global_state: dict[str, torch.Tensor]
    local_state: dict[str, torch.Tensor]
    personal_state: dict[str, torch.Tensor] | None
    rounds_done: int


class LocalTrainer:
    """Owns one site's model, optimisers, samples and local state.

    ``train_data`` and ``val_data`` are any datasets whose items are ``(image, mask)`` or
    ``{"image", "mask"}``: image (1 or 3, S, S) in [0, 1], mask (K, S, S) or (S, S) of 0/1.
    """

    def __init__(
        self,
        model_config: ModelConfig,
        config: TrainerConfig,
        train_data: Any,
        val_data: Any | None,
        site_dir: str | Path,
        *,
        site_name: str = "site",
    ) -> None:
        self.config, self.site_name = config, site_name
        self.method = get_method(config.method)
        self.model_config = self.method.model_config(model_config)
        self.site_dir = Path(site_dir)
        self.device = resolve_device(config.device)
        self.precision = resolve_precision(config.precision, self.device)
        logger.info("%s: computing on %s in %s", site_name, self.device, str(self.precision).removeprefix("torch."))
        self.model: PFedSAM = place(build_pfedsam(self.model_config), self.device)
        self.partition = Partition.of(self.model)
        cache = FeatureCache(
            self.site_dir / "feature_cache",
            self.model,
            self.model.cache_start if config.cache_features else 0,
            config.cache_dtype,
            self.precision,
        )
        # the cache is filled a training batch at a time: larger chunks are no faster on a CPU and raise peak memory
        # above a training step's (LiteMedSAM's prefix of 8 images peaks 1.8 GiB above the model)
        fill = {"cache": cache, "chunk": config.batch_size}
        self.train_samples = SampleStore(train_data, self.model, name="training", **fill)
        self.val_samples = None if val_data is None else SampleStore(val_data, self.model, name="validation", **fill)
        roles = {GLOBAL: (GLOBAL, config.lr_global), LOCAL: (LOCAL, config.lr_local), PERSONAL: (GLOBAL, config.lr_local)}
        if self.method.local_phase != PERSONAL:
            del roles[PERSONAL]
        self.optimizers = {
            name: torch.optim.AdamW(
                self.partition.parameters(self.model, role), lr=lr, weight_decay=config.weight_decay
            )
            for name, (role, lr) in roles.items()
            if self.partition.keys(role)
        }
        self.segmentation_loss = SegmentationLoss()
        self.rounds_done = 0
        self.keeps_own_global = False  # true once a non-aggregating site has its own global partition
        self.personal: dict[str, torch.Tensor] | None = None  # Ditto's personal copy, made from the first received model
        self.private = None
        if config.dp is not None:
            epochs = self.method.global_epochs(config.local_epochs, config.global_epochs)
            self.private = PrivateSGD(config.dp, len(self.train_samples), config.batch_size, epochs)
            logger.info(
                "%s: DP-SGD in the global phase: noise multiplier %.4g, sample rate %.4g, %d steps a round, clip %g",
                site_name, self.private.noise_multiplier, self.private.sample_rate, self.private.steps_per_round,
                config.dp.max_grad_norm,
            )
        self.dp_history: list = []  # every DP-SGD step this site's state has taken, over jobs (Opacus's history)
        self._resume()

    def autocast(self) -> Any:
        """The context every forward pass of this site runs in: its ``precision`` on its device."""
        return autocast(self.device, self.precision)

    # --- state ---

    def global_state(self) -> dict[str, torch.Tensor]:
        return self.partition.state(self.model, GLOBAL)

    def local_state(self) -> dict[str, torch.Tensor]:
        return self.partition.state(self.model, LOCAL)

    def _fingerprint(self) -> dict[str, Any]:
        return {"model": self.model_config.to_dict(), "method": self.method.name}

    def _save(self) -> None:
        state: dict[str, Any] = {
            **self._fingerprint(),
            "rounds_done": self.rounds_done,
            "local": self.local_state(),
            "optimizers": {role: optimizer.state_dict() for role, optimizer in self.optimizers.items()},
        }
        if not self.method.aggregate:
            state["global"] = self.global_state()
        if self.personal is not None:
            state[PERSONAL] = self.personal
        if self.dp_history:
            state["dp_history"] = [list(entry) for entry in self.dp_history]
        save_site_state(self.site_dir, state)

    def _resume(self) -> None:
        state = load_site_state(self.site_dir)
        if state is None:
            return
        path = self.site_dir / STATE_FILE
        for key, expected in self._fingerprint().items():
            if state.get(key) != expected:
                raise SiteStateError(
                    f"site state {path} was written for {key} {state.get(key)!r}, not {expected!r}; use another "
                    "site directory for another configuration"
                )
        try:
            self.partition.check(state["local"], LOCAL)
            for name in ("global", PERSONAL):
                if name in state:
                    self.partition.check(state[name], GLOBAL)
            rounds_done = state["rounds_done"]
            if isinstance(rounds_done, bool) or not isinstance(rounds_done, int) or rounds_done < 0:
                raise ValueError(f"rounds_done is {rounds_done!r}, not a number of rounds")
            for role, optimizer in self.optimizers.items():
                self._check_optimizer_state(state["optimizers"][role], optimizer, role)
            dp_history = checked_releases(state.get("dp_history", []), "the DP-SGD steps ('dp_history')")
        except KeyError as error:
            raise SiteStateError(f"site state {path} is incomplete: it has no {error.args[0]!r}") from error
        except (TypeError, ValueError) as error:
            raise SiteStateError(f"site state {path} does not fit this model: {error}") from error
        self.partition.load_local(self.model, state["local"])
        if "global" in state:
            self.partition.load_global(self.model, state["global"])
            self.keeps_own_global = True
        if PERSONAL in state:
            self.personal = _float_state(state[PERSONAL])
        for role, optimizer in self.optimizers.items():
            optimizer.load_state_dict(state["optimizers"][role])
        self.dp_history = dp_history
        self.rounds_done = state["rounds_done"]
        logger.info("%s: resumed after round %d from %s", self.site_name, self.rounds_done, path)

    @staticmethod
    def _check_optimizer_state(saved: Mapping[str, Any], optimizer: torch.optim.Optimizer, role: str) -> None:
        """A saved optimiser state fits ``optimizer``: as many parameters per group, and every per-parameter tensor
        (AdamW's moments) of its parameter's shape and finite."""
        groups = saved["param_groups"]
        if [len(g["params"]) for g in groups] != [len(g["params"]) for g in optimizer.param_groups]:
            raise ValueError(f"the {role} optimiser state has other parameter groups than this model")
        indices = [index for group in groups for index in group["params"]]
        parameters = dict(zip(indices, (p for group in optimizer.param_groups for p in group["params"])))
        for index, values in saved["state"].items():
            for name, value in values.items():
                if not isinstance(value, torch.Tensor) or value.ndim == 0:
                    continue
                if index not in parameters or value.shape != parameters[index].shape:
                    raise ValueError(f"the {role} optimiser's {name!r} of parameter {index} does not fit this model")
                if not is_finite(value):
                    raise ValueError(f"the {role} optimiser's {name!r} of parameter {index} has non-finite values")

    def _snapshot(self) -> tuple:
        return (
            self.global_state(),
            self.local_state(),
            copy.deepcopy({name: o.state_dict() for name, o in self.optimizers.items()}),
            None if self.personal is None else dict(self.personal),
            list(self.dp_history),
        )

    def _check_finite(self, stage: str) -> None:
        """Refuse weights a model cannot run with, before anything is sent or saved."""
        states = {"global": self.global_state(), "local": self.local_state(), PERSONAL: self.personal or {}}
        for name, state in states.items():
            bad = next((key for key, value in state.items() if not is_finite(value)), None)
            if bad is not None:
                raise NonFiniteTraining(
                    f"{self.site_name}: {stage} made {name} weight {bad!r} non-finite; the round was rolled back "
                    "and nothing of it was saved"
                )

    def _restore(self, snapshot: tuple) -> None:
        global_state, local_state, optimizers, personal, self.dp_history = snapshot
        self.partition.load_global(self.model, global_state)
        self.partition.load_local(self.model, local_state)
        for name, state in optimizers.items():
            self.optimizers[name].load_state_dict(state)
        self.personal = personal

    def _received(self, global_state: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        received = _float_state(global_state)
        self.partition.check(received, GLOBAL)
        return received

    # --- a round ---

    def run_round(
        self, global_state: Mapping[str, Any], should_abort: Callable[[], bool] = lambda: False
    ) -> RoundResult:
        """Train one round from the received global partition and return its difference."""
        round_index = self.rounds_done + 1
        received = self._received(global_state)
        snapshot = self._snapshot()
        if not self.keeps_own_global:
            self.partition.load_global(self.model, received)
        start = self.global_state()
        metrics: dict[str, float] = {}
        began = time.perf_counter()
        phases = [self._local_phase, self._global_phase]
        if self.config.phase_order == "global_first":
            phases.reverse()
        try:
            for phase in phases:
                metrics.update(phase(round_index, start, should_abort))
            self._check_finite(f"round {round_index}")
        except (TrainingAborted, NonFiniteTraining):
            self._restore(snapshot)
            raise
        after = self.global_state()
        privacy = metrics.pop("privacy", None)
        self.rounds_done = round_index
        self.keeps_own_global = not self.method.aggregate
        self._save()
        metrics["train_seconds"] = time.perf_counter() - began
        return RoundResult(
            round=round_index,
            global_diff={key: after[key] - start[key] for key in after},
            num_samples=len(self.train_samples),
            metrics=metrics,
            privacy=privacy,
        )

    def _local_phase(
        self,
        round_index: int,
        received: dict[str, torch.Tensor],
        should_abort: Callable[[], bool],
        stage: str | None = None,
    ) -> dict[str, float]:
        """The site's own part learns on the global partition now in the model: the experts (with the received
        global model as teacher under ``global_to_local``), or Ditto's personal copy (made from ``received`` the
        first time), pulled toward ``received``."""
        config = self.config
        if not config.local_epochs or self.method.local_phase is None:
            return {}
        if self.method.local_phase == PERSONAL:
            with self._global_weights(self.personal if self.personal is not None else received):
                loss = self._phase(PERSONAL, round_index, None, should_abort, proximal_to=received, stage=stage)
                self.personal = self.global_state()
            return {"local_loss": loss}
        # the received model is the teacher, also when the global phase came first
        teacher = self._teacher(False, received) if config.kd_direction == "global_to_local" else None
        return {"local_loss": self._phase(LOCAL, round_index, teacher, should_abort, stage=stage)}

    def _global_phase(
        self, round_index: int, received: dict[str, torch.Tensor], should_abort: Callable[[], bool]
    ) -> dict[str, float]:
        epochs = self.method.global_epochs(self.config.local_epochs, self.config.global_epochs)
        if not epochs:
            return {}
        if self.private is not None:
            return self._private_global_phase(round_index, should_abort)
        distil = self.model.has_experts and self.config.kd_direction == "local_to_global"
        teacher = self._teacher(True, self.global_state()) if distil else None
        return {"global_loss": self._phase(GLOBAL, round_index, teacher, should_abort, epochs=epochs)}

    def _private_global_phase(self, round_index: int, should_abort: Callable[[], bool]) -> dict[str, Any]:
        """The global phase under DP-SGD: no teacher (refused by the config), Poisson batches, each sample's
        gradient clipped and the sum noised by Opacus, every step counted. The sampling and the noise draw from
        the operating system's entropy: a seed anyone could know would void the bound. The optimiser's moments
        start afresh every round, so that an update depends on the received (public) global partition and this
        round's steps only: steps of a round whose update was refused or rolled back never reach a later one."""
        private, stage = self.private, f"round {round_index}"
        self.optimizers[GLOBAL].state.clear()
        self.model.requires_grad_(False)
        trained = dict(zip(self.partition.keys(GLOBAL), self.partition.parameters(self.model, GLOBAL)))
        for parameter in trained.values():
            parameter.requires_grad_(True)
        private.history = self.dp_history
        sampler = torch.Generator().manual_seed(int.from_bytes(os.urandom(8), "little"))
        noise = torch.Generator(device=self.device).manual_seed(int.from_bytes(os.urandom(8), "little"))
        optimizer = private.optimizer(self.optimizers[GLOBAL], noise)
        batches = private.poisson_batches(len(self.train_samples), sampler)
        losses: list[float] = []
        self.model.train()
        try:
            for step, indices in enumerate(batches, start=1):
                if should_abort():
                    raise TrainingAborted(f"{self.site_name}: {stage} aborted in the global phase")
                optimizer.zero_grad(set_to_none=True)
                if indices:
                    batch = self.train_samples.batch(indices)
                    # in float32: autocast inside torch.func's transforms mixes dtypes in the backward pass
                    tensors = {k: v.float() for k, v in {**batch.model_inputs(), "masks": batch.masks}.items() if v is not None}
                    with self.model.global_only():
                        grads, sample_losses = per_sample_gradients(self.model, trained, self._sample_loss, tensors)
                    loss = float(sample_losses.mean())
                    if not math.isfinite(loss):
                        raise NonFiniteTraining(
                            f"{self.site_name}: {stage} global phase (DP-SGD): the loss is {loss} at step {step}; "
                            "the round was rolled back and nothing of it was saved"
                        )
                    losses.append(loss)
                else:  # an empty Poisson batch is still a step: noise only
                    grads = {name: torch.zeros((0, *p.shape), device=p.device) for name, p in trained.items()}
                for name, parameter in trained.items():
                    parameter.grad_sample = grads[name].to(parameter.dtype)
                optimizer.step()
                if step % self.config.log_every == 0 or step == len(batches):
                    logger.info(
                        "%s %s global phase (DP-SGD): step %d/%d, %d samples, loss %.4f, ε %.3f",
                        self.site_name, stage, step, len(batches), len(indices), losses[-1] if losses else float("nan"),
                        private.epsilon(),
                    )
        finally:
            optimizer.zero_grad(set_to_none=True)  # no per-sample gradient outlives the phase
            self.model.eval()
        self.dp_history = private.history
        report = private.report(len(batches))
        return {"global_loss": sum(losses) / len(losses) if losses else float("nan"), "privacy": report}

    def _sample_loss(self, forward: Callable[..., torch.Tensor], sample: dict[str, torch.Tensor]) -> torch.Tensor:
        inputs = {key: sample[key] for key in ("images", "boxes", "prefix") if key in sample}
        return self.segmentation_loss(forward(**inputs).float(), sample["masks"])

    def _teacher(self, personalized: bool, weights: Mapping[str, torch.Tensor]) -> Callable[[Batch], torch.Tensor]:
        """A phase's frozen teacher: the ``personalized`` or global-only path with the global partition ``weights``
        (as they were when the phase began, whatever the phase trains meanwhile), run on each batch as it comes."""
        weights = {key: value.clone() for key, value in weights.items()}

        @torch.no_grad()
        def logits(batch: Batch) -> torch.Tensor:
            self.model.eval()
            try:
                with self._global_weights(weights), self.path_context(personalized), self.autocast():
                    return self.model(**batch.model_inputs()).float()
            finally:
                self.model.train()

        return logits

    @contextmanager
    def _global_weights(self, state: Mapping[str, torch.Tensor]) -> Iterator[None]:
        """``state`` in place of the global partition (Ditto's personal copy, the received model as a teacher);
        the global partition comes back after."""
        current = self.global_state()
        self.partition.load_global(self.model, state)
        try:
            yield
        finally:
            self.partition.load_global(self.model, current)

    def _phase(
        self,
        name: str,
        round_index: int,
        teacher: Callable[[Batch], torch.Tensor] | None,
        should_abort: Callable[[], bool],
        *,
        epochs: int | None = None,
        proximal_to: Mapping[str, torch.Tensor] | None = None,
        stage: str | None = None,
    ) -> float:
        """Train one partition alone (``local``: the experts; ``global`` and ``personal``: the global partition's
        parameters); the other one receives no gradient and is not in the optimiser. ``stage`` names the step in
        the log (``round N`` by default)."""
        config = self.config
        role = LOCAL if name == LOCAL else GLOBAL
        epochs = config.local_epochs if epochs is None else epochs
        self.model.requires_grad_(False)
        trained = self.partition.parameters(self.model, role)
        for parameter in trained:
            parameter.requires_grad_(True)
        anchors = None if proximal_to is None else [proximal_to[key] for key in self.partition.keys(role)]
        optimizer = self.optimizers[name]
        phase_index = {GLOBAL: 0, LOCAL: 1, PERSONAL: 1}[name]
        generator = torch.Generator().manual_seed(config.seed * 1_000_003 + round_index * 2 + phase_index)
        steps_per_epoch = -(-len(self.train_samples) // config.batch_size)
        stage = stage or f"round {round_index}"
        losses = []
        self.model.train()
        try:
            for epoch in range(1, epochs + 1):
                for step, batch in enumerate(self.train_samples.batches(config.batch_size, generator), start=1):
                    if should_abort():
                        raise TrainingAborted(f"{self.site_name}: {stage} aborted in the {name} phase")
                    target = None if teacher is None else teacher(batch)
                    with self.model.global_only() if name == GLOBAL else nullcontext(), self.autocast():
                        logits = self.model(**batch.model_inputs()).float()
                    loss = self.segmentation_loss(logits, batch.masks)
                    if name == LOCAL:
                        loss = loss + config.balance_weight * self.model.balance_loss()
                    if target is not None:
                        loss = loss + config.kd_weight * distillation_loss(logits, target, config.kd_temperature)
                    if anchors is not None:
                        proximal = sum(((p - a.to(p.device)) ** 2).sum() for p, a in zip(trained, anchors))
                        loss = loss + config.ditto_lambda / 2 * proximal
                    if not torch.isfinite(loss):
                        raise NonFiniteTraining(
                            f"{self.site_name}: {stage} {name} phase: the loss is {loss.item()} at epoch {epoch} step "
                            f"{step}; the round was rolled back and nothing of it was saved"
                        )
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    optimizer.step()
                    losses.append(loss.item())
                    if step % config.log_every == 0 or step == steps_per_epoch:
                        logger.info(
                            "%s %s %s phase: epoch %d/%d step %d/%d loss %.4f",
                            self.site_name, stage, name, epoch, epochs, step, steps_per_epoch, losses[-1],
                        )
        finally:
            self.model.eval()
        return sum(losses) / len(losses) if losses else float("nan")

    # --- the model the site keeps ---

    def personalize(
        self, global_state: Mapping[str, Any], should_abort: Callable[[], bool] = lambda: False
    ) -> KeptWeights:
        """The model this site keeps with ``global_state``: its local phase run once more on it, so that the site's
        own part fits the global partition it will run with. The trainer's state is left exactly as it was."""
        received = self._received(global_state)
        snapshot = self._snapshot()
        try:
            if not self.keeps_own_global:
                self.partition.load_global(self.model, received)
            self._local_phase(self.rounds_done + 1, self.global_state(), should_abort, stage="final fit")
            self._check_finite("the final fit")
            return KeptWeights(
                global_state=self.global_state(),
                local_state=self.local_state(),
                personal_state=None if self.personal is None else dict(self.personal),
                rounds_done=self.rounds_done,
            )
        finally:
            self._restore(snapshot)

    # --- evaluation ---

    def path_context(self, personalized: bool) -> Any:
        """The context in which the model runs its ``personalized`` path (experts on, or Ditto's personal copy)
        or its global-only path."""
        if not personalized:
            return self.model.global_only()
        if self.personal is not None:
            return self._global_weights(self.personal)
        return nullcontext()

    @torch.no_grad()
    def validate(
        self, global_state: Mapping[str, Any] | None = None, paths: tuple[str, ...] = PATHS
    ) -> dict[str, float]:
        """Loss, Dice and HD95 per slice on the validation set, of the ``personalized`` model and of the
        ``global``-only one: the numbers of the training curves and of model selection.

        With ``global_state`` the model is evaluated with that global partition (and this site's own local one),
        then put back as it was; a site that keeps its own global partition (method ``local``) ignores it.
        """
        if self.val_samples is None:
            raise ValueError(f"{self.site_name} has no validation set")
        if global_state is not None and not self.keeps_own_global:
            current = self.global_state()
            self.partition.load_global(self.model, _float_state(global_state))
            try:
                return self.validate(paths=paths)
            finally:
                self.partition.load_global(self.model, current)
        evaluated: dict[bool, dict[str, float]] = {}
        metrics: dict[str, float] = {}
        for path in paths:
            personalized = path == "personalized" and self.method.local_phase is not None  # otherwise: one model
            if personalized not in evaluated:
                evaluated[personalized] = self._validation_scores(personalized, self.val_samples)
            metrics.update({f"{path}_{name}": value for name, value in evaluated[personalized].items()})
        return metrics

    @torch.no_grad()
    def _validation_scores(self, personalized: bool, samples: SampleStore) -> dict[str, float]:
        """Loss (the mean over samples, as one batch of all of them would give), Dice and HD95 per slice."""
        scores, loss = SegmentationScores(), 0.0
        self.model.eval()
        with self.path_context(personalized):
            for batch in samples.batches(self.config.batch_size):
                with self.autocast():
                    logits = self.model(**batch.model_inputs()).float()
                scores.update(logits > 0, batch.masks)
                loss += float(self.segmentation_loss(logits, batch.masks)) * len(batch.masks)
        return {"loss": loss / len(samples), **scores.result()}

    @torch.no_grad()
    def predict(self, images: torch.Tensor, boxes: torch.Tensor | None = None, personalized: bool = True) -> torch.Tensor:
        """Binary masks (B, K, S, S) for images (B, C, S, S) in [0, 1] (and their boxes in box-prompt mode)."""
        self.model.eval()
        device = self.device
        with self.path_context(personalized), self.autocast():
            return self.model(images.to(device), None if boxes is None else boxes.to(device)).float().cpu() > 0
