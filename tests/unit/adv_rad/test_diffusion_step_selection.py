"""Choosing AdvRAD's k and s on held-out training images: the rule, the held-out data, ``set_inference``, and the
whole choice on a model whose best k is known by construction."""

import logging
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from anomalib.data import ImageBatch, ImageItem
from torch import nn

from anomalib_robust import AdvRAD
from anomalib_robust.callbacks import SelectDiffusionStep
from anomalib_robust.callbacks.diffusion_step import choose_candidate, choose_diffusion_step
from anomalib_robust.data import FashionMNIST
from anomalib_robust.data.defects import MIN_AREA, as_uint8, object_region
from anomalib_robust.evaluation import RobustEvaluator
from anomalib_robust.evaluation.metrics import rank_auroc
from anomalib_robust.models.adv_rad.selection import (
    CUTPASTE_MIN_SIDE,
    HELD_OUT_PERLIN,
    TEXTURE_CONTRAST_SHARE,
    DiffusionStepCandidate,
    DiffusionStepChoice,
    HeldOutDefects,
    check_candidates,
    gray_uint8,
    held_out_split,
    paint_perlin,
    texture_contrast,
)


def _candidate(k: int, standard: float, robust: float, s: int = 5) -> DiffusionStepCandidate:
    return DiffusionStepCandidate(k, s, standard=standard, robust=robust)


def _chosen(candidates: list[DiffusionStepCandidate], margin: float) -> int:
    return choose_candidate(candidates, margin)[0].diffusion_step


def test_rule_takes_the_most_robust_candidate_within_the_margin() -> None:
    candidates = [_candidate(50, 0.83, 0.65), _candidate(100, 0.81, 0.70), _candidate(200, 0.64, 0.80)]
    assert _chosen(candidates, margin=0.03) == 100  # 200 is more robust, but too inaccurate
    assert _chosen(candidates, margin=0.0) == 50
    assert _chosen(candidates, margin=0.2) == 200


def test_rule_breaks_exact_ties_by_standard_auroc_then_smaller_k() -> None:
    assert _chosen([_candidate(50, 0.80, 0.7), _candidate(25, 0.82, 0.7)], 0.05) == 25
    assert _chosen([_candidate(50, 0.80, 0.7), _candidate(25, 0.80, 0.7)], 0.05) == 25
    assert _chosen([_candidate(25, 0.79, 0.7), _candidate(50, 0.80, 0.7)], 0.05) == 50


def _scored(k: int, scores: torch.Tensor, labels: torch.Tensor) -> DiffusionStepCandidate:
    """A candidate whose clean and robust scores are ``scores`` ``(N, R)``, its AUROCs their mean rank AUROC."""
    auroc = sum(float(rank_auroc(scores[:, r], labels)) for r in range(scores.shape[1])) / scores.shape[1]
    return DiffusionStepCandidate(k, 5, standard=auroc, robust=auroc, labels=labels.tolist(),
                                  standard_scores=scores.tolist(), robust_scores=scores.tolist())  # fmt: skip


def test_rule_reports_the_candidates_the_paired_comparison_cannot_separate_from_the_chosen_one() -> None:
    generator = torch.Generator().manual_seed(0)
    labels = torch.tensor([0, 1] * 30)
    signal = labels[:, None].double() + torch.randn(60, 2, generator=generator, dtype=torch.float64)
    nearly_the_same = signal + 0.05 * torch.randn(60, 2, generator=generator, dtype=torch.float64)
    much_worse = 0.3 * labels[:, None].double() + torch.randn(60, 2, generator=generator, dtype=torch.float64)
    best, twin = _scored(100, signal, labels), _scored(50, nearly_the_same, labels)
    worse = _scored(25, much_worse, labels)
    assert best.robust != twin.robust and worse.robust < best.robust - 0.1
    leader = max((best, twin), key=lambda c: c.robust)
    chosen, tied = choose_candidate([worse, twin, best], margin=1.0)
    assert chosen is leader and sorted(tied) == [1, 2]  # the twin is tied, the worse candidate is not
    chosen, tied = choose_candidate([worse, best], margin=1.0)
    assert chosen is best and tied == [1]
    without_scores = [_candidate(25, 0.8, 0.7), _candidate(50, 0.8, 0.7)]
    assert choose_candidate(without_scores, margin=1.0)[1] == [0]  # no per-image scores: tied with none


