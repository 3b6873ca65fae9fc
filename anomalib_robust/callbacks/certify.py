"""``CertifyEval``: certified AUC of a randomised-smoothing detector after anomalib's test metrics (AdvRAD paper, Table 11).

For every noise level ``sigma`` the callback draws ``n0 + n`` noisy copies of each raw [0, 1] test image (read from
the test dataset itself, before the pre-processor), scores them once with the detector's raw anomaly score, runs
Cohen et al.'s CERTIFY at every threshold (:mod:`anomalib_robust.evaluation.smoothing`) and reports the certified
AUC at every L_2 radius, in the shape of the AdvRAD paper's Table 11 (rows sigma, columns radius):

- a rich table (with the AUROC of the smoothed scores and the mean abstention rate per sigma);
- ``certify/sigma<s>/radius<r>/AUC`` logged to the Lightning loggers (and the dictionary ``Engine.test`` returns);
- ``report.json``, ``report.csv`` and ``certified_auc_vs_radius.png`` in ``<default_root_dir>/certify/``.

What is certified: the smoothed detector (majority vote of eq. (4) over Gaussian noise) at each threshold, with
confidence ``1 - alpha`` per image and threshold; abstentions count as failures. ``sigma`` and the radii are in the
[0, 1] pixel scale, L_2 over all ``C * H * W`` pixel values of the image the detector receives; noisy images are not
clipped. Runs in one process (rank 0 under DDP, on the whole test set).

Backends (``backend``, ``precision``): ``"torch"`` scores with the detector's own PyTorch forward pass (any anomalib
detector, f32). ``"openvino"`` exports AdvRAD's one-shot pipeline once per run and scores the noisy images with
OpenVINO on the CPU in f32, bf16 (CPUs with bf16 arithmetic only) or INT8 (the U-Net quantised, calibrated on the
training images of the datamodule), see :class:`~anomalib_robust.deploy.OpenVINOScore`. The estimator is the same:
the smoothing noise comes from the callback's generator, the diffusion noise from torch's global generator, drawn
as the PyTorch model draws it, so with the same seed both backends score the same noisy images with the same
diffusion noise (and test images of another size than the model's are resized by the same antialiased test
transform in both).

Example:
    >>> from anomalib.engine import Engine
    >>> from anomalib_robust import AdvRAD
    >>> from anomalib_robust.callbacks import CertifyEval
    >>> from anomalib_robust.data import FashionMNIST
    >>> engine = Engine(callbacks=[CertifyEval(n0=10, n=100)])  # doctest: +SKIP
    >>> engine.test(AdvRAD.cpu_preset(), datamodule=FashionMNIST(image_size=32), ckpt_path="advrad.ckpt")  # doctest: +SKIP

    From the command line:

    $ anomalib test --model AdvRAD --data anomalib_robust.data.FashionMNIST --ckpt_path advrad.ckpt \\
        --callbacks certify --callbacks.init_args.n 1000 --callbacks.init_args.backend openvino
"""

import csv
import io
import json
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from anomalib.data import AnomalibDataModule
from lightning.pytorch import Callback, LightningModule, Trainer
from matplotlib.figure import Figure
from rich.console import Console
from rich.table import Table
from torch.utils.data import DataLoader

from anomalib_robust.attacks import DetectorScore
from anomalib_robust.evaluation.metrics import rank_auroc
from anomalib_robust.evaluation.plots import save_figure
from anomalib_robust.evaluation.report import write_atomic
from anomalib_robust.evaluation.sharding import check_both_classes, cuda_devices, images_and_labels, rank_shards
from anomalib_robust.evaluation.smoothing import (
    certified_auc,
    certify,
    check_alpha,
    check_radius,
    check_samples,
    check_sigma,
    noisy_scores,
)

BACKENDS = ("torch", "openvino")


@dataclass
class SigmaResult:
    """Certification at one noise level: certified AUC per radius, AUROC of the smoothed scores, abstentions."""

    sigma: float
    smoothed_auroc: float
    abstain_rate: float
    """Fraction of (image, threshold) pairs on which the smoothed detector abstains."""
    certified_auc: dict[float, float] = field(default_factory=dict)


