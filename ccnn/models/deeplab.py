"""DeepLab-style networks on torchvision's ResNet-50/101 with dilation (output stride 8)."""

from __future__ import annotations

from pathlib import Path

import torchvision
from torch import Tensor, nn
from torchvision.models.segmentation.deeplabv3 import DeepLabHead

from ccnn.models.weights import load_backbone_weights

__all__ = ["DeepLabResNet"]


class DeepLabResNet(nn.Module):
    """ResNet-50/101 with layer3 and layer4 dilated (rates 2 and 4) and DeepLabV3's ASPP head.

    Args:
        num_classes: output channels.
        depth: 50 or 101.
        backbone_weights: a local torchvision ``resnet50``/``resnet101`` checkpoint (``fc.*``
            ignored); ``None`` starts from random weights.
    """

    output_stride = 8

    def __init__(self, num_classes: int, depth: int = 50, *,
                 backbone_weights: str | Path | None = None) -> None:
        super().__init__()
        if depth not in (50, 101):
            raise ValueError(f"depth must be 50 or 101, got {depth}")
        build = torchvision.models.resnet50 if depth == 50 else torchvision.models.resnet101
        resnet = build(weights=None, replace_stride_with_dilation=[False, True, True])
        load_backbone_weights(resnet, backbone_weights, name=f"resnet{depth}", skip=("fc.",))
        self.backbone = nn.Sequential(resnet.conv1, resnet.bn1, resnet.relu, resnet.maxpool,
                                      resnet.layer1, resnet.layer2, resnet.layer3, resnet.layer4)
        self.head = DeepLabHead(2048, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        """Logits ``(B, L, ceil(H/8), ceil(W/8))`` (for sizes that are multiples of 8)."""
        return self.head(self.backbone(x))
