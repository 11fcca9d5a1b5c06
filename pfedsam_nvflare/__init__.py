"""Personalized federated fine-tuning of the Segment Anything Model on NVIDIA FLARE (pFedSAM)."""

__version__ = "0.1.0"
