"""The sanity checks tell a masked detector from a healthy one, on anomalib's own detectors.

Healthy Padim, Patchcore, Stfpm and Fastflow (random-init ResNet-18, 32 x 32 Fashion-MNIST, briefly fitted) raise no
alarm under the default evaluation; the same Padim behind each planted masking of
:mod:`anomalib_robust.evaluation.masking` is flagged by the check that exists for it.
"""

import copy
from pathlib import Path

import pytest
import torch
from anomalib.engine import Engine
from anomalib.models import Fastflow, Padim, Patchcore, Stfpm

from anomalib_robust.data import FashionMNIST
from anomalib_robust.evaluation import RobustEvaluator, RobustReport
from anomalib_robust.evaluation.masking import plant_masking
from anomalib_robust.offline import random_init_backbones

SIZE = 32
MODELS = {
    "Padim": lambda: Padim(backbone="resnet18", pre_trained=False,
                           pre_processor=Padim.configure_pre_processor((SIZE, SIZE))),
    "Patchcore": lambda: Patchcore(backbone="resnet18", pre_trained=False,
                                   pre_processor=Patchcore.configure_pre_processor((SIZE, SIZE))),
    "Stfpm": lambda: Stfpm(backbone="resnet18", pre_processor=Stfpm.configure_pre_processor((SIZE, SIZE))),
    "Fastflow": lambda: Fastflow(backbone="resnet18", pre_trained=False, flow_steps=4,
                                 pre_processor=Fastflow.configure_pre_processor((SIZE, SIZE))),
}  # fmt: skip
FINITE_DIFFERENCES = "autograd matches finite differences"
ATTACK_STEP = "the gradient predicts the change at the attack's step"
LARGE_EPS = "very large eps: the gradient beats random sign steps"
SQUARE = "black-box Square does not beat white-box attacks"


@pytest.fixture(scope="module")
def datamodule(tmp_path_factory: pytest.TempPathFactory) -> FashionMNIST:
    return FashionMNIST(category="t_shirt_top", root="embedded", image_size=SIZE, num_train=16, num_test=32,
                        train_batch_size=8, eval_batch_size=8, cache_dir=tmp_path_factory.mktemp("cache"))  # fmt: skip


@pytest.fixture(scope="module")
def fitted(datamodule: FashionMNIST, tmp_path_factory: pytest.TempPathFactory) -> dict[str, torch.nn.Module]:
    models = {}
    for name, build in MODELS.items():
        torch.manual_seed(0)
        with random_init_backbones():
            model = build()
        engine = Engine(default_root_dir=tmp_path_factory.mktemp(name), max_steps=2, logger=False,
                        enable_progress_bar=False, enable_model_summary=False)  # fmt: skip
        engine.fit(model, datamodule=datamodule)
        models[name] = model.eval()
    return models


def _evaluate(model: torch.nn.Module, datamodule: FashionMNIST) -> RobustReport:
    """The default evaluation but for PGD-5 and Square's 100 queries (on its 8 images), to keep the suite fast."""
    evaluator = RobustEvaluator(steps=5, n_queries=100, num_grid_images=0)
    report, _ = evaluator.evaluate(model, [datamodule.test_dataloader()])
    return report


def _verdicts(report: RobustReport) -> dict[str, bool | None]:
    return {check.name: check.passed for check in report.checks}


@pytest.mark.parametrize("name", list(MODELS))
def test_healthy_detectors_raise_no_alarm(name: str, fitted: dict, datamodule: FashionMNIST) -> None:
    report = _evaluate(fitted[name], datamodule)
    verdicts = _verdicts(report)
    failed = {check.name: check.detail for check in report.checks if check.passed is False}
    assert not failed, failed
    assert verdicts[FINITE_DIFFERENCES] is True and verdicts[ATTACK_STEP] is True and verdicts[LARGE_EPS] is True
    assert verdicts[SQUARE] is True  # concludes at the default budget
    worst_rows = [result for result in report.results if result.role == "worst_case"]
    assert not worst_rows  # one configured attack: no worst case over attacks


@pytest.mark.parametrize(
    ("masking", "flagged_by"),
    [
        ("quantised", (ATTACK_STEP, LARGE_EPS)),
        ("straight_through", (FINITE_DIFFERENCES,)),
        ("detached", (FINITE_DIFFERENCES, ATTACK_STEP)),
    ],
)
def test_planted_masking_is_flagged_by_its_check(
    masking: str, flagged_by: tuple[str, ...], fitted: dict, datamodule: FashionMNIST
) -> None:
    report = _evaluate(plant_masking(copy.deepcopy(fitted["Padim"]), masking), datamodule)
    verdicts = _verdicts(report)
    assert all(verdicts[name] is False for name in flagged_by), {c.name: c.detail for c in report.checks}
    assert report.gradient_masking_suspected


def test_the_worst_case_row_is_no_better_than_any_attack(fitted: dict, datamodule: FashionMNIST, tmp_path: Path) -> None:
    evaluator = RobustEvaluator(attacks=["pgd", "square"], steps=5, n_queries=30, sanity_checks=False,
                                num_grid_images=0)  # fmt: skip
    report, _ = evaluator.evaluate(fitted["Padim"], [datamodule.test_dataloader()])
    (worst,) = [result for result in report.results if result.role == "worst_case"]
    attacks = [result for result in report.results if result.role == "attack"]
    assert worst.image_auroc <= min(result.image_auroc for result in attacks)
    assert worst.image_auroc < max(result.image_auroc for result in attacks)  # the rows differ, the worst is lower
    scores = report.image_scores  # the worst case per image, for paired comparisons of defenses under it
    attacked = torch.stack([scores.attacked[result.key] for result in attacks])
    expected = torch.where(scores.labels.bool()[:, None], attacked.min(dim=0).values, attacked.max(dim=0).values)
    assert torch.equal(scores.attacked[worst.key], expected)
    report.write(tmp_path)
    assert "worst_case_linf" in (tmp_path / "report.json").read_text()