@dataclass
class CertifyReport:
    """Table 11 of the AdvRAD paper for one detector: certified AUC per sigma (rows) and radius (columns)."""

    model: str
    num_samples: int
    n0: int
    n: int
    alpha: float
    radii: list[float]
    backend: str = "torch"
    """``"torch"`` or ``"openvino <precision>"``."""
    results: list[SigmaResult] = field(default_factory=list)

    def table(self) -> Table:
        """Rich table in the shape of Table 11, with the smoothed AUROC and abstention rate per sigma."""
        table = Table(
            title=f"Certified AUC (%) of smoothed {self.model} at L_2 radius eps ({self.num_samples} test images, "
            f"n0={self.n0}, n={self.n}, confidence {1 - self.alpha:g}, {self.backend})",
            caption="sigma and eps in the [0, 1] pixel scale; abstentions count as failures.",
            caption_justify="left",
        )
        for column in ("Noise", *(f"eps={radius:g}" for radius in self.radii), "Smoothed AUROC", "Abstain"):
            table.add_column(column, justify="left" if column == "Noise" else "right")
        for result in self.results:
            table.add_row(
                f"sigma={result.sigma:g}",
                *(f"{100 * result.certified_auc[radius]:.1f}" for radius in self.radii),
                f"{100 * result.smoothed_auroc:.1f}",
                f"{100 * result.abstain_rate:.1f}%",
            )
        return table

    def write(self, directory: Path) -> tuple[Path, Path]:
        """Write ``report.json`` and ``report.csv`` (one row per sigma and radius) atomically; returns their paths."""
        directory.mkdir(parents=True, exist_ok=True)
        json_path, csv_path = directory / "report.json", directory / "report.csv"
        write_atomic(json_path, json.dumps(asdict(self), indent=2))
        rows = io.StringIO()
        writer = csv.writer(rows)
        writer.writerow(["model", "sigma", "radius", "certified_auc", "smoothed_auroc", "abstain_rate", "n0", "n"])
        for result in self.results:
            for radius in self.radii:
                writer.writerow(
                    [
                        self.model,
                        result.sigma,
                        radius,
                        result.certified_auc[radius],
                        result.smoothed_auroc,
                        result.abstain_rate,
                        self.n0,
                        self.n,
                    ]
                )
        write_atomic(csv_path, rows.getvalue())
        return json_path, csv_path


def plot_certified_auc(report: CertifyReport, path: Path) -> Path:
    """Certified AUC against the L_2 radius, one line per sigma."""
    figure = Figure(figsize=(5, 3.5))
    axes = figure.add_subplot()
    for result in report.results:
        axes.plot(
            report.radii, [result.certified_auc[r] for r in report.radii], marker="o", label=f"σ={result.sigma:g}"
        )
    axes.set(xlabel="L_2 radius eps ([0, 1] pixels)", ylabel="certified AUC", ylim=(-0.02, 1.02), title=report.model)
    axes.legend(loc="best", fontsize="small")
    return save_figure(figure, path)


