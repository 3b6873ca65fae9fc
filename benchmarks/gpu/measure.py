"""The GPU check's measurements: AdvRAD at the paper's scale, the attack cost of three detectors, one purified
leaderboard cell; written to ``<out>/measurements.json`` and ``<out>/measurements.md``.

``benchmarks/gpu/check.sh`` runs this on the GPU machine after the cuda tests. ``--smoke`` runs every step on the CPU at
toy sizes in seconds; the test suite runs it, so that the script cannot rot between GPU runs. Weights are random (speed
does not depend on them); Padim is fitted, since its Gaussian needs features. Every timing is a fixed small number of
calls after a warm-up, with the device synchronised:

1. ``AdvRAD()`` at its defaults (the AdvRAD paper's 256 x 256 U-Net, T = 1000, k = 100): training images/s of the
   hybrid-loss step (eq. 10) in fp32 and under bf16 autocast, each with its FLOPs per image
   (``torch.utils.flop_counter``), achieved TFLOP/s and share of the matmul peak timed in the same run at the precision
   its products run in (fp32 convolutions run in TF32 where cuDNN allows it), and the time of the first step;
2. its one-shot inference images/s;
3. the EOT-20 PGD-20 attack: image-steps/s over a few timed PGD steps, batched EOT draws (chunks from the free GPU
   memory) against one draw per call; images/s of the whole attack is image-steps/s / 20;
4. the same attack's cost on Padim (ResNet-18, 256 px) and PatchGuard (ViT-S/14, 224 px) at their defaults with
   random-init backbones: deterministic detectors, so one draw per step;
5. one cell of the leaderboard's ``Purified(Padim, DiffPure p=25)`` row at the grid's settings
   (``configs/benchmark/robust_fashion_mnist.yaml``; class ``trouser``, the first threat model), fits included, run by
   ``RobustBenchmark`` as ``anomalib robust_benchmark`` runs it;
6. the training step of 1. with ``torch.compile`` (inductor), its first, compiling step timed apart.

Each step has at most :data:`STEP_SECONDS` (the last, what ``--budget`` leaves); one that runs out of time or fails is
recorded as such, and the next one runs.

Example:
    $ python benchmarks/gpu/measure.py --out results/gpu --budget 420   # on a GPU
    $ python benchmarks/gpu/measure.py --smoke --out /tmp/gpu-smoke      # on a CPU, toy sizes
"""

import argparse
import copy
import csv
import datetime
import json
import signal
import sys
import tempfile
import time
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from types import SimpleNamespace

import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the sibling benchmark modules

from adv_rad_inference import images_per_second  # noqa: E402
from adv_rad_training import build, median_step_seconds, training_step  # noqa: E402
from anomalib.engine import Engine  # noqa: E402
from anomalib.models import Padim  # noqa: E402
from eot_throughput import throughput  # noqa: E402
from roofline import Roofline, attack_flops_per_image, count_flops, matmul_gflops  # noqa: E402

from anomalib_robust import AdvRAD, PatchGuard  # noqa: E402
from anomalib_robust.attacks import DetectorScore  # noqa: E402
from anomalib_robust.attacks.eot import draw_chunks  # noqa: E402
from anomalib_robust.data import FashionMNIST  # noqa: E402
from anomalib_robust.leaderboard import RobustBenchmark  # noqa: E402
from anomalib_robust.offline import random_init_backbones  # noqa: E402

REPOSITORY = Path(__file__).resolve().parents[2]
GRID = REPOSITORY / "configs" / "benchmark" / "robust_fashion_mnist.yaml"
PURIFIED = "Purified(Padim, DiffPure p=25)"
CATEGORY = "trouser"
STEPS = ("training", "inference", "attacks", "cell", "compile")
STEP_SECONDS = {"training": 120, "inference": 30, "attacks": 120, "cell": 300}
"""The most a step may take on the GPU (the smoke run takes seconds); the last, ``compile``, gets what is left."""
ATTACK_STEPS = 20
"""PGD steps of the attack whose cost is reported (EOT-20 PGD-20 on the paper's scale)."""


