"""Segmentation metrics from a confusion matrix: mIoU, per-class IoU and pixel accuracy."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ccnn.data.base import IGNORE_INDEX

__all__ = ["ConfusionMatrix"]


class ConfusionMatrix:
    """Accumulates ``counts[t, p]``: pixels of true class ``t`` predicted as ``p``.

    Pixels labelled ``IGNORE_INDEX`` (255) are left out.

    Example:
        >>> cm = ConfusionMatrix(2)
        >>> cm.update(torch.tensor([[0, 1], [1, 1]]), torch.tensor([[0, 1], [0, 255]]))
        >>> cm.counts.tolist()
        [[1, 1], [0, 1]]
        >>> round(cm.compute()["miou"], 4)
        0.5
    """

    def __init__(self, num_classes: int) -> None:
        if num_classes < 1:
            raise ValueError(f"num_classes must be positive, got {num_classes}")
        self.num_classes = num_classes
        self.counts = torch.zeros(num_classes, num_classes, dtype=torch.int64)

    def update(self, prediction: Tensor, target: Tensor) -> None:
        """Add predicted labels and true labels of the same shape (any number of images)."""
        if prediction.shape != target.shape:
            raise ValueError(f"prediction has shape {tuple(prediction.shape)}, "
                             f"target {tuple(target.shape)}")
        keep = target != IGNORE_INDEX
        t, p = target[keep].long().cpu(), prediction[keep].long().cpu()
        L = self.num_classes
        if bool(((t < 0) | (t >= L)).any()) or bool(((p < 0) | (p >= L)).any()):
            raise ValueError(f"labels must lie in [0, {L}) or be {IGNORE_INDEX}")
        self.counts += torch.bincount(t * L + p, minlength=L * L).view(L, L)

    def compute(self) -> dict:
        """``miou``, ``pixel_accuracy``, ``mean_accuracy`` and ``iou`` (per class; NaN for a class
        neither present nor predicted, left out of the mean)."""
        c = self.counts.double()
        tp = c.diag()
        union = c.sum(0) + c.sum(1) - tp
        iou = torch.where(union > 0, tp / union.clamp(min=1), torch.nan)
        present = c.sum(1)
        acc = torch.where(present > 0, tp / present.clamp(min=1), torch.nan)
        total = c.sum()
        return {
            "miou": float(iou.nanmean()) if bool((union > 0).any()) else math.nan,
            "pixel_accuracy": float(tp.sum() / total) if total > 0 else math.nan,
            "mean_accuracy": float(acc.nanmean()) if bool((present > 0).any()) else math.nan,
            "iou": iou.tolist(),
        }
