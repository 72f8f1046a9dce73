"""Tests of ccnn.hard.minres_qlp on named, seeded problems against independent answers."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse.linalg as spla
import torch

from ccnn.hard import Flag, MinresQLPInfo, minres_qlp

F64 = torch.float64


def t(a) -> torch.Tensor:
    return torch.as_tensor(np.asarray(a, dtype=np.float64))


def pinv_solution(A: np.ndarray, b: np.ndarray, shift: float = 0.0) -> np.ndarray:
    return np.linalg.pinv(A - shift * np.eye(A.shape[0]), rcond=1e-10) @ b


def relerr(x: torch.Tensor, ref: np.ndarray) -> float:
    return float(np.linalg.norm(x.cpu().numpy() - ref) / max(np.linalg.norm(ref), 1e-300))


# ---- problems ------------------------------------------------------------------------------


def diag_problem(n: int, kind: str) -> tuple[np.ndarray, np.ndarray]:
    """The Fortran distribution's test: A = diag(j/n), x = n+1−j; singular / inconsistent."""
    j = np.arange(1, n + 1)
    d = j / n
    if kind != "nonsingular":
        d[max(n - 2, 0) :] = 0.0
    b = d * (n + 1.0 - j)
    if kind == "inconsistent":
        b[max(n - 2, 0) :] = 1.0
    return np.diag(d), b


def neumann_laplacian(m: int) -> np.ndarray:
    """Singular 2-D grid Laplacian (Neumann boundary): null space = constants."""
    t1 = np.diag(np.r_[1.0, 2.0 * np.ones(m - 2), 1.0]) - np.eye(m, k=1) - np.eye(m, k=-1)
    return np.kron(t1, np.eye(m)) + np.kron(np.eye(m), t1)


def random_symmetric(n: int, seed: int, spd: bool) -> np.ndarray:
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(rng.standard_normal((n, n)))
    ev = rng.uniform(1.0, 10.0, n)
    if not spd:
        ev *= rng.choice([-1.0, 1.0], n)
    return (q * ev) @ q.T


# ---- the reference problems -------------------------------------------------------------------


@pytest.mark.parametrize("n", [1, 2, 3, 4, 50])
@pytest.mark.parametrize("shift", [0.0, 0.01, 0.3])
@pytest.mark.parametrize("kind", ["nonsingular", "singular", "inconsistent"])
def test_reference_diag_problems_give_pinv_solution(n, shift, kind):
    A, b = diag_problem(n, kind)
    x, info = minres_qlp(t(A), t(b), rtol=1e-12, shift=shift)
    # (n = 50, σ = 0.3 makes the "nonsingular" matrix singular (j = 15) with an inconsistent b)
    assert relerr(x, pinv_solution(A, b, shift)) < 1e-8, str(info)
    assert info.iterations <= 4 * n


def test_small_singular_diag_1230():
    # diag(1, 2, 3, 0): b = ones gives the pinv answer (1, 1/2, 1/3, 0) (a published test's
    # "[1, 1, 1, 0]" is the answer for b = (1, 2, 3, 1)); the null part of b is discarded.
    A = t(np.diag([1.0, 2.0, 3.0, 0.0]))
    x, info = minres_qlp(A, torch.ones(4, dtype=F64), rtol=1e-12)
    torch.testing.assert_close(x, t([1.0, 1 / 2, 1 / 3, 0.0]), atol=1e-12, rtol=0)
    x, info = minres_qlp(A, t([1.0, 2.0, 3.0, 1.0]), rtol=1e-12)
    torch.testing.assert_close(x, t([1.0, 1.0, 1.0, 0.0]), atol=1e-12, rtol=0)
    assert abs(info.rnorm - 1.0) < 1e-12 and info.relAres < 1e-12


