"""Linear constraints on a latent segmentation distribution, built from image-level tags.

CCNN (Pathak, Krähenbühl, Darrell 2015, Eq. 2 and 5) asks the latent distribution P to
satisfy ``A·P ≥ b − ξ``.  Every constraint used here bounds a *fraction*: the share of an image's
pixels (or of a weighted region) that P gives to one class.  Two forms are provided:

* :func:`tag_bounds` — whole-image bounds ``lower ≤ (1/N)·Σ_i P_i(l) ≤ upper`` per class, built from
  tags with CCNN's constants (foreground, background, suppression, optionally CCNN's one bit of
  size information per class, :func:`size_bits`, or the measured sizes);
* :class:`RegionConstraints` — the same bound on the P-mass of one class inside a pixel weight map
  (a bounding box, a region), ``lower ≤ Σ_i w_i·P_i(l) / Σ_i w_i ≤ upper``.

Both feed :func:`ccnn.latent.solve_latent`.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor

__all__ = [
    "BOUND_CONSTANTS",
    "BOUND_OPTIONS",
    "SMALL_RULES",
    "Bounds",
    "RegionConstraints",
    "bound_violation",
    "box_weights",
    "broadcast_bounds",
    "size_bits",
    "tag_bounds",
]


class Bounds(NamedTuple):
    """Per-class bounds on class fractions, each ``(B, L)``; unpack into ``solve_latent``."""

    lower: Tensor
    upper: Tensor
    slack: Tensor


def _tags_tensor(tags: Tensor | Sequence[Iterable[int]], num_classes: int | None) -> Tensor:
    """Turn multi-hot ``(B, L)`` tags or lists of class indices into a ``(B, L)`` bool tensor."""
    if isinstance(tags, Tensor):
        if tags.dim() != 2:
            raise ValueError(f"tags must be a (B, L) 0/1 tensor, got shape {tuple(tags.shape)}")
        if num_classes is not None and tags.shape[1] != num_classes:
            raise ValueError(
                f"tags have {tags.shape[1]} columns but num_classes={num_classes}"
            )
        if not bool(((tags == 0) | (tags == 1)).all()):
            raise ValueError("tags must contain only 0 and 1")
        return tags.bool()
    if num_classes is None:
        raise ValueError("num_classes is required when tags are given as lists of class indices")
    rows = [list(row) for row in tags]
    out = torch.zeros(len(rows), num_classes, dtype=torch.bool)
    for b, row in enumerate(rows):
        for c in row:
            if not 0 <= int(c) < num_classes:
                raise ValueError(f"tag {c} of image {b} is outside [0, {num_classes})")
            out[b, int(c)] = True
    return out


def size_bits(sizes: Tensor, threshold: float) -> Tensor:
    """CCNN's one bit of size information per class: ``sizes ≥ threshold`` as a ``(B, L)`` bool.

    ``sizes[b, l]`` is the fraction of image ``b`` that class ``l`` covers.  Pathak, Krähenbühl
    and Darrell (2015, §4) give their size constraints this one bit per tagged class, not the
    size itself; :func:`tag_bounds` turns it into bounds (``large=``).
    """
    if not 0.0 <= threshold <= 1.0:
        raise ValueError(f"size_threshold={threshold} must lie in [0, 1]")
    return sizes >= threshold


def _size_input(value: Tensor, shape: tuple[int, int], name: str, device: torch.device
                ) -> Tensor:
    """``sizes`` or ``large`` checked against the tags' shape, on their device."""
    if value.shape != shape:
        raise ValueError(f"{name} must have shape {shape}, got {tuple(value.shape)}")
    return value.to(device)


