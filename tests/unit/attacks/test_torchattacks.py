"""Two-logit adapter, APGD-CE, Square and the AutoAttack-style ensemble through torchattacks."""

import pytest
import torch

from anomalib_robust.attacks import APGD, AutoAttack, DetectorScore, Square, TwoLogitScore, build_attack


def test_logits_are_centred_on_the_threshold() -> None:
    logits = TwoLogitScore(lambda x: x, threshold=1.0, scale=0.5)(torch.tensor([0.5, 1.0, 2.0]))
    assert logits.argmax(dim=1).tolist() == [0, 0, 1]
    assert torch.allclose(logits[:, 1], torch.tensor([-1.0, 0.0, 2.0]))


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
) -> None:
    images, labels = batch
    eps = 0.1 if norm == "Linf" else 1.0
    adversarial = attack_class(detector, eps=eps, norm=norm, **settings)(images, labels)
    delta = (adversarial - images).flatten(1)
    assert ((delta.abs().amax(dim=1) if norm == "Linf" else delta.norm(dim=1)) <= eps + 1e-5).all()
    assert adversarial.min() >= 0 and adversarial.max() <= 1
    scorer = DetectorScore(detector)
    with scorer.prepared():
        objective = scorer.objective(adversarial, labels) - scorer.objective(images, labels)
    assert (objective >= -1e-6).all()
    assert objective.sum() > 0


def test_autoattack_replaces_dlr_and_drops_square_for_random_detectors(stochastic_detector: torch.nn.Module) -> None:
    assert [attack.name for attack in AutoAttack(stochastic_detector).attacks] == ["APGD-CE", "PGD"]


def test_build_attack_by_name(detector: torch.nn.Module) -> None:
    assert isinstance(build_attack("Square", detector, steps=3, n_queries=7), Square)
    with pytest.raises(ValueError, match="Unknown attack 'fgsm'"):
        build_attack("fgsm", detector)
