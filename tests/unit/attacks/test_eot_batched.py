"""Batched EOT draws: the same estimate as one draw per call, on a randomised toy and on AdvRAD's one-shot pipeline."""

import pytest
import torch

from anomalib_robust import AdvRAD
from anomalib_robust.attacks import DetectorScore
from anomalib_robust.attacks.eot import (
    CUDA_BYTES_PER_VALUE,
    CUDA_MEMORY_SHARE,
    auto_max_batch,
    draw_chunks,
    expected_value_and_gradient,
)


def estimates(detector: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor, max_batch: int | None) -> tuple:
    """EOT objective, gradient and objective without gradients, from one global seed."""
    scorer = DetectorScore(detector, eot_samples=5, max_batch=max_batch)
    with scorer.prepared():
        torch.manual_seed(11)
        value, gradient = scorer.objective_and_gradient(images, labels)
        value_only = scorer.objective(images, labels)
    return value, gradient, value_only


def assert_same_estimates(looped: tuple, batched: tuple) -> None:
    for one_per_call, stacked in zip(looped, batched, strict=True):
        assert torch.allclose(one_per_call, stacked, rtol=1e-5, atol=1e-6)


def test_chunks_cover_every_draw_within_max_batch() -> None:
    images = torch.zeros(2, 3, 8, 8)
    assert draw_chunks(images, 5, max_batch=4) == [2, 2, 1]
    assert draw_chunks(images, 5, max_batch=1) == [1, 1, 1, 1, 1]  # never less than one copy of the batch
    assert draw_chunks(images, 5) == [5]  # 10 small images fit the automatic budget
    assert draw_chunks(torch.zeros(2, 3, 512, 512), 5) == [1, 1, 1, 1, 1]


def test_automatic_chunk_on_a_gpu_comes_from_its_free_memory(monkeypatch: pytest.MonkeyPatch) -> None:
    """On CUDA the images per call are those that fit in half the free memory at 16 kB per input value, not the CPU's
    cache-sized constant: 10 images of 3 x 256 x 256 (3 GiB each) with 60 GiB free on the device and 4 GiB held unused
    by torch's caching allocator, against 2 on a CPU."""
    values = 3 * 256 * 256
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (60 * 2**30, 80 * 2**30))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device: 10 * 2**30)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device: 6 * 2**30)
    assert auto_max_batch(values, torch.device("cuda", 0)) == 10
    assert auto_max_batch(values, torch.device("cpu")) == 2


@pytest.mark.cuda
def test_automatic_chunks_on_cuda_fit_in_the_free_memory() -> None:
    images = torch.zeros(4, 3, 256, 256, device="cuda")
    free = torch.cuda.mem_get_info(images.device)[0] + torch.cuda.memory_reserved() - torch.cuda.memory_allocated()
    chunks = draw_chunks(images, 20)
    assert sum(chunks) == 20
    assert chunks[0] == min(20, max(1, auto_max_batch(images[:1].numel(), images.device) // 4))
    assert chunks[0] == 1 or chunks[0] * images.numel() * CUDA_BYTES_PER_VALUE <= CUDA_MEMORY_SHARE * free


@pytest.mark.parametrize("max_batch", [0, -3, 2.5, True])
def test_bad_max_batch_is_refused_with_its_name(stochastic_detector: torch.nn.Module, max_batch: object) -> None:
    with pytest.raises(ValueError, match="max_batch must be a positive integer"):
        DetectorScore(stochastic_detector, max_batch=max_batch)


def test_batched_draws_equal_one_draw_per_call(stochastic_detector: torch.nn.Module, batch: tuple) -> None:
    images, labels = batch
    looped = estimates(stochastic_detector, images, labels, max_batch=images.shape[0])
    assert_same_estimates(looped, estimates(stochastic_detector, images, labels, max_batch=None))
    assert_same_estimates(looped, estimates(stochastic_detector, images, labels, max_batch=3 * images.shape[0]))
    assert (looped[0][labels == 1] < 0).all()  # y * A(x) keeps each image's own label when the batch is tiled


def test_batched_map_objective_equals_one_draw_per_call(stochastic_detector: torch.nn.Module, batch: tuple) -> None:
    images, labels = batch
    masks = torch.zeros(images.shape[0], *images.shape[-2:], dtype=torch.bool)
    masks[labels == 1, 2:6, 2:6] = True
    results = []
    for max_batch in (images.shape[0], None):
        scorer = DetectorScore(stochastic_detector, eot_samples=4, max_batch=max_batch)
        with scorer.prepared(), scorer.map_target(masks):
            torch.manual_seed(5)
            results.append(scorer.objective_and_gradient(images, labels))
    assert_same_estimates(*results)


def test_batched_draws_on_adv_rad_one_shot() -> None:
    """AdvRAD's one-shot scoring draws one noise tensor per call, so stacking the draws gives the same estimate."""
    torch.manual_seed(0)
    model = AdvRAD.cpu_preset(base_channels=32, channel_mult=(1, 1), attention_resolutions=(), layers_per_block=1)
    model.model.set_normal_error_map(torch.zeros_like(model.model.normal_error_map))
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    labels = torch.tensor([0, 1])
    looped = estimates(model, images, labels, max_batch=2)
    assert_same_estimates(looped, estimates(model, images, labels, max_batch=None))
    assert looped[1].abs().sum() > 0


def test_estimate_is_the_mean_over_chunks() -> None:
    """Uneven chunks (2 + 2 + 1 copies) are weighted per draw, not per chunk."""
    draws = iter(torch.arange(1.0, 6.0))

    def function(x: torch.Tensor) -> torch.Tensor:  # one scalar "noise" per copy of the batch
        copies = x.shape[0] // 2
        noise = torch.stack([next(draws) for _ in range(copies)]).repeat_interleave(2)
        return (x.flatten(1).sum(dim=1)) * noise

    value, gradient = expected_value_and_gradient(function, torch.ones(2, 3), samples=5, max_batch=4)
    assert torch.allclose(value, torch.full((2,), 3.0 * 3.0))  # mean noise 3, sum 3
    assert torch.allclose(gradient, torch.full((2, 3), 3.0))
