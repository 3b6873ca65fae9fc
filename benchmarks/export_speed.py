"""Speed and AUROC of the exported one-shot AdvRAD pipeline per backend (AdvRAD paper, Alg. 1 and 4, appendix D.5).

Backends: PyTorch eager, ONNX Runtime, OpenVINO f32, OpenVINO with its CPU default precision (bf16 where the CPU has
it), and OpenVINO INT8 (U-Net quantised by NNCF, :mod:`anomalib_robust.models.adv_rad.export`; the rest of the graph in f32
or in the CPU default). Every backend runs the same graph (pre-processor -> one-shot reconstruction -> Alg. 4 score;
no post-processor, so AUROC sees the raw scores) on the same images with the same diffusion noise (graphs exported
with ``noise="input"``), one image per call, with the same number of threads (``torch.get_num_threads()``; set
``OMP_NUM_THREADS``). The table gives images/s, mean latency per image, the speed-up over eager PyTorch, the largest
relative score difference to PyTorch, and the image AUROC.

- CPU preset (32 x 32): trained ``--steps`` iterations on the embedded Fashion-MNIST ``trouser`` images; the timed
  pass scores the whole defect-protocol test set, which gives the AUROC; INT8 calibrates on the training images.
- ``--paper`` (256 x 256, the paper's U-Net): random weights (training it takes days on a CPU), so speed only; the
  first ``--images`` test images, INT8 calibrated on 8 training images.

``--batches`` (e.g. ``--batches 1 8 32``): eager PyTorch against OpenVINO f32 per batch size on the CPU preset with
random weights (speed does not depend on them), the graph compiled for the fixed batch (as the certification
backend runs it), with the GroupNorm export of :func:`~anomalib_robust.deploy.adv_rad.onnx_translations` ("layout
GN", the default export) and with the exporter's own Reshape -> InstanceNormalization -> Reshape ("default GN"), timed
in interleaved rounds of ``--seconds`` (median of ``--rounds``), with the share of OpenVINO's time in ``Reorder``
nodes (layout conversions; ``PERF_COUNT``) and the largest relative score difference to eager.

    OMP_NUM_THREADS=1 python benchmarks/export_speed.py [--paper] [--steps 200] [--images 4]
    OMP_NUM_THREADS=1 python benchmarks/export_speed.py --no-backends --batches 1 8 32 --seconds 2 --rounds 3
"""

import argparse
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from tempfile import TemporaryDirectory

import numpy as np
import onnxruntime as ort
import openvino as ov
import torch
from anomalib.engine import Engine
from lightning.pytorch import seed_everything
from rich.console import Console
from rich.table import Table

from anomalib_robust import AdvRAD
from anomalib_robust.data import FashionMNIST
from anomalib_robust.deploy import cpu_config, export_adv_rad
from anomalib_robust.deploy.adv_rad import _onnx_with_noise_input
from anomalib_robust.deploy.openvino_score import static_batch
from anomalib_robust.evaluation.metrics import rank_auroc
from anomalib_robust.models.adv_rad.export import quantize_unet

Predict = Callable[[np.ndarray, np.ndarray], np.ndarray]
F32 = {"INFERENCE_PRECISION_HINT": "f32"}


def timed(predict: Predict, images: np.ndarray, noise: np.ndarray) -> tuple[float, float, np.ndarray]:
    """Warm up once, then score the images one by one; returns (images/s, ms per image, scores)."""
    predict(images[:1], noise[:, :1])
    start = time.perf_counter()
    scores = [predict(images[i : i + 1], noise[:, i : i + 1]) for i in range(images.shape[0])]
    elapsed = time.perf_counter() - start
    return images.shape[0] / elapsed, 1000 * elapsed / images.shape[0], np.concatenate(scores)


def trained_cpu_preset(datamodule: FashionMNIST, steps: int, root: Path) -> AdvRAD:
    """The CPU preset trained ``steps`` iterations; the normal error map comes from ``on_train_end``."""
    seed_everything(0)
    model = AdvRAD.cpu_preset(post_processor=False)
    engine = Engine(max_steps=steps, default_root_dir=root, logger=False,
                    enable_progress_bar=False, check_val_every_n_epoch=10**6)  # fmt: skip
    engine.fit(model, datamodule=datamodule)
    return model.eval()


