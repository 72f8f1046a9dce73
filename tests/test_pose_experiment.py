"""``ccnn pose`` at toy sizes: every method runs, the metrics are the paper's, the JSON has the
issue's shape, and runs repeat exactly."""

from __future__ import annotations

import copy
import json
import logging

import numpy as np
import pytest
import torch

from ccnn.cli import build_parser, main
from ccnn.hard import HardAdam, HardGaussNewton
from ccnn.pose.experiment import (
    METHODS,
    PERSISTENT_ANNEAL,
    THRESHOLDS,
    PoseConfig,
    _chooser,
    _Method,
    evaluate,
    fine_tune,
    freeze,
    load_data,
    run_method,
    run_pose,
    train_unconstrained,
)
from ccnn.pose.model import PoseNet, pose_loss
from ccnn.pose.skeleton import symmetrize, symmetry_residuals

TINY = {"n_train": 48, "n_val": 16, "n_test": 16, "n_pool": 48, "heldout": 8, "batch_size": 16,
        "mined": 4, "candidates": 16, "budget": 8, "pretrain_epochs": 2, "iterations": 3,
        "eval_every": 2, "image_size": 32, "hidden": 32, "gn_maxit": 3, "gn_batch": 8,
        "persistent_budget": None, "persistent_mined": None}


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, object]:
    out = tmp_path_factory.mktemp("pose")
    return run_pose(PoseConfig(**TINY), out=out), out