def test_singular_indefinite_diag_minus10_to_10():
    A = np.diag(np.arange(-10.0, 11.0))
    b = np.ones(21)
    x, info = minres_qlp(t(A), t(b), rtol=1e-10)
    # The null direction appears only at the last Krylov step (n = 21): that step must be a
    # QLP step with the null direction w_k dropped (measured 5.9e-13).
    assert relerr(x, pinv_solution(A, b)) < 1e-10, str(info)
    assert abs(float(x[10])) < 1e-12  # no component along the null vector e_11
    assert info.minres_iterations > 0 and info.qlp_iterations > 0


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("shift", [0.0, 0.05])
def test_random_singular_inconsistent_gives_pinv_solution(seed, shift):
    """A = Q·diag(d)·Qᵀ with several exact zeros in d − σ: the minimum-length LS solution."""
    A, b = random_singular_problem(seed, shift)
    n = len(b)
    x, info = minres_qlp(t(A), t(b), rtol=1e-12, shift=shift, maxit=20 * n)
    # measured ≤ 1.4e-10 with reorthogonalization (docs/minres_qlp.md for other seeds)
    assert relerr(x, pinv_solution(A, b, shift)) < 1e-8, str(info)
    assert info.flag.converged and info.qlp_iterations > 0 and info.reorthogonalized


def test_random_singular_inconsistent_default_settings():
    """Seeds not used in development, default maxit and reorthogonalize: all within 1e-8."""
    worst = 0.0
    for seed in range(300, 320):
        for shift in (0.0, 0.05, -0.7):
            A, b = random_singular_problem(seed, shift)
            x, info = minres_qlp(t(A), t(b), rtol=1e-12, shift=shift)
            assert info.reorthogonalized and info.flag.converged, str(info)
            worst = max(worst, relerr(x, pinv_solution(A, b, shift)))
    assert worst < 1e-8, worst


@pytest.mark.parametrize("seed", range(6))
def test_random_singular_inconsistent_without_reorthogonalization(seed):
    """The plain three-term recurrence (what "auto" uses for large matrix-free problems)."""
    A, b = random_singular_problem(seed, 0.05)
    x, info = minres_qlp(t(A), t(b), rtol=1e-12, shift=0.05, maxit=20 * len(b),
                         reorthogonalize=False)
    assert not info.reorthogonalized and info.flag.converged, str(info)
    assert relerr(x, pinv_solution(A, b, 0.05)) < 1e-8, str(info)  # measured ≤ 6.2e-9


def test_reorthogonalize_auto_rule_and_preconditioner():
    n = 800  # n·min(maxit, n) = 640 000 ≤ 2²⁰, but 1 280 000 with M (r_j and M·r_j stored)
    d = t(np.linspace(1.0, 2.0, n))
    b = torch.ones(n, dtype=F64)
    _, info = minres_qlp(lambda v: d * v, b, rtol=1e-10)
    assert info.reorthogonalized
    _, info = minres_qlp(lambda v: d * v, b, rtol=1e-10, M=lambda r: r / d)
    assert not info.reorthogonalized
    big = torch.ones(2000, dtype=F64)
    _, info = minres_qlp(lambda v: 2.0 * v, big)  # 2000·2000 > 2²⁰: not stored
    assert not info.reorthogonalized
    _, info = minres_qlp(lambda v: 2.0 * v, big, maxit=10)  # 2000·10 elements
    assert info.reorthogonalized
    _, info = minres_qlp(torch.eye(2000, dtype=F64), big)  # a dense A: always stored
    assert info.reorthogonalized
    # preconditioned reorthogonalization (M-inner product), also with an M that returns its input
    A, b = random_singular_problem(2, 0.0)
    ref = pinv_solution(A, b)
    x, info = minres_qlp(t(A), t(b), rtol=1e-12, M=lambda r: r)
    assert info.reorthogonalized and relerr(x, ref) < 1e-8, str(info)
    # M = C·Cᵀ: the answer is C·pinv(Cᵀ A C)·Cᵀb (min ‖x‖_{M⁻¹}, and an M-weighted fit)
    dinv = np.linspace(0.5, 2.0, len(b))
    C = np.diag(np.sqrt(dinv))
    ref_m = C @ np.linalg.pinv(C @ A @ C, rcond=1e-10) @ (C @ b)
    x, info = minres_qlp(t(A), t(b), rtol=1e-12, M=lambda r: t(dinv) * r)
    assert info.reorthogonalized and info.flag.converged, str(info)
    assert relerr(x, ref_m) < 1e-8, str(info)  # measured 7e-12 (without: MAXIT, 18 away)
    with pytest.raises(ValueError, match="reorthogonalize"):
        minres_qlp(t(A), t(b), reorthogonalize="yes")  # type: ignore[arg-type]