@dataclass(frozen=True)
class Scale:
    """The sizes of one run: the papers' on a GPU, toys for ``--smoke``."""

    advrad: dict = field(default_factory=dict)
    """``AdvRAD`` init args beyond its defaults."""
    image_size: int = 256
    train_batch: int = 8
    train_rounds: int = 5
    infer_batch: int = 16
    infer_repeats: int = 5
    attack_batch: int = 4
    attack_draws: int = 20
    """EOT draws per PGD step on the randomised detector (AdvRAD)."""
    attack_steps: int = 2
    """PGD steps timed per attack run (best of two runs)."""
    padim: dict = field(default_factory=dict)
    patch_guard: dict = field(default_factory=dict)
    compile_backend: str = "inductor"
    matmul_size: int = 8192
    matmul_seconds: float = 1.0
    cell: dict = field(default_factory=dict)
    """Changes to the leaderboard cell's ``robust_benchmark`` section: a dotted path (``"data.init_args"``, list
    indices as numbers) -> the values it is updated with. Empty: the grid's settings."""


PAPER = Scale()
SMOKE_ADVRAD = {"base_channels": 32, "channel_mult": (1,), "attention_resolutions": (), "layers_per_block": 1,
                "num_timesteps": 100, "diffusion_step": 10}  # fmt: skip
SMOKE = Scale(
    advrad=SMOKE_ADVRAD,
    image_size=32,
    train_batch=2,
    train_rounds=1,
    infer_batch=2,
    infer_repeats=1,
    attack_batch=2,
    attack_draws=2,
    attack_steps=1,
    padim={"layers": ["layer1", "layer2"], "pre_processor": Padim.configure_pre_processor((32, 32))},
    patch_guard={"image_size": (32, 32), "patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2,
                 "discriminator_heads": 2, "discriminator_mlp_dim": 64, "sigma": 1.0, "kernel_size": 5,
                 "attention_weights": (0.01, 0.05)},  # fmt: skip
    compile_backend="eager",
    matmul_size=256,
    matmul_seconds=0.05,
    cell={
        "data.init_args": {"num_train": 8, "num_test": 8, "train_batch_size": 8, "eval_batch_size": 8},
        "model.grid.0.defense.init_args": {"level": 2},
        "model.grid.0.defense.denoiser.init_args": {**SMOKE_ADVRAD, "channel_mult": [1], "attention_resolutions": []},
        "model.grid.0.defense.denoiser.trainer": {"max_steps": 2},
        "robust_eval": {"steps": 1, "eot_samples": 2, "eval_repeats": 1, "sanity_checks": False,
                        "purifier_gradients": "full"},  # fmt: skip
    },
)


def matmul_peaks(scale: Scale, device: torch.device) -> dict[str, float]:
    """Measured matmul peaks in GFLOP/s: fp32, bf16 where native, and on a GPU tf32 (fp32 with TF32 products)."""
    roofline = Roofline.measure(scale.matmul_size, scale.matmul_seconds, device)
    peaks = {"fp32": roofline.fp32} | ({"bf16": roofline.bf16} if roofline.bf16 is not None else {})
    if device.type == "cuda":
        allowed = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = True
        peaks["tf32"] = matmul_gflops(torch.float32, scale.matmul_size, scale.matmul_seconds, device)
        torch.backends.cuda.matmul.allow_tf32 = allowed
    return peaks


def precision(variant: str, device: torch.device) -> str:
    """The precision the convolutions of a training variant run in (the peak it is compared with)."""
    if variant == "bf16 autocast":
        return "bf16"
    return "tf32" if device.type == "cuda" and torch.backends.cudnn.allow_tf32 else "fp32"


def throughput_row(flops_per_image: float, images_per_s: float, peak_name: str, peaks: dict) -> dict:
    """FLOPs per image, achieved TFLOP/s and the share of the named peak (``None`` where it was not timed)."""
    tflops = flops_per_image * images_per_s / 1e12
    peak = peaks.get(peak_name)
    return {"gflop_per_image": flops_per_image / 1e9, "tflops": tflops, "peak": peak_name,
            "share_of_peak": None if peak is None else tflops * 1e3 / peak}  # fmt: skip


def adv_rad(scale: Scale, device: torch.device) -> AdvRAD:
    """``AdvRAD`` at ``scale``'s size, on ``device``, its normal error map set to zeros (as if fitted)."""
    model = AdvRAD(image_size=(scale.image_size, scale.image_size), **scale.advrad, evaluator=False, visualizer=False)
    model.model.set_normal_error_map(torch.zeros_like(model.model.normal_error_map))
    return model.to(device).eval()


