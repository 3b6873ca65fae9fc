"""DiffPure in front of Padim: standard vs robust AUROC per purification level, next to TMA, AGDM and AdvRAD.

The AdvRAD paper (sec. 4.2, Table 7) shows why purification is not enough for anomaly detection: a diffusion model
trained on normal images also repairs the defects, so a level that removes the attack removes the anomaly too. This
script reproduces that sweep on the embedded Fashion-MNIST data:

1. trains the AdvRAD CPU preset on the normal training images (or loads ``--denoiser``): its U-Net is the purifier's
   diffusion model, and AdvRAD itself is the comparison;
2. fits Padim (random-init ResNet-18, nothing downloaded) on the same images at the same 32 x 32 size;
3. trains AGDM's guidance network (``AGDMGuidance.cpu_preset()``, ``--guidance-epochs``) on the same images;
4. evaluates ``RobustEval(defense=DiffPure(denoiser, level=p))`` for every ``--levels`` p, TMA, AGDM at every
   ``--agdm-depths`` t* (the AGDM paper, Alg. 1), and AdvRAD, under L_inf PGD with EOT, attacking through the
   purifier as measured strongest for each defense (its ``attack_gradients``: the 5-call surrogate chain for DiffPure
   and TMA, full gradients and BPDA, worst case per image, for AGDM);
5. prints one table; each run's report.json and plots are under ``<results>/robust_eval/<defense>/linf/`` (and
   ``<results>/{Padim,AdvRAD}/robust_eval/linf/`` for the undefended detectors).

Example:
    $ python examples/diffpure_sweep_padim.py                      # about an hour on a 2-core CPU
    $ python examples/diffpure_sweep_padim.py --levels 5 25 --steps 5 --eot-samples 4 --max-samples 20
"""

import argparse
from pathlib import Path

from anomalib.engine import Engine
from anomalib.models import Padim
from rich.console import Console
from rich.table import Table

from anomalib_robust import AdvRAD, RobustEval
from anomalib_robust.data import FashionMNIST
from anomalib_robust.defenses import AGDM, TMA, DiffPure
from anomalib_robust.models import AGDMGuidance

SIZE = 32
"""The AdvRAD CPU preset's image size; the purifier, AdvRAD and Padim all see 32 x 32 images."""


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--denoiser", type=Path, help="a trained AdvRAD checkpoint (default: train the CPU preset)")
    parser.add_argument("--epochs", type=int, default=60, help="AdvRAD training epochs when no --denoiser is given")
    parser.add_argument("--levels", type=int, nargs="+", default=[5, 25, 50], help="DiffPure purification levels p")
    parser.add_argument("--tma-depth", type=int, default=140)
    parser.add_argument("--tma-stride", type=int, default=10)
    parser.add_argument("--agdm-depths", type=int, nargs="*", default=[70], help="AGDM t* (none: no AGDM)")
    parser.add_argument("--guidance-epochs", type=int, default=10, help="AGDM guidance network training epochs")
    parser.add_argument("--steps", type=int, default=5, help="PGD steps")
    parser.add_argument("--eot-samples", type=int, default=4)
    parser.add_argument("--max-samples", type=int, default=20, help="test images attacked (evenly spaced)")
    parser.add_argument("--num-train", type=int, default=200)
    parser.add_argument("--num-test", type=int, default=100)
    parser.add_argument("--results", type=Path, default=Path("results/diffpure_sweep"))
    args = parser.parse_args(argv)

    datamodule = FashionMNIST(category="trouser", image_size=SIZE, num_train=args.num_train, num_test=args.num_test)
    if args.denoiser is None:
        adv_rad = AdvRAD.cpu_preset()
        Engine(default_root_dir=args.results, logger=False, max_epochs=args.epochs).fit(adv_rad, datamodule=datamodule)
    else:
        adv_rad = AdvRAD.load_from_checkpoint(args.denoiser)
    padim = Padim(
        backbone="resnet18",
        pre_trained=False,
        layers=["layer1", "layer2"],
        pre_processor=Padim.configure_pre_processor((SIZE, SIZE)),
    )
    Engine(default_root_dir=args.results, logger=False).fit(padim, datamodule=datamodule)

    settings = {
        "eps": 2 / 255,
        "steps": args.steps,
        "eot_samples": args.eot_samples,
        "max_samples": args.max_samples,
        "sanity_checks": False,
    }
    defenses = [DiffPure(adv_rad, level=level) for level in args.levels]
    defenses.append(TMA(adv_rad, depth=args.tma_depth, stride=args.tma_stride))
    if args.agdm_depths:
        guidance = AGDMGuidance.cpu_preset()
        Engine(default_root_dir=args.results, logger=False, max_epochs=args.guidance_epochs).fit(
            guidance, datamodule=datamodule
        )
        defenses += [AGDM(adv_rad, guidance, depth=depth) for depth in args.agdm_depths]
    reports = [RobustEval(**settings).evaluate(padim, datamodule.test_dataloader(), args.results / "Padim")]
    reports += [
        RobustEval(defense=defense, **settings).evaluate(padim, datamodule.test_dataloader(), args.results)
        for defense in defenses
    ]
    reports.append(RobustEval(**settings).evaluate(adv_rad, datamodule.test_dataloader(), args.results / "AdvRAD"))

    table = Table(title=f"Image AUROC (%) under L_inf PGD 2/255, {args.steps} steps, EOT {args.eot_samples}")
    for column in ("System", "U-Net calls / image", "Standard", "Robust", "Attack"):
        table.add_column(column, justify="left" if column in ("System", "Attack") else "right")
    calls = ["-", *(str(defense.unet_evaluations) for defense in defenses), "1"]
    for report, unet_calls in zip(reports, calls, strict=True):
        attacks = [result for result in report.results if result.role == "attack"]
        worst = [result for result in report.results if result.role == "worst_case"]
        table.add_row(
            report.model,
            unet_calls,
            f"{100 * report.clean_image_auroc:.1f}",
            f"{100 * (worst or attacks)[0].image_auroc:.1f}",
            ", ".join(result.attack for result in attacks) + (" (worst case per image)" if worst else ""),
        )
    Console(width=160).print(table)


if __name__ == "__main__":
    main()
