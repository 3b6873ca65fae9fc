"""The RAP adapter f~(x_t, t): a small time-conditioned U-Net that predicts the clean image x_0 (the RAP paper, eq. 8).

The RAP paper ("From Malicious to Marvelous: the Art of Adversarial Attack as Diffusion"), sec. 3.2, reparameterises
the score of the adversarial distribution so that the network learns x_0 directly (eq. 7-8):
``theta* = argmin sum_t E ||f~_theta(x_t, t) - x_0||``, where ``x_t`` is the image after ``t`` steps of the attack of
Alg. 1. The network is a ``diffusers.UNet2DModel`` conditioned on the attack step ``t``.

Adaptation (written down, not in the paper): the U-Net predicts the *residual* ``x_0 - x_t``, and its last convolution
starts at zero, so an untrained adapter is the identity and a short training run starts from "no purification"
instead of from a random image. The prediction is still an x_0 prediction, ``f~(x_t, t) = x_t + U(2 x_t - 1, t)``
(the U-Net sees images in [-1, 1], as the AdvRAD U-Net does).

The settings of the forward process the adapter was trained with (steps T, eps, step size lambda, start noise c) are
part of this module's state, so a purifier built from it reverses the process it learned.

Example:
    >>> import torch
    >>> model = RAPAdapterModel(image_size=(16, 16), in_channels=1, base_channels=32, channel_mult=(1,))
    >>> x = torch.rand(2, 1, 16, 16)
    >>> torch.equal(model(x, torch.tensor([3, 20])), x)  # untrained: the identity
    True
"""

from collections.abc import Sequence

import torch
from diffusers import UNet2DModel
from torch import nn


def check_process_settings(steps: int, eps: float, step_size: float, start_noise: float) -> None:
    """Validate the settings of the forward process (the RAP paper, Alg. 1): T, eps, lambda, c.

    Raises:
        ValueError: naming the argument and what was expected.
    """
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        msg = f"steps (T, the attack process length of Alg. 1) must be an integer >= 1, got {steps!r}."
        raise ValueError(msg)
    for name, value in (("eps", eps), ("step_size", step_size)):
        if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value < float("inf"):
            meaning = "the radius of the L_inf ball of Alg. 1's Clamp" if name == "eps" else "lambda of Alg. 1"
            msg = f"{name} ({meaning}) must be a finite number > 0, got {value!r}."
            raise ValueError(msg)
    if isinstance(start_noise, bool) or not isinstance(start_noise, int | float) or not 0 <= start_noise <= eps:
        msg = (
            f"start_noise (c of Alg. 1: zeta ~ Uniform(-c, c)) must be a number in [0, eps] = [0, {eps}], "
            f"got {start_noise!r}."
        )
        raise ValueError(msg)


class RAPAdapterModel(nn.Module):
    """f~(x_t, t) of the RAP paper (eq. 8), on [0, 1] images, with its forward-process settings.

    Args:
        image_size: input size ``(H, W)``; both sides divisible by ``2 ** (len(channel_mult) - 1)``.
        in_channels: image channels.
        base_channels: channels of the first U-Net level (levels have ``base_channels * mult``; multiples of 32).
        channel_mult: one multiplier per U-Net level.
        layers_per_block: ResNet layers per U-Net level.
        steps: T, the length of the attack process (the RAP paper, sec. 4.5: 20).
        eps: radius of the L_inf ball that Alg. 1's ``Clamp`` projects on (around the clean image), with the [0, 1]
            box.
        step_size: lambda of Alg. 1.
        start_noise: c of Alg. 1 (uniform start noise in ``(-c, c)``), at most ``eps``.
    """

    def __init__(
        self,
        image_size: Sequence[int] = (256, 256),
        in_channels: int = 3,
        base_channels: int = 64,
        channel_mult: Sequence[int] = (1, 2, 2),
        layers_per_block: int = 1,
        steps: int = 20,
        eps: float = 8 / 255,
        step_size: float = 2 / 255,
        start_noise: float = 8 / 255,
    ) -> None:
        super().__init__()
        check_process_settings(steps, eps, step_size, start_noise)
        image_size = tuple(int(side) for side in image_size)
        downsampling = 2 ** (len(channel_mult) - 1)
        if len(image_size) != 2 or any(side % downsampling for side in image_size):
            msg = (
                f"image_size must be (H, W) with both sides divisible by {downsampling} for a U-Net with "
                f"{len(channel_mult)} levels, got {image_size}."
            )
            raise ValueError(msg)
        channels = tuple(base_channels * mult for mult in channel_mult)
        if not channels or any(width % 32 for width in channels):
            msg = f"base_channels * channel_mult must be multiples of 32 (group norm), got {channels}."
            raise ValueError(msg)
        self.image_size, self.in_channels = image_size, in_channels
        self.steps, self.eps, self.step_size, self.start_noise = steps, float(eps), float(step_size), float(start_noise)
        self.unet = UNet2DModel(
            sample_size=image_size,
            in_channels=in_channels,
            out_channels=in_channels,
            down_block_types=("DownBlock2D",) * len(channels),
            up_block_types=("UpBlock2D",) * len(channels),
            block_out_channels=channels,
            layers_per_block=layers_per_block,
            resnet_time_scale_shift="scale_shift",
            add_attention=False,  # a small convolutional adapter: self-attention at full resolution costs O((HW)^2)
        )
        nn.init.zeros_(self.unet.conv_out.weight)
        nn.init.zeros_(self.unet.conv_out.bias)
        self.register_buffer("trained_steps", torch.zeros((), dtype=torch.long))
        """Optimisation steps the adapter has had (an untrained adapter is refused by the RAP purifier)."""

    def forward(self, images: torch.Tensor, t: torch.Tensor | int) -> torch.Tensor:
        """Predicted clean images ``x_0`` (not clamped) of attacked images ``x_t`` in [0, 1] at attack step ``t``."""
        if isinstance(t, int):
            t = torch.full((images.shape[0],), t, device=images.device, dtype=torch.long)
        return images + self.unet(images * 2 - 1, t).sample

    def extra_repr(self) -> str:
        return (
            f"image_size={self.image_size}, steps={self.steps}, eps={self.eps:.6g}, step_size={self.step_size:.6g}, "
            f"start_noise={self.start_noise:.6g}"
        )
