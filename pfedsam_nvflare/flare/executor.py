"""The site side of a pFedSAM job: FLARE tasks in, ``LocalTrainer`` rounds out."""

from __future__ import annotations

import hashlib
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from nvflare.apis.dxo import DXO, DataKind, MetaKey, from_shareable
from nvflare.apis.event_type import EventType
from nvflare.apis.executor import Executor
from nvflare.apis.fl_constant import ReturnCode
from nvflare.apis.fl_context import FLContext
from nvflare.apis.shareable import Shareable, make_reply
from nvflare.apis.signal import Signal
from nvflare.app_common.app_constant import AppConstants

from ..data.config import DataConfig, resolve_root
from ..data.preprocess import SliceOptions
from ..data.sites import SiteData, load_site
from ..data.splits import SPLITS
from ..inference import Evaluation
from ..inference.keep import evaluate_model_file, keep_model
from ..model import ModelConfig, PartitionError
from ..model.kept import KeptModel
from ..model.backbones import INPUT_SIZES
from ..model.partition import GLOBAL
from ..reports import plot_overlays
from ..training import LocalTrainer, NonFiniteTraining, TrainerConfig, TrainingAborted
from ..training.samples import boxes_from_masks
from .settings import METRICS_META_KEY, MODEL_META_KEY, PRIVACY_META_KEY, job_model, settings_mismatch
from .site_storage import configured_state_dir
from .threads import set_thread_budget

SITE_FOLDER = "pfedsam"  # in the site's run directory: kept models, overlays.png; site_state.pt and split.json unless kept elsewhere


def finite_or_none(metrics: Any) -> Any:
    """Metrics fit for JSON: NaN (nothing to measure, e.g. no foreground) becomes None, in nested dicts too."""
    if isinstance(metrics, dict):
        return {key: finite_or_none(value) for key, value in metrics.items()}
    return None if isinstance(metrics, float) and not math.isfinite(metrics) else metrics


def kept_model_file(model_owner: str) -> str:
    """The site's file for the model it keeps with a server model: ``SRV_FL_global_model.pt`` gives
    ``personalized_model.pt``, ``SRV_best_FL_global_model.pt`` gives ``best_personalized_model.pt``."""
    name = model_owner.removeprefix("SRV_").replace("FL_global_model", "personalized_model")
    name = "".join(c if c.isalnum() or c in "._-" else "_" for c in name).lstrip(".")  # a file name, nothing more
    return name if name.endswith(".pt") else f"{name}.pt"


def _digest(arrays: dict[str, np.ndarray]) -> str:
    """A fingerprint of a received partition: equal arrays under equal keys, equal digest."""
    digest = hashlib.sha256()
    for key in sorted(arrays):
        value = np.ascontiguousarray(arrays[key])
        digest.update(f"{key}:{value.dtype}:{value.shape}".encode())
        digest.update(value.tobytes())
    return digest.hexdigest()


def _nbytes(arrays: dict[str, Any]) -> int:
    return int(sum(np.asarray(value).nbytes for value in arrays.values()))


