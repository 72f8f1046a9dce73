"""Seconds per iteration of the hard-constraint optimizers against Soft-Adam on the pose network.

The setting of §5 of Márquez-Neila, Salzmann and Fua, "Imposing Hard Constraints on Deep
Networks: Promises and Limitations", 2017: the network of Eq. 13 (float32, 3.2 M parameters),
one batch of 128 labelled synthetic poses (Eq. 14 loss), and the six symmetry constraints of
Table 2 (the scale-invariant ``symmetry_residuals(..., relative=True)`` that ``ccnn pose``
enforces) on 16 samples mined by Eq. 9 (``MinedActive(pool, 16, candidates=128)``) from an
unlabelled pool: 96 constraint residuals per step. Learning rates and solver settings are those
of ``ccnn pose`` (:data:`HYPER`, :data:`SOLVER`). Every iteration of every method is the mining
forward pass (128 candidates, the same cost for all) followed by the method's step:

* ``soft-adam`` / ``soft-sgd``: Adam / SGD on the Eq. 14 loss + λ·Σ C² over the mined samples
  (Eq. 3);
* ``hard-sgd`` (Eq. 5), ``hard-adam`` (Eq. 10-12), ``hard-gn`` (Eq. 6): one KKT step of
  :mod:`ccnn.hard` with the constraints of the mined samples;
* ``lagrangian``: Adam on the Lagrangian (Eq. 4) with one multiplier per pool sample and
  constraint, then a dual-ascent step on the mined samples' multipliers.

All methods start from copies of one model: PoseNet pre-trained for ``--pretrain`` unconstrained
Adam steps on batches of 32 of 1024 labelled samples (about 40 s on one core), so that its
predictions differ between images as a trained model's do, or loaded with ``--init``. After one
warm-up iteration each, the rounds interleave the methods, one iteration each per round in an
order rotated every round, so that every method sees the same machine load; the table gives the
median over the rounds ("paired": the median of the per-round ratios). With ``--sweep`` the
script first tries MINRES-QLP settings (rtol, maxit) for the hard methods, each from one common
state (after 3 and after 10 steps of the method), and reports per setting the step's time,
iterations, the linearized constraint residual ‖C + J·dw‖/‖C‖ (J·dw by ``torch.func.jvp``), the
same relative to the unconstrained step's ‖C + J·dw₀‖, and the actual ‖C(w + dw)‖/‖C(w)‖ on the
16 mined samples. With ``--compare-plain`` every hard method runs twice in the same rounds, the
second time (``(plain)``) with PyTorch's own convolution double backward instead of
:func:`ccnn.hard.double_backward.lean_conv_double_backward` (the same numbers, more work).

    python scripts/bench_hard.py [--json PATH] [--rounds N] [--threads T] [--device cpu|cuda]
                                 [--seed S] [--rtol R] [--maxit K] [--gn-maxit K] [--init PATH]
                                 [--sweep] [--compare-plain]
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import logging
import math
import os
import platform
import statistics
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from ccnn.hard import (
    DualAscent,
    HardAdam,
    HardGaussNewton,
    HardSGD,
    IndexedMultipliers,
    KKTStep,
    MinedActive,
    kkt,
    lagrangian,
    soft_penalty,
)
from ccnn.io import json_path, write_json
from ccnn.pose.data import as_tensors, synthetic_pose_splits
from ccnn.pose.model import PoseNet, pose_loss
from ccnn.pose.skeleton import symmetry_residuals

METHODS = ("soft-adam", "soft-sgd", "hard-sgd", "hard-adam", "hard-gn", "lagrangian")
HARD = ("hard-sgd", "hard-adam", "hard-gn")

#: Hyper-parameters of the methods: the defaults of ``ccnn pose`` (``ccnn.pose.experiment``) when
#: this benchmark was written. The step's cost depends on them only through the conditioning of
#: the KKT systems and the number of MINRES-QLP iterations.
HYPER = {
    "soft_lambda": 1.0,
    "lr": {"soft-adam": 1e-4, "soft-sgd": 1e-5, "lagrangian": 1e-4, "hard-sgd": 1e-3,
           "hard-adam": 1e-4},
    "hard_adam_bias_correction": "eq12",
    "gn_damping": 1.0,
    "dual_rho": 1.0,  # also the augmentation ρ of the (augmented) Lagrangian
    "relative_residuals": True,  # symmetry_residuals(..., relative=True), as ccnn pose
}

#: MINRES-QLP settings of the hard methods in the timed run, those of ``ccnn pose``: rtol 1e-4 with
#: at most 20 iterations. The sweep (``--sweep``, docs/hard.md "Speed") finds that they remove
#: 88-97% of the linearized constraint violation ‖C + J·dw‖ in the states it tries, while the
#: cap bounds a step's cost. Gauss-Newton's full system converges slowly; ``ccnn pose`` caps it
#: at 5 iterations.
SOLVER = {
    "hard-sgd": {"rtol": 1e-4, "maxit": 20},
    "hard-adam": {"rtol": 1e-4, "maxit": 20},
    "hard-gn": {"rtol": 1e-4, "maxit": 5},
}

#: Settings tried by ``--sweep``: (rtol, maxit) per hard method.
SWEEP = {
    "hard-sgd": [(1e-2, None), (3e-3, None), (1e-3, None), (5e-4, None), (2e-4, None),
                 (1e-4, None), (1e-4, 20), (1e-6, None)],
    "hard-adam": [(1e-2, None), (3e-3, None), (1e-3, None), (5e-4, None), (2e-4, None),
                  (1e-4, None), (1e-4, 20), (1e-6, None)],
    "hard-gn": [(1e-4, 5), (1e-4, 10), (1e-4, 20)],
}
#: The reference step of the sweep (the distance of each setting's dw to it is reported).
SWEEP_REFERENCE = {"hard-sgd": (1e-8, None), "hard-adam": (1e-8, None), "hard-gn": (1e-6, 60)}


# ---- the problem ------------------------------------------------------------------------------


@dataclass
class Problem:
    """The data of every iteration: the labelled batch and the unlabelled constraint pool."""

    x: Tensor
    y: Tensor
    pool: Tensor
    device: torch.device

    def loss(self, net: Callable[[Tensor], Tensor]) -> Tensor:
        """Eq. 14 on the labelled batch."""
        return pose_loss(net(self.x), self.y)

    def residuals(self, net: Callable[[Tensor], Tensor]) -> Tensor:
        """``r`` with ``½‖r‖² = `` Eq. 14's batch mean, for Gauss-Newton."""
        return (net(self.x) - self.y).reshape(-1) * (2.0 / self.y.numel()) ** 0.5

    def constraints_of(self, idx: Tensor) -> Callable[[Callable[[Tensor], Tensor]], Tensor]:
        """``net ↦ C`` (shape ``(len(idx), 6)``) of the pool samples ``idx``."""
        xc = self.pool[idx.to(self.device)]
        relative = HYPER["relative_residuals"]
        return lambda net: symmetry_residuals(net(xc), relative=relative)


