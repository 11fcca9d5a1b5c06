import math

import torch

from pfedsam_nvflare.training.losses import SegmentationLoss, distillation_loss
from pfedsam_nvflare.training.metrics import SegmentationScores


def test_distillation_is_zero_for_agreement_and_positive_otherwise():
    teacher = torch.randn(2, 1, 8, 8)
    assert abs(float(distillation_loss(teacher, teacher, 2.0))) < 1e-6
    assert float(distillation_loss(torch.zeros_like(teacher), teacher, 2.0)) > 0.0


def test_distillation_pulls_the_student_towards_the_teacher():
    teacher = torch.randn(1, 1, 4, 4) * 3
    student = torch.zeros_like(teacher, requires_grad=True)
    distillation_loss(student, teacher, 1.0).backward()
    assert (torch.sign(-student.grad) == torch.sign(teacher)).all()


def test_segmentation_loss_prefers_the_right_mask():
    masks = torch.zeros(1, 2, 8, 8)
    masks[:, 0, 2:6, 2:6] = 1
    masks[:, 1, 3:5, 3:5] = 1  # overlapping labels, as cup in disc
    good, bad = (masks * 2 - 1) * 8, -(masks * 2 - 1) * 8
    loss = SegmentationLoss()
    assert loss(good, masks) < 0.05 < loss(bad, masks)


def test_scores_of_known_masks():
    target = torch.zeros(3, 1, 32, 32)
    prediction = torch.zeros(3, 1, 32, 32)
    target[0, 0, 5:15, 5:15] = 1
    prediction[0, 0, 6:16, 5:15] = 1  # shifted by one row: Dice 0.9, HD95 1
    target[1, 0, 5:15, 5:15] = 1  # missed entirely: Dice 0, HD95 the diagonal
    prediction[2, 0, 1:4, 1:4] = 1  # no target: not counted
    scores = SegmentationScores()
    scores.update(prediction, target)
    result = scores.result()
    assert math.isclose(result["dice"], (0.9 + 0.0) / 2, abs_tol=1e-6)
    assert math.isclose(result["hd95"], (1.0 + math.hypot(32, 32)) / 2, abs_tol=1e-4)
