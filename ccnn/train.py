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

Launched by ``torchrun`` or ``ccnn train --nproc N`` (:func:`train_process`), a run trains on
several processes with DistributedDataParallel (:mod:`ccnn.distributed`): ``batch_size`` is the
global batch, rank 0 logs and writes, and an elastic restart of the same job resumes from the
last checkpoint.

Faults (docs/training.md, "Faults and bad input"): a NaN or infinite loss or gradient stops the
run with :class:`ccnn.engine.NonFiniteError` naming the epoch and the step, the last good
checkpoint left as it was; images whose P-step did not converge are counted per epoch
(``p_unconverged`` in the log); a folder that already holds a run is refused
(:class:`RunExistsError`) unless the run is resumed or ``overwrite`` is given.
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
from torch import Tensor, nn
from torch.utils.data import Dataset

from ccnn.constraints import BOUND_OPTIONS
from ccnn.crf import CRFParams
from ccnn.criteria import METHODS, Criterion, build_criterion
from ccnn.data import build_dataset
from ccnn.data.transforms import Augmentation
from ccnn.distributed import World, process_group, shard, wrap_model
from ccnn.engine import (
    NonFiniteError,
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
from ccnn.loss import ConstrainedLoss
from ccnn.models import build_model
from ccnn.progress import ProgressBar, on_terminal
from ccnn.refine import RelabelledDataset, label_images, load_labels
from ccnn.report import write_report

__all__ = ["BEFORE_REFINE", "CHECKPOINT", "LOG", "METHODS", "REFINE_LABELS", "RUN_FILES",
           "RunExistsError", "TrainConfig", "check_out_folder", "load_datasets",
           "load_test_set", "lr_factor", "predict_logits", "read_checkpoint", "split_dataset",
           "train", "train_process"]

logger = logging.getLogger(__name__)

CHECKPOINT = "checkpoint.pt"
LOG = "log.jsonl"
REFINE_LABELS = "refine_labels.pt"
BEFORE_REFINE = "before_refine.pt"  # the checkpoint after the last P/Q epoch
REPORT = "report"
# what a run writes into its folder (``overwrite`` removes them)
RUN_FILES = (CHECKPOINT, LOG, REFINE_LABELS, BEFORE_REFINE, REPORT)


class RunExistsError(ValueError):
    """The output folder already holds a run's checkpoint, and the new run was neither told to
    resume it nor to overwrite it."""


@dataclass
class TrainConfig:
    """Everything a training run depends on; saved in its checkpoints.

    ``bounds`` holds keyword arguments of :func:`ccnn.constraints.tag_bounds` (CCNN's constants
    by default, and ``small_rule``); ``dataset_options`` those of the dataset's constructor.
    ``train_size``, ``val_size`` and ``test_size`` set the number of images of the synthetic
    dataset's splits.  ``refine_epochs`` adds that many epochs of the refinement stage
    (:mod:`ccnn.refine`) after ``epochs``; the schedule spans both, unless ``refine_lr``
    restarts it for the stage (:func:`lr_factor`); ``refine_sizes`` keeps the size methods' size
    bounds in it (by default it uses the tags alone).  ``test_split`` is where reports are made
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
    refine_sizes: bool = False  # the size methods keep their size bounds in the refinement stage
    skip_bad: bool = False  # leave out the samples of unreadable files (ccnn.data.build_dataset)

    def __post_init__(self) -> None:
        self.scale = tuple(self.scale)
        checks = [
            (self.method in METHODS, f"method must be one of {METHODS}, got {self.method!r}"),
            (self.epochs >= 1, f"epochs must be at least 1, got {self.epochs}"),
            (self.batch_size >= 1, f"batch_size must be at least 1, got {self.batch_size}"),
            (_finite(self.lr) and self.lr > 0, f"lr must be positive and finite, got "
                                                f"{self.lr}"),
            (_finite(self.momentum) and 0 <= self.momentum <= 1,
             f"momentum must lie in [0, 1], got {self.momentum}"),
            (_finite(self.p_tol) and self.p_tol > 0,
             f"p_tol must be positive and finite, got {self.p_tol}"),
            (_finite(self.hardness) and self.hardness > 0,
             f"hardness must be positive and finite, got {self.hardness}"),
            (all(_finite(v) for v in self.scale), f"scale must be finite, got {self.scale}"),
            (self.eval_batch_size >= 1,
             f"eval_batch_size must be at least 1, got {self.eval_batch_size}"),
            (self.num_workers >= 0, f"num_workers must be >= 0, got {self.num_workers}"),
            (self.overlays >= 0, f"overlays must be >= 0, got {self.overlays}"),
            (self.seed >= 0, f"seed must be an integer >= 0, got {self.seed}"),
            (_device_name_ok(self.device), f"device must be cpu, cuda or cuda:N (or another "
                                           f"torch device), got {self.device!r}"),
            (all(n is None or n >= 1 for n in (self.train_size, self.val_size, self.test_size)),
             f"train_size, val_size and test_size must be at least 1, got {self.train_size}, "
             f"{self.val_size}, {self.test_size}"),
            (self.optimizer in ("sgd", "adam"), f"optimizer must be sgd or adam, got "
                                                f"{self.optimizer!r}"),
            (self.schedule in ("poly", "constant"), f"schedule must be poly or constant, got "
                                                    f"{self.schedule!r}"),
            (_finite(self.weight_decay) and self.weight_decay >= 0,
             f"weight_decay must be finite and >= 0, got {self.weight_decay}"),
            (self.refine_epochs >= 0, f"refine_epochs must be >= 0, got {self.refine_epochs}"),
            (self.refine_lr is None or (_finite(self.refine_lr) and self.refine_lr > 0),
             f"refine_lr must be positive and finite, got {self.refine_lr}"),
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
                criterion.refinement(self.refine_sizes).bounds(batch)
        except ValueError as error:
            raise ValueError(f"bounds: {error}") from None

    def criterion(self, num_classes: int, background: int | None) -> Criterion:
        """The method's criterion (:func:`ccnn.criteria.build_criterion`) with these settings."""
        return build_criterion(self.method, num_classes, background, bounds=self.bounds,
                               p_method=self.p_method, p_tol=self.p_tol, hardness=self.hardness)

    def augmentation(self) -> Augmentation:
        """The training images' random flip, scale and crop."""
        return Augmentation(self.flip, self.scale, self.crop)


def _device_name_ok(name: object) -> bool:
    """Whether ``name`` names a torch device (not whether this machine has it)."""
    try:
        torch.device(name)  # type: ignore[arg-type]
    except (RuntimeError, TypeError, ValueError):
        return False
    return True


def _run_device(cfg: TrainConfig, world: World) -> torch.device:
    """The device this process trains on: the process group's, or the configuration's, which
    this machine must have."""
    device = world.device or torch.device(cfg.device)
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ValueError(f"device {cfg.device!r}: no CUDA GPU is available")
        if device.index is not None and device.index >= count:
            raise ValueError(f"device {cfg.device!r}: this machine has {count} GPU(s)")
    return device


def _finite(value: object) -> bool:
    """A real number, not NaN or infinite."""
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


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
    return build_dataset(cfg.dataset, split, cfg.data_root, seed=cfg.seed,
                         skip_bad=cfg.skip_bad, **options)


def load_datasets(cfg: TrainConfig) -> tuple[Dataset, Dataset]:
    """The training and validation datasets a configuration names."""
    return (split_dataset(cfg, cfg.train_split, cfg.train_size),
            split_dataset(cfg, cfg.val_split, cfg.val_size))


def load_test_set(cfg: TrainConfig) -> Dataset:
    """The dataset reports are made on: ``cfg.test_split`` (never used in training)."""
    return split_dataset(cfg, cfg.test_split, cfg.test_size)


def _read_log(path: Path, upto_epoch: int) -> list[dict]:
    """The log's records of the epochs before ``upto_epoch`` (a resumed run rewrites the rest);
    a line cut short by a crash is left out."""
    if not path.exists():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return [r for r in records if r.get("epoch", math.inf) < upto_epoch]


def _write_log(path: Path, history: list[dict]) -> None:
    """The whole log, one record per line, replaced atomically."""
    text = "".join(json.dumps(r) + "\n" for r in history)
    replace_atomically(path, lambda tmp: tmp.write_text(text))


def read_checkpoint(path: str | Path, what: str = "checkpoint") -> dict:
    """A training checkpoint's entries; an unreadable file or one that is not a ``ccnn train``
    checkpoint raises ``ValueError`` naming it (``what`` starts the message), a missing one
    ``FileNotFoundError``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what}: no checkpoint at {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises several types for a file that is not a checkpoint
        raise ValueError(f"{what}: {path} is not a readable ccnn checkpoint "
                         f"({type(err).__name__}: {err})") from None
    keys = {"model", "config", "num_classes"}
    if not isinstance(state, dict) or not keys <= state.keys():
        raise ValueError(f"{what}: {path} is not a ccnn training checkpoint (no "
                         f"{'/'.join(sorted(keys))} entries)")
    return state


def check_out_folder(out: str | Path, *, resume: bool, overwrite: bool) -> None:
    """Refuse to start a new run in a folder that already holds one.

    Raises:
        RunExistsError: ``out`` holds a checkpoint and neither ``resume`` nor ``overwrite``.
        ValueError: both ``resume`` and ``overwrite``, or ``out`` is a file.
    """
    out = Path(out)
    if resume and overwrite:
        raise ValueError("--resume continues the run in the folder, --overwrite replaces it: "
                         "give one of them")
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file, not a folder")
    if not resume and not overwrite and (out / CHECKPOINT).exists():
        raise RunExistsError(f"{out} already holds a run ({out / CHECKPOINT}); pass --resume "
                             f"to continue it or --overwrite to replace it, or choose another "
                             f"--out")


def _clear_run(out: Path) -> None:
    """Remove what an earlier run wrote into ``out`` (:data:`RUN_FILES`)."""
    for name in RUN_FILES:
        path = out / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()


def _start(out: Path, cfg: TrainConfig, world: World, *, resume: bool,
           overwrite: bool) -> dict | None:
    """Rank 0's decision how the run starts: the checkpoint state to resume from, or ``None``
    for a fresh start.  Reads only: the folder is prepared once the run is set up
    (:func:`_prepare_folder`), so bad input leaves it as it was.

    An elastic restart (``world.restart > 0``) resumes from a checkpoint its own job wrote
    (``world.token``), so an interrupted job continues without ``--resume``; a foreign run's
    checkpoint is still refused.
    """
    checkpoint = out / CHECKPOINT
    if resume:
        return read_checkpoint(checkpoint, "--resume")
    if world.restart > 0 and world.token is not None and checkpoint.exists():
        state = read_checkpoint(checkpoint, "elastic restart")
        if state.get("run") == world.token:
            return state
    check_out_folder(out, resume=False, overwrite=overwrite)
    return None


def _prepare_folder(out: Path, history: list[dict], *, fresh: bool, overwrite: bool) -> None:
    """Create ``out``; for a fresh run with ``overwrite`` remove an earlier run's files (an
    elastic restart that resumes is not fresh); write the log kept so far."""
    out.mkdir(parents=True, exist_ok=True)
    if fresh and overwrite:
        _clear_run(out)
    _write_log(out / LOG, history)


class _PStepCounter:
    """Counts the images whose P-step did not reach its tolerance, through a forward hook on
    every :class:`ccnn.loss.ConstrainedLoss` of the criteria (their own, or their base's)."""

    def __init__(self, criteria: Sequence[Criterion | None]) -> None:
        self.count, self.hooked = 0, False
        seen: set[int] = set()
        for criterion in criteria:
            for holder in (criterion, getattr(criterion, "base", None)):
                loss = getattr(holder, "constrained", None)
                if isinstance(loss, ConstrainedLoss) and id(loss) not in seen:
                    seen.add(id(loss))
                    loss.register_forward_hook(self._hook)
                    self.hooked = True

    def _hook(self, module: nn.Module, inputs: tuple, output: object) -> None:
        converged = getattr(getattr(output, "latent", None), "converged", None)
        if isinstance(converged, Tensor):
            self.count += int((~converged).sum())

    def wrap(self, criterion: Callable[[Tensor, dict], tuple[Tensor, dict]]
             ) -> Callable[[Tensor, dict], tuple[Tensor, dict]]:
        """``criterion`` whose statistics add ``p_unconverged``: this batch's count (``criterion``
        itself for a method without a P-step)."""
        if not self.hooked:
            return criterion

        def counted(logits: Tensor, batch: dict) -> tuple[Tensor, dict]:
            before = self.count
            loss, stats = criterion(logits, batch)
            return loss, {**stats, "p_unconverged": float(self.count - before)}

        return counted


def _check_world(cfg: TrainConfig, train_images: int, world: World) -> None:
    """Every process needs an image of every step's first batch."""
    if not world.distributed:
        return
    if cfg.batch_size < world.size:
        raise ValueError(f"batch_size {cfg.batch_size} is smaller than the {world.size} "
                         f"processes: --batch-size is the global batch, split between them")
    if train_images < world.size:
        raise ValueError(f"the training split has {train_images} images, fewer than the "
                         f"{world.size} processes")


def _skipped(*datasets: Dataset) -> dict[str, list[str]]:
    """The files each split's dataset left out (``skip_bad``), by split name."""
    out: dict[str, list[str]] = {}
    for name, dataset in zip(("train", "val"), datasets, strict=False):
        skipped = getattr(dataset, "skipped", None) or []
        if skipped:
            out[name] = [str(p) for p in skipped]
    return out


def train(cfg: TrainConfig, out: str | Path, *, resume: bool = False, overwrite: bool = True,
          datasets: Sequence[Dataset] | None = None, report: bool = True,
          progress_bar: bool = True, log: Callable[[str], None] | None = None,
          world: World | None = None) -> dict:
    """Train one method; returns the final validation metrics and timings.

    Writes into ``out``: ``log.jsonl`` (one record per epoch) and ``checkpoint.pt`` after each
    epoch (both atomically, the log first), with a refinement stage ``before_refine.pt`` (the
    checkpoint after the last P/Q epoch) and ``refine_labels.pt``, and, when ``report``, the
    ``report/`` folder of :mod:`ccnn.report` (on the validation split).

    Args:
        cfg: the run's configuration.
        out: output folder (created).
        resume: continue from ``out/checkpoint.pt``; its configuration must match ``cfg``.
        overwrite: when ``out`` already holds a run (a checkpoint) and ``resume`` is not given,
            remove its files (:data:`RUN_FILES`) and start afresh; ``False`` refuses with
            :class:`RunExistsError`, touching nothing (the command line's default).
        datasets: prebuilt ``(train, val)`` datasets (the demo shares them between methods).
        report: write the report folder at the end.
        progress_bar: show a progress bar per epoch when standard error is a terminal.
        log: where one-line messages go (default: this module's logger, level INFO).
        world: this process's place in a distributed run (:func:`train_process`); rank 0 logs
            and writes, every process returns the summary.

    Raises:
        ccnn.engine.NonFiniteError: a NaN or infinite loss or gradient; the message names the
            epoch and the step, and ``out`` keeps the checkpoint of the last finished epoch.
    """
    world = world or World()
    log = (log or logger.info) if world.main else _silent
    out = Path(out)
    checkpoint_path = out / CHECKPOINT
    device = _run_device(cfg, world)
    state = world.agree(lambda: _start(out, cfg, world, resume=resume, overwrite=overwrite))

    # data
    train_set, val_set = datasets if datasets is not None else load_datasets(cfg)
    num_classes = train_set.num_classes
    _check_world(cfg, len(train_set), world)
    skipped = _skipped(train_set, val_set)
    if skipped:
        log(f"--skip-bad: left out the samples of {sum(map(len, skipped.values()))} unreadable "
            f"file(s): " + "; ".join(f"{k} {len(v)}" for k, v in skipped.items()))
    augmentation = cfg.augmentation()
    val_loader = eval_loader(val_set, cfg.eval_batch_size, num_workers=cfg.num_workers,
                             world=world)

    # model: built alike in every process, then (distributed) synchronised batch norm and DDP
    with seeded(cfg.seed, device):
        model = build_model(cfg.model, num_classes, backbone_weights=cfg.backbone_weights)
    model.to(device)
    net = wrap_model(model, world)

    # criterion: constraints, P-step and loss (the refinement stage's from the tags alone, unless
    # refine_sizes)
    criterion = cfg.criterion(num_classes, train_set.background)
    refinement = criterion.refinement(cfg.refine_sizes) if cfg.refine_epochs else None
    criteria = {False: criterion, True: refinement}
    counter = _PStepCounter(list(criteria.values()))

    # optimizer and schedule
    optimizer = _make_optimizer(model, cfg)
    steps_per_epoch = math.ceil(len(train_set) / cfg.batch_size)
    total_epochs = cfg.epochs + cfg.refine_epochs
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor(cfg, steps_per_epoch))

    # resume
    start_epoch, elapsed = 0, 0.0
    if state is not None:
        start_epoch, elapsed = _resume(state, checkpoint_path, cfg, num_classes, model,
                                       optimizer, scheduler)
        how = "resumed" if resume else f"elastic restart {world.restart}: resumed"
        log(f"{how} from {checkpoint_path} after epoch {start_epoch}")
    history = world.agree(lambda: [] if state is None else _read_log(out / LOG, start_epoch))
    if world.main:
        _prepare_folder(out, history, fresh=state is None, overwrite=overwrite)

    # epochs: P/Q (or the baseline's loss), then the refinement stage
    metrics, epoch_set = None, train_set
    for epoch in range(start_epoch, total_epochs):
        epoch_start = time.perf_counter()
        refining = epoch >= cfg.epochs
        if refining and epoch_set is train_set:
            epoch_set = _refinement_set(model, train_set, out, device, cfg,
                                        fresh=epoch == cfg.epochs, log=log, world=world)
        loader = training_loader(epoch_set, cfg.batch_size, augmentation,
                                 epoch_generator(cfg.seed, epoch), num_workers=cfg.num_workers,
                                 world=world)
        title = f"{cfg.method}{' refine' if refining else ''} epoch {epoch + 1}/{total_epochs}"
        dropout_seed = cfg.seed * 100_003 + epoch + 1_000_003 * world.rank
        try:
            with (ProgressBar(on_terminal(progress_bar) and world.main, len(loader),
                              title) as bar,
                  seeded(dropout_seed, device)):  # dropout's draws
                stats = train_one_epoch(net, counter.wrap(criteria[refining]), optimizer,
                                        scheduler, loader, device, progress=bar, world=world,
                                        epoch=epoch)
        except NonFiniteError as err:
            kept = (f"{checkpoint_path} keeps epoch {epoch}" if epoch > 0 or state is not None
                    else "no checkpoint was written")
            raise NonFiniteError(f"{cfg.method}: {err}; the run stopped ({kept})") from None
        metrics = evaluate(model, val_loader, num_classes, device, world=world)
        elapsed += time.perf_counter() - epoch_start
        record = {"epoch": epoch, "stage": "refine" if refining else "train", **stats,
                  "lr": scheduler.get_last_lr()[0],
                  "val_miou": metrics["miou"], "val_pixel_accuracy": metrics["pixel_accuracy"],
                  "seconds": elapsed}
        if "p_unconverged" in record:
            record["p_unconverged"] = int(record["p_unconverged"])
        history.append(record)
        _check_weights(model, cfg, epoch)  # every process: they hold the same weights
        if world.main:
            _write_log(out / LOG, history)  # first: a record past the checkpoint is dropped
            atomic_save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                         "scheduler": scheduler.state_dict(), "epoch": epoch + 1,
                         "elapsed": elapsed, "config": dataclasses.asdict(cfg),
                         "num_classes": num_classes, "class_names": list(train_set.class_names),
                         "palette": train_set.palette.tolist(), "run": world.token,
                         "world_size": world.size}, checkpoint_path)
        unconverged = int(stats.get("p_unconverged", 0))
        note = (f"; the P-step did not converge on {unconverged} image(s)" if unconverged
                else "")
        log(f"{title}: loss {stats['loss']:.4f}, "
            f"violation {stats['violation']:.4f}, val mIoU {metrics['miou']:.3f}{note}")

    # final validation metrics and the report
    if metrics is None:  # resumed after the last epoch: nothing evaluated yet
        metrics = evaluate(model, val_loader, num_classes, device, world=world)
    summary = {"method": cfg.method, "split": cfg.val_split, "miou": metrics["miou"],
               "pixel_accuracy": metrics["pixel_accuracy"], "seconds": elapsed,
               "metrics": metrics, "class_names": list(train_set.class_names),
               "config": dataclasses.asdict(cfg), "history": history,
               "processes": world.size}
    if skipped:
        summary["skipped"] = skipped
    if cfg.crf:
        crf_start = time.perf_counter()
        summary["crf"] = evaluate(model, val_loader, num_classes, device, crf=CRFParams(),
                                  world=world)
        summary["crf"]["seconds"] = time.perf_counter() - crf_start
        log(f"{cfg.method} with the dense CRF: val mIoU {summary['crf']['miou']:.3f}")
    if report and world.main:
        write_report(out / REPORT, summary, model, val_set, device)
    world.barrier()  # the report is written before any process leaves
    return summary


