"""Property-based tests (hypothesis) of the P-step solver and of the projections of ``ccnn.hard``.

The P-step (``ccnn.latent.solve_latent``; Pathak, Krähenbühl and Darrell, "Constrained
Convolutional Neural Networks for Weakly Supervised Segmentation", 2015, Eq. 3–5) is checked on
random logits, tag sets and bounds — the hard ones feasible by construction — against quantities
recomputed here from its output: P a distribution at every pixel, exactly zero on the suppressed
classes, the stationarity condition ``P ∝ Q·exp(λ)`` with the returned multipliers, every bound
met or its slack priced at the cap (complementarity), the natural KKT residual, and the duality
gap between the primal objective at P and the dual (Eq. 3) at λ.

The projections of ``ccnn.hard.projections`` are checked on random points, batched, in float32
and float64: feasible, idempotent, non-expansive, the variational inequality
``⟨x − P(x), z − P(x)⟩ ≤ 0`` for points ``z`` of the set (which characterises the Euclidean
projection onto a closed convex set), and a batch equal to its rows one by one.

Hypothesis runs derandomized (the same examples every run, so CI is deterministic) and without
an example database.  ``pytest --hypothesis-show-statistics`` shows which cases the examples
covered (hard bounds active, soft bounds using their slack, suppressed classes, dtypes, batches).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from torch import Tensor

from ccnn.hard.projections import (
    project_affine,
    project_box,
    project_l1_ball,
    project_l2_ball,
    project_nonnegative,
    project_simplex,
)
from ccnn.latent import METHODS, latent_objective, solve_latent

F64 = torch.float64
PROPERTIES = settings(max_examples=40, deadline=None, derandomize=True, database=None,
                      suppress_health_check=[HealthCheck.too_slow])
SLACKS = (0.05, 0.5, 2.0, 20.0)  # β of a soft bound (a hard one has β = inf)
KKT_TOL = 1e-9  # the solver's tolerance on the natural residual in the tight test


# -- the P-step ------------------------------------------------------------------------------------

@dataclass
class Problem:
    """One random batch of P-step instances; the hard bounds all contain ``target``."""

    logits: Tensor  # (B, L, H, W) float64
    lower: Tensor  # (B, L)
    upper: Tensor
    slack: Tensor
    target: Tensor  # (B, L) class fractions that meet every hard bound (0 on suppressed classes)


@st.composite
def problems(draw: st.DrawFn) -> Problem:
    """Logits of any scale (Q uniform to near one-hot), tag sets (the untagged classes suppressed:
    upper = 0) and per-class bounds, each hard or soft.

    A hard bound ``[lower, upper]`` is drawn around ``target``, the fractions of a point of the
    simplex over the tagged classes, so the hard bounds are feasible together; a soft one is any
    interval of ``[0, 1]`` (it may be unmeetable and then use its slack).
    """
    B, L = draw(st.integers(1, 3)), draw(st.integers(2, 5))
    H, W = draw(st.integers(1, 4)), draw(st.integers(1, 4))
    scale = draw(st.sampled_from([0.0, 0.1, 1.0, 4.0, 12.0]))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    logits = scale * torch.randn(B, L, H, W, generator=g, dtype=F64)
    unit = st.floats(0.0, 1.0)
    shrink = st.one_of(st.just(0.0), st.floats(0.0, 0.2), unit)  # often tight hard intervals
    lower, upper = torch.zeros(B, L, dtype=F64), torch.zeros(B, L, dtype=F64)
    slack = torch.full((B, L), math.inf, dtype=F64)
    target = torch.zeros(B, L, dtype=F64)
    for b in range(B):
        tags = draw(st.lists(st.booleans(), min_size=L, max_size=L))
        tags[draw(st.integers(0, L - 1))] = True  # at least one class is tagged
        weights = torch.tensor([draw(st.floats(0.01, 1.0)) if t else 0.0 for t in tags], dtype=F64)
        target[b] = weights / weights.sum()
        for k in np.flatnonzero(tags):
            if draw(st.booleans()):  # hard (β = inf): an interval around the target
                m = float(target[b, k])
                lower[b, k] = m * (1.0 - draw(shrink))
                upper[b, k] = m + (1.0 - m) * draw(shrink)
            else:  # soft: any interval (upper > 0: upper = 0 would suppress the class)
                slack[b, k] = draw(st.sampled_from(SLACKS))
                lo, hi = sorted((draw(unit), draw(unit)))
                lower[b, k], upper[b, k] = lo, max(hi, 0.01)
    return Problem(logits, lower, upper, slack, target)


def natural_residual(lam: Tensor, m: Tensor, lower: Tensor, upper: Tensor, beta: Tensor
                     ) -> Tensor:
    """``|λ − prox_h(λ − m)|`` per bound, ``m`` the dual gradient (the class fractions of P).

    ``h(λ) = −(lower·λ⁺ − upper·λ⁻)`` on ``|λ| ≤ β`` (Eq. 3 and 5): its prox at ``z`` moves ``z``
    by ``+lower`` on the positive side, by ``+upper`` on the negative side, to 0 in between,
    then clips to ``[−β, β]``.
    """
    z = lam - m
    prox = torch.where(z + lower > 0, z + lower,
                       torch.where(z + upper < 0, z + upper, torch.zeros_like(z)))
    return (lam - torch.maximum(torch.minimum(prox, beta), -beta)).abs()


def dual_value(logits: Tensor, lam: Tensor, lower: Tensor, upper: Tensor) -> Tensor:
    """``F(λ) = (1/N)·Σ_i log Σ_l Q_i(l)·exp(λ_l) − Σ_l (lower_l·λ_l⁺ − upper_l·λ_l⁻)``, ``(B,)``
    (Eq. 3; ``λ = −inf`` drops a suppressed class).  ``−F(λ)`` is a lower bound of the primal."""
    logq = torch.log_softmax(logits, dim=1).flatten(2)
    smooth = torch.logsumexp(logq + lam[..., None], dim=1).mean(-1)
    live = torch.isfinite(lam)
    lam0 = torch.where(live, lam, 0.0)
    linear = lower * lam0.clamp(min=0) - upper * (-lam0).clamp(min=0)
    return smooth - torch.where(live, linear, 0.0).sum(-1)


def check_solution(p: Problem, method: str, tol: float) -> tuple:
    """Solve ``p`` and check what holds whether or not the solver converged; returns the result,
    the class fractions of P and the recomputed natural residual per bound."""
    r = solve_latent(p.logits, p.lower, p.upper, p.slack, method=method, tol=tol)
    P, lam, live = r.P, r.multipliers, p.upper > 0
    # P is a distribution at every pixel, exactly zero on the suppressed classes
    assert P.dtype == F64 and P.shape == p.logits.shape
    assert bool((P >= 0).all())
    torch.testing.assert_close(P.sum(1), torch.ones_like(P[:, 0]), atol=1e-12, rtol=0)
    assert bool((P.flatten(2)[~live] == 0).all())
    assert bool(torch.isneginf(lam[~live]).all()) and bool(torch.isfinite(lam[live]).all())
    # stationarity of the Lagrangian in P: P ∝ Q·exp(λ), recomputed from the multipliers
    torch.testing.assert_close(P, torch.softmax(p.logits + lam[..., None, None], dim=1),
                               atol=1e-10, rtol=0)
    # the reported violation and residual are those of P's class fractions m
    m = P.flatten(2).mean(-1)
    gap = (p.lower - m).clamp(min=0) + (m - p.upper).clamp(min=0)
    torch.testing.assert_close(r.violation, gap, atol=1e-12, rtol=0)
    res = torch.where(live, natural_residual(lam, m, p.lower, p.upper, p.slack), 0.0)
    torch.testing.assert_close(r.residual, res.amax(1), atol=1e-12, rtol=0)
    return r, m, res


@PROPERTIES
@given(problems())
def test_p_step_meets_the_kkt_conditions(p: Problem) -> None:
    """Newton at tol 1e-9: converged, hard bounds met, soft ones met or priced at β, the
    complementarity conditions hold, and the duality gap closes."""
    r, m, res = check_solution(p, "newton", KKT_TOL)
    lam, lo, hi, beta, live = r.multipliers, p.lower, p.upper, p.slack, p.upper > 0
    assert bool(r.converged.all()), f"residuals {r.residual.tolist()}"
    assert float(res.max()) <= KKT_TOL
    hard, soft = live & torch.isinf(beta), live & torch.isfinite(beta)
    assert bool((r.violation[hard] <= 1e-8).all())  # hard bounds hold
    # a soft bound left unmet uses its slack: its multiplier sits at the cap ±β
    short, over = soft & (m < lo - 1e-8), soft & (m > hi + 1e-8)
    assert bool(((lam - beta).abs()[short] <= 1e-8).all())
    assert bool(((lam + beta).abs()[over] <= 1e-8).all())
    # complementarity: a free positive multiplier holds m at lower, a negative one at upper,
    # a zero one leaves m inside [lower, upper]
    eps = 1e-7
    at_lo = live & (lam > eps) & (lam < beta - eps)
    at_hi = live & (lam < -eps) & (lam > -beta + eps)
    inside = live & (lam.abs() <= eps)
    assert bool(((m - lo).abs()[at_lo] <= 1e-8).all())
    assert bool(((m - hi).abs()[at_hi] <= 1e-8).all())
    assert bool(((m >= lo - 1e-8) & (m <= hi + 1e-8))[inside].all())
    for what, mask in [("a soft bound uses its slack", short | over),
                       ("a hard bound is active", hard & (at_lo | at_hi)),
                       ("a bound is active", at_lo | at_hi), ("a bound is slack", inside),
                       ("a class is suppressed", ~live)]:
        if bool(mask.any()):
            event(what)  # hypothesis --hypothesis-show-statistics counts the cases covered
    # duality: primal at P (soft bounds priced by β) against the dual at λ, both recomputed
    primal = latent_objective(p.logits, r.P, lo, hi, beta)
    gap = primal + dual_value(p.logits, lam, lo, hi)
    assert float(gap.abs().max()) <= 1e-7
    torch.testing.assert_close(r.duality_gap, gap, atol=1e-9, rtol=0)
    # and P does at least as well as a known feasible point: the target at every pixel
    known = p.target[:, :, None, None].expand_as(p.logits)
    assert bool((primal <= latent_objective(p.logits, known, lo, hi, beta) + 1e-9).all())


@PROPERTIES
@pytest.mark.parametrize("method", METHODS)
@given(p=problems())
def test_p_step_structure_for_both_methods(method: str, p: Problem) -> None:
    """Both methods at their default tolerance: a distribution, exact suppression, stationarity,
    and the reported violation and residual match P; converged images have residual ≤ tol."""
    r, _, res = check_solution(p, method, 1e-6)
    assert bool((res.amax(1)[r.converged] <= 1e-6).all())


@settings(PROPERTIES, max_examples=20)
@given(problems())
def test_p_step_float32_logits(p: Problem) -> None:
    """float32 logits give float32 P: a distribution, exactly zero where suppressed, and the
    float64 answer to float32 accuracy."""
    r32 = solve_latent(p.logits.float(), p.lower, p.upper, p.slack)
    r64 = solve_latent(p.logits.float().double(), p.lower, p.upper, p.slack)
    P = r32.P
    assert P.dtype == torch.float32 and bool((P >= 0).all())
    torch.testing.assert_close(P.sum(1), torch.ones_like(P[:, 0]), atol=1e-6, rtol=0)
    assert bool((P.flatten(2)[p.upper == 0] == 0).all())
    torch.testing.assert_close(P.double(), r64.P, atol=1e-6, rtol=0)


# -- the projections -------------------------------------------------------------------------------

@dataclass
class ConvexSet:
    """A set of ``ccnn.hard.projections`` with its parameters drawn for one batch shape.

    ``project(x)`` projects a whole batch, ``project_row(x, i)`` the ``i``-th row (flat index
    over the batch dimensions) with that row's parameters, ``distance(y)`` how far each row of
    ``y`` is from meeting the set's conditions (0 inside).
    """

    name: str
    project: Callable[[Tensor], Tensor]
    project_row: Callable[[Tensor, int], Tensor]
    distance: Callable[[Tensor], Tensor]


def _radius(draw: st.DrawFn, batch: tuple[int, ...], dtype: torch.dtype) -> Tensor:
    """A radius ≥ 0: one for the batch, or one per row."""
    if draw(st.booleans()):
        return torch.tensor(draw(st.floats(0.0, 5.0)), dtype=dtype)
    return torch.from_numpy(draw(arrays(np.float64, batch, elements=st.floats(0.0, 5.0)))).to(dtype)


SETS = ("nonnegative", "box", "simplex", "l1_ball", "l2_ball", "affine")


@st.composite
def convex_sets(draw: st.DrawFn, name: str, batch: tuple[int, ...], n: int, dtype: torch.dtype
                ) -> ConvexSet:
    """The set ``name``, its parameters drawn (per row where the projection allows)."""
    rows = math.prod(batch)

    def norm(y: Tensor) -> Tensor:
        return torch.linalg.vector_norm(y, dim=-1)

    if name == "nonnegative":
        return ConvexSet(name, project_nonnegative, lambda x, i: project_nonnegative(x),
                         lambda y: (-y).clamp(min=0).amax(-1))
    if name == "box":
        shape = draw(st.sampled_from([(n,), (*batch, n)]))
        half = arrays(np.float64, shape, elements=st.one_of(st.floats(0.0, 5.0), st.just(math.inf)))
        centre = torch.from_numpy(draw(arrays(np.float64, shape, elements=st.floats(-5.0, 5.0))))
        lo = (centre - torch.from_numpy(draw(half))).to(dtype)  # ±inf: a half-open box
        hi = (centre + torch.from_numpy(draw(half))).to(dtype)
        lo_rows = torch.broadcast_to(lo, (*batch, n)).reshape(rows, n)
        hi_rows = torch.broadcast_to(hi, (*batch, n)).reshape(rows, n)
        return ConvexSet(name, lambda x: project_box(x, lo, hi),
                         lambda x, i: project_box(x, lo_rows[i], hi_rows[i]),
                         lambda y: ((lo - y).clamp(min=0) + (y - hi).clamp(min=0)).amax(-1))
    if name == "affine":
        m = draw(st.integers(1, n))
        g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
        # well conditioned (singular values in [0.5, 2]); optionally a repeated row (rank m − 1)
        U, _ = torch.linalg.qr(torch.randn(m, m, generator=g, dtype=F64))
        V, _ = torch.linalg.qr(torch.randn(n, m, generator=g, dtype=F64))
        A = U @ torch.diag(0.5 + 1.5 * torch.rand(m, generator=g, dtype=F64)) @ V.T
        if m > 1 and draw(st.booleans()):
            A[-1] = A[0]
        b = A @ (3.0 * torch.randn(n, generator=g, dtype=F64))
        A, b = A.to(dtype), b.to(dtype)
        return ConvexSet(name, lambda x: project_affine(x, A, b),
                         lambda x, i: project_affine(x, A, b),
                         lambda y: (y @ A.T - b).abs().amax(-1))
    r = _radius(draw, batch, dtype)
    r_rows = torch.broadcast_to(r, batch).reshape(rows)
    if name == "simplex":
        return ConvexSet(name, lambda x: project_simplex(x, r),
                         lambda x, i: project_simplex(x, r_rows[i]),
                         lambda y: torch.maximum((-y).clamp(min=0).amax(-1),
                                                 (y.sum(-1) - r).abs()))
    if name == "l1_ball":
        return ConvexSet(name, lambda x: project_l1_ball(x, r),
                         lambda x, i: project_l1_ball(x, r_rows[i]),
                         lambda y: (y.abs().sum(-1) - r).clamp(min=0))
    return ConvexSet(name, lambda x: project_l2_ball(x, r),
                     lambda x, i: project_l2_ball(x, r_rows[i]),
                     lambda y: (norm(y) - r).clamp(min=0))


@st.composite
def projection_cases(draw: st.DrawFn, name: str) -> tuple[ConvexSet, Tensor, Tensor, Tensor]:
    """The set ``name`` and three batches of points ``x``, ``y``, ``w`` of one shape and dtype."""
    dtype = draw(st.sampled_from([torch.float32, F64]))
    batch = tuple(draw(st.lists(st.integers(1, 3), max_size=2)))
    n = draw(st.integers(1, 6))
    points = arrays(np.float64, (*batch, n), elements=st.floats(-10.0, 10.0))
    x, y, w = (torch.from_numpy(draw(points)).to(dtype) for _ in range(3))
    return draw(convex_sets(name, batch, n, dtype)), x, y, w


def _tol(dtype: torch.dtype) -> float:
    return 1e-4 if dtype == torch.float32 else 1e-10


@settings(PROPERTIES, max_examples=30)
@pytest.mark.parametrize("name", SETS)
@given(data=st.data())
def test_projection_properties(name: str, data: st.DataObject) -> None:
    """Feasible, idempotent, non-expansive, the variational inequality, batched = row by row."""
    S, x, y, w = data.draw(projection_cases(name))
    tol, n = _tol(x.dtype), x.shape[-1]
    event(f"{x.dtype}, batch {tuple(x.shape[:-1])}")

    def norm(v: Tensor) -> Tensor:
        return torch.linalg.vector_norm(v.double(), dim=-1)

    Px, Py, z = S.project(x), S.project(y), S.project(w)
    assert Px.shape == x.shape and Px.dtype == x.dtype
    scale = 1.0 + norm(x)
    # feasible, and idempotent: P(P(x)) = P(x)
    assert bool((S.distance(Px).double() <= tol * scale).all()), S.name
    assert bool((norm(S.project(Px) - Px) <= tol * scale).all()), S.name
    # non-expansive: ‖P(x) − P(y)‖ ≤ ‖x − y‖
    slack = tol * (1.0 + norm(x) + norm(y))
    assert bool((norm(Px - Py) <= norm(x - y) + slack).all()), S.name
    # the projection's optimality condition: ⟨x − P(x), z − P(x)⟩ ≤ 0 for every z of the set
    # (here z = P(w))
    inner = ((x - Px).double() * (z - Px).double()).sum(-1)
    assert bool((inner <= tol * (1.0 + norm(x - Px)) * (1.0 + norm(z - Px))).all()), S.name
    # a batch is its rows projected one at a time, each with its own parameters
    rows = x.reshape(-1, n)
    one_by_one = torch.stack([S.project_row(rows[i], i) for i in range(rows.shape[0])])
    torch.testing.assert_close(Px.reshape(-1, n), one_by_one, atol=tol * float(scale.max()),
                               rtol=0)
