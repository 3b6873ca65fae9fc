"""Foreground-aware pseudo anomalies for PatchGuard: self-CutPaste inside the foreground.

PatchGuard paper (Nafez et al., CVPR 2025), supplementary sec. B and Fig. 4, as its official code implements it.

For every image (all on tensors, so it runs inside ``training_step`` or a data pipeline):

1. a source and a destination box of the same size ``(h, w)``, both inside the foreground mask, with sides at least
   ``min_size`` (one ViT patch by default, as the official code's lower bound of 14 px) and at most
   ``max_size_fraction`` of the image; after ``max_tries`` random proposals the fallback is a ``min_size`` square at
   a random foreground pixel (official: 250 tries);
2. the source box of the SAME image is augmented at one of three levels drawn with probabilities 0.2/0.2/0.6
   (official code). Each level always applies colour jitter (brightness/contrast/saturation/hue of torchvision's
   ``ColorJitter``: light 0.1/0.1/0.1/0.1, medium 0.4/0.4/0.4/0.3, heavy U(0.8, 1) x 3 / 0.5) plus up to 1, 2 or 4
   operations of its list, as the official code: light {blur, elastic, swirl}; medium {blur, swirl, JPEG, elastic};
   heavy {elastic, JPEG, noise, swirl, random erasing, blur}. The swirl has the standard form of scikit-image's
   ``swirl`` (rotation ``strength`` at the centre, decaying to 1/1000 of it at the radius, half the patch side);
3. the patch is rotated uniformly in ``[-max_rotation, max_rotation]`` degrees (90 officially; canvas expanded), resized
   back to ``(h, w)`` and pasted at the destination through its alpha mask, restricted to the foreground;
4. the pixel mask is the pasted alpha; a patch is labelled anomalous when any of its pixels is in the mask.

Differences from the official code: its torn-paper lines and Perlin colour fill (heavy level) are replaced by heavy
Gaussian noise; box sizes and the fallback follow the description above. Every random draw (boxes, levels, jitter
factors and order, operations, noise, elastic fields, erased colours) comes from the generator's own seed, so the
pseudo anomalies do not depend on torch's global random state.

Example:
    >>> import torch
    >>> from anomalib_robust.models.patch_guard.pseudo_anomaly import PseudoAnomalyGenerator
    >>> generator = PseudoAnomalyGenerator(patch_size=4, seed=0)
    >>> images = torch.rand(2, 3, 32, 32)
    >>> pseudo = generator(images)
    >>> pseudo.images.shape, pseudo.masks.shape, pseudo.patch_labels.shape
    (torch.Size([2, 3, 32, 32]), torch.Size([2, 32, 32]), torch.Size([2, 64]))
"""

import math
import random
from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

from anomalib_robust.data.defects import as_uint8, object_region
from anomalib_robust.models.patch_guard.torch_model import patch_labels_from_mask

LEVELS = ("light", "medium", "heavy")
OFFICIAL_LEVEL_PROBABILITIES = (0.2, 0.2, 0.6)
MAX_OPERATIONS = {"light": 1, "medium": 2, "heavy": 4}


class PseudoAnomalies(NamedTuple):
    """Pseudo-anomalous images ``(B, C, H, W)``, pixel masks ``(B, H, W)`` in {0, 1} and patch labels ``(B, N)``."""

    images: torch.Tensor
    masks: torch.Tensor
    patch_labels: torch.Tensor


