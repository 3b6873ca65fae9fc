"""Raw anomaly scores of AdvRAD's exported one-shot pipeline in OpenVINO, for many noisy forward passes at once.

Certification by randomised smoothing (AdvRAD paper, sec. 5.7) needs no gradients, only ``n0 + n`` noisy forward
passes per image: the work the exported graph is for. :class:`OpenVINOScore` exports a fitted AdvRAD once through
:func:`~anomalib_robust.deploy.adv_rad.export_adv_rad` (``noise="input"``, at the U-Net's image size, without the
post-processor, so the scores are the raw scores that the PyTorch detector returns), compiles it for the CPU at the
requested precision and maps images ``(N, C, H, W)`` in [0, 1] to scores ``(N,)``. Images of another size are
resized on the host by the detector's own test transform (the antialiased ``Resize`` of the PyTorch pipeline, not the
export transform's plain one), so that both backends score the same function of the noisy image.

The diffusion noise eps of Alg. 1 is a graph input, drawn on the host for every call exactly as the eager PyTorch
model draws it (:func:`~anomalib_robust.models.adv_rad.diffusion.standard_normal_like` on torch's global generator,
one draw per ``num_noise_draws``): a fresh, independent draw at every call, as in deployment, and with the same seed
the same numbers as the PyTorch backend, so that the two backends can be compared image by image.

Precisions (``precision``), all on the CPU:

- ``"f32"``: the whole graph in f32 (``INFERENCE_PRECISION_HINT=f32``).
- ``"bf16"``: ``INFERENCE_PRECISION_HINT=bf16``, only on CPUs that OpenVINO reports ``BF16`` for (AVX512-BF16 or AMX).
  Elsewhere OpenVINO would silently compute in f32, so :func:`check_precision` raises instead.
- ``"int8"``: the U-Net quantised to INT8 by NNCF, calibrated on the training images of ``datamodule``
  (:func:`~anomalib_robust.models.adv_rad.export.quantize_unet`); the rest of the graph in f32.

Compilation settings (:func:`cpu_config`, measured by ``benchmarks/certify_throughput.py``, section 2):
``PERFORMANCE_HINT=LATENCY`` (one stream with every thread: a single request per call uses them all; ``THROUGHPUT``
splits the threads into streams that only parallel requests fill, and gained nothing at one thread) and
``INFERENCE_NUM_THREADS`` = PyTorch's thread count, so that both backends use the same cores. With ``batch_size``,
full batches run a copy of the graph compiled for that fixed batch (13-37% faster than the dynamic batch in f32).

Example:
    >>> import torch
    >>> from anomalib_robust.deploy import OpenVINOScore
    >>> score = OpenVINOScore(model, precision="f32")  # doctest: +SKIP
    >>> score(torch.rand(256, 3, 32, 32)).shape  # doctest: +SKIP
    torch.Size([256])
"""

from collections.abc import Iterator
from contextlib import contextmanager
from copy import copy
from importlib.util import find_spec
from tempfile import TemporaryDirectory
from typing import TYPE_CHECKING

import numpy as np
import torch
from anomalib.data import AnomalibDataModule
from anomalib.deploy import CompressionType
from anomalib.models.components import AnomalibModule

from anomalib_robust.deploy.adv_rad import export_adv_rad
from anomalib_robust.models.adv_rad.diffusion import standard_normal_like
from anomalib_robust.models.adv_rad.export import check_calibration, quantize_unet
from anomalib_robust.models.adv_rad.lightning_model import AdvRAD

if TYPE_CHECKING:
    import openvino as ov

PRECISIONS = ("f32", "bf16", "int8")


def check_openvino_installed() -> None:
    """Raise a clear ImportError when OpenVINO (the ``openvino`` extra) is not installed."""
    if find_spec("openvino") is None:
        msg = (
            "backend='openvino' needs OpenVINO, which is not installed: pip install 'anomalib-robust[openvino]' "
            "(or use backend='torch')"
        )
        raise ImportError(msg)


def check_precision(precision: str) -> str:
    """``precision`` if it is one of :data:`PRECISIONS` and this CPU runs it; a clear ValueError otherwise."""
    if precision not in PRECISIONS:
        msg = f"precision must be one of {PRECISIONS}, got {precision!r}"
        raise ValueError(msg)
    if precision == "bf16":
        check_openvino_installed()
        import openvino as ov

        capabilities = ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")
        if "BF16" not in capabilities:
            msg = (
                f"precision='bf16' needs a CPU with bf16 arithmetic (AVX512-BF16 or AMX); OpenVINO reports "
                f"{capabilities} for this CPU and would silently run f32: use precision='f32' or 'int8'"
            )
            raise ValueError(msg)
    return precision


def cpu_config(precision: str = "f32", threads: int | None = None) -> dict[str, str | int]:
    """OpenVINO CPU compilation config: the precision hint (``int8`` graphs keep their float ops in f32), the
    ``LATENCY`` performance hint and ``threads`` inference threads (``None``: PyTorch's thread count)."""
    return {
        "INFERENCE_PRECISION_HINT": "bf16" if precision == "bf16" else "f32",
        "PERFORMANCE_HINT": "LATENCY",
        "INFERENCE_NUM_THREADS": threads or torch.get_num_threads(),
    }


