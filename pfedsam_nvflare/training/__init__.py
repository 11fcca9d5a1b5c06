"""Framework-free local training: one site's rounds, losses and metrics."""

from .methods import METHODS, Method
from .site_state import SiteStateError
from .trainer import LocalTrainer, NonFiniteTraining, RoundResult, TrainerConfig, TrainingAborted

__all__ = [
    "METHODS",
    "LocalTrainer",
    "Method",
    "NonFiniteTraining",
    "RoundResult",
    "SiteStateError",
    "TrainerConfig",
    "TrainingAborted",
]
