"""Batching, augmentation and normalisation of ``ccnn.data`` samples.

Augmentation draws from an explicit ``torch.Generator``, so a training run seeded per epoch is
reproducible exactly, and resumable.  Tags and sizes are those of the whole image: a crop that
cuts an object out leaves its tag in place, as weak labels are noisy in practice.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ccnn.data.base import IGNORE_INDEX

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "augment", "collate", "normalize"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_PAD_COLOUR = tuple(round(255 * m) for m in IMAGENET_MEAN)  # normalises to about zero


def normalize(images: Tensor) -> Tensor:
    """uint8 images ``(B, 3, H, W)`` to float, normalised with ImageNet's mean and std."""
    mean = torch.tensor(IMAGENET_MEAN, device=images.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=images.device).view(1, 3, 1, 1)
    return (images.float() / 255 - mean) / std


def _pad_to(image: Tensor, mask: Tensor, height: int, width: int) -> tuple[Tensor, Tensor]:
    """Pad at the bottom and right: the image with the mean colour, the mask with void."""
    dh, dw = height - image.shape[-2], width - image.shape[-1]
    if dh == 0 and dw == 0:
        return image, mask
    out = torch.empty(3, height, width, dtype=image.dtype)
    out[:] = torch.tensor(_PAD_COLOUR, dtype=image.dtype).view(3, 1, 1)
    out[:, : image.shape[-2], : image.shape[-1]] = image
    m = torch.full((height, width), IGNORE_INDEX, dtype=mask.dtype)
    m[: mask.shape[-2], : mask.shape[-1]] = mask
    return out, m


def collate(samples: list[dict]) -> dict:
    """Stack samples into a batch, padding images and masks to the largest size in it.

    Returns a dict with ``image`` ``(B, 3, H, W)`` uint8, ``mask`` ``(B, H, W)``, ``tags`` and
    ``sizes`` ``(B, L)``, ``name`` (list) and ``shape`` (list of each image's own ``(H, W)``).
    """
    if not samples:
        raise ValueError("cannot collate an empty list of samples")
    height = max(s["image"].shape[-2] for s in samples)
    width = max(s["image"].shape[-1] for s in samples)
    padded = [_pad_to(s["image"], s["mask"], height, width) for s in samples]
    return {
        "image": torch.stack([p[0] for p in padded]),
        "mask": torch.stack([p[1] for p in padded]),
        "tags": torch.stack([s["tags"] for s in samples]),
        "sizes": torch.stack([s["sizes"] for s in samples]),
        "name": [s["name"] for s in samples],
        "shape": [tuple(s["image"].shape[-2:]) for s in samples],
    }


def _uniform(generator: torch.Generator, low: float, high: float) -> float:
    return low + (high - low) * float(torch.rand((), generator=generator))


def augment(sample: dict, generator: torch.Generator, *, flip: bool = True,
            scale: tuple[float, float] = (1.0, 1.0), crop: int | None = None) -> dict:
    """Random horizontal flip, rescaling by a factor in ``scale`` and a random ``crop``-pixel
    square crop (padding first when the image is smaller).  Returns a new sample."""
    image, mask = sample["image"], sample["mask"]
    if flip and bool(torch.rand((), generator=generator) < 0.5):
        image, mask = image.flip(-1), mask.flip(-1)
    low, high = scale
    if not 0 < low <= high:
        raise ValueError(f"scale must be an interval 0 < low <= high, got {scale}")
    if (low, high) != (1.0, 1.0):
        factor = _uniform(generator, low, high)
        h, w = (max(1, round(factor * n)) for n in image.shape[-2:])
        image = F.interpolate(image[None].float(), size=(h, w), mode="bilinear",
                              align_corners=False)[0].round().clamp(0, 255).to(torch.uint8)
        mask = F.interpolate(mask[None, None].float(), size=(h, w), mode="nearest")[0, 0].long()
    if crop is not None:
        image, mask = _pad_to(image, mask, max(crop, image.shape[-2]), max(crop, image.shape[-1]))
        top = int(torch.randint(image.shape[-2] - crop + 1, (), generator=generator))
        left = int(torch.randint(image.shape[-1] - crop + 1, (), generator=generator))
        image = image[:, top: top + crop, left: left + crop]
        mask = mask[top: top + crop, left: left + crop]
    return {**sample, "image": image, "mask": mask}
