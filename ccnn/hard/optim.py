"""``torch.optim``-style optimizers that impose hard constraints on a network's outputs.

Thin shells around :func:`ccnn.hard.kkt.kkt_step` (Márquez-Neila, Salzmann and Fua, "Imposing
Hard Constraints on Deep Networks: Promises and Limitations", 2017): each ``step`` solves one
KKT system at the model's current parameters and adds ``dw`` to them in place. The loss and the
constraints are functions of ``net``, a callable that evaluates the model at the trial parameters
(through :func:`torch.func.functional_call`), so that the solver can differentiate through it.

A :class:`~torch.nn.parallel.DistributedDataParallel` (DDP) model is accepted: the optimizers
work on ``model.module`` and pass the DDP model's process group to :func:`kkt_step`, which
all-reduces the gradient and the ``Jᵀ·Λ`` products and gathers the constraint rows explicitly
(``functional_call`` on the module bypasses DDP's gradient hooks). With every process calling
``step`` on its own shard of the global batch, every process takes the step one process would
take on the whole batch (docs/hard.md, "Under DDP").
"""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import partial
from typing import Any, Literal

import torch
from torch import Tensor, nn

from ccnn.hard.distributed import unwrap
from ccnn.hard.kkt import BIAS_CORRECTIONS, METRICS, KKTStep, kkt_step

__all__ = ["HardAdam", "HardGaussNewton", "HardSGD", "TargetCorrection"]

Net = Callable[..., Any]


def _call_model(model: nn.Module, params: dict[str, Tensor], *args: Any, **kwargs: Any) -> Any:
    """``model(*args, **kwargs)`` with ``params`` in place of its trainable parameters."""
    return torch.func.functional_call(model, params, args, kwargs)


def _check_positive(value: object, message: str) -> None:
    """ValueError ``message: value`` unless ``value`` is a finite real number > 0."""
    ok = not isinstance(value, bool) and isinstance(value, int | float)
    if not (ok and math.isfinite(value) and value > 0):  # type: ignore[arg-type]
        raise ValueError(f"{message}: {value!r}")


def _check_nonnegative(value: object, message: str) -> None:
    """ValueError ``message: value`` unless ``value`` is a finite real number >= 0."""
    ok = not isinstance(value, bool) and isinstance(value, int | float)
    if not (ok and math.isfinite(value) and value >= 0):  # type: ignore[arg-type]
        raise ValueError(f"{message}: {value!r}")


