"""Weak-label segmentation datasets: the synthetic default, PASCAL VOC 2012 and CamVid.

:func:`build_dataset` is the one entry point the training code uses; every dataset returns the
samples described in :mod:`ccnn.data.base`.
"""

from __future__ import annotations

from pathlib import Path

from torch.utils.data import Dataset

from ccnn.data.base import IGNORE_INDEX, sizes_from_mask, tags_from_mask
from ccnn.data.files import BadFileError
from ccnn.data.synthetic import SyntheticShapes

__all__ = ["DATASETS", "IGNORE_INDEX", "BadFileError", "SyntheticShapes", "build_dataset",
           "sizes_from_mask", "tags_from_mask"]

DATASETS: tuple[str, ...] = ("synthetic", "voc", "camvid")
SYNTHETIC_SIZES = {"train": 1000, "val": 200, "test": 200}


def build_dataset(name: str, split: str, root: str | Path = "data", *, seed: int = 0,
                  skip_bad: bool = False, **options: object) -> Dataset:
    """The dataset ``name`` (one of :data:`DATASETS`), split ``split``.

    ``root`` is the data folder of the real datasets (see ``data/README.md``); the synthetic one
    ignores it and takes ``seed`` and ``size`` (default 1000 training, 200 validation images),
    ``image_size`` and ``max_objects``.  ``skip_bad`` leaves out the samples of missing,
    truncated or corrupt files of a real dataset (listed in its ``skipped``; see
    :class:`ccnn.data.voc.VOCDataset`); the synthetic one, which reads no files, ignores it.
    Other ``options`` go to the dataset's constructor.
    """
    if name == "synthetic":
        options.setdefault("size", SYNTHETIC_SIZES.get(split, 200))
        return SyntheticShapes(split, seed=seed, **options)
    if name == "voc":
        from ccnn.data.voc import VOCDataset

        return VOCDataset(root, split, skip_bad=skip_bad, **options)
    if name == "camvid":
        from ccnn.data.camvid import CamVidDataset

        return CamVidDataset(root, split, skip_bad=skip_bad, **options)
    raise ValueError(f"unknown dataset {name!r}; choose one of {DATASETS}")