def test_every_method_reports_the_issue_shape(tiny_run: tuple[dict, object]) -> None:
    result, out = tiny_run
    assert set(result["methods"]) == {"unconstrained", *METHODS}
    for name in METHODS:
        record = result["methods"][name]
        assert len(record["median_violation_per_iter"]) == TINY["iterations"]
        assert [p["iteration"] for p in record["curve"]] == [2, 3]
        assert record["curve"][-1]["mean_joint_error"] == record["mean_joint_error"]
        assert record["seconds_per_iter"] > 0
        assert len(record["constraints_met"]) == len(THRESHOLDS)
        assert np.all(np.diff(record["constraints_met"]) >= 0)  # a CDF in the threshold
    hard = result["methods"]["hard-sgd"]["history"][0]
    assert {"loss", "active_violation", "heldout_violation", "multiplier_norm",
            "solver_iterations", "solver_flag"} <= set(hard)
    assert "multiplier_norm" in result["methods"]["lagrangian"]["history"][0]
    assert result["split"] == "test"
    with (out / "fig2_pose.png").open("rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_runs_repeat_exactly() -> None:
    cfg = PoseConfig(**{**TINY, "methods": ("soft-adam", "hard-sgd", "hard-persistent")})
    a, b = run_pose(cfg)["methods"], run_pose(cfg)["methods"]
    for name in a:
        assert a[name]["mean_joint_error"] == b[name]["mean_joint_error"]
        assert a[name]["median_violation"] == b[name]["median_violation"]


def test_evaluate_matches_a_numpy_computation() -> None:
    cfg = PoseConfig(**TINY)
    data = load_data(cfg)
    torch.manual_seed(0)
    model = PoseNet(hidden=cfg.hidden, image_size=cfg.image_size)
    got = evaluate(model, data["test_x"], data["test_y"])
    with torch.no_grad():
        pred = model(data["test_x"]).numpy().reshape(-1, 17, 3)
    true = data["test_y"].numpy().reshape(-1, 17, 3)
    error = np.linalg.norm(pred - true, axis=2).mean()
    assert got["mean_joint_error"] == pytest.approx(error, rel=1e-5)
    pairs = [(11, 12, 14, 15), (12, 13, 15, 16), (4, 5, 1, 2), (5, 6, 2, 3), (8, 11, 8, 14),
             (0, 4, 0, 1)]  # Table 2 (left, right) by joint index

    def sq(a: int, b: int) -> np.ndarray:
        return ((pred[:, a] - pred[:, b]) ** 2).sum(1)

    C = np.stack([sq(a, b) - sq(c, d) for a, b, c, d in pairs], axis=1)
    assert got["median_violation"] == pytest.approx(np.median(np.abs(C)), rel=1e-5)
    assert got["constraints_met"][-1] == pytest.approx((np.abs(C) <= THRESHOLDS[-1]).mean())


def test_unconstrained_model_is_the_best_validation_epoch() -> None:
    cfg = PoseConfig(**{**TINY, "pretrain_epochs": 3})
    data = load_data(cfg)
    torch.manual_seed(0)
    model = PoseNet(hidden=cfg.hidden, image_size=cfg.image_size)
    history = train_unconstrained(model, data, cfg, torch.Generator().manual_seed(0))
    errors = history["validation_error_per_epoch"]
    assert len(errors) == 3
    assert history["best_epoch"] == int(np.argmin(errors)) + 1
    assert evaluate(model, data["val_x"], data["val_y"])["mean_joint_error"] == min(errors)


@pytest.mark.parametrize(("name", "base"), [
    ("hard-sgd", "sgd"), ("hard-adam", "sgd"), ("hard-gn", "sgd"), ("hard-persistent", "sgd"),
    ("hard-persistent", "adam"), ("hard-persistent", "adam-euclidean"), ("hard-persistent", "gn")])
def test_a_hard_step_meets_its_linearized_constraints(name: str, base: str) -> None:
    """On the real network: after one KKT step the mined samples' linearized residuals
    ``C(w) + J·dw`` vanish (J·dw by forward-mode AD, independent of the solver's products);
    the persistent method's step, on any of its bases, removes the share
    ``persistent_correction`` of them (its projected step alone: one data step per iteration;
    the plain ones before it are test_the_persistent_data_steps_precede_the_projected_step's)."""
    cfg = PoseConfig(**{**TINY, "rtol": 1e-12, "maxit": 500,
                        "gn_maxit": 3 if name == "hard-persistent" else 500,
                        "persistent_maxit": 500, "persistent_base": base,
                        "persistent_correction": 0.25, "persistent_data_steps": 1,
                        "lr": {"hard-sgd": 1e-3, "hard-adam": 1e-3,
                               **({} if base == "gn" else {"hard-persistent": 1e-3})}})
    data = load_data(cfg)
    torch.manual_seed(1)
    model = PoseNet(hidden=cfg.hidden, image_size=cfg.image_size).double()
    x, y = data["train_x"][:16].double(), data["train_y"][:16].double()
    xc = data["pool_x"][:4].double()
    w = {k: v.detach().clone() for k, v in model.named_parameters()}

    def residuals(params: dict) -> torch.Tensor:
        return symmetry_residuals(torch.func.functional_call(model, params, (xc,)),
                                  relative=cfg.relative)

    C = residuals(w)
    _Method(name, model, cfg).step(x, y, xc, torch.arange(4))
    dw = {k: v.detach() - w[k] for k, v in model.named_parameters()}
    _, J_dw = torch.func.jvp(residuals, (w,), (dw,))
    left = 0.75 * C if name == "hard-persistent" else torch.zeros_like(C)
    assert float((C + J_dw - left).norm()) < 1e-6 * float(C.norm())


@pytest.mark.parametrize("base", ["sgd", "adam", "adam-euclidean"])
def test_the_persistent_learning_rate_follows_its_base(base: str) -> None:
    """Without an lr of its own hard-persistent takes its base's (Eq. 5's 1e-3, Eq. 12's 1e-4,
    the Euclidean Adam step's 2e-4); a given one wins; persistent_maxit sets its solves' limit
    (None: the base's); the Euclidean base is HardAdam with Adam's own bias correction."""
    model = PoseNet(hidden=8, image_size=32)
    defaults = {"sgd": 1e-3, "adam": 1e-4, "adam-euclidean": 2e-4}
    for lr, expected in (({}, defaults[base]), ({"hard-persistent": 0.5}, 0.5)):
        cfg = PoseConfig(**{**TINY, "persistent_base": base, "lr": {**PoseConfig().lr, **lr},
                            "persistent_anneal": 0})  # the rate of the first iteration
        group = _Method("hard-persistent", model, cfg).optimizer.param_groups[0]
        assert group["lr"] == expected
    assert group["maxit"] == 40  # persistent_maxit, whatever the base
    cfg = PoseConfig(**{**TINY, "persistent_base": base, "persistent_maxit": None})
    assert _Method("hard-persistent", model, cfg).optimizer.param_groups[0]["maxit"] == cfg.maxit
    if base != "sgd":
        euclidean = base == "adam-euclidean"
        assert group["metric"] == ("euclidean" if euclidean else "diagonal")
        assert group["bias_correction"] == ("adam" if euclidean else "eq12")


@pytest.mark.parametrize(("target", "warmup"), [(None, 0), (10.0, 0), (0.7, 0), (None, 4),
                                                (0.7, 3)])
def test_the_persistent_correction_follows_the_heldout_violation(target: float | None,
                                                                 warmup: int) -> None:
    """With persistent_target τ each step of the persistent method takes α = persistent_low
    when the held-out median |C| measured just before it (for the first step, the start
    model's v0, computed here) is at most τ·v0, else persistent_correction; None keeps
    persistent_correction (τ = 10 is reached at once). With persistent_warmup W step k (from
    0) takes at most persistent_correction·(k + 1)/W."""
    cfg = PoseConfig(**{**TINY, "iterations": 6, "persistent_target": target,
                        "persistent_correction": 0.9, "persistent_low": 0.2,
                        "persistent_warmup": warmup})
    data = load_data(cfg)
    torch.manual_seed(3)
    start = PoseNet(hidden=cfg.hidden, image_size=cfg.image_size)
    with torch.no_grad():
        v0 = float(symmetry_residuals(start(data["val_x"][:cfg.heldout])).abs().median())
    history = run_method("hard-persistent", start, data, cfg, split="val")["history"]
    before = [v0] + [h["heldout_violation"] for h in history[:-1]]
    used = [h["correction"] for h in history]
    switched = [0.9] * 6 if target is None else [0.2 if v <= target * v0 else 0.9
                                                  for v in before]
    caps = [0.9 * min(1, (k + 1) / warmup) if warmup else 0.9 for k in range(6)]
    assert used == pytest.approx([min(a, c) for a, c in zip(switched, caps, strict=True)])
    if target == 10.0:
        assert used == [0.2] * 6
    if (target, warmup) == (None, 4):
        assert used == pytest.approx([0.225, 0.45, 0.675, 0.9, 0.9, 0.9])


def _replay(cfg: PoseConfig, data: dict, start: PoseNet, schedule: list[tuple[int, float]],
            base: str = "adam-euclidean", rates: list[float] | None = None) -> dict:
    """The persistent method rebuilt from the generator, the pool and the optimizer directly:
    iteration i of ``schedule`` = (k, α) draws k labelled batches at once, takes the base's
    plain step (Adam's; Eq. 6 without constraint rows) on the first k − 1 and the projected
    step on the pool at correction α on the last, at learning rate ``rates[i]`` (default
    2·10⁻⁴ throughout; not for the Gauss-Newton base). Returns the validation metrics it ends
    at."""
    model = copy.deepcopy(start)
    freeze(model, cfg.persistent_frozen)
    if base == "gn":
        optimizer = HardGaussNewton(model, damping=cfg.gn_damping, rtol=cfg.rtol,
                                    maxit=cfg.persistent_maxit,
                                    correction=cfg.persistent_correction)
    else:
        optimizer = HardAdam(model, lr=2e-4, rtol=cfg.rtol, maxit=cfg.persistent_maxit,
                             bias_correction="adam", metric="euclidean",
                             correction=cfg.persistent_correction)
    generator = torch.Generator().manual_seed(cfg.seed + 1)
    chooser = _chooser("hard-persistent", cfg, generator)
    pool, b = data["pool_x"], cfg.batch_size
    for it, (steps, alpha) in enumerate(schedule):
        batch = torch.randint(len(data["train_x"]), (steps * b,), generator=generator)
        with torch.no_grad():
            idx = chooser.select(lambda i: symmetry_residuals(model(pool[i]), relative=True))
        optimizer.param_groups[0]["correction"] = alpha
        if rates is not None:
            optimizer.param_groups[0]["lr"] = rates[it]
        for k in range(steps):
            part = batch[k * b:(k + 1) * b]
            x, y = data["train_x"][part], data["train_y"][part]
            constraints = None if k < steps - 1 else (
                lambda net, idx=idx: symmetry_residuals(net(pool[idx]), relative=True))
            if base == "gn":  # Eq. 14's mean squared error as ½‖r‖² on the first gn_batch samples
                xg, yg = x[:cfg.gn_batch], y[:cfg.gn_batch]
                optimizer.step(lambda net, xg=xg, yg=yg: (net(xg) - yg).reshape(-1)
                               * (2.0 / yg.numel()) ** 0.5, constraints)
            else:
                optimizer.step(lambda net, x=x, y=y: pose_loss(net(x), y), constraints)
    return evaluate(model, data["val_x"], data["val_y"])


@pytest.mark.parametrize(("base", "steps"), [("adam-euclidean", 1), ("adam-euclidean", 2),
                                             ("adam-euclidean", 3), ("gn", 2)])
def test_the_persistent_data_steps_precede_the_projected_step(base: str, steps: int) -> None:
    """With persistent_data_steps k an iteration of the persistent method draws k labelled
    batches at once, takes its base's plain step (Adam's; Eq. 6 without constraint rows) on
    each of the first k − 1 and the projected step (on the pool, α = persistent_correction) on
    the last: rebuilt by :func:`_replay`, the run ends at the same weights (its validation
    error and violation)."""
    cfg = PoseConfig(**{**TINY, "iterations": 1, "persistent_data_steps": steps,
                        "persistent_base": base, "persistent_anneal": 0})
    data = load_data(cfg)
    torch.manual_seed(5)
    start = PoseNet(hidden=cfg.hidden, image_size=cfg.image_size)
    record = run_method("hard-persistent", start, data, cfg, split="val")
    expected = _replay(cfg, data, start, [(steps, cfg.persistent_correction)], base)
    assert record["mean_joint_error"] == pytest.approx(expected["mean_joint_error"], rel=1e-6)
    assert record["median_violation"] == pytest.approx(expected["median_violation"], rel=1e-6)


def test_the_persistent_final_iterations_take_one_full_correction() -> None:
    """With persistent_final m the persistent method's last m iterations draw one labelled
    batch and take the projected step alone at α = 1 (the earlier ones as before: a plain data
    step, then the projected step at persistent_correction): rebuilt by :func:`_replay`, the
    run ends at the same weights."""
    cfg = PoseConfig(**{**TINY, "iterations": 3, "persistent_final": 2, "persistent_anneal": 0,
                        "persistent_data_steps": 2, "persistent_target": None})
    data = load_data(cfg)
    torch.manual_seed(6)
    start = PoseNet(hidden=cfg.hidden, image_size=cfg.image_size)
    record = run_method("hard-persistent", start, data, cfg, split="val")
    assert [h["correction"] for h in record["history"]] == [cfg.persistent_correction, 1.0, 1.0]
    expected = _replay(cfg, data, start, [(2, cfg.persistent_correction), (1, 1.0), (1, 1.0)])
    assert record["mean_joint_error"] == pytest.approx(expected["mean_joint_error"], rel=1e-6)
    assert record["median_violation"] == pytest.approx(expected["median_violation"], rel=1e-6)


def test_the_persistent_learning_rate_anneals_over_the_last_iterations() -> None:
    """With persistent_anneal A and persistent_anneal_to F the persistent method's learning
    rate stays at its own for the first N − A iterations and falls linearly to F times it at
    the last (hand-computed rates); rebuilt by :func:`_replay` at those rates, the run ends at
    the same weights; the other methods keep their rate."""
    cfg = PoseConfig(**{**TINY, "iterations": 4, "persistent_anneal": 2,
                        "persistent_anneal_to": 0.2, "persistent_data_steps": 2,
                        "persistent_target": None})
    assert [cfg.lr_factor("hard-persistent", i) for i in range(4)] == pytest.approx(
        [1.0, 1.0, 0.6, 0.2])
    assert [cfg.lr_factor("hard-sgd", i) for i in range(4)] == [1.0] * 4
    data = load_data(cfg)
    torch.manual_seed(7)
    start = PoseNet(hidden=cfg.hidden, image_size=cfg.image_size)
    record = run_method("hard-persistent", start, data, cfg, split="val")
    rates = [2e-4, 2e-4, 1.2e-4, 4e-5]
    assert [h["lr"] for h in record["history"]] == pytest.approx(rates)
    expected = _replay(cfg, data, start, [(2, cfg.persistent_correction)] * 4, rates=rates)
    assert record["mean_joint_error"] == pytest.approx(expected["mean_joint_error"], rel=1e-6)
    assert record["median_violation"] == pytest.approx(expected["median_violation"], rel=1e-6)
    constant = _replay(cfg, data, start, [(2, cfg.persistent_correction)] * 4)
    assert record["median_violation"] != pytest.approx(constant["median_violation"], rel=1e-6)
    sgd = run_method("hard-sgd", start, data, cfg, split="val")
    assert [h["lr"] for h in sgd["history"]] == [cfg.lr["hard-sgd"]] * 4


def test_the_default_anneal_covers_at_most_the_run_and_not_gauss_newton() -> None:
    """persistent_anneal None is 10 iterations (the default since stop 36) for the bases with a
    learning rate, all of them in a shorter run, and 0 for the Gauss-Newton base (whose step has
    no rate); 0 keeps the rate constant."""
    assert PoseConfig().anneal_span() == PERSISTENT_ANNEAL == 10
    assert [PoseConfig().lr_factor("hard-persistent", i) for i in (19, 20, 29)] == pytest.approx(
        [1.0, 0.95, 0.5])
    short = PoseConfig(**TINY)  # 3 iterations
    assert short.anneal_span() == 3
    assert [short.lr_factor("hard-persistent", i) for i in range(3)] == pytest.approx(
        [1 - 0.5 / 3, 1 - 1 / 3, 0.5])
    assert PoseConfig(**{**TINY, "persistent_base": "gn"}).anneal_span() == 0
    assert [PoseConfig(**{**TINY, "persistent_anneal": 0}).lr_factor("hard-persistent", i)
            for i in range(3)] == [1.0] * 3


def test_the_persistent_pool_has_its_own_sizes() -> None:
    """hard-persistent's pool holds persistent_budget samples and mines persistent_mined a
    step (128 and 64 by default); projected-targets and the mined methods keep budget and
    mined; None falls back to them."""
    cfg = PoseConfig()
    generator = torch.Generator().manual_seed(0)
    pool = _chooser("hard-persistent", cfg, generator)
    assert (pool.budget, pool.k_new) == (128, 64)
    targets = _chooser("projected-targets", cfg, generator)
    assert (targets.budget, targets.k_new) == (cfg.budget, cfg.mined) == (32, 16)
    assert _chooser("soft-adam", cfg, generator).k == 16
    fallback = PoseConfig(persistent_budget=None, persistent_mined=None)
    assert fallback.pool_sizes("hard-persistent") == (32, 16)


@pytest.mark.parametrize("frozen", [("regressor.5",), ("features", "regressor.1"), ()])
def test_the_persistent_method_leaves_its_frozen_modules_as_they_were(frozen: tuple) -> None:
    """persistent_frozen's modules keep the start model's weights bit for bit through the
    persistent method's steps (data step and correction), every other weight moves; the other
    methods train every weight whatever it says."""
    cfg = PoseConfig(**{**TINY, "iterations": 2, "persistent_frozen": frozen})
    data = load_data(cfg)
    torch.manual_seed(5)
    start = PoseNet(hidden=cfg.hidden, image_size=cfg.image_size)
    for name in ("hard-persistent", "soft-adam"):
        model = copy.deepcopy(start)
        method = _Method(name, model, cfg)
        fine_tune(name, model, method.step, data, cfg, split="val", observe=method.observe)
        before = dict(start.named_parameters())
        for key, p in model.named_parameters():
            kept = name == "hard-persistent" and any(key.startswith(m + ".") for m in frozen)
            assert torch.equal(p, before[key]) == kept, (name, key)


def test_a_projected_targets_step_is_the_damped_least_squares_step_toward_symmetric_poses():
    """The step is ``dw = −(JᵀJ + ηI)⁻¹Jᵀr`` with ``r = (f(xc) − T)/√n``, T the symmetric poses
    near the pooled outputs, written as a dense solve (J by jacrev, NumPy); it moves the pooled
    outputs toward T."""
    cfg = PoseConfig(**{**TINY, "rtol": 1e-13, "target_maxit": 2000, "target_damping": 1e-2})
    data = load_data(cfg)
    torch.manual_seed(2)
    model = PoseNet(hidden=8, image_size=cfg.image_size).double()
    xc = data["pool_x"][:3].double()
    w = {k: v.detach().clone() for k, v in model.named_parameters()}
    with torch.no_grad():
        targets = symmetrize(model(xc))

    def residuals(params: dict) -> torch.Tensor:
        out = torch.func.functional_call(model, params, (xc,))
        return (out - targets).reshape(-1) / targets.numel() ** 0.5

    jac = torch.func.jacrev(residuals)(w)
    J = np.concatenate([jac[k].reshape(len(targets.reshape(-1)), -1).numpy() for k in w], 1)
    r = residuals(w).numpy()
    expected = -np.linalg.solve(J.T @ J + 1e-2 * np.eye(J.shape[1]), J.T @ r)
    _Method("projected-targets", model, cfg).step(data["train_x"][:4].double(),
                                                  data["train_y"][:4].double(), xc,
                                                  torch.arange(3))
    dw = np.concatenate([(v.detach() - w[k]).reshape(-1).numpy()
                         for k, v in model.named_parameters()])
    np.testing.assert_allclose(dw, expected, rtol=1e-6, atol=1e-9 * np.abs(expected).max())
    before = float(np.linalg.norm(r)) * targets.numel() ** 0.5  # ‖f(xc) − T‖ at the start
    with torch.no_grad():
        assert float((model(xc) - targets).norm()) < 0.9 * before


@pytest.mark.parametrize(("changes", "message"), [
    ({"iterations": 0}, "iterations must be a positive integer"),
    ({"mined": 40, "candidates": 16}, "need mined <= candidates <= n_pool"),
    ({"budget": 2}, "budget .* must be at least mined"),
    ({"persistent_budget": 4, "persistent_mined": 6},
     r"persistent_budget \(4\) must be at least persistent_mined \(6\)"),
    ({"persistent_budget": 32, "persistent_mined": 20},
     r"persistent_mined \(20\) cannot exceed candidates \(16\)"),
    ({"persistent_budget": 0}, "persistent_budget must be None or a positive integer"),
    ({"heldout": 99}, "heldout .* cannot exceed n_val"),
    ({"lr": {"hard-foo": 1.0}}, "lr: unknown method 'hard-foo'"),
    ({"lr": {"hard-sgd": -1.0}}, "must be a positive number"),
    ({"methods": ("soft-adam", "nope")}, "unknown method 'nope'"),
    ({"soft_lambda": float("nan")}, "soft_lambda must be a non-negative number"),
    ({"gn_batch": 17}, r"gn_batch \(17\) cannot exceed batch_size \(16\)"),
    ({"persistent_correction": 0.0}, r"persistent_correction must be in \(0, 1\]"),
    ({"persistent_target": 0.0}, "persistent_target must be a positive number"),
    ({"persistent_low": 1.5}, r"persistent_low must be in \(0, 1\]"),
    ({"persistent_base": "gn", "lr": {"hard-persistent": 1e-3}},
     r"lr\['hard-persistent'\] has no effect with persistent_base 'gn'"),
    ({"persistent_warmup": -1}, "persistent_warmup must be a non-negative integer, got -1"),
    ({"persistent_warmup": 2.0}, "persistent_warmup must be a non-negative integer, got 2.0"),
    ({"persistent_final": -1}, "persistent_final must be a non-negative integer, got -1"),
    ({"persistent_final": 4}, r"persistent_final \(4\) cannot exceed iterations \(3\)"),
    ({"persistent_anneal": -1}, "persistent_anneal must be a non-negative integer, got -1"),
    ({"persistent_anneal": 2.0}, "persistent_anneal must be a non-negative integer, got 2.0"),
    ({"persistent_anneal_to": 0.0}, r"persistent_anneal_to must be in \(0, 1\]"),
    ({"persistent_anneal_to": 1.5}, r"persistent_anneal_to must be in \(0, 1\]"),
    ({"persistent_base": "gn", "persistent_anneal": 2},
     "persistent_anneal has no effect with persistent_base 'gn'"),
    ({"persistent_data_steps": 0}, "persistent_data_steps must be a positive integer, got 0"),
    ({"persistent_data_steps": True}, "persistent_data_steps must be a positive integer"),
    ({"persistent_base": "lbfgs"}, "persistent_base must be one of sgd, adam, adam-euclidean, gn"),
    ({"persistent_maxit": 0}, "persistent_maxit must be None or a positive integer"),
    ({"adam_bias_correction": "none"}, "adam_bias_correction must be 'eq12' or 'adam'"),
    ({"persistent_frozen": "regressor.5"}, "persistent_frozen must be a tuple of module names"),
    ({"persistent_frozen": ("regressor.9",)},
     r"persistent_frozen: PoseNet has no submodule 'regressor.9' \(its submodules: features, "),
    ({"persistent_frozen": ("features", "regressor")}, "leaves no parameter to train"),
])
def test_bad_settings_are_refused(changes: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        PoseConfig(**{**TINY, **changes})


def test_h36m_file_is_split_as_the_paper(tmp_path) -> None:
    rng = np.random.default_rng(0)
    n = 60
    path = tmp_path / "h36m.npz"
    np.savez(path, images=rng.integers(0, 255, (n, 32, 32, 3), dtype=np.uint8),
             joints=rng.normal(0, 300, (n, 17, 3)))
    cfg = PoseConfig(**{**TINY, "h36m": str(path), "n_val": 8, "n_pool": 16, "heldout": 4})
    data = load_data(cfg)
    assert (len(data["train_x"]), len(data["val_x"]), len(data["test_x"])) == (40, 8, 12)
    assert torch.equal(data["pool_x"], data["train_x"][:16])
    assert float(data["test_y"].reshape(-1, 17, 3)[:, 0].abs().max()) == 0.0  # root-centred
    too_big = PoseConfig(**{**TINY, "h36m": str(path), "n_val": 8, "n_pool": 45, "heldout": 4,
                            "candidates": 16})
    with pytest.raises(ValueError, match=r"h36m\.npz: 60 samples leave 40 for training"):
        load_data(too_big)


def test_cli_writes_json(tmp_path, capsys: pytest.CaptureFixture) -> None:
    out_json = tmp_path / "pose.json"
    code = main(["pose", "--out", str(tmp_path / "run"), "--json", str(out_json),
                 "--methods", "soft-adam,hard-sgd", "--iterations", "2", "--pretrain-epochs", "1",
                 "--train-size", "128", "--val-size", "64", "--test-size", "8",
                 "--pool-size", "128", "--no-progress"])
    assert code == 0
    result = json.loads(out_json.read_text())
    assert set(result["methods"]) == {"unconstrained", "soft-adam", "hard-sgd"}
    assert len(result["methods"]["hard-sgd"]["median_violation_per_iter"]) == 2
    rows = {line.split()[0]: line.split() for line in capsys.readouterr().out.splitlines()
            if line.split() and line.split()[0] in result["methods"]}
    soft, hard = result["methods"]["soft-adam"], result["methods"]["hard-sgd"]
    # the table's ratios to Soft-Adam (issue 14's targets), against the JSON's own numbers
    assert rows["hard-sgd"][1] == f"{1000 * hard['mean_joint_error']:.1f}"
    assert rows["hard-sgd"][3] == f"{hard['mean_joint_error'] / soft['mean_joint_error']:.3f}"
    assert rows["hard-sgd"][4] == f"{hard['median_violation'] / soft['median_violation']:.3f}"
    assert rows["soft-adam"][3:5] == ["1.000", "1.000"]


def test_cli_passes_the_persistent_settings(tmp_path, caplog: pytest.LogCaptureFixture) -> None:
    """--persistent-base gn, --persistent-maxit, --persistent-target, --persistent-low and the
    pool's sizes reach the run (its recorded config and its
    solves: every one stops at the limit of 2 iterations); the truncated solves are counted in
    one summary line, not warned about step by step."""
    out_json = tmp_path / "pose.json"
    code = main(["pose", "--out", str(tmp_path / "run"), "--json", str(out_json),
                 "--methods", "hard-persistent", "--iterations", "2", "--pretrain-epochs", "1",
                 "--train-size", "128", "--val-size", "64", "--test-size", "8",
                 "--pool-size", "128", "--persistent-base", "gn", "--persistent-maxit", "2",
                 "--persistent-target", "none", "--persistent-low", "0.3",
                 "--persistent-warmup", "3",
                 "--persistent-budget", "24", "--persistent-mined", "12",
                 "--persistent-frozen", "features.0, regressor.5", "--no-progress"])
    assert code == 0
    result = json.loads(out_json.read_text())
    assert result["config"]["persistent_base"] == "gn"
    assert result["config"]["persistent_maxit"] == 2
    assert result["config"]["persistent_target"] is None
    assert result["config"]["persistent_low"] == 0.3
    assert result["config"]["persistent_warmup"] == 3
    assert (result["config"]["persistent_budget"], result["config"]["persistent_mined"]) == (24, 12)
    assert result["config"]["persistent_frozen"] == ["features.0", "regressor.5"]
    history = result["methods"]["hard-persistent"]["history"]
    assert [h["solver_iterations"] for h in history] == [2, 2]
    assert "hard-persistent: 2 of 2 KKT solves stopped at the iteration limit" in caplog.text
    assert "KKT solve did not converge" not in caplog.text
    assert logging.getLogger("ccnn.hard.kkt").level == logging.NOTSET  # restored


def test_a_config_leaves_the_global_random_state_alone() -> None:
    """Checking persistent_frozen's names builds no weights: the global generator is untouched."""
    state = torch.random.get_rng_state()
    PoseConfig(persistent_frozen=("features.0", "regressor.5"))
    assert torch.equal(torch.random.get_rng_state(), state)


def test_cli_sets_the_persistent_learning_rate(tmp_path) -> None:
    """--persistent-lr reaches the run's config (lr['hard-persistent'], which the optimizer
    takes: test_the_persistent_learning_rate_follows_its_base); without it none is set and the
    base's default stands. --persistent-data-steps reaches it too."""
    args = ["pose", "--methods", "hard-persistent", "--iterations", "1", "--pretrain-epochs",
            "1", "--train-size", "128", "--val-size", "64", "--test-size", "8", "--pool-size",
            "128", "--persistent-maxit", "2", "--no-progress"]
    for extra, expected in (([], None), (["--persistent-lr", "3e-4"], 3e-4)):
        out_json = tmp_path / f"pose{len(extra)}.json"
        code = main([*args, "--out", str(tmp_path / "run"), "--json", str(out_json), *extra])
        assert code == 0
        assert json.loads(out_json.read_text())["config"]["lr"].get("hard-persistent") == expected
    assert build_parser().parse_args(["pose"]).persistent_lr is None
    out_json = tmp_path / "steps.json"
    assert main([*args, "--out", str(tmp_path / "run"), "--json", str(out_json),
                 "--persistent-data-steps", "3"]) == 0  # not the default (2)
    assert json.loads(out_json.read_text())["config"]["persistent_data_steps"] == 3
    assert main([*args, "--out", str(tmp_path / "run"), "--json", str(out_json),
                 "--persistent-final", "1"]) == 0  # not the default
    assert json.loads(out_json.read_text())["config"]["persistent_final"] == 1
    assert main([*args, "--out", str(tmp_path / "run"), "--json", str(out_json),
                 "--persistent-anneal", "1", "--persistent-anneal-to", "0.3"]) == 0
    config = json.loads(out_json.read_text())["config"]  # neither is the default (None, 0.5)
    assert (config["persistent_anneal"], config["persistent_anneal_to"]) == (1, 0.3)
    config = json.loads((tmp_path / "pose0.json").read_text())["config"]  # the default run's
    assert config["persistent_anneal"] == 1  # resolved: 10 iterations, at most the run's one


def test_cli_reads_the_frozen_modules() -> None:
    parse = build_parser().parse_args
    assert parse(["pose"]).persistent_frozen == PoseConfig().persistent_frozen == ("regressor.5",)
    assert parse(["pose", "--persistent-frozen", "none"]).persistent_frozen == ()
    assert parse(["pose", "--persistent-frozen", "features,regressor.1,"]).persistent_frozen == (
        "features", "regressor.1")


def test_cli_refuses_bad_options(tmp_path, capsys: pytest.CaptureFixture) -> None:
    code = main(["pose", "--iterations", "0", "--out", str(tmp_path)])
    assert code == 2
    assert "iterations must be a positive integer" in capsys.readouterr().err
    code = main(["pose", "--persistent-frozen", "regressor.7", "--out", str(tmp_path)])
    assert code == 2
    assert "PoseNet has no submodule 'regressor.7'" in capsys.readouterr().err
