"""Train PatchGuard (CPU preset) on the embedded Fashion-MNIST data, test it under attack and save its anomaly maps.

    python examples/patch_guard_python.py                         # CPU preset with adversarial training, ~15-30 min
    python examples/patch_guard_python.py --max-steps 3 --num-train 16 --num-test 16 --attack-steps 2   # smoke run

Steps: ``Engine.fit`` of ``PatchGuard.cpu_preset()`` (pseudo anomalies + attention regulariser + PGD adversarial
training), ``Engine.test`` with the :class:`~anomalib_robust.callbacks.RobustEval` callback (standard vs robust image
and pixel AUROC under L_inf PGD on the raw score), then the anomaly maps of the test images: anomalib's visualizer
writes image/map overlays under ``<results>/PatchGuard/FashionMNIST/<category>/latest/images`` and this script saves
the raw maps (smoothed patch logits) to ``<results>/patch_guard_anomaly_maps.npz``.
"""

import argparse
from pathlib import Path

import numpy as np
import torch
from anomalib.engine import Engine

from anomalib_robust import PatchGuard, RobustEval
from anomalib_robust.data import FashionMNIST


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--category", default="trouser", help="Fashion-MNIST class trained on (name or 0-9)")
    parser.add_argument("--max-steps", type=int, default=600, help="training iterations (batch 16)")
    parser.add_argument("--num-train", type=int, default=200)
    parser.add_argument("--num-test", type=int, default=100)
    parser.add_argument("--adversarial-steps", type=int, default=3, help="PGD steps of adversarial training (0: off)")
    parser.add_argument("--eps", type=float, default=8 / 255, help="L_inf radius of training and evaluation attacks")
    parser.add_argument("--attack-steps", type=int, default=10, help="PGD steps of the evaluation attack")
    parser.add_argument("--results", type=Path, default=Path("results"))
    arguments = parser.parse_args(argv)

    torch.manual_seed(0)
    datamodule = FashionMNIST(
        category=arguments.category,
        image_size=32,
        num_train=arguments.num_train,
        num_test=arguments.num_test,
        train_batch_size=16,
    )
    adversarial = arguments.adversarial_steps > 0
    model = PatchGuard.cpu_preset(
        adversarial_training=adversarial,
        adversarial_eps=arguments.eps,
        **({"adversarial_steps": arguments.adversarial_steps} if adversarial else {}),
    )
    robust_eval = RobustEval(attacks=["pgd"], eps=arguments.eps, steps=arguments.attack_steps, plots=False)
    engine = Engine(max_steps=arguments.max_steps, default_root_dir=arguments.results, logger=False,
                    callbacks=[robust_eval])  # fmt: skip
    engine.fit(model, datamodule=datamodule)
    (metrics,) = engine.test(model, datamodule=datamodule)
    for name, value in sorted(metrics.items()):
        print(f"{name}: {value:.3f}")

    model.eval()
    maps, labels = [], []
    with torch.no_grad():
        for batch in datamodule.test_dataloader():
            maps.append(model.model(model.pre_processor.transform(batch.image)).anomaly_map[:, 0])
            labels.append(batch.gt_label)
    path = arguments.results / "patch_guard_anomaly_maps.npz"
    np.savez_compressed(path, anomaly_maps=torch.cat(maps).numpy(), labels=torch.cat(labels).numpy())
    print(f"anomaly maps: {path} and {min(arguments.results.glob('PatchGuard/**/images'))}")


if __name__ == "__main__":
    main()
