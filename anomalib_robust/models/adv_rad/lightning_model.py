"""AdvRAD: Adversarially Robust Anomaly Detection through diffusion-model robust reconstruction.

Paper (the AdvRAD paper): Cao, Lin and Chen, "Adversarially Robust Industrial Anomaly Detection Through Diffusion
Model". A DDPM trained on normal images reconstructs a test image from diffusion step k; the Gaussian noise dominates
both the anomaly and any adversarial perturbation, so the reconstruction "repairs" both and the reconstruction error
stays a robust anomaly score (sec. 4.3, Alg. 1-4).

Example:
    >>> from anomalib.engine import Engine
    >>> from anomalib_robust import AdvRAD
    >>> from anomalib_robust.data import FashionMNIST
    >>> model = AdvRAD(image_size=(32, 32), base_channels=32, channel_mult=(1, 2, 2, 2))
    >>> engine = Engine(max_epochs=100, check_val_every_n_epoch=100)
    >>> engine.fit(model, datamodule=FashionMNIST())  # doctest: +SKIP
    >>> engine.test(model, datamodule=FashionMNIST())  # doctest: +SKIP

From the CLI (the plugin is loaded automatically once installed):

    anomalib train --model AdvRAD --data MVTecAD --data.category bottle
    anomalib train --config configs/model/adv_rad_cpu.yaml
"""

import copy
import logging
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from anomalib import LearningType
from anomalib.data import AnomalibDataModule, Batch, InferenceBatch
from anomalib.deploy import CompressionType
from anomalib.metrics import Evaluator
from anomalib.models.components import AnomalibModule
from anomalib.post_processing import PostProcessor
from anomalib.pre_processing import PreProcessor
from anomalib.visualization import Visualizer
from lightning.pytorch.utilities.types import STEP_OUTPUT
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms.v2 import Resize

from anomalib_robust.models.adv_rad.export import (
    check_calibration,
    check_exportable,
    image_dynamic_shapes,
    quantize_unet,
)
from anomalib_robust.models.adv_rad.reconstruction import uniform_step_schedule
from anomalib_robust.models.adv_rad.scoring import DEFAULT_SCALES
from anomalib_robust.models.adv_rad.selection import CHECKPOINT_KEY, DiffusionStepChoice
from anomalib_robust.models.adv_rad.torch_model import AdvRADModel
from anomalib_robust.models.components import CheckpointArchitectureMixin, ScoringStepsMixin

if TYPE_CHECKING:
    import openvino as ov

logger = logging.getLogger(__name__)

NORMAL_STATISTICS_SEED = 0

CPU_PRESET = {
    "image_size": (32, 32),
    "base_channels": 32,
    "channel_mult": (1, 2, 2, 2),
    "layers_per_block": 1,
    "attention_resolutions": (16,),
    "learning_rate": 1e-3,
    "mean_filter_size": 5,
}
"""A 1.6 M-parameter U-Net at 32 x 32 that trains in minutes on a CPU (``configs/model/adv_rad_cpu.yaml``).

Everything else keeps the paper's values; the learning rate is 10x the paper's so that ~1.3k iterations suffice
instead of 30k, and the mean filter (whose size the paper does not state) is 5 x 5, which measured best of 1, 3, 5 on
Fashion-MNIST at 32 x 32.
"""


