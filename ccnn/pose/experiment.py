"""The pose-symmetry experiment: soft, Lagrangian and hard constraints on one network.

Márquez-Neila, Salzmann and Fua, "Imposing Hard Constraints on Deep Networks: Promises and
Limitations" (2017), §5: the network of Eq. 13 is first trained without constraints (Adam, the
model with the lowest validation error kept), then fine-tuned from it under the six left/right
symmetry constraints of Table 2 (Eq. 15, here with squared bone lengths) by every method:

* ``soft-sgd``, ``soft-adam``: the penalty of Eq. 3, ``R + λ Σ C²``, by SGD or Adam;
* ``lagrangian``: Adam on ``R + Σ Λ·C (+ ρ/2 Σ C²)`` with one multiplier per pool sample and
  constraint, updated by dual ascent after each step;
* ``hard-sgd``, ``hard-adam``, ``hard-gn``: the KKT steps of Eq. 5, 12 and 6;
* ``hard-persistent``: a KKT step on a persistent pool of constraint samples (a sample once
  mined stays until it has been met longest), the remedy the paper's conclusion proposes for
  the forgetting of changing active sets; by default the step is Adam's, projected onto the
  pool's linearized constraints in Eq. 5's metric, on a pool of 128 samples with 64 mined per
  step, removing 80% of their violation per step and 10% once the held-out violation is down
  to 5% of the start's, after a plain Adam step on a labelled batch of its own, with the output
  layer left at the start model's weights (``persistent_base="adam-euclidean"``, 40
  MINRES-QLP iterations, ``persistent_data_steps``, ``persistent_frozen``;
  docs/hard_experiments.md, seventh to ninth rounds, stops 31 to 34);
* ``projected-targets``: no constraint rows at all: the same persistent pool, and a Gauss-Newton
  step (Eq. 6 without ``C``) that pulls each pooled sample's output toward a symmetric pose near
  it (:func:`ccnn.pose.skeleton.symmetrize`), so the network learns feasible targets instead of
  linearized constraints (docs/hard_experiments.md, fourth round).

All but the two pool methods take their constraints on samples mined by Eq. 9 from an unlabeled
pool each iteration. Reported on the test split: the mean per-joint error, the median |C_jk| and
the share of constraints met within thresholds (Fig. 2a and 2b).
"""

from __future__ import annotations

import copy
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from functools import partial
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.optim.lr_scheduler import LambdaLR

from ccnn.hard import (
    DualAscent,
    Flag,
    HardAdam,
    HardGaussNewton,
    HardSGD,
    IndexedMultipliers,
    KKTStep,
    MinedActive,
    PersistentActive,
    TargetCorrection,
    lagrangian,
    soft_penalty,
)
from ccnn.hard.active import ActiveSet
from ccnn.pose.data import H36MPoses, as_tensors, synthetic_pose_splits
from ccnn.pose.model import PoseNet, pose_loss
from ccnn.pose.skeleton import (
    constraints_met,
    mean_joint_error,
    median_constraint_violation,
    symmetrize,
    symmetry_residuals,
)
from ccnn.progress import ProgressBar

__all__ = ["METHODS", "PERSISTENT_ANNEAL", "PERSISTENT_BASES", "PERSISTENT_LR", "PoseConfig",
           "Step", "evaluate", "fine_tune", "plot_fig2", "run_method", "run_pose",
           "train_unconstrained", "unconstrained_model", "weights_finite"]

log = logging.getLogger(__name__)

METHODS = ("soft-sgd", "soft-adam", "lagrangian", "hard-sgd", "hard-adam", "hard-gn",
           "hard-persistent", "projected-targets")
POOLED = ("hard-persistent", "projected-targets")  # the methods with a persistent pool
HARD = ("hard-sgd", "hard-adam", "hard-gn", "hard-persistent")
PERSISTENT_BASES = ("sgd", "adam", "adam-euclidean", "gn")
# hard-persistent's learning rate per base, unless PoseConfig.lr names one (Gauss-Newton's step
# has none: its damping is gn_damping); the default base's 2e-4 chosen on validation (stop 33).
PERSISTENT_LR = {"sgd": 1e-3, "adam": 1e-4, "adam-euclidean": 2e-4}

#: the persistent method's last iterations over which its learning rate anneals
#: (``PoseConfig.persistent_anneal``; chosen on validation at stop 36)
PERSISTENT_ANNEAL = 10

#: thresholds on |C_jk| (m²) of the Fig. 2b curve
THRESHOLDS = tuple(float(t) for t in torch.logspace(-5, -1, 25))


