"""Weak-label segmentation training: CCNN's alternating P/Q scheme and its baselines.

Laid out like torchvision's segmentation references: :func:`train` runs, in order, the output
folder, data, model, criterion, optimizer and schedule, resume, and the epoch loop of
:func:`train_one_epoch` and :func:`evaluate`; every dependency is an argument.

Methods (:data:`METHODS`):

* ``"ccnn"`` — tags only: foreground, background and suppression constraints (CCNN, §4);
* ``"ccnn-size"`` — plus CCNN's size constraints from per-class sizes;
* ``"mil"`` — MIL-FCN's multi-class MIL loss on tags, no constraints (the baseline CCNN beat);
* ``"full"`` — per-pixel cross-entropy with the masks (the upper bound).

With ``refine_epochs`` a weak-label method adds a refinement stage after its epochs: the
network trains on its own CRF-refined, tag-restricted predictions (:mod:`ccnn.refine`).

Each epoch is seeded from ``(seed, epoch)`` (shuffling, augmentation, dropout), and a checkpoint
is written atomically after it, so ``resume=True`` continues to exactly the weights of an
uninterrupted run.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from ccnn.constraints import BOUND_CONSTANTS, bound_violation, tag_bounds
from ccnn.crf import CRFParams, crf_refine
from ccnn.data import build_dataset
from ccnn.data.transforms import augment, collate, normalize
from ccnn.io import atomic_save, replace_atomically
from ccnn.loss import ConstrainedLoss, mil_loss, pixel_loss
from ccnn.metrics import ConfusionMatrix
from ccnn.models import build_model
from ccnn.progress import ProgressBar
from ccnn.refine import RelabelledDataset, load_labels, pseudo_labels
from ccnn.report import write_report

__all__ = ["METHODS", "Criterion", "TrainConfig", "epoch_generator",
           "evaluate", "load_datasets", "predict_logits", "predict_scores", "split_dataset",
           "train", "train_one_epoch"]

METHODS: tuple[str, ...] = ("ccnn", "ccnn-size", "mil", "full")
CHECKPOINT = "checkpoint.pt"
LOG = "log.jsonl"
REFINE_LABELS = "refine_labels.pt"


@dataclass
class TrainConfig:
    """Everything a training run depends on; saved in its checkpoints.

    ``bounds`` holds keyword arguments of :func:`ccnn.constraints.tag_bounds` (CCNN's constants
    by default); ``dataset_options`` those of the dataset's constructor.  ``train_size`` and
    ``val_size`` set the number of images of the synthetic dataset.  ``refine_epochs`` adds that
    many epochs of the refinement stage (:mod:`ccnn.refine`) after ``epochs``; the schedule
    spans both, unless ``refine_lr`` restarts it for the stage (:func:`lr_factor`).
    """

    method: str = "ccnn"
    dataset: str = "synthetic"
    data_root: str = "data"
    train_split: str = "train"
    val_split: str = "val"
    dataset_options: dict = field(default_factory=dict)
    train_size: int | None = None
    val_size: int | None = None
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
        self._check_bounds()

    def _check_bounds(self) -> None:
        """Refuse unknown constraint constants and out-of-range values before training."""
        unknown = sorted(set(self.bounds) - set(BOUND_CONSTANTS))
        if unknown:
            raise ValueError(f"unknown constraint constant(s) {unknown} in bounds; choose from "
                             f"{', '.join(BOUND_CONSTANTS)}")
        try:  # tag_bounds checks every value; one image with one foreground tag exercises them
            tag_bounds(torch.tensor([[1, 1]]), 2, **self.bounds)
            tag_bounds(torch.tensor([[1, 1]]), 2, sizes=torch.tensor([[0.5, 0.5]]), **self.bounds)
        except ValueError as error:
            raise ValueError(f"bounds: {error}") from None


class Criterion:
    """The loss of a method on a batch, plus what is worth logging about it.

    Every method reports ``violation``: how far the network's own class fractions (the mean of Q
    over pixels) lie outside the tag bounds — the quantity CCNN's constraints push down.  With
    ``pixel_targets`` (the refinement stage, whose masks are pseudo-labels) the method's own loss
    gets the per-pixel cross-entropy with the batch's masks added: for ``ccnn`` and
    ``ccnn-size`` the constraints keep acting while the network fits its refined labels.
    """

    def __init__(self, method: str, num_classes: int, background: int | None, *,
                 bounds: dict | None = None, p_method: str = "newton", p_tol: float = 1e-6,
                 hardness: float = 1.0, pixel_targets: bool = False) -> None:
        if method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {method!r}")
        self.method, self.num_classes, self.background = method, num_classes, background
        self.pixel_targets = pixel_targets
        self.bounds = dict(bounds or {})
        self.constrained = ConstrainedLoss(p_method, p_tol, hardness=hardness)

    def tag_bounds(self, batch: dict) -> tuple[Tensor, Tensor, Tensor]:
        """``lower, upper, slack`` ``(B, L)`` of the batch's tags (and sizes for ``ccnn-size``)."""
        sizes = batch["sizes"] if self.method == "ccnn-size" else None
        return tag_bounds(batch["tags"], self.num_classes, sizes=sizes,
                          background=self.background, **self.bounds)

    def __call__(self, logits: Tensor, batch: dict) -> tuple[Tensor, dict]:
        lower, upper, slack = (t.to(logits.device) for t in self.tag_bounds(batch))
        p_seconds = 0.0
        if self.method in ("ccnn", "ccnn-size"):
            loss = self.constrained(logits, lower, upper, slack)
            p_seconds = self.constrained.last_seconds
        elif self.method == "mil":
            loss = mil_loss(logits, batch["tags"].to(logits.device))
        else:
            loss = pixel_loss(logits, batch["mask"].to(logits.device))
        if self.pixel_targets:
            loss = loss + pixel_loss(logits, batch["mask"].to(logits.device))
        with torch.no_grad():
            fractions = torch.softmax(logits.detach().double(), 1).mean((2, 3))
            violation = bound_violation(fractions, lower, upper).sum(1).mean()
        stats = {"loss": float(loss.detach()), "violation": float(violation),
                 "p_seconds": p_seconds}
        return loss, stats