def make_problem(seed: int, n_train: int, n_pool: int, device: torch.device
                 ) -> tuple[Problem, Tensor, Tensor]:
    """The benchmark's labelled batch (the first 128 training samples), the unlabelled pool of
    ``n_pool`` images, and all ``n_train`` training samples (for pre-training)."""
    splits = synthetic_pose_splits(seed, max(n_train, 128), 1, 1, n_pool, distinct_sides=True)
    x, y = as_tensors(splits.train)
    pool = splits.constraint.tensors()
    problem = Problem(x[:128].to(device), y[:128].to(device), pool.to(device), device)
    return problem, x, y


def pretrained_model(x: Tensor, y: Tensor, device: torch.device, seed: int, steps: int,
                     lr: float, batch: int) -> PoseNet:
    """PoseNet (Eq. 13) after ``steps`` unconstrained Adam steps on random batches of ``batch``
    of ``(x, y)``: long enough that it leaves the mean pose and its predictions differ between
    samples, as those of the paper's unconstrained model do (a network that predicts one pose
    for every image makes the 16 samples' constraints near duplicates)."""
    torch.manual_seed(seed)
    model = PoseNet().to(device)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        i = torch.randint(0, x.shape[0], (batch,), generator=gen)
        opt.zero_grad()
        pose_loss(model(x[i].to(device)), y[i].to(device)).backward()
        opt.step()
    return model


