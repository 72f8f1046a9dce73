"""A small, fast segmentation network for CPU runs on the synthetic default."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn

from ccnn.models.weights import load_backbone_weights

__all__ = ["SmallSegNet"]


def _conv(cin: int, cout: int, *, dilation: int = 1) -> nn.Sequential:
    """3×3 convolution (size-preserving padding), batch norm and ReLU."""
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, padding=dilation, dilation=dilation, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )


class _Features(nn.Sequential):
    """The convolutional layers, run in the channels-last memory layout.

    On the CPU, oneDNN's convolutions take channels-last inputs 1.3-1.6× faster than
    contiguous ones for these layer sizes (forward and backward; docs/training.md).  Only the
    input is converted, so the parameters, their ``state_dict`` keys and the files of
    ``ccnn pretrain`` are those of a plain :class:`torch.nn.Sequential`.
    """

    def forward(self, x: Tensor) -> Tensor:
        return super().forward(x.contiguous(memory_format=torch.channels_last))


class SmallSegNet(nn.Module):
    """A VGG-like network cut at output stride 4, then dilated convolutions, as CCNN's VGG16.

    Two blocks of two 3×3 convolutions with 2×2 max pooling (output stride 4), then a block of
    3×3 convolutions with dilations ``dilations`` widening the receptive field without further
    downsampling — the pattern of CCNN's dilated VGG16 at a size that trains in minutes on two
    CPU cores.  The loss acts on the coarse output, as CCNN's does.

    Args:
        num_classes: output channels (classes, background included).
        width: channels of the first block; the second has twice, the last four times as many.
        dilations: dilation of each convolution of the last block.
        backbone_weights: a file written by ``ccnn pretrain`` (:mod:`ccnn.pretrain`) whose
            ``features`` weights start the network; ``None`` starts from random weights.
    """

    output_stride = 4

    def __init__(self, num_classes: int, width: int = 24,
                 dilations: tuple[int, ...] = (1, 2, 4),
                 backbone_weights: str | Path | None = None) -> None:
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"num_classes must be positive, got {num_classes}")
        if width < 1:
            raise ValueError(f"width must be positive, got {width}")
        w1, w2, w3 = width, 2 * width, 4 * width
        layers: list[nn.Module] = [_conv(3, w1), _conv(w1, w1), nn.MaxPool2d(2, ceil_mode=True),
                                   _conv(w1, w2), _conv(w2, w2), nn.MaxPool2d(2, ceil_mode=True)]
        cin = w2
        for d in dilations:
            layers.append(_conv(cin, w3, dilation=d))
            cin = w3
        self.features = _Features(*layers)
        self.classifier = nn.Conv2d(cin, num_classes, 1)
        if backbone_weights is not None:
            load_backbone_weights(self, backbone_weights, name="small", skip=("classifier.",))

    def forward(self, x: Tensor) -> Tensor:
        """Logits ``(B, L, ceil(H/4), ceil(W/4))`` for normalised images ``(B, 3, H, W)``."""
        return self.classifier(self.features(x)).contiguous()
