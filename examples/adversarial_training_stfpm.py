"""Adversarial training of Stfpm (Madry et al., 2018; AdvRAD paper, sec. 5.4), followed by robust evaluation.

Trains Stfpm twice on the embedded Fashion-MNIST data (``defect`` protocol), from the same random initialisation:
once normally and once with the ``AdversarialTraining`` callback, which replaces every normal training batch by
L_inf PGD examples that push Stfpm's raw anomaly score up (AdvRAD paper, sec. 3) before the training step. Both models
are then tested with ``RobustEval`` (PGD, L_inf 2/255), which prints standard vs robust image AUROC and writes
``report.json`` under ``<results>/<run>/robust_eval/linf/``; a last table puts the two side by side (AdvRAD paper,
Table 8 shape). Nothing is downloaded: the ResNet-18 teacher starts from random init (pass real weights when you
have them, as anomalib's Stfpm does by default).

The same from the command line:

    $ anomalib train --model Stfpm --data anomalib_robust.data.FashionMNIST --callbacks adversarial_training

Example:
    $ python examples/adversarial_training_stfpm.py                 # several minutes on a laptop CPU
    $ python examples/adversarial_training_stfpm.py --tiny          # seconds: a smoke test
"""

import argparse
from pathlib import Path

import torch
from anomalib.engine import Engine
from anomalib.models import Stfpm

from anomalib_robust.callbacks import RobustEval
from anomalib_robust.data import FashionMNIST
from anomalib_robust.defenses.training import AdversarialTraining
from anomalib_robust.offline import random_init_backbones


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--category", default="trouser")
    parser.add_argument(
        "--root", default=None, help="Fashion-MNIST idx files, 'embedded', or the Debian/embedded default"
    )
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--num-train", type=int, default=200)
    parser.add_argument("--num-test", type=int, default=100)
    parser.add_argument("--max-steps", type=int, default=200, help="training steps of each Stfpm")
    parser.add_argument("--train-steps", type=int, default=7, help="PGD steps of adversarial training")
    parser.add_argument("--eval-steps", type=int, default=10, help="PGD steps of the robust evaluation")
    parser.add_argument("--tiny", action="store_true", help="32 px, 16 images, 2 training steps: a smoke test")
    parser.add_argument("--results", default="results/adversarial_training_stfpm")
    args = parser.parse_args(argv)
    if args.tiny:
        args.image_size, args.num_train, args.num_test, args.max_steps = 32, 16, 16, 2
        args.train_steps, args.eval_steps = 2, 2

    datamodule = FashionMNIST(
        category=args.category,
        root=args.root,
        image_size=args.image_size,
        num_train=args.num_train,
        num_test=args.num_test,
        train_batch_size=8 if args.tiny else 32,
    )
    rows = []
    for run, callbacks in (
        ("standard", []),
        ("adversarial", [AdversarialTraining(eps=2 / 255, steps=args.train_steps)]),
    ):
        torch.manual_seed(0)  # the same initialisation for both runs
        with random_init_backbones():
            model = Stfpm(backbone="resnet18", pre_processor=Stfpm.configure_pre_processor((args.image_size,) * 2))
        root = Path(args.results) / run
        Engine(default_root_dir=root, max_steps=args.max_steps, logger=False, callbacks=callbacks).fit(
            model, datamodule=datamodule
        )
        robust_eval = RobustEval(attacks=["pgd"], eps=2 / 255, steps=args.eval_steps, sanity_checks=False, plots=False)
        report = robust_eval.evaluate(model, datamodule.test_dataloader(), output_dir=root)
        rows.append((run, report.clean_image_auroc, report.results[0].image_auroc))

    print(f"Stfpm on Fashion-MNIST '{args.category}' (defect protocol), PGD L_inf 2/255, {args.eval_steps} steps:")
    print(f"{'training':<14}{'standard AUROC':>16}{'robust AUROC':>14}")
    for run, standard, robust in rows:
        print(f"{run:<14}{100 * standard:>16.1f}{100 * robust:>14.1f}")


if __name__ == "__main__":
    main()
