"""The embedded default: a synthetic weak-label segmentation dataset generated on the fly.

Each image shows one to three objects of five shape classes (disk, square, triangle, ring, cross)
on a cluttered, textured background.  The classes differ in shape only: every object's colour and
texture are drawn independently of its class, so no pixel-wise colour rule segments the images.
Objects vary in size, may overlap (later ones occlude earlier ones) and pixel noise is added.

Everything is deterministic in ``(seed, split, index)``; samples are generated once and kept in
memory (64×64 images: about 16 kB each).
"""

from __future__ import annotations

import zlib

import numpy as np
import torch
from torch.utils.data import Dataset

from ccnn.data.base import sizes_from_mask

__all__ = ["SHAPES", "SyntheticShapes"]

SHAPES: tuple[str, ...] = ("disk", "square", "triangle", "ring", "cross")
_PALETTE = np.array([[0, 0, 0], [230, 25, 75], [60, 180, 75], [255, 225, 25], [0, 130, 200],
                     [245, 130, 48]], dtype=np.uint8)
_SPLITS = ("train", "val", "test", "pretrain")


def _shape_mask(kind: str, yy: np.ndarray, xx: np.ndarray, radius: float, angle: float
                ) -> np.ndarray:
    """Boolean mask of one shape of ``radius`` pixels centred at the origin of ``(yy, xx)``."""
    c, s = np.cos(angle), np.sin(angle)
    u, v = c * xx + s * yy, -s * xx + c * yy  # rotated coordinates
    if kind == "disk":
        return u**2 + v**2 <= radius**2
    if kind == "square":
        half = 0.8 * radius
        return (np.abs(u) <= half) & (np.abs(v) <= half)
    if kind == "triangle":  # equilateral, circumradius `radius`
        inside = np.ones_like(u, dtype=bool)
        for k in range(3):
            a = angle + 2 * np.pi * k / 3
            inside &= np.cos(a) * xx + np.sin(a) * yy <= radius / 2
        return inside
    if kind == "ring":
        r2 = u**2 + v**2
        return (r2 <= radius**2) & (r2 >= (0.55 * radius) ** 2)
    if kind == "cross":
        arm = 0.3 * radius
        return ((np.abs(u) <= radius) & (np.abs(v) <= arm)) | (
            (np.abs(v) <= radius) & (np.abs(u) <= arm))
    raise ValueError(f"unknown shape {kind!r}")


def _texture(rng: np.random.Generator, yy: np.ndarray, xx: np.ndarray, avoid: np.ndarray
             ) -> np.ndarray:
    """An object's texture ``(H, W, 3)`` in [0, 1]: flat, stripes or checks, in colours that
    stand out from ``avoid`` (the background's mean colour)."""
    a = _contrasting_colour(rng, avoid)
    b = np.clip(a + rng.uniform(-0.3, 0.3, 3), 0, 1)
    kind = rng.integers(3)
    period = rng.uniform(3, 8)
    theta = rng.uniform(0, np.pi)
    if kind == 0:
        t = np.zeros_like(xx, dtype=float)
    elif kind == 1:
        t = 0.5 + 0.5 * np.sin(2 * np.pi * (np.cos(theta) * xx + np.sin(theta) * yy) / period)
    else:
        t = ((np.floor(xx / period) + np.floor(yy / period)) % 2).astype(float)
    return a + (b - a) * t[..., None]


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, ...], cells: int) -> np.ndarray:
    """Low-frequency noise in [0, 1]: a coarse random grid upsampled bilinearly."""
    coarse = torch.from_numpy(rng.uniform(0, 1, (1, 1, cells, cells)))
    fine = torch.nn.functional.interpolate(coarse, size=shape, mode="bilinear",
                                           align_corners=True)
    return fine[0, 0].numpy()


