"""Training cost of AdvRAD: the hybrid-loss step (eq. 10) against the bare U-Net, and what bf16 autocast on the CPU,
``channels_last`` and ``torch.compile`` buy.

Every row trains its own copy of the CPU preset's U-Net (``AdvRAD.cpu_preset()``, the same initial weights) with Adam
at the preset's learning rate, on the same batch; the rows are timed interleaved, step by step, so that the load of a
shared machine affects them alike, and each reports the median step. The hybrid loss adds the forward process, the
posterior and the variational-bound term on top of the U-Net (target: an overhead below 15 % over the bare U-Net
forward + backward). The speed-ups compare each variant with the fp32 eager step AdvRAD uses today:

- ``bf16 autocast``: ``torch.autocast(<device>, dtype=torch.bfloat16)`` around the loss (Lightning's
  ``precision="bf16-mixed"``);
- ``channels_last``: the U-Net's weights in NHWC memory format (the convolutions then run in NHWC; the images stay
  NCHW, so that ``randn_like`` draws the same diffusion noise);
- ``torch.compile``: the U-Net compiled with inductor (``model.unet.compile()``, the state dict keeps its keys).

A variant is worth adopting at ``--adopt`` (1.3x) or more with the same loss curve: the variants that reach it (or
those named by ``--curve-variants``) are trained ``--curve-steps`` (300) steps from the same seed on the embedded
Fashion-MNIST images next to fp32 eager, with the same batches and the same diffusion steps and noise, and the table
gives the final loss (mean of the last 50 steps) and its relative difference (criterion: within 2 %). Beside
images/s, the roofline columns of :mod:`roofline` (the whole step's FLOPs, weight gradients included) and the peak
resident memory of the process.

    python benchmarks/adv_rad_training.py [--image-size 32] [--batch 16] [--steps 5] [--variants ...]
"""

import argparse
import resource
import statistics
import time
from collections.abc import Callable

import torch
from rich.console import Console
from rich.table import Table
from roofline import COLUMNS, Roofline, count_flops

from anomalib_robust import AdvRAD
from anomalib_robust.data import FashionMNIST
from anomalib_robust.models.adv_rad.torch_model import AdvRADModel

VARIANTS = ("fp32 eager", "bf16 autocast", "channels_last", "torch.compile")
"""Ways to run the same training step; ``fp32 eager`` is AdvRAD's today."""

BARE = "bare U-Net forward+backward"
FINAL_WINDOW = 50
"""Steps averaged into the final loss (one step's loss depends on its random diffusion step)."""


def build(
    variant: str,
    image_size: int,
    factory: Callable[..., AdvRAD] = AdvRAD.cpu_preset,
    device: torch.device | str = "cpu",
    compile_backend: str = "inductor",
) -> tuple[AdvRADModel, torch.optim.Optimizer]:
    """The torch model of ``factory`` (the CPU preset; ``AdvRAD`` for the paper's defaults) on ``device``, from the same
    seed for every variant, and its Adam, prepared for ``variant`` (``torch.compile`` with ``compile_backend``)."""
    torch.manual_seed(0)
    lightning = factory(image_size=(image_size, image_size), evaluator=False, visualizer=False)
    model = lightning.model.to(device).train()
    if variant == "channels_last":
        model.to(memory_format=torch.channels_last)
    if variant == "torch.compile":
        model.unet.compile(backend=compile_backend)
    return model, torch.optim.Adam(model.parameters(), lr=lightning.learning_rate)


def training_step(variant: str, model: AdvRADModel, optimizer: torch.optim.Optimizer, images: torch.Tensor) -> float:
    """One optimiser step of the hybrid loss (what ``AdvRAD.training_step`` runs); returns the loss (which waits for
    the step on a GPU)."""
    optimizer.zero_grad()
    with torch.autocast(images.device.type, dtype=torch.bfloat16, enabled=variant == "bf16 autocast"):
        loss = model(images)["loss"]
    loss.backward()
    optimizer.step()
    return loss.item()


def bare_unet_step(model: AdvRADModel, optimizer: torch.optim.Optimizer, images: torch.Tensor) -> float:
    """The U-Net alone, forward + backward + Adam, at fixed random steps: the floor of any training step."""
    optimizer.zero_grad()
    timesteps = torch.randint(0, model.schedule.num_timesteps, (images.shape[0],), device=images.device)
    loss = model.denoise(images * 2 - 1, timesteps).square().mean()
    loss.backward()
    optimizer.step()
    return loss.item()