def backends(model: AdvRAD, datamodule: FashionMNIST, directory: str, threads: int) -> dict[str, Predict]:
    """One scoring function per backend, all on the graph of ``model`` with the diffusion noise as an input."""
    size = tuple(model.model.image_size)
    onnx_path = export_adv_rad(model, directory, export_type="onnx", input_size=size, noise="input")
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    session = ort.InferenceSession(str(onnx_path), options)
    core = ov.Core()
    graphs = {
        "OpenVINO": ov.convert_model(onnx_path),
        "OpenVINO INT8 U-Net +": quantize_unet(ov.convert_model(onnx_path), datamodule),
    }

    def pytorch(images: np.ndarray, noise: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return model(torch.from_numpy(images), torch.from_numpy(noise)).pred_score.numpy()

    predictors = {
        "PyTorch eager": pytorch,
        "ONNX Runtime": lambda images, noise: session.run(["pred_score"], {"input": images, "noise": noise})[0],
    }
    for prefix, graph in graphs.items():
        for hint in (F32, {}):
            compiled = core.compile_model(graph, "CPU", {**hint, "INFERENCE_NUM_THREADS": threads})
            precision = compiled.get_property("INFERENCE_PRECISION_HINT").get_type_name()
            label = f"{prefix} {precision}" + ("" if hint else " (CPU default)")
            predictors[label] = lambda images, noise, compiled=compiled: compiled({"input": images, "noise": noise})[
                "pred_score"
            ]
    return predictors


def benchmark(name: str, model: AdvRAD, datamodule: FashionMNIST, num_images: int | None, table: Table) -> None:
    """Time every backend on the same test images and noise; AUROC when ``num_images`` is ``None`` (all, trained)."""
    datamodule.setup()
    batches = list(datamodule.test_dataloader())
    images = torch.cat([batch.image for batch in batches])[:num_images].numpy()
    labels = torch.cat([batch.gt_label for batch in batches])[:num_images]
    noise = torch.randn((1, *images.shape), generator=torch.Generator().manual_seed(0)).numpy()
    with TemporaryDirectory() as directory:
        reference = eager_speed = None
        for backend, predict in backends(model, datamodule, directory, torch.get_num_threads()).items():
            speed, latency, scores = timed(predict, images, noise)
            reference = scores if reference is None else reference
            eager_speed = eager_speed or speed
            difference = np.abs(scores - reference).max() / np.abs(reference).max()
            auroc = "-" if num_images else f"{100 * rank_auroc(torch.from_numpy(scores), labels):.1f}"
            row = (f"{speed:.2f}", f"{latency:.1f}", f"{speed / eager_speed:.2f}x", f"{difference:.1e}", auroc)
            table.add_row(name, backend, *row)


def reorder_share(compiled: ov.CompiledModel, feed: dict[str, np.ndarray], repeats: int = 3) -> float:
    """Share of the compiled graph's node time spent in ``Reorder`` nodes (compiled with ``PERF_COUNT``)."""
    request = compiled.create_infer_request()
    request.infer(feed)
    seconds: dict[str, float] = defaultdict(float)
    for _ in range(repeats):
        request.infer(feed)
        for info in request.profiling_info:
            seconds[info.node_type] += info.real_time.total_seconds()
    return seconds["Reorder"] / sum(seconds.values())


def batch_table(batches: list[int], seconds: float, rounds: int) -> Table:
    """Eager against OpenVINO f32 (static batch) with both GroupNorm exports, per batch size; see the docstring."""
    torch.manual_seed(0)
    model = AdvRAD.cpu_preset(post_processor=False).eval()
    size = tuple(model.model.image_size)
    model.model.set_normal_error_map(torch.zeros(1, 1, *size))
    core = ov.Core()
    with TemporaryDirectory() as directory:
        graphs = {
            name: core.read_model(_onnx_with_noise_input(model, Path(directory), name, size, layout))
            for name, layout in (("default GN", False), ("layout GN", True))
        }
    threads = torch.get_num_threads()
    table = Table(title=f"Eager PyTorch and OpenVINO f32 (static batch) per batch size, CPU preset 32x32, random "
                        f"weights, {threads} thread(s), images/s, median of {rounds} x {seconds:g} s")  # fmt: skip
    columns = ("batch", "eager", *(f"OV {name}" for name in graphs), *(f"{name} vs eager" for name in graphs),
               *(f"Reorder share, {name}" for name in graphs), "max rel. score diff (default / layout)")  # fmt: skip
    for column in columns:
        table.add_column(column, justify="right")
    for batch in batches:
        images, noise = torch.rand(batch, 3, *size), torch.randn(model.model.num_noise_draws, batch, 3, *size)
        feed = {"input": images.numpy(), "noise": noise.numpy()}

        def eager(images: torch.Tensor = images, noise: torch.Tensor = noise) -> np.ndarray:
            with torch.no_grad():
                return model(images, noise).pred_score.numpy()

        runs: dict[str, Callable[[], np.ndarray]] = {"eager": eager}
        shares = {}
        for name, graph in graphs.items():
            fixed = static_batch(graph, batch)
            request = core.compile_model(fixed, "CPU", cpu_config("f32", threads)).create_infer_request()
            runs[name] = lambda request=request: request.infer(feed)["pred_score"]
            profiled = core.compile_model(fixed, "CPU", {**cpu_config("f32", threads), "PERF_COUNT": True})
            shares[name] = reorder_share(profiled, feed)
        outputs = {name: np.asarray(run()).ravel() for name, run in runs.items()}  # also the warm-up
        rates: dict[str, list[float]] = defaultdict(list)
        for _ in range(rounds):  # interleaved, so that a change of the machine's load hits every backend alike
            for name, run in runs.items():
                calls, start = 0, time.perf_counter()
                while time.perf_counter() - start < seconds or calls < 2:
                    run()
                    calls += 1
                rates[name].append(calls * batch / (time.perf_counter() - start))
        rate = {name: float(np.median(values)) for name, values in rates.items()}
        reference = outputs["eager"]
        differences = [np.abs(outputs[name] - reference).max() / np.abs(reference).max() for name in graphs]
        table.add_row(str(batch), *(f"{rate[name]:.1f}" for name in runs),
                      *(f"{rate[name] / rate['eager']:.2f}x" for name in graphs),
                      *(f"{100 * shares[name]:.1f}%" for name in graphs),
                      " / ".join(f"{difference:.1e}" for difference in differences))  # fmt: skip
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--paper", action="store_true", help="also the paper's 256 x 256 configuration (slow)")
    parser.add_argument("--steps", type=int, default=200, help="training iterations of the CPU preset")
    parser.add_argument("--images", type=int, default=4, help="images per backend at 256 x 256")
    parser.add_argument("--no-backends", dest="backends", action="store_false", help="skip the batch-1 table")
    parser.add_argument("--batches", nargs="*", type=int, default=[], help="batch sizes of the per-batch table")
    parser.add_argument("--seconds", type=float, default=2.0, help="timing per cell and round (per-batch table)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved timing rounds (per-batch table)")
    arguments = parser.parse_args()
    console = Console(width=160)
    if arguments.batches:
        console.print(batch_table(arguments.batches, arguments.seconds, arguments.rounds))
    if not arguments.backends:
        return
    threads = torch.get_num_threads()
    table = Table(title=f"Exported AdvRAD one-shot pipeline, {threads} thread(s) per backend, batch 1")
    for column in ("config", "backend", "images/s", "ms/image", "vs eager", "max rel. score diff", "image AUROC %"):
        table.add_column(column)
    with TemporaryDirectory() as root:
        data = {"category": "trouser", "num_test": 100, "train_batch_size": 16, "eval_batch_size": 16}
        datamodule = FashionMNIST(image_size=32, num_train=200, **data)
        model = trained_cpu_preset(datamodule, arguments.steps, Path(root))
        benchmark(f"CPU preset 32x32, {arguments.steps} steps", model, datamodule, None, table)
        if arguments.paper:
            torch.manual_seed(0)
            model = AdvRAD(image_size=(256, 256), post_processor=False).eval()
            model.model.set_normal_error_map(torch.zeros(1, 1, 256, 256))
            datamodule = FashionMNIST(image_size=256, num_train=8, **{**data, "train_batch_size": 8})
            benchmark("paper 256x256, random weights", model, datamodule, arguments.images, table)
    console.print(table)


if __name__ == "__main__":
    main()
