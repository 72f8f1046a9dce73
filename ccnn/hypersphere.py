"""The hypersphere experiment: why hard constraints on changing subsets behave erratically.

Márquez-Neila, Salzmann and Fua, "Imposing Hard Constraints on Deep Networks: Promises and
Limitations" (2017), §6.2: find the ``w`` closest to ``x₀`` on the intersection of 200 hyperspheres
of radius 10 whose centres are nearly equal (Eq. 16), or its soft version (Eq. 17)::

    min_w ½‖w − x₀‖²  s.t.  C_i(w) = ‖w − c_i‖ − 10 = 0, i = 1..200           (Eq. 16)
    min_w ½‖w − x₀‖² + λ Σ_i C_i(w)²                                          (Eq. 17)

Each iteration sees 20 randomly chosen constraints. Three methods are run from the same ``x₀``:
``soft-sgd`` (plain gradient steps on Eq. 17 over the active constraints), ``hard-sgd`` (the KKT
step of Eq. 5 on the active constraints) and ``hard-persistent`` (the same step on a persistent
pool: constraints once active stay active until they have been met longest, the fix the paper's
conclusion asks for). Fig. 3 (d = 2: two nearly parallel linearized constraints) and Fig. 4
(median |C| of all 200 per iteration; the change of the active constraints across each update)
are drawn as PNG.

The centres: the paper draws them "normally distributed around the origin with a variance of
0.01". Read per coordinate (``per_coordinate=True``, the default: ``c_i ~ N(0, σ²·I)``, σ = 0.1)
that puts two centres ~0.14·√d apart, 141 at d = 10⁶: far more than the diameter 20 of the
spheres, so at that size no two of them meet and the constraints are far from "very similar but
slightly incompatible". The other reading (``per_coordinate=False``) gives the centre's offset
as a whole that variance, ``c_i ~ N(0, (σ²/d)·I)``, so that ``E‖c_i‖² = σ²`` in every dimension.
docs/hard.md reports both.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from torch import Tensor

from ccnn.hard.active import PersistentActive, RandomActive
from ccnn.hard.kkt import kkt_step
from ccnn.progress import ProgressBar

__all__ = ["METHODS", "HypersphereConfig", "Hyperspheres", "plot_fig3", "plot_fig4",
           "run_hypersphere"]

log = logging.getLogger(__name__)

METHODS = ("soft-sgd", "hard-sgd", "hard-persistent")


@dataclass(frozen=True)
class HypersphereConfig:
    """Settings of the experiment (the paper's where it gives them).

    Attributes:
        dim: dimension d of w (paper: 10⁶).
        spheres: number of hyperspheres (paper: 200).
        radius: their radius (paper: 10).
        center_std: σ, the square root of the centres' variance (paper: 0.01).
        per_coordinate: σ² is the variance of each coordinate of a centre (True) or of the
            centre's offset as a whole (False); see the module docstring.
        start_distance: ‖x₀‖; x₀ points in a random direction.
        lam: λ of Eq. 17 (paper: 100).
        active: constraints drawn at random each iteration (paper: 20).
        iterations: paper: 500.
        soft_lr: step size of the soft method's gradient descent (no momentum, as in the paper).
        eta: η of Eq. 5 (the inverse step size of the hard methods; 1 is a full Newton step for
            ½‖w − x₀‖²).
        budget: most constraints the persistent pool holds.
        tol: |C_i| at or below which a pooled constraint counts as met.
        rtol, maxit: MINRES-QLP's tolerance and iteration limit in each KKT step.
        seed: seeds the centres, x₀ and the draws of active constraints.
        dtype: "float32" or "float64".
    """

    dim: int = 1_000_000
    spheres: int = 200
    radius: float = 10.0
    center_std: float = 0.1
    per_coordinate: bool = True
    start_distance: float = 12.0
    lam: float = 100.0
    active: int = 20
    iterations: int = 500
    soft_lr: float = 2e-4
    eta: float = 1.0
    budget: int = 60
    tol: float = 1e-3
    rtol: float = 1e-8
    maxit: int | None = None
    seed: int = 0
    dtype: str = "float32"

    def __post_init__(self) -> None:
        for name in ("dim", "spheres", "active", "iterations", "budget"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.active > self.spheres:
            raise ValueError(f"active ({self.active}) cannot exceed spheres ({self.spheres})")
        if self.budget < self.active:
            raise ValueError(f"budget ({self.budget}) must be at least active ({self.active})")
        for name in ("radius", "soft_lr", "eta"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be a positive number, got {value}")
        for name in ("center_std", "start_distance", "lam", "tol", "rtol"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"{name} must be a non-negative number, got {value}")
        if self.dtype not in ("float32", "float64"):
            raise ValueError(f"dtype must be 'float32' or 'float64', got {self.dtype!r}")


class Hyperspheres:
    """The constraints ``C_i(w) = ‖w − c_i‖ − r`` of Eq. 16, evaluated through
    ``‖w − c_i‖² = ‖w‖² − 2·c_i·w + ‖c_i‖²`` so that one product with the centres serves all
    of them (no ``spheres × d`` temporary)."""

    def __init__(self, centers: Tensor, radius: float) -> None:
        if centers.dim() != 2:
            raise ValueError(f"centers must be (spheres, d), got shape {tuple(centers.shape)}")
        self.centers = centers
        self.radius = radius
        self.center_sq = (centers * centers).sum(1)

    def subset(self, index: Tensor) -> Hyperspheres:
        """The spheres ``index`` only (their centres copied once, for the products of a step)."""
        sub = Hyperspheres.__new__(Hyperspheres)
        sub.centers, sub.radius, sub.center_sq = (self.centers[index], self.radius,
                                                  self.center_sq[index])
        return sub

    def residuals(self, w: Tensor) -> Tensor:
        """``C_i(w)`` of every sphere; differentiable in ``w``."""
        dist_sq = (w * w).sum() - 2.0 * (self.centers @ w) + self.center_sq
        return dist_sq.clamp_min(0.0).sqrt() - self.radius


def make_problem(cfg: HypersphereConfig, generator: torch.Generator) -> tuple[Hyperspheres, Tensor]:
    """The spheres and x₀ of one run, drawn from ``generator``."""
    dtype = getattr(torch, cfg.dtype)
    centers = torch.randn(cfg.spheres, cfg.dim, generator=generator, dtype=dtype)
    centers *= cfg.center_std if cfg.per_coordinate else cfg.center_std / math.sqrt(cfg.dim)
    x0 = torch.randn(cfg.dim, generator=generator, dtype=dtype)
    x0 *= cfg.start_distance / x0.norm()
    return Hyperspheres(centers, cfg.radius), x0


def soft_step(active: Hyperspheres, w: Tensor, x0: Tensor, lam: float, lr: float) -> Tensor:
    """One gradient step on Eq. 17 over the ``active`` spheres."""
    w = w.detach().requires_grad_(True)
    C = active.residuals(w)
    objective = 0.5 * (w - x0).square().sum() + lam * C.square().sum()
    (grad,) = torch.autograd.grad(objective, w)
    return (w - lr * grad).detach()


def hard_step(active: Hyperspheres, w: Tensor, x0: Tensor,
              cfg: HypersphereConfig) -> tuple[Tensor, int]:
    """One KKT step of Eq. 5 on the ``active`` spheres; returns w and the solver's
    iterations."""
    step = kkt_step(
        {"w": w},
        lambda p: 0.5 * (p["w"] - x0).square().sum(),
        lambda p: active.residuals(p["w"]),
        eta=cfg.eta, method="sgd", rtol=cfg.rtol, maxit=cfg.maxit)
    return w + step.delta["w"], step.info.iterations


def run_method(method: str, problem: Hyperspheres, x0: Tensor, cfg: HypersphereConfig,
               generator: torch.Generator, progress: bool = False) -> dict:
    """Run one method for ``cfg.iterations`` iterations from ``x₀``; returns its JSON record:
    the final median |C| of all spheres, seconds per iteration, the median |C| after each
    iteration and the change of the active constraints' median |C| across each update."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose from {', '.join(METHODS)}")
    spheres = problem.centers.shape[0]
    if method == "hard-persistent":
        chooser = PersistentActive(spheres, cfg.active, cfg.budget, tol=cfg.tol,
                                   generator=generator)
    else:
        chooser = RandomActive(spheres, cfg.active, generator=generator)
    w = x0.clone()
    medians, changes, iterations = [], [], []
    start = time.perf_counter()
    with torch.no_grad(), ProgressBar(progress, cfg.iterations, method) as bar:
        C_all = problem.residuals(w)  # every sphere at w: one product with the centres
        for _ in range(cfg.iterations):
            index = chooser.select(lambda idx, C=C_all: C[idx].unsqueeze(1))
            active = problem.subset(index)
            if method == "soft-sgd":
                with torch.enable_grad():
                    w = soft_step(active, w, x0, cfg.lam, cfg.soft_lr)
            else:
                w, its = hard_step(active, w, x0, cfg)
                iterations.append(its)
            if not bool(torch.isfinite(w).all()):
                raise RuntimeError(f"{method}: w became non-finite at iteration {len(medians)}")
            before, C_all = C_all[index].abs().median(), problem.residuals(w)
            medians.append(float(C_all.abs().median()))
            changes.append(float(C_all[index].abs().median() - before))
            bar({"median_violation": medians[-1], "active": float(len(index))})
    seconds = time.perf_counter() - start
    record = {"median_violation": medians[-1], "seconds_per_iter": seconds / cfg.iterations,
              "median_violation_per_iter": medians, "active_change_per_iter": changes}
    if iterations:
        record["solver_iterations_mean"] = sum(iterations) / len(iterations)
    log.info("%s: median |C| %.4g after %d iterations, %.3f s/iteration", method, medians[-1],
             cfg.iterations, record["seconds_per_iter"])
    return record


def run_hypersphere(cfg: HypersphereConfig, out: Path | None = None,
                    methods: tuple[str, ...] = METHODS, progress: bool = False) -> dict:
    """The experiment of §6.2: every method on the same spheres and x₀ (each with its own
    stream of active constraints from the same seed); writes Fig. 3 and Fig. 4 to ``out`` when
    given. Returns ``{"methods": {name: record}, "config": {...}}``."""
    for method in methods:
        if method not in METHODS:
            raise ValueError(f"unknown method {method!r}; choose from {', '.join(METHODS)}")
    problem, x0 = make_problem(cfg, torch.Generator().manual_seed(cfg.seed))
    records = {}
    for method in methods:
        records[method] = run_method(method, problem, x0, cfg,
                                     torch.Generator().manual_seed(cfg.seed + 1), progress)
    result = {"methods": records, "config": asdict(cfg)}
    if out is not None:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        plot_fig4(records, out / "fig4_hypersphere.png")
        plot_fig3(out / "fig3_two_constraints.png", cfg)
    return result


def _fig3_paths(cfg: HypersphereConfig, steps: int) -> dict[str, Tensor]:
    """Fig. 3 in d = 2: one step of each method from the same point, and the paths over
    ``steps`` iterations of soft, hard on the same two constraints, and hard on a new random
    pair of the ``cfg.spheres`` circles each iteration."""
    generator = torch.Generator().manual_seed(cfg.seed)
    d2 = replace(cfg, dim=2, active=2, iterations=steps, budget=max(cfg.budget, 2),
                 dtype="float64")
    problem, _ = make_problem(d2, generator)
    x0 = torch.tensor([0.0, cfg.start_distance], dtype=torch.float64)
    same = problem.subset(torch.tensor([0, 1]))
    paths: dict[str, list[Tensor]] = {"soft": [x0], "hard (same pair)": [x0],
                                      "hard (new pair each step)": [x0]}
    chooser = RandomActive(cfg.spheres, 2, generator=generator)
    with torch.no_grad():
        for _ in range(steps):
            with torch.enable_grad():
                paths["soft"].append(soft_step(same, paths["soft"][-1], x0, d2.lam, d2.soft_lr))
            paths["hard (same pair)"].append(hard_step(same, paths["hard (same pair)"][-1], x0,
                                                       d2)[0])
            index = chooser.select(lambda idx: torch.zeros(len(idx), 1))
            paths["hard (new pair each step)"].append(
                hard_step(problem.subset(index), paths["hard (new pair each step)"][-1], x0,
                          d2)[0])
    out = {name: torch.stack(path) for name, path in paths.items()}
    out["centers"] = problem.centers
    return out


def plot_fig3(path: Path, cfg: HypersphereConfig = HypersphereConfig(), steps: int = 30) -> None:
    """Fig. 3: (a) one step from the blue dot by soft (green) and hard (yellow) on two nearly
    equal circles; (b) zoomed; (c) the paths over ``steps`` iterations."""
    from matplotlib.figure import Figure

    paths = _fig3_paths(cfg, steps)
    centers, r = paths["centers"], cfg.radius
    theta = torch.linspace(0, 2 * math.pi, 721, dtype=torch.float64)
    fig = Figure(figsize=(15, 5))
    axes = fig.subplots(1, 3)
    start = paths["soft"][0]
    soft1, hard1 = paths["soft"][1], paths["hard (same pair)"][1]
    for ax, title in zip(axes[:2], ("(a) one iteration", "(b) zoomed"), strict=True):
        for i, color in ((0, "tab:blue"), (1, "tab:orange")):
            c = centers[i]
            ax.plot(c[0] + r * theta.cos(), c[1] + r * theta.sin(), lw=1, color=color)
            # the linearized constraint C_i(w₀) + ∇C_i(w₀)·(w − w₀) = 0: a line ⟂ (w₀ − c_i)
            normal = (start - c) / (start - c).norm()
            foot = start - ((start - c).norm() - r) * normal
            along = torch.stack([-normal[1], normal[0]])
            ends = torch.stack([foot - 40 * along, foot + 40 * along])
            ax.plot(ends[:, 0], ends[:, 1], "--", lw=0.8, color=color)
        ax.plot(*start, "o", color="tab:blue", label="start")
        ax.plot(*soft1, "o", color="tab:green", label="soft step")
        ax.plot(*hard1, "o", color="gold", label="hard step (Eq. 5)")
        ax.set_title(title)
    reach = float(torch.stack([soft1, hard1, start]).abs().max()) + 2.0
    axes[0].set_xlim(-reach, reach)
    axes[0].set_ylim(-reach, reach)
    half = 1.5 * (float(start.norm()) - r)
    axes[1].set_xlim(float(start[0]) - half, float(start[0]) + half)
    axes[1].set_ylim(float(start[1]) - 1.5 * half, float(start[1]) + 0.5 * half)
    axes[0].legend(loc="lower left", fontsize=8)
    ax = axes[2]
    for i in range(centers.shape[0]):
        ax.plot(centers[i, 0] + r * theta.cos(), centers[i, 1] + r * theta.sin(), lw=0.3,
                color="0.8")
    styles = {"soft": ("tab:red", "-"), "hard (same pair)": ("tab:green", ":"),
              "hard (new pair each step)": ("black", ":")}
    for name, (color, style) in styles.items():
        ax.plot(paths[name][:, 0], paths[name][:, 1], style, color=color, marker=".", label=name)
    ax.set_title(f"(c) {steps} iterations (hard with new pairs leaves the frame)")
    ax.legend(loc="lower left", fontsize=8)
    ax.set_xlim(-3 * r, 3 * r)
    ax.set_ylim(-3 * r, 3 * r)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def plot_fig4(records: dict[str, dict], path: Path) -> None:
    """Fig. 4: (a) median |C| of all spheres per iteration; (b) change of the active
    constraints' median |C| across each update (positive: the update made them worse)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(12, 4.5))
    ax_a, ax_b = fig.subplots(1, 2)
    for name, record in records.items():
        style = "--" if name.startswith("soft") else "-"
        ax_a.plot(record["median_violation_per_iter"], style, label=name)
        ax_b.plot(record["active_change_per_iter"], style, lw=0.7, label=name)
    ax_a.set_yscale("log")
    ax_a.set_xlabel("iteration")
    ax_a.set_ylabel("median |C| of all constraints")
    ax_a.set_title("(a)")
    ax_b.axhline(0.0, color="0.5", lw=0.5)
    ax_b.set_yscale("symlog", linthresh=1e-3)
    ax_b.set_xlabel("iteration")
    ax_b.set_ylabel("Δ median |C| of the active constraints")
    ax_b.set_title("(b) positive: the update made them worse")
    for ax in (ax_a, ax_b):
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)