def prediction_spread(model: nn.Module, problem: Problem) -> float:
    """Mean over the 51 outputs of their standard deviation over 128 pool samples (0 for a
    network that predicts the same pose for every image)."""
    with torch.no_grad():
        return float(model(problem.pool[:128]).std(0).mean())


# ---- the methods ------------------------------------------------------------------------------


@dataclass
class Runner:
    """One method: its own model copy, optimizer, selector and per-iteration records."""

    name: str
    model: nn.Module
    problem: Problem
    selector: MinedActive
    optimizer: Any
    extra: dict[str, Any] = field(default_factory=dict)
    plain: bool = False  # with PyTorch's own convolution double backward (--compare-plain)
    times: list[float] = field(default_factory=list)
    step_times: list[float] = field(default_factory=list)
    records: list[dict[str, Any]] = field(default_factory=list)

    def mine(self) -> Tensor:
        """Eq. 9: the 16 most violated of 128 random pool samples at the current weights."""

        def violation(idx: Tensor) -> Tensor:
            with torch.no_grad():
                return self.problem.constraints_of(idx)(self.model)

        return self.selector.select(violation)

    @property
    def label(self) -> str:
        """The method's name in the table."""
        return f"{self.name} (plain)" if self.plain else self.name

    def step(self, idx: Tensor) -> dict[str, Any]:
        """One update with the constraints of ``idx``; returns what it reports."""
        if self.plain:
            with pytorch_double_backward():
                return self._step(idx)
        return self._step(idx)

    def _step(self, idx: Tensor) -> dict[str, Any]:
        problem, constraints = self.problem, self.problem.constraints_of(idx)
        if self.name.startswith("hard"):
            if self.name == "hard-gn":
                result = self.optimizer.step(problem.residuals, constraints, loss=problem.loss)
            else:
                result = self.optimizer.step(problem.loss, constraints)
            return hard_record(result)
        self.optimizer.zero_grad()
        model = self.model
        C = constraints(model)
        if self.name == "lagrangian":
            R = problem.loss(model)
            lagrangian(R, C, self.extra["multipliers"](idx), rho_aug=HYPER["dual_rho"]).backward()
            self.optimizer.step()
            self.extra["dual"].step(idx, C.detach())
        else:
            (problem.loss(model) + soft_penalty(C, HYPER["soft_lambda"])).backward()
            self.optimizer.step()
        return {}


@contextlib.contextmanager
def pytorch_double_backward() -> Iterator[None]:
    """The KKT step's R-op through PyTorch's own convolution double backward, which also
    computes the terms autograd drops (``ccnn.hard.double_backward``), for the comparison."""
    lean = kkt.lean_conv_double_backward
    kkt.lean_conv_double_backward = contextlib.nullcontext
    try:
        yield
    finally:
        kkt.lean_conv_double_backward = lean


def hard_record(result: KKTStep) -> dict[str, Any]:
    """MINRES-QLP's iterations and flag, and the solve's residual."""
    info = result.info
    return {"iterations": info.iterations, "flag": info.flag.name, "relres": info.relres}


