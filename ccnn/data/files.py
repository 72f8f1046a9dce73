"""Reading dataset files with errors that name the file and point at ``data/README.md``."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch import Tensor

from ccnn.data.base import sizes_from_mask, tags_from_mask

__all__ = ["README", "make_sample", "read_index_png", "read_rgb", "require_dir"]

README = "data/README.md"


def _open_image(path: Path, what: str) -> Image.Image:
    """Open ``path`` with PIL; a missing or unreadable file raises an error naming it."""
    if not path.is_file():
        raise FileNotFoundError(f"{what} {path} is missing (see {README} for the expected layout)")
    try:
        return Image.open(path)
    except UnidentifiedImageError as err:
        raise ValueError(f"{what} {path} is not an image PIL can read") from err


def read_rgb(path: Path) -> Tensor:
    """The image at ``path`` as a uint8 ``(3, H, W)`` RGB tensor."""
    with _open_image(path, "image") as image:
        array = np.array(image.convert("RGB"))
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


def read_index_png(path: Path) -> Tensor:
    """The label image at ``path``, a palette ("P") or grayscale ("L") PNG, as int64 ``(H, W)``.

    The pixel values are the class indices themselves (not colours).
    """
    with _open_image(path, "mask") as image:
        if image.mode not in ("P", "L"):
            raise ValueError(f"mask {path} has PIL mode {image.mode!r}: expected a palette ('P') "
                             f"or grayscale ('L') PNG of class indices (see {README})")
        array = np.array(image, dtype=np.int64)
    return torch.from_numpy(array)


def make_sample(name: str, image: Tensor, mask: Tensor, num_classes: int, *, image_path: Path,
                mask_path: Path, tags: Tensor | None = None) -> dict:
    """The sample of :mod:`ccnn.data.base` for ``image`` and its ``mask`` (void already mapped to
    ``IGNORE_INDEX``).  ``tags`` default to the classes present in the mask; sizes always come
    from the mask.  A size mismatch or an out-of-range label raises a ``ValueError`` naming the
    files."""
    if tuple(image.shape[-2:]) != tuple(mask.shape):
        raise ValueError(f"image {image_path} is {tuple(image.shape[-2:])} (H, W) but its mask "
                         f"{mask_path} is {tuple(mask.shape)}: they must have the same size")
    try:
        sizes = sizes_from_mask(mask, num_classes)
    except ValueError as err:
        raise ValueError(f"mask {mask_path}: {err} (see {README} for the label encoding)") from err
    return {
        "image": image,
        "mask": mask,
        "tags": tags_from_mask(mask, num_classes) if tags is None else tags,
        "sizes": sizes,
        "name": name,
    }


def require_dir(path: Path, what: str) -> Path:
    """``path`` if it is a folder; otherwise a ``FileNotFoundError`` naming it."""
    if not path.is_dir():
        raise FileNotFoundError(f"{what} folder {path} not found (see {README} for the expected "
                                f"layout)")
    return path
