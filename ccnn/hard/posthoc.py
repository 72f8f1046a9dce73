"""Nonlinear projection after training: move a trained network's clone onto the constraints.

Jergensen, "Neural network optimization under PDE constraints" (2019), §"Nonlinear projection":
train the network as usual (Eq. 11), then clone it and train the clone on the constraint loss
alone,

.. code-block:: text

    L₂(θ) = Σ_j μ_j · g̃_j(θ),     g̃_j = mean_i g_ij²       (Eq. 12, μ_j = 1)

on data set aside for constraining, with its own learning rate and batch size, until the
constraint error (the mean squared residual over that data) is below a threshold. The gradient
descent approximates the nearest point ``θ⁺ = argmin_{g(θ)=0} ‖θ_k − θ‖`` and leaves the original
network untouched, so it can be repeated for other constraints ("hypothetical questions").

The paper's conclusion proposes keeping the data loss ``d(θ)`` from rising while projecting,
available as ``keep_data``:

``"penalty"``
    minimise ``L₂ + w · d`` (an augmented constraint function, as a soft constraint augments the
    loss). Stops on the same threshold; it may never reach it if ``w`` is large.
``"constraint"``
    the "reverse constrained" projection: Tanabe's dynamics (Eq. 6, reduction version) with the
    constraint loss ``L₂`` as the objective and the single inequality
    ``h(θ) = max(d(θ) − (1 + slack)·d₀, 0) = 0`` as the constraint, ``d₀`` the data loss before
    projection. While ``h = 0`` the multiplier is zero (minimum-length solution of a zero system)
    and the step is plain projection; once the data loss exceeds its bound the step is projected
    onto the tangent space of ``d`` and ``h`` decays exponentially.

Both evaluate ``d`` on a fresh batch of ``train_data`` each step.
"""

from __future__ import annotations

import copy
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor, nn

from ccnn.hard.tanabe import Tanabe

__all__ = ["Projection", "ProjectionReport", "constraint_error", "nonlinear_projection"]

logger = logging.getLogger(__name__)

KeepData = Literal["penalty", "constraint"]
Residual = Callable[..., Tensor]
_KEEP = ("penalty", "constraint")


@dataclass(frozen=True)
class ProjectionReport:
    """What :func:`nonlinear_projection` did.

    Attributes
    ----------
    converged : bool
        The constraint error fell to ``threshold`` or below.
    steps : int
        Gradient steps taken.
    threshold : float
    constraint_before, constraint_after : float
        Mean squared residual over the projection data before and after.
    data_before, data_after : float or None
        Mean data loss over ``train_data`` before and after (None without ``data_loss``).
    history : list of (step, constraint error)
        The constraint error at every check (every ``check_every`` steps, and at step 0).
    seconds : float
        Wall-clock time of the projection.
    keep_data : str or None
        The variant used.
    """

    converged: bool
    steps: int
    threshold: float
    constraint_before: float
    constraint_after: float
    data_before: float | None
    data_after: float | None
    history: list[tuple[int, float]] = field(default_factory=list)
    seconds: float = 0.0
    keep_data: str | None = None


@dataclass(frozen=True)
class Projection:
    """The projected clone and the :class:`ProjectionReport`."""

    model: nn.Module
    report: ProjectionReport


def _as_tuple(data: Tensor | Sequence[Tensor], name: str) -> tuple[Tensor, ...]:
    items = (data,) if isinstance(data, Tensor) else tuple(data)
    if not items or not all(isinstance(t, Tensor) and t.dim() >= 1 for t in items):
        raise ValueError(f"{name} must be a tensor or a sequence of tensors with a leading "
                         f"sample dimension, got {type(data).__name__}")
    n = items[0].shape[0]
    if n < 1 or any(t.shape[0] != n for t in items):
        raise ValueError(f"{name} tensors must share a leading dimension >= 1, got "
                         f"{[tuple(t.shape) for t in items]}")
    return items


@torch.no_grad()
def _mean_over(fn: Callable[..., Tensor], model: nn.Module, data: tuple[Tensor, ...],
               batch_size: int) -> float:
    n = data[0].shape[0]
    total = 0.0
    for start in range(0, n, batch_size):
        total += float(fn(model, *(t[start:start + batch_size] for t in data)).sum())
    return total / n


