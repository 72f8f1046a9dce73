"""PASCAL VOC 2012 segmentation with image-level tags, and SBD's augmented ``train_aug`` set.

The layout read (``data/README.md`` has the whole of it)::

    <root>/VOCdevkit/VOC2012/                 or ``root`` pointing at ``VOC2012`` itself
        JPEGImages/<id>.jpg
        SegmentationClass/<id>.png            palette PNG of class indices, 255 = void
        ImageSets/Segmentation/{train,val,trainval}.txt
        ImageSets/Segmentation/test.txt       only where the test masks are there (not in VOC 2012's
                                              release; ``scripts/make_voc_like.py`` writes one)
        ImageSets/Main/<class>_trainval.txt   ``<id> <flag>`` lines, for ``tags="main"``
    <sbd_root>/                               SBD's ``benchmark_RELEASE/dataset``, for train_aug
        img/<id>.jpg
        cls/<id>.mat                          ``GTcls.Segmentation``: class indices
        train.txt, val.txt

The layout is checked when a dataset is built (split files and folders); each image and mask is
checked when it is loaded, and every error names the file or folder at fault (and the split, for
a sample's files).  With ``skip_bad=True`` every image and mask is read once when the dataset is
built, and the samples of missing, truncated or corrupt files are left out.  Nothing is
downloaded.

The file readers are those of :mod:`ccnn.data.files`, shared with :mod:`ccnn.data.camvid`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import scipy.io
import torch
from torch import Tensor
from torch.utils.data import Dataset

from ccnn.data.files import (
    DECODE_ERRORS,
    README,
    bad_file,
    make_sample,
    read_index_png,
    read_rgb,
    require_dir,
    scan_samples,
    verify_image,
)

__all__ = ["SPLITS", "VOC_CLASSES", "VOCDataset", "voc_palette"]

VOC_CLASSES: tuple[str, ...] = (
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair",
    "cow", "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa",
    "train", "tvmonitor")
SPLITS: tuple[str, ...] = ("train", "val", "trainval", "test", "train_aug")
TAG_SOURCES: tuple[str, ...] = ("masks", "main")
_MAIN_FLAGS = {"1": 1.0, "0": 0.0, "-1": 0.0}  # present, difficult (taken as absent), absent


def voc_palette(num_colours: int = 256) -> Tensor:
    """The standard VOC colour map ``(num_colours, 3)`` uint8.

    The bits of a class index are dealt out to the colour channels from the top bit down: bit
    ``3k`` of the index sets bit ``7 - k`` of red, bit ``3k + 1`` of green, bit ``3k + 2`` of blue.

    >>> voc_palette(4).tolist()
    [[0, 0, 0], [128, 0, 0], [0, 128, 0], [128, 128, 0]]
    >>> voc_palette()[255].tolist()  # the colour of void
    [224, 224, 192]
    """
    index = torch.arange(num_colours)
    palette = torch.zeros(num_colours, 3, dtype=torch.long)
    for k in range(8):
        for channel in range(3):
            palette[:, channel] |= ((index >> (3 * k + channel)) & 1) << (7 - k)
    return palette.to(torch.uint8)


# -- layout ---------------------------------------------------------------------------------------

def _read_ids(path: Path, what: str) -> list[str]:
    """The ids listed one a line in ``path`` (blank lines skipped); it must exist and list some."""
    if not path.is_file():
        raise FileNotFoundError(f"{what} {path} not found (see {README} for the expected layout)")
    ids = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if not ids:
        raise ValueError(f"{what} {path} lists no images")
    return ids


def _find_voc_root(root: Path) -> Path:
    """The ``VOC2012`` folder: ``root/VOCdevkit/VOC2012``, or ``root`` itself when it is one."""
    require_dir(root, "data root")
    for candidate in (root / "VOCdevkit" / "VOC2012", root):
        if (candidate / "ImageSets" / "Segmentation").is_dir():
            return candidate
    raise FileNotFoundError(
        f"no VOC 2012 under {root}: expected {root / 'VOCdevkit/VOC2012/ImageSets/Segmentation'} "
        f"or {root / 'ImageSets/Segmentation'} (see {README} for the expected layout)")


def _find_sbd_root(path: Path) -> Path:
    """SBD's ``dataset`` folder: ``path`` itself or ``path/benchmark_RELEASE/dataset``."""
    for candidate in (path, path / "benchmark_RELEASE" / "dataset"):
        if (candidate / "cls").is_dir():
            require_dir(candidate / "img", "SBD image")
            return candidate
    raise FileNotFoundError(
        f"no SBD under {path}: expected {path / 'cls'} or "
        f"{path / 'benchmark_RELEASE/dataset/cls'} with img/, train.txt and val.txt beside it "
        f"(the train_aug split needs SBD: unpack it under the data root or pass sbd_root; see "
        f"{README})")


