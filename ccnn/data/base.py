"""What every dataset of ``ccnn.data`` returns, and the tags and sizes derived from a mask.

A sample is a dict:

* ``"image"``: ``uint8`` tensor ``(3, H, W)``, RGB;
* ``"mask"``: ``int64`` tensor ``(H, W)`` of class indices, ``IGNORE_INDEX`` (255) where the
  label is void — used for evaluation and by the fully supervised baseline only;
* ``"tags"``: ``float32`` tensor ``(L,)``, 1 for each class present in the image (the weak
  label CCNN trains on);
* ``"sizes"``: ``float32`` tensor ``(L,)``, the fraction of the labelled pixels of each class
  (the size information of CCNN's size constraints);
* ``"name"``: a string identifying the sample (file stem).

Datasets also carry ``num_classes``, ``class_names``, ``palette`` (``(L, 3)`` uint8 colours) and
``background`` (the background class index, or ``None`` when there is none, as in CamVid).
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["IGNORE_INDEX", "sizes_from_mask", "tags_from_mask"]

IGNORE_INDEX = 255


def sizes_from_mask(mask: Tensor, num_classes: int) -> Tensor:
    """Fraction of the labelled pixels of ``mask`` (``(H, W)``) in each class, ``(L,)`` float32.

    Void pixels (``IGNORE_INDEX``) are left out; an all-void mask gives zeros.
    """
    labels = mask[mask != IGNORE_INDEX].flatten().long()
    if bool(((labels < 0) | (labels >= num_classes)).any()):
        bad = labels[(labels < 0) | (labels >= num_classes)].unique().tolist()
        raise ValueError(f"mask has labels {bad} outside [0, {num_classes}) and not {IGNORE_INDEX}")
    counts = torch.bincount(labels, minlength=num_classes).float()
    return counts / counts.sum().clamp(min=1.0)


def tags_from_mask(mask: Tensor, num_classes: int) -> Tensor:
    """Image-level tags ``(L,)`` float32: 1 for every class with at least one labelled pixel."""
    return (sizes_from_mask(mask, num_classes) > 0).float()
