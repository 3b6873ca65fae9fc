"""Predict with an exported model: anomalib's inferencers over a folder of images, with anomalib's visualisations.

``anomalib predict`` loads Lightning checkpoints only; this runs a file written by ``anomalib export`` instead (any
model: the inferencer only needs the graph). ``.xml``/``.bin`` (OpenVINO IR) and ``.onnx`` go through
``OpenVINOInferencer`` (OpenVINO reads ONNX), ``.pt``/``.pth`` through ``TorchInferencer`` (which unpickles the whole
module and so needs ``TRUST_REMOTE_CODE=1``). Every image is written as anomalib's predict writes it, by
``ImageVisualizer`` (image, anomaly map and predicted mask) under ``<output_dir>/images``, and the scores and labels
go to ``<output_dir>/predictions.csv``.

Seeding: AdvRAD's exported graph draws its diffusion noise in the graph (AdvRAD paper, sec. 5.6, appendix D.5), so
scores vary from run to run like PyTorch's. ``seed`` makes a run reproducible: for OpenVINO it sets the seeds of every
``RandomUniform`` op of the graph (a seeded graph still draws fresh noise at each call, but the same sequence in
every process), for Torch it seeds the global generator during the run. Whoever knows the seed can precompute the
noise, which is what the randomness of the defence rules out: seed for tests and audits, not in deployment.

Example:
    >>> from anomalib_robust.deploy import predict_exported
    >>> predictions = predict_exported("exported/weights/openvino/model.xml", "images/", "results/exported")
    ... # doctest: +SKIP
    >>> predictions[0].score  # doctest: +SKIP
    0.31

From the command line (the plugin intercepts ``anomalib predict`` when ``--ckpt_path`` is an exported file):

    anomalib predict --model AdvRAD --ckpt_path results/AdvRAD/latest/weights/openvino/model.xml --data images/
"""

import csv
from dataclasses import dataclass
from pathlib import Path
from tempfile import TemporaryDirectory
from typing import TYPE_CHECKING

import torch
from anomalib.data.utils import get_image_filenames
from anomalib.deploy import OpenVINOInferencer, TorchInferencer
from anomalib.utils.path import generate_output_filename
from anomalib.visualization import ImageVisualizer
from rich.table import Table

if TYPE_CHECKING:
    import openvino as ov

OPENVINO_SUFFIXES = (".xml", ".bin", ".onnx")
TORCH_SUFFIXES = (".pt", ".pth")


@dataclass(frozen=True)
class ExportedPrediction:
    """The prediction for one image: its (post-processed) score, label and the visualisation written for it."""

    image_path: Path
    score: float
    label: bool | None
    visualization: Path | None


def check_exported_model(path: Path | str) -> Path:
    """Return ``path`` when it is an exported model file an inferencer can load; raise a clear error otherwise."""
    path = Path(path)
    if path.suffix not in OPENVINO_SUFFIXES + TORCH_SUFFIXES:
        msg = (
            f"{path} is not an exported model: expected {'/'.join(OPENVINO_SUFFIXES)} (OpenVINO) or "
            f"{'/'.join(TORCH_SUFFIXES)} (Torch) as written by `anomalib export`; a Lightning checkpoint (.ckpt) "
            f"runs with anomalib's own predict"
        )
        raise ValueError(msg)
    files = [path.with_suffix(".xml"), path.with_suffix(".bin")] if path.suffix in {".xml", ".bin"} else [path]
    missing = [str(file) for file in files if not file.is_file()]
    if missing:
        msg = f"exported model file not found: {', '.join(missing)}"
        raise FileNotFoundError(msg)
    return path


def seed_random_ops(model: "ov.Model", seed: int) -> int:
    """Give every ``RandomUniform`` op of an OpenVINO model a fixed seed; returns how many ops were seeded.

    OpenVINO draws from a random seed when both ``global_seed`` and ``op_seed`` are 0; with ``op_seed`` = 1, 2, ...
    (the op's rank) and ``global_seed`` = ``seed``, every compilation of the graph draws the same noise sequence.
    """
    if seed < 0:
        msg = f"seed must be a non-negative integer, got {seed}"
        raise ValueError(msg)
    random_ops = [op for op in model.get_ordered_ops() if op.get_type_name() == "RandomUniform"]
    for rank, op in enumerate(random_ops, start=1):
        op.set_attribute("global_seed", seed)
        op.set_attribute("op_seed", rank)
    return len(random_ops)


