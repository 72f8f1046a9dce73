"""The pose-symmetry problem under two more hard-constraint families of :mod:`ccnn.hard`.

The methods of :mod:`ccnn.pose.experiment` (Márquez-Neila, Salzmann and Fua, "Imposing Hard
Constraints on Deep Networks: Promises and Limitations", 2017, §5) are joined by the two families
of Jergensen, "Neural network optimization under PDE constraints", 2019:

* ``tanabe-reduction``: Tanabe's constrained backpropagation, reduction version (Eq. 6, 10):
  ``L = f̄ + Σ_j λ̃_j g̃_j`` with ``f̄`` Eq. 14's loss on the 128 labelled samples of the
  iteration and ``g̃_j = mean_i g_ij²`` the mean squared symmetry residual ``j`` over the 16
  samples mined from the pool by Eq. 9 (the same supervision as every other method), stepped
  by SGD (forward Euler of Eq. 2-3, so ``g̃`` of the batch shrinks by ``1 − η`` to first order).
* ``tanabe-full``: the full version (Eq. 5, 9, batch coupling): one multiplier per mined sample
  and constraint. ``f`` and ``g`` must live on the same rows, so its batch is the labelled
  samples followed by the mined ones; a labelled row has the loss ``(B/B_l)·mse`` and residual 0,
  a mined row loss 0 and its six residuals, hence ``f̄`` is Eq. 14's loss on the labelled
  samples. A zero residual row has a zero gradient, so the minimum-length multipliers of
  ``(J Jᵀ) Λ = −J∇f̄ + G`` are zero there (its equation reads ``0 = 0``) and the step is Tanabe's
  for the mined residuals alone. It needs the per-sample Jacobians of every row (``B·(1 + M)``
  rows of ``N`` parameters), which the full-size PoseNet (3.2 million parameters) cannot hold
  on a small machine: :func:`full_jacobian_bytes` estimates them and :func:`run_family` refuses
  above ``FamilySettings.full_max_gib``.
* ``projection``: nonlinear projection after training (Jergensen §3, Eq. 12): a clone of the
  unconstrained model trained on the mean squared symmetry residual of the pool alone, until it
  falls below a threshold or a step budget is spent.
* ``projection-penalty``, ``projection-constraint``: the same keeping the data loss from rising
  (``keep_data="penalty"``: ``L₂ + w·d``; ``"constraint"``: Tanabe's dynamics with the
  inequality ``d ≤ (1 + slack)·d₀``), ``d`` Eq. 14's loss on the labelled training data.

All enforce ``symmetry_residuals(pred, relative=cfg.relative)`` and report Eq. 15's squared form
(:func:`ccnn.pose.experiment.evaluate`), in records shaped like
:func:`ccnn.pose.experiment.run_method`'s.
"""

from __future__ import annotations

import copy
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, fields

import torch
from torch import Tensor, nn

from ccnn.hard import nonlinear_projection
from ccnn.hard.tanabe import Tanabe
from ccnn.pose.experiment import PoseConfig, evaluate, fine_tune, weights_finite
from ccnn.pose.skeleton import symmetry_residuals
from ccnn.progress import ProgressBar

__all__ = ["FAMILY_METHODS", "FamilySettings", "full_jacobian_bytes", "run_family"]

log = logging.getLogger(__name__)

FAMILY_METHODS = ("tanabe-reduction", "tanabe-full", "projection", "projection-penalty",
                  "projection-constraint")
_TANABE = ("tanabe-reduction", "tanabe-full")
_KEEP = {"projection": None, "projection-penalty": "penalty",
         "projection-constraint": "constraint"}


