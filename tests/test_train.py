"""Weak-label training: losses, metrics, the synthetic data, a tiny run, resume and the CLI."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from ccnn.cli import build_parser, main
from ccnn.commands import config_from_args
from ccnn.constraints import tag_bounds
from ccnn.data import build_dataset
from ccnn.data.synthetic import SyntheticShapes
from ccnn.data.transforms import augment, collate
from ccnn.demo import format_table, run_demo
from ccnn.latent import solve_latent
from ccnn.loss import ConstrainedLoss, mil_loss, pixel_loss
from ccnn.metrics import ConfusionMatrix
from ccnn.presets import PRESETS
from ccnn.pretrain import PretrainConfig
from ccnn.train import Criterion, TrainConfig, train

TINY = {"train_size": 24, "val_size": 8, "batch_size": 8, "dataset_options": {"image_size": 32},
        "overlays": 2}


# -- metrics -----------------------------------------------------------------------------------

def test_confusion_matrix_against_hand_counts():
    target = torch.tensor([[0, 0, 1, 1], [2, 2, 255, 1]])
    pred = torch.tensor([[0, 1, 1, 1], [2, 0, 2, 2]])
    cm = ConfusionMatrix(3)
    cm.update(pred, target)
    # true 0: predicted 0, 1; true 1: 1, 1, 2; true 2: 2, 0; the void pixel is left out
    assert cm.counts.tolist() == [[1, 1, 0], [0, 2, 1], [1, 0, 1]]
    m = cm.compute()
    iou = [1 / (2 + 2 - 1), 2 / (3 + 3 - 2), 1 / (2 + 2 - 1)]
    assert m["iou"] == pytest.approx(iou)
    assert m["miou"] == pytest.approx(sum(iou) / 3)
    assert m["pixel_accuracy"] == pytest.approx(4 / 7)
    assert m["mean_accuracy"] == pytest.approx((1 / 2 + 2 / 3 + 1 / 2) / 3)


def test_confusion_matrix_leaves_unseen_classes_out_of_the_mean():
    cm = ConfusionMatrix(4)
    cm.update(torch.tensor([0, 1, 1]), torch.tensor([0, 1, 0]))
    m = cm.compute()
    assert math.isnan(m["iou"][2]) and math.isnan(m["iou"][3])
    assert m["miou"] == pytest.approx((1 / 2 + 1 / 2) / 2)


def test_confusion_matrix_rejects_bad_labels():
    with pytest.raises(ValueError, match="labels must lie"):
        ConfusionMatrix(2).update(torch.tensor([0, 3]), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="shape"):
        ConfusionMatrix(2).update(torch.tensor([0]), torch.tensor([0, 1]))


# -- losses ------------------------------------------------------------------------------------

def test_constrained_loss_gradient_is_q_minus_p_over_n():
    torch.manual_seed(0)
    logits = torch.randn(2, 4, 5, 6, dtype=torch.float64, requires_grad=True)
    bounds = tag_bounds([[0, 2], [0, 1, 3]], num_classes=4)
    loss_fn = ConstrainedLoss()
    loss_fn(logits, *bounds).backward()
    P = solve_latent(logits.detach(), *bounds).P
    Q = torch.softmax(logits.detach(), 1)
    torch.testing.assert_close(logits.grad, (Q - P) / (2 * 5 * 6), atol=1e-9, rtol=0)
    assert loss_fn.last.P.shape == logits.shape and loss_fn.last_seconds > 0


def test_hardness_is_the_solver_on_scaled_logits():
    torch.manual_seed(1)
    logits = torch.randn(1, 3, 4, 4, dtype=torch.float64)
    lower, upper, slack = tag_bounds([[0, 1, 2]], num_classes=3)
    hard = ConstrainedLoss(hardness=5.0).latent(logits, lower, upper, slack)
    direct = solve_latent(5 * logits, lower, upper, 5 * slack)
    torch.testing.assert_close(hard.P, direct.P)
    # a warm start from the solve's own multipliers (in the scaled units) is already optimal
    warm = ConstrainedLoss(hardness=5.0).latent(logits, lower, upper, slack,
                                                init=hard.multipliers)
    assert (warm.iterations == 0).all()
    torch.testing.assert_close(warm.P, hard.P)


def test_mil_loss_by_hand():
    logits = torch.zeros(1, 2, 1, 2)
    logits[0, 1, 0, 1] = math.log(3.0)  # Q(1) = 3/4 at the second pixel, 1/2 at the first
    tags = torch.tensor([[1.0, 1.0]])
    expected = -(math.log(1 / 2) + math.log(3 / 4)) / 2  # max of Q(0) is 1/2, of Q(1) is 3/4
    assert float(mil_loss(logits, tags)) == pytest.approx(expected)
    with pytest.raises(ValueError, match="tags have shape"):
        mil_loss(logits, torch.ones(1, 3))


def test_pixel_loss_ignores_void():
    logits = torch.zeros(1, 2, 2, 2)
    mask = torch.tensor([[[0, 255], [255, 255]]])
    assert float(pixel_loss(logits, mask)) == pytest.approx(math.log(2))


# -- data --------------------------------------------------------------------------------------

def test_synthetic_is_deterministic_and_consistent():
    a, b = SyntheticShapes("train", 4, seed=3), SyntheticShapes("train", 4, seed=3)
    assert torch.equal(a[2]["image"], b[2]["image"]) and torch.equal(a[2]["mask"], b[2]["mask"])
    assert not torch.equal(a[0]["image"], SyntheticShapes("val", 4, seed=3)[0]["image"])
    s = a[1]
    assert s["image"].dtype == torch.uint8 and s["image"].shape == (3, 64, 64)
    present = torch.unique(s["mask"])
    assert torch.equal(s["tags"].nonzero().flatten(), present)
    assert s["sizes"].sum() == pytest.approx(1.0)
    with pytest.raises(ValueError, match="split"):
        SyntheticShapes("dev")


def test_synthetic_colour_does_not_give_the_class():
    """A nearest-mean-colour classifier over the object classes is near chance (1/5)."""
    ds = SyntheticShapes("train", 150, seed=0)
    pixels = [[] for _ in range(ds.num_classes)]
    for i in range(len(ds)):
        s = ds[i]
        rgb = s["image"].permute(1, 2, 0).reshape(-1, 3).float()
        labels = s["mask"].flatten()
        for c in range(1, ds.num_classes):
            pixels[c].append(rgb[labels == c])
    per_class = [torch.cat(p) for p in pixels[1:]]
    means = torch.stack([p[::2].mean(0) for p in per_class])  # fit on half the pixels
    correct = total = 0
    for c, p in enumerate(per_class):
        held_out = p[1::2]
        guess = torch.cdist(held_out, means).argmin(1)
        correct += int((guess == c).sum())
        total += len(held_out)
    assert correct / total < 0.3


def test_collate_pads_and_augment_is_reproducible():
    ds = SyntheticShapes("train", 2, image_size=32)
    small = {**ds[1], "image": ds[1]["image"][:, :20, :24], "mask": ds[1]["mask"][:20, :24]}
    batch = collate([ds[0], small])
    assert batch["image"].shape == (2, 3, 32, 32)
    assert bool((batch["mask"][1, 20:] == 255).all())
    assert bool((batch["mask"][1, :, 24:] == 255).all())
    assert batch["shape"] == [(32, 32), (20, 24)]
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    a = augment(ds[0], g1, scale=(0.5, 1.5), crop=24)
    b = augment(ds[0], g2, scale=(0.5, 1.5), crop=24)
    assert a["image"].shape == (3, 24, 24) and torch.equal(a["mask"], b["mask"])


def test_build_dataset_unknown_name():
    with pytest.raises(ValueError, match="unknown dataset"):
        build_dataset("imagenet", "train")


# -- training ----------------------------------------------------------------------------------

def _config(method: str, epochs: int, **kw) -> TrainConfig:
    settings = {"model": "small", "lr": 3e-3, "optimizer": "adam", **TINY, **kw}
    return TrainConfig(method=method, epochs=epochs, **settings)


def test_tiny_ccnn_run_lowers_loss_and_violation(tmp_path):
    summary = train(_config("ccnn", 6), tmp_path, progress_bar=False, log=lambda m: None)
    history = summary["history"]
    assert history[-1]["loss"] < history[0]["loss"]
    assert history[-1]["violation"] < history[0]["violation"]
    assert 0 <= summary["miou"] <= 1
    report = tmp_path / "report"
    for name in ("metrics.json", "curves.png", "overlays.png"):
        assert (report / name).is_file()
    logged = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in logged] == list(range(6))
    assert all(r["p_seconds"] > 0 for r in logged)


class _StopError(Exception):
    pass


def test_resume_after_a_stop_matches_an_uninterrupted_run(tmp_path):
    cfg = _config("ccnn-size", 3)
    train(cfg, tmp_path / "whole", report=False, progress_bar=False, log=lambda m: None)

    def stop_after_first_epoch(message: str) -> None:
        if "epoch 1/3" in message:
            raise _StopError

    with pytest.raises(_StopError):
        train(cfg, tmp_path / "cut", report=False, progress_bar=False, log=stop_after_first_epoch)
    train(cfg, tmp_path / "cut", resume=True, report=False, progress_bar=False,
          log=lambda m: None)
    whole = torch.load(tmp_path / "whole" / "checkpoint.pt", weights_only=True)
    cut = torch.load(tmp_path / "cut" / "checkpoint.pt", weights_only=True)
    for key, value in whole["model"].items():
        assert torch.equal(value, cut["model"][key]), key
    lines = (tmp_path / "cut" / "log.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == [0, 1, 2]


def test_resume_rejects_other_settings(tmp_path):
    train(_config("mil", 1), tmp_path, report=False, progress_bar=False, log=lambda m: None)
    with pytest.raises(ValueError, match="other settings: method='mil'"):
        train(_config("full", 2), tmp_path, resume=True, progress_bar=False, log=lambda m: None)
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        train(_config("full", 2), tmp_path / "none", resume=True, log=lambda m: None)


def test_config_errors():
    with pytest.raises(ValueError, match="method must be one of"):
        TrainConfig(method="gan")
    with pytest.raises(ValueError, match="lr must be positive"):
        TrainConfig(lr=0)
    with pytest.raises(ValueError, match=r"unknown constraint constant.*bg_uper"):
        TrainConfig(bounds={"bg_uper": 0.6})
    with pytest.raises(ValueError, match=r"bounds: bg_upper=1\.5 must lie in"):
        TrainConfig(bounds={"bg_upper": 1.5})
    with pytest.raises(ValueError, match="bounds: background bounds are crossed"):
        TrainConfig(bounds={"bg_lower": 0.8, "bg_upper": 0.6})


def test_demo_table(tmp_path):
    tiny_pretraining = PretrainConfig(images=16, val_images=8, epochs=1, image_size=32)
    table = run_demo(tmp_path, methods=("full", "ccnn"), epochs=1, progress_bar=False,
                     pretraining=tiny_pretraining, log=lambda m: None, **TINY)
    assert set(table["methods"]) == {"full", "ccnn"}
    assert 0 <= table["pretrain"]["accuracy"] <= 1 and table["pretrain"]["seconds"] > 0
    backbone = torch.load(tmp_path / "backbone.pt")["state_dict"]
    first = torch.load(tmp_path / "full" / "checkpoint.pt")["config"]
    assert first["backbone_weights"] == str(tmp_path / "backbone.pt") and backbone
    row = table["methods"]["ccnn"]
    assert 0 <= row["miou"] <= 1 and 0 <= row["pixel_accuracy"] <= 1 and row["seconds"] > 0
    assert 0 < row["p_step_share"] < 1
    saved_config = torch.load(tmp_path / "ccnn" / "checkpoint.pt")["config"]
    assert saved_config["refine_epochs"] == 3  # the preset's refinement stage after the one epoch
    assert saved_config["refine_lr"] == 1e-3  # ... which restarts the learning rate
    log = [json.loads(line) for line in (tmp_path / "ccnn" / "log.jsonl").read_text().splitlines()]
    assert [r["stage"] for r in log] == ["train", "refine", "refine", "refine"]
    assert row["miou_before_refine"] == log[0]["val_miou"]
    assert "miou_before_refine" not in table["methods"]["full"]
    assert 0 <= row["crf"]["miou"] <= 1 and row["crf"]["seconds"] > 0
    assert (tmp_path / "curves.png").is_file()
    saved = json.loads((tmp_path / "demo.json").read_text())  # the table, kept after each method
    assert saved["methods"] == table["methods"] and saved["pretrain"] == table["pretrain"]
    text = format_table(table)
    assert "ccnn" in text and "full" in text


# -- command line ------------------------------------------------------------------------------

def test_cli_train_evaluate_predict(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "--method", "mil", "--epochs", "1", "--train-size", "8",
                 "--val-size", "4", "--batch-size", "4", "--out", str(out),
                 "--no-progress"]) == 0
    assert "with the dense CRF" in capsys.readouterr().out  # the synthetic preset's default
    summary = json.loads((out / "report" / "metrics.json").read_text())
    checkpoint = out / "checkpoint.pt"
    assert main(["evaluate", str(checkpoint), "--json", str(tmp_path / "m.json")]) == 0
    assert "disk" in capsys.readouterr().out
    metrics = json.loads((tmp_path / "m.json").read_text())
    assert metrics["images"] == 4 and 0 <= metrics["miou"] <= 1
    assert metrics["miou"] == summary["miou"]
    assert main(["evaluate", str(checkpoint), "--crf", "--json", str(tmp_path / "c.json")]) == 0
    assert "dense CRF" in capsys.readouterr().out
    assert json.loads((tmp_path / "c.json").read_text())["miou"] == summary["crf"]["miou"]

    images = tmp_path / "images"
    images.mkdir()
    Image.fromarray(np.zeros((40, 30, 3), dtype=np.uint8)).save(images / "a.png")
    for extra, folder in (([], "masks"), (["--crf"], "crf_masks")):
        assert main(["predict", str(checkpoint), str(images), str(tmp_path / folder),
                     *extra]) == 0
        mask = Image.open(tmp_path / folder / "a.png")
        assert mask.size == (30, 40) and mask.mode == "RGB"


def test_cli_bound_overrides_one_constant_of_the_preset():
    args = build_parser().parse_args(["train", "--bound", "bg_upper=0.6", "--bound",
                                      "fg_lower=0.1"])
    cfg = config_from_args(args)
    assert cfg.bounds == {**PRESETS["synthetic"]["bounds"], "bg_upper": 0.6, "fg_lower": 0.1}
    criterion = Criterion("ccnn", 4, 0, bounds=cfg.bounds)
    lower, upper, slack = criterion.tag_bounds({"tags": torch.tensor([[1, 0, 1, 0]]),
                                                "sizes": torch.zeros(1, 4)})
    # by hand: background in [0.3, 0.6], class 2 at least 0.1 (slack 2), classes 1, 3 absent
    assert lower.tolist() == [[0.3, 0.0, 0.1, 0.0]] and upper.tolist() == [[0.6, 0.0, 1.0, 0.0]]
    assert slack[0, 2] == 2.0


def test_cli_errors(tmp_path, capsys):
    assert main(["evaluate", str(tmp_path / "missing.pt")]) == 2
    assert "missing.pt" in capsys.readouterr().err
    assert main(["predict", str(tmp_path / "missing.pt"), str(tmp_path), str(tmp_path)]) == 2
    assert main(["train", "--preset", "voc", "--data-root", str(tmp_path), "--train-size",
                 "3"]) == 2
    assert "synthetic dataset only" in capsys.readouterr().err
    for bound, message in (("bogus=1", "unknown constraint constant(s) ['bogus']"),
                           ("bg_upper", "expected NAME=VALUE"),
                           ("bg_upper=1.5", "bg_upper=1.5 must lie in [0, 1]")):
        assert main(["train", "--bound", bound, "--out", str(tmp_path / "b")]) == 2
        assert message in capsys.readouterr().err
    assert not (tmp_path / "b").exists()
    # a --json path that cannot be written is refused before any training
    (tmp_path / "a_file").write_text("keep")
    for target, message in ((tmp_path, "is a folder"), (tmp_path / "a_file" / "t.json",
                                                         "a_file is a file, not a folder")):
        assert main(["demo", "--json", str(target), "--out", str(tmp_path / "d")]) == 2
        assert message in capsys.readouterr().err
    assert not (tmp_path / "d").exists() and (tmp_path / "a_file").read_text() == "keep"


def test_latent_vs_trained_script(tmp_path, capsys):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "scripts" / "latent_vs_trained.py"
    spec = importlib.util.spec_from_file_location("latent_vs_trained", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    result = module.main(["--under-epochs", "1", "--full-epochs", "2", "--train-size", "16",
                          "--val-size", "4", "--out", str(tmp_path), "--no-progress"])
    assert result["images"] == 4
    assert result["kl_qf_qu"] > 0 and result["kl_qf_p"] >= 0
    assert set(result["pixel_accuracy"]) == {"Q_u", "P", "Q_f"}
    assert (tmp_path / "latent_vs_trained.json").is_file()
    assert "closer to Q_f" in capsys.readouterr().out
