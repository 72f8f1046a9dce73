"""Tests of ccnn.hard.kkt against dense KKT systems built from explicit torch.func.jacrev Jacobians.

Every reference solves the paper's dense matrix (Eq. 5, 6, 12 of Márquez-Neila, Salzmann and Fua,
2017) with numpy.linalg.pinv, i.e. the minimum-length least-squares solution.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from torch.nn import functional as F

from ccnn.hard import kkt as kkt_module
from ccnn.hard.kkt import KKTStep, _flatten, _Linearized, kkt_step
from ccnn.hard.minres_qlp import Flag

F64 = torch.float64
BETAS = (0.9, 0.999)
EPS = 1e-8


# ---- problems ----------------------------------------------------------------------------------


@dataclass
class Problem:
    """A tiny network: its parameters, data, and output-constraint residuals."""

    params: dict[str, torch.Tensor]
    forward: object  # (params, inputs) -> outputs (batch, k)
    x: torch.Tensor
    y: torch.Tensor
    xc: torch.Tensor

    def residuals(self, p: dict) -> torch.Tensor:
        return (self.forward(p, self.x) - self.y).reshape(-1)

    def loss(self, p: dict) -> torch.Tensor:
        return 0.5 * self.residuals(p).pow(2).sum()

    def constraints(self, p: dict) -> torch.Tensor:
        """Per constraint point: outputs 0 and 1 equal (symmetry), outputs sum to 1."""
        o = self.forward(p, self.xc)
        return torch.stack([o[:, 0] - o[:, 1], o.sum(dim=1) - 1.0])


def mlp_forward(p: dict, x: torch.Tensor) -> torch.Tensor:
    h = torch.tanh(F.linear(x, p["w1"], p["b1"]))
    return F.linear(h, p["w2"], p["b2"])


def conv_forward(p: dict, x: torch.Tensor) -> torch.Tensor:
    h = torch.tanh(F.conv2d(x, p["k"], p["kb"]))
    return F.linear(h.flatten(1), p["w"], p["b"])


def make_problem(kind: str, seed: int) -> Problem:
    """``mlp``: 3→5→4 tanh MLP (44 parameters); ``conv``: 5×5 image, 2 3×3 filters, tanh,
    linear to 3 outputs (77 parameters). Both float64, 3 constraint points → 6 residuals."""
    g = torch.Generator().manual_seed(seed)

    def randn(*shape: int, scale: float = 1.0) -> torch.Tensor:
        return scale * torch.randn(*shape, generator=g, dtype=F64)

    if kind == "mlp":
        params = {"w1": randn(5, 3), "b1": randn(5), "w2": randn(4, 5, scale=0.5), "b2": randn(4)}
        return Problem(params, mlp_forward, randn(6, 3), randn(6, 4), randn(3, 3))
    params = {"k": randn(2, 1, 3, 3), "kb": randn(2), "w": randn(3, 18, scale=0.3), "b": randn(3)}
    return Problem(params, conv_forward, randn(4, 1, 5, 5), randn(4, 3), randn(3, 1, 5, 5))


PROBLEMS = [("mlp", 0), ("mlp", 1), ("conv", 0), ("conv", 1)]


@pytest.fixture(params=PROBLEMS, ids=[f"{k}-{s}" for k, s in PROBLEMS])
def problem(request: pytest.FixtureRequest) -> Problem:
    return make_problem(*request.param)


# ---- dense references --------------------------------------------------------------------------


def flat(d: dict) -> np.ndarray:
    return _flatten(d).detach().numpy()


def jacobian(fn, params: dict) -> np.ndarray:
    """Explicit ∂fn/∂w, rows = fn's flattened outputs, columns = flattened params (in order)."""
    jac = torch.func.jacrev(lambda p: fn(p).reshape(-1))(params)
    return torch.cat([j.reshape(j.shape[0], -1) for j in jac.values()], dim=1).numpy()


