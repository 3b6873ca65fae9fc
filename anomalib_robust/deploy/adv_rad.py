"""Export of AdvRAD's one-shot pipeline to Torch, ONNX and OpenVINO (AdvRAD paper, Alg. 1 and 4, appendix D.5).

The exported graph is the whole deployed detector: image in [0, 1] -> resize (pre-processor) -> diffuse to step k ->
U-Net -> one-shot x0 -> multi-scale error map -> deviation from the stored normal error map -> anomaly map and score
(-> anomalib's post-processor: normalised score, label and mask).

How the diffusion noise enters the graph (``noise``):

- ``"random"`` (default, what ``anomalib export`` writes): eps is drawn inside the graph, Box-Muller over one ONNX
  ``RandomUniformLike`` op (OpenVINO: ``RandomUniform``; not ``RandomNormalLike``, which OpenVINO turns into skewed
  noise, see :func:`~anomalib_robust.models.adv_rad.diffusion.standard_normal_like`), so every inference draws fresh
  N(0, I) noise as the PyTorch model does. This keeps the defence of the paper: the reconstruction is random, an
  attacker cannot precompute it and must use EOT (sec. 5.6). The graph has one input, ``input``, so anomalib's
  ``OpenVINOInferencer`` uses it unchanged. Scores vary from call to call like the PyTorch model's. OpenVINO
  seeds each compiled model afresh; ONNX Runtime seeds once per process (sessions of one process start from the
  same draw), so a server should call ``onnxruntime.set_seed`` with a secret random seed at start-up.
- ``"input"``: eps is a second graph input ``noise`` of shape ``(num_noise_draws, B, C, H, W)`` (H, W = the model's
  image size). For parity checks and for callers that manage their own randomness; a caller that feeds constant
  noise turns AdvRAD into a deterministic detector that white-box attacks without EOT can target, so do not deploy
  it with fixed noise. anomalib's inferencers feed one input only and cannot run this variant.

OpenVINO on CPUs with bf16 support computes in bf16 unless compiled with ``{"INFERENCE_PRECISION_HINT": "f32"}``
(e.g. ``OpenVINOInferencer(path, device="CPU", config=...)``); scores then move by ~3e-3 relative.

With ``noise="input"`` (the graph that :class:`~anomalib_robust.deploy.OpenVINOScore` certifies with), GroupNorm is
exported by :func:`onnx_translations` as per-channel reductions over the spatial axes and elementwise ops instead of
the exporter's Reshape -> InstanceNormalization -> Reshape: OpenVINO's CPU plugin then keeps the channels-last layout
of its convolutions through every norm instead of converting to the plain layout and back (``Reorder`` nodes, 13-22 %
of the f32 graph's time before, ~1 % after; ``benchmarks/export_speed.py --batches``). ``noise="random"`` keeps the
exporter's decomposition, so that it writes the same graph as ``anomalib export`` (which calls the model's
``to_openvino`` directly; INT8 calibration of the two must agree).

``compression_type`` is anomalib's OpenVINO compression; ``"int8_ptq"`` quantises the U-Net only, calibrated on the
training images of ``datamodule`` (:mod:`anomalib_robust.models.adv_rad.export`).

Example:
    >>> from anomalib_robust.deploy import export_adv_rad
    >>> export_adv_rad(model, "exported", export_type="openvino")  # doctest: +SKIP
    PosixPath('exported/weights/openvino/model.xml')
"""

from pathlib import Path
from tempfile import TemporaryDirectory
from typing import TYPE_CHECKING

import torch
from anomalib.data import AnomalibDataModule
from anomalib.deploy import CompressionType, ExportType
from anomalib.models.components.base.export_mixin.utils import create_export_root

from anomalib_robust.models.adv_rad.export import check_calibration, check_exportable, image_dynamic_shapes

if TYPE_CHECKING:
    from anomalib_robust.models.adv_rad.lightning_model import AdvRAD

NOISE_MODES = ("random", "input")
EXPORT_TYPES = (ExportType.TORCH, ExportType.ONNX, ExportType.OPENVINO)