@pytest.mark.parametrize("seed", [0, 3, 16])
def test_random_singular_inconsistent_loose_rtol(seed):
    # a least-squares stop at rtol 1e-8 returns the truncated QLP iterate (once 1.9e2 away)
    A, b = random_singular_problem(seed, 0.0)
    x, info = minres_qlp(t(A), t(b), rtol=1e-8, maxit=20 * len(b))
    assert relerr(x, pinv_solution(A, b)) < 1e-6, str(info)


def test_scipy_minres_is_not_minimum_length():
    """On a singular inconsistent system SciPy's MINRES gives a least-squares solution with a
    null-space component; MINRES-QLP gives the pseudoinverse solution."""
    A, b = random_singular_problem(1, 0.0)
    ref = pinv_solution(A, b)
    xs, _ = spla.minres(A, b, rtol=1e-12, maxiter=20 * len(b))
    x, _ = minres_qlp(t(A), t(b), rtol=1e-12, maxit=20 * len(b))
    w, U = np.linalg.eigh(A)
    null = U[:, np.abs(w) < 1e-10]
    assert np.linalg.norm(xs - ref) / np.linalg.norm(ref) > 1e-2
    assert np.linalg.norm(null.T @ xs) > 1e-2 * np.linalg.norm(ref)  # the difference: null part
    assert relerr(x, ref) < 1e-8
    assert np.linalg.norm(null.T @ x.numpy()) < 1e-8 * np.linalg.norm(ref)


def random_singular_problem(seed: int, shift: float) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    n = int(rng.integers(30, 80))
    Q, _ = np.linalg.qr(rng.standard_normal((n, n)))
    d = rng.uniform(-3, 3, n)
    d[rng.choice(n, size=int(rng.integers(2, 6)), replace=False)] = shift  # A − σI singular
    A = (Q * d) @ Q.T
    A = (A + A.T) / 2
    return A, rng.standard_normal(n)  # generic b: inconsistent


@pytest.mark.parametrize("consistent", [True, False])
def test_singular_neumann_laplacian(consistent):
    A = neumann_laplacian(10)
    rng = np.random.default_rng(0)
    b = rng.standard_normal(100)
    if consistent:
        b -= b.mean()  # orthogonal to the null space (constants)
    x, info = minres_qlp(t(A), t(b), rtol=1e-12)
    assert relerr(x, pinv_solution(A, b)) < 1e-8, str(info)
    assert abs(float(x.sum())) < 1e-8 * float(x.norm()) * 100  # minimum length: x ⟂ constants
    if consistent:
        assert info.flag in (Flag.SOLVED_RTOL, Flag.SOLVED_EPS)
    else:
        assert info.flag in (Flag.LEAST_SQUARES_RTOL, Flag.LEAST_SQUARES_EPS)


# ---- MINRES and QLP phases --------------------------------------------------------------------


def test_well_conditioned_uses_only_minres_steps():
    A = random_symmetric(60, seed=1, spd=False)
    b = np.random.default_rng(2).standard_normal(60)
    x, info = minres_qlp(t(A), t(b), rtol=1e-10)
    assert info.qlp_iterations == 0 and info.minres_iterations == info.iterations > 0
    assert relerr(x, np.linalg.solve(A, b)) < 1e-8


def test_tran_cond_one_forces_qlp_from_the_start():
    A = random_symmetric(60, seed=1, spd=False)
    b = np.random.default_rng(2).standard_normal(60)
    x, info = minres_qlp(t(A), t(b), rtol=1e-10, tran_cond=1.0)
    assert info.minres_iterations == 0 and info.qlp_iterations == info.iterations
    x2, _ = minres_qlp(t(A), t(b), rtol=1e-10)
    torch.testing.assert_close(x, x2, atol=1e-9, rtol=1e-9)


