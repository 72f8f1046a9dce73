"""The P-step written directly in CVXPY — the validation oracle — and random test problems.

:func:`solve_latent_cvxpy` states the primal (Pathak et al. 2015, Eq. 4–5) for one image exactly as
:func:`ccnn.latent.solve_latent` documents it, and hands it to a conic solver (SCS by default,
Clarabel selectable).  It shares no code with the dual solver: it is the independent answer the
solver is checked against.  Exponential-cone problems are slow — use it on small images only.

:func:`random_problem` draws batches of P-step problems: network-like logits (smooth random
score fields, with per-image biases that make the network disagree with the tags) and tag
constraints, optionally with varied constants so that some bounds are infeasible and their slack
is used.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor

from ccnn.constraints import Bounds, RegionConstraints, tag_bounds

__all__ = ["ReferenceSolution", "Region", "random_problem", "regions_of", "solve_latent_cvxpy"]

SOLVERS = ("SCS", "CLARABEL")


class Region(NamedTuple):
    """One region constraint of one image: ``lower ≤ Σ_i w_i·P_i(c) / Σ_i w_i ≤ upper``."""

    weights: np.ndarray  # (H, W), non-negative
    cls: int
    lower: float = 0.0
    upper: float = 1.0
    slack: float = math.inf


@dataclass
class ReferenceSolution:
    """A CVXPY solution of one image's P-step.

    Attributes:
        P: ``(L, H, W)`` latent distribution.
        objective: optimal value of Eq. 4 as CVXPY reports it.
        status: the solver's status (``"optimal"`` when it met its tolerance).
        fractions: ``(L,)`` class fractions of ``P``.
        seconds: wall time of the solve.
    """

    P: np.ndarray
    objective: float
    status: str
    fractions: np.ndarray
    seconds: float


def regions_of(regions: RegionConstraints, image: int) -> list[Region]:
    """The region constraints of one image of a batch, as :class:`Region` tuples."""
    return [
        Region(
            weights=regions.weights[image, r].double().cpu().numpy(),
            cls=int(regions.classes[image, r]),
            lower=float(regions.lower[image, r]),
            upper=float(regions.upper[image, r]),
            slack=float(regions.slack[image, r]),
        )
        for r in range(regions.num_regions)
    ]


def _bounded(expr, lower: float, upper: float, slack: float, constraints: list, penalties: list
             ) -> None:
    """Add ``lower − ξlo ≤ expr ≤ upper + ξhi`` with price ``slack·(ξlo + ξhi)`` (Eq. 5)."""
    import cvxpy as cp

    for bound, sign, needed in ((lower, 1.0, lower > 0), (upper, -1.0, upper < 1)):
        if not needed:
            continue
        if math.isinf(slack):
            constraints.append(sign * expr >= sign * bound)
        else:
            xi = cp.Variable(nonneg=True)
            constraints.append(sign * expr >= sign * bound - xi)
            penalties.append(slack * xi)


def solve_latent_cvxpy(
    logits: np.ndarray,
    lower: np.ndarray,
    upper: np.ndarray,
    slack: float | np.ndarray = math.inf,
    *,
    regions: Sequence[Region] = (),
    solver: str = "SCS",
    eps: float = 1e-9,
    max_iters: int = 200_000,
) -> ReferenceSolution:
    """Solve one image's P-step (Eq. 4–5 of Pathak et al. 2015) in CVXPY.

    ``minimise (1/N)·Σ_i KL(P_i‖Q_i) + Σ_l β_l·(ξlo_l + ξhi_l)`` over ``P_i`` in the simplex and
    ``ξ ≥ 0``, subject to ``lower_l − ξlo_l ≤ (1/N)·Σ_i P_i(l) ≤ upper_l + ξhi_l``; classes with
    ``upper = 0`` are fixed to zero; each :class:`Region` adds its weighted bound.

    Args:
        logits: ``(L, H, W)`` raw scores.
        lower, upper: ``(L,)`` fractions.
        slack: β, scalar or ``(L,)`` (``inf`` = hard).
        regions: extra region constraints of this image.
        solver: ``"SCS"`` (default) or ``"CLARABEL"``.
        eps: the solver's tolerance (SCS: absolute and relative; Clarabel: gap and feasibility).
        max_iters: SCS iteration limit; a solve that SCS calls inaccurate is run once more
            with ten times as many.

    Returns:
        A :class:`ReferenceSolution`; check its ``status``.
    """
    import cvxpy as cp

    solver = solver.upper()
    if solver not in SOLVERS:
        raise ValueError(f"solver must be one of {SOLVERS}, got {solver!r}")
    logits = np.asarray(logits, dtype=np.float64)
    if logits.ndim != 3:
        raise ValueError(f"logits must be (L, H, W), got shape {logits.shape}")
    L, H, W = logits.shape
    N = H * W
    lower = np.broadcast_to(np.asarray(lower, dtype=np.float64), (L,))
    upper = np.broadcast_to(np.asarray(upper, dtype=np.float64), (L,))
    slack = np.broadcast_to(np.asarray(slack, dtype=np.float64), (L,))
    f = logits.reshape(L, N).T
    logq = f - f.max(1, keepdims=True)
    logq = logq - np.log(np.exp(logq).sum(1, keepdims=True))

    P = cp.Variable((N, L), nonneg=True)
    constraints = [cp.sum(P, axis=1) == 1]
    penalties: list = []
    fractions = cp.sum(P, axis=0) / N
    for cls in range(L):
        if upper[cls] == 0:
            constraints.append(P[:, cls] == 0)
        else:
            _bounded(fractions[cls], lower[cls], upper[cls], slack[cls], constraints, penalties)
    for region in regions:
        w = np.asarray(region.weights, dtype=np.float64).reshape(N)
        mass = cp.sum(cp.multiply(w / w.sum(), P[:, region.cls]))
        _bounded(mass, region.lower, region.upper, region.slack, constraints, penalties)
    kl = cp.sum(-cp.entr(P) - cp.multiply(logq, P)) / N
    problem = cp.Problem(cp.Minimize(kl + sum(penalties)), constraints)
    options = ({"eps_abs": eps, "eps_rel": eps, "max_iters": max_iters} if solver == "SCS"
               else {"tol_gap_abs": eps, "tol_gap_rel": eps, "tol_feas": eps})
    start = time.perf_counter()
    problem.solve(solver=solver, **options)
    if problem.status == cp.OPTIMAL_INACCURATE and solver == "SCS":  # stopped early: go on longer
        problem.solve(solver=solver, **{**options, "max_iters": 10 * max_iters})
    seconds = time.perf_counter() - start
    if P.value is None:
        raise RuntimeError(f"CVXPY/{solver} returned no solution (status {problem.status})")
    p = np.clip(P.value, 0.0, None)
    p /= p.sum(1, keepdims=True)
    return ReferenceSolution(
        P=p.T.reshape(L, H, W),
        objective=float(problem.value),
        status=str(problem.status),
        fractions=p.mean(0),
        seconds=seconds,
    )


def random_problem(
    batch: int,
    num_classes: int,
    height: int,
    width: int,
    *,
    present: int | tuple[int, int] = 3,
    scale: float | tuple[float, float] = 3.0,
    fg_bias: tuple[float, float] = (-6.0, 2.0),
    bg_bias: tuple[float, float] = (-2.0, 4.0),
    varied: bool = False,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
) -> tuple[Tensor, Tensor, Bounds]:
    """A batch of P-step problems: network-like logits and CCNN's tag constraints.

    Logits are smooth random score fields (bilinearly upsampled from a coarse grid) scaled to
    ``scale``; each present foreground class gets a bias drawn from ``fg_bias`` and the
    background one from ``bg_bias``, so the network under- or over-predicts what the tags say.
    With ``varied=True`` each image also draws its own constants — foreground lower bound
    0.05, 0.2 or 0.4 (three classes at 0.4 cannot all be met), foreground slack 0.5 or 2,
    background slack 1 or inf — so that slack is used.

    Args:
        present: foreground classes per image, or an inclusive ``(min, max)`` range.
        scale: logit scale, or a ``(min, max)`` range drawn per image.
        seed: everything is drawn from a generator seeded with it.

    Returns:
        ``(logits (B, L, H, W), tags (B, L), Bounds)``.
    """
    if num_classes < 2:
        raise ValueError("num_classes must be at least 2 (background and one class)")
    g = torch.Generator().manual_seed(seed)

    def draw(lo_hi: float | tuple[float, float], n: int) -> Tensor:
        lo, hi = (lo_hi, lo_hi) if isinstance(lo_hi, float | int) else lo_hi
        return torch.rand(n, generator=g, dtype=torch.float64) * (hi - lo) + lo

    coarse = torch.randn(batch, num_classes, 6, 6, generator=g, dtype=torch.float64)
    fields = torch.nn.functional.interpolate(coarse, size=(height, width), mode="bilinear",
                                             align_corners=False)
    fields = fields / fields.flatten(1).std(1).clamp(min=1e-12)[:, None, None, None]
    logits = fields * draw(scale, batch)[:, None, None, None]
    n_lo, n_hi = (present, present) if isinstance(present, int) else present
    n_hi = min(n_hi, num_classes - 1)
    tags = torch.zeros(batch, num_classes)
    for b in range(batch):
        n = int(torch.randint(n_lo, n_hi + 1, (1,), generator=g))
        cls = torch.randperm(num_classes - 1, generator=g)[:n] + 1
        tags[b, cls] = 1
        logits[b, cls] += draw(fg_bias, n)[:, None, None]
    logits[:, 0] += draw(bg_bias, batch)[:, None, None]
    bounds = tag_bounds(tags)
    if varied:
        pick = torch.randint(0, 6, (batch, 3), generator=g)
        fg_lower = torch.tensor([0.05, 0.2, 0.4], dtype=torch.float64)[pick[:, 0] % 3]
        fg_slack = torch.tensor([0.5, 2.0], dtype=torch.float64)[pick[:, 1] % 2]
        bg_slack = torch.tensor([1.0, math.inf], dtype=torch.float64)[pick[:, 2] % 2]
        fg = tags.bool()
        fg[:, 0] = False
        lower = torch.where(fg, fg_lower[:, None], bounds.lower)
        slack = torch.where(fg, fg_slack[:, None], bounds.slack)
        slack[:, 0] = bg_slack
        bounds = Bounds(lower, bounds.upper, slack)
    return logits.to(dtype), tags, bounds
