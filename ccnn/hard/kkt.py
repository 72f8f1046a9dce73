"""One KKT step of hard-constrained training, matrix-free.

Márquez-Neila, Salzmann and Fua, "Imposing Hard Constraints on Deep Networks: Promises and
Limitations", 2017, §4: at the current parameters ``w`` the constrained problem
``min R(w) s.t. C(w) = 0`` is linearized and the increment ``dw`` and the Lagrange multipliers
``Λ`` solve the symmetric (often singular) KKT system

.. code-block:: text

    [ D   Jᵀ ] [ dw ]   [ −g ]
    [ J   0  ] [ Λ  ] = [ −C ]         J = ∂C/∂w at w

with, per ``method``:

* ``"sgd"`` (Eq. 5): ``D = ηI``, ``g = ∂R/∂w``;
* ``"gauss-newton"`` (Eq. 6): ``D = JᵣᵀJᵣ + ηI``, ``g = Jᵣᵀr`` for ``R = ½‖r‖²``;
* ``"adam"`` (Eq. 10-12): ``D = η·f·diag(√v + ε)``, ``g = m`` (see :func:`kkt_step` for the
  ``bias_correction`` option); with ``metric="euclidean"``, ``D = ηI`` and ``g = η·D_A⁻¹m``
  (``D_A`` Adam's diagonal), so that Adam's unconstrained step is projected onto the linearized
  constraints in the Euclidean metric of Eq. 5.

Every product with ``J``, ``Jᵀ``, ``Jᵣ``, ``Jᵣᵀ`` is a forward-mode (R-op, Eq. 7) or reverse-mode
(L-op, Eq. 8) derivative through :mod:`torch.func`; no Jacobian is formed. The system is solved
with MINRES-QLP (§4.3), which returns the minimum-length solution when constraints are
duplicated or contradictory.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor

from ccnn.hard.distributed import Collective, ShardedRows
from ccnn.hard.double_backward import lean_conv_double_backward
from ccnn.hard.minres_qlp import MinresQLPInfo, minres_qlp

__all__ = ["KKTStep", "kkt_step"]

logger = logging.getLogger(__name__)

Params = dict[str, Tensor]
Method = Literal["sgd", "gauss-newton", "adam"]
System = Literal["auto", "full", "reduced"]

_METHODS = ("sgd", "gauss-newton", "adam")
_SYSTEMS = ("auto", "full", "reduced")
# The values of kkt_step's bias_correction and metric (HardAdam checks its own against these).
BIAS_CORRECTIONS = ("eq12", "adam")
METRICS = ("diagonal", "euclidean")


@dataclass(frozen=True)
class KKTStep:
    """The result of :func:`kkt_step`.

    Attributes
    ----------
    delta : dict[str, Tensor]
        The increment ``dw``, shaped like ``params``: the new parameters are ``w + dw``.
    multipliers : Tensor
        The Lagrange multipliers ``Λ``, flat, one per constraint residual (0 for an inequality
        that is satisfied at ``w`` and hence not in the system).
    info : MinresQLPInfo
        What the MINRES-QLP solve reported (a zero-iteration ``ZERO_RHS`` solve of the empty
        system when there was nothing to solve).
    system : str
        ``"full"`` or ``"reduced"``: which linear system was solved.
    constraint_values : Tensor
        ``C(w)``, flat and detached, all residuals (inactive inequalities included).
    loss_value : float
        ``R(w)``.
    active : Tensor
        Bool mask over ``constraint_values``: the residuals that were in the system.
    shard : slice or None
        Under a process group (``process_group``, or a DDP model in the optimizers):
        ``constraint_values``, ``multipliers`` and ``active`` are those of all processes in
        rank order, and ``shard`` is this process's part of them. None on a process of its own.
    """

    delta: Params
    multipliers: Tensor
    info: MinresQLPInfo
    system: str
    constraint_values: Tensor
    loss_value: float
    active: Tensor
    shard: slice | None = None


# ---- parameter vectors ------------------------------------------------------------------------


def _flatten(tensors: Params) -> Tensor:
    """Concatenate a dict of tensors (in its order) into one 1-D vector."""
    return torch.cat([t.reshape(-1) for t in tensors.values()])


def _unflatten(vec: Tensor, like: Params) -> Params:
    """Split a 1-D vector into a dict shaped like ``like`` (the inverse of :func:`_flatten`)."""
    parts = torch.split(vec, [t.numel() for t in like.values()])
    return {name: part.view_as(t) for (name, t), part in zip(like.items(), parts, strict=True)}


# ---- R-op and L-op ----------------------------------------------------------------------------


class _AdjointMismatchError(Exception):
    """Raised inside a solve when the transposed L-op fails its deferred adjoint test."""


class _Linearized:
    """A vector function ``f`` of the parameters linearized at ``w``, for matrix-free products.

    ``lop(u) = uᵀ·(∂f/∂w)`` is the L-op of Eq. 8: the ``vjp_fn`` that :func:`torch.func.vjp`
    returns once at ``w``, called again for every product. ``rop(v) = (∂f/∂w)·v`` is the R-op of
    Eq. 7, computed as the transpose of that linear map: the vjp of ``u ↦ lop(u)``, built once per
    step on first use. It reuses the stored backward graph instead of running the forward pass
    again (``torch.func.jvp`` does), which measured 1.1-10× faster per product (through
    convolutions under :func:`~ccnn.hard.double_backward.lean_conv_double_backward`, which skips
    the double backward's unrequested terms); where a function's
    backward has no derivative of its own it falls back to ``torch.func.jvp``. Both take and
    return flat vectors. With ``index`` only those rows of ``f`` are kept (the active
    constraints): ``rop`` returns them and ``lop`` takes a vector of their length.

    :meth:`gram` gives ``J·W·Jᵀ·u`` for a positive diagonal ``W`` (the reduced KKT matrix)
    without flattening the parameter-sized vectors, and runs the transposed L-op's adjoint test
    on its own first product instead of on two extra ones.

    After :meth:`share` the kept rows are this process's part of rows sharded across a process
    group: ``rop`` returns all processes' rows (gathered), ``lop`` takes all of them and sums
    the processes' products, and the adjoint test runs before the first product (a failure
    there would otherwise make one process redo a solve the others do not).
    """

    def __init__(self, fn: Callable[[Params], Tensor], params: Params, name: str,
                 check_finite: bool = True) -> None:
        def flat_fn(p: Params) -> Tensor:
            return fn(p).reshape(-1)

        self._fn = flat_fn
        self._params = params
        value, self._vjp_fn = torch.func.vjp(flat_fn, params)
        self.value = value.detach()
        if check_finite and not bool(torch.isfinite(self.value).all()):
            raise ValueError(f"{name}(params) returned non-finite values (inf or nan)")
        self.index: Tensor | None = None
        self._shard: ShardedRows | None = None
        self._transposed: Callable | None = None
        self._use_jvp = False
        self._unchecked = False  # the transposed L-op is in use but not yet adjoint-tested
        self._last_lops: list[tuple[Tensor, Params]] = []  # (u, Jᵀu) of the last gram products

    def restrict(self, index: Tensor) -> None:
        """Keep only the rows ``index`` of ``f`` (the index is fixed from now on)."""
        self.index = None if index.numel() == self.value.numel() else index

    def share(self, shard: ShardedRows) -> None:
        """The kept rows are this process's part ``shard`` of rows sharded across processes."""
        self._shard = shard

    @property
    def rows(self) -> int:
        """Number of rows kept (of all processes after :meth:`share`)."""
        if self._shard is not None:
            return self._shard.total
        return self.value.numel() if self.index is None else self.index.numel()

    def _adjoint_ok(self, got: float, expected: float) -> bool:
        """``got`` equals ``expected`` to ``10·√eps`` relative (the adjoint test)."""
        tol = 10 * math.sqrt(torch.finfo(self.value.dtype).eps)
        return abs(got - expected) <= tol * max(abs(expected), abs(got))

    def _transpose(self, check: bool = True) -> Callable | None:
        """The R-op as the vjp of ``u ↦ lop(u)``, or None where that is not ``J``.

        A backward without derivatives of its own (an autograd Function marked
        ``once_differentiable``) can make the transpose silently zero, so it is accepted only
        after the adjoint test ``u·J(Jᵀu) = ‖Jᵀu‖²`` on a fixed, non-degenerate ``u``. With
        ``check=False`` the test is left to the first :meth:`gram` product (or
        :meth:`ensure_checked`).
        """
        try:
            _, transposed = torch.func.vjp(self._vjp_fn, torch.zeros_like(self.value))
            if not check:
                return transposed
            u = torch.cos(1.7 * torch.arange(self.value.numel(), device=self.value.device,
                                             dtype=self.value.dtype) + 0.3)
            (jt_u,) = self._vjp_fn(u)
            with lean_conv_double_backward():
                (j_jt_u,) = transposed((jt_u,))
        except RuntimeError as err:  # an op whose backward has no derivative
            logger.debug("R-op by transposing the L-op failed (%s); using jvp", err)
            return None
        expected = sum(float(t.square().sum()) for t in jt_u.values())
        got = float(u @ j_jt_u)
        if not self._adjoint_ok(got, expected):
            logger.debug("transposed L-op failed the adjoint test (%.3g vs %.3g); using jvp",
                         got, expected)
            return None
        return transposed

    def _use_jvp_from_now(self) -> None:
        self._transposed, self._use_jvp, self._unchecked = None, True, False
        self._last_lops = []

    def _rop_all(self, v: Params, check: bool = True) -> Tensor:
        """``J·v`` over all rows of ``f``; ``check=False`` defers the adjoint test."""
        if not self._use_jvp and self._transposed is None:
            self._transposed = self._transpose(check)
            self._use_jvp = self._transposed is None
            self._unchecked = not check and not self._use_jvp
        if not self._use_jvp:
            try:
                with lean_conv_double_backward():
                    (out,) = self._transposed((v,))
                return out
            except RuntimeError as err:
                if not self._unchecked:
                    raise
                logger.debug("R-op by transposing the L-op failed (%s); using jvp", err)
                self._use_jvp_from_now()
        _, out = torch.func.jvp(self._fn, (self._params,), (v,))
        return out

    def _rows(self, out: Tensor) -> Tensor:
        return out if self.index is None else out[self.index]

    def rop(self, v: Tensor, *, check: bool = True) -> Tensor:
        """``J·v``: R-op, Eq. 7 of Márquez-Neila, Salzmann and Fua (2017).

        ``check=False`` uses the transposed L-op before its adjoint test; the caller must then
        call :meth:`gram` or :meth:`ensure_checked` and redo its work on
        :class:`_AdjointMismatchError`.
        """
        if self._shard is not None:
            return self._shard.gather(self._rows(self._rop_all(_unflatten(v, self._params))))
        return self._rows(self._rop_all(_unflatten(v, self._params), check))

    def _lop_dict(self, u: Tensor) -> Params:
        if self.index is not None:
            u = self.value.new_zeros(self.value.numel()).index_copy_(0, self.index, u)
        (grads,) = self._vjp_fn(u)
        return grads

    def lop(self, u: Tensor) -> Tensor:
        """``Jᵀ·u`` (= ``uᵀJ``): L-op, Eq. 8 of Márquez-Neila, Salzmann and Fua (2017)."""
        return _flatten(self._jt(u))

    def _jt(self, u: Tensor) -> Params:
        """``Jᵀ·u`` as a dict; after :meth:`share`, each process's rows applied to its part of
        ``u`` and summed over the processes."""
        if self._shard is None:
            return self._lop_dict(u)
        own = _flatten(self._lop_dict(self._shard.local(u)))
        return _unflatten(self._shard.comm.reduce_sum(own), self._params)

    def gram(self, u: Tensor, weight: float | Params) -> Tensor:
        """``J·W·Jᵀ·u`` for a positive diagonal ``W`` (a number or a dict shaped like params).

        The first product with a non-zero ``Jᵀu`` also runs the adjoint test of the transposed
        L-op, ``u·(J·W·Jᵀu) = (Jᵀu)·W·(Jᵀu) > 0``, with no extra product; when it fails the R-op
        switches to ``torch.func.jvp`` and :class:`_AdjointMismatchError` is raised, so that the
        caller redoes the solve. ``Jᵀu`` is kept for :meth:`lop_of_recent`. After :meth:`share`
        ``Jᵀu`` is summed over the processes and each process's rows of the product are
        gathered (the adjoint test ran before the first product).
        """
        shard = self._shard
        jt_u = self._jt(u)
        if isinstance(weight, dict):
            v = {k: t * weight[k] for k, t in jt_u.items()}
            out = self._rows(self._rop_all(v, check=shard is not None))
        else:
            v = jt_u
            out = self._rows(self._rop_all(v, check=shard is not None)) * weight
        if self._unchecked:
            expected = sum(float((a * b).sum()) for a, b in zip(jt_u.values(), v.values(),
                                                                strict=True))
            if not isinstance(weight, dict):
                expected *= weight
            if expected != 0.0:  # Jᵀu = 0 tests nothing; wait for the next product
                if not self._adjoint_ok(float(u @ out), expected):
                    logger.debug("transposed L-op failed the adjoint test; using jvp")
                    self._use_jvp_from_now()
                    raise _AdjointMismatchError
                self._unchecked = False
        self._last_lops = [*self._last_lops[-1:], (u.clone(), jt_u)]
        return out if shard is None else shard.gather(out)

    def lop_of_recent(self, u: Tensor) -> Tensor:
        """``Jᵀu``, reused from one of the last two :meth:`gram` products when ``u`` is equal."""
        for v, jt_v in reversed(self._last_lops):
            if torch.equal(u, v):
                return _flatten(jt_v)
        return self.lop(u)

    def ensure_checked(self) -> None:
        """Run the adjoint test now if it is still pending; :class:`_AdjointMismatchError` if it
        fails (the R-op has then switched to ``torch.func.jvp``)."""
        if self._unchecked:
            transposed = self._transpose()
            if transposed is None:
                self._use_jvp_from_now()
                raise _AdjointMismatchError
            self._transposed, self._unchecked = transposed, False


