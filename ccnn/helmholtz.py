"""The Helmholtz toy: sine waves under the PDE constraint ``u'' + k²u = 0``.

Jergensen, "Neural network optimization under PDE constraints" (2019), methodology and Figs. 6-14.
A network takes ``(x, A, k, φ)`` and should output ``A·sin(kx + φ)``; the constraint is the
Helmholtz residual ``r = ∂²u/∂x² + k²u`` of the network's output as a function of its input ``x``.
The methods compared:

* ``unconstrained``: mean squared error;
* ``soft``: ``MSE + (1/B) Σ_i r_i²`` (the paper's penalty weight λ = 1/B);
* ``lagrangian``: the augmented Lagrangian ``MSE + Σ_i Λ_i r_i + (ρ/2) Σ_i r_i²`` with one
  multiplier per training sample and dual ascent ``Λ_i ← Λ_i + ρ r_i`` after each step
  (Eq. 4 of Márquez-Neila, Salzmann and Fua, "Imposing Hard Constraints on Deep Networks:
  Promises and Limitations", 2017; :mod:`ccnn.hard.penalties`), ``ρ = 2/B`` by default so that
  its quadratic term is the soft penalty;
* ``reduction``: Tanabe's constrained backpropagation with one multiplier for the batch mean of
  the Huber error of ``r`` (Eq. 6), :class:`ccnn.hard.tanabe.Tanabe`;
* ``full``: the same with one multiplier per sample (Eq. 5, 9);
* ``kkt``: the KKT hard step of Márquez-Neila et al. (Eq. 5, :class:`ccnn.hard.HardSGD`): each
  step solves for the parameter change that meets the linearized constraints of the batch's
  ``r_i`` (the share ``kkt_correction`` of them) while descending the MSE; not in the default
  run (:data:`DEFAULT_METHODS`) because it costs about 40 ms per step here;
* ``projection``: the unconstrained model, and after each epoch a clone of it projected onto the
  constraint by training the clone on the mean squared residual alone (§"Nonlinear projection",
  :func:`ccnn.hard.posthoc.nonlinear_projection`), on the test wave's 100 points.

The network of Fig. 6: a lower row of dense layers with Swish activations on the input, each of
whose outputs is scaled element-wise (⊙) by the output of an upper row of affine (linear
activation) layers driven by the wave's style ``(A, k, φ)`` - a style-transfer / hypernetwork
design. ``u``, ``∂u/∂x`` and ``∂²u/∂x²`` are propagated together through the layers (Taylor mode,
:meth:`HelmholtzNet.jet`), which equals nested :func:`torch.func.jvp` (tested) at a fraction of
its cost; by default the jet is one autograd node with a hand-written backward pass
(:class:`_FusedJet`, tested against autograd through :meth:`HelmholtzNet.jet_autograd`), because
on a network this small autograd's cost per recorded operation dominates. Every layer also
accepts per-sample weights (a leading batch dimension), so that
:class:`~ccnn.hard.tanabe.Tanabe` can form per-sample Jacobians with plain backward passes.
"""

from __future__ import annotations

import logging
import math
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ccnn.hard.optim import HardSGD
from ccnn.hard.penalties import DualAscent, IndexedMultipliers, lagrangian
from ccnn.hard.posthoc import ProjectionReport, nonlinear_projection
from ccnn.hard.tanabe import Tanabe
from ccnn.progress import ProgressBar

__all__ = [
    "DEFAULT_METHODS",
    "METHODS",
    "TIMED",
    "TIMED_EXTRA",
    "Affine",
    "HelmholtzConfig",
    "HelmholtzNet",
    "helmholtz_residual",
    "make_data",
    "make_step",
    "parameter_count",
    "plot_helmholtz",
    "plot_timing",
    "run_helmholtz",
    "run_timing",
    "sine_wave",
    "swish",
]

log = logging.getLogger(__name__)

METHODS = ("unconstrained", "soft", "lagrangian", "reduction", "full", "kkt", "projection")
DEFAULT_METHODS = ("unconstrained", "soft", "lagrangian", "reduction", "full", "projection")
TIMED = ("unconstrained", "soft", "reduction", "full")
TIMED_EXTRA = ("lagrangian", "kkt")


# ---- data -------------------------------------------------------------------------------------


