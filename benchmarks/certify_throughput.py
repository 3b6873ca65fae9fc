"""Certification throughput of smoothed AdvRAD per backend, OpenVINO f32 against eager per batch size, and certified
AUC in the shape of the AdvRAD paper's Table 11.

1. Backends (``--backends``): noisy forward passes per second and images certified per second at ``--n`` (all
   ``n0 + n`` noisy scores of an image, then CERTIFY, which is negligible) for PyTorch eager and the exported one-shot
   pipeline in OpenVINO f32, bf16 and INT8 (:class:`~anomalib_robust.deploy.OpenVINOScore`), on the CPU preset with
   random weights (speed does not depend on them; INT8 calibrates on embedded Fashion-MNIST training images), batches
   of ``--batch`` noisy images, the same threads for every backend. Beside the rates: the U-Net's FLOPs per image,
   the achieved GFLOP/s and the share of the fp32 matmul peak timed in the same run (``benchmarks/roofline.py``),
   and the largest relative score difference to eager on the same noisy images and diffusion noise.
2. Batch sizes (``--batches``): eager against OpenVINO f32 at batch 1, 8, 32, with the ``LATENCY`` and
   ``THROUGHPUT`` performance hints and with the batch dynamic or static (graph reshaped to the batch), and where the
   time goes: OpenVINO's per-op-type profile (``PERF_COUNT``) and PyTorch's profiler, at the largest batch.
3. Table 11 (``--categories``): for each Fashion-MNIST class of the ``defect`` protocol, AdvRAD is loaded from
   ``--ckpt CLASS=PATH`` or trained for ``--steps`` steps, then certified on ``--num-test`` test images with
   ``--table-backend`` at ``--table-precision``. sigma and eps are in the [0, 1] pixel scale; abstentions count as
   failures.

Prints tables only.

    OMP_NUM_THREADS=1 python benchmarks/certify_throughput.py --categories   # sections 1 and 2
    python benchmarks/certify_throughput.py --no-backends --no-batches --categories trouser bag --n 1000 \\
        --table-backend openvino --table-precision bf16
"""

import argparse
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

import numpy as np
import openvino as ov
import torch
from anomalib.engine import Engine
from rich.console import Console
from rich.table import Table
from roofline import COLUMNS, Roofline, unet_flops_per_image

from anomalib_robust import AdvRAD
from anomalib_robust.attacks import DetectorScore
from anomalib_robust.callbacks import CertifyEval
from anomalib_robust.data import FashionMNIST
from anomalib_robust.deploy import OpenVINOScore, cpu_config
from anomalib_robust.deploy.openvino_score import static_batch
from anomalib_robust.evaluation.smoothing import certify, noisy_scores

Score = Callable[[torch.Tensor], torch.Tensor]


def random_cpu_preset() -> AdvRAD:
    """The CPU preset with random weights and a zero normal error map: exportable, and as fast as a trained one."""
    torch.manual_seed(0)
    model = AdvRAD.cpu_preset(post_processor=False).eval()
    model.model.set_normal_error_map(torch.zeros(1, 1, *model.model.image_size))
    return model


def forward_rate(score: Score, images: torch.Tensor, batch: int, seconds: float) -> float:
    """Noisy forward passes per second: batches of ``batch`` noisy images for about ``seconds`` after a warm-up."""
    noisy_scores(score, images[:1], 0.125, batch, batch)
    done, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        noisy_scores(score, images[:1], 0.125, batch, batch)
        done += batch
    return done / (time.perf_counter() - start)


def certify_rate(score: Score, images: torch.Tensor, n0: int, n: int, batch: int) -> float:
    """Images certified per second: ``n0 + n`` noisy scores per image, then CERTIFY at every threshold."""
    start = time.perf_counter()
    selection, estimation = (noisy_scores(score, images, 0.125, count, batch) for count in (n0, n))
    certify(selection, estimation, sigma=0.125)
    return images.shape[0] / (time.perf_counter() - start)


def score_difference(score: Score, reference: Score, images: torch.Tensor) -> float:
    """Largest relative score difference to ``reference`` on the same noisy images and diffusion noise."""
    scores = []
    for function in (reference, score):
        torch.manual_seed(1)
        scores.append(noisy_scores(function, images, 0.125, 16, 64, torch.Generator().manual_seed(1)))
    return float((scores[1] - scores[0]).abs().max() / scores[0].abs().max())


