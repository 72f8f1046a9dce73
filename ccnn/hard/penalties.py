"""Soft-penalty and Lagrangian baselines for data-dependent constraints.

Márquez-Neila, Salzmann and Fua, "Imposing Hard Constraints on Deep Networks: Promises and
Limitations" (2017) compare hard constraints with the soft penalty of Eq. 3,
``R(w) + Σ_j λ_j Σ_k C_jk(w)²``. The Lagrangian of Eq. 4, ``R(w) + Λᵀ C(w)``, replaces the
hand-set ``λ_j`` by one multiplier per constraint and per sample. This module provides

* :func:`soft_penalty`: the penalty term of Eq. 3;
* :class:`IndexedMultipliers`: the multipliers ``Λ_kj`` of a pool of ``N`` constraint samples
  with ``N_C`` residuals each, read and updated only at the active indices of a step;
* :class:`DualAscent`: the multiplier update ``Λ ← Λ + ρ_t C`` (projected onto ``Λ ≥ 0`` for
  inequality constraints ``C ≤ 0``);
* :func:`lagrangian`: Eq. 4 with ``Λ`` held fixed, optionally augmented by ``(ρ/2) Σ C²``.

Minimising :func:`lagrangian` with ``rho_aug=ρ`` over ``w`` for a few steps and then calling
:meth:`DualAscent.step` with the same ``ρ`` is the method of multipliers (augmented Lagrangian);
with ``rho_aug=0`` and a separate ``ρ_t`` it is plain dual (gradient) ascent.

The problem (residuals), the formulation (the functions here) and the multipliers (an
``nn.Module`` with a ``state_dict``) are kept apart; save the multipliers' ``state_dict`` and the
:class:`DualAscent`'s together to resume.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ccnn.hard.active import median_violation

__all__ = [
    "DualAscent",
    "DualStepInfo",
    "IndexedMultipliers",
    "lagrangian",
    "soft_penalty",
]

Schedule = Callable[[int], float]


def _check_float_tensor(name: str, x: Any) -> Tensor:
    if not isinstance(x, Tensor) or not x.is_floating_point():
        kind = x.dtype if isinstance(x, Tensor) else type(x).__name__
        raise ValueError(f"{name} must be a floating-point torch.Tensor, got {kind}")
    return x


def _check_nonneg_number(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value < math.inf:
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    return float(value)


def soft_penalty(C: Tensor, lam: float | Tensor, *, inequality: bool = False) -> Tensor:
    """The soft-constraint term of Eq. 3: ``Σ_j λ_j Σ_k C_jk²``.

    Eq. 3 of Márquez-Neila, Salzmann and Fua, "Imposing Hard Constraints on Deep Networks:
    Promises and Limitations", 2017. ``C`` has shape ``(..., N_C)`` (usually ``(K, N_C)``);
    ``lam`` is a number or a tensor of shape ``()`` or ``(N_C,)`` (one ``λ_j`` per constraint
    type, broadcast over the last dimension), all ``≥ 0``. With ``inequality=True`` the
    constraints are ``C ≤ 0`` and only violations count: ``Σ_j λ_j Σ_k max(C_jk, 0)²``.
    Returns a scalar tensor, differentiable in ``C`` (gradient ``2 λ_j C_jk``).

    >>> soft_penalty(torch.tensor([[1.0, -2.0], [3.0, 0.5]]), torch.tensor([1.0, 2.0]))
    tensor(18.5000)
    """
    _check_float_tensor("C", C)
    if C.dim() < 1:
        raise ValueError(f"C must have shape (..., N_C), got {tuple(C.shape)}")
    if isinstance(lam, Tensor):
        if lam.dim() > 1 or (lam.dim() == 1 and lam.shape[0] != C.shape[-1]):
            raise ValueError(
                f"lam must have shape () or (N_C,)=({C.shape[-1]},), got {tuple(lam.shape)}"
            )
        lam = lam.detach().to(device=C.device, dtype=C.dtype)
        if not bool(torch.all(torch.isfinite(lam) & (lam >= 0))):
            raise ValueError(f"lam must be finite and >= 0, got {lam.tolist()}")
    else:
        lam = _check_nonneg_number("lam", lam)
    r = C.clamp_min(0.0) if inequality else C
    return (lam * r.square()).sum()


class IndexedMultipliers(nn.Module):
    """Lagrange multipliers ``Λ_kj``: one per pool sample ``k`` and constraint ``j`` (Eq. 4).

    The ``Λ`` of Eq. 4 of Márquez-Neila, Salzmann and Fua, "Imposing Hard Constraints on Deep
    Networks: Promises and Limitations", 2017, stored as a buffer ``weight`` of shape
    ``(pool_size, num_constraints)``, zeros initially (a buffer, so that the primal optimiser
    never sees it; it is in :meth:`state_dict` and follows ``.to(device)``). ``forward(indices)``
    returns ``Λ[indices]`` (a copy). For inequality constraints ``C ≤ 0`` the multipliers are
    projected onto ``Λ ≥ 0`` after each update.
    """

    weight: Tensor

    def __init__(
        self,
        pool_size: int,
        num_constraints: int,
        *,
        inequality: bool = False,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        for name, value in (("pool_size", pool_size), ("num_constraints", num_constraints)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        if not dtype.is_floating_point:
            raise ValueError(f"dtype must be a floating-point dtype, got {dtype}")
        self.pool_size = pool_size
        self.num_constraints = num_constraints
        self.inequality = bool(inequality)
        self.register_buffer(
            "weight", torch.zeros(pool_size, num_constraints, dtype=dtype, device=device)
        )

    def extra_repr(self) -> str:
        return (
            f"pool_size={self.pool_size}, num_constraints={self.num_constraints}, "
            f"inequality={self.inequality}"
        )

    def _indices(self, indices: Tensor) -> Tensor:
        if not isinstance(indices, Tensor) or indices.dtype != torch.long or indices.dim() != 1:
            kind = (
                f"{indices.dtype} of shape {tuple(indices.shape)}"
                if isinstance(indices, Tensor)
                else type(indices).__name__
            )
            raise ValueError(f"indices must be a 1-D torch.long tensor, got {kind}")
        if indices.numel() and (int(indices.min()) < 0 or int(indices.max()) >= self.pool_size):
            raise ValueError(
                f"indices must lie in [0, {self.pool_size}), got min {int(indices.min())} "
                f"and max {int(indices.max())}"
            )
        return indices.to(self.weight.device)

    def forward(self, indices: Tensor) -> Tensor:
        """``Λ[indices]``, shape ``(len(indices), num_constraints)``."""
        return self.weight.index_select(0, self._indices(indices))

    @torch.no_grad()
    def add_(self, indices: Tensor, delta: Tensor) -> None:
        """``Λ[indices] += delta`` (repeated indices add up), then project for inequalities."""
        idx = self._indices(indices)
        if delta.shape != (idx.numel(), self.num_constraints):
            raise ValueError(
                f"delta must have shape ({idx.numel()}, {self.num_constraints}), "
                f"got {tuple(delta.shape)}"
            )
        self.weight.index_add_(0, idx, delta.to(self.weight))
        if self.inequality:
            self.weight[idx] = self.weight[idx].clamp_min(0.0)


@dataclass(frozen=True)
class DualStepInfo:
    """Monitoring of one :meth:`DualAscent.step`.

    ``t``: the step's index; ``rho``: ``ρ_t``; ``multiplier_norm``: ``‖Λ‖_F`` over the whole pool
    after the update; ``violation``: median of ``|C|`` (``max(C, 0)`` for inequalities) over all
    updated entries; ``max_violation``: their maximum; ``count``: number of updated samples.
    """

    t: int
    rho: float
    multiplier_norm: float
    violation: float
    max_violation: float
    count: int


class DualAscent:
    """Gradient ascent of the Lagrangian in ``Λ``: ``Λ_idx ← Λ_idx + ρ_t C_idx``.

    The multiplier update for the min-max problem of Eq. 4 of Márquez-Neila, Salzmann and Fua,
    "Imposing Hard Constraints on Deep Networks: Promises and Limitations", 2017, applied only to
    the rows ``idx`` of the active samples; for inequality multipliers it is projected,
    ``Λ_idx ← max(Λ_idx + ρ_t C_idx, 0)``. ``rho`` is a constant ``> 0`` or a schedule
    ``t -> ρ_t`` (``t = 0, 1, ...`` counts the calls to :meth:`step`). A schedule object with its
    own ``state_dict``/``load_state_dict`` is saved and restored with this one.
    """

    def __init__(self, multipliers: IndexedMultipliers, rho: float | Schedule = 1.0) -> None:
        if not isinstance(multipliers, IndexedMultipliers):
            raise ValueError(
                f"multipliers must be an IndexedMultipliers, got {type(multipliers).__name__}"
            )
        if not callable(rho):
            rho = _check_nonneg_number("rho", rho)
            if rho == 0:
                raise ValueError(f"rho must be > 0, got {rho!r}")
        self.multipliers = multipliers
        self.rho = rho
        self.t = 0
        #: The :class:`DualStepInfo` of the last step (``None`` before the first).
        self.last: DualStepInfo | None = None

    def rho_at(self, t: int) -> float:
        """``ρ_t`` (checked finite and ``≥ 0``)."""
        if not callable(self.rho):
            return self.rho
        return _check_nonneg_number(f"rho schedule at t={t}", self.rho(t))

    @torch.no_grad()
    def step(self, indices: Tensor, C: Tensor) -> DualStepInfo:
        """Update ``Λ[indices]`` with the residuals ``C`` (shape ``(len(indices), N_C)``)."""
        _check_float_tensor("C", C)
        M = self.multipliers
        if C.dim() != 2 or C.shape[1] != M.num_constraints:
            raise ValueError(
                f"C must have shape (len(indices), {M.num_constraints}), got {tuple(C.shape)}"
            )
        rho = self.rho_at(self.t)
        C = C.detach().to(M.weight)
        M.add_(indices, rho * C)
        if C.shape[0]:
            v = C.clamp_min(0.0) if M.inequality else C.abs()
            stats = torch.stack(
                [M.weight.norm(), median_violation(v.reshape(1, -1))[0], v.max()]
            ).tolist()
        else:
            stats = [float(M.weight.norm()), 0.0, 0.0]
        self.last = DualStepInfo(self.t, rho, *stats, count=int(C.shape[0]))
        self.t += 1
        return self.last

    def state_dict(self) -> dict[str, Any]:
        """``t`` and, when the schedule has one, the schedule's ``state_dict``."""
        state: dict[str, Any] = {"t": self.t}
        if hasattr(self.rho, "state_dict"):
            state["schedule"] = self.rho.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`'s output."""
        t = state.get("t")
        if isinstance(t, bool) or not isinstance(t, int) or t < 0:
            raise ValueError(f"state_dict t must be an integer >= 0, got {t!r}")
        if ("schedule" in state) != hasattr(self.rho, "load_state_dict"):
            raise ValueError("state_dict schedule state does not match this DualAscent's rho")
        self.t = t
        if "schedule" in state:
            self.rho.load_state_dict(state["schedule"])


def lagrangian(
    R: Tensor, C: Tensor, Lambda: Tensor, *, rho_aug: float = 0.0, inequality: bool = False
) -> Tensor:
    """The (augmented) Lagrangian of Eq. 4 with the multipliers held fixed.

    Eq. 4 of Márquez-Neila, Salzmann and Fua, "Imposing Hard Constraints on Deep Networks:
    Promises and Limitations", 2017: ``R + Σ Λ·C`` with ``Λ`` detached, plus ``(ρ/2) Σ C²`` when
    ``rho_aug = ρ > 0`` (method of multipliers). For inequality constraints ``C ≤ 0`` with
    ``ρ > 0`` the augmented term is the standard one for inequalities,
    ``(1/2ρ) Σ [max(Λ + ρC, 0)² − Λ²]``, which equals ``Σ Λ·C + (ρ/2) Σ C²`` where
    ``Λ + ρC > 0`` and does not depend on ``C`` elsewhere (so satisfied constraints with zero
    multiplier exert no force). ``R`` is a scalar tensor; ``C`` and ``Lambda`` have equal shapes.

    >>> lagrangian(torch.tensor(1.0), torch.tensor([[2.0, -1.0]]), torch.tensor([[0.5, 3.0]]),
    ...            rho_aug=2.0)
    tensor(4.)
    """
    _check_float_tensor("R", R)
    _check_float_tensor("C", C)
    _check_float_tensor("Lambda", Lambda)
    if R.numel() != 1:
        raise ValueError(f"R must be a scalar tensor, got shape {tuple(R.shape)}")
    if Lambda.shape != C.shape:
        raise ValueError(
            f"Lambda must have the shape of C {tuple(C.shape)}, got {tuple(Lambda.shape)}"
        )
    rho = _check_nonneg_number("rho_aug", rho_aug)
    lam = Lambda.detach().to(C)
    if rho == 0:
        return R.reshape(()) + (lam * C).sum()
    if not inequality:
        return R.reshape(()) + (lam * C).sum() + 0.5 * rho * C.square().sum()
    return R.reshape(()) + ((lam + rho * C).clamp_min(0.0).square() - lam.square()).sum() / (
        2 * rho
    )
