"""Segmentation networks for weak-label training, by name.

Every model maps images ``(B, 3, H, W)``, normalised by the caller with ImageNet's mean and
standard deviation, to logits ``(B, L, ceil(H/s), ceil(W/s))`` at its ``output_stride`` s; the
loss acts on these coarse logits, as in CCNN (Pathak et al. 2015).

- ``small``: :class:`SmallSegNet`, a VGG-like network for CPU runs (output stride 4);
- ``vgg16-fcn``: :class:`VGG16FCN`, DeepLab-LargeFOV, CCNN's network (8);
- ``deeplab-resnet50``, ``deeplab-resnet101``: :class:`DeepLabResNet`, DeepLab v2 (8).

The large networks take ``backbone_weights``, a local torchvision ImageNet checkpoint (see
:func:`load_backbone_weights`); nothing is downloaded.

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
from ccnn.models.weights import RandomWeightsWarning, load_backbone_weights

__all__ = [
    "MODELS",
    "VGG16FCN",
    "DeepLabResNet",
    "RandomWeightsWarning",
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
    """The network ``name`` (a key of :data:`MODELS`) with ``num_classes`` outputs.

    Args:
        name: a key of :data:`MODELS`.
        num_classes: output channels (classes, background included).
        backbone_weights: a local torchvision checkpoint of the backbone (for ``small``, a file
            of ``ccnn pretrain``); ``None`` starts the large networks from random weights with
            a :class:`RandomWeightsWarning` (``small`` starts from random weights silently).
        options: further keyword arguments of the model's constructor.

    Raises:
        ValueError: ``name`` is unknown, or ``backbone_weights`` do not fit the network.
    """
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose one of {tuple(MODELS)}")
    return MODELS[name](num_classes, backbone_weights=backbone_weights, **options)
