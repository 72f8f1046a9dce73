"""Backbone pretraining on image-level labels: the stand-in for ImageNet.

CCNN (Pathak, Krähenbühl and Darrell, "Constrained Convolutional Neural Networks for Weakly
Supervised Segmentation", 2015) starts its segmentation network from VGG16 trained to classify
ImageNet: image-level labels on a separate, larger set of images, whose features already tell
objects apart.  :func:`pretrain` builds such a starting point for the small network, through the
network's features, global pooling (max or average, :data:`SOURCE_DEFAULTS`) and a linear
layer, from one of two sources:

* ``dataset="synthetic"`` (the default, the demo's): single-object images of a separate split of
  the built-in generator (``"pretrain"``, never used for segmentation), classified by their
  shape with softmax cross-entropy (:class:`ShapeCriterion`);
* ``dataset="voc"`` or ``"camvid"``: the dataset's own training split, from its image-level
  tags only — multi-label classification with a binary cross-entropy per class
  (:class:`MultiLabelCriterion`), the background left out — so that a new domain without a
  fitting ImageNet-like backbone gets one from its own tags.  Validation reports the mean
  average precision of the tags (:func:`average_precision`), the per-tag accuracy and the share
  of images whose tags are all right.

Only image-level labels are used either way, so the weak-label methods stay weakly supervised;
``full`` starts from the same file.  The epochs are :func:`ccnn.engine.train_one_epoch` with the
poly schedule of :func:`ccnn.engine.lr_schedule` and random flips.

The file it writes holds the network's ``features`` weights under ``state_dict`` (what
``--backbone-weights`` reads, see :class:`ccnn.models.SmallSegNet`), the classifier head, the
validation accuracy, the validation metrics and the configuration.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, Subset

from ccnn.data import build_dataset
from ccnn.data.synthetic import SyntheticShapes
from ccnn.data.transforms import Augmentation, normalize
from ccnn.engine import (
    epoch_generator,
    eval_loader,
    lr_schedule,
    seeded,
    train_one_epoch,
    training_loader,
)
from ccnn.io import atomic_save
from ccnn.models import SmallSegNet
from ccnn.progress import ProgressBar, on_terminal

__all__ = ["LOSSES", "POOLS", "PRETRAIN_DATASETS", "SOURCE_DEFAULTS", "MultiLabelCriterion",
           "PretrainConfig", "ShapeCriterion", "average_precision", "pretrain", "tag_columns",
           "tag_metrics"]

logger = logging.getLogger(__name__)

PRETRAIN_DATASETS: tuple[str, ...] = ("synthetic", "voc", "camvid")
# The settings whose default depends on the labels' source: the synthetic shapes (chosen on the
# tuning seeds' pretraining validation accuracy, stops 29 and 30) and a dataset's own tags (the
# recipe of docs/generality.md).
SOURCE_DEFAULTS: dict[str, dict[str, int | str]] = {
    "synthetic": {"batch_size": 16, "pool": "max"},
    "tags": {"batch_size": 32, "pool": "mean"},
}


@dataclass
class PretrainConfig:
    """The classification pretraining run: images, schedule and seed.

    ``dataset`` is ``"synthetic"`` (the shape classification set; ``images``, ``val_images``
    and ``image_size`` set its size) or a real dataset's name, read from ``data_root``: its
    ``train_split`` trains and its ``val_split`` validates (all their images; ``crop`` takes a
    random square crop of that many pixels from each training image, padding smaller ones).
    ``pool`` is the classifier's global pooling, ``loss`` the multi-label loss
    (:class:`MultiLabelCriterion`).  ``init`` names a backbone file (of an earlier ``pretrain``)
    to start the features from instead of random weights: a backbone from another source (the
    synthetic shapes) adapted to the dataset's own tags.  ``batch_size=None`` and ``pool=None``
    take the source's default (:data:`SOURCE_DEFAULTS`).

    Synthetic: eight epochs of 3,000 images.  With average pooling in batches of 32 they reached
    88.8%, 78.8% and 96.4% validation accuracy on the five shapes with seeds 0-2, where six
    reached 73.6%, 66.8% and 86.0% (chance: 20%); a higher rate (2e-3) stayed at chance for six
    epochs.  Batches of 16 reached 89.2% and 95.6% on the tuning seeds 100 and 101 against
    77.2% and 92.4% in batches of 32; global max pooling then 95.2%, 97.2%, 95.6% and 95.6% on
    the tuning seeds 100-103 against 89.2%, 95.6%, 82.4% and 91.2% with average pooling — a
    shape is found where it is, not diluted by the background around it (docs/training.md,
    "What pretraining changed").  On a dataset's own tags average pooling and batches of 32
    stay, the recipe docs/generality.md chose; a dataset of ~1,000 images needs more epochs
    than 3,000 do.
    """

    images: int = 3000
    val_images: int = 250
    epochs: int = 8
    batch_size: int | None = None
    lr: float = 5e-4
    weight_decay: float = 1e-4
    image_size: int = 64
    seed: int = 0
    dataset: str = "synthetic"
    data_root: str = "data"
    train_split: str = "train"
    val_split: str = "val"
    crop: int | None = None
    pool: str | None = None
    loss: str = "bce"
    init: str | None = None

    def __post_init__(self) -> None:
        source = SOURCE_DEFAULTS["synthetic" if self.dataset == "synthetic" else "tags"]
        for name, value in source.items():
            if getattr(self, name) is None:
                setattr(self, name, value)
        for name in ("images", "val_images", "epochs", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"pretrain {name} must be at least 1, got {getattr(self, name)}")
        if not self.lr > 0:
            raise ValueError(f"pretrain lr must be positive, got {self.lr}")
        if self.dataset not in PRETRAIN_DATASETS:
            raise ValueError(f"pretrain dataset must be one of {PRETRAIN_DATASETS}, got "
                             f"{self.dataset!r}")
        if self.loss not in LOSSES:
            raise ValueError(f"pretrain loss must be one of {LOSSES}, got {self.loss!r}")
        if self.pool not in POOLS:
            raise ValueError(f"pretrain pool must be one of {POOLS}, got {self.pool!r}")
        if self.crop is not None and self.crop < 1:
            raise ValueError(f"pretrain crop must be at least 1 pixel, got {self.crop}")


POOLS: tuple[str, ...] = ("mean", "max")


class _Classifier(nn.Module):
    """The segmentation network's features, global pooling (``"mean"`` or ``"max"`` over the
    positions) and a linear layer (on normalised images, as the segmentation network)."""

    def __init__(self, net: SmallSegNet, classes: int, pool: str) -> None:
        super().__init__()
        self.features = net.features
        self.head = nn.Linear(net.classifier.in_channels, classes)
        self.pool = pool

    def forward(self, images: Tensor) -> Tensor:
        features = self.features(images).flatten(2)
        return self.head(features.mean(2) if self.pool == "mean" else features.amax(2))


def _labels(batch: dict) -> Tensor:
    """The shape of each single-object image: its largest foreground class, from 0."""
    return batch["sizes"][:, 1:].argmax(1)


class ShapeCriterion:
    """Softmax cross-entropy of the shape classifier with each single-object image's shape."""

    def __call__(self, logits: Tensor, batch: dict) -> tuple[Tensor, dict]:
        loss = nn.functional.cross_entropy(logits, _labels(batch).to(logits.device))
        return loss, {"loss": float(loss.detach())}


