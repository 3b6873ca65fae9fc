"""Speed of the exported one-shot AdvRAD pipeline: PyTorch eager vs ONNX Runtime vs OpenVINO (seed 000, appendix D.5).

Every backend runs the same graph (pre-processor -> one-shot reconstruction -> Alg. 4 score -> post-processor) on the
same images and the same diffusion noise (graphs exported with ``noise="input"``), one image per call; the table
gives images/s, mean latency per image and the largest relative score difference to PyTorch. OpenVINO runs in f32
and with its CPU default (bf16 where the CPU has it). Weights are random (speed does not depend on them), so no
AUROC is reported here.

    python benchmarks/export_speed.py [--paper] [--images 8]
"""

import argparse
import time
from collections.abc import Callable
from tempfile import TemporaryDirectory

import numpy as np
import onnxruntime as ort
import openvino as ov
import torch
from rich.console import Console
from rich.table import Table

from anomalib_robust import AdvRAD
from anomalib_robust.deploy import export_adv_rad
from anomalib_robust.models.adv_rad.lightning_model import CPU_PRESET

PAPER = {"image_size": (256, 256)}


def timed(predict: Callable[[np.ndarray, np.ndarray], np.ndarray], images: np.ndarray, noise: np.ndarray) -> tuple:
    """Warm up once, then score the images one by one; returns (images/s, ms per image, scores)."""
    predict(images[:1], noise[:, :1])
    start = time.perf_counter()
    scores = [predict(images[i : i + 1], noise[:, i : i + 1]) for i in range(images.shape[0])]
    elapsed = time.perf_counter() - start
    return images.shape[0] / elapsed, 1000 * elapsed / images.shape[0], np.concatenate(scores)


def benchmark(name: str, config: dict, num_images: int, table: Table) -> None:
    torch.manual_seed(0)
    model = AdvRAD(**config).eval()
    model.model.set_normal_error_map(torch.zeros(1, 1, *model.model.image_size))
    size = model.model.image_size
    generator = torch.Generator().manual_seed(0)
    images = torch.rand(num_images, 3, *size, generator=generator)
    noise = torch.randn(1, num_images, 3, *size, generator=generator)

    def pytorch(batch: np.ndarray, eps: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return model(torch.from_numpy(batch), torch.from_numpy(eps)).pred_score.numpy()

    with TemporaryDirectory() as directory:
        onnx_path = export_adv_rad(model, directory, export_type="onnx", input_size=size, noise="input")
        session = ort.InferenceSession(str(onnx_path))
        core = ov.Core()
        ov_model = ov.convert_model(onnx_path)
        backends = {"PyTorch eager": pytorch}
        backends["ONNX Runtime"] = lambda batch, eps: session.run(["pred_score"], {"input": batch, "noise": eps})[0]
        for config_ov in ({"INFERENCE_PRECISION_HINT": "f32"}, {}):
            compiled = core.compile_model(ov_model, "CPU", config_ov)
            precision = compiled.get_property("INFERENCE_PRECISION_HINT").get_type_name()
            label = f"OpenVINO {precision}" + ("" if config_ov else " (CPU default)")
            backends[label] = lambda batch, eps, compiled=compiled: compiled({"input": batch, "noise": eps})[
                "pred_score"
            ]
        reference = None
        for backend, predict in backends.items():
            speed, latency, scores = timed(predict, images.numpy(), noise.numpy())
            reference = scores if reference is None else reference
            difference = np.abs(scores - reference).max() / np.abs(reference).max()
            table.add_row(name, backend, f"{speed:.1f}", f"{latency:.1f}", f"{difference:.1e}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--paper", action="store_true", help="also the paper's 256 x 256 configuration (slow)")
    parser.add_argument("--images", type=int, default=8, help="images per backend")
    arguments = parser.parse_args()
    table = Table(title=f"Exported AdvRAD one-shot pipeline, {torch.get_num_threads()} thread(s), batch 1")
    for column in ("config", "backend", "images/s", "ms/image", "max rel. score diff vs PyTorch"):
        table.add_column(column)
    preset = {key: value for key, value in CPU_PRESET.items() if key != "learning_rate"}
    benchmark("CPU preset 32x32", preset, arguments.images, table)
    if arguments.paper:
        benchmark("paper 256x256", PAPER, arguments.images, table)
    Console().print(table)


if __name__ == "__main__":
    main()