def measure_training(scale: Scale, device: torch.device, peaks: dict, variants: tuple[str, ...]) -> list[dict]:
    """Training images/s of AdvRAD's hybrid-loss step per variant (median of interleaved rounds), and the time of its
    first step (``torch.compile``'s compiles)."""
    images = torch.rand(scale.train_batch, 3, scale.image_size, scale.image_size, device=device)
    factory = partial(AdvRAD, **scale.advrad)
    built = {variant: build(variant, scale.image_size, factory, device, scale.compile_backend) for variant in variants}
    first_step = {}
    for variant in variants:
        started = time.perf_counter()
        training_step(variant, *built[variant], images)
        first_step[variant] = time.perf_counter() - started
    steps = {variant: partial(training_step, variant, *built[variant], images) for variant in variants}
    seconds = median_step_seconds(steps, scale.train_rounds)
    reference, _ = build("fp32 eager", scale.image_size, factory, device)  # FLOPs are counted on the eager graph
    flops = count_flops(lambda: reference(images[:1])["loss"].backward())
    rows = []
    for variant in variants:
        speed = scale.train_batch / seconds[variant]
        rows.append({"variant": variant, "batch": scale.train_batch, "seconds_per_step": seconds[variant],
                     "first_step_seconds": first_step[variant], "images_per_s": speed,
                     **throughput_row(flops, speed, precision(variant, device), peaks)})  # fmt: skip
    torch.compiler.reset()  # compiled graphs hold their model's memory
    return rows


def measure_inference(scale: Scale, device: torch.device, peaks: dict) -> dict:
    """One-shot inference images/s of ``AdvRAD()`` (Alg. 1: one U-Net call per image)."""
    model = adv_rad(scale, device).model
    images = torch.rand(scale.infer_batch, 3, scale.image_size, scale.image_size, device=device)
    speed = images_per_second(model, images, scale.infer_repeats)
    with torch.no_grad():
        flops = count_flops(lambda: model(images[:1]))
    return {"batch": scale.infer_batch, "images_per_s": speed,
            **throughput_row(flops, speed, precision("fp32 eager", device), peaks)}  # fmt: skip


def attack_cost(name: str, model: torch.nn.Module, images: torch.Tensor, draws: int, scale: Scale) -> list[dict]:
    """EOT-PGD cost on ``model``: batched draws and, with several draws, one draw per call."""
    labels = torch.zeros(images.shape[0], dtype=torch.long, device=images.device)
    flops = draws * attack_flops_per_image(DetectorScore(model), images, labels)
    timing = SimpleNamespace(steps=scale.attack_steps, repeats=2)
    paths = {"batched draws": None} | ({"one draw per call": images.shape[0]} if draws > 1 else {})
    rows = []
    for path, max_batch in paths.items():
        if images.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(images.device)
        image_steps = throughput(model, images, draws, max_batch, timing)
        row = {"detector": name, "path": path, "batch": images.shape[0], "eot_draws": draws,
               "copies_per_call": draw_chunks(images, draws, max_batch)[0], "image_steps_per_s": image_steps,
               "images_per_s_pgd20": image_steps / ATTACK_STEPS, "gflop_per_image_step": flops / 1e9,
               "tflops": flops * image_steps / 1e12}  # fmt: skip
        if images.device.type == "cuda":
            row["peak_memory_gib"] = torch.cuda.max_memory_allocated(images.device) / 2**30
        rows.append(row)
    return rows


def fitted_padim(scale: Scale, device: torch.device, root: Path) -> Padim:
    """``Padim`` at its defaults on a random-init ResNet-18, fitted on 16 embedded Fashion-MNIST images."""
    padim = Padim(pre_trained=False, evaluator=False, visualizer=False, **scale.padim)
    datamodule = FashionMNIST(category=CATEGORY, root="embedded", image_size=scale.image_size, num_train=16,
                              num_test=8, train_batch_size=16)  # fmt: skip
    Engine(accelerator=device.type, devices=1, default_root_dir=root, logger=False, enable_progress_bar=False,
           enable_model_summary=False, max_epochs=1).fit(padim, datamodule=datamodule)  # fmt: skip
    return padim.to(device).eval()  # Lightning hands the model back on the CPU


