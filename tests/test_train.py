"""Weak-label training: metrics, losses, criteria, the engine, presets, a tiny run, resume, the
demo and the command line."""

from __future__ import annotations

import dataclasses
import importlib.metadata
import json
import logging
import math

import numpy as np
import pytest
import torch
from PIL import Image

import ccnn
from ccnn.cli import build_parser, main
from ccnn.commands import config_from_args
from ccnn.constraints import tag_bounds
from ccnn.criteria import METHODS, WEAK_METHODS, build_criterion
from ccnn.data import build_dataset
from ccnn.data.synthetic import SyntheticShapes
from ccnn.demo import format_table, run_demo
from ccnn.engine import synchronize, train_one_epoch
from ccnn.inference import load_checkpoint
from ccnn.latent import solve_latent
from ccnn.loss import ConstrainedLoss, mil_loss, pixel_loss
from ccnn.metrics import ConfusionMatrix
from ccnn.presets import PRESETS, SIZE_HARDNESS, preset
from ccnn.pretrain import PretrainConfig
from ccnn.train import BEFORE_REFINE, TrainConfig, split_dataset, train

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


def test_constrained_loss_gradient_is_q_minus_p_over_n_and_it_returns_its_p_step():
    logits = torch.randn(2, 4, 5, 6, dtype=torch.float64,
                         generator=torch.Generator().manual_seed(0)).requires_grad_()
    bounds = tag_bounds([[0, 2], [0, 1, 3]], num_classes=4)
    loss, latent, seconds = ConstrainedLoss()(logits, *bounds)
    loss.backward()
    P = solve_latent(logits.detach(), *bounds).P
    Q = torch.softmax(logits.detach(), 1)
    torch.testing.assert_close(logits.grad, (Q - P) / (2 * 5 * 6), atol=1e-9, rtol=0)
    torch.testing.assert_close(latent.P, P)  # what it returns is this call's P-step
    assert seconds > 0


def test_hardness_is_the_solver_on_scaled_logits():
    logits = torch.randn(1, 3, 4, 4, dtype=torch.float64,
                         generator=torch.Generator().manual_seed(1))
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


# -- criteria ----------------------------------------------------------------------------------


def _batch() -> dict:
    # one image: background 0.6, class 1 at 0.32, class 2 at 0.08 (tagged), class 3 absent
    return {"tags": torch.tensor([[1, 1, 1, 0]]), "sizes": torch.tensor([[0.6, 0.32, 0.08, 0.0]]),
            "mask": torch.zeros(1, 4, 4, dtype=torch.long)}


@pytest.mark.parametrize(("method", "lower", "upper"), [
    # tags (CCNN's constants): each tagged class ≥ 0.05, background in [0.3, 0.7]
    ("ccnn", [0.3, 0.05, 0.05, 0.0], [0.7, 1.0, 1.0, 0.0]),
    # one bit (threshold 0.1, CCNN's rule): class 2 is small, so absent; class 1 ≥ 0.1
    ("ccnn-size", [0.2, 0.1, 0.0, 0.0], [0.7, 1.0, 0.0, 0.0]),
    # measured sizes: class 1 at least its size 0.32; class 2 (under 0.1) absent
    ("ccnn-size-exact", [0.2, 0.32, 0.0, 0.0], [0.7, 1.0, 0.0, 0.0]),
    ("mil", [0.3, 0.05, 0.05, 0.0], [0.7, 1.0, 1.0, 0.0]),
    ("full", [0.3, 0.05, 0.05, 0.0], [0.7, 1.0, 1.0, 0.0]),
])
def test_each_method_builds_its_own_bounds_and_the_refinement_stage_uses_tags_only(
        method, lower, upper):
    criterion = build_criterion(method, 4, 0)
    bounds = criterion.bounds(_batch())
    torch.testing.assert_close(bounds.lower, torch.tensor([lower], dtype=torch.float64))
    torch.testing.assert_close(bounds.upper, torch.tensor([upper], dtype=torch.float64))
    if method == "full":
        with pytest.raises(ValueError, match="full trains on the masks"):
            criterion.refinement()
    else:
        refined = criterion.refinement().bounds(_batch())
        assert refined.lower.tolist() == [[0.3, 0.05, 0.05, 0.0]]  # the tags' bounds
        assert refined.upper.tolist() == [[0.7, 1.0, 1.0, 0.0]]
        # refine_sizes: the method's own bounds (the hand-written ones above), sizes included
        kept = criterion.refinement(keep_sizes=True).bounds(_batch())
        torch.testing.assert_close(kept.lower, torch.tensor([lower], dtype=torch.float64))
        torch.testing.assert_close(kept.upper, torch.tensor([upper], dtype=torch.float64))