def _silent(message: str) -> None:
    """The log of the processes other than rank 0."""


def _check_weights(model: nn.Module, cfg: TrainConfig, epoch: int) -> None:
    """Refuse to checkpoint non-finite weights (the gradients are checked every step, so this
    only catches what an optimizer made of finite ones)."""
    for name, value in model.state_dict().items():
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            raise NonFiniteError(f"{cfg.method}: {name} became non-finite in epoch {epoch + 1}; "
                                 f"the run stopped, the checkpoint keeps epoch {epoch}: lower "
                                 f"--lr")


def train_process(cfg: TrainConfig, out: str | Path, resume: bool = False,
                  overwrite: bool = False, progress_bar: bool = True) -> dict | None:
    """One process of a run launched by ``torchrun`` or ``ccnn train --nproc``: joins the
    process group (:func:`ccnn.distributed.process_group`), trains, and returns the summary on
    rank 0 (``None`` elsewhere).  Only rank 0's messages are logged; a process the launcher
    spawned (no logging set up) logs to standard error as the command line does."""
    root = logging.getLogger()
    if not root.handlers:
        logging.basicConfig(level=logging.WARNING, format="%(message)s")
        logging.getLogger("ccnn").setLevel(logging.INFO)
    with process_group(cfg.device) as world:
        if not world.main:
            logging.getLogger("ccnn").setLevel(logging.ERROR)
        summary = train(cfg, out, resume=resume, overwrite=overwrite,
                        progress_bar=progress_bar, world=world)
    return summary if world.main else None


