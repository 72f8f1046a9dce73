"""Exact Euclidean projections onto simple convex sets, Dykstra's algorithm, projected optimizers.

Every projection solves ``P_C(x) = argmin_{y ∈ C} ‖y − x‖²`` over the **last** dimension of ``x``,
batched over the leading dimensions, on ``x``'s device and in ``x``'s dtype. They are written
with differentiable torch operations, so autograd gives the (almost everywhere defined)
Jacobian of the projection.

* :func:`project_nonnegative` and :func:`project_box`: coordinate-wise clamping;
* :func:`project_simplex`: the sort-based algorithm of Held, Wolfe and Crowder, "Validation of
  subgradient optimization" (1974), as in Fig. 1 of Duchi, Shalev-Shwartz, Singer and Chandra,
  "Efficient projections onto the l1-ball for learning in high dimensions" (2008);
* :func:`project_l1_ball`: Lemma 3 of Duchi et al. (2008), ``sign(x) ⊙ P_simplex(|x|)`` outside;
* :func:`project_l2_ball`: radial scaling;
* :func:`project_affine` / :func:`affine_projection`: ``x − A⁺(A x − b)``, the minimum-norm
  correction (Parikh and Boyd, "Proximal Algorithms", 2014, §6.2);
* :func:`dykstra`: the projection onto an intersection of such sets (Boyle and Dykstra, "A
  method for finding projections onto the intersection of convex sets in Hilbert spaces", 1986);
* :class:`Projected`: wraps any ``torch.optim`` optimizer into projected gradient descent.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "DykstraInfo",
    "Projected",
    "affine_projection",
    "dykstra",
    "project_affine",
    "project_box",
    "project_l1_ball",
    "project_l2_ball",
    "project_nonnegative",
    "project_simplex",
]

logger = logging.getLogger(__name__)

Projection = Callable[[Tensor], Tensor]


# ---- input checks ------------------------------------------------------------------------------


def _check_points(x: Any, name: str = "x") -> Tensor:
    """``x`` must be a floating tensor with at least one dimension and only finite entries."""
    if not isinstance(x, Tensor) or not x.is_floating_point():
        kind = x.dtype if isinstance(x, Tensor) else type(x).__name__
        raise ValueError(f"{name} must be a floating-point torch.Tensor, got {kind}")
    if x.dim() < 1:
        raise ValueError(f"{name} must have at least one dimension (..., n), got shape ()")
    if not bool(torch.isfinite(x).all()):
        bad = int((~torch.isfinite(x)).sum())
        raise ValueError(f"{name} must be finite, got {bad} non-finite (NaN/inf) entries")
    return x


def _check_radius(radius: float | Tensor, x: Tensor) -> Tensor:
    """``radius``: a finite number ``≥ 0``, or a tensor broadcastable to ``x.shape[:-1]``.

    Returned with a trailing singleton dimension, in ``x``'s dtype and device.
    """
    if isinstance(radius, bool) or not isinstance(radius, int | float | Tensor):
        raise ValueError(f"radius must be a number or a tensor, got {type(radius).__name__}")
    r = torch.as_tensor(radius).to(dtype=x.dtype, device=x.device)
    if not bool(torch.all(torch.isfinite(r) & (r >= 0))):
        value = r.item() if r.numel() == 1 else r.detach().cpu().tolist()
        raise ValueError(f"radius must be finite and >= 0, got {value}")
    batch = x.shape[:-1]
    try:
        ok = torch.broadcast_shapes(r.shape, batch) == batch
    except RuntimeError:
        ok = False
    if not ok:
        raise ValueError(
            f"radius of shape {tuple(r.shape)} does not broadcast to the batch shape "
            f"{tuple(batch)} of x (shape {tuple(x.shape)})"
        )
    return r.unsqueeze(-1)


def _as_bound(value: float | Tensor, name: str, x: Tensor) -> Tensor:
    if isinstance(value, bool) or not isinstance(value, int | float | Tensor):
        raise ValueError(f"{name} must be a number or a tensor, got {type(value).__name__}")
    v = torch.as_tensor(value).to(dtype=x.dtype, device=x.device)
    if bool(torch.isnan(v).any()):
        raise ValueError(f"{name} must not contain NaN")
    try:
        ok = torch.broadcast_shapes(v.shape, x.shape) == x.shape
    except RuntimeError:
        ok = False
    if not ok:
        raise ValueError(
            f"{name} of shape {tuple(v.shape)} does not broadcast to x's shape {tuple(x.shape)}"
        )
    return v


# ---- the projections ---------------------------------------------------------------------------


def project_nonnegative(x: Tensor) -> Tensor:
    """Projection onto the non-negative orthant ``{y : y ≥ 0}``: ``max(x, 0)``.

    >>> project_nonnegative(torch.tensor([0.5, -0.2, 1.2]))
    tensor([0.5000, 0.0000, 1.2000])
    """
    return _check_points(x).clamp_min(0.0)


def project_box(x: Tensor, lower: float | Tensor, upper: float | Tensor) -> Tensor:
    """Projection onto the box ``{y : lower ≤ y ≤ upper}``: ``min(max(x, lower), upper)``.

    ``lower`` and ``upper`` are numbers or tensors broadcastable to ``x.shape`` (``±inf`` allowed
    for a half-open box); ``ValueError`` if any ``lower > upper``.

    >>> project_box(torch.tensor([-2.0, 0.5, 3.0]), -1.0, torch.tensor([1.0, 1.0, 2.0]))
    tensor([-1.0000,  0.5000,  2.0000])
    """
    _check_points(x)
    lo, hi = _as_bound(lower, "lower", x), _as_bound(upper, "upper", x)
    if bool((lo > hi).any()):
        lb, hb = torch.broadcast_tensors(lo, hi)
        i = int(torch.nonzero((lb > hb).flatten())[0])
        raise ValueError(
            f"lower must be <= upper everywhere, got lower={lb.flatten()[i].item()} > "
            f"upper={hb.flatten()[i].item()} at flat index {i}"
        )
    return torch.clamp(x, min=lo, max=hi)


def _simplex(x: Tensor, r: Tensor) -> Tensor:
    """Sort-based projection onto ``{y ≥ 0, Σ y = r}`` (no checks; ``r`` of shape ``(..., 1)``).

    Fig. 1 of Duchi, Shalev-Shwartz, Singer and Chandra (2008): with ``μ`` the entries sorted in
    decreasing order, ``ρ = max{j : μ_j − (Σ_{i≤j} μ_i − r)/j > 0}``,
    ``θ = (Σ_{i≤ρ} μ_i − r)/ρ`` and ``y = max(x − θ, 0)``.
    """
    n = x.shape[-1]
    mu = torch.sort(x, dim=-1, descending=True).values
    css = torch.cumsum(mu, dim=-1)
    j = torch.arange(1, n + 1, device=x.device, dtype=x.dtype)
    positive = mu - (css - r) / j > 0
    # largest such j (for r = 0 none may exist; ρ = 1 then gives θ = max(x) and y = 0)
    rho = (positive * torch.arange(1, n + 1, device=x.device)).amax(dim=-1, keepdim=True)
    rho = rho.clamp_min(1)
    theta = (css.gather(-1, rho - 1) - r) / rho.to(x.dtype)
    return torch.clamp(x - theta, min=0.0)


def project_simplex(x: Tensor, radius: float | Tensor = 1.0) -> Tensor:
    """Projection onto the simplex ``{y : y ≥ 0, Σ_i y_i = radius}``.

    The algorithm of Held, Wolfe and Crowder (1974), Fig. 1 of Duchi, Shalev-Shwartz, Singer and
    Chandra, "Efficient projections onto the l1-ball for learning in high dimensions" (2008):
    ``y = max(x − θ, 0)`` with the threshold ``θ`` found from the sorted entries, ``O(n log n)``.
    ``radius ≥ 0`` is a number or a tensor broadcastable to ``x.shape[:-1]``. Note that dividing
    by the sum is *not* this projection.

    >>> project_simplex(torch.tensor([0.5, -0.2, 1.2, 3.0]))
    tensor([0., 0., 0., 1.])
    >>> project_simplex(torch.tensor([0.4, 0.3, 0.1]))
    tensor([0.4667, 0.3667, 0.1667])
    """
    _check_points(x)
    return _simplex(x, _check_radius(radius, x))


def project_l1_ball(x: Tensor, radius: float | Tensor = 1.0) -> Tensor:
    """Projection onto the l1 ball ``{y : Σ_i |y_i| ≤ radius}``.

    Inside the ball ``x`` itself; outside, ``sign(x) ⊙ P_simplex(|x|, radius)`` (Lemma 3 and
    Fig. 1 of Duchi, Shalev-Shwartz, Singer and Chandra, 2008).

    >>> project_l1_ball(torch.tensor([0.8, -0.6, 0.1]))
    tensor([ 0.6000, -0.4000,  0.0000])
    """
    _check_points(x)
    r = _check_radius(radius, x)
    a = x.abs()
    inside = a.sum(dim=-1, keepdim=True) <= r
    return torch.where(inside, x, torch.sign(x) * _simplex(a, r))


def project_l2_ball(x: Tensor, radius: float | Tensor = 1.0) -> Tensor:
    """Projection onto the Euclidean ball ``{y : ‖y‖₂ ≤ radius}``: ``x · min(1, radius/‖x‖)``.

    >>> project_l2_ball(torch.tensor([3.0, 4.0]), 1.0)
    tensor([0.6000, 0.8000])
    """
    _check_points(x)
    r = _check_radius(radius, x)
    norm = torch.linalg.vector_norm(x, dim=-1, keepdim=True)
    outside = norm > r
    scale = torch.where(outside, r / torch.where(outside, norm, torch.ones_like(norm)), 1.0)
    return x * scale


def affine_projection(
    A: Tensor,
    b: Tensor,
    *,
    rcond: float | None = None,
    feas_tol: float | None = None,
) -> Projection:
    """The projection ``x ↦ x − A⁺(A x − b)`` onto ``{y : A y = b}``, with ``A⁺`` precomputed.

    Parikh and Boyd, "Proximal Algorithms" (2014), §6.2: the correction ``A⁺(A x − b)`` is the
    minimum-norm one, also for rank-deficient ``A`` (``A⁺`` the Moore–Penrose pseudoinverse, its
    singular values below ``rcond · σ_max`` treated as zero; ``None``: torch's default
    ``max(m, n) · eps``). ``A`` has shape ``(m, n)`` or ``(..., m, n)``, ``b`` shape ``(m,)``
    or ``(..., m)``; the returned function maps ``x`` of shape ``(..., n)`` to the same shape.

    ``ValueError("infeasible affine constraints ...")`` if ``b`` is not in the range of ``A``:
    ``‖(I − A A⁺) b‖ > feas_tol · ‖b‖`` (``None``: ``√eps`` of the dtype). This residual is
    exactly ``A y − b`` of every output ``y``.
    """
    if not isinstance(A, Tensor) or not A.is_floating_point() or A.dim() < 2:
        kind = f"{A.dtype} of shape {tuple(A.shape)}" if isinstance(A, Tensor) else type(A)
        raise ValueError(f"A must be a floating-point tensor of shape (..., m, n), got {kind}")
    _check_points(A, "A")
    b = torch.as_tensor(b).to(dtype=A.dtype, device=A.device)
    _check_points(b, "b")
    m, n = A.shape[-2:]
    if b.shape[-1] != m:
        raise ValueError(f"b must have shape (..., m) with m={m} rows of A, got {tuple(b.shape)}")
    if rcond is not None and not (isinstance(rcond, int | float) and 0 <= rcond < 1):
        raise ValueError(f"rcond must be a number in [0, 1), got {rcond!r}")
    eps = torch.finfo(A.dtype).eps
    tol = math.sqrt(eps) if feas_tol is None else feas_tol
    if not (isinstance(tol, int | float) and 0 <= tol < math.inf):
        raise ValueError(f"feas_tol must be a finite number >= 0, got {feas_tol!r}")
    A_pinv = torch.linalg.pinv(A, rtol=rcond) if rcond is not None else torch.linalg.pinv(A)
    residual = _matvec(A, _matvec(A_pinv, b)) - b
    res_norm = torch.linalg.vector_norm(residual, dim=-1)
    b_norm = torch.linalg.vector_norm(b, dim=-1)
    bad = res_norm > tol * b_norm
    if bool(bad.any()):
        rel = (res_norm / b_norm.clamp_min(torch.finfo(A.dtype).tiny)).max().item()
        raise ValueError(
            f"infeasible affine constraints A y = b: b is not in the range of A "
            f"(relative residual ‖(I − A A⁺) b‖/‖b‖ = {rel:.3e} > feas_tol = {tol:.3e})"
        )

    def project(x: Tensor) -> Tensor:
        _check_points(x)
        if x.shape[-1] != n:
            raise ValueError(
                f"x must have shape (..., n) with n={n} columns of A, got {tuple(x.shape)}"
            )
        Ax, Ap, bx = A.to(x), A_pinv.to(x), b.to(x)
        y = x - _matvec(Ap, _matvec(Ax, x) - bx)
        if y.shape != x.shape:
            raise ValueError(
                f"the batch shapes of A {tuple(A.shape[:-2])} and b {tuple(b.shape[:-1])} "
                f"must broadcast to that of x {tuple(x.shape[:-1])}"
            )
        return y

    return project


def project_affine(
    x: Tensor,
    A: Tensor,
    b: Tensor,
    *,
    rcond: float | None = None,
    feas_tol: float | None = None,
) -> Tensor:
    """Projection onto ``{y : A y = b}``: ``y = x − A⁺(A x − b)`` (see :func:`affine_projection`).

    For repeated use with the same ``A``, build the projection once with
    :func:`affine_projection` (it computes ``A⁺`` and checks feasibility once).

    >>> project_affine(torch.tensor([1.0, 2.0]), torch.tensor([[1.0, 1.0]]), torch.tensor([1.0]))
    tensor([0., 1.])
    """
    _check_points(x)
    if isinstance(A, Tensor) and A.is_floating_point():
        A = A.to(dtype=x.dtype, device=x.device)
    return affine_projection(A, b, rcond=rcond, feas_tol=feas_tol)(x)


def _matvec(M: Tensor, v: Tensor) -> Tensor:
    """``M v`` over the last dimensions, batched with broadcasting."""
    return (M @ v.unsqueeze(-1)).squeeze(-1)


# ---- Dykstra's algorithm -----------------------------------------------------------------------


@dataclass(frozen=True)
class DykstraInfo:
    """Outcome of :func:`dykstra`.

    ``iterations``: sweeps over all sets; ``converged``: whether ``change ≤ tol · max(1, ‖x‖)``
    was reached; ``change``: the last ``sqrt(Σ_i ‖p_i^k − p_i^{k−1}‖²)`` (the increments ``p_i``;
    maximum over the batch rows).
    """

    iterations: int
    converged: bool
    change: float


def dykstra(
    x: Tensor,
    projections: Sequence[Projection],
    *,
    tol: float = 1e-8,
    max_iter: int = 1000,
) -> tuple[Tensor, DykstraInfo]:
    """Projection onto ``C_1 ∩ … ∩ C_K`` from the projections onto each ``C_i`` (convex, closed).

    Dykstra's algorithm (Boyle and Dykstra, "A method for finding projections onto the
    intersection of convex sets in Hilbert spaces", 1986): with increments ``p_i = 0`` and
    ``y = x``, each sweep does, for ``i = 1..K``, ``z = P_i(y + p_i)``, ``p_i ← y + p_i − z``,
    ``y ← z``. Unlike plain alternating projections, the limit is the *nearest* point of the
    intersection. It stops when the increments stop changing,
    ``sqrt(Σ_i ‖p_i^k − p_i^{k−1}‖²) ≤ tol · max(1, ‖x‖)`` (the robust criterion of Birgin and
    Raydan, "Robust stopping criteria for Dykstra's algorithm", 2005), or after ``max_iter``
    sweeps (logged as a warning). Batched over the leading dimensions of ``x``; every projection
    must map ``(..., n)`` to ``(..., n)``. If the intersection is empty the iterates do not
    converge.

    >>> y, info = dykstra(torch.tensor([2.0, 2.0]), [project_nonnegative, project_l2_ball])
    >>> y, info.converged
    (tensor([0.7071, 0.7071]), True)
    """
    _check_points(x)
    projections = list(projections)
    if not projections or not all(callable(p) for p in projections):
        raise ValueError("projections must be a non-empty list of callables, got "
                         f"{[type(p).__name__ for p in projections]}")
    if isinstance(max_iter, bool) or not isinstance(max_iter, int) or max_iter < 1:
        raise ValueError(f"max_iter must be an integer >= 1, got {max_iter!r}")
    if isinstance(tol, bool) or not isinstance(tol, int | float) or not 0 < tol < math.inf:
        raise ValueError(f"tol must be a finite number > 0, got {tol!r}")
    scale = max(1.0, float(torch.linalg.vector_norm(x, dim=-1).max()))
    y = x
    p = [torch.zeros_like(x) for _ in projections]
    change = math.inf
    for k in range(1, max_iter + 1):
        sq = torch.zeros(x.shape[:-1], dtype=x.dtype, device=x.device)
        for i, proj in enumerate(projections):
            z = proj(y + p[i])
            if z.shape != x.shape:
                raise ValueError(
                    f"projection {i} returned shape {tuple(z.shape)}, expected {tuple(x.shape)}"
                )
            p_new = y + p[i] - z
            sq = sq + (p_new - p[i]).detach().square().sum(dim=-1)
            p[i], y = p_new, z
        change = float(sq.max().sqrt()) if sq.numel() else 0.0
        if change <= tol * scale:
            return y, DykstraInfo(iterations=k, converged=True, change=change)
    logger.warning(
        "dykstra did not converge in max_iter=%d sweeps: change %.3e > tol·scale %.3e",
        max_iter, change, tol * scale,
    )
    return y, DykstraInfo(iterations=max_iter, converged=False, change=change)


# ---- projected optimizers ----------------------------------------------------------------------


ProjectionSpec = (
    dict[Tensor, Projection] | Iterable[tuple[Tensor | Iterable[Tensor], Projection]]
)


class Projected(torch.optim.Optimizer):
    """Any ``torch.optim`` optimizer followed by a projection of chosen parameters.

    Projected gradient descent: after every ``optimizer.step()``, each chosen parameter ``p`` is
    replaced in place by ``proj(p)`` under ``torch.no_grad()``, so it lies in the constraint set
    after every step (the projection acts on the last dimension of ``p``, e.g. on each row of a
    weight matrix). ``projections`` is a dict ``{param: proj}`` or a list of
    ``(param_or_params, proj)`` pairs; every parameter must be one the optimizer updates.

    The wrapper *is* a ``torch.optim.Optimizer`` (so learning-rate schedulers accept it) whose
    ``param_groups``, ``state`` and ``defaults`` are the wrapped optimizer's own objects;
    ``step(closure)`` returns the closure's loss; ``zero_grad``, ``state_dict``,
    ``load_state_dict`` and ``add_param_group`` delegate to the wrapped optimizer (its
    ``state_dict`` is unchanged). The starting point is not projected: call :meth:`project` once
    to start from a feasible point.

    >>> w = torch.nn.Parameter(torch.tensor([0.5, -0.2, 1.2, 3.0]))
    >>> opt = Projected(torch.optim.SGD([w], lr=0.1), {w: project_simplex})
    >>> (w ** 2).sum().backward()
    >>> _ = opt.step()
    >>> w.data
    tensor([0., 0., 0., 1.])
    """

    def __init__(self, optimizer: torch.optim.Optimizer, projections: ProjectionSpec) -> None:
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise ValueError(
                f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}"
            )
        # The base constructor sets up the hooks and the step patching; it builds its own copy of
        # the groups, which is then replaced by the wrapped optimizer's (shared) objects.
        super().__init__([dict(g) for g in optimizer.param_groups], optimizer.defaults)
        self.optimizer = optimizer
        self.param_groups = optimizer.param_groups
        self.state = optimizer.state
        self.defaults = optimizer.defaults
        self.projections: list[tuple[Tensor, Projection]] = []
        pairs = projections.items() if isinstance(projections, dict) else projections
        for params, proj in pairs:
            self.add_projection(params, proj)

    def add_projection(self, params: Tensor | Iterable[Tensor], proj: Projection) -> None:
        """Project ``params`` (a tensor or an iterable of tensors) with ``proj`` after each step."""
        if not callable(proj):
            raise ValueError(f"projection must be callable, got {type(proj).__name__}")
        plist = [params] if isinstance(params, Tensor) else list(params)
        known = {id(q) for g in self.param_groups for q in g["params"]}
        for p in plist:
            if not isinstance(p, Tensor):
                raise ValueError(f"parameters must be tensors, got {type(p).__name__}")
            if id(p) not in known:
                raise ValueError(
                    f"parameter of shape {tuple(p.shape)} is not optimized by the wrapped "
                    "optimizer (add it to a param group first)"
                )
            self.projections.append((p, proj))

    @torch.no_grad()
    def project(self) -> None:
        """Replace each chosen parameter by its projection, in place (``p.copy_(proj(p))``)."""
        for p, proj in self.projections:
            q = proj(p)
            if q.shape != p.shape:
                raise ValueError(
                    f"projection returned shape {tuple(q.shape)} for a parameter of shape "
                    f"{tuple(p.shape)}"
                )
            p.copy_(q)

    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        """The wrapped optimizer's step, then :meth:`project`; returns the closure's loss."""
        loss = self.optimizer.step(closure) if closure is not None else self.optimizer.step()
        self.project()
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict[str, Any]:
        return self.optimizer.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state_dict)
        # the wrapped optimizer may rebind these on load; keep sharing them
        self.param_groups = self.optimizer.param_groups
        self.state = self.optimizer.state

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        if "optimizer" not in self.__dict__:  # called by the base constructor
            super().add_param_group(param_group)
        else:
            self.optimizer.add_param_group(param_group)

    def __repr__(self) -> str:
        return f"Projected({self.optimizer!r}, {len(self.projections)} projected parameter(s))"
