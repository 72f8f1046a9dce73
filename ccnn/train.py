"""Weak-label segmentation training: CCNN's alternating P/Q scheme and its baselines.

Laid out like torchvision's ``references/segmentation/train.py``: :func:`train` sets up, in
order, the output folder, data, model, criterion, optimizer and schedule, resume, then runs the
epoch loop of :func:`ccnn.engine.train_one_epoch` and :func:`ccnn.engine.evaluate`; every step
of a batch (data → model → constraints → P-step → loss → optimizer → metrics) is in
:mod:`ccnn.engine` and the method's criterion (:mod:`ccnn.criteria`).

Methods (:data:`METHODS`):

* ``"ccnn"`` — tags only: foreground, background and suppression constraints (Pathak,
  Krähenbühl and Darrell 2015, §4);
* ``"ccnn-size"`` — plus CCNN's one bit of size information per tagged class (is it above a
  threshold);
* ``"ccnn-size-exact"`` — plus each tagged class's measured size as its lower bound (more
  supervision than CCNN's);
* ``"mil"`` — MIL-FCN's multi-class MIL loss on tags, no constraints (the baseline CCNN beat);
* ``"full"`` — per-pixel cross-entropy with the masks (the upper bound).

With ``refine_epochs`` a weak-label method adds a refinement stage after its epochs: the
network trains on its own CRF-refined, tag-restricted predictions, with its loss from the tags
alone (:mod:`ccnn.refine`).

Each epoch draws its shuffling and augmentation from a generator seeded by ``(seed, epoch)``
(:func:`ccnn.engine.epoch_generator`), and a checkpoint is written atomically after it, so
``resume=True`` continues to exactly the weights of an uninterrupted run.  ``train`` fits on
``train_split`` and validates on ``val_split`` after every epoch (the split for choosing
settings); reports on ``test_split`` are :mod:`ccnn.demo`'s and ``ccnn evaluate``'s.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import Dataset

from ccnn.constraints import BOUND_OPTIONS
from ccnn.crf import CRFParams
from ccnn.criteria import METHODS, Criterion, build_criterion
from ccnn.data import build_dataset
from ccnn.data.transforms import Augmentation
from ccnn.engine import (
    epoch_generator,
    eval_loader,
    evaluate,
    lr_schedule,
    predict_logits,
    seeded,
    train_one_epoch,
    training_loader,
)
from ccnn.io import atomic_save, replace_atomically
from ccnn.models import build_model
from ccnn.progress import ProgressBar, on_terminal
from ccnn.refine import RelabelledDataset, label_images, load_labels
from ccnn.report import write_report

__all__ = ["BEFORE_REFINE", "CHECKPOINT", "LOG", "METHODS", "REFINE_LABELS", "TrainConfig",
           "load_datasets", "load_test_set", "lr_factor", "predict_logits", "split_dataset",
           "train"]

logger = logging.getLogger(__name__)

CHECKPOINT = "checkpoint.pt"
LOG = "log.jsonl"
REFINE_LABELS = "refine_labels.pt"
BEFORE_REFINE = "before_refine.pt"  # the checkpoint after the last P/Q epoch


@dataclass
class TrainConfig:
    """Everything a training run depends on; saved in its checkpoints.

    ``bounds`` holds keyword arguments of :func:`ccnn.constraints.tag_bounds` (CCNN's constants
    by default, and ``small_rule``); ``dataset_options`` those of the dataset's constructor.
    ``train_size``, ``val_size`` and ``test_size`` set the number of images of the synthetic
    dataset's splits.  ``refine_epochs`` adds that many epochs of the refinement stage
    (:mod:`ccnn.refine`) after ``epochs``; the schedule spans both, unless ``refine_lr``
    restarts it for the stage (:func:`lr_factor`).  ``test_split`` is where reports are made
    (:mod:`ccnn.demo`, ``ccnn evaluate``); training never reads it.
    """

    method: str = "ccnn"
    dataset: str = "synthetic"
    data_root: str = "data"
    train_split: str = "train"
    val_split: str = "val"
    test_split: str = "test"
    dataset_options: dict = field(default_factory=dict)
    train_size: int | None = None
    val_size: int | None = None
    test_size: int | None = None
    model: str = "small"
    backbone_weights: str | None = None
    epochs: int = 10
    batch_size: int = 16
    optimizer: str = "adam"
    lr: float = 1e-3
    momentum: float = 0.9
    weight_decay: float = 1e-4
    schedule: str = "poly"
    flip: bool = True
    scale: tuple[float, float] = (1.0, 1.0)
    crop: int | None = None
    p_method: str = "newton"
    p_tol: float = 1e-6
    hardness: float = 1.0
    bounds: dict = field(default_factory=dict)
    seed: int = 0
    device: str = "cpu"
    num_workers: int = 0
    eval_batch_size: int = 16
    overlays: int = 8
    crf: bool = False  # also report the final metrics after the dense CRF (ccnn.crf)
    refine_epochs: int = 0
    refine_lr: float | None = None

    def __post_init__(self) -> None:
        self.scale = tuple(self.scale)
        checks = [
            (self.method in METHODS, f"method must be one of {METHODS}, got {self.method!r}"),
            (self.epochs >= 1, f"epochs must be at least 1, got {self.epochs}"),
            (self.batch_size >= 1, f"batch_size must be at least 1, got {self.batch_size}"),
            (self.lr > 0, f"lr must be positive, got {self.lr}"),
            (self.optimizer in ("sgd", "adam"), f"optimizer must be sgd or adam, got "
                                                f"{self.optimizer!r}"),
            (self.schedule in ("poly", "constant"), f"schedule must be poly or constant, got "
                                                    f"{self.schedule!r}"),
            (self.weight_decay >= 0, f"weight_decay must be >= 0, got {self.weight_decay}"),
            (self.refine_epochs >= 0, f"refine_epochs must be >= 0, got {self.refine_epochs}"),
            (self.refine_lr is None or self.refine_lr > 0,
             f"refine_lr must be positive, got {self.refine_lr}"),
            (self.refine_epochs == 0 or self.method != "full",
             "refine_epochs: full trains on the masks; the refinement stage is for the "
             "weak-label methods"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)
        self.augmentation()  # checks scale and crop
        self._check_bounds()

    def _check_bounds(self) -> None:
        """Refuse unknown constraint constants and out-of-range values before training."""
        unknown = sorted(set(self.bounds) - set(BOUND_OPTIONS))
        if unknown:
            raise ValueError(f"unknown constraint constant(s) {unknown} in bounds; choose from "
                             f"{', '.join(BOUND_OPTIONS)}")
        criterion = self.criterion(2, 0)
        # one image with one foreground tag exercises every bound the method builds
        batch = {"tags": torch.tensor([[1, 1]]), "sizes": torch.tensor([[0.5, 0.5]])}
        try:
            criterion.bounds(batch)
            if self.method != "full":
                criterion.refinement().bounds(batch)
        except ValueError as error:
            raise ValueError(f"bounds: {error}") from None

    def criterion(self, num_classes: int, background: int | None) -> Criterion:
        """The method's criterion (:func:`ccnn.criteria.build_criterion`) with these settings."""
        return build_criterion(self.method, num_classes, background, bounds=self.bounds,
                               p_method=self.p_method, p_tol=self.p_tol, hardness=self.hardness)

    def augmentation(self) -> Augmentation:
        """The training images' random flip, scale and crop."""
        return Augmentation(self.flip, self.scale, self.crop)