def make_optimizer(name: str, model: nn.Module, solver: dict[str, dict[str, Any]]) -> Any:
    """The optimizer of method ``name`` on ``model``."""
    if name in ("soft-adam", "lagrangian"):
        return torch.optim.Adam(model.parameters(), lr=HYPER["lr"][name])
    if name == "soft-sgd":
        return torch.optim.SGD(model.parameters(), lr=HYPER["lr"][name])
    if name == "hard-sgd":
        return HardSGD(model, lr=HYPER["lr"][name], **solver[name])
    if name == "hard-adam":
        return HardAdam(model, lr=HYPER["lr"][name],
                        bias_correction=HYPER["hard_adam_bias_correction"], **solver[name])
    if name == "hard-gn":
        return HardGaussNewton(model, damping=HYPER["gn_damping"], **solver[name])
    raise ValueError(f"method must be one of {METHODS}, got {name!r}")


def make_runner(name: str, start: nn.Module, problem: Problem, args: argparse.Namespace,
                solver: dict[str, dict[str, Any]]) -> Runner:
    """Method ``name`` from its own copy of ``start``; every selector draws the same candidates."""
    model = copy.deepcopy(start)
    selector = MinedActive(problem.pool.shape[0], args.active, candidates=args.candidates,
                           generator=torch.Generator().manual_seed(args.seed + 1))
    extra: dict[str, Any] = {}
    if name == "lagrangian":
        multipliers = IndexedMultipliers(problem.pool.shape[0], 6, device=problem.device)
        extra = {"multipliers": multipliers,
                 "dual": DualAscent(multipliers, rho=HYPER["dual_rho"])}
    return Runner(name, model, problem, selector, make_optimizer(name, model, solver), extra)


