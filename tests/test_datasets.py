"""VOC 2012 (+ SBD) and CamVid readers on tiny fixtures written in their real layouts."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import scipy.io
import torch
from PIL import Image

from ccnn.data import build_dataset
from ccnn.data.base import IGNORE_INDEX
from ccnn.data.camvid import CAMVID_CLASSES, CamVidDataset
from ccnn.data.voc import VOC_CLASSES, VOCDataset, voc_palette

H, W = 12, 16
VOC_TRAIN = ("2007_000032", "2007_000039")
VOC_VAL = ("2007_000033",)
SBD_TRAIN = ("2008_000010", "2007_000033", "2007_000032")  # one in VOC val, one in VOC train
SBD_VAL = ("2008_000011",)
TRAIN_AUG = ("2007_000032", "2007_000039", "2008_000010", "2008_000011")
# ImageSets/Main flags: {id: {class index: flag}}, every other class -1.
MAIN_FLAGS = {"2007_000032": {1: 1, 15: 0}, "2007_000039": {7: 1, 12: 1},
              "2007_000033": {15: 1}, "2008_000010": {3: 1}, "2008_000011": {20: 0}}


def _labels(seed: int, num_classes: int, void: int) -> np.ndarray:
    """A random ``(H, W)`` mask over a few classes with a one-pixel void border."""
    rng = np.random.default_rng(seed)
    classes = rng.choice(num_classes, size=3, replace=False)
    mask = classes[rng.integers(0, 3, (H, W))].astype(np.uint8)
    mask[0, :] = mask[-1, :] = mask[:, 0] = mask[:, -1] = void
    return mask


def _write_rgb(path: Path, seed: int, size: tuple[int, int] = (H, W)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(path)


def _write_palette_png(path: Path, mask: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.fromarray(mask)
    image.putpalette(voc_palette().flatten().tolist())
    image.save(path)


def _write_voc(root: Path) -> dict[str, np.ndarray]:
    """VOCdevkit/VOC2012 under ``root``; returns the masks written, by id."""
    voc = root / "VOCdevkit" / "VOC2012"
    masks = {}
    for seed, name in enumerate(VOC_TRAIN + VOC_VAL):
        _write_rgb(voc / "JPEGImages" / f"{name}.jpg", seed)
        masks[name] = _labels(seed, 21, void=255)
        _write_palette_png(voc / "SegmentationClass" / f"{name}.png", masks[name])
    sets = voc / "ImageSets" / "Segmentation"
    sets.mkdir(parents=True)
    for split, ids in (("train", VOC_TRAIN), ("val", VOC_VAL), ("trainval", VOC_TRAIN + VOC_VAL)):
        (sets / f"{split}.txt").write_text("".join(f"{i}\n" for i in ids))
    main = voc / "ImageSets" / "Main"
    main.mkdir()
    for label, class_name in enumerate(VOC_CLASSES[1:], start=1):
        lines = [f"{i} {flags.get(label, -1):2d}\n" for i, flags in MAIN_FLAGS.items()]
        (main / f"{class_name}_trainval.txt").write_text("".join(lines))
    return masks


def _write_sbd(root: Path) -> dict[str, np.ndarray]:
    """benchmark_RELEASE/dataset under ``root``; returns the masks written, by id."""
    sbd = root / "benchmark_RELEASE" / "dataset"
    masks = {}
    for seed, name in enumerate(SBD_TRAIN + SBD_VAL, start=100):
        _write_rgb(sbd / "img" / f"{name}.jpg", seed)
        masks[name] = _labels(seed, 21, void=0)  # SBD has no void: borders are background
        (sbd / "cls").mkdir(exist_ok=True)
        gt = {"Segmentation": masks[name], "Boundaries": np.zeros(1), "CategoriesPresent": 1}
        scipy.io.savemat(sbd / "cls" / f"{name}.mat", {"GTcls": gt})
    (sbd / "train.txt").write_text("".join(f"{i}\n" for i in SBD_TRAIN))
    (sbd / "val.txt").write_text("".join(f"{i}\n" for i in SBD_VAL))
    return masks


def _write_camvid(root: Path) -> dict[str, np.ndarray]:
    """CamVid/ (SegNet layout) under ``root``; returns the annotations written, by split/name."""
    camvid = root / "CamVid"
    masks = {}
    counts = {"train": 3, "val": 2, "test": 1}
    for split, count in counts.items():
        for k in range(count):
            name, seed = f"0001TP_{k:06d}.png", 1000 + 10 * len(masks)
            _write_rgb(camvid / split / name, seed)
            masks[f"{split}/{name}"] = _labels(seed, 11, void=11)
            (camvid / f"{split}annot").mkdir(exist_ok=True)
            Image.fromarray(masks[f"{split}/{name}"]).save(camvid / f"{split}annot" / name)
    return masks


@pytest.fixture
def voc(tmp_path: Path) -> tuple[Path, dict[str, np.ndarray]]:
    masks = _write_voc(tmp_path)
    masks.update({k: v for k, v in _write_sbd(tmp_path).items() if k not in masks})
    return tmp_path, masks


@pytest.fixture
def camvid(tmp_path: Path) -> tuple[Path, dict[str, np.ndarray]]:
    return tmp_path, _write_camvid(tmp_path)


def _raises(error: type[Exception], *fragments: str) -> pytest.RaisesExc:
    """``pytest.raises(error)`` whose message holds the literal ``fragments``, in this order."""
    return pytest.raises(error, match=".*".join(re.escape(f) for f in fragments))


def _check_format(sample: dict, num_classes: int) -> None:
    assert set(sample) == {"image", "mask", "tags", "sizes", "name"}
    assert sample["image"].dtype == torch.uint8 and sample["image"].shape == (3, H, W)
    assert sample["mask"].dtype == torch.int64 and sample["mask"].shape == (H, W)
    assert sample["tags"].dtype == torch.float32 and sample["tags"].shape == (num_classes,)
    assert sample["sizes"].dtype == torch.float32 and sample["sizes"].shape == (num_classes,)
    assert isinstance(sample["name"], str)


def _expected_sizes(mask: np.ndarray, num_classes: int, void: int) -> torch.Tensor:
    counts = np.bincount(mask[mask != void].astype(np.int64), minlength=num_classes)
    return torch.from_numpy(counts / counts.sum()).float()


# -- VOC ------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("split", "ids"), [("train", VOC_TRAIN), ("val", VOC_VAL),
                                            ("trainval", VOC_TRAIN + VOC_VAL),
                                            ("train_aug", TRAIN_AUG)])
def test_voc_splits(voc, split, ids):
    dataset = VOCDataset(voc[0], split)
    assert len(dataset) == len(ids)
    assert [dataset[i]["name"] for i in range(len(dataset))] == list(ids)


def test_voc_samples_read_back_exactly(voc):
    root, masks = voc
    dataset = VOCDataset(root, "train_aug")
    for sample in dataset:
        _check_format(sample, 21)
        written = masks[sample["name"]]
        expected = torch.from_numpy(written.astype(np.int64))
        assert torch.equal(sample["mask"], expected)
        sizes = _expected_sizes(written, 21, IGNORE_INDEX)
        assert torch.allclose(sample["sizes"], sizes)
        assert torch.equal(sample["tags"], (sizes > 0).float())
        assert sample["sizes"].sum().item() == pytest.approx(1.0)
    assert int(dataset[0]["mask"][0, 0]) == IGNORE_INDEX  # VOC's void border survives


def test_voc_train_aug_keeps_voc_masks_and_drops_voc_val(voc):
    dataset = VOCDataset(voc[0], "train_aug")
    names = [dataset[i]["name"] for i in range(len(dataset))]
    assert "2007_000033" not in names and len(set(names)) == len(names)
    shared = dataset[names.index("2007_000032")]["mask"]
    assert (shared[0] == IGNORE_INDEX).all()  # VOC's mask, not SBD's void-free one
    sbd_only = dataset[names.index("2008_000010")]["mask"]
    assert not (sbd_only == IGNORE_INDEX).any()


def test_voc_tags_from_main(voc):
    dataset = VOCDataset(voc[0], "train_aug", tags="main")
    from_masks = VOCDataset(voc[0], "train_aug")
    for sample, reference in zip(dataset, from_masks, strict=True):
        flags = MAIN_FLAGS[sample["name"]]
        expected = torch.zeros(21)
        expected[0] = 1.0  # background always present
        expected[[c for c, f in flags.items() if f == 1]] = 1.0  # difficult (0) counts as absent
        assert torch.equal(sample["tags"], expected), sample["name"]
        assert not torch.equal(sample["tags"], reference["tags"])  # not the masks' tags
        assert torch.equal(sample["sizes"], reference["sizes"])  # sizes still from the mask
        assert torch.equal(sample["mask"], reference["mask"])
    tags = dataset[0]["tags"]
    assert tags[15] == 0 and tags[1] == 1  # person is "difficult" in 2007_000032


def test_voc_root_may_be_the_voc2012_folder(voc):
    dataset = VOCDataset(voc[0] / "VOCdevkit" / "VOC2012", "val")
    assert [s["name"] for s in dataset] == list(VOC_VAL)


def test_voc_sbd_root_given_explicitly(voc, tmp_path_factory):
    elsewhere = tmp_path_factory.mktemp("elsewhere")
    (voc[0] / "benchmark_RELEASE").rename(elsewhere / "benchmark_RELEASE")
    for sbd_root in (elsewhere, elsewhere / "benchmark_RELEASE" / "dataset"):
        assert len(VOCDataset(voc[0], "train_aug", sbd_root=sbd_root)) == len(TRAIN_AUG)


def test_voc_attributes():
    assert VOCDataset.num_classes == 21 and len(VOCDataset.class_names) == 21
    assert VOCDataset.background == 0 and VOCDataset.class_names[15] == "person"
    palette = VOCDataset.palette
    assert palette.shape == (21, 3) and palette.dtype == torch.uint8
    assert palette[15].tolist() == [192, 128, 128] and palette[20].tolist() == [0, 64, 128]
    assert len({tuple(c) for c in palette.tolist()}) == 21


def test_registered_in_build_dataset(voc, camvid):
    assert len(build_dataset("voc", "trainval", voc[0], tags="main")) == 3
    assert len(build_dataset("camvid", "val", camvid[0])) == 2


# -- VOC errors -----------------------------------------------------------------------------------

def test_voc_bad_arguments(voc):
    with pytest.raises(ValueError, match="split must be one of"):
        VOCDataset(voc[0], "testing")
    with _raises(FileNotFoundError, "test.txt"):  # VOC 2012 ships no test masks
        VOCDataset(voc[0], "test")
    with pytest.raises(ValueError, match="tags must be one of"):
        VOCDataset(voc[0], "train", tags="boxes")


def test_voc_missing_root(tmp_path):
    with _raises(FileNotFoundError, "data root folder", str(tmp_path / "nope"), "README"):
        VOCDataset(tmp_path / "nope", "train")
    with _raises(FileNotFoundError, "no VOC 2012 under", "VOCdevkit/VOC2012", "README"):
        VOCDataset(tmp_path, "train")


def test_voc_missing_split_file_and_folder(voc):
    voc2012 = voc[0] / "VOCdevkit" / "VOC2012"
    (voc2012 / "ImageSets" / "Segmentation" / "val.txt").unlink()
    with _raises(FileNotFoundError, "split file", "Segmentation/val.txt", "README"):
        VOCDataset(voc[0], "val")
    with _raises(FileNotFoundError, "split file", "Segmentation/val.txt"):
        VOCDataset(voc[0], "train_aug")  # needs VOC val to leave it out
    (voc2012 / "SegmentationClass").rename(voc2012 / "Masks")
    with _raises(FileNotFoundError, "mask folder", "VOC2012/SegmentationClass"):
        VOCDataset(voc[0], "train")


def test_voc_missing_image_or_mask(voc):
    voc2012 = voc[0] / "VOCdevkit" / "VOC2012"
    dataset = VOCDataset(voc[0], "train")  # per-file checks happen at load time
    (voc2012 / "JPEGImages" / f"{VOC_TRAIN[0]}.jpg").unlink()
    with _raises(FileNotFoundError, "image", f"{VOC_TRAIN[0]}.jpg is missing", "README"):
        dataset[0]
    (voc2012 / "SegmentationClass" / f"{VOC_TRAIN[1]}.png").unlink()
    with _raises(FileNotFoundError, "mask", f"{VOC_TRAIN[1]}.png is missing"):
        dataset[1]


def test_voc_bad_mask(voc):
    mask_dir = voc[0] / "VOCdevkit" / "VOC2012" / "SegmentationClass"
    bad = _labels(0, 21, void=255)
    bad[3, 3] = 30
    _write_palette_png(mask_dir / f"{VOC_TRAIN[0]}.png", bad)
    Image.fromarray(np.zeros((H, W - 1), dtype=np.uint8)).save(mask_dir / f"{VOC_TRAIN[1]}.png")
    dataset = VOCDataset(voc[0], "train")
    with _raises(ValueError, "mask", f"{VOC_TRAIN[0]}.png:", "[30]"):
        dataset[0]
    with _raises(ValueError, "image", f"{VOC_TRAIN[1]}.jpg", "mask", f"{VOC_TRAIN[1]}.png"):
        dataset[1]
    Image.fromarray(np.zeros((H, W, 3), dtype=np.uint8)).save(mask_dir / f"{VOC_TRAIN[0]}.png")
    with _raises(ValueError, "mask", f"{VOC_TRAIN[0]}.png has PIL mode 'RGB'"):
        dataset[0]


def test_voc_main_tag_errors(voc):
    main = voc[0] / "VOCdevkit" / "VOC2012" / "ImageSets" / "Main"
    (main / "cow_trainval.txt").write_text(f"{VOC_TRAIN[0]} 1\n")
    with _raises(ValueError, "cow_trainval.txt has no line for", f"{VOC_TRAIN[1]}"):
        VOCDataset(voc[0], "train", tags="main")
    (main / "cow_trainval.txt").write_text(f"{VOC_TRAIN[0]} 2\n")
    with _raises(ValueError, "cow_trainval.txt, line 1: expected '<id> <flag>'"):
        VOCDataset(voc[0], "train", tags="main")
    (main / "cow_trainval.txt").unlink()
    with _raises(FileNotFoundError, "tag file", "Main/cow_trainval.txt not found"):
        VOCDataset(voc[0], "train", tags="main")


def test_voc_sbd_errors(voc, tmp_path_factory):
    sbd = voc[0] / "benchmark_RELEASE" / "dataset"
    (sbd / "img").rename(sbd / "images")
    with _raises(FileNotFoundError, "SBD image folder", "dataset/img not found"):
        VOCDataset(voc[0], "train_aug")
    (sbd / "images").rename(sbd / "img")
    empty = tmp_path_factory.mktemp("empty")
    with _raises(FileNotFoundError, f"no SBD under {empty}", "benchmark_RELEASE/dataset/cls",
                 "sbd_root"):
        VOCDataset(voc[0], "train_aug", sbd_root=empty)
    dataset = VOCDataset(voc[0], "train_aug")
    names = [s["name"] for s in dataset]
    (sbd / "cls" / "2008_000010.mat").unlink()
    with _raises(FileNotFoundError, "SBD mask", "cls/2008_000010.mat is missing"):
        dataset[names.index("2008_000010")]
    scipy.io.savemat(sbd / "cls" / "2008_000011.mat", {"GTinst": {"Segmentation": np.zeros(3)}})
    with _raises(ValueError, "SBD mask", "2008_000011.mat has no readable GTcls"):
        dataset[names.index("2008_000011")]
    (sbd / "val.txt").unlink()
    with _raises(FileNotFoundError, "SBD split file", "dataset/val.txt not found"):
        VOCDataset(voc[0], "train_aug")


# -- CamVid ---------------------------------------------------------------------------------------

@pytest.mark.parametrize(("split", "count"), [("train", 3), ("val", 2), ("test", 1)])
def test_camvid_splits(camvid, split, count):
    assert len(CamVidDataset(camvid[0], split)) == count
    assert len(CamVidDataset(camvid[0] / "CamVid", split)) == count  # root may be CamVid itself


def test_camvid_samples_read_back_exactly(camvid):
    root, masks = camvid
    for split in ("train", "val", "test"):
        for sample in CamVidDataset(root, split):
            _check_format(sample, 11)
            written = masks[f"{split}/{sample['name']}.png"].astype(np.int64)
            written[written == 11] = IGNORE_INDEX
            assert torch.equal(sample["mask"], torch.from_numpy(written))
            assert torch.allclose(sample["sizes"], _expected_sizes(written, 11, IGNORE_INDEX))
            assert torch.equal(sample["tags"], (sample["sizes"] > 0).float())
            assert sample["sizes"].sum().item() == pytest.approx(1.0)
            assert (sample["mask"][0] == IGNORE_INDEX).all()


def test_camvid_attributes():
    assert CamVidDataset.num_classes == 11 and CamVidDataset.class_names == CAMVID_CLASSES
    assert CamVidDataset.background is None
    palette = CamVidDataset.palette
    assert palette.shape == (11, 3) and palette.dtype == torch.uint8
    assert palette[0].tolist() == [128, 128, 128] and palette[3].tolist() == [128, 64, 128]


def test_camvid_layout_errors(camvid, tmp_path):
    with pytest.raises(ValueError, match="split must be one of"):
        CamVidDataset(camvid[0], "trainval")
    with _raises(FileNotFoundError, "data root folder", str(tmp_path / "nope")):
        CamVidDataset(tmp_path / "nope", "train")
    camvid_dir = camvid[0] / "CamVid"
    (camvid_dir / "valannot").rename(camvid_dir / "val_labels")
    with _raises(FileNotFoundError, "no CamVid val split", "CamVid/valannot", "README"):
        CamVidDataset(camvid[0], "val")
    (camvid_dir / "test").rename(camvid_dir / "testing")
    with _raises(FileNotFoundError, "CamVid image folder", "CamVid/test not found"):
        CamVidDataset(camvid[0], "test")
    (camvid_dir / "trainannot" / "0001TP_000001.png").unlink()
    with _raises(FileNotFoundError, "annotation", "trainannot/0001TP_000001.png of image",
                 "train/0001TP_000001.png is missing"):
        CamVidDataset(camvid[0], "train")
    (camvid_dir / "train" / "0001TP_000001.png").unlink()
    (camvid_dir / "train" / "0001TP_000002.png").unlink()
    with _raises(FileNotFoundError, "image", "train/0001TP_000002.png of annotation"):
        CamVidDataset(camvid[0], "train")


def test_camvid_bad_annotation(camvid):
    annot = camvid[0] / "CamVid" / "trainannot"
    bad = _labels(0, 11, void=11)
    bad[2, 2] = 12
    Image.fromarray(bad).save(annot / "0001TP_000000.png")
    Image.fromarray(np.zeros((H + 1, W), dtype=np.uint8)).save(annot / "0001TP_000001.png")
    dataset = CamVidDataset(camvid[0], "train")
    with _raises(ValueError, "mask", "trainannot/0001TP_000000.png:", "[12]"):
        dataset[0]
    with _raises(ValueError, "image", "train/0001TP_000001.png", "mask", "trainannot"):
        dataset[1]


@pytest.mark.parametrize("preset", ["voc", "camvid"])
def test_training_runs_on_the_real_layouts(preset, voc, camvid, tmp_path, capsys):
    """`ccnn train --preset voc|camvid` reads the fixture layouts end to end (small network)."""
    from ccnn.cli import main

    root = voc[0] if preset == "voc" else camvid[0]
    split = ["--train-split", "train"] if preset == "voc" else []
    out = tmp_path / "run"
    code = main(["train", "--preset", preset, "--method", "ccnn", "--model", "small",
                 "--data-root", str(root), "--epochs", "1", "--batch-size", "2", "--crop", "16",
                 "--lr", "1e-3", "--out", str(out), "--no-progress", *split])
    assert code == 0, capsys.readouterr().err
    assert (out / "checkpoint.pt").is_file() and (out / "report" / "metrics.json").is_file()