def epoch_generator(seed: int, epoch: int) -> torch.Generator:
    """The generator of one epoch: shuffling and augmentation depend on ``(seed, epoch)`` only."""
    return torch.Generator().manual_seed(seed * 100_003 + epoch)


def predict_logits(model: nn.Module, images: Tensor) -> Tensor:
    """Logits at the input resolution: the network's coarse output upsampled bilinearly."""
    logits = model(normalize(images))
    return nn.functional.interpolate(logits, size=images.shape[-2:], mode="bilinear",
                                     align_corners=False)


def predict_scores(model: nn.Module, images: Tensor, crf: CRFParams | None = None) -> Tensor:
    """Test-time scores at the input resolution: :func:`predict_logits`, refined by the dense
    CRF (CCNN's test time, :func:`ccnn.crf.crf_refine`) when ``crf`` is given."""
    scores = predict_logits(model, images)
    return scores if crf is None else crf_refine(images, scores, crf)


def train_one_epoch(model: nn.Module, criterion: Criterion, optimizer: torch.optim.Optimizer,
                    scheduler: torch.optim.lr_scheduler.LRScheduler, loader: Iterable[list[dict]],
                    device: torch.device, generator: torch.Generator, cfg: TrainConfig,
                    progress: Callable[[dict], None] | None = None) -> dict:
    """One pass over ``loader`` (lists of samples); returns the epoch's mean statistics."""
    model.train()
    totals = {"loss": 0.0, "violation": 0.0, "p_seconds": 0.0, "step_seconds": 0.0}
    images_seen, batches = 0, 0
    start = time.perf_counter()
    for samples in loader:
        step_start = time.perf_counter()
        batch = collate([augment(s, generator, flip=cfg.flip, scale=cfg.scale, crop=cfg.crop)
                         for s in samples])
        logits = model(normalize(batch["image"].to(device)))
        loss, stats = criterion(logits, batch)
        if not math.isfinite(stats["loss"]):
            raise FloatingPointError(f"the loss became {stats['loss']}: lower --lr")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        stats["step_seconds"] = time.perf_counter() - step_start
        for key in totals:
            totals[key] += stats[key]
        images_seen += len(samples)
        batches += 1
        if progress is not None:
            progress({"loss": stats["loss"], "violation": stats["violation"],
                      "images_per_second": images_seen / (time.perf_counter() - start)})
    means = {key: value / max(batches, 1) for key, value in totals.items()}
    means["images_per_second"] = images_seen / (time.perf_counter() - start)
    means["p_step_share"] = means["p_seconds"] / max(means["step_seconds"], 1e-12)
    return means