def sync(device: torch.device) -> None:
    """Wait for the GPU, so that the wall clock measures the work."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def iterate(runner: Runner, record: bool) -> None:
    """One timed iteration: mining + step."""
    device = runner.problem.device
    sync(device)
    start = time.perf_counter()
    idx = runner.mine()
    sync(device)
    mined = time.perf_counter()
    info = runner.step(idx)
    sync(device)
    end = time.perf_counter()
    if record:
        runner.times.append(end - start)
        runner.step_times.append(end - mined)
        runner.records.append(info)


def run_interleaved(runners: list[Runner], rounds: int, warmup: int) -> None:
    """``warmup`` untimed iterations each, then ``rounds`` rounds in a rotated order."""
    for _ in range(warmup):
        for runner in runners:
            iterate(runner, record=False)
    n = len(runners)
    for r in range(rounds):
        for runner in runners[r % n:] + runners[: r % n]:
            iterate(runner, record=True)


def summarize(runners: list[Runner]) -> dict[str, dict[str, Any]]:
    """Median seconds per iteration, the ratio to soft-adam, and the solver statistics."""
    out: dict[str, dict[str, Any]] = {}
    for runner in runners:
        row: dict[str, Any] = {
            "seconds_per_iter": statistics.median(runner.times),
            "step_seconds_per_iter": statistics.median(runner.step_times),
            "seconds_min": min(runner.times),
            "seconds_max": max(runner.times),
            "iterations_timed": len(runner.times),
        }
        if runner.name in HARD:
            its = [rec["iterations"] for rec in runner.records]
            row["minres_iterations_mean"] = statistics.fmean(its)
            row["minres_iterations_max"] = max(its)
            row["flags"] = dict(Counter(rec["flag"] for rec in runner.records))
        out[runner.label] = row
    soft = next((r for r in runners if r.label == "soft-adam"), None)
    for runner in runners:
        row = out[runner.label]
        if soft is None:
            row["ratio_to_soft_adam"] = row["ratio_to_soft_adam_paired"] = float("nan")
            continue
        row["ratio_to_soft_adam"] = row["seconds_per_iter"] / out["soft-adam"]["seconds_per_iter"]
        # the same round's soft-adam iteration ran within seconds of this one, under the same
        # load: the median of these per-round ratios is less sensitive to slow load changes
        row["ratio_to_soft_adam_paired"] = statistics.median(
            t / t_soft for t, t_soft in zip(runner.times, soft.times, strict=True))
    for runner in runners:
        out[runner.label]["seconds_each_round"] = runner.times
    return out


def print_table(methods: dict[str, dict[str, Any]], title: str) -> None:
    """The timing table."""
    print(title)
    header = (f"{'method':<17} {'s/iter':>7} {'step s':>7} {'× soft-adam':>11} {'paired':>6} "
              f"{'min':>6} {'max':>6} {'MINRES its':>10}  flags")
    print(header)
    print("-" * len(header))
    for name, row in methods.items():
        its = (f"{row['minres_iterations_mean']:>10.1f}" if "minres_iterations_mean" in row
               else f"{'':>10}")
        flags = ", ".join(f"{k} {v}" for k, v in row.get("flags", {}).items())
        print(f"{name:<17} {row['seconds_per_iter']:>7.3f} {row['step_seconds_per_iter']:>7.3f} "
              f"{row['ratio_to_soft_adam']:>11.2f} {row['ratio_to_soft_adam_paired']:>6.2f} "
              f"{row['seconds_min']:>6.2f} "
              f"{row['seconds_max']:>6.2f} {its}  {flags}")


# ---- the solver-settings sweep -----------------------------------------------------------------


def linearized_quality(before: nn.Module, after: nn.Module, problem: Problem, idx: Tensor,
                       result: KKTStep, free_delta: dict[str, Tensor] | None
                       ) -> dict[str, float]:
    """How well the step ``dw`` meets the linearized constraints of the samples ``idx``.

    ``linearized_residual``: ‖C + J·dw‖/‖C‖ (J·dw by ``torch.func.jvp``, independent of the
    solver's products); ``actual_ratio``: ‖C(w + dw)‖/‖C(w)‖. With ``free_delta``, the step
    ``dw₀ = −D⁻¹g`` of the same optimizer without constraints, also
    ``residual_vs_unconstrained``: ‖C + J·dw‖/‖C + J·dw₀‖, the share of the linearized violation
    of the unconstrained step that is left (the reduced system's relative residual).
    ``before`` holds ``w``, ``after`` the stepped ``w + dw``.
    """
    constraints = problem.constraints_of(idx)
    model = before
    old = {k: v.detach() for k, v in before.named_parameters()}
    new = {k: v.detach() for k, v in after.named_parameters()}

    def c_of(p: dict[str, Tensor]) -> Tensor:
        return constraints(lambda x: torch.func.functional_call(model, p, (x,))).reshape(-1)

    c0, jdw = torch.func.jvp(c_of, (old,), (dict(result.delta),))
    with torch.no_grad():
        c1 = c_of(new)
    norm0 = float(c0.norm())
    out = {"linearized_residual": float((c0 + jdw).norm()) / norm0,
           "actual_ratio": float(c1.norm()) / norm0, "c_norm": norm0}
    if free_delta is not None:
        _, jdw0 = torch.func.jvp(c_of, (old,), (dict(free_delta),))
        out["residual_vs_unconstrained"] = (float((c0 + jdw).norm())
                                            / float((c0 + jdw0).norm()))
    return out


def gram_spectrum(model: nn.Module, problem: Problem, idx: Tensor) -> dict[str, float]:
    """Eigenvalues of ``J·Jᵀ`` (the reduced matrix of Eq. 5 times η) of the constraints of
    ``idx``: J's rows by one L-op each (``torch.func.vjp``), then a dense product."""
    constraints = problem.constraints_of(idx)
    params = {k: v.detach() for k, v in model.named_parameters()}

    def c_of(p: dict[str, Tensor]) -> Tensor:
        return constraints(lambda x: torch.func.functional_call(model, p, (x,))).reshape(-1)

    c, vjp_fn = torch.func.vjp(c_of, params)
    rows = [torch.cat([t.reshape(-1) for t in vjp_fn(e)[0].values()]) for e in torch.eye(
        c.numel(), dtype=c.dtype, device=c.device)]
    jac = torch.stack(rows)
    ev = torch.linalg.eigvalsh((jac @ jac.T).double().cpu())
    del jac, rows
    top = float(ev[-1])
    return {"max": top, "min": float(ev[0]), "median": float(ev.median()),
            "cond": top / max(float(ev[0]), 1e-300),
            "below_1e-6_of_max": int((ev < 1e-6 * top).sum())}


def sweep(start: nn.Module, problem: Problem, args: argparse.Namespace, warm: int,
          methods: tuple[str, ...]) -> dict[str, Any]:
    """Each hard method of ``methods``: ``warm`` steps at the default settings, then one step
    per setting of :data:`SWEEP` from that same state, timed (median of ``--sweep-repeats``)."""
    out: dict[str, Any] = {}
    for name in methods:
        runner = make_runner(name, start, problem, args, SOLVER)
        for _ in range(warm):
            runner.step(runner.mine())
        idx = runner.mine()
        base = (runner.model, runner.optimizer)
        spectrum = gram_spectrum(runner.model, problem, idx)
        print(f"{name:<10} after {warm} steps: J·Jᵀ eigenvalues {spectrum['min']:.2e} … "
              f"{spectrum['max']:.2e}, cond {spectrum['cond']:.1e}", flush=True)
        free_delta = None
        if name != "hard-gn":  # −D⁻¹g: the same optimizer's step without constraints
            model = copy.deepcopy(base[0])
            opt = make_optimizer(name, model, SOLVER)
            opt.load_state_dict(copy.deepcopy(base[1].state_dict()))
            free_delta = opt.step(problem.loss).delta
        reference = None
        rows = []
        for rtol, maxit in [SWEEP_REFERENCE[name], *SWEEP[name]]:
            times, result, model = [], None, None
            repeats = 1 if reference is None or name == "hard-gn" else args.sweep_repeats
            for _ in range(repeats):
                # a fresh optimizer resumed by state_dict (a deep copy of a torch optimizer
                # keeps only defaults, state and param_groups, not the model it wraps)
                model = copy.deepcopy(base[0])
                opt = make_optimizer(name, model, SOLVER)
                opt.load_state_dict(copy.deepcopy(base[1].state_dict()))
                opt.param_groups[0].update(rtol=rtol, maxit=maxit)
                sync(problem.device)
                t0 = time.perf_counter()
                if name == "hard-gn":
                    result = opt.step(problem.residuals, problem.constraints_of(idx),
                                      loss=problem.loss)
                else:
                    result = opt.step(problem.loss, problem.constraints_of(idx))
                sync(problem.device)
                times.append(time.perf_counter() - t0)
            dw = torch.cat([d.reshape(-1) for d in result.delta.values()])
            if reference is None:
                reference = dw
            row = {"rtol": rtol, "maxit": maxit, "step_seconds": statistics.median(times),
                   **hard_record(result),
                   **linearized_quality(base[0], model, problem, idx, result, free_delta),
                   "dw_distance_to_reference": float((dw - reference).norm() / reference.norm()),
                   "dw_norm": float(dw.norm())}
            rows.append(row)
            print(f"{name:<10} rtol {rtol:<7g} maxit {maxit!s:<5} {row['step_seconds']:6.2f} s "
                  f"its {row['iterations']:>3} {row['flag']:<18} "
                  f"‖C+J·dw‖/‖C‖ {row['linearized_residual']:.2e}  "
                  f"/‖C+J·dw₀‖ {row.get('residual_vs_unconstrained', math.nan):.2e}  "
                  f"‖C(w+dw)‖/‖C(w)‖ {row['actual_ratio']:.3f}  "
                  f"‖dw−dw_ref‖/‖dw_ref‖ {row['dw_distance_to_reference']:.2e}", flush=True)
        out[name] = {"jjt_spectrum": spectrum, "reference": rows[0], "settings": rows[1:]}
    return out


# ---- main -------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--json", default="docs/bench_hard.json", help="output JSON path")
    p.add_argument("--rounds", type=int, default=5, help="timed rounds (default 5)")
    p.add_argument("--warmup", type=int, default=1, help="untimed iterations per method")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--pool", type=int, default=512, help="unlabelled pool size (default 512)")
    p.add_argument("--candidates", type=int, default=128, help="Eq. 9 candidates per step")
    p.add_argument("--active", type=int, default=16, help="mined samples per step")
    p.add_argument("--n-train", type=int, default=1024,
                   help="labelled samples for pre-training (default 1024)")
    p.add_argument("--pretrain", type=int, default=240,
                   help="unconstrained Adam steps before the benchmark (default 240)")
    p.add_argument("--pretrain-lr", type=float, default=1e-3)
    p.add_argument("--pretrain-batch", type=int, default=32)
    p.add_argument("--init", default=None,
                   help="start from this PoseNet state_dict instead of pre-training")
    p.add_argument("--save-init", default=None, help="save the start model's state_dict here")
    p.add_argument("--methods", default=",".join(METHODS),
                   help=f"comma-separated subset of {','.join(METHODS)}")
    p.add_argument("--rtol", type=float, default=None,
                   help=f"MINRES-QLP rtol of hard-sgd and hard-adam (default "
                        f"{SOLVER['hard-sgd']['rtol']:g})")
    p.add_argument("--maxit", default=None,
                   help=f"MINRES-QLP iteration limit of hard-sgd and hard-adam, or 'none' "
                        f"(default {SOLVER['hard-sgd']['maxit']})")
    p.add_argument("--gn-maxit", type=int, default=None,
                   help=f"MINRES-QLP iteration limit of hard-gn (default "
                        f"{SOLVER['hard-gn']['maxit']})")
    p.add_argument("--compare-plain", action="store_true",
                   help="also run each hard method with PyTorch's own convolution double "
                        "backward ('(plain)' rows; JSON key plain_double_backward)")
    p.add_argument("--sweep", action="store_true",
                   help="also try MINRES-QLP settings of the hard methods (slow)")
    p.add_argument("--sweep-warm", default="3,10",
                   help="comma-separated numbers of steps of each hard method before a sweep "
                        "(default 3,10; hard-gn only at the first)")
    p.add_argument("--sweep-repeats", type=int, default=2)
    args = p.parse_args(argv)
    methods = tuple(m for m in args.methods.split(",") if m)
    if not methods or any(m not in METHODS for m in methods):
        p.error(f"--methods must be a subset of {METHODS}, got {args.methods!r}")
    args.methods = methods
    try:
        args.sweep_warm = tuple(int(w) for w in args.sweep_warm.split(",") if w)
    except ValueError:
        p.error(f"--sweep-warm must be comma-separated integers, got {args.sweep_warm!r}")
    if not args.sweep_warm or min(args.sweep_warm) < 0:
        p.error(f"--sweep-warm must be integers >= 0, got {args.sweep_warm!r}")
    try:
        args.json = json_path(args.json)
    except ValueError as err:
        p.error(str(err))
    if args.rounds < 1:
        p.error(f"--rounds must be >= 1, got {args.rounds}")
    if args.maxit is not None and not (args.maxit.lower() == "none" or args.maxit.isdigit()):
        p.error(f"--maxit must be a non-negative integer or 'none', got {args.maxit!r}")
    if args.threads < 1:
        p.error(f"--threads must be >= 1, got {args.threads}")
    return args


def cpu_name() -> str:
    """The CPU's model name from /proc/cpuinfo where there is one."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine(device: torch.device) -> dict[str, Any]:
    """Where the numbers were measured."""
    return {
        "platform": platform.platform(),
        "processor": cpu_name(),
        "cpu_count": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "device": str(device),
        "device_name": (torch.cuda.get_device_name(device) if device.type == "cuda"
                        else cpu_name()),
    }


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    out_path = args.json
    # unconverged solves (hard-gn stops at maxit by design) are counted in the table's flags
    logging.getLogger("ccnn.hard.kkt").setLevel(logging.ERROR)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available")
    t0 = time.perf_counter()
    problem, x_train, y_train = make_problem(args.seed, args.n_train, args.pool, device)
    if args.init is not None:
        start = PoseNet().to(device)
        start.load_state_dict(torch.load(args.init, map_location=device))
        how = f"loaded {args.init}"
    else:
        start = pretrained_model(x_train, y_train, device, args.seed, args.pretrain,
                                 args.pretrain_lr, args.pretrain_batch)
        how = f"{args.pretrain} pre-training steps"
    if args.save_init is not None:
        torch.save(start.state_dict(), args.save_init)
    spread = prediction_spread(start, problem)
    target_spread = float(y_train.std(0).mean())
    setup = time.perf_counter() - t0
    print(f"data and {how}: {setup:.1f} s; prediction spread {spread:.3f} "
          f"(targets {target_spread:.3f})", flush=True)
    sweep_out = None
    if args.sweep:
        hard = tuple(m for m in HARD if m in args.methods)
        sweep_out = {
            f"after_{warm}_steps": sweep(start, problem, args, warm,
                                         hard if i == 0 else tuple(m for m in hard
                                                                   if m != "hard-gn"))
            for i, warm in enumerate(args.sweep_warm)}
    solver = copy.deepcopy(SOLVER)
    if args.rtol is not None:
        for name in ("hard-sgd", "hard-adam"):
            solver[name]["rtol"] = args.rtol
    if args.maxit is not None:
        for name in ("hard-sgd", "hard-adam"):
            solver[name]["maxit"] = None if args.maxit.lower() == "none" else int(args.maxit)
    if args.gn_maxit is not None:
        solver["hard-gn"]["maxit"] = args.gn_maxit
    runners = [make_runner(name, start, problem, args, solver) for name in args.methods]
    if args.compare_plain:
        for name in args.methods:
            if name in HARD:
                runners.append(make_runner(name, start, problem, args, solver))
                runners[-1].plain = True
    run_interleaved(runners, args.rounds, args.warmup)
    methods = summarize(runners)
    n_params = sum(p.numel() for p in start.parameters())
    title = (f"PoseNet ({n_params:,} parameters, float32), batch 128, {args.active} of "
             f"{args.candidates} mined, {device}, {torch.get_num_threads()} threads, median of "
             f"{args.rounds} rounds")
    print_table(methods, title)
    settings = {
        "batch": 128, "active": args.active, "candidates": args.candidates, "pool": args.pool,
        "constraints_per_step": 6 * args.active, "parameters": n_params, "dtype": "float32",
        "rounds": args.rounds, "warmup": args.warmup,
        "start_model": how if args.init is None else "loaded from --init",
        "pretrain_steps": 0 if args.init is not None else args.pretrain,
        "pretrain_lr": args.pretrain_lr, "pretrain_batch": args.pretrain_batch,
        "n_train": args.n_train,
        "prediction_spread": spread, "target_spread": target_spread,
        "seed": args.seed, "threads": torch.get_num_threads(), "device": str(device),
        "hyper": HYPER, "solver": solver, "total_seconds": time.perf_counter() - t0,
    }
    plain = {label: methods.pop(label) for label in list(methods) if label.endswith("(plain)")}
    data: dict[str, Any] = {"methods": methods, "settings": settings, "machine": machine(device)}
    if plain:
        data["plain_double_backward"] = plain
    if sweep_out is not None:
        data["solver_sweep"] = sweep_out
    if out_path is not None:
        write_json(out_path, data)
        print(f"wrote {out_path}")


if __name__ == "__main__":
    main()