# ---- validation -------------------------------------------------------------------------------


def _check_params(params: Params) -> tuple[Params, torch.dtype]:
    """Detached copies of ``params``; all must share one float32/float64 dtype and a device."""
    if not isinstance(params, dict) or not params:
        raise ValueError(f"params must be a non-empty dict of tensors, got {params!r}")
    dtypes = {t.dtype for t in params.values() if isinstance(t, Tensor)}
    if len(dtypes) != 1 or any(not isinstance(t, Tensor) for t in params.values()):
        raise ValueError(f"params must all be tensors of one dtype, got dtypes {dtypes}")
    (dtype,) = dtypes
    if dtype not in (torch.float32, torch.float64):
        raise ValueError(f"params must be float32 or float64, got {dtype}")
    if len({t.device for t in params.values()}) != 1:
        raise ValueError("params must all be on one device")
    return {name: t.detach() for name, t in params.items()}, dtype


def _real(value: object) -> float:
    """``float(value)`` for a real number (not a bool), NaN otherwise."""
    if isinstance(value, bool):
        return math.nan
    try:
        return float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return math.nan


def _check_scalars(
    eta: float,
    method: str,
    rtol: float,
    maxit: int | None,
    system: str,
    betas: tuple[float, float],
    eps: float,
    bias_correction: str,
    metric: str,
) -> None:
    """One ValueError per bad hyper-parameter, naming it and its value."""
    if method not in _METHODS:
        raise ValueError(f"method must be one of {_METHODS}, got {method!r}")
    if system not in _SYSTEMS:
        raise ValueError(f"system must be one of {_SYSTEMS}, got {system!r}")
    if not (math.isfinite(_real(eta)) and _real(eta) > 0):
        raise ValueError(f"eta must be a finite number > 0, got {eta!r}")
    if not (math.isfinite(_real(rtol)) and _real(rtol) >= 0):
        raise ValueError(f"rtol must be a finite number >= 0, got {rtol!r}")
    if maxit is not None and (isinstance(maxit, bool) or not isinstance(maxit, int) or maxit < 0):
        raise ValueError(f"maxit must be None or a non-negative int, got {maxit!r}")
    if method == "gauss-newton" and system == "reduced":
        raise ValueError(
            "system='reduced' needs a diagonal top-left block (method 'sgd' or 'adam'), "
            "got method='gauss-newton'"
        )
    if method == "adam":
        if not (
            isinstance(betas, tuple | list)
            and len(betas) == 2
            and all(0.0 <= _real(b) < 1.0 for b in betas)
        ):
            raise ValueError(f"betas must be two numbers in [0, 1), got {betas!r}")
        if not (math.isfinite(_real(eps)) and _real(eps) > 0):
            raise ValueError(f"eps must be a finite number > 0, got {eps!r}")
        if bias_correction not in BIAS_CORRECTIONS:
            raise ValueError(
                f"bias_correction must be one of {BIAS_CORRECTIONS}, got {bias_correction!r}"
            )
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
    if metric != "diagonal" and method != "adam":
        raise ValueError(f"metric={metric!r} is an option of method='adam', got method={method!r}")


