"""The unified objective y * A(x) (AdvRAD paper, sec. 3) and label validation."""

import pytest
import torch

from anomalib_robust.attacks.objective import attack_objective, check_labels, score_direction


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
