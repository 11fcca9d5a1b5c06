import math

import pytest
import torch

from pfedsam_nvflare.training.losses import SegmentationLoss, distillation_loss
from pfedsam_nvflare.training.metrics import SegmentationScores, case_scores


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


def test_case_scores_are_per_label_over_the_whole_case_in_the_files_units():
    truth = torch.zeros(2, 10, 10, 4)
    truth[0, 2:6, 2:6, 1:3] = 1  # label 1 in two of four slices; label 2 absent from the case
    prediction = truth.clone()
    prediction[0, 2:6, 2:6, 3] = 1  # a false positive on a slice without the structure counts
    dice, hd95 = case_scores(prediction, truth, spacing=(0.5, 0.5, 3.0))
    assert dice[0] == pytest.approx(2 * 32 / (48 + 32)) and dice[1] == 1.0  # absent and not predicted: perfect
    assert hd95[0] == pytest.approx(3.0) and hd95[1] == 0.0  # one slice too far: 3 mm along the slice axis
    missed = torch.zeros_like(truth)
    dice, hd95 = case_scores(missed, truth, spacing=(0.5, 0.5, 3.0))
    assert dice[0] == 0.0 and hd95[0] == pytest.approx(math.hypot(5, 5, 12))  # the case's diagonal in mm
    spurious = truth.clone()
    spurious[1, 0, 0, 0] = 1  # label 2 predicted where the case has none
    assert case_scores(spurious, truth, spacing=(1, 1, 1))[0][1] == 0.0


def test_a_single_slice_volume_is_scored_on_its_contours_not_its_area():
    truth = torch.zeros(1, 40, 40, 1)
    truth[0, 10:30, 10:30] = 1
    prediction = torch.zeros_like(truth)
    prediction[0, 10:30, 14:34] = 1  # shifted by 4 pixels of 0.5 mm
    flat = case_scores(prediction[..., 0], truth[..., 0], spacing=(0.5, 0.5))
    assert case_scores(prediction, truth, spacing=(0.5, 0.5, 5.0)) == flat
    assert flat[1][0] == pytest.approx(2.0)  # 4 pixels of 0.5 mm