def test_ill_conditioned_singular_uses_both_phases():
    # eigenvalues spread over 1e-5 … 1 plus a null space, inconsistent right-hand side
    rng = np.random.default_rng(3)
    n = 30
    q, _ = np.linalg.qr(rng.standard_normal((n, n)))
    ev = np.r_[np.logspace(-5, 0, n - 3) * rng.choice([-1, 1], n - 3), 0.0, 0.0, 0.0]
    A = (q * ev) @ q.T
    A = (A + A.T) / 2
    b = q @ rng.standard_normal(n)  # range and null-space components: inconsistent
    x, info = minres_qlp(t(A), t(b), rtol=1e-12)
    assert info.minres_iterations > 0 and info.qlp_iterations > 0, str(info)
    assert relerr(x, pinv_solution(A, b)) < 1e-5, str(info)  # measured 3e-6 (cond 1e5)


# ---- agreement with SciPy on nonsingular systems ------------------------------------------------


@pytest.mark.parametrize("spd", [True, False])
@pytest.mark.parametrize("seed", [0, 1])
def test_agrees_with_scipy_minres(spd, seed):
    n = 120
    A = random_symmetric(n, seed=seed, spd=spd)
    b = np.random.default_rng(seed + 10).standard_normal(n)
    xs, istop = spla.minres(A, b, rtol=1e-10, maxiter=10 * n)
    its: list[int] = []
    spla.minres(A, b, rtol=1e-10, maxiter=10 * n, callback=lambda _: its.append(1))
    x, info = minres_qlp(t(A), t(b), rtol=1e-10)
    assert istop == 0 and info.flag is Flag.SOLVED_RTOL
    assert relerr(x, xs) < 1e-7
    assert abs(info.iterations - len(its)) <= max(3, 0.1 * len(its)), (info.iterations, len(its))


# ---- operator forms, shift, x0, preconditioner, dtypes ------------------------------------------


def test_callable_and_sparse_match_dense():
    A = neumann_laplacian(8) + 0.1 * np.eye(64)
    b = np.random.default_rng(4).standard_normal(64)
    At = t(A)
    x_dense, i_dense = minres_qlp(At, t(b), rtol=1e-10)
    x_call, i_call = minres_qlp(lambda v: At @ v, t(b), rtol=1e-10)
    x_coo, _ = minres_qlp(At.to_sparse(), t(b), rtol=1e-10)
    x_csr, _ = minres_qlp(At.to_sparse_csr(), t(b), rtol=1e-10)
    for x in (x_call, x_coo, x_csr):
        torch.testing.assert_close(x, x_dense, atol=1e-10, rtol=1e-10)
    assert i_call.iterations == i_dense.iterations


def test_shift_equals_solving_shifted_matrix():
    A = random_symmetric(50, seed=5, spd=True)
    b = np.random.default_rng(5).standard_normal(50)
    sigma = 3.3
    x1, _ = minres_qlp(t(A), t(b), shift=sigma, rtol=1e-11)
    x2, _ = minres_qlp(t(A - sigma * np.eye(50)), t(b), rtol=1e-11)
    torch.testing.assert_close(x1, x2, atol=1e-8, rtol=1e-8)
    assert relerr(x1, np.linalg.solve(A - sigma * np.eye(50), b)) < 1e-8


def test_x0_warm_start():
    A = random_symmetric(50, seed=6, spd=False)
    b = np.random.default_rng(6).standard_normal(50)
    xt = np.linalg.solve(A, b)
    x0 = t(xt + 1e-3 * np.random.default_rng(7).standard_normal(50))
    x, info = minres_qlp(t(A), t(b), x0=x0, rtol=1e-10)
    _, info_cold = minres_qlp(t(A), t(b), rtol=1e-10)
    assert relerr(x, xt) < 1e-8
    assert info.iterations <= info_cold.iterations
    # x0 that solves the system exactly: nothing to do
    D = t(np.diag([1.0, 2.0, 4.0]))
    x, info = minres_qlp(D, t([3.0, 4.0, 8.0]), x0=t([3.0, 2.0, 2.0]))
    assert info.flag is Flag.ZERO_RHS and info.iterations == 0
    torch.testing.assert_close(x, t([3.0, 2.0, 2.0]))


