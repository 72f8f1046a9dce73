"""Segmentation networks for weak-label training, by name.

Every model maps normalised images ``(B, 3, H, W)`` to logits at its ``output_stride``:

>>> import torch
>>> model = build_model("small", num_classes=6)
>>> model(torch.zeros(1, 3, 64, 64)).shape
torch.Size([1, 6, 16, 16])
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from torch import nn

from ccnn.models.deeplab import DeepLabResNet
from ccnn.models.fcn import VGG16FCN
from ccnn.models.small import SmallSegNet
from ccnn.models.weights import load_backbone_weights

__all__ = [
    "MODELS",
    "VGG16FCN",
    "DeepLabResNet",
    "SmallSegNet",
    "build_model",
    "load_backbone_weights",
]

MODELS: dict[str, Callable[..., nn.Module]] = {
    "small": SmallSegNet,
    "vgg16-fcn": VGG16FCN,
    "deeplab-resnet50": lambda num_classes, **kw: DeepLabResNet(num_classes, 50, **kw),
    "deeplab-resnet101": lambda num_classes, **kw: DeepLabResNet(num_classes, 101, **kw),
}


def build_model(name: str, num_classes: int, *, backbone_weights: str | Path | None = None,
                **options: object) -> nn.Module:
    """The network ``name`` (a key of :data:`MODELS`) with ``num_classes`` outputs."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose one of {tuple(MODELS)}")
    if name == "small":
        if backbone_weights is not None:
            raise ValueError("the small network has no pretrained backbone: drop "
                             "--backbone-weights or pick vgg16-fcn / deeplab-resnet*")
        return SmallSegNet(num_classes, **options)
    return MODELS[name](num_classes, backbone_weights=backbone_weights, **options)
