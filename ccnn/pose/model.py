"""The pose network of Eq. 13 and the loss of Eq. 14 of Márquez-Neila, Salzmann and Fua,
"Imposing Hard Constraints on Deep Networks: Promises and Limitations", 2017."""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["PoseNet", "pose_loss", "posenet_num_parameters"]


def posenet_num_parameters(num_joints: int = 17, width: int = 8, hidden: int = 1024,
                           image_size: int = 128) -> int:
    """Number of parameters of :class:`PoseNet` with these arguments (weights and biases)."""
    side = image_size // 8
    convs = (3 * 25 + 1) * width + (width * 25 + 1) * width + (width * 9 + 1) * width
    fcs = (width * side * side + 1) * hidden + (hidden + 1) * hidden
    return convs + fcs + (hidden + 1) * 3 * num_joints


class PoseNet(nn.Module):
    """Eq. 13: ``A_51 ∘ R ∘ A_1024 ∘ R ∘ A_1024 ∘ C_{8,3×3} ∘ R ∘ P_2×2 ∘ C_{8,5×5} ∘ R ∘ P_4×4
    ∘ C_{8,5×5}`` of Márquez-Neila, Salzmann and Fua, "Imposing Hard Constraints on Deep
    Networks: Promises and Limitations", 2017.

    Convolutions are "same"-padded, so a 128×128×3 input gives 8×128×128 → pool 4 → 8×32×32 →
    8×32×32 → pool 2 → 8×16×16 → 8×16×16 (no ReLU after the last convolution, as in Eq. 13) →
    2048 → 1024 → 1024 → 51. Parameters at the defaults: convolutions 608 + 1 608 + 584, affine
    layers 2 098 176 + 1 049 600 + 52 275: **3 202 851** in all (:func:`posenet_num_parameters`).
    No BatchNorm or dropout: the network is a pure function of its parameters, as ``torch.func``
    Jacobian products need.

    Args:
        num_joints: outputs are ``3 * num_joints`` (joint-major x, y, z).
        width: filters per convolution (8 in the paper).
        hidden: width of the two hidden affine layers (1024 in the paper).
        image_size: side of the square input (a multiple of 8).
    """

    def __init__(self, num_joints: int = 17, *, width: int = 8, hidden: int = 1024,
                 image_size: int = 128) -> None:
        super().__init__()
        for name, value in (("num_joints", num_joints), ("width", width), ("hidden", hidden)):
            if value < 1:
                raise ValueError(f"{name} must be positive, got {value}")
        if image_size < 8 or image_size % 8:
            raise ValueError(f"image_size must be a positive multiple of 8, got {image_size}")
        self.num_joints, self.image_size = num_joints, image_size
        side = image_size // 8
        self.features = nn.Sequential(
            nn.Conv2d(3, width, 5, padding=2), nn.MaxPool2d(4), nn.ReLU(),
            nn.Conv2d(width, width, 5, padding=2), nn.MaxPool2d(2), nn.ReLU(),
            nn.Conv2d(width, width, 3, padding=1),
        )
        self.regressor = nn.Sequential(
            nn.Flatten(),
            nn.Linear(width * side * side, hidden), nn.ReLU(),
            nn.Linear(hidden, hidden), nn.ReLU(),
            nn.Linear(hidden, 3 * num_joints),
        )

    def forward(self, x: Tensor) -> Tensor:
        """Images ``(B, 3, S, S)`` → poses ``(B, 3 * num_joints)``."""
        if x.dim() != 4 or tuple(x.shape[1:]) != (3, self.image_size, self.image_size):
            raise ValueError(f"x must have shape (B, 3, {self.image_size}, {self.image_size}), "
                             f"got {tuple(x.shape)}")
        return self.regressor(self.features(x))


def pose_loss(pred: Tensor, y: Tensor) -> Tensor:
    """Eq. 14 of Márquez-Neila, Salzmann and Fua 2017 averaged over the batch:
    ``(1/K) Σ_i (1/51) ||ŷ_i - y_i||²`` (the mean squared error over all coordinates)."""
    if pred.shape != y.shape:
        raise ValueError(f"pred and y must have the same shape, got {tuple(pred.shape)} and "
                         f"{tuple(y.shape)}")
    return torch.mean((pred - y) ** 2)
