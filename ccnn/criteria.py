"""One criterion per training method: the bounds it builds from a batch's weak labels, and its loss.

A criterion maps the network's coarse logits and a collated batch (:func:`ccnn.data.transforms.
collate`) to ``(loss, stats)``.  Every method reports ``violation``: how far the network's own
class fractions (the mean of Q over pixels) lie outside the bounds it builds — the quantity
CCNN's constraints push down — and ``p_seconds``, the time of its P-step (0 without one).

* ``"ccnn"`` (:class:`TagCriterion`) — CCNN's tag constraints (Pathak, Krähenbühl and Darrell,
  "Constrained Convolutional Neural Networks for Weakly Supervised Segmentation", 2015, §4):
  foreground, background and suppression; the loss is :class:`ccnn.loss.ConstrainedLoss`.
* ``"ccnn-size"`` (:class:`SizeBitCriterion`) — plus CCNN's size information: one bit per
  tagged class, whether it covers at least ``size_threshold`` of the image
  (:func:`ccnn.constraints.size_bits`); the bit, not the size, reaches the bounds.
* ``"ccnn-size-exact"`` (:class:`ExactSizeCriterion`) — the measured size of each tagged class
  as its lower bound (``max(size_fg_lower, size_fg_scale·size)``, by default the size itself):
  more supervision than CCNN's one bit.
* ``"mil"`` (:class:`MILCriterion`) — MIL-FCN's multi-class MIL loss (Pathak, Shelhamer, Long
  and Darrell, "Fully Convolutional Multi-Class Multiple Instance Learning", 2014).
* ``"full"`` (:class:`PixelCriterion`) — per-pixel cross-entropy with the masks.

:meth:`Criterion.refinement` gives the criterion of the refinement stage (:mod:`ccnn.refine`):
the method's loss *from tags only* (the size methods drop their size bounds; with
``keep_sizes`` they keep them) plus the per-pixel cross-entropy with the stage's pseudo-labels
(:class:`RefinementCriterion`).
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor

from ccnn.constraints import Bounds, bound_violation, size_bits, tag_bounds
from ccnn.loss import ConstrainedLoss, mil_loss, pixel_loss

__all__ = ["CRITERIA", "METHODS", "WEAK_METHODS", "Criterion", "ExactSizeCriterion",
           "MILCriterion", "PixelCriterion", "RefinementCriterion", "SizeBitCriterion",
           "TagCriterion", "build_criterion"]


class Criterion:
    """A method's bounds builder and loss (the base class; see the module docstring).

    Args:
        num_classes: ``L``.
        background: the background class, or ``None``.
        bounds: keyword arguments of :func:`ccnn.constraints.tag_bounds` (its constants and
            ``small_rule``; CCNN's by default).
        p_method, p_tol, hardness: the P-step's settings (:class:`ccnn.loss.ConstrainedLoss`),
            for the methods that have one.
    """

    method: ClassVar[str] = ""

    def __init__(self, num_classes: int, background: int | None, *, bounds: dict | None = None,
                 p_method: str = "newton", p_tol: float = 1e-6, hardness: float = 1.0) -> None:
        self.num_classes, self.background = num_classes, background
        self.bounds_options = dict(bounds or {})
        self.p_step = {"p_method": p_method, "p_tol": p_tol, "hardness": hardness}

    def bounds(self, batch: dict) -> Bounds:
        """``lower, upper, slack`` ``(B, L)`` of the batch: CCNN's tag constraints."""
        return tag_bounds(batch["tags"], self.num_classes, background=self.background,
                          **self.bounds_options)

    def loss(self, logits: Tensor, batch: dict, bounds: Bounds) -> tuple[Tensor, float]:
        """The method's loss and its P-step's seconds."""
        raise NotImplementedError

    def __call__(self, logits: Tensor, batch: dict) -> tuple[Tensor, dict]:
        """``(loss, stats)`` with stats ``loss``, ``violation`` and ``p_seconds``."""
        bounds = Bounds(*(t.to(logits.device) for t in self.bounds(batch)))
        loss, p_seconds = self.loss(logits, batch, bounds)
        with torch.no_grad():
            fractions = torch.softmax(logits.detach().double(), 1).mean((2, 3))
            violation = bound_violation(fractions, bounds.lower, bounds.upper).sum(1).mean()
        return loss, {"loss": float(loss.detach()), "violation": float(violation),
                      "p_seconds": p_seconds}

    def tags_only(self) -> Criterion:
        """The same method without size information (itself unless it uses sizes)."""
        return self

    def refinement(self, keep_sizes: bool = False) -> RefinementCriterion:
        """The refinement stage's criterion: :meth:`tags_only` plus the labels' cross-entropy;
        with ``keep_sizes`` the method's own bounds, its size information included (for
        ``ccnn-size`` the one bit it was given, so the stage uses no more than the method)."""
        return RefinementCriterion(self if keep_sizes else self.tags_only())


class TagCriterion(Criterion):
    """``ccnn``: CCNN's P-step under the tag constraints, then ``H(P, Q)``."""

    method = "ccnn"

    def __init__(self, num_classes: int, background: int | None, **options: object) -> None:
        super().__init__(num_classes, background, **options)
        self.constrained = ConstrainedLoss(self.p_step["p_method"], self.p_step["p_tol"],
                                           hardness=self.p_step["hardness"])

    def loss(self, logits: Tensor, batch: dict, bounds: Bounds) -> tuple[Tensor, float]:
        loss, _, seconds = self.constrained(logits, *bounds)
        return loss, seconds

    def tags_only(self) -> Criterion:
        if type(self) is TagCriterion:
            return self
        return TagCriterion(self.num_classes, self.background, bounds=self.bounds_options,
                            **self.p_step)


class SizeBitCriterion(TagCriterion):
    """``ccnn-size``: the tag constraints with CCNN's one size bit per tagged class.

    The bit is ``size ≥ size_threshold``; a large class must cover at least ``size_fg_lower``,
    a small one is absent (``small_rule="absent"``, CCNN's rule) or at most the threshold
    (``"at-most"``); see :func:`ccnn.constraints.tag_bounds`.
    """

    method = "ccnn-size"

    def bounds(self, batch: dict) -> Bounds:
        threshold = self.bounds_options.get("size_threshold",
                                            tag_bounds.__kwdefaults__["size_threshold"])
        return tag_bounds(batch["tags"], self.num_classes, background=self.background,
                          large=size_bits(batch["sizes"], threshold), **self.bounds_options)


class ExactSizeCriterion(TagCriterion):
    """``ccnn-size-exact``: each tagged class's measured size as its lower bound.

    Unless ``bounds`` says otherwise, a class over ``size_threshold`` must cover at least its own
    measured fraction of the image (``size_fg_lower = 0``, ``size_fg_scale = 1``): this uses the
    sizes themselves, more supervision than CCNN's one bit (:class:`SizeBitCriterion`).
    """

    method = "ccnn-size-exact"
    DEFAULTS: ClassVar[dict] = {"size_fg_lower": 0.0, "size_fg_scale": 1.0}

    def __init__(self, num_classes: int, background: int | None, *, bounds: dict | None = None,
                 **options: object) -> None:
        super().__init__(num_classes, background, bounds={**self.DEFAULTS, **(bounds or {})},
                         **options)

    def bounds(self, batch: dict) -> Bounds:
        return tag_bounds(batch["tags"], self.num_classes, background=self.background,
                          sizes=batch["sizes"], **self.bounds_options)


class MILCriterion(Criterion):
    """``mil``: MIL-FCN's loss on the tags; its violation is that of the tag bounds."""

    method = "mil"

    def loss(self, logits: Tensor, batch: dict, bounds: Bounds) -> tuple[Tensor, float]:
        return mil_loss(logits, batch["tags"].to(logits.device)), 0.0


class PixelCriterion(Criterion):
    """``full``: per-pixel cross-entropy with the batch's masks (the upper bound)."""

    method = "full"

    def loss(self, logits: Tensor, batch: dict, bounds: Bounds) -> tuple[Tensor, float]:
        return pixel_loss(logits, batch["mask"].to(logits.device)), 0.0

    def refinement(self, keep_sizes: bool = False) -> RefinementCriterion:
        raise ValueError("full trains on the masks; the refinement stage is for the weak-label "
                         "methods")


class RefinementCriterion(Criterion):
    """The refinement stage: ``base``'s loss plus the per-pixel cross-entropy with the batch's
    masks, which there are the stage's pseudo-labels (:mod:`ccnn.refine`)."""

    def __init__(self, base: Criterion) -> None:
        super().__init__(base.num_classes, base.background, bounds=base.bounds_options,
                         **base.p_step)
        self.base = base
        self.method = base.method

    def bounds(self, batch: dict) -> Bounds:
        return self.base.bounds(batch)

    def loss(self, logits: Tensor, batch: dict, bounds: Bounds) -> tuple[Tensor, float]:
        loss, p_seconds = self.base.loss(logits, batch, bounds)
        return loss + pixel_loss(logits, batch["mask"].to(logits.device)), p_seconds


CRITERIA: dict[str, type[Criterion]] = {
    c.method: c for c in (TagCriterion, SizeBitCriterion, ExactSizeCriterion, MILCriterion,
                          PixelCriterion)}
METHODS: tuple[str, ...] = tuple(CRITERIA)
# The methods that learn from image-level labels (and may add the refinement stage).
WEAK_METHODS: tuple[str, ...] = tuple(m for m in METHODS if m != "full")


def build_criterion(method: str, num_classes: int, background: int | None,
                    **options: object) -> Criterion:
    """The criterion of ``method`` (a key of :data:`CRITERIA`); ``options`` as
    :class:`Criterion`'s."""
    if method not in CRITERIA:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    return CRITERIA[method](num_classes, background, **options)
