"""Tests of ccnn.hard.penalties: Eq. 3 soft penalty, Eq. 4 Lagrangian, multipliers, dual ascent."""

from __future__ import annotations

import copy
import itertools

import numpy as np
import pytest
import torch

from ccnn.hard.penalties import DualAscent, IndexedMultipliers, lagrangian, soft_penalty

F64 = torch.float64


def t(a) -> torch.Tensor:
    return torch.as_tensor(np.asarray(a, dtype=np.float64))


def linear_residuals(seed: int, K: int = 4, NC: int = 3, n: int = 5):
    """C(w) = (A w + b).reshape(K, NC) with its Jacobian A, in float64."""
    rng = np.random.default_rng(seed)
    A, b, w = rng.normal(size=(K * NC, n)), rng.normal(size=K * NC), rng.normal(size=n)
    return A, b, w


# ---- soft_penalty (Eq. 3) ----------------------------------------------------------------------


def test_soft_penalty_values() -> None:
    C = t([[1.0, -2.0, 0.5], [3.0, 0.0, -1.0]])
    # Σ C² = 1 + 4 + 0.25 + 9 + 0 + 1 = 15.25
    assert soft_penalty(C, 2.0).item() == pytest.approx(30.5, abs=1e-14)
    # per type: col sums of C² = [10, 4, 1.25]; λ = [1, 0.5, 4] -> 10 + 2 + 5
    assert soft_penalty(C, t([1.0, 0.5, 4.0])).item() == pytest.approx(17.0, abs=1e-14)
    assert soft_penalty(C, t(3.0)).item() == pytest.approx(45.75, abs=1e-14)
    # inequality C <= 0: only 1, 0.5, 3 count -> col sums [10, 0, 0.25]
    got = soft_penalty(C, t([1.0, 0.5, 4.0]), inequality=True).item()
    assert got == pytest.approx(11.0, abs=1e-14)
    assert soft_penalty(C, 0).item() == 0.0
    # float32 and a batch dimension in front
    C32 = C.to(torch.float32).expand(3, 2, 3)
    out = soft_penalty(C32, t([1.0, 0.5, 4.0]))
    assert out.dtype == torch.float32 and out.item() == pytest.approx(51.0, rel=1e-6)


@pytest.mark.parametrize("inequality", [False, True])
def test_soft_penalty_gradient(inequality: bool) -> None:
    A, b, w0 = linear_residuals(0)
    lam = np.array([0.3, 2.0, 1.5])
    w = t(w0).requires_grad_(True)
    C = (t(A) @ w + t(b)).reshape(4, 3)
    soft_penalty(C, t(lam), inequality=inequality).backward()
    Cn = (A @ w0 + b).reshape(4, 3)
    if inequality:
        Cn = np.maximum(Cn, 0)
    expect = A.T @ (2 * lam * Cn).reshape(-1)  # Σ_jk λ_j 2 C_jk ∂C_jk/∂w
    np.testing.assert_allclose(w.grad.numpy(), expect, rtol=1e-12, atol=1e-12)


def test_soft_penalty_errors() -> None:
    C = torch.ones(2, 3, dtype=F64)
    with pytest.raises(ValueError, match="lam must be finite and >= 0"):
        soft_penalty(C, t([1.0, -1.0, 1.0]))
    with pytest.raises(ValueError, match=r"lam must be a finite number >= 0, got -0\.5"):
        soft_penalty(C, -0.5)
    with pytest.raises(ValueError, match=r"lam must have shape \(\) or \(N_C,\)=\(3,\)"):
        soft_penalty(C, t([1.0, 1.0]))
    with pytest.raises(ValueError, match="C must be a floating-point"):
        soft_penalty(torch.ones(2, 3, dtype=torch.long), 1.0)


# ---- lagrangian (Eq. 4) ------------------------------------------------------------------------


