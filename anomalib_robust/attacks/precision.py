"""Reduced precision for the attack's gradients: bf16 autocast where the hardware computes bf16 natively.

An attack spends nearly all its time in the forward and backward passes that give its gradient; only the direction of
that gradient matters (the sign for L_inf, the normalised vector for L_2). Under ``torch.autocast`` with bfloat16 the
convolutions and matrix products of those passes run in bf16, which CPUs with AMX or AVX512-BF16 and CUDA GPUs compute
natively (measured on one AMX CPU, one thread: AdvRAD's U-Net forward + backward to the input 1.43x faster at 32 px and
1.84x at 64 px); elsewhere bf16 is emulated and slower than fp32. The reported scores never use it: the evaluator
scores as deployed, in fp32, and only :meth:`~anomalib_robust.attacks.DetectorScore.objective_and_gradient` runs under
autocast.

- ``"fp32"``: no autocast (the default until a paired comparison shows the bf16 attack at least as strong);
- ``"bf16"``: autocast to bfloat16 on any device (emulated where the hardware lacks it: for tests and comparisons);
- ``"auto"``: bf16 where :func:`native_bf16` finds it, fp32 elsewhere, detected at run time.

Example:
    >>> import torch
    >>> gradient_dtype("fp32", torch.device("cpu")) is None
    True
    >>> gradient_dtype("bf16", torch.device("cpu"))
    torch.bfloat16
"""

from collections.abc import Iterator
from contextlib import contextmanager

import torch

GRADIENT_PRECISIONS = ("fp32", "bf16", "auto")
"""Values of ``gradient_precision``."""


def check_gradient_precision(precision: str) -> str:
    """``precision`` if it is one of :data:`GRADIENT_PRECISIONS`.

    Raises:
        ValueError: naming ``gradient_precision`` otherwise.
    """
    if precision not in GRADIENT_PRECISIONS:
        msg = f"gradient_precision must be one of {GRADIENT_PRECISIONS}, got {precision!r}."
        raise ValueError(msg)
    return precision


def native_bf16(device: torch.device) -> bool:
    """Whether ``device`` computes bf16 natively: a CUDA GPU that supports it, or a CPU with AMX tiles or AVX512-BF16
    (read from the CPU at run time)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        return torch.cpu._is_amx_tile_supported() or torch.cpu._is_avx512_bf16_supported()  # noqa: SLF001
    return False


def gradient_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of the attack's gradient passes on ``device``, or ``None`` for fp32."""
    check_gradient_precision(precision)
    if precision == "bf16" or (precision == "auto" and native_bf16(device)):
        return torch.bfloat16
    return None


@contextmanager
def gradient_autocast(precision: str, device: torch.device) -> Iterator[None]:
    """Autocast for the attack's forward and backward passes on ``device`` as ``precision`` resolves there."""
    dtype = gradient_dtype(precision, device)
    if dtype is None:
        yield
        return
    with torch.autocast(device_type=device.type, dtype=dtype):
        yield