def test_the_size_bit_criterion_sees_one_bit_per_class():
    criterion = build_criterion("ccnn-size", 4, 0, bounds={"small_rule": "at-most",
                                                            "size_fg_lower": 0.2})
    a = criterion.bounds(_batch())
    b = criterion.bounds({**_batch(), "sizes": torch.tensor([[0.5, 0.45, 0.05, 0.0]])})
    for x, y in zip(a, b, strict=True):
        assert torch.equal(x, y)
    assert a.upper.tolist() == [[0.7, 1.0, 0.1, 0.0]]  # small means at most the threshold


def test_the_criterion_reports_the_violation_of_its_bounds():
    # uniform Q over 4 classes: every fraction 0.25; ccnn's bounds by hand: background
    # [0.3, 0.7] → 0.05 short, class 3 suppressed → 0.25 over
    loss, stats = build_criterion("ccnn", 4, 0)(torch.zeros(1, 4, 2, 2), _batch())
    assert stats["violation"] == pytest.approx(0.05 + 0.25)
    assert stats["p_seconds"] > 0 and stats["loss"] == pytest.approx(float(loss))
    _, stats = build_criterion("mil", 4, 0)(torch.zeros(1, 4, 2, 2), _batch())
    assert stats["violation"] == pytest.approx(0.30) and stats["p_seconds"] == 0.0


# -- the engine --------------------------------------------------------------------------------


class _Recorder:
    """A criterion with known statistics: the loss is the logits' mean square."""

    def __init__(self, value: float = 1.0) -> None:
        self.value, self.seen = value, []

    def __call__(self, logits, batch):
        loss = self.value * (logits ** 2).mean()
        stats = {"loss": float(loss.detach()), "p_seconds": 1e-3 * (len(self.seen) + 1)}
        self.seen.append(stats)
        return loss, dict(stats)


def _engine_objects():
    model = torch.nn.Conv2d(3, 2, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    images = torch.randint(0, 256, (3, 2, 3, 4, 4), dtype=torch.uint8,
                           generator=torch.Generator().manual_seed(0))
    return model, optimizer, scheduler, [{"image": im} for im in images]


def test_train_one_epoch_averages_the_criterions_statistics():
    model, optimizer, scheduler, loader = _engine_objects()
    criterion = _Recorder()
    stats = train_one_epoch(model, criterion, optimizer, scheduler, loader, torch.device("cpu"))
    assert stats["loss"] == pytest.approx(np.mean([s["loss"] for s in criterion.seen]))
    assert stats["p_seconds"] == pytest.approx(0.002)  # (1 + 2 + 3) ms / 3
    assert stats["p_step_share"] == pytest.approx(0.002 / stats["step_seconds"])
    assert scheduler.last_epoch == 3  # one scheduler step per batch
    with pytest.raises(FloatingPointError, match="lower --lr"):
        train_one_epoch(model, _Recorder(math.nan), optimizer, scheduler, loader,
                        torch.device("cpu"))


def test_synchronize_waits_for_a_gpu_only(monkeypatch):
    calls = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: calls.append(device))
    synchronize(torch.device("cpu"))
    assert calls == []
    synchronize(torch.device("cuda", 1))
    assert calls == [torch.device("cuda", 1)]


# -- presets -----------------------------------------------------------------------------------


