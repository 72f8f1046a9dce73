"""CCNN's network: VGG16 as a fully convolutional network at output stride 8 (DeepLab-LargeFOV)."""

from __future__ import annotations

from pathlib import Path

import torchvision
from torch import Tensor, nn

from ccnn.models.weights import load_backbone_weights

__all__ = ["VGG16FCN"]


class VGG16FCN(nn.Module):
    """VGG16 with pool4 and pool5 at stride 1 and conv5 dilated by 2, then fc6 as a 3×3
    convolution dilated by 12 (1024 channels), fc7 (1×1, 1024) and a 1×1 classifier: the
    DeepLab-LargeFOV network CCNN trains (output stride 8).

    Args:
        num_classes: output channels.
        backbone_weights: a local torchvision ``vgg16`` checkpoint for the convolutions
            (its ``classifier.*`` keys are ignored); ``None`` starts from random weights.
    """

    output_stride = 8

    def __init__(self, num_classes: int, *, backbone_weights: str | Path | None = None) -> None:
        super().__init__()
        vgg = torchvision.models.vgg16(weights=None)
        load_backbone_weights(vgg, backbone_weights, name="vgg16", skip=("classifier.",))
        features = list(vgg.features)
        for index in (23, 30):  # pool4, pool5: 3×3, stride 1
            features[index] = nn.MaxPool2d(3, stride=1, padding=1)
        for index in (24, 26, 28):  # conv5_1..3: dilation 2
            conv = features[index]
            conv.dilation, conv.padding = (2, 2), (2, 2)
        for index in (4, 9, 16):  # pool1..3 keep stride 2; ceil mode keeps odd sizes covered
            features[index] = nn.MaxPool2d(2, stride=2, ceil_mode=True)
        self.features = nn.Sequential(*features)
        self.head = nn.Sequential(
            nn.Conv2d(512, 1024, 3, padding=12, dilation=12), nn.ReLU(inplace=True),
            nn.Dropout2d(0.5),
            nn.Conv2d(1024, 1024, 1), nn.ReLU(inplace=True), nn.Dropout2d(0.5),
        )
        self.classifier = nn.Conv2d(1024, num_classes, 1)
        nn.init.normal_(self.classifier.weight, std=0.01)
        nn.init.zeros_(self.classifier.bias)

    def forward(self, x: Tensor) -> Tensor:
        """Logits ``(B, L, ceil(H/8), ceil(W/8))``."""
        return self.classifier(self.head(self.features(x)))