@dataclass(frozen=True)
class _Entry:
    """One listed sample: its id and the files of its image and mask (``.png`` or SBD ``.mat``)."""

    name: str
    image: Path
    mask: Path


def _voc_entries(voc: Path, split: str) -> list[_Entry]:
    """The samples of VOC split ``split`` (``ImageSets/Segmentation/<split>.txt``)."""
    ids = _read_ids(voc / "ImageSets" / "Segmentation" / f"{split}.txt", "VOC split file")
    images = require_dir(voc / "JPEGImages", "VOC image")
    masks = require_dir(voc / "SegmentationClass", "VOC mask")
    return [_Entry(i, images / f"{i}.jpg", masks / f"{i}.png") for i in ids]


def _train_aug_entries(voc: Path, sbd: Path) -> list[_Entry]:
    """VOC ``train``, then SBD ``train`` and ``val`` less VOC ``val`` and the ids already taken.

    Ids in both VOC ``train`` and SBD keep VOC's mask (it marks object boundaries as void).
    """
    entries = _voc_entries(voc, "train")
    taken = {e.name for e in entries}
    taken |= set(_read_ids(voc / "ImageSets" / "Segmentation" / "val.txt", "VOC split file"))
    for part in ("train", "val"):
        for i in _read_ids(sbd / f"{part}.txt", "SBD split file"):
            if i not in taken:
                taken.add(i)
                entries.append(_Entry(i, sbd / "img" / f"{i}.jpg", sbd / "cls" / f"{i}.mat"))
    return entries


def _read_sbd_mask(path: Path, *, where: str = "") -> Tensor:
    """The class indices ``GTcls.Segmentation`` of SBD's ``cls/<id>.mat`` as int64 ``(H, W)``.

    A missing file raises ``FileNotFoundError``, a truncated or corrupt one
    :class:`~ccnn.data.files.BadFileError`, one without ``GTcls.Segmentation`` a ``ValueError``;
    each names ``path`` after ``where``.
    """
    at = f"{where}: " if where else ""
    if not path.is_file():
        raise FileNotFoundError(f"{at}SBD mask {path} is missing (see {README} for the expected "
                                f"layout)")
    try:
        contents = scipy.io.loadmat(path, squeeze_me=True, struct_as_record=False)
    except (*DECODE_ERRORS, scipy.io.matlab.MatReadError) as err:
        raise bad_file(path, "SBD mask", where, err) from err
    try:
        segmentation = np.asarray(contents["GTcls"].Segmentation, dtype=np.int64)
    except (KeyError, AttributeError, ValueError, TypeError) as err:
        raise ValueError(f"{at}SBD mask {path} has no readable GTcls.Segmentation (see {README})"
                         ) from err
    if segmentation.ndim != 2:
        raise ValueError(f"{at}SBD mask {path}: GTcls.Segmentation has shape "
                         f"{segmentation.shape}, expected (H, W)")
    return torch.from_numpy(segmentation)


def _read_main_flags(path: Path) -> dict[str, float]:
    """``{id: tag}`` from one ``ImageSets/Main/<class>_trainval.txt`` (lines ``<id> <flag>``)."""
    if not path.is_file():
        raise FileNotFoundError(f"VOC tag file {path} not found (tags='main' reads "
                                f"ImageSets/Main/<class>_trainval.txt; see {README})")
    flags = {}
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        parts = line.split()
        if not parts:
            continue
        if len(parts) != 2 or parts[1] not in _MAIN_FLAGS:
            raise ValueError(f"VOC tag file {path}, line {number}: expected '<id> <flag>' with "
                             f"flag 1, 0 or -1, got {line!r}")
        flags[parts[0]] = _MAIN_FLAGS[parts[1]]
    return flags


def _check_tag_classes(main: Path) -> None:
    """Every ``<class>_trainval.txt`` of ``ImageSets/Main`` must name an object class of VOC.

    A tag file of another name (a misspelt or foreign class) raises a ``ValueError`` naming it,
    rather than being passed over while its class is read as absent or missing.
    """
    for path in sorted(main.glob("*_trainval.txt")):
        name = path.name.removesuffix("_trainval.txt")
        if name not in VOC_CLASSES[1:]:
            raise ValueError(f"VOC tag file {path} names the class {name!r}, which is not a VOC "
                             f"object class; the tag files are ImageSets/Main/<class>_trainval.txt "
                             f"for <class> in {', '.join(VOC_CLASSES[1:])} (see {README})")


def _read_main_tags(voc: Path, names: Sequence[str]) -> Tensor:
    """Tags ``(len(names), 21)`` from ``ImageSets/Main/<class>_trainval.txt``.

    Flag 1 is present; 0 ("difficult") and -1 are absent; the background is always present.
    """
    _check_tag_classes(voc / "ImageSets" / "Main")
    tags = torch.zeros(len(names), len(VOC_CLASSES))
    tags[:, 0] = 1.0
    for label, class_name in enumerate(VOC_CLASSES[1:], start=1):
        path = voc / "ImageSets" / "Main" / f"{class_name}_trainval.txt"
        flags = _read_main_flags(path)
        missing = [n for n in names if n not in flags]
        if missing:
            raise ValueError(f"VOC tag file {path} has no line for {len(missing)} listed "
                             f"image(s), e.g. {missing[0]!r}")
        tags[:, label] = torch.tensor([flags[n] for n in names])
    return tags


