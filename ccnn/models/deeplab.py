"""DeepLab-ResNet (DeepLab v2, Chen et al. 2017): a dilated ResNet-50/101 at output stride 8."""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path

import torchvision
from torch import Tensor, nn

from ccnn.models.weights import load_backbone_weights

__all__ = ["DeepLabResNet"]

# torchvision's ResNet up to layer4, in order; the average pool and ``fc`` are dropped.
_STAGES = ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4")


class DeepLabResNet(nn.Module):
    """DeepLab v2's ResNet network: dilated ResNet-50/101 and the ASPP-L classifier.

    torchvision's ResNet with layer3 and layer4 dilated by 2 and 4 instead of strided (output
    stride 8), then DeepLab v2's atrous spatial pyramid pooling: four parallel 3×3 classifiers
    dilated by ``aspp_rates`` = 6, 12, 18, 24, initialised from N(0, 0.01²) with zero bias, whose
    logits are summed.  The head has no BatchNorm, so CCNN's batches of one image train; the
    backbone keeps torchvision's BatchNorm layers (DeepLab v2 froze them when fine-tuning).
    Logits ``(B, L, ceil(H/8), ceil(W/8))``.

    Args:
        num_classes: output channels (classes, background included).
        depth: 50 or 101.
        backbone_weights: a local torchvision ``resnet50``/``resnet101`` checkpoint (its
            ``fc.*`` keys are ignored); ``None`` starts from random weights with a
            :class:`~ccnn.models.weights.RandomWeightsWarning`.
    """

    output_stride = 8
    aspp_rates = (6, 12, 18, 24)

    def __init__(self, num_classes: int, depth: int = 50, *,
                 backbone_weights: str | Path | None = None) -> None:
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"num_classes must be positive, got {num_classes}")
        if depth not in (50, 101):
            raise ValueError(f"depth must be 50 or 101, got {depth}")
        build = torchvision.models.resnet50 if depth == 50 else torchvision.models.resnet101
        resnet = build(weights=None, replace_stride_with_dilation=[False, True, True])
        load_backbone_weights(resnet, backbone_weights, name=f"resnet{depth}", skip=("fc.",))
        self.backbone = nn.Sequential(OrderedDict((n, getattr(resnet, n)) for n in _STAGES))
        self.aspp = nn.ModuleList(nn.Conv2d(2048, num_classes, 3, padding=rate, dilation=rate)
                                  for rate in self.aspp_rates)
        for conv in self.aspp:
            nn.init.normal_(conv.weight, std=0.01)
            nn.init.zeros_(conv.bias)

    def forward(self, x: Tensor) -> Tensor:
        """Logits ``(B, L, ceil(H/8), ceil(W/8))`` for normalised images ``(B, 3, H, W)``."""
        features = self.backbone(x)
        return sum(conv(features) for conv in self.aspp)
