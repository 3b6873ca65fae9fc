"""AGDMGuidance: train the robust guidance network f_phi of AGDM on normal images (the AGDM paper, sec. 3.2, eq. 6).

The AGDM paper (Lin et al., "Robust Diffusion Models for Adversarial Purification") trains f_phi, a
classifier, with eq. (6): a clean accuracy term plus ``lambda`` times the worst-case divergence of its outputs in an
eps-ball (TRADES). Adapted to one-class anomaly detection, where the training images have no class label:

- **Clean term: normal vs pseudo-anomalous patches.** f_phi classifies every patch of its feature map, trained with
  the cross-entropy to tell the patches of the normal training images from the pasted patches of pseudo anomalies
  made from them with PatchGuard's foreground self-CutPaste generator (PatchGuard, Nafez et al., CVPR 2025,
  supplementary sec. B; :class:`~anomalib_robust.models.patch_guard.pseudo_anomaly.PseudoAnomalyGenerator`). This is
  a self-supervised task whose features are sensitive to local defects. That matters for the guidance: the
  consistency term of Alg. 1 (eq. 4) pulls the purified image towards the input's f_phi features, and an f_phi that
  sees defects keeps them, where a purifier alone repairs them (the AdvRAD paper, sec. 4.2). A reconstruction or
  contrastive term would give features blind to the defects the detector must still find.
- **Robust term: TRADES on the same images**, D = the squared distance of the spatial features that the guidance
  differentiates (:mod:`.loss`), weighted by ``robust_weight`` = lambda = 6 (the AGDM paper, sec. 5.1).
- **Diffused inputs, step-conditioned network, the pairs Alg. 1 compares.** Alg. 1 evaluates f_phi on the samples
  ``x_t`` of the reverse chain, so every training image is diffused to a random step in ``[0, max_noise_step]``
  (default 70, the paper's t*) on the AdvRAD diffusion model's noise schedule (``beta_schedule``,
  ``num_timesteps``; AdvRAD's defaults), and f_phi is told the step. The classification term sees the diffused
  images; the robust term compares their features with those of the perturbed image at step 0, as Alg. 1 compares
  ``f_phi(x')`` with ``f_phi(x_t)`` (:mod:`.loss`).

Checkpoints carry the network's architecture version
(:data:`~anomalib_robust.models.agdm_guidance.torch_model.ARCHITECTURE`); loading one of the earlier two-logit,
unconditioned network fails with an error that says so.

Validation and test score images with the network itself (the largest per-patch log-odds of "pseudo-anomalous"),
so ``anomalib train`` reports how well f_phi separates real defects: a diagnostic of the guidance, not a detector this
package recommends.
Use it with ``AGDM("adv_rad.ckpt", guidance="agdm_guidance.ckpt")`` in front of any detector.

Cost per training step: ``attack_steps + 2`` forward and ``attack_steps + 1`` backward passes of f_phi on twice the
batch (normal images and their pseudo anomalies).

Example:
    >>> from anomalib.engine import Engine
    >>> from anomalib_robust.models import AGDMGuidance
    >>> guidance = AGDMGuidance.cpu_preset()
    >>> Engine(max_epochs=5).fit(guidance, datamodule=datamodule)  # doctest: +SKIP

From the CLI:

    anomalib train --model AGDMGuidance --data configs/data/fashion_mnist.yaml
    anomalib train --config configs/model/agdm_guidance_cpu.yaml --data configs/data/fashion_mnist.yaml
"""

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from anomalib import LearningType
from anomalib.data import Batch
from anomalib.metrics import AUROC, Evaluator, F1Score
from anomalib.models.components import AnomalibModule
from anomalib.post_processing import PostProcessor
from anomalib.pre_processing import PreProcessor
from anomalib.visualization import Visualizer
from lightning.pytorch.utilities.types import STEP_OUTPUT
from torchvision.transforms.v2 import Resize

from anomalib_robust.attacks.base import check_count, check_non_negative, check_positive
from anomalib_robust.models.adv_rad.diffusion import DiffusionSchedule
from anomalib_robust.models.agdm_guidance.loss import diffuse, trades_perturbation
from anomalib_robust.models.agdm_guidance.torch_model import ARCHITECTURE, GuidanceNetworkModel, consistency_divergence
from anomalib_robust.models.components import CheckpointArchitectureMixin, ScoringStepsMixin
from anomalib_robust.models.patch_guard.pseudo_anomaly import PseudoAnomalyGenerator