def lr_factor(cfg: TrainConfig, steps_per_epoch: int) -> Callable[[int], float]:
    """The learning rate after ``step`` optimizer steps as a multiple of ``cfg.lr``
    (:func:`ccnn.engine.lr_schedule`; ``cfg.refine_lr`` restarts it for the refinement
    stage)."""
    restart = None if cfg.refine_lr is None else cfg.refine_lr / cfg.lr
    return lr_schedule(steps_per_epoch, cfg.epochs, schedule=cfg.schedule,
                       refine_epochs=cfg.refine_epochs, restart=restart)


def _make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum,
                               weight_decay=cfg.weight_decay)
    return torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)


def split_dataset(cfg: TrainConfig, split: str, size: int | None = None) -> Dataset:
    """One split of the configuration's dataset; ``size`` images (synthetic data only)."""
    options = dict(cfg.dataset_options)
    if size is not None:
        if cfg.dataset != "synthetic":
            raise ValueError("train_size, val_size and test_size apply to the synthetic dataset "
                             "only")
        options["size"] = size
    return build_dataset(cfg.dataset, split, cfg.data_root, seed=cfg.seed, **options)


def load_datasets(cfg: TrainConfig) -> tuple[Dataset, Dataset]:
    """The training and validation datasets a configuration names."""
    return (split_dataset(cfg, cfg.train_split, cfg.train_size),
            split_dataset(cfg, cfg.val_split, cfg.val_size))