def constraint_error(model: nn.Module, residual: Residual, data: Tensor | Sequence[Tensor],
                     batch_size: int = 1024) -> float:
    """Mean squared residual ``mean_i Σ_j g_ij² / M`` of ``residual(model, *data)`` over ``data``.

    ``residual`` returns per-sample residuals ``(B,)`` or ``(B, M)``; the error is the mean over
    samples and constraints (the paper's "mean squared error of the constraint"). It must not
    need autograd with respect to the parameters (it runs under ``torch.no_grad``); derivatives
    with respect to the inputs by :mod:`torch.func` or Taylor mode are fine.
    """
    items = _as_tuple(data, "data")

    def per_sample(m: nn.Module, *batch: Tensor) -> Tensor:
        r = residual(m, *batch)
        return r.reshape(r.shape[0], -1).square().mean(1)

    return _mean_over(per_sample, model, items, batch_size)


def _check_positive(name: str, value: Any, integer: bool = False) -> None:
    kind = int if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kind) or not 0 < value < math.inf:
        what = "an int >= 1" if integer else "a finite number > 0"
        raise ValueError(f"{name} must be {what}, got {value!r}")


def _make_optimizer(optimizer: str | Callable, params: list[Tensor], lr: float
                    ) -> torch.optim.Optimizer:
    if callable(optimizer):
        return optimizer(params)
    if optimizer == "adam":
        return torch.optim.Adam(params, lr=lr)
    if optimizer == "sgd":
        return torch.optim.SGD(params, lr=lr)
    raise ValueError(f"optimizer must be 'adam', 'sgd' or a callable params -> Optimizer, "
                     f"got {optimizer!r}")


def nonlinear_projection(
    model: nn.Module,
    residual: Residual,
    data: Tensor | Sequence[Tensor],
    *,
    lr: float = 1e-4,
    batch_size: int = 50,
    threshold: float = 1e-3,
    max_steps: int = 10_000,
    check_every: int | None = None,
    optimizer: str | Callable[[list[Tensor]], torch.optim.Optimizer] = "adam",
    keep_data: KeepData | None = None,
    data_loss: Residual | None = None,
    train_data: Tensor | Sequence[Tensor] | None = None,
    data_batch_size: int = 100,
    data_weight: float = 1.0,
    data_slack: float = 0.0,
    generator: torch.Generator | None = None,
    callback: Callable[[int, nn.Module], None] | None = None,
) -> Projection:
    """Project a clone of ``model`` onto ``residual = 0`` by gradient descent (Jergensen, §3).

    Parameters
    ----------
    model : nn.Module
        The trained network; it is deep-copied and never modified.
    residual : callable
        ``residual(net, *batch)`` → per-sample constraint residuals ``(B,)`` or ``(B, M)``.
    data : tensor or sequence of tensors
        The projection data (leading dimension: samples), reshuffled every pass.
    lr, batch_size : the projection's own learning rate and batch size (paper: 1e-4, 50).
    threshold : float
        Stop once the mean squared residual over ``data`` is at or below this (paper: 1e-3).
    max_steps : int
        Stop after this many steps even if the threshold was not reached.
    check_every : int, optional
        Steps between evaluations of the constraint error (default: one pass over ``data``).
    optimizer : "adam", "sgd" or callable
        The projection's optimizer (Adam by default, as in training).
    keep_data : None, "penalty" or "constraint"
        Keep the data loss from rising (see the module docstring). Needs ``data_loss`` and
        ``train_data``.
    data_loss : callable
        ``data_loss(net, *batch)`` → per-sample data losses ``(B,)``, evaluated on ``train_data``.
        Without ``keep_data`` it is only measured (before and after).
    data_batch_size : int
        Batch of ``train_data`` drawn (without replacement) each step for ``keep_data``; all of
        it when it has no more samples.
    data_weight : float
        ``w`` of the penalty variant.
    data_slack : float
        The constraint variant allows the data loss to reach ``(1 + slack)·d₀``.
    generator : torch.Generator, optional
        Drives the shuffling (and the draws of ``train_data`` batches).
    callback : callable, optional
        ``callback(step, clone)`` at every check (e.g. to record predictions).

    Returns
    -------
    Projection
        ``.model`` the projected clone, ``.report`` a :class:`ProjectionReport`.
    """
    if not isinstance(model, nn.Module):
        raise ValueError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not callable(residual):
        raise ValueError(f"residual must be callable, got {residual!r}")
    items = _as_tuple(data, "data")
    _check_positive("lr", lr)
    _check_positive("batch_size", batch_size, integer=True)
    if isinstance(threshold, bool) or not isinstance(threshold, int | float) or threshold < 0:
        raise ValueError(f"threshold must be a number >= 0, got {threshold!r}")
    if isinstance(max_steps, bool) or not isinstance(max_steps, int) or max_steps < 0:
        raise ValueError(f"max_steps must be an int >= 0, got {max_steps!r}")
    n = items[0].shape[0]
    per_pass = max(1, math.ceil(n / batch_size))
    if check_every is None:
        check_every = per_pass
    _check_positive("check_every", check_every, integer=True)
    if keep_data is not None and keep_data not in _KEEP:
        raise ValueError(f"keep_data must be None, 'penalty' or 'constraint', got {keep_data!r}")
    train_items = None if train_data is None else _as_tuple(train_data, "train_data")
    if (keep_data is not None or data_loss is not None) and (data_loss is None
                                                             or train_items is None):
        raise ValueError("data_loss and train_data must be given together (and for keep_data)")
    _check_positive("data_batch_size", data_batch_size, integer=True)
    _check_positive("data_weight", data_weight)
    if isinstance(data_slack, bool) or not isinstance(data_slack, int | float) or data_slack < 0:
        raise ValueError(f"data_slack must be a number >= 0, got {data_slack!r}")

    start = time.perf_counter()
    clone = copy.deepcopy(model)
    clone.train(model.training)
    params = [p for p in clone.parameters() if p.requires_grad]
    opt = _make_optimizer(optimizer, params, lr)
    tanabe = Tanabe(clone, version="reduction", solver="dense") if keep_data == "constraint" \
        else None

    def data_value(m: nn.Module) -> float | None:
        if data_loss is None or train_items is None:
            return None
        return _mean_over(data_loss, m, train_items, 4096)

    data_before = data_value(clone)
    error = constraint_error(clone, residual, items)
    before = error
    history = [(0, error)]
    if callback is not None:
        callback(0, clone)
    bound = None if data_before is None else (1.0 + data_slack) * data_before
    steps = 0
    order = torch.randperm(n, generator=generator)
    cursor = 0
    while error > threshold and steps < max_steps:
        if cursor >= n:
            order, cursor = torch.randperm(n, generator=generator), 0
        idx = order[cursor:cursor + batch_size]
        cursor += batch_size
        batch = tuple(t[idx] for t in items)
        opt.zero_grad()
        loss = _step_loss(clone, residual, batch, keep_data, data_loss, train_items,
                          data_batch_size, data_weight, bound, tanabe, generator)
        loss.backward()
        opt.step()
        steps += 1
        if steps % check_every == 0 or steps == max_steps:
            error = constraint_error(clone, residual, items)
            history.append((steps, error))
            if callback is not None:
                callback(steps, clone)
            if not math.isfinite(error):
                logger.warning("projection diverged at step %d (constraint error %s)", steps,
                               error)
                break
    report = ProjectionReport(
        converged=error <= threshold, steps=steps, threshold=float(threshold),
        constraint_before=before, constraint_after=error, data_before=data_before,
        data_after=data_value(clone), history=history, seconds=time.perf_counter() - start,
        keep_data=keep_data)
    return Projection(model=clone, report=report)


