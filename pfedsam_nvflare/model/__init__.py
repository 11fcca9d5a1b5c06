"""Framework-free model code: SAM backbones, adapters, the pFedSAM wrapper and its partition."""

from .backbones import Backbone, build_backbone
from .checkpoints import CheckpointError
from .partition import Partition, PartitionError
from .pfedsam import ModelConfig, PFedSAM, build_pfedsam

__all__ = [
    "Backbone",
    "CheckpointError",
    "ModelConfig",
    "PFedSAM",
    "Partition",
    "PartitionError",
    "build_backbone",
    "build_pfedsam",
]
