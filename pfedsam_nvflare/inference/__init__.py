"""Framework-free use of a kept model: segmenting whole cases in their own geometry, and scoring them."""

from .evaluate import Evaluation, evaluate_cases
from .segment import Segmenter

__all__ = ["Evaluation", "Segmenter", "evaluate_cases"]