def _active_rows(c: Tensor, inequality: bool | Tensor) -> Tensor:
    """Bool mask of the residuals in the system: equalities, and violated inequalities (§4.4)."""
    n = c.numel()
    if isinstance(inequality, bool):
        return c > 0 if inequality else torch.ones(n, dtype=torch.bool, device=c.device)
    if not isinstance(inequality, Tensor) or inequality.dtype != torch.bool:
        raise ValueError(f"inequality must be a bool or a bool tensor, got {inequality!r}")
    if inequality.numel() != n:
        raise ValueError(
            f"inequality must have one entry per constraint residual ({n}), "
            f"got shape {tuple(inequality.shape)}"
        )
    ineq = inequality.reshape(-1).to(c.device)
    return ~ineq | (c > 0)


# ---- the step ---------------------------------------------------------------------------------


def _adam_moments(g: Params, state: dict, betas: tuple[float, float]) -> tuple[Params, Params, int]:
    """``m_{t+1}``, ``v_{t+1}`` (Eq. 10-11) and ``t`` from ``state`` (not modified here)."""
    if not isinstance(state, dict):
        raise ValueError(f"state must be a dict for method='adam', got {state!r}")
    t = state.get("t", 0)
    if isinstance(t, bool) or not isinstance(t, int) or t < 0:
        raise ValueError(f"state['t'] must be a non-negative int, got {t!r}")
    m_t = state.get("m") or {k: torch.zeros_like(x) for k, x in g.items()}
    v_t = state.get("v") or {k: torch.zeros_like(x) for k, x in g.items()}
    for key, moment in (("m", m_t), ("v", v_t)):
        if set(moment) != set(g):
            raise ValueError(f"state[{key!r}] must have the keys of params, got {sorted(moment)}")
    beta1, beta2 = betas
    m = {k: beta1 * m_t[k].to(x) + (1 - beta1) * x for k, x in g.items()}
    v = {k: beta2 * v_t[k].to(x) + (1 - beta2) * x * x for k, x in g.items()}
    return m, v, t


