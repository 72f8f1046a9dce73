"""Tests of ccnn.hard.projections and ccnn.hard.reparam against CVXPY, NumPy and closed forms."""

from __future__ import annotations

import copy
import logging
import warnings
from collections.abc import Callable

import cvxpy as cp
import numpy as np
import pytest
import torch
from torch.nn.utils import parametrize

from ccnn.hard.projections import (
    Projected,
    affine_projection,
    dykstra,
    project_affine,
    project_box,
    project_l1_ball,
    project_l2_ball,
    project_nonnegative,
    project_simplex,
)
from ccnn.hard.reparam import Box, Positive, Simplex

F64 = torch.float64
# Agreement with CVXPY. An interior-point solution is off by about sqrt(duality gap) in y (the
# objective is 1-strongly convex), so CLARABEL runs at 1e-12 gap/feasibility tolerances; it then
# sometimes reports "optimal_inaccurate" for the l2 ball while its point agrees to ~1e-13, hence
# that status is accepted and the comparison itself is the check (observed errors <= 3e-7).
TOL = 1e-6
CLARABEL = {"solver": cp.CLARABEL, "tol_gap_abs": 1e-12, "tol_gap_rel": 1e-12, "tol_feas": 1e-12,
            "tol_ktratio": 1e-12, "max_iter": 500}


def t(a) -> torch.Tensor:
    return torch.as_tensor(np.asarray(a, dtype=np.float64))


def solve_cvxpy(x: np.ndarray, constraints: Callable[[cp.Variable], list]) -> np.ndarray:
    """``argmin ‖y − x‖²`` subject to ``constraints(y)``, by CLARABEL at tight tolerances."""
    y = cp.Variable(x.shape[0])
    prob = cp.Problem(cp.Minimize(cp.sum_squares(y - x)), constraints(y))
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Solution may be inaccurate")
        prob.solve(**CLARABEL)
    assert prob.status in (cp.OPTIMAL, cp.OPTIMAL_INACCURATE), prob.status
    return np.asarray(y.value)


# ---- the sets: (torch projection, cvxpy constraints, a point inside) -----------------------------