def tag_bounds(
    tags: Tensor | Sequence[Iterable[int]],
    num_classes: int | None = None,
    *,
    sizes: Tensor | None = None,
    large: Tensor | None = None,
    background: int | None = 0,
    fg_lower: float = 0.05,
    fg_slack: float = 2.0,
    bg_lower: float = 0.3,
    bg_upper: float = 0.7,
    bg_slack: float = math.inf,
    size_fg_lower: float = 0.1,
    size_fg_scale: float = 0.0,
    size_bg_lower: float = 0.2,
    size_bg_upper: float = 0.7,
    size_threshold: float = 0.1,
    size_small_lower: float = 0.0,
    small_rule: str = "absent",
) -> Bounds:
    """CCNN's constraints from image-level tags (Pathak, Krähenbühl, Darrell 2015, Sec. 4).

    For each image and class ``l`` the result bounds the fraction ``(1/N)·Σ_i P_i(l)``:

    * **suppression** — a class without a tag gets ``upper = 0`` (P is zero on it everywhere);
    * **foreground** — a tagged class other than the background gets ``lower = fg_lower``
      with slack ``fg_slack``;
    * **background** — class ``background`` is always present, with ``lower = bg_lower`` and,
      only when some foreground tag is present, ``upper = bg_upper``; slack ``bg_slack``
      (CCNN's is hard);
    * **size** — with one bit per tagged class, ``large[b, l]``: does class ``l`` cover at least
      ``size_threshold`` of image ``b`` (:func:`size_bits`; CCNN's size information).  A large
      class gets ``lower = size_fg_lower``; a small one, by ``small_rule``, is treated as
      absent (``"absent"``, CCNN's rule: ``upper = 0``) or kept with ``upper = size_threshold``
      (``"at-most"``: present, at least ``size_small_lower`` and at most the threshold, slack
      ``fg_slack``; the floor is a constant like ``fg_lower``, not a measurement, so the cue
      stays one bit).  The background
      range becomes ``[size_bg_lower, size_bg_upper]``, the upper bound only when a large class
      is present.
    * **measured sizes** — with ``sizes[b, l]``, the fraction of image ``b`` that class ``l``
      covers, instead of the bit: the bit is ``sizes ≥ size_threshold`` and a large class gets
      ``lower = max(size_fg_lower, size_fg_scale·sizes[b, l])`` — more supervision than CCNN's
      one bit whenever ``size_fg_scale > 0`` (CCNN: ``size_fg_scale = 0``).

    Args:
        tags: ``(B, L)`` 0/1 tensor, or one iterable of class indices per image.
        num_classes: ``L``; required when ``tags`` are index lists, checked otherwise.
        sizes: optional ``(B, L)`` class fractions in ``[0, 1]``.
        large: optional ``(B, L)`` bool, the one-bit size cue (not with ``sizes``).
        background: index of the background class, or ``None`` when every class is foreground.
        small_rule: ``"absent"`` or ``"at-most"``, for tagged classes under the threshold.

    Returns:
        :class:`Bounds` ``(lower, upper, slack)``, each ``(B, L)`` float64 on the tags' device.
        ``slack`` is the β that caps each dual variable (``inf`` = hard).
    """
    present = _tags_tensor(tags, num_classes)
    B, L = present.shape
    if background is not None and not 0 <= background < L:
        raise ValueError(f"background={background} is outside [0, {L})")
    for name, value in [("fg_lower", fg_lower), ("bg_lower", bg_lower), ("bg_upper", bg_upper),
                        ("size_fg_lower", size_fg_lower), ("size_bg_lower", size_bg_lower),
                        ("size_bg_upper", size_bg_upper), ("size_threshold", size_threshold),
                        ("size_small_lower", size_small_lower)]:
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"{name}={value} must lie in [0, 1]")
    for name, value in [("fg_slack", fg_slack), ("bg_slack", bg_slack)]:
        if not value >= 0.0:
            raise ValueError(f"{name}={value} must be >= 0 (inf for a hard constraint)")
    if not 0.0 <= size_fg_scale < math.inf:
        raise ValueError(f"size_fg_scale={size_fg_scale} must be finite and >= 0")
    if small_rule not in SMALL_RULES:
        raise ValueError(f"small_rule={small_rule!r} must be one of {SMALL_RULES}")
    if size_small_lower > size_threshold:
        raise ValueError(f"size bounds are crossed: size_small_lower={size_small_lower} > "
                         f"size_threshold={size_threshold}")
    if size_small_lower > 0 and small_rule != "at-most":
        raise ValueError(f"size_small_lower={size_small_lower} needs small_rule='at-most' (with "
                         f"{small_rule!r} a small class gets no lower bound)")
    if sizes is not None and large is not None:
        raise ValueError("give sizes or large (the one-bit size cue), not both")
    if large is not None and size_fg_scale != 0.0:
        raise ValueError(f"size_fg_scale={size_fg_scale} needs the measured sizes; with the "
                         f"one-bit cue (large) it must be 0")
    if sizes is not None:
        sizes = _size_input(sizes, (B, L), "sizes", present.device).to(torch.float64)
        if not bool(((sizes >= 0) & (sizes <= 1)).all()):
            raise ValueError("sizes must be class fractions in [0, 1]")
        large = size_bits(sizes, size_threshold)
    elif large is not None:
        large = _size_input(large, (B, L), "large", present.device)
        if large.dtype != torch.bool:
            if not bool(((large == 0) | (large == 1)).all()):
                raise ValueError("large must be a bool or 0/1 tensor")
            large = large.bool()
    if large is not None:
        bg_lower, bg_upper = size_bg_lower, size_bg_upper
    if bg_lower > bg_upper:
        raise ValueError(
            f"background bounds are crossed: bg_lower={bg_lower} > bg_upper={bg_upper}")

    opts = {"dtype": torch.float64, "device": present.device}

    def const(value: float) -> Tensor:
        return torch.tensor(value, **opts)

    foreground = present.clone()
    if background is not None:
        foreground[:, background] = False
        present[:, background] = True
    small = torch.zeros_like(present)
    fg_floor = const(fg_lower)
    if large is not None:
        small = foreground & ~large
        foreground = foreground & large
        fg_floor = const(size_fg_lower)
        if sizes is not None:
            fg_floor = torch.maximum(fg_floor, size_fg_scale * sizes).clamp(max=1.0)
        if small_rule == "absent":  # CCNN: a class under the threshold is treated as absent
            present = present & ~small
            small = torch.zeros_like(small)
    lower = torch.where(foreground, fg_floor, const(0.0))
    lower = torch.where(small, const(size_small_lower), lower)
    upper = torch.where(present, const(1.0), const(0.0))
    upper = torch.where(small, const(size_threshold), upper)
    slack = torch.where(foreground | small, const(fg_slack), const(math.inf))
    if background is not None:
        lower[:, background] = bg_lower
        upper[:, background] = torch.where(foreground.any(dim=1), const(bg_upper), const(1.0))
        slack[:, background] = bg_slack
    return Bounds(lower, upper, slack)