def load_inferencer(
    model_path: Path | str,
    device: str = "auto",
    seed: int | None = None,
) -> OpenVINOInferencer | TorchInferencer:
    """anomalib's inferencer for an exported model file, its in-graph noise seeded when ``seed`` is given.

    ``device`` is the inferencer's device in either spelling (``"auto"``, ``"cpu"``, ``"GPU"``, ...). A Torch export
    is seeded by :func:`predict_exported`, since its noise comes from torch's global generator.
    """
    model_path = check_exported_model(model_path)
    if model_path.suffix.lower() in TORCH_SUFFIXES:
        return TorchInferencer(path=model_path, device=device.lower())
    if seed is None:
        return OpenVINOInferencer(path=model_path, device=device.upper())
    import openvino as ov  # optional dependency: the ``openvino`` extra

    model = ov.Core().read_model(model_path.with_suffix(".xml") if model_path.suffix == ".bin" else model_path)
    seed_random_ops(model, seed)
    with TemporaryDirectory() as directory:
        seeded_path = Path(directory) / "model.xml"
        ov.save_model(model, seeded_path, compress_to_fp16=False)
        return OpenVINOInferencer(path=seeded_path, device=device.upper())


def predict_exported(
    model_path: Path | str,
    data: Path | str,
    output_dir: Path | str,
    device: str = "auto",
    seed: int | None = None,
) -> list[ExportedPrediction]:
    """Score every image of ``data`` with an exported model and write anomalib's visualisations and a CSV.

    Args:
        model_path (Path | str): ``.xml``/``.bin``/``.onnx`` (OpenVINO) or ``.pt``/``.pth`` (Torch) from
            ``anomalib export``.
        data (Path | str): An image or a folder of images (searched recursively, as anomalib's ``PredictDataset``).
        output_dir (Path | str): Gets ``images/`` (one visualisation per image) and ``predictions.csv``.
        device (str): Inferencer device. Defaults to ``"auto"``.
        seed (int | None): Seed of the in-graph noise for a reproducible run (see the module docstring);
            ``None`` draws fresh noise. Defaults to ``None``.

    Returns:
        list[ExportedPrediction]: One per image, in file-name order.
    """
    images = get_image_filenames(data)
    inferencer = load_inferencer(model_path, device, seed)
    output_dir = Path(output_dir)
    visualizer = ImageVisualizer()
    predictions = []
    # no_grad: TorchInferencer runs the module with autograd on, and anomalib's visualiser cannot copy such outputs
    with torch.no_grad(), torch.random.fork_rng(devices=[], enabled=seed is not None):
        if seed is not None:
            torch.manual_seed(seed)
        for image_path in images:
            batch = inferencer.predict(image_path)
            visualization = visualizer.visualize(batch)
            visualization_path = None
            if visualization is not None:
                visualization_path = generate_output_filename(image_path, output_dir / "images")
                visualization.save(visualization_path)
            label = None if batch.pred_label is None else bool(batch.pred_label.reshape(-1)[0])
            score = float(batch.pred_score.reshape(-1)[0])
            predictions.append(ExportedPrediction(image_path, score, label, visualization_path))
    _write_csv(predictions, output_dir / "predictions.csv")
    return predictions


def _write_csv(predictions: list[ExportedPrediction], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(["image_path", "pred_score", "pred_label", "visualization"])
        for prediction in predictions:
            writer.writerow([prediction.image_path, prediction.score, prediction.label, prediction.visualization or ""])


def predictions_table(predictions: list[ExportedPrediction], title: str = "", root: Path | str | None = None) -> Table:
    """A rich table of image path (relative to ``root`` when given), score and label."""
    table = Table(title=title)
    table.add_column("image", overflow="fold")
    table.add_column("score", justify="right")
    table.add_column("label", justify="right")
    root = None if root is None else Path(root).resolve()
    for prediction in predictions:
        path = prediction.image_path
        path = path.relative_to(root) if root is not None and path.is_relative_to(root) else path
        label = "-" if prediction.label is None else ("anomalous" if prediction.label else "normal")
        table.add_row(str(path), f"{prediction.score:.4f}", label)
    return table