def dense_kkt(top: np.ndarray, J: np.ndarray, g: np.ndarray, c: np.ndarray):
    """pinv solution of [[top, Jᵀ], [J, 0]]·[dw; Λ] = [−g; −c]."""
    n = top.shape[0]
    K = np.block([[top, J.T], [J, np.zeros((J.shape[0], J.shape[0]))]])
    sol = np.linalg.pinv(K, rcond=1e-10) @ np.concatenate([-g, -c])
    return sol[:n], sol[n:]


def grad(problem: Problem) -> np.ndarray:
    return flat(torch.func.grad(problem.loss)(problem.params))


def relerr(a, ref) -> float:
    a = a.detach().numpy() if isinstance(a, torch.Tensor) else a
    return float(np.linalg.norm(a - ref) / max(np.linalg.norm(ref), 1e-300))


def assert_step(step: KKTStep, dw_ref: np.ndarray, lam_ref: np.ndarray, tol: float = 1e-6):
    assert relerr(_flatten(step.delta), dw_ref) < tol
    if lam_ref.size:
        assert relerr(step.multipliers, lam_ref) < tol
    assert step.info.flag.converged


# ---- the three systems against dense solves ----------------------------------------------------


@pytest.mark.parametrize("system", ["full", "reduced"])
def test_sgd_matches_dense_eq5(problem: Problem, system: str) -> None:
    eta = 2.5
    J = jacobian(problem.constraints, problem.params)
    c = problem.constraints(problem.params).reshape(-1).numpy()
    dw, lam = dense_kkt(eta * np.eye(J.shape[1]), J, grad(problem), c)
    step = kkt_step(
        problem.params, problem.loss, problem.constraints, eta=eta, system=system, rtol=1e-12
    )
    assert step.system == system
    assert_step(step, dw, lam)
    assert np.allclose(step.constraint_values.numpy(), c, rtol=0, atol=0)
    assert step.loss_value == pytest.approx(float(problem.loss(problem.params)), rel=1e-14)
    assert step.active.all()


@pytest.mark.parametrize(("method", "system"),
                         [("sgd", "full"), ("sgd", "reduced"), ("gauss-newton", "full")])
def test_correction_and_regularization_match_dense(
    problem: Problem, system: str, method: str
) -> None:
    """[[D, Jᵀ], [J, −μI]]·[dw; Λ] = [−g; −αC], solved densely by numpy.linalg.solve."""
    eta, alpha, mu = 2.5, 0.3, 0.05
    J = jacobian(problem.constraints, problem.params)
    c = problem.constraints(problem.params).reshape(-1).numpy()
    if method == "sgd":
        top, g = eta * np.eye(J.shape[1]), grad(problem)
    else:
        Jr = jacobian(problem.residuals, problem.params)
        top = Jr.T @ Jr + eta * np.eye(J.shape[1])
        g = Jr.T @ problem.residuals(problem.params).numpy()
    n, k = top.shape[0], J.shape[0]
    K = np.block([[top, J.T], [J, -mu * np.eye(k)]])
    sol = np.linalg.solve(K, np.concatenate([-g, -alpha * c]))
    step = kkt_step(problem.params, problem.loss, problem.constraints, eta=eta, method=method,
                    residuals=problem.residuals, system=system, rtol=1e-12,
                    correction=alpha, regularization=mu)
    assert_step(step, sol[:n], sol[n:])
    # Λ = (J·dw + αC)/μ: the multipliers of the quadratic penalty of weight 1/μ
    assert np.allclose(sol[n:], (J @ sol[:n] + alpha * c) / mu)


@pytest.mark.parametrize("alpha", [0.25, 1.0])
def test_correction_removes_its_share_of_the_linearized_residual(alpha: float) -> None:
    pr = make_problem("mlp", 1)
    J = jacobian(pr.constraints, pr.params)
    c = pr.constraints(pr.params).reshape(-1).numpy()
    step = kkt_step(pr.params, pr.loss, pr.constraints, eta=1.0, rtol=1e-12, correction=alpha)
    linearized = c + J @ _flatten(step.delta).numpy()
    assert np.allclose(linearized, (1 - alpha) * c, atol=1e-8 * np.abs(c).max())