class AdvRAD(CheckpointArchitectureMixin, ScoringStepsMixin, AnomalibModule):
    """AdvRAD anomaly detector (AdvRAD paper) as an anomalib model.

    Defaults are the paper's (256 x 256, 128-channel U-Net with attention at 16 x 16 and one head, T = 1000, linear
    schedule, hybrid loss with lambda = 0.001, Adam lr 1e-4, k = 100, one-shot reconstruction). Train with batch size 2
    for 30k iterations to match appendix C.1 (``--data.train_batch_size 2 --trainer.max_steps 30000``);
    ``configs/model/adv_rad_cpu.yaml`` is a small preset that trains in minutes on a CPU.

    Images enter in [0, 1]; the pre-processor only resizes (no ImageNet normalisation), the torch model maps to
    [-1, 1]. The reconstruction method, k, the mean filter and the noise draws are inference-time choices: change k,
    s and the draws on a trained model with :meth:`set_inference` (which recomputes the normal error map of Alg. 4),
    the reconstruction method with :meth:`set_reconstruction`. :class:`~anomalib_robust.callbacks.SelectDiffusionStep`
    chooses k and s at the end of training from held-out training images; a checkpoint keeps that choice
    (:attr:`diffusion_step_choice`), and loading it restores the chosen k and s whatever the init args say.

    Args:
        image_size (Sequence[int]): Size the pre-processor resizes to, and the U-Net's input. Defaults to (256, 256).
        in_channels (int): Image channels. Defaults to ``3``.
        base_channels (int): Channels of the first U-Net level. Defaults to ``128``.
        channel_mult (Sequence[int]): Channel multiplier per U-Net level. Defaults to ``(1, 1, 2, 2, 4, 4)``.
        layers_per_block (int): Residual blocks per level. Defaults to ``2``.
        attention_resolutions (Sequence[int]): Feature-map sizes with self-attention. Defaults to ``(16,)``.
        num_heads (int): Attention heads. Defaults to ``1``.
        dropout (float): Dropout in residual blocks. Defaults to ``0.0``.
        num_timesteps (int): Diffusion steps T. Defaults to ``1000``.
        beta_schedule (str): ``"linear"`` or ``"cosine"``. Defaults to ``"linear"``.
        vb_weight (float): lambda of the hybrid loss. Defaults to ``0.001``.
        learning_rate (float): Adam learning rate. Defaults to ``1e-4``.
        diffusion_step (int): k. Defaults to ``100``.
        reconstruction (str): ``"one_shot"``, ``"arbitrary_shot"`` or ``"full_shot"``. Defaults to ``"one_shot"``.
        step_schedule (Sequence[int] | None): S for ``"arbitrary_shot"``. Defaults to ``None``.
        scales (Sequence[float]): Scale schedule of Alg. 4. Defaults to ``(1, 0.5, 0.25, 0.125)``.
        mean_filter_size (int): Mean filter size s of Alg. 4. Defaults to ``3``.
        num_noise_draws (int): Noise draws averaged per image at inference. Defaults to ``1``.
        clip_denoised (bool): Clamp the predicted x_0 of arbitrary- and full-shot reconstructions to [-1, 1] (an
            inference-time choice, as ``improved-diffusion``). Defaults to ``False``.
        noise_seed (int | None): Seed for the inference noise of validation, test and predict runs (reproducible
            evaluation); ``None`` draws fresh noise every time, which is part of the defence. Defaults to ``None``.
        pre_processor, post_processor, evaluator, visualizer: anomalib components (``True`` for the defaults).
    """

    TORCH_MODEL = AdvRADModel
    ARCHITECTURE_ARGS = (
        "image_size",
        "in_channels",
        "base_channels",
        "channel_mult",
        "layers_per_block",
        "attention_resolutions",
        "num_heads",
        "num_timesteps",
        "beta_schedule",
    )
    CPU_PRESET = CPU_PRESET

    def __init__(
        self,
        image_size: Sequence[int] = (256, 256),
        in_channels: int = 3,
        base_channels: int = 128,
        channel_mult: Sequence[int] = (1, 1, 2, 2, 4, 4),
        layers_per_block: int = 2,
        attention_resolutions: Sequence[int] = (16,),
        num_heads: int = 1,
        dropout: float = 0.0,
        num_timesteps: int = 1000,
        beta_schedule: str = "linear",
        vb_weight: float = 1e-3,
        learning_rate: float = 1e-4,
        diffusion_step: int = 100,
        reconstruction: str = "one_shot",
        step_schedule: Sequence[int] | None = None,
        scales: Sequence[float] = DEFAULT_SCALES,
        mean_filter_size: int = 3,
        num_noise_draws: int = 1,
        clip_denoised: bool = False,
        noise_seed: int | None = None,
        pre_processor: PreProcessor | bool = True,
        post_processor: PostProcessor | bool = True,
        evaluator: Evaluator | bool = True,
        visualizer: Visualizer | bool = True,
    ) -> None:
        if pre_processor is True:
            pre_processor = self.configure_pre_processor(tuple(image_size))
        super().__init__(
            pre_processor=pre_processor,
            post_processor=post_processor,
            evaluator=evaluator,
            visualizer=visualizer,
        )
        self.learning_rate = learning_rate
        self.noise_seed = noise_seed
        self.model = self._build_model(self.hparams)
        self._noise_generator: torch.Generator | None = None
        self._statistics_step: int | None = None
        self.diffusion_step_choice: DiffusionStepChoice | None = None
        """The automatic choice of k and s with every candidate's numbers, when one was made (saved in checkpoints)."""

    @classmethod
    def configure_pre_processor(cls, image_size: tuple[int, int] | None = None) -> PreProcessor:
        """Resize to the model's input size; no normalisation (AdvRAD works on [0, 1] images, mapped to [-1, 1])."""
        return PreProcessor(transform=Resize(image_size or (256, 256), antialias=True))

    def set_reconstruction(
        self,
        diffusion_step: int | None = None,
        reconstruction: str | None = None,
        step_schedule: Sequence[int] | None = None,
    ) -> None:
        """Switch k and/or the reconstruction algorithm of a trained model (no retraining)."""
        diffusion_step = diffusion_step or self.model.diffusion_step
        reconstruction = reconstruction or self.model.reconstruction
        self.model.set_reconstruction(diffusion_step, reconstruction, step_schedule)
        self.hparams.update(diffusion_step=diffusion_step, reconstruction=reconstruction, step_schedule=step_schedule)

    def set_inference(
        self,
        diffusion_step: int | None = None,
        mean_filter_size: int | None = None,
        num_noise_draws: int | None = None,
        normal_images: AnomalibDataModule | Iterable[Batch] | None = None,
    ) -> None:
        """Set k, the mean filter size s and the noise draws of a trained model (no retraining: the U-Net is shared).

        The normal error map of Alg. 4 line 9 belongs to one k and one s, so a fitted model recomputes it from
        ``normal_images`` when either changes: the training datamodule (its training split is read as test images
        are, see :func:`read_as_test_images`) or batches of training images; ``None`` for the trainer's datamodule.
        The noise draws leave the map as it is (it is the mean error of the normal images over the noise).
        ``None`` keeps a setting. Nothing changes when an argument is invalid.

        Example:
            >>> model = AdvRAD.load_from_checkpoint("model.ckpt")  # doctest: +SKIP
            >>> model.set_inference(diffusion_step=50, mean_filter_size=3, normal_images=datamodule)  # doctest: +SKIP
        """
        model = self.model
        old_step, old_schedule, old_size, old_draws = (
            model.diffusion_step, model.step_schedule, model.mean_filter_size, model.num_noise_draws
        )  # fmt: skip
        diffusion_step = old_step if diffusion_step is None else diffusion_step
        mean_filter_size = old_size if mean_filter_size is None else mean_filter_size
        num_noise_draws = old_draws if num_noise_draws is None else num_noise_draws
        changes_map = (diffusion_step, mean_filter_size) != (old_step, old_size)
        refit = changes_map and (bool(model.is_fitted) or normal_images is not None)
        try:
            model.set_scoring(mean_filter_size, num_noise_draws)
            schedule = old_schedule if diffusion_step == old_step else None  # arbitrary shot: a new k needs one
            model.set_reconstruction(diffusion_step, model.reconstruction, schedule)
            if refit and normal_images is None and self._trainer is None:
                msg = (
                    "set_inference changes k or the mean filter size of a fitted model: pass normal_images (the "
                    "training datamodule, or batches of the training images) to recompute the normal error map of "
                    "Alg. 4"
                )
                raise ValueError(msg)
            if refit:
                self.fit_normal_statistics(normal_images)
        except Exception:
            model.set_scoring(old_size, old_draws)
            model.set_reconstruction(old_step, model.reconstruction, old_schedule)
            raise
        self.hparams.update(
            diffusion_step=diffusion_step, mean_filter_size=mean_filter_size, num_noise_draws=num_noise_draws
        )

    def forward(self, batch: torch.Tensor, noise: torch.Tensor | None = None) -> InferenceBatch:
        """Exported pipeline: pre-processor -> torch model -> post-processor, for images in [0, 1].

        ``noise`` fixes the diffusion noise (``(num_noise_draws, B, C, H, W)``); ``None`` draws it in the graph.
        See :mod:`anomalib_robust.deploy.adv_rad`.
        """
        batch = self.pre_processor(batch) if self.pre_processor else batch
        predictions = self.model(batch, noise=noise)
        return self.post_processor(predictions) if self.post_processor else predictions

    def to_torch(self, export_root: Path | str, model_file_name: str = "model") -> Path:
        """Save the whole pipeline for ``TorchInferencer``; a fitted model only."""
        check_exportable(self)
        return super().to_torch(export_root, model_file_name)

    def to_onnx(
        self,
        export_root: Path | str,
        model_file_name: str = "model",
        input_size: tuple[int, int] | None = None,
        **kwargs: Any,
    ) -> Path:
        """ONNX graph of the one-shot pipeline with in-graph noise (``RandomUniformLike``); a fitted model only.

        Opset 18 by default: the antialiased resize of the pre-processor has no exact form in older opsets.
        """
        check_exportable(self, input_size)
        kwargs.setdefault("opset_version", 18)
        kwargs.setdefault("dynamic_shapes", (image_dynamic_shapes(input_size),))
        return super().to_onnx(export_root, model_file_name, input_size, **kwargs)

    def to_openvino(
        self,
        export_root: Path | str,
        model_file_name: str = "model",
        input_size: tuple[int, int] | None = None,
        compression_type: CompressionType | None = None,
        datamodule: AnomalibDataModule | None = None,
        **kwargs: Any,
    ) -> Path:
        """OpenVINO IR of the one-shot pipeline; a fitted model, and calibration data for INT8 quantisation.

        ``compression_type=INT8_PTQ`` quantises the U-Net only (:mod:`anomalib_robust.models.adv_rad.export`).
        """
        check_exportable(self, input_size)
        check_calibration(compression_type, datamodule)
        return super().to_openvino(export_root, model_file_name, input_size, compression_type, datamodule, **kwargs)

    def _compress_ov_model(
        self,
        model: "ov.Model",
        compression_type: CompressionType | None = None,
        datamodule: AnomalibDataModule | None = None,
        *args: Any,
        **kwargs: Any,
    ) -> "ov.Model":
        """INT8_PTQ quantises the U-Net only (the error-map arithmetic stays float); other types as anomalib."""
        if compression_type == CompressionType.INT8_PTQ:
            return quantize_unet(model, datamodule)
        return super()._compress_ov_model(model, compression_type, datamodule, *args, **kwargs)

    def training_step(self, batch: Batch, *args, **kwargs) -> STEP_OUTPUT:
        """One step of the hybrid objective (eq. 10)."""
        del args, kwargs  # These variables are not used.
        losses = self.model(batch.image)
        batch_size = batch.image.shape[0]
        self.log("train_loss", losses["loss"], on_epoch=True, prog_bar=True, logger=True, batch_size=batch_size)
        self.log_dict(
            {"train_loss_simple": losses["simple"], "train_loss_vb": losses["vb"]},
            on_epoch=True,
            batch_size=batch_size,
        )
        return {"loss": losses["loss"]}

    def _predict(self, batch: Batch) -> Batch:
        predictions = self.model(batch.image, generator=self._noise_generator)
        return batch.update(**predictions._asdict())

    @torch.no_grad()
    def fit_normal_statistics(self, normal_images: AnomalibDataModule | Iterable[Batch] | None = None) -> None:
        """Mean Err_ms of the normal training images with the current weights (Alg. 4 line 9), stored as a buffer.

        The images are those of ``normal_images`` (a datamodule's training split, or batches), by default the
        trainer's, read as test images are (:meth:`_normal_images`), without the training augmentations, and
        scored with seeded noise so that the statistics of a given checkpoint are reproducible. Under DDP every rank
        goes through the whole training set (the dataloader is built outside Lightning's loops, so it is not sharded)
        and computes the same statistics from the same synchronised weights.
        """
        if isinstance(normal_images, AnomalibDataModule):
            normal_images = read_as_test_images(normal_images)
        dataloader = self._normal_images() if normal_images is None else normal_images
        if dataloader is None:
            msg = "AdvRAD needs the training dataloader to compute the normal error statistics of Alg. 4"
            raise RuntimeError(msg)
        was_training = self.model.training
        self.model.eval()
        generator = torch.Generator(device=self.device).manual_seed(NORMAL_STATISTICS_SEED)
        total, count = torch.zeros_like(self.model.normal_error_map), 0
        for batch in dataloader:
            images = batch.image.to(self.device)
            if self.pre_processor is not None and self.pre_processor.transform is not None:
                images = self.pre_processor.transform(images)
            total += self.model.error_map(images, generator).sum(dim=0, keepdim=True)
            count += images.shape[0]
        self.model.set_normal_error_map(total / count)
        self.model.train(was_training)
        self._statistics_step = self.global_step

    def _normal_images(self) -> Iterable[Batch] | None:
        """The normal training images, transformed as the test images are (without the training augmentations).

        The normal error map is subtracted from the error maps of test images, so it is computed from the training
        images as the test images arrive: an anomalib datamodule's training set is re-read with the augmentations of
        its test set (which anomalib composes with the model's resize). Other datamodules, and dataloaders given to
        ``fit`` directly, are used as they are.
        """
        datamodule = getattr(self.trainer, "datamodule", None)
        if not isinstance(datamodule, AnomalibDataModule):
            return datamodule.train_dataloader() if datamodule is not None else self.trainer.train_dataloader
        return read_as_test_images(datamodule)

    def on_validation_start(self) -> None:
        """Refresh the normal error statistics when the weights changed since they were computed."""
        if self.trainer.state.fn == "fit" and self._statistics_step != self.global_step:
            self.fit_normal_statistics()
        self._start_inference()

    def on_train_end(self) -> None:
        """Make sure the final weights come with their statistics, even when training ends without a validation."""
        if self._statistics_step != self.global_step:
            self.fit_normal_statistics()

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """A checkpoint written during training always carries the normal statistics of its own weights."""
        if self.trainer.state.fn == "fit" and self._statistics_step != self.global_step:
            self.fit_normal_statistics()
            for name, buffer in self.model.named_buffers(prefix="model"):
                if name in checkpoint["state_dict"]:
                    checkpoint["state_dict"][name] = buffer.clone()
        if self.diffusion_step_choice is not None:
            checkpoint[CHECKPOINT_KEY] = self.diffusion_step_choice.to_dict()
        super().on_save_checkpoint(checkpoint)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Rebuild the architecture of the checkpoint (see the mixin); restore its automatic choice of k and s.

        The checkpoint's normal error map was computed at the chosen k and s, so they win over the init args
        (``anomalib test --model AdvRAD --ckpt_path ...`` builds the model with the default k = 100). An arbitrary-shot
        ``step_schedule`` of the init args that starts at another k is re-spaced to start at the chosen one, with the
        same number of denoising steps (:func:`uniform_step_schedule`), and the log says so.
        """
        super().on_load_checkpoint(checkpoint)
        if CHECKPOINT_KEY not in checkpoint:
            return
        choice = DiffusionStepChoice.from_dict(checkpoint[CHECKPOINT_KEY])
        self.model.set_scoring(choice.mean_filter_size, self.model.num_noise_draws)  # the map: in the state dict
        schedule = self.model.step_schedule if self.model.reconstruction == "arbitrary_shot" else None
        if schedule and schedule[0] != choice.diffusion_step:
            respaced = uniform_step_schedule(choice.diffusion_step, min(len(schedule), choice.diffusion_step))
            logger.warning(
                "AdvRAD: step_schedule %s starts at k = %d, but the checkpoint chose k = %d (its normal error map "
                "belongs to it); using %s", list(schedule), schedule[0], choice.diffusion_step, respaced,
            )  # fmt: skip
            schedule = respaced
        self.set_reconstruction(choice.diffusion_step, step_schedule=schedule)
        self.hparams.update(mean_filter_size=choice.mean_filter_size)
        self.diffusion_step_choice = choice
        logger.info("AdvRAD: the checkpoint's automatic choice, %s", choice.summary())

    def on_test_start(self) -> None:
        """Check the statistics exist and seed the inference noise if requested."""
        self._start_inference()

    def on_predict_start(self) -> None:
        """Check the statistics exist and seed the inference noise if requested."""
        self._start_inference()

    def _start_inference(self) -> None:
        self.model.check_fitted()
        self._noise_generator = (
            None if self.noise_seed is None else torch.Generator(device=self.device).manual_seed(self.noise_seed)
        )

    def configure_optimizers(self) -> torch.optim.Optimizer:
        """Adam with the paper's learning rate 1e-4 (appendix C.1)."""
        return torch.optim.Adam(self.model.parameters(), lr=self.learning_rate)

    @property
    def trainer_arguments(self) -> dict[str, Any]:
        """No sanity validation: the normal statistics only exist once training started."""
        return {"num_sanity_val_steps": 0}

    @property
    def learning_type(self) -> LearningType:
        """AdvRAD learns from normal images only."""
        return LearningType.ONE_CLASS


def read_as_test_images(datamodule: AnomalibDataModule, dataset: Dataset | None = None) -> DataLoader:
    """``dataset`` (by default the training split of ``datamodule``) read as the test images are, without shuffling.

    An anomalib datamodule serves its test set with its test augmentations (composed with the model's resize when a
    trainer is attached); the training images are re-read with those instead of the training augmentations, in
    batches of ``eval_batch_size``. The datamodule is set up first when it is not yet.
    """
    if not hasattr(datamodule, "train_data"):
        datamodule.setup()
    dataset = copy.copy(datamodule.train_data if dataset is None else dataset)
    test_data = getattr(datamodule, "test_data", None)
    dataset.augmentations = test_data.augmentations if test_data is not None else datamodule.test_augmentations
    return DataLoader(
        dataset,
        batch_size=datamodule.eval_batch_size,
        num_workers=datamodule.num_workers,
        collate_fn=datamodule.external_collate_fn or dataset.collate_fn,
    )
