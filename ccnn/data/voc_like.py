"""A second synthetic source, written to disk in PASCAL VOC 2012's layout.

The built-in default (:mod:`ccnn.data.synthetic`) is the data every preset was tuned on.  This
generator is of another origin, to test whether the weak-label pipeline holds up on data no
setting was chosen on (issue 15, part 4): other shapes (ellipse, flower, hexagon, crescent,
arrow, heart), other object textures (shaded, polka dots, concentric rings, grain, zigzag) and
other backgrounds (Voronoi mosaics, plaids, multi-octave noise, gradients with grass-like
strokes), with JPEG compression, an illumination gradient and pixel noise.  As in the built-in
data, an object's colour and texture are drawn independently of its class.

Object sizes follow VOC's statistics: with the default, each image's objects cover together
10–50% of it (the background about 68% on average, as in VOC 2012); with ``small_objects``
3–25% (the background about 89%).  One to three objects per image, classes may repeat, later
objects occlude earlier ones, and each keeps at least a quarter of its pixels visible.

:func:`write_voc_like` writes a folder that :class:`ccnn.data.voc.VOCDataset` reads as the
``VOC2012`` folder itself (``--data-root DIR``)::

    DIR/JPEGImages/<id>.jpg
    DIR/SegmentationClass/<id>.png             palette PNG of class indices (no void)
    DIR/ImageSets/Segmentation/{train,val,trainval,test}.txt
    DIR/ImageSets/Main/<class>_trainval.txt    VOC's image-level labels (train and val)
    DIR/voc_like.json                          settings, class map and statistics

The six shapes are stored under VOC's class indices 1–6 (:data:`CLASS_INDEX`); the other
fourteen VOC classes never occur.  Everything is deterministic in ``(seed, split, index)``
through ``numpy.random.Generator``s; the global random state is never touched.
"""

from __future__ import annotations

import json
import logging
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

from ccnn.data.voc import VOC_CLASSES, voc_palette

__all__ = ["CLASS_INDEX", "SHAPES", "SPLITS", "VARIANTS", "generate_image", "split_ids",
           "write_voc_like"]

logger = logging.getLogger(__name__)

SHAPES: tuple[str, ...] = ("ellipse", "flower", "hexagon", "crescent", "arrow", "heart")
CLASS_INDEX: dict[str, int] = {shape: k for k, shape in enumerate(SHAPES, start=1)}
SPLITS: tuple[str, ...] = ("train", "val", "test")
# The foreground share of an image (all objects together) is drawn as lo + (hi − lo)·u^k with u
# uniform: k sets the mean.  After occlusion and clipping the images keep the band [lo, hi].
VARIANTS: dict[str, dict[str, float]] = {
    "voc": {"lo": 0.10, "hi": 0.50, "k": 0.6},     # background about 68%, as VOC 2012
    "small": {"lo": 0.03, "hi": 0.25, "k": 1.7},   # background about 89%
}
_MIN_VISIBLE = 0.25  # share of an object's own pixels left visible after occlusion
_MIN_PIXELS = 6
_ATTEMPTS = 50
GENERATOR_VERSION = 1


# -- shapes ---------------------------------------------------------------------------------------

def _shape_mask(kind: str, u: np.ndarray, v: np.ndarray, r: float, aspect: float) -> np.ndarray:
    """Boolean mask of shape ``kind`` of scale ``r`` in rotated coordinates ``(u, v)``."""
    if kind == "ellipse":
        return (u / r) ** 2 + (v / (aspect * r)) ** 2 <= 1.0
    rho, theta = np.hypot(u, v), np.arctan2(v, u)
    if kind == "flower":  # five smooth lobes
        return rho <= r * (0.55 + 0.45 * np.cos(5 * theta))
    if kind == "hexagon":
        inside = np.ones_like(u, dtype=bool)
        for k in range(3):
            a = np.pi / 6 + k * np.pi / 3
            inside &= np.abs(np.cos(a) * u + np.sin(a) * v) <= r * np.cos(np.pi / 6)
        return inside
    if kind == "crescent":
        return (rho <= r) & (np.hypot(u - 0.45 * r, v) > 0.8 * r)
    if kind == "arrow":
        shaft = (u >= -r) & (u <= 0.2 * r) & (np.abs(v) <= 0.22 * r)
        head = (u >= 0.2 * r) & (u <= r) & (np.abs(v) <= 0.75 * (r - u))
        return shaft | head
    if kind == "heart":
        x, y = u / r * 1.2, -v / r * 1.2 + 0.15
        return (x**2 + y**2 - 1) ** 3 - x**2 * y**3 <= 0
    raise ValueError(f"unknown shape {kind!r}")


