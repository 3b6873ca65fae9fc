"""Robust AUROC of an existing anomalib pipeline from Python: add ``RobustEval`` to the Engine's callbacks.

Trains Padim (random-init ResNet-18, nothing downloaded) on the embedded Fashion-MNIST data, then tests it with
``RobustEval``: after anomalib's usual test metrics it prints standard vs robust AUROC under PGD and APGD (L_inf,
1/255 and 2/255; AdvRAD paper, sec. 3), with the gradient-masking sanity checks, and writes report.json, report.csv and
plots to ``<results>/Padim/FashionMNIST/trouser/latest/robust_eval/linf/``. The attacks can also be used on their own,
as at the end.

Example:
    $ python examples/robust_eval_python.py                     # a few minutes on a laptop CPU
    $ python examples/robust_eval_python.py --image-size 32 --num-train 16 --num-test 16 --steps 2
"""

import argparse

from anomalib.engine import Engine
from anomalib.models import Padim

from anomalib_robust.attacks import PGD
from anomalib_robust.callbacks import RobustEval
from anomalib_robust.data import FashionMNIST


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--num-train", type=int, default=100)
    parser.add_argument("--num-test", type=int, default=60)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--results", default="results/robust_eval_python")
    args = parser.parse_args(argv)

    datamodule = FashionMNIST(
        category="trouser", image_size=args.image_size, num_train=args.num_train, num_test=args.num_test
    )
    model = Padim(
        backbone="resnet18",
        pre_trained=False,
        pre_processor=Padim.configure_pre_processor((args.image_size, args.image_size)),
    )
    Engine(default_root_dir=args.results, logger=False).fit(model, datamodule=datamodule)

    robust_eval = RobustEval(attacks=["pgd", "apgd"], eps=[1 / 255, 2 / 255], steps=args.steps, n_queries=100)
    engine = Engine(default_root_dir=args.results, logger=False, callbacks=[robust_eval])
    (metrics,) = engine.test(model, datamodule=datamodule)
    print(
        f"standard image AUROC {metrics['image_AUROC']:.3f}, "
        f"robust (PGD 2/255) {metrics['robust/pgd_linf_eps0.007843/image_AUROC']:.3f}"
    )

    # The attacks on their own: adversarial images for one test batch, inside the eps-ball and [0, 1].
    batch = next(iter(datamodule.test_dataloader()))
    adversarial = PGD(model, eps=2 / 255, steps=args.steps)(batch.image, batch.gt_label)
    print(f"largest pixel change: {(adversarial - batch.image).abs().max() * 255:.2f}/255")


if __name__ == "__main__":
    main()