def tag_columns(num_classes: int, background: int | None) -> Tensor:
    """The classes a tag classifier predicts: every class but the background (always present)."""
    return torch.tensor([c for c in range(num_classes) if c != background], dtype=torch.long)


LOSSES: tuple[str, ...] = ("bce", "softmax")


class MultiLabelCriterion:
    """Multi-label classification from image-level tags, over the ``columns`` of the tags (every
    class but the background, :func:`tag_columns`).

    ``"bce"``: the mean binary cross-entropy of each class's logit with its tag.  ``"softmax"``:
    the cross-entropy of the softmax over the classes with the tags normalised to sum to one
    (Mahajan et al., "Exploring the Limits of Weakly Supervised Pretraining", 2018); an image
    with one tag is then ordinary single-label classification.
    """

    def __init__(self, columns: Tensor, loss: str = "bce") -> None:
        if loss not in LOSSES:
            raise ValueError(f"loss must be one of {LOSSES}, got {loss!r}")
        self.columns, self.kind = columns, loss

    def __call__(self, logits: Tensor, batch: dict) -> tuple[Tensor, dict]:
        targets = batch["tags"][:, self.columns].to(logits.device, logits.dtype)
        if self.kind == "bce":
            loss = nn.functional.binary_cross_entropy_with_logits(logits, targets)
        else:
            weights = targets / targets.sum(1, keepdim=True).clamp(min=1.0)
            loss = -(weights * torch.log_softmax(logits, 1)).sum(1).mean()
        return loss, {"loss": float(loss.detach())}


