"""Active-constraint selection for data-dependent hard constraints.

The constraints of Márquez-Neila, Salzmann and Fua, "Imposing Hard Constraints on Deep Networks:
Promises and Limitations" (2017) are defined on a pool ``𝒞 = {x'_k}`` of ``N`` unlabeled inputs:
the network output on ``x'_k`` gives ``N_C`` residuals ``C_jk`` (Eq. 2). A training step only
enforces an *active* subset ``Ĉ ⊂ 𝒞`` (Section 4.4). This module chooses that subset:

* :class:`RandomActive` draws it at random, like a minibatch;
* :class:`MinedActive` keeps the most violated samples among random candidates (Eq. 9,
  "hard sample mining for constraints");
* :class:`PersistentActive` keeps a growing set of members that stay active until they have
  been satisfied for a long time. It is the remedy that the paper's conclusion (Section 7) asks
  for: with a fresh subset at every step, the method forgets the constraints it enforced before.

Every selector implements :class:`ActiveSet`: ``select(violation)`` returns the pool indices of
this step as a CPU ``LongTensor``. ``violation(indices)`` must return the residuals
``C[indices]`` (shape ``(len(indices), N_C)``, detached, at the current weights); a selector
calls it at most once per step, and only when it needs the values. ``state_dict()`` and
``load_state_dict()`` resume a run exactly, the random generator's state included.

A sample's score is Eq. 9's ``median_j |C_jk|`` (:func:`median_violation`). With
``inequality=True`` the constraints read ``C_jk ≤ 0`` and only violated residuals count: the
score is ``median_j max(C_jk, 0)``, so satisfied samples score zero and are never chosen.
"""

from __future__ import annotations

import abc
import logging
import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "ActiveSet",
    "MinedActive",
    "PersistentActive",
    "RandomActive",
    "ViolationFn",
    "median_violation",
]

logger = logging.getLogger(__name__)

#: ``violation(indices) -> C[indices]``: the residuals of those pool samples, shape
#: ``(len(indices), N_C)``, detached, at the current weights.
ViolationFn = Callable[[Tensor], Tensor]


