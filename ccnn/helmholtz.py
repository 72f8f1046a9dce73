"""The Helmholtz toy: sine waves under the PDE constraint ``u'' + k²u = 0``.

Jergensen, "Neural network optimization under PDE constraints" (2019), methodology and Figs. 6-14.
A network takes ``(x, A, k, φ)`` and should output ``A·sin(kx + φ)``; the constraint is the
Helmholtz residual ``r = ∂²u/∂x² + k²u`` of the network's output as a function of its input ``x``.
The methods compared:

* ``unconstrained``: mean squared error;
* ``soft``: ``MSE + (1/B) Σ_i r_i²`` (the paper's penalty weight λ = 1/B);
* ``reduction``: Tanabe's constrained backpropagation with one multiplier for the batch mean of
  the Huber error of ``r`` (Eq. 6), :class:`ccnn.hard.tanabe.Tanabe`;
* ``full``: the same with one multiplier per sample (Eq. 5, 9);
* ``projection``: the unconstrained model, and after each epoch a clone of it projected onto the
  constraint by training the clone on the mean squared residual alone (§"Nonlinear projection",
  :func:`ccnn.hard.posthoc.nonlinear_projection`), on the test wave's 100 points.

The network of Fig. 6: a lower row of dense layers with Swish activations on the input, each of
whose outputs is scaled element-wise (⊙) by the output of an upper row of affine (linear
activation) layers driven by the wave's style ``(A, k, φ)`` - a style-transfer / hypernetwork
design. ``u``, ``∂u/∂x`` and ``∂²u/∂x²`` are propagated together through the layers (Taylor mode,
:meth:`HelmholtzNet.jet`), which equals nested :func:`torch.func.jvp` (tested) at a fraction of
its cost. Every layer also accepts per-sample weights (a leading batch dimension), so that
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

from ccnn.hard.posthoc import ProjectionReport, nonlinear_projection
from ccnn.hard.tanabe import Tanabe
from ccnn.progress import ProgressBar

__all__ = [
    "METHODS",
    "TIMED",
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

METHODS = ("unconstrained", "soft", "reduction", "full", "projection")
TIMED = ("unconstrained", "soft", "reduction", "full")


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
    """

    def __init__(self, width: int = 11, depth: int = 3, *,
                 generator: torch.Generator | None = None,
                 dtype: torch.dtype = torch.float32) -> None:
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
        """
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
        methods: any of :data:`METHODS`. ``projection`` shares the unconstrained run's training
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

    methods: tuple[str, ...] = METHODS
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
                     "projection_batch", "projection_check_every"):
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


def _optimizer(name: str, model: nn.Module, lr: float) -> torch.optim.Optimizer:
    if name == "sgd":
        return torch.optim.SGD(model.parameters(), lr=lr)
    return torch.optim.Adam(model.parameters(), lr=lr)


def make_step(method: str, model: HelmholtzNet, opt: torch.optim.Optimizer, *,
              batch_size: int, soft_weight: float | None = None, huber_delta: float = 1.0,
              coupling: str = "batch", batched_params: bool = True, solver: str = "auto",
              pool_size: int | None = None, constraints: int = 1) -> Step:
    """One training step of ``method``: ``step(inputs, targets, index) -> (f, r)``.

    ``f`` is the batch's mean squared error and ``r`` the residuals ``(B,)`` / ``(B, M)``, both
    detached. Every method evaluates the residual of its batch (the curves of Fig. 10 need it),
    so the timings compare the same work apart from the constraint handling; ``"bare"`` is the
    unconstrained step without it.
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
        step.loss.backward()
        opt.step()
        r = step.g if constraints > 1 else step.g[:, 0]
        return step.f, r

    return constrained


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
    opt = _optimizer(cfg.optimizer, model, cfg.lr)
    n = train[0].shape[0]
    step = make_step(method, model, opt, batch_size=cfg.batch_size,
                     soft_weight=cfg.soft_weight, huber_delta=cfg.huber_delta,
                     coupling=cfg.coupling, batched_params=cfg.batched_params,
                     solver=cfg.solver,
                     pool_size=n)
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
        opt = _optimizer("adam", model, 1e-3)
        base, _, variant = method.partition(":")
        runners[method] = make_step(
            base, model, opt, batch_size=batch_size, batched_params=batched_params,
            solver=variant or solver, pool_size=n, constraints=constraints)  # type: ignore
    samples: dict[str, list[float]] = {m: [] for m in methods}
    for rep in range(repeats + 1):  # the first round warms up and is not kept
        for method, step in runners.items():
            start = time.perf_counter()
            for i in range(steps if rep else 2):
                idx = batches[i % len(batches)]
                step(data[0][idx], data[1][idx], idx)
            if rep:
                samples[method].append((time.perf_counter() - start) / steps)
    out = {}
    for method, values in samples.items():
        mean = statistics.fmean(values)
        sd = statistics.stdev(values) if len(values) > 1 else 0.0
        half = 1.96 * sd / math.sqrt(len(values))
        out[method] = {"seconds_per_iter": statistics.median(values), "mean": mean,
                       "ci95": [mean - half, mean + half], "samples": values}
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
    (residual of the batch, gradient, Adam update); the methods are interleaved within each
    repeat so that a busy machine slows them alike. Also measured at the headline setting:
    ``"bare"`` (the unconstrained step without computing the residual) and the full version
    with MINRES-QLP (``"full:minres_qlp"``). Sweep values that are empty are skipped.
    """
    for name, values in (("batch_sizes", batch_sizes), ("widths", widths),
                         ("constraints", constraints)):
        if any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in values):
            raise ValueError(f"{name} must be ints >= 1, got {values!r}")
    bad = [m for m in methods if m not in TIMED]
    if bad or not methods:
        raise ValueError(f"methods must be a non-empty subset of {TIMED}, got {methods!r}")
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
    extra = ["bare", *methods]
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
    result: dict[str, Any] = {
        "setting": {"batch_size": batch_size, "parameters": parameter_count(width),
                    "width": width, "constraints": 1, "steps": steps, "repeats": 2 * repeats,
                    "dtype": dtype, "batched_params": batched_params, "solver": solver,
                    "optimizer": "adam", "threads": torch.get_num_threads()},
        "methods": {m: {**headline[m],
                        "ratio_to_unconstrained": (headline[m]["seconds_per_iter"] / base
                                                   if base else None),
                        "ratio_to_bare": headline[m]["seconds_per_iter"] / bare}
                    for m in methods},
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
