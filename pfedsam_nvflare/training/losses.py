"""Segmentation and distillation losses on logits of shape (B, K, H, W), one sigmoid per label."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from monai.losses import DiceLoss
from torch import nn


class SegmentationLoss(nn.Module):
    """Dice + binary cross-entropy, per label: labels may overlap (an optic cup lies inside the disc), so
    MONAI's softmax ``DiceCELoss`` does not fit multi-label masks; its ``DiceLoss`` with sigmoids does."""

    def __init__(self) -> None:
        super().__init__()
        self.dice = DiceLoss(sigmoid=True)

    def forward(self, logits: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        return self.dice(logits, masks) + F.binary_cross_entropy_with_logits(logits, masks)


def distillation_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """Pixel-wise KL divergence between the teacher's and the student's temperature-softened sigmoid outputs.

    Scaled by T² so that its gradient keeps its size whatever the temperature; zero when they agree.
    """
    target = torch.sigmoid(teacher / temperature)
    kl = F.binary_cross_entropy_with_logits(student / temperature, target) - F.binary_cross_entropy_with_logits(
        teacher / temperature, target
    )
    return kl * temperature**2