def median_violation(C: Tensor, *, inequality: bool = False) -> Tensor:
    """Per-sample score of Eq. 9: ``median_j |C_jk|`` over the last dimension of ``C``.

    Eq. 9 of Márquez-Neila, Salzmann and Fua, "Imposing Hard Constraints on Deep Networks:
    Promises and Limitations", 2017. For an even number of residuals the median is the mean of
    the two middle values (as ``numpy.median``). With ``inequality=True`` the constraints are
    ``C ≤ 0`` and the score is ``median_j max(C_jk, 0)`` (Section 4.4: a constraint counts only
    while violated). ``C`` has shape ``(..., N_C)``; the result has shape ``(...)``.

    >>> median_violation(torch.tensor([[1.0, -3.0, 2.0], [0.0, 4.0, -1.0]]))
    tensor([2., 1.])
    >>> median_violation(torch.tensor([[1.0, -3.0, 2.0, 0.5]]), inequality=True)
    tensor([0.7500])
    """
    if not isinstance(C, Tensor):
        raise ValueError(f"C must be a torch.Tensor, got {type(C).__name__}")
    if C.dim() < 1 or C.shape[-1] < 1:
        raise ValueError(f"C must have shape (..., N_C) with N_C >= 1, got {tuple(C.shape)}")
    if not C.is_floating_point():
        raise ValueError(f"C must be a floating-point tensor, got dtype {C.dtype}")
    a = C.clamp_min(0.0) if inequality else C.abs()
    s = a.sort(dim=-1).values
    n = s.shape[-1]
    if n % 2 == 1:
        return s[..., n // 2]
    return 0.5 * (s[..., n // 2 - 1] + s[..., n // 2])


# ---- argument checks ---------------------------------------------------------------------------


def _check_int(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return value


def _check_generator(generator: Any) -> torch.Generator:
    if not isinstance(generator, torch.Generator):
        raise ValueError(f"generator must be a torch.Generator, got {type(generator).__name__}")
    if generator.device.type != "cpu":
        raise ValueError(f"generator must be a CPU torch.Generator, got device {generator.device}")
    return generator


def _random_subset(n: int, k: int, generator: torch.Generator) -> Tensor:
    """``min(k, n)`` distinct positions in ``range(n)``, uniformly at random."""
    return torch.randperm(n, generator=generator)[: min(k, n)]


def _top(scores: Tensor, k: int) -> Tensor:
    """Positions of the ``k`` largest scores, largest first; ties keep their order."""
    order = torch.sort(scores, descending=True, stable=True).indices
    return order[:k]


# ---- the interface -----------------------------------------------------------------------------


class ActiveSet(abc.ABC):
    """Chooses the active constraints ``Ĉ`` of each training step (Section 4.4 of Márquez-Neila,
    Salzmann and Fua, "Imposing Hard Constraints on Deep Networks: Promises and Limitations",
    2017).

    Subclasses implement :meth:`select`; ``state_dict``/``load_state_dict`` cover the step
    counter ``t`` and the generator, and subclasses add their own state.
    """

    def __init__(
        self, pool_size: int, *, generator: torch.Generator, inequality: bool = False
    ) -> None:
        self.pool_size = _check_int("pool_size", pool_size, 1)
        self.generator = _check_generator(generator)
        if not isinstance(inequality, bool):
            raise ValueError(f"inequality must be a bool, got {inequality!r}")
        self.inequality = inequality
        #: Number of calls to :meth:`select` so far.
        self.t = 0

    @abc.abstractmethod
    def select(self, violation: ViolationFn) -> Tensor:
        """The pool indices active at this step (a CPU ``LongTensor``)."""

    def _scores(self, violation: ViolationFn, indices: Tensor) -> Tensor:
        """Eq. 9 scores of ``indices`` on the CPU (one call to ``violation``)."""
        if indices.numel() == 0:
            return torch.zeros(0, dtype=torch.float64)
        C = violation(indices)
        if not isinstance(C, Tensor) or C.dim() != 2 or C.shape[0] != indices.numel():
            shape = tuple(C.shape) if isinstance(C, Tensor) else type(C).__name__
            raise ValueError(
                f"violation(indices) must return a tensor of shape ({indices.numel()}, N_C), "
                f"got {shape}"
            )
        return median_violation(C.detach(), inequality=self.inequality).cpu()

    def _config(self) -> dict[str, Any]:
        return {"pool_size": self.pool_size, "inequality": self.inequality}

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue identically: configuration, ``t``, generator state."""
        return {
            "config": self._config(),
            "t": self.t,
            "generator": self.generator.get_state(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`'s output; the configuration must match this selector's."""
        if state.get("config") != self._config():
            raise ValueError(
                f"state_dict config {state.get('config')!r} does not match this "
                f"{type(self).__name__}'s {self._config()!r}"
            )
        self.t = int(state["t"])
        self.generator.set_state(state["generator"])


class RandomActive(ActiveSet):
    """``k`` distinct pool indices drawn uniformly at random at every step.

    The random active constraints of Section 4.4 of Márquez-Neila, Salzmann and Fua, "Imposing
    Hard Constraints on Deep Networks: Promises and Limitations", 2017 (minibatches of 128 in
    their experiments). With ``inequality=True`` the draw is evaluated and only its violated
    samples (score > 0) are returned, so a step may return fewer than ``k`` indices.
    """

    def __init__(
        self, pool_size: int, k: int, *, generator: torch.Generator, inequality: bool = False
    ) -> None:
        super().__init__(pool_size, generator=generator, inequality=inequality)
        self.k = _check_int("k", k, 1)
        if k > pool_size:
            raise ValueError(f"k must be <= pool_size={pool_size}, got {k}")

    def _config(self) -> dict[str, Any]:
        return {**super()._config(), "k": self.k}

    def select(self, violation: ViolationFn) -> Tensor:
        """``k`` random distinct indices (only the violated ones for inequalities)."""
        idx = _random_subset(self.pool_size, self.k, self.generator)
        if self.inequality:
            idx = idx[self._scores(violation, idx) > 0]
        self.t += 1
        return idx


class MinedActive(ActiveSet):
    """Hard mining of constraints (Eq. 9): the ``k`` most violated of ``candidates`` samples.

    Eq. 9 of Márquez-Neila, Salzmann and Fua, "Imposing Hard Constraints on Deep Networks:
    Promises and Limitations", 2017: draw ``candidates`` distinct random pool indices (the whole
    pool when ``candidates >= pool_size``), score them by ``median_j |C_jk|`` and keep the ``k``
    largest, largest first (the paper keeps 16). With ``inequality=True`` only violated
    candidates (score > 0) are kept, so fewer than ``k`` may come back.
    """

    def __init__(
        self,
        pool_size: int,
        k: int,
        *,
        candidates: int,
        generator: torch.Generator,
        inequality: bool = False,
    ) -> None:
        super().__init__(pool_size, generator=generator, inequality=inequality)
        self.k = _check_int("k", k, 1)
        if k > pool_size:
            raise ValueError(f"k must be <= pool_size={pool_size}, got {k}")
        self.candidates = _check_int("candidates", candidates, 1)
        if candidates < k:
            raise ValueError(f"candidates must be >= k={k}, got {candidates}")

    def _config(self) -> dict[str, Any]:
        return {**super()._config(), "k": self.k, "candidates": self.candidates}

    def _draw_candidates(self) -> Tensor:
        if self.candidates >= self.pool_size:
            return torch.arange(self.pool_size)
        return _random_subset(self.pool_size, self.candidates, self.generator)

    def select(self, violation: ViolationFn) -> Tensor:
        """The ``k`` candidates with the largest Eq. 9 score, in decreasing score order."""
        cand = self._draw_candidates()
        scores = self._scores(violation, cand)
        top = _top(scores, self.k)
        if self.inequality:
            top = top[scores[top] > 0]
        self.t += 1
        return cand[top]


class PersistentActive(ActiveSet):
    """A pool of active constraints where a constraint once active stays active.

    The remedy proposed in Section 7 of Márquez-Neila, Salzmann and Fua, "Imposing Hard
    Constraints on Deep Networks: Promises and Limitations", 2017 (hard methods forget the
    constraints of previous steps because the active subset changes every step). Each step:

    1. ``k_new`` pool samples that are not members are added: the top ``k_new`` of
       ``candidates`` random non-members by Eq. 9's score when ``candidates`` is given, else
       ``k_new`` random non-members (fewer when fewer non-members remain; with
       ``inequality=True`` only violated ones, score > 0);
    2. every member is scored (one call to ``violation`` covers members and candidates); a
       member with score ``≤ tol`` is *satisfied* and its streak (consecutive satisfied steps)
       grows by one, otherwise its streak is reset to 0;
    3. while there are more than ``budget`` members, members are evicted: satisfied ones first,
       the longest streak first, ties the oldest member first; a violated member is evicted only
       once no satisfied member is left, the least violated first (ties oldest first).

    :meth:`select` returns all members (after eviction) in the order they were added.
    """

    def __init__(
        self,
        pool_size: int,
        k_new: int,
        budget: int,
        *,
        tol: float,
        candidates: int | None = None,
        generator: torch.Generator,
        inequality: bool = False,
    ) -> None:
        super().__init__(pool_size, generator=generator, inequality=inequality)
        self.k_new = _check_int("k_new", k_new, 1)
        if k_new > pool_size:
            raise ValueError(f"k_new must be <= pool_size={pool_size}, got {k_new}")
        self.budget = _check_int("budget", budget, 1)
        if budget < k_new:
            raise ValueError(f"budget must be >= k_new={k_new}, got {budget}")
        if isinstance(tol, bool) or not isinstance(tol, int | float) or not 0 <= tol < math.inf:
            raise ValueError(f"tol must be a finite number >= 0, got {tol!r}")
        self.tol = float(tol)
        if candidates is not None:
            _check_int("candidates", candidates, 1)
            if candidates < k_new:
                raise ValueError(f"candidates must be >= k_new={k_new}, got {candidates}")
        self.candidates = candidates
        self._members = torch.zeros(0, dtype=torch.long)
        self._added_at = torch.zeros(0, dtype=torch.long)
        self._streaks = torch.zeros(0, dtype=torch.long)
        self._scores_last = torch.zeros(0, dtype=torch.float64)
        self._evicted = torch.zeros(0, dtype=torch.long)
        self.last_added = 0
        self.last_evicted = 0
        self.total_added = 0
        self.total_evicted = 0

    # ---- read-only views -----------------------------------------------------------------------

    @property
    def members(self) -> Tensor:
        """Pool indices of the current members, in the order they were added (a copy)."""
        return self._members.clone()

    @property
    def streaks(self) -> Tensor:
        """Consecutive satisfied steps of each member, aligned with :attr:`members` (a copy)."""
        return self._streaks.clone()

    @property
    def added_at(self) -> Tensor:
        """The step ``t`` at which each member was added, aligned with :attr:`members`."""
        return self._added_at.clone()

    @property
    def member_violation(self) -> Tensor:
        """Eq. 9 score of each member at the last step, aligned with :attr:`members`."""
        return self._scores_last.clone()

    @property
    def evicted(self) -> Tensor:
        """Pool indices evicted at the last step, in eviction order."""
        return self._evicted.clone()

    # ---- one step ------------------------------------------------------------------------------

    def _draw_new(self) -> Tensor:
        """Non-members to add (random) or to score as candidates (mined)."""
        outside = torch.ones(self.pool_size, dtype=torch.bool)
        outside[self._members] = False
        non_members = outside.nonzero().flatten()
        n = self.k_new if self.candidates is None else self.candidates
        if n >= non_members.numel():
            return non_members
        return non_members[_random_subset(non_members.numel(), n, self.generator)]

    def _choose_additions(self, scores: Tensor) -> Tensor:
        """Positions among the drawn non-members that become members."""
        random = self.candidates is None
        pos = torch.arange(scores.numel()) if random else _top(scores, self.k_new)
        if self.inequality:
            pos = pos[scores[pos] > 0]
        return pos

    def _eviction_order(self) -> Tensor:
        """Member positions, first to evict first."""
        satisfied = self._scores_last <= self.tol
        key = torch.where(satisfied, -self._streaks.to(torch.float64), self._scores_last)
        order = torch.arange(self._members.numel())  # insertion order = oldest first
        order = order[torch.sort(key[order], stable=True).indices]
        return order[torch.sort((~satisfied[order]).to(torch.int8), stable=True).indices]

    def select(self, violation: ViolationFn) -> Tensor:
        """Add, score, update streaks, evict beyond ``budget``; return all members."""
        drawn = self._draw_new()
        m = self._members.numel()
        scores = self._scores(violation, torch.cat([self._members, drawn]))
        new = self._choose_additions(scores[m:])
        self._members = torch.cat([self._members, drawn[new]])
        self._added_at = torch.cat([self._added_at, torch.full((new.numel(),), self.t)])
        self._streaks = torch.cat([self._streaks, torch.zeros(new.numel(), dtype=torch.long)])
        self._scores_last = torch.cat([scores[:m], scores[m:][new]]).to(torch.float64)

        satisfied = self._scores_last <= self.tol
        self._streaks = torch.where(satisfied, self._streaks + 1, 0)

        n_evict = max(self._members.numel() - self.budget, 0)
        out = self._eviction_order()[:n_evict]
        keep = torch.ones(self._members.numel(), dtype=torch.bool)
        keep[out] = False
        self._evicted = self._members[out]
        self._members = self._members[keep]
        self._added_at = self._added_at[keep]
        self._streaks = self._streaks[keep]
        self._scores_last = self._scores_last[keep]

        self.last_added, self.last_evicted = int(new.numel()), n_evict
        self.total_added += self.last_added
        self.total_evicted += n_evict
        logger.debug(
            "PersistentActive t=%d: +%d -%d, %d members",
            self.t,
            new.numel(),
            n_evict,
            self._members.numel(),
        )
        self.t += 1
        return self._members.clone()

    # ---- resume --------------------------------------------------------------------------------

    def _config(self) -> dict[str, Any]:
        return {
            **super()._config(),
            "k_new": self.k_new,
            "budget": self.budget,
            "tol": self.tol,
            "candidates": self.candidates,
        }

    def state_dict(self) -> dict[str, Any]:
        """Configuration, ``t``, generator, members with their ages, streaks and scores, counts."""
        return {
            **super().state_dict(),
            "members": self._members.clone(),
            "added_at": self._added_at.clone(),
            "streaks": self._streaks.clone(),
            "scores": self._scores_last.clone(),
            "evicted": self._evicted.clone(),
            "counts": [self.last_added, self.last_evicted, self.total_added, self.total_evicted],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`'s output (configuration must match)."""
        members = torch.as_tensor(state["members"], dtype=torch.long)
        n = members.numel()
        arrays = {k: torch.as_tensor(state[k]) for k in ("added_at", "streaks", "scores")}
        if any(a.shape != (n,) for a in arrays.values()) or n > self.pool_size:
            raise ValueError(
                "state_dict members, added_at, streaks and scores must be 1-D of equal length "
                f"<= pool_size={self.pool_size}, got {n} members"
            )
        super().load_state_dict(state)
        self._members = members.clone()
        self._added_at = arrays["added_at"].to(torch.long).clone()
        self._streaks = arrays["streaks"].to(torch.long).clone()
        self._scores_last = arrays["scores"].to(torch.float64).clone()
        self._evicted = torch.as_tensor(state["evicted"], dtype=torch.long).clone()
        self.last_added, self.last_evicted, self.total_added, self.total_evicted = (
            int(c) for c in state["counts"]
        )