def _background(rng: np.random.Generator, yy: np.ndarray, xx: np.ndarray) -> np.ndarray:
    """A blotchy two-colour background with clutter: random strokes and specks."""
    a, b = rng.uniform(0, 1, 3), rng.uniform(0, 1, 3)
    t = _smooth_noise(rng, xx.shape, cells=int(rng.integers(3, 7)))
    image = a + (b - a) * t[..., None]
    size = xx.shape[0]
    for _ in range(int(rng.integers(0, 3))):  # strokes: short thin line segments
        p = rng.uniform(0, size, 2)
        q = p + rng.uniform(-0.25, 0.25, 2) * size
        d = q - p
        t = np.clip(((xx - p[0]) * d[0] + (yy - p[1]) * d[1]) / max(d @ d, 1e-9), 0, 1)
        dist2 = (xx - p[0] - t * d[0]) ** 2 + (yy - p[1] - t * d[1]) ** 2
        image[dist2 <= rng.uniform(0.3, 1.2) ** 2] = rng.uniform(0, 1, 3)
    for _ in range(int(rng.integers(3, 12))):  # specks
        cy, cx = rng.uniform(0, size, 2)
        image[(yy - cy) ** 2 + (xx - cx) ** 2 <= rng.uniform(0.5, 1.8) ** 2] = rng.uniform(0, 1, 3)
    return image


def _contrasting_colour(rng: np.random.Generator, avoid: np.ndarray) -> np.ndarray:
    """A random colour at least 0.35 (RGB distance in [0, 1]) from ``avoid``."""
    for _ in range(100):
        colour = rng.uniform(0, 1, 3)
        if np.linalg.norm(colour - avoid) >= 0.35:
            return colour
    return 1.0 - avoid


def generate_sample(rng: np.random.Generator, size: int, max_objects: int
                    ) -> tuple[np.ndarray, np.ndarray]:
    """One image ``(size, size, 3)`` uint8 and its mask ``(size, size)`` int64 (0 = background)."""
    yy, xx = np.mgrid[0:size, 0:size].astype(float)
    image = _background(rng, yy, xx)
    mean_colour = image.reshape(-1, 3).mean(0)
    mask = np.zeros((size, size), dtype=np.int64)
    for _ in range(int(rng.integers(1, max_objects + 1))):
        label = int(rng.integers(len(SHAPES)))
        radius = rng.uniform(0.18, 0.36) * size
        cy, cx = rng.uniform(radius * 0.6, size - radius * 0.6, 2)
        inside = _shape_mask(SHAPES[label], yy - cy, xx - cx, radius, rng.uniform(0, 2 * np.pi))
        image[inside] = _texture(rng, yy, xx, mean_colour)[inside]
        mask[inside] = label + 1
    image = image + rng.normal(0, rng.uniform(0.02, 0.06), image.shape)
    return (np.clip(image, 0, 1) * 255).round().astype(np.uint8), mask


class SyntheticShapes(Dataset):
    """Shapes on clutter: the synthetic weak-label default (see the module docstring).

    Args:
        split: ``"train"``, ``"val"``, ``"test"`` or ``"pretrain"`` (independent draws; the
            last is the classification set of :mod:`ccnn.pretrain`, drawn with one object).
        size: number of images.
        image_size: side of the square images in pixels.
        max_objects: at most this many objects per image (at least one).
        seed: the dataset seed; sample ``i`` of a split depends only on ``(seed, split, i)``.
    """

    num_classes = len(SHAPES) + 1
    class_names: tuple[str, ...] = ("background", *SHAPES)
    palette = torch.from_numpy(_PALETTE)
    background = 0

    def __init__(self, split: str = "train", size: int = 1000, *, image_size: int = 64,
                 max_objects: int = 3, seed: int = 0) -> None:
        if split not in _SPLITS:
            raise ValueError(f"split must be one of {_SPLITS}, got {split!r}")
        if size < 1:
            raise ValueError(f"size must be positive, got {size}")
        if image_size < 16:
            raise ValueError(f"image_size must be at least 16, got {image_size}")
        if max_objects < 1:
            raise ValueError(f"max_objects must be at least 1, got {max_objects}")
        self.split, self.image_size = split, image_size
        self.max_objects, self.seed = max_objects, seed
        self._split_key = zlib.crc32(split.encode())
        self._samples: list[dict | None] = [None] * size

    def __len__(self) -> int:
        return len(self._samples)

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} samples")
        if self._samples[index] is None:
            rng = np.random.default_rng([self.seed, self._split_key, index])
            image, mask = generate_sample(rng, self.image_size, self.max_objects)
            mask_t = torch.from_numpy(mask)
            sizes = sizes_from_mask(mask_t, self.num_classes)
            self._samples[index] = {
                "image": torch.from_numpy(image).permute(2, 0, 1).contiguous(),
                "mask": mask_t,
                "tags": (sizes > 0).float(),
                "sizes": sizes,
                "name": f"{self.split}_{index:05d}",
            }
        return self._samples[index]
