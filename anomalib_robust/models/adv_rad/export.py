"""What AdvRAD's own export needs: the exportability checks and the INT8 quantisation of its U-Net.

AdvRAD exports its one-shot pipeline (AdvRAD paper, Alg. 1 and 4, appendix D.5) through anomalib's ``to_torch``,
``to_onnx`` and ``to_openvino``; :func:`check_exportable` and :func:`check_calibration` turn what cannot be exported
into clear errors first. :mod:`anomalib_robust.deploy` builds on these for the variant with a noise input.

INT8 post-training quantisation (``compression_type=INT8_PTQ``, :func:`quantize_unet`) quantises the U-Net only: NNCF
quantises the weights and inputs of the graph's ``Convolution`` and ``MatMul`` ops, which are all in the U-Net, and an
``IgnoredScope`` keeps every other op type in floating point. The rest of the graph is the diffusion arithmetic of
Alg. 1 (``x_t = sqrt(a_k) x_0 + sqrt(1 - a_k) eps`` and the one-shot ``x_0``) and the multi-scale error map of Alg. 4:
differences of nearly equal images whose small values are the anomaly score. Quantised with NNCF's defaults (every
quantisable op), the scores of the CPU preset trained on Fashion-MNIST correlated only 0.77 with f32 (normalised scores
moved by up to 0.49); with the U-Net alone, 0.9998 (up to 0.014).

Calibration runs the whole graph on the training images of the datamodule, the normal images the model was fit on
(Alg. 4 line 9 averages their error maps into the stored normal map), in their stored order (not the shuffled
training order: NNCF averages per-batch ranges, so the batches' composition would change the quantiser). It is
deterministic: the in-graph noise ops (``RandomUniform``) draw from :data:`CALIBRATION_NOISE_SEED` while NNCF
calibrates and draw fresh noise again in the returned graph; a graph with a ``noise`` input
(``export_adv_rad(..., noise="input")``) gets Gaussian noise from the same seed.

Example:
    >>> from anomalib.deploy import CompressionType
    >>> model.to_openvino("exported", compression_type=CompressionType.INT8_PTQ, datamodule=datamodule)
    ... # doctest: +SKIP
    PosixPath('exported/weights/openvino/model.xml')
"""

from typing import TYPE_CHECKING

import numpy as np
import torch
from anomalib.data import AnomalibDataModule, Batch
from anomalib.deploy import CompressionType

if TYPE_CHECKING:
    import nncf
    import openvino as ov

    from anomalib_robust.models.adv_rad.lightning_model import AdvRAD

QUANTIZED_OP_TYPES = ("Convolution", "MatMul")
CALIBRATED_COMPRESSION = (CompressionType.INT8_PTQ, CompressionType.INT8_ACQ)
CALIBRATION_NOISE_SEED = 0
UPSAMPLE_BRANCH_BATCH = 64
"""diffusers' ``Upsample2D`` calls ``.contiguous()`` from this batch size on, and the exporter's tracer guards on that
branch: a batch dimension without this bound fails the first trace, and ``torch.onnx.export`` traces the whole model a
second time with it. Both sides of the branch compute the same values and ONNX keeps no bound, so the exported graph
runs at any batch (``tests/integration/adv_rad/test_export.py``)."""


def check_exportable(model: "AdvRAD", input_size: tuple[int, int] | None = None) -> None:
    """Raise a clear error when ``model`` cannot be exported as the one-shot pipeline at ``input_size``.

    Needs the normal error map of Alg. 4 (a fitted model) and one-shot reconstruction (Alg. 1). Without a resizing
    pre-processor the graph only takes the U-Net's own image size, so ``input_size`` must be that size.
    """
    model.model.check_fitted()
    if model.model.reconstruction != "one_shot":
        msg = (
            f"only one-shot reconstruction (Alg. 1) can be exported, got reconstruction="
            f"{model.model.reconstruction!r}; call model.set_reconstruction(reconstruction='one_shot') first"
        )
        raise ValueError(msg)
    if input_size is not None and (len(input_size) != 2 or any(int(side) < 1 for side in input_size)):
        msg = f"input_size must be (height, width) with positive sides, got {input_size}"
        raise ValueError(msg)
    transform = model.pre_processor.transform if model.pre_processor else None
    if transform is None:
        image_size = tuple(model.model.image_size)
        if input_size is None or tuple(input_size) != image_size:
            msg = (
                f"AdvRAD has no resizing pre-processor, so the exported graph only takes {image_size} images: pass "
                f"input_size={image_size} (got {input_size}; None means a dynamic size the U-Net cannot take)"
            )
            raise ValueError(msg)


def image_dynamic_shapes(input_size: tuple[int, int] | None) -> dict[int, torch.export.Dim]:
    """``dynamic_shapes`` entry of the image input: a dynamic batch, and dynamic H and W unless ``input_size`` fixes
    them. The batch is declared below :data:`UPSAMPLE_BRANCH_BATCH`, so the exporter traces the model once."""
    batch = torch.export.Dim("batch", max=UPSAMPLE_BRANCH_BATCH - 1)
    if input_size:
        return {0: batch}
    return {0: batch, 2: torch.export.Dim("height"), 3: torch.export.Dim("width")}