CPU_PRESET = {"image_size": (32, 32), "base_channels": 16, "num_levels": 3, "attack_steps": 3}
"""A 32 x 32 variant (~0.1 M parameters) that trains in a minute on a CPU; 3 TRADES steps instead of 10."""

ARCHITECTURE_KEY = "agdm_guidance_architecture"
"""The checkpoint entry that holds the network's architecture version (absent: version 1)."""


class AGDMGuidance(CheckpointArchitectureMixin, ScoringStepsMixin, AnomalibModule):
    """Trains f_phi, AGDM's robust guidance network, on normal images and their pseudo anomalies (module docstring).

    Defaults: lambda = 6 and t* = 70 (the AGDM paper, sec. 5.1); TRADES' CIFAR-10 attack (Zhang et al., 2019): L_inf
    8/255, 10 steps of 2/255; Adam with lr 1e-3.

    Args:
        image_size: training input size (the pre-processor resizes to it); use the diffusion model's.
        in_channels, base_channels, num_levels: the network (:class:`GuidanceNetworkModel`).
        max_noise_step: training images are diffused to a step drawn uniformly in ``[0, max_noise_step]``.
        beta_schedule, num_timesteps: the diffusion model's noise schedule (AdvRAD's ``beta_schedule`` and
            ``num_timesteps``).
        eps, attack_steps, step_size: TRADES' inner maximum (L_inf radius, steps, step size).
        robust_weight: lambda of eq. (6).
        pseudo_anomaly_size: smallest side of a pseudo-anomalous patch in pixels; ``None``: an eighth of the image.
        learning_rate: Adam learning rate.
        seed: seed of the pseudo anomalies.
        pre_processor, post_processor, evaluator, visualizer: anomalib components (``True`` for the defaults).
    """

    TORCH_MODEL = GuidanceNetworkModel
    ARCHITECTURE_ARGS = ("in_channels", "base_channels", "num_levels")
    RESTORED_ARGS = ("max_noise_step", "beta_schedule", "num_timesteps")
    """What the network was trained on: the purifier compares it with its diffusion model's."""
    CPU_PRESET = CPU_PRESET

    def __init__(
        self,
        image_size: Sequence[int] = (256, 256),
        in_channels: int = 3,
        base_channels: int = 32,
        num_levels: int = 3,
        max_noise_step: int = 70,
        beta_schedule: str = "linear",
        num_timesteps: int = 1000,
        eps: float = 8 / 255,
        attack_steps: int = 10,
        step_size: float = 2 / 255,
        robust_weight: float = 6.0,
        pseudo_anomaly_size: int | None = None,
        learning_rate: float = 1e-3,
        seed: int = 0,
        pre_processor: PreProcessor | bool = True,
        post_processor: PostProcessor | bool = True,
        evaluator: Evaluator | bool = True,
        visualizer: Visualizer | bool = True,
    ) -> None:
        if pre_processor is True:
            pre_processor = self.configure_pre_processor(tuple(image_size))
        super().__init__(
            pre_processor=pre_processor, post_processor=post_processor, evaluator=evaluator, visualizer=visualizer
        )
        self.schedule = DiffusionSchedule.from_name(beta_schedule, num_timesteps)
        valid_step = isinstance(max_noise_step, int) and not isinstance(max_noise_step, bool)
        if not valid_step or not 0 <= max_noise_step <= num_timesteps:
            msg = f"max_noise_step must be an integer diffusion step in [0, T = {num_timesteps}], got {max_noise_step!r}."
            raise ValueError(msg)
        check_positive("eps", eps)
        check_positive("step_size", step_size)
        check_count("attack_steps", attack_steps)
        check_non_negative("robust_weight", robust_weight)
        self.model = self._build_model(self.hparams)
        size = pseudo_anomaly_size or max(2, min(image_size) // 8)
        self.pseudo_anomalies = PseudoAnomalyGenerator(patch_size=size, seed=seed)

    @classmethod
    def configure_pre_processor(cls, image_size: tuple[int, int] | None = None) -> PreProcessor:
        """Resize to the training size; no normalisation (the network maps [0, 1] to [-1, 1] itself)."""
        return PreProcessor(transform=Resize(image_size or (256, 256), antialias=True))

    @classmethod
    def configure_evaluator(cls) -> Evaluator:
        """Image AUROC and F1 of the network's scores."""
        return Evaluator(test_metrics=[AUROC(fields=["pred_score", "gt_label"], prefix="image_"),
                                       F1Score(fields=["pred_label", "gt_label"], prefix="image_")])  # fmt: skip

    def losses(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """The terms of eq. (6) on normal images in [0, 1] and their pseudo anomalies (module docstring).

        Classification: per patch, on the images diffused to a random step; a patch of the feature map is
        pseudo-anomalous where the pasted region overlaps it. Robust term: D between those diffused images'
        features and the features of the images perturbed by TRADES' inner maximum at step 0, the pair of Alg. 1
        (:mod:`.loss`).
        """
        anomalous = self.pseudo_anomalies.on_object(images)
        inputs = torch.cat([images, anomalous])
        steps = torch.randint(0, self.hparams["max_noise_step"] + 1, (len(inputs),), device=images.device)
        clean = torch.zeros_like(steps)
        features = self.model.features(diffuse(self.schedule, inputs, steps, torch.randn_like(inputs)), steps)
        logits = self.model.head(features)
        pasted = (inputs != torch.cat([images, images])).any(dim=1, keepdim=True).float()
        labels = F.adaptive_max_pool2d(pasted, logits.shape[-2:])[:, 0].long()

        def reference(batch: torch.Tensor) -> torch.Tensor:
            return self.model.features(batch, clean)

        adversarial = trades_perturbation(reference, inputs, features, self.hparams["eps"],
                                          self.hparams["attack_steps"], self.hparams["step_size"])  # fmt: skip
        losses = {"classification": F.cross_entropy(logits, labels),
                  "consistency": consistency_divergence(reference(adversarial), features).mean()}  # fmt: skip
        losses["loss"] = losses["classification"] + self.hparams["robust_weight"] * losses["consistency"]
        return losses

    def training_step(self, batch: Batch, *args: Any, **kwargs: Any) -> STEP_OUTPUT:
        """One step of eq. (6)."""
        del args, kwargs
        losses = self.losses(batch.image)
        size = batch.image.shape[0]
        self.log("train_loss", losses["loss"], on_epoch=True, prog_bar=True, logger=True, batch_size=size)
        self.log_dict({f"train_loss_{name}": value for name, value in losses.items() if name != "loss"},
                      on_epoch=True, batch_size=size)  # fmt: skip
        return {"loss": losses["loss"]}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Save the network's architecture version with the weights."""
        super().on_save_checkpoint(checkpoint)
        checkpoint[ARCHITECTURE_KEY] = ARCHITECTURE

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Refuse a checkpoint of another architecture version, naming what changed.

        Raises:
            ValueError: for a checkpoint of an earlier network (versions 1 and 2) or of an unknown version.
        """
        version = checkpoint.get(ARCHITECTURE_KEY, 1)
        if version != ARCHITECTURE:
            msg = (
                f"AGDMGuidance checkpoint has guidance-network architecture {version}, this version needs "
                f"{ARCHITECTURE}: version 2 replaced the two-class classifier after global pooling (whose KL guidance "
                "vanished) by per-patch logits and spatial features, conditioned on the diffusion step; version 3 "
                "trains D on the pairs that the guidance compares (the input at step 0, its diffused copy at step t). "
                "Retrain it with `anomalib train --model AGDMGuidance`."
            )
            raise ValueError(msg)
        super().on_load_checkpoint(checkpoint)

    def _predict(self, batch: Batch) -> Batch:
        return batch.update(**self.model(batch.image)._asdict())

    def configure_optimizers(self) -> torch.optim.Optimizer:
        """Adam on the network."""
        return torch.optim.Adam(self.model.parameters(), lr=self.hparams["learning_rate"])

    @property
    def trainer_arguments(self) -> dict[str, Any]:
        """No sanity validation (scores of an untrained network mean nothing)."""
        return {"num_sanity_val_steps": 0}

    @property
    def learning_type(self) -> LearningType:
        """f_phi learns from normal images (and their pseudo anomalies) only."""
        return LearningType.ONE_CLASS