def test_lagrangian_values() -> None:
    R = t(1.5)
    C = t([[2.0, -1.0], [0.5, -3.0]])
    L = t([[0.5, 3.0], [-2.0, 1.0]])
    # Σ Λ C = 1 - 3 - 1 - 3 = -6 ; Σ C² = 4 + 1 + 0.25 + 9 = 14.25
    assert lagrangian(R, C, L).item() == pytest.approx(-4.5, abs=1e-14)
    assert lagrangian(R, C, L, rho_aug=2.0).item() == pytest.approx(-4.5 + 14.25, abs=1e-14)
    # inequality, ρ = 2, Λ ≥ 0: Λ + ρC = [[4.5, 1], [2, -5]] with Λ = [[0.5, 3], [1, 1]]
    Li = t([[0.5, 3.0], [1.0, 1.0]])
    expect = 1.5 + ((4.5**2 + 1 + 4 + 0) - (0.25 + 9 + 1 + 1)) / 4
    got = lagrangian(R, C, Li, rho_aug=2.0, inequality=True).item()
    assert got == pytest.approx(expect, abs=1e-14)
    # without augmentation the inequality form is R + Σ Λ C
    got = lagrangian(R, C, Li, inequality=True).item()
    assert got == pytest.approx(1.5 + 1 - 3 + 0.5 - 3, abs=1e-14)


@pytest.mark.parametrize(("rho", "inequality"), [(0.0, False), (0.7, False), (0.7, True)])
def test_lagrangian_gradient(rho: float, inequality: bool) -> None:
    A, b, w0 = linear_residuals(1)
    a = np.random.default_rng(2).normal(size=w0.shape)
    Lam = np.abs(np.random.default_rng(3).normal(size=(4, 3)))
    Lam[0] = 0.0  # zero multipliers: the inequality term vanishes where C < 0
    w = t(w0).requires_grad_(True)
    Lt = t(Lam).requires_grad_(True)
    C = (t(A) @ w + t(b)).reshape(4, 3)
    R = 0.5 * ((w - t(a)) ** 2).sum()
    lagrangian(R, C, Lt, rho_aug=rho, inequality=inequality).backward()
    Cn = (A @ w0 + b).reshape(4, 3)
    force = Lam + rho * Cn
    if inequality:
        force = np.maximum(force, 0)
    expect = (w0 - a) + A.T @ force.reshape(-1)
    np.testing.assert_allclose(w.grad.numpy(), expect, rtol=1e-12, atol=1e-12)
    assert Lt.grad is None  # Λ is held fixed


def test_lagrangian_errors() -> None:
    C = torch.ones(2, 3, dtype=F64)
    with pytest.raises(ValueError, match=r"Lambda must have the shape of C \(2, 3\)"):
        lagrangian(t(0.0), C, torch.ones(3, 2, dtype=F64))
    with pytest.raises(ValueError, match="rho_aug must be a finite number >= 0, got -1"):
        lagrangian(t(0.0), C, C, rho_aug=-1)
    with pytest.raises(ValueError, match="R must be a scalar"):
        lagrangian(torch.ones(2, dtype=F64), C, C)


# ---- IndexedMultipliers ------------------------------------------------------------------------


def test_indexed_multipliers_module() -> None:
    M = IndexedMultipliers(6, 2, dtype=F64)
    assert torch.equal(M(torch.tensor([4, 1])), torch.zeros(2, 2, dtype=F64))
    assert list(M.state_dict()) == ["weight"] and list(M.parameters()) == []
    M.add_(torch.tensor([1, 4, 1]), t([[1.0, 2.0], [3.0, 4.0], [10.0, 20.0]]))
    assert M(torch.tensor([1, 4, 0])).tolist() == [[11.0, 22.0], [3.0, 4.0], [0.0, 0.0]]
    out = M(torch.tensor([1]))
    out += 100  # a copy
    assert M.weight[1].tolist() == [11.0, 22.0]
    N = IndexedMultipliers(6, 2, dtype=F64)
    N.load_state_dict(M.state_dict())
    assert torch.equal(N.weight, M.weight)
    P = IndexedMultipliers(3, 1, inequality=True)
    assert P.weight.dtype == torch.float32
    P.add_(torch.tensor([0, 2]), torch.tensor([[-1.0], [2.0]]))
    assert P.weight.flatten().tolist() == [0.0, 0.0, 2.0]


def test_indexed_multipliers_errors() -> None:
    M = IndexedMultipliers(6, 2)
    with pytest.raises(ValueError, match=r"indices must lie in \[0, 6\), got min 0 and max 6"):
        M(torch.tensor([0, 6]))
    with pytest.raises(ValueError, match=r"indices must be a 1-D torch\.long tensor"):
        M(torch.tensor([0.0, 1.0]))
    with pytest.raises(ValueError, match=r"delta must have shape \(2, 2\)"):
        M.add_(torch.tensor([0, 1]), torch.zeros(2, 3))
    with pytest.raises(ValueError, match="num_constraints must be an integer >= 1, got 0"):
        IndexedMultipliers(6, 0)