def _refinement_set(model: nn.Module, train_set: Dataset, out: Path, device: torch.device,
                    cfg: TrainConfig, *, fresh: bool, log: Callable[[str], None],
                    world: World) -> Dataset:
    """The training set relabelled for the refinement stage (:mod:`ccnn.refine`).

    ``fresh``: the stage starts now, so keep the P/Q stage's checkpoint as ``before_refine.pt``,
    label every training image with the model as it is and write the maps to
    ``refine_labels.pt``; otherwise (resumed inside the stage) read them back.  Distributed,
    each process labels its share of the images and every process gets all the maps; rank 0
    writes and reads the files.
    """
    path = out / REFINE_LABELS
    if not fresh:
        return RelabelledDataset(train_set, world.agree(lambda: load_labels(path)))
    if world.main:
        replace_atomically(out / BEFORE_REFINE,
                           lambda tmp: shutil.copyfile(out / CHECKPOINT, tmp))
    start = time.perf_counter()
    labels = label_images(model, shard(train_set, cfg.eval_batch_size, world), device,
                          batch_size=cfg.eval_batch_size, num_workers=cfg.num_workers)
    if world.distributed:
        labels = {name: label for part in world.gather(labels) for name, label in part.items()}
    if world.main:
        atomic_save(labels, path)
    log(f"{cfg.method}: refinement labels for {len(labels)} images in "
        f"{time.perf_counter() - start:.1f} s ({path})")
    return RelabelledDataset(train_set, labels)


