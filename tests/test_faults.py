"""Faults in a training run and bad input to ``ccnn train``, ``evaluate`` and ``predict``: a
non-finite loss or gradient stops the run naming the epoch and the step and keeps the last good
checkpoint; the P-step's non-convergence is counted per epoch; a folder holding a run is refused
unless ``--resume`` or ``--overwrite``; ``--skip-bad`` leaves unreadable files out and counts
them."""

from __future__ import annotations

import hashlib
import json
import logging
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from test_bad_input import _truncate
from test_datasets import _write_camvid

import ccnn.loss
from ccnn.cli import main
from ccnn.engine import NonFiniteError
from ccnn.train import BEFORE_REFINE, CHECKPOINT, LOG, REFINE_LABELS, TrainConfig, train

# a tiny synthetic run through the command line: 4 training images, one step per epoch
CLI_RUN = ["--method", "ccnn", "--train-size", "4", "--val-size", "2", "--test-size", "2",
           "--batch-size", "4", "--no-crf", "--no-progress", "--refine-epochs", "0"]


class _Broken:
    """A criterion that is ``base`` until call ``at`` (1-based), where the loss becomes NaN
    (``what="loss"``) or stays finite while its gradient is NaN (``what="gradient"``)."""

    def __init__(self, base, at: int, what: str) -> None:
        self.base, self.at, self.what, self.calls = base, at, what, 0

    def __getattr__(self, name: str):  # bounds, refinement, ...: the base's
        return getattr(self.base, name)

    def __call__(self, logits, batch):
        self.calls += 1
        loss, stats = self.base(logits, batch)
        if self.calls != self.at:
            return loss, stats
        if self.what == "loss":
            return loss * math.nan, {**stats, "loss": math.nan}
        # sqrt at 0: the value 0, the derivative infinite, times |x|'s 0 at 0: NaN
        return loss + (logits - logits.detach()).abs().sum().sqrt(), stats


def _break(monkeypatch, at: int, what: str) -> None:
    original = TrainConfig.criterion
    monkeypatch.setattr(TrainConfig, "criterion",
                        lambda self, *a: _Broken(original(self, *a), at, what))