def load_test_set(cfg: TrainConfig) -> Dataset:
    """The dataset reports are made on: ``cfg.test_split`` (never used in training)."""
    return split_dataset(cfg, cfg.test_split, cfg.test_size)


def _read_log(path: Path, upto_epoch: int) -> list[dict]:
    """The log's records of the epochs before ``upto_epoch`` (a resumed run rewrites the rest)."""
    if not path.exists():
        return []
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in records if r["epoch"] < upto_epoch]


def train(cfg: TrainConfig, out: str | Path, *, resume: bool = False,
          datasets: Sequence[Dataset] | None = None, report: bool = True,
          progress_bar: bool = True, log: Callable[[str], None] | None = None) -> dict:
    """Train one method; returns the final validation metrics and timings.

    Writes into ``out``: ``checkpoint.pt`` after each epoch (atomically), ``log.jsonl`` (one
    record per epoch), with a refinement stage ``before_refine.pt`` (the checkpoint after the
    last P/Q epoch) and ``refine_labels.pt``, and, when ``report``, the ``report/`` folder of
    :mod:`ccnn.report` (on the validation split).

    Args:
        cfg: the run's configuration.
        out: output folder (created).
        resume: continue from ``out/checkpoint.pt``; its configuration must match ``cfg``.
        datasets: prebuilt ``(train, val)`` datasets (the demo shares them between methods).
        report: write the report folder at the end.
        progress_bar: show a progress bar per epoch when standard error is a terminal.
        log: where one-line messages go (default: this module's logger, level INFO).
    """
    log = log or logger.info
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    device = torch.device(cfg.device)

    # data
    train_set, val_set = datasets if datasets is not None else load_datasets(cfg)
    num_classes = train_set.num_classes
    augmentation = cfg.augmentation()
    val_loader = eval_loader(val_set, cfg.eval_batch_size, num_workers=cfg.num_workers)

    # model
    with seeded(cfg.seed, device):
        model = build_model(cfg.model, num_classes, backbone_weights=cfg.backbone_weights)
    model.to(device)

    # criterion: constraints, P-step and loss (the refinement stage's from the tags alone)
    criterion = cfg.criterion(num_classes, train_set.background)
    criteria = {False: criterion, True: criterion.refinement() if cfg.refine_epochs else None}

    # optimizer and schedule
    optimizer = _make_optimizer(model, cfg)
    steps_per_epoch = math.ceil(len(train_set) / cfg.batch_size)
    total_epochs = cfg.epochs + cfg.refine_epochs
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor(cfg, steps_per_epoch))

    # resume
    start_epoch, elapsed = 0, 0.0
    checkpoint_path = out / CHECKPOINT
    if resume:
        start_epoch, elapsed = _resume(checkpoint_path, cfg, model, optimizer, scheduler)
        log(f"resumed from {checkpoint_path} after epoch {start_epoch}")
    history = _read_log(out / LOG, start_epoch)
    text = "".join(json.dumps(r) + "\n" for r in history)
    replace_atomically(out / LOG, lambda tmp: tmp.write_text(text))

    # epochs: P/Q (or the baseline's loss), then the refinement stage
    metrics, epoch_set = None, train_set
    for epoch in range(start_epoch, total_epochs):
        epoch_start = time.perf_counter()
        refining = epoch >= cfg.epochs
        if refining and epoch_set is train_set:
            epoch_set = _refinement_set(model, train_set, out, device, cfg,
                                        fresh=epoch == cfg.epochs, log=log)
        loader = training_loader(epoch_set, cfg.batch_size, augmentation,
                                 epoch_generator(cfg.seed, epoch), num_workers=cfg.num_workers)
        title = f"{cfg.method}{' refine' if refining else ''} epoch {epoch + 1}/{total_epochs}"
        with (ProgressBar(on_terminal(progress_bar), len(loader), title) as bar,
              seeded(cfg.seed * 100_003 + epoch, device)):  # dropout's draws
            stats = train_one_epoch(model, criteria[refining], optimizer, scheduler, loader,
                                    device, progress=bar)
        metrics = evaluate(model, val_loader, num_classes, device)
        elapsed += time.perf_counter() - epoch_start
        record = {"epoch": epoch, "stage": "refine" if refining else "train", **stats,
                  "lr": scheduler.get_last_lr()[0],
                  "val_miou": metrics["miou"], "val_pixel_accuracy": metrics["pixel_accuracy"],
                  "seconds": elapsed}
        history.append(record)
        atomic_save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                      "scheduler": scheduler.state_dict(), "epoch": epoch + 1,
                      "elapsed": elapsed, "config": dataclasses.asdict(cfg),
                      "num_classes": num_classes, "class_names": list(train_set.class_names),
                      "palette": train_set.palette.tolist()}, checkpoint_path)
        with (out / LOG).open("a") as f:
            f.write(json.dumps(record) + "\n")
        log(f"{title}: loss {stats['loss']:.4f}, "
            f"violation {stats['violation']:.4f}, val mIoU {metrics['miou']:.3f}")

    # final validation metrics and the report
    if metrics is None:  # resumed after the last epoch: nothing evaluated yet
        metrics = evaluate(model, val_loader, num_classes, device)
    summary = {"method": cfg.method, "split": cfg.val_split, "miou": metrics["miou"],
               "pixel_accuracy": metrics["pixel_accuracy"], "seconds": elapsed,
               "metrics": metrics, "class_names": list(train_set.class_names),
               "config": dataclasses.asdict(cfg), "history": history}
    if cfg.crf:
        crf_start = time.perf_counter()
        summary["crf"] = evaluate(model, val_loader, num_classes, device, crf=CRFParams())
        summary["crf"]["seconds"] = time.perf_counter() - crf_start
        log(f"{cfg.method} with the dense CRF: val mIoU {summary['crf']['miou']:.3f}")
    if report:
        write_report(out / "report", summary, model, val_set, device)
    return summary