def _adam_diagonal(
    v: Tensor, eta: float, t: int, betas: tuple[float, float], eps: float, bias_correction: str
) -> Tensor:
    """The diagonal top-left block of Eq. 12 (``"eq12"``) or of exact Adam (``"adam"``).

    ``f = √(1 − β₂^{t+1}) / (1 − β₁^{t+1})``. Eq. 12 of Márquez-Neila, Salzmann and Fua (2017):
    ``η·f·(√v + ε)``. ``"adam"``: ``(η/f)·(√v + ε·√(1 − β₂^{t+1}))``, whose unconstrained step
    ``−m/D`` is Kingma and Ba's bias-corrected Adam step with learning rate ``1/η``.
    """
    beta1, beta2 = betas
    c2 = math.sqrt(1.0 - beta2 ** (t + 1))
    f = c2 / (1.0 - beta1 ** (t + 1))
    if bias_correction == "eq12":
        return (eta * f) * (v.sqrt() + eps)
    return (eta / f) * (v.sqrt() + eps * c2)


def _solve(
    op: Callable[[Tensor], Tensor], rhs: Tensor, rtol: float, maxit: int | None
) -> tuple[Tensor, MinresQLPInfo]:
    """MINRES-QLP on ``op·x = rhs``; RuntimeError if it returns non-finite values."""
    if not bool(torch.isfinite(rhs).all()):
        raise RuntimeError("the KKT right-hand side is non-finite (inf or nan)")
    x, info = minres_qlp(op, rhs, rtol=rtol, maxit=maxit)
    if not bool(torch.isfinite(x).all()):
        raise RuntimeError(f"MINRES-QLP returned non-finite values; {info}")
    if not info.flag.converged:
        logger.warning("KKT solve did not converge: %s", info)
    return x, info


