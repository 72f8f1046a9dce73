"""CCNN's network: VGG16 as a fully convolutional network at output stride 8 (DeepLab-LargeFOV)."""

from __future__ import annotations

from pathlib import Path

import torchvision
from torch import Tensor, nn

from ccnn.models.weights import load_backbone_weights

__all__ = ["VGG16FCN"]

# Indices in torchvision's ``vgg16().features``.
_POOL1_3 = (4, 9, 16)
_CONV5 = (24, 26, 28)
_POOL4_5 = (23, 30)


class VGG16FCN(nn.Module):
    """VGG16 turned into DeepLab-LargeFOV (Chen et al. 2015), the network CCNN trains.

    torchvision's VGG16 convolutions with pool1–pool3 kept at stride 2 (2×2, ceil mode, so odd
    sizes are covered), pool4 and pool5 at stride 1 (3×3, padding 1) and the conv5 block dilated
    by 2; then fc6 as a 3×3 convolution dilated by 12 (1024 channels), fc7 as a 1×1 convolution
    (1024 channels), each with ReLU and dropout 0.5, and fc8, a 1×1 classifier initialised from
    N(0, 0.01²) with zero bias.  Output stride 8: logits ``(B, L, ceil(H/8), ceil(W/8))``.

    Args:
        num_classes: output channels (classes, background included).
        backbone_weights: a local torchvision ``vgg16`` checkpoint for the convolutions
            (its ``classifier.*`` keys are ignored); ``None`` starts from random weights
            with a :class:`~ccnn.models.weights.RandomWeightsWarning`.
    """

    output_stride = 8

    def __init__(self, num_classes: int, *, backbone_weights: str | Path | None = None) -> None:
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"num_classes must be positive, got {num_classes}")
        vgg = torchvision.models.vgg16(weights=None)
        load_backbone_weights(vgg, backbone_weights, name="vgg16", skip=("classifier.",))
        features = list(vgg.features)
        for index in _POOL1_3:
            features[index] = nn.MaxPool2d(2, stride=2, ceil_mode=True)
        for index in _POOL4_5:
            features[index] = nn.MaxPool2d(3, stride=1, padding=1)
        for index in _CONV5:
            features[index].dilation, features[index].padding = (2, 2), (2, 2)
        self.features = nn.Sequential(*features)
        self.head = nn.Sequential(
            nn.Conv2d(512, 1024, 3, padding=12, dilation=12), nn.ReLU(inplace=True),  # fc6
            nn.Dropout(0.5),
            nn.Conv2d(1024, 1024, 1), nn.ReLU(inplace=True), nn.Dropout(0.5),  # fc7
        )
        self.classifier = nn.Conv2d(1024, num_classes, 1)  # fc8
        nn.init.normal_(self.classifier.weight, std=0.01)
        nn.init.zeros_(self.classifier.bias)

    def forward(self, x: Tensor) -> Tensor:
        """Logits ``(B, L, ceil(H/8), ceil(W/8))`` for normalised images ``(B, 3, H, W)``."""
        return self.classifier(self.head(self.features(x)))