# ---- DualAscent --------------------------------------------------------------------------------


def test_dual_ascent_step_and_monitoring() -> None:
    M = IndexedMultipliers(5, 3, dtype=F64)
    D = DualAscent(M, rho=lambda s: 1.0 / (s + 1))
    C0 = t([[1.0, -2.0, 4.0], [0.5, 0.0, -1.0]])
    info = D.step(torch.tensor([3, 0]), C0)
    assert (info.t, info.rho, info.count) == (0, 1.0, 2)
    # |C| = [1, 2, 4, .5, 0, 1] -> median 1, max 4; ‖Λ‖² = 1+4+16+.25+0+1
    assert info.violation == pytest.approx(1.0) and info.max_violation == pytest.approx(4.0)
    assert info.multiplier_norm == pytest.approx(np.sqrt(22.25), abs=1e-14)
    C1 = t([[2.0, 2.0, 2.0]])
    info = D.step(torch.tensor([3]), C1)
    assert info.rho == 0.5 and D.last is info and D.t == 2
    np.testing.assert_allclose(M.weight.numpy()[3], [2.0, -1.0, 5.0], atol=1e-15)
    np.testing.assert_allclose(M.weight.numpy()[0], [0.5, 0.0, -1.0], atol=1e-15)
    info = D.step(torch.tensor([], dtype=torch.long), torch.zeros(0, 3, dtype=F64))
    assert info.count == 0 and info.violation == 0.0