def measure_attacks(scale: Scale, device: torch.device, root: Path) -> list[dict]:
    """EOT-20 PGD-20 on AdvRAD, PGD-20 on Padim and PatchGuard, at their default sizes (``scale``'s for smoke)."""
    torch.manual_seed(0)
    with random_init_backbones():
        patch_guard = PatchGuard(**scale.patch_guard, evaluator=False, visualizer=False).to(device)
    detectors = {
        "AdvRAD": (adv_rad(scale, device), scale.image_size, scale.attack_draws),
        "Padim": (fitted_padim(scale, device, root), scale.image_size, 1),
        "PatchGuard": (patch_guard, patch_guard.model.image_size[0], 1),
    }
    rows = []
    for name, (model, size, draws) in detectors.items():
        images = torch.rand(scale.attack_batch, 3, size, size, device=device)
        rows.extend(attack_cost(name, model, images, draws, scale))
    return rows


def cell_config(scale: Scale, device: torch.device) -> dict:
    """The grid's YAML cut to one cell (the purified row, class :data:`CATEGORY`, the first threat model) on ``device``,
    with ``scale.cell``'s changes."""
    config = yaml.safe_load(GRID.read_text())
    section = config["robust_benchmark"]
    section["model"]["grid"] = [entry for entry in section["model"]["grid"] if entry.get("name") == PURIFIED]
    section["data"]["init_args"]["category"] = {"grid": [CATEGORY]}
    section["robust_eval"]["threat_models"] = section["robust_eval"]["threat_models"][:1]
    for path, values in copy.deepcopy(scale.cell).items():
        target = section
        for key in path.split("."):
            target = target[int(key)] if isinstance(target, list) else target[key]
        target.update(values)
    config["accelerator"] = device.type
    return config


class OutOfTime(BaseException):
    """Raised in the main thread when a step's time is up (a ``BaseException``: no ``except Exception`` keeps it)."""


@contextmanager
def time_limit(seconds: float) -> Iterator[None]:
    """Raise :class:`OutOfTime` in the block once ``seconds`` have passed (a real-time timer, main thread only)."""

    def expire(*_: object) -> None:
        raise OutOfTime

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, max(seconds, 1e-3))
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def measure_cell(scale: Scale, device: torch.device, root: Path) -> dict:
    """One leaderboard cell as ``anomalib robust_benchmark`` runs it: its rows of ``leaderboard.csv``, wall time."""
    started = time.perf_counter()
    RobustBenchmark().run(config=cell_config(scale, device), output_dir=root / "cell")
    with (root / "cell" / "leaderboard.csv").open() as file:
        rows = list(csv.DictReader(file))
    status = ", ".join(sorted({row["status"] for row in rows}))
    return {"status": status, "wall_seconds": time.perf_counter() - started, "rows": rows}