def _check_count(value: object, message: str) -> None:
    """ValueError ``message: value`` unless ``value`` is an int >= 0 (not a bool)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{message}: {value!r}")


def _check_share(value: object, message: str) -> None:
    """ValueError ``message: value`` unless ``value`` is a real number in (0, 1]."""
    ok = not isinstance(value, bool) and isinstance(value, int | float)
    if not (ok and 0 < value <= 1):  # type: ignore[operator]
        raise ValueError(f"{message}: {value!r}")


def _check_solver(rtol: object, maxit: object, correction: object, regularization: object
                  ) -> None:
    """The MINRES-QLP and constraint-block settings shared by the three optimizers."""
    _check_nonnegative(rtol, "Invalid rtol (must be finite and >= 0)")
    if maxit is not None:
        _check_count(maxit, "Invalid maxit (must be None or an int >= 0)")
    _check_share(correction, "Invalid correction (must be in (0, 1])")
    _check_nonnegative(regularization, "Invalid regularization (must be finite and >= 0)")


class _HardOptimizer(torch.optim.Optimizer):
    """The shared shell: the model, its trainable parameters by name, one parameter group.

    A DDP model is replaced by its module, and its process group is passed to
    :func:`kkt_step` (the batch is sharded across the group's processes)."""

    def __init__(self, model: nn.Module, defaults: dict[str, Any]) -> None:
        if not isinstance(model, nn.Module):
            raise ValueError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        model, comm = unwrap(model)
        named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
        if not named:
            raise ValueError("model has no parameters that require grad")
        self._model = model
        self._names = [name for name, _ in named]
        self._process_group = comm.group if comm.distributed else None
        super().__init__([p for _, p in named], defaults)

    def __getstate__(self) -> dict[str, Any]:
        """``torch.optim.Optimizer``'s state plus the model, so that pickling and
        ``copy.deepcopy`` keep a working optimizer (of a model on a process of its own: a
        process group does not pickle)."""
        return {**super().__getstate__(), "_model": self._model, "_names": self._names,
                "_process_group": getattr(self, "_process_group", None)}

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Only the one group made from the model is supported; a second raises ValueError."""
        if self.param_groups:
            raise ValueError(
                f"{type(self).__name__} optimizes the model's trainable parameters as one "
                "parameter group; add_param_group cannot add another"
            )
        super().add_param_group(param_group)

    @property
    def _group(self) -> dict[str, Any]:
        return self.param_groups[0]

    def _named_params(self) -> dict[str, Tensor]:
        """The optimized parameters by name (the live tensors)."""
        return dict(zip(self._names, self._group["params"], strict=True))

    def _wrap(self, fn: Callable[[Net], Tensor] | None) -> Callable[[dict], Tensor] | None:
        """``fn(net)`` as a function of the parameter dict, for :func:`kkt_step`."""
        if fn is None:
            return None
        model = self._model
        return lambda params: fn(partial(_call_model, model, params))

    def _solve(self, loss: Callable[[Net], Tensor] | None,
               constraints: Callable[[Net], Tensor] | None, inequality: bool | Tensor,
               **options: Any) -> KKTStep:
        """:func:`kkt_step` at the current parameters with this group's ``rtol``, ``maxit``,
        ``correction`` and ``regularization``."""
        group = self._group
        return kkt_step(self._named_params(), self._wrap(loss), self._wrap(constraints),
                        rtol=group["rtol"], maxit=group["maxit"], inequality=inequality,
                        correction=group.get("correction", 1.0),
                        regularization=group.get("regularization", 0.0),
                        process_group=getattr(self, "_process_group", None), **options)

    def _apply(self, result: KKTStep) -> KKTStep:
        """Add ``dw`` to the parameters in place."""
        with torch.no_grad():
            for name, p in self._named_params().items():
                p.add_(result.delta[name])
        return result


class HardSGD(_HardOptimizer):
    r"""Projected gradient descent onto the linearized hard constraints (Eq. 5).

    Each step solves, at the current parameters ``w``, with ``η = 1/lr`` and ``J = ∂C/∂w``,

    .. math::

        \begin{bmatrix} \eta I & J^\top \\ J & 0 \end{bmatrix}
        \begin{bmatrix} dw \\ \Lambda \end{bmatrix} =
        \begin{bmatrix} -\partial R/\partial w \\ -C(w) \end{bmatrix}

    (Eq. 5 of Márquez-Neila, Salzmann and Fua, "Imposing Hard Constraints on Deep Networks:
    Promises and Limitations", 2017) and sets ``w ← w + dw``: a gradient step of length ``lr``
    projected onto the linearized constraints, which are also pulled to zero. It solves the
    equivalent reduced system ``(J Jᵀ/η)Λ = C − J g/η`` by MINRES-QLP, whose minimum-length
    answer keeps the step finite when constraints are duplicated or contradictory.

    Args:
        model: the network; its parameters that require grad are optimized (one group). A DDP
            model: its module, each process stepping on its shard (see the module docstring).
        lr: learning rate, ``1/η`` (default 1e-2), > 0.
        rtol: MINRES-QLP's relative tolerance (default 1e-6).
        maxit: MINRES-QLP's iteration limit (default None: 4× the system size).
        correction, regularization: ``α`` and ``μ`` of :func:`~ccnn.hard.kkt.kkt_step` (the
            share of ``C`` removed per step, default 1; the block ``−μI``, default 0: the
            paper's system).

    ``step(loss, constraints=None, *, inequality=False)`` takes ``loss(net) -> scalar`` and
    ``constraints(net) -> Tensor`` (any shape), where ``net(*args)`` evaluates the model at the
    trial parameters; ``inequality`` is as in :func:`~ccnn.hard.kkt.kkt_step`. It returns the
    :class:`~ccnn.hard.kkt.KKTStep` after adding its ``delta`` to the parameters.

    Example:
        Fit a linear model while its two outputs sum to 1 at four points; the constraints are
        linear in the parameters, so one step satisfies them:

        >>> import torch
        >>> from torch import nn
        >>> from torch.nn import functional as F
        >>> g = torch.Generator().manual_seed(0)
        >>> x, y, xc = (torch.randn(n, k, generator=g) for n, k in ((8, 3), (8, 2), (4, 3)))
        >>> model = nn.Linear(3, 2)
        >>> opt = HardSGD(model, lr=0.1)
        >>> def loss(net):
        ...     return F.mse_loss(net(x), y)
        >>> def constraints(net):
        ...     return net(xc).sum(dim=1) - 1
        >>> result = opt.step(loss, constraints)
        >>> bool(constraints(model).abs().max() < 1e-4)
        True
    """

    def __init__(
        self, model: nn.Module, lr: float = 1e-2, *, rtol: float = 1e-6, maxit: int | None = None,
        correction: float = 1.0, regularization: float = 0.0,
    ) -> None:
        _check_positive(lr, "Invalid learning rate")
        _check_solver(rtol, maxit, correction, regularization)
        super().__init__(model, {"lr": lr, "rtol": rtol, "maxit": maxit,
                                 "correction": correction, "regularization": regularization})

    def step(  # type: ignore[override]
        self,
        loss: Callable[[Net], Tensor],
        constraints: Callable[[Net], Tensor] | None = None,
        *,
        inequality: bool | Tensor = False,
    ) -> KKTStep:
        """One KKT step (Eq. 5); returns the :class:`~ccnn.hard.kkt.KKTStep`."""
        result = self._solve(loss, constraints, inequality, eta=1.0 / self._group["lr"],
                             method="sgd")
        return self._apply(result)


class HardAdam(_HardOptimizer):
    r"""Constrained Adam (Eq. 10-12): Adam's moments, projected onto the linearized constraints.

    Each step updates, with the gradient ``∂R/∂w`` at the current ``w``,
    ``m ← β₁m + (1 − β₁)∂R/∂w`` and ``v ← β₂v + (1 − β₂)(∂R/∂w)²`` (Eq. 10-11), then solves

    .. math::

        \begin{bmatrix} D & J^\top \\ J & 0 \end{bmatrix}
        \begin{bmatrix} dw \\ \Lambda \end{bmatrix} =
        \begin{bmatrix} -m \\ -C(w) \end{bmatrix}, \qquad
        f = \frac{\sqrt{1 - \beta_2^{t+1}}}{1 - \beta_1^{t+1}}, \quad \eta = 1/\mathrm{lr},

    and sets ``w ← w + dw`` (Márquez-Neila, Salzmann and Fua, "Imposing Hard Constraints on Deep
    Networks: Promises and Limitations", 2017, §4.5). With ``bias_correction="eq12"`` (default)
    ``D = η f diag(√v + ε)`` as Eq. 12 is printed; its unconstrained step is Adam's divided by
    ``f²`` (e.g. ``10×`` Adam's at the first step with the default betas), because Adam's bias
    correction multiplies the step by ``f``. With ``bias_correction="adam"``
    ``D = (η/f) diag(√v + ε√(1 − β₂^{t+1}))`` and the unconstrained step is exactly
    ``torch.optim.Adam``'s with the same ``lr``. With ``metric="euclidean"`` the diagonal shapes
    the data step only: the step is the one nearest to that unconstrained step (in ‖·‖₂) that
    meets the linearized constraints, Eq. 5's system with Adam's step as its gradient (not in
    the paper; :func:`~ccnn.hard.kkt.kkt_step`). The state (``exp_avg`` = m, ``exp_avg_sq`` = v,
    ``step`` = t) lives in ``self.state[p]`` as in ``torch.optim.Adam``, so ``state_dict()`` and
    ``load_state_dict()`` resume exactly.

    Args:
        model: the network; its parameters that require grad are optimized (one group). A DDP
            model: its module, each process stepping on its shard (see the module docstring).
        lr: learning rate, ``1/η`` (default 1e-3), > 0.
        betas: ``(β₁, β₂)``, each in [0, 1) (default (0.9, 0.999)).
        eps: ``ε`` > 0 (default 1e-8).
        bias_correction: ``"eq12"`` (default) or ``"adam"``, as above.
        metric: ``"diagonal"`` (default, Eq. 12) or ``"euclidean"``, as above.
        rtol: MINRES-QLP's relative tolerance (default 1e-6).
        maxit: MINRES-QLP's iteration limit (default None: 4× the system size).
        correction, regularization: ``α`` and ``μ`` of :func:`~ccnn.hard.kkt.kkt_step` (the
            share of ``C`` removed per step, default 1; the block ``−μI``, default 0: the
            paper's system).

    ``step(loss, constraints=None, *, inequality=False)`` is as for :class:`HardSGD`.

    Example:
        Without constraints and with ``bias_correction="adam"`` the step is Adam's:

        >>> import torch
        >>> from torch import nn
        >>> model, twin = nn.Linear(3, 1), nn.Linear(3, 1)
        >>> _ = twin.load_state_dict(model.state_dict())
        >>> x = torch.ones(4, 3)
        >>> opt = HardAdam(model, lr=0.1, bias_correction="adam")
        >>> adam = torch.optim.Adam(twin.parameters(), lr=0.1)
        >>> result = opt.step(lambda net: net(x).pow(2).mean())
        >>> twin(x).pow(2).mean().backward(); adam.step()
        >>> torch.allclose(model.weight, twin.weight, atol=1e-6)
        True
    """

    def __init__(
        self,
        model: nn.Module,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        *,
        bias_correction: Literal["eq12", "adam"] = "eq12",
        metric: Literal["diagonal", "euclidean"] = "diagonal",
        rtol: float = 1e-6,
        maxit: int | None = None,
        correction: float = 1.0,
        regularization: float = 0.0,
    ) -> None:
        _check_positive(lr, "Invalid learning rate")
        if not (isinstance(betas, tuple | list) and len(betas) == 2):
            raise ValueError(f"Invalid betas (must be a pair): {betas!r}")
        for i, beta in enumerate(betas):
            if isinstance(beta, bool) or not isinstance(beta, int | float) or not 0 <= beta < 1:
                raise ValueError(f"Invalid beta parameter at index {i}: {beta!r}")
        _check_positive(eps, "Invalid epsilon value")
        for name, value, allowed in (("bias_correction", bias_correction, BIAS_CORRECTIONS),
                                     ("metric", metric, METRICS)):
            if value not in allowed:
                raise ValueError(f"Invalid {name} (must be {' or '.join(map(repr, allowed))}): "
                                 f"{value!r}")
        _check_solver(rtol, maxit, correction, regularization)
        defaults = {
            "lr": lr,
            "betas": tuple(betas),
            "eps": eps,
            "bias_correction": bias_correction,
            "metric": metric,
            "rtol": rtol,
            "maxit": maxit,
            "correction": correction,
            "regularization": regularization,
        }
        super().__init__(model, defaults)

    def _kkt_state(self) -> dict[str, Any]:
        """``self.state`` as :func:`kkt_step`'s ``state`` dict (empty before the first step)."""
        named = self._named_params()
        if not all(self.state[p] for p in named.values()):
            return {}
        states = {name: self.state[p] for name, p in named.items()}
        return {
            "m": {name: st["exp_avg"] for name, st in states.items()},
            "v": {name: st["exp_avg_sq"] for name, st in states.items()},
            "t": int(states[self._names[0]]["step"]),
        }

    def step(  # type: ignore[override]
        self,
        loss: Callable[[Net], Tensor],
        constraints: Callable[[Net], Tensor] | None = None,
        *,
        inequality: bool | Tensor = False,
    ) -> KKTStep:
        """One constrained Adam step (Eq. 10-12); returns the :class:`~ccnn.hard.kkt.KKTStep`."""
        group = self._group
        state = self._kkt_state()
        result = self._solve(loss, constraints, inequality, eta=1.0 / group["lr"],
                             method="adam", state=state, betas=group["betas"],
                             eps=group["eps"], bias_correction=group["bias_correction"],
                             metric=group.get("metric", "diagonal"))
        for name, p in self._named_params().items():
            self.state[p] = {
                "step": state["t"],
                "exp_avg": state["m"][name],
                "exp_avg_sq": state["v"][name],
            }
        return self._apply(result)


class HardGaussNewton(_HardOptimizer):
    r"""Constrained Gauss-Newton / Levenberg-Marquardt (Eq. 6) for ``R = ½‖r‖²``.

    Each step solves, with ``Jᵣ = ∂r/∂w``, ``J = ∂C/∂w`` at the current ``w`` and
    ``η = damping``,

    .. math::

        \begin{bmatrix} J_r^\top J_r + \eta I & J^\top \\ J & 0 \end{bmatrix}
        \begin{bmatrix} dw \\ \Lambda \end{bmatrix} =
        \begin{bmatrix} -J_r^\top r(w) \\ -C(w) \end{bmatrix}

    matrix-free with the products of Algorithm 2 (Márquez-Neila, Salzmann and Fua, "Imposing
    Hard Constraints on Deep Networks: Promises and Limitations", 2017) and MINRES-QLP, and sets
    ``w ← w + dw``.

    Args:
        model: the network; its parameters that require grad are optimized (one group). A DDP
            model: its module, each process stepping on its shard (see the module docstring).
        damping: ``η`` > 0 (default 1.0).
        rtol: MINRES-QLP's relative tolerance (default 1e-6).
        maxit: MINRES-QLP's iteration limit (default None: 4× the system size).
        correction, regularization: ``α`` and ``μ`` of :func:`~ccnn.hard.kkt.kkt_step` (the
            share of ``C`` removed per step, default 1; the block ``−μI``, default 0: the
            paper's system).

    ``step(residuals, constraints=None, *, loss=None, inequality=False)`` takes
    ``residuals(net) -> Tensor`` (``r``, any shape) and optionally ``loss(net)``, evaluated only
    to report ``loss_value`` (default ``½‖r‖²``).

    Example:
        A linear least-squares fit under a linear constraint is solved in one step when the
        damping is small:

        >>> import torch
        >>> from torch import nn
        >>> g = torch.Generator().manual_seed(0)
        >>> x = torch.randn(10, 2, generator=g, dtype=torch.float64)
        >>> y = torch.randn(10, 1, generator=g, dtype=torch.float64)
        >>> model = nn.Linear(2, 1).double()
        >>> opt = HardGaussNewton(model, damping=1e-12, rtol=1e-12)
        >>> origin = torch.zeros(1, 2, dtype=torch.float64)
        >>> result = opt.step(lambda net: net(x) - y, lambda net: net(origin))  # 0 at the origin
        >>> abs(model.bias.item()) < 1e-10
        True
    """

    def __init__(
        self,
        model: nn.Module,
        damping: float = 1.0,
        *,
        rtol: float = 1e-6,
        maxit: int | None = None,
        correction: float = 1.0,
        regularization: float = 0.0,
    ) -> None:
        _check_positive(damping, "Invalid damping")
        _check_solver(rtol, maxit, correction, regularization)
        super().__init__(model, {"damping": damping, "rtol": rtol, "maxit": maxit,
                                 "correction": correction, "regularization": regularization})

    def step(  # type: ignore[override]
        self,
        residuals: Callable[[Net], Tensor],
        constraints: Callable[[Net], Tensor] | None = None,
        *,
        loss: Callable[[Net], Tensor] | None = None,
        inequality: bool | Tensor = False,
    ) -> KKTStep:
        """One constrained Gauss-Newton step (Eq. 6); returns the :class:`KKTStep`."""
        result = self._solve(loss, constraints, inequality, eta=self._group["damping"],
                             method="gauss-newton", residuals=self._wrap(residuals))
        return self._apply(result)


class TargetCorrection:
    """The correction ``α`` of a hard optimizer, switched by a measured violation.

    Like :class:`torch.optim.lr_scheduler.ReduceLROnPlateau`, a schedule driven by a number the
    caller measures after each step — here the constraint violation on inputs the steps did not
    use (e.g. the median ``|C|`` of a held-out set). While it is above ``target`` each group
    keeps the ``correction`` it had when this object was made (``high``); once it is at or
    below, the groups take ``low``, so that the steps that follow remove a smaller share of the
    linearized violation and spend less of the loss on constraints already met; should the
    violation rise above the target again, ``high`` returns. On the pose experiment of
    Márquez-Neila, Salzmann and Fua (2017, §5) the persistent pool's steps kept raising the
    test error after the held-out violation was already far below the soft baseline's
    (docs/hard_experiments.md); this lets a run stop paying once the violation it asked for is
    reached.

    With ``warmup`` W, the ``k``-th call (from 0; one before each optimizer step) caps every
    group's ``α`` at ``high·(k + 1)/W``: the first steps, where the violation and so the
    correction is largest, remove a share that rises linearly to ``high`` (like a learning-rate
    warm-up), and from the ``W``-th step on the switch alone sets it.

    Args:
        optimizer: a :class:`HardSGD`, :class:`HardAdam` or :class:`HardGaussNewton`.
        target: the violation to reach (> 0); with ``relative`` a share of the first
            violation given to :meth:`step`; None: never switched (only the warm-up).
        low: ``α`` in ``(0, 1]`` once the target is reached.
        relative: read ``target`` as a share of the first measured violation.
        warmup: steps over which ``α`` rises to ``high`` (0 or 1: none).

    >>> import torch
    >>> opt = HardSGD(torch.nn.Linear(2, 1), lr=0.1, correction=0.5)
    >>> switch = TargetCorrection(opt, 0.1, low=0.1, relative=True)
    >>> [switch.step(v) for v in (2.0, 0.5, 0.15, 0.3)]
    [0.5, 0.5, 0.1, 0.5]
    >>> switch = TargetCorrection(HardSGD(torch.nn.Linear(2, 1), correction=0.5), None,
    ...                           low=0.1, warmup=4)
    >>> [switch.step(v) for v in (2.0, 1.0, 0.5, 0.2, 0.1)]
    [0.125, 0.25, 0.375, 0.5, 0.5]
    """

    def __init__(self, optimizer: torch.optim.Optimizer, target: float | None, *, low: float,
                 relative: bool = False, warmup: int = 0) -> None:
        if not isinstance(optimizer, _HardOptimizer):
            raise ValueError(f"optimizer must be HardSGD, HardAdam or HardGaussNewton, got "
                             f"{type(optimizer).__name__}")
        if target is not None:
            _check_positive(target, "Invalid target (must be None, or finite and > 0)")
        _check_share(low, "Invalid low (must be in (0, 1])")
        _check_count(warmup, "Invalid warmup (must be an int >= 0)")
        self.optimizer, self.target, self.low, self.relative = optimizer, target, low, relative
        self.warmup, self.calls = warmup, 0
        self.high = [group["correction"] for group in optimizer.param_groups]
        self.threshold: float | None = None if relative else target

    def step(self, violation: float) -> float:
        """Set every group's ``correction`` for the next optimizer step from ``violation``
        (finite, ≥ 0) and return the first group's."""
        _check_nonnegative(violation, "Invalid violation (must be finite and >= 0)")
        if self.threshold is None and self.target is not None:
            self.threshold = self.target * violation
        reached = self.threshold is not None and violation <= self.threshold
        ramp = min(1.0, (self.calls + 1) / self.warmup) if self.warmup else 1.0
        self.calls += 1
        for group, high in zip(self.optimizer.param_groups, self.high, strict=True):
            group["correction"] = min(self.low if reached else high, high * ramp)
        return self.optimizer.param_groups[0]["correction"]

    def state_dict(self) -> dict[str, Any]:
        """The settings, the threshold in absolute units (None before a relative target's
        first violation) and the calls so far (the warm-up's position)."""
        return {"target": self.target, "low": self.low, "relative": self.relative,
                "high": list(self.high), "threshold": self.threshold, "warmup": self.warmup,
                "calls": self.calls}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned (one written before the warm-up existed
        resumes without one)."""
        for key in ("target", "low", "relative", "high", "threshold"):
            setattr(self, key, state_dict[key])
        self.warmup, self.calls = state_dict.get("warmup", 0), state_dict.get("calls", 0)
