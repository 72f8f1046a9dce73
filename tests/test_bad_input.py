"""Bad input in the VOC and CamVid readers: truncated or corrupt files, ``skip_bad``, a missing
dataset folder, labels outside the class list and tags naming an unknown class.

The fixtures are written in the real layouts by the helpers of ``tests/test_datasets.py``.
"""

from __future__ import annotations

import logging
import pickle
from pathlib import Path

import numpy as np
import pytest
import scipy.io
import torch
from PIL import Image
from test_datasets import (
    SBD_TRAIN,
    VOC_TRAIN,
    _labels,
    _raises,
    _write_camvid,
    _write_palette_png,
    _write_sbd,
    _write_voc,
)
from torch.utils.data import DataLoader

from ccnn.constraints import tag_bounds
from ccnn.data import BadFileError, build_dataset
from ccnn.data.camvid import CamVidDataset
from ccnn.data.files import read_rgb
from ccnn.data.voc import VOC_CLASSES, VOCDataset

CAMVID_TRAIN = ("0001TP_000000", "0001TP_000001", "0001TP_000002")


@pytest.fixture
def voc(tmp_path: Path) -> Path:
    _write_voc(tmp_path)
    _write_sbd(tmp_path)
    return tmp_path


@pytest.fixture
def camvid(tmp_path: Path) -> Path:
    _write_camvid(tmp_path)
    return tmp_path


def _voc_file(root: Path, folder: str, name: str) -> Path:
    suffix = ".jpg" if folder == "JPEGImages" else ".png"
    return root / "VOCdevkit" / "VOC2012" / folder / f"{name}{suffix}"


def _truncate(path: Path, keep: int | float) -> None:
    """Cut ``path`` to its first ``keep`` bytes (an int; negative: all but the last ``-keep``) or
    fraction of bytes (a float)."""
    data = path.read_bytes()
    size = int(len(data) * keep) if isinstance(keep, float) else keep % len(data)
    assert 0 < size < len(data)
    path.write_bytes(data[:size])


# -- truncated and corrupt files raise errors naming the file and the split ------------------------

# 100 bytes: PIL fails in the JPEG header ("Truncated File Read"); the last 30 bytes lost: in the
# pixel data, which PIL decodes lazily ("image file is truncated").
@pytest.mark.parametrize(("keep", "pil_says"), [(100, "Truncated File Read"),
                                                (-30, "image file is truncated")])
def test_voc_truncated_jpeg_names_file_and_split(voc, keep, pil_says):
    path = _voc_file(voc, "JPEGImages", VOC_TRAIN[0])
    _truncate(path, keep)
    dataset = VOCDataset(voc, "train")  # files are read at load time
    with _raises(BadFileError, "VOC train split: image", str(path), "truncated or corrupt",
                 pil_says, "skip_bad=True") as info:
        dataset[0]
    assert info.value.path == path
    assert isinstance(info.value, ValueError)  # the CLI reports ValueErrors without a traceback
    assert dataset[1]["name"] == VOC_TRAIN[1]  # the other sample still loads


def test_voc_garbage_image_and_corrupt_mask(voc):
    image = _voc_file(voc, "JPEGImages", VOC_TRAIN[0])
    image.write_bytes(b"this is not a JPEG at all" * 8)
    mask = _voc_file(voc, "SegmentationClass", VOC_TRAIN[1])
    data = bytearray(mask.read_bytes())
    start = data.index(b"IDAT") + 8  # garble the compressed pixels of the mask
    data[start:start + 16] = bytes(16)
    mask.write_bytes(bytes(data))
    dataset = VOCDataset(voc, "train")
    with _raises(BadFileError, "VOC train split: image", str(image), "not an image PIL can read"):
        dataset[0]
    with _raises(BadFileError, "VOC train split: mask", str(mask), "truncated or corrupt"):
        dataset[1]


def test_voc_truncated_png_mask_and_sbd_mat(voc):
    mask = _voc_file(voc, "SegmentationClass", VOC_TRAIN[1])
    _truncate(mask, 0.6)
    with _raises(BadFileError, "VOC train split: mask", str(mask), "truncated or corrupt"):
        VOCDataset(voc, "train")[1]
    mat = voc / "benchmark_RELEASE" / "dataset" / "cls" / f"{SBD_TRAIN[0]}.mat"
    _truncate(mat, 0.5)
    dataset = VOCDataset(voc, "train_aug")
    index = [e.name for e in dataset._entries].index(SBD_TRAIN[0])
    with _raises(BadFileError, "VOC train_aug split: SBD mask", str(mat), "truncated or corrupt"):
        dataset[index]


