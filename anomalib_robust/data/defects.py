"""Small, seeded synthetic defects on object images, made with anomalib's Perlin anomaly generator.

:class:`anomalib.data.utils.generators.perlin.PerlinAnomalyGenerator` (the DRAEM-style generator: a thresholded,
rotated Perlin-noise blob filled with an augmented noise texture and blended into the image; Zavrtanik et al., "DRAEM
- A discriminatively trained reconstruction embedding for surface anomaly detection", ICCV 2021) makes blobs of any
size anywhere in the image. :func:`add_small_defect` keeps only the part of such a blob that lies on the object and
within a disc around one of its object pixels, and retries until that part covers between
:data:`MIN_AREA` and :data:`MAX_AREA` of the image and visibly changes it. The texture is averaged over the colour
channels so a grayscale image stays grayscale.

Every random draw (the generator's and this module's) comes from torch's global generator, seeded from ``seed`` inside
:func:`torch.random.fork_rng`, so a defect depends only on the image and the seed, and the caller's random state is
left untouched.

Example:
    >>> import torch
    >>> image = torch.zeros(1, 64, 64, dtype=torch.uint8)
    >>> image[:, 8:56, 16:48] = 180
    >>> defective, mask = add_small_defect(image, seed=0)
    >>> defective.shape, defective.dtype, mask.dtype
    (torch.Size([1, 64, 64]), torch.uint8, torch.bool)
    >>> MIN_AREA <= mask.float().mean().item() <= MAX_AREA
    True
"""

import torch
import torch.nn.functional as F
from anomalib.data.utils.generators.perlin import PerlinAnomalyGenerator

MIN_AREA = 0.01
"""Smallest defect, as a fraction of the image area."""

MAX_AREA = 0.04
"""Largest defect, as a fraction of the image area."""

MIN_CONTRAST = 0.1
"""Smallest mean absolute change of intensity (on a 0-1 scale) over the defect's pixels."""

FOREGROUND_LEVEL = 25
"""Pixels brighter than this (of 255) belong to the object (Fashion-MNIST backgrounds are black); also the smallest
difference (of 255) from a flat background for a pixel to belong to the object in :func:`object_region`."""

FLAT_BORDER = 10
"""Largest median absolute deviation (of 255) of the border pixels for :func:`object_region` to read the border as a
flat background around an object; a texture's border is not flat."""

OBJECT_CONTRAST = 4.0
"""How many times the border's median absolute deviation a pixel must differ from the background to belong to the
object in :func:`object_region` (at least :data:`FOREGROUND_LEVEL`): an object stands out of its background by more
than the background's own variation."""

BLEND_FACTOR = (0.5, 1.0)
"""Range of the generator's blend factor: how much the noise texture replaces the image inside the blob."""

RADII = (0.2, 0.16, 0.12, 0.09, 0.06, 0.0)
"""Disc radii tried, as fractions of the image side, largest first, until the defect is at most ``max_area``."""

MAX_ATTEMPTS = 200

MIN_SIZE = 32
"""Smallest image side: the generator's Perlin noise draws grid scales up to 32."""


def as_uint8(image: torch.Tensor) -> torch.Tensor:
    """An image in [0, 1] as ``uint8`` (same shape), what :func:`object_region` and :func:`add_small_defect` read."""
    return image.mul(255).round().clamp(0, 255).to(torch.uint8)


def object_region(image: torch.Tensor) -> torch.Tensor:
    """Where an object is, without assuming a dark background: ``bool`` ``[H, W]`` of a ``uint8`` ``[C, H, W]`` image
    (gray or colour).

    A pixel's difference from the background is its largest difference over the channels from the median of the
    one-pixel border, so colour counts as well as brightness. When the border is flat (the median of those
    differences on the border at most :data:`FLAT_BORDER`), it is the background (dark or light), and the object is
    every pixel that differs from it by more than :data:`OBJECT_CONTRAST` times the border's own variation, and by
    more than :data:`FOREGROUND_LEVEL`: a garment on black (Fashion-MNIST), a screw or a pill on a light table
    (MVTec AD). Otherwise, and also when no object of at least ``2 * MIN_AREA`` of the image survives a 3 x 3
    opening (scattered pixels: the tail of a texture whose border happens to be flat, such as a low-contrast
    texture), the image is a texture (or an object filling the frame) and the whole image is the region.
    """
    if image.dtype != torch.uint8 or image.ndim != 3:
        msg = f"image must be a uint8 tensor [C, H, W], got {image.dtype} {tuple(image.shape)}."
        raise ValueError(msg)
    channels = image.float()
    border = torch.cat([channels[:, 0], channels[:, -1], channels[:, 1:-1, 0], channels[:, 1:-1, -1]], dim=1)
    difference = (channels - border.median(dim=1).values[:, None, None]).abs().amax(dim=0)
    border_difference = torch.cat([difference[0], difference[-1], difference[1:-1, 0], difference[1:-1, -1]])
    spread = border_difference.median()
    whole = torch.ones_like(difference, dtype=torch.bool)
    if spread > FLAT_BORDER:
        return whole
    region = difference > max(float(FOREGROUND_LEVEL), OBJECT_CONTRAST * float(spread))
    eroded = -F.max_pool2d(-region[None, None].float(), 3, stride=1, padding=1)
    opened = F.max_pool2d(eroded, 3, stride=1, padding=1)[0, 0] > 0
    return region if opened.float().mean() >= 2 * MIN_AREA else whole


