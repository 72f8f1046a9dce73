"""The second generator's VOC-layout folders, the small network's VOC recipe and the constants
estimated from a few labelled masks (issue 15, part 4)."""

from __future__ import annotations

import json
import runpy
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ccnn.criteria import CRITERIA, METHODS, WEAK_METHODS
from ccnn.data.voc import VOC_CLASSES, VOCDataset, voc_palette
from ccnn.data.voc_like import CLASS_INDEX, VARIANTS, generate_image, split_ids, write_voc_like
from ccnn.presets import (
    MAX_ESTIMATE_MASKS,
    SMALL_NETWORK,
    bound_options,
    estimate_bounds,
    preset,
)
from ccnn.train import TrainConfig, train

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "make_voc_like.py"


@pytest.fixture(scope="module")
def voc_like(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("voclike")
    write_voc_like(root, size=12, val_size=6, test_size=4, seed=5, image_size=32)
    return root


def _read_mask(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        assert image.mode == "P"
        assert image.getpalette()[: 3 * 256] == voc_palette().flatten().tolist()
        return np.array(image)


# -- the generator -------------------------------------------------------------------------------

@pytest.mark.parametrize(("small", "band"), [(False, (0.60, 0.76)), (True, (0.83, 0.94))])
def test_object_sizes_follow_the_variant(small, band):
    lo, hi = (VARIANTS["small" if small else "voc"][k] for k in ("lo", "hi"))
    background = []
    for index in range(40):
        image, mask = generate_image(np.random.default_rng([7, index]), 32, small_objects=small)
        assert image.shape == (32, 32, 3) and image.dtype == np.uint8
        assert set(np.unique(mask).tolist()) <= {0, *CLASS_INDEX.values()}
        share = float((mask == 0).mean())
        assert 1 - hi <= share <= 1 - lo  # every image's objects cover lo..hi of it
        background.append(share)
    assert band[0] <= np.mean(background) <= band[1]  # VOC's ~68%, or ~89% with small objects


def test_the_folder_is_read_by_the_voc_reader_with_tags_matching_masks(voc_like):
    meta = json.loads((voc_like / "voc_like.json").read_text())
    assert meta["sizes"] == {"train": 12, "val": 6, "test": 4}
    for split, count in meta["sizes"].items():
        listed = (voc_like / "ImageSets" / "Segmentation" / f"{split}.txt").read_text().split()
        assert listed == split_ids(5, split, count)
    for split in ("train", "val", "test"):
        dataset = VOCDataset(voc_like, split)
        assert len(dataset) == meta["sizes"][split]
        masks = [_read_mask(voc_like / "SegmentationClass" / f"{s['name']}.png") for s in dataset]
        for sample, mask in zip(dataset, masks, strict=True):
            assert sample["image"].shape == (3, 32, 32)
            expected = torch.zeros(21)
            expected[torch.from_numpy(np.unique(mask).astype(np.int64))] = 1.0
            assert torch.equal(sample["tags"], expected), sample["name"]
            assert sample["tags"][0] == 1  # the objects never cover a whole image
        background = np.mean([float((m == 0).mean()) for m in masks])
        assert meta["statistics"][split]["background_mean"] == pytest.approx(background)
    main_tags = VOCDataset(voc_like, "trainval", tags="main")  # ImageSets/Main agrees
    from_masks = VOCDataset(voc_like, "trainval")
    for a, b in zip(main_tags, from_masks, strict=True):
        assert torch.equal(a["tags"], b["tags"])


def test_the_folder_is_deterministic_in_the_seed(tmp_path, voc_like):
    state = np.random.get_state()
    write_voc_like(tmp_path / "again", size=12, val_size=6, test_size=4, seed=5, image_size=32)
    write_voc_like(tmp_path / "other", size=12, val_size=6, test_size=4, seed=6, image_size=32)
    assert all(np.array_equal(a, b) for a, b in zip(state, np.random.get_state(), strict=True)
               if isinstance(a, np.ndarray))
    name = split_ids(5, "train", 12)[3]
    for sub, suffix in (("JPEGImages", ".jpg"), ("SegmentationClass", ".png")):
        again = (tmp_path / "again" / sub / f"{name}{suffix}").read_bytes()
        assert again == (voc_like / sub / f"{name}{suffix}").read_bytes()
    other = _read_mask(tmp_path / "other" / "SegmentationClass"
                       / f"{split_ids(6, 'train', 12)[3]}.png")
    assert not np.array_equal(other, _read_mask(voc_like / "SegmentationClass" / f"{name}.png"))


def test_the_script_writes_a_folder_and_names_bad_input(tmp_path, capsys, monkeypatch):
    out = tmp_path / "data"
    monkeypatch.setattr(sys, "argv", ["make_voc_like.py", "--out", str(out), "--seed", "1",
                                      "--size", "5", "--image-size", "24", "--small-objects"])
    with pytest.raises(SystemExit) as done:
        runpy.run_path(str(SCRIPT), run_name="__main__")
    assert done.value.code == 0
    meta = json.loads((out / "voc_like.json").read_text())
    assert meta["small_objects"] and meta["sizes"] == {"train": 5, "val": 1, "test": 1}
    printed = capsys.readouterr().out
    assert f"background {meta['statistics']['train']['background_mean']:.3f}" in printed
    monkeypatch.setattr(sys, "argv", ["make_voc_like.py", "--out", str(out), "--size", "5"])
    with pytest.raises(SystemExit) as done:
        runpy.run_path(str(SCRIPT), run_name="__main__")
    assert done.value.code == 2
    assert "already holds a dataset" in capsys.readouterr().err


@pytest.mark.parametrize(("option", "value", "message"), [
    ("size", 0, "size must be at least 1"), ("image_size", 8, "image_size must be at least 16"),
    ("val_size", 0, "val_size must be at least 1"), ("quality", 0, "quality must lie")])
def test_bad_generator_settings_are_named(tmp_path, option, value, message):
    settings = {"size": 2, option: value}
    with pytest.raises(ValueError, match=message):
        write_voc_like(tmp_path / "x", **settings)


# -- the small network's VOC recipe --------------------------------------------------------------

def test_voc_preset_with_the_small_network_brings_its_settings():
    for method in METHODS:
        settings = preset("voc", method, model="small")
        for key, value in SMALL_NETWORK.items():
            assert settings[key] == value, (method, key)
        assert settings["model"] == "small" and settings["train_split"] == "train"
        assert "hardness" not in settings  # CCNN's 1000 is VGG16's recipe
        assert settings.get("refine_epochs", 0) == (3 if method in WEAK_METHODS else 0)
        TrainConfig(method=method, **settings)  # a valid configuration
    vgg = preset("voc", "ccnn-size")  # without the model: CCNN's VGG16 recipe, unchanged
    assert vgg["model"] == "vgg16-fcn" and vgg["lr"] == 1e-6 and vgg["hardness"] == 1000.0
    assert preset("synthetic", "ccnn", model="small") == preset("synthetic", "ccnn")


def test_the_command_line_takes_the_small_networks_recipe():
    from ccnn.cli import build_parser
    from ccnn.commands import config_from_args

    args = build_parser().parse_args(["train", "--preset", "voc", "--model", "small",
                                      "--method", "ccnn-size", "--lr", "1e-3"])
    config = config_from_args(args)
    assert config.optimizer == "adam" and config.batch_size == 16 and config.lr == 1e-3
    assert config.bounds == preset("voc", "ccnn-size", model="small")["bounds"]
    vgg = config_from_args(build_parser().parse_args(["train", "--preset", "voc"]))
    assert vgg.model == "vgg16-fcn" and vgg.lr == 1e-6


def test_the_recipe_trains_on_a_voc_layout_folder(voc_like, tmp_path):
    settings = {**preset("voc", "ccnn", model="small"), "data_root": str(voc_like),
                "epochs": 1, "refine_epochs": 1, "batch_size": 6, "crf": False, "overlays": 1}
    summary = train(TrainConfig(method="ccnn", **settings), tmp_path / "run", report=False,
                    progress_bar=False, log=lambda m: None)
    history = summary["history"]
    assert [h["stage"] for h in history] == ["train", "refine"]
    assert summary["split"] == "val" and len(summary["metrics"]["iou"]) == len(VOC_CLASSES)
    assert (tmp_path / "run" / "before_refine.pt").exists()


# -- constants from a few labelled masks ---------------------------------------------------------

def test_estimate_bounds_by_hand():
    sizes = [[0.7, 0.3, 0.0], [0.5, 0.1, 0.4], [0.9, 0.0, 0.1], [1.0, 0.0, 0.0]]
    result = estimate_bounds(sizes, background=0)
    # objects 0.3, 0.1, 0.4, 0.1: median 0.2; background of images with objects 0.7, 0.5, 0.9:
    # 10% quantile 0.5 + 0.2·(0.7 − 0.5) = 0.54, 90% quantile 0.7 + 0.8·(0.9 − 0.7) = 0.86
    assert result["ccnn"] == {"fg_lower": 0.2, "bg_lower": 0.54, "bg_upper": 0.86}
    # ccnn-size also carries ccnn's constants, for its refinement stage (tags alone)
    assert result["ccnn-size"] == {"size_threshold": 0.2, "size_fg_lower": 0.2,
                                   "small_rule": "at-most", "size_bg_lower": 0.54,
                                   "size_bg_upper": 0.86, "fg_lower": 0.2, "bg_lower": 0.54,
                                   "bg_upper": 0.86}
    assert result["images"] == 4 and result["statistics"]["objects"] == 4
    # without a background every class is an object: median of 0.1 0.1 0.3 0.4 0.5 0.7 0.9 1
    assert estimate_bounds(sizes, background=None)["ccnn"] == {"fg_lower": 0.45}
    assert bound_options(result["ccnn"]) == ("--bound fg_lower=0.2 --bound bg_lower=0.54 "
                                             "--bound bg_upper=0.86")
    with pytest.raises(ValueError, match="at most 20"):
        estimate_bounds([[0.5, 0.5]] * (MAX_ESTIMATE_MASKS + 1))
    with pytest.raises(ValueError, match="no image shows an object"):
        estimate_bounds([[1.0, 0.0]])


def test_estimated_constants_reach_the_size_methods_refinement_stage():
    # the refinement stage of ccnn-size uses the tags alone: with the estimated constants its
    # bounds must be ccnn's estimated ones, not the defaults it would otherwise keep (the
    # preset's 20% floor and 80% background cap in a run, CCNN's constants here)
    sizes = [[0.95, 0.05, 0.0], [0.9, 0.04, 0.06], [0.97, 0.0, 0.03]]
    est = estimate_bounds(sizes, background=0)
    tags = torch.tensor([[1, 1, 0], [1, 1, 1], [1, 0, 1]], dtype=torch.bool)
    refined = CRITERIA["ccnn-size"](3, 0, bounds=est["ccnn-size"]).refinement().bounds(
        {"tags": tags})
    tag_only = CRITERIA["ccnn"](3, 0, bounds=est["ccnn"]).bounds({"tags": tags})
    for a, b in zip(refined, tag_only, strict=True):
        assert torch.equal(a, b)
    assert float(tag_only.upper[0, 0]) == est["ccnn"]["bg_upper"] == 0.97
    assert float(tag_only.lower[0, 1]) == est["ccnn"]["fg_lower"] == 0.04


def test_estimate_bounds_command_reads_the_first_val_masks(voc_like, capsys):
    from ccnn.cli import main
    from ccnn.commands import _parse_bounds

    assert main(["estimate-bounds", "--data-root", str(voc_like), "--masks", "5"]) == 0
    printed = capsys.readouterr().out
    masks = [_read_mask(voc_like / "SegmentationClass" / f"{n}.png")
             for n in split_ids(5, "val", 6)[:5]]
    objects = [float((m == c).mean()) for m in masks for c in np.unique(m) if c != 0]
    background = [float((m == 0).mean()) for m in masks]
    line = next(x for x in printed.splitlines() if "--method ccnn " in x)
    parsed = _parse_bounds(line.split("--method ccnn ")[1].replace("--bound ", "").split())
    assert parsed == pytest.approx({"fg_lower": round(float(np.median(objects)), 2),
                                    "bg_lower": round(float(np.quantile(background, 0.1)), 2),
                                    "bg_upper": round(float(np.quantile(background, 0.9)), 2)})
    assert "used 5 labelled val masks" in printed
    assert main(["estimate-bounds", "--data-root", str(voc_like), "--masks", "21"]) == 2
    assert "--masks must lie in [1, 20]" in capsys.readouterr().err


def test_the_small_recipe_keeps_the_constants_it_was_measured_with_on_voc():
    # docs/generality.md's runs: each tagged class at least 20%, the background at most 80%,
    # ccnn-size's bit at 10% (a large class at least 20%, a small one at most 10%)
    tags = {"fg_lower": 0.2, "bg_upper": 0.8, "size_bg_upper": 0.8}
    assert preset("voc", "ccnn", model="small")["bounds"] == tags
    assert preset("voc", "ccnn-size", model="small")["bounds"] == {
        **tags, "size_threshold": 0.1, "size_fg_lower": 0.2, "small_rule": "at-most"}
    assert preset("voc", "ccnn")["bounds"] == {}  # CCNN's own with VGG16
    assert preset("camvid", "ccnn", model="small")["bounds"] == {}  # no estimate for CamVid yet