@pytest.mark.parametrize("folder", ["train", "trainannot"])
def test_camvid_truncated_png_names_file_and_split(camvid, folder):
    path = camvid / "CamVid" / folder / f"{CAMVID_TRAIN[1]}.png"
    _truncate(path, 0.6)
    what = "mask" if folder.endswith("annot") else "image"
    dataset = CamVidDataset(camvid, "train")
    with _raises(BadFileError, f"CamVid train split: {what}", str(path), "truncated or corrupt"):
        dataset[1]
    assert dataset[0]["name"] == CAMVID_TRAIN[0]


def test_read_rgb_outside_a_dataset_names_the_file(tmp_path):
    """``ccnn predict`` reads a folder with ``read_rgb``: no split, no skip_bad hint."""
    path = tmp_path / "photo.jpg"
    Image.fromarray(np.full((20, 30, 3), 99, dtype=np.uint8)).save(path)
    assert read_rgb(path).shape == (3, 20, 30)
    _truncate(path, 0.5)
    with pytest.raises(BadFileError, match=r"^image .*photo\.jpg is truncated or corrupt") as info:
        read_rgb(path)
    assert "skip_bad" not in str(info.value)


def test_error_survives_a_dataloader_worker(voc):
    """A ``DataLoader`` worker pickles the sample's error or rebuilds it from its message alone
    (``type(err)(message)``); either way the file and the split must come through."""
    path = _voc_file(voc, "JPEGImages", VOC_TRAIN[1])
    _truncate(path, -30)
    with pytest.raises(BadFileError) as info:
        VOCDataset(voc, "train")[1]
    copy = pickle.loads(pickle.dumps(info.value))
    assert type(copy) is BadFileError and copy.path == path and str(copy) == str(info.value)
    with _raises(BadFileError, "VOC train split: image", str(path), "truncated or corrupt"):
        raise BadFileError(f"Caught BadFileError in DataLoader worker process 0.\n{info.value}")


# -- skip_bad --------------------------------------------------------------------------------------