def _solve_reduced(
    d: Tensor | float, g: Tensor, lin: _Linearized, c: Tensor, mu: float, rtol: float,
    maxit: int | None
) -> tuple[Tensor, Tensor, MinresQLPInfo]:
    """``(J·D⁻¹·Jᵀ + μI)·Λ = c − J·D⁻¹·g``, then ``dw = −D⁻¹(g + JᵀΛ)``; ``d`` a vector or a
    number.

    The products are :meth:`_Linearized.gram`: no parameter-sized vector is flattened, the
    adjoint test of the R-op is done on the first product, and ``JᵀΛ`` of the answer is reused
    from the solver's final residual check. :class:`_AdjointMismatchError` when that test fails.
    """
    if isinstance(d, Tensor):
        d_inv: Tensor | float = d.reciprocal()
        weight: Params | float = _unflatten(d_inv, lin._params)
        rhs = c - lin.rop(d_inv * g, check=False)
    else:
        d_inv = weight = 1.0 / d
        rhs = c - lin.rop(g, check=False) * d_inv
    lam, info = _solve(lambda lam: lin.gram(lam, weight) + mu * lam, rhs, rtol, maxit)
    lin.ensure_checked()
    return -d_inv * (g + lin.lop_of_recent(lam)), lam, info


def _solve_diagonal(
    d: Tensor | float,
    g: Tensor,
    lin: _Linearized,
    c: Tensor,
    mu: float,
    system: str,
    rtol: float,
    maxit: int | None,
) -> tuple[Tensor, Tensor, MinresQLPInfo]:
    """Solve ``[[D, Jᵀ], [J, −μI]]·[dw; Λ] = [−g; −c]`` for a positive diagonal ``D = diag(d)``
    (``d`` a vector, or a number for ``D = d·I``).

    ``system="reduced"``: ``(J·D⁻¹·Jᵀ + μI)·Λ = c − J·D⁻¹·g`` and ``dw = −D⁻¹(g + JᵀΛ)``.
    With ``μ = 0`` the null space of the full matrix is ``{0} × null(Jᵀ)``, so its
    minimum-length least-squares solution has the same ``dw`` and ``Λ`` as the minimum-length
    least-squares solution of the reduced one, also for a rank-deficient, inconsistent ``J``;
    with ``μ > 0`` both are nonsingular. ``system="full"``: Algorithm 1 with ``ηI`` replaced by
    ``D`` (Eq. 5, Eq. 12).
    """
    n_p = g.numel()
    if c.numel() == 0:  # no active constraint: dw = −D⁻¹g; the empty system's solve is trivial
        lam, info = _solve(lambda lam: lam, c, rtol, maxit)  # ZERO_RHS, 0 iterations
        return -g / d, lam, info
    if system == "reduced":
        try:
            return _solve_reduced(d, g, lin, c, mu, rtol, maxit)
        except _AdjointMismatchError:  # the R-op has switched to jvp: solve again from the start
            return _solve_reduced(d, g, lin, c, mu, rtol, maxit)

    def product(x: Tensor) -> Tensor:  # Algorithm 1
        x1, x2 = x[:n_p], x[n_p:]
        return torch.cat([d * x1 + lin.lop(x2), lin.rop(x1) - mu * x2])

    sol, info = _solve(product, torch.cat([-g, -c]), rtol, maxit)
    return sol[:n_p], sol[n_p:], info


def _solve_gauss_newton(
    eta: float, res: _Linearized, lin: _Linearized, c: Tensor, mu: float, rtol: float,
    maxit: int | None, comm: Collective
) -> tuple[Tensor, Tensor, MinresQLPInfo]:
    """Eq. 6 with the products of Algorithm 2 (Márquez-Neila, Salzmann and Fua, 2017).

    Under a process group ``R = (1/W)·Σ_r ½‖r_r‖²`` (DDP's mean over the ``W`` processes), so
    ``Jᵣᵀr`` and ``JᵣᵀJᵣ·v`` are the means of the processes' own products (``comm.mean``, the
    identity on a process of its own).
    """
    g = comm.mean(res.lop(res.value))  # Jᵣᵀr
    if not bool(torch.isfinite(g).all()):
        raise ValueError("the gradient Jᵣᵀr of the residuals is non-finite (inf or nan)")
    n_p = g.numel()

    def product(x: Tensor) -> Tensor:  # Algorithm 2
        x1, x2 = x[:n_p], x[n_p:]
        jjv = comm.mean(res.lop(res.rop(x1)))
        a = jjv + eta * x1 + lin.lop(x2) if lin.rows else jjv + eta * x1
        return torch.cat([a, lin.rop(x1) - mu * x2]) if lin.rows else a

    sol, info = _solve(product, torch.cat([-g, -c]), rtol, maxit)
    return sol[:n_p], sol[n_p:], info