@dataclass(frozen=True)
class PoseConfig:
    """Settings of ``ccnn pose``. The constants were chosen on the validation split of seeds
    100 and 101 (since stop 33 also 30 and 32, since stop 36 also 57 and 61), never used to
    report (docs/hard_experiments.md lists the runs they were chosen from). The default run
    took 7 min 56 s on two CPU cores (seed 0, the machine otherwise idle; stop 36).

    Attributes:
        seed: world of the synthetic data, initial weights and every random draw.
        n_train, n_val, n_test: labelled images per split (disjoint subjects).
        n_pool: unlabeled constraint images (training subjects, new poses).
        heldout: validation images whose median |C| is logged after every iteration.
        batch_size: labelled samples per iteration (paper: 128).
        mined: constraint samples per iteration, mined by Eq. 9 (paper: 16).
        candidates: pool samples scored to mine them (paper: 128).
        pretrain_epochs, pretrain_lr: the unconstrained model (Adam; best validation epoch).
        iterations: constrained iterations per method, from the unconstrained model.
        eval_every: test evaluations along the way (the lines of Fig. 2a).
        soft_lambda: λ of Eq. 3 for soft-sgd and soft-adam.
        lr: learning rate of each method (η = 1/lr for the hard SGD and Adam steps).
        gn_damping: η of Eq. 6 (Levenberg-Marquardt damping).
        dual_rho: dual-ascent step ρ of the Lagrangian (also its augmentation when
            ``augmented``).
        augmented: the Lagrangian adds (ρ/2)·Σ C².
        budget, tol: the persistent pool's most samples and the median |C| that counts as met.
        persistent_budget, persistent_mined: the ``hard-persistent`` pool's most samples and
            the samples mined into it each step (None: ``budget`` and ``mined``, which
            ``projected-targets`` uses); 128 and 64, chosen on validation with two data steps
            per iteration (stop 34; 64 and 32 at stop 31).
        rtol, maxit: MINRES-QLP's tolerance and iteration limit in each KKT step.
        gn_maxit: the iteration limit of Gauss-Newton's solves.
        gn_batch: labelled samples of each batch whose residuals form Gauss-Newton's
            ``JᵣᵀJᵣ`` (each of its products runs through them; the rest of the batch is not
            used by that method).
        persistent_correction: ``α`` of the persistent method's steps, the share of the
            linearized violation each step removes (:func:`ccnn.hard.kkt.kkt_step`; the other
            hard methods take the paper's 1) while the held-out violation is above
            ``persistent_target``; 0.8, chosen on validation with two data steps per
            iteration (docs/hard_experiments.md, stop 34; 0.4 with one, stop 32).
        persistent_target, persistent_low: once the held-out median |C| (of the ``heldout``
            images, measured before the first step and after each) is at most
            ``persistent_target`` times the start model's, the persistent method's ``α`` falls
            to ``persistent_low`` (:class:`ccnn.hard.TargetCorrection`); None keeps
            ``persistent_correction`` throughout (the default before stop 31, with α 0.4).
        persistent_warmup: the persistent method's ``α`` rises linearly to
            ``persistent_correction`` over its first this many steps (``warmup`` of
            :class:`ccnn.hard.TargetCorrection`); 0, from the first step (on validation 5
            steps lowered the mean error ratio but met both targets on fewer tuning seeds:
            docs/hard_experiments.md, stop 33).
        persistent_data_steps: data steps of the persistent method per iteration: the first
            ``k − 1`` its base's plain step (no constraint rows) on labelled batches of their
            own, the last the projected step on a further batch, so that between two
            corrections (each a costly solve) more of the data gradient repairs the error they
            cause. 2, chosen on validation with ``persistent_correction`` 0.8
            (docs/hard_experiments.md, stop 34); 1 is the paper's one step per iteration. Each
            iteration draws ``k`` labelled batches (``k · batch_size`` samples); with the
            ``"gn"`` base the plain step is Eq. 6 without constraint rows.
        persistent_final: the persistent method's last this many iterations take the
            projected step alone (one labelled batch, no plain data step before it) at the
            full correction ``α = 1`` of Eq. 5, whatever the switch says: the run ends on
            corrections rather than on data steps that lift the violation back up. 0, none:
            on validation 1-3 lowered the violation on three tuning seeds of four but cost
            3-9 mm of error on all four (docs/hard_experiments.md, stop 35).
        persistent_anneal, persistent_anneal_to: over the persistent method's last
            ``persistent_anneal`` iterations (all of them when there are fewer) its learning
            rate falls linearly to ``persistent_anneal_to`` times its own (the last
            iteration's; a :class:`torch.optim.lr_scheduler.LambdaLR` on its optimizer, so both
            data steps of an iteration take the same rate). The correction ``α`` does not
            depend on the rate, so the data steps that lift the violation between corrections
            shrink while the corrections do not. None: 10 (:data:`PERSISTENT_ANNEAL`) for the
            bases with a learning rate, 0 for ``"gn"``; 0: a constant rate. 10 and 0.5 were
            chosen on validation with six tuning seeds (docs/hard_experiments.md, stop 36).
        adam_bias_correction: ``"eq12"`` (as printed) or ``"adam"`` for the Adam-based hard
            steps (:class:`ccnn.hard.HardAdam`).
        persistent_base: the step of the persistent-pool method: ``"sgd"`` (Eq. 5),
            ``"adam"`` (Eq. 10-12), ``"adam-euclidean"`` (Adam's step projected onto the
            linearized constraints in Eq. 5's metric: :class:`ccnn.hard.HardAdam` with
            ``metric="euclidean"`` and Adam's own bias correction) or ``"gn"`` (Eq. 6, with
            ``gn_damping`` and ``gn_batch``).  Its learning rate is
            ``lr["hard-persistent"]`` when given, else :data:`PERSISTENT_LR`'s for the base.
        persistent_maxit: the iteration limit of the persistent method's solves, whatever its
            base (None: its base's, ``maxit`` or, for ``"gn"``, ``gn_maxit``); 40, chosen on
            validation (docs/hard_experiments.md, eighth round).
        persistent_frozen: modules (names as in ``named_modules()``) whose parameters the
            persistent method leaves at the start model's values: its data step and its
            correction move the others only. ``("regressor.5",)``, the output layer, chosen on
            validation (docs/hard_experiments.md, stop 32): with it the pool's correction is
            made in the features every output is computed from (on the tuning seeds the held-out
            violation 24-30% lower for 4-11 mm more error); ``()`` trains every weight (the
            default before).
        target_damping, target_maxit: η and the MINRES-QLP iteration limit of the
            ``projected-targets`` step (chosen on validation of seed 100: 10⁻⁴ and 40).
        distinct_sides: right limbs drawn darker, so left and right can be told apart
            (docs/pose_data.md: with one colour a pose and its left/right, depth-mirrored twin
            draw the same image).
        relative: the methods enforce the scale-invariant residual
            ``(‖l‖² − ‖r‖²)/(‖l‖² + ‖r‖²)`` instead of Eq. 15's ``‖l‖² − ‖r‖²`` (same zero set;
            see :func:`ccnn.pose.skeleton.symmetry_residuals`); reports always use Eq. 15's.
        image_size, hidden: input side and hidden width of the Eq. 13 network (128 and 1024 in
            the paper; smaller only for quick tests).
        h36m: an ``.npz`` of Human3.6M crops and joints (:class:`ccnn.pose.data.H36MPoses`)
            to use instead of the synthetic data: its first 80% train (the last ``n_val`` of
            them validate) and its last 20% test, the paper's split; the training images
            also form the constraint pool. None: the synthetic data.
        h36m_units: "mm" or "m", the units of that file's joints.
    """

    seed: int = 0
    n_train: int = 3000
    n_val: int = 300
    n_test: int = 500
    n_pool: int = 2000
    heldout: int = 64
    batch_size: int = 128
    mined: int = 16
    candidates: int = 128
    pretrain_epochs: int = 6
    pretrain_lr: float = 1e-3
    iterations: int = 30
    eval_every: int = 10
    soft_lambda: float = 1.0
    lr: dict[str, float] = field(default_factory=lambda: {
        "soft-sgd": 1e-5, "soft-adam": 1e-4, "lagrangian": 1e-4, "hard-sgd": 1e-3,
        "hard-adam": 1e-4})
    gn_damping: float = 1.0
    dual_rho: float = 1.0
    augmented: bool = True
    budget: int = 32
    persistent_budget: int | None = 128
    persistent_mined: int | None = 64
    tol: float = 1e-4
    rtol: float = 1e-4
    maxit: int | None = 20
    gn_maxit: int = 5
    gn_batch: int = 32
    persistent_correction: float = 0.8
    persistent_target: float | None = 0.05
    persistent_low: float = 0.1
    persistent_warmup: int = 0
    persistent_data_steps: int = 2
    persistent_final: int = 0
    persistent_anneal: int | None = None
    persistent_anneal_to: float = 0.5
    adam_bias_correction: str = "eq12"
    persistent_base: str = "adam-euclidean"
    persistent_maxit: int | None = 40
    persistent_frozen: tuple[str, ...] = ("regressor.5",)
    target_damping: float = 1e-4
    target_maxit: int = 40
    distinct_sides: bool = True
    relative: bool = True
    image_size: int = 128
    hidden: int = 1024
    h36m: str | None = None
    h36m_units: str = "mm"
    methods: tuple[str, ...] = METHODS

    def __post_init__(self) -> None:
        frozen = self.persistent_frozen
        if isinstance(frozen, str) or not all(isinstance(n, str) and n for n in frozen):
            raise ValueError(f"persistent_frozen must be a tuple of module names, got {frozen!r}")
        object.__setattr__(self, "persistent_frozen", tuple(frozen))
        with torch.device("meta"):  # the names checked now, on a network without data or RNG
            freeze(PoseNet(hidden=1, image_size=8), self.persistent_frozen)
        for name in ("n_train", "n_val", "n_test", "n_pool", "heldout", "batch_size", "mined",
                     "candidates", "pretrain_epochs", "iterations", "eval_every", "budget",
                     "gn_maxit", "gn_batch", "target_maxit", "image_size", "hidden",
                     "persistent_data_steps"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.mined > self.candidates or self.candidates > self.n_pool:
            raise ValueError(f"need mined <= candidates <= n_pool, got {self.mined}, "
                             f"{self.candidates}, {self.n_pool}")
        if self.gn_batch > self.batch_size:
            raise ValueError(f"gn_batch ({self.gn_batch}) cannot exceed batch_size "
                             f"({self.batch_size})")
        for name in ("persistent_warmup", "persistent_final", "persistent_anneal"):
            value = getattr(self, name)
            if name == "persistent_anneal" and value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be a non-negative integer, got {value!r}")
        if self.persistent_final > self.iterations:
            raise ValueError(f"persistent_final ({self.persistent_final}) cannot exceed "
                             f"iterations ({self.iterations})")
        for name in ("persistent_budget", "persistent_mined", "persistent_maxit"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                                      or value < 1):
                raise ValueError(f"{name} must be None or a positive integer, got {value!r}")
        persistent = self.pool_sizes("hard-persistent")
        for prefix, (budget, mined) in (("", (self.budget, self.mined)),
                                        ("persistent_", persistent)):
            if budget < mined:
                raise ValueError(f"{prefix}budget ({budget}) must be at least {prefix}mined "
                                 f"({mined})")
        if persistent[1] > self.candidates:  # mined's own bound is checked above
            raise ValueError(f"persistent_mined ({persistent[1]}) cannot exceed candidates "
                             f"({self.candidates})")
        if self.heldout > self.n_val:
            raise ValueError(f"heldout ({self.heldout}) cannot exceed n_val ({self.n_val})")
        for name in ("pretrain_lr", "gn_damping", "dual_rho", "target_damping"):
            _check_positive(name, getattr(self, name))
        for name in ("soft_lambda", "tol", "rtol"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"{name} must be a non-negative number, got {value}")
        for name in ("persistent_correction", "persistent_low", "persistent_anneal_to"):
            if not 0 < getattr(self, name) <= 1:
                raise ValueError(f"{name} must be in (0, 1], got {getattr(self, name)}")
        if self.persistent_target is not None:
            _check_positive("persistent_target", self.persistent_target)
        if self.adam_bias_correction not in ("eq12", "adam"):
            raise ValueError(f"adam_bias_correction must be 'eq12' or 'adam', got "
                             f"{self.adam_bias_correction!r}")
        if self.persistent_base not in PERSISTENT_BASES:
            raise ValueError(f"persistent_base must be one of {', '.join(PERSISTENT_BASES)}, "
                             f"got {self.persistent_base!r}")
        for method, value in self.lr.items():
            if method not in METHODS:
                raise ValueError(f"lr: unknown method {method!r}")
            _check_positive(f"lr[{method!r}]", value)
        if self.persistent_base == "gn":
            for what, used in (("lr['hard-persistent']", "hard-persistent" in self.lr),
                               ("persistent_anneal", bool(self.persistent_anneal))):
                if used:
                    raise ValueError(f"{what} has no effect with persistent_base 'gn' "
                                     "(Eq. 6's step has no learning rate: set gn_damping)")
        for method in self.methods:
            if method not in METHODS:
                raise ValueError(f"unknown method {method!r}; choose from {', '.join(METHODS)}")

    def pool_sizes(self, name: str) -> tuple[int, int]:
        """``(budget, mined)`` of method ``name``'s constraint samples."""
        if name == "hard-persistent":
            return (self.budget if self.persistent_budget is None else self.persistent_budget,
                    self.mined if self.persistent_mined is None else self.persistent_mined)
        return self.budget, self.mined

    def final(self, name: str, iteration: int) -> bool:
        """Whether iteration ``iteration`` (from 0) of method ``name`` is one of the persistent
        method's ``persistent_final`` last ones."""
        return name == "hard-persistent" and iteration >= self.iterations - self.persistent_final

    def lr_factor(self, name: str, iteration: int) -> float:
        """The share of its learning rate method ``name`` takes at iteration ``iteration``
        (from 0): below 1 only in the persistent method's ``persistent_anneal`` last ones,
        falling linearly to ``persistent_anneal_to`` at the last."""
        span = self.anneal_span()
        first = self.iterations - span
        if name != "hard-persistent" or iteration < first:
            return 1.0
        return 1.0 - (1.0 - self.persistent_anneal_to) * (iteration - first + 1) / span

    def anneal_span(self) -> int:
        """The persistent method's iterations whose learning rate falls (``persistent_anneal``
        resolved: None gives :data:`PERSISTENT_ANNEAL` but 0 for the ``"gn"`` base; at most
        ``iterations``)."""
        span = self.persistent_anneal
        if span is None:
            span = 0 if self.persistent_base == "gn" else PERSISTENT_ANNEAL
        return min(span, self.iterations)

    def data_steps(self, name: str, iteration: int) -> int:
        """Labelled batches method ``name`` takes at iteration ``iteration`` (one step on each)."""
        if name != "hard-persistent" or self.final(name, iteration):
            return 1
        return self.persistent_data_steps


def _check_positive(name: str, value: float) -> None:
    if not (isinstance(value, int | float) and math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a positive number, got {value!r}")


@torch.no_grad()
def predict(model: nn.Module, images: Tensor, batch: int = 256) -> Tensor:
    """The model's poses for ``images``, in batches."""
    return torch.cat([model(images[i:i + batch]) for i in range(0, len(images), batch)])


@torch.no_grad()
def evaluate(model: nn.Module, images: Tensor, joints: Tensor) -> dict:
    """The paper's two metrics and the Fig. 2b curve on one split."""
    pred = predict(model, images)
    C = symmetry_residuals(pred)
    return {"mean_joint_error": float(mean_joint_error(pred, joints)),
            "median_violation": float(median_constraint_violation(C)),
            "constraints_met": constraints_met(C, THRESHOLDS).tolist()}


def train_unconstrained(model: nn.Module, data: dict[str, Tensor], cfg: PoseConfig,
                        generator: torch.Generator, progress: bool = False) -> dict:
    """Adam on Eq. 14 for ``cfg.pretrain_epochs``; the weights of the epoch with the lowest
    validation error are loaded back into ``model`` (the paper's *unconstrained* model)."""
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.pretrain_lr)
    n = len(data["train_x"])
    steps = math.ceil(n / cfg.batch_size)
    best, best_state, history = math.inf, None, []
    for epoch in range(cfg.pretrain_epochs):
        order = torch.randperm(n, generator=generator)
        with ProgressBar(progress, steps, f"unconstrained {epoch + 1}/{cfg.pretrain_epochs}"
                         ) as bar:
            for i in range(steps):
                idx = order[i * cfg.batch_size:(i + 1) * cfg.batch_size]
                loss = pose_loss(model(data["train_x"][idx]), data["train_y"][idx])
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                bar({"loss": loss.item()})
        val = evaluate(model, data["val_x"], data["val_y"])["mean_joint_error"]
        history.append(val)
        log.info("unconstrained epoch %d: validation error %.4f m", epoch + 1, val)
        if val < best:
            best, best_state = val, copy.deepcopy(model.state_dict())
    model.load_state_dict(best_state)
    return {"validation_error_per_epoch": history, "best_epoch": history.index(best) + 1}


def freeze(model: nn.Module, modules: Sequence[str]) -> None:
    """Stop the parameters of ``model``'s submodules named ``modules`` (as in
    ``named_modules()``) from training (``requires_grad=False``: the optimizers of
    :mod:`ccnn.hard` and :mod:`torch.optim` then leave them as they are)."""
    named = dict(model.named_modules())
    for name in modules:
        if name not in named or name == "":
            raise ValueError(f"persistent_frozen: {model.__class__.__name__} has no submodule "
                             f"{name!r} (its submodules: "
                             f"{', '.join(n for n in named if n)})")
        for p in named[name].parameters():
            p.requires_grad_(False)
    if not any(p.requires_grad for p in model.parameters()):
        raise ValueError(f"persistent_frozen {tuple(modules)} leaves no parameter to train")


class _Method:
    """One constrained method's optimizer state and its step, behind one call."""

    def __init__(self, name: str, model: nn.Module, cfg: PoseConfig) -> None:
        self.name, self.model, self.cfg = name, model, cfg
        self.iteration = 0  # the steps taken so far
        persistent = name == "hard-persistent"
        lr = cfg.lr.get(name, PERSISTENT_LR.get(cfg.persistent_base) if persistent else None)
        alpha = cfg.persistent_correction if persistent else 1.0
        self.gauss_newton = name == "hard-gn" or (persistent and cfg.persistent_base == "gn")
        maxit = cfg.gn_maxit if self.gauss_newton else cfg.maxit
        if persistent and cfg.persistent_maxit is not None:
            maxit = cfg.persistent_maxit
        if persistent:
            freeze(model, cfg.persistent_frozen)
        self.multipliers = self.dual = None
        if name == "projected-targets":
            self.optimizer = HardGaussNewton(model, damping=cfg.target_damping, rtol=cfg.rtol,
                                             maxit=cfg.target_maxit)
        elif self.gauss_newton:
            self.optimizer = HardGaussNewton(model, damping=cfg.gn_damping, rtol=cfg.rtol,
                                             maxit=maxit, correction=alpha)
        elif name == "soft-sgd":
            self.optimizer = torch.optim.SGD(model.parameters(), lr=lr)
        elif name in ("soft-adam", "lagrangian"):
            self.optimizer = torch.optim.Adam(model.parameters(), lr=lr)
        elif name == "hard-sgd" or (persistent and cfg.persistent_base == "sgd"):
            self.optimizer = HardSGD(model, lr=lr, rtol=cfg.rtol, maxit=maxit, correction=alpha)
        else:  # hard-adam, or the persistent pool on Adam's step (in its own metric or Eq. 5's)
            euclidean = persistent and cfg.persistent_base == "adam-euclidean"
            self.optimizer = HardAdam(
                model, lr=lr, rtol=cfg.rtol, maxit=maxit,
                bias_correction="adam" if euclidean else cfg.adam_bias_correction,
                metric="euclidean" if euclidean else "diagonal", correction=alpha)
        if name == "lagrangian":
            self.multipliers = IndexedMultipliers(cfg.n_pool, 6)
            rho = cfg.dual_rho
            self.dual = DualAscent(self.multipliers, rho=rho)
        self.switch = TargetCorrection(
            self.optimizer, cfg.persistent_target, low=cfg.persistent_low, relative=True,
            warmup=cfg.persistent_warmup) if persistent else None
        self.schedule = LambdaLR(self.optimizer, partial(cfg.lr_factor, name)) \
            if persistent and cfg.anneal_span() else None

    def observe(self, heldout_violation: float) -> None:
        """The held-out median |C| before the first step and after each: sets the persistent
        method's ``α`` for the next step (``cfg.persistent_target``, ``cfg.persistent_warmup``)."""
        if self.switch is not None:
            self.switch.step(heldout_violation)

    def step(self, x: Tensor, y: Tensor, xc: Tensor, idx: Tensor) -> dict:
        """One iteration on the labelled batch (x, y) and constraint inputs xc (pool indices
        idx); returns the statistics to log."""
        cfg = self.cfg
        if self.name == "projected-targets":
            return self._target_step(x, y, xc)
        iteration, self.iteration = self.iteration, self.iteration + 1
        if self.name in HARD:
            if cfg.final(self.name, iteration):  # Eq. 5's full correction to end the run
                for group in self.optimizer.param_groups:
                    group["correction"] = 1.0
            group = self.optimizer.param_groups[0]
            rate = {"lr": group["lr"]} if "lr" in group else {}  # Gauss-Newton has none
            steps = cfg.data_steps(self.name, iteration)
            xs, ys = x.chunk(steps), y.chunk(steps)
            for xb, yb in zip(xs[:-1], ys[:-1], strict=True):  # the plain data steps first
                self._hard_step(xb, yb, None)
            result = self._hard_step(xs[-1], ys[-1], lambda net: symmetry_residuals(
                net(xc), relative=cfg.relative))
            if self.schedule is not None:
                self.schedule.step()  # the next iteration's rate
            return {**_solver_stats(result, result.constraint_values),
                    "multiplier_norm": float(result.multipliers.norm()),
                    "correction": group["correction"], **rate}
        R = pose_loss(self.model(x), y)
        C = symmetry_residuals(self.model(xc), relative=cfg.relative)
        stats = {"loss": R.item(), "active_violation": float(C.detach().abs().median())}
        if self.name == "lagrangian":
            objective = lagrangian(R, C, self.multipliers(idx),
                                   rho_aug=cfg.dual_rho if cfg.augmented else 0.0)
        else:
            objective = R + cfg.soft_lambda * soft_penalty(C, 1.0)
        self.optimizer.zero_grad()
        objective.backward()
        self.optimizer.step()
        if self.dual is not None:
            info = self.dual.step(idx, C.detach())
            stats["multiplier_norm"] = info.multiplier_norm
        return stats

    def _hard_step(self, x: Tensor, y: Tensor, constraints: Callable | None) -> KKTStep:
        """The hard optimizer's step on the labelled batch ``(x, y)`` under ``constraints``
        (None: its plain data step); Gauss-Newton's residuals are the first ``gn_batch``
        samples'."""
        def loss(net: Callable) -> Tensor:
            return pose_loss(net(x), y)

        if not self.gauss_newton:
            return self.optimizer.step(loss, constraints)
        xg, yg = x[:self.cfg.gn_batch], y[:self.cfg.gn_batch]
        scale = math.sqrt(2.0 / yg.numel())  # ½‖r‖² = Eq. 14's mean squared error
        return self.optimizer.step(lambda net: (net(xg) - yg).reshape(-1) * scale, constraints,
                                   loss=loss)

    def _target_step(self, x: Tensor, y: Tensor, xc: Tensor) -> dict:
        """Eq. 6 without constraint rows on ``r = (f(xc) − T)/√n``: the pooled outputs pulled
        toward ``T``, symmetric poses near them (fixed at the step's start)."""
        with torch.no_grad():
            outputs = self.model(xc)
            targets = symmetrize(outputs)
            C = symmetry_residuals(outputs, relative=self.cfg.relative)  # before the step
        scale = math.sqrt(1.0 / targets.numel())
        result = self.optimizer.step(lambda net: (net(xc) - targets).reshape(-1) * scale,
                                     loss=lambda net: pose_loss(net(x), y))
        return _solver_stats(result, C)


def _solver_stats(result: KKTStep, C: Tensor) -> dict:
    """The statistics logged for a Gauss-Newton or KKT step: loss, median |C| of the active
    samples before the step, and the solver's iterations and flag."""
    return {"loss": result.loss_value, "active_violation": float(C.abs().median()),
            "solver_iterations": result.info.iterations, "solver_flag": int(result.info.flag)}


def _chooser(name: str, cfg: PoseConfig, generator: torch.Generator) -> ActiveSet:
    budget, mined = cfg.pool_sizes(name)
    if name in POOLED:
        return PersistentActive(cfg.n_pool, mined, budget, tol=cfg.tol,
                                candidates=cfg.candidates, generator=generator)
    return MinedActive(cfg.n_pool, mined, candidates=cfg.candidates, generator=generator)


#: One iteration of a fine-tuning method: ``step(x, y, xc, idx)`` on the labelled batch (x, y)
#: and the constraint inputs xc (pool indices idx) updates the model and returns the statistics
#: to log (with ``solver_iterations`` and ``solver_flag`` where a Krylov solve ran).
Step = Callable[[Tensor, Tensor, Tensor, Tensor], dict]


def weights_finite(model: nn.Module) -> bool:
    """Whether every parameter of ``model`` is finite."""
    return all(bool(torch.isfinite(p).all()) for p in model.parameters())


def run_method(name: str, start: nn.Module, data: dict[str, Tensor], cfg: PoseConfig,
               progress: bool = False, split: str = "test") -> dict:
    """Fine-tune a copy of ``start`` by method ``name`` for ``cfg.iterations`` iterations;
    returns its JSON record, evaluated on ``split`` ("test" or "val")."""
    model = copy.deepcopy(start)
    method = _Method(name, model, cfg)
    return fine_tune(name, model, method.step, data, cfg, progress, split,
                     observe=method.observe)


def fine_tune(name: str, model: nn.Module, step: Step, data: dict[str, Tensor], cfg: PoseConfig,
              progress: bool = False, split: str = "test",
              observe: Callable[[float], None] | None = None) -> dict:
    """The iterations every fine-tuning method shares: each draws a labelled batch
    (``cfg.data_steps(name, it)`` of them at iteration ``it`` for the persistent method), mines the
    constraint samples (Eq. 9, or the persistent pool for ``hard-persistent``), calls ``step``
    and logs the held-out violation, which ``observe`` (if given) also receives, once before
    the first step and after each; the test curve every ``cfg.eval_every`` iterations. Returns
    the method's JSON record, evaluated on ``split``."""
    generator = torch.Generator().manual_seed(cfg.seed + 1)
    chooser = _chooser(name, cfg, generator)
    pool, heldout = data["pool_x"], data["val_x"][:cfg.heldout]
    eval_x, eval_y = data[f"{split}_x"], data[f"{split}_y"]
    n = len(data["train_x"])
    history, curve, seconds = [], [], 0.0

    @torch.no_grad()
    def heldout_violation() -> float:
        return float(symmetry_residuals(model(heldout)).abs().median())

    if observe is not None:
        observe(heldout_violation())
    with ProgressBar(progress, cfg.iterations, name) as bar:
        for it in range(cfg.iterations):
            start_time = time.perf_counter()
            batch = torch.randint(n, (cfg.batch_size * cfg.data_steps(name, it),),
                                  generator=generator)
            with torch.no_grad():
                idx = chooser.select(
                    lambda i: symmetry_residuals(model(pool[i]), relative=cfg.relative))
            try:
                stats = step(data["train_x"][batch], data["train_y"][batch], pool[idx], idx)
            except (RuntimeError, FloatingPointError) as err:  # e.g. a system with nan
                raise RuntimeError(f"{name}: the step failed at iteration {it}: {err}") from err
            seconds += time.perf_counter() - start_time
            if not weights_finite(model):
                raise RuntimeError(f"{name}: the weights became non-finite at iteration {it}")
            stats["heldout_violation"] = heldout_violation()
            if observe is not None:
                observe(stats["heldout_violation"])
            stats["active"] = len(idx)
            history.append(stats)
            log.debug("%s iteration %d: %s", name, it + 1, stats)
            if (it + 1) % cfg.eval_every == 0 or it + 1 == cfg.iterations:
                point = evaluate(model, eval_x, eval_y)
                curve.append({"iteration": it + 1, "mean_joint_error": point["mean_joint_error"],
                              "median_violation": point["median_violation"]})
            bar({k: v for k, v in stats.items() if k in ("loss", "heldout_violation")})
    final = evaluate(model, eval_x, eval_y)
    log.info("%s: error %.4f m, median |C| %.3g, %.3f s/iteration", name,
             final["mean_joint_error"], final["median_violation"], seconds / cfg.iterations)
    return {**final, **_solver_summary(name, history), "seconds_per_iter": seconds / cfg.iterations,
            "median_violation_per_iter": [h["heldout_violation"] for h in history],
            "curve": curve, "history": history}


def _solver_summary(name: str, history: list[dict]) -> dict:
    """Mean MINRES-QLP iterations and the solves stopped by maxit (truncated: still finite, not
    exact) over the iterations that ran one; {} when none did."""
    solved = [h for h in history if "solver_flag" in h]
    if not solved:
        return {}
    flags = [Flag(h["solver_flag"]) for h in solved]
    summary = {"solver_iterations_mean": sum(h["solver_iterations"] for h in solved)
               / len(solved), "solves_stopped_by_maxit": flags.count(Flag.MAXIT)}
    others = sorted({f.name for f in flags if not f.converged and f is not Flag.MAXIT})
    log.info("%s: %d of %d KKT solves stopped at the iteration limit%s", name,
             summary["solves_stopped_by_maxit"], len(flags),
             f"; also unconverged: {', '.join(others)}" if others else "")
    return summary


def load_data(cfg: PoseConfig) -> dict[str, Tensor]:
    """The splits as whole tensors: the synthetic ones of ``cfg.seed``, or ``cfg.h36m``'s."""
    if cfg.h36m is not None:
        return _h36m_splits(cfg)
    splits = synthetic_pose_splits(cfg.seed, cfg.n_train, cfg.n_val, cfg.n_test, cfg.n_pool,
                                   image_size=cfg.image_size,
                                   distinct_sides=cfg.distinct_sides)
    data = {}
    for name in ("train", "val", "test"):
        data[f"{name}_x"], data[f"{name}_y"] = as_tensors(getattr(splits, name))
    data["pool_x"] = splits.constraint.tensors()
    return data


def _h36m_splits(cfg: PoseConfig) -> dict[str, Tensor]:
    """The paper's 80/20 split of a Human3.6M file (validation: the end of the 80%)."""
    images, joints = H36MPoses(cfg.h36m, units=cfg.h36m_units,
                               image_size=cfg.image_size).tensors()
    n_fit = int(0.8 * len(images))
    n_train = n_fit - cfg.n_val
    if n_train < cfg.batch_size or cfg.n_pool > n_train:
        raise ValueError(f"{cfg.h36m}: {len(images)} samples leave {n_train} for training; "
                         f"need at least batch_size={cfg.batch_size} and n_pool={cfg.n_pool}")
    return {"train_x": images[:n_train], "train_y": joints[:n_train],
            "val_x": images[n_train:n_fit], "val_y": joints[n_train:n_fit],
            "test_x": images[n_fit:], "test_y": joints[n_fit:],
            "pool_x": images[:cfg.n_pool]}


def unconstrained_model(cfg: PoseConfig, data: dict[str, Tensor], progress: bool = False,
                        cache: Path | None = None) -> tuple[nn.Module, dict]:
    """The Eq. 13 network with seeded initial weights (the caller's RNG is restored), trained by
    :func:`train_unconstrained`; with ``cache``, loaded from that state_dict file when it exists
    and saved there otherwise. Returns the model and its training record ({} when loaded)."""
    with torch.random.fork_rng():
        torch.manual_seed(cfg.seed)
        model = PoseNet(hidden=cfg.hidden, image_size=cfg.image_size)
    if cache is not None and Path(cache).is_file():
        model.load_state_dict(torch.load(cache))
        return model, {}
    record = train_unconstrained(model, data, cfg, torch.Generator().manual_seed(cfg.seed),
                                 progress)
    if cache is not None:
        Path(cache).parent.mkdir(parents=True, exist_ok=True)
        torch.save(model.state_dict(), cache)
    return model, record


def run_pose(cfg: PoseConfig, out: Path | None = None, progress: bool = False,
             split: str = "test") -> dict:
    """The whole experiment: the unconstrained model, then every method of ``cfg.methods``
    from it; returns ``{"methods": {...}, "config": {...}}`` and, with ``out``, draws Fig. 2a
    and 2b there. ``split="val"`` evaluates on the validation split (for choosing settings)."""
    if split not in ("test", "val"):
        raise ValueError(f"split must be 'test' or 'val', got {split!r}")
    t0 = time.perf_counter()
    data = load_data(cfg)
    start, pretraining = unconstrained_model(cfg, data, progress)
    records = {"unconstrained": {**evaluate(start, data[f"{split}_x"], data[f"{split}_y"]),
                                 **pretraining}}
    for name in cfg.methods:
        records[name] = run_method(name, start, data, cfg, progress, split)
    result = {"methods": records, "split": split, "config": _config_json(cfg),
              "thresholds": list(THRESHOLDS), "seconds": time.perf_counter() - t0}
    if out is not None:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        plot_fig2(records, out / "fig2_pose.png")
    return result


def _config_json(cfg: PoseConfig) -> dict:
    """``cfg`` as JSON, with the anneal span that ran (``persistent_anneal`` resolved)."""
    record = {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(cfg).items()}
    return {**record, "persistent_anneal": cfg.anneal_span()}


def with_overrides(cfg: PoseConfig, **changes: object) -> PoseConfig:
    """``cfg`` with some fields changed (``lr`` entries merged, not replaced)."""
    if "lr" in changes:
        changes["lr"] = {**cfg.lr, **changes["lr"]}  # type: ignore[dict-item]
    return replace(cfg, **changes)


def plot_fig2(records: dict[str, dict], path: Path) -> None:
    """Fig. 2: (a) mean joint error against median |C| along each method's training, the
    unconstrained model as the large dot; (b) share of constraints met against the threshold.
    Solid lines: hard methods; dashed: soft and Lagrangian. A method whose error ended above five
    times the unconstrained model's is left out of (a) and marked diverged."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(12, 4.8))
    ax_a, ax_b = fig.subplots(1, 2)
    base = records["unconstrained"]
    ax_a.plot(base["median_violation"], 1000 * base["mean_joint_error"], "o", ms=12,
              color="tab:blue", label="unconstrained", zorder=3)
    ax_b.plot(THRESHOLDS, base["constraints_met"], color="tab:blue", lw=2.5,
              label="unconstrained")
    for name, record in records.items():
        if name == "unconstrained":
            continue
        style = "-" if name in HARD else "--"
        if not record["mean_joint_error"] <= 5 * base["mean_joint_error"]:
            ax_b.plot(THRESHOLDS, record["constraints_met"], style, label=f"{name} (diverged)")
            continue
        points = [(base["median_violation"], base["mean_joint_error"])] + [
            (p["median_violation"], p["mean_joint_error"]) for p in record["curve"]]
        xs, ys = zip(*points, strict=True)
        (line,) = ax_a.plot(xs, [1000 * y for y in ys], style, marker=".", label=name)
        ax_b.plot(THRESHOLDS, record["constraints_met"], style, color=line.get_color(),
                  label=name)
    ax_a.set_xscale("log")
    ax_a.set_xlabel("median |C| on the test set (m²)")
    ax_a.set_ylabel("mean joint error (mm)")
    ax_a.set_title("(a) error against constraint violation")
    ax_b.set_xscale("log")
    ax_b.set_xlabel("threshold on |C| (m²)")
    ax_b.set_ylabel("share of constraints met")
    ax_b.set_title("(b) constraints met")
    for ax in (ax_a, ax_b):
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