@torch.no_grad()
def evaluate(model: nn.Module, loader: Iterable[dict], num_classes: int,
             device: torch.device, crf: CRFParams | None = None) -> dict:
    """mIoU, per-class IoU and pixel accuracy at full resolution over collated batches.

    With ``crf`` the upsampled scores are refined by the dense CRF first (CCNN's test time).
    """
    model.eval()
    cm = ConfusionMatrix(num_classes)
    for batch in loader:
        scores = predict_scores(model, batch["image"].to(device), crf)
        cm.update(scores.argmax(1).cpu(), batch["mask"])
    return cm.compute()


def _make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum,
                               weight_decay=cfg.weight_decay)
    return torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)


def poly(step: int, total: int) -> float:
    """DeepLab's "poly" learning-rate factor ``(1 − step/total)^0.9`` (0 from ``total`` on)."""
    return max(1.0 - step / total, 0.0) ** 0.9


def lr_factor(cfg: TrainConfig, steps_per_epoch: int) -> Callable[[int], float]:
    """The learning rate after ``step`` optimizer steps, as a multiple of ``cfg.lr``.

    ``"poly"`` decays by :func:`poly` over the whole run, refinement stage included;
    ``"constant"`` keeps 1.  With ``cfg.refine_lr`` the refinement stage has a schedule of its
    own: it restarts at ``refine_lr`` and decays (``"poly"``) to zero over its own steps, while
    the P/Q epochs keep the factors they have without it.
    """
    def decay(step: int, total: int) -> float:
        return 1.0 if cfg.schedule == "constant" else poly(step, total)

    total = (cfg.epochs + cfg.refine_epochs) * steps_per_epoch
    if cfg.refine_lr is None or cfg.refine_epochs == 0:
        return lambda step: decay(step, total)
    first, stage = cfg.epochs * steps_per_epoch, cfg.refine_epochs * steps_per_epoch
    scale = cfg.refine_lr / cfg.lr
    return lambda step: decay(step, total) if step < first else scale * decay(step - first, stage)


def split_dataset(cfg: TrainConfig, split: str, size: int | None = None) -> Dataset:
    """One split of the configuration's dataset; ``size`` images (synthetic data only)."""
    options = dict(cfg.dataset_options)
    if size is not None:
        if cfg.dataset != "synthetic":
            raise ValueError("train_size and val_size apply to the synthetic dataset only")
        options["size"] = size
    return build_dataset(cfg.dataset, split, cfg.data_root, seed=cfg.seed, **options)


def load_datasets(cfg: TrainConfig) -> tuple[Dataset, Dataset]:
    """The training and validation datasets a configuration names."""
    return (split_dataset(cfg, cfg.train_split, cfg.train_size),
            split_dataset(cfg, cfg.val_split, cfg.val_size))


def _read_log(path: Path, upto_epoch: int) -> list[dict]:
    """The log's records of the epochs before ``upto_epoch`` (a resumed run rewrites the rest)."""
    if not path.exists():
        return []
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in records if r["epoch"] < upto_epoch]


