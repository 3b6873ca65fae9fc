"""Roofline columns shared by the speed benchmarks: FLOPs per image, achieved GFLOP/s and the share of the peak.

FLOPs are counted by :class:`torch.utils.flop_counter.FlopCounterMode`, which counts the matrix products (convolutions,
linear layers, attention) at 2 FLOPs per multiply-add, and not the elementwise and normalisation ops; those are
memory-bound and cheap in FLOPs but not in time, which is one reason a path stays below the peak. The peak is a large
matrix product timed in the same run, with the same threads, so that the share reads "how much of what this machine
delivers right now": on a shared machine the peak and the benchmark see the same load. bf16 is timed only where the
CPU has native bf16 arithmetic (the ``avx512_bf16`` or ``amx_bf16`` flags); elsewhere PyTorch emulates it and its
"peak" would say nothing about the hardware. On a GPU (``device="cuda"``) the products are timed with the device
synchronised (:func:`synchronize`), and bf16 wherever the GPU has it.

The benchmark scripts import this module as a sibling (``from roofline import ...``): ``python benchmarks/x.py`` puts
``benchmarks/`` on ``sys.path``, as for ``attack_overhead.py``'s ``from robust_auroc_table import build``.

Example:
    >>> from roofline import Roofline, unet_flops_per_image
    >>> roofline = Roofline.measure()
    >>> flops = unet_flops_per_image(model)  # AdvRADModel, one U-Net forward at its image size
    >>> table.add_row(..., f"{images_per_second:.1f}", *roofline.cells(flops, images_per_second))
"""

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table
from torch.utils.flop_counter import FlopCounterMode

from anomalib_robust import AdvRAD
from anomalib_robust.attacks import DetectorScore

COLUMNS = ("GFLOP/image", "GFLOP/s", "% fp32 peak")
"""Headers of :meth:`Roofline.cells`, to add beside a table's images/s column."""

BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")
"""CPU flags (``/proc/cpuinfo``) of native bf16 arithmetic."""


def count_flops(function: Callable[[], object]) -> int:
    """FLOPs of one call ``function()``; include ``.backward()`` in it to count the backward pass as well."""
    with FlopCounterMode(display=False) as counter:
        function()
    return counter.get_total_flops()


def unet_flops_per_image(model: torch.nn.Module, backward: bool = False) -> int:
    """FLOPs of one U-Net evaluation of an ``AdvRADModel`` on one image at its ``image_size`` (AdvRAD paper, eq. 10's
    eps/v network); with ``backward`` also the backward pass to the weights and the input, as in training or an attack.
    """
    images = torch.zeros(1, model.in_channels, *model.image_size, requires_grad=backward)
    timesteps = torch.zeros(1, dtype=torch.long)

    def evaluate() -> None:
        output = model.denoise(images, timesteps)
        if backward:
            output.sum().backward()

    if backward:
        return count_flops(evaluate)
    with torch.no_grad():
        return count_flops(evaluate)


def attack_flops_per_image(detector: DetectorScore, images: torch.Tensor, labels: torch.Tensor) -> float:
    """FLOPs per image of one draw of a detector's attack objective, forward and backward to the input (one PGD step
    with one EOT draw: AdvRAD paper, eq. 1); the weights are frozen as in an attack, so they get no gradient.

    The backward runs as ``.backward()`` on a leaf copy of ``images``: ``FlopCounterMode`` tracks modules with hooks
    that ``torch.autograd.grad`` (which the attacks use) does not support, and both compute the same products.
    """
    inputs = images.detach().clone().requires_grad_(True)
    with detector.prepared():
        return count_flops(lambda: detector.differentiable_objective(inputs, labels).sum().backward()) / len(images)


def cpu_flags() -> set[str]:
    """The CPU feature flags of ``/proc/cpuinfo`` (empty where the file does not exist)."""
    cpuinfo = Path("/proc/cpuinfo")
    if not cpuinfo.exists():
        return set()
    for line in cpuinfo.read_text().splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def has_native_bf16(device: torch.device | str = "cpu") -> bool:
    """Whether ``device`` has native bf16 arithmetic: a CPU with :data:`BF16_CPU_FLAGS`, a GPU that supports bf16."""
    if torch.device(device).type == "cuda":
        return torch.cuda.is_bf16_supported()
    return bool(cpu_flags() & set(BF16_CPU_FLAGS))