def backend_table(arguments: argparse.Namespace, roofline: Roofline, flops: int) -> Table:
    """Section 1: every backend and precision at ``--batch``."""
    model = random_cpu_preset()
    detector = DetectorScore(model, eot_samples=1)
    images = torch.rand(arguments.throughput_images, 3, *model.model.image_size)
    table = Table(title=f"Certification throughput, AdvRAD CPU preset (32x32, random weights), n0 = {arguments.n0}, "
                        f"n = {arguments.n}, batch {arguments.batch}, {torch.get_num_threads()} thread(s)")  # fmt: skip
    for column in ("backend", "forward passes/s", "images certified/s", "s/image", "vs eager", "max rel. score diff",
                   *COLUMNS):  # fmt: skip
        table.add_column(column, justify="right")
    datamodule = FashionMNIST(category="trouser", image_size=32, num_train=64, num_test=10, train_batch_size=16)
    with detector.prepared():
        eager: Score = lambda x: detector.single_draw(x)[0]  # noqa: E731
        openvino = OpenVINOScore(model, "f32", batch_size=arguments.batch)
        backends = {"PyTorch eager": eager, "OpenVINO f32": openvino}
        for precision in arguments.precisions:
            backends[f"OpenVINO {precision}"] = openvino.at_precision(precision, datamodule)
        eager_rate = None
        for name, score in backends.items():
            rate = forward_rate(score, images, arguments.batch, arguments.seconds)
            eager_rate = eager_rate or rate
            certified = certify_rate(score, images, arguments.n0, arguments.n, arguments.batch)
            difference = score_difference(score, eager, images[:4])
            table.add_row(name, f"{rate:.1f}", f"{certified:.4f}", f"{1 / certified:.1f}", f"{rate / eager_rate:.2f}x",
                          f"{difference:.1e}", *roofline.cells(flops, rate))  # fmt: skip
    table.caption = roofline.caption()
    return table


def batch_table(arguments: argparse.Namespace, roofline: Roofline, flops: int, console: Console) -> Table:
    """Section 2: eager against OpenVINO f32 per batch size, performance hint and static/dynamic batch."""
    model = random_cpu_preset()
    size = tuple(model.model.image_size)
    exported = OpenVINOScore(model, "f32")
    core = ov.Core()
    table = Table(title=f"Eager PyTorch and OpenVINO f32 per batch size, CPU preset 32x32, "
                        f"{torch.get_num_threads()} thread(s), images/s (one U-Net pass per image)")  # fmt: skip
    for column in ("batch", "eager", "OV latency, dynamic", "OV throughput, dynamic", "OV latency, static",
                   "best vs eager", "max rel. score diff", *COLUMNS):  # fmt: skip
        table.add_column(column, justify="right")
    profiled = {}
    for batch in arguments.batches:
        images = torch.rand(batch, 3, *size)
        noise = torch.randn(model.model.num_noise_draws, batch, 3, *size)
        feed = {"input": images.numpy(), "noise": noise.numpy()}

        def eager() -> torch.Tensor:
            with torch.no_grad():
                return model(images, noise).pred_score

        throughput = {**cpu_config("f32"), "PERFORMANCE_HINT": "THROUGHPUT"}
        compiled = {
            "latency": core.compile_model(exported.graph, "CPU", cpu_config("f32")),
            "throughput": core.compile_model(exported.graph, "CPU", throughput),
            "static": core.compile_model(static_batch(exported.graph, batch), "CPU", cpu_config("f32")),
        }
        requests = {name: model_.create_infer_request() for name, model_ in compiled.items()}
        runs = {"eager": eager} | {name: (lambda request=request: request.infer(feed)["pred_score"]) for name, request
                                   in requests.items()}  # fmt: skip
        rates, outputs = {}, {}
        for name, run in runs.items():
            outputs[name] = np.asarray(run()).ravel()  # warm-up
            calls, start = 0, time.perf_counter()
            while time.perf_counter() - start < arguments.seconds or calls < 2:
                run()
                calls += 1
            rates[name] = calls * batch / (time.perf_counter() - start)
        difference = max(np.abs(outputs[name] - outputs["eager"]).max() for name in compiled) / np.abs(
            outputs["eager"]).max()  # fmt: skip
        best = max(rates[name] for name in compiled)
        table.add_row(str(batch), *(f"{rates[name]:.1f}" for name in runs), f"{best / rates['eager']:.2f}x",
                      f"{difference:.1e}", *roofline.cells(flops, best))  # fmt: skip
        profiled = {"batch": batch, "feed": feed, "eager": eager, "graph": static_batch(exported.graph, batch)}
    table.caption = roofline.caption()
    console.print(table)
    console.print(where_the_time_goes(profiled, core))
    return table


