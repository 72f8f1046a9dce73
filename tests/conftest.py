"""Helpers shared by the training tests: tiny settings, a silent log, a log that stops a run, and
mIoU computed with NumPy, independently of ``ccnn.metrics``."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
import torch
from torch.utils.data import Dataset

# A training run of a few seconds: 24 synthetic images of 32×32 pixels in batches of 8.
TINY_SETTINGS = {"model": "small", "lr": 3e-3, "optimizer": "adam", "train_size": 24,
                 "val_size": 8, "test_size": 8, "batch_size": 8,
                 "dataset_options": {"image_size": 32}, "overlays": 2}


class StopError(Exception):
    """Raised by :func:`stop_when` to interrupt a training run."""


@pytest.fixture
def tiny() -> dict:
    """A copy of :data:`TINY_SETTINGS`."""
    return {**TINY_SETTINGS, "dataset_options": dict(TINY_SETTINGS["dataset_options"])}


@pytest.fixture
def quiet() -> Callable[[str], None]:
    """A log function that drops every message."""
    return lambda message: None


@pytest.fixture
def stop_when() -> Callable[[str], Callable[[str], None]]:
    """``stop_when(text)``: a log function raising :class:`StopError` at the first message
    containing ``text`` (the run's checkpoint of that epoch is already written)."""

    def make(text: str) -> Callable[[str], None]:
        def log(message: str) -> None:
            if text in message:
                raise StopError(message)
        return log

    return make


def numpy_miou(truth: np.ndarray, pred: np.ndarray, num_classes: int) -> float:
    """mIoU by explicit counting: the mean IoU over classes that occur in the truth or the
    prediction, void (255) left out."""
    keep = truth != 255
    truth, pred = truth[keep], pred[keep]
    ious = []
    for c in range(num_classes):
        union = np.sum((truth == c) | (pred == c))
        if union:
            ious.append(np.sum((truth == c) & (pred == c)) / union)
    return float(np.mean(ious))


@pytest.fixture
def miou_of() -> Callable[[torch.nn.Module, Dataset], float]:
    """``miou_of(model, dataset)``: the model's mIoU on the dataset, image by image: logits
    upsampled bilinearly, argmax, :func:`numpy_miou` over all pixels."""

    @torch.no_grad()
    def compute(model: torch.nn.Module, dataset: Dataset) -> float:
        from ccnn.data.transforms import normalize

        model.eval()
        truths, preds = [], []
        for i in range(len(dataset)):
            sample = dataset[i]
            image = sample["image"][None]
            logits = model(normalize(image))
            up = torch.nn.functional.interpolate(logits, size=image.shape[-2:],
                                                 mode="bilinear", align_corners=False)
            preds.append(up.argmax(1)[0].numpy().ravel())
            truths.append(sample["mask"].numpy().ravel())
        return numpy_miou(np.concatenate(truths), np.concatenate(preds), dataset.num_classes)

    return compute