class PseudoAnomalyGenerator:
    """Self-CutPaste pseudo anomalies inside the foreground (see the module docstring).

    Args:
        patch_size (int): ViT patch size (patch labels, and the default ``min_size``).
        min_size (int | None): Smallest box side in pixels; ``None`` gives ``patch_size``.
        max_size_fraction (float): Largest box side as a fraction of the image side.
        level_probabilities (Sequence[float]): Probabilities of the light/medium/heavy levels.
        max_rotation (float): Rotation range in degrees.
        max_tries (int): Box proposals before the fallback square.
        seed (int | None): Seed of all the generator's randomness (scalar draws from ``rng``, tensor draws from a
            torch generator on the device of the images, :meth:`generator`); ``None`` draws it from torch's global
            generator, so ``torch.manual_seed`` makes runs reproducible.
    """

    def __init__(
        self,
        patch_size: int,
        min_size: int | None = None,
        max_size_fraction: float = 0.5,
        level_probabilities: Sequence[float] = OFFICIAL_LEVEL_PROBABILITIES,
        max_rotation: float = 90.0,
        max_tries: int = 250,
        seed: int | None = None,
    ) -> None:
        if patch_size < 1:
            msg = f"patch_size must be positive, got {patch_size}"
            raise ValueError(msg)
        self.patch_size = patch_size
        self.min_size = patch_size if min_size is None else int(min_size)
        if self.min_size < 1 or not 0 < max_size_fraction <= 1:
            msg = f"min_size must be >= 1 and max_size_fraction in (0, 1], got {self.min_size} and {max_size_fraction}"
            raise ValueError(msg)
        if (
            len(level_probabilities) != len(LEVELS)
            or any(p < 0 for p in level_probabilities)
            or sum(level_probabilities) <= 0
        ):
            msg = (
                f"level_probabilities must be 3 non-negative numbers (light, medium, heavy), got {level_probabilities}"
            )
            raise ValueError(msg)
        if max_tries < 1:
            msg = f"max_tries must be >= 1, got {max_tries}"
            raise ValueError(msg)
        self.max_size_fraction = max_size_fraction
        self.level_probabilities = tuple(float(p) for p in level_probabilities)
        self.max_rotation = float(max_rotation)
        self.max_tries = max_tries
        if seed is None:
            seed = int(torch.randint(0, 2**31 - 1, (1,)).item())
        self.seed = seed
        self.rng = random.Random(seed)
        self.generators: dict[torch.device, torch.Generator] = {}
        """The tensor draws' generators, one per device, each seeded with ``seed`` on first use."""

    def __call__(self, images: torch.Tensor, foreground: torch.Tensor | None = None) -> PseudoAnomalies:
        """Pseudo anomalies of ``images`` ``(B, C, H, W)`` in [0, 1] inside ``foreground`` ``(B, H, W)`` (or all)."""
        if images.dim() != 4:
            msg = f"images must be (B, C, H, W), got shape {tuple(images.shape)}"
            raise ValueError(msg)
        batch, _, height, width = images.shape
        if foreground is None:
            foreground = torch.ones(batch, height, width, dtype=torch.bool, device=images.device)
        if foreground.dim() == 4 and foreground.shape[1] == 1:
            foreground = foreground[:, 0]
        if tuple(foreground.shape) != (batch, height, width):
            msg = f"foreground mask must be ({batch}, {height}, {width}) to match the images, got {tuple(foreground.shape)}"
            raise ValueError(msg)
        if height < self.min_size or width < self.min_size:
            msg = f"images must be at least min_size={self.min_size} pixels on each side, got {height}x{width}"
            raise ValueError(msg)
        foreground = foreground > 0
        outputs, masks = [], []
        for image, region in zip(images, foreground, strict=True):
            output, mask = self._paste(image, region)
            outputs.append(output)
            masks.append(mask)
        masks_tensor = torch.stack(masks)
        return PseudoAnomalies(
            torch.stack(outputs), masks_tensor, patch_labels_from_mask(masks_tensor, self.patch_size)
        )

    def on_object(self, images: torch.Tensor) -> torch.Tensor:
        """Pseudo-anomalous copies of ``images`` (any device), pasted on the object of each image.

        The object is :func:`~anomalib_robust.data.defects.object_region`, the region the synthetic defects of
        AdvRAD's choice of k use: the pixels that differ from a flat border, dark or light (a garment on black, a
        screw on a light table), or the whole image of a texture. An image with too little object for a
        ``min_size`` box gets its pseudo anomaly anywhere. Runs on the CPU (with the CPU generator, so the pseudo
        anomalies do not depend on the device of the images) and returns the images on the input's device and dtype.
        """
        cpu = images.detach().cpu()
        foreground = torch.stack([object_region(as_uint8(image)) for image in cpu])
        too_small = foreground.flatten(1).sum(dim=1) < self.min_size**2
        foreground[too_small] = True
        return self(cpu, foreground).images.to(images)

    def _paste(self, image: torch.Tensor, foreground: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One self-CutPaste anomaly: (image, pixel mask)."""
        height, width = image.shape[-2:]
        (sy, sx), (dy, dx), (h, w) = self._boxes(foreground.cpu())
        patch = image[:, sy : sy + h, sx : sx + w]
        level = self.rng.choices(LEVELS, weights=self.level_probabilities)[0]
        patch = self.augment(patch, level)
        angle = self.rng.uniform(-self.max_rotation, self.max_rotation)
        alpha = torch.ones(1, h, w, dtype=image.dtype, device=image.device)
        rotated = TF.rotate(torch.cat([patch, alpha]), angle, interpolation=v2.InterpolationMode.BILINEAR, expand=True)
        rotated = F.interpolate(rotated.unsqueeze(0), size=(h, w), mode="bilinear", align_corners=False)[0]
        patch, alpha = rotated[:-1], (rotated[-1] > 0.5) & foreground[dy : dy + h, dx : dx + w]
        output = image.clone()
        output[:, dy : dy + h, dx : dx + w] = torch.where(
            alpha, patch.clamp(0.0, 1.0), image[:, dy : dy + h, dx : dx + w]
        )
        mask = torch.zeros(height, width, dtype=image.dtype, device=image.device)
        mask[dy : dy + h, dx : dx + w] = alpha.to(image.dtype)
        return output, mask

    def _boxes(self, foreground: torch.Tensor) -> tuple[tuple[int, int], tuple[int, int], tuple[int, int]]:
        """Source corner, destination corner and size of two equal boxes inside the ``foreground`` mask.

        The proposals read single entries of the mask's summed-area table: the mask is a CPU tensor, so that each
        read is not a round trip to the GPU.
        """
        height, width = foreground.shape
        max_h = max(self.min_size, int(self.max_size_fraction * height))
        max_w = max(self.min_size, int(self.max_size_fraction * width))
        # Summed-area table: a box lies in the foreground when its foreground count equals its area.
        table = F.pad(foreground.float().cumsum(0).cumsum(1), (1, 0, 1, 0))

        def inside(y: int, x: int, h: int, w: int) -> bool:
            count = table[y + h, x + w] - table[y, x + w] - table[y + h, x] + table[y, x]
            return bool(count >= h * w - 0.5)

        for _ in range(self.max_tries):
            h, w = self.rng.randint(self.min_size, max_h), self.rng.randint(self.min_size, max_w)
            corners = [(self.rng.randint(0, height - h), self.rng.randint(0, width - w)) for _ in range(2)]
            if all(inside(y, x, h, w) for y, x in corners):
                return corners[0], corners[1], (h, w)
        # Fallback (as the official code after 250 tries): min_size squares centred on random foreground pixels.
        points = foreground.nonzero()
        if len(points) == 0:
            points = torch.tensor([[height // 2, width // 2]])
        size = self.min_size
        corners = []
        for _ in range(2):
            y, x = points[self.rng.randrange(len(points))].tolist()
            corners.append((min(max(y - size // 2, 0), height - size), min(max(x - size // 2, 0), width - size)))
        return corners[0], corners[1], (size, size)

    def augment(self, patch: torch.Tensor, level: str) -> torch.Tensor:
        """Colour jitter of ``level`` followed by up to ``MAX_OPERATIONS[level]`` random operations of that level."""
        if level not in LEVELS:
            msg = f"level must be one of {LEVELS}, got {level!r}"
            raise ValueError(msg)
        if level == "light":
            patch = self._color_jitter(patch, (0.1, 0.1, 0.1), 0.1)
        elif level == "medium":
            patch = self._color_jitter(patch, (0.4, 0.4, 0.4), 0.3)
        else:
            patch = self._color_jitter(patch, tuple(self.rng.uniform(0.8, 1.0) for _ in range(3)), 0.5)
        operations = self._operations(level)
        for operation in self.rng.sample(operations, k=self.rng.randint(0, MAX_OPERATIONS[level])):
            patch = operation(patch)
        return patch.clamp(0.0, 1.0)

    def _color_jitter(self, patch: torch.Tensor, strengths: tuple[float, ...], hue: float) -> torch.Tensor:
        """torchvision's ``ColorJitter(*strengths, hue)`` with its factors and random order drawn from ``rng``.

        As ``ColorJitter``: brightness, contrast and saturation factors in ``[max(0, 1 - s), 1 + s]``, the hue shift
        in ``[-hue, hue]``, applied in a random order.
        """
        adjustments = [
            (TF.adjust_brightness, self.rng.uniform(max(0.0, 1 - strengths[0]), 1 + strengths[0])),
            (TF.adjust_contrast, self.rng.uniform(max(0.0, 1 - strengths[1]), 1 + strengths[1])),
            (TF.adjust_saturation, self.rng.uniform(max(0.0, 1 - strengths[2]), 1 + strengths[2])),
            (TF.adjust_hue, self.rng.uniform(-hue, hue)),
        ]
        for adjust, factor in self.rng.sample(adjustments, k=len(adjustments)):
            patch = adjust(patch, factor)
        return patch

    def generator(self, device: torch.device) -> torch.Generator:
        """The generator of the tensor draws on ``device``, seeded with ``seed`` when first used there."""
        if device not in self.generators:
            self.generators[device] = torch.Generator(device=device).manual_seed(self.seed)
        return self.generators[device]

    def _randn_like(self, x: torch.Tensor) -> torch.Tensor:
        """Standard normal noise shaped like ``x``, on its device, from the generator's own :meth:`generator`."""
        return torch.randn(x.shape, generator=self.generator(x.device), dtype=x.dtype, device=x.device)

    def _operations(self, level: str) -> list[Callable[[torch.Tensor], torch.Tensor]]:
        uniform = self.rng.uniform
        if level == "light":
            return [
                lambda x: _blur(x, uniform(0.2, 0.5)),
                lambda x: self._elastic(x, uniform(10, 20), 3.0),
                lambda x: _swirl(x, uniform(0.5, 1.0)),
            ]
        if level == "medium":
            return [
                lambda x: _blur(x, uniform(0.8, 1.5)),
                lambda x: _swirl(x, uniform(1.0, 1.5)),
                lambda x: _jpeg(x, self.rng.randint(20, 30)),
                lambda x: self._elastic(x, uniform(20, 40), 3.0),
            ]
        return [
            lambda x: self._elastic(x, uniform(40, 100), 3.0),
            lambda x: _jpeg(x, self.rng.randint(1, 20)),
            lambda x: x + 0.3 * self._randn_like(x),
            lambda x: _swirl(x, uniform(1.5, 2.0)),
            lambda x: self._erase(x, self.rng.randint(3, 5)),
            lambda x: _blur(x, uniform(2.0, 3.0)),
        ]

    def _erase(self, patch: torch.Tensor, boxes: int) -> torch.Tensor:
        """Random erasing: ``boxes`` rectangles (up to a third of each side) filled with random colours."""
        patch = patch.clone()
        _, height, width = patch.shape
        for _ in range(boxes):
            h, w = self.rng.randint(1, max(1, height // 3)), self.rng.randint(1, max(1, width // 3))
            y, x = self.rng.randint(0, height - h), self.rng.randint(0, width - w)
            colour = torch.rand(
                patch.shape[0], 1, 1, generator=self.generator(patch.device), dtype=patch.dtype, device=patch.device
            )
            patch[:, y : y + h, x : x + w] = colour
        return patch

    def _elastic(self, patch: torch.Tensor, alpha: float, sigma: float) -> torch.Tensor:
        """Elastic deformation: a smooth random displacement field of ``alpha`` pixels (at 224 px scale).

        The field is white noise on a grid ``sigma`` pixels apart, upsampled bicubically (smooth at scale ``sigma``),
        which, unlike a Gaussian-filtered full-resolution field, also works on patches smaller than the filter.
        """
        _, height, width = patch.shape
        scaled_alpha = alpha * min(height, width) / 224.0
        coarse = (max(2, round(height / sigma)), max(2, round(width / sigma)))
        field = self._randn_like(patch.new_empty(1, 2, *coarse))
        field = F.interpolate(field, size=(height, width), mode="bicubic", align_corners=True)[0]
        field = field / field.abs().amax().clamp_min(1e-12) * scaled_alpha
        y, x = _pixel_grid(patch)
        grid = torch.stack([x + field[0], y + field[1]], dim=-1)
        return _sample(patch, grid)


def _blur(patch: torch.Tensor, sigma: float) -> torch.Tensor:
    size = 2 * math.ceil(2 * sigma) + 1
    size = min(size, 2 * ((min(patch.shape[-2:]) - 1) // 2) + 1)
    return TF.gaussian_blur(patch, kernel_size=[size, size], sigma=[sigma, sigma]) if size >= 3 else patch


def _pixel_grid(patch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Row and column coordinates ``(H, W)`` of the pixels of ``patch``, in pixels from its centre."""
    _, height, width = patch.shape
    ys = torch.arange(height, device=patch.device, dtype=patch.dtype) - (height - 1) / 2
    xs = torch.arange(width, device=patch.device, dtype=patch.dtype) - (width - 1) / 2
    return torch.meshgrid(ys, xs, indexing="ij")


def _sample(patch: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    """Bilinear resampling of ``patch`` at the pixel coordinates ``grid`` ``(H, W, 2)`` (x, y from the centre)."""
    _, height, width = patch.shape
    scale = torch.tensor([2 / max(width - 1, 1), 2 / max(height - 1, 1)], device=patch.device, dtype=patch.dtype)
    return F.grid_sample(
        patch.unsqueeze(0), (grid * scale).unsqueeze(0), mode="bilinear", padding_mode="border", align_corners=True
    )[0]


def _jpeg(patch: torch.Tensor, quality: int) -> torch.Tensor:
    encoded = TF.jpeg((patch.clamp(0, 1) * 255).round().to(torch.uint8).cpu(), quality=quality)
    return encoded.to(patch.device, patch.dtype) / 255.0


def _swirl(patch: torch.Tensor, strength: float) -> torch.Tensor:
    """Swirl about the centre, scikit-image's ``swirl`` with ``radius`` = half the smaller side.

    A pixel at distance ``rho`` from the centre takes the value at angle ``theta + strength * exp(-rho / r0)``, with
    ``r0 = radius * ln(2) / 5``: the rotation is ``strength`` radians at the centre and decays to ``strength / 1000``
    at the radius, so pixels beyond it are (nearly) unchanged.
    """
    y, x = _pixel_grid(patch)
    decay = min(patch.shape[-2:]) / 2 * math.log(2) / 5
    rho = torch.sqrt(x**2 + y**2)
    theta = torch.atan2(y, x) + strength * torch.exp(-rho / decay)
    return _sample(patch, torch.stack([rho * torch.cos(theta), rho * torch.sin(theta)], dim=-1))
