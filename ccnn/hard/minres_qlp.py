"""MINRES-QLP for symmetric, possibly indefinite or singular, linear systems in PyTorch.

:func:`minres_qlp` solves ``(A − σI)·x = b`` or, when the system is singular and inconsistent,
returns the minimum-length least-squares solution ``x = (A − σI)⁺·b``. It takes plain MINRES
steps while the estimated condition number stays below ``tran_cond`` and switches to the QLP
factorization of the Lanczos tridiagonal after that (Choi, Paige, Saunders 2011). When storing
the Lanczos vectors is cheap (``reorthogonalize="auto"``) they are reorthogonalized, and a
least-squares solve ends with the minimum-length solution of the projected problem.

The vectors live on ``b``'s device in ``b``'s dtype; the short recurrences of the method are
carried in Python floats (double precision), so each iteration synchronises with the device twice
(for ``α_k`` and ``β_{k+1}``), as SciPy's ``minres`` does.

Notation (the paper's, with ``k`` the Lanczos step): ``α_k``, ``β_k`` the entries of the Lanczos
tridiagonal ``T_k``; left reflections ``Q_k`` with ``c_k, s_k``; right reflections ``P_{k−2,k}``
(``c_{k2}, s_{k2}``) and ``P_{k−1,k}`` (``c_{k1}, s_{k1}``); the lower-tridiagonal factor
``L_k`` has diagonal ``γ_k``, subdiagonal ``ϑ_k`` and second subdiagonal ``η_k``; ``τ_k`` are the
rotated right-hand side, ``φ_k`` the residual-norm estimate and ``μ_k`` the solution coordinates
(``L_k·μ = τ``) in the QLP basis ``W_k = V_k·P_k``. In the code ``_km1`` means subscript ``k−1``,
``_kp1`` subscript ``k+1`` and so on.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

__all__ = ["REORTH_BUDGET", "Flag", "MinresQLPInfo", "minres_qlp"]

Operator = Tensor | Callable[[Tensor], Tensor]

#: ``reorthogonalize="auto"`` stores the Lanczos vectors of a sparse or matrix-free ``A`` when they
#: take at most this many elements (2²⁰ = 1 048 576: 8 MiB in float64), counted as
#: ``n·min(maxit, n)``, twice that with a preconditioner; for a dense ``A`` it always stores them.
REORTH_BUDGET = 2**20


class Flag(enum.IntEnum):
    """Why :func:`minres_qlp` stopped; the values are those of the reference code."""

    RHS_EIGENVECTOR = -1
    ZERO_RHS = 0
    SOLVED_RTOL = 1
    LEAST_SQUARES_RTOL = 2
    SOLVED_EPS = 3
    LEAST_SQUARES_EPS = 4
    EIGENVECTOR = 5
    XNORM_LIMIT = 6
    ACOND_LIMIT = 7
    MAXIT = 8
    SINGULAR = 9

    @property
    def message(self) -> str:
        """One sentence saying what the flag means."""
        return _MESSAGES[self]

    @property
    def converged(self) -> bool:
        """True for the flags that report a solution to the requested accuracy or better."""
        return self <= Flag.LEAST_SQUARES_EPS


_MESSAGES = {
    Flag.RHS_EIGENVECTOR: "beta_2 = 0: b is an eigenvector of (A - shift*I) and x = b/alpha_1 "
    "solves the system exactly in one step.",
    Flag.ZERO_RHS: "beta_1 = 0 or (A - shift*I)b = 0: x = 0 is the exact (minimum-length) "
    "solution.",
    Flag.SOLVED_RTOL: "A solution of (A - shift*I)x = b was found to the requested rtol.",
    Flag.LEAST_SQUARES_RTOL: "A minimum-length least-squares solution of the singular system "
    "was found to the requested rtol.",
    Flag.SOLVED_EPS: "A solution of (A - shift*I)x = b was found to machine precision.",
    Flag.LEAST_SQUARES_EPS: "A minimum-length least-squares solution of the singular system was "
    "found to machine precision.",
    Flag.EIGENVECTOR: "x has converged to an eigenvector: ||A||*||x||*eps exceeds ||b||.",
    Flag.XNORM_LIMIT: "||x|| would exceed maxxnorm; the last iterate within the limit is "
    "returned.",
    Flag.ACOND_LIMIT: "The estimate of cond(A) exceeded acondlim.",
    Flag.MAXIT: "The iteration limit maxit was reached.",
    Flag.SINGULAR: "The system was found to be singular (gamma_k = 0) before a least-squares "
    "solution converged.",
}


_SOLVED = (Flag.RHS_EIGENVECTOR, Flag.ZERO_RHS, Flag.SOLVED_RTOL, Flag.SOLVED_EPS)


@dataclass(frozen=True)
class MinresQLPInfo:
    """What :func:`minres_qlp` reports about its solve.

    Attributes
    ----------
    flag : Flag
        Why it stopped; ``flag.message`` says it in words.
    iterations : int
        Lanczos steps taken (one product with ``A`` each; two more compute the final residuals).
    minres_iterations, qlp_iterations : int
        How many of them updated ``x`` by plain MINRES and by MINRES-QLP.
    relres : float
        ``‖r‖ / (anorm·‖x‖ + ‖b‖)`` with ``r = b − (A − σI)x`` computed directly at the end.
    relAres : float
        ``‖(A − σI)r‖ / (anorm·‖r‖)`` (0 when ``r = 0``); small for a least-squares solution.
    anorm : float
        Estimate of ``‖A − σI‖₂`` (of the preconditioned operator when ``M`` is given).
    acond : float
        Estimate of its condition number.
    xnorm : float
        ``‖x‖`` (direct).
    axnorm : float
        ``‖(A − σI)x‖`` (direct, as ``‖b − r‖``).
    rnorm : float
        ``‖r‖`` (direct).
    arnorm : float
        ``‖(A − σI)r‖`` (direct).
    reorthogonalized : bool
        Whether each Lanczos vector was reorthogonalized against the stored previous ones.
    """

    flag: Flag
    iterations: int
    minres_iterations: int
    qlp_iterations: int
    relres: float
    relAres: float  # noqa: N815 (the reference name)
    anorm: float
    acond: float
    xnorm: float
    axnorm: float
    rnorm: float
    arnorm: float
    reorthogonalized: bool

    @property
    def message(self) -> str:
        """The sentence for :attr:`flag`."""
        return self.flag.message

    def __str__(self) -> str:
        return (
            f"MINRES-QLP stopped with flag {int(self.flag)} ({self.flag.name}): {self.message}\n"
            f"  iterations {self.iterations} (MINRES {self.minres_iterations}, "
            f"QLP {self.qlp_iterations}, reorthogonalized {self.reorthogonalized})\n"
            f"  rnorm {self.rnorm:.3e}  relres {self.relres:.3e}  "
            f"arnorm {self.arnorm:.3e}  relAres {self.relAres:.3e}\n"
            f"  anorm {self.anorm:.3e}  acond {self.acond:.3e}  "
            f"xnorm {self.xnorm:.3e}  axnorm {self.axnorm:.3e}"
        )


def _sym_ortho(a: float, b: float) -> tuple[float, float, float]:
    """Stable reflection ``(c, s, r)`` with ``[c s; s −c]·[a; b] = [r; 0]`` and ``r ≥ 0``."""
    if b == 0.0:
        return (1.0 if a == 0.0 else math.copysign(1.0, a)), 0.0, abs(a)
    if a == 0.0:
        return 0.0, math.copysign(1.0, b), abs(b)
    if abs(b) > abs(a):
        t = a / b
        s = math.copysign(1.0, b) / math.sqrt(1.0 + t * t)
        return s * t, s, b / s
    t = b / a
    c = math.copysign(1.0, a) / math.sqrt(1.0 + t * t)
    return c, c * t, a / c


def _safe_div(num: float, den: float) -> float:
    if den > 0.0:
        return num / den
    return 0.0 if num == 0.0 else math.inf


def _as_operator(
    A: Operator, n: int, dtype: torch.dtype, device: torch.device, name: str
) -> tuple[Callable[[Tensor], Tensor], Tensor | None]:
    """``v ↦ A·v`` for a dense or sparse matrix or a callable, and the matrix if there is one."""
    if isinstance(A, Tensor):
        if A.dim() != 2 or A.shape[0] != A.shape[1]:
            raise ValueError(f"{name} must be a square matrix, got shape {tuple(A.shape)}")
        if A.shape[0] != n:
            raise ValueError(
                f"shape mismatch: {name} is {A.shape[0]}×{A.shape[1]} but b has length {n}"
            )
        if A.is_complex() or not A.is_floating_point():
            raise ValueError(f"{name} must be a real floating-point matrix, got {A.dtype}")
        mat = A.to(device=device, dtype=dtype)
        if mat.layout == torch.strided:
            return (lambda v: torch.mv(mat, v)), mat
        return (lambda v: mat @ v), mat
    if callable(A):

        def apply(v: Tensor) -> Tensor:
            y = A(v)
            if not isinstance(y, Tensor) or y.shape != (n,):
                got = tuple(y.shape) if isinstance(y, Tensor) else type(y).__name__
                raise ValueError(f"{name}(v) must return a tensor of shape ({n},), got {got}")
            if y.dtype != dtype or y.device != device:
                y = y.to(device=device, dtype=dtype)
            return y

        return apply, None
    raise TypeError(f"{name} must be a torch matrix (dense or sparse) or a callable v -> {name}·v")


def _check_symmetric(
    op: Callable[[Tensor], Tensor], mat: Tensor | None, n: int, b: Tensor, name: str, spd: bool
) -> None:
    """Raise ValueError when ``op`` is visibly non-symmetric (or, with ``spd``, not positive)."""
    tol = math.sqrt(torch.finfo(b.dtype).eps)
    if mat is not None:
        m = mat.to_sparse_coo() if mat.layout != torch.strided else mat
        diff = (m - m.t()).coalesce().values() if m.is_sparse else m - m.t()
        vals = m.coalesce().values() if m.is_sparse else m
        asym = float(torch.linalg.vector_norm(diff))
        scale = float(torch.linalg.vector_norm(vals))
        if asym > tol * scale:
            raise ValueError(
                f"{name} is not symmetric: ||{name} - {name}^T||_F = {asym:.3e} "
                f"> {tol:.1e}·||{name}||_F"
            )
    gen = torch.Generator(device=b.device).manual_seed(20110101)
    for _ in range(2):
        u = torch.randn(n, generator=gen, device=b.device, dtype=b.dtype)
        v = torch.randn(n, generator=gen, device=b.device, dtype=b.dtype)
        au, av = op(u), op(v)
        gap = abs(float(torch.dot(u, av) - torch.dot(v, au)))
        scale = float(
            torch.linalg.vector_norm(u) * torch.linalg.vector_norm(av)
            + torch.linalg.vector_norm(v) * torch.linalg.vector_norm(au)
        )
        if gap > tol * scale:
            raise ValueError(
                f"{name} is not symmetric: |u·{name}v − v·{name}u| = {gap:.3e} for random u, v"
            )
        if spd:
            for z, az in ((u, au), (v, av)):
                q = float(torch.dot(z, az))
                if not q > 0.0:
                    raise ValueError(
                        f"{name} does not look positive definite: u·{name}u = {q:.3e} ≤ 0 "
                        "for a random u"
                    )


def _check_finite_positive(value: float, name: str) -> float:
    try:
        f = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a real number, got {value!r}") from None
    if not (math.isfinite(f) and f > 0.0):
        raise ValueError(f"{name} must be finite and positive, got {value!r}")
    return f


def _direct_norms(
    op: Callable[[Tensor], Tensor], b: Tensor, x: Tensor
) -> tuple[float, float, float, float]:
    """``‖r‖, ‖(A − σI)r‖, ‖x‖, ‖(A − σI)x‖`` with ``r = b − (A − σI)x``, computed directly."""
    r = b - op(x)
    rnorm, arnorm, xnorm, axnorm = (
        float(torch.linalg.vector_norm(z)) for z in (r, op(r), x, b - r)
    )
    return rnorm, arnorm, xnorm, axnorm


def _direct_relares(
    op: Callable[[Tensor], Tensor],
    psolve: Callable[[Tensor], Tensor] | None,
    b: Tensor,
    x: Tensor,
    anorm: float,
) -> float:
    """``‖(A − σI)r‖ / (anorm·‖r‖)``; with ``M = C·Cᵀ`` that of ``Cᵀ(A − σI)C``, computed directly.

    With ``M`` the least-squares residual is ``Cᵀr`` and its optimality test
    ``Cᵀ(A − σI)M·r = 0``; the norms come from ``‖Cᵀw‖² = wᵀM·w``.
    """
    r = b - op(x)
    z = r if psolve is None else psolve(r)
    w = op(z)
    mw = w if psolve is None else psolve(w)
    num = math.sqrt(max(float(torch.dot(w, mw)), 0.0))
    return _safe_div(num, anorm * math.sqrt(max(float(torch.dot(r, z)), 0.0)))


def _use_reorthogonalization(
    reorthogonalize: bool | Literal["auto"], n: int, maxit: int, precon: bool, dense: bool
) -> bool:
    """Resolve ``reorthogonalize``; ``"auto"`` is on when storing the Lanczos vectors is cheap.

    At most ``min(maxit, n)`` vectors are stored (``n`` of them span the space), twice as many
    with a preconditioner (``r_j`` and ``M·r_j``). ``"auto"`` stores them when ``A`` is a dense
    matrix (the vectors then take no more memory than ``A``, twice that with ``M``, and the extra
    work at step ``k``, ``4·k·n`` flops, is at most twice the ``2·n²`` of the product) or when they
    take at most :data:`REORTH_BUDGET` elements (all ``n`` steps up to ``n = 1024``). A large
    sparse or matrix-free problem (``n = 10⁶``) keeps the three-vector recurrence and its cost.
    """
    if isinstance(reorthogonalize, bool):
        return reorthogonalize
    if reorthogonalize != "auto":
        raise ValueError(f'reorthogonalize must be True, False or "auto", got {reorthogonalize!r}')
    return dense or min(maxit, n) * n * (2 if precon else 1) <= REORTH_BUDGET


class _LanczosBasis:
    """The Lanczos vectors computed so far, for full reorthogonalization.

    The Lanczos process of the paper (Table 2.1; preconditioned: Table 7.1 with ``z = M·r``)
    makes each new vector orthogonal to the previous two only; in floating point the vectors
    lose orthogonality once a Ritz value converges. Storing ``v_1 … v_k`` and projecting them out
    of each new vector restores ``V_kᵀ V_k = I`` to working accuracy. Without ``M`` the rows are
    ``v_j``. With ``M`` the method keeps the pair ``r_j`` (the vector before ``M``) and
    ``z_j = M·r_j``, scaled as ``u_j = r_j/β_j`` and ``v_j = z_j/β_j``; the ``u_j`` are orthonormal
    in the M-inner product (``u_iᵀ M u_j = v_iᵀ u_j = δ_ij``), so both are stored and
    :meth:`orthogonalize` removes the same coefficients ``v_jᵀ r`` from ``r`` (along ``u_j``) and
    from ``z`` (along ``v_j = M u_j``), which keeps ``z = M·r``.
    """

    def __init__(self, b: Tensor, capacity: int, precon: bool) -> None:
        self.capacity = capacity  # at most n: n orthonormal vectors span the whole space
        self.k = 0
        rows = min(capacity, 32)  # grown by doubling, so memory follows the steps taken
        self.v = b.new_empty((rows, b.shape[0]))
        self.u = b.new_empty((rows, b.shape[0])) if precon else None
        self.alphas: list[float] = []  # α_1 … α_k, the diagonal of T_k
        self.betas: list[float] = []  # β_2 … β_{k+1}, its subdiagonal and the last row of T̄_k

    def append(self, v: Tensor, u: Tensor | None) -> None:
        """Store ``v_k`` (and ``u_k`` with a preconditioner); a full basis is left as it is."""
        if self.k == self.capacity:
            return
        if self.k == self.v.shape[0]:
            rows = min(2 * self.k, self.capacity)
            self.v = torch.cat((self.v, self.v.new_empty((rows - self.k, self.v.shape[1]))))
            if self.u is not None:
                self.u = torch.cat((self.u, self.u.new_empty((rows - self.k, self.u.shape[1]))))
        self.v[self.k].copy_(v)
        if self.u is not None:
            assert u is not None
            self.u[self.k].copy_(u)
        self.k += 1

    def record(self, alpha: float, beta_kp1: float) -> None:
        """Keep ``α_k`` and ``β_{k+1}``, column ``k`` of the Lanczos matrix ``T̄_k``."""
        self.alphas.append(alpha)
        self.betas.append(beta_kp1)

    def min_length_solution(self, beta1: float, tol: float) -> Tensor | None:
        """``V_k y`` for the minimum-length ``y`` of ``min ‖β₁e₁ − T̄_k y‖``, or None.

        This is the projected problem that MINRES-QLP solves (Choi, Paige, Saunders 2011, §2:
        ``x_k = V_k y_k`` with ``y_k`` the minimum-length least-squares solution for
        ``T̄_k = [T_k; β_{k+1}e_kᵀ]``), here solved by a truncated SVD of the small
        ``(k+1)×k`` matrix: singular values at or below ``tol·σ_max`` are taken as zero. It
        returns None when there is none (``T̄_k`` numerically of full rank, so the QLP iterate
        is already the answer) or when the basis is incomplete (more than ``n`` steps).
        """
        k = len(self.alphas)
        if k == 0 or k != self.k:
            return None
        tbar = torch.zeros((k + 1, k), dtype=torch.float64)
        idx = torch.arange(k)
        tbar[idx, idx] = torch.tensor(self.alphas, dtype=torch.float64)
        tbar[idx + 1, idx] = torch.tensor(self.betas, dtype=torch.float64)
        tbar[idx[:-1], idx[:-1] + 1] = tbar[idx[:-1] + 1, idx[:-1]]
        u, sig, vh = torch.linalg.svd(tbar, full_matrices=False)
        keep = sig > tol * sig[0]
        if bool(keep.all()):
            return None
        y = vh[keep].t() @ (beta1 * u[0, keep] / sig[keep])
        return self.v[:k].t() @ y.to(dtype=self.v.dtype, device=self.v.device)

    def orthogonalize(self, r: Tensor, z: Tensor | None) -> None:
        """Project ``r`` (and ``z = M·r``) against the basis in place, twice.

        Classical Gram–Schmidt applied twice ("twice is enough": Parlett, *The Symmetric
        Eigenvalue Problem*, §6.9; Giraud, Langou, Rozložník 2005) leaves ``r`` orthogonal to the
        basis to working accuracy; the second pass costs no host synchronisation to decide.
        """
        vk = self.v[: self.k]
        uk = vk if self.u is None else self.u[: self.k]
        for _ in range(2):
            c = torch.mv(vk, r)  # v_jᵀ r, j = 1 … k
            r.addmv_(uk.t(), c, alpha=-1.0)
            if z is not None:
                z.addmv_(vk.t(), c, alpha=-1.0)


def minres_qlp(
    A: Operator,
    b: Tensor,
    *,
    rtol: float = 1e-6,
    maxit: int | None = None,
    shift: float = 0.0,
    M: Operator | None = None,
    x0: Tensor | None = None,
    tran_cond: float = 1e7,
    maxxnorm: float = 1e7,
    acondlim: float = 1e15,
    check: bool = False,
    callback: Callable[[Tensor], object] | None = None,
    reorthogonalize: bool | Literal["auto"] = "auto",
) -> tuple[Tensor, MinresQLPInfo]:
    r"""Solve a symmetric system ``(A − σI)x = b``, or its minimum-length least-squares problem.

    MINRES-QLP (Choi, Paige, Saunders 2011) returns the minimum-length solution
    ``x = (A − σI)⁺·b`` of ``min ‖x‖ subject to x minimising ‖b − (A − σI)x‖`` for any symmetric
    ``A``: nonsingular, indefinite, singular, consistent or not. It takes plain MINRES steps
    (cheapest, three vectors per step) while the estimated condition number of the Lanczos
    tridiagonal stays below ``tran_cond`` and transfers to the QLP factorization for the rest of
    the solve (and for the last step of any solve stopped by a singularity or norm limit).

    Parameters
    ----------
    A : Tensor or callable
        The symmetric ``n×n`` operator: a dense or sparse (COO, CSR) torch matrix, or a callable
        ``v -> A·v`` taking and returning a tensor of shape ``(n,)`` (matrix-free). A matrix is
        converted to ``b``'s dtype and device.
    b : Tensor
        Right-hand side, shape ``(n,)``, float32 or float64, on any device. All work is done in
        its dtype and on its device.
    rtol : float, optional
        Relative tolerance (default 1e-6). Stops when ``‖r‖ ≤ rtol·(‖A‖‖x‖ + ‖b‖)`` (a solution)
        or ``‖(A − σI)r‖ ≤ rtol·‖A‖‖r‖`` (a least-squares solution), with the method's
        estimates of these norms. ``rtol = 0`` iterates to machine precision.
    maxit : int, optional
        Iteration limit (default ``4n``).
    shift : float, optional
        ``σ``: the system solved is ``(A − σI)x = b``. Default 0.
    M : Tensor or callable, optional
        Symmetric positive definite preconditioner, *applied by multiplication*: ``z = M·r``.
        So ``M`` approximates ``(A − σI)⁻¹`` (SciPy's convention; for Jacobi pass
        ``1/diag(A)``). Given ``M = C·Cᵀ``, MINRES-QLP runs on ``Cᵀ(A − σI)C``; the stopping
        tests and ``anorm``/``acond`` then refer to that operator, and on singular systems the
        answer is of minimum ``‖x‖_{M⁻¹}`` rather than minimum ``‖x‖``.
    x0 : Tensor, optional
        Starting guess; the method solves ``(A − σI)·dx = b − (A − σI)·x0`` for the correction
        and returns ``x0 + dx`` (so the minimum-length property applies to ``dx``).
    tran_cond : float, optional
        Condition estimate above which the method moves from MINRES to QLP steps (default
        1e7). ``tran_cond = 1`` gives QLP steps from the start; ``acondlim`` or more gives
        MINRES only (until a singularity is found).
    maxxnorm : float, optional
        Stop (flag ``XNORM_LIMIT``) rather than let ``‖x‖`` exceed this (default 1e7).
    acondlim : float, optional
        Stop (flag ``ACOND_LIMIT``) when the condition estimate reaches this (default 1e15).
    check : bool, optional
        Test that ``A`` (and ``M``) is symmetric, and that ``M`` is positive on random vectors,
        before iterating (a few extra products). Default False.
    callback : callable, optional
        Called as ``callback(x)`` after each iteration with the current iterate (the solver's own
        buffer: copy it to keep it).
    reorthogonalize : bool or "auto", optional
        Store the Lanczos vectors and orthogonalize each new one against all of them, twice
        (with ``M``: in the M-inner product, storing ``r_j`` and ``M·r_j``). This keeps
        ``V_kᵀV_k = I`` to working accuracy, so the Lanczos matrix ``T̄_k`` is the exact
        projection; when the solve ends on a numerically rank-deficient ``T̄_k`` without a
        solution (a singular, inconsistent system) the answer is then recomputed as ``V_k y``
        with ``y`` the minimum-length least-squares solution of the projected problem (truncated
        SVD of the ``(k+1)×k`` matrix, singular values below ``max(rtol, √eps)·‖T̄_k‖`` dropped)
        and kept when its direct relAres is at most ``max(rtol, √eps)``. Costs ``k·n`` stored
        elements and ``4·k·n`` flops at step ``k``. ``"auto"`` (default) turns it on for a dense
        ``A``, or when ``n·min(maxit, n)`` (twice that with ``M``) is at most
        :data:`REORTH_BUDGET` = 2²⁰; otherwise (e.g. matrix-free, ``n = 10⁶``) the plain
        three-term recurrence is used. ``info.reorthogonalized`` tells which.

    Returns
    -------
    x : Tensor
        The solution, shape ``(n,)``, in ``b``'s dtype and device.
    info : MinresQLPInfo
        Stopping flag, iteration counts (total, MINRES, QLP) and norms; the residual norms are
        recomputed directly from ``x`` at the end.

    Raises
    ------
    ValueError
        On a shape mismatch, a ``b`` that is not a finite real 1-D vector, a bad ``rtol``,
        ``maxit``, ``shift``, limit or ``reorthogonalize``, a non-symmetric ``A`` or non-SPD
        ``M`` when ``check=True``, and when ``M`` turns out indefinite (``rᵀMr < 0``) during
        the solve.

    References
    ----------
    .. [1] S.-C. T. Choi, C. C. Paige and M. A. Saunders, "MINRES-QLP: A Krylov subspace method
       for indefinite or singular symmetric systems", SIAM J. Sci. Comput. 33(4), 1810–1836,
       2011.
    .. [2] S.-C. T. Choi and M. A. Saunders, "Algorithm 937: MINRES-QLP for symmetric and
       Hermitian linear equations and least-squares problems", ACM Trans. Math. Softw. 40(2),
       2014.

    Examples
    --------
    The singular, inconsistent system ``diag(1, 2, 3, 0)·x = (1, 2, 3, 1)`` has the
    minimum-length least-squares solution ``(1, 1, 1, 0)``:

    >>> import torch
    >>> A = torch.diag(torch.tensor([1.0, 2.0, 3.0, 0.0], dtype=torch.float64))
    >>> b = torch.tensor([1.0, 2.0, 3.0, 1.0], dtype=torch.float64)
    >>> x, info = minres_qlp(A, b, rtol=1e-12)
    >>> torch.allclose(x, torch.tensor([1.0, 1.0, 1.0, 0.0], dtype=torch.float64))
    True
    >>> info.flag.converged
    True
    """
    # ---- validate the input before any work --------------------------------------------------
    if not isinstance(b, Tensor):
        raise ValueError(f"b must be a torch tensor, got {type(b).__name__}")
    if b.dim() != 1:
        raise ValueError(f"b must be a 1-D vector, got shape {tuple(b.shape)}")
    if b.dtype not in (torch.float32, torch.float64):
        raise ValueError(f"b must be float32 or float64, got {b.dtype}")
    n = b.shape[0]
    dtype, device = b.dtype, b.device
    if not bool(torch.isfinite(b).all()):
        raise ValueError("b contains non-finite values (inf or nan)")
    try:
        rtol = float(rtol)
    except (TypeError, ValueError):
        raise ValueError(f"rtol must be a real number, got {rtol!r}") from None
    if not (math.isfinite(rtol) and rtol >= 0.0):
        raise ValueError(f"rtol must be finite and non-negative, got {rtol!r}")
    if maxit is None:
        maxit = 4 * n
    elif isinstance(maxit, bool) or not isinstance(maxit, int) or maxit < 0:
        raise ValueError(f"maxit must be a non-negative integer, got {maxit!r}")
    try:
        shift = float(shift)
    except (TypeError, ValueError):
        raise ValueError(f"shift must be a real number, got {shift!r}") from None
    if not math.isfinite(shift):
        raise ValueError(f"shift must be finite, got {shift!r}")
    tran_cond = _check_finite_positive(tran_cond, "tran_cond")
    maxxnorm = _check_finite_positive(maxxnorm, "maxxnorm")
    acondlim = _check_finite_positive(acondlim, "acondlim")
    matvec, A_mat = _as_operator(A, n, dtype, device, "A")
    precon = M is not None
    if precon:
        psolve, M_mat = _as_operator(M, n, dtype, device, "M")
    dense = A_mat is not None and A_mat.layout == torch.strided
    reorth = _use_reorthogonalization(reorthogonalize, n, maxit, precon, dense)
    if x0 is not None:
        if not isinstance(x0, Tensor) or x0.shape != (n,):
            got = tuple(x0.shape) if isinstance(x0, Tensor) else type(x0).__name__
            raise ValueError(f"shape mismatch: x0 must have shape ({n},), got {got}")
        x0 = x0.to(device=device, dtype=dtype)
        if not bool(torch.isfinite(x0).all()):
            raise ValueError("x0 contains non-finite values (inf or nan)")
    if check:
        _check_symmetric(matvec, A_mat, n, b, "A", spd=False)
        if precon:
            _check_symmetric(psolve, M_mat, n, b, "M", spd=True)

    def op(v: Tensor) -> Tensor:
        """``(A − σI)·v`` as a fresh tensor."""
        y = matvec(v)
        return torch.sub(y, v, alpha=shift) if shift != 0.0 else y.clone()

    eps = torch.finfo(dtype).eps
    sqrt_eps = math.sqrt(eps)
    ls_gate = max(rtol, sqrt_eps)  # relAres below this: the least-squares (truncation) regime
    relares_min = math.inf  # smallest relAres estimate so far, for the stagnation test
    best_trunc = math.inf  # |γ_k μ_k| of the stored truncated iterate
    realmin = torch.finfo(torch.float64).tiny
    bnorm = float(torch.linalg.vector_norm(b))

    # ---- first Lanczos vector: β₁ v₁ = r₀ (preconditioned: β₁ = √(r₀ᵀ M r₀)) -------------------
    x = torch.zeros_like(b) if x0 is None else x0.clone()
    r2 = b.clone() if x0 is None else b - op(x0)  # r₂ holds β_k·(unscaled v_k) through the loop
    if precon:
        r3 = psolve(r2)  # z = M·r
        beta1_sq = float(torch.dot(r2, r3))
        if beta1_sq < 0.0:
            raise ValueError(f"M appears to be indefinite: bᵀMb = {beta1_sq:.3e} < 0")
        beta1 = math.sqrt(beta1_sq)
    else:
        r3 = r2
        beta1 = float(torch.linalg.vector_norm(r2))

    flag0 = None  # "still iterating"
    flag: Flag | None = flag0
    it = qlp_it = 0
    # scalars of the method (paper's names; comments give subscripts at the end of step k)
    beta = 0.0  # β_k
    beta_kp1 = beta1  # β_{k+1}
    tau = tau_km1 = 0.0  # τ_k, τ_{k−1}
    phi = beta1  # φ_k, the residual norm estimate
    cs, sn = -1.0, 0.0  # c_k, s_k of the left reflection Q_k
    cr1, sr1 = -1.0, 0.0  # c_{k1}, s_{k1} of the right reflection P_{k−1,k}
    cr2, sr2 = -1.0, 0.0  # c_{k2}, s_{k2} of the right reflection P_{k−1,k+1}
    delta_bar_kp1 = 0.0  # δ_{k+1}^{(1)}
    epsilon_kp1 = 0.0  # ε_{k+1}
    gamma = gamma_km1 = gamma_km2 = 0.0  # γ_k, γ_{k−1}, γ_{k−2} (latest versions)
    eta = eta_km1 = eta_km2 = 0.0  # η_k, η_{k−1}, η_{k−2}
    vartheta = vartheta_km1 = vartheta_km2 = 0.0  # ϑ_k, ϑ_{k−1}, ϑ_{k−2}
    mu = mu_km1 = mu_km2 = mu_km3 = 0.0  # μ_k … μ_{k−3}
    gamma_km1_qlp = vartheta_qlp = gamma_qlp = mu_km1_qlp = mu_qlp = 0.0  # for the transfer
    gmin = gmin_km1 = 0.0  # running minimum of |γ|, for the condition estimate
    rnorm = beta1
    xl2norm = xnorm = 0.0  # ‖x_{k−2}^{QLP}‖ and ‖x_k‖ estimates
    anorm, acond = 0.0, 1.0

    if beta1 == 0.0:
        flag = Flag.ZERO_RHS

    v = torch.empty_like(b)  # v_k
    w = torch.zeros_like(b)  # w_k (MINRES: V R⁻¹, QLP: V P)
    wl = torch.zeros_like(b)  # w_{k−1}
    wl2 = torch.zeros_like(b)  # w_{k−2} (MINRES); scratch in the QLP phase
    r1 = torch.zeros_like(b)  # β_{k−1}·v_{k−1} (unpreconditioned scale)
    xl2: Tensor | None = None  # x_{k−2}^{QLP}: the part of x that no longer changes
    xbest: Tensor | None = None  # best truncated QLP iterate x_k − μ_k w_k (least-squares regime)
    basis = _LanczosBasis(b, min(maxit, n), precon) if reorth else None

    while flag is flag0 and it < maxit:
        # ---- Lanczos step k: β_{k+1} v_{k+1} = (A − σI) v_k − α_k v_k − β_k v_{k−1} ----------
        it += 1
        beta_km1, beta = beta, beta_kp1  # β_{k−1}, β_k
        torch.mul(r3, 1.0 / beta, out=v)  # v_k
        if basis is not None:
            basis.append(v, r2 / beta if precon else None)
        y = matvec(v)
        # fresh r3 in the old r₁ buffer: A v_k − (β_k/β_{k−1}) r₁
        r3 = torch.sub(y, r1, alpha=(beta / beta_km1) if it > 1 else 0.0, out=r1)
        if shift != 0.0:
            r3.sub_(v, alpha=shift)
        alpha = float(torch.dot(r3, v))  # α_k
        r3.sub_(r2, alpha=alpha / beta)
        r1, r2 = r2, r3
        if precon:
            r3 = psolve(r2)
            if basis is not None and r3.data_ptr() == r2.data_ptr():
                r3 = r3.clone()  # M returned its input: r and z = M·r are updated separately
        if basis is not None:
            basis.orthogonalize(r2, r3 if precon else None)  # β_{k+1} v_{k+1} ⟂ v_1 … v_k
        if precon:
            beta_kp1_sq = float(torch.dot(r2, r3))
            if beta_kp1_sq < 0.0:
                raise ValueError(
                    f"M appears to be indefinite: rᵀMr = {beta_kp1_sq:.3e} < 0 at iteration {it}"
                )
            beta_kp1 = math.sqrt(beta_kp1_sq)  # β_{k+1}
        else:
            beta_kp1 = float(torch.linalg.vector_norm(r3))  # β_{k+1}
        if not (math.isfinite(alpha) and math.isfinite(beta_kp1)):
            raise ValueError(
                f"non-finite value in the Lanczos process at iteration {it}: "
                f"alpha = {alpha}, beta = {beta_kp1} (does A·v or M·r overflow or give nan?)"
            )
        if basis is not None:
            basis.record(alpha, beta_kp1)
        if it == 1 and beta_kp1 == 0.0:
            # (A − σI) v₁ = α₁ v₁: b is an eigenvector (or in the null space when α₁ = 0)
            if alpha == 0.0:
                flag = Flag.ZERO_RHS
            else:
                flag = Flag.RHS_EIGENVECTOR
                x.add_(v, alpha=beta1 / alpha)
            break
        # ‖T_{k+1} e_k‖ = ‖(β_k, α_k, β_{k+1})‖ ≤ ‖A − σI‖ (β₁ = ‖b‖ is not an entry of T)
        pnorm = math.sqrt((beta**2 if it > 1 else 0.0) + alpha**2 + beta_kp1**2)

        # ---- apply the previous left reflection Q_{k−1} to column k of T_k -------------------
        delta_bar = delta_bar_kp1  # δ_k^{(1)}
        delta = cs * delta_bar + sn * alpha  # δ_k^{(2)}
        epsilon = epsilon_kp1  # ε_k
        gamma_bar = sn * delta_bar - cs * alpha  # γ_k^{(1)}
        epsilon_kp1 = sn * beta_kp1  # ε_{k+1}
        delta_bar_kp1 = -cs * beta_kp1  # δ_{k+1}^{(1)}
        delta_minres = delta  # δ_k^{(2)}, used by the MINRES direction

        # ---- current left reflection Q_k: annihilates β_{k+1} --------------------------------
        _gamma_km3, gamma_km2, gamma_km1 = gamma_km2, gamma_km1, gamma
        cs, sn, gamma = _sym_ortho(gamma_bar, beta_kp1)  # c_k, s_k, γ_k^{(2)}
        gamma_minres = gamma  # γ_k^{(2)}, the MINRES pivot
        tau_km2, tau_km1 = tau_km1, tau
        tau = cs * phi  # τ_k
        phi = sn * phi  # φ_k

        # ---- previous right reflection P_{k−2,k} --------------------------------------------
        if it > 2:
            vartheta_km2, eta_km2, eta_km1 = vartheta_km1, eta_km1, eta
            delta_tmp = sr2 * vartheta - cr2 * delta
            vartheta_km1 = cr2 * vartheta + sr2 * delta  # ϑ_{k−1}
            delta = delta_tmp  # δ_k^{(3)}
            eta = sr2 * gamma  # η_k
            gamma = -cr2 * gamma  # γ_k^{(3)}

        # ---- current right reflection P_{k−1,k} ---------------------------------------------
        if it > 1:
            cr1, sr1, gamma_km1 = _sym_ortho(gamma_km1, delta)  # γ_{k−1}^{(final)}
            vartheta = sr1 * gamma  # ϑ_k
            gamma = -cr1 * gamma  # γ_k^{(4)}

        # ---- solution coordinates μ (L_k μ = τ) and ‖x‖ --------------------------------------
        mu_km4, mu_km3 = mu_km3, mu_km2
        if it > 2:
            mu_km2 = (tau_km2 - eta_km2 * mu_km4 - vartheta_km2 * mu_km3) / gamma_km2  # μ_{k−2}
        if it > 1:
            mu_km1 = (tau_km1 - eta_km1 * mu_km3 - vartheta_km1 * mu_km2) / gamma_km1  # μ_{k−1}
        # Least-squares regime: ‖(A − σI)r_{k−1}‖ / (‖A‖‖r_{k−1}‖) (estimate) is at or below
        # max(rtol, √eps). The last QLP diagonal γ_k then carries the numerically-zero singular
        # value of T_k and w_k the null direction (see below); steps are QLP steps.
        relares_l = _safe_div(math.hypot(gamma_bar, delta_bar_kp1), max(anorm, pnorm))
        ls_regime = relares_l <= ls_gate
        # Stagnation: the estimate has been in the regime and grew tenfold from its minimum: the
        # Lanczos vectors have lost orthogonality (a ghost of the null direction appears).
        stagnated = flag is flag0 and relares_min <= ls_gate and relares_l > 10.0 * relares_min
        relares_min = min(relares_min, relares_l)
        xnorm_tmp = math.sqrt(xl2norm**2 + mu_km2**2 + mu_km1**2)
        if abs(gamma) > eps * max(anorm, pnorm) + realmin and xnorm_tmp < maxxnorm:
            mu = (tau - eta * mu_km2 - vartheta * mu_km1) / gamma  # μ_k
            if math.hypot(xnorm_tmp, mu) > maxxnorm:
                mu = 0.0
                flag = Flag.XNORM_LIMIT
        else:
            mu = 0.0
            flag = Flag.SINGULAR
        xl2norm = math.hypot(xl2norm, mu_km2)  # ‖x_{k−2}^{QLP}‖
        xnorm = math.sqrt(xl2norm**2 + mu_km1**2 + mu**2)  # ‖x_k‖

        # ---- update the directions w and x: MINRES while well conditioned, QLP after ----------
        # (MINRES only while still iterating normally: a flag raised above means this last step
        # must be the minimum-length QLP one. The MATLAB v2 code tests `flag != flag0` here.)
        if qlp_it == 0 and acond < tran_cond and flag is flag0 and not ls_regime:
            # w_k = (v_k − ε_k w_{k−2} − δ_k^{(2)} w_{k−1}) / γ_k^{(2)}; x_k = x_{k−1} + τ_k w_k
            # (on entry w = w_{k−1}, wl = w_{k−2}; wl2 holds w_{k−3}, no longer needed)
            torch.add(v, wl, alpha=-epsilon, out=wl2)
            wl2.add_(w, alpha=-delta_minres).mul_(1.0 / gamma_minres)
            wl2, wl, w = wl, w, wl2
            if xnorm < maxxnorm:
                x.add_(w, alpha=tau)
            else:
                flag = Flag.XNORM_LIMIT
        else:
            qlp_it += 1
            if qlp_it == 1:
                # transfer: MINRES directions w_{k−2}, w_{k−1} → QLP directions (W^{QLP} = W L)
                xl2 = x.clone()
                if it > 1:
                    if it > 2:
                        wl.mul_(gamma_km1_qlp).add_(w, alpha=vartheta_qlp)
                    w.mul_(gamma_qlp)
                    xl2.sub_(wl, alpha=mu_km1_qlp).sub_(w, alpha=mu_qlp)  # x_{k−3}^{QLP}
            assert xl2 is not None
            if it == 1:
                torch.mul(v, sr1, out=wl)  # w_{k−1} (zero: no P yet)
                torch.mul(v, -cr1, out=w)  # w_k = v_1
            elif it == 2:
                torch.mul(w, cr1, out=wl2)
                wl2.add_(v, alpha=sr1)  # w_{k−1}
                w.mul_(sr1).sub_(v, alpha=cr1)  # w_k
                wl, wl2 = wl2, wl
                # x_{k−2}^{QLP} = x_0 (μ_0 = 0)
            else:
                # P_{k−2,k} on [w_{k−2}, v_k]: w_{k−2} is final, its contribution goes into xl2
                xl2.add_(wl, alpha=mu_km2 * cr2).add_(v, alpha=mu_km2 * sr2)
                torch.mul(wl, sr2, out=wl2)
                wl2.sub_(v, alpha=cr2)  # column k after P_{k−2,k}
                # P_{k−1,k} on [w_{k−1}, column k]
                torch.mul(w, cr1, out=v)
                v.add_(wl2, alpha=sr1)  # w_{k−1}
                w.mul_(sr1).sub_(wl2, alpha=cr1)  # w_k
                wl, v = v, wl
            torch.add(xl2, wl, alpha=mu_km1, out=x)
            if ls_regime and abs(gamma * mu) < best_trunc:
                # Truncated iterate x_k − μ_k w_k: the minimum-length solution of the projected
                # problem with γ_k taken as 0 (as exact arithmetic gives at the Lanczos breakdown
                # of an inconsistent system). Dropping μ_k raises the residual by |γ_k μ_k|; keep
                # the candidate with the smallest increase.
                best_trunc = abs(gamma * mu)
                if xbest is None:
                    xbest = x.clone()
                else:
                    xbest.copy_(x)
            x.add_(w, alpha=mu)  # x_k = x_{k−2}^{QLP} + μ_{k−1} w_{k−1} + μ_k w_k

        # ---- next right reflection P_{k−1,k+1} ----------------------------------------------
        gamma_km1_tmp = gamma_km1
        cr2, sr2, gamma_km1 = _sym_ortho(gamma_km1, epsilon_kp1)
        gamma_km1_qlp, vartheta_qlp, gamma_qlp = gamma_km1_tmp, vartheta, gamma
        mu_km1_qlp, mu_qlp = mu_km1, mu

        # ---- norm estimates ------------------------------------------------------------------
        anorm = max(anorm, pnorm, abs(gamma_km1), abs(gamma))
        if it == 1:
            gmin = gmin_km1 = abs(gamma)
        else:
            gmin_km2, gmin_km1 = gmin_km1, gmin
            gmin = min(gmin_km2, abs(gamma_km1), abs(gamma))
        acond_l = acond
        acond = _safe_div(anorm, gmin)
        if flag is not Flag.SINGULAR:
            rnorm = abs(phi)
        relres = _safe_div(rnorm, anorm * xnorm + beta1)
        root_l = math.hypot(gamma_bar, delta_bar_kp1)  # ‖(A − σI) r_{k−1}‖ / ‖r_{k−1}‖
        relares_l = _safe_div(root_l, anorm)

        # ---- stopping tests (the later ones take precedence) ----------------------------------
        if flag is flag0 or flag is Flag.SINGULAR:
            epsx = anorm * xnorm * eps
            if it >= maxit:
                flag = Flag.MAXIT
            if acond >= acondlim:
                flag = Flag.ACOND_LIMIT
            if xnorm >= maxxnorm:
                flag = Flag.XNORM_LIMIT
            if epsx >= beta1:
                flag = Flag.EIGENVECTOR
            if 1.0 + relares_l <= 1.0:
                flag = Flag.LEAST_SQUARES_EPS
            if 1.0 + relres <= 1.0:
                flag = Flag.SOLVED_EPS
            if relares_l <= rtol:
                flag = Flag.LEAST_SQUARES_RTOL
            if relres <= rtol:
                flag = Flag.SOLVED_RTOL
        if flag in (Flag.LEAST_SQUARES_RTOL, Flag.LEAST_SQUARES_EPS, Flag.XNORM_LIMIT,
                    Flag.ACOND_LIMIT):
            acond = acond_l  # these tests concern step k−1; keep its condition estimate
        if stagnated and flag is not Flag.SOLVED_RTOL:
            flag = Flag.LEAST_SQUARES_EPS
        if xbest is not None and flag in (Flag.LEAST_SQUARES_RTOL, Flag.LEAST_SQUARES_EPS):
            x.copy_(xbest)  # minimum-length: the null direction w_k is dropped
        if flag is flag0 and beta_kp1 == 0.0:
            flag = Flag.SINGULAR  # Lanczos breakdown that no test explained (defensive)
        if callback is not None:
            callback(x)

    if flag is flag0:
        flag = Flag.MAXIT  # maxit = 0

    # ---- final quantities, computed directly -------------------------------------------------
    norms = _direct_norms(op, b, x)
    if basis is not None and flag not in _SOLVED:
        # T̄_k is known and V_k orthonormal: a numerically rank-deficient T̄_k (a singular,
        # inconsistent system) gets the minimum-length solution of the projected problem. It is
        # kept when its direct relAres (of the preconditioned operator with M) reaches the
        # least-squares regime.
        dx = basis.min_length_solution(beta1, ls_gate)
        if dx is not None:
            x_svd = dx if x0 is None else x0 + dx
            relares_svd = _direct_relares(op, psolve if precon else None, b, x_svd, anorm)
            if relares_svd <= ls_gate:
                x, norms = x_svd, _direct_norms(op, b, x_svd)
                flag = Flag.LEAST_SQUARES_RTOL if relares_svd <= rtol else Flag.LEAST_SQUARES_EPS
    rnorm, arnorm, xnorm, axnorm = norms
    info = MinresQLPInfo(
        flag=flag,
        iterations=it,
        minres_iterations=it - qlp_it,
        qlp_iterations=qlp_it,
        relres=_safe_div(rnorm, anorm * xnorm + bnorm),
        relAres=_safe_div(arnorm, anorm * rnorm) if rnorm > realmin else 0.0,
        anorm=anorm,
        acond=acond,
        xnorm=xnorm,
        axnorm=axnorm,
        rnorm=rnorm,
        arnorm=arnorm,
        reorthogonalized=reorth,
    )
    return x, info
