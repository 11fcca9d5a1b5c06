"""The committed job folders and the demo share these settings: LiteMedSAM with adapters in its last two
attention blocks and LoRA on the decoder (measured in the README: the fastest of the settings tried to learn
prompt-free segmentation on 2 CPU cores, and 43x fewer values per round than the full decoder)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from nvflare.apis.job_def import JobMetaKey
from nvflare.recipe.utils import set_recipe_meta

from ..data.config import DataConfig, SyntheticConfig
from ..model import ModelConfig
from ..training import TrainerConfig
from ..training.dp import DPConfig
from .privacy import GaussianPrivacy
from .recipe import PFedSAMRecipe

JOB_METHODS = ("pfedsam", "fedavg", "local", "fedsam", "ditto")
DP_JOB = "pfedsam_dp"
DPSGD_JOB = "pfedsam_dpsgd"
DPSGD_SCOPE = "pfedsam_dpsgd"  # the privacy scope of poc/privacy.json that requires DP-SGD
JOB_MODEL = ModelConfig(backbone="lite_medsam", adapted_blocks=2, decoder="lora")
JOB_TRAINER = TrainerConfig(lr_global=3e-3, lr_local=3e-3, batch_size=2)
FULL_FINETUNE_LR = 3e-5  # fedsam trains every SAM weight; chosen on validation (BENCHMARK.md, the fedsam sweep)
JOB_DATA = DataConfig(synthetic=SyntheticConfig(sites=3, cases=6, size=128, depth=4))  # 4 train, 1 val, 1 test
JOB_ROUNDS = 3
# Client-level DP for the pfedsam_dp job: ε at δ=1e-5 is 9.01 after its three rounds, under the budget of 10.
JOB_PRIVACY = {"clip_norm": 0.01, "noise_multiplier": 1.0, "delta": 1e-5, "max_epsilon": 10.0}
# Record-level DP for the pfedsam_dpsgd job: DP-SGD in the global phase, the noise set so that its three rounds
# spend ε=8 at δ=1e-5; no distillation, as in every job (global_to_local lowered test Dice on l2, one seed).
JOB_DPSGD = DPConfig(target_epsilon=8.0, delta=1e-5, max_grad_norm=1.0, rounds=JOB_ROUNDS)


def dpsgd_recipe(method: str = "pfedsam", num_rounds: int = JOB_ROUNDS, **settings) -> PFedSAMRecipe:
    """The job of ``method`` with DP-SGD in the global phase (``<method>_dpsgd``), its budget covering
    ``num_rounds``."""
    dp = replace(JOB_DPSGD, rounds=num_rounds)
    trainer = replace(job_trainer(method), dp=dp)
    recipe = job_recipe(method, num_rounds=num_rounds, trainer=trainer, name=f"{method}_dpsgd", **settings)
    # a site whose privacy.json defines this scope (poc/privacy.json does) applies its policy to the job; a site
    # with a policy without it refuses the job
    set_recipe_meta(recipe, JobMetaKey.SCOPE, DPSGD_SCOPE)
    return recipe


def job_trainer(method: str) -> TrainerConfig:
    """The job's training settings for ``method``: ``fedsam`` trains every SAM weight, at its own learning rate."""
    return replace(JOB_TRAINER, lr_global=FULL_FINETUNE_LR) if method == "fedsam" else JOB_TRAINER


def job_recipe(
    method: str,
    *,
    num_rounds: int = JOB_ROUNDS,
    model: ModelConfig = JOB_MODEL,
    trainer: TrainerConfig | None = None,
    data: DataConfig = JOB_DATA,
    min_clients: int = 3,
    name: str | None = None,
    privacy: dict | None = None,
    initial_global: str | None = None,
) -> PFedSAMRecipe:
    """The job of ``method`` (with ``job_trainer(method)`` unless ``trainer`` is given); with ``privacy``
    (``GaussianPrivacy``'s arguments) it is ``<method>_dp``, whose sites clip and noise every update they send; with
    ``initial_global`` (a global partition file an earlier job saved) it continues that federation."""
    trainer = trainer or job_trainer(method)
    name = name or (f"{method}_dp" if privacy else method)
    recipe = PFedSAMRecipe(
        name=name, min_clients=min_clients, num_rounds=num_rounds, method=method, model=model, trainer=trainer,
        data=data, initial_global=initial_global,
    )
    if privacy:  # after the partition filter: what is clipped and noised is exactly what is sent
        recipe.add_weights_output_filter(GaussianPrivacy(**privacy))
    return recipe


def export_jobs(out: str | Path) -> list[Path]:
    """Write ``out/<method>`` for every job method, ``out/pfedsam_dp`` and ``out/pfedsam_dpsgd``; the repository's
    ``jobs/`` is exactly this."""
    out = Path(out)
    recipes = [job_recipe(method) for method in JOB_METHODS]
    recipes += [job_recipe("pfedsam", privacy=JOB_PRIVACY), dpsgd_recipe()]
    for recipe in recipes:
        recipe.export(str(out))
    return [out / name for name in (*JOB_METHODS, DP_JOB, DPSGD_JOB)]
