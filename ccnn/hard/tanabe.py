"""Tanabe's constrained backpropagation: a loss whose gradient step follows Tanabe's dynamics.

Jergensen, "Neural network optimization under PDE constraints" (2019), Eq. 2-6, after Tanabe, "A
geometric method in nonlinear programming" (1980). For a loss ``f(θ)`` and equality constraints
``g(θ) = 0`` (``g ∈ R^M``, Jacobian ``J = ∂g/∂θ``, ``M × N``) the dynamical system

.. code-block:: text

    θ̇ = −(I − J⁺J)∇f − J⁺g = −∇f − Jᵀ Λ,     (J Jᵀ) Λ = −J ∇f + g           (Eq. 2-3)

projects the gradient of ``f`` onto the tangent space of the constraint surface and adds a
correction along ``Jᵀ`` such that ``ġ = J θ̇ = −g``: the residual decays as ``g(t) = g(0)·e^{−t}``.
Its forward-Euler step with step size ``η`` is plain gradient descent on

.. code-block:: text

    L(θ) = f(θ) + Σ_i nograd(λ_i) · g_i(θ),    λ = Λ(θ)                        (Eq. 4)

so that ``∇L = ∇f + JᵀΛ = −Ψ(θ)``. Sign convention (checked against the paper, and by the proof in
its appendix): ``Λ = (JJᵀ)⁻¹(−J∇f + g)`` exactly as printed in Eq. 3-5; then
``J θ̇ = −J∇f − (−J∇f + g) = −g``. (The last term of the paper's Eq. 2, printed ``−J(g)·g``, must
read ``−J(g)⁺·g``, as in the appendix.) With plain SGD of learning rate ``η`` the residual shrinks
by ``(1 − η)`` per step to first order; adaptive optimisers (Adam) rescale the step and void that
guarantee.

Two versions (Jergensen §"Constrained optimization", minibatches):

``version="full"``
    one multiplier per sample and constraint, ``L = (1/B) Σ_i [f_i + Σ_j λ_ij g_ij]`` (Eq. 9).
    ``coupling="batch"`` (default) solves one system over all ``B·M`` residuals of the batch: the
    stacked vector ``G = (g_1, …, g_B)`` with Jacobian ``J_G`` (rows: per-sample gradients) and
    ``f̄ = (1/B) Σ f_i`` give ``(J_G J_Gᵀ) Λ = −J_G ∇f̄ + G`` and ``λ = B·Λ``; this is Tanabe's
    dynamics for the minibatch, so every per-sample residual decays as ``e^{−t}``.
    ``coupling="sample"`` is Eq. 5 as printed: ``B`` independent ``M × M`` systems
    ``(J_i J_iᵀ) λ_i = −J_i ∇f_i + g_i``, each sample's multipliers from its own gradients (a
    block-diagonal approximation: the averaged step does not give ``ġ_i = −g_i`` exactly).
``version="reduction"``
    one set of ``M`` multipliers for a batch-wise reduction ``g̃_j = Reduce_i g_ij`` (mean squared
    residual, or the mean Huber error the paper used), ``L = f̄ + Σ_j λ̃_j g̃_j`` (Eq. 6, 10).

The Jacobians. The reduction version takes ``1 + M'`` backward passes through the batch's graph
(``∇f̄`` and each ``∇g̃_j``), or, with ``batched_params=True`` (below), one: the batch is repeated
``1 + M'`` times with one parameter copy per repetition and ``f̄`` of the first plus ``g̃_j`` of
repetition ``j + 1`` is differentiated once. With one reduced constraint and the dense solver the
multiplier is the scalar ``(g̃ − ∇g̃·∇f̄) / ‖∇g̃‖²`` (in ``solve_dtype``). The full version forms
per-sample Jacobians with :func:`torch.func.vmap` over :func:`torch.func.jacrev` (any model whose
samples are independent), or, with ``batched_params=True``, from one forward and one backward
pass: the model must then accept parameters with a leading dimension ``G`` (copies) and split the
rows of its input into ``G`` equal consecutive groups, group ``i`` using copy ``i``
(:class:`ccnn.helmholtz.HelmholtzNet` does; ``torch.nn.Linear`` does not). For the full version
the batch is repeated ``1 + M`` times with one parameter copy per row, and the gradient of
``Σ_i f_i`` (first repetition) plus ``Σ_i g_ij`` (repetition ``j + 1``) with respect to the copies
holds every per-sample ``∇f_i`` and ``∇g_ij``. On small networks, where each operation's fixed
cost dominates, this is faster than ``vmap`` (measured in docs/helmholtz.md). The copies are
expanded views of the parameters (no copy of the data), reused between calls while the
parameters are the same tensors, and are put into the model by swapping its parameter tables
(``torch.func.functional_call`` when a parameter is tied to several modules).

The multiplier systems are small (``B·M × B·M`` at most), so they are formed densely from those
Jacobians in ``solve_dtype`` and solved by a dense factorization up to ``dense_max`` unknowns
(measured faster there than MINRES-QLP on these ill-conditioned Gram matrices, see
docs/helmholtz.md) and by MINRES-QLP (Choi, Paige and Saunders 2011) above, warm-started from the
previous step's ``Λ``; both give the minimum-length solution when ``J`` is rank-deficient. The
returned loss carries the gradient computed once from those Jacobians: its ``backward()`` only
writes ``∇f̄ + Σ λ ∇g`` into the parameters' ``.grad``, so any optimizer can take the step;
:meth:`TanabeStep.backward` writes the same without the autograd engine.

Under :class:`~torch.nn.parallel.DistributedDataParallel` (DDP) ``Tanabe(ddp_model)`` works on
``ddp_model.module`` with each process's shard of the global batch, and every process computes
the gradient one process would compute on the whole batch (the multipliers replicated on every
process, the sums over processes done explicitly; ``loss.backward()`` writes the same ``∇L`` on
every process, and DDP's own hooks do not run as long as the DDP model's forward is not called).
The full version's ``f̄`` and the reduction's batch means are those of all samples (exact for
shards of any sizes). ``coupling="batch"`` gathers every process's rows ``J_G`` for the dense
solver, and for MINRES-QLP keeps them sharded: ``J_G·v`` is gathered, ``J_Gᵀ·Λ`` summed over the
processes. ``coupling="sample"`` solves each sample's system where it lives. A callable
``reduction`` is refused (its batch reduction cannot be made the global batch's).

Constraints on derivatives of the network with respect to its inputs (PDE residuals) work as long
as ``fn`` computes them with :mod:`torch.func` (e.g. :func:`input_derivatives`) or with plain
differentiable torch code (Taylor-mode propagation); ``torch.autograd.grad`` with
``create_graph=True`` works except inside ``vmap`` (the default full version).

>>> import torch
>>> model = torch.nn.Sequential(torch.nn.Linear(2, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
>>> x = torch.randn(16, 2, generator=torch.Generator().manual_seed(0))
>>> def fn(net, x):                       # per-sample loss u², constraint u(x) = x₀
...     u = net(x)[:, 0]
...     return u.square(), u - x[:, 0]
>>> tanabe = Tanabe(model, version="full")
>>> opt = torch.optim.SGD(model.parameters(), lr=0.1)    # forward Euler, η = 0.1
>>> g0 = (model(x)[:, 0] - x[:, 0]).abs().max()
>>> for _ in range(30):
...     opt.zero_grad()
...     step = tanabe(fn, x)
...     step.loss.backward()
...     opt.step()
>>> g30 = (model(x)[:, 0] - x[:, 0]).abs().max()
>>> bool(g30 < 0.1 * g0)                  # ≈ (1 − η)³⁰ ≈ 0.04
True
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.func import functional_call, jacrev, jvp, vmap

from ccnn.hard.distributed import unwrap
from ccnn.hard.minres_qlp import MinresQLPInfo, minres_qlp

__all__ = [
    "Tanabe",
    "TanabeStep",
    "huber",
    "input_derivatives",
    "tanabe_multipliers",
]

logger = logging.getLogger(__name__)

Version = Literal["full", "reduction"]
Coupling = Literal["batch", "sample"]
Solver = Literal["minres_qlp", "dense", "auto"]
Reduction = Literal["mse", "huber"] | Callable[[Tensor], Tensor]
StepFn = Callable[..., tuple[Tensor, Tensor]]

_VERSIONS = ("full", "reduction")
_COUPLINGS = ("batch", "sample")
_SOLVERS = ("minres_qlp", "dense", "auto")
_REDUCTIONS = ("mse", "huber")


# ---- helpers ----------------------------------------------------------------------------------


def huber(r: Tensor, delta: float = 1.0) -> Tensor:
    """Huber's error ``½r²`` for ``|r| ≤ δ``, ``δ(|r| − ½δ)`` beyond (Huber 1964), elementwise.

    Zero only where ``r = 0``, so its batch mean is a valid reduction for Eq. 6 of Jergensen (2019).
    """
    return nn.functional.huber_loss(r, torch.zeros_like(r), reduction="none", delta=delta)


def input_derivatives(
    fn: Callable[[Tensor], Tensor], x: Tensor, direction: Tensor, order: int = 2
) -> tuple[Tensor, ...]:
    """``(fn(x), D_v fn(x), …, D_v^order fn(x))``: directional derivatives by nested ``jvp``.

    ``direction`` ``v`` has ``x``'s shape. For a batched ``fn`` whose output rows depend only on the
    same rows of ``x`` (no batch coupling: no BatchNorm in training mode) and ``v`` = a unit
    vector in each row, these are the per-sample derivatives along that input coordinate, e.g.
    ``u''(x)`` of a PDE residual. Nested :func:`torch.func.jvp` (forward over forward), so the
    result is differentiable with respect to parameters by autograd and under
    :func:`torch.func.vmap` / :func:`torch.func.grad`. Activations need forward-mode derivatives
    of their derivatives: ``torch.nn.functional.silu`` lacks a second-order forward rule in
    PyTorch 2.x; write Swish as ``x * torch.sigmoid(x)``.

    >>> x = torch.tensor([[0.5], [1.0]])
    >>> u, du, d2u = input_derivatives(torch.sin, x, torch.ones_like(x))
    >>> torch.allclose(d2u, -torch.sin(x))
    True
    """
    if isinstance(order, bool) or not isinstance(order, int) or order < 0:
        raise ValueError(f"order must be a non-negative int, got {order!r}")
    if not isinstance(direction, Tensor) or direction.shape != x.shape:
        shape = tuple(direction.shape) if isinstance(direction, Tensor) else direction
        raise ValueError(f"direction must be a tensor shaped like x {tuple(x.shape)}, got {shape}")
    return _jet(fn, x, direction, order)


def _jet(fn: Callable[[Tensor], Tensor], x: Tensor, v: Tensor, order: int) -> tuple[Tensor, ...]:
    if order == 0:
        return (fn(x),)
    primals, tangents = jvp(lambda y: _jet(fn, y, v, order - 1), (x,), (v,))
    return (*primals, tangents[-1])


def _require_finite(*tensors: Tensor) -> None:
    """FloatingPointError unless every entry is finite: the multipliers' system has inf or nan
    when the weights (or the loss or residuals) have diverged."""
    if not all(bool(torch.isfinite(t).all()) for t in tensors):
        raise FloatingPointError(
            "Tanabe's multipliers: the constraint Jacobian, the loss gradient or the residuals "
            "are not finite (inf or nan); the weights have diverged: lower the learning rate")


def _solve_dense(A: Tensor, b: Tensor, rcond: float | None = None) -> Tensor:
    """Minimum-length least-squares solution ``A⁺b`` of symmetric PSD ``A`` (batched over leading
    dimensions). On the CPU LAPACK's ``gelsy`` (complete orthogonal factorization, measured about
    twice as fast as an eigendecomposition at 100-400 unknowns); elsewhere an eigendecomposition.
    Singular values (eigenvalues) ``≤ rcond·max`` count as zero (default ``10·n·eps``).
    FloatingPointError for a non-finite ``A`` or ``b``."""
    _require_finite(A, b)
    n = A.shape[-1]
    if n == 1:  # a scalar per system: b / a, or 0 where a = 0
        a = A[..., 0]
        nonzero = a > torch.finfo(A.dtype).tiny
        return torch.where(nonzero, b / torch.where(nonzero, a, torch.ones_like(a)),
                           torch.zeros_like(b))
    if rcond is None:
        rcond = max(n, 1) * 10 * torch.finfo(A.dtype).eps
    if A.device.type == "cpu":
        return torch.linalg.lstsq(A, b.unsqueeze(-1), rcond=rcond, driver="gelsy"
                                  ).solution.squeeze(-1)
    w, Q = torch.linalg.eigh(A)
    cut = rcond * w.abs().amax(-1, keepdim=True).clamp_min(torch.finfo(A.dtype).tiny)
    inv = torch.where(w > cut, 1.0 / torch.where(w > cut, w, torch.ones_like(w)),
                      torch.zeros_like(w))
    qb = (Q.mT @ b.unsqueeze(-1)).squeeze(-1)
    return (Q @ (inv * qb).unsqueeze(-1)).squeeze(-1)


def tanabe_multipliers(
    J: Tensor,
    grad_f: Tensor,
    g: Tensor,
    *,
    solver: Solver = "auto",
    rtol: float = 1e-10,
    maxit: int | None = None,
    x0: Tensor | None = None,
    dense_max: int = 256,
) -> tuple[Tensor, MinresQLPInfo | None]:
    """``Λ`` of Eq. 3-5 of Jergensen (2019): the minimum-length solution of
    ``(J Jᵀ) Λ = −J ∇f + g``.

    ``J`` is ``(K, N)`` (rows ``∇g_k``), ``grad_f`` ``(N,)`` and ``g`` ``(K,)``; or batched,
    ``(B, K, N)``, ``(B, N)``, ``(B, K)`` for ``B`` independent systems (Eq. 5 per sample), solved
    as one block-diagonal system. ``solver="minres_qlp"`` runs MINRES-QLP on the dense Gram matrix
    (a callable for the batched case) from ``x0`` (warm start, with ``rtol`` taken relative to
    the full right-hand side rather than to the initial residual; the minimum-length property
    then holds for the correction ``Λ − x0``, and a component of ``x0`` in the null space of
    ``JJᵀ`` leaves ``JᵀΛ``, hence the step, unchanged); ``"dense"`` a dense factorization (see
    :func:`_solve_dense`);
    ``"auto"`` picks ``"dense"`` up to ``dense_max`` unknowns. Returns ``(Λ, info)`` (``info`` is
    None for the dense solver).
    """
    if solver not in _SOLVERS:
        raise ValueError(f"solver must be one of {_SOLVERS}, got {solver!r}")
    if J.dim() not in (2, 3) or grad_f.dim() != J.dim() - 1 or g.dim() != J.dim() - 1:
        raise ValueError(
            f"J, grad_f, g must be (K,N),(N,),(K,) or (B,K,N),(B,N),(B,K); got "
            f"{tuple(J.shape)}, {tuple(grad_f.shape)}, {tuple(g.shape)}"
        )
    A = J @ J.mT
    rhs = -(J @ grad_f.unsqueeze(-1)).squeeze(-1) + g
    n = rhs.numel()
    if solver == "auto":
        solver = "dense" if n <= dense_max else "minres_qlp"
    if solver == "dense":
        return _solve_dense(A, rhs), None
    if J.dim() == 2:
        op: Tensor | Callable[[Tensor], Tensor] = A
    else:
        shape = rhs.shape

        def op(v: Tensor) -> Tensor:
            return (A @ v.view(shape).unsqueeze(-1)).reshape(-1)

    lam, info = _minres_warm(op, rhs.reshape(-1), rtol, maxit, x0)
    return lam.view(rhs.shape), info


def _minres_warm(op: Tensor | Callable[[Tensor], Tensor], b: Tensor, rtol: float,
                 maxit: int | None, x0: Tensor | None) -> tuple[Tensor, MinresQLPInfo]:
    """MINRES-QLP on ``op·Λ = b`` from ``x0``, ``rtol`` relative to ``‖b‖`` (see
    :func:`tanabe_multipliers`); FloatingPointError for a non-finite ``b`` or answer."""
    _require_finite(b)
    start = None if x0 is None else x0.reshape(-1).to(b)
    if start is not None:
        # MINRES-QLP solves for the correction and measures rtol against its right-hand side
        # b − A·x0; rescale so that a good warm start stops early (tolerance relative to ‖b‖)
        r0 = b - (op @ start if isinstance(op, Tensor) else op(start))
        r0_norm, b_norm = float(r0.norm()), float(b.norm())
        if r0_norm > 0:
            rtol = min(rtol * b_norm / r0_norm, 0.5)
    lam, info = minres_qlp(op, b, rtol=rtol, maxit=maxit, x0=start)
    _require_finite(lam)
    return lam, info


def _grads(output: Tensor, inputs: list[Tensor], retain_graph: bool) -> list[Tensor]:
    """``∂output/∂inputs`` by autograd, zeros for inputs that ``output`` does not depend on."""
    got = torch.autograd.grad(output, inputs, retain_graph=retain_graph, allow_unused=True)
    return [torch.zeros_like(x) if d is None else d for d, x in zip(got, inputs, strict=True)]


def _flat(grads: tuple[Tensor, ...] | list[Tensor], lead: int) -> Tensor:
    """Concatenate gradients with ``lead`` leading (batch) dimensions into ``(*lead, N)``."""
    return torch.cat([t.reshape(*t.shape[:lead], -1) for t in grads], dim=-1)


class _Carrier(torch.autograd.Function):
    """A scalar whose value is given and whose gradient with respect to ``params`` is given."""

    @staticmethod
    def forward(ctx: Any, value: Tensor, grads: tuple[Tensor, ...], *params: Tensor) -> Tensor:
        ctx.grads = grads
        return value.detach().clone()

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, ...]:
        return (None, None, *torch._foreach_mul(ctx.grads, grad_out))


Piece = tuple[tuple[int, ...], tuple[int, ...], int]  # shape, contiguous strides, offset


@dataclass(frozen=True)
class _Layout:
    """The model's parameters as a :class:`Tanabe` call uses them, derived in one walk of its
    modules and valid while :meth:`current` holds.

    ``names``, ``params``: the parameters that require grad (first name of a tied one);
    ``slots``: each one's ``(module._parameters, attribute)`` for :meth:`Tanabe._swapped_net`,
    None when a parameter is registered under several names (tied weights); ``pieces``: each
    one's ``(shape, contiguous strides, offset)`` in the flat gradient (``as_strided`` views
    cost a third of ``split`` + ``view``); ``dtype``: the parameters' common dtype, None if
    they differ; ``watched`` and ``sizes``: what :meth:`current` checks."""

    names: list[str]
    params: list[Tensor]
    slots: list[tuple[dict[str, Any], str]] | None
    pieces: list[Piece]
    dtype: torch.dtype | None
    watched: list[tuple[dict[str, Any], str, Any, bool | None]]
    sizes: list[tuple[dict[str, Any], int]]

    @classmethod
    def of(cls, model: nn.Module) -> _Layout:
        watched: list[tuple[dict[str, Any], str, Any, bool | None]] = []
        sizes: list[tuple[dict[str, Any], int]] = []
        slots: list[tuple[dict[str, Any], str]] = []
        names: list[str] = []
        params: list[Tensor] = []
        seen: set[int] = set()
        tied = False
        # the order and first names of named_parameters()
        for prefix, module in model.named_modules(remove_duplicate=False):
            sizes += [(module._parameters, len(module._parameters)),
                      (module._modules, len(module._modules))]
            watched += [(module._modules, a, child, None) for a, child in module._modules.items()]
            for attr, p in module._parameters.items():
                if p is None:
                    continue
                watched.append((module._parameters, attr, p, p.requires_grad))
                if id(p) in seen:
                    tied = True
                    continue
                seen.add(id(p))
                if p.requires_grad:
                    names.append(f"{prefix}.{attr}" if prefix else attr)
                    params.append(p)
                    slots.append((module._parameters, attr))
        if not params:
            raise ValueError("model has no parameters that require grad")
        pieces, offset = [], 0
        for p in params:
            shape = tuple(p.shape)
            stride = [1] * len(shape)
            for k in range(len(shape) - 2, -1, -1):
                stride[k] = stride[k + 1] * shape[k + 1]
            pieces.append((shape, tuple(stride), offset))
            offset += p.numel()
        dtypes = {p.dtype for p in params}
        return cls(names, params, None if tied else slots, pieces,
                   params[0].dtype if len(dtypes) == 1 else None, watched, sizes)

    def current(self) -> bool:
        """No parameter or submodule added, removed or replaced, no ``requires_grad`` changed
        (a few microseconds; walking the modules every step cost ~30 µs of a ~2 ms step)."""
        return (all(len(table) == n for table, n in self.sizes)
                and all(table.get(attr) is x and (flag is None or x.requires_grad == flag)
                        for table, attr, x, flag in self.watched))


@dataclass(frozen=True)
class TanabeStep:
    """What one :class:`Tanabe` evaluation returns.

    Attributes
    ----------
    loss : Tensor
        Scalar ``L = f̄ + Σ nograd(λ)·g`` (Eq. 9 for the full, Eq. 10 for the reduction version).
        ``loss.backward()`` adds ``∇L`` to the parameters' ``.grad`` (:meth:`backward` does the
        same without autograd). Built on first access.
    value : Tensor
        ``L``'s value, detached.
    f : Tensor
        ``f̄``, the batch mean of the per-sample losses (detached scalar).
    g : Tensor
        Per-sample residuals ``g_ij``, ``(B, M)``, detached.
    reduced : Tensor | None
        ``g̃`` (``(M',)``) for the reduction version, else None.
    lam : Tensor
        Multipliers: ``(B, M)`` for the full version (scaled as in Eq. 9, ``λ = B·Λ`` for the
        batch coupling), ``(M',)`` for the reduction version. Detached, in ``solve_dtype``.
    info : MinresQLPInfo | None
        The MINRES-QLP report, None for the dense solver.
    grad : Tensor
        ``∇L`` flattened (the negative of Tanabe's ``Ψ``), detached.
    shard : slice or None
        Under DDP ``f``, ``reduced``, ``lam`` and ``grad`` are the global batch's and ``g`` holds
        every process's rows in rank order (and the full version's ``lam`` every sample's);
        ``shard`` is this process's rows of them. None on a process of its own.
    """

    value: Tensor
    f: Tensor
    g: Tensor
    reduced: Tensor | None
    lam: Tensor
    info: MinresQLPInfo | None
    grad: Tensor
    shard: slice | None = None
    params: tuple[Tensor, ...] = field(default=(), repr=False, compare=False)
    param_grads: tuple[Tensor, ...] = field(default=(), repr=False, compare=False)

    @functools.cached_property
    def loss(self) -> Tensor:
        """``L`` as a tensor whose ``backward()`` adds ``∇L`` to the parameters' ``.grad``
        (built when first asked for: one autograd node over every parameter)."""
        with torch.enable_grad():
            return _Carrier.apply(self.value, self.param_grads, *self.params)

    def backward(self) -> None:
        """Add ``∇L`` to the parameters' ``.grad``, as ``loss.backward()`` does, without a pass
        through the autograd engine (its fixed cost, ~0.1-0.2 ms, is a tenth of a training step
        on a network of a few hundred parameters). Where a ``.grad`` is None it becomes a view
        of :attr:`grad` (as a DDP gradient bucket's views are); the caller must not change it in
        place and expect :attr:`grad` to stay as it was."""
        with torch.no_grad():
            for p, d in zip(self.params, self.param_grads, strict=True):
                if p.grad is None:
                    p.grad = d
                else:
                    p.grad.add_(d)


def _check_int(name: str, value: Any, low: int, optional: bool = False) -> None:
    if optional and value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        prefix = "None or " if optional else ""
        raise ValueError(f"{name} must be {prefix}an int >= {low}, got {value!r}")


class Tanabe:
    """Tanabe's constrained backpropagation as a loss (Jergensen 2019, Eq. 4-6, 9-10).

    Holds the warm-start state of the multipliers. Call it with ``fn(net, *batch) -> (f, g)``,
    where ``net(*inputs)`` runs the model with the current parameters, ``f`` is the per-sample
    loss ``(B,)`` and ``g`` the per-sample constraint residuals ``(B,)`` or ``(B, M)`` (zero when
    satisfied); ``fn`` must treat samples independently (for the default full version it is also
    called on single samples, as a batch of one, under :func:`torch.func.vmap`). For the
    reduction version ``g`` may have its own number of rows
    ``(B', M)``: only ``f̄`` and ``g̃`` enter Eq. 6, so the constraint may be evaluated on other
    data than the loss. Then backpropagate the returned ``loss`` and step any optimizer::

        tanabe = Tanabe(model, version="reduction")
        for x, y in loader:
            opt.zero_grad()
            step = tanabe(fn, x, y)
            step.loss.backward()
            opt.step()

    Parameters
    ----------
    model : nn.Module
        The network; all parameters with ``requires_grad`` are the ``θ`` of the dynamics. A
        DDP model: its module, with the global batch sharded across its process group (see the
        module docstring).
    version : "full" or "reduction"
    coupling : "batch" or "sample"
        Full version only: one system over the batch, or Eq. 5's per-sample systems.
    reduction : "mse", "huber" or callable
        Reduction version: ``g̃_j = mean_i g_ij²`` (default), ``mean_i huber(g_ij, δ)`` (the
        paper's choice), or a callable ``(B, M) -> (M',)`` that is zero only where all ``g`` are.
    huber_delta : float
        ``δ`` of the Huber reduction.
    solver : "auto", "minres_qlp" or "dense"
        How the multipliers are solved; "auto" uses the dense solver up to ``dense_max`` unknowns.
    rtol, maxit : MINRES-QLP's tolerance and iteration limit.
    warm_start : bool
        Start MINRES-QLP from the previous multipliers: those of the same samples when ``index``
        is passed (a pool of ``pool_size``), else the previous step's when the shape matches.
    pool_size : int, optional
        Number of distinct samples (for warm starts by ``index`` in the full version).
    batched_params : bool
        The model takes ``G`` parameter copies (see the module docstring), so one forward and
        one backward pass give every per-sample Jacobian (full version, no ``vmap``) or ``∇f̄``
        and every ``∇g̃_j`` (reduction version; ``fn``'s residuals must then be per row of the
        batch).
    solve_dtype : torch.dtype
        Dtype of the Gram matrices and solves (default float64: ``JJᵀ`` squares the condition).
    dense_max : int
        Largest system the "auto" solver solves densely.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        version: Version = "full",
        coupling: Coupling = "batch",
        reduction: Reduction = "mse",
        huber_delta: float = 1.0,
        solver: Solver = "auto",
        rtol: float = 1e-10,
        maxit: int | None = None,
        warm_start: bool = True,
        pool_size: int | None = None,
        batched_params: bool = False,
        solve_dtype: torch.dtype = torch.float64,
        dense_max: int = 256,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise ValueError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        model, comm = unwrap(model)
        if version not in _VERSIONS:
            raise ValueError(f"version must be one of {_VERSIONS}, got {version!r}")
        if coupling not in _COUPLINGS:
            raise ValueError(f"coupling must be one of {_COUPLINGS}, got {coupling!r}")
        if not callable(reduction) and reduction not in _REDUCTIONS:
            raise ValueError(f"reduction must be one of {_REDUCTIONS} or callable, "
                             f"got {reduction!r}")
        if solver not in _SOLVERS:
            raise ValueError(f"solver must be one of {_SOLVERS}, got {solver!r}")
        if isinstance(huber_delta, bool) or not (
            isinstance(huber_delta, int | float) and 0 < huber_delta < math.inf
        ):
            raise ValueError(f"huber_delta must be a finite number > 0, got {huber_delta!r}")
        if isinstance(rtol, bool) or not (isinstance(rtol, int | float) and 0 <= rtol < 1):
            raise ValueError(f"rtol must be a number in [0, 1), got {rtol!r}")
        _check_int("maxit", maxit, 1, optional=True)
        _check_int("pool_size", pool_size, 1, optional=True)
        _check_int("dense_max", dense_max, 0)
        if solve_dtype not in (torch.float32, torch.float64):
            raise ValueError(f"solve_dtype must be torch.float32 or float64, got {solve_dtype}")
        if comm.distributed and version == "reduction" and callable(reduction):
            raise ValueError(
                "reduction=<callable> is not supported under DistributedDataParallel (DDP): "
                "the batch reduction g̃ must be the global batch's, and only 'mse' and 'huber' "
                "(batch means) can be combined from the processes' shards"
            )
        self.model = model
        self._comm = comm
        self.version = version
        self.coupling = coupling
        self.reduction = reduction
        self.huber_delta = float(huber_delta)
        self.solver = solver
        self.rtol = float(rtol)
        self.maxit = maxit
        self.warm_start = bool(warm_start)
        self.pool_size = pool_size
        self.batched_params = bool(batched_params)
        self.solve_dtype = solve_dtype
        self.dense_max = dense_max
        self._last: Tensor | None = None  # Λ of the previous step (system scaling)
        self._pool: Tensor | None = None  # Λ per pool sample, (pool_size, M)
        self._rows: int | None = None  # 1 + M of the last batched call
        self._copy_cache: tuple[int, list[Tensor], list[int], list[Tensor]] | None = None
        self._layout: _Layout | None = None  # the parameters as of the last call

    # ---- state --------------------------------------------------------------------------------

    def reset(self) -> None:
        """Forget the stored multipliers (the next solve starts from zero)."""
        self._last, self._pool = None, None

    def state_dict(self) -> dict[str, Tensor | None]:
        """The warm-start state (previous multipliers and the per-sample pool)."""
        return {"last": self._last, "pool": self._pool}

    def load_state_dict(self, state: dict[str, Tensor | None]) -> None:
        """Restore what :meth:`state_dict` returned."""
        if not isinstance(state, dict) or set(state) != {"last", "pool"}:
            raise ValueError(f"state must be a dict with keys 'last' and 'pool', got {state!r}")
        self._last, self._pool = state["last"], state["pool"]

    # ---- the step -----------------------------------------------------------------------------

    def _params(self) -> tuple[list[str], list[Tensor]]:
        """The names and tensors of the parameters that require grad, read from the model once
        and again whenever its structure changes (:class:`_Layout`)."""
        if self._layout is None or not self._layout.current():
            self._layout = _Layout.of(self.model)
        return self._layout.names, self._layout.params

    def __call__(self, fn: StepFn, *batch: Tensor, index: Tensor | None = None) -> TanabeStep:
        """Evaluate ``fn`` on ``batch``, solve for the multipliers, return the loss and stats.

        ``index`` (full version, with ``pool_size``) names the samples of the batch (integers in
        ``[0, pool_size)``) so that each one's multipliers warm-start its next solve.
        """
        if not callable(fn):
            raise ValueError(f"fn must be callable as fn(net, *batch) -> (f, g), got {fn!r}")
        if not batch or not all(isinstance(b, Tensor) for b in batch):
            raise ValueError("batch must be one or more tensors with a leading batch dimension")
        size = batch[0].shape[0] if batch[0].dim() > 0 else -1
        if size < 1 or any(b.dim() == 0 or b.shape[0] != size for b in batch):
            raise ValueError(f"batch tensors must share a leading dimension >= 1, got shapes "
                             f"{[tuple(b.shape) for b in batch]}")
        if index is not None:
            index = self._check_index(index, size)
        names, params = self._params()
        if self.version == "reduction":
            if self.batched_params:
                fbar, g, gt, J = self._reduction_batched(fn, batch, names, params)
            else:
                fbar, g, gt, J = self._reduction_autograd(fn, batch, params)
            shard = None
            if self._comm.distributed:
                fbar, g, gt, J, shard = self._share_reduction(fbar, g, gt, J, size)
            return self._reduction(fbar, g, gt, J, params, shard)
        if self.batched_params:
            f, g, Gf, Gg = self._jacobians_batched(fn, batch, names, params)
        else:
            f, g, Gf, Gg = self._jacobians_vmap(fn, batch, names, params)
        if self._comm.distributed:
            return self._full_shared(f, g, Gf, Gg, params, index)
        return self._full(f, g, Gf, Gg, params, index)

    def _check_index(self, index: Tensor, size: int) -> Tensor:
        if self.version != "full" or self.pool_size is None:
            raise ValueError("index needs version='full' and a pool_size")
        if not isinstance(index, Tensor) or index.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"index must be an integer tensor, got {index!r}")
        if index.shape != (size,):
            raise ValueError(f"index must have shape ({size},), got {tuple(index.shape)}")
        if bool((index < 0).any()) or bool((index >= self.pool_size).any()):
            raise ValueError(f"index must lie in [0, pool_size={self.pool_size})")
        return index.long()

    def _call_fn(self, fn: StepFn, net: Callable[..., Any], batch: tuple[Tensor, ...],
                 size: int, any_rows: bool = False) -> tuple[Tensor, Tensor]:
        out = fn(net, *batch)
        if not isinstance(out, tuple | list) or len(out) != 2:
            raise ValueError("fn must return a pair (f, g) of per-sample tensors")
        f, g = out
        if not isinstance(f, Tensor) or f.shape != (size,):
            raise ValueError(f"f must have shape ({size},), got "
                             f"{tuple(f.shape) if isinstance(f, Tensor) else f!r}")
        rows = g.shape[0] if any_rows and isinstance(g, Tensor) and g.dim() else size
        if not isinstance(g, Tensor) or g.dim() not in (1, 2) or g.shape[0] != rows:
            raise ValueError(f"g must have shape ({size},) or ({size}, M), got "
                             f"{tuple(g.shape) if isinstance(g, Tensor) else g!r}")
        return f, g.reshape(rows, -1)

    def _net(self, params: dict[str, Tensor]) -> Callable[..., Any]:
        buffers = dict(self.model.named_buffers())

        def net(*inputs: Any, **kwargs: Any) -> Any:
            return functional_call(self.model, (params, buffers), inputs, kwargs, strict=False)

        return net

    def _jacobians_vmap(
        self, fn: StepFn, batch: tuple[Tensor, ...], names: list[str], params: list[Tensor]
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Per-sample ``f_i, g_i`` and their gradients ``(B, N)``, ``(B, M, N)`` by vmap∘jacrev."""
        detached = {n: p.detach() for n, p in zip(names, params, strict=True)}

        def one(p: dict[str, Tensor], *sample: Tensor) -> tuple[Tensor, Tensor]:
            f, g = self._call_fn(fn, self._net(p), tuple(s.unsqueeze(0) for s in sample), 1)
            out = torch.cat([f, g[0]])
            return out, out

        jac, out = vmap(jacrev(one, has_aux=True), in_dims=(None, *([0] * len(batch))))(
            detached, *batch)
        J = _flat([jac[n] for n in names], 2)  # (B, 1 + M, N)
        return out[:, 0].detach(), out[:, 1:].detach(), J[:, 0], J[:, 1:]

    def _probe_rows(self, fn: StepFn, batch: tuple[Tensor, ...]) -> int:
        """``1 + M`` (full) or ``1 + M'`` (reduction): gradients per sample or per batch, from a
        cheap first-sample call (cached)."""
        if self._rows is None:
            with torch.no_grad():
                _, g = self._call_fn(fn, self.model, tuple(b[:1] for b in batch), 1)
                m = g.shape[1] if self.version == "full" else self._reduce(g).numel()
                self._rows = 1 + m
        return self._rows

    def _batched_call(self, fn: StepFn, batch: tuple[Tensor, ...], names: list[str],
                      params: list[Tensor], copies: int, groups: int, any_rows: bool = False
                      ) -> tuple[Tensor, Tensor, list[Tensor]]:
        """``fn`` on the batch repeated ``copies`` times with ``groups`` parameter copies."""
        size = batch[0].shape[0]
        # cat, not repeat: the same rows, 2-6x faster on small batches (measured)
        stacked = tuple(torch.cat([b] * copies) if copies > 1 else b for b in batch)
        leaves = self._copies(params, groups)
        f, g = self._call_fn(fn, self._swapped_net(names, params, leaves), stacked, copies * size,
                             any_rows)
        return f, g, leaves

    def _copies(self, params: list[Tensor], groups: int) -> list[Tensor]:
        """``groups`` copies of each parameter as leaves ``(G, *shape)`` that require grad:
        expanded views of the parameters' storage (no copy), reused from the previous call while
        the parameters and their storage are the same (in-place optimizer steps keep them)."""
        ptrs = [p.data_ptr() for p in params]
        cached = self._copy_cache
        if (cached is not None and cached[0] == groups and cached[1] is params
                and cached[2] == ptrs):
            return cached[3]
        leaves = [p.detach().unsqueeze(0).expand(groups, *p.shape).requires_grad_()
                  for p in params]
        self._copy_cache = (groups, params, ptrs, leaves)
        return leaves

    def _swapped_net(self, names: list[str], params: list[Tensor], tensors: list[Tensor]
                     ) -> Callable[..., Any]:
        """``net(*inputs)``: the model with ``tensors`` in place of the parameters ``names``.

        The same as :func:`torch.func.functional_call` (used where a parameter is shared by
        several modules), by swapping the entries of the modules' parameter tables directly,
        which costs a fraction of functional_call's bookkeeping on small models."""
        assert self._layout is not None and self._layout.names is names
        slots = self._layout.slots
        if slots is None:
            return self._net(dict(zip(names, tensors, strict=True)))
        model = self.model

        def net(*inputs: Any, **kwargs: Any) -> Any:
            saved = [table[attr] for table, attr in slots]
            try:
                for (table, attr), t in zip(slots, tensors, strict=True):
                    table[attr] = t
                return model(*inputs, **kwargs)
            finally:
                for (table, attr), t in zip(slots, saved, strict=True):
                    table[attr] = t

        return net

    def _jacobians_batched(
        self, fn: StepFn, batch: tuple[Tensor, ...], names: list[str], params: list[Tensor]
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """As :meth:`_jacobians_vmap`, from one backward pass with one parameter copy per row.

        The batch is repeated ``1 + M`` times; the first repetition's ``f`` and the ``j``-th's
        ``g_·j`` are summed, so the gradient of that sum with respect to row ``r``'s copy is one
        per-sample gradient.
        """
        size = batch[0].shape[0]
        for attempt in range(2):
            rows = self._probe_rows(fn, batch)
            with torch.enable_grad():
                f, g, leaves = self._batched_call(fn, batch, names, params, rows, rows * size)
                if g.shape[1] + 1 != rows:
                    self._rows = None  # the number of constraints changed: probe again
                    if attempt:
                        raise RuntimeError("the number of constraints changed between calls")
                    continue
                total = f[:size].sum() + sum(g[(j + 1) * size:(j + 2) * size, j].sum()
                                             for j in range(rows - 1))
                J = _flat(_grads(total, leaves, False), 1).view(rows, size, -1)
            break
        return (f[:size].detach(), g[:size].detach(), J[0], J[1:].transpose(0, 1))

    def _full(self, f: Tensor, g: Tensor, Gf: Tensor, Gg: Tensor, params: list[Tensor],
              index: Tensor | None) -> TanabeStep:
        B, M = g.shape
        dt = self.solve_dtype
        Gg64, g64 = Gg.to(dt), g.to(dt)
        x0 = self._start(B, M, index)
        if self.coupling == "batch":
            grad_f = Gf.mean(0).to(dt)
            Lam, info = tanabe_multipliers(Gg64.reshape(B * M, -1), grad_f, g64.reshape(-1),
                                           solver=self.solver, rtol=self.rtol, maxit=self.maxit,
                                           x0=x0, dense_max=self.dense_max)
            Lam = Lam.view(B, M)
            d = grad_f + Gg64.reshape(B * M, -1).mT @ Lam.reshape(-1)
            lam = B * Lam
        else:
            Gf64 = Gf.to(dt)
            lam, info = tanabe_multipliers(Gg64, Gf64, g64, solver=self.solver, rtol=self.rtol,
                                           maxit=self.maxit, x0=x0, dense_max=self.dense_max)
            Lam = lam
            d = (Gf64 + (Gg64.mT @ lam.unsqueeze(-1)).squeeze(-1)).mean(0)
        self._remember(Lam, index)
        value = f.mean() + (lam.to(g) * g).sum() / B
        return self._finish(value.detach(), d, params, f.mean().detach(), g, None, lam, info)

    def _full_shared(self, f: Tensor, g: Tensor, Gf: Tensor, Gg: Tensor, params: list[Tensor],
                     index: Tensor | None) -> TanabeStep:
        """:meth:`_full` over the global batch, this process holding the samples ``f, g`` and
        their gradients (Eq. 5 and 9 of Jergensen 2019 over all processes' samples).

        ``Λ`` is replicated as all samples' multipliers (rank order). Batch coupling:
        ``∇f̄`` is the sum of the processes' ``Σ_i ∇f_i`` over the global ``B``; the dense solver
        gathers every process's rows of ``J_G``, MINRES-QLP multiplies with
        ``J_G·J_Gᵀ·Λ = gather_r(J_r·Σ_s J_sᵀΛ_s)``. Sample coupling: each sample's system
        where it lives (MINRES-QLP on the gathered block-diagonal system, as on one process).
        """
        comm = self._comm
        size, M = g.shape
        samples = comm.rows(size)
        B = samples.total
        rows = samples.scaled(M)
        dt = self.solve_dtype
        Gg64, g64 = Gg.to(dt), g.to(dt)
        if index is not None:
            index = samples.gather(index)
        x0 = self._start(B, M, index)
        unknowns = B * M
        dense = self.solver == "dense" or (self.solver == "auto" and unknowns <= self.dense_max)
        info: MinresQLPInfo | None = None
        if self.coupling == "batch":
            sums = comm.reduce_sum(torch.cat([Gf.sum(0), f.detach().sum().reshape(1)]))
            grad_f, f_sum = (sums[:-1] / B).to(dt), sums[-1]
            J = Gg64.reshape(size * M, -1)
            if dense:
                J_all = rows.gather(J)
                Lam, _ = tanabe_multipliers(J_all, grad_f, rows.gather(g64.reshape(-1)),
                                            solver="dense")
                d = grad_f + J_all.mT @ Lam
            else:
                def op(lam: Tensor) -> Tensor:
                    return rows.gather(J @ comm.reduce_sum(J.mT @ rows.local(lam)))

                b = rows.gather(g64.reshape(-1) - J @ grad_f)
                Lam, info = _minres_warm(op, b, self.rtol, self.maxit, x0)
                d = grad_f + comm.reduce_sum(J.mT @ rows.local(Lam))
            Lam = Lam.view(B, M)
            lam = B * Lam
        else:
            Gf64 = Gf.to(dt)
            A = Gg64 @ Gg64.mT  # (size, M, M): one system per sample
            rhs = g64 - (Gg64 @ Gf64.unsqueeze(-1)).squeeze(-1)
            if dense:
                lam = samples.gather(_solve_dense(A, rhs))
            else:
                def op(lam: Tensor) -> Tensor:
                    return rows.gather((A @ rows.local(lam).view(size, M, 1)).reshape(-1))

                lam, info = _minres_warm(op, rows.gather(rhs.reshape(-1)), self.rtol,
                                         self.maxit, x0)
                lam = lam.view(B, M)
            mine = samples.local(lam)
            total = (Gf64 + (Gg64.mT @ mine.unsqueeze(-1)).squeeze(-1)).sum(0)
            sums = comm.reduce_sum(torch.cat([total, f.detach().sum().reshape(1).to(dt)]))
            d, f_sum = sums[:-1] / B, sums[-1].to(f)
            Lam = lam
        self._remember(Lam, index)
        g_all = samples.gather(g.detach())
        fbar = f_sum / B
        value = fbar + (lam.to(g) * g_all).sum() / B
        return self._finish(value.detach(), d, params, fbar.detach(), g_all, None, lam, info,
                            samples.span)

    def _share_reduction(self, fbar: Tensor, g: Tensor, gt: Tensor, J: Tensor, size: int
                         ) -> tuple[Tensor, Tensor, Tensor, Tensor, slice]:
        """The global batch's ``f̄``, ``g̃`` and ``J = (∇f̄; ∇g̃)`` from this process's (Eq. 6 and
        10 of Jergensen 2019 over all processes' samples): batch means, so the processes'
        means weighted by their numbers of loss rows (``size``) and of residual rows, in one
        all-reduce. Also every process's residuals ``g`` (rank order) and this one's rows."""
        comm = self._comm
        g_rows = comm.rows(g.shape[0])
        n_f, n_g, m = float(size), float(g_rows.count), gt.numel()
        packed = torch.cat([(n_f * fbar).reshape(1), n_g * gt, n_f * J[0],
                            (n_g * J[1:]).reshape(-1), J.new_tensor([n_f])])
        total = comm.reduce_sum(packed)
        B, B_g = total[-1], g_rows.total
        cols = J.shape[1]
        grad_f = total[1 + m:1 + m + cols] / B
        grad_g = total[1 + m + cols:-1].view(m, cols) / B_g
        J_all = torch.cat([grad_f.unsqueeze(0), grad_g])
        return total[0] / B, g_rows.gather(g), total[1:1 + m] / B_g, J_all, g_rows.span

    def _start(self, B: int, M: int, index: Tensor | None) -> Tensor | None:
        if not self.warm_start:
            return None
        if index is not None and self._pool is not None and self._pool.shape[1] == M:
            return self._pool[index]
        if index is None and self._last is not None and self._last.shape == (B, M):
            return self._last
        return None

    def _remember(self, Lam: Tensor, index: Tensor | None) -> None:
        self._last = Lam.detach().clone()
        if index is not None:
            if self._pool is None or self._pool.shape[1] != Lam.shape[1]:
                self._pool = Lam.new_zeros(self.pool_size, Lam.shape[1])
            self._pool[index] = Lam.detach()

    def _reduce(self, g: Tensor) -> Tensor:
        if callable(self.reduction):
            out = self.reduction(g)
            if not isinstance(out, Tensor) or out.dim() != 1:
                raise ValueError("reduction must return a 1-D tensor (one value per reduced "
                                 "constraint)")
            return out
        if self.reduction == "mse":
            return g.square().mean(0)
        return huber(g, self.huber_delta).mean(0)

    def _reduction_autograd(self, fn: StepFn, batch: tuple[Tensor, ...], params: list[Tensor]
                            ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """``f̄, g, g̃`` and ``J = (∇f̄; ∇g̃_1; …)`` ``(1 + M', N)`` by ``1 + M'`` backward passes
        through the batch's graph."""
        size = batch[0].shape[0]
        with torch.enable_grad():
            f, g = self._call_fn(fn, self.model, batch, size, any_rows=True)
            fbar = f.mean()
            gt = self._reduce(g)
            rows = [_flat(_grads(fbar, params, True), 0)]
            rows += [_flat(_grads(gt[j], params, j + 1 < gt.numel()), 0)
                     for j in range(gt.numel())]
        return fbar.detach(), g.detach(), gt.detach(), torch.stack(rows)

    def _reduction_batched(self, fn: StepFn, batch: tuple[Tensor, ...], names: list[str],
                           params: list[Tensor]) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """As :meth:`_reduction_autograd`, from one forward and one backward pass.

        The batch is repeated ``1 + M'`` times with one parameter copy per repetition
        (``batched_params``); ``f̄`` of the first repetition plus ``g̃_j`` of repetition
        ``j + 1`` is differentiated once, and the gradient with respect to copy ``r`` is row
        ``r`` of ``J``. ``fn``'s residuals must be per row of the batch (``(B, M)``).
        """
        size = batch[0].shape[0]
        for attempt in range(2):
            rows = self._probe_rows(fn, batch)
            with torch.enable_grad():
                f, g, leaves = self._batched_call(fn, batch, names, params, rows, rows, True)
                if g.shape[0] != rows * size:
                    raise ValueError(f"with batched_params the reduction version needs "
                                     f"residuals per row of the batch, got {g.shape[0]} rows "
                                     f"for a batch of {size}")
                blocks = g.view(rows, size, -1)
                if callable(self.reduction):
                    reduced = [self._reduce(blocks[r]) for r in range(rows)]
                    m = reduced[0].numel()
                    gt = reduced[0]
                    total_g = sum(reduced[j + 1][j] for j in range(min(m, rows - 1)))
                else:
                    per = (blocks.square() if self.reduction == "mse"
                           else huber(blocks, self.huber_delta)).mean(1)  # (rows, M)
                    m, gt = per.shape[1], per[0]
                    total_g = per[1:].diagonal().sum() if m == rows - 1 else None
                if m + 1 != rows:
                    self._rows = None  # the number of constraints changed: probe again
                    if attempt:
                        raise RuntimeError("the number of constraints changed between calls")
                    continue
                fbar = f[:size].mean()
                grads = _grads(fbar + total_g, leaves, False)
            break
        J = torch.cat([t.reshape(rows, -1) for t in grads], 1)
        return fbar.detach(), blocks[0].detach(), gt.detach(), J

    def _reduction(self, fbar: Tensor, g: Tensor, gt: Tensor, J: Tensor,
                   params: list[Tensor], shard: slice | None = None) -> TanabeStep:
        """Eq. 6 and 10 from ``J = (∇f̄; ∇g̃)``; one reduced constraint with the dense solver is
        the scalar ``λ = (g̃ − ∇g̃·∇f̄) / ‖∇g̃‖²`` (0 where ``∇g̃ = 0``), computed in
        ``solve_dtype`` without forming the general system."""
        dt = self.solve_dtype
        if gt.numel() == 1 and (self.solver == "dense"
                                or (self.solver == "auto" and self.dense_max >= 1)):
            J64 = J.to(dt)
            (c, _), (b, a) = (J64 @ J64.mT).tolist()  # ‖∇f̄‖², ∇g̃·∇f̄, ‖∇g̃‖²
            value = (float(gt) - b) / a if a > torch.finfo(dt).tiny else 0.0
            lam = torch.tensor([value], dtype=dt)
            info = None
            d = torch.add(J[0], J[1], alpha=value)
            loss = torch.add(fbar, gt[0], alpha=value)
            # |d_k| ≤ ‖∇f̄‖ + |λ|·‖∇g̃‖: a finite bound below the dtype's largest value shows d
            # finite without a pass over it (a nan or inf in J makes c or a non-finite)
            finite = math.sqrt(c) + abs(value) * math.sqrt(a) < torch.finfo(J.dtype).max
        else:
            x0 = self._last if (self.warm_start and self._last is not None
                                and self._last.shape == gt.shape) else None
            lam, info = tanabe_multipliers(J[1:].to(dt), J[0].to(dt), gt.to(dt),
                                           solver=self.solver, rtol=self.rtol,
                                           maxit=self.maxit, x0=x0, dense_max=self.dense_max)
            d = torch.addmv(J[0], J[1:].mT, lam.to(J.dtype))
            loss = fbar + (lam.to(gt) * gt).sum()
            finite = False
        self._last = lam.detach().clone()
        return self._finish(loss, d, params, fbar, g, gt, lam, info, shard, finite)

    def _finish(self, value: Tensor, d: Tensor, params: list[Tensor], fbar: Tensor, g: Tensor,
                reduced: Tensor | None, lam: Tensor, info: MinresQLPInfo | None,
                shard: slice | None = None, finite: bool = False) -> TanabeStep:
        """The step's result; ``d = ∇L`` is checked for inf/nan unless the caller has shown it
        finite (``finite``) and is handed to each parameter as a view of its piece."""
        if not finite and not bool(torch.isfinite(d).all()):
            raise RuntimeError("the Tanabe gradient is non-finite (inf or nan)")
        layout = self._layout
        assert layout is not None and layout.params is params
        flat = d if layout.dtype is None else d.to(layout.dtype)  # one conversion, not one each
        grads = tuple(flat.as_strided(shape, stride, offset) if flat.dtype == p.dtype
                      else flat[offset:offset + p.numel()].view(shape).to(p)
                      for p, (shape, stride, offset) in zip(params, layout.pieces, strict=True))
        return TanabeStep(value=value.detach(), f=fbar, g=g, reduced=reduced, lam=lam.detach(),
                          info=info, grad=d.detach(), shard=shard, params=tuple(params),
                          param_grads=grads)