def make_data(
    waves_per_axis: int = 10,
    points: int = 50,
    *,
    generator: torch.Generator | None = None,
    amplitude: tuple[float, float] = (0.2, 5.0),
    frequency: tuple[float, float] = (0.4 * math.pi, 10.0 * math.pi),
    phase: tuple[float, float] = (-0.5, 0.5),
    dtype: torch.dtype = torch.float32,
) -> tuple[Tensor, Tensor]:
    """The training set: ``A·sin(kx + φ)`` on a grid of ``(A, k, φ)``, ``x`` uniform in [−1, 1].

    Jergensen (2019), methodology: ``A``, ``k``, ``φ`` each take ``waves_per_axis`` equally spaced
    values over ``amplitude``, ``frequency`` and ``phase`` (endpoints included), 10³ waves by
    default; each wave gets ``points`` values of ``x`` drawn uniformly in [−1, 1] from
    ``generator``. Returns ``inputs`` ``(W·points, 4)`` with columns ``(x, A, k, φ)`` (wave-major:
    rows ``w·points … (w+1)·points − 1`` belong to wave ``w``; waves ordered with ``φ`` fastest,
    then ``k``, then ``A``) and ``targets`` ``(W·points,)``.
    """
    for name, value in (("waves_per_axis", waves_per_axis), ("points", points)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    axes = [torch.linspace(lo, hi, waves_per_axis, dtype=torch.float64)
            for lo, hi in (amplitude, frequency, phase)]
    A, k, phi = (t.reshape(-1) for t in torch.meshgrid(*axes, indexing="ij"))
    n_waves = A.numel()
    x = torch.rand(n_waves, points, generator=generator, dtype=torch.float64) * 2.0 - 1.0
    style = torch.stack([A, k, phi], 1).repeat_interleave(points, 0)
    inputs = torch.cat([x.reshape(-1, 1), style], 1)
    targets = style[:, 0] * torch.sin(style[:, 1] * inputs[:, 0] + style[:, 2])
    return inputs.to(dtype), targets.to(dtype)


def sine_wave(points: int = 500, amplitude: float = 1.0, frequency: float = 1.0,
              phase: float = 0.0, dtype: torch.dtype = torch.float32) -> tuple[Tensor, Tensor]:
    """One wave on ``points`` equally spaced ``x`` in [−1, 1] (endpoints included).

    The paper's test set is ``A = 1, k = 1, φ = 0`` on 500 points; its projection set the same
    wave on 100 points. Returns ``(inputs (points, 4), targets (points,))``.
    """
    if isinstance(points, bool) or not isinstance(points, int) or points < 2:
        raise ValueError(f"points must be an int >= 2, got {points!r}")
    x = torch.linspace(-1.0, 1.0, points, dtype=torch.float64)
    style = torch.tensor([amplitude, frequency, phase], dtype=torch.float64).expand(points, 3)
    inputs = torch.cat([x[:, None], style], 1)
    return inputs.to(dtype), (amplitude * torch.sin(frequency * x + phase)).to(dtype)


# ---- the network of Fig. 6 ----------------------------------------------------------------------


def swish(a: Tensor) -> Tensor:
    """Swish ``a·σ(a)`` (Ramachandran, Zoph and Le 2017), written out so that forward-mode AD
    can differentiate it twice."""
    return a * torch.sigmoid(a)


def _affine(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """``x Wᵀ + b`` over the last dimension of ``x``.

    ``W`` ``(out, in)`` is shared by all rows. ``W`` ``(G, out, in)`` with ``b`` ``(G, out)`` holds
    ``G`` copies: the rows of ``x`` (its first dimension) are split into ``G`` equal consecutive
    groups and group ``i`` uses copy ``i`` (the ``batched_params`` protocol of
    :class:`~ccnn.hard.tanabe.Tanabe`; ``G`` = rows gives one copy per sample).
    """
    if weight.dim() == 2:
        return F.linear(x, weight, bias)
    groups, n_out = weight.shape[0], weight.shape[1]
    xs = x.reshape(groups, -1, x.shape[-1])
    y = torch.bmm(xs, weight.mT) if bias is None else torch.baddbmm(bias.unsqueeze(1), xs,
                                                                     weight.mT)
    return y.reshape(*x.shape[:-1], n_out)


class Affine(nn.Module):
    """A dense layer ``x Wᵀ + b`` that also takes ``G`` parameter copies (see :func:`_affine`)."""

    def __init__(self, n_in: int, n_out: int, *, generator: torch.Generator | None = None,
                 dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        bound = 1.0 / math.sqrt(n_in)  # torch.nn.Linear's default initialisation range
        w = (torch.rand(n_out, n_in, generator=generator, dtype=dtype) * 2 - 1) * bound
        b = (torch.rand(n_out, generator=generator, dtype=dtype) * 2 - 1) * bound
        self.weight = nn.Parameter(w)
        self.bias = nn.Parameter(b)

    def forward(self, x: Tensor, bias: bool = True) -> Tensor:
        return _affine(x, self.weight, self.bias if bias else None)


class HelmholtzNet(nn.Module):
    """The network of Fig. 6 of Jergensen (2019): Swish layers scaled by a row of affine layers.

    Lower row: ``h_l = swish(W_l h_{l−1} + b_l) ⊙ s_l`` with ``h_0 = (x, A, k, φ)``; upper row:
    ``s_l = V_l s_{l−1} + c_l`` with ``s_0 = (A, k, φ)``; output ``u = w·h_L + b``. The inputs are
    first divided by fixed scales (1, 5, 10π, 0.5), bringing the style to about [−1, 1] (a
    buffer ``input_scale``, not trained; ``x`` is not rescaled, so ``∂u/∂x`` is unchanged); without
    it the raw ``k`` up to 31 made the untrained outputs ~10² and training stalled. ``depth``
    layers of ``width`` units per row; width 11, depth 3 gives 639 parameters (the paper's
    "approximately 600"). Input ``(B, …, 4)``, output ``(B, …)``.

    ``fused=True`` (default) computes the jet (:meth:`jet`) as one autograd node with a
    hand-written backward pass (:class:`_FusedJet`); ``fused=False`` records every operation
    for autograd (:meth:`jet_autograd`, the reference). Both give the same values and gradients
    (tested); the fused one is several times faster on small networks, where autograd's cost
    per recorded operation dominates.
    """

    def __init__(self, width: int = 11, depth: int = 3, *,
                 generator: torch.Generator | None = None,
                 dtype: torch.dtype = torch.float32, fused: bool = True) -> None:
        super().__init__()
        for name, value in (("width", width), ("depth", depth)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        kw = {"generator": generator, "dtype": dtype}
        self.lower = nn.ModuleList(
            [Affine(4 if i == 0 else width, width, **kw) for i in range(depth)])
        self.upper = nn.ModuleList(
            [Affine(3 if i == 0 else width, width, **kw) for i in range(depth)])
        self.out = Affine(width, 1, **kw)
        scale = torch.tensor([1.0, 1.0 / 5.0, 1.0 / (10.0 * math.pi), 2.0], dtype=dtype)
        self.register_buffer("input_scale", scale)
        self.fused = bool(fused)

    def forward(self, inputs: Tensor, derivatives: bool = False
                ) -> Tensor | tuple[Tensor, Tensor, Tensor]:
        """``u`` ``(B,)``; with ``derivatives=True`` the jet ``(u, ∂u/∂x, ∂²u/∂x²)``."""
        if derivatives:
            return self.jet(inputs)
        h = inputs * self.input_scale
        s = h[..., 1:]
        for lower, upper in zip(self.lower, self.upper, strict=True):
            s = upper(s)
            h = swish(lower(h)) * s
        return self.out(h)[..., 0]

    def jet(self, inputs: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``(u, ∂u/∂x, ∂²u/∂x²)`` with ``x = inputs[:, 0]``, by Taylor-mode propagation.

        Each layer carries the value and its first two derivatives along ``x``: for
        ``a = W h + b`` they are ``a' = W h'``, ``a'' = W h''``; through Swish ``σ``:
        ``(σ(a))' = σ'(a) a'``, ``(σ(a))'' = σ''(a) a'² + σ'(a) a''``; the upper row does not
        depend on ``x``, so the scaling ``⊙ s`` multiplies all three.

        With ``fused`` the jet is one autograd node (:class:`_FusedJet`), except inside
        :mod:`torch.func` transforms (``vmap``, ``jacrev``, ``jvp``: the node has no rules for
        them) and when the layers mix shared and per-group weights, where it falls back to
        :meth:`jet_autograd`. The fused node is differentiable once: a backward pass through
        it with ``create_graph=True`` raises RuntimeError.
        """
        params = self._jet_params()
        if self.fused and not _transforms_active() and _same_grouping(params):
            if torch.is_grad_enabled() and (inputs.requires_grad
                                            or any(p.requires_grad for p in params)):
                return _FusedJet.apply(inputs, self.input_scale, len(self.lower), *params)
            with torch.no_grad():
                return _jet_forward(inputs, self.input_scale, len(self.lower), params)[0]
        return self.jet_autograd(inputs)

    def _jet_params(self) -> list[Tensor]:
        """``[W_0, b_0, …, V_0, c_0, …, w, b]``: lower row, upper row, output layer."""
        out = [t for layer in self.lower for t in (layer.weight, layer.bias)]
        out += [t for layer in self.upper for t in (layer.weight, layer.bias)]
        return [*out, self.out.weight, self.out.bias]

    def jet_autograd(self, inputs: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """:meth:`jet` with every operation recorded by autograd (the reference; works under
        :mod:`torch.func` transforms and to any order of differentiation)."""
        h = inputs * self.input_scale
        s = h[..., 1:]
        h1: Tensor | None = None
        h2: Tensor | None = None
        for i, (lower, upper) in enumerate(zip(self.lower, self.upper, strict=True)):
            s = upper(s)
            a = lower(h)
            if i == 0:  # ∂(W h₀)/∂x = W[:, 0]; second derivative 0
                w0 = lower.weight[..., :, 0] * self.input_scale[0]
                if w0.dim() == 2:  # G copies (G, out): one per group of rows
                    groups, n_out = w0.shape
                    w0 = w0.unsqueeze(1).expand(groups, a.numel() // (groups * n_out), n_out)
                a1 = w0.reshape(a.shape) if w0.dim() == 3 else w0.expand_as(a)
                a2 = None
            else:
                a1, a2 = lower(h1, bias=False), lower(h2, bias=False)
            sig = torch.sigmoid(a)
            one_minus = 1.0 - sig
            d1 = sig * (1.0 + a * one_minus)
            d2 = sig * one_minus * (2.0 + a * (one_minus - sig))
            h = a * sig * s
            h1 = d1 * a1 * s
            second = d2 * a1 * a1 if a2 is None else d2 * a1 * a1 + d1 * a2
            h2 = second * s
        return (self.out(h)[..., 0], self.out(h1, bias=False)[..., 0],
                self.out(h2, bias=False)[..., 0])


# ---- the jet as one autograd node -------------------------------------------------------------


def _transforms_active() -> bool:
    """Whether a :mod:`torch.func` transform is running (then :class:`_FusedJet` is not used)."""
    check = getattr(torch._C, "_are_functorch_transforms_active", None)
    return True if check is None else bool(check())


def _same_grouping(params: Sequence[Tensor]) -> bool:
    """All weights shared (2-D) or all with the same number ``G`` of copies (3-D)."""
    weights = params[0::2]
    if all(w.dim() == 2 for w in weights):
        return all(b.dim() == 1 for b in params[1::2])
    groups = {w.shape[0] for w in weights if w.dim() == 3}
    return (len(groups) == 1 and all(w.dim() == 3 for w in weights)
            and all(b.dim() == 2 for b in params[1::2]))


def _tied(t: Tensor) -> Tensor:
    """``t[0]`` when the copies along ``t``'s first dimension are one tensor expanded (stride 0,
    as :class:`~ccnn.hard.tanabe.Tanabe` makes them), so every group holds the same values;
    otherwise ``t``."""
    return t[0] if t.stride(0) == 0 else t


def _lin(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """``x Wᵀ (+ b)`` for ``x`` ``(G, m, in)``: ``W`` ``(out, in)`` shared or ``(G, out, in)``.

    Copies of one tensor (:func:`_tied`) take one matrix product over all ``G·m`` rows instead
    of ``G`` small ones (10-15 µs against 80-110 µs at ``G`` = 200 groups of 3 rows, measured).
    Only for :class:`_FusedJet`, whose hand-written backward forms each copy's gradient: under
    autograd, ``W[0]`` would send every group's gradient to copy 0."""
    if weight.dim() == 3 and weight.stride(0) == 0 and (bias is None or bias.stride(0) == 0):
        weight, bias = weight[0], None if bias is None else bias[0]
    if weight.dim() == 2:
        return F.linear(x, weight, bias)
    if bias is None:
        return torch.bmm(x, weight.mT)
    return torch.baddbmm(bias.unsqueeze(1), x, weight.mT)


def _wgrad(gy: Tensor, x: Tensor, shared: bool) -> Tensor:
    """``Σ_rows gyᵀ x`` for ``gy`` ``(G, m, out)``, ``x`` ``(G, m, in)``: the weight's gradient,
    ``(out, in)`` when shared, else ``(G, out, in)``."""
    if shared:
        return gy.reshape(-1, gy.shape[-1]).mT @ x.reshape(-1, x.shape[-1])
    if gy.shape[1] == 1:  # one row per group (per-sample copies): an outer product
        return gy.mT * x
    if gy.shape[1] <= 4:  # a few rows: faster than bmm's many tiny products (measured)
        return (gy.unsqueeze(-1) * x.unsqueeze(-2)).sum(1)
    return torch.bmm(gy.mT, x)


def _times(x: Tensor, weight: Tensor) -> Tensor:
    """``x W`` for ``x`` ``(G, m, out)``, ``W`` ``(out, in)`` or ``(G, out, in)`` (the cotangent
    of ``_lin``'s input), with one product for tied copies (:func:`_tied`)."""
    weight = _tied(weight) if weight.dim() == 3 else weight
    return x @ weight if weight.dim() == 2 else torch.bmm(x, weight)


def _rowsum(t: Tensor, shared: bool) -> Tensor:
    """The bias's gradient from ``t`` ``(G, m, out)``: ``(out,)`` or ``(G, out)``."""
    return t.sum((0, 1)) if shared else t.sum(1)


def _jet_forward(inputs: Tensor, scale: Tensor, depth: int, params: Sequence[Tensor]
                 ) -> tuple[tuple[Tensor, Tensor, Tensor], list[Any]]:
    """:meth:`HelmholtzNet.jet_autograd`'s arithmetic on stacked tensors, plus what the backward
    pass needs.

    Rows are split into ``G`` groups (``G = 1`` for shared weights); the value and the first
    and second derivatives of each layer's output are stacked as ``H`` ``(G, 3, n, width)`` so
    that one matrix product serves all three.
    """
    lower, upper = params[:2 * depth], params[2 * depth:4 * depth]
    w_out, b_out = params[4 * depth], params[4 * depth + 1]
    shared = w_out.dim() == 2
    groups = 1 if shared else w_out.shape[0]
    h0 = inputs.reshape(groups, -1, inputs.shape[-1]) * scale
    n = h0.shape[1]
    s = h0[..., 1:]
    H: Tensor | None = None
    saved: list[Any] = []
    for i in range(depth):
        W, b = lower[2 * i], lower[2 * i + 1]
        V, c = upper[2 * i], upper[2 * i + 1]
        s_prev, s = s, _lin(s, V, c)
        if H is None:  # ∂(W h₀)/∂x = W[:, 0]·scale₀ (the same for every row); second: 0
            a = _lin(h0, W, b)
            a1 = (W[..., :, 0] * scale[0]).unsqueeze(-2)
            a2 = None
            h_in = h0
        else:
            A = _lin(H.reshape(groups, 3 * n, H.shape[-1]), W).view(groups, 3, n, -1)
            a = A[:, 0] + (b if shared else b.unsqueeze(1))
            a1, a2 = A[:, 1], A[:, 2]
            h_in = H
        sig = torch.sigmoid(a)
        om = 1.0 - sig
        q = sig * om  # σ'
        aq = a * q
        d1 = sig + aq  # swish' = σ + aσ'
        omt = om - sig  # 1 − 2σ
        x = a * omt
        d2 = q * (x + 2.0)  # swish'' = σ'(2 + a(1 − 2σ))
        t = d2 * a1
        p2 = t * a1 if a2 is None else torch.addcmul(t * a1, d1, a2)
        P = torch.stack([a * sig, d1 * a1, p2], 1)
        H = P * s.unsqueeze(1)
        saved.append((h_in, s_prev, s, a1, a2, q, aq, omt, x, d1, d2, t, P))
    assert H is not None
    U = _lin(H.reshape(groups, 3 * n, -1), w_out).view(groups, 3, n)
    shape = inputs.shape[:-1]
    u = (U[:, 0] + b_out).reshape(shape)
    return (u, U[:, 1].reshape(shape), U[:, 2].reshape(shape)), [H, shared, groups, n, saved]


def _jet_backward(grads: Sequence[Tensor | None], inputs: Tensor, scale: Tensor, depth: int,
                  params: Sequence[Tensor], state: list[Any], input_grad: bool
                  ) -> tuple[Tensor | None, list[Tensor]]:
    """Reverse mode through :func:`_jet_forward`: the gradients with respect to the inputs (if
    ``input_grad``) and to ``params``, for the cotangents ``grads`` of ``(u, u', u'')``.

    Per layer, with ``P = (swish(a), swish'(a)a', swish''(a)a'² + swish'(a)a'')`` and
    ``H = P ⊙ s``: ``s̄ = Σ_k H̄_k ⊙ P_k``, ``P̄ = H̄ ⊙ s``,
    ``ā = P̄₀ swish' + P̄₁ a' swish'' + P̄₂ (swish''' a'² + swish'' a'')``,
    ``ā' = P̄₁ swish' + 2 P̄₂ swish'' a'``, ``ā'' = P̄₂ swish'``; ``W̄ = Σ_k Ā_kᵀ H_k``,
    ``H̄_in = Ā W``, with ``swish''' = σ'((1 − 2σ)(3 + a(1 − 2σ)) − 2aσ')``. Only the value is
    propagated when ``u'`` and ``u''`` have no cotangent.
    """
    H, shared, groups, n, saved = state
    lower, upper = params[:2 * depth], params[2 * depth:4 * depth]
    w_out = params[4 * depth]
    K = 1 if grads[1] is None and grads[2] is None else 3
    gU = torch.stack([H.new_zeros(()).expand(groups, n) if g is None
                      else g.reshape(groups, n) for g in grads[:K]], 1)  # (G, K, n)
    out: list[Tensor | None] = [None] * len(params)
    Hk = H if K == 3 else H[:, :1]
    out[4 * depth] = _wgrad(gU.reshape(groups, K * n, 1), Hk.reshape(groups, K * n, -1), shared)
    out[4 * depth + 1] = gU[:, 0].sum().reshape(1) if shared else gU[:, 0].sum(1, keepdim=True)
    Hbar = gU.unsqueeze(-1) * (w_out if shared else w_out.unsqueeze(1))  # (G, K, n, width)
    s_next: Tensor | None = None
    h0bar: Tensor | None = None
    for i in reversed(range(depth)):
        h_in, s_prev, s, a1, a2, q, aq, omt, x, d1, d2, t, P = saved[i]
        W, V = lower[2 * i], upper[2 * i]
        sbar = (Hbar * (P if K == 3 else P[:, :1])).sum(1)
        if s_next is not None:
            sbar = sbar + s_next
        Pbar = Hbar * s.unsqueeze(1)
        if K == 1:
            abar = Pbar[:, 0] * d1
            Abar = abar.unsqueeze(1)
        else:
            p0, p1, p2 = Pbar.unbind(1)
            d3 = q * torch.sub(omt * (x + 3.0), aq, alpha=2.0)  # swish'''
            t3 = d3 * a1 * a1 if a2 is None else torch.addcmul(d3 * a1 * a1, d2, a2)
            abar = torch.addcmul(torch.addcmul(p0 * d1, p1, t), p2, t3)
            a1bar = torch.addcmul(p1 * d1, p2, t, value=2.0)
            Abar = torch.stack([abar, a1bar, p2 * d1], 1) if i else abar.unsqueeze(1)
        if i == 0:
            gW = _wgrad(abar, h_in, shared)
            if K == 3:
                gW[..., :, 0] += scale[0] * _rowsum(a1bar, shared)
            if input_grad:
                h0bar = _times(abar, W)
        else:
            kk = Abar.shape[1]
            flat = Abar.reshape(groups, kk * n, -1)
            Hk = h_in if kk == 3 else h_in[:, :1]
            gW = _wgrad(flat, Hk.reshape(groups, kk * n, -1), shared)
            Hbar = _times(flat, W).view(groups, kk, n, -1)
        out[2 * i], out[2 * i + 1] = gW, _rowsum(abar, shared)
        out[2 * depth + 2 * i] = _wgrad(sbar, s_prev, shared)
        out[2 * depth + 2 * i + 1] = _rowsum(sbar, shared)
        if i or input_grad:
            s_next = _times(sbar, V)
    zbar = None
    if input_grad:
        assert h0bar is not None and s_next is not None
        h0bar[..., 1:] += s_next
        zbar = (h0bar * scale).reshape(inputs.shape)
    return zbar, out  # type: ignore[return-value]


class _FusedJet(torch.autograd.Function):
    """:meth:`HelmholtzNet.jet` as one autograd node: forward without recording, backward by
    :func:`_jet_backward` (one pass of hand-written reverse mode instead of autograd's node per
    operation). Inputs ``(inputs, input_scale, depth, *params)``; outputs ``(u, u', u'')``."""

    @staticmethod
    def forward(ctx: Any, inputs: Tensor, scale: Tensor, depth: int,
                *params: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        outs, state = _jet_forward(inputs, scale, depth, params)
        ctx.save_for_backward(inputs, scale, *params)
        ctx.depth, ctx.state = depth, state
        ctx.set_materialize_grads(False)
        return outs

    @staticmethod
    def backward(ctx: Any, *grads: Tensor | None) -> tuple[Tensor | None, ...]:
        if torch.is_grad_enabled():  # create_graph=True: the hand-written pass has no graph
            raise RuntimeError("HelmholtzNet's fused jet is differentiable once; build the "
                               "network with fused=False for higher derivatives")
        inputs, scale, *params = ctx.saved_tensors
        if all(g is None for g in grads):
            return (None,) * (3 + len(params))
        zbar, pbar = _jet_backward(grads, inputs, scale, ctx.depth, params, ctx.state,
                                   ctx.needs_input_grad[0])
        keep = ctx.needs_input_grad[3:]
        return (zbar, None, None, *(g if k else None for g, k in zip(pbar, keep, strict=True)))


def helmholtz_residual(net: Callable[..., Any], inputs: Tensor) -> tuple[Tensor, Tensor]:
    """``(r, u)`` with ``r = ∂²u/∂x² + k²u`` per row, ``k = inputs[..., 2]``.

    ``net`` is a :class:`HelmholtzNet` or the functional stand-in for one that
    :class:`~ccnn.hard.tanabe.Tanabe` passes; ``net(inputs, derivatives=True)`` gives the jet.
    """
    u, _, u_xx = net(inputs, derivatives=True)
    return u_xx + inputs[..., 2].square() * u, u


def _residuals(net: Callable[..., Any], inputs: Tensor, constraints: int = 1
               ) -> tuple[Tensor, Tensor]:
    """``(r, u)``: ``r`` ``(B,)`` for one constraint, else ``(B, M)`` - the residual at ``x + δ_j``,
    ``δ_j = 0.01·j`` (the equation holds everywhere, so each shift is a distinct constraint);
    ``u`` ``(B,)`` at the unshifted ``x``. One forward pass in all cases."""
    if constraints == 1:
        return helmholtz_residual(net, inputs)
    shifts = 0.01 * torch.arange(constraints, dtype=inputs.dtype, device=inputs.device)
    z = inputs.unsqueeze(1).repeat(1, constraints, 1)
    z[..., 0] += shifts
    r, u = helmholtz_residual(net, z)
    return r, u[:, 0]


# ---- configuration ----------------------------------------------------------------------------


@dataclass(frozen=True)
class HelmholtzConfig:
    """Settings of ``ccnn helmholtz`` (the paper's where it gives them).

    Attributes:
        methods: any of :data:`METHODS` (default :data:`DEFAULT_METHODS`, all but ``kkt``).
            ``projection`` shares the unconstrained run's training
            (same seed, the original is never influenced) and projects a clone after each epoch.
        epochs: training epochs (paper: 40; the default keeps the run under 10 minutes on 2 CPU
            cores, see docs/helmholtz.md).
        batch_size: paper: 100.
        lr: constant, for all methods. The paper's 0.001 over 40 epochs does not fit in the
            10-minute budget: 10 epochs at 0.001 left the data loss at 4.11 (the targets'
            variance is 4.53), so the default is 0.01 (docs/helmholtz.md).
        optimizer: ``"adam"`` (default) or ``"sgd"`` (the forward-Euler step of Tanabe's
            dynamics; the paper does not name its optimizer).
        width, depth: the network of Fig. 6 (width 11, depth 3: 639 parameters).
        waves_per_axis, points: training data, 10³ waves × 50 points.
        test_points: points of the test wave (A = 1, k = 1, φ = 0), paper: 500.
        soft_weight: λ of the soft penalty ``mean f + λ Σ_i r_i²``; None means 1/batch_size.
        lagrangian_rho: ρ of the Lagrangian (augmented term and dual step); None means
            2/batch_size, whose augmented term ``(ρ/2) Σ r²`` is the soft penalty.
        kkt_correction, kkt_rtol, kkt_maxit: the KKT step's share of the residual removed per
            step (1: the paper's Eq. 5) and its MINRES-QLP tolerance and iteration cap (those
            of ``ccnn pose``). The KKT step is plain (projected) SGD with learning rate ``lr``.
        huber_delta: δ of the Huber reduction of the reduction version.
        coupling: the full version's ``"batch"`` or ``"sample"`` system (see ccnn.hard.tanabe).
        batched_params: Jacobians from one pass over parameter copies (default) instead of
            ``vmap`` (full) or one backward pass per gradient (reduction); see ccnn.hard.tanabe.
        solver: multiplier solver of :class:`~ccnn.hard.tanabe.Tanabe`.
        projection_points, projection_lr, projection_batch, projection_threshold: the projection
            data (the test wave on 100 points), learning rate 1e-4, batch 50, threshold 1e-3 on
            the mean squared residual (the paper's settings).
        projection_max_steps: cap per projection (the paper needed ~6000 steps on average).
        projection_check_every: steps between checks of the threshold.
        keep_data: also project the final model with these data-keeping variants
            (``"penalty"``, ``"constraint"``; see ccnn.hard.posthoc).
        keep_data_weight: the penalty variant's weight on the data loss.
        seed: model initialisation, data and batch order (the same for every method).
        dtype: ``"float32"`` or ``"float64"``.
    """

    methods: tuple[str, ...] = DEFAULT_METHODS
    epochs: int = 10
    batch_size: int = 100
    lr: float = 1e-2
    optimizer: str = "adam"
    width: int = 11
    depth: int = 3
    waves_per_axis: int = 10
    points: int = 50
    test_points: int = 500
    soft_weight: float | None = None
    lagrangian_rho: float | None = None
    kkt_correction: float = 1.0
    kkt_rtol: float = 1e-4
    kkt_maxit: int = 20
    huber_delta: float = 1.0
    coupling: str = "batch"
    batched_params: bool = True
    solver: str = "auto"
    projection_points: int = 100
    projection_lr: float = 1e-4
    projection_batch: int = 50
    projection_threshold: float = 1e-3
    projection_max_steps: int = 1500
    projection_check_every: int = 10
    keep_data: tuple[str, ...] = ("penalty", "constraint")
    keep_data_weight: float = 1.0
    seed: int = 0
    dtype: str = "float32"

    def __post_init__(self) -> None:
        bad = [m for m in self.methods if m not in METHODS]
        if bad or not self.methods:
            raise ValueError(f"methods must be a non-empty subset of {METHODS}, got "
                             f"{self.methods!r}")
        for name in ("epochs", "batch_size", "width", "depth", "waves_per_axis", "points",
                     "projection_batch", "projection_check_every", "kkt_maxit"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        for name in ("test_points", "projection_points"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 2:
                raise ValueError(f"{name} must be an int >= 2, got {value!r}")
        if isinstance(self.projection_max_steps, bool) or not isinstance(
                self.projection_max_steps, int) or self.projection_max_steps < 0:
            raise ValueError(f"projection_max_steps must be an int >= 0, got "
                             f"{self.projection_max_steps!r}")
        for name in ("lr", "projection_lr", "huber_delta", "keep_data_weight"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float) or not (
                    0 < value < math.inf):
                raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
        if self.soft_weight is not None and (isinstance(self.soft_weight, bool) or not isinstance(
                self.soft_weight, int | float) or not 0 <= self.soft_weight < math.inf):
            raise ValueError(f"soft_weight must be None or a number >= 0, got "
                             f"{self.soft_weight!r}")
        if self.lagrangian_rho is not None and (isinstance(self.lagrangian_rho, bool) or not
                                                isinstance(self.lagrangian_rho, int | float)
                                                or not 0 < self.lagrangian_rho < math.inf):
            raise ValueError(f"lagrangian_rho must be None or a finite number > 0, got "
                             f"{self.lagrangian_rho!r}")
        if isinstance(self.kkt_correction, bool) or not isinstance(
                self.kkt_correction, int | float) or not 0 < self.kkt_correction <= 1:
            raise ValueError(f"kkt_correction must be a number in (0, 1], got "
                             f"{self.kkt_correction!r}")
        if isinstance(self.kkt_rtol, bool) or not isinstance(self.kkt_rtol, int | float) or not (
                0 <= self.kkt_rtol < 1):
            raise ValueError(f"kkt_rtol must be a number in [0, 1), got {self.kkt_rtol!r}")
        if self.projection_threshold < 0:
            raise ValueError(f"projection_threshold must be >= 0, got "
                             f"{self.projection_threshold!r}")
        if self.optimizer not in ("adam", "sgd"):
            raise ValueError(f"optimizer must be 'adam' or 'sgd', got {self.optimizer!r}")
        if self.coupling not in ("batch", "sample"):
            raise ValueError(f"coupling must be 'batch' or 'sample', got {self.coupling!r}")
        if self.solver not in ("auto", "dense", "minres_qlp"):
            raise ValueError(f"solver must be 'auto', 'dense' or 'minres_qlp', got "
                             f"{self.solver!r}")
        if any(k not in ("penalty", "constraint") for k in self.keep_data):
            raise ValueError(f"keep_data must hold 'penalty' and/or 'constraint', got "
                             f"{self.keep_data!r}")
        if self.dtype not in ("float32", "float64"):
            raise ValueError(f"dtype must be 'float32' or 'float64', got {self.dtype!r}")

    @property
    def torch_dtype(self) -> torch.dtype:
        return torch.float64 if self.dtype == "float64" else torch.float32


# ---- one training step per method -------------------------------------------------------------


Step = Callable[[Tensor, Tensor, Tensor], tuple[Tensor, Tensor]]


def _optimizer(name: str, model: nn.Module, lr: float, *, correction: float = 1.0,
               rtol: float = 1e-4, maxit: int = 20) -> torch.optim.Optimizer:
    """``"sgd"``, ``"adam"`` or ``"hard-sgd"`` (the KKT step, :class:`ccnn.hard.HardSGD`)."""
    if name == "hard-sgd":
        return HardSGD(model, lr=lr, rtol=rtol, maxit=maxit, correction=correction)
    if name == "sgd":
        return torch.optim.SGD(model.parameters(), lr=lr)
    return torch.optim.Adam(model.parameters(), lr=lr)


def make_step(method: str, model: HelmholtzNet, opt: torch.optim.Optimizer, *,
              batch_size: int, soft_weight: float | None = None, huber_delta: float = 1.0,
              coupling: str = "batch", batched_params: bool = True, solver: str = "auto",
              pool_size: int | None = None, constraints: int = 1,
              lagrangian_rho: float | None = None) -> Step:
    """One training step of ``method``: ``step(inputs, targets, index) -> (f, r)``.

    ``f`` is the batch's mean squared error and ``r`` the residuals ``(B,)`` / ``(B, M)``, both
    detached and evaluated before the step. Every method evaluates the residual of its batch
    (the curves of Fig. 10 need it), so the timings compare the same work apart from the
    constraint handling; ``"bare"`` is the unconstrained step without it. ``"lagrangian"``
    needs ``pool_size`` (one multiplier per sample, ``index`` names the batch's samples);
    ``"kkt"`` needs ``opt`` to be a :class:`~ccnn.hard.HardSGD`.
    """

    def fn(net: Callable[..., Any], z: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        r, u = _residuals(net, z, constraints)
        return (u - y).square(), r

    if method == "bare":
        def bare(z: Tensor, y: Tensor, index: Tensor) -> tuple[Tensor, Tensor]:
            opt.zero_grad(set_to_none=True)
            f = (model(z) - y).square().mean()
            f.backward()
            opt.step()
            return f.detach(), z.new_zeros(0)
        return bare
    if method in ("unconstrained", "projection", "soft"):
        weight = 0.0 if method != "soft" else (1.0 / batch_size if soft_weight is None
                                               else soft_weight)

        def plain(z: Tensor, y: Tensor, index: Tensor) -> tuple[Tensor, Tensor]:
            opt.zero_grad(set_to_none=True)
            f, r = fn(model, z, y)
            fbar = f.mean()
            loss = fbar + weight * r.square().sum() if weight else fbar
            loss.backward()
            opt.step()
            return fbar.detach(), r.detach()
        return plain
    if method == "lagrangian":
        return _lagrangian_step(model, opt, fn, batch_size, pool_size, constraints,
                                lagrangian_rho)
    if method == "kkt":
        return _kkt_step(opt, constraints)
    if method == "reduction":
        tanabe = Tanabe(model, version="reduction", reduction="huber", huber_delta=huber_delta,
                        solver=solver, batched_params=batched_params)  # type: ignore[arg-type]
        pool = None
    elif method == "full":
        tanabe = Tanabe(model, version="full", coupling=coupling, solver=solver,
                        pool_size=pool_size, batched_params=batched_params)  # type: ignore
        pool = pool_size
    else:
        raise ValueError(f"method must be one of {METHODS} or 'bare', got {method!r}")

    def constrained(z: Tensor, y: Tensor, index: Tensor) -> tuple[Tensor, Tensor]:
        opt.zero_grad(set_to_none=True)
        step = tanabe(fn, z, y, index=index if pool is not None else None)
        step.backward()  # what step.loss.backward() does, without the autograd engine
        opt.step()
        r = step.g if constraints > 1 else step.g[:, 0]
        return step.f, r

    return constrained


def _lagrangian_step(model: HelmholtzNet, opt: torch.optim.Optimizer,
                     fn: Callable[..., tuple[Tensor, Tensor]], batch_size: int,
                     pool_size: int | None, constraints: int, rho: float | None) -> Step:
    """The augmented Lagrangian step and the dual ascent of the batch's multipliers (Eq. 4 of
    Márquez-Neila, Salzmann and Fua 2017, the method of multipliers)."""
    if pool_size is None:
        raise ValueError("method 'lagrangian' needs pool_size (one multiplier per sample)")
    rho = 2.0 / batch_size if rho is None else rho
    dtype = next(model.parameters()).dtype
    multipliers = IndexedMultipliers(pool_size, constraints, dtype=dtype)
    dual = DualAscent(multipliers, rho=rho)

    def step(z: Tensor, y: Tensor, index: Tensor) -> tuple[Tensor, Tensor]:
        opt.zero_grad(set_to_none=True)
        f, r = fn(model, z, y)
        fbar = f.mean()
        C = r.reshape(r.shape[0], -1)
        lagrangian(fbar, C, multipliers(index), rho_aug=rho).backward()
        opt.step()
        dual.step(index, C.detach())
        return fbar.detach(), r.detach()

    return step


def _kkt_step(opt: torch.optim.Optimizer, constraints: int) -> Step:
    """The KKT hard step (Eq. 5 of Márquez-Neila, Salzmann and Fua 2017) on the batch's
    residuals, by :class:`~ccnn.hard.HardSGD`."""
    if not isinstance(opt, HardSGD):
        raise ValueError(f"method 'kkt' needs a HardSGD optimizer, got {type(opt).__name__}")

    def step(z: Tensor, y: Tensor, index: Tensor) -> tuple[Tensor, Tensor]:
        result = opt.step(lambda net: (net(z) - y).square().mean(),
                          lambda net: _residuals(net, z, constraints)[0])
        r = result.constraint_values
        r = r if constraints == 1 else r.view(z.shape[0], constraints)
        return torch.tensor(result.loss_value, dtype=z.dtype), r

    return step


# ---- training ---------------------------------------------------------------------------------


_QUANTILES = (0.0, 0.05, 0.25, 0.5, 0.75, 0.95, 1.0)


@torch.no_grad()
def _evaluate(model: HelmholtzNet, inputs: Tensor, targets: Tensor) -> dict[str, Any]:
    r, u = helmholtz_residual(model, inputs)
    return {"mse": float((u - targets).square().mean()),
            "residual_median": float(r.abs().median()),
            "constraint_error": float(r.square().mean())}


def _quantiles(values: Tensor) -> dict[str, float]:
    q = torch.quantile(values.double(), torch.tensor(_QUANTILES, dtype=torch.float64))
    return {f"{p:g}": float(v) for p, v in zip(_QUANTILES, q, strict=True)}


def _curve(values: Tensor) -> list[float]:
    """A 1-D tensor as a list of floats with 6 significant digits (compact JSON)."""
    return [float(f"{v:.6g}") for v in values.tolist()]


def _fn_mse(net: Callable[..., Any], z: Tensor, y: Tensor) -> Tensor:
    return (net(z) - y).square()


def _fn_residual(net: Callable[..., Any], z: Tensor) -> Tensor:
    return helmholtz_residual(net, z)[0]


def _project(model: HelmholtzNet, cfg: HelmholtzConfig, proj: tuple[Tensor, Tensor],
             train: tuple[Tensor, Tensor], seed: int, keep: str | None = None,
             test: tuple[Tensor, Tensor] | None = None) -> tuple[HelmholtzNet, dict[str, Any]]:
    """Project a clone of ``model`` onto the constraint on the projection data (§3)."""
    path: list[list[float]] = []

    def record(step: int, clone: nn.Module) -> None:
        if test is not None:
            with torch.no_grad():
                path.append(_curve(clone(test[0])))

    result = nonlinear_projection(
        model, _fn_residual, (proj[0],), lr=cfg.projection_lr, batch_size=cfg.projection_batch,
        threshold=cfg.projection_threshold, max_steps=cfg.projection_max_steps,
        check_every=cfg.projection_check_every, optimizer=cfg.optimizer, keep_data=keep,
        data_loss=_fn_mse, train_data=train, data_batch_size=cfg.batch_size,
        data_weight=cfg.keep_data_weight, generator=torch.Generator().manual_seed(seed),
        callback=record if test is not None else None)
    rep: ProjectionReport = result.report
    out = {k: v for k, v in asdict(rep).items() if k != "history"}
    stride = max(1, math.ceil((len(rep.history) - 1) / 50))  # at most 51 entries in the JSON
    out["history"] = [list(h) for h in rep.history[:-1:stride]] + [list(rep.history[-1])]
    out["projection_data"] = _evaluate(result.model, *proj)
    if test is not None:  # at most 16 curves: every k-th check and the last
        stride = max(1, math.ceil((len(path) - 1) / 15))
        out["path"] = path[:-1:stride] + path[-1:]
        out["path_steps"] = [*[h[0] for h in rep.history][:-1:stride], rep.history[-1][0]]
    return result.model, out  # type: ignore[return-value]


def _train(method: str, cfg: HelmholtzConfig, train: tuple[Tensor, Tensor],
           test: tuple[Tensor, Tensor], proj: tuple[Tensor, Tensor], project: bool,
           progress: bool) -> dict[str, Any]:
    dtype = cfg.torch_dtype
    model = HelmholtzNet(cfg.width, cfg.depth, generator=torch.Generator().manual_seed(cfg.seed),
                         dtype=dtype)
    opt = _optimizer("hard-sgd" if method == "kkt" else cfg.optimizer, model, cfg.lr,
                     correction=cfg.kkt_correction, rtol=cfg.kkt_rtol, maxit=cfg.kkt_maxit)
    n = train[0].shape[0]
    step = make_step(method, model, opt, batch_size=cfg.batch_size,
                     soft_weight=cfg.soft_weight, huber_delta=cfg.huber_delta,
                     coupling=cfg.coupling, batched_params=cfg.batched_params,
                     solver=cfg.solver, pool_size=n, lagrangian_rho=cfg.lagrangian_rho)
    order = torch.Generator().manual_seed(cfg.seed + 1)
    steps_per_epoch = math.ceil(n / cfg.batch_size)
    rec: dict[str, Any] = {"data_loss": [], "residual_quantiles": [], "test": [],
                           "seconds_per_iter": [], "parameters": sum(
                               p.numel() for p in model.parameters())}
    projections: list[dict[str, Any]] = []
    snapshots: dict[int, list[float]] = {}
    with ProgressBar(progress, cfg.epochs * steps_per_epoch, method) as update:
        for epoch in range(cfg.epochs):
            perm = torch.randperm(n, generator=order)
            fs, rs, seconds = [], [], 0.0
            for b in range(steps_per_epoch):
                idx = perm[b * cfg.batch_size:(b + 1) * cfg.batch_size]
                start = time.perf_counter()
                f, r = step(train[0][idx], train[1][idx], idx)
                seconds += time.perf_counter() - start
                fs.append(f)
                rs.append(r.abs())
                if progress:
                    update({"loss": float(f)})
            rec["data_loss"].append(float(torch.stack(fs).mean()))
            rec["residual_quantiles"].append(_quantiles(torch.cat(rs)))
            rec["test"].append(_evaluate(model, *test))
            rec["seconds_per_iter"].append(seconds / steps_per_epoch)
            if not math.isfinite(rec["data_loss"][-1]):
                log.warning("%s diverged in epoch %d", method, epoch + 1)
            if project:
                before = {"projection_data": _evaluate(model, *proj)}
                last = epoch + 1 == cfg.epochs
                clone, info = _project(model, cfg, proj, train, cfg.seed + 100 + epoch,
                                       test=test if last else None)
                if epoch + 1 in (1, (cfg.epochs + 1) // 2, cfg.epochs):  # drawn in Fig. 13
                    with torch.no_grad():
                        snapshots[epoch + 1] = [_curve(model(test[0])), _curve(clone(test[0]))]
                projections.append({"epoch": epoch + 1, "before": before, "after": info})
            log.info("%s epoch %d: data loss %.4g, median |r| %.4g", method, epoch + 1,
                     rec["data_loss"][-1], rec["residual_quantiles"][-1]["0.5"])
    with torch.no_grad():
        rec["test_prediction"] = _curve(model(test[0]))
    rec["seconds_per_iter_mean"] = statistics.fmean(rec["seconds_per_iter"])
    if project:
        rec["projection"] = projections
        rec["projection_snapshots"] = {str(k): v for k, v in snapshots.items()}
        variants = {}
        for keep in cfg.keep_data:
            clone, info = _project(model, cfg, proj, train, cfg.seed + 999, keep=keep)
            with torch.no_grad():
                info["test_prediction"] = _curve(clone(test[0]))
            variants[keep] = info
        rec["keep_data"] = variants
    return rec


def _thin_curves(result: dict[str, Any], points: int) -> None:
    """Keep ``points`` of the test-wave curves (endpoints included) in ``result``, in place.

    The figures are drawn at full resolution first; the JSON keeps the thinned curves and
    ``test_x`` to match (``curve_points``)."""
    n = len(result["test_x"])
    if n <= points:
        return
    keep = sorted({round(i * (n - 1) / (points - 1)) for i in range(points)})

    def thin(curve: list[float]) -> list[float]:
        return [curve[i] for i in keep]

    result["test_x"], result["test_truth"] = thin(result["test_x"]), thin(result["test_truth"])
    for rec in result["methods"].values():
        if "test_prediction" in rec:
            rec["test_prediction"] = thin(rec["test_prediction"])
        for info in rec.get("keep_data", {}).values():
            info["test_prediction"] = thin(info["test_prediction"])
        for pair in rec.get("projection_snapshots", {}).values():
            pair[:] = [thin(c) for c in pair]
        for proj in rec.get("projection", []):
            if "path" in proj["after"]:
                proj["after"]["path"] = [thin(c) for c in proj["after"]["path"]]
    result["curve_points"] = len(keep)


def run_helmholtz(cfg: HelmholtzConfig, out: Path | str | None = None, *,
                  progress: bool = False) -> dict[str, Any]:
    """Train every method of ``cfg`` on the sine waves; write Figs. 10-14 analogues to ``out``.

    Returns a JSON-ready dict: per method the per-epoch data loss (mean MSE over the epoch's
    batches), quantiles of ``|r|`` over all samples of the epoch, test-wave MSE and median
    ``|r|``, seconds per iteration and the final test prediction; for ``projection`` the report
    of the projection after each epoch (before/after on the projection data) and the
    data-keeping variants on the final model. Curves on the test wave are kept at 101 of its
    points (``curve_points``; the figures use all of them).
    """
    start = time.perf_counter()
    dtype = cfg.torch_dtype
    train = make_data(cfg.waves_per_axis, cfg.points,
                      generator=torch.Generator().manual_seed(cfg.seed), dtype=dtype)
    test = sine_wave(cfg.test_points, dtype=dtype)
    proj = sine_wave(cfg.projection_points, dtype=dtype)
    runs: dict[str, dict[str, Any]] = {}
    order = [m for m in METHODS if m in cfg.methods]
    for method in order:
        if method == "projection" and "unconstrained" in runs:
            continue
        wants_projection = "projection" in cfg.methods and method in ("unconstrained",
                                                                      "projection")
        runs[method] = _train(method, cfg, train, test, proj, wants_projection, progress)
    if "projection" in cfg.methods and "projection" not in runs:
        source = runs["unconstrained"]
        runs["projection"] = {"shares_training_with": "unconstrained",
                              **{k: source.pop(k) for k in ("projection",
                                                            "projection_snapshots",
                                                            "keep_data")}}
    result: dict[str, Any] = {
        "config": asdict(cfg),
        "threads": torch.get_num_threads(),
        "test_x": _curve(test[0][:, 0]),
        "test_truth": _curve(test[1]),
        "methods": runs,
    }
    if out is not None:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        result["figures"] = [str(p) for p in plot_helmholtz(result, out)]
    _thin_curves(result, 101)
    result["seconds"] = time.perf_counter() - start
    return result


# ---- timing (Figs. 7-9) ------------------------------------------------------------------------


def parameter_count(width: int, depth: int = 3) -> int:
    """Parameters of :class:`HelmholtzNet` (``4w² + 14w + 1`` at depth 3)."""
    lower = 5 * width + (depth - 1) * (width * width + width) + width + 1
    upper = 4 * width + (depth - 1) * (width * width + width)
    return lower + upper


def _time_setting(methods: Sequence[str], *, batch_size: int, width: int, constraints: int,
                  steps: int, repeats: int, seed: int, dtype: torch.dtype, batched_params: bool,
                  solver: str, data: tuple[Tensor, Tensor]) -> dict[str, dict[str, Any]]:
    """Seconds per training step of each method at one setting, interleaved over repeats."""
    n = data[0].shape[0]
    gen = torch.Generator().manual_seed(seed + 1)
    batches = [torch.randperm(n, generator=gen)[:batch_size] for _ in range(4)]
    runners = {}
    for method in methods:
        model = HelmholtzNet(width, 3, generator=torch.Generator().manual_seed(seed),
                             dtype=dtype)
        base, _, variant = method.partition(":")
        opt = _optimizer("hard-sgd" if base == "kkt" else "adam", model, 1e-3)
        runners[method] = make_step(
            base, model, opt, batch_size=batch_size, batched_params=batched_params,
            solver=variant or solver, pool_size=n, constraints=constraints)  # type: ignore
    samples: dict[str, list[float]] = {m: [] for m in methods}
    cpu: dict[str, list[float]] = {m: [] for m in methods}
    for rep in range(repeats + 1):  # the first round warms up and is not kept
        for method, step in runners.items():
            start, start_cpu = time.perf_counter(), time.process_time()
            for i in range(steps if rep else 2):
                idx = batches[i % len(batches)]
                step(data[0][idx], data[1][idx], idx)
            if rep:
                samples[method].append((time.perf_counter() - start) / steps)
                cpu[method].append((time.process_time() - start_cpu) / steps)
    out = {}
    for method, values in samples.items():
        mean = statistics.fmean(values)
        sd = statistics.stdev(values) if len(values) > 1 else 0.0
        half = 1.96 * sd / math.sqrt(len(values))
        out[method] = {"seconds_per_iter": statistics.median(values), "mean": mean,
                       "ci95": [mean - half, mean + half], "samples": values,
                       "cpu_seconds_per_iter": statistics.median(cpu[method])}
    return out


def run_timing(
    out: Path | str | None = None,
    *,
    batch_sizes: Sequence[int] = (10, 30, 100, 200),
    widths: Sequence[int] = (5, 8, 11, 16, 23),
    constraints: Sequence[int] = (1, 2, 4, 8),
    batch_size: int = 100,
    width: int = 11,
    steps: int = 20,
    repeats: int = 7,
    methods: Sequence[str] = TIMED,
    headline_extra: Sequence[str] = TIMED_EXTRA,
    seed: int = 0,
    dtype: str = "float32",
    batched_params: bool = True,
    solver: str = "auto",
    progress: bool = False,
) -> dict[str, Any]:
    """Seconds per training iteration against batch size, model size and number of constraints.

    The analogue of Figs. 7-9 of Jergensen (2019). The headline ``methods`` block is measured at
    ``batch_size`` (100), ``width`` (11: 639 parameters) and one constraint with twice the
    repeats; each sweep varies one of the three from there. Every step is a full training step
    (residual of the batch, gradient, Adam update; the KKT step's own update); the methods are
    interleaved within each repeat so that a busy machine slows them alike. Also measured at
    the headline setting only: ``headline_extra`` (subset of :data:`TIMED_EXTRA`, reported
    with ``methods``), ``"bare"`` (the unconstrained step without computing the residual) and
    the full version with MINRES-QLP (``"full:minres_qlp"``). Sweep values that are empty are
    skipped.
    """
    for name, values in (("batch_sizes", batch_sizes), ("widths", widths),
                         ("constraints", constraints)):
        if any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in values):
            raise ValueError(f"{name} must be ints >= 1, got {values!r}")
    bad = [m for m in methods if m not in TIMED]
    if bad or not methods:
        raise ValueError(f"methods must be a non-empty subset of {TIMED}, got {methods!r}")
    if any(m not in TIMED_EXTRA for m in headline_extra):
        raise ValueError(f"headline_extra must be a subset of {TIMED_EXTRA}, got "
                         f"{headline_extra!r}")
    for name, value in (("batch_size", batch_size), ("width", width), ("steps", steps),
                        ("repeats", repeats)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    if dtype not in ("float32", "float64"):
        raise ValueError(f"dtype must be 'float32' or 'float64', got {dtype!r}")
    start = time.perf_counter()
    tdtype = torch.float64 if dtype == "float64" else torch.float32
    data = make_data(generator=torch.Generator().manual_seed(seed), dtype=tdtype)
    common = {"steps": steps, "seed": seed, "dtype": tdtype, "batched_params": batched_params,
              "solver": solver, "data": data}
    extra = ["bare", *methods, *headline_extra]
    if "full" in methods:
        extra.append("full:minres_qlp")
    settings = [("headline", batch_size, width, 1, extra, 2 * repeats)]
    settings += [("batch_size", b, width, 1, list(methods), repeats) for b in batch_sizes]
    settings += [("width", batch_size, w, 1, list(methods), repeats) for w in widths]
    settings += [("constraints", batch_size, width, m, list(methods), repeats)
                 for m in constraints]
    sweeps: dict[str, Any] = {
        "batch_size": {"values": list(batch_sizes), "methods": {m: [] for m in methods}},
        "parameters": {"values": [parameter_count(w) for w in widths], "widths": list(widths),
                       "methods": {m: [] for m in methods}},
        "constraints": {"values": list(constraints), "methods": {m: [] for m in methods}},
    }
    headline: dict[str, Any] = {}
    with ProgressBar(progress, len(settings), "timing") as update:
        for kind, b, w, m, which, reps in settings:
            got = _time_setting(which, batch_size=b, width=w, constraints=m, repeats=reps,
                                **common)  # type: ignore[arg-type]
            if kind == "headline":
                headline = got
            else:
                key = "parameters" if kind == "width" else kind
                for method in methods:
                    sweeps[key]["methods"][method].append(got[method])
            log.info("timing %s b=%d w=%d m=%d: %s", kind, b, w, m,
                     {k: round(v["seconds_per_iter"] * 1e3, 2) for k, v in got.items()})
            if progress:
                update({})
    base = headline["unconstrained"]["seconds_per_iter"] if "unconstrained" in headline \
        else None
    bare = headline["bare"]["seconds_per_iter"]

    def ratios(rec: dict[str, Any]) -> dict[str, float | None]:
        unc = headline.get("unconstrained")
        cpu, cpu_bare = rec["cpu_seconds_per_iter"], headline["bare"]["cpu_seconds_per_iter"]
        return {"ratio_to_unconstrained": rec["seconds_per_iter"] / base if base else None,
                "ratio_to_bare": rec["seconds_per_iter"] / bare,
                "cpu_ratio_to_unconstrained": (cpu / unc["cpu_seconds_per_iter"]
                                               if unc and unc["cpu_seconds_per_iter"] else None),
                "cpu_ratio_to_bare": cpu / cpu_bare if cpu_bare else None}

    result: dict[str, Any] = {
        "setting": {"batch_size": batch_size, "parameters": parameter_count(width),
                    "width": width, "constraints": 1, "steps": steps, "repeats": 2 * repeats,
                    "dtype": dtype, "batched_params": batched_params, "solver": solver,
                    "optimizer": "adam (kkt: HardSGD)", "threads": torch.get_num_threads(),
                    "clock": "wall (time.perf_counter), median over repeats; "
                             "cpu_seconds_per_iter: process CPU time, median"},
        "methods": {m: {**headline[m], **ratios(headline[m])}
                    for m in (*methods, *headline_extra)},
        "bare": headline["bare"],
        "sweeps": sweeps,
    }
    if "full:minres_qlp" in headline:
        result["full_minres_qlp"] = headline["full:minres_qlp"]
    if out is not None:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        result["figures"] = [str(p) for p in plot_timing(result, out)]
    result["seconds"] = time.perf_counter() - start
    return result


# ---- figures ----------------------------------------------------------------------------------

_COLORS = {"unconstrained": "tab:blue", "soft": "tab:orange", "reduction": "tab:green",
           "lagrangian": "tab:olive", "kkt": "tab:cyan",
           "full": "tab:red", "projection": "tab:purple"}


def plot_timing(result: dict[str, Any], out: Path) -> list[Path]:
    """Figs. 7-9: seconds per iteration against batch size, parameters and constraints."""
    from matplotlib.figure import Figure

    paths = []
    titles = {"batch_size": ("fig7_batch_size", "batch size"),
              "parameters": ("fig8_parameters", "trainable parameters"),
              "constraints": ("fig9_constraints", "constraint functions")}
    for key, (name, label) in titles.items():
        sweep = result["sweeps"][key]
        if not sweep["values"]:
            continue
        fig = Figure(figsize=(5.5, 4))
        ax = fig.subplots()
        for method, rows in sweep["methods"].items():
            y = [r["seconds_per_iter"] for r in rows]
            lo = [r["ci95"][0] for r in rows]
            hi = [r["ci95"][1] for r in rows]
            ax.plot(sweep["values"], y, "o-", color=_COLORS.get(method), label=method)
            ax.fill_between(sweep["values"], lo, hi, color=_COLORS.get(method), alpha=0.2)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel(label)
        ax.set_ylabel("seconds per iteration")
        ax.set_title(f"time per iteration vs {label}")
        ax.legend()
        fig.tight_layout()
        path = out / f"helmholtz_{name}.png"
        fig.savefig(path, dpi=110)
        paths.append(path)
    return paths


def plot_helmholtz(result: dict[str, Any], out: Path) -> list[Path]:
    """Figs. 10-14 analogues: curves, test predictions, projection before/after and its path."""
    from matplotlib.figure import Figure

    paths = []
    runs = result["methods"]
    x = result["test_x"]
    truth = result["test_truth"]
    trained = {m: r for m, r in runs.items() if "data_loss" in r}
    if trained:  # Fig. 10: data loss and |r| distribution per epoch
        fig = Figure(figsize=(11, 4))
        ax1, ax2 = fig.subplots(1, 2)
        for m, r in trained.items():
            epochs = range(1, len(r["data_loss"]) + 1)
            ax1.plot(epochs, r["data_loss"], color=_COLORS.get(m), label=m)
            q = r["residual_quantiles"]
            ax2.plot(epochs, [v["0.5"] for v in q], color=_COLORS.get(m), label=m)
            ax2.fill_between(epochs, [v["0.25"] for v in q], [v["0.75"] for v in q],
                             color=_COLORS.get(m), alpha=0.25)
            ax2.plot(epochs, [v["0"] for v in q], "--", color=_COLORS.get(m), lw=0.6)
            ax2.plot(epochs, [v["1"] for v in q], "--", color=_COLORS.get(m), lw=0.6)
        ax1.set_yscale("log")
        ax1.set_xlabel("epoch")
        ax1.set_ylabel("data loss (MSE)")
        ax1.legend()
        ax2.set_yscale("log")
        ax2.set_xlabel("epoch")
        ax2.set_ylabel("|residual| (median, IQR, min/max)")
        fig.tight_layout()
        paths.append(out / "helmholtz_fig10_curves.png")
        fig.savefig(paths[-1], dpi=110)
        fig = Figure(figsize=(6, 4))  # Fig. 11: test predictions
        ax = fig.subplots()
        ax.plot(x, truth, "k-.", label="ground truth")
        for m, r in trained.items():
            ax.plot(x, r["test_prediction"], color=_COLORS.get(m), label=m)
        ax.set_xlabel("x")
        ax.set_ylabel("u")
        ax.set_title("test wave A=1, k=1, φ=0")
        ax.legend()
        fig.tight_layout()
        paths.append(out / "helmholtz_fig11_test.png")
        fig.savefig(paths[-1], dpi=110)
    proj = runs.get("projection", {}).get("projection")
    if proj:
        paths.extend(_plot_projection(runs["projection"], x, truth, out, Figure))
    return paths


def _plot_projection(rec: dict[str, Any], x: list[float], truth: list[float], out: Path,
                     figure: Any) -> list[Path]:
    """Figs. 12-14 analogues for the projection after each epoch."""
    paths = []
    proj = rec["projection"]
    epochs = [p["epoch"] for p in proj]
    fig = figure(figsize=(11, 4))
    ax1, ax2 = fig.subplots(1, 2)
    ax1.plot(epochs, [p["before"]["projection_data"]["mse"] for p in proj], "o-",
             label="unprojected")
    ax1.plot(epochs, [p["after"]["projection_data"]["mse"] for p in proj], "o-",
             label="projected")
    ax2.plot(epochs, [p["before"]["projection_data"]["constraint_error"] for p in proj], "o-",
             label="unprojected")
    ax2.plot(epochs, [p["after"]["projection_data"]["constraint_error"] for p in proj], "o-",
             label="projected")
    for ax, label in ((ax1, "data loss on projection data"),
                      (ax2, "mean squared residual on projection data")):
        ax.set_yscale("log")
        ax.set_xlabel("epoch")
        ax.set_ylabel(label)
        ax.legend()
    fig.tight_layout()
    paths.append(out / "helmholtz_fig12_projection.png")
    fig.savefig(paths[-1], dpi=110)
    fig = figure(figsize=(6, 4))  # Fig. 13: before/after at a few epochs
    ax = fig.subplots()
    ax.plot(x, truth, "k-", label="ground truth")
    snaps = rec["projection_snapshots"]
    chosen = sorted(snaps, key=int)
    cmap = ["tab:blue", "tab:orange", "tab:green"]
    for color, key in zip(cmap, chosen, strict=False):
        before, after = snaps[key]
        ax.plot(x, before, "--", color=color, label=f"epoch {key} unprojected")
        ax.plot(x, after, "-", color=color, label=f"epoch {key} projected")
    keep_colors = {"penalty": "tab:purple", "constraint": "tab:brown"}
    for keep, info in rec.get("keep_data", {}).items():
        ax.plot(x, info["test_prediction"], ":", lw=2, color=keep_colors.get(keep),
                label=f"final, keep data ({keep})")
    ax.set_xlabel("x")
    ax.set_ylabel("u")
    ax.legend(fontsize=7)
    fig.tight_layout()
    paths.append(out / "helmholtz_fig13_projected_test.png")
    fig.savefig(paths[-1], dpi=110)
    last = proj[-1]["after"].get("path")
    if last:  # Fig. 14: predictions during the final projection
        fig = figure(figsize=(6, 4))
        ax = fig.subplots()
        ax.plot(x, truth, "k-", label="ground truth")
        stride = max(1, len(last) // 30)
        for i, curve in enumerate(last[::stride]):
            shade = 0.85 - 0.6 * i * stride / max(1, len(last) - 1)
            ax.plot(x, curve, "--", color=str(shade), lw=0.7)
        ax.plot(x, last[0], "-", color="tab:blue", label="before projection")
        ax.plot(x, last[-1], "-", color="tab:red", label="after projection")
        ax.set_xlabel("x")
        ax.set_ylabel("u")
        ax.legend()
        fig.tight_layout()
        paths.append(out / "helmholtz_fig14_projection_path.png")
        fig.savefig(paths[-1], dpi=110)
    return paths