def train(cfg: TrainConfig, out: str | Path, *, resume: bool = False,
          datasets: tuple[Dataset, Dataset] | None = None, report: bool = True,
          progress_bar: bool = True, log: Callable[[str], None] = print) -> dict:
    """Train one method; returns the final validation metrics and timings.

    Writes into ``out``: ``checkpoint.pt`` after each epoch (atomically), ``log.jsonl`` (one
    record per epoch) and, when ``report``, the ``report/`` folder of :mod:`ccnn.report`.

    Args:
        cfg: the run's configuration.
        out: output folder (created).
        resume: continue from ``out/checkpoint.pt``; its configuration must match ``cfg``.
        datasets: prebuilt ``(train, val)`` datasets (the demo shares them between methods).
        report: write the report folder at the end.
        progress_bar: show a progress bar per epoch.
        log: where one-line messages go.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)
    device = torch.device(cfg.device)
    train_set, val_set = datasets if datasets is not None else load_datasets(cfg)
    num_classes = train_set.num_classes

    model = build_model(cfg.model, num_classes, backbone_weights=cfg.backbone_weights).to(device)
    criteria = {pixel: Criterion(cfg.method, num_classes, train_set.background,
                                 bounds=cfg.bounds, p_method=cfg.p_method, p_tol=cfg.p_tol,
                                 hardness=cfg.hardness, pixel_targets=pixel)
                for pixel in (False, True)}
    optimizer = _make_optimizer(model, cfg)
    steps_per_epoch = math.ceil(len(train_set) / cfg.batch_size)
    total_epochs = cfg.epochs + cfg.refine_epochs
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor(cfg, steps_per_epoch))

    start_epoch, elapsed = 0, 0.0
    checkpoint_path = out / CHECKPOINT
    if resume:
        start_epoch, elapsed = _resume(checkpoint_path, cfg, model, optimizer, scheduler)
        log(f"resumed from {checkpoint_path} after epoch {start_epoch}")
    history = _read_log(out / LOG, start_epoch)
    text = "".join(json.dumps(r) + "\n" for r in history)
    replace_atomically(out / LOG, lambda tmp: tmp.write_text(text))

    val_loader = DataLoader(val_set, batch_size=cfg.eval_batch_size, collate_fn=collate,
                            num_workers=cfg.num_workers)
    metrics, epoch_set = None, train_set
    for epoch in range(start_epoch, total_epochs):
        epoch_start = time.perf_counter()
        refining = epoch >= cfg.epochs
        if refining and epoch_set is train_set:
            epoch_set = _refinement_set(model, train_set, out / REFINE_LABELS, device, cfg,
                                        fresh=epoch == cfg.epochs, log=log)
        generator = epoch_generator(cfg.seed, epoch)
        torch.manual_seed(cfg.seed * 100_003 + epoch)  # dropout and any other global draws
        loader = DataLoader(epoch_set, batch_size=cfg.batch_size, shuffle=True,
                            generator=generator, collate_fn=list, num_workers=cfg.num_workers)
        title = f"{cfg.method}{' refine' if refining else ''} epoch {epoch + 1}/{total_epochs}"
        with ProgressBar(progress_bar, len(loader), title) as bar:
            stats = train_one_epoch(model, criteria[refining], optimizer, scheduler, loader,
                                    device, generator, cfg, bar)
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

    if metrics is None:  # resumed after the last epoch: nothing evaluated yet
        metrics = evaluate(model, val_loader, num_classes, device)
    summary = {"method": cfg.method, "miou": metrics["miou"],
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


def _refinement_set(model: nn.Module, train_set: Dataset, path: Path, device: torch.device,
                    cfg: TrainConfig, *, fresh: bool, log: Callable[[str], None]) -> Dataset:
    """The training set relabelled for the refinement stage (:mod:`ccnn.refine`).

    ``fresh``: the stage starts now, so label every training image with the model as it is and
    write the maps to ``path``; otherwise (resumed inside the stage) read them back.
    """
    if not fresh:
        return RelabelledDataset(train_set, load_labels(path))
    start = time.perf_counter()
    model.eval()
    labels = {}
    loader = DataLoader(train_set, batch_size=cfg.eval_batch_size, collate_fn=collate,
                        num_workers=cfg.num_workers)
    with torch.no_grad():
        for batch in loader:
            images = batch["image"].to(device)
            maps = pseudo_labels(predict_logits(model, images), images, batch["tags"],
                                 train_set.background).cpu()
            for name, (height, width), label in zip(batch["name"], batch["shape"], maps,
                                                    strict=True):
                labels[name] = label[:height, :width].clone()
    atomic_save(labels, path)
    log(f"{cfg.method}: refinement labels for {len(labels)} images in "
        f"{time.perf_counter() - start:.1f} s ({path})")
    return RelabelledDataset(train_set, labels)


def _resume(path: Path, cfg: TrainConfig, model: nn.Module, optimizer: torch.optim.Optimizer,
            scheduler: torch.optim.lr_scheduler.LRScheduler) -> tuple[int, float]:
    """Load a checkpoint into the run's objects; returns ``(epochs done, seconds spent)``."""
    if not path.exists():
        raise FileNotFoundError(f"--resume: no checkpoint at {path}")
    state = torch.load(path, map_location="cpu", weights_only=True)
    saved = state["config"]
    defaults = dataclasses.asdict(TrainConfig())  # for settings newer than the checkpoint
    differ = [k for k, v in dataclasses.asdict(cfg).items()
              if k not in ("epochs", "device", "num_workers", "crf")
              and saved.get(k, defaults[k]) != v]
    if differ:
        raise ValueError(f"--resume: {path} was written with other settings: "
                         + ", ".join(f"{k}={saved.get(k)!r}" for k in differ))
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    return int(state["epoch"]), float(state["elapsed"])