class CertifyEval(Callback):
    """Certified AUC of the Gaussian-smoothed detector at several noise levels and radii (AdvRAD paper, sec. 5.7).

    Args:
        sigmas: noise standard deviations, [0, 1] pixel scale (Table 11: 0.0625, 0.125, 0.25).
        radii: L_2 radii at which the certified AUC is reported (Table 11: 0, 0.05, 0.1, 0.2).
        n0: selection draws per image (Cohen et al. use 100).
        n: estimation draws per image (Cohen et al. use 100 000; 1000 is a CPU-friendly default).
        alpha: the certificate holds with probability ``1 - alpha`` per image and threshold.
        batch_size: noisy images per forward pass.
        max_samples: certify only ``max_samples`` evenly spaced images of each test dataloader.
        plots: write the certified-AUC-vs-radius plot.
        output_dir: where to write; ``None`` for the trainer's ``default_root_dir``.
        seed: seeds the noise and the detector's randomness; the global RNG is restored afterwards.
        backend: ``"torch"`` (the detector's PyTorch forward) or ``"openvino"`` (AdvRAD's exported one-shot
            pipeline, see the module docstring).
        precision: ``"f32"``, or for ``backend="openvino"`` also ``"bf16"`` (CPUs with bf16 arithmetic) and
            ``"int8"`` (calibrated on the training images of the test run's datamodule).
    """

    def __init__(
        self,
        sigmas: Sequence[float] = (0.0625, 0.125, 0.25),
        radii: Sequence[float] = (0.0, 0.05, 0.1, 0.2),
        n0: int = 100,
        n: int = 1000,
        alpha: float = 0.001,
        batch_size: int = 256,
        max_samples: int | None = None,
        plots: bool = True,
        output_dir: str | Path | None = None,
        seed: int = 0,
        backend: str = "torch",
        precision: str = "f32",
    ) -> None:
        super().__init__()
        self.sigmas = [check_sigma(sigma) for sigma in sigmas]
        self.radii = sorted(check_radius(radius) for radius in radii)
        if not self.sigmas or not self.radii:
            msg = f"sigmas and radii must each hold at least one value, got sigmas={sigmas!r}, radii={radii!r}."
            raise ValueError(msg)
        self.n0, self.n = check_samples("n0", n0), check_samples("n", n)
        self.alpha = check_alpha(alpha)
        self.batch_size = check_samples("batch_size", batch_size)
        self.max_samples = None if max_samples is None else check_samples("max_samples", max_samples)
        self.plots = plots
        self.output_dir = output_dir
        self.seed = seed
        self.backend, self.precision = check_backend(backend, precision)
        self.report: CertifyReport | None = None
        """The last report."""

    def on_test_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Certify the test set on rank 0, log the certified AUCs, print and write the report."""
        if not trainer.is_global_zero:
            return
        loaders = trainer.test_dataloaders
        loaders = [loaders] if isinstance(loaders, DataLoader) else list(loaders or [])
        output_dir = Path(self.output_dir or trainer.default_root_dir)
        report = self.evaluate(pl_module, loaders, output_dir, datamodule=getattr(trainer, "datamodule", None))
        for result in report.results:
            for radius, value in result.certified_auc.items():
                pl_module.log(f"certify/sigma{result.sigma:g}/radius{radius:g}/AUC", value, rank_zero_only=True)

    def evaluate(
        self,
        model: LightningModule,
        dataloaders: DataLoader | Sequence[DataLoader],
        output_dir: str | Path | None = None,
        datamodule: AnomalibDataModule | None = None,
    ) -> CertifyReport:
        """Certify without a Trainer; prints and writes to ``<output_dir>/certify`` when ``output_dir`` is given.

        ``datamodule`` gives the calibration images of ``precision="int8"`` (the datamodule the model was trained on).
        """
        loaders = [dataloaders] if isinstance(dataloaders, DataLoader) else list(dataloaders)
        detector = DetectorScore(model, eot_samples=1)
        device = model.device
        with torch.inference_mode(False), detector.prepared(), torch.random.fork_rng(devices=cuda_devices(device)):
            images, labels = self._test_set(loaders, device)
            score = self._score_function(detector, datamodule)
            backend = self.backend if self.backend == "torch" else f"{self.backend} {self.precision}"
            report = CertifyReport(detector.name, len(labels), self.n0, self.n, self.alpha, self.radii, backend)
            for number, sigma in enumerate(self.sigmas):
                torch.manual_seed(self.seed + number)
                generator = torch.Generator(device=device).manual_seed(self.seed + number)
                draws = [
                    noisy_scores(score, images, sigma, count, self.batch_size, generator) for count in (self.n0, self.n)
                ]
                certification = certify(*draws, sigma=sigma, alpha=self.alpha)
                result = SigmaResult(
                    sigma=sigma,
                    smoothed_auroc=rank_auroc(certification.smoothed_score, labels),
                    abstain_rate=float(certification.abstain_rate.mean()),
                )
                result.certified_auc = {radius: certified_auc(certification, labels, radius) for radius in self.radii}
                report.results.append(result)
        self.report = report
        if output_dir is not None:
            directory = Path(output_dir) / "certify"
            Console().print(report.table())
            report.write(directory)
            if self.plots:
                plot_certified_auc(report, directory / "certified_auc_vs_radius.png")
        return report

    def _score_function(
        self, detector: DetectorScore, datamodule: AnomalibDataModule | None
    ) -> Callable[[torch.Tensor], torch.Tensor]:
        """Raw scores of noisy images from the chosen backend (one draw of the detector's own randomness each)."""
        if self.backend == "torch":
            return lambda images: detector.single_draw(images)[0]
        from anomalib_robust.deploy.openvino_score import OpenVINOScore  # lazily, see check_backend

        return OpenVINOScore(detector.detector, self.precision, datamodule, batch_size=self.batch_size)

    def _test_set(self, loaders: list[DataLoader], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """Raw [0, 1] images and labels of (``max_samples`` evenly spaced images of) every test loader."""
        images, labels = [], []
        for shard in rank_shards(loaders, max_samples=self.max_samples, caller="CertifyEval"):
            for _, batch in shard:
                batch_images, batch_labels = images_and_labels(batch, device, caller="CertifyEval")
                images.append(batch_images)
                labels.append(batch_labels.cpu())
        labels = torch.cat(labels)
        check_both_classes(labels, caller="CertifyEval")
        return torch.cat(images), labels


def check_backend(backend: str, precision: str) -> tuple[str, str]:
    """``(backend, precision)`` when the pair is known and runs here; a clear error naming the argument otherwise."""
    if backend not in BACKENDS:
        msg = f"backend must be one of {BACKENDS}, got {backend!r}"
        raise ValueError(msg)
    if backend == "openvino":
        # deploy is imported lazily: at module level it would enter every model import through the package
        # import chain (anomalib_robust -> callbacks), and the layering is deploy -> models, never back
        from anomalib_robust.deploy.openvino_score import check_openvino_installed, check_precision

        check_openvino_installed()
        return backend, check_precision(precision)
    if precision != "f32":
        from anomalib_robust.deploy.openvino_score import PRECISIONS  # lazily, as above

        msg = (
            f"backend='torch' runs the detector in f32, got precision={precision!r} (the precisions {PRECISIONS} "
            f"are those of backend='openvino')"
        )
        raise ValueError(msg)
    return backend, precision