def _snapshot(folder: Path) -> dict[str, tuple[str, int]]:
    """Every file under ``folder``: its content's hash and modification time."""
    return {str(p.relative_to(folder)): (hashlib.sha256(p.read_bytes()).hexdigest(),
                                         p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file()}


# -- non-finite loss and gradient ------------------------------------------------------------------

def test_a_nan_loss_stops_the_run_naming_epoch_and_step_and_keeps_the_last_checkpoint(
        tmp_path, tiny, monkeypatch):
    _break(monkeypatch, at=5, what="loss")  # 24 images in batches of 8: epoch 2, step 2
    kept = {}

    def log(message: str) -> None:
        if "epoch 1/3" in message:  # the checkpoint of epoch 1 is written
            kept["checkpoint"] = (tmp_path / CHECKPOINT).read_bytes()
            kept["log"] = (tmp_path / LOG).read_text()

    with pytest.raises(NonFiniteError, match=r"ccnn: the loss became nan in epoch 2, step 2 "
                                             r"of 3: lower --lr; the run stopped \(.*"
                                             r"checkpoint\.pt keeps epoch 1\)"):
        train(TrainConfig(method="ccnn", epochs=3, **tiny), tmp_path, report=False,
              progress_bar=False, log=log)
    assert (tmp_path / CHECKPOINT).read_bytes() == kept["checkpoint"]  # untouched
    assert (tmp_path / LOG).read_text() == kept["log"]
    assert torch.load(tmp_path / CHECKPOINT, weights_only=True)["epoch"] == 1
    assert not (tmp_path / "report").exists()


def test_a_nan_gradient_with_a_finite_loss_stops_the_run_before_the_step(tmp_path, tiny,
                                                                         monkeypatch, quiet):
    _break(monkeypatch, at=1, what="gradient")
    with pytest.raises(NonFiniteError, match=r"the gradient became non-finite \(nan\) in epoch "
                                             r"1, step 1 of 3.*no checkpoint was written"):
        train(TrainConfig(method="mil", epochs=1, **tiny), tmp_path, report=False,
              progress_bar=False, log=quiet)
    assert not (tmp_path / CHECKPOINT).exists()


def test_the_command_line_reports_a_nan_loss_with_exit_status_1(tmp_path, monkeypatch, capsys):
    _break(monkeypatch, at=2, what="loss")
    out = tmp_path / "run"
    assert main(["train", *CLI_RUN, "--epochs", "2", "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert "ccnn train: stopped: ccnn: the loss became nan in epoch 2, step 1 of 1" in err
    assert "keeps epoch 1" in err
    assert torch.load(out / CHECKPOINT, weights_only=True)["epoch"] == 1


# -- the P-step's non-convergence, counted per epoch ---------------------------------------------

def test_p_step_non_convergence_is_counted_per_epoch(tmp_path, tiny, monkeypatch, caplog):
    """The log's count against one taken by wrapping the solver itself."""
    seen: list[int] = []
    solve = ccnn.loss.solve_latent

    def counting(*args, **kwargs):
        result = solve(*args, **kwargs)
        seen.append(int((~result.converged).sum()))
        return result

    monkeypatch.setattr(ccnn.loss, "solve_latent", counting)
    cfg = TrainConfig(method="ccnn", epochs=2, p_tol=1e-300, **tiny)  # below rounding: stalls
    with caplog.at_level(logging.INFO, logger="ccnn"):
        summary = train(cfg, tmp_path, report=False, progress_bar=False)
    counts = [r["p_unconverged"] for r in summary["history"]]
    assert counts == [sum(seen[:3]), sum(seen[3:])]  # 3 steps per epoch
    assert sum(counts) > 0
    logged = [json.loads(line)["p_unconverged"] for line in (tmp_path / LOG).read_text()
              .splitlines()]
    assert logged == counts
    messages = [r.getMessage() for r in caplog.records if "epoch 1/2" in r.getMessage()]
    assert messages[0].endswith(f"; the P-step did not converge on {counts[0]} image(s)")
    # a method without a P-step records no count
    mil = train(TrainConfig(method="mil", epochs=1, **tiny), tmp_path / "mil", report=False,
                progress_bar=False, log=lambda m: None)
    assert "p_unconverged" not in mil["history"][0]


# -- a folder that already holds a run ------------------------------------------------------------

def test_a_new_run_in_a_folder_holding_one_is_refused_unless_resume_or_overwrite(tmp_path,
                                                                                 capsys, caplog):
    out = tmp_path / "run"
    first = ["train", *CLI_RUN, "--epochs", "1", "--out", str(out)]
    assert main([*first[:-2], "--refine-epochs", "1", "--out", str(out)]) == 0
    assert (out / REFINE_LABELS).exists() and (out / BEFORE_REFINE).exists()
    capsys.readouterr()
    before = _snapshot(out)
    assert main(first) == 2
    err = capsys.readouterr().err
    assert f"{out} already holds a run" in err and "--resume" in err and "--overwrite" in err
    assert _snapshot(out) == before  # nothing touched
    assert main([*first, "--resume", "--overwrite"]) == 2
    assert "give one of them" in capsys.readouterr().err
    assert _snapshot(out) == before
    # --overwrite: the earlier run's files go, the new run's come
    assert main([*first[:-3], "2", "--out", str(out), "--overwrite"]) == 0
    assert not (out / REFINE_LABELS).exists() and not (out / BEFORE_REFINE).exists()
    assert [json.loads(r)["stage"] for r in (out / LOG).read_text().splitlines()] == ["train"] * 2
    assert torch.load(out / CHECKPOINT, weights_only=True)["config"]["refine_epochs"] == 0
    # --resume continues it (here: one more epoch)
    with caplog.at_level(logging.INFO, logger="ccnn"):
        assert main([*first[:-3], "3", "--out", str(out), "--resume"]) == 0
    assert f"resumed from {out / CHECKPOINT} after epoch 2" in caplog.text
    assert len((out / LOG).read_text().splitlines()) == 3


# -- --skip-bad ------------------------------------------------------------------------------------

CAMVID_RUN = ["--preset", "camvid", "--method", "ccnn", "--model", "small", "--epochs", "1",
              "--batch-size", "2", "--crop", "16", "--lr", "1e-3", "--no-progress", "--no-crf"]


def test_skip_bad_in_train_evaluate_and_predict(tmp_path, capsys, caplog):
    root = tmp_path / "data"
    _write_camvid(root)
    bad_train = root / "CamVid" / "train" / "0001TP_000001.png"
    _truncate(bad_train, 0.6)
    out = tmp_path / "run"
    train_args = ["train", *CAMVID_RUN, "--data-root", str(root), "--out", str(out)]
    assert main(train_args) == 2
    err = capsys.readouterr().err
    assert "CamVid train split: image" in err and str(bad_train) in err and "--skip-bad" in err
    assert not (out / CHECKPOINT).exists()
    with caplog.at_level(logging.INFO, logger="ccnn"):
        assert main([*train_args, "--skip-bad", "--overwrite"]) == 0
    assert "--skip-bad: left out the samples of 1 unreadable file(s): train 1" in caplog.text
    metrics = json.loads((out / "report" / "metrics.json").read_text())
    assert metrics["skipped"] == {"train": [str(bad_train)]}
    assert torch.load(out / CHECKPOINT, weights_only=True)["config"]["skip_bad"] is True

    bad_val = root / "CamVid" / "val" / "0001TP_000000.png"
    _truncate(bad_val, 0.6)
    evaluate = ["evaluate", str(out / CHECKPOINT), "--split", "val"]
    assert main(evaluate) == 2  # the checkpoint's skip_bad is not the evaluation's
    assert str(bad_val) in capsys.readouterr().err
    assert main([*evaluate, "--skip-bad", "--json", str(tmp_path / "m.json")]) == 0
    assert "on val (1 images, 1 unreadable left out)" in capsys.readouterr().out
    assert json.loads((tmp_path / "m.json").read_text())["skipped"] == [str(bad_val)]

    images, masks = tmp_path / "images", tmp_path / "masks"
    images.mkdir()
    Image.fromarray(np.full((20, 24, 3), 90, dtype=np.uint8)).save(images / "a.jpg")
    Image.fromarray(np.full((20, 24, 3), 30, dtype=np.uint8)).save(images / "b.jpg")
    _truncate(images / "a.jpg", 0.5)
    predict = ["predict", str(out / CHECKPOINT), str(images), str(masks)]
    assert main(predict) == 2
    err = capsys.readouterr().err
    assert "a.jpg is truncated or corrupt" in err and "--skip-bad" in err
    with caplog.at_level(logging.WARNING, logger="ccnn"):
        assert main([*predict, "--skip-bad"]) == 0
    assert f"skipped {images / 'a.jpg'}: image {images / 'a.jpg'} is truncated" in caplog.text
    assert f"wrote 1 masks to {masks}; skipped 1 unreadable image(s): {images / 'a.jpg'}" \
        in capsys.readouterr().out
    assert sorted(p.name for p in masks.iterdir()) == ["b.png"]
