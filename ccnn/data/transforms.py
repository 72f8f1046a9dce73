"""Batching, augmentation and normalisation of ``ccnn.data`` samples.

Augmentation is a dataset transform (:class:`Transformed`) applied inside the
:class:`~torch.utils.data.DataLoader`, so ``--workers`` parallelises it; its random parameters
are drawn in the main process from an explicit ``torch.Generator`` (:class:`DrawnBatches`), so a
training run seeded per epoch is reproducible exactly, resumable, and the same with any number of
workers.  Tags and sizes are those of the whole image: a crop that cuts an object out leaves its
tag in place, as weak labels are noisy in practice.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset, Sampler

from ccnn.data.base import IGNORE_INDEX

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "AugmentParams", "Augmentation", "DrawnBatches",
           "Transformed", "augment", "collate", "normalize"]

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


class AugmentParams(NamedTuple):
    """One sample's draw of :class:`Augmentation`: whether to flip, the scale factor and, with a
    crop, its corner as fractions ``(top, left)`` in ``[0, 1)`` of the free range."""

    flip: bool = False
    factor: float = 1.0
    crop_at: tuple[float, float] | None = None


@dataclass(frozen=True)
class Augmentation:
    """Random horizontal flip, rescaling by a factor in ``scale`` and a random ``crop``-pixel
    square crop (padding first when the image is smaller), applied to image and mask alike.

    Split in two so that a :class:`~torch.utils.data.DataLoader`'s workers can do the work while
    the randomness stays in one place: :meth:`draw` takes a sample's parameters from a
    ``torch.Generator`` (in the main process, :class:`DrawnBatches`), :meth:`apply` transforms
    the sample (in a worker, :class:`Transformed`).  Calling it does both.
    """

    flip: bool = True
    scale: tuple[float, float] = (1.0, 1.0)
    crop: int | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "scale", tuple(self.scale))
        low, high = self.scale
        if not 0 < low <= high:
            raise ValueError(f"scale must be an interval 0 < low <= high, got {self.scale}")
        if self.crop is not None and self.crop < 1:
            raise ValueError(f"crop must be at least 1 pixel, got {self.crop}")

    def draw(self, generator: torch.Generator) -> AugmentParams:
        """One sample's parameters: a flip (one draw, when ``flip``), a factor (one draw, when
        ``scale`` is not ``(1, 1)``) and a crop corner (two draws, when ``crop``)."""
        flip = self.flip and bool(torch.rand((), generator=generator) < 0.5)
        factor = _uniform(generator, *self.scale) if self.scale != (1.0, 1.0) else 1.0
        crop_at = None
        if self.crop is not None:
            crop_at = (float(torch.rand((), generator=generator)),
                       float(torch.rand((), generator=generator)))
        return AugmentParams(flip, factor, crop_at)

    def apply(self, sample: dict, params: AugmentParams) -> dict:
        """The sample flipped, rescaled and cropped by ``params``; returns a new sample.

        The image is resampled bilinearly and the mask by its nearest pixel centre
        (``nearest-exact``), so that both sample the same source positions."""
        image, mask = sample["image"], sample["mask"]
        if params.flip:
            image, mask = image.flip(-1), mask.flip(-1)
        if self.scale != (1.0, 1.0):
            h, w = (max(1, round(params.factor * n)) for n in image.shape[-2:])
            image = F.interpolate(image[None].float(), size=(h, w), mode="bilinear",
                                  align_corners=False)[0].round().clamp(0, 255).to(torch.uint8)
            mask = F.interpolate(mask[None, None].float(), size=(h, w),
                                 mode="nearest-exact")[0, 0].long()
        if self.crop is not None:
            crop = self.crop
            image, mask = _pad_to(image, mask, max(crop, image.shape[-2]),
                                  max(crop, image.shape[-1]))
            top, left = (min(int(u * (n - crop + 1)), n - crop)
                         for u, n in zip(params.crop_at or (0.0, 0.0), image.shape[-2:],
                                         strict=True))
            image = image[:, top: top + crop, left: left + crop]
            mask = mask[top: top + crop, left: left + crop]
        return {**sample, "image": image, "mask": mask}

    def __call__(self, sample: dict, generator: torch.Generator) -> dict:
        return self.apply(sample, self.draw(generator))


def augment(sample: dict, generator: torch.Generator, *, flip: bool = True,
            scale: tuple[float, float] = (1.0, 1.0), crop: int | None = None) -> dict:
    """:class:`Augmentation` ``(flip, scale, crop)`` applied to one sample with draws from
    ``generator``.  Returns a new sample."""
    return Augmentation(flip, scale, crop)(sample, generator)


_DATASET_ATTRIBUTES = ("num_classes", "class_names", "palette", "background")


class Transformed(Dataset):
    """``dataset`` seen through ``transform`` (an :class:`Augmentation`).

    Items are asked for as ``(index, params)`` pairs, ``params`` drawn beforehand by
    :meth:`Augmentation.draw` (:class:`DrawnBatches` does it in a
    :class:`~torch.utils.data.DataLoader`); the transform's work happens here, in the loader's
    workers when it has any.  The dataset's class attributes are kept.
    """

    def __init__(self, dataset: Dataset, transform: Augmentation) -> None:
        self.dataset, self.transform = dataset, transform
        for name in _DATASET_ATTRIBUTES:
            if hasattr(dataset, name):
                setattr(self, name, getattr(dataset, name))

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, AugmentParams]) -> dict:
        index, params = key
        return self.transform.apply(self.dataset[index], params)


class DrawnBatches(Sampler[list]):
    """The batches of ``batch_sampler``, each index paired with its sample's draw of
    ``transform`` from ``generator`` — in the main process and in the order of the batches, so
    a run's augmentation does not depend on the number of workers."""

    def __init__(self, batch_sampler: Iterable[list[int]], transform: Augmentation,
                 generator: torch.Generator) -> None:
        self.batch_sampler, self.transform, self.generator = batch_sampler, transform, generator

    def __iter__(self) -> Iterator[list[tuple[int, AugmentParams]]]:
        for indices in self.batch_sampler:
            yield [(index, self.transform.draw(self.generator)) for index in indices]

    def __len__(self) -> int:
        return len(self.batch_sampler)