@dataclass(frozen=True)
class FamilySettings:
    """Constants of the two families (chosen on the validation split of seed 100; see
    docs/pose_families.md).

    Attributes:
        tanabe_lr: SGD learning rate ``η`` of both Tanabe versions (the forward-Euler step of
            Eq. 2-3 of Jergensen 2019; the residual shrinks by ``1 − η`` per step).
        tanabe_reduction: ``"mse"`` or ``"huber"``: the batch reduction ``g̃_j`` of the
            reduction version (Eq. 6).
        full_max_gib: the full version refuses to run when :func:`full_jacobian_bytes` exceeds
            this many GiB.
        projection_lr: Adam's learning rate of the projections.
        projection_batch: pool samples per projection step.
        projection_threshold: stop once the mean squared (enforced) residual over the pool is at
            or below this.
        projection_steps: the most projection steps.
        projection_check_every: steps between checks of the pool's constraint error (and the
            held-out and curve evaluations).
        data_weight: ``w`` of ``projection-penalty``.
        data_slack: ``projection-constraint`` lets the data loss reach ``(1 + slack)·d₀``.
        data_batch: labelled samples drawn per step by the data-keeping projections.
    """

    tanabe_lr: float = 0.3
    tanabe_reduction: str = "mse"
    full_max_gib: float = 8.0
    projection_lr: float = 1e-4
    projection_batch: int = 50
    projection_threshold: float = 1e-3
    projection_steps: int = 200
    projection_check_every: int = 20
    data_weight: float = 10.0
    data_slack: float = 0.1
    data_batch: int = 128

    def __post_init__(self) -> None:
        for name in ("tanabe_lr", "full_max_gib", "projection_lr", "data_weight"):
            value = getattr(self, name)
            if (isinstance(value, bool) or not isinstance(value, int | float)
                    or not 0 < value < math.inf):
                raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
        for name in ("projection_threshold", "data_slack"):
            value = getattr(self, name)
            if (isinstance(value, bool) or not isinstance(value, int | float)
                    or not 0 <= value < math.inf):
                raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
        for name in ("projection_batch", "projection_steps", "projection_check_every",
                     "data_batch"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.tanabe_reduction not in ("mse", "huber"):
            raise ValueError(f"tanabe_reduction must be 'mse' or 'huber', got "
                             f"{self.tanabe_reduction!r}")

    def as_json(self) -> dict:
        """The settings as a plain dict."""
        return {f.name: getattr(self, f.name) for f in fields(self)}


def full_jacobian_bytes(model: nn.Module, rows: int, constraints: int = 6) -> int:
    """Bytes of the per-sample Jacobians the full Tanabe version holds for ``rows`` samples: the
    ``rows × (1 + M) × N`` gradients (model dtype) twice (per-layer results and their
    concatenation) and the ``rows × M × N`` float64 copy its Gram matrix is formed from."""
    n = sum(p.numel() for p in model.parameters() if p.requires_grad)
    item = next(model.parameters()).element_size()
    return rows * n * (2 * item * (1 + constraints) + 8 * constraints)


def _check_args(name: str, split: str) -> None:
    if name not in FAMILY_METHODS:
        raise ValueError(f"name must be one of {', '.join(FAMILY_METHODS)}, got {name!r}")
    if split not in ("test", "val"):
        raise ValueError(f"split must be 'test' or 'val', got {split!r}")


def run_family(name: str, start: nn.Module, data: dict[str, Tensor], cfg: PoseConfig, *,
               progress: bool = False, split: str = "test",
               settings: FamilySettings | None = None) -> dict:
    """Constrain a copy of ``start`` by family ``name`` (:data:`FAMILY_METHODS`); return its
    JSON record, evaluated on ``split`` ("test" or "val"), with the keys of
    :func:`ccnn.pose.experiment.run_method`'s. ``start`` is never modified."""
    _check_args(name, split)
    settings = FamilySettings() if settings is None else settings
    if not isinstance(settings, FamilySettings):
        raise ValueError(f"settings must be a FamilySettings, got {type(settings).__name__}")
    if name in _TANABE:
        return _run_tanabe(name, start, data, cfg, progress, split, settings)
    return _run_projection(name, start, data, cfg, progress, split, settings)


def _tanabe_fn(name: str, cfg: PoseConfig, xc: Tensor) -> Callable[..., tuple[Tensor, Tensor]]:
    """``fn(net, *batch) -> (f, g)`` of one iteration (see the module docstring)."""
    if name == "tanabe-reduction":
        def reduction_fn(net: Callable, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
            f = (net(x) - y).square().mean(1)  # per-sample Eq. 14: its mean is pose_loss
            return f, symmetry_residuals(net(xc), relative=cfg.relative)

        return reduction_fn

    def full_fn(net: Callable, x: Tensor, y: Tensor, w: Tensor, c: Tensor
                ) -> tuple[Tensor, Tensor]:
        pred = net(x)
        f = w * (pred - y).square().mean(1)
        return f, c.unsqueeze(1) * symmetry_residuals(pred, relative=cfg.relative)

    return full_fn


def _tanabe_batch(name: str, x: Tensor, y: Tensor, xc: Tensor) -> tuple[Tensor, ...]:
    """The rows Tanabe is called on: the labelled batch (reduction), or the labelled and the
    mined samples with loss weights ``w`` and residual masks ``c`` (full)."""
    if name == "tanabe-reduction":
        return x, y
    n, m = len(x), len(xc)
    rows = n + m
    w = torch.cat([x.new_full((n,), rows / n), x.new_zeros(m)])
    c = torch.cat([x.new_zeros(n), x.new_ones(m)])
    return torch.cat([x, xc]), torch.cat([y, y.new_zeros(m, y.shape[1])]), w, c


def _run_tanabe(name: str, start: nn.Module, data: dict[str, Tensor], cfg: PoseConfig,
                progress: bool, split: str, settings: FamilySettings) -> dict:
    """Tanabe's constrained backpropagation (Eq. 2-6, 9-10 of Jergensen 2019) for
    ``cfg.iterations`` SGD steps, batches and mining as in ``run_method``."""
    if name == "tanabe-full":
        need = full_jacobian_bytes(start, cfg.batch_size + cfg.mined)
        if need > settings.full_max_gib * 2**30:
            raise MemoryError(
                f"tanabe-full needs about {need / 2**30:.1f} GiB of per-sample Jacobians for "
                f"{cfg.batch_size + cfg.mined} rows (full_max_gib={settings.full_max_gib})")
    model = copy.deepcopy(start)
    version = "full" if name == "tanabe-full" else "reduction"
    tanabe = Tanabe(model, version=version, reduction=settings.tanabe_reduction)
    optimizer = torch.optim.SGD(model.parameters(), lr=settings.tanabe_lr)

    def step(x: Tensor, y: Tensor, xc: Tensor, idx: Tensor) -> dict:
        optimizer.zero_grad()
        out = tanabe(_tanabe_fn(name, cfg, xc), *_tanabe_batch(name, x, y, xc))
        out.loss.backward()
        optimizer.step()
        g = out.g if name == "tanabe-reduction" else out.g[len(x):]
        stats = {"loss": float(out.f), "active_violation": float(g.abs().median()),
                 "multiplier_norm": float(out.lam.norm())}
        if out.info is not None:  # MINRES-QLP solves (the dense ones report nothing)
            stats["solver_iterations"] = out.info.iterations
            stats["solver_flag"] = int(out.info.flag)
        return stats

    return fine_tune(name, model, step, data, cfg, progress, split)


def _run_projection(name: str, start: nn.Module, data: dict[str, Tensor], cfg: PoseConfig,
                    progress: bool, split: str, settings: FamilySettings) -> dict:
    """Nonlinear projection after training (Jergensen 2019, §3, Eq. 12; with ``keep_data`` the
    variants of its conclusion) of a clone of ``start`` onto the symmetry constraints of the
    pool.

    An "iteration" of the record is one check, every ``projection_check_every`` steps (and at
    the last step): ``median_violation_per_iter`` holds the held-out median |C| (Eq. 15) there,
    ``curve`` the ``split``'s error and median |C| there, ``history`` the pool's constraint
    error and the held-out violation. ``seconds_per_iter`` is seconds per projection *step*:
    the projection's wall time (its steps and its checks of the pool's constraint error,
    without this function's evaluations; for the data-keeping variants also the data loss over
    the whole training set before and after, ``d₀`` being their bound) over its steps.
    """
    heldout = data["val_x"][:cfg.heldout]
    eval_x, eval_y = data[f"{split}_x"], data[f"{split}_y"]
    history, curve = [], []
    spent = [0.0]  # seconds of the callback's evaluations, not the projection's

    def residual(net: Callable, x: Tensor) -> Tensor:
        return symmetry_residuals(net(x), relative=cfg.relative)

    def data_loss(net: Callable, x: Tensor, y: Tensor) -> Tensor:
        return (net(x) - y).square().mean(1)

    keep = _KEEP[name]
    checks = settings.projection_steps // settings.projection_check_every
    with ProgressBar(progress, checks, name) as bar:
        def callback(step: int, clone: nn.Module) -> None:
            t0 = time.perf_counter()
            if step > 0:
                with torch.no_grad():
                    held = float(symmetry_residuals(clone(heldout)).abs().median())
                point = evaluate(clone, eval_x, eval_y)
                curve.append({"iteration": step, "mean_joint_error": point["mean_joint_error"],
                              "median_violation": point["median_violation"]})
                history.append({"step": step, "heldout_violation": held,
                                f"{split}_error": point["mean_joint_error"]})
                bar({"heldout_violation": held})
            spent[0] += time.perf_counter() - t0

        result = nonlinear_projection(
            start, residual, data["pool_x"], lr=settings.projection_lr,
            batch_size=settings.projection_batch, threshold=settings.projection_threshold,
            max_steps=settings.projection_steps, check_every=settings.projection_check_every,
            keep_data=keep, data_loss=data_loss if keep else None,
            train_data=(data["train_x"], data["train_y"]) if keep else None,
            data_batch_size=settings.data_batch, data_weight=settings.data_weight,
            data_slack=settings.data_slack,
            generator=torch.Generator().manual_seed(cfg.seed + 1), callback=callback)
    report = result.report
    errors = dict(report.history)
    for h in history:
        h["constraint_error"] = errors.get(h["step"])
    if not weights_finite(result.model):
        raise RuntimeError(f"{name}: the weights became non-finite")
    final = evaluate(result.model, eval_x, eval_y)
    steps = max(report.steps, 1)
    log.info("%s: %d steps, converged %s, error %.4f m, median |C| %.3g", name, report.steps,
             report.converged, final["mean_joint_error"], final["median_violation"])
    return {**final, "projection_steps": report.steps, "converged": report.converged,
            "constraint_before": report.constraint_before,
            "constraint_after": report.constraint_after, "data_before": report.data_before,
            "data_after": report.data_after,
            "seconds_per_iter": (report.seconds - spent[0]) / steps,
            "median_violation_per_iter": [h["heldout_violation"] for h in history],
            "curve": curve, "history": history}
