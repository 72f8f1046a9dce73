"""CamVid in SegNet's layout: 11 classes, no background, tags and sizes from the masks.

The layout read (``data/README.md`` has the whole of it)::

    <root>/CamVid/                or ``root`` pointing at the CamVid folder itself
        train/<name>.png          RGB images
        trainannot/<name>.png     grayscale class indices 0..10, 11 = void
        val/, valannot/, test/, testannot/

Void (11) is read as ``IGNORE_INDEX`` (255).  The split folders and the pairing of images with
annotations are checked when a dataset is built; each file when it is loaded (or, with
``skip_bad=True``, once when the dataset is built, leaving out the samples of unreadable files).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch.utils.data import Dataset

from ccnn.data.base import IGNORE_INDEX
from ccnn.data.files import (
    README,
    make_sample,
    read_index_png,
    read_rgb,
    require_dir,
    scan_samples,
    verify_image,
)

__all__ = ["CAMVID_CLASSES", "CAMVID_PALETTE", "CAMVID_VOID", "SPLITS", "CamVidDataset"]

CAMVID_CLASSES: tuple[str, ...] = ("Sky", "Building", "Pole", "Road", "Pavement", "Tree",
                                   "SignSymbol", "Fence", "Car", "Pedestrian", "Bicyclist")
CAMVID_PALETTE = torch.tensor(  # SegNet's colours, in the order of CAMVID_CLASSES
    [[128, 128, 128], [128, 0, 0], [192, 192, 128], [128, 64, 128], [60, 40, 222],
     [128, 128, 0], [192, 128, 128], [64, 64, 128], [64, 0, 128], [64, 64, 0], [0, 128, 192]],
    dtype=torch.uint8)
CAMVID_VOID = 11
SPLITS: tuple[str, ...] = ("train", "val", "test")


def _find_camvid_root(root: Path, split: str) -> Path:
    """The CamVid folder: ``root/CamVid``, or ``root`` itself when it holds ``<split>annot/``."""
    require_dir(root, "data root")
    for candidate in (root / "CamVid", root):
        if (candidate / f"{split}annot").is_dir():
            return candidate
    raise FileNotFoundError(
        f"no CamVid {split} split under {root}: expected {root / 'CamVid' / f'{split}annot'} or "
        f"{root / f'{split}annot'}, beside the {split}/ images (see {README} for the expected "
        f"layout)")


def _pair_files(images: Path, annotations: Path) -> list[tuple[Path, Path]]:
    """``(image, annotation)`` pairs of the PNG files of two folders, which must match by name."""
    image_names = sorted(p.name for p in images.iterdir() if p.suffix.lower() == ".png")
    if not image_names:
        raise ValueError(f"CamVid image folder {images} holds no .png images")
    annotation_names = {p.name for p in annotations.iterdir() if p.suffix.lower() == ".png"}
    for name in image_names:
        if name not in annotation_names:
            raise FileNotFoundError(f"annotation {annotations / name} of image {images / name} "
                                    f"is missing (see {README} for the expected layout)")
    orphans = sorted(annotation_names - set(image_names))
    if orphans:
        name = orphans[0]
        raise FileNotFoundError(f"image {images / name} of annotation {annotations / name} is "
                                f"missing (see {README} for the expected layout)")
    return [(images / name, annotations / name) for name in image_names]


class CamVidDataset(Dataset):
    """CamVid as prepared by SegNet: 11 classes, no background class, void = 11 on disk.

    Args:
        root: the data root holding ``CamVid/``, or the CamVid folder itself.
        split: ``"train"``, ``"val"`` or ``"test"``: the images of ``<split>/`` and their
            annotations in ``<split>annot/`` (same file names).
        skip_bad: read every image and annotation once now and leave out the samples whose
            image or annotation is truncated or corrupt; their bad files are listed in
            :attr:`skipped` and logged as a warning.  The dataset then holds only readable
            samples, indexed ``0 .. len - 1`` as usual, so samplers and ``DataLoader`` workers
            see one fixed set (nothing is substituted while loading).  A file that goes bad
            after the scan still raises when loaded.  Default ``False``: nothing is read now and
            a bad file raises when its sample is loaded.

    Tags and sizes come from the masks.  Raises ``FileNotFoundError`` or ``ValueError`` naming
    the file or folder at fault when the layout of ``data/README.md`` is not met; a sample's
    errors start with the split (``"CamVid train split: image … is truncated or corrupt …"``,
    a :class:`~ccnn.data.files.BadFileError`).

    Attributes:
        skipped: the bad file of each sample left out by ``skip_bad`` (empty without it).
    """

    num_classes = len(CAMVID_CLASSES)
    class_names = CAMVID_CLASSES
    palette = CAMVID_PALETTE
    background = None

    def __init__(self, root: str | Path = "data", split: str = "train", *,
                 skip_bad: bool = False) -> None:
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        self.root = _find_camvid_root(Path(root), split)
        self.split = split
        self.where = f"CamVid {split} split"
        images = require_dir(self.root / split, "CamVid image")
        self._files = _pair_files(images, self.root / f"{split}annot")
        self.skipped: list[Path] = []
        if skip_bad:
            self._files, self.skipped = scan_samples(self._files, lambda pair: pair,
                                                     self._verify, self.where)

    def _verify(self, path: Path) -> None:
        """Read one file of a sample (image or annotation) as a check."""
        what = "mask" if path.parent.name.endswith("annot") else "image"
        verify_image(path, what, where=self.where)

    def __len__(self) -> int:
        return len(self._files)

    def __getitem__(self, index: int) -> dict:
        image_path, mask_path = self._files[index]
        image = read_rgb(image_path, where=self.where)
        mask = read_index_png(mask_path, where=self.where)
        mask[mask == CAMVID_VOID] = IGNORE_INDEX
        return make_sample(image_path.stem, image, mask, self.num_classes,
                           image_path=image_path, mask_path=mask_path, where=self.where)