class VOCDataset(Dataset):
    """PASCAL VOC 2012 segmentation: 21 classes (background and 20 objects), void = 255.

    Args:
        root: the data root holding ``VOCdevkit/VOC2012``, or the ``VOC2012`` folder itself.
        split: ``"train"``, ``"val"``, ``"trainval"`` (``ImageSets/Segmentation/<split>.txt``) or
            ``"train_aug"``: VOC ``train`` plus SBD's ``train`` and ``val`` images not in VOC
            ``val`` (10,582 images with the full data), SBD's masks read from its ``.mat`` files.
        tags: ``"masks"`` (default): the classes present in the mask; ``"main"``: VOC's
            image-level labels, ``ImageSets/Main/<class>_trainval.txt`` (1 present, 0 "difficult"
            and -1 absent), the background always present.  Sizes always come from the mask,
            which also serves evaluation.
        sbd_root: SBD's ``benchmark_RELEASE/dataset`` folder, or a folder holding
            ``benchmark_RELEASE/dataset``; only read by ``train_aug``.  Default: ``root``, i.e.
            ``root/benchmark_RELEASE/dataset``.
        skip_bad: read every image and mask once now and leave out the samples whose image or
            mask is missing, truncated or corrupt; their bad files are listed in
            :attr:`skipped` and logged as a warning.  The dataset then holds only readable
            samples, indexed ``0 .. len - 1`` as usual, so samplers and ``DataLoader`` workers
            see one fixed set (nothing is substituted while loading).  A file that goes bad
            after the scan still raises when loaded.  Default ``False``: nothing is read now and
            a bad file raises when its sample is loaded.

    Raises ``FileNotFoundError`` or ``ValueError`` naming the file or folder at fault when the
    layout of ``data/README.md`` is not met: when built for the split files and folders, when a
    sample is loaded for its image and mask (the message then starts with the split, e.g.
    ``"VOC train split: image …/2007_000032.jpg is truncated or corrupt …"``; a truncated or
    corrupt file raises :class:`~ccnn.data.files.BadFileError`, a ``ValueError``).

    Attributes:
        skipped: the bad file of each sample left out by ``skip_bad`` (empty without it).
    """

    num_classes = len(VOC_CLASSES)
    class_names = VOC_CLASSES
    palette = voc_palette(len(VOC_CLASSES))
    background = 0

    def __init__(self, root: str | Path = "data", split: str = "train", *, tags: str = "masks",
                 sbd_root: str | Path | None = None, skip_bad: bool = False) -> None:
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        if tags not in TAG_SOURCES:
            raise ValueError(f"tags must be one of {TAG_SOURCES}, got {tags!r}")
        self.root = _find_voc_root(Path(root))
        self.split, self.tag_source = split, tags
        if split == "train_aug":
            sbd = _find_sbd_root(Path(root if sbd_root is None else sbd_root))
            self._entries = _train_aug_entries(self.root, sbd)
        else:
            self._entries = _voc_entries(self.root, split)
        self.where = f"VOC {split} split"
        names = [e.name for e in self._entries]
        main_tags = _read_main_tags(self.root, names) if tags == "main" else None
        self.skipped: list[Path] = []
        if skip_bad:
            kept, self.skipped = scan_samples(self._entries, lambda e: (e.image, e.mask),
                                              self._verify, self.where)
            if main_tags is not None:
                keep = {e.name for e in kept}
                main_tags = main_tags[[e.name in keep for e in self._entries]]
            self._entries = kept
        self._main_tags = main_tags

    def _verify(self, path: Path) -> None:
        """Read one file of a sample (an image, a PNG mask or an SBD ``.mat``) as a check."""
        if path.suffix == ".mat":
            _read_sbd_mask(path, where=self.where)
        else:
            verify_image(path, "image" if path.suffix == ".jpg" else "mask", where=self.where)

    def __len__(self) -> int:
        return len(self._entries)

    def __getitem__(self, index: int) -> dict:
        entry = self._entries[index]
        image = read_rgb(entry.image, where=self.where)
        if entry.mask.suffix == ".mat":
            mask = _read_sbd_mask(entry.mask, where=self.where)
        else:
            mask = read_index_png(entry.mask, where=self.where)
        tags = None if self._main_tags is None else self._main_tags[index].clone()
        return make_sample(entry.name, image, mask, self.num_classes, image_path=entry.image,
                           mask_path=entry.mask, tags=tags, where=self.where)
