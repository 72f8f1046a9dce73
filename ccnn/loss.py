"""Training losses: CCNN's constrained loss and the two baselines it is compared with.

* :class:`ConstrainedLoss` — CCNN (Pathak et al. 2015, Eq. 1): the P-step solves for the latent
  distribution P under the constraints with no gradient, then the network takes a step on the
  cross-entropy ``H(P, Q)``, whose gradient with respect to the logits is ``(Q − P)/N``.
* :func:`mil_loss` — MIL-FCN (Pathak et al. 2014): for every class tagged in the image, the
  negative log of its largest probability over the pixels (global max pooling); no constraints.
* :func:`pixel_loss` — the fully supervised upper bound: per-pixel cross-entropy with the masks.
"""

from __future__ import annotations

import math
import time
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ccnn.constraints import RegionConstraints
from ccnn.data.base import IGNORE_INDEX
from ccnn.latent import METHODS, LatentResult, solve_latent

__all__ = ["ConstrainedLoss", "ConstrainedOutput", "mil_loss", "pixel_loss",
           "soft_cross_entropy"]


def soft_cross_entropy(logits: Tensor, target: Tensor) -> Tensor:
    """Per-pixel mean of ``H(P, Q) = −Σ_l P(l)·log Q(l)`` with Q = softmax(logits) over dim 1.

    Its gradient with respect to the logits is ``(Q − P)/(B·N)`` (CCNN's Eq. 1 step).
    """
    return -(target * torch.log_softmax(logits, dim=1)).sum(1).mean()


class ConstrainedOutput(NamedTuple):
    """What :class:`ConstrainedLoss` returns: the loss and the P-step behind it."""

    loss: Tensor
    latent: LatentResult
    seconds: float  # wall time of the P-step (the device synchronised first on a GPU)


def _synchronize(device: torch.device) -> None:
    """Wait for the GPU's queued work, so that wall time measures it (nothing on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class ConstrainedLoss(nn.Module):
    """CCNN's loss: cross-entropy between the latent P (solved without gradient) and Q.

    Each call solves the P-step (:func:`ccnn.latent.solve_latent`) on the detached logits at
    the network's output resolution, then returns ``H(P, Q)`` averaged over pixels and images,
    together with the P-step's result and time (:class:`ConstrainedOutput`); the loss keeps no
    state between calls.

    Args:
        method: P-step method, ``"newton"`` (default) or ``"pgd"``.
        tol: tolerance of the P-step on its KKT residual.
        max_iter: P-step iteration limit (the solver's default when ``None``).
        hardness: CCNN's hardness ``s``: P = softmax(s·(f + Aᵀλ)).  1 for tags; CCNN uses 1000
            with size constraints, which makes P nearly a hard assignment.

    Example:
        >>> from ccnn.constraints import tag_bounds
        >>> loss_fn = ConstrainedLoss()
        >>> logits = torch.randn(2, 4, 8, 8, requires_grad=True)
        >>> loss, latent, seconds = loss_fn(logits, *tag_bounds([[0, 1], [0, 3]], num_classes=4))
        >>> loss.backward()
        >>> bool(latent.converged.all())
        True
    """

    def __init__(self, method: str = "newton", tol: float = 1e-6, max_iter: int | None = None,
                 hardness: float = 1.0) -> None:
        super().__init__()
        if method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {method!r}")
        if not hardness > 0 or not math.isfinite(hardness):
            raise ValueError(f"hardness must be positive and finite, got {hardness}")
        self.method, self.tol, self.max_iter, self.hardness = method, tol, max_iter, hardness

    @torch.no_grad()
    def latent(self, logits: Tensor, lower: Tensor | float, upper: Tensor | float,
               slack: Tensor | float = math.inf, *, regions: RegionConstraints | None = None,
               init: Tensor | None = None) -> LatentResult:
        """The P-step alone.  With hardness ``s`` the dual in ``sλ`` is CCNN's with logits
        ``s·f`` and slack ``s·β``, so the solver runs on those.  ``init``: multipliers to start
        from (those of an earlier solve of the same images, in the same units)."""
        s = self.hardness
        if s != 1.0:
            slack = s * (torch.as_tensor(slack) if not isinstance(slack, Tensor) else slack)
            if regions is not None:
                regions = RegionConstraints(regions.weights, regions.classes, regions.lower,
                                            regions.upper, s * regions.slack)
        return solve_latent(s * logits.detach(), lower, upper, slack, regions=regions,
                            method=self.method, tol=self.tol, max_iter=self.max_iter, init=init)

    def forward(self, logits: Tensor, lower: Tensor | float, upper: Tensor | float,
                slack: Tensor | float = math.inf, *, regions: RegionConstraints | None = None,
                init: Tensor | None = None) -> ConstrainedOutput:
        """``H(P, Q)`` for logits ``(B, L, H, W)`` and per-image bounds ``(B, L)``, with the
        P-step's result and its wall time."""
        _synchronize(logits.device)
        start = time.perf_counter()
        latent = self.latent(logits, lower, upper, slack, regions=regions, init=init)
        _synchronize(logits.device)
        seconds = time.perf_counter() - start
        return ConstrainedOutput(soft_cross_entropy(logits, latent.P), latent, seconds)


def mil_loss(logits: Tensor, tags: Tensor) -> Tensor:
    """MIL-FCN's multi-class MIL loss: ``−mean over tagged (image, class) of log max_i Q_i(l)``.

    Args:
        logits: ``(B, L, H, W)``.
        tags: ``(B, L)`` 0/1, the classes present in each image.
    """
    if tags.shape != logits.shape[:2]:
        raise ValueError(f"tags have shape {tuple(tags.shape)}, expected {tuple(logits.shape[:2])}")
    log_max = torch.log_softmax(logits, dim=1).flatten(2).amax(-1)  # (B, L)
    present = tags > 0
    if not bool(present.any()):
        raise ValueError("mil_loss needs at least one tagged class in the batch")
    return -log_max[present].mean()


def pixel_loss(logits: Tensor, mask: Tensor) -> Tensor:
    """Fully supervised cross-entropy: logits upsampled bilinearly to the masks ``(B, H, W)``,
    pixels labelled ``IGNORE_INDEX`` left out."""
    up = F.interpolate(logits, size=mask.shape[-2:], mode="bilinear", align_corners=False)
    return F.cross_entropy(up, mask, ignore_index=IGNORE_INDEX)