@pytest.mark.parametrize("reorthogonalize", ["auto", False])
def test_jacobi_preconditioner_reduces_iterations(reorthogonalize):
    rng = np.random.default_rng(8)
    n = 200
    d = np.logspace(0, 4, n)
    A = np.diag(d) + 0.5 * (np.eye(n, k=1) + np.eye(n, k=-1))  # SPD, badly scaled
    b = rng.standard_normal(n)
    opts = {"rtol": 1e-10, "reorthogonalize": reorthogonalize}
    x_plain, i_plain = minres_qlp(t(A), t(b), **opts)
    dinv = t(1.0 / np.diag(A))
    x_pc, i_pc = minres_qlp(t(A), t(b), M=lambda r: dinv * r, **opts)
    x_pm, _ = minres_qlp(t(A), t(b), M=torch.diag(dinv), check=True, **opts)
    assert i_pc.reorthogonalized is (reorthogonalize == "auto")
    xt = np.linalg.solve(A, b)
    assert relerr(x_pc, xt) < 1e-8 and relerr(x_plain, xt) < 1e-5
    torch.testing.assert_close(x_pm, x_pc, atol=1e-10, rtol=1e-10)
    assert i_pc.iterations < i_plain.iterations / 2, (i_pc.iterations, i_plain.iterations)


@pytest.mark.parametrize("reorthogonalize", [True, False])
def test_preconditioned_solve_matches_the_dense_solve(reorthogonalize):
    rng = np.random.default_rng(21)
    n = 120
    Q, _ = np.linalg.qr(rng.standard_normal((n, n)))
    A = Q @ np.diag(np.linspace(1.0, 1e3, n)) @ Q.T  # SPD, far from diagonal
    b = rng.standard_normal(n)
    M = t(np.diag(1.0 / np.diag(A)))
    x, info = minres_qlp(t(A), t(b), rtol=1e-10, M=M, reorthogonalize=reorthogonalize)
    assert info.flag.converged and info.reorthogonalized is reorthogonalize
    assert relerr(x, np.linalg.solve(A, b)) < 1e-7, str(info)


def test_float32():
    A = random_symmetric(40, seed=9, spd=False)
    b = np.random.default_rng(9).standard_normal(40)
    x, info = minres_qlp(t(A).float(), t(b).float(), rtol=1e-5)
    assert x.dtype == torch.float32
    assert relerr(x.double(), np.linalg.solve(A, b)) < 1e-4, str(info)
    A, b = diag_problem(50, "inconsistent")
    x, info = minres_qlp(t(A).float(), t(b).float(), rtol=1e-6)
    assert relerr(x.double(), pinv_solution(A, b)) < 1e-3, str(info)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA not available")
def test_cuda_matches_cpu():
    A, b = diag_problem(50, "inconsistent")
    x_cpu, _ = minres_qlp(t(A), t(b), rtol=1e-12)
    x_gpu, _info = minres_qlp(t(A).cuda(), t(b).cuda(), rtol=1e-12)
    assert x_gpu.device.type == "cuda"
    torch.testing.assert_close(x_gpu.cpu(), x_cpu, atol=1e-8, rtol=1e-8)


def test_callback_called_each_iteration():
    A = random_symmetric(30, seed=10, spd=True)
    seen: list[float] = []
    _, info = minres_qlp(t(A), torch.ones(30, dtype=F64), callback=lambda x: seen.append(1.0))
    assert len(seen) == info.iterations


# ---- flags -------------------------------------------------------------------------------------


def test_zero_rhs():
    x, info = minres_qlp(t(np.eye(5)), torch.zeros(5, dtype=F64))
    assert info.flag is Flag.ZERO_RHS and info.iterations == 0
    assert torch.equal(x, torch.zeros(5, dtype=F64))
    assert "x = 0" in info.message