def static_batch(graph: "ov.Model", batch_size: int) -> "ov.Model":
    """A copy of an exported graph with a fixed batch: ``input`` ``(B, C, H, W)``, ``noise`` ``(D, B, C, H, W)``."""
    graph = graph.clone()
    shapes = {}
    for port in graph.inputs:
        shape = port.get_partial_shape()
        shape[1 if port.get_any_name() == "noise" else 0] = batch_size
        shapes[port.get_any_name()] = shape
    graph.reshape(shapes)
    return graph


@contextmanager
def without_post_processor(model: AnomalibModule) -> Iterator[AnomalibModule]:
    """``model`` with its post-processor removed (raw scores, as the attacks and certification use), then restored."""
    post_processor = model.post_processor
    model.post_processor = None
    try:
        yield model
    finally:
        model.post_processor = post_processor


class OpenVINOScore:
    """Raw anomaly scores of a fitted one-shot AdvRAD, run by OpenVINO on the CPU (see the module docstring).

    The model is exported once (the f32 graph, :attr:`graph`); :meth:`at_precision` compiles the same graph at
    another precision without exporting again.

    Args:
        model (AdvRAD): A fitted AdvRAD with one-shot reconstruction.
        precision (str): ``"f32"``, ``"bf16"`` or ``"int8"``. Defaults to ``"f32"``.
        datamodule (AnomalibDataModule | None): Calibration images for ``"int8"``: the datamodule the model was
            trained on. Defaults to ``None``.
        threads (int | None): OpenVINO inference threads; ``None`` for PyTorch's thread count. Defaults to ``None``.
        batch_size (int | None): Calls with exactly this many images run a copy of the graph compiled for that fixed
            batch (:func:`static_batch`: 13-37% faster than the dynamic batch in f32 at batch 8-32, measured by
            ``benchmarks/certify_throughput.py``); other sizes run the dynamic graph. ``None``: dynamic only.
            Defaults to ``None``.
    """

    def __init__(
        self,
        model: AnomalibModule,
        precision: str = "f32",
        datamodule: AnomalibDataModule | None = None,
        threads: int | None = None,
        batch_size: int | None = None,
    ) -> None:
        if not isinstance(model, AdvRAD):
            msg = (
                f"backend='openvino' runs AdvRAD's exported one-shot pipeline; {type(model).__name__} has no such "
                f"export: use backend='torch'"
            )
            raise TypeError(msg)
        precision = check_precision(precision)
        check_openvino_installed()
        check_calibration(CompressionType.INT8_PTQ if precision == "int8" else None, datamodule)
        is_count = isinstance(batch_size, int) and not isinstance(batch_size, bool) and batch_size >= 1
        if batch_size is not None and not is_count:
            msg = f"batch_size must be None or an integer >= 1, got {batch_size!r}"
            raise ValueError(msg)
        import openvino as ov

        self.batch_size = batch_size
        self.noise_shape = (model.model.num_noise_draws, model.model.in_channels, *model.model.image_size)
        self.transform = getattr(model.pre_processor, "transform", None)
        """The PyTorch detector's test transform, applied on the host to images of another size than the U-Net's."""
        with TemporaryDirectory() as directory, without_post_processor(model):
            size = tuple(model.model.image_size)  # the graph's resize is then the identity
            path = export_adv_rad(model, directory, "openvino", size, "input", "model")
            self.graph: ov.Model = ov.Core().read_model(path)
            """The exported f32 graph: inputs ``input`` (images) and ``noise`` (eps), output ``pred_score``."""
        self._compile(precision, datamodule, threads)

    def at_precision(
        self, precision: str, datamodule: AnomalibDataModule | None = None, threads: int | None = None
    ) -> "OpenVINOScore":
        """The same exported graph compiled at ``precision`` (``"int8"``: its U-Net quantised on ``datamodule``)."""
        precision = check_precision(precision)
        check_calibration(CompressionType.INT8_PTQ if precision == "int8" else None, datamodule)
        other = copy(self)
        other._compile(precision, datamodule, threads)
        return other

    def _compile(self, precision: str, datamodule: AnomalibDataModule | None, threads: int | None) -> None:
        import openvino as ov

        graph = quantize_unet(self.graph.clone(), datamodule) if precision == "int8" else self.graph
        self.precision = precision
        core, config = ov.Core(), cpu_config(precision, threads)
        self.compiled: ov.CompiledModel = core.compile_model(graph, "CPU", config)
        self._requests = {None: self.compiled.create_infer_request()}
        if self.batch_size is not None:
            static = core.compile_model(static_batch(graph, self.batch_size), "CPU", config)
            self._requests[self.batch_size] = static.create_infer_request()

    def diffusion_noise(self, count: int) -> torch.Tensor:
        """``(num_noise_draws, count, C, H, W)`` eps of Alg. 1, drawn as the eager PyTorch model draws it."""
        draws, *image_shape = self.noise_shape
        template = torch.empty(count, *image_shape)
        return torch.stack([standard_normal_like(template) for _ in range(draws)])

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """Raw scores ``(N,)`` of images ``(N, C, H, W)`` in [0, 1], with fresh diffusion noise."""
        device = images.device
        if tuple(images.shape[-2:]) != self.noise_shape[-2:] and self.transform is not None:
            images = self.transform(images)
        feed = {
            "input": np.ascontiguousarray(images.detach().cpu().numpy(), dtype=np.float32),
            "noise": self.diffusion_noise(images.shape[0]).numpy(),
        }
        request = self._requests.get(images.shape[0], self._requests[None])
        scores = request.infer(feed)["pred_score"]
        return torch.from_numpy(np.array(scores, dtype=np.float32)).reshape(-1).to(device)