def _empty_constraints(params: Params) -> Tensor:
    """No constraints: an empty residual vector in the params' dtype."""
    return next(iter(params.values())).new_zeros(0)


# ---- sharded batches --------------------------------------------------------------------------


def _share_constraints(
    lin: _Linearized, comm: Collective, c: Tensor, active: Tensor
) -> tuple[Tensor, Tensor, slice]:
    """``C`` and the active mask of every process (rank order), checked finite on all; ``lin``
    keeps its active rows as this process's share of the global active rows. Returns them and
    this process's part of ``C``."""
    rows = comm.rows(c.numel())
    both = rows.gather(torch.stack([c, active.to(c.dtype)], dim=1))
    c_all, active_all = both[:, 0].contiguous(), both[:, 1] != 0
    if not bool(torch.isfinite(c_all).all()):
        raise ValueError("constraints(params) returned non-finite values (inf or nan)")
    starts = [sum(rows.sizes[:r]) for r in range(comm.world)]
    counts = [int(active_all[s:s + n].sum()) for s, n in zip(starts, rows.sizes, strict=True)]
    lin.share(ShardedRows(comm, counts))
    return c_all, active_all, rows.span


def _mean_gradient(comm: Collective, grads: Params, value: Tensor) -> tuple[Params, Tensor]:
    """The processes' mean gradient and loss (DDP's convention), in one all-reduce."""
    flat = _flatten(grads)
    both = comm.mean(torch.cat([flat, value.detach().reshape(1).to(flat)]))
    return _unflatten(both[:-1], grads), both[-1]


def _shared_gauss_newton_loss(
    comm: Collective, r: Tensor, loss: Callable[[Params], Tensor] | None, params: Params
) -> float:
    """The processes' mean ``loss`` (default ``½‖r‖²``); ValueError on every process when any
    process's residuals or loss are non-finite."""
    half = 0.5 * r.pow(2).sum()
    with torch.no_grad():
        own = half if loss is None else _scalar_fn(loss)(params).detach()
    r_half, value = comm.mean(torch.stack([half, own.to(half)])).tolist()
    if not math.isfinite(r_half):
        raise ValueError("residuals(params) returned non-finite values (inf or nan)")
    if not math.isfinite(value):
        raise ValueError(f"loss(params) returned a non-finite value: {value}")
    return value