def export_adv_rad(
    model: "AdvRAD",
    export_root: Path | str,
    export_type: ExportType | str = ExportType.OPENVINO,
    input_size: tuple[int, int] | None = None,
    noise: str = "random",
    model_file_name: str = "model",
    compression_type: CompressionType | str | None = None,
    datamodule: AnomalibDataModule | None = None,
) -> Path:
    """Export a fitted AdvRAD; returns the path of the written model file.

    Args:
        model (AdvRAD): A fitted AdvRAD (trained, or loaded from a checkpoint).
        export_root (Path | str): Directory; files go to ``<export_root>/weights/<export_type>/``.
        export_type (ExportType | str): ``"torch"``, ``"onnx"`` or ``"openvino"``. Defaults to ``"openvino"``.
        input_size (tuple[int, int] | None): Fixed (H, W) of the graph input; ``None`` keeps H and W dynamic (the
            pre-processor resizes). Defaults to ``None``.
        noise (str): ``"random"`` (in-graph noise) or ``"input"`` (noise as a second input), see the module
            docstring. Defaults to ``"random"``.
        model_file_name (str): File name without extension. Defaults to ``"model"``.
        compression_type (CompressionType | str | None): OpenVINO only: ``"fp16"``, ``"int8"`` (weights),
            ``"int8_ptq"`` (U-Net quantised to INT8, see :mod:`anomalib_robust.models.adv_rad.export`) or ``"int8_acq"``
            (anomalib's accuracy-controlled quantisation). Defaults to ``None`` (f32).
        datamodule (AnomalibDataModule | None): Calibration images for ``"int8_ptq"``/``"int8_acq"``: the datamodule
            the model was trained on. Defaults to ``None``.
    """
    try:
        export_type = ExportType(export_type)
    except ValueError:
        export_type = None
    if export_type not in EXPORT_TYPES:
        msg = f"export_type must be one of {[str(kind.value) for kind in EXPORT_TYPES]}, got {export_type!r}"
        raise ValueError(msg)
    if noise not in NOISE_MODES:
        msg = f"noise must be one of {NOISE_MODES}, got {noise!r}"
        raise ValueError(msg)
    if compression_type is not None:
        if compression_type not in {kind.value for kind in CompressionType}:
            msg = (
                f"compression_type must be one of {[kind.value for kind in CompressionType]}, got {compression_type!r}"
            )
            raise ValueError(msg)
        if export_type != ExportType.OPENVINO:
            msg = f"compression_type applies to OpenVINO exports only, got export_type={export_type.value!r}"
            raise ValueError(msg)
        compression_type = CompressionType(compression_type)
    check_calibration(compression_type, datamodule)
    check_exportable(model, input_size)
    if noise == "random":
        if export_type == ExportType.TORCH:
            return model.to_torch(export_root, model_file_name)
        if export_type == ExportType.ONNX:
            return model.to_onnx(export_root, model_file_name, input_size)
        return model.to_openvino(
            export_root, model_file_name, input_size, compression_type=compression_type, datamodule=datamodule
        )
    if export_type == ExportType.TORCH:
        msg = "noise='input' applies to ONNX and OpenVINO graphs; a Torch export takes noise as forward(batch, noise)"
        raise ValueError(msg)
    if export_type == ExportType.ONNX:
        return _onnx_with_noise_input(
            model, create_export_root(export_root, ExportType.ONNX), model_file_name, input_size
        )
    import openvino as ov  # optional dependency: the ``openvino`` extra

    with TemporaryDirectory() as onnx_directory:
        onnx_path = _onnx_with_noise_input(model, Path(onnx_directory), model_file_name, input_size)
        ov_model = ov.convert_model(onnx_path)
        if compression_type not in {None, CompressionType.FP16}:
            # the model's own compression dispatch, as in to_openvino (INT8_PTQ: the U-Net only)
            ov_model = model._compress_ov_model(ov_model, compression_type, datamodule)
        ov_model_path = create_export_root(export_root, ExportType.OPENVINO) / f"{model_file_name}.xml"
        # as anomalib's to_openvino: f32 weights unless FP16 compression is asked for
        ov.save_model(ov_model, ov_model_path, compress_to_fp16=compression_type == CompressionType.FP16)
    return ov_model_path


