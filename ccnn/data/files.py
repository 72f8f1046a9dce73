"""Reading dataset files with errors that name the file and point at ``data/README.md``.

Every reader takes ``where``, the context of the read (e.g. ``"VOC train split"``), which starts
each of its error messages.  A file that is missing raises ``FileNotFoundError``; one that exists
but cannot be decoded (truncated, corrupt, not an image) raises :class:`BadFileError`, never PIL's
own ``OSError`` (``Truncated File Read``, ``image file is truncated``), which names no file.
PIL reads lazily, so the readers decode the pixels before they return.
"""

from __future__ import annotations

import logging
import os
import struct
import time
import zlib
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch import Tensor

from ccnn.data.base import sizes_from_mask, tags_from_mask

__all__ = ["README", "BadFileError", "bad_file", "make_sample", "read_index_png", "read_rgb",
           "require_dir", "scan_samples", "verify_image"]

logger = logging.getLogger(__name__)

README = "data/README.md"
SKIP_HINT = "pass skip_bad=True (ccnn train --skip-bad) to skip the samples of unreadable files"
# What PIL (and scipy.io, zlib) raise on a truncated or corrupt file, at open or at decode time.
DECODE_ERRORS: tuple[type[BaseException], ...] = (OSError, SyntaxError, ValueError, EOFError,
                                                  struct.error, zlib.error)
_SHOWN = 5  # skipped files named in the log warning (all are in the dataset's ``skipped``)

Sample = TypeVar("Sample")


class BadFileError(ValueError):
    """A dataset file that exists but cannot be read: truncated, corrupt or not an image.

    ``path`` is the file at fault (``None`` when the error was rebuilt from its message alone, as
    a ``DataLoader`` worker does).
    """

    def __init__(self, message: str, path: Path | None = None) -> None:
        super().__init__(message)
        self.path = path


def _prefix(where: str) -> str:
    return f"{where}: " if where else ""


def _missing(path: Path, what: str, where: str) -> FileNotFoundError:
    return FileNotFoundError(f"{_prefix(where)}{what} {path} is missing (see {README} for the "
                             f"expected layout)")


def bad_file(path: Path, what: str, where: str, err: BaseException | None = None) -> BadFileError:
    """The :class:`BadFileError` of an unreadable file; ``err`` is the reader's own error."""
    cause = "" if err is None else f" ({type(err).__name__}: {err})"
    hint = f"; {SKIP_HINT}" if where else ""
    return BadFileError(f"{_prefix(where)}{what} {path} is truncated or corrupt{cause}{hint}",
                        path)


def _open_image(path: Path, what: str, where: str) -> Image.Image:
    """Open ``path`` with PIL; a missing or unreadable file raises an error naming it."""
    if not path.is_file():
        raise _missing(path, what, where)
    try:
        return Image.open(path)
    except UnidentifiedImageError as err:
        hint = f"; {SKIP_HINT}" if where else ""
        raise BadFileError(f"{_prefix(where)}{what} {path} is not an image PIL can read{hint}",
                           path) from err
    except DECODE_ERRORS as err:
        raise bad_file(path, what, where, err) from err


def _decode(image: Image.Image, path: Path, what: str, where: str) -> None:
    """Decode the pixels of a lazily opened ``image`` now, naming ``path`` if they are bad."""
    try:
        image.load()
    except DECODE_ERRORS as err:
        raise bad_file(path, what, where, err) from err


def read_rgb(path: Path, *, where: str = "") -> Tensor:
    """The image at ``path`` as a uint8 ``(3, H, W)`` RGB tensor.

    Raises ``FileNotFoundError`` for a missing file and :class:`BadFileError` for a truncated or
    corrupt one, each naming ``path`` (after ``where``).
    """
    with _open_image(path, "image", where) as image:
        _decode(image, path, "image", where)
        array = np.array(image.convert("RGB"))
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


