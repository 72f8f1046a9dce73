"""CCNN's P-step: the latent distribution closest in KL to the network's output under constraints.

For each image, with Q = softmax(logits) over L classes at N pixels, :func:`solve_latent` solves
(Pathak et al. 2015, Eq. 4–5)::

    minimise    (1/N)·Σ_i KL(P_i ‖ Q_i) + Σ_k β_k·(ξlo_k + ξhi_k)
    over        P_i in the simplex, ξ ≥ 0
    subject to  lower_k − ξlo_k ≤ m_k(P) ≤ upper_k + ξhi_k,

where ``m_k(P)`` is the fraction of the image (or of a weighted region) that P gives to the class
of constraint k.  Classes with ``upper = 0`` are suppressed exactly: P is zero on them.

It works on the dual (Eq. 3), one multiplier per constraint: ``λ = μ − ν`` with μ (lower bound)
and ν (upper bound) in ``[0, β]`` (Eq. 5: the slack caps the multipliers).  With
``P_i(l) ∝ Q_i(l)·exp(s_il(λ))`` the dual to minimise is::

    F(λ) = (1/N)·Σ_i log Σ_l Q_i(l)·exp(s_il(λ)) − Σ_k (lower_k·λ_k⁺ − upper_k·λ_k⁻),  |λ_k| ≤ β_k,

whose smooth part has gradient ``m(P)`` and Hessian the covariance of the constraint rows under
P.  Two methods minimise it, batched over images with different constraint sets:

* ``"newton"`` (default): a projected Newton method on the piecewise-smooth dual — free
  multipliers take a Levenberg–Marquardt-damped Newton step, those held at 0 or ±β stay, and an
  Armijo search along the projected arc keeps every step a descent step.  For whole-image bounds
  the dual factorises (``s_il = λ_l``), so after one exponential pass each evaluation is a matrix
  product over the present classes only.
* ``"pgd"``: CCNN's own rule, projected gradient on (μ, ν) with an adaptive step (start 1e5,
  ×1.1 after a decrease, ×0.5 after a rejection, stop below 1e-8; both in the original code's
  sum-normalised units), evaluating the dual as CCNN's code does — a log-sum-exp over the present
  classes at every pixel and step — kept as the faithful baseline.

Images leave the working batch as they converge (once a quarter of it has), so each costs about
its own iterations.  Both stop when the natural KKT residual ``‖λ − prox(λ − ∇)‖∞`` is at most
``tol``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from ccnn.constraints import RegionConstraints, bound_violation, broadcast_bounds

__all__ = ["METHODS", "LatentResult", "latent_objective", "solve_latent"]

Method = Literal["newton", "pgd"]
METHODS: tuple[str, ...] = ("newton", "pgd")
Evaluation = Literal["auto", "factored", "direct"]
EVALUATIONS: tuple[str, ...] = ("auto", "factored", "direct")

_DTYPE = torch.float64  # working precision of the dual, whatever the logits' dtype
# |λ| bound used while iterating on hard constraints, beyond the image's logit spread (the most
# any multiplier needs to move mass between two classes at one pixel).
_LAMBDA_CAP = 300.0
# Largest logit spread the factored evaluation takes: its multipliers then stay within ±(300 +
# 300), so exp(λ_l − max λ) cannot underflow in fp64 (e^-745); wider spreads use the direct one.
_FACTORED_SPREAD = 300.0
_MAX_STEP = 30.0  # largest change of one multiplier in a Newton step (nats)
_DAMPING = 1e-2  # Levenberg–Marquardt damping: δ = _DAMPING·‖g_free‖∞
_ARMIJO = 1e-4
_MAX_BACKTRACK = 40
_EPS_ACTIVE = 1e-3  # largest width of the ε-active set of Bertsekas' projected Newton method
_PGD_STEP0, _PGD_MIN_STEP = 1e5, 1e-8  # CCNN's step rule, in its sum-normalised units


@dataclass
class LatentResult:
    """What :func:`solve_latent` returns.

    Attributes:
        P: ``(B, L, H, W)`` latent distribution, in the logits' dtype and device.
        multipliers: ``(B, L)`` dual variables ``λ = μ − ν`` of the class bounds, in the
            mean-normalised units of the module docstring (``-inf`` on suppressed classes).
        iterations: ``(B,)`` iterations taken per image.
        converged: ``(B,)`` whether the KKT residual reached ``tol``.
        violation: ``(B, L)`` what remains of each class bound:
            ``max(lower − m, 0) + max(m − upper, 0)`` with ``m`` the class fractions of ``P``.
        residual: ``(B,)`` natural KKT residual at the returned P.
        duality_gap: ``(B,)`` primal minus dual objective, a certificate of optimality (the
            primal as in :func:`latent_objective`: hard bounds carry no price).
        region_multipliers: ``(B, R)`` multipliers of the region constraints, or ``None``.
        region_violation: ``(B, R)`` what remains of each region bound, or ``None``.
    """

    P: Tensor
    multipliers: Tensor
    iterations: Tensor
    converged: Tensor
    violation: Tensor
    residual: Tensor
    duality_gap: Tensor
    region_multipliers: Tensor | None = None
    region_violation: Tensor | None = None


# --------------------------------------------------------------------------------------------
# Input checking and the compact problem
# --------------------------------------------------------------------------------------------


def _check_bounds(logits: Tensor, lower: Tensor | float, upper: Tensor | float,
                  slack: Tensor | float, regions: RegionConstraints | None
                  ) -> tuple[Tensor, Tensor, Tensor]:
    """Validate the inputs of the P-step; return ``lower, upper, slack`` as float64 ``(B, L)``."""
    if not isinstance(logits, Tensor) or logits.dim() != 4:
        shape = tuple(logits.shape) if isinstance(logits, Tensor) else type(logits).__name__
        raise ValueError(f"logits must be a (B, L, H, W) tensor, got {shape}")
    if not logits.dtype.is_floating_point:
        raise ValueError(f"logits must be floating point, got {logits.dtype}")
    if not bool(torch.isfinite(logits.sum())):  # cheap screen; NaN and inf propagate into a sum
        bad = ~torch.isfinite(logits).flatten(1).all(1)
        if bool(bad.any()):
            raise ValueError(
                f"logits contain NaN or inf (images {bad.nonzero().flatten().tolist()})")
    B, L = logits.shape[:2]
    dev = logits.device
    lower = broadcast_bounds(lower, (B, L), "lower", device=dev)
    upper = broadcast_bounds(upper, (B, L), "upper", device=dev)
    slack = broadcast_bounds(slack, (B, L), "slack", device=dev, hi=math.inf)
    crossed = (lower > upper).nonzero().tolist()
    if crossed:
        raise ValueError(f"lower > upper for (image, class) {crossed[:5]}")
    empty = ((upper > 0).sum(1) == 0).nonzero().flatten().tolist()
    if empty:
        raise ValueError(f"every class is suppressed (upper = 0) in images {empty}")
    if regions is not None:
        w = regions.weights
        if w.shape[0] != B or w.shape[2:] != logits.shape[2:]:
            raise ValueError(
                f"region weights have shape {tuple(w.shape)}, expected (B, R, H, W) with "
                f"B, H, W = {B}, {tuple(logits.shape[2:])}"
            )
        if bool(((regions.classes < 0) | (regions.classes >= L)).any()):
            raise ValueError(f"region classes must lie in [0, {L})")
    return lower, upper, slack


class _PerImage:
    """Tensors with a leading image dimension that can be narrowed to the images still running."""

    def select(self, keep: Tensor) -> _PerImage:
        """A copy holding only the images where ``keep`` is true."""
        out = object.__new__(type(self))
        for name, value in vars(self).items():
            setattr(out, name, value[keep] if isinstance(value, Tensor) else value)
        return out


@dataclass
class _Box(_PerImage):
    """The constraint coordinates of the dual, ``(B, J)`` each: bounds, caps and masks."""

    lo: Tensor
    hi: Tensor
    beta: Tensor  # the true cap β (may be inf)
    cap: Tensor  # β clipped to _LAMBDA_CAP + the logit spread: the cap used while iterating
    active: Tensor  # coordinates that are variables (others stay at 0)

    def linear(self, lam: Tensor) -> Tensor:
        """The non-smooth part of F: ``−Σ_k (lower_k·λ_k⁺ − upper_k·λ_k⁻)``."""
        term = self.hi * (-lam).clamp(min=0) - self.lo * lam.clamp(min=0)
        return torch.where(self.active, term, 0.0).sum(-1)

    def residual(self, lam: Tensor, m: Tensor) -> Tensor:
        """Natural KKT residual ``‖λ − prox_h(λ − m)‖∞`` per image (the optimality measure)."""
        z = lam - m
        x = torch.where(z + self.lo > 0, z + self.lo,
                        torch.where(z + self.hi < 0, z + self.hi, torch.zeros_like(z)))
        x = torch.clamp(x, min=-self.beta, max=self.beta)
        return torch.where(self.active, (lam - x).abs(), 0.0).amax(-1)

    def violation(self, m: Tensor) -> Tensor:
        """What remains of each bound: ``max(lower − m, 0) + max(m − upper, 0)``."""
        return torch.where(self.active, bound_violation(m, self.lo, self.hi), 0.0)

    def gap(self, lam: Tensor, m: Tensor) -> Tensor:
        """Duality gap at P(λ): ``Σ_k λ⁺(m − lower) − λ⁻(m − upper) + β·violation``."""
        viol = self.violation(m)
        penalty = torch.where((viol > 0) & torch.isfinite(self.beta), self.beta * viol, 0.0)
        term = lam.clamp(min=0) * (m - self.lo) - (-lam).clamp(min=0) * (m - self.hi) + penalty
        return torch.where(self.active, term, 0.0).sum(-1)


@dataclass
class _Compact:
    """The problem restricted to each image's present (unsuppressed) classes, padded to K."""

    f: Tensor  # (B, K, N) float64 logits, max 0 at each pixel, -inf on padding
    idx: Tensor  # (B, K) class index of each compact row (padding points at suppressed classes)
    valid: Tensor  # (B, K) real rows
    box: _Box
    region_class: Tensor  # (B, R) compact row of each region, -1 when suppressed (R may be 0)
    region_weights: Tensor  # (B, R, N) weights scaled to sum to N
    spread: Tensor  # (B,) largest gap between a pixel's top logit and another present class's