def _onnx_with_noise_input(
    model: "AdvRAD",
    directory: Path,
    model_file_name: str,
    input_size: tuple[int, int] | None,
    layout_preserving_group_norm: bool = True,
) -> Path:
    """ONNX graph of ``model(input, noise)`` with a dynamic batch (and dynamic H, W when ``input_size`` is None).

    ``layout_preserving_group_norm=False`` keeps the exporter's GroupNorm decomposition (for benchmarks only).
    """
    model.eval()
    # a dynamic example must differ from the U-Net's size, or the exporter specialises the resize away
    height, width = input_size or tuple(2 * side for side in model.model.image_size)
    images = torch.rand(2, model.model.in_channels, height, width, device=model.device)
    noise_shape = (model.model.num_noise_draws, 2, model.model.in_channels, *model.model.image_size)
    noise = torch.randn(noise_shape, device=model.device)
    outputs = model(images, noise)
    output_names = [name for name, value in outputs._asdict().items() if value is not None]
    image_shape = image_dynamic_shapes(input_size)
    onnx_path = directory / f"{model_file_name}.onnx"
    torch.onnx.export(
        model,
        (images, noise),
        str(onnx_path),
        input_names=["input", "noise"],
        output_names=output_names,
        dynamo=True,
        opset_version=18,
        dynamic_shapes={"batch": image_shape, "noise": {1: image_shape[0]}},
        custom_translation_table=onnx_translations() if layout_preserving_group_norm else None,
    )
    return onnx_path


def onnx_translations() -> dict:
    """``custom_translation_table`` of ``torch.onnx.export``: ``aten.group_norm`` as layout-preserving ops.

    GroupNorm (Wu and He, "Group Normalization", ECCV 2018, sec. 3.1: mean and variance over the spatial positions
    and the channels of each of G groups, then the per-channel affine gamma, beta) written so that no op reshapes the
    feature map itself:

    - mean: ``ReduceMean`` over the spatial axes per channel ``(N, C, 1, ...)``, then the mean of each group's C / G
      channel means (equal counts, so the exact group mean), broadcast back to ``(N, C, 1, ...)``;
    - variance: the same two steps on ``(x - mean)^2`` (two passes, as PyTorch, no E[x^2] - E[x]^2 cancellation);
    - output ``x * a + b`` with ``a = gamma / sqrt(var + eps)`` and ``b = beta - mean * a``, per channel.

    Only the small ``(N, C, 1, ...)`` statistics are reshaped to ``(N, G, C / G)``; the feature map passes through
    reductions and elementwise ops, which OpenVINO's CPU plugin runs in the channels-last layout of its convolutions
    (the exporter's Reshape -> InstanceNormalization -> Reshape, and ONNX ``GroupNormalization`` in opset 21, need
    the plain layout and cost a layout conversion before and after every norm). Scores equal PyTorch's to ~5e-7
    relative in f32 (``benchmarks/export_speed.py --batches``).
    """
    from onnxscript import opset18 as op  # noqa: PLC0415  # torch.onnx's dynamo exporter depends on onnxscript

    def group_norm(
        input: "op.FLOAT",  # noqa: A002  # the name of aten.group_norm's argument
        num_groups: int,
        weight: "op.FLOAT | None" = None,
        bias: "op.FLOAT | None" = None,
        eps: float = 1e-5,
        cudnn_enabled: bool = True,  # noqa: ARG001, FBT001, FBT002  # aten.group_norm's signature
    ) -> "op.FLOAT":
        rank = len(input.shape)
        spatial = op.Constant(value_ints=list(range(2, rank)))
        grouped_shape = op.Constant(value_ints=[0, num_groups, -1])
        within_group = op.Constant(value_ints=[2])
        channel_axes = op.Constant(value_ints=list(range(1, rank - 1)))  # (C,) -> (C, 1, ...)

        def group_mean(per_channel: "op.FLOAT") -> "op.FLOAT":
            """(N, C, 1, ...) -> the mean over each group's channels, broadcast back to (N, C, 1, ...)."""
            grouped = op.Reshape(per_channel, grouped_shape)
            mean = op.ReduceMean(grouped, within_group, keepdims=1)
            return op.Reshape(op.Expand(mean, op.Shape(grouped)), op.Shape(per_channel))

        mean = group_mean(op.ReduceMean(input, spatial, keepdims=1))
        centred = op.Sub(input, mean)
        variance = group_mean(op.ReduceMean(op.Mul(centred, centred), spatial, keepdims=1))
        scale = op.Reciprocal(op.Sqrt(op.Add(variance, op.CastLike(eps, input))))
        if weight is not None:
            scale = op.Mul(scale, op.Unsqueeze(weight, channel_axes))
        shift = op.Mul(mean, scale)
        shift = op.Neg(shift) if bias is None else op.Sub(op.Unsqueeze(bias, channel_axes), shift)
        return op.Add(op.Mul(input, scale), shift)

    return {torch.ops.aten.group_norm.default: group_norm}