def test_gauss_newton_matches_dense_eq6(problem: Problem) -> None:
    eta = 0.3
    J = jacobian(problem.constraints, problem.params)
    Jr = jacobian(problem.residuals, problem.params)
    r = problem.residuals(problem.params).numpy()
    c = problem.constraints(problem.params).reshape(-1).numpy()
    dw, lam = dense_kkt(Jr.T @ Jr + eta * np.eye(J.shape[1]), J, Jr.T @ r, c)
    step = kkt_step(
        problem.params,
        None,
        problem.constraints,
        eta=eta,
        method="gauss-newton",
        residuals=problem.residuals,
        rtol=1e-12,
    )
    assert step.system == "full"
    assert_step(step, dw, lam)
    assert step.loss_value == pytest.approx(0.5 * float(r @ r), rel=1e-14)


def adam_diagonal_reference(
    problem: Problem, eta: float, m: np.ndarray, v: np.ndarray, t: int, correction: str
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Eq. 10-11's new moments and the diagonal of Eq. 12's top-left block, by hand."""
    g = grad(problem)
    m = BETAS[0] * m + (1 - BETAS[0]) * g
    v = BETAS[1] * v + (1 - BETAS[1]) * g**2
    f = math.sqrt(1 - BETAS[1] ** (t + 1)) / (1 - BETAS[0] ** (t + 1))
    if correction == "eq12":
        return m, v, eta * f * (np.sqrt(v) + EPS)
    return m, v, eta / f * (np.sqrt(v) + EPS * math.sqrt(1 - BETAS[1] ** (t + 1)))


def adam_reference(
    problem: Problem,
    eta: float,
    m: np.ndarray,
    v: np.ndarray,
    t: int,
    correction: str,
    constraints=None,
):
    """Eq. 10-12 by hand: new moments and the dense KKT solve with the chosen top-left block."""
    constraints = constraints or problem.constraints
    m, v, d = adam_diagonal_reference(problem, eta, m, v, t, correction)
    J = jacobian(constraints, problem.params)
    c = constraints(problem.params).reshape(-1).numpy()
    dw, lam = dense_kkt(np.diag(d), J, m, c)
    return dw, lam, m, v


@pytest.mark.parametrize("correction", ["eq12", "adam"])
@pytest.mark.parametrize("system", ["full", "reduced"])
def test_adam_matches_dense_eq12(problem: Problem, system: str, correction: str) -> None:
    """Three steps (t = 0, 1, 2) at moving points: moments and the KKT solve of Eq. 12."""
    eta, state = 20.0, {}
    n = sum(p.numel() for p in problem.params.values())
    m, v = np.zeros(n), np.zeros(n)
    for t in range(3):
        dw, lam, m, v = adam_reference(problem, eta, m, v, t, correction)
        step = kkt_step(
            problem.params,
            problem.loss,
            problem.constraints,
            eta=eta,
            method="adam",
            state=state,
            system=system,
            rtol=1e-12,
            bias_correction=correction,
        )
        assert_step(step, dw, lam)
        assert state["t"] == t + 1
        assert relerr(_flatten(state["m"]), m) < 1e-14
        assert relerr(_flatten(state["v"]), v) < 1e-14
        problem.params = {k: p + step.delta[k] for k, p in problem.params.items()}


@pytest.mark.parametrize("correction", ["eq12", "adam"])
@pytest.mark.parametrize("system", ["full", "reduced"])
def test_adam_euclidean_metric_is_the_nearest_feasible_step(
    problem: Problem, system: str, correction: str
) -> None:
    """metric="euclidean": the step nearest (in the 2-norm) to Adam's unconstrained step
    s = −D⁻¹m among those meeting the share α of the linearized constraints,
    dw = s − J⁺(J·s + α·C), with Λ = η·(JJᵀ)⁺(J·s + α·C); three steps at moving points."""
    eta, alpha, state = 20.0, 0.6, {}
    n = sum(p.numel() for p in problem.params.values())
    m, v = np.zeros(n), np.zeros(n)
    for t in range(3):
        m, v, d = adam_diagonal_reference(problem, eta, m, v, t, correction)
        s = -m / d
        J = jacobian(problem.constraints, problem.params)
        c = problem.constraints(problem.params).reshape(-1).numpy()
        dw = s - np.linalg.pinv(J) @ (J @ s + alpha * c)
        lam = eta * np.linalg.pinv(J @ J.T) @ (J @ s + alpha * c)
        step = kkt_step(problem.params, problem.loss, problem.constraints, eta=eta,
                        method="adam", state=state, system=system, rtol=1e-12,
                        bias_correction=correction, metric="euclidean", correction=alpha)
        assert_step(step, dw, lam)
        assert relerr(_flatten(state["m"]), m) < 1e-14
        problem.params = {k: p + step.delta[k] for k, p in problem.params.items()}


def test_adam_state_by_hand() -> None:
    """m, v of Eq. 10-11 written out per tensor; t counts steps; the given state is updated."""
    problem = make_problem("mlp", 3)
    g = torch.func.grad(problem.loss)(problem.params)
    m0 = {k: torch.full_like(x, 0.1) for k, x in g.items()}
    v0 = {k: torch.full_like(x, 0.2) for k, x in g.items()}
    state = {"m": dict(m0), "v": dict(v0), "t": 4}
    kkt_step(problem.params, problem.loss, problem.constraints, eta=5.0, method="adam", state=state)
    assert state["t"] == 5
    for k, gk in g.items():
        torch.testing.assert_close(state["m"][k], 0.9 * 0.1 + 0.1 * gk, rtol=1e-15, atol=1e-15)
        torch.testing.assert_close(state["v"][k], 0.999 * 0.2 + 0.001 * gk**2, rtol=1e-15, atol=0)


def test_adam_correction_changes_unconstrained_step_by_f_squared() -> None:
    """Without constraints the two corrections' steps differ by f² = (1−β₂)/(1−β₁)² at t = 0,
    up to ε (tested with ε tiny)."""
    problem = make_problem("mlp", 0)
    steps = {
        corr: kkt_step(
            problem.params,
            problem.loss,
            None,
            eta=7.0,
            method="adam",
            state={},
            eps=1e-300,
            bias_correction=corr,
        )
        for corr in ("eq12", "adam")
    }
    f2 = (1 - BETAS[1]) / (1 - BETAS[0]) ** 2
    ratio = _flatten(steps["eq12"].delta) * f2 / _flatten(steps["adam"].delta)
    torch.testing.assert_close(ratio, torch.ones_like(ratio), rtol=1e-12, atol=0)
    # and the "adam" step is the sign step of Adam's first iteration: −lr·sign(g)
    g = _flatten(torch.func.grad(problem.loss)(problem.params))
    torch.testing.assert_close(
        _flatten(steps["adam"].delta), -torch.sign(g) / 7.0, rtol=1e-12, atol=0
    )


# ---- products ----------------------------------------------------------------------------------


def test_rop_lop_against_explicit_jacobians(problem: Problem) -> None:
    """R-op (Eq. 7) and L-op (Eq. 8), also restricted to a fixed subset of rows."""
    g = torch.Generator().manual_seed(7)
    J = torch.as_tensor(jacobian(problem.constraints, problem.params))
    lin = _Linearized(problem.constraints, problem.params, "constraints")
    v = torch.randn(J.shape[1], generator=g, dtype=F64)
    u = torch.randn(J.shape[0], generator=g, dtype=F64)
    torch.testing.assert_close(lin.rop(v), J @ v, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(lin.lop(u), J.T @ u, rtol=1e-12, atol=1e-12)
    idx = torch.tensor([0, 2, 5])
    lin.restrict(idx)
    assert lin.rows == 3
    torch.testing.assert_close(lin.rop(v), J[idx] @ v, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(lin.lop(u[idx]), J[idx].T @ u[idx], rtol=1e-12, atol=1e-12)
    Jr = torch.as_tensor(jacobian(problem.residuals, problem.params))
    res = _Linearized(problem.residuals, problem.params, "residuals")
    torch.testing.assert_close(res.lop(res.rop(v)), Jr.T @ (Jr @ v), rtol=1e-12, atol=1e-12)


class _OnceDifferentiableCube(torch.autograd.Function):
    """x³ with a backward that cannot itself be differentiated."""

    @staticmethod
    def forward(x: torch.Tensor) -> torch.Tensor:
        return x**3

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        ctx.save_for_backward(inputs[0])
        ctx.save_for_forward(inputs[0])

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        (x,) = ctx.saved_tensors
        return 3 * x**2 * grad

    @staticmethod
    def jvp(ctx, tangent: torch.Tensor) -> torch.Tensor:
        (x,) = ctx.saved_tensors
        return 3 * x**2 * tangent


def test_rop_falls_back_to_jvp_when_the_backward_is_not_differentiable() -> None:
    """The R-op transposes the stored L-op; a backward without derivatives of its own (a
    ``once_differentiable`` Function) makes it use ``torch.func.jvp`` instead, same answer."""
    w = torch.tensor([0.5, -1.0, 2.0], dtype=F64)
    A = torch.tensor([[1.0, 2.0, 0.0], [0.0, -1.0, 3.0]], dtype=F64)

    def cubes(p: dict) -> torch.Tensor:
        return A @ _OnceDifferentiableCube.apply(p["w"])

    lin = _Linearized(cubes, {"w": w}, "constraints")
    v = torch.tensor([0.3, 0.1, -0.2], dtype=F64)
    expected = A @ (3 * w**2 * v)
    torch.testing.assert_close(lin.rop(v), expected, rtol=1e-12, atol=1e-12)
    assert lin._use_jvp
    torch.testing.assert_close(lin.rop(2 * v), 2 * expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(
    ("method", "system"),
    [("sgd", "reduced"), ("sgd", "full"), ("adam", "reduced"), ("gauss-newton", "full")],
)
def test_step_satisfies_linearized_constraints(method: str, system: str) -> None:
    problem = make_problem("conv", 2)
    J = jacobian(problem.constraints, problem.params)
    c = problem.constraints(problem.params).reshape(-1).numpy()
    step = kkt_step(
        problem.params,
        problem.loss,
        problem.constraints,
        eta=1.0,
        method=method,
        residuals=problem.residuals,
        state={},
        system=system,
        rtol=1e-10,
    )
    assert np.linalg.norm(c + J @ flat(step.delta)) < 1e-8 * np.linalg.norm(c)


# ---- inequalities ------------------------------------------------------------------------------


def test_inequalities_active_set(problem: Problem) -> None:
    """Rows: 6 equalities, then 3 inequalities o₀ ≤ o₀(w)+0.5 (satisfied, dropped) and 3
    inequalities o₂ ≤ o₂(w)−0.5 (violated, kept as equalities). Compared to the dense solve of
    the equality-only system of the 9 active rows; dropped rows get multiplier 0."""
    o = problem.forward(problem.params, problem.xc)
    shift0, shift2 = o[:, 0] + 0.5, o[:, 2] - 0.5

    def constraints(p: dict) -> torch.Tensor:
        out = problem.forward(p, problem.xc)
        return torch.cat(
            [problem.constraints(p).reshape(-1), out[:, 0] - shift0, out[:, 2] - shift2]
        )

    ineq = torch.tensor([False] * 6 + [True] * 6)
    active = torch.tensor([True] * 6 + [False] * 3 + [True] * 3)
    J = jacobian(constraints, problem.params)[active.numpy()]
    c = constraints(problem.params).numpy()
    dw, lam = dense_kkt(np.eye(J.shape[1]) * 3.0, J, grad(problem), c[active.numpy()])
    for system in ("full", "reduced"):
        step = kkt_step(
            problem.params,
            problem.loss,
            constraints,
            eta=3.0,
            inequality=ineq,
            system=system,
            rtol=1e-12,
        )
        assert torch.equal(step.active, active)
        assert relerr(_flatten(step.delta), dw) < 1e-6
        assert relerr(step.multipliers[active], lam) < 1e-6
        assert torch.equal(step.multipliers[~active], torch.zeros(3, dtype=F64))
        assert relerr(step.constraint_values, c) == 0.0


def test_inequality_mask_in_constraint_shape_and_all_true(problem: Problem) -> None:
    """A mask shaped like C (2×3) equals the flat mask; ``True`` marks every row."""
    c = problem.constraints(problem.params)
    mask = torch.zeros_like(c, dtype=torch.bool)
    mask[1] = True
    a = kkt_step(problem.params, problem.loss, problem.constraints, eta=1.0, inequality=mask)
    b = kkt_step(
        problem.params, problem.loss, problem.constraints, eta=1.0, inequality=mask.reshape(-1)
    )
    torch.testing.assert_close(_flatten(a.delta), _flatten(b.delta), rtol=0, atol=0)
    assert torch.equal(a.active, ~mask.reshape(-1) | (c.reshape(-1) > 0))
    every = kkt_step(problem.params, problem.loss, problem.constraints, eta=1.0, inequality=True)
    assert torch.equal(every.active, c.reshape(-1) > 0)


def test_all_inequalities_satisfied_gives_gradient_step(problem: Problem) -> None:
    def constraints(p: dict) -> torch.Tensor:
        return problem.constraints(p) - 100.0  # all ≤ 0

    step = kkt_step(problem.params, problem.loss, constraints, eta=4.0, inequality=True)
    np.testing.assert_allclose(flat(step.delta), -grad(problem) / 4.0, rtol=1e-15, atol=0)
    assert not step.active.any()
    assert torch.equal(step.multipliers, torch.zeros(6, dtype=F64))
    assert step.info.flag == Flag.ZERO_RHS and step.info.iterations == 0


# ---- no constraints ----------------------------------------------------------------------------


@pytest.mark.parametrize("empty", ["none", "empty-tensor"])
@pytest.mark.parametrize("system", ["full", "reduced"])
def test_no_constraints_sgd(empty: str, system: str) -> None:
    problem = make_problem("mlp", 0)
    cons = None if empty == "none" else (lambda p: p["b2"][:0])
    step = kkt_step(problem.params, problem.loss, cons, eta=2.0, system=system, rtol=1e-12)
    np.testing.assert_allclose(flat(step.delta), -grad(problem) / 2.0, rtol=1e-15, atol=0)
    assert step.multipliers.shape == (0,) and step.constraint_values.shape == (0,)
    assert step.info.flag == Flag.ZERO_RHS and step.info.iterations == 0


def test_no_constraints_gauss_newton() -> None:
    problem = make_problem("conv", 1)
    Jr = jacobian(problem.residuals, problem.params)
    r = problem.residuals(problem.params).numpy()
    dw = np.linalg.solve(Jr.T @ Jr + 0.1 * np.eye(Jr.shape[1]), -Jr.T @ r)
    step = kkt_step(
        problem.params,
        problem.loss,
        None,
        eta=0.1,
        method="gauss-newton",
        residuals=problem.residuals,
        rtol=1e-13,
    )
    assert relerr(_flatten(step.delta), dw) < 1e-6
    assert step.loss_value == pytest.approx(0.5 * float(r @ r), rel=1e-14)


# ---- singular KKT systems ----------------------------------------------------------------------


def duplicated(problem: Problem):
    """Every residual twice: consistent but rank-deficient."""
    return lambda p: torch.cat([problem.constraints(p).reshape(-1)] * 2)


def contradictory(problem: Problem):
    """Residuals c, then c₀ + 1 for the first three (same gradients): inconsistent rows."""
    return lambda p: torch.cat([problem.constraints(p).reshape(-1), problem.constraints(p)[0] + 1])


@pytest.mark.parametrize("make", [duplicated, contradictory], ids=["duplicated", "contradictory"])
@pytest.mark.parametrize(
    ("method", "system"),
    [
        ("sgd", "full"),
        ("sgd", "reduced"),
        ("adam", "full"),
        ("adam", "reduced"),
        ("gauss-newton", "full"),
    ],
)
def test_singular_systems_give_min_length_step(
    problem: Problem, make, method: str, system: str
) -> None:
    """The pinv (minimum-length least-squares) solution of the full matrix, finite; the reduced
    system's minimum-length Λ gives the same dw and Λ (exact also for an inconsistent J)."""
    cons, eta = make(problem), 1.5
    J = jacobian(cons, problem.params)
    c = cons(problem.params).numpy()
    n = J.shape[1]
    if method == "sgd":
        dw, lam = dense_kkt(eta * np.eye(n), J, grad(problem), c)
    elif method == "adam":
        zero = np.zeros(n)
        dw, lam, _, _ = adam_reference(problem, eta, zero, zero, 0, "eq12", cons)
    else:
        Jr = jacobian(problem.residuals, problem.params)
        r = problem.residuals(problem.params).numpy()
        dw, lam = dense_kkt(Jr.T @ Jr + eta * np.eye(n), J, Jr.T @ r, c)
    step = kkt_step(
        problem.params,
        problem.loss,
        cons,
        eta=eta,
        method=method,
        residuals=problem.residuals,
        state={},
        system=system,
        rtol=1e-12,
    )
    assert torch.isfinite(_flatten(step.delta)).all() and torch.isfinite(step.multipliers).all()
    # Adam's full matrix carries D's spread (here κ ≈ 1e4 on the range); on the contradictory
    # systems MINRES-QLP then stops at relAres ≈ 1e-9 (flag 4, below √eps) and lands up to
    # 1.1e-6 from pinv (measured). The reduced system of the same step is within 1e-6.
    assert_step(step, dw, lam, tol=1e-5 if (method, system) == ("adam", "full") else 1e-6)


# ---- dtype, inputs untouched -------------------------------------------------------------------


def test_float32_and_params_untouched() -> None:
    problem = make_problem("mlp", 1)
    p32 = {k: v.float().requires_grad_() for k, v in problem.params.items()}
    before = {k: v.detach().clone() for k, v in p32.items()}
    xs, xc = problem.x.float(), problem.xc.float()
    ys = problem.y.float()

    def loss(p: dict) -> torch.Tensor:
        return 0.5 * (mlp_forward(p, xs) - ys).pow(2).sum()

    def cons(p: dict) -> torch.Tensor:
        o = mlp_forward(p, xc)
        return o.sum(1) - 1

    step = kkt_step(p32, loss, cons, eta=2.0, rtol=1e-6)
    assert all(d.dtype == torch.float32 for d in step.delta.values())
    assert step.multipliers.dtype == torch.float32
    assert all(torch.equal(p32[k], before[k]) for k in p32)
    ref = kkt_step(
        problem.params,
        problem.loss,
        lambda p: mlp_forward(p, problem.xc).sum(1) - 1,
        eta=2.0,
        rtol=1e-12,
    )
    assert relerr(_flatten(step.delta).double(), flat(ref.delta)) < 1e-4


# ---- errors ------------------------------------------------------------------------------------


def test_errors() -> None:
    pr = make_problem("mlp", 0)
    p, L, C = pr.params, pr.loss, pr.constraints
    with pytest.raises(ValueError, match="eta must be a finite number > 0, got 0"):
        kkt_step(p, L, C, eta=0)
    with pytest.raises(ValueError, match="eta must be a finite number > 0, got nan"):
        kkt_step(p, L, C, eta=float("nan"))
    with pytest.raises(ValueError, match="method must be one of"):
        kkt_step(p, L, C, eta=1.0, method="newton")
    with pytest.raises(ValueError, match="rtol must be a finite number >= 0, got -1"):
        kkt_step(p, L, C, eta=1.0, rtol=-1e-6)
    with pytest.raises(ValueError, match="maxit must be None or a non-negative int"):
        kkt_step(p, L, C, eta=1.0, maxit=2.5)
    with pytest.raises(ValueError, match="system must be one of"):
        kkt_step(p, L, C, eta=1.0, system="dense")
    with pytest.raises(ValueError, match="params must be a non-empty dict"):
        kkt_step({}, L, C, eta=1.0)
    with pytest.raises(ValueError, match="params must be float32 or float64"):
        kkt_step({"a": torch.zeros(2, dtype=torch.int64)}, L, C, eta=1.0)
    with pytest.raises(ValueError, match="needs residuals"):
        kkt_step(p, L, C, eta=1.0, method="gauss-newton")
    with pytest.raises(ValueError, match="system='reduced' needs a diagonal"):
        kkt_step(p, L, C, eta=1.0, method="gauss-newton", residuals=pr.residuals, system="reduced")
    with pytest.raises(ValueError, match="needs a state dict"):
        kkt_step(p, L, C, eta=1.0, method="adam")
    with pytest.raises(ValueError, match="needs a loss"):
        kkt_step(p, None, C, eta=1.0)
    with pytest.raises(ValueError, match="betas must be two numbers"):
        kkt_step(p, L, C, eta=1.0, method="adam", state={}, betas=(0.9, 1.0))
    with pytest.raises(ValueError, match="eps must be a finite number > 0"):
        kkt_step(p, L, C, eta=1.0, method="adam", state={}, eps=0.0)
    with pytest.raises(ValueError, match="bias_correction must be one of"):
        kkt_step(p, L, C, eta=1.0, method="adam", state={}, bias_correction="kingma")
    with pytest.raises(ValueError, match="metric must be one of"):
        kkt_step(p, L, C, eta=1.0, method="adam", state={}, metric="riemannian")
    with pytest.raises(ValueError, match="metric='euclidean' is an option of method='adam'"):
        kkt_step(p, L, C, eta=1.0, metric="euclidean")
    with pytest.raises(ValueError, match=r"state\['t'\] must be a non-negative int"):
        kkt_step(p, L, C, eta=1.0, method="adam", state={"t": -1})
    with pytest.raises(ValueError, match=r"state\['m'\] must have the keys of params"):
        kkt_step(p, L, C, eta=1.0, method="adam", state={"m": {"w1": p["w1"]}})
    with pytest.raises(ValueError, match="inequality must have one entry per constraint"):
        kkt_step(p, L, C, eta=1.0, inequality=torch.ones(5, dtype=torch.bool))
    with pytest.raises(ValueError, match="inequality must be a bool or a bool tensor"):
        kkt_step(p, L, C, eta=1.0, inequality=torch.ones(6))
    with pytest.raises(ValueError, match="correction must be a number in"):
        kkt_step(p, L, C, eta=1.0, correction=0.0)
    with pytest.raises(ValueError, match="regularization must be a finite number >= 0"):
        kkt_step(p, L, C, eta=1.0, regularization=-1.0)
    with pytest.raises(ValueError, match=r"loss\(params\) must return a scalar tensor"):
        kkt_step(p, pr.residuals, C, eta=1.0)


def test_non_finite_inputs_are_named() -> None:
    pr = make_problem("mlp", 0)
    p = pr.params
    with pytest.raises(ValueError, match=r"constraints\(params\) returned non-finite"):
        kkt_step(p, pr.loss, lambda q: pr.constraints(q) / 0.0, eta=1.0)
    with pytest.raises(ValueError, match=r"loss\(params\) returned a non-finite value"):
        kkt_step(p, lambda q: pr.loss(q) * math.inf, pr.constraints, eta=1.0)
    with pytest.raises(ValueError, match=r"the gradient of loss\(params\) is non-finite"):
        kkt_step(p, lambda q: torch.sqrt(q["b2"][0] * 0.0), pr.constraints, eta=1.0)
    with pytest.raises(ValueError, match=r"residuals\(params\) returned non-finite"):
        kkt_step(
            p,
            None,
            pr.constraints,
            eta=1.0,
            method="gauss-newton",
            residuals=lambda q: pr.residuals(q) + math.nan,
        )


def test_non_finite_solver_output_raises(monkeypatch: pytest.MonkeyPatch) -> None:
    pr = make_problem("mlp", 0)
    real = kkt_module.minres_qlp

    def broken(A, b, **kwargs):
        x, info = real(A, b, **kwargs)
        return torch.full_like(x, math.nan), info

    monkeypatch.setattr(kkt_module, "minres_qlp", broken)
    with pytest.raises(RuntimeError, match="MINRES-QLP returned non-finite values"):
        kkt_step(pr.params, pr.loss, pr.constraints, eta=1.0)