# The rules of :func:`tag_bounds` for a tagged class under the size threshold.
SMALL_RULES: tuple[str, ...] = ("absent", "at-most")


# The constants of :func:`tag_bounds` (CCNN's, by default) that a configuration may override.
BOUND_CONSTANTS: tuple[str, ...] = tuple(
    name for name, p in inspect.signature(tag_bounds).parameters.items()
    if p.kind is inspect.Parameter.KEYWORD_ONLY and isinstance(p.default, float))
# Everything a configuration's ``bounds`` may hold: the constants and the small-class rule.
BOUND_OPTIONS: tuple[str, ...] = (*BOUND_CONSTANTS, "small_rule")


def broadcast_bounds(value: Tensor | float, shape: tuple[int, ...], name: str, *,
                     device: torch.device, lo: float = 0.0, hi: float = 1.0) -> Tensor:
    """Broadcast a bound (scalar, or a tensor broadcastable to ``shape``) to float64 ``shape``.

    Raises ``ValueError`` naming ``name`` for a shape that does not broadcast, NaN, or values
    outside ``[lo, hi]``.
    """
    t = torch.as_tensor(value, dtype=torch.float64, device=device)
    try:
        t = torch.broadcast_to(t, shape)
    except RuntimeError:
        raise ValueError(
            f"{name} has shape {tuple(t.shape)}, which does not match {shape}"
        ) from None
    if bool(torch.isnan(t).any()):
        raise ValueError(f"{name} contains NaN")
    if bool(((t < lo) | (t > hi)).any()):
        raise ValueError(f"{name} must lie in [{lo}, {hi}]")
    return t