def add_small_defect(
    image: torch.Tensor,
    seed: int,
    region: torch.Tensor | None = None,
    blend_factor: tuple[float, float] = BLEND_FACTOR,
    min_contrast: float = MIN_CONTRAST,
    max_area: float = MAX_AREA,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Paint one small defect on a grayscale object image.

    Args:
        image: ``uint8`` tensor ``[1, H, W]``.
        seed: Seed of every random draw.
        region: ``bool`` ``[H, W]``, where the defect may lie. ``None`` gives the Fashion-MNIST rule (pixels brighter
            than :data:`FOREGROUND_LEVEL`; the test images of the ``defect`` protocol); :func:`object_region` is the
            rule for other data. A region under ``2 * MIN_AREA`` of the image is replaced by the whole image.
        blend_factor: Range of the generator's blend factor (lower: fainter defects).
        min_contrast: Smallest mean absolute change of intensity over the defect's pixels (0-1 scale).
        max_area: Largest defect, as a fraction of the image area (at least :data:`MIN_AREA`).

    Returns:
        The defective image (``uint8`` ``[1, H, W]``, equal to ``image`` outside the mask) and the defect mask
        (``bool`` ``[H, W]``).

    Raises:
        ValueError: ``image`` is not a ``uint8`` ``[1, H, W]`` tensor of at least :data:`MIN_SIZE` pixels a side.
        RuntimeError: No defect met the size and contrast limits in :data:`MAX_ATTEMPTS` draws.
    """
    if image.dtype != torch.uint8 or image.ndim != 3 or image.shape[0] != 1 or min(image.shape[1:]) < MIN_SIZE:
        msg = f"image must be a uint8 tensor [1, H, W] with H, W >= {MIN_SIZE}; got {image.dtype} {tuple(image.shape)}."
        raise ValueError(msg)
    if not MIN_AREA <= max_area <= 1:
        msg = f"max_area must be a fraction of the image in [{MIN_AREA}, 1], got {max_area!r}."
        raise ValueError(msg)
    height, width = image.shape[-2:]
    pixels = image.float().div(255)
    region = image[0] > FOREGROUND_LEVEL if region is None else region.to(torch.bool)
    if tuple(region.shape) != (height, width):
        msg = f"region must be a [H, W] mask of the image's size ({height}, {width}), got {tuple(region.shape)}."
        raise ValueError(msg)
    if region.float().mean() < 2 * MIN_AREA:  # (almost) no object: anywhere will do
        region = torch.ones_like(region)
    rows, cols = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        generator = PerlinAnomalyGenerator(probability=1.0, blend_factor=blend_factor)
        for _ in range(MAX_ATTEMPTS):
            augmented, blob = generator(pixels.expand(3, -1, -1))
            candidates = (blob[0] > 0) & region
            centres = candidates.nonzero()
            if len(centres) == 0:
                continue
            centre_row, centre_col = centres[torch.randint(len(centres), (1,)).item()]
            distance2 = (rows - centre_row) ** 2 + (cols - centre_col) ** 2
            for radius in RADII:
                mask = candidates & (distance2 <= (radius * max(height, width)) ** 2)
                if mask.float().mean() <= max_area:
                    break
            defective = torch.where(mask, augmented.mean(0), pixels[0]).clamp(0, 1).mul(255).round().to(torch.uint8)
            contrast = (defective[mask].float() - image[0][mask].float()).abs().mean() / 255
            if mask.float().mean() >= MIN_AREA and contrast >= min_contrast:
                return defective.unsqueeze(0), mask
    msg = f"no defect of {MIN_AREA:.0%}-{max_area:.0%} of the image with contrast {min_contrast} in {MAX_ATTEMPTS} draws"
    raise RuntimeError(msg)
