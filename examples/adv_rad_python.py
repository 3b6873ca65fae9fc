"""Train AdvRAD on the embedded Fashion-MNIST data with anomalib's Engine, test it and save its anomaly maps.

    python examples/adv_rad_python.py                      # CPU preset, a few minutes
    python examples/adv_rad_python.py --epochs 1           # a quick smoke run

The test images with their anomaly maps are written by anomalib's visualizer under
``<results>/AdvRAD/FashionMNIST/<category>/latest/images``.
"""

import argparse
from pathlib import Path

from anomalib.engine import Engine

from anomalib_robust import AdvRAD
from anomalib_robust.data import FashionMNIST


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--category", default="trouser", help="Fashion-MNIST class trained on (name or 0-9)")
    parser.add_argument("--protocol", default="defect", choices=["defect", "semantic"])
    parser.add_argument("--epochs", type=int, default=100, help="training epochs")
    parser.add_argument("--num-train", type=int, default=200)
    parser.add_argument("--num-test", type=int, default=100)
    parser.add_argument("--results", type=Path, default=Path("results"))
    arguments = parser.parse_args(argv)

    datamodule = FashionMNIST(
        category=arguments.category,
        protocol=arguments.protocol,
        image_size=32,
        num_train=arguments.num_train,
        num_test=arguments.num_test,
        train_batch_size=16,
    )
    model = AdvRAD.cpu_preset()
    engine = Engine(
        max_epochs=arguments.epochs,
        check_val_every_n_epoch=arguments.epochs,  # normal statistics and threshold once, after training
        default_root_dir=arguments.results,
        logger=False,
    )
    engine.fit(model, datamodule=datamodule)
    (metrics,) = engine.test(model, datamodule=datamodule)
    for name, value in sorted(metrics.items()):
        print(f"{name}: {value:.3f}")
    print(f"anomaly maps: {min(arguments.results.glob('AdvRAD/**/images'))}")


if __name__ == "__main__":
    main()
