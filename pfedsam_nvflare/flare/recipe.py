"""``PFedSAMRecipe``: a pFedSAM job in the style of NVFlare's recipes, runnable with ``recipe.execute(SimEnv(...))``,
``PocEnv`` or ``ProdEnv``, or exported as a job folder with ``recipe.export(dir)``."""

from __future__ import annotations

from dataclasses import replace

from nvflare.apis.filter import Filter
from nvflare.app_common.app_constant import AppConstants
from nvflare.app_common.shareablegenerators.full_model_shareable_generator import FullModelShareableGenerator
from nvflare.app_common.widgets.convert_to_fed_event import ConvertToFedEvent
from nvflare.app_common.widgets.intime_model_selector import IntimeModelSelector
from nvflare.app_common.workflows.global_model_eval import GlobalModelEval
from nvflare.app_common.workflows.scatter_and_gather import ScatterAndGather
from nvflare.app_opt.tracking.tb.tb_receiver import TBAnalyticsReceiver
from nvflare.app_opt.tracking.tb.tb_writer import TBWriter
from nvflare.job_config.api import FedJob
from nvflare.recipe.spec import Recipe

from ..data.config import DataConfig
from ..model import ModelConfig
from ..training import TrainerConfig
from .aggregator import GlobalPartitionAggregator
from .executor import PFedSAMExecutor
from .filters import GlobalPartitionFilter
from .metrics_writer import RoundMetricsWriter
from .persistor import GlobalPartitionLocator, GlobalPartitionPersistor

# The methods a job can run: the trainer's method and, where the preset fixes it, the distillation direction.
RECIPE_METHODS = {
    "pfedsam": ("pfedsam", None),
    "pfedsam_kd": ("pfedsam", "local_to_global"),
    "pfedsam_nokd": ("pfedsam", "none"),
    "fedavg": ("fedavg", None),
    "local": ("local", None),
    "fedsam": ("fedsam", None),
    "ditto": ("ditto", None),
}
ANALYTICS_EVENT = "analytix_log_stats"
WEIGHTS_TASKS = (AppConstants.TASK_TRAIN, AppConstants.TASK_SUBMIT_MODEL)


def method_trainer(method: str, trainer: TrainerConfig | None = None) -> TrainerConfig:
    """``trainer`` as a job of ``method`` runs it: the trainer's method, and the distillation a preset fixes. A
    trainer that asks for another ``kd_direction`` than the preset's (the default ``none`` counts as not asking)
    is refused, not overridden."""
    trainer_method, kd_direction = RECIPE_METHODS[method]
    trainer = replace(trainer or TrainerConfig(), method=trainer_method)
    if kd_direction is None:
        return trainer
    if trainer.kd_direction not in (kd_direction, TrainerConfig.kd_direction):
        raise ValueError(
            f"method {method} always runs kd_direction={kd_direction!r}, the trainer asks for "
            f"{trainer.kd_direction!r}; set kd_direction with the method pfedsam"
        )
    return replace(trainer, kd_direction=kd_direction)


