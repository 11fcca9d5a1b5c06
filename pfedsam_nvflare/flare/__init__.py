"""NVIDIA FLARE glue: executor, filter, aggregator, persistor, metrics writer and the recipe."""

from .aggregator import GlobalPartitionAggregator
from .executor import PFedSAMExecutor
from .filters import GlobalPartitionFilter
from .persistor import GlobalPartitionLocator, GlobalPartitionPersistor
from .recipe import PFedSAMRecipe

__all__ = [
    "GlobalPartitionAggregator",
    "GlobalPartitionFilter",
    "GlobalPartitionLocator",
    "GlobalPartitionPersistor",
    "PFedSAMExecutor",
    "PFedSAMRecipe",
]
