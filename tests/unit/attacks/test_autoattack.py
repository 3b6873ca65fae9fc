"""APGD, Square and the AutoAttack-style ensemble: constraints, direction, schedules, members and build_attack."""

import pytest
import torch

from anomalib_robust.attacks import APGD, PGD, AutoAttack, DetectorScore, Square, build_attack
from anomalib_robust.attacks.apgd import checkpoints
from anomalib_robust.attacks.square import p_selection, square_pattern, square_side


def _objective(detector: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    scorer = DetectorScore(detector)
    with scorer.prepared():
        return scorer.objective(images, labels)


@pytest.mark.parametrize(
    ("attack_class", "settings"),
    [(APGD, {"steps": 5}), (Square, {"n_queries": 30}), (AutoAttack, {"steps": 3, "n_queries": 10})],
)
@pytest.mark.parametrize("norm", ["Linf", "L2"])
def test_attacks_stay_in_ball_and_push_scores(
    detector: torch.nn.Module,
    batch: tuple,
    attack_class: type,
    settings: dict,
    norm: str,
    device: torch.device,
) -> None:
    detector = detector.to(device)
    images, labels = (tensor.to(device) for tensor in batch)
    eps = 0.1 if norm == "Linf" else 1.0
    adversarial = attack_class(detector, eps=eps, norm=norm, **settings)(images, labels)
    delta = (adversarial - images).flatten(1)
    assert ((delta.abs().amax(dim=1) if norm == "Linf" else delta.norm(dim=1)) <= eps + 1e-5).all()
    assert adversarial.min() >= 0 and adversarial.max() <= 1
    gain = _objective(detector, adversarial, labels) - _objective(detector, images, labels)
    assert (gain >= -1e-6).all()
    assert gain.sum() > 0


@pytest.mark.parametrize("norm", ["Linf", "L2"])
def test_square_never_returns_a_point_worse_than_the_clean_image(
    detector: torch.nn.Module,
    batch: tuple,
    norm: str,
) -> None:
    """With one query only the random start is tried; where it lowers the objective the clean image is returned."""
    images, labels = batch
    adversarial = Square(detector, eps=0.1 if norm == "Linf" else 1.0, norm=norm, n_queries=1, seed=1)(images, labels)
    gain = _objective(detector, adversarial, labels) - _objective(detector, images, labels)
    assert (gain >= 0).all()
    assert (adversarial == images).flatten(1).all(dim=1).any()


def test_apgd_checkpoints_follow_the_paper() -> None:
    """``p_0 = 0, p_1 = 0.22, p_{j+1} = p_j + max(p_j - p_{j-1} - 0.03, 0.06)``, ``w_j = ceil(p_j * N)``."""
    assert checkpoints(100) == [22, 41, 57, 70, 80, 87, 93, 99]
    assert checkpoints(1) == []
    assert checkpoints(5) == [2, 3, 4]


def test_square_schedule_and_patterns() -> None:
    assert p_selection(0.8, 0, 10000) == 0.8
    assert p_selection(0.8, 11, 10000) == 0.4
    assert p_selection(0.8, 50, 100) == pytest.approx(0.8 / 2**7)  # as query 5000 of 10 000: 4000 < 5000 <= 6000
    assert p_selection(0.8, 99, 100) == pytest.approx(0.8 / 2**9)
    assert square_side(0.8, 32, 32) == 29
    assert square_side(0.001, 32, 32) == 1
    assert square_side(0.001, 32, 32, minimum=2) == 2
    assert square_side(1.0, 8, 8) == 7
    pattern = square_pattern(6, transpose=False)
    assert pattern.norm() == pytest.approx(1.0)
    assert (pattern[:3] > 0).all() and (pattern[3:] < 0).all()
    assert pattern[1, 3] == pattern[:3].max()  # peak at the centre of the top half
    assert torch.equal(square_pattern(6, transpose=True), pattern.T)


def test_apgd_and_square_move_a_deterministic_detector_reproducibly(detector: torch.nn.Module, batch: tuple) -> None:
    images, labels = batch
    for attack in (APGD(detector, eps=4 / 255, steps=3, seed=2), Square(detector, eps=4 / 255, n_queries=8, seed=2)):
        assert torch.equal(attack(images, labels), attack(images, labels))


def test_autoattack_replaces_dlr_and_drops_square_for_random_detectors(
    detector: torch.nn.Module,
    stochastic_detector: torch.nn.Module,
) -> None:
    assert [attack.name for attack in AutoAttack(detector).attacks] == ["APGD", "PGD", "Square"]
    members = AutoAttack(stochastic_detector).attacks
    assert [attack.name for attack in members] == ["APGD", "PGD"]
    assert all(member.detector is members[0].detector for member in members)
    assert isinstance(members[1], PGD) and members[1].selection == "final"


def test_autoattack_keeps_the_worst_case_of_its_members(detector: torch.nn.Module, batch: tuple) -> None:
    images, labels = batch
    ensemble = AutoAttack(detector, eps=4 / 255, steps=3, n_queries=10)
    adversarial = ensemble(images, labels)
    objective = _objective(detector, adversarial, labels)
    for member in ensemble.attacks:
        member_objective = _objective(
            detector, type(member)(detector, **_member_settings(member))(images, labels), labels
        )
        assert (objective >= member_objective - 1e-6).all()


def _member_settings(member: object) -> dict:
    settings = {"eps": member.eps, "norm": member.norm, "seed": member.seed}
    return (
        {**settings, "n_queries": member.n_queries}
        if isinstance(member, Square)
        else {**settings, "steps": member.steps}
    )


def test_build_attack_by_name(detector: torch.nn.Module) -> None:
    assert isinstance(build_attack("Square", detector, steps=3, n_queries=7, threshold=0.5, scale=1.0), Square)
    apgd = build_attack("apgd", detector, steps=3, n_queries=7, threshold=0.5, scale=1.0)
    assert isinstance(apgd, APGD) and apgd.label == "APGD"
    with pytest.raises(ValueError, match="Unknown attack 'fgsm'"):
        build_attack("fgsm", detector)