# settings a resumed run may change: they do not change the weights
_RESUMABLE = ("epochs", "device", "num_workers", "crf", "test_split", "test_size", "overlays",
              "skip_bad")


def _resume(state: dict, path: Path, cfg: TrainConfig, num_classes: int, model: nn.Module,
            optimizer: torch.optim.Optimizer,
            scheduler: torch.optim.lr_scheduler.LRScheduler) -> tuple[int, float]:
    """Load a checkpoint's state into the run's objects; returns ``(epochs done, seconds
    spent)``."""
    saved = state["config"]
    defaults = dataclasses.asdict(TrainConfig())  # for settings newer than the checkpoint
    differ = [k for k, v in dataclasses.asdict(cfg).items()
              if k not in _RESUMABLE and saved.get(k, defaults[k]) != v]
    if differ:
        raise ValueError(f"--resume: {path} was written with other settings: "
                         + ", ".join(f"{k}={saved.get(k)!r}" for k in differ))
    if state["num_classes"] != num_classes:
        raise ValueError(f"--resume: {path} has {state['num_classes']} classes, the dataset "
                         f"{num_classes}")
    try:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
    except (RuntimeError, KeyError, ValueError) as err:
        raise ValueError(f"--resume: {path} does not fit the {cfg.model} network with "
                         f"{num_classes} classes: {str(err).splitlines()[0]}") from None
    return int(state["epoch"]), float(state["elapsed"])