def average_precision(scores: Tensor, targets: Tensor) -> Tensor:
    """Average precision of each column: the mean, over the positives, of the precision among
    the items scored at least as high as that positive (ties count together), ``(C,)``; NaN for
    a column without positives.  The non-interpolated AP of information retrieval (e.g.
    scikit-learn's ``average_precision_score``).

    Args:
        scores: ``(N, C)`` scores, higher meaning more likely positive.
        targets: ``(N, C)`` 0/1 labels.
    """
    if scores.shape != targets.shape or scores.dim() != 2:
        raise ValueError(f"scores and targets must be (N, C) of one shape, got "
                         f"{tuple(scores.shape)} and {tuple(targets.shape)}")
    out = torch.full((scores.shape[1],), float("nan"), dtype=torch.float64)
    for c in range(scores.shape[1]):
        s, t = scores[:, c].double(), targets[:, c].double()
        if t.sum() == 0:
            continue
        above = s[None, :] >= s[:, None]  # above[i, j]: item j scores at least as high as i
        positives = t.bool()
        precision = (above[positives] * t).sum(1) / above[positives].sum(1)
        out[c] = precision.mean()
    return out


def tag_metrics(logits: Tensor, targets: Tensor) -> dict:
    """Validation metrics of a tag classifier on ``(N, C)`` logits and 0/1 tags.

    ``map``: mean :func:`average_precision` over the classes tagged in at least one image;
    ``tag_accuracy``: share of right tags (probability above 0.5 against the tag) over those
    classes; ``accuracy``: share of images whose tags (all ``C`` classes) are all right;
    ``ap``: the AP of each column (NaN where no image has the tag).
    """
    ap = average_precision(logits, targets)
    seen = ~ap.isnan()
    right = (logits > 0) == targets.bool()
    return {"map": float(ap[seen].mean()) if bool(seen.any()) else float("nan"),
            "tag_accuracy": float(right[:, seen].double().mean()) if bool(seen.any())
            else float("nan"),
            "accuracy": float(right.all(1).double().mean()), "ap": ap.tolist()}


@torch.no_grad()
def _predict(model: nn.Module, loader: DataLoader) -> tuple[Tensor, list[dict]]:
    """The classifier's logits over ``loader`` and its batches."""
    model.eval()
    logits, batches = [], []
    for batch in loader:
        logits.append(model(normalize(batch["image"])))
        batches.append(batch)
    return torch.cat(logits), batches


def _shape_metrics(model: nn.Module, loader: DataLoader) -> dict:
    """Shape classification accuracy on single-object images."""
    logits, batches = _predict(model, loader)
    labels = torch.cat([_labels(b) for b in batches])
    return {"accuracy": float((logits.argmax(1) == labels).double().mean())}


