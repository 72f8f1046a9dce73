"""A dense CRF for test-time refinement, as CCNN applies one to its network's output.

Krähenbühl and Koltun's fully connected CRF (NIPS 2011) with Potts compatibility and the two
Gaussian kernels DeepLab and CCNN use: an *appearance* kernel
``w_a·exp(−|p_i − p_j|²/2θ_α² − |I_i − I_j|²/2θ_β²)`` and a *smoothness* kernel
``w_s·exp(−|p_i − p_j|²/2θ_γ²)``.  Mean-field inference updates

    Q_i(l) ∝ exp(u_i(l) + Σ_{j≠i} k(i, j)·Q_j(l))

from ``Q = softmax(u)``, with ``u`` the network's logits (the unary is ``−u``; under Potts the
message ``Σ_j k(i,j)·(1 − Q_j(l))`` differs from ``−Σ_j k(i,j)·Q_j(l)`` by a constant per pixel).

The kernel is truncated to a ``window × window`` neighbourhood (the ConvCRF approximation of
Teichmann and Cipolla, 2018) instead of the permutohedral lattice, so inference is a few dense
tensor operations on any device and exact for its truncated kernel; pixels farther apart than
``window // 2`` do not interact.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["CRFParams", "crf_refine", "pairwise_kernels"]


@dataclass(frozen=True)
class CRFParams:
    """Parameters of :func:`crf_refine` (distances in pixels, colours in 0–255 units).

    DeepLab's and CCNN's smoothness kernel (weight 3, θ_γ = 1).  The appearance kernel and the
    window were chosen on the synthetic default's ``test`` split (never the validation split
    the reports use), over window 15 or 19 (θ_α 8 or 12), w_a ∈ {5, 10, 20} and
    θ_β ∈ {13, 20, 30}, with the demo's ``full`` and ``ccnn`` checkpoints: the larger window
    and θ_β = 30 were best for both (``ccnn`` 0.417 → 0.523, ``full`` 0.695 → 0.796), w_a
    mattered little.  For larger images widen the window (cost grows as its area).
    """

    iterations: int = 10
    window: int = 19
    appearance_weight: float = 10.0
    position_sigma: float = 12.0  # θ_α
    colour_sigma: float = 30.0  # θ_β
    smoothness_weight: float = 3.0
    smoothness_sigma: float = 1.0  # θ_γ

    def __post_init__(self) -> None:
        if self.iterations < 0:
            raise ValueError(f"CRF iterations must be >= 0, got {self.iterations}")
        if self.window < 3 or self.window % 2 == 0:
            raise ValueError(f"CRF window must be odd and >= 3, got {self.window}")
        for name in ("appearance_weight", "smoothness_weight"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"CRF {name} must be >= 0, got {getattr(self, name)}")
        for name in ("position_sigma", "colour_sigma", "smoothness_sigma"):
            if not getattr(self, name) > 0:
                raise ValueError(f"CRF {name} must be positive, got {getattr(self, name)}")


def _offsets(window: int) -> list[tuple[int, int]]:
    r = window // 2
    return [(dy, dx) for dy in range(-r, r + 1) for dx in range(-r, r + 1) if dy or dx]


def _shifted(x: Tensor, dy: int, dx: int, r: int) -> Tensor:
    """``x`` at ``(y + dy, x + dx)`` for every pixel ``(y, x)``, from ``x`` padded by ``r``."""
    H, W = x.shape[-2] - 2 * r, x.shape[-1] - 2 * r
    return x[..., r + dy:r + dy + H, r + dx:r + dx + W]


def pairwise_kernels(images: Tensor, params: CRFParams = CRFParams()) -> Tensor:
    """``k(i, i + o)`` for every pixel ``i`` and window offset ``o ≠ 0``: ``(B, O, H, W)``.

    Zero where ``i + o`` falls outside the image.  ``images``: ``(B, 3, H, W)``, 0–255.  The
    kernel is symmetric, ``k(i, i − o) = k(i − o, i)``, so the second half of the offsets (the
    negated first half, in reverse order) is the first half's maps shifted by ``o``: the same
    numbers to the bit, for half the exponentials.
    """
    r = params.window // 2
    B, _, H, W = images.shape
    offsets = _offsets(params.window)
    half = len(offsets) // 2
    padded = torch.nn.functional.pad(images, (r, r, r, r))
    inside = torch.nn.functional.pad(images.new_ones(B, H, W), (r, r, r, r))
    out = images.new_empty(B, len(offsets), H, W)
    for o, (dy, dx) in enumerate(offsets[:half]):
        d2 = float(dy * dy + dx * dx)
        colour = (_shifted(padded, dy, dx, r) - images).square().sum(1)
        k = colour.div_(2 * params.colour_sigma ** 2).neg_().add_(
            -d2 / (2 * params.position_sigma ** 2)).exp_().mul_(params.appearance_weight)
        smooth = params.smoothness_weight * torch.exp(
            torch.tensor(-d2 / (2 * params.smoothness_sigma ** 2)))
        torch.mul(k.add_(smooth.item()), _shifted(inside, dy, dx, r), out=out[:, o])
        mirrored = torch.nn.functional.pad(out[:, o], (r, r, r, r))
        out[:, len(offsets) - 1 - o] = _shifted(mirrored, -dy, -dx, r)
    return out


# The mean-field loop runs on chunks of images holding about this many class maps (images times
# classes less one), so that the messages' working set stays in the cache: 1.2-1.5x faster at
# four to six classes than the whole batch at once, the same at two or three (docs/training.md,
# "The dense CRF").  Each image's numbers do not depend on the chunking.
_CHUNK_MAPS = 32


@torch.no_grad()
def crf_refine(images: Tensor, logits: Tensor, params: CRFParams = CRFParams()) -> Tensor:
    """Mean-field inference of the windowed dense CRF; returns ``Q`` ``(B, L, H, W)``.

    Args:
        images: ``(B, 3, H, W)`` uint8 colours, as the datasets give them (not normalised).
        logits: ``(B, L, H, W)`` the network's scores at the image's resolution.
        params: kernel weights, ranges, window and iterations.
    """
    if images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be (B, 3, H, W), got {tuple(images.shape)}")
    if logits.dim() != 4 or logits.shape[0] != images.shape[0] \
            or logits.shape[2:] != images.shape[2:]:
        raise ValueError(f"logits {tuple(logits.shape)} do not match images "
                         f"{tuple(images.shape)}: expected (B, L, H, W) at the image's size")
    u = logits.float()
    batch, classes = u.shape[:2]
    if batch == 0 or classes == 1 or params.iterations == 0:
        return torch.softmax(u, 1).to(logits.dtype)
    step = max(1, _CHUNK_MAPS // (classes - 1))
    Q = torch.cat([_mean_field(images[s:s + step].float(), u[s:s + step], params)
                   for s in range(0, batch, step)])
    return Q.to(logits.dtype)


def _mean_field(images: Tensor, u: Tensor, params: CRFParams) -> Tensor:
    """:func:`crf_refine`'s updates on float32 ``images`` and ``u`` (two or more classes).

    The window's multiply-adds run over classes ``1 … L−1`` only: ``Q`` sums to one over the
    classes at every pixel, so the message to class 0 is the kernel's total less the others',
    ``Σ_j k(i,j)·Q_j(0) = Σ_j k(i,j) − Σ_{l≥1} Σ_j k(i,j)·Q_j(l)`` (within float32 rounding of
    the sum over the window; tested against the explicit computation).  ``Q``'s classes
    ``1 … L−1`` are written into the interior of one zero-padded buffer each iteration, so the
    window's shifted views of it are made once.
    """
    kernels = pairwise_kernels(images, params)
    total = kernels.sum(1, keepdim=True)
    r = params.window // 2
    B, L, H, W = u.shape
    padded = u.new_zeros(B, L - 1, H + 2 * r, W + 2 * r)
    interior = _shifted(padded, 0, 0, r)
    terms = [(kernels[:, o:o + 1], _shifted(padded, dy, dx, r))
             for o, (dy, dx) in enumerate(_offsets(params.window))]
    message = torch.empty_like(u)
    others = message[:, 1:]
    Q = torch.softmax(u, 1)
    for _ in range(params.iterations):
        interior.copy_(Q[:, 1:])
        others.zero_()
        for kernel, neighbour in terms:
            others.addcmul_(kernel, neighbour)
        torch.sub(total, others.sum(1, keepdim=True), out=message[:, :1])
        Q = torch.softmax(u + message, 1)
    return Q
