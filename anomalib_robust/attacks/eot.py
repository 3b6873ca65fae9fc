"""Expectation over Transformation (EOT) for randomised detectors.

A randomised detector (AdvRAD, a diffusion purifier) draws fresh noise ``w`` at every call, so its score ``A(x; w)`` is
a random variable. EOT (Athalye et al., 2018; used against AdvRAD in the AdvRAD paper, sec. 5.6 and Table 10) attacks
the expected score: the gradient is the Monte Carlo mean of single-draw gradients,

    grad_x E_w[y * A(x; w)]  ~=  1/n * sum_k grad_x y * A(x; w_k).

EOT is the attacker's tool only: the evaluation scores each image as the detector is deployed, with fresh noise
(:meth:`~anomalib_robust.attacks.DetectorScore.predict`).

The draws run batched: ``function`` is called on ``k`` stacked copies of the batch at once (``k * B`` images), which
keeps the cores busy where one draw at batch ``B`` cannot, and the ``n`` draws are split into chunks of at most
``max_batch`` images so that memory stays bounded. Samples do not interact in a detector, so each copy's value and
gradient are those of an independent draw; with a noise generator that fills a ``(k * B, ...)`` tensor in the same
order as ``k`` tensors of ``(B, ...)`` (torch's, for sizes that are multiples of 16), the estimate equals the one-draw-
at-a-time loop's to float tolerance. ``max_batch=None`` picks the chunk per device (:func:`auto_max_batch`, never
fewer than one copy of the batch): on a CPU from the image size (:data:`AUTO_BATCH_VALUES` input values per call, a
cache-sized constant), on a GPU from its free memory.

Example:
    >>> import torch
    >>> from anomalib_robust.attacks.eot import expected_value_and_gradient
    >>> value, grad = expected_value_and_gradient(lambda x: (x**2).sum(dim=1), torch.ones(2, 3), samples=4)
    >>> value, grad[0]
    (tensor([3., 3.]), tensor([2., 2., 2.]))
"""

from collections.abc import Callable

import torch

DEFAULT_EOT_SAMPLES = 8
"""Draws per EOT estimate when a randomised detector is attacked and no budget is given."""

AUTO_BATCH_VALUES = 2**19
"""Input values (images x channels x pixels) per batched EOT call on a CPU when ``max_batch`` is ``None``: 170 images
of 3 x 32 x 32, two of 3 x 256 x 256 (then one copy of the batch per call, as without batching)."""

CUDA_MEMORY_SHARE = 0.5
"""Share of a GPU's free memory that one batched EOT call may fill when ``max_batch`` is ``None``."""

CUDA_BYTES_PER_VALUE = 2**14
"""GPU memory one input value is allowed in a batched EOT call: a forward and backward of AdvRAD's one-shot score at
its defaults (the AdvRAD paper's 256 x 256 U-Net) keeps about 14 kB per input value for its backward (counted with
``torch.autograd.graph.saved_tensors_hooks``), which is 2.8 GB per image; anomalib's detectors keep less."""


def resolve_eot_samples(eot_samples: int | None, stochastic: bool) -> int:
    """Number of draws per score: 1 for a deterministic detector (its draws are all the same, so more would only
    repeat the same gradient), else ``eot_samples`` if given, else 8.

    Raises:
        ValueError: if ``eot_samples`` is neither ``None`` nor a positive integer.
    """
    given = eot_samples is not None
    if given and (isinstance(eot_samples, bool) or not isinstance(eot_samples, int) or eot_samples < 1):
        msg = f"eot_samples must be a positive integer (draws per EOT estimate), got {eot_samples!r}."
        raise ValueError(msg)
    if not stochastic:
        return 1
    return DEFAULT_EOT_SAMPLES if eot_samples is None else eot_samples


def check_max_batch(max_batch: int | None) -> int | None:
    """``max_batch`` if it is ``None`` or a positive integer.

    Raises:
        ValueError: otherwise, naming the argument.
    """
    if max_batch is not None and (isinstance(max_batch, bool) or not isinstance(max_batch, int) or max_batch < 1):
        msg = f"max_batch must be a positive integer (images per batched EOT call) or None, got {max_batch!r}."
        raise ValueError(msg)
    return max_batch


def auto_max_batch(values_per_image: int, device: torch.device) -> int:
    """Images per batched EOT call when ``max_batch`` is ``None``, for images of ``values_per_image`` input values.

    On a CUDA device as many as fit in :data:`CUDA_MEMORY_SHARE` of its free memory at :data:`CUDA_BYTES_PER_VALUE`
    bytes per input value, free meaning free on the device (``torch.cuda.mem_get_info``) or held unused by torch's
    caching allocator; elsewhere :data:`AUTO_BATCH_VALUES` input values.
    """
    values = max(values_per_image, 1)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        free += torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        return int(CUDA_MEMORY_SHARE * free) // (CUDA_BYTES_PER_VALUE * values)
    return AUTO_BATCH_VALUES // values


def draw_chunks(x: torch.Tensor, samples: int, max_batch: int | None = None) -> list[int]:
    """Copies of the batch ``x`` per call for ``samples`` draws: chunks of at most ``max_batch`` images, at least one.

    ``max_batch=None`` chooses the chunk for ``x``'s device (:func:`auto_max_batch`).
    """
    batch = max(x.shape[0], 1)
    limit = max_batch if max_batch is not None else auto_max_batch(x[:1].numel(), x.device)
    per_call = min(samples, max(1, limit // batch))
    return [min(per_call, samples - start) for start in range(0, samples, per_call)]


def tile(tensor: torch.Tensor, copies: int) -> torch.Tensor:
    """``copies`` copies of a batch stacked along the batch dimension: ``(copies * N, ...)``."""
    return tensor.repeat(copies, *([1] * (tensor.dim() - 1)))


def expected_value(
    function: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    samples: int,
    max_batch: int | None = None,
) -> torch.Tensor:
    """Monte Carlo mean of ``function(x)`` over ``samples`` draws of its randomness, without gradients.

    ``function`` is called on stacked copies of ``x`` (:func:`tile`) and returns one value per image.
    """
    total = torch.zeros(x.shape[0], device=x.device)
    with torch.no_grad():
        for copies in draw_chunks(x, samples, max_batch):
            total += function(tile(x, copies)).reshape(copies, x.shape[0]).sum(dim=0)
    return total / samples


def expected_value_and_gradient(
    function: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    samples: int,
    max_batch: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean per-sample value of ``function(x)`` and mean gradient of its sum w.r.t. ``x`` over ``samples`` draws.

    ``function`` maps a batch (stacked copies of ``x``, :func:`tile`) to one value per image; the gradient of the
    summed values gives each image's own gradient because images do not interact. Each chunk of draws is
    differentiated on its own graph (memory bounded by ``max_batch``), with ``torch.autograd.grad``, so no ``.grad``
    is accumulated on any parameter.
    """
    value_sum = torch.zeros(x.shape[0], device=x.device)
    grad_sum = torch.zeros_like(x)
    for copies in draw_chunks(x, samples, max_batch):
        x_draws = tile(x.detach(), copies).requires_grad_(True)
        values = function(x_draws)
        (grad,) = torch.autograd.grad(values.sum(), x_draws)
        value_sum += values.detach().reshape(copies, x.shape[0]).sum(dim=0)
        grad_sum += grad.reshape(copies, *x.shape).sum(dim=0)
    return value_sum / samples, grad_sum / samples
