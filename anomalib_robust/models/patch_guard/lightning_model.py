"""PatchGuard: adversarially robust anomaly detection and localisation with a ViT and pseudo anomalies.

Paper (the PatchGuard paper): Nafez et al., "PatchGuard: Adversarially Robust Anomaly Detection and Localization
through Vision Transformers and Pseudo Anomalies", CVPR 2025, with its supplementary; where they differ, the official
code, which produced the paper's numbers, is followed. A randomly initialised ViT and an attention
discriminator learn to label patches of foreground-aware pseudo anomalies (self-CutPaste), with an attention
regulariser that raises the attention degree, under adversarial training that flips patch labels. The image score is
the mean of the top-k patch logits, the anomaly map the smoothed, upsampled patch logits.

Example:
    >>> from anomalib.engine import Engine
    >>> from anomalib_robust import PatchGuard
    >>> from anomalib_robust.data import FashionMNIST
    >>> model = PatchGuard.cpu_preset()
    >>> engine = Engine(max_epochs=50)
    >>> engine.fit(model, datamodule=FashionMNIST())  # doctest: +SKIP
    >>> engine.test(model, datamodule=FashionMNIST())  # doctest: +SKIP

From the CLI (the plugin is loaded automatically once installed):

    anomalib train --model PatchGuard --data MVTecAD --data.category bottle --model.foreground heuristic
    anomalib train --config configs/model/patch_guard_cpu.yaml --data configs/data/fashion_mnist.yaml
"""

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from anomalib import LearningType
from anomalib.data import Batch
from anomalib.metrics import Evaluator
from anomalib.models.components import AnomalibModule
from anomalib.post_processing import PostProcessor
from anomalib.pre_processing import PreProcessor
from anomalib.visualization import Visualizer
from lightning.pytorch.utilities.types import STEP_OUTPUT, OptimizerLRScheduler
from torchvision.transforms.v2 import Resize

from anomalib_robust.models.components import CheckpointArchitectureMixin, ScoringStepsMixin
from anomalib_robust.models.patch_guard.adversarial import check_attack_settings, patch_label_flip_pgd
from anomalib_robust.models.patch_guard.foreground import ForegroundEstimator
from anomalib_robust.models.patch_guard.loss import OFFICIAL_ATTENTION_WEIGHTS, PatchGuardLoss
from anomalib_robust.models.patch_guard.pseudo_anomaly import OFFICIAL_LEVEL_PROBABILITIES, PseudoAnomalyGenerator
from anomalib_robust.models.patch_guard.torch_model import PatchGuardModel

CPU_PRESET = {
    "image_size": (32, 32),
    "patch_size": 4,
    "embed_dim": 96,
    "depth": 4,
    "num_heads": 3,
    "discriminator_mlp_dim": 384,
    "sigma": 1.0,
    "kernel_size": 5,
    "foreground": "heuristic",
    "dilation_iterations": 1,
    "adversarial_steps": 3,
}
"""A 0.6 M-parameter ViT (4 blocks, dim 96) at 32 x 32 with 4 x 4 patches (8 x 8 = 64 tokens) for a 2-core CPU.

Regularised blocks 2/3/4 (6/9/12 scaled to 4 blocks), Gaussian sigma 1 (sigma 6 at 224 scaled to 32 px), heuristic
foreground (object images), 1 dilation (10 at 224 scaled), and adversarial training with 3 PGD steps of ``2.5 eps / 3``
at the paper's eps 8/255 instead of 10 steps; every other setting is the official one. ``configs/model/patch_guard_cpu.yaml``.
"""