class PFedSAMRecipe(Recipe):
    """Personalized federated SAM fine-tuning: ``ScatterAndGather`` rounds of the global partition, the L-MoE
    kept at each site, then ``GlobalModelEval`` of the final and best global partitions at every site, where each
    site keeps that model with its own part and scores it on its test cases.

    Args:
        name: job name (defaults to the method).
        min_clients: sites needed to start a round.
        num_rounds: federated rounds.
        method: ``pfedsam``, ``pfedsam_kd`` (with local-to-global distillation), ``pfedsam_nokd`` (without
            distillation), ``fedavg`` (LoRA without experts), ``local`` (each site alone), ``fedsam`` (full
            fine-tuning) or ``ditto`` (a personal copy of the global partition per site, trained with a proximal
            term toward the received one). A trainer whose ``kd_direction`` is not its default and contradicts the
            preset of ``pfedsam_kd`` or ``pfedsam_nokd`` is refused.
        model: the ``ModelConfig`` (backbone, adapters, decoder mode, ...).
        trainer: the ``TrainerConfig`` (learning rates, epochs, distillation, ...); its ``method`` is set from
            ``method``.
        data: the ``DataConfig``; without a ``root`` every site uses the default synthetic sites.
        key_metric: metric of the received global model (reported by the sites) that selects the best one.
        initial_global: a global partition an earlier job of the same model and method saved on the server
            (``FL_global_model.pt``): the job continues that federation instead of starting from the pretrained model.
            Sites continue with their own local partitions where they keep them (``site_storage``).
        train_timeout: seconds a site may take for one round (0: no limit).
        wait_time_after_min_received: seconds a round still waits for the other sites once ``min_clients`` have
            answered (FLARE's ``ScatterAndGather`` argument and default); a round ends at once when every site has
            answered. With ``min_clients`` below the number of sites, a site slower than this is left out of the
            round (listed as ``missing`` in the metrics).
        validation_timeout: seconds the end-of-job evaluation (``GlobalModelEval``, FLARE's argument and default)
            waits for a site's answer. A site lost before it begins still counts as one of the job's sites there,
            so this bounds how long a lost site holds the end of the job.
    """

    def __init__(
        self,
        *,
        name: str | None = None,
        min_clients: int = 3,
        num_rounds: int = 3,
        method: str = "pfedsam",
        model: ModelConfig | None = None,
        trainer: TrainerConfig | None = None,
        data: DataConfig | None = None,
        key_metric: str = "global_dice",
        train_timeout: int = 0,
        wait_time_after_min_received: int = 10,
        validation_timeout: int = 6000,
        initial_global: str | None = None,
    ):
        if method not in RECIPE_METHODS:
            raise ValueError(f"unknown method {method!r}; choose one of {', '.join(RECIPE_METHODS)}")
        trainer = method_trainer(method, trainer)
        model_settings = (model or ModelConfig()).to_dict()
        self.method, self.model, self.trainer, self.data = method, model, trainer, data or DataConfig()

        job = FedJob(name=name or method, min_clients=min_clients)
        job.set_app_packages(["pfedsam_nvflare"])  # an installed package: sites import it, the job carries no code
        job.to_server(
            GlobalPartitionPersistor(model=model_settings, method=trainer.method, initial_global=initial_global),
            id="persistor",
        )
        job.to_server(FullModelShareableGenerator(), id="shareable_generator")
        job.to_server(GlobalPartitionAggregator(model=model_settings, method=trainer.method), id="aggregator")
        job.to_server(IntimeModelSelector(key_metric=key_metric), id="model_selector")
        job.to_server(GlobalPartitionLocator(persistor_id="persistor"), id="model_locator")
        job.to_server(RoundMetricsWriter(method=method), id="metrics_writer")
        job.to_server(TBAnalyticsReceiver(events=[f"fed.{ANALYTICS_EVENT}"]), id="tb_receiver")
        job.to_server(
            ScatterAndGather(
                min_clients=min_clients,
                num_rounds=num_rounds,
                wait_time_after_min_received=wait_time_after_min_received,
                aggregator_id="aggregator",
                persistor_id="persistor",
                shareable_generator_id="shareable_generator",
                train_task_name=AppConstants.TASK_TRAIN,
                train_timeout=train_timeout,
            ),
            id="scatter_and_gather",
        )
        job.to_server(GlobalModelEval(model_locator_id="model_locator", validation_timeout=validation_timeout), id="global_model_eval")

        executor = PFedSAMExecutor(model=model_settings, trainer=trainer.to_dict(), data=self.data.to_dict())
        job.to_clients(
            executor,
            id="executor",
            tasks=[AppConstants.TASK_TRAIN, AppConstants.TASK_VALIDATION, AppConstants.TASK_SUBMIT_MODEL],
        )
        job.to_clients(TBWriter(event_type=ANALYTICS_EVENT), id="analytic_sender")
        job.to_clients(ConvertToFedEvent(events_to_convert=[ANALYTICS_EVENT], fed_event_prefix="fed."), id="event_to_fed")
        super().__init__(job)
        self.add_weights_output_filter(GlobalPartitionFilter(model=model_settings, method=trainer.method))

    def add_weights_output_filter(self, result_filter: Filter) -> None:
        """Apply ``result_filter`` to every result of a site that carries weights (``train``, ``submit_model``),
        after the filters added before. FLARE matches filter tasks by name (``*`` is not a pattern there), so the
        filter is added to each task by name, one chain per task."""
        for task in WEIGHTS_TASKS:
            self.add_client_output_filter(result_filter, tasks=[task])