def test_synthetic_preset_gives_every_weak_method_the_same_schedule():
    settings = {m: preset("synthetic", m) for m in METHODS}
    for method in WEAK_METHODS:
        assert settings[method]["epochs"] == settings["ccnn"]["epochs"] == 12
        assert settings[method]["refine_epochs"] == 3 and settings[method]["refine_lr"] == 1e-3
    assert settings["full"]["epochs"] == 12  # every method, the same epochs
    assert "refine_epochs" not in settings["full"]
    assert settings["ccnn-size"]["bounds"]["small_rule"] == "at-most"
    assert settings["ccnn-size"]["bounds"]["size_threshold"] == 0.1
    assert settings["ccnn-size-exact"]["bounds"]["size_fg_scale"] == 1.0
    assert "size_threshold" not in settings["ccnn"]["bounds"]
    # the constants selected on val of seed 100 (docs/training.md, "Selection on val")
    assert settings["ccnn"]["bounds"] == {"fg_lower": 0.2, "bg_upper": 0.7}
    assert settings["ccnn-size"]["bounds"] == {
        "fg_lower": 0.2, "bg_upper": 0.7, "size_bg_upper": 0.7, "size_threshold": 0.1,
        "size_fg_lower": 0.2, "small_rule": "at-most"}
    assert all("hardness" not in s for s in settings.values())
    assert settings["ccnn"]["test_split"] == "test"


@pytest.mark.parametrize("name", ["voc", "camvid"])
def test_ccnn_presets_keep_ccnns_constants(name):
    for method in METHODS:
        settings = preset(name, method)
        assert settings.get("refine_epochs", 0) == 0 and settings["bounds"] == {}
        assert settings.get("hardness", 1.0) == (SIZE_HARDNESS if "size" in method else 1.0)
        assert settings["lr"] == 1e-6 and settings["model"] == "vgg16-fcn"
    assert preset(name, "ccnn")["test_split"] == {"voc": "val", "camvid": "test"}[name]


def test_every_preset_and_method_makes_a_valid_configuration():
    for name in PRESETS:
        for method in METHODS:
            cfg = TrainConfig(method=method, **preset(name, method))
            assert cfg.criterion(4, 0).method == method
    with pytest.raises(ValueError, match="unknown preset 'imagenet'"):
        preset("imagenet", "ccnn")
    with pytest.raises(ValueError, match="method must be one of"):
        preset("synthetic", "gan")


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


def test_build_dataset_unknown_name():
    with pytest.raises(ValueError, match="unknown dataset"):
        build_dataset("imagenet", "train")


# -- training ----------------------------------------------------------------------------------


def test_tiny_ccnn_run_learns_logs_and_reports_its_validation_miou(tmp_path, tiny, miou_of,
                                                                   caplog, capsys):
    cfg = TrainConfig(method="ccnn", epochs=6, **tiny)
    rng_state = torch.get_rng_state()
    with caplog.at_level(logging.INFO, logger="ccnn"):
        summary = train(cfg, tmp_path, progress_bar=True)
    assert torch.equal(torch.get_rng_state(), rng_state)  # the global generator is untouched
    history = summary["history"]
    assert history[-1]["loss"] < history[0]["loss"]
    assert history[-1]["violation"] < history[0]["violation"]
    model = load_checkpoint(tmp_path / "checkpoint.pt")[0]
    val_set = split_dataset(cfg, "val", cfg.val_size)
    assert summary["split"] == "val"
    assert summary["miou"] == pytest.approx(miou_of(model, val_set))
    report = tmp_path / "report"
    for name in ("metrics.json", "curves.png", "overlays.png"):
        assert (report / name).is_file()
    logged = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in logged] == list(range(6))
    assert all(r["p_seconds"] > 0 for r in logged)
    # messages go through logging; no progress bar where standard error is not a terminal
    messages = [r.getMessage() for r in caplog.records if r.name == "ccnn.train"]
    assert len(messages) == 6 and messages[0].startswith("ccnn epoch 1/6: loss")
    out, err = capsys.readouterr()
    assert out == "" and "\r" not in err


