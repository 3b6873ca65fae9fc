"""The printed report shows the spread of every AUROC that was scored more than once, even when the repeats agree."""

from rich.console import Console

from anomalib_robust.evaluation.report import AttackResult, RobustReport


def _printed(eval_repeats: int) -> str:
    report = RobustReport(model="Toy", norm="Linf", eot_samples=1, num_samples=40, clean_image_auroc=0.745,
                          eval_repeats=eval_repeats)  # fmt: skip
    report.results.append(AttackResult(attack="PGD", norm="Linf", eps=2 / 255, steps=5, image_auroc=0.5125,
                                       image_auroc_std=0.031))  # fmt: skip
    console = Console(record=True, width=200)
    console.print(report.table())
    return console.export_text()


def test_repeats_that_agree_read_as_a_zero_spread_not_as_one_scoring() -> None:
    text = _printed(eval_repeats=4)
    assert "74.5 ± 0.0" in text
    assert "51.2 ± 3.1" in text


def test_one_scoring_has_no_spread_to_show() -> None:
    text = _printed(eval_repeats=1)
    assert "74.5" in text and "74.5 ±" not in text
    assert "51.2 ± 3.1" in text