def test_iteration_limit():
    A = random_symmetric(100, seed=11, spd=False)
    _x, info = minres_qlp(t(A), torch.ones(100, dtype=F64), maxit=5)
    assert info.flag is Flag.MAXIT and info.iterations == 5
    _, info = minres_qlp(t(A), torch.ones(100, dtype=F64), maxit=0)
    assert info.flag is Flag.MAXIT and info.iterations == 0


def test_xnorm_limit():
    A, b = diag_problem(50, "nonsingular")  # ‖x‖ ≈ 210
    _x, info = minres_qlp(t(A), t(b), rtol=1e-12, maxxnorm=50.0)
    assert info.flag is Flag.XNORM_LIMIT
    assert info.xnorm <= 50.0 * (1 + 1e-8)


def test_rhs_eigenvector_solved_in_one_step():
    A = np.diag([2.0, 3.0, 5.0])
    x, info = minres_qlp(t(A), t([0.0, 6.0, 0.0]))
    assert info.flag is Flag.RHS_EIGENVECTOR and info.iterations == 1
    torch.testing.assert_close(x, t([0.0, 2.0, 0.0]))


def test_info_is_frozen_and_prints():
    _, info = minres_qlp(t(np.eye(3) * 2), torch.ones(3, dtype=F64))
    assert isinstance(info, MinresQLPInfo)
    with pytest.raises(AttributeError):
        info.iterations = 3  # type: ignore[misc]
    s = str(info)
    assert "flag" in s and "iterations" in s
    assert all(f.message for f in Flag)


# ---- errors -------------------------------------------------------------------------------------


def test_errors():
    A = t(np.eye(4))
    b = torch.ones(4, dtype=F64)
    with pytest.raises(ValueError, match="shape mismatch"):
        minres_qlp(t(np.eye(3)), b)
    with pytest.raises(ValueError, match="1-D"):
        minres_qlp(A, b.reshape(2, 2))
    with pytest.raises(ValueError, match="non-finite"):
        minres_qlp(A, torch.tensor([1.0, float("nan"), 0.0, 0.0], dtype=F64))
    with pytest.raises(ValueError, match="rtol"):
        minres_qlp(A, b, rtol=-1.0)
    with pytest.raises(ValueError, match="maxit"):
        minres_qlp(A, b, maxit=-3)
    with pytest.raises(ValueError, match="maxit"):
        minres_qlp(A, b, maxit=2.5)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="shift"):
        minres_qlp(A, b, shift=float("inf"))
    with pytest.raises(ValueError, match="shift"):
        minres_qlp(A, b, shift=1j)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="square"):
        minres_qlp(torch.ones(4, 3, dtype=F64), b)
    with pytest.raises(ValueError, match=r"must return a tensor of shape \(4,\)"):
        minres_qlp(lambda v: v[:2], b)
    with pytest.raises(ValueError, match="shape mismatch: x0"):
        minres_qlp(A, b, x0=torch.zeros(3, dtype=F64))


def test_check_symmetry_and_spd():
    n = 20
    rng = np.random.default_rng(12)
    B = rng.standard_normal((n, n))
    b = torch.ones(n, dtype=F64)
    with pytest.raises(ValueError, match="A is not symmetric"):
        minres_qlp(t(B), b, check=True)
    with pytest.raises(ValueError, match="A is not symmetric"):
        minres_qlp(t(B).to_sparse(), b, check=True)
    Bt = t(B)
    with pytest.raises(ValueError, match="A is not symmetric"):
        minres_qlp(lambda v: Bt @ v, b, check=True)
    S = t(B + B.T)
    with pytest.raises(ValueError, match="M does not look positive definite"):
        minres_qlp(S, b, M=lambda r: -r, check=True)
    with pytest.raises(ValueError, match="M is not symmetric"):
        minres_qlp(S, b, M=Bt, check=True)
    # an indefinite M is also caught during the solve without check
    with pytest.raises(ValueError, match="indefinite"):
        minres_qlp(S, b, M=lambda r: -r)
    x, _ = minres_qlp(S, b, check=True)  # a symmetric A passes
    assert torch.isfinite(x).all()