def _data(cfg: PretrainConfig) -> tuple[Dataset, Dataset, int]:
    """Training and validation sets, and the number of classes of the segmentation network."""
    if cfg.dataset == "synthetic":
        data = SyntheticShapes("pretrain", cfg.images + cfg.val_images,
                               image_size=cfg.image_size, max_objects=1, seed=cfg.seed)
        return (Subset(data, range(cfg.images)), Subset(data, range(cfg.images, len(data))),
                SyntheticShapes.num_classes)
    train_set = build_dataset(cfg.dataset, cfg.train_split, cfg.data_root)
    val_set = build_dataset(cfg.dataset, cfg.val_split, cfg.data_root)
    return train_set, val_set, train_set.num_classes


def pretrain(cfg: PretrainConfig, out: str | Path, *, progress_bar: bool = True,
             log: Callable[[str], None] | None = None) -> dict:
    """Train the small network's features to classify images; write them to ``out``.

    Synthetic: shapes of single-object images (:class:`ShapeCriterion`); a dataset: its
    training images' tags (:class:`MultiLabelCriterion`).  The epochs are
    :func:`ccnn.engine.train_one_epoch` with flips (and ``cfg.crop``) and the poly schedule.
    Returns ``{"accuracy", "metrics", "seconds", "path", "history"}``: ``metrics`` are the last
    epoch's validation metrics (``accuracy``; for a dataset also ``map`` and ``tag_accuracy``,
    :func:`tag_metrics`), ``accuracy`` its ``accuracy``, ``history`` the mean training loss
    and the validation metrics of each epoch.  Deterministic in ``cfg.seed`` on the CPU.
    """
    log = log or logger.info
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    train_set, val_set, num_classes = _data(cfg)
    synthetic = cfg.dataset == "synthetic"
    val_loader = eval_loader(val_set, 100 if synthetic else 16)
    if synthetic:
        columns, criterion = None, ShapeCriterion()
        outputs = len(SyntheticShapes.class_names) - 1
    else:
        columns = tag_columns(num_classes, train_set.background)
        criterion, outputs = MultiLabelCriterion(columns, cfg.loss), len(columns)
    with seeded(cfg.seed):
        model = _Classifier(SmallSegNet(num_classes, backbone_weights=cfg.init), outputs,
                            cfg.pool)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps_per_epoch = -(-len(train_set) // cfg.batch_size)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer,
                                                  lr_schedule(steps_per_epoch, cfg.epochs))
    augmentation, device = Augmentation(crop=cfg.crop), torch.device("cpu")
    history = []
    for epoch in range(cfg.epochs):
        loader = training_loader(train_set, cfg.batch_size, augmentation,
                                 epoch_generator(cfg.seed, epoch))
        title = f"pretrain {epoch + 1}/{cfg.epochs}"
        with ProgressBar(on_terminal(progress_bar), len(loader), title) as bar:
            stats = train_one_epoch(model, criterion, optimizer, scheduler, loader, device,
                                    progress=bar)
        if synthetic:
            metrics = _shape_metrics(model, val_loader)
            shown = f"val accuracy {metrics['accuracy']:.3f}"
        else:
            logits, batches = _predict(model, val_loader)
            metrics = tag_metrics(logits, torch.cat([b["tags"] for b in batches])[:, columns])
            shown = (f"val tag mAP {metrics['map']:.3f}, tag accuracy "
                     f"{metrics['tag_accuracy']:.3f}, all tags right {metrics['accuracy']:.3f}")
        history.append({"epoch": epoch + 1, "loss": stats["loss"],
                        **{k: v for k, v in metrics.items() if k != "ap"}})
        log(f"pretrain epoch {epoch + 1}/{cfg.epochs}: loss {stats['loss']:.4f}, {shown}")
    state = {f"features.{k}": v for k, v in model.features.state_dict().items()}
    atomic_save({"state_dict": state, "head": model.head.state_dict(),
                 "accuracy": metrics["accuracy"], "metrics": metrics,
                 "config": dataclasses.asdict(cfg)}, out)
    return {"accuracy": metrics["accuracy"], "metrics": metrics,
            "seconds": time.perf_counter() - start, "path": str(out), "history": history}