# -- textures and backgrounds --------------------------------------------------------------------

def _smooth_noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """Low-frequency noise in [0, 1]: a ``cells``² grid interpolated bilinearly to ``size``²."""
    grid = rng.uniform(0, 1, (cells + 1, cells + 1))
    t = np.linspace(0, cells, size)
    i = np.minimum(t.astype(int), cells - 1)
    f = t - i
    rows = grid[i] * (1 - f)[:, None] + grid[i + 1] * f[:, None]
    return rows[:, i] * (1 - f)[None, :] + rows[:, i + 1] * f[None, :]


def _mix(a: np.ndarray, b: np.ndarray, t: np.ndarray) -> np.ndarray:
    return a + (b - a) * t[..., None]


def _background(rng: np.random.Generator, yy: np.ndarray, xx: np.ndarray) -> np.ndarray:
    """One of four backgrounds ``(H, W, 3)`` in [0, 1]: a Voronoi mosaic, a plaid, multi-octave
    noise, or a gradient with grass-like strokes."""
    size = xx.shape[0]
    kind = int(rng.integers(4))
    if kind == 0:  # mosaic of muted cells
        seeds = rng.uniform(0, size, (int(rng.integers(6, 20)), 2))
        d = (yy[..., None] - seeds[:, 0]) ** 2 + (xx[..., None] - seeds[:, 1]) ** 2
        base = rng.uniform(0.2, 0.8, 3)
        colours = np.clip(base + rng.normal(0, 0.15, (len(seeds), 3)), 0, 1)
        return colours[d.argmin(-1)]
    if kind == 1:  # plaid: two stripe systems
        a, b, c = (rng.uniform(0, 1, 3) for _ in range(3))
        p1, p2 = rng.uniform(5, 16, 2)
        s1 = 0.5 + 0.5 * np.sin(2 * np.pi * yy / p1 + rng.uniform(0, 6.3))
        s2 = 0.5 + 0.5 * np.sin(2 * np.pi * xx / p2 + rng.uniform(0, 6.3))
        return _mix(_mix(a, b, s1), c, 0.5 * s2)
    if kind == 2:  # multi-octave noise through a two-colour ramp
        t = sum(w * _smooth_noise(rng, size, cells) for w, cells in ((0.5, 2), (0.3, 5), (0.2, 11)))
        return _mix(rng.uniform(0, 1, 3), rng.uniform(0, 1, 3), np.clip(t, 0, 1))
    top, bottom = rng.uniform(0, 1, 3), rng.uniform(0, 1, 3)  # gradient with grass
    image = _mix(top, bottom, yy / max(size - 1, 1))
    stroke = np.clip(bottom + rng.normal(0, 0.2, 3), 0, 1)
    for _ in range(int(rng.integers(10, 40))):
        x0, y0 = rng.uniform(0, size, 2)
        length, lean = rng.uniform(2, 0.25 * size), rng.uniform(-0.4, 0.4)
        t = np.clip((y0 - yy) / length, 0, 1)
        near = (np.abs(xx - (x0 + lean * (y0 - yy))) <= 0.6) & (yy <= y0) & (yy >= y0 - length)
        image[near & (t < 1)] = stroke
    return image


def _texture(rng: np.random.Generator, yy: np.ndarray, xx: np.ndarray, cy: float, cx: float,
             avoid: np.ndarray) -> np.ndarray:
    """An object's texture ``(H, W, 3)``: shaded, polka dots, concentric rings, grain or zigzag,
    in a colour at least 0.35 (RGB distance) from ``avoid``."""
    a = _contrasting(rng, avoid)
    b = np.clip(a + rng.uniform(-0.35, 0.35, 3), 0, 1)
    kind = int(rng.integers(5))
    period = rng.uniform(3, 9)
    if kind == 0:  # shading across the object
        angle = rng.uniform(0, 2 * np.pi)
        t = np.clip(0.5 + ((xx - cx) * np.cos(angle) + (yy - cy) * np.sin(angle)) / 40, 0, 1)
    elif kind == 1:  # polka dots
        t = ((np.mod(xx, period) - period / 2) ** 2 + (np.mod(yy, period) - period / 2) ** 2
             <= (0.3 * period) ** 2).astype(float)
    elif kind == 2:  # rings around the centre
        t = 0.5 + 0.5 * np.cos(2 * np.pi * np.hypot(yy - cy, xx - cx) / period)
    elif kind == 3:  # grain
        t = rng.uniform(0, 1, xx.shape)
    else:  # zigzag stripes
        t = (np.mod(yy + 0.8 * np.abs(np.mod(xx, period) - period / 2), period)
             < period / 2).astype(float)
    return _mix(a, b, t)