def read_index_png(path: Path, *, where: str = "") -> Tensor:
    """The label image at ``path``, a palette ("P") or grayscale ("L") PNG, as int64 ``(H, W)``.

    The pixel values are the class indices themselves (not colours).  Errors as
    :func:`read_rgb`, and a ``ValueError`` for another PIL mode.
    """
    with _open_image(path, "mask", where) as image:
        if image.mode not in ("P", "L"):
            raise ValueError(f"{_prefix(where)}mask {path} has PIL mode {image.mode!r}: expected "
                             f"a palette ('P') or grayscale ('L') PNG of class indices (see "
                             f"{README})")
        _decode(image, path, "mask", where)
        array = np.array(image, dtype=np.int64)
    return torch.from_numpy(array)


def verify_image(path: Path, what: str = "image", *, where: str = "") -> None:
    """Check that the image at ``path`` decodes, without keeping its pixels.

    JPEGs decode at 1/8 scale (PIL's draft mode: every byte of the entropy-coded data is still
    read, so a truncated file is caught, at a fraction of the cost); other formats in full.
    Raises as :func:`read_rgb`.
    """
    with _open_image(path, what, where) as image:
        if image.format == "JPEG":
            image.draft(image.mode, (1, 1))
        _decode(image, path, what, where)


def make_sample(name: str, image: Tensor, mask: Tensor, num_classes: int, *, image_path: Path,
                mask_path: Path, tags: Tensor | None = None, where: str = "") -> dict:
    """The sample of :mod:`ccnn.data.base` for ``image`` and its ``mask`` (void already mapped to
    ``IGNORE_INDEX``).  ``tags`` default to the classes present in the mask; sizes always come
    from the mask.  A size mismatch or an out-of-range label raises a ``ValueError`` naming the
    files (after ``where``)."""
    if tuple(image.shape[-2:]) != tuple(mask.shape):
        raise ValueError(f"{_prefix(where)}image {image_path} is {tuple(image.shape[-2:])} (H, W) "
                         f"but its mask {mask_path} is {tuple(mask.shape)}: they must have the "
                         f"same size")
    try:
        sizes = sizes_from_mask(mask, num_classes)
    except ValueError as err:
        raise ValueError(f"{_prefix(where)}mask {mask_path}: {err} (see {README} for the label "
                         f"encoding)") from err
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


def _first_bad(paths: Sequence[Path], verify: Callable[[Path], object]) -> Path | None:
    """The first of ``paths`` that is missing or that ``verify`` cannot read, else ``None``."""
    for path in paths:
        try:
            verify(path)
        except (FileNotFoundError, BadFileError):
            return path
    return None


def scan_samples(samples: Sequence[Sample], paths: Callable[[Sample], Sequence[Path]],
                 verify: Callable[[Path], object], where: str
                 ) -> tuple[list[Sample], list[Path]]:
    """The samples whose files all read, and the bad file of each one left out.

    ``paths(sample)`` lists a sample's files; ``verify(path)`` reads one, raising
    ``FileNotFoundError`` or :class:`BadFileError` when it cannot (it runs in a few threads: PIL
    decodes without the GIL).  The samples left out are logged as a warning; a ``ValueError``
    if none is left.
    """
    workers = max(1, min(8, os.cpu_count() or 1))
    start = time.perf_counter()
    with ThreadPoolExecutor(workers) as pool:
        bad = list(pool.map(lambda s: _first_bad(paths(s), verify), samples))
    logger.info("%s: read the files of %d samples in %.1f s", where, len(samples),
                time.perf_counter() - start)
    kept = [s for s, b in zip(samples, bad, strict=True) if b is None]
    skipped = [b for b in bad if b is not None]
    if skipped:
        shown = ", ".join(str(p) for p in skipped[:_SHOWN])
        more = f" and {len(skipped) - _SHOWN} more" if len(skipped) > _SHOWN else ""
        logger.warning("%s: skipped %d of %d samples whose files are missing or unreadable: %s%s",
                       where, len(skipped), len(samples), shown, more)
    if not kept:
        raise ValueError(f"{where}: every one of its {len(samples)} samples has a missing or "
                         f"unreadable file (e.g. {skipped[0]}; see {README})")
    return kept, skipped