def check_calibration(compression_type: CompressionType | str | None, datamodule: AnomalibDataModule | None) -> None:
    """Raise a clear error when ``compression_type`` needs calibration images and ``datamodule`` is missing."""
    if compression_type is None or CompressionType(compression_type) not in CALIBRATED_COMPRESSION:
        return
    if datamodule is None:
        msg = (
            f"compression_type={CompressionType(compression_type).value} calibrates on images: pass the datamodule "
            f"the model was trained on (Python: datamodule=..., CLI: --data <datamodule>)"
        )
        raise ValueError(msg)


def unet_scope(model: "ov.Model") -> "nncf.IgnoredScope":
    """An ``IgnoredScope`` of every op type of ``model`` except :data:`QUANTIZED_OP_TYPES` (the U-Net's)."""
    import nncf  # optional dependency: the ``openvino`` extra

    types = sorted({op.get_type_name() for op in model.get_ordered_ops()} - set(QUANTIZED_OP_TYPES))
    return nncf.IgnoredScope(types=types, validate=False)


def calibration_dataset(model: "ov.Model", datamodule: AnomalibDataModule) -> "nncf.Dataset":
    """The datamodule's training batches as inputs of ``model`` (plus seeded noise when it has a ``noise`` input)."""
    import nncf
    from torch.utils.data import DataLoader

    datamodule.setup("fit")
    data = datamodule.train_data
    loader = DataLoader(data, batch_size=datamodule.train_batch_size, shuffle=False, collate_fn=data.collate_fn)
    noise_inputs = [port for port in model.inputs if port.get_any_name() == "noise"]
    generator = np.random.default_rng(CALIBRATION_NOISE_SEED)

    def transform(batch: Batch) -> dict[str, np.ndarray]:
        images = batch.image.numpy()
        if not noise_inputs:
            return {"input": images}
        shape = noise_inputs[0].partial_shape  # (num_noise_draws, batch, C, H, W), only the batch is dynamic
        draws, channels, height, width = (shape[axis].get_length() for axis in (0, 2, 3, 4))
        noise = generator.standard_normal((draws, images.shape[0], channels, height, width), dtype=np.float32)
        return {"input": images, "noise": noise}

    return nncf.Dataset(loader, transform)


def quantize_unet(model: "ov.Model", datamodule: AnomalibDataModule | None) -> "ov.Model":
    """INT8 post-training quantisation of the U-Net of an exported AdvRAD graph, calibrated on ``datamodule``.

    Weights are quantised to 7 bits in every layer (NNCF's ``OverflowFix.ENABLE``; its default fixes the first layer
    only): CPUs without VNNI (AVX2 and AVX-512 without VNNI) multiply u8 activations by s8 weights with ``vpmaddubsw``,
    which sums pairs of products into int16 and saturates with 8-bit weights. Measured on the test suite's tiny
    checkpoint on an AVX2 CPU, correlation of INT8 with f32 over 24 scores / their anomaly maps: 0.928 / 0.928 with no
    fix, 0.972 / 0.958 with the first layer fixed, 0.9987 / 0.9979 with every layer fixed. The exported graph may run
    on a different CPU from the one that exported it, so the fix is not chosen by the exporting CPU.
    """
    import nncf
    from nncf.quantization.advanced_parameters import AdvancedQuantizationParameters, OverflowFix

    check_calibration(CompressionType.INT8_PTQ, datamodule)
    seeds = _random_op_seeds(model)
    _seed_random_ops(model, [(CALIBRATION_NOISE_SEED, rank) for rank in range(1, len(seeds) + 1)])
    try:
        quantized = nncf.quantize(
            model,
            calibration_dataset(model, datamodule),
            ignored_scope=unet_scope(model),
            advanced_parameters=AdvancedQuantizationParameters(overflow_fix=OverflowFix.ENABLE),
        )
    finally:
        _seed_random_ops(model, seeds)
    _seed_random_ops(quantized, seeds)  # the quantised copy draws as the original did (fresh noise when unseeded)
    return quantized


def _random_op_seeds(model: "ov.Model") -> list[tuple[int, int]]:
    """``(global_seed, op_seed)`` of every ``RandomUniform`` op of ``model``, in graph order."""
    attributes = [op.get_attributes() for op in model.get_ordered_ops() if op.get_type_name() == "RandomUniform"]
    return [(int(attribute["global_seed"]), int(attribute["op_seed"])) for attribute in attributes]


def _seed_random_ops(model: "ov.Model", seeds: list[tuple[int, int]]) -> None:
    """Set the ``(global_seed, op_seed)`` of the ``RandomUniform`` ops of ``model``, in graph order."""
    random_ops = [op for op in model.get_ordered_ops() if op.get_type_name() == "RandomUniform"]
    for op, (global_seed, op_seed) in zip(random_ops, seeds, strict=True):
        op.set_attribute("global_seed", global_seed)
        op.set_attribute("op_seed", op_seed)