def _compact(logits: Tensor, lower: Tensor, upper: Tensor, slack: Tensor,
             regions: RegionConstraints | None) -> _Compact:
    """Drop suppressed classes, gather the rest to the front, and set up the dual's box."""
    B, L = lower.shape
    present = upper > 0
    count = present.sum(1)
    K = int(count.max())
    order = torch.argsort((~present).to(torch.int8), dim=1, stable=True)
    idx = order[:, :K]
    valid = torch.arange(K, device=idx.device) < count[:, None]
    f = logits.flatten(2)
    f = f.gather(1, idx[..., None].expand(-1, -1, f.shape[-1])).to(_DTYPE)
    f = f.masked_fill(~valid[..., None], -math.inf)
    f = f - f.amax(1, keepdim=True)
    spread = -torch.where(valid[..., None], f, 0.0).flatten(1).amin(1)  # (B,) largest gap

    lo, hi, beta = (t.gather(1, idx) for t in (lower, upper, slack))
    hard = torch.isinf(beta) & valid
    lo_sum = torch.where(hard, lo, 0.0).sum(1)
    all_hard = (hard | ~valid).all(1)
    hi_sum = torch.where(valid, hi, 0.0).sum(1)
    infeasible = (lo_sum > 1 + 1e-9) | (all_hard & (hi_sum < 1 - 1e-9))
    if bool(infeasible.any()):
        raise ValueError(
            "hard class bounds (slack = inf) are infeasible in images "
            f"{infeasible.nonzero().flatten().tolist()}: the lower bounds of the present classes "
            "must sum to at most 1 and their upper bounds to at least 1; give them finite slack"
        )
    N = f.shape[-1]
    region_class = torch.zeros(B, 0, dtype=torch.long, device=f.device)
    region_weights = f.new_zeros(B, 0, N)
    if regions is not None:
        pos = torch.empty_like(order).scatter_(
            1, order, torch.arange(L, device=order.device).expand(B, -1))
        region_class = pos.gather(1, regions.classes)
        region_class = torch.where(region_class < count[:, None], region_class, -1)
        hard_empty = (region_class < 0) & torch.isinf(regions.slack) & (regions.lower > 0)
        if bool(hard_empty.any()):
            raise ValueError(
                "a hard region constraint asks for mass on a suppressed class in images "
                f"{hard_empty.nonzero()[:, 0].unique().tolist()}"
            )
        region_weights = regions.normalized_weights()
        lo = torch.cat([lo, regions.lower], 1)
        hi = torch.cat([hi, regions.upper], 1)
        beta = torch.cat([beta, regions.slack], 1)
        valid_j = torch.cat([valid, region_class >= 0], 1)
    else:
        valid_j = valid
    box = _Box(lo=lo, hi=hi.clamp(max=1.0), beta=beta,
               cap=torch.minimum(beta, _LAMBDA_CAP + spread[:, None]), active=valid_j)
    return _Compact(f, idx, valid, box, region_class, region_weights, spread)