@pytest.mark.parametrize("keep", [100, -30, -2])
def test_voc_skip_bad_leaves_out_and_lists_the_bad_sample(voc, caplog, keep):
    bad = _voc_file(voc, "JPEGImages", VOC_TRAIN[0])
    _truncate(bad, keep)  # -2: the end marker lost; the scan (at 1/8 scale) still reads every byte
    with caplog.at_level(logging.WARNING, logger="ccnn.data.files"):
        dataset = VOCDataset(voc, "train", skip_bad=True)
    assert dataset.skipped == [bad]
    assert len(dataset) == 1 and dataset[0]["name"] == VOC_TRAIN[1]
    assert [s["name"] for s in DataLoader(dataset, batch_size=None)] == [VOC_TRAIN[1]]
    warning = "\n".join(r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
    assert "VOC train split: skipped 1 of 2 samples" in warning and str(bad) in warning


def test_voc_skip_bad_keeps_main_tags_aligned(voc):
    mask = _voc_file(voc, "SegmentationClass", VOC_TRAIN[0])
    _truncate(mask, 0.6)
    full = VOCDataset(voc, "trainval", tags="main")  # samples 1 and 2 still load without skip
    skipping = VOCDataset(voc, "trainval", tags="main", skip_bad=True)
    assert skipping.skipped == [mask]
    assert len(skipping) == 2
    for k in range(2):
        assert skipping[k]["name"] == full[k + 1]["name"]
        assert torch.equal(skipping[k]["tags"], full[k + 1]["tags"])
        assert torch.equal(skipping[k]["mask"], full[k + 1]["mask"])


def test_voc_skip_bad_train_aug_with_a_bad_mat_and_a_missing_image(voc):
    sbd = voc / "benchmark_RELEASE" / "dataset"
    mat = sbd / "cls" / f"{SBD_TRAIN[0]}.mat"
    _truncate(mat, 0.5)
    missing = sbd / "img" / "2008_000011.jpg"
    missing.unlink()
    dataset = VOCDataset(voc, "train_aug", skip_bad=True)
    assert dataset.skipped == [mat, missing]  # in the order of the split
    assert [s["name"] for s in dataset] == ["2007_000032", "2007_000039"]


def test_camvid_skip_bad(camvid, caplog):
    bad = camvid / "CamVid" / "trainannot" / f"{CAMVID_TRAIN[1]}.png"
    _truncate(bad, 0.6)
    with caplog.at_level(logging.WARNING, logger="ccnn.data.files"):
        dataset = build_dataset("camvid", "train", camvid, skip_bad=True)
    assert dataset.skipped == [bad]
    assert [dataset[k]["name"] for k in range(len(dataset))] == [CAMVID_TRAIN[0], CAMVID_TRAIN[2]]
    assert "CamVid train split: skipped 1 of 3 samples" in caplog.text


def test_skip_bad_with_nothing_bad_changes_nothing(voc, camvid):
    for name, split, root in (("voc", "train_aug", voc), ("camvid", "val", camvid)):
        plain, skipping = build_dataset(name, split, root), build_dataset(name, split, root,
                                                                          skip_bad=True)
        assert skipping.skipped == [] and plain.skipped == []
        assert len(plain) == len(skipping)
        for a, b in zip(plain, skipping, strict=True):
            assert a["name"] == b["name"] and torch.equal(a["image"], b["image"])
    assert len(build_dataset("synthetic", "train", skip_bad=True, size=2)) == 2  # no files


def test_skip_bad_with_every_sample_bad_raises(voc):
    for name in VOC_TRAIN:
        _truncate(_voc_file(voc, "JPEGImages", name), 0.5)
    with _raises(ValueError, "VOC train split: every one of its 2 samples", VOC_TRAIN[0]):
        VOCDataset(voc, "train", skip_bad=True)


def test_skip_bad_does_not_hide_label_errors(voc):
    """Only unreadable files are skipped; a readable mask with wrong labels still raises."""
    bad = _labels(0, 21, void=255)
    bad[3, 3] = 30
    mask = _voc_file(voc, "SegmentationClass", VOC_TRAIN[0])
    _write_palette_png(mask, bad)
    dataset = VOCDataset(voc, "train", skip_bad=True)
    assert dataset.skipped == []
    with _raises(ValueError, "VOC train split: mask", str(mask), "labels [30] outside [0, 21)"):
        dataset[0]


# -- the rest of the table: missing folder, labels outside the class list, unknown tag classes -----

@pytest.mark.parametrize("name", ["voc", "camvid"])
def test_missing_dataset_folder(tmp_path, name):
    nowhere = tmp_path / "no_such_data"
    with _raises(FileNotFoundError, "data root folder", str(nowhere), "not found",
                 "data/README.md"):
        build_dataset(name, "train", nowhere)
    empty = tmp_path / "empty"
    empty.mkdir()
    expected = "VOCdevkit/VOC2012/ImageSets/Segmentation" if name == "voc" else "CamVid/trainannot"
    with _raises(FileNotFoundError, str(empty), expected, "data/README.md"):
        build_dataset(name, "train", empty)


def test_labels_outside_the_class_list(voc, camvid):
    mask = _labels(1, 21, void=255)
    mask[2, 5] = 21
    path = _voc_file(voc, "SegmentationClass", VOC_TRAIN[1])
    _write_palette_png(path, mask)
    with _raises(ValueError, "VOC train split: mask", str(path), "labels [21] outside [0, 21)"):
        VOCDataset(voc, "train")[1]
    mat = voc / "benchmark_RELEASE" / "dataset" / "cls" / "2008_000011.mat"
    segmentation = _labels(2, 21, void=0)
    segmentation[4, 4] = 40
    scipy.io.savemat(mat, {"GTcls": {"Segmentation": segmentation}})
    dataset = VOCDataset(voc, "train_aug")
    with _raises(ValueError, "VOC train_aug split: mask", str(mat), "labels [40]"):
        dataset[len(dataset) - 1]
    annotation = _labels(3, 11, void=11)
    annotation[1, 1] = 13
    path = camvid / "CamVid" / "valannot" / f"{CAMVID_TRAIN[0]}.png"
    Image.fromarray(annotation).save(path)
    with _raises(ValueError, "CamVid val split: mask", str(path), "labels [13] outside [0, 11)"):
        CamVidDataset(camvid, "val")[0]


def test_tag_file_naming_an_unknown_class(voc):
    main = voc / "VOCdevkit" / "VOC2012" / "ImageSets" / "Main"
    (main / "aeroplane_trainval.txt").rename(main / "aeroplan_trainval.txt")  # misspelt
    with _raises(ValueError, "VOC tag file", "Main/aeroplan_trainval.txt", "'aeroplan'",
                 "not a VOC object class", "aeroplane, bicycle"):
        VOCDataset(voc, "train", tags="main")
    (main / "aeroplan_trainval.txt").rename(main / "aeroplane_trainval.txt")
    (main / "unicorn_trainval.txt").write_text(f"{VOC_TRAIN[0]} 1\n")  # a class VOC lacks
    with _raises(ValueError, "Main/unicorn_trainval.txt", "'unicorn'"):
        VOCDataset(voc, "train", tags="main")
    assert len(VOCDataset(voc, "train", tags="masks")) == 2  # tags="masks" reads no tag files
    (main / "unicorn_trainval.txt").unlink()
    (main / "trainval.txt").write_text("".join(f"{i}\n" for i in VOC_TRAIN))  # VOC's own list
    assert len(VOCDataset(voc, "train", tags="main")) == 2


def test_tag_index_outside_the_class_list():
    """Tags given as class indices (``tag_bounds``) name the image and the bad index."""
    with pytest.raises(ValueError, match=r"tag 21 of image 1 is outside \[0, 21\)"):
        tag_bounds([[0, 3], [21]], len(VOC_CLASSES))