@dataclass(frozen=True)
class RegionConstraints:
    """Bounds on the P-mass of one class inside each of R pixel weight maps.

    Region ``r`` of image ``b`` asks ``lower[b, r] ≤ Σ_i w_i·P_i(c) / Σ_i w_i ≤ upper[b, r]``
    with ``w = weights[b, r]`` and ``c = classes[r]`` (or ``classes[b, r]``) — the weighted
    version of CCNN's class-sum constraint (Pathak et al. 2015, Eq. 2, one row of ``A``), with slack
    ``slack`` as in Eq. 4–5.  A 0/1 weight map is a box or a region: ``lower = 0.5`` then says
    "at least half of this box is class ``c``".

    Args:
        weights: ``(B, R, H, W)`` non-negative maps, each with positive total weight.
        classes: ``(R,)`` or ``(B, R)`` integer class of each region.
        lower, upper: fractions in ``[0, 1]``, broadcastable to ``(B, R)``.
        slack: β, broadcastable to ``(B, R)`` (``inf`` = hard).
    """

    weights: Tensor
    classes: Tensor
    lower: Tensor | float = 0.0
    upper: Tensor | float = 1.0
    slack: Tensor | float = math.inf

    def __post_init__(self) -> None:
        w = self.weights
        if not isinstance(w, Tensor) or w.dim() != 4:
            raise ValueError("RegionConstraints.weights must be a (B, R, H, W) tensor")
        if not bool(torch.isfinite(w).all()) or bool((w < 0).any()):
            raise ValueError("RegionConstraints.weights must be finite and non-negative")
        if bool((w.flatten(2).sum(-1) <= 0).any()):
            raise ValueError("RegionConstraints.weights has an empty region (total weight 0)")
        B, R = w.shape[:2]
        classes = torch.as_tensor(self.classes, device=w.device)
        if classes.dtype.is_floating_point or classes.dtype == torch.bool:
            raise ValueError("RegionConstraints.classes must be integers")
        try:
            classes = torch.broadcast_to(classes.long(), (B, R))
        except RuntimeError:
            raise ValueError(
                f"RegionConstraints.classes has shape {tuple(classes.shape)}, expected (R,) or "
                f"(B, R) = {(B, R)}"
            ) from None
        lower = broadcast_bounds(self.lower, (B, R), "RegionConstraints.lower", device=w.device)
        upper = broadcast_bounds(self.upper, (B, R), "RegionConstraints.upper", device=w.device)
        slack = broadcast_bounds(self.slack, (B, R), "RegionConstraints.slack", device=w.device,
                                 hi=math.inf)
        if bool((lower > upper).any()):
            raise ValueError("RegionConstraints: lower > upper for some region")
        object.__setattr__(self, "classes", classes)
        object.__setattr__(self, "lower", lower)
        object.__setattr__(self, "upper", upper)
        object.__setattr__(self, "slack", slack)

    def to(self, device: torch.device | str) -> RegionConstraints:
        """The same constraints with every tensor on ``device`` (``self`` if already there)."""
        if self.weights.device == torch.device(device):
            return self
        return RegionConstraints(*(t.to(device) for t in (self.weights, self.classes, self.lower,
                                                           self.upper, self.slack)))

    @property
    def num_regions(self) -> int:
        """R, the number of regions per image."""
        return self.weights.shape[1]

    def normalized_weights(self) -> Tensor:
        """``(B, R, N)`` float64 maps scaled so each sums to ``N``: the rows of ``N·A`` (Eq. 2)."""
        w = self.weights.flatten(2).to(torch.float64)
        return w * (w.shape[-1] / w.sum(-1, keepdim=True))


def box_weights(boxes: Tensor, height: int, width: int) -> Tensor:
    """0/1 weight maps ``(B, R, height, width)`` of boxes ``(B, R, 4)``: ``(x0, y0, x1, y1)``.

    Coordinates are in output pixels, ``x1``/``y1`` exclusive; boxes are clipped to the image.
    """
    if boxes.dim() != 3 or boxes.shape[-1] != 4:
        raise ValueError(f"boxes must be (B, R, 4), got shape {tuple(boxes.shape)}")
    ys = torch.arange(height, device=boxes.device).view(1, 1, height, 1)
    xs = torch.arange(width, device=boxes.device).view(1, 1, 1, width)
    x0, y0, x1, y1 = (boxes[..., k, None, None] for k in range(4))
    return ((xs >= x0) & (xs < x1) & (ys >= y0) & (ys < y1)).float()


def bound_violation(fractions: Tensor, lower: Tensor, upper: Tensor) -> Tensor:
    """What remains of each bound: ``max(lower − m, 0) + max(m − upper, 0)`` for fractions ``m``.

    Zero where ``lower ≤ m ≤ upper``; the amount by which ``m`` leaves the interval otherwise.
    """
    return (lower - fractions).clamp(min=0) + (fractions - upper).clamp(min=0)