class PFedSAMExecutor(Executor):
    """Trains, validates and submits one site's model.

    Args:
        model: ``ModelConfig`` settings (a dict).
        trainer: ``TrainerConfig`` settings (a dict), the method among them.
        data: ``DataConfig`` settings (a dict); without a ``root`` the default synthetic sites are used.
        num_overlays: validation images drawn with predicted and true masks at the end of the run.

    A ``validate`` task that names a server model (``GlobalModelEval`` at the end of a job) is the site's final
    evaluation: the site keeps that global partition with its own part fitted to it (one more local phase), writes
    the kept model to ``<run dir>/pfedsam/<kept_model_file>``, scores it per case on its validation and test
    cases and returns the means. Per-case scores stay at the site in a CSV beside the model.
    """

    def __init__(
        self,
        model: dict[str, Any] | None = None,
        trainer: dict[str, Any] | None = None,
        data: dict[str, Any] | None = None,
        train_task_name: str = AppConstants.TASK_TRAIN,
        validate_task_name: str = AppConstants.TASK_VALIDATION,
        submit_model_task_name: str = AppConstants.TASK_SUBMIT_MODEL,
        analytic_sender_id: str = "analytic_sender",
        num_overlays: int = 4,
    ):
        super().__init__()
        self.model, self.trainer, self.data = model, trainer, data
        self.train_task_name = train_task_name
        self.validate_task_name = validate_task_name
        self.submit_model_task_name = submit_model_task_name
        self.analytic_sender_id = analytic_sender_id
        self.num_overlays = num_overlays
        self._trainer: LocalTrainer | None = None
        self._site_data: SiteData | None = None
        self._site_dir: Path | None = None  # this job's outputs at the site: kept models, their scores, overlays
        self._state_dir: Path | None = None  # what outlives the job where the site configures it (site_storage)
        self._analytics = None
        self._options: SliceOptions | None = None
        self._kept: dict[str, tuple[KeptModel, dict[str, Evaluation]]] = {}  # by digest of the global partition
        self._root: Path | None = None
        self._start_seconds: float | None = None  # the site's start (data, model, feature cache), reported once

    # --- run lifecycle ---

    def handle_event(self, event_type: str, fl_ctx: FLContext) -> None:
        if event_type == EventType.START_RUN:
            self._start(fl_ctx)
        elif event_type == EventType.END_RUN and self._trainer is not None:
            self._draw_overlays(fl_ctx)

    def _start(self, fl_ctx: FLContext) -> None:
        began = time.perf_counter()
        site = fl_ctx.get_identity_name()
        fl_ctx.set_prop(MODEL_META_KEY, job_model(self.model), private=False, sticky=True)  # the filters compare
        threads, reason = set_thread_budget(fl_ctx)
        self.log_info(fl_ctx, f"{site}: {threads} torch threads ({reason})")
        try:
            model_config = ModelConfig.from_dict(self.model or {})
            trainer_config = TrainerConfig.from_dict(self.trainer or {})
            data_config = DataConfig.from_dict(self.data or {})
            run_dir = Path(fl_ctx.get_engine().get_workspace().get_run_dir(fl_ctx.get_job_id()))
            self._site_dir = run_dir / SITE_FOLDER
            state_dir, source = configured_state_dir(fl_ctx.get_engine().get_workspace().get_site_config_dir(), site)
            self._state_dir = state_dir or self._site_dir
            self.log_info(
                fl_ctx,
                f"{site}: local partition, case split and feature cache in {self._state_dir} "
                + (f"(from {source}; kept across jobs)" if state_dir else f"(this job only: {source})"),
            )
            root = resolve_root(data_config)
            self.log_info(fl_ctx, f"{site}: reading data from {root}")
            self._options = data_config.slice_options(INPUT_SIZES[model_config.backbone])
            self._root = root
            self._site_data = load_site(
                root,
                site,
                self._options,
                val_fraction=data_config.val_fraction,
                test_fraction=data_config.test_fraction,
                seed=data_config.seed,
                split_file=self._state_dir / "split.json",
            )
            names = self._site_data.labels.names
            if len(names) != model_config.num_labels:
                raise ValueError(
                    f"{root}'s dataset.json names {len(names)} label(s) ({', '.join(names)}) but the job's model has "
                    f"num_labels={model_config.num_labels}: set ModelConfig(num_labels={len(names)}) in the job"
                )
            self._trainer = LocalTrainer(
                model_config, trainer_config, self._site_data.train, self._site_data.val, self._state_dir, site_name=site
            )
        except Exception as error:  # any failure here leaves the site unable to work: end the run, say why
            self.system_panic(f"{site} cannot start pFedSAM: {type(error).__name__}: {error}", fl_ctx)
            return
        self._analytics = fl_ctx.get_engine().get_component(self.analytic_sender_id)
        self._start_seconds = time.perf_counter() - began
        partition = self._trainer.partition
        self.log_info(
            fl_ctx,
            f"{site}: method {trainer_config.method}, {len(self._site_data.train)} training and "
            f"{len(self._site_data.val)} validation slices, {len(self._site_data.split.test_cases)} test cases; global partition {partition.num_values(GLOBAL):,} values, "
            f"local partition {partition.num_values('local'):,} values (never sent); outputs in {self._site_dir}",
        )

    def _draw_overlays(self, fl_ctx: FLContext) -> None:
        assert self._site_data is not None and self._trainer is not None and self._site_dir is not None
        validation = self._site_data.val
        samples = [validation.sample(index) for index in range(min(self.num_overlays, len(validation)))]
        if not samples:
            return
        images = torch.stack([s.image for s in samples])
        masks = torch.stack([s.mask for s in samples])
        boxes = boxes_from_masks(masks) if self._trainer.model.config.prompt == "box" else None
        predictions = self._trainer.predict(images, boxes)
        path = plot_overlays(
            images, masks, predictions, self._site_dir / "overlays.png",
            title=f"{fl_ctx.get_identity_name()}: personalized model on validation images",
            captions=[f"{s.case} slice {s.slice}" for s in samples],
        )
        self.log_info(fl_ctx, f"validation overlays written to {path}")

    # --- tasks ---

    def execute(self, task_name: str, shareable: Shareable, fl_ctx: FLContext, abort_signal: Signal) -> Shareable:
        if self._trainer is None:
            self.log_error(fl_ctx, "the site could not start; see the error logged at the start of the run")
            return make_reply(ReturnCode.EXECUTION_EXCEPTION)
        if task_name == self.train_task_name:
            return self._train(shareable, fl_ctx, abort_signal)
        if task_name == self.validate_task_name:
            return self._validate(shareable, fl_ctx, abort_signal)
        if task_name == self.submit_model_task_name:
            return self._global_dxo(self._trainer.global_state(), DataKind.WEIGHTS, {}, fl_ctx).to_shareable()
        self.log_error(fl_ctx, f"unknown task {task_name!r}")
        return make_reply(ReturnCode.TASK_UNKNOWN)

    def _received_global(self, shareable: Shareable, fl_ctx: FLContext) -> dict[str, np.ndarray] | None:
        """The global partition in a task, checked strictly; None (and a logged reason) if it does not fit."""
        try:
            dxo = from_shareable(shareable)
            if dxo.data_kind != DataKind.WEIGHTS:
                raise ValueError(f"task data is {dxo.data_kind}, expected {DataKind.WEIGHTS}")
            ours = job_model(self.model)
            problem = settings_mismatch(
                ours, dxo.get_meta_prop(MODEL_META_KEY, ours), "this site's executor", "the server's global partition"
            )
            if problem:
                raise ValueError(problem)
            self._trainer.partition.check(dxo.data, GLOBAL)
        except (ValueError, PartitionError) as error:
            self.log_error(fl_ctx, f"refused the task's model: {error}")
            return None
        return dxo.data

    def _global_dxo(self, state: dict[str, torch.Tensor], kind: str, meta: dict[str, Any], fl_ctx: FLContext) -> DXO:
        """A DXO of global-partition keys only: anything else is dropped here, before any filter runs."""
        allowed = set(self._trainer.partition.global_keys)
        dropped = sorted(set(state) - allowed)
        if dropped:
            self.log_error(fl_ctx, f"kept {len(dropped)} non-global keys from leaving the site: {', '.join(dropped)}")
        data = {key: value.detach().cpu().numpy() for key, value in state.items() if key in allowed}
        return DXO(kind, data, meta=meta)

    def _train(self, shareable: Shareable, fl_ctx: FLContext, abort_signal: Signal) -> Shareable:
        received = self._received_global(shareable, fl_ctx)
        if received is None:
            return make_reply(ReturnCode.BAD_TASK_DATA)
        current_round = shareable.get_header(AppConstants.CURRENT_ROUND, 0)
        num_rounds = shareable.get_header(AppConstants.NUM_ROUNDS, "?")
        site = fl_ctx.get_identity_name()
        self.log_info(
            fl_ctx, f"{site}: round {current_round + 1}/{num_rounds} starts from global partition {_digest(received)[:16]}"
        )
        began = time.perf_counter()
        before = self._trainer.validate(received, paths=("global",))
        try:
            result = self._trainer.run_round(received, should_abort=lambda: abort_signal.triggered)
        except TrainingAborted as aborted:
            self.log_info(fl_ctx, str(aborted))
            return make_reply(ReturnCode.TASK_ABORTED)
        except NonFiniteTraining as failure:
            self.log_error(fl_ctx, str(failure))
            return make_reply(ReturnCode.EXECUTION_EXCEPTION)
        after = self._trainer.validate(paths=("personalized",))
        metrics = {"round": current_round, "train_samples": result.num_samples, **result.metrics, **before, **after}
        metrics["bytes_received"] = _nbytes(received)
        meta: dict[str, Any] = {MetaKey.NUM_STEPS_CURRENT_ROUND: result.num_samples}
        if math.isfinite(before["global_dice"]):
            meta[MetaKey.INITIAL_METRICS] = {"global_dice": before["global_dice"]}
        if result.privacy is not None:  # DP-SGD: the site's policy (RequireDifferentialPrivacy) reads and counts it
            meta[PRIVACY_META_KEY] = result.privacy
            # what depends on the training records outside DP-SGD stays at the site (the site log has it)
            metrics = {
                key: value for key, value in metrics.items()
                if key not in ("local_loss", "global_loss") and not key.startswith("personalized_")
            }
            metrics["dp_epsilon"] = result.privacy["epsilon"]
        dxo = self._global_dxo(result.global_diff, DataKind.WEIGHT_DIFF, meta, fl_ctx)
        metrics["bytes_sent"] = _nbytes(dxo.data)
        metrics["task_seconds"] = time.perf_counter() - began  # the site's own work in the round, FLARE's not
        if self._start_seconds is not None:  # the first round also waited for the site to start
            metrics["start_seconds"], self._start_seconds = self._start_seconds, None
        dxo.set_meta_prop(METRICS_META_KEY, finite_or_none(metrics))
        self._stream(metrics, current_round)
        self.log_info(
            fl_ctx,
            f"{site}: round {current_round + 1} done: personalized Dice {after['personalized_dice']:.3f}, received "
            f"global Dice {before['global_dice']:.3f}, sending {metrics['bytes_sent']:,} bytes",
        )
        return dxo.to_shareable()

    def _validate(self, shareable: Shareable, fl_ctx: FLContext, abort_signal: Signal) -> Shareable:
        received = self._received_global(shareable, fl_ctx)
        if received is None:
            return make_reply(ReturnCode.BAD_TASK_DATA)
        model_owner = shareable.get_header(AppConstants.MODEL_OWNER)
        if model_owner:
            return self._final_evaluation(str(model_owner), received, fl_ctx, abort_signal)
        metrics = self._trainer.validate(received)
        self.log_info(fl_ctx, f"validation: {', '.join(f'{k} {v:.4g}' for k, v in metrics.items())}")
        return DXO(DataKind.METRICS, finite_or_none(metrics)).to_shareable()

    def _final_evaluation(
        self, model_owner: str, received: dict[str, np.ndarray], fl_ctx: FLContext, abort_signal: Signal
    ) -> Shareable:
        """Keep ``received`` with this site's own part fitted to it, write the model file, score it from the file.
        A global partition equal to one kept before (the best model is often the last) is kept the same way
        without computing it again: the local phase is seeded, so the result would be identical."""
        assert self._site_data is not None and self._site_dir is not None and self._options is not None
        site = fl_ctx.get_identity_name()
        split = self._site_data.split
        digest = _digest(received)
        about = {
            "site": site, "job": fl_ctx.get_job_id(), "global_model": model_owner, "data_root": str(self._root),
            "split": {name: split.cases(name) for name in SPLITS},
        }
        if digest in self._kept:
            kept, scores = self._kept[digest]
            kept.about = {**kept.about, **about}
            self.log_info(fl_ctx, f"{site}: {model_owner} equals a global model already kept; reusing its evaluation")
        else:
            self.log_info(fl_ctx, f"{site}: final evaluation of {model_owner}: fitting the site's own part to it")
            try:
                kept = keep_model(
                    self._trainer, received, self._site_data.labels, self._options, about=about,
                    should_abort=lambda: abort_signal.triggered,
                )
            except TrainingAborted as aborted:
                self.log_info(fl_ctx, str(aborted))
                return make_reply(ReturnCode.TASK_ABORTED)
            except NonFiniteTraining as failure:
                self.log_error(fl_ctx, str(failure))
                return make_reply(ReturnCode.EXECUTION_EXCEPTION)
            scores = None
        path = kept.save(self._site_dir / kept_model_file(model_owner))
        if scores is None:
            case_sets = {name: self._site_data.split_cases(name) for name in ("val", "test")}
            trainer = self._trainer
            scores = evaluate_model_file(
                path, case_sets, self._site_data.labels, device=trainer.device, precision=trainer.config.precision
            )
            self._kept[digest] = kept, scores
        report: dict[str, Any] = {"model_file": path.name, "rounds_done": kept.about["rounds_done"]}
        for name, evaluation in scores.items():
            evaluation.write_csv(path.with_name(f"{path.stem}_{name}_cases.csv"))
            report[name] = evaluation.summary()
        test = report["test"]
        self.log_info(
            fl_ctx,
            f"{site}: kept model {path}: test Dice personalized {test['personalized']['dice']['mean']:.3f}, "
            f"global {test['global']['dice']['mean']:.3f} over {test['cases']} cases",
        )
        return DXO(DataKind.METRICS, finite_or_none(report)).to_shareable()

    def _stream(self, metrics: dict[str, float], current_round: int) -> None:
        """Training curves to the server's TensorBoard through FLARE's analytics streaming."""
        if self._analytics is None:
            return
        for key, value in metrics.items():
            if key != "round" and isinstance(value, (int, float)) and math.isfinite(value):
                self._analytics.add_scalar(key, float(value), global_step=current_round)