def _refinement_set(model: nn.Module, train_set: Dataset, out: Path, device: torch.device,
                    cfg: TrainConfig, *, fresh: bool, log: Callable[[str], None]) -> Dataset:
    """The training set relabelled for the refinement stage (:mod:`ccnn.refine`).

    ``fresh``: the stage starts now, so keep the P/Q stage's checkpoint as ``before_refine.pt``,
    label every training image with the model as it is and write the maps to
    ``refine_labels.pt``; otherwise (resumed inside the stage) read them back.
    """
    path = out / REFINE_LABELS
    if not fresh:
        return RelabelledDataset(train_set, load_labels(path))
    replace_atomically(out / BEFORE_REFINE,
                       lambda tmp: shutil.copyfile(out / CHECKPOINT, tmp))
    start = time.perf_counter()
    labels = label_images(model, train_set, device, batch_size=cfg.eval_batch_size,
                          num_workers=cfg.num_workers)
    atomic_save(labels, path)
    log(f"{cfg.method}: refinement labels for {len(labels)} images in "
        f"{time.perf_counter() - start:.1f} s ({path})")
    return RelabelledDataset(train_set, labels)


# settings a resumed run may change: they do not change the weights
_RESUMABLE = ("epochs", "device", "num_workers", "crf", "test_split", "test_size", "overlays")


def _resume(path: Path, cfg: TrainConfig, model: nn.Module, optimizer: torch.optim.Optimizer,
            scheduler: torch.optim.lr_scheduler.LRScheduler) -> tuple[int, float]:
    """Load a checkpoint into the run's objects; returns ``(epochs done, seconds spent)``."""
    if not path.exists():
        raise FileNotFoundError(f"--resume: no checkpoint at {path}")
    state = torch.load(path, map_location="cpu", weights_only=True)
    saved = state["config"]
    defaults = dataclasses.asdict(TrainConfig())  # for settings newer than the checkpoint
    differ = [k for k, v in dataclasses.asdict(cfg).items()
              if k not in _RESUMABLE and saved.get(k, defaults[k]) != v]
    if differ:
        raise ValueError(f"--resume: {path} was written with other settings: "
                         + ", ".join(f"{k}={saved.get(k)!r}" for k in differ))
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    return int(state["epoch"]), float(state["elapsed"])