def synchronize(device: torch.device | str) -> None:
    """Wait for the work queued on a GPU (nothing to wait for on a CPU), so that wall-clock time measures it."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def matmul_gflops(
    dtype: torch.dtype = torch.float32, size: int = 2048, seconds: float = 1.0, device: torch.device | str = "cpu"
) -> float:
    """Best GFLOP/s of a ``size x size`` matrix product in ``dtype`` on ``device`` over about ``seconds`` of repeats."""
    if size < 1 or seconds <= 0:
        msg = f"size must be >= 1 and seconds > 0, got size={size}, seconds={seconds}"
        raise ValueError(msg)
    left = torch.randn(size, size, dtype=dtype, device=device)
    right = torch.randn(size, size, dtype=dtype, device=device)
    torch.mm(left, right)  # warm-up
    synchronize(device)
    best, deadline = float("inf"), time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        started = time.perf_counter()
        torch.mm(left, right)
        synchronize(device)
        best = min(best, time.perf_counter() - started)
    return 2 * size**3 / best / 1e9


def achieved_gflops(flops_per_image: float, images_per_second: float) -> float:
    """GFLOP/s delivered by a path that runs ``images_per_second`` at ``flops_per_image``."""
    return flops_per_image * images_per_second / 1e9


@dataclass(frozen=True)
class Roofline:
    """The machine's measured matmul peaks, in GFLOP/s, at ``threads`` threads (bf16 ``None`` without native bf16),
    on ``device``."""

    fp32: float
    bf16: float | None
    threads: int
    device: str = "cpu"

    @classmethod
    def measure(cls, size: int = 2048, seconds: float = 1.0, device: torch.device | str = "cpu") -> "Roofline":
        """Time the fp32 (and, where native, bf16) matrix product on ``device`` now, with the current
        ``torch.get_num_threads()``."""
        bf16 = matmul_gflops(torch.bfloat16, size, seconds, device) if has_native_bf16(device) else None
        fp32 = matmul_gflops(torch.float32, size, seconds, device)
        return cls(fp32=fp32, bf16=bf16, threads=torch.get_num_threads(), device=str(device))

    def share(self, gflops: float) -> float:
        """Fraction of the fp32 matmul peak that ``gflops`` reaches."""
        return gflops / self.fp32

    def cells(self, flops_per_image: float, images_per_second: float) -> tuple[str, str, str]:
        """The :data:`COLUMNS` cells of one table row: GFLOP per image, achieved GFLOP/s, % of the fp32 peak."""
        gflops = achieved_gflops(flops_per_image, images_per_second)
        return f"{flops_per_image / 1e9:.3f}", f"{gflops:.1f}", f"{100 * self.share(gflops):.1f}%"

    def caption(self) -> str:
        """One line naming the peaks, for under the table."""
        bf16 = f"bf16 {self.bf16:.1f} GFLOP/s" if self.bf16 is not None else "no native bf16 (emulated: not timed)"
        where = f"{self.threads} thread(s)" if self.device == "cpu" else self.device
        return f"matmul peak, {where}, measured in this run: fp32 {self.fp32:.1f} GFLOP/s, {bf16}"


def main() -> None:
    """Print this machine's matmul peaks and the FLOPs of AdvRAD's CPU-preset U-Net (forward, forward + backward)."""
    roofline = Roofline.measure()
    model = AdvRAD.cpu_preset(evaluator=False, visualizer=False).model
    table = Table(title=f"AdvRAD CPU-preset U-Net at {model.image_size[0]}x{model.image_size[1]}, one image")
    for column in ("pass", "GFLOP/image"):
        table.add_column(column, justify="right")
    table.add_row("forward", f"{unet_flops_per_image(model) / 1e9:.3f}")
    table.add_row("forward + backward", f"{unet_flops_per_image(model, backward=True) / 1e9:.3f}")
    console = Console(width=120)
    console.print(table)
    console.print(roofline.caption())


if __name__ == "__main__":
    main()