@pytest.mark.parametrize(
    ("steps", "sizes", "match"),
    [
        ((), (3,), "diffusion_steps must be a non-empty list"),
        ((50, 50), (3,), "must not repeat"),
        ((50,), (4,), "mean_filter_sizes must be odd"),
        ((50,), (0,), "mean_filter_sizes must be a non-empty list of positive integers"),
        ((True,), (3,), "diffusion_steps must be a non-empty list of positive integers"),
        ((50, 150), (3,), r"1 <= k <= T = 100"),
    ],
)
def test_bad_candidates_are_clear_errors(steps: tuple, sizes: tuple, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        check_candidates(steps, sizes, num_timesteps=100)


@pytest.mark.parametrize(
    ("arguments", "match"),
    [
        ({"margin": 1.5}, "margin must be an AUROC difference in"),
        ({"holdout": 1.0}, r"holdout must be a fraction in \(0, 1\)"),
        ({"eot_samples": 1}, "eot_samples must be an integer >= 2"),
        ({"diffusion_steps": [0]}, "diffusion_steps must be a non-empty list of positive integers"),
        ({"steps": 0}, "steps"),
        ({"norm": "L1"}, "norm"),
    ],
)
def test_bad_callback_arguments_are_clear_errors(arguments: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        SelectDiffusionStep(**arguments)


@pytest.fixture(scope="module")
def trouser_images() -> FashionMNIST:
    datamodule = FashionMNIST(category="trouser", protocol="semantic", root="embedded", image_size=32, num_train=10)
    datamodule.setup()
    return datamodule


def test_held_out_split_is_seeded_and_disjoint(trouser_images: FashionMNIST) -> None:
    training, held_out = held_out_split(trouser_images.train_data, 0.3, seed=0)
    assert (len(training), len(held_out)) == (7, 3)
    kept, out = set(training.samples.source_index), set(held_out.samples.source_index)
    assert not kept & out
    assert kept | out == set(trouser_images.train_data.samples.source_index)
    again = held_out_split(trouser_images.train_data, 0.3, seed=0)[1]
    assert list(again.samples.source_index) == list(held_out.samples.source_index)
    other = held_out_split(trouser_images.train_data, 0.3, seed=1)[1]
    assert list(other.samples.source_index) != list(held_out.samples.source_index)
    with pytest.raises(ValueError, match="needs at least 2"):
        held_out_split(trouser_images.train_data, 0.1, seed=0)


def test_held_out_defects_show_every_image_clean_and_with_each_kind_of_defect(trouser_images: FashionMNIST) -> None:
    source = trouser_images.train_data
    defects = HeldOutDefects(source, seed=0)
    assert len(defects) == 3 * len(source)
    for index in range(len(source)):
        original = source[index]
        clean, perlin, cutpaste = (defects[3 * index + offset] for offset in range(3))
        assert int(clean.gt_label) == 0 and not clean.gt_mask.any()
        torch.testing.assert_close(clean.image, original.image)
        for item in (perlin, cutpaste):
            assert int(item.gt_label) == 1 and item.image_path == original.image_path
            changed = (item.image - original.image).abs().amax(0) > 0
            assert changed.any() and not (changed & ~item.gt_mask).any()  # only the defect's pixels change
            assert (item.image - original.image).abs().mean(0)[item.gt_mask].mean() >= HELD_OUT_PERLIN["min_contrast"]
        assert MIN_AREA <= perlin.gt_mask.float().mean() <= HELD_OUT_PERLIN["max_area"]
        assert cutpaste.gt_mask.sum() >= CUTPASTE_MIN_SIDE**2 / 2
        torch.testing.assert_close(perlin.image[0], perlin.image[2])  # still gray
        on_garment = original.image.mean(0)[perlin.gt_mask] > 25 / 255
        assert on_garment.float().mean() > 0.9  # on the object (a faint defect may darken some of its pixels)
    other = HeldOutDefects(source, seed=1)
    assert not torch.equal(other[1].image, defects[1].image)
    with pytest.raises(ValueError, match="kinds must be a non-empty list"):
        HeldOutDefects(source, kinds=["scratch"])


def test_perlin_defect_keeps_the_colours_of_a_colour_texture() -> None:
    """On a colour texture (independent smooth noise per channel) the held-out Perlin defect keeps each pixel's colour:
    the spread of the channels inside the mask stays as it was (gray paint made it 0), and the defect changes the
    image by at least its minimum contrast and by at least half the texture's local contrast."""
    noise = torch.randn(1, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    texture = (0.5 + 0.15 * F.interpolate(noise, size=(32, 32), mode="bicubic", align_corners=False)[0]).clamp(0, 1)
    region = object_region(as_uint8(texture))
    assert region.all(), "a texture: defects anywhere"
    for seed in range(4):
        painted, mask = paint_perlin(texture, region, seed)
        spread_before, spread_after = texture.std(dim=0)[mask].mean(), painted.std(dim=0)[mask].mean()
        assert spread_before > 0.05 and spread_after > 0.9 * spread_before, (spread_before, spread_after)
        change = (painted - texture).abs().mean(0)[mask].mean()
        texture_floor = TEXTURE_CONTRAST_SHARE * texture_contrast(gray_uint8(texture).float() / 255, region)
        assert change >= max(HELD_OUT_PERLIN["min_contrast"], texture_floor) - 1 / 255
        assert torch.equal(painted[:, ~mask], texture[:, ~mask])


def test_choice_survives_a_plain_checkpoint_load(tmp_path) -> None:
    choice = DiffusionStepChoice(
        [_candidate(50, 0.8, 0.6), _candidate(100, 0.78, 0.7, s=3)], chosen=1, margin=0.03,
        attack="EOT-4 PGD-5 Linf 2/255", num_normal=20, num_defective=20, holdout=0.2, seed=0,
    )  # fmt: skip
    torch.save({"choice": choice.to_dict()}, tmp_path / "checkpoint.pt")
    loaded = DiffusionStepChoice.from_dict(torch.load(tmp_path / "checkpoint.pt", weights_only=True)["choice"])
    assert loaded == choice
    assert (loaded.diffusion_step, loaded.mean_filter_size) == (100, 3)
    assert "k = 100, mean filter 3" in loaded.summary()
    earlier = {key: value for key, value in choice.to_dict().items() if key != "assumption"}
    assert DiffusionStepChoice.from_dict(earlier) == choice, "checkpoints written before it made the same assumption"


def test_the_choice_states_that_it_assumes_local_defects(caplog: pytest.LogCaptureFixture) -> None:
    """Where the user sees the choice: the log line and the record (saved in checkpoints) name the assumption."""
    choice = DiffusionStepChoice([_candidate(50, 0.8, 0.6)], chosen=0, margin=0.03, attack="EOT-4 PGD-5 Linf 2/255",
                                 num_normal=20, num_defective=20)  # fmt: skip
    assert "assumes local defects" in choice.to_dict()["assumption"]
    trainer = SimpleNamespace(loggers=[], global_step=0, is_global_zero=False)
    with caplog.at_level(logging.INFO):
        SelectDiffusionStep._report(trainer, choice)
    assert "SelectDiffusionStep: k = 50, mean filter 5" in caplog.text
    assert "assumes local defects" in caplog.text and "prefer the paper's k = 100" in caplog.text


def _batches(images: torch.Tensor, batch_size: int = 4) -> list[ImageBatch]:
    items = [ImageItem(image=image, gt_label=torch.tensor(0), image_path=f"normal_{i}") for i, image in enumerate(images)]
    return [ImageBatch.collate(items[start : start + batch_size]) for start in range(0, len(items), batch_size)]


def test_set_inference_recomputes_the_normal_map_as_training_would(tiny_advrad: dict) -> None:
    images = _batches(torch.rand(6, 3, 32, 32))
    model = AdvRAD(**tiny_advrad)
    model.fit_normal_statistics(images)
    at_training_k = model.model.normal_error_map.clone()
    model.set_inference(diffusion_step=50, mean_filter_size=5, normal_images=images)

    trained_at_50 = AdvRAD(**{**tiny_advrad, "diffusion_step": 50, "mean_filter_size": 5})
    trained_at_50.model.unet.load_state_dict(model.model.unet.state_dict())
    trained_at_50.fit_normal_statistics(images)
    torch.testing.assert_close(model.model.normal_error_map, trained_at_50.model.normal_error_map)
    assert not torch.allclose(model.model.normal_error_map, at_training_k)
    assert (model.hparams.diffusion_step, model.hparams.mean_filter_size) == (50, 5)

    model.set_inference(num_noise_draws=3)  # the draws leave the map: no images needed
    assert model.model.num_noise_draws == 3
    torch.testing.assert_close(model.model.normal_error_map, trained_at_50.model.normal_error_map)


@pytest.mark.parametrize(
    ("arguments", "match"),
    [
        ({"diffusion_step": 101}, r"1 <= k <= T = 100"),
        ({"diffusion_step": 20, "mean_filter_size": 4}, "mean_filter_size must be a positive odd integer"),
        ({"num_noise_draws": 0}, "num_noise_draws must be an integer >= 1"),
        ({"diffusion_step": 20}, "pass normal_images"),
    ],
)
def test_set_inference_rejects_bad_input_and_changes_nothing(tiny_advrad: dict, arguments: dict, match: str) -> None:
    model = AdvRAD(**tiny_advrad)
    model.fit_normal_statistics(_batches(torch.rand(2, 3, 32, 32)))
    before = model.model.normal_error_map.clone()
    with pytest.raises(ValueError, match=match):
        model.set_inference(**arguments)
    assert (model.model.diffusion_step, model.model.mean_filter_size, model.model.num_noise_draws) == (10, 3, 1)
    torch.testing.assert_close(model.model.normal_error_map, before)


class TemplateOracle(nn.Module):
    """A denoiser whose best k is known: from step ``threshold`` on it predicts the noise that makes the one-shot
    reconstruction (Alg. 1) exactly ``template`` (the noise has drowned any defect: it is repaired); below, it
    predicts zero noise, so the reconstruction is the noisy input itself and its error is noise, blind to defects."""

    def __init__(self, alphas_cumprod: torch.Tensor, template: torch.Tensor, threshold: int) -> None:
        super().__init__()
        self.alphas_cumprod, self.template, self.threshold = alphas_cumprod, template * 2 - 1, threshold

    def forward(self, xt: torch.Tensor, t: torch.Tensor) -> SimpleNamespace:
        alpha_bar = self.alphas_cumprod[t].to(xt.dtype).reshape(-1, 1, 1, 1)
        repairing = (xt - alpha_bar.sqrt() * self.template) / (1 - alpha_bar).sqrt()
        eps = torch.where((t >= self.threshold).reshape(-1, 1, 1, 1), repairing, torch.zeros_like(xt))
        return SimpleNamespace(sample=torch.cat([eps, torch.zeros_like(eps)], dim=1))


def test_choice_picks_the_k_that_is_better_by_construction(tiny_advrad: dict) -> None:
    template = torch.full((3, 32, 32), 0.2)
    template[:, 8:24, 10:22] = 0.8
    model = AdvRAD(**tiny_advrad)
    model.model.unet = TemplateOracle(model.model.schedule.alphas_cumprod, template, threshold=50)
    held_out = HeldOutDefects([ImageItem(image=template.clone(), image_path=f"held_out_{i}") for i in range(16)])
    evaluator = RobustEvaluator(attacks=["pgd"], steps=2, eot_samples=2, eval_repeats=1, sanity_checks=False,
                                num_grid_images=0)  # fmt: skip
    choice = choose_diffusion_step(
        model, _batches(template.expand(4, -1, -1, -1)), held_out, evaluator, diffusion_steps=(5, 60),
        mean_filter_sizes=(3,), margin=0.03,
    )  # fmt: skip
    assert (choice.diffusion_step, choice.mean_filter_size) == (60, 3)
    assert model.model.diffusion_step == 60 and model.diffusion_step_choice is choice
    small, large = choice.candidates
    assert (large.standard, large.robust) == (1.0, 1.0)  # repaired defects stand out, even under attack
    assert small.standard < 0.85  # an error map of pure noise cannot rank the defects
    assert (choice.num_normal, choice.num_defective) == (16, 32)