def _contrasting(rng: np.random.Generator, avoid: np.ndarray) -> np.ndarray:
    """A random colour at least 0.35 (RGB distance in [0, 1]) from ``avoid``."""
    for _ in range(100):
        colour = rng.uniform(0, 1, 3)
        if np.linalg.norm(colour - avoid) >= 0.35:
            return colour
    return 1.0 - avoid


# -- one image ------------------------------------------------------------------------------------

def _place_objects(rng: np.random.Generator, size: int, variant: dict[str, float]
                   ) -> list[tuple[int, np.ndarray, float, float]] | None:
    """Draw the objects of one image: ``(label, mask, cy, cx)`` each, in painting order, or
    ``None`` when the draw misses the variant's band (the caller draws again)."""
    yy, xx = np.mgrid[0:size, 0:size].astype(float)
    lo, hi = variant["lo"], variant["hi"]
    share = lo + (hi - lo) * rng.uniform() ** variant["k"]
    count = int(rng.choice([1, 2, 3], p=[0.5, 0.3, 0.2]))
    parts = rng.dirichlet(np.full(count, 2.0)) * share * size * size
    objects, union = [], np.zeros((size, size), dtype=bool)
    for target in parts:
        label = int(rng.integers(len(SHAPES)))
        angle, aspect = rng.uniform(0, 2 * np.pi), rng.uniform(0.45, 0.8)
        r = np.sqrt(target / np.pi)
        cy, cx = rng.uniform(0.15 * size, 0.85 * size, 2)
        c, s = np.cos(angle), np.sin(angle)
        for _ in range(2):  # scale to the target area (measured on the image, clipping included)
            u, v = c * (xx - cx) + s * (yy - cy), -s * (xx - cx) + c * (yy - cy)
            mask = _shape_mask(SHAPES[label], u, v, r, aspect)
            r *= np.sqrt(target / max(int(mask.sum()), 1))
        u, v = c * (xx - cx) + s * (yy - cy), -s * (xx - cx) + c * (yy - cy)
        mask = _shape_mask(SHAPES[label], u, v, r, aspect)
        objects.append((label + 1, mask, cy, cx))
        union |= mask
    visible = np.zeros((size, size), dtype=np.int64)
    for k, (_, mask, _, _) in enumerate(objects, start=1):
        visible[mask] = k
    for k, (_, mask, _, _) in enumerate(objects, start=1):
        seen = int((visible == k).sum())
        if seen < _MIN_PIXELS or seen < _MIN_VISIBLE * int(mask.sum()):
            return None
    return objects if lo <= union.mean() <= hi else None


def generate_image(rng: np.random.Generator, size: int, *, small_objects: bool = False
                   ) -> tuple[np.ndarray, np.ndarray]:
    """One image ``(size, size, 3)`` uint8 and its mask ``(size, size)`` uint8 of VOC class
    indices (0 = background, 1–6 the shapes of :data:`SHAPES`)."""
    if size < 16:
        raise ValueError(f"image size must be at least 16, got {size}")
    variant = VARIANTS["small" if small_objects else "voc"]
    for _ in range(_ATTEMPTS):
        objects = _place_objects(rng, size, variant)
        if objects is not None:
            break
    else:  # pragma: no cover - the band is met within a few draws
        raise RuntimeError(f"no image in the object-size band after {_ATTEMPTS} draws")
    yy, xx = np.mgrid[0:size, 0:size].astype(float)
    image = _background(rng, yy, xx)
    mask = np.zeros((size, size), dtype=np.uint8)
    for label, inside, cy, cx in objects:
        avoid = image[inside].mean(0)
        image[inside] = _texture(rng, yy, xx, cy, cx, avoid)[inside]
        mask[inside] = label
    angle = rng.uniform(0, 2 * np.pi)  # illumination: a gentle multiplicative gradient
    light = 1 + rng.uniform(0, 0.25) * ((xx * np.cos(angle) + yy * np.sin(angle)) / size - 0.5)
    image = image * light[..., None] + rng.normal(0, rng.uniform(0.01, 0.04), image.shape)
    return (np.clip(image, 0, 1) * 255).round().astype(np.uint8), mask


# -- the folder -----------------------------------------------------------------------------------