def _step_loss(
    clone: nn.Module,
    residual: Residual,
    batch: tuple[Tensor, ...],
    keep_data: str | None,
    data_loss: Residual | None,
    train_items: tuple[Tensor, ...] | None,
    data_batch_size: int,
    data_weight: float,
    bound: float | None,
    tanabe: Tanabe | None,
    generator: torch.Generator | None,
) -> Tensor:
    """The loss whose gradient step is one projection step (Eq. 12, or a keep-data variant)."""

    def constraint_loss(net: Callable[..., Any], *b: Tensor) -> Tensor:
        r = residual(net, *b)
        return r.reshape(r.shape[0], -1).square().mean(1)

    if keep_data is None:
        return constraint_loss(clone, *batch).mean()
    assert train_items is not None and data_loss is not None
    m = train_items[0].shape[0]
    pick = torch.randperm(m, generator=generator)[:data_batch_size] if data_batch_size < m \
        else slice(None)
    tb = tuple(t[pick] for t in train_items)
    if keep_data == "penalty":
        return constraint_loss(clone, *batch).mean() + data_weight * data_loss(clone, *tb).mean()
    assert tanabe is not None and bound is not None
    cap = float(bound)

    def fn(net: Callable[..., Any], *b: Tensor) -> tuple[Tensor, Tensor]:
        return constraint_loss(net, *b), data_loss(net, *tb)

    tanabe.reduction = lambda d: torch.clamp_min(d.mean(0) - cap, 0.0)
    return tanabe(fn, *batch).loss
