"""Certification throughput of smoothed AdvRAD, and certified AUC in the shape of the AdvRAD paper's Table 11.

Throughput: images certified per second (all ``n0 + n`` noisy scores of an image; CERTIFY itself is negligible) for
n = 100 and 1000 on the CPU preset, batched ``--batch`` noisy images per forward pass; weights are random, speed does
not depend on them. Table 11: for each Fashion-MNIST class of the ``defect`` protocol, AdvRAD is loaded from
``--ckpt CLASS=PATH`` or trained for ``--steps`` steps, then certified on ``--num-test`` test images. sigma and eps
are in the [0, 1] pixel scale; abstentions count as failures. Prints tables only.

    python benchmarks/certify_throughput.py --categories trouser bag --steps 300 --num-test 20 --n 100
"""

import argparse
import time
from pathlib import Path

import torch
from anomalib.engine import Engine
from rich.console import Console
from rich.table import Table

from anomalib_robust import AdvRAD
from anomalib_robust.attacks import DetectorScore
from anomalib_robust.callbacks import CertifyEval
from anomalib_robust.data import FashionMNIST
from anomalib_robust.evaluation.smoothing import certify, noisy_scores


def throughput(model: AdvRAD, n0: int, n: int, images: int, batch: int) -> float:
    """Certified images per second: ``n0 + n`` scores per image, then CERTIFY at every threshold."""
    detector = DetectorScore(model, eot_samples=1)
    clean = torch.rand(images, 3, 32, 32)
    with detector.prepared():
        noisy_scores(lambda x: detector.single_draw(x)[0], clean[:1], 0.125, 2, batch)  # warm-up
        start = time.perf_counter()
        selection, estimation = (
            noisy_scores(lambda x: detector.single_draw(x)[0], clean, 0.125, count, batch) for count in (n0, n)
        )
        certify(selection, estimation, sigma=0.125)
    return images / (time.perf_counter() - start)


def trained_model(category: str, checkpoints: dict[str, Path], steps: int, datamodule: FashionMNIST) -> AdvRAD:
    if category in checkpoints:
        return AdvRAD.load_from_checkpoint(checkpoints[category])
    model = AdvRAD.cpu_preset()
    Engine(max_steps=steps, logger=False, default_root_dir=Path("results") / "certify_benchmark").fit(
        model, datamodule=datamodule
    )
    return model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--categories", nargs="*", default=["trouser", "bag", "sneaker"])
    parser.add_argument("--ckpt", nargs="*", default=[], help="CLASS=PATH of trained AdvRAD checkpoints")
    parser.add_argument("--steps", type=int, default=300, help="training steps when no checkpoint is given")
    parser.add_argument("--num-test", type=int, default=20)
    parser.add_argument("--n0", type=int, default=20)
    parser.add_argument("--n", type=int, default=100)
    parser.add_argument("--batch", type=int, default=256, help="noisy images per forward pass")
    parser.add_argument("--throughput-images", type=int, default=2)
    arguments = parser.parse_args()
    torch.manual_seed(0)
    console = Console()

    speed = Table(title="Certification throughput, AdvRAD CPU preset (32x32), n0 = 100")
    for column in ("n", "batch", "images/s", "s/image"):
        speed.add_column(column, justify="right")
    model = AdvRAD.cpu_preset()
    for n in (100, 1000):
        rate = throughput(model, 100, n, arguments.throughput_images, arguments.batch)
        speed.add_row(str(n), str(arguments.batch), f"{rate:.3f}", f"{1 / rate:.1f}")
    console.print(speed)

    checkpoints = {pair.split("=", 1)[0]: Path(pair.split("=", 1)[1]) for pair in arguments.ckpt}
    for category in arguments.categories:
        datamodule = FashionMNIST(category=category, image_size=32, num_test=arguments.num_test, train_batch_size=16)
        datamodule.setup()
        model = trained_model(category, checkpoints, arguments.steps, datamodule)
        callback = CertifyEval(n0=arguments.n0, n=arguments.n, batch_size=arguments.batch)
        report = callback.evaluate(model, datamodule.test_dataloader())
        report.model = f"AdvRAD on Fashion-MNIST {category} (defect)"
        console.print(report.table())


if __name__ == "__main__":
    main()