def median_step_seconds(steps: dict[str, Callable[[], float]], rounds: int) -> dict[str, float]:
    """Median wall time of each step, the steps run in turn ``rounds`` times after one warm-up each."""
    for step in steps.values():
        step()
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(rounds):
        for name, step in steps.items():
            started = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - started)
    return {name: statistics.median(values) for name, values in times.items()}


def final_loss(variant: str, batches: list[torch.Tensor], steps: int, image_size: int) -> float:
    """Mean loss of the last :data:`FINAL_WINDOW` of ``steps`` training steps from the common seed."""
    model, optimizer = build(variant, image_size)
    torch.manual_seed(1)  # the same diffusion steps and noise for every variant
    losses = [training_step(variant, model, optimizer, batches[step % len(batches)]) for step in range(steps)]
    return statistics.fmean(losses[-FINAL_WINDOW:])


def training_batches(image_size: int, batch: int) -> list[torch.Tensor]:
    """Fixed batches of the embedded Fashion-MNIST training images (class ``trouser``), in a fixed order."""
    datamodule = FashionMNIST(category="trouser", root="embedded", image_size=image_size, num_train=200)
    datamodule.setup()
    images = torch.stack([datamodule.train_data[index].image for index in range(len(datamodule.train_data))])
    return list(images.split(batch))[: len(images) // batch]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=5, help="timed rounds (median step reported)")
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    parser.add_argument("--adopt", type=float, default=1.3, help="speed-up over fp32 eager worth adopting")
    parser.add_argument("--curve-steps", type=int, default=300)
    parser.add_argument("--curve-variants", nargs="*", choices=VARIANTS[1:], default=None,
                        help="variants to train --curve-steps steps (default: those reaching --adopt)")  # fmt: skip
    arguments = parser.parse_args()
    variants = ["fp32 eager", *(name for name in arguments.variants if name != "fp32 eager")]
    roofline = Roofline.measure()
    images = torch.rand(arguments.batch, 3, arguments.image_size, arguments.image_size)

    built = {name: build(name, arguments.image_size) for name in (*variants, BARE)}
    steps = {name: (lambda name=name: training_step(name, *built[name], images)) for name in variants}
    steps[BARE] = lambda: bare_unet_step(*built[BARE], images)
    seconds = median_step_seconds(steps, arguments.steps)
    reference_model = build("fp32 eager", arguments.image_size)[0]
    flops = count_flops(lambda: reference_model(images[:1])["loss"].backward())

    speed_ups = {name: seconds["fp32 eager"] / seconds[name] for name in variants}
    curve_variants = arguments.curve_variants
    if curve_variants is None:
        curve_variants = [name for name in variants[1:] if speed_ups[name] >= arguments.adopt]
    finals: dict[str, float] = {}
    if curve_variants:
        batches = training_batches(arguments.image_size, arguments.batch)
        for name in ("fp32 eager", *curve_variants):
            finals[name] = final_loss(name, batches, arguments.curve_steps, arguments.image_size)

    table = Table(
        title=f"AdvRAD training step, {arguments.image_size}x{arguments.image_size}, batch {arguments.batch}, "
        f"{torch.get_num_threads()} thread(s), median of {arguments.steps}"
    )
    columns = ("step", "s/step", "images/s", "x bare U-Net", "speed-up", *COLUMNS)
    for column in (*columns, f"final loss ({arguments.curve_steps} steps)", "vs fp32"):
        table.add_column(column, justify="right")
    for name, step_seconds in seconds.items():
        speed = arguments.batch / step_seconds
        label = "AdvRAD hybrid-loss step" if name == "fp32 eager" else name
        cells = [label, f"{step_seconds:.3f}", f"{speed:.1f}", f"{step_seconds / seconds[BARE]:.3f}"]
        cells.append(f"{speed_ups[name]:.2f}x" if name in speed_ups else "-")
        cells.extend(roofline.cells(flops, speed))
        if name in finals:
            difference = finals[name] / finals["fp32 eager"] - 1
            cells.extend((f"{finals[name]:.4f}", f"{100 * difference:+.2f}%"))
        else:
            cells.extend(("-", "-"))
        table.add_row(*cells)
    console = Console(width=180)
    console.print(table)
    console.print(roofline.caption())
    if not curve_variants:
        console.print(f"No variant reaches {arguments.adopt}x over fp32 eager: no loss curve to compare.")
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    parameters = sum(parameter.numel() for parameter in reference_model.parameters()) / 1e6
    console.print(f"parameters: {parameters:.2f} M, peak RSS: {peak_mib:.0f} MiB")


if __name__ == "__main__":
    main()