def kkt_step(
    params: Params,
    loss: Callable[[Params], Tensor] | None,
    constraints: Callable[[Params], Tensor] | None,
    *,
    eta: float,
    method: Method = "sgd",
    residuals: Callable[[Params], Tensor] | None = None,
    state: dict | None = None,
    rtol: float = 1e-6,
    maxit: int | None = None,
    inequality: bool | Tensor = False,
    system: System = "auto",
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    bias_correction: Literal["eq12", "adam"] = "eq12",
    metric: Literal["diagonal", "euclidean"] = "diagonal",
    correction: float = 1.0,
    regularization: float = 0.0,
    process_group: Any = None,
) -> KKTStep:
    r"""One step of hard-constrained training: solve the KKT system at ``w`` for ``dw`` and ``Λ``.

    Implements Eq. 5 (``"sgd"``), Eq. 6 (``"gauss-newton"``, products as in Algorithm 2) and
    Eq. 10-12 (``"adam"``) of Márquez-Neila, Salzmann and Fua, "Imposing Hard Constraints on Deep
    Networks: Promises and Limitations", 2017, with the active-set rule of §4.4 for inequalities:

    .. code-block:: text

        [ D  Jᵀ ] [ dw ]   [ −g   ]      J = ∂C/∂w (active rows), C at w
        [ J  0  ] [ Λ  ] = [ −C(w)]

    ``"sgd"``: ``D = ηI``, ``g = ∂R/∂w``. ``"gauss-newton"``: ``D = JᵣᵀJᵣ + ηI``,
    ``g = Jᵣᵀr`` with ``R = ½‖r‖²``, ``Jᵣ = ∂r/∂w``. ``"adam"``: first
    ``m ← β₁m + (1−β₁)∂R/∂w`` and ``v ← β₂v + (1−β₂)(∂R/∂w)²`` (Eq. 10-11), then ``g = m`` and,
    with ``f = √(1−β₂^{t+1}) / (1−β₁^{t+1})``,

    * ``bias_correction="eq12"``: ``D = η·f·diag(√v + ε)``, Eq. 12 as printed;
    * ``bias_correction="adam"``: ``D = (η/f)·diag(√v + ε·√(1−β₂^{t+1}))``.

    Eq. 12 as printed multiplies ``D`` by ``f``, so its unconstrained step ``−m/D`` is Adam's step
    divided by ``f²`` (Adam's bias correction *multiplies* the step by ``f``). The ``"adam"``
    option divides by ``f`` instead; its unconstrained step equals ``torch.optim.Adam``'s with
    learning rate ``1/η``.

    ``metric="euclidean"`` (``"adam"`` only; not in the paper) keeps that diagonal ``D_A`` for the
    data step alone: the system is Eq. 5's, ``D = ηI``, with ``g = η·D_A⁻¹m``, so ``dw`` is the
    point nearest (in ‖·‖₂) to the unconstrained step ``s = −D_A⁻¹m`` that meets the linearized
    constraints, ``dw = s − Jᵀ(JJᵀ)⁺(J·s + αC)``. Adam's per-weight scaling then shapes only the
    descent, while the constraint correction is the minimum-norm one of Eq. 5 rather than one
    concentrated in the weights whose gradient is small (docs/hard_experiments.md, seventh
    round).

    Parameters
    ----------
    params : dict[str, Tensor]
        The parameters ``w`` by name (e.g. ``dict(model.named_parameters())``), one dtype
        (float32 or float64) and device. Detached copies are used; ``params`` is not modified.
    loss : callable
        ``loss(params) -> scalar``: the risk ``R``. For ``"gauss-newton"`` it may be None (then
        ``loss_value = ½‖r‖²``); the step itself uses ``residuals`` only.
    constraints : callable or None
        ``constraints(params) -> Tensor`` of any shape: the residuals ``C`` (flattened). None or
        an empty tensor: no constraints.
    eta : float
        ``η > 0``: the inverse learning rate (sgd, adam) or the damping (gauss-newton).
    method : {"sgd", "gauss-newton", "adam"}
        Which system (Eq. 5, 6 or 12).
    residuals : callable, optional
        ``residuals(params) -> Tensor``: ``r`` with ``R = ½‖r‖²``; required for gauss-newton.
    state : dict, optional
        Adam's state, required for ``"adam"`` and updated in place after a successful step:
        ``"m"``, ``"v"`` (dicts shaped like params; zeros when absent) and ``"t"`` (int steps
        taken, 0 when absent, incremented).
    rtol, maxit :
        Passed to :func:`~ccnn.hard.minres_qlp.minres_qlp` (``maxit`` None: 4× the system size).
    inequality : bool or bool Tensor
        False: all residuals are equalities ``C = 0``. True: all are inequalities ``C ≤ 0``. A
        bool tensor with one entry per residual (C's shape or flat) marks the inequalities.
        Inequalities satisfied at ``w`` are dropped from the system (multiplier 0); violated ones
        are treated as equalities (§4.4).
    system : {"auto", "full", "reduced"}
        ``"full"``: the saddle-point system above. ``"reduced"`` (sgd, adam only): eliminate
        ``dw`` with the diagonal ``D``: ``(J·D⁻¹·Jᵀ)·Λ = C − J·D⁻¹·g``,
        ``dw = −D⁻¹(g + JᵀΛ)``, which gives the same minimum-length ``dw`` and ``Λ`` and solves
        a system of the size of the number of constraints. ``"auto"``: reduced for sgd and adam,
        full for gauss-newton.
    betas, eps, bias_correction :
        Adam's hyper-parameters (``0 ≤ β < 1``, ``ε > 0``) and the choice of ``D`` above.
    metric : {"diagonal", "euclidean"}
        ``"adam"`` only: Adam's diagonal ``D`` in the system (Eq. 12, default), or Eq. 5's
        ``ηI`` with Adam's step as the data direction (above).
    correction : float
        ``α`` in (0, 1]: the right-hand side is ``−α·C`` instead of ``−C``, so the step removes
        the share ``α`` of the linearized residual (the residual then decays like ``(1 − α)ᵏ``
        over ``k`` steps instead of being met at once). 1 (default): the paper's systems.
    regularization : float
        ``μ ≥ 0``: the bottom-right block ``0`` becomes ``−μI`` (in the reduced system
        ``J·D⁻¹·Jᵀ + μI``). The step then minimizes the model ``½dwᵀD·dw + gᵀdw +
        ‖J·dw + αC‖²/(2μ)`` with ``Λ = (J·dw + αC)/μ``: a quadratic penalty of weight
        ``1/μ`` on the linearized constraints, which bounds the step where ``J·D⁻¹·Jᵀ`` is
        ill-conditioned. 0 (default): hard, the paper's systems.
    process_group : torch.distributed.ProcessGroup, optional
        The batch is sharded across this group's processes (e.g.
        ``torch.distributed.group.WORLD``), each calling ``kkt_step`` with its own shard: the
        loss ``R = (1/W)·Σ_r R_r`` is the mean of the processes' losses (DDP's convention: with
        equal shards, each ``R_r`` a mean over its shard, it is the global batch's mean), the
        constraints ``C`` all processes' residuals in rank order, ``inequality`` this process's
        own mask. Every process then takes the step one process would take on the whole batch,
        and the multipliers, constraint values and active mask returned are the global ones
        (``shard``: this process's part). None (default), or a group of one process: no
        communication.

    Returns
    -------
    KKTStep
        ``delta`` (dw by name), ``multipliers`` (Λ), ``info``, ``system``,
        ``constraint_values``, ``loss_value``, ``active`` and ``shard``.

    Raises
    ------
    ValueError
        On a bad argument, and when the loss, its gradient, the residuals or the constraints
        are non-finite at ``w`` (the message names which).
    RuntimeError
        When the solver returns non-finite values.

    Examples
    --------
    Minimize ``½‖w‖²`` subject to ``w₀ + w₁ = 1`` from ``w = 0``: one step with ``η = 1`` lands
    on the constraint at ``(½, ½)``.

    >>> import torch
    >>> w = {"w": torch.zeros(2, dtype=torch.float64)}
    >>> step = kkt_step(w, lambda p: 0.5 * p["w"].pow(2).sum(),
    ...                 lambda p: p["w"].sum() - 1, eta=1.0, rtol=1e-12)
    >>> step.delta["w"].tolist(), step.multipliers.tolist()
    ([0.5, 0.5], [-0.5])
    """
    _check_scalars(eta, method, rtol, maxit, system, betas, eps, bias_correction, metric)
    if not (0.0 < _real(correction) <= 1.0):
        raise ValueError(f"correction must be a number in (0, 1], got {correction!r}")
    if not (math.isfinite(_real(regularization)) and _real(regularization) >= 0):
        raise ValueError(f"regularization must be a finite number >= 0, got {regularization!r}")
    eta, rtol = float(eta), float(rtol)
    correction, regularization = float(correction), float(regularization)
    params, _ = _check_params(params)
    resolved = ("full" if method == "gauss-newton" else "reduced") if system == "auto" else system
    if method == "gauss-newton" and residuals is None:
        raise ValueError("method='gauss-newton' needs residuals (R = ½‖r‖²), got None")
    if method != "gauss-newton" and loss is None:
        raise ValueError(f"method={method!r} needs a loss, got None")
    if method == "adam" and state is None:
        raise ValueError("method='adam' needs a state dict (it holds m, v and t), got None")

    comm = Collective(process_group)
    shared = comm.distributed  # checks of values wait for the gathered ones: all raise alike

    # C at w and its linearization; the active rows are fixed from here on (§4.4).
    lin = _Linearized(constraints or _empty_constraints, params, "constraints",
                      check_finite=not shared)
    c_all = lin.value
    active = _active_rows(c_all, inequality)
    index = active.nonzero().reshape(-1)
    lin.restrict(index)
    shard = None
    if shared:  # from here C, the active mask and Λ are all processes', in rank order
        c_all, active, shard = _share_constraints(lin, comm, c_all, active)
        index = active.nonzero().reshape(-1)
    c_target = correction * c_all[index]  # the share of C the step removes (1: all, Eq. 5)

    if method == "gauss-newton":
        res = _Linearized(residuals, params, "residuals", check_finite=not shared)
        if shared:
            loss_value = _shared_gauss_newton_loss(comm, res.value, loss, params)
        elif loss is None:
            loss_value = 0.5 * float(res.value.pow(2).sum())
        else:
            loss_value = _scalar(loss, params)
        dw, lam, info = _solve_gauss_newton(eta, res, lin, c_target, regularization, rtol,
                                            maxit, comm)
    else:
        grads, value = torch.func.grad_and_value(_scalar_fn(loss))(params)
        if shared:
            grads, value = _mean_gradient(comm, grads, value)
        loss_value = float(value)
        if not math.isfinite(loss_value):
            raise ValueError(f"loss(params) returned a non-finite value: {loss_value}")
        if not all(bool(torch.isfinite(x).all()) for x in grads.values()):
            raise ValueError("the gradient of loss(params) is non-finite (inf or nan)")
        if method == "adam":
            m, v, t = _adam_moments(grads, state, betas)
            g = _flatten(m)
            d = _adam_diagonal(_flatten(v), eta, t, betas, eps, bias_correction)
            if metric == "euclidean":  # Adam's step −g/d, projected in Eq. 5's metric
                g, d = g * (eta / d), eta
        else:
            g = _flatten(grads)
            d = eta  # D = ηI
        dw, lam, info = _solve_diagonal(d, g, lin, c_target, regularization, resolved, rtol,
                                        maxit)
        if method == "adam":
            state.update(m=m, v=v, t=t + 1)

    multipliers = c_all.new_zeros(c_all.numel())
    multipliers[index] = lam
    return KKTStep(
        delta=_unflatten(dw, params),
        multipliers=multipliers,
        info=info,
        system=resolved,
        constraint_values=c_all,
        loss_value=loss_value,
        active=active,
        shard=shard,
    )


def _scalar_fn(loss: Callable[[Params], Tensor]) -> Callable[[Params], Tensor]:
    """``loss`` checked to return a one-element tensor, returned as a 0-d tensor."""

    def fn(p: Params) -> Tensor:
        out = loss(p)
        if not isinstance(out, Tensor) or out.numel() != 1:
            shape = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
            raise ValueError(f"loss(params) must return a scalar tensor, got {shape}")
        return out.reshape(())

    return fn


def _scalar(loss: Callable[[Params], Tensor], params: Params) -> float:
    """``float(loss(params))`` without autograd, checked finite."""
    with torch.no_grad():
        value = float(_scalar_fn(loss)(params))
    if not math.isfinite(value):
        raise ValueError(f"loss(params) returned a non-finite value: {value}")
    return value
