"""The unified objective y * A(x) (AdvRAD paper, sec. 3) and label validation."""

import pytest
import torch

from anomalib_robust.attacks.objective import attack_objective, check_labels, map_objective, score_direction


def test_direction_is_plus_one_for_normal_and_minus_one_for_anomalous() -> None:
    assert score_direction(torch.tensor([0, 1, 1])).tolist() == [1.0, -1.0, -1.0]
    assert attack_objective(torch.tensor([2.0, 3.0]), torch.tensor([False, True])).tolist() == [2.0, -3.0]


@pytest.mark.parametrize(
    ("labels", "message"),
    [
        (None, "labels are required"),
        (torch.tensor([0, 1, 2]), "0 \\(normal\\) or 1"),
        (torch.tensor([0, 1]), "one label"),
    ],
)
def test_bad_labels_are_rejected(labels: torch.Tensor | None, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        check_labels(labels, 3)


def test_boolean_and_column_labels_are_accepted() -> None:
    assert check_labels(torch.tensor([[True], [False]]), 2).tolist() == [1, 0]


def test_map_objective_weighs_normal_and_anomalous_pixels_equally() -> None:
    maps = torch.zeros(2, 4, 4)
    maps[:, 0, 0] = 8.0  # one anomalous pixel, high, in the first image; a high normal pixel in the second
    masks = torch.zeros(2, 4, 4, dtype=torch.bool)
    masks[0, 0, 0] = True
    objective = map_objective(maps, masks)
    assert objective[0] == pytest.approx(0.0 - 8.0)  # the defect pixel counts as much as the 15 normal ones
    assert objective[1] == pytest.approx(8.0 / 16)  # no anomalous pixel: the mean of the map