# --------------------------------------------------------------------------------------------
# Evaluating the dual (Eq. 3)
# --------------------------------------------------------------------------------------------


class _ClassSums(_PerImage):
    """The dual for whole-image bounds, where the shift is ``s_il = λ_l``.

    ``exp(f_il + λ_l) = G_il·exp(λ_l + M_l)`` with ``G_il = exp(f_il − M_l)`` and ``M_l`` the
    class's largest logit, so after one exponential pass the normaliser of every pixel is a
    matrix–vector product, and P(λ) a rescaling of G.
    """

    def __init__(self, f: Tensor) -> None:
        M = f.amax(-1)
        self.pad = torch.isinf(M)
        self.M = M.masked_fill(self.pad, 0.0)
        self.G = torch.exp(f - self.M[..., None])
        self.size = f.shape[-1]

    def _scales(self, lam: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``h = exp(λ + M − c)``, the pixel normalisers ``Z`` (up to ``exp(c)``) and ``c``."""
        u = (lam + self.M).masked_fill(self.pad, -math.inf)
        c = u.amax(-1, keepdim=True)
        h = torch.exp(u - c)
        return h, torch.bmm(h[:, None, :], self.G).squeeze(1), c.squeeze(-1)

    def value(self, lam: Tensor) -> Tensor:
        """Smooth part of F: ``(1/N)·Σ_i log Σ_l exp(f_il + λ_l)``."""
        _, Z, c = self._scales(lam)
        return Z.log().mean(-1) + c

    def value_grad(self, lam: Tensor, hessian: bool = False
                   ) -> tuple[Tensor, Tensor, Tensor | None]:
        """Smooth part of F, its gradient ``m`` and (optionally) its Hessian
        ``diag(m) − (1/N)·Σ_i P_i·P_iᵀ``."""
        h, Z, c = self._scales(lam)
        value = Z.log().mean(-1) + c
        if not hessian:
            m = h * torch.bmm(self.G, Z.reciprocal()[..., None]).squeeze(-1) / self.G.shape[-1]
            return value, m, None
        Gz = self.G * Z.reciprocal()[:, None, :]  # P = h·G/Z, so Σ_i P_i·P_iᵀ = h·(Gz·Gzᵀ)·h
        m = h * Gz.mean(-1)
        H = torch.diag_embed(m) - h[:, :, None] * torch.bmm(Gz, Gz.transpose(1, 2)) \
            * (h[:, None, :] / self.size)
        return value, m, H

    def probabilities(self, lam: Tensor) -> Tensor:
        """P(λ), ``(B, K, N)``."""
        h, Z, _ = self._scales(lam)
        return self.G * h[..., None] * Z.reciprocal()[:, None, :]

    def fractions(self, P: Tensor) -> Tensor:
        """Constraint values ``m(P)``, ``(B, J)``."""
        return P.mean(-1)


class _Weighted(_PerImage):
    """The dual evaluated directly at every pixel, with region constraints if any.

    The shift is ``s_il = λ_l + Σ_r λ_r·N·w_ri·[c_r = l]``; with no regions this is CCNN's own
    evaluation, a log-sum-exp over the present classes at every pixel.
    """

    def __init__(self, f: Tensor, region_class: Tensor, region_weights: Tensor) -> None:
        K = f.shape[1]
        self.f = f
        self.size = f.shape[-1]
        self.rk = region_class.clamp(min=0)
        ractive = region_class >= 0
        self.onehot = torch.nn.functional.one_hot(self.rk, K).to(_DTYPE) * ractive[..., None]
        self.Wn = region_weights * ractive[..., None]
        cls = torch.cat([torch.arange(K, device=f.device).expand(f.shape[0], -1), self.rk], 1)
        self.same = (cls[:, :, None] == cls[:, None, :]).to(_DTYPE)

    def _logits(self, lam: Tensor) -> Tensor:
        K = self.f.shape[1]
        shift = torch.einsum("brk,brn->bkn", self.onehot * lam[:, K:, None], self.Wn)
        return self.f + lam[:, :K, None] + shift

    def _region_mass(self, P: Tensor) -> Tensor:
        return P.gather(1, self.rk[..., None].expand(-1, -1, P.shape[-1])) * self.Wn

    def value(self, lam: Tensor) -> Tensor:
        """Smooth part of F: ``(1/N)·Σ_i log Σ_l exp(f_il + s_il(λ))``."""
        return torch.logsumexp(self._logits(lam), dim=1).mean(-1)

    def value_grad(self, lam: Tensor, hessian: bool = False
                   ) -> tuple[Tensor, Tensor, Tensor | None]:
        """Smooth part of F, its gradient and (optionally) its Hessian ``((U·Vᵀ)∘C − U·Uᵀ)/N``.

        The rows of ``V`` are those of ``N·A`` (Eq. 2): ones for the class sums, the scaled maps
        for the regions; ``U`` is ``V`` times P on each row's class; ``C`` marks rows of one class.
        """
        s = self._logits(lam)
        logZ = torch.logsumexp(s, dim=1, keepdim=True)
        P = torch.exp(s - logZ)
        U = torch.cat([P, self._region_mass(P)], 1)
        value, m = logZ.squeeze(1).mean(-1), U.mean(-1)
        if not hessian:
            return value, m, None
        K = P.shape[1]
        UV = torch.cat([U.sum(-1, keepdim=True).expand(-1, -1, K),
                        torch.bmm(U, self.Wn.transpose(1, 2))], 2)
        H = (UV * self.same - torch.bmm(U, U.transpose(1, 2))) / P.shape[-1]
        return value, m, H

    def probabilities(self, lam: Tensor) -> Tensor:
        """P(λ), ``(B, K, N)``."""
        return torch.softmax(self._logits(lam), dim=1)

    def fractions(self, P: Tensor) -> Tensor:
        """Constraint values ``m(P)``: class fractions then weighted region fractions."""
        return torch.cat([P.mean(-1), self._region_mass(P).mean(-1)], 1)


_Evaluator = _ClassSums | _Weighted


# --------------------------------------------------------------------------------------------
# The two methods
# --------------------------------------------------------------------------------------------


class _Progress:
    """Per-image bookkeeping of a batched iteration.

    Images are recorded as they finish; they leave the working batch (a copy of every per-image
    tensor) only once a quarter of it has finished, so the copies cost less than they save.
    """

    def __init__(self, lam: Tensor) -> None:
        self.lam = torch.zeros_like(lam)
        self.iterations = torch.zeros(lam.shape[0], dtype=torch.long, device=lam.device)
        self.rows = torch.arange(lam.shape[0], device=lam.device)
        self.open = torch.ones(lam.shape[0], dtype=torch.bool, device=lam.device)

    def update(self, finished: Tensor, lam: Tensor, iteration: int) -> Tensor | None:
        """Record the newly finished images; return a mask of rows to keep when it is time to
        narrow the batch, else ``None``.  ``self.open`` is all false once every image is done."""
        new = finished & self.open
        if bool(new.any()):
            self.lam[self.rows[new]] = lam[new]
            self.iterations[self.rows[new]] = iteration
            self.open = self.open & ~new
        if not bool(self.open.any()) or 4 * int(self.open.sum()) > 3 * self.open.numel():
            return None
        keep = self.open
        self.rows, self.open = self.rows[keep], self.open[keep]
        return keep

    @property
    def done(self) -> bool:
        """Whether every image has finished."""
        return not bool(self.open.any())


def _newton_direction(lam: Tensor, m: Tensor, H: Tensor, res: Tensor, box: _Box
                      ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """One projected Newton direction on the piecewise dual (Bertsekas' ε-active sets).

    Returns the direction ``d``, the gradient ``g`` of the piece each coordinate moves on, the
    piece's sign (+1: λ ≥ 0, −1: λ ≤ 0, 0: held) and the value of the held coordinates.
    """
    eps = res.clamp(max=_EPS_ACTIVE)[:, None]
    g_lo, g_hi = m - box.lo, m - box.hi
    near = lam.abs() <= eps
    side = torch.where(lam > eps, 1, torch.where(lam < -eps, -1, 0))
    side = torch.where(near & (g_lo < 0), 1, torch.where(near & (g_hi > 0), -1, side))
    g = torch.where(side > 0, g_lo, torch.where(side < 0, g_hi, torch.where(lam > 0, g_lo, g_hi)))
    top = (side > 0) & (lam >= box.cap - eps) & (g < 0)
    bottom = (side < 0) & (lam <= -box.cap + eps) & (g > 0)
    free = box.active & (side != 0) & ~top & ~bottom
    held = torch.where(top, box.cap, torch.where(bottom, -box.cap, torch.zeros_like(lam)))

    gf = torch.where(free, g, 0.0)
    delta = _DAMPING * gf.abs().amax(-1) + 1e-12
    both = (free[:, :, None] & free[:, None, :]).to(H.dtype)
    eye = torch.eye(H.shape[-1], dtype=H.dtype, device=H.device)
    system = H * both + eye * torch.where(free, delta[:, None], 1.0)[:, None, :]
    chol, info = torch.linalg.cholesky_ex(system)
    d = -torch.cholesky_solve(gf[..., None], chol).squeeze(-1)
    if bool((info != 0).any()):  # numerically indefinite: fall back to a scaled gradient step
        diag = torch.diagonal(system, dim1=1, dim2=2).clamp(min=1e-12)
        d = torch.where((info != 0)[:, None], -gf / diag, d)
    d = torch.where(free, d, 0.0)
    d = d * (_MAX_STEP / d.abs().amax(-1, keepdim=True).clamp(min=_MAX_STEP))
    return d, torch.where(box.active, g, 0.0), torch.where(free, side, 0), held


def _project(x: Tensor, side: Tensor, held: Tensor, box: _Box) -> Tensor:
    """Project onto the pieces: free coordinates stay on their side of 0 and inside ``±cap``."""
    pos = torch.clamp(x, min=torch.zeros_like(box.cap), max=box.cap)
    neg = torch.clamp(x, min=-box.cap, max=torch.zeros_like(box.cap))
    return torch.where(side > 0, pos, torch.where(side < 0, neg, held))


def _newton(ev: _Evaluator, box: _Box, tol: float, max_iter: int, lam: Tensor
            ) -> tuple[Tensor, Tensor]:
    """Projected Newton on the dual from ``λ``; returns ``λ`` and the iterations per image."""
    progress = _Progress(lam)
    value, m, H = ev.value_grad(lam, hessian=True)
    F = value + box.linear(lam)
    stalled = torch.zeros_like(F, dtype=torch.bool)
    for it in range(max_iter + 1):
        res = box.residual(lam, m)
        keep = progress.update((res <= tol) | stalled | (it == max_iter), lam, it)
        if progress.done:
            break
        if keep is not None:
            ev, box = ev.select(keep), box.select(keep)
            lam, m, H, F, res = lam[keep], m[keep], H[keep], F[keep], res[keep]
            stalled = stalled[keep]
        d, g, side, held = _newton_direction(lam, m, H, res, box)
        d = torch.where(progress.open[:, None], d, 0.0)  # finished images stay where they are
        allowance = 1e-12 * (1.0 + F.abs())  # rounding allowance in the Armijo test
        # The full step, with everything the next iteration needs (usually accepted).
        trial = _project(lam + d, side, held, box)
        value_t, m_t, H_t = ev.value_grad(trial, hessian=True)
        F_t = value_t + box.linear(trial)
        accepted = F_t <= F + _ARMIJO * (g * (trial - lam)).sum(-1) + allowance
        if bool(accepted.all()):
            lam, m, H, F = trial, m_t, H_t, F_t
            continue
        new = torch.where(accepted[:, None], trial, lam)
        t = torch.full_like(F[:, None], 0.5)
        for _ in range(_MAX_BACKTRACK):
            trial = _project(lam + t * d, side, held, box)
            F_t = ev.value(trial) + box.linear(trial)
            ok = ~accepted & (F_t <= F + _ARMIJO * (g * (trial - lam)).sum(-1) + allowance)
            new = torch.where(ok[:, None], trial, new)
            accepted = accepted | ok
            if bool(accepted.all()):
                break
            t = torch.where(accepted[:, None], t, 0.5 * t)
        stalled = ~accepted
        lam = new
        value, m, H = ev.value_grad(lam, hessian=True)
        F = value + box.linear(lam)
    return progress.lam, progress.iterations


def _pgd(ev: _Evaluator, box: _Box, tol: float, max_iter: int, lam: Tensor
         ) -> tuple[Tensor, Tensor]:
    """CCNN's projected gradient on (μ, ν) from ``λ = μ − ν`` with its adaptive step; returns
    ``λ``."""
    N = ev.size
    mu, nu = lam.clamp(min=0), (-lam).clamp(min=0)
    progress = _Progress(mu)
    step = torch.full_like(mu[:, :1], _PGD_STEP0 / N)

    def dual(value: Tensor, mu: Tensor, nu: Tensor, box: _Box) -> Tensor:
        return value + torch.where(box.active, box.hi * nu - box.lo * mu, 0.0).sum(-1)

    value, m, _ = ev.value_grad(mu - nu)
    F = dual(value, mu, nu, box)
    for it in range(max_iter + 1):
        finished = ((box.residual(mu - nu, m) <= tol) | (step.squeeze(1) < _PGD_MIN_STEP / N)
                    | (it == max_iter))
        keep = progress.update(finished, mu - nu, it)
        if progress.done:
            break
        if keep is not None:
            ev, box = ev.select(keep), box.select(keep)
            mu, nu, step, m, F = mu[keep], nu[keep], step[keep], m[keep], F[keep]
        zero = torch.zeros_like(box.cap)
        mu_t = torch.where(box.active, torch.clamp(mu - step * (m - box.lo), zero, box.cap), 0.0)
        nu_t = torch.where(box.active, torch.clamp(nu - step * (box.hi - m), zero, box.cap), 0.0)
        value_t, m_t, _ = ev.value_grad(mu_t - nu_t)
        F_t = dual(value_t, mu_t, nu_t, box)
        ok = F_t < F
        mu, nu = torch.where(ok[:, None], mu_t, mu), torch.where(ok[:, None], nu_t, nu)
        m, F = torch.where(ok[:, None], m_t, m), torch.where(ok, F_t, F)
        step = torch.where(ok[:, None], 1.1 * step, 0.5 * step)
    return progress.lam, progress.iterations


# --------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------


def _start(init: Tensor | None, prob: _Compact) -> Tensor:
    """The starting multipliers in compact coordinates: ``init`` on the present classes."""
    lam = torch.zeros_like(prob.box.lo)
    if init is None:
        return lam
    B, K = prob.idx.shape
    if not isinstance(init, Tensor) or init.dim() != 2 or init.shape[0] != B:
        shape = tuple(init.shape) if isinstance(init, Tensor) else type(init).__name__
        raise ValueError(f"init must be (B, L) multipliers with B = {B}, got {shape}")
    start = init.to(device=lam.device, dtype=_DTYPE).gather(1, prob.idx)
    start = torch.where(prob.valid & torch.isfinite(start), start, 0.0)
    cap = prob.box.cap[:, :K]
    lam[:, :K] = torch.maximum(torch.minimum(start, cap), -cap)
    return lam


@torch.no_grad()
def solve_latent(
    logits: Tensor,
    lower: Tensor | float,
    upper: Tensor | float,
    slack: Tensor | float = math.inf,
    *,
    regions: RegionConstraints | None = None,
    method: Method = "newton",
    tol: float = 1e-6,
    max_iter: int | None = None,
    evaluation: Evaluation = "auto",
    init: Tensor | None = None,
) -> LatentResult:
    """Latent distribution P closest in KL to ``softmax(logits)`` under fraction bounds.

    Solves CCNN's P-step (Pathak et al. 2015, Eq. 4–5) via its dual (Eq. 3), for a whole batch at
    once on the logits' device; see the module docstring for the problem and the methods.

    Args:
        logits: ``(B, L, H, W)`` raw scores; Q = softmax over L.
        lower, upper: fractions in ``[0, 1]``, broadcastable to ``(B, L)``: bounds on
            ``(1/N)·Σ_i P_i(l)``.  ``upper = 0`` suppresses a class exactly.
        slack: β, scalar, ``(L,)`` or ``(B, L)``: the price of violating a bound, which caps its
            multiplier; ``inf`` makes the bound hard.
        regions: optional bounds on the P-mass of a class inside pixel weight maps.
        method: ``"newton"`` (projected Newton, default) or ``"pgd"`` (CCNN's projected gradient).
        tol: tolerance on the natural KKT residual.
        max_iter: iteration limit (default 100 for ``"newton"``, 3000 for ``"pgd"``).
        evaluation: how the dual is evaluated: ``"factored"`` (one exponential pass, then
            matrix products; whole-image bounds only), ``"direct"`` (a log-sum-exp at every pixel
            and step, as CCNN's code does), or ``"auto"``: factored for ``"newton"`` without
            regions, direct otherwise — so ``"pgd"`` stays CCNN's computation, step for step.
            The factored form needs logits whose spread at a pixel is at most 300 (exp must
            not underflow); ``"auto"`` takes the direct one beyond that (CCNN's hardness 1000
            scales the logits so far).
        init: multipliers to start from, ``(B, L)`` like :attr:`LatentResult.multipliers`
            (e.g. the last solve of the same images: a warm start); non-finite entries start at
            0, the rest are clipped to the caps.  Default: all 0.

    Returns:
        A :class:`LatentResult`.

    Raises:
        ValueError: for non-finite logits, mismatched shapes, bounds outside ``[0, 1]``,
            ``lower > upper``, an image with every class suppressed, or hard bounds that no P
            can satisfy.

    Example:
        >>> logits = torch.randn(2, 3, 8, 8)
        >>> r = solve_latent(logits, lower=[[0.3, 0.2, 0.0], [0.3, 0.0, 0.0]],
        ...                  upper=[[0.7, 1.0, 0.0], [1.0, 0.0, 0.0]], slack=[[1e9, 2, 2]] * 2)
        >>> bool(r.converged.all()), r.P.shape
        (True, torch.Size([2, 3, 8, 8]))
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if evaluation not in EVALUATIONS:
        raise ValueError(f"evaluation must be one of {EVALUATIONS}, got {evaluation!r}")
    if evaluation == "factored" and regions is not None:
        raise ValueError("evaluation='factored' needs whole-image bounds only (no regions)")
    if not tol >= 0:
        raise ValueError(f"tol must be >= 0, got {tol}")
    if max_iter is None:
        max_iter = 100 if method == "newton" else 3000
    if max_iter < 0:
        raise ValueError(f"max_iter must be >= 0, got {max_iter}")
    if regions is not None:
        regions = regions.to(logits.device)
    lower, upper, slack = _check_bounds(logits, lower, upper, slack, regions)
    B, L, H, W = logits.shape
    prob = _compact(logits, lower, upper, slack, regions)
    wide = bool((prob.spread > _FACTORED_SPREAD).any())
    if evaluation == "auto":
        evaluation = ("factored" if method == "newton" and regions is None and not wide
                      else "direct")
    elif evaluation == "factored" and wide:
        raise ValueError(
            f"evaluation='factored' needs logits whose spread at a pixel is at most "
            f"{_FACTORED_SPREAD:g} (got {float(prob.spread.max()):.4g}); use 'direct' or 'auto'")
    if evaluation == "factored":
        ev: _Evaluator = _ClassSums(prob.f)
    else:
        ev = _Weighted(prob.f, prob.region_class, prob.region_weights)
    solver = _newton if method == "newton" else _pgd
    lam, iters = solver(ev, prob.box, tol, max_iter, _start(init, prob))

    Pc = ev.probabilities(lam)
    m = ev.fractions(Pc)
    residual = prob.box.residual(lam, m)
    K = prob.f.shape[1]
    idx = prob.idx
    P = torch.zeros(B, L, H * W, dtype=logits.dtype, device=logits.device)
    P.scatter_(1, idx[..., None].expand(-1, -1, H * W), Pc.to(logits.dtype))
    frac = torch.zeros_like(lower).scatter_(1, idx, torch.where(prob.valid, m[:, :K], 0.0))
    lam_full = torch.full_like(lower, -math.inf).scatter_(
        1, idx, torch.where(prob.valid, lam[:, :K], -math.inf))
    violation = bound_violation(frac, lower, upper)
    result = LatentResult(
        P=P.view(B, L, H, W),
        multipliers=lam_full.to(logits.dtype),
        iterations=iters,
        converged=residual <= tol,
        violation=violation.to(logits.dtype),
        residual=residual,
        duality_gap=prob.box.gap(lam, m),
    )
    if regions is not None:
        r_lam = torch.where(prob.box.active[:, K:], lam[:, K:], -math.inf)
        r_frac = m[:, K:]
        r_viol = bound_violation(r_frac, regions.lower, regions.upper)
        result.region_multipliers = r_lam.to(logits.dtype)
        result.region_violation = r_viol.to(logits.dtype)
    return result


@torch.no_grad()
def latent_objective(
    logits: Tensor,
    P: Tensor,
    lower: Tensor | float,
    upper: Tensor | float,
    slack: Tensor | float = math.inf,
    *,
    regions: RegionConstraints | None = None,
) -> Tensor:
    """The primal objective of the P-step at ``P`` (Eq. 4 with the best slack ξ), ``(B,)`` float64.

    ``(1/N)·Σ_i KL(P_i‖Q_i) + Σ_k β_k·(max(lower_k − m_k, 0) + max(m_k − upper_k, 0))``, the sum
    over the soft bounds: a hard bound (β = inf) is a constraint, not a price, and what remains of
    it is reported by ``LatentResult.violation``.
    """
    lower, upper, slack = _check_bounds(logits, lower, upper, slack, regions)
    if P.shape != logits.shape:
        raise ValueError(f"P has shape {tuple(P.shape)}, logits {tuple(logits.shape)}")
    logq = torch.log_softmax(logits.to(_DTYPE), dim=1).flatten(2)
    p = P.to(_DTYPE).flatten(2)
    kl = (torch.xlogy(p, p) - p * logq).sum(1).mean(-1)
    m, lo, hi, beta = p.mean(-1), lower, upper, slack
    if regions is not None:
        Wn = regions.normalized_weights()
        rm = (p.gather(1, regions.classes[..., None].expand(-1, -1, p.shape[-1])) * Wn).mean(-1)
        m = torch.cat([m, rm], 1)
        lo = torch.cat([lo, regions.lower], 1)
        hi = torch.cat([hi, regions.upper], 1)
        beta = torch.cat([beta, regions.slack], 1)
    viol = bound_violation(m, lo, hi)
    return kl + torch.where((viol > 0) & torch.isfinite(beta), beta * viol, 0.0).sum(-1)