class PatchGuard(CheckpointArchitectureMixin, ScoringStepsMixin, AnomalibModule):
    """PatchGuard anomaly detector (PatchGuard paper) as an anomalib model.

    Defaults follow the official code where it differs from the paper:

    - ``top_k=3`` (official code; the paper, sec. G, says 5);
    - ``regularizer="kl_uniform"`` (the official code's KL-to-uniform log barrier on blocks 6/9/12 of 12 with weights
      0.005/0.01/0.05); ``regularizer="degree"`` is the paper's delta-threshold attention degree (sec. C.2,
      delta = 1/(N-1), the paper's 1/255), made differentiable with a soft threshold;
    - ``weight_decay=0.01`` (PyTorch's AdamW default used by the code; the paper, sec. G, says 1e-5).

    Architecture: ViT-S/14 shape at 224 x 224 (dim 384, 12 blocks, 6 heads, LayerScale 1e-5), random init (an
    optional ``pretrained_weights`` file); discriminator with 4 heads, MLP 2048, dropout 0.2. Training (per batch, as
    the code): self-CutPaste pseudo anomalies of the batch inside the estimated foreground; ``L(x, 0) + L(x_adv, 0) +
    L(x_pseudo, y) + L(x_pseudo_adv, y)`` with patch BCE + attention regulariser; ``x_adv`` from L_inf PGD
    (eps 8/255, 10 steps of 2/255, patch-label-flipping objective) on normal and pseudo-anomalous images, trained on the
    true labels; AdamW lr 8e-4 with cosine annealing to ``lr * 0.0125``. Batch size 16 in the paper
    (``--data.train_batch_size 16``). ``PatchGuard.cpu_preset()`` (``configs/model/patch_guard_cpu.yaml``) is a small
    variant for CPUs.

    Images enter in [0, 1]; the pre-processor only resizes, ImageNet normalisation happens inside the torch model.

    Args:
        image_size (Sequence[int]): Input size; a multiple of ``patch_size``. Defaults to ``(224, 224)``.
        patch_size (int): ViT patch size. Defaults to ``14``.
        embed_dim (int): Token dimension. Defaults to ``384``.
        depth (int): ViT blocks. Defaults to ``12``.
        num_heads (int): ViT heads. Defaults to ``6``.
        mlp_ratio (float): ViT MLP ratio. Defaults to ``4.0``.
        layer_scale_init (float | None): LayerScale init. Defaults to ``1e-5``.
        attention_layers (Sequence[int] | None): 1-based regularised blocks; ``None`` scales 6/9/12 of 12 to ``depth``.
        discriminator_heads (int): Discriminator heads. Defaults to ``4``.
        discriminator_mlp_dim (int): Discriminator MLP size. Defaults to ``2048``.
        dropout (float): Discriminator dropout. Defaults to ``0.2``.
        top_k (int): Patch logits averaged into the image score. Defaults to ``3`` (official code; paper: 5).
        sigma (float): Gaussian smoothing of the anomaly map. Defaults to ``6.0``.
        kernel_size (int): Gaussian kernel size. Defaults to ``15``.
        pretrained_weights (str | None): Path of a timm ViT state dict for the backbone. Defaults to ``None``.
        regularizer (str): ``"kl_uniform"`` (official code) or ``"degree"`` (paper). Defaults to ``"kl_uniform"``.
        attention_weights (Sequence[float]): ``c_l`` per regularised block. Defaults to ``(0.005, 0.01, 0.05)``.
        degree_delta (float | None): ``delta`` of the degree regulariser (``None``: ``1/(N-1)``).
        degree_temperature (float): Soft-threshold temperature of the degree regulariser. Defaults to ``0.1``.
        foreground (str): ``"all"`` (textures), ``"heuristic"`` (objects) or ``"gradcam"`` (then call
            :meth:`set_foreground_estimator` with a classifier). Defaults to ``"heuristic"``.
        dilation_iterations (int): 3 x 3 dilations of the foreground mask. Defaults to ``10``.
        pseudo_min_size (int | None): Smallest pasted box side (``None``: ``patch_size``).
        pseudo_max_size_fraction (float): Largest pasted box side relative to the image. Defaults to ``0.5``.
        level_probabilities (Sequence[float]): Light/medium/heavy augmentation probabilities. Defaults to
            ``(0.2, 0.2, 0.6)``.
        max_rotation (float): Rotation range of the pasted patch in degrees. Defaults to ``90``.
        adversarial_training (bool): Train on PGD examples as well. Defaults to ``True``.
        adversarial_eps (float): L_inf radius. Defaults to ``8/255``.
        adversarial_steps (int): PGD steps. Defaults to ``10``.
        adversarial_alpha (float | None): PGD step (``None``: ``2.5 eps / steps`` = 2/255). Defaults to ``None``.
        learning_rate (float): AdamW learning rate. Defaults to ``8e-4``.
        weight_decay (float): AdamW weight decay. Defaults to ``0.01`` (official code; paper: 1e-5).
        lr_decay_factor (float): Cosine annealing floor as a fraction of the learning rate. Defaults to ``0.0125``.
        pre_processor, post_processor, evaluator, visualizer: anomalib components (``True`` for the defaults).
    """

    TORCH_MODEL = PatchGuardModel
    ARCHITECTURE_ARGS = (
        "image_size",
        "patch_size",
        "embed_dim",
        "depth",
        "num_heads",
        "mlp_ratio",
        "layer_scale_init",
        "discriminator_heads",
        "discriminator_mlp_dim",
    )
    RESTORED_ARGS = ("sigma", "kernel_size", "attention_layers", "attention_weights")
    """The Gaussian kernel buffer's and the regularised blocks' init args."""
    CPU_PRESET = CPU_PRESET

    def __init__(
        self,
        image_size: Sequence[int] = (224, 224),
        patch_size: int = 14,
        embed_dim: int = 384,
        depth: int = 12,
        num_heads: int = 6,
        mlp_ratio: float = 4.0,
        layer_scale_init: float | None = 1e-5,
        attention_layers: Sequence[int] | None = None,
        discriminator_heads: int = 4,
        discriminator_mlp_dim: int = 2048,
        dropout: float = 0.2,
        top_k: int = 3,
        sigma: float = 6.0,
        kernel_size: int = 15,
        pretrained_weights: str | None = None,
        regularizer: str = "kl_uniform",
        attention_weights: Sequence[float] = OFFICIAL_ATTENTION_WEIGHTS,
        degree_delta: float | None = None,
        degree_temperature: float = 0.1,
        foreground: str = "heuristic",
        dilation_iterations: int = 10,
        pseudo_min_size: int | None = None,
        pseudo_max_size_fraction: float = 0.5,
        level_probabilities: Sequence[float] = OFFICIAL_LEVEL_PROBABILITIES,
        max_rotation: float = 90.0,
        adversarial_training: bool = True,
        adversarial_eps: float = 8 / 255,
        adversarial_steps: int = 10,
        adversarial_alpha: float | None = None,
        learning_rate: float = 8e-4,
        weight_decay: float = 0.01,
        lr_decay_factor: float = 0.0125,
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
        self.adversarial_alpha = check_attack_settings(adversarial_eps, adversarial_steps, adversarial_alpha)
        if learning_rate <= 0 or weight_decay < 0 or not 0 <= lr_decay_factor <= 1:
            msg = (
                "learning_rate must be > 0, weight_decay >= 0 and lr_decay_factor in [0, 1], got "
                f"{learning_rate}, {weight_decay}, {lr_decay_factor}"
            )
            raise ValueError(msg)
        self.model = self._build_model(self.hparams)
        self._build_training_components()

    def _build_training_components(self) -> None:
        hparams = self.hparams
        self.loss = self._build_loss(hparams, len(self.model.attention_layers))
        self.foreground_estimator = (
            ForegroundEstimator(hparams["foreground"], hparams["dilation_iterations"])
            if (hparams["foreground"] != "gradcam")
            else None
        )
        self.pseudo_anomaly_generator = PseudoAnomalyGenerator(
            patch_size=self.model.patch_size,
            min_size=hparams["pseudo_min_size"],
            max_size_fraction=hparams["pseudo_max_size_fraction"],
            level_probabilities=hparams["level_probabilities"],
            max_rotation=hparams["max_rotation"],
        )

    @staticmethod
    def _build_loss(hparams: dict[str, Any], num_layers: int) -> PatchGuardLoss:
        weights = tuple(hparams["attention_weights"])
        if len(weights) != num_layers:
            msg = f"attention_weights must have one weight per regularised block ({num_layers}), got {weights}"
            raise ValueError(msg)
        return PatchGuardLoss(weights, hparams["regularizer"], hparams["degree_delta"], hparams["degree_temperature"])

    @classmethod
    def configure_pre_processor(cls, image_size: tuple[int, int] | None = None) -> PreProcessor:
        """Resize to the model's input size; ImageNet normalisation happens inside the torch model (as the code)."""
        return PreProcessor(transform=Resize(image_size or (224, 224), antialias=True))

    def set_foreground_estimator(self, estimator: ForegroundEstimator) -> None:
        """Use ``estimator`` (e.g. Grad-CAM of a user-supplied classifier) for the pseudo anomalies' foreground."""
        if not isinstance(estimator, ForegroundEstimator):
            msg = f"estimator must be a ForegroundEstimator, got {type(estimator).__name__}"
            raise TypeError(msg)
        self.foreground_estimator = estimator

    def patch_logits(self, images: torch.Tensor) -> torch.Tensor:
        """Patch logits ``(B, N)`` of pre-processed images (the attacked quantity of adversarial training)."""
        return self.model.patch_logits(images).patch_logits

    def training_step(self, batch: Batch, *args, **kwargs) -> STEP_OUTPUT:
        """One step of the official recipe: clean and adversarial losses on normal and pseudo-anomalous images."""
        del args, kwargs  # These variables are not used.
        images = batch.image
        if self.foreground_estimator is None:
            msg = "foreground='gradcam' needs set_foreground_estimator(ForegroundEstimator('gradcam', classifier=...))"
            raise RuntimeError(msg)
        pseudo = self.pseudo_anomaly_generator(images, self.foreground_estimator(images))
        inputs = torch.cat([images, pseudo.images])
        labels = torch.cat([torch.zeros_like(pseudo.patch_labels), pseudo.patch_labels])
        output = self.model(inputs)
        clean = self.loss(output.patch_logits, labels, output.attentions)
        # Normal and pseudo-anomalous halves share a batch: each loss term is the mean over both halves, so twice it
        # equals the official sum L(x, 0) + L(x_pseudo, y) (and likewise for the adversarial pair).
        loss = 2 * clean["loss"]
        logs = {"train_bce": clean["bce"], "train_regularization": clean["regularization"]}
        if self.hparams["adversarial_training"]:
            adversarial = patch_label_flip_pgd(
                self.patch_logits,
                inputs,
                labels,
                eps=self.hparams["adversarial_eps"],
                steps=self.hparams["adversarial_steps"],
                alpha=self.adversarial_alpha,
            )
            output = self.model(adversarial)
            robust = self.loss(output.patch_logits, labels, output.attentions)
            loss = loss + 2 * robust["loss"]
            logs["train_adversarial_bce"] = robust["bce"]
        batch_size = images.shape[0]
        self.log("train_loss", loss, on_epoch=True, prog_bar=True, logger=True, batch_size=batch_size)
        self.log_dict(logs, on_epoch=True, batch_size=batch_size)
        return {"loss": loss}

    def _predict(self, batch: Batch) -> Batch:
        predictions = self.model(batch.image)
        return batch.update(**predictions._asdict())

    def _rebuild(self, changed: dict[str, Any]) -> None:
        """Rebuild the torch model (without pretrained weights), the training components and the pre-processor."""
        self.hparams["pretrained_weights"] = None  # the checkpoint holds the weights
        super()._rebuild(changed)
        self._build_training_components()
        if "image_size" in changed and isinstance(self.pre_processor, PreProcessor):
            self.pre_processor = self.configure_pre_processor(tuple(changed["image_size"]))

    def configure_optimizers(self) -> OptimizerLRScheduler:
        """AdamW (lr 8e-4) with cosine annealing to ``lr * 0.0125`` over the whole run (sec. G), stepped per batch."""
        optimizer = torch.optim.AdamW(
            self.model.parameters(),
            lr=self.hparams["learning_rate"],
            weight_decay=self.hparams["weight_decay"],
        )
        total_steps = self.trainer.estimated_stepping_batches if self._trainer is not None else 1
        total_steps = int(total_steps) if 0 < total_steps < float("inf") else 1
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(
            optimizer,
            T_max=max(1, total_steps),
            eta_min=self.hparams["learning_rate"] * self.hparams["lr_decay_factor"],
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def to_onnx(
        self,
        export_root: Path | str,
        model_file_name: str = "model",
        input_size: tuple[int, int] | None = None,
        **kwargs: Any,
    ) -> Path:
        """ONNX graph of pre-processor + torch model + post-processor (opset 18: the antialiased resize needs it)."""
        kwargs.setdefault("opset_version", 18)
        return super().to_onnx(export_root, model_file_name, input_size, **kwargs)

    @property
    def trainer_arguments(self) -> dict[str, Any]:
        """No extra trainer arguments: PatchGuard trains with gradient descent for as many epochs as given."""
        return {}

    @property
    def learning_type(self) -> LearningType:
        """PatchGuard learns from normal images (and the pseudo anomalies it makes from them)."""
        return LearningType.ONE_CLASS