def split_ids(seed: int, split: str, count: int) -> list[str]:
    """The image ids of one split: ``vl<seed>_<split>_<index>``."""
    return [f"vl{seed}_{split}_{i:05d}" for i in range(count)]


def _write_palette_png(path: Path, mask: np.ndarray) -> None:
    image = Image.fromarray(mask)
    image.putpalette(voc_palette().flatten().tolist())
    image.save(path)


def _statistics(masks: list[np.ndarray]) -> dict:
    """Background share (mean, min, max), foreground band and classes per image of ``masks``."""
    background = np.array([float((m == 0).mean()) for m in masks])
    classes = np.array([len(set(np.unique(m).tolist()) - {0}) for m in masks])
    return {"images": len(masks), "background_mean": float(background.mean()),
            "background_min": float(background.min()),
            "background_max": float(background.max()),
            "classes_per_image": float(classes.mean())}


def write_voc_like(out: str | Path, *, size: int, seed: int = 0, val_size: int | None = None,
                   test_size: int | None = None, image_size: int = 64,
                   small_objects: bool = False, quality: int = 90) -> dict:
    """Write a VOC-layout dataset of this module's generator to ``out`` (see the module).

    Args:
        out: the folder to write (the ``VOC2012`` folder itself; created).  It must not hold
            a dataset already (``ImageSets`` present).
        size: training images.
        seed: the dataset seed; image ``i`` of a split depends on ``(seed, split, i)`` only.
        val_size, test_size: images of ``val`` and ``test`` (default ``max(1, size // 5)``).
        image_size: side of the square images in pixels (at least 16).
        small_objects: the small-object variant (background about 89% instead of 68%).
        quality: JPEG quality of the images.

    Returns:
        What ``voc_like.json`` holds: the settings, the class map and each split's statistics
        (:func:`_statistics`).
    """
    default = max(1, size // 5)
    counts = {"train": size, "val": default if val_size is None else val_size,
              "test": default if test_size is None else test_size}
    for name, value in (("size", size), ("val_size", counts["val"]),
                        ("test_size", counts["test"])):
        if value < 1:
            raise ValueError(f"{name} must be at least 1, got {value}")
    if image_size < 16:
        raise ValueError(f"image_size must be at least 16, got {image_size}")
    if not 1 <= quality <= 100:
        raise ValueError(f"quality must lie in [1, 100], got {quality}")
    out = Path(out)
    if (out / "ImageSets").exists():
        raise ValueError(f"out {out} already holds a dataset (ImageSets/); choose a new folder")
    for sub in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation", "ImageSets/Main"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    stats, present = {}, {}
    for split in SPLITS:
        key = zlib.crc32(split.encode())
        masks = []
        for index, name in enumerate(split_ids(seed, split, counts[split])):
            rng = np.random.default_rng([seed, key, index, int(small_objects)])
            image, mask = generate_image(rng, image_size, small_objects=small_objects)
            Image.fromarray(image).save(out / "JPEGImages" / f"{name}.jpg", quality=quality)
            _write_palette_png(out / "SegmentationClass" / f"{name}.png", mask)
            masks.append(mask)
            present[name] = set(np.unique(mask).tolist()) - {0}
        names = split_ids(seed, split, counts[split])
        (out / "ImageSets" / "Segmentation" / f"{split}.txt").write_text(
            "".join(f"{n}\n" for n in names))
        stats[split] = _statistics(masks)
        logger.info("voc-like %s: %d images, background %.3f on average", split, len(masks),
                    stats[split]["background_mean"])
    trainval = split_ids(seed, "train", counts["train"]) + split_ids(seed, "val", counts["val"])
    (out / "ImageSets" / "Segmentation" / "trainval.txt").write_text(
        "".join(f"{n}\n" for n in trainval))
    for label, class_name in enumerate(VOC_CLASSES[1:], start=1):
        lines = [f"{n} {1 if label in present[n] else -1:2d}\n" for n in trainval]
        (out / "ImageSets" / "Main" / f"{class_name}_trainval.txt").write_text("".join(lines))
    meta = {"generator": "ccnn.data.voc_like", "version": GENERATOR_VERSION, "seed": seed,
            "sizes": counts, "image_size": image_size, "small_objects": small_objects,
            "variant": VARIANTS["small" if small_objects else "voc"],
            "classes": {shape: {"index": k, "voc_name": VOC_CLASSES[k]}
                        for shape, k in CLASS_INDEX.items()},
            "statistics": stats}
    (out / "voc_like.json").write_text(json.dumps(meta, indent=2) + "\n")
    return meta