def _affine_data(n: int, seed: int = 7) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    m = max(1, n // 3)
    return rng.normal(size=(m, n)), rng.normal(size=m)


def make_set(name: str, n: int) -> tuple[Callable, Callable, Callable]:
    """(projection, cvxpy constraints, sampler of a point inside) for a set in ℝⁿ."""
    lo = np.linspace(-0.5, 0.1, n)
    hi = lo + np.linspace(0.2, 1.5, n)
    A, b = _affine_data(n)
    sets = {
        "nonnegative": (project_nonnegative, lambda y: [y >= 0], lambda r: np.abs(r)),
        "box": (
            lambda x: project_box(x, t(lo).to(x), t(hi).to(x)),
            lambda y: [y >= lo, y <= hi],
            lambda r: lo + (hi - lo) * (np.tanh(r) + 1) / 2,
        ),
        "simplex": (
            project_simplex,
            lambda y: [y >= 0, cp.sum(y) == 1],
            lambda r: np.exp(r) / np.exp(r).sum(),
        ),
        "simplex_r2.5": (
            lambda x: project_simplex(x, 2.5),
            lambda y: [y >= 0, cp.sum(y) == 2.5],
            lambda r: 2.5 * np.exp(r) / np.exp(r).sum(),
        ),
        "l1_ball": (
            lambda x: project_l1_ball(x, 1.5),
            lambda y: [cp.norm1(y) <= 1.5],
            lambda r: 1.4 * r / np.abs(r).sum(),
        ),
        "l2_ball": (
            lambda x: project_l2_ball(x, 2.0),
            lambda y: [cp.norm2(y) <= 2.0],
            lambda r: 1.9 * r / np.linalg.norm(r),
        ),
        "affine": (
            lambda x: project_affine(x, t(A).to(x), t(b).to(x)),
            lambda y: [A @ y == b],
            lambda r: r - np.linalg.pinv(A) @ (A @ r - b),
        ),
    }
    return sets[name]


SET_NAMES = ["nonnegative", "box", "simplex", "simplex_r2.5", "l1_ball", "l2_ball", "affine"]


@pytest.mark.parametrize("name", SET_NAMES)
def test_against_cvxpy(name: str) -> None:
    for n, seed in [(3, 0), (6, 1), (10, 2), (200, 3)]:
        proj, cons, inside = make_set(name, n)
        rng = np.random.default_rng(seed)
        outside = [3.0 * rng.normal(size=n), rng.normal(size=n) + 2.0]
        for x in outside:
            y = proj(t(x)).numpy()
            np.testing.assert_allclose(y, solve_cvxpy(x, cons), atol=TOL, rtol=0)
        x_in = inside(rng.normal(size=n))
        np.testing.assert_allclose(solve_cvxpy(x_in, cons), x_in, atol=TOL, rtol=0)
        np.testing.assert_allclose(proj(t(x_in)).numpy(), x_in, atol=1e-12, rtol=0)


# ---- the examples of the notes on projections and Lagrange multipliers ---------------------------


def notes_project_simplex(v: torch.Tensor) -> torch.Tensor:
    """The notes' simplex projection, transcribed verbatim (1-D only)."""
    sorted_v, _indices = torch.sort(v, descending=True)
    cumsum = torch.cumsum(sorted_v, dim=0)
    rho = torch.where(
        sorted_v - (1.0 / torch.arange(1, len(v) + 1, device=v.device)) * (cumsum - 1) > 0
    )[0]
    rho_val = 0 if len(rho) == 0 else rho[-1].item()
    theta = (cumsum[int(rho_val)] - 1) / (rho_val + 1)
    return torch.clamp(v - theta, min=0)


def test_simplex_example_of_notes() -> None:
    # The notes' vector: sorted 3.0, 1.2, 0.5, -0.2; ρ = 1 (1.2 − (4.2 − 1)/2 < 0), θ = 2.
    w = torch.tensor([0.5, -0.2, 1.2, 3.0])
    assert torch.equal(project_simplex(w), torch.tensor([0.0, 0.0, 0.0, 1.0]))
    assert torch.equal(notes_project_simplex(w), torch.tensor([0.0, 0.0, 0.0, 1.0]))
    # A hand-computed interior case: [0.4, 0.3, 0.1] sums to 0.8, so θ = −0.2/3.
    got = project_simplex(t([0.4, 0.3, 0.1]))
    torch.testing.assert_close(got, t([0.4, 0.3, 0.1]) + 0.2 / 3, atol=1e-15, rtol=0)

    # The notes' training loop (Follow-up Question 6): a 4-parameter linear model, 100 samples,
    # SGD lr 0.1, 10 epochs, projection onto the simplex after each step.
    g = torch.Generator().manual_seed(0)
    init = torch.rand(4, generator=g)
    X, y = torch.randn(100, 4, generator=g), torch.randn(100, generator=g)

    def run(use_wrapper: bool) -> tuple[list[float], torch.Tensor]:
        params = torch.nn.Parameter(init.clone())
        optimizer = torch.optim.SGD([params], lr=0.1)
        if use_wrapper:
            optimizer = Projected(optimizer, {params: project_simplex})
        losses = []
        for _ in range(10):
            optimizer.zero_grad()
            loss = (((X * params).sum(dim=1) - y) ** 2).mean()
            loss.backward()
            optimizer.step()
            if not use_wrapper:
                with torch.no_grad():
                    params.data = notes_project_simplex(params.data)
            losses.append(loss.item())
            assert float(params.data.sum()) == pytest.approx(1.0, abs=1e-6)
            assert bool((params.data >= 0).all())
        return losses, params.data

    losses_notes, w_notes = run(False)
    losses_ours, w_ours = run(True)
    assert losses_ours == losses_notes  # bit for bit, every epoch
    assert torch.equal(w_ours, w_notes)


def test_nonnegative_example_of_notes() -> None:
    # The notes' first snippet: L(w) = Σ w², lr 0.01, 100 steps, clamp at 0 after each step.
    # Closed form: each positive entry is multiplied by (1 − 2·0.01) per step; −0.2 → 0 at once.
    w = torch.nn.Parameter(torch.tensor([0.5, -0.2, 1.2, 3.0]))
    opt = Projected(torch.optim.SGD([w], lr=0.01), [(w, project_nonnegative)])
    w_ref = torch.tensor([0.5, -0.2, 1.2, 3.0], requires_grad=True)
    for _ in range(100):
        opt.zero_grad()
        (w**2).sum().backward()
        opt.step()
        loss = (w_ref**2).sum()
        loss.backward()
        with torch.no_grad():
            w_ref -= 0.01 * w_ref.grad
        w_ref.grad.zero_()
        w_ref.data.clamp_(min=0.0)
    # SGD's fused update rounds differently from ``w -= lr * grad``: equal to float32 accuracy
    torch.testing.assert_close(w.data, w_ref.data, rtol=1e-6, atol=0)
    expected = torch.tensor([0.5, 0.0, 1.2, 3.0]) * 0.98**100
    torch.testing.assert_close(w.data, expected, rtol=1e-5, atol=0)


# ---- batching, dtypes, idempotence, feasibility, non-expansiveness -------------------------------


def feasible(name: str, y: torch.Tensor, n: int, tol: float) -> bool:
    lo, hi = t(np.linspace(-0.5, 0.1, n)), None
    hi = lo + t(np.linspace(0.2, 1.5, n))
    A, b = _affine_data(n)
    y = y.to(F64)
    checks = {
        "nonnegative": lambda: bool((y >= -tol).all()),
        "box": lambda: bool(((y >= lo - tol) & (y <= hi + tol)).all()),
        "simplex": lambda: bool((y >= -tol).all() and ((y.sum(-1) - 1).abs() <= tol).all()),
        "simplex_r2.5": lambda: bool((y >= -tol).all() and ((y.sum(-1) - 2.5).abs() <= tol).all()),
        "l1_ball": lambda: bool((y.abs().sum(-1) <= 1.5 + tol).all()),
        "l2_ball": lambda: bool((torch.linalg.vector_norm(y, dim=-1) <= 2.0 + tol).all()),
        "affine": lambda: bool(((y @ t(A).T - t(b)).abs() <= tol).all()),
    }
    return checks[name]()


@pytest.mark.parametrize("name", SET_NAMES)
def test_batched_dtypes_idempotent_feasible_nonexpansive(name: str) -> None:
    n = 7
    proj = make_set(name, n)[0]
    g = torch.Generator().manual_seed(11)
    x = 2.0 * torch.randn(3, 4, n, generator=g, dtype=F64)
    x[0, 0] = proj(x[0, 0]) * 0.5 if name != "affine" else proj(x[0, 0])  # some points inside
    y = proj(x)
    assert y.shape == x.shape and y.dtype == F64
    rows = torch.stack([proj(r) for r in x.reshape(-1, n)]).reshape(x.shape)
    torch.testing.assert_close(y, rows, atol=1e-14, rtol=0)
    # float32: same answer to float32 accuracy, dtype kept
    y32 = proj(x.float())
    assert y32.dtype == torch.float32
    torch.testing.assert_close(y32.double(), y, atol=2e-5, rtol=0)
    assert feasible(name, y, n, 1e-12) and feasible(name, y32, n, 1e-5)
    torch.testing.assert_close(proj(y), y, atol=1e-13, rtol=0)  # P(P(x)) = P(x)
    # non-expansive on random pairs
    x2 = x + torch.randn(x.shape, generator=g, dtype=F64) * torch.rand(3, 4, 1, generator=g,
                                                                       dtype=F64)
    d_out = torch.linalg.vector_norm(proj(x2) - y, dim=-1)
    d_in = torch.linalg.vector_norm(x2 - x, dim=-1)
    assert bool((d_out <= d_in + 1e-12).all())
    assert bool((d_out < d_in - 1e-3).any()) or name == "affine" or name == "nonnegative"


def test_radius_per_row_and_zero() -> None:
    g = torch.Generator().manual_seed(3)
    x = torch.randn(3, 5, generator=g, dtype=F64)
    r = t([0.5, 1.0, 2.0])
    for proj in (project_simplex, project_l1_ball, project_l2_ball):
        y = proj(x, r)
        for i in range(3):
            torch.testing.assert_close(y[i], proj(x[i], float(r[i])), atol=1e-15, rtol=0)
        assert torch.equal(proj(x, 0.0), torch.zeros_like(x))


# ---- derivatives ---------------------------------------------------------------------------------


def test_simplex_and_l2_jacobians_explicit() -> None:
    x = t([0.9, -0.4, 0.45, 0.2, 1.1])  # away from kinks: ρ = 2, θ = 0.5, y = [.4, 0, 0, 0, .6]
    y = project_simplex(x)
    torch.testing.assert_close(y, t([0.4, 0, 0, 0, 0.6]), atol=1e-15, rtol=0)
    s = (y > 0).to(F64)  # support {0, 4}
    J_explicit = torch.diag(s) - torch.outer(s, s) / s.sum()
    torch.testing.assert_close(torch.func.jacrev(project_simplex)(x), J_explicit,
                               atol=1e-14, rtol=0)
    nx = torch.linalg.vector_norm(x)
    J_l2 = 1.0 / nx * (torch.eye(5, dtype=F64) - torch.outer(x, x) / nx**2)
    torch.testing.assert_close(torch.func.jacrev(project_l2_ball)(x), J_l2, atol=1e-14, rtol=0)
    A, b = _affine_data(5)
    P_null = torch.eye(5, dtype=F64) - t(np.linalg.pinv(A) @ A)
    J_aff = torch.func.jacrev(lambda z: project_affine(z, t(A), t(b)))(x)
    torch.testing.assert_close(J_aff, P_null, atol=1e-12, rtol=0)
    # l1 ball (radius 1.2: ρ = 3, θ = 1.25/3): J = D (diag(s) − s sᵀ/|S|) D with D = diag(sign x)
    J_l1 = torch.func.jacrev(lambda z: project_l1_ball(z, 1.2))(x)
    s1 = t([1.0, 0.0, 1.0, 0.0, 1.0])
    D = torch.diag(torch.sign(x))
    torch.testing.assert_close(J_l1, D @ (torch.diag(s1) - torch.outer(s1, s1) / 3) @ D,
                               atol=1e-14, rtol=0)
    x_req = x.clone().requires_grad_()
    assert torch.autograd.gradcheck(lambda z: project_l1_ball(z, 1.2), (x_req,))


# ---- affine: rank deficiency and infeasibility ---------------------------------------------------


def test_affine_rank_deficient_consistent() -> None:
    rng = np.random.default_rng(5)
    A = rng.normal(size=(4, 2)) @ rng.normal(size=(2, 6))  # 4 × 6, rank 2
    b = A @ rng.normal(size=6)  # consistent
    X = rng.normal(size=(5, 6))
    Y = project_affine(t(X), t(A), t(b)).numpy()
    Y_ref = X - (np.linalg.pinv(A) @ (X @ A.T - b).T).T
    np.testing.assert_allclose(Y, Y_ref, atol=1e-12, rtol=0)
    np.testing.assert_allclose(Y @ A.T, np.broadcast_to(b, (5, 4)), atol=1e-12, rtol=0)
    # minimum-norm correction: it lies in range(Aᵀ), orthogonal to null(A)
    null = np.linalg.svd(A)[2][2:]
    np.testing.assert_allclose((Y - X) @ null.T, 0.0, atol=1e-12)
    # a precomputed projector gives the same, also in float32
    P = affine_projection(t(A), t(b))
    np.testing.assert_allclose(P(t(X)).numpy(), Y_ref, atol=1e-12, rtol=0)
    np.testing.assert_allclose(P(t(X).float()).double().numpy(), Y_ref, atol=1e-4, rtol=0)


def test_affine_inconsistent_raises() -> None:
    A = t([[1.0, 1.0, 0.0], [2.0, 2.0, 0.0]])
    with pytest.raises(ValueError, match="infeasible affine constraints"):
        project_affine(t([1.0, 2.0, 3.0]), A, t([1.0, 3.0]))
    with pytest.raises(ValueError, match="infeasible affine constraints"):
        affine_projection(A.float(), torch.tensor([1.0, 2.1]))
    # the consistent right-hand side passes
    y = project_affine(t([1.0, 2.0, 3.0]), A, t([1.0, 2.0]))
    torch.testing.assert_close(y, t([0.0, 1.0, 3.0]), atol=1e-14, rtol=0)


# ---- Dykstra -------------------------------------------------------------------------------------


def test_dykstra_box_l2_ball_against_cvxpy() -> None:
    n = 6
    lo, hi = -0.3 * np.ones(n), 0.8 * np.ones(n)
    sets = [lambda z: project_box(z, -0.3, 0.8), lambda z: project_l2_ball(z, 1.0)]
    rng = np.random.default_rng(0)
    X = np.stack([2.0 * rng.normal(size=n) for _ in range(3)] + [0.1 * rng.normal(size=n)])
    Y, info = dykstra(t(X), sets, tol=1e-12, max_iter=5000)
    assert info.converged and info.change <= 1e-12 * max(1.0, np.linalg.norm(X, axis=1).max())
    for x, y in zip(X, Y.numpy(), strict=True):
        ref = solve_cvxpy(x, lambda v: [v >= lo, v <= hi, cp.norm2(v) <= 1.0])
        np.testing.assert_allclose(y, ref, atol=TOL, rtol=0)
    # alternating projections without the increments stop at a different, farther point
    x = t(X[0])
    pocs = x
    for _ in range(200):
        pocs = sets[1](sets[0](pocs))
    assert float((pocs - x).norm()) > float((Y[0] - x).norm()) + 1e-3


def test_dykstra_simplex_box_against_cvxpy() -> None:
    n = 5
    sets = [project_simplex, lambda z: project_box(z, 0.0, 0.3)]
    rng = np.random.default_rng(1)
    for _ in range(3):
        x = rng.normal(size=n)
        y, info = dykstra(t(x), sets, tol=1e-12, max_iter=5000)
        assert info.converged
        ref = solve_cvxpy(x, lambda v: [v >= 0, cp.sum(v) == 1, v <= 0.3])
        np.testing.assert_allclose(y.numpy(), ref, atol=TOL, rtol=0)


def test_dykstra_single_set_and_not_converged(caplog: pytest.LogCaptureFixture) -> None:
    x = t([[3.0, -1.0, 0.5], [0.1, 0.2, 0.3]])
    y, info = dykstra(x, [project_simplex])
    torch.testing.assert_close(y, project_simplex(x), atol=1e-15, rtol=0)
    assert info.converged and info.iterations == 2
    sets = [project_simplex, lambda z: project_box(z, 0.0, 0.4)]
    with caplog.at_level(logging.WARNING, logger="ccnn.hard.projections"):
        _, info = dykstra(t([3.0, -1.0, 0.5]), sets, max_iter=1)
    assert not info.converged and info.iterations == 1 and info.change > 0
    assert "did not converge" in caplog.text


# ---- projected optimizers ------------------------------------------------------------------------


def _quadratic(w: torch.Tensor, M: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    return ((w @ M.T - c) ** 2).sum()


@pytest.mark.parametrize("make_opt", [
    lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9),
    lambda ps: torch.optim.Adam(ps, lr=0.05),
])
def test_projected_equals_step_then_project(make_opt: Callable) -> None:
    g = torch.Generator().manual_seed(2)
    M, c = torch.randn(6, 4, generator=g, dtype=F64), torch.randn(6, generator=g, dtype=F64)
    W0 = torch.randn(3, 4, generator=g, dtype=F64)  # 3 rows, each projected onto the simplex
    v0 = torch.randn(4, generator=g, dtype=F64)  # not projected

    W, v = torch.nn.Parameter(W0.clone()), torch.nn.Parameter(v0.clone())
    opt = Projected(make_opt([W, v]), {W: project_simplex})
    W_ref, v_ref = torch.nn.Parameter(W0.clone()), torch.nn.Parameter(v0.clone())
    opt_ref = make_opt([W_ref, v_ref])
    for _ in range(15):
        def closure() -> torch.Tensor:
            opt.zero_grad()
            loss = _quadratic(W, M, c) + _quadratic(v, M, c)
            loss.backward()
            return loss
        loss = opt.step(closure)
        assert isinstance(loss, torch.Tensor)  # the closure's loss comes back
        opt_ref.zero_grad()
        loss_ref = _quadratic(W_ref, M, c) + _quadratic(v_ref, M, c)
        loss_ref.backward()
        opt_ref.step()
        with torch.no_grad():
            W_ref.copy_(project_simplex(W_ref))
        assert loss.item() == loss_ref.item()
        torch.testing.assert_close(W.data, W_ref.data, atol=0, rtol=0)
        torch.testing.assert_close(v.data, v_ref.data, atol=0, rtol=0)
        assert bool((W >= 0).all()) and torch.allclose(W.sum(-1), torch.ones(3, dtype=F64))
    assert opt.param_groups is opt.optimizer.param_groups
    assert opt.state_dict()["state"].keys() == opt_ref.state_dict()["state"].keys()


def test_projected_state_dict_roundtrip_and_scheduler() -> None:
    g = torch.Generator().manual_seed(4)
    M, c = torch.randn(6, 4, generator=g, dtype=F64), torch.randn(6, generator=g, dtype=F64)

    def train(w: torch.nn.Parameter, opt: Projected, steps: int) -> None:
        for _ in range(steps):
            opt.zero_grad()
            _quadratic(w, M, c).backward()
            opt.step()

    w = torch.nn.Parameter(torch.randn(4, generator=g, dtype=F64))
    opt = Projected(torch.optim.Adam([w], lr=0.1), [([w], lambda z: project_l2_ball(z, 0.5))])
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    for _ in range(4):
        train(w, opt, 1)
        sched.step()
    assert opt.optimizer.param_groups[0]["lr"] == pytest.approx(0.025)
    saved, w_saved = copy.deepcopy(opt.state_dict()), w.detach().clone()
    train(w, opt, 5)

    w2 = torch.nn.Parameter(w_saved.clone())
    opt2 = Projected(torch.optim.Adam([w2], lr=0.1), {w2: lambda z: project_l2_ball(z, 0.5)})
    opt2.load_state_dict(saved)
    assert opt2.param_groups[0]["lr"] == pytest.approx(0.025)
    assert opt2.optimizer.state[w2]["step"] == 4
    train(w2, opt2, 5)
    torch.testing.assert_close(w2.data, w.data, atol=0, rtol=0)
    assert float(w.detach().norm()) <= 0.5 + 1e-12
    opt.zero_grad()
    assert w.grad is None


def test_projected_start_and_add_group() -> None:
    a = torch.nn.Parameter(torch.tensor([2.0, -1.0]))
    b = torch.nn.Parameter(torch.tensor([5.0]))
    opt = Projected(torch.optim.SGD([a], lr=0.1), {a: project_nonnegative})
    opt.project()
    assert torch.equal(a.data, torch.tensor([2.0, 0.0]))
    opt.add_param_group({"params": [b], "lr": 1.0})
    assert len(opt.optimizer.param_groups) == 2
    opt.add_projection(b, lambda z: project_box(z, 0.0, 1.0))
    b.grad, a.grad = torch.tensor([-1.0]), torch.zeros(2)
    opt.step()
    assert torch.equal(b.data, torch.tensor([1.0]))


# ---- reparameterizations -------------------------------------------------------------------------


@pytest.mark.parametrize("param", [
    Positive("exp"), Positive("softplus"), Box(t([-1.0, 0.0, 2.0]), 3.0), Simplex(dim=-1),
])
def test_reparam_in_set_roundtrip_gradients(param: torch.nn.Module) -> None:
    g = torch.Generator().manual_seed(6)
    theta = 3.0 * torch.randn(4, 3, generator=g, dtype=F64)
    w = param(theta)
    if isinstance(param, Positive):
        assert bool((w > 0).all())
    elif isinstance(param, Box):
        assert bool(((w > param.lower) & (w < param.upper)).all())
    else:
        assert bool((w > 0).all()) and torch.allclose(w.sum(-1), torch.ones(4, dtype=F64))
    # right_inverse round trip w -> θ -> w (θ itself only up to a constant for softmax)
    torch.testing.assert_close(param(param.right_inverse(w)), w, atol=1e-12, rtol=1e-10)
    # registered on a Linear: the value is kept, gradients reach the unconstrained original
    lin = torch.nn.Linear(3, 4, bias=False).to(F64)
    with torch.no_grad():
        lin.weight.copy_(w)
    parametrize.register_parametrization(lin, "weight", param)
    torch.testing.assert_close(lin.weight, w, atol=1e-12, rtol=1e-10)
    x = torch.randn(5, 3, generator=g, dtype=F64)
    G = torch.randn(5, 4, generator=g, dtype=F64)
    (lin(x) * G).sum().backward()
    grad = lin.parametrizations.weight.original.grad
    dL_dw = G.T @ x  # gradient wrt w of Σ G ⊙ (x wᵀ)
    orig = lin.parametrizations.weight.original.detach()
    if isinstance(param, Positive):
        dw = torch.exp(orig) if param.kind == "exp" else torch.sigmoid(orig)
        expected = dL_dw * dw
    elif isinstance(param, Box):
        s = torch.sigmoid(orig)
        expected = dL_dw * (param.upper - param.lower) * s * (1 - s)
    else:  # softmax Jacobian diag(w) − w wᵀ per row
        expected = w * (dL_dw - (dL_dw * w).sum(-1, keepdim=True))
    torch.testing.assert_close(grad, expected, atol=1e-12, rtol=1e-10)


def test_reparam_boundary_and_errors() -> None:
    # boundary values are moved inside by about the dtype's tiny / eps
    w = t([[0.0, 0.25, 0.75]])
    torch.testing.assert_close(Simplex()(Simplex().right_inverse(w)), w, atol=1e-300, rtol=1e-15)
    torch.testing.assert_close(Positive()(Positive().right_inverse(w)), w, atol=1e-300, rtol=1e-15)
    bx = Box(0.0, 2.0)
    wb = t([0.0, 1.0, 2.0])
    torch.testing.assert_close(bx(bx.right_inverse(wb)), wb, atol=1e-15, rtol=0)
    with pytest.raises(ValueError, match=r"must be >= 0"):
        Positive("softplus").right_inverse(t([1.0, -0.1]))
    with pytest.raises(ValueError, match=r"must sum to 1"):
        Simplex().right_inverse(t([0.2, 0.2]))
    with pytest.raises(ValueError, match=r"must be >= 0"):
        Simplex().right_inverse(t([1.2, -0.2]))
    with pytest.raises(ValueError, match=r"must lie in \[lower, upper\]"):
        bx.right_inverse(t([2.5]))
    with pytest.raises(ValueError, match="lower must be < upper"):
        Box(1.0, 1.0)
    with pytest.raises(ValueError, match="kind must be"):
        Positive("square")
    with pytest.raises(ValueError, match="must be >= 0"):  # registration keeps the value
        parametrize.register_parametrization(torch.nn.Linear(3, 4), "weight", Positive())


def test_simplex_training_reaches_constrained_optimum() -> None:
    # min ‖M w − c‖² over the simplex with a known interior optimum w*: c = M w* + ν with
    # Mᵀν = α·1, so the gradient at w* is −2α·1 (KKT with multiplier 2α, no active bound) while
    # the unconstrained least-squares optimum w* + α (MᵀM)⁻¹ 1 lies off the simplex.
    g = torch.Generator().manual_seed(8)
    M = torch.randn(8, 4, generator=g, dtype=F64)
    w_star = t([0.1, 0.2, 0.3, 0.4])
    Q = torch.linalg.qr(M, mode="complete").Q[:, 4:]  # basis of null(Mᵀ)
    nu = 0.5 * M @ torch.linalg.solve(M.T @ M, torch.ones(4, dtype=F64))
    nu = nu + Q @ torch.randn(4, generator=g, dtype=F64)
    c = M @ w_star + nu
    assert abs(float(torch.linalg.lstsq(M, c).solution.sum()) - 1) > 0.1

    # the projection-based answer: projected gradient descent with step 1/L
    w_pgd = torch.nn.Parameter(torch.full((4,), 0.25, dtype=F64))
    L = 2 * float(torch.linalg.matrix_norm(M, 2)) ** 2
    opt = Projected(torch.optim.SGD([w_pgd], lr=1.0 / L), {w_pgd: project_simplex})
    for _ in range(500):  # linear rate 1 − μ/L, cond(MᵀM) ≈ 8.8
        opt.zero_grad()
        _quadratic(w_pgd, M, c).backward()
        opt.step()
    np.testing.assert_allclose(w_pgd.detach().numpy(), w_star.numpy(), atol=1e-9, rtol=0)
    y = cp.Variable(4)
    prob = cp.Problem(cp.Minimize(cp.sum_squares(M.numpy() @ y - c.numpy())),
                      [y >= 0, cp.sum(y) == 1])
    prob.solve(**CLARABEL)
    np.testing.assert_allclose(y.value, w_star.numpy(), atol=TOL, rtol=0)

    # the reparameterization: softmax(θ), trained by L-BFGS on θ
    lin = torch.nn.Linear(4, 1, bias=False).to(F64)
    with torch.no_grad():
        lin.weight.fill_(0.25)
    parametrize.register_parametrization(lin, "weight", Simplex(dim=-1))
    opt2 = torch.optim.LBFGS(lin.parameters(), lr=1.0, max_iter=200, tolerance_grad=1e-14,
                             tolerance_change=1e-16, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt2.zero_grad()
        loss = _quadratic(lin.weight[0], M, c)
        loss.backward()
        return loss

    opt2.step(closure)
    w_rep = lin.weight[0].detach()
    np.testing.assert_allclose(w_rep.numpy(), w_star.numpy(), atol=1e-7, rtol=0)
    assert float(w_rep.sum()) == pytest.approx(1.0, abs=1e-14)


# ---- errors --------------------------------------------------------------------------------------


def test_errors() -> None:
    x = t([1.0, 2.0, 3.0])
    for proj in (project_simplex, project_l1_ball, project_l2_ball):
        with pytest.raises(ValueError, match=r"radius must be finite and >= 0, got -1"):
            proj(x, -1.0)
        with pytest.raises(ValueError, match="radius of shape"):
            proj(x.expand(2, 3), t([1.0, 2.0, 3.0]))
    for bad in (float("nan"), float("inf")):
        for proj in (project_nonnegative, project_simplex, project_l2_ball, project_l1_ball):
            with pytest.raises(ValueError, match="x must be finite"):
                proj(t([1.0, bad]))
        with pytest.raises(ValueError, match="x must be finite"):
            project_affine(t([1.0, bad]), t([[1.0, 1.0]]), t([1.0]))
    with pytest.raises(ValueError, match="floating-point"):
        project_simplex(torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="lower must be <= upper"):
        project_box(x, t([0.0, 2.0, 0.0]), 1.0)
    with pytest.raises(ValueError, match="does not broadcast"):
        project_box(x, t([0.0, 0.0]), 1.0)
    with pytest.raises(ValueError, match=r"x must have shape \(\.\.\., n\) with n=2"):
        project_affine(x, t([[1.0, 1.0]]), t([1.0]))
    with pytest.raises(ValueError, match=r"b must have shape \(\.\.\., m\) with m=1"):
        project_affine(x, t([[1.0, 1.0, 1.0]]), t([1.0, 2.0]))
    with pytest.raises(ValueError, match="A must be a floating-point tensor"):
        project_affine(x, t([1.0, 1.0, 1.0]), t([1.0]))
    with pytest.raises(ValueError, match="max_iter must be"):
        dykstra(x, [project_simplex], max_iter=0)
    with pytest.raises(ValueError, match="non-empty list of callables"):
        dykstra(x, [])
    w, other = torch.nn.Parameter(x.clone()), torch.nn.Parameter(x.clone())
    with pytest.raises(ValueError, match="not optimized by the wrapped optimizer"):
        Projected(torch.optim.SGD([w], lr=0.1), {other: project_simplex})
    with pytest.raises(ValueError, match=r"must be a torch\.optim\.Optimizer"):
        Projected("sgd", {w: project_simplex})  # type: ignore[arg-type]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu() -> None:
    g = torch.Generator().manual_seed(9)
    x = 2.0 * torch.randn(4, 50, generator=g, dtype=F64)
    A, b = _affine_data(50)
    for proj in (project_nonnegative, lambda z: project_box(z, -0.5, 0.5), project_simplex,
                 project_l1_ball, project_l2_ball,
                 lambda z: project_affine(z, t(A).to(z), t(b).to(z))):
        y = proj(x.cuda())
        assert y.is_cuda
        torch.testing.assert_close(y.cpu(), proj(x), atol=1e-12, rtol=0)
    y, info = dykstra(x.cuda(), [project_simplex, lambda z: project_box(z, 0.0, 0.1)], tol=1e-10)
    assert info.converged and y.is_cuda
    w = torch.nn.Parameter(x.cuda().clone())
    opt = Projected(torch.optim.Adam([w], lr=0.1), {w: project_simplex})
    w.sum().backward()
    opt.step()
    torch.testing.assert_close(w.sum(-1).cpu(), torch.ones(4, dtype=F64))
    lin = torch.nn.Linear(3, 2).cuda()
    parametrize.register_parametrization(lin, "weight", Box(-1.0, 1.0))
    assert lin.weight.is_cuda and bool((lin.weight.abs() < 1).all())
