"""Reports of training runs: metrics JSON, training curves and predictions overlaid on images."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor, nn
from torch.utils.data import Dataset

from ccnn.data.base import IGNORE_INDEX
from ccnn.engine import predict_logits
from ccnn.io import write_json

__all__ = ["colorize", "overlay", "plot_comparison", "plot_curves", "write_report"]


def colorize(labels: Tensor, palette: Tensor) -> np.ndarray:
    """Colour image ``(H, W, 3)`` uint8 of a label map; void (255) is drawn white."""
    lut = np.full((256, 3), 255, dtype=np.uint8)
    lut[: len(palette)] = palette.numpy()
    return lut[labels.cpu().numpy().astype(np.int64).clip(0, 255)]


def overlay(image: Tensor, labels: Tensor, palette: Tensor, alpha: float = 0.55) -> np.ndarray:
    """Blend a label map's colours over an image ``(3, H, W)`` uint8; void pixels stay as is."""
    rgb = image.permute(1, 2, 0).cpu().numpy().astype(float)
    colours = colorize(labels, palette).astype(float)
    keep = (labels.cpu().numpy() != IGNORE_INDEX)[..., None]
    mixed = np.where(keep, (1 - alpha) * rgb + alpha * colours, rgb)
    return mixed.round().astype(np.uint8)


def _mark_refinement(axes: Iterable, histories: Iterable[list[dict]]) -> None:
    """A dotted line where a run's refinement stage (:mod:`ccnn.refine`) starts."""
    firsts = (next((r["epoch"] + 1 for r in h if r.get("stage") == "refine"), None)
              for h in histories)
    starts = sorted({start for start in firsts if start is not None})
    for ax in axes:
        for start in starts:
            ax.axvline(start - 0.5, color="grey", linestyle=":", label="refinement")


def plot_curves(history: list[dict], path: Path, title: str = "") -> None:
    """Training loss, the network's constraint violation and validation mIoU against epochs."""
    from matplotlib.figure import Figure  # no backend needed: the figure draws to its file

    epochs = [r["epoch"] + 1 for r in history]
    fig = Figure(figsize=(12, 3.2))
    axes = fig.subplots(1, 3)
    for ax, key, label in zip(axes, ("loss", "violation", "val_miou"),
                              ("training loss", "constraint violation of Q", "validation mIoU"),
                              strict=True):
        ax.plot(epochs, [r[key] for r in history], marker="o")
        ax.set_xlabel("epoch")
        ax.set_title(label)
        ax.grid(alpha=0.3)
    _mark_refinement(axes, [history])
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def plot_comparison(histories: dict[str, list[dict]], path: Path) -> None:
    """Validation mIoU and the network's constraint violation of several runs, per epoch."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 3.4))
    axes = fig.subplots(1, 2)
    for method, history in histories.items():
        epochs = [r["epoch"] + 1 for r in history]
        axes[0].plot(epochs, [r["val_miou"] for r in history], marker=".", label=method)
        axes[1].plot(epochs, [r["violation"] for r in history], marker=".", label=method)
    _mark_refinement(axes, histories.values())
    for ax, title in zip(axes, ("validation mIoU", "constraint violation of Q (training)"),
                         strict=True):
        ax.set_xlabel("epoch")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)


@torch.no_grad()
def _overlay_grid(model: nn.Module, dataset: Dataset, count: int, device: torch.device
                  ) -> np.ndarray:
    """Rows of image | ground truth | prediction for the first ``count`` samples."""
    model.eval()
    rows = []
    for index in range(min(count, len(dataset))):
        sample = dataset[index]
        pred = predict_logits(model, sample["image"][None].to(device)).argmax(1)[0].cpu()
        image = sample["image"].permute(1, 2, 0).numpy()
        rows.append(np.concatenate([image, overlay(sample["image"], sample["mask"],
                                                   dataset.palette),
                                    overlay(sample["image"], pred, dataset.palette)], axis=1))
    width = max(r.shape[1] for r in rows)
    rows = [np.pad(r, ((0, 2), (0, width - r.shape[1]), (0, 0)), constant_values=255)
            for r in rows]
    return np.concatenate(rows, axis=0)


def write_report(folder: Path, summary: dict, model: nn.Module, dataset: Dataset,
                 device: torch.device) -> None:
    """``metrics.json``, ``curves.png`` and ``overlays.png`` (image | truth | prediction on the
    first images of ``dataset``)."""
    write_json(folder / "metrics.json", summary)
    if summary["history"]:
        plot_curves(summary["history"], folder / "curves.png", title=summary["method"])
    count = summary["config"].get("overlays", 8)
    if count > 0:
        Image.fromarray(_overlay_grid(model, dataset, count, device)).save(folder / "overlays.png")