class StepSchedule:
    """A stateful schedule: ρ halves every `every` calls."""

    def __init__(self, rho0: float, every: int) -> None:
        self.rho0, self.every, self.calls = rho0, every, 0

    def __call__(self, step: int) -> float:
        self.calls += 1
        return self.rho0 * 0.5 ** (step // self.every)

    def state_dict(self) -> dict:
        return {"calls": self.calls}

    def load_state_dict(self, state: dict) -> None:
        self.calls = state["calls"]


def test_dual_ascent_state_dict_round_trip() -> None:
    rng = np.random.default_rng(4)
    steps = [(torch.from_numpy(rng.choice(8, 3, replace=False)), t(rng.normal(size=(3, 2))))]
    steps += [
        (torch.from_numpy(rng.choice(8, 3, replace=False)), t(rng.normal(size=(3, 2))))
        for _ in range(9)
    ]
    M = IndexedMultipliers(8, 2, dtype=F64, inequality=True)
    D = DualAscent(M, rho=StepSchedule(1.0, 3))
    for idx, C in steps[:5]:
        D.step(idx, C)
    saved = copy.deepcopy((M.state_dict(), D.state_dict()))
    for idx, C in steps[5:]:
        D.step(idx, C)
    M2 = IndexedMultipliers(8, 2, dtype=F64, inequality=True)
    D2 = DualAscent(M2, rho=StepSchedule(1.0, 3))
    M2.load_state_dict(saved[0])
    D2.load_state_dict(saved[1])
    assert D2.rho.calls == 5
    for idx, C in steps[5:]:
        D2.step(idx, C)
    assert torch.equal(M.weight, M2.weight) and D2.t == D.t == 10
    assert D2.last == D.last


def test_dual_ascent_errors() -> None:
    M = IndexedMultipliers(4, 2, dtype=F64)
    with pytest.raises(ValueError, match=r"rho must be > 0, got 0\.0"):
        DualAscent(M, rho=0.0)
    with pytest.raises(ValueError, match="rho must be a finite number >= 0, got -1"):
        DualAscent(M, rho=-1)
    with pytest.raises(ValueError, match="multipliers must be an IndexedMultipliers"):
        DualAscent(torch.zeros(4, 2), rho=1.0)
    D = DualAscent(M, rho=lambda s: -1.0)
    with pytest.raises(ValueError, match="rho schedule at t=0 must be a finite number >= 0"):
        D.step(torch.tensor([0]), torch.zeros(1, 2, dtype=F64))
    D = DualAscent(M)
    with pytest.raises(ValueError, match=r"C must have shape \(len\(indices\), 2\)"):
        D.step(torch.tensor([0]), torch.zeros(1, 3, dtype=F64))
    with pytest.raises(ValueError, match="state_dict t must be an integer >= 0"):
        D.load_state_dict({"t": -2})


# ---- convergence on convex problems ------------------------------------------------------------


def method_of_multipliers(C_fn, a, M, rho, outer, inner, lr, check=None):
    """Alternate `inner` gradient steps on the augmented Lagrangian and one dual ascent step."""
    w = torch.zeros_like(a, requires_grad=True)
    D = DualAscent(M, rho=rho)
    idx = torch.arange(M.pool_size)
    for _ in range(outer):
        for _ in range(inner):
            R = 0.5 * ((w - a) ** 2).sum()
            L = lagrangian(R, C_fn(w), M(idx), rho_aug=rho, inequality=M.inequality)
            (g,) = torch.autograd.grad(L, w)
            with torch.no_grad():
                w -= lr * g
        with torch.no_grad():
            D.step(idx, C_fn(w))
        if check is not None:
            check(M)
    return w.detach()


def test_dual_ascent_equality_qp_matches_kkt() -> None:
    """min ½‖w − a‖² s.t. B w = c, 3 pool samples × 2 constraints, against the KKT solve."""
    rng = np.random.default_rng(10)
    n, K, NC = 8, 3, 2
    B, c, a = rng.normal(size=(K * NC, n)), rng.normal(size=K * NC), rng.normal(size=n)
    kkt = np.block([[np.eye(n), B.T], [B, np.zeros((K * NC, K * NC))]])
    sol = np.linalg.solve(kkt, np.concatenate([a, c]))
    w_star, lam_star = sol[:n], sol[n:]

    def C_fn(w):
        return (t(B) @ w - t(c)).reshape(K, NC)

    M = IndexedMultipliers(K, NC, dtype=F64)
    rho = 2.0
    lr = 1.0 / (1.0 + rho * np.linalg.norm(B, 2) ** 2)
    w = method_of_multipliers(C_fn, t(a), M, rho, outer=25, inner=20, lr=lr)
    np.testing.assert_allclose(w.numpy(), w_star, atol=1e-6, rtol=0)
    np.testing.assert_allclose(M.weight.numpy().reshape(-1), lam_star, atol=1e-6, rtol=0)
    assert np.abs(B @ w.numpy() - c).max() < 1e-6


def kkt_inequality(G, h, a):
    """min ½‖w − a‖² s.t. G w ≤ h by enumerating active sets (tiny problems)."""
    m, n = G.shape
    found = []
    for r in range(m + 1):
        for S in itertools.combinations(range(m), r):
            S = list(S)
            GS = G[S]
            K = np.block([[np.eye(n), GS.T], [GS, np.zeros((r, r))]])
            sol = np.linalg.solve(K, np.concatenate([a, h[S]]))
            w, mu = sol[:n], np.zeros(m)
            mu[S] = sol[n:]
            if np.all(mu >= -1e-12) and np.all(G @ w <= h + 1e-12):
                found.append((w, mu))
    assert len(found) == 1
    return found[0]


def test_dual_ascent_inequality_qp() -> None:
    """Inequalities C = G w − h ≤ 0: Λ ≥ 0 throughout; the inactive one ends at exactly 0."""
    rng = np.random.default_rng(21)
    n, m = 4, 3
    G, a = rng.normal(size=(m, n)), rng.normal(size=n)
    h = G @ a - np.array([1.0, 0.8, -2.0])  # a violates 0 and 1, satisfies 2 by a margin
    w_star, mu_star = kkt_inequality(G, h, a)
    assert mu_star[2] == 0.0 and np.all(mu_star[:2] > 0.1)  # one inactive, two active

    def C_fn(w):
        return (t(G) @ w - t(h)).reshape(m, 1)

    M = IndexedMultipliers(m, 1, dtype=F64, inequality=True)
    mins: list[float] = []
    rho = 2.0
    lr = 1.0 / (1.0 + rho * np.linalg.norm(G, 2) ** 2)
    w = method_of_multipliers(
        C_fn, t(a), M, rho, outer=40, inner=10, lr=lr, check=lambda M: mins.append(M.weight.min())
    )
    assert min(mins) >= 0.0
    np.testing.assert_allclose(w.numpy(), w_star, atol=1e-6, rtol=0)
    np.testing.assert_allclose(M.weight.numpy().reshape(-1), mu_star, atol=1e-6, rtol=0)
    assert M.weight[2, 0].item() == 0.0