def where_the_time_goes(profiled: dict, core: "ov.Core") -> Table:
    """Per-op-type share of the time in OpenVINO f32 (``PERF_COUNT``) and in eager PyTorch, at one batch size."""
    compiled = core.compile_model(profiled["graph"], "CPU", {**cpu_config("f32"), "PERF_COUNT": True})
    request = compiled.create_infer_request()
    request.infer(profiled["feed"])
    openvino_time: dict[str, float] = defaultdict(float)
    for _ in range(5):
        request.infer(profiled["feed"])
        for info in request.profiling_info:
            openvino_time[info.node_type] += info.real_time.total_seconds()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profiler:
        for _ in range(5):
            profiled["eager"]()
    eager_time = {event.key: event.self_cpu_time_total / 1e6 for event in profiler.key_averages()}
    table = Table(title=f"Where the time goes at batch {profiled['batch']} (share of the total, top op types)")
    for column in ("OpenVINO f32 op type", "share", "eager PyTorch op", "share"):
        table.add_column(column, justify="right")
    top_openvino = sorted(openvino_time.items(), key=lambda item: -item[1])[:10]
    top_eager = sorted(eager_time.items(), key=lambda item: -item[1])[:10]
    totals = sum(openvino_time.values()), sum(eager_time.values())
    for (ov_name, ov_seconds), (eager_name, eager_seconds) in zip(top_openvino, top_eager, strict=False):
        table.add_row(ov_name, f"{100 * ov_seconds / totals[0]:.1f}%", eager_name,
                      f"{100 * eager_seconds / totals[1]:.1f}%")  # fmt: skip
    return table


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
    parser.add_argument("--no-backends", dest="backends", action="store_false", help="skip section 1")
    parser.add_argument("--precisions", nargs="*", default=["bf16", "int8"], help="OpenVINO precisions besides f32")
    parser.add_argument("--no-batches", dest="batch_sizes", action="store_false", help="skip section 2")
    parser.add_argument("--batches", nargs="*", type=int, default=[1, 8, 32], help="batch sizes of section 2")
    parser.add_argument("--seconds", type=float, default=5.0, help="timing per forward-rate measurement")
    parser.add_argument("--categories", nargs="*", default=["trouser", "bag", "sneaker"])
    parser.add_argument("--ckpt", nargs="*", default=[], help="CLASS=PATH of trained AdvRAD checkpoints")
    parser.add_argument("--steps", type=int, default=300, help="training steps when no checkpoint is given")
    parser.add_argument("--num-test", type=int, default=20)
    parser.add_argument("--n0", type=int, default=100)
    parser.add_argument("--n", type=int, default=1000)
    parser.add_argument("--batch", type=int, default=256, help="noisy images per forward pass")
    parser.add_argument("--throughput-images", type=int, default=1, help="images certified per backend (section 1)")
    parser.add_argument("--table-backend", default="openvino", choices=["torch", "openvino"])
    parser.add_argument("--table-precision", default="bf16", choices=["f32", "bf16", "int8"])
    arguments = parser.parse_args()
    console = Console(width=160)
    roofline = Roofline.measure()
    flops = unet_flops_per_image(random_cpu_preset().model)
    if arguments.backends:
        console.print(backend_table(arguments, roofline, flops))
    if arguments.batch_sizes:
        batch_table(arguments, roofline, flops, console)

    checkpoints = {pair.split("=", 1)[0]: Path(pair.split("=", 1)[1]) for pair in arguments.ckpt}
    for category in arguments.categories:
        datamodule = FashionMNIST(category=category, image_size=32, num_test=arguments.num_test, train_batch_size=16)
        datamodule.setup()
        model = trained_model(category, checkpoints, arguments.steps, datamodule)
        callback = CertifyEval(n0=arguments.n0, n=arguments.n, batch_size=arguments.batch,
                               backend=arguments.table_backend, precision=arguments.table_precision)  # fmt: skip
        report = callback.evaluate(model, datamodule.test_dataloader(), datamodule=datamodule)
        report.model = f"AdvRAD on Fashion-MNIST {category} (defect)"
        console.print(report.table())


if __name__ == "__main__":
    main()