def test_resume_after_a_stop_matches_an_uninterrupted_run(tmp_path, tiny, quiet, stop_when):
    cfg = TrainConfig(method="ccnn-size", epochs=3, **tiny)
    train(cfg, tmp_path / "whole", report=False, progress_bar=False, log=quiet)
    with pytest.raises(Exception, match="epoch 1/3"):
        train(cfg, tmp_path / "cut", report=False, progress_bar=False, log=stop_when("epoch 1/3"))
    train(cfg, tmp_path / "cut", resume=True, report=False, progress_bar=False, log=quiet)
    whole = torch.load(tmp_path / "whole" / "checkpoint.pt", weights_only=True)
    cut = torch.load(tmp_path / "cut" / "checkpoint.pt", weights_only=True)
    for key, value in whole["model"].items():
        assert torch.equal(value, cut["model"][key]), key
    lines = (tmp_path / "cut" / "log.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == [0, 1, 2]


def test_resume_rejects_other_settings(tmp_path, tiny, quiet):
    train(TrainConfig(method="mil", epochs=1, **tiny), tmp_path, report=False,
          progress_bar=False, log=quiet)
    with pytest.raises(ValueError, match="other settings: method='mil'"):
        train(TrainConfig(method="full", epochs=2, **tiny), tmp_path, resume=True, log=quiet)
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        train(TrainConfig(method="full", epochs=2, **tiny), tmp_path / "none", resume=True,
              log=quiet)


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
    with pytest.raises(ValueError, match="bounds: small_rule='big'"):
        TrainConfig(method="ccnn-size", bounds={"small_rule": "big"})
    with pytest.raises(ValueError, match=r"bounds: size_fg_scale=1\.0 needs the measured sizes"):
        TrainConfig(method="ccnn-size", bounds={"size_fg_scale": 1.0})
    with pytest.raises(ValueError, match="scale must be an interval"):
        TrainConfig(scale=(2.0, 1.0))


# -- the demo ----------------------------------------------------------------------------------


def test_demo_reports_on_test_before_and_after_refinement(tmp_path, tiny, miou_of, quiet):
    tiny_pretraining = PretrainConfig(images=16, val_images=8, epochs=1, image_size=32)
    methods = ("full", "mil", "ccnn-size")
    table = run_demo(tmp_path, methods=methods, epochs=1, progress_bar=False,
                     pretraining=tiny_pretraining, log=quiet, **tiny)
    assert list(table["methods"]) == list(methods)
    assert (table["split"], table["images"], table["seed"]) == ("test", 8, 0)
    assert table["version"] == ccnn.__version__ == importlib.metadata.version("ccnn")
    backbone = str(tmp_path / "backbone.pt")
    for method in methods:  # each method's settings: the preset's, then the demo's overrides
        expected = {**preset("synthetic", method), "seed": 0, **tiny, "epochs": 1,
                    "backbone_weights": backbone}
        assert table["settings"][method] == dataclasses.asdict(TrainConfig(method=method,
                                                                           **expected))
    assert table["pretrain"]["config"] == dataclasses.asdict(tiny_pretraining)
    test_set = split_dataset(TrainConfig(**tiny), "test", tiny["test_size"])
    for method in methods:
        row, folder = table["methods"][method], tmp_path / method
        assert row["miou"] == pytest.approx(miou_of(load_checkpoint(folder / "checkpoint.pt")[0],
                                                    test_set))
        log = [json.loads(line) for line in (folder / "log.jsonl").read_text().splitlines()]
        assert row["val_miou"] == log[-1]["val_miou"]
        if method == "full":
            assert "miou_before_refine" not in row and len(log) == 1
            continue
        # mil and ccnn-size: one epoch of their own, then the preset's three refinement epochs
        assert [r["stage"] for r in log] == ["train", "refine", "refine", "refine"]
        before = load_checkpoint(folder / BEFORE_REFINE)[0]
        assert row["miou_before_refine"] == pytest.approx(miou_of(before, test_set))
    share = sum(r["p_seconds"] for r in log) / sum(r["step_seconds"] for r in log)
    assert row["p_step_share"] == pytest.approx(share)  # ccnn-size, the last method
    assert "p_step_share" not in table["methods"]["mil"]
    assert (tmp_path / "curves.png").is_file()
    saved = json.loads((tmp_path / "demo.json").read_text())  # the table, kept after each method
    assert saved["methods"] == table["methods"] and saved["settings"]["mil"]["refine_epochs"] == 3
    lines = format_table(table).splitlines()
    assert lines[0] == f"test split (8 images), seed 0, ccnn {ccnn.__version__}"
    mil_row = next(line for line in lines if line.startswith("mil "))
    assert mil_row.split()[1] == f"{table['methods']['mil']['miou']:.4f}"
    assert mil_row.split()[-1] == f"{table['methods']['mil']['miou_before_refine']:.4f}"


def test_demo_in_worker_processes_gives_the_one_thread_table(tmp_path, tiny, quiet):
    # three methods at once (the default --jobs runs every demo method at once, more processes
    # than the machine's cores): each worker has one thread, so the table is the in-process
    # one-thread table
    settings = {**tiny, "crf": False}
    methods = ("full", "mil", "ccnn")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the workers' thread count
    try:
        one = run_demo(tmp_path / "one", methods=methods, epochs=1, pretraining=False,
                       progress_bar=False, log=quiet, **settings)
    finally:
        torch.set_num_threads(threads)
    pooled = run_demo(tmp_path / "pooled", methods=methods, epochs=1, pretraining=False, jobs=3,
                      progress_bar=False, log=quiet, **settings)
    assert list(pooled["methods"]) == list(methods) and pooled["jobs"] == 3
    for method in methods:
        a, b = one["methods"][method], pooled["methods"][method]
        for key in ("miou", "pixel_accuracy", "val_miou", "miou_before_refine"):
            assert a.get(key) == b.get(key), (method, key)
        weights = [load_checkpoint(tmp_path / run / method / "checkpoint.pt")[0].state_dict()
                   for run in ("one", "pooled")]
        assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
    saved = json.loads((tmp_path / "pooled" / "demo.json").read_text())
    assert saved["methods"] == pooled["methods"]
    with pytest.raises(ValueError, match="--jobs must be at least 1"):
        run_demo(tmp_path / "bad", methods=methods, pretraining=False, jobs=0, log=quiet)


# -- command line ------------------------------------------------------------------------------


def test_cli_train_evaluate_predict(tmp_path, capsys, miou_of):
    out = tmp_path / "run"
    sizes = ["--train-size", "8", "--val-size", "4", "--test-size", "6"]
    assert main(["train", "--method", "mil", "--epochs", "1", "--refine-epochs", "0",
                 "--batch-size", "4", "--out", str(out), "--no-progress", *sizes]) == 0
    assert "with the dense CRF" in capsys.readouterr().out  # the synthetic preset's default
    summary = json.loads((out / "report" / "metrics.json").read_text())
    checkpoint = out / "checkpoint.pt"
    assert main(["evaluate", str(checkpoint), "--json", str(tmp_path / "m.json")]) == 0
    assert "on test (6 images)" in capsys.readouterr().out  # reports are on the test split
    metrics = json.loads((tmp_path / "m.json").read_text())
    model, state = load_checkpoint(checkpoint)
    cfg = TrainConfig(**state["config"])
    assert metrics["miou"] == pytest.approx(miou_of(model, split_dataset(cfg, "test", 6)))
    assert main(["evaluate", str(checkpoint), "--split", "val", "--crf", "--json",
                 str(tmp_path / "c.json")]) == 0
    assert "on val (4 images, dense CRF)" in capsys.readouterr().out
    assert json.loads((tmp_path / "c.json").read_text())["miou"] == summary["crf"]["miou"]

    images = tmp_path / "images"
    images.mkdir()
    Image.fromarray(np.zeros((40, 30, 3), dtype=np.uint8)).save(images / "a.png")
    palette = {tuple(c) for c in state["palette"]}
    for extra, folder in (([], "masks"), (["--crf"], "crf_masks")):
        assert main(["predict", str(checkpoint), str(images), str(tmp_path / folder),
                     *extra]) == 0
        mask = Image.open(tmp_path / folder / "a.png")
        assert mask.size == (30, 40) and mask.mode == "RGB"
        assert {tuple(c) for c in np.asarray(mask).reshape(-1, 3).tolist()} <= palette


def test_cli_bound_overrides_one_constant_of_the_preset():
    args = build_parser().parse_args(["train", "--bound", "bg_upper=0.6", "--bound",
                                      "fg_lower=0.1"])
    cfg = config_from_args(args)
    assert cfg.bounds == {**PRESETS["synthetic"]["bounds"], "bg_upper": 0.6, "fg_lower": 0.1}
    lower, upper, slack = cfg.criterion(4, 0).bounds({"tags": torch.tensor([[1, 0, 1, 0]]),
                                                      "sizes": torch.zeros(1, 4)})
    # by hand: background in [0.3, 0.6], class 2 at least 0.1 (slack 2), classes 1, 3 absent
    assert lower.tolist() == [[0.3, 0.0, 0.1, 0.0]] and upper.tolist() == [[0.6, 0.0, 1.0, 0.0]]
    assert slack[0, 2] == 2.0
    args = build_parser().parse_args(["train", "--method", "ccnn-size", "--bound",
                                      "small_rule=absent"])
    cfg = config_from_args(args)
    assert cfg.bounds["small_rule"] == "absent" and cfg.bounds["size_threshold"] == 0.1
    bounds = cfg.criterion(4, 0).bounds({"tags": torch.tensor([[1, 1, 1, 0]]),
                                         "sizes": torch.tensor([[0.6, 0.35, 0.05, 0.0]])})
    # by hand: class 1 large (≥ the preset's 0.2), class 2 small and now absent; the background
    # at most the preset's 0.7
    assert bounds.lower.tolist() == [[0.2, 0.2, 0.0, 0.0]]
    assert bounds.upper.tolist() == [[0.7, 1.0, 0.0, 0.0]]


def test_cli_errors(tmp_path, capsys):
    assert main(["evaluate", str(tmp_path / "missing.pt")]) == 2
    assert "missing.pt" in capsys.readouterr().err
    assert main(["predict", str(tmp_path / "missing.pt"), str(tmp_path), str(tmp_path)]) == 2
    assert main(["train", "--preset", "voc", "--data-root", str(tmp_path), "--train-size",
                 "3"]) == 2
    assert "synthetic dataset only" in capsys.readouterr().err
    for bound, message in (("bogus=1", "unknown constraint constant(s) ['bogus']"),
                           ("bg_upper", "expected NAME=VALUE"),
                           ("bg_upper=1.5", "bg_upper=1.5 must lie in [0, 1]"),
                           ("small_rule=never", "small_rule='never' must be one of")):
        assert main(["train", "--method", "ccnn-size", "--bound", bound,
                     "--out", str(tmp_path / "b")]) == 2
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

    from ccnn.engine import eval_loader, evaluate

    path = Path(__file__).resolve().parents[1] / "scripts" / "latent_vs_trained.py"
    spec = importlib.util.spec_from_file_location("latent_vs_trained", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    result = module.main(["--under-epochs", "1", "--full-epochs", "2", "--train-size", "16",
                          "--val-size", "4", "--out", str(tmp_path), "--no-progress"])
    assert result["images"] == 4
    # Q_f's pixel accuracy, computed again through the evaluation code
    model, state = load_checkpoint(tmp_path / "full" / "checkpoint.pt")
    val_set = split_dataset(TrainConfig(**state["config"]), "val", 4)
    metrics = evaluate(model, eval_loader(val_set, 4), state["num_classes"],
                       torch.device("cpu"))
    assert result["pixel_accuracy"]["Q_f"] == pytest.approx(metrics["pixel_accuracy"])
    assert result["p_closer_by"] == pytest.approx(1 - result["kl_qf_p"] / result["kl_qf_qu"])
    assert f"P is {100 * result['p_closer_by']:.1f}% closer to Q_f" in capsys.readouterr().out
    saved = json.loads((tmp_path / "latent_vs_trained.json").read_text())
    assert saved["kl_qf_p"] == pytest.approx(result["kl_qf_p"])