def environment(device: torch.device) -> dict:
    """What the numbers were measured on."""
    names = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"}
    return {**names, "date": datetime.date.today().isoformat(), "torch": torch.__version__,
            "cuda": torch.version.cuda, "threads": torch.get_num_threads(),
            "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32}  # fmt: skip


def markdown(results: dict) -> str:
    """The measurements as Markdown: a line on the machine, then a table per step that ran."""

    def number(value: object, digits: int = 1) -> str:
        return f"{value:.{digits}f}" if isinstance(value, float) else "-" if value is None else str(value)

    def share(row: dict) -> str:
        return "-" if row["share_of_peak"] is None else f"{100 * row['share_of_peak']:.1f}% of {row['peak']}"

    setup, size = results["environment"], results["scale"]["image_size"]
    unfinished = [f"{step}: {results[step]['status']}" for step in STEPS
                  if step != "cell" and isinstance(results.get(step), dict) and "status" in results[step]]  # fmt: skip
    peaks = ", ".join(f"{name} {value / 1e3:.3g} TFLOP/s" for name, value in results["matmul_peak_gflops"].items())
    lines = [f"{setup['device']}, {setup['date']}, torch {setup['torch']} (CUDA {setup['cuda']}); matmul peaks "
             f"measured in the run: {peaks}; {number(results['seconds'])} s in all.", *unfinished, ""]  # fmt: skip
    training = [row for step in ("training", "compile") if isinstance(results.get(step), list) for row in results[step]]
    if training:
        lines += [f"AdvRAD {size} x {size}, training step (hybrid loss, Adam):", "",
                  "| variant | batch | images/s | GFLOP/image | TFLOP/s | share of peak | first step (s) |",
                  "|---|---|---|---|---|---|---|"]  # fmt: skip
        lines += [f"| {row['variant']} | {row['batch']} | {number(row['images_per_s'])} | "
                  f"{number(row['gflop_per_image'])} | {number(row['tflops'], 2)} | {share(row)} | "
                  f"{number(row['first_step_seconds'])} |" for row in training]  # fmt: skip
        lines.append("")
    if "images_per_s" in results.get("inference", {}):
        row = results["inference"]
        lines += [f"AdvRAD {size} x {size}, one-shot inference: {number(row['images_per_s'])} images/s at batch "
                  f"{row['batch']} ({number(row['gflop_per_image'])} GFLOP/image, {number(row['tflops'], 2)} TFLOP/s, "
                  f"{share(row)}).", ""]  # fmt: skip
    if isinstance(results.get("attacks"), list):
        draws = results["scale"]["attack_draws"]
        lines += [f"EOT-{draws} PGD-{ATTACK_STEPS} (PGD-{ATTACK_STEPS} on the deterministic detectors):", "",
                  "| detector | path | batch | EOT draws | copies per call | image-steps/s | "
                  f"images/s ({ATTACK_STEPS} steps) | GFLOP/image-step | TFLOP/s | peak memory (GiB) |",
                  "|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
        lines += [f"| {row['detector']} | {row['path']} | {row['batch']} | {row['eot_draws']} | "
                  f"{row['copies_per_call']} | {number(row['image_steps_per_s'], 2)} | "
                  f"{number(row['images_per_s_pgd20'], 3)} | {number(row['gflop_per_image_step'])} | "
                  f"{number(row['tflops'], 2)} | {number(row.get('peak_memory_gib'))} |"
                  for row in results["attacks"]]  # fmt: skip
        lines.append("")
    if "cell" in results:
        cell = results["cell"]
        lines += [f"Leaderboard cell {PURIFIED}, {CATEGORY}: {cell['status']}, {number(cell.get('wall_seconds'))} s "
                  "of wall time, fits included.", ""]  # fmt: skip
        columns = ("attack", "norm", "eps", "standard_image_auroc", "robust_image_auroc", "robust_image_auroc_std",
                   "sanity", "fit_seconds", "attack_seconds")  # fmt: skip
        if cell.get("rows"):
            lines += ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
            lines += ["| " + " | ".join(row.get(column) or "-" for column in columns) + " |" for row in cell["rows"]]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="folder of measurements.json and measurements.md")
    parser.add_argument("--smoke", action="store_true", help="toy sizes on the CPU: every step in seconds")
    parser.add_argument("--steps", nargs="+", choices=STEPS, default=list(STEPS), help="the steps to run")
    parser.add_argument("--budget", type=float, default=420, help="seconds for all steps; the cell gets what is left")
    arguments = parser.parse_args(argv)
    started = time.perf_counter()
    device = torch.device("cpu" if arguments.smoke else "cuda")
    scale = SMOKE if arguments.smoke else PAPER
    arguments.out.mkdir(parents=True, exist_ok=True)
    results = {"environment": environment(device), "scale": asdict(scale)}
    results["matmul_peak_gflops"] = peaks = matmul_peaks(scale, device)
    with tempfile.TemporaryDirectory(prefix="gpu-measure-") as directory:
        root = Path(directory)
        measurements = {
            "training": partial(measure_training, scale, device, peaks, ("fp32 eager", "bf16 autocast")),
            "compile": partial(measure_training, scale, device, peaks, ("torch.compile",)),
            "inference": partial(measure_inference, scale, device, peaks),
            "attacks": partial(measure_attacks, scale, device, root),
            "cell": partial(measure_cell, scale, device, root),
        }
        for step in arguments.steps:
            left = arguments.budget - (time.perf_counter() - started)
            seconds = min(STEP_SECONDS.get(step, left), left)
            try:
                with time_limit(seconds):
                    results[step] = measurements[step]()
            except OutOfTime:
                results[step] = {"status": f"not finished within the {max(seconds, 0):.0f} s it was given"}
            except Exception as error:  # noqa: BLE001 - one run on a lent GPU: the other steps still measure
                traceback.print_exc()
                results[step] = {"status": f"failed: {type(error).__name__}: {error}"}
    results["seconds"] = time.perf_counter() - started
    (arguments.out / "measurements.json").write_text(json.dumps(results, indent=2, default=str))
    table = markdown(results)
    (arguments.out / "measurements.md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()
