"""The tiny-backbone pFedSAM job the end-to-end tests run: the recipe of jobs/pfedsam on small synthetic images."""

import json
from pathlib import Path

from nvflare.apis.job_def import JobMetaKey
from nvflare.recipe.utils import set_recipe_meta

from pfedsam_nvflare.data.config import DataConfig, SyntheticConfig
from pfedsam_nvflare.flare import PFedSAMRecipe
from pfedsam_nvflare.flare.privacy import GaussianPrivacy
from pfedsam_nvflare.model import ModelConfig
from pfedsam_nvflare.training import TrainerConfig

MODEL = ModelConfig(backbone="tiny")
ROUNDS = 2


def export_tiny_job(
    root: Path,
    min_clients: int = 3,
    probe: bool = False,
    privacy: dict | None = None,
    name: str = "pfedsam",
    rounds: int = ROUNDS,
    trainer: TrainerConfig = TrainerConfig(batch_size=4),
    scope: str | None = None,
) -> Path:
    """Write ``root/jobs/<name>``; with ``probe`` the server also records every contribution's keys, with
    ``privacy`` every site applies ``GaussianPrivacy(**privacy)`` as a job filter, with ``scope`` the job asks the
    sites for that privacy scope."""
    data = DataConfig(synthetic=SyntheticConfig(cases=4, size=48, depth=3))
    recipe = PFedSAMRecipe(
        name=name, min_clients=min_clients, num_rounds=rounds, model=MODEL, trainer=trainer, data=data
    )
    if privacy:
        recipe.add_weights_output_filter(GaussianPrivacy(**privacy))
    if scope:
        set_recipe_meta(recipe, JobMetaKey.SCOPE, scope)
    recipe.export(str(root / "jobs"))
    job = root / "jobs" / name
    if probe:
        server_config = job / "app" / "config" / "config_fed_server.json"
        config = json.loads(server_config.read_text())
        config["components"].append({"id": "contribution_probe", "path": "flare_probe.ContributionProbe", "args": {}})
        server_config.write_text(json.dumps(config, indent=2))
    return job
