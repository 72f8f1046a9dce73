"""Constraints by reparameterization, for ``torch.nn.utils.parametrize``.

Instead of projecting a constrained weight ``w`` after each step, write ``w = f(θ)`` with ``f``
mapping all of ``ℝⁿ`` into the constraint set and optimize the unconstrained ``θ``:

* :class:`Positive`: ``w = exp(θ)`` or ``w = softplus(θ)`` (``w > 0``);
* :class:`Box`: ``w = lower + (upper − lower)·σ(θ)`` (``lower < w < upper``);
* :class:`Simplex`: ``w = softmax(θ)`` along ``dim`` (``w > 0``, ``Σ w = 1``).

Each module has a ``right_inverse``, so that
``torch.nn.utils.parametrize.register_parametrization(module, "weight", P())`` keeps the
current value of ``module.weight`` (it must lie in the closed set, else ``ValueError``).

Boundary behaviour: ``f`` reaches only the *interior* of the set. A value on the boundary
(``w = 0`` for :class:`Positive` and :class:`Simplex`, ``w = lower`` or ``upper`` for
:class:`Box`) is first moved inside by the smallest amount the dtype allows (to
``finfo.tiny`` for ``exp``/``softplus``/``softmax``, to a relative ``finfo.eps`` of the box
width for the sigmoid), so the round trip ``f(right_inverse(w))`` differs from ``w`` by about
that much, and ``θ`` is then very large in magnitude: the gradient wrt ``θ`` of such an entry is
≈ 0 and it barely moves. Start strictly inside the set where the optimizer should be free.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["Box", "Positive", "Simplex"]


def _check_weight(w: Tensor, name: str) -> None:
    if not isinstance(w, Tensor) or not w.is_floating_point():
        kind = w.dtype if isinstance(w, Tensor) else type(w).__name__
        raise ValueError(f"{name}: the value must be a floating-point tensor, got {kind}")
    if not bool(torch.isfinite(w).all()):
        raise ValueError(f"{name}: the value must be finite, got NaN/inf entries")


class Positive(nn.Module):
    """``w = exp(θ)`` (``kind="exp"``) or ``w = softplus(θ) = log(1 + e^θ)`` (``"softplus"``).

    ``right_inverse``: ``θ = log w`` or ``θ = w + log(1 − e^{−w})`` (the softplus inverse, in a
    stable form); requires ``w ≥ 0`` (zeros are moved to ``finfo.tiny``, see the module notes).
    ``exp`` makes steps in ``θ`` multiplicative in ``w``; ``softplus`` is ≈ linear for large
    ``w``.

    >>> p = Positive("softplus")
    >>> p(p.right_inverse(torch.tensor([0.5, 2.0], dtype=torch.float64)))
    tensor([0.5000, 2.0000], dtype=torch.float64)
    """

    def __init__(self, kind: str = "exp") -> None:
        super().__init__()
        if kind not in ("exp", "softplus"):
            raise ValueError(f"kind must be 'exp' or 'softplus', got {kind!r}")
        self.kind = kind

    def extra_repr(self) -> str:
        return f"kind={self.kind!r}"

    def forward(self, theta: Tensor) -> Tensor:
        return torch.exp(theta) if self.kind == "exp" else F.softplus(theta)

    def right_inverse(self, w: Tensor) -> Tensor:
        _check_weight(w, "Positive")
        if bool((w < 0).any()):
            raise ValueError(f"Positive: the value must be >= 0, got min {w.min().item():.6g}")
        w = w.clamp_min(torch.finfo(w.dtype).tiny)
        if self.kind == "exp":
            return torch.log(w)
        return w + torch.log(-torch.expm1(-w))


class Box(nn.Module):
    """``w = lower + (upper − lower)·σ(θ)``, the box ``lower < w < upper``.

    ``lower``/``upper``: finite numbers or tensors broadcastable to the weight, ``lower < upper``
    everywhere (stored as buffers, so they follow ``.to(device)``). ``right_inverse``:
    ``θ = logit((w − lower)/(upper − lower))``; requires ``lower ≤ w ≤ upper`` (boundary values
    are moved inside by a relative ``finfo.eps``, see the module notes).

    >>> b = Box(-1.0, 2.0)
    >>> b(b.right_inverse(torch.tensor([-0.5, 1.5], dtype=torch.float64)))
    tensor([-0.5000,  1.5000], dtype=torch.float64)
    """

    lower: Tensor
    upper: Tensor

    def __init__(self, lower: float | Tensor, upper: float | Tensor) -> None:
        super().__init__()
        lo, hi = torch.as_tensor(lower), torch.as_tensor(upper)
        dtype = torch.promote_types(lo.dtype, hi.dtype)
        if not dtype.is_floating_point:
            dtype = torch.get_default_dtype()
        lo, hi = lo.to(dtype), hi.to(dtype)
        if not bool(torch.isfinite(lo).all() & torch.isfinite(hi).all()):
            raise ValueError("lower and upper must be finite")
        try:
            torch.broadcast_shapes(lo.shape, hi.shape)
        except RuntimeError as err:
            raise ValueError(
                f"lower {tuple(lo.shape)} and upper {tuple(hi.shape)} do not broadcast"
            ) from err
        if not bool((lo < hi).all()):
            raise ValueError(
                f"lower must be < upper everywhere, got lower={lo.tolist()}, upper={hi.tolist()}"
            )
        self.register_buffer("lower", lo)
        self.register_buffer("upper", hi)

    def forward(self, theta: Tensor) -> Tensor:
        lo, hi = self.lower.to(theta), self.upper.to(theta)
        return lo + (hi - lo) * torch.sigmoid(theta)

    def right_inverse(self, w: Tensor) -> Tensor:
        _check_weight(w, "Box")
        lo, hi = self.lower.to(w), self.upper.to(w)
        if bool(((w < lo) | (w > hi)).any()):
            raise ValueError(
                f"Box: the value must lie in [lower, upper], got min {w.min().item():.6g} and "
                f"max {w.max().item():.6g}"
            )
        eps = torch.finfo(w.dtype).eps
        s = ((w - lo) / (hi - lo)).clamp(eps, 1.0 - eps)
        return torch.logit(s)


class Simplex(nn.Module):
    """``w = softmax(θ)`` along ``dim``: ``w > 0`` with ``Σ w = 1`` along ``dim``.

    ``right_inverse``: ``θ = log w`` (``softmax`` is invariant to adding a constant, so this is
    one preimage); requires ``w ≥ 0`` and ``|Σ w − 1| ≤ √eps · n`` along ``dim`` (zeros are moved
    to ``finfo.tiny``, see the module notes).

    >>> s = Simplex()
    >>> s(s.right_inverse(torch.tensor([0.2, 0.3, 0.5], dtype=torch.float64)))
    tensor([0.2000, 0.3000, 0.5000], dtype=torch.float64)
    """

    def __init__(self, dim: int = -1) -> None:
        super().__init__()
        if isinstance(dim, bool) or not isinstance(dim, int):
            raise ValueError(f"dim must be an integer, got {dim!r}")
        self.dim = dim

    def extra_repr(self) -> str:
        return f"dim={self.dim}"

    def forward(self, theta: Tensor) -> Tensor:
        return torch.softmax(theta, dim=self.dim)

    def right_inverse(self, w: Tensor) -> Tensor:
        _check_weight(w, "Simplex")
        if bool((w < 0).any()):
            raise ValueError(f"Simplex: the value must be >= 0, got min {w.min().item():.6g}")
        n = w.shape[self.dim] if w.dim() else 1
        dev = (w.sum(dim=self.dim) - 1.0).abs().max().item()
        tol = math.sqrt(torch.finfo(w.dtype).eps) * n
        if dev > tol:
            raise ValueError(
                f"Simplex: the value must sum to 1 along dim={self.dim}, got a deviation of "
                f"{dev:.3e} (> {tol:.1e})"
            )
        return torch.log(w.clamp_min(torch.finfo(w.dtype).tiny))
