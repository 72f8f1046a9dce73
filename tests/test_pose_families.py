"""Tanabe's constrained backpropagation and the nonlinear projection on the pose problem, at toy
sizes: the records have ``run_method``'s shape, the start is never modified, the Tanabe steps
match multipliers solved independently from explicit gradients, the projection meets its
threshold, and bad settings are refused."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from ccnn.hard.tanabe import Tanabe
from ccnn.pose.experiment import THRESHOLDS, PoseConfig, evaluate, load_data
from ccnn.pose.families import (
    FAMILY_METHODS,
    FamilySettings,
    _tanabe_batch,
    _tanabe_fn,
    full_jacobian_bytes,
    run_family,
)
from ccnn.pose.model import PoseNet, pose_loss
from ccnn.pose.skeleton import symmetry_residuals

TINY = {"n_train": 32, "n_val": 12, "n_test": 12, "n_pool": 24, "heldout": 8, "batch_size": 8,
        "mined": 3, "candidates": 12, "iterations": 3, "eval_every": 2, "image_size": 32,
        "hidden": 16, "gn_batch": 4, "persistent_budget": None, "persistent_mined": None}
FAST = FamilySettings(projection_steps=4, projection_check_every=2, projection_batch=6,
                      data_batch=8, projection_threshold=0.0)


@pytest.fixture(scope="module")
def tiny() -> tuple[PoseConfig, dict, PoseNet]:
    cfg = PoseConfig(**TINY)
    data = {k: v.double() for k, v in load_data(cfg).items()}
    torch.manual_seed(0)
    start = PoseNet(hidden=cfg.hidden, image_size=cfg.image_size).double()
    return cfg, data, start


@pytest.mark.parametrize("name", FAMILY_METHODS)
def test_each_family_returns_the_record_shape_and_leaves_start(
        tiny: tuple[PoseConfig, dict, PoseNet], name: str) -> None:
    cfg, data, start = tiny
    before = copy.deepcopy(start.state_dict())
    record = run_family(name, start, data, cfg, split="val", settings=FAST)
    for k, v in start.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert {"mean_joint_error", "median_violation", "constraints_met", "seconds_per_iter",
            "median_violation_per_iter", "curve", "history"} <= set(record)
    assert len(record["constraints_met"]) == len(THRESHOLDS)
    assert record["seconds_per_iter"] > 0
    if name.startswith("tanabe"):
        assert len(record["median_violation_per_iter"]) == cfg.iterations
        assert [p["iteration"] for p in record["curve"]] == [2, 3]
        assert {"loss", "active_violation", "multiplier_norm", "heldout_violation"} <= set(
            record["history"][0])
    else:
        assert [p["iteration"] for p in record["curve"]] == [2, 4]
        assert record["projection_steps"] == 4
        assert len(record["median_violation_per_iter"]) == 2
    assert record["curve"][-1]["mean_joint_error"] == record["mean_joint_error"]


def _explicit_gradients(model: PoseNet, scalars: list[torch.Tensor]) -> np.ndarray:
    """Rows ``∇s`` of each scalar by ``torch.autograd.grad``, as a NumPy array."""
    params = list(model.parameters())
    rows = []
    for s in scalars:
        grads = torch.autograd.grad(s, params, retain_graph=True, allow_unused=True)
        rows.append(torch.cat([(torch.zeros_like(p) if d is None else d).reshape(-1)
                               for d, p in zip(grads, params, strict=True)]).numpy())
    return np.stack(rows)


def test_tanabe_reduction_multipliers_match_the_closed_form(
        tiny: tuple[PoseConfig, dict, PoseNet]) -> None:
    """Eq. 6 of Jergensen 2019: ``λ = (JJᵀ)⁻¹(−J∇f̄ + g̃)`` with ``J`` the rows ``∇g̃_j``; for
    one reduced constraint ``(−∇g̃·∇f̄ + g̃)/‖∇g̃‖²``. Both from explicit gradients."""
    cfg, data, start = tiny
    model = copy.deepcopy(start)
    x, y, xc = data["train_x"][:8], data["train_y"][:8], data["pool_x"][:3]
    step = Tanabe(model, version="reduction")(_tanabe_fn("tanabe-reduction", cfg, xc),
                                              *_tanabe_batch("tanabe-reduction", x, y, xc))
    fbar = pose_loss(model(x), y)
    gt = symmetry_residuals(model(xc), relative=cfg.relative).square().mean(0)
    G = _explicit_gradients(model, [fbar, *gt])
    grad_f, J = G[0], G[1:]
    lam = np.linalg.solve(J @ J.T, -J @ grad_f + gt.detach().numpy())
    np.testing.assert_allclose(step.lam.numpy(), lam, rtol=1e-6)
    np.testing.assert_allclose(step.grad.numpy(), grad_f + J.T @ lam, rtol=1e-6, atol=1e-12)
    assert float(step.f) == pytest.approx(float(fbar.detach()), rel=1e-12)
    # one reduced constraint (the mean over all six): the scalar closed form
    scalar = Tanabe(model, version="reduction", reduction=lambda g: g.square().mean().reshape(1))
    one = scalar(_tanabe_fn("tanabe-reduction", cfg, xc),
                 *_tanabe_batch("tanabe-reduction", x, y, xc))
    g1 = symmetry_residuals(model(xc), relative=cfg.relative).square().mean()
    grad_g = _explicit_gradients(model, [g1])[0]
    closed = (-grad_g @ grad_f + float(g1.detach())) / (grad_g @ grad_g)
    assert float(one.lam[0]) == pytest.approx(closed, rel=1e-8)


def test_tanabe_full_puts_zero_multipliers_on_labelled_rows(
        tiny: tuple[PoseConfig, dict, PoseNet]) -> None:
    """The full version's mixed batch: ``f̄`` is Eq. 14 on the labelled rows, their
    multipliers vanish, and the step meets Tanabe's ``J_c ∇L = g_c`` on the mined rows
    (``ġ = −g``), ``J_c`` by ``torch.func.jacrev``."""
    cfg, data, start = tiny
    model = copy.deepcopy(start)
    x, y, xc = data["train_x"][:8], data["train_y"][:8], data["pool_x"][:3]
    step = Tanabe(model, version="full", solver="dense", dense_max=10_000)(
        _tanabe_fn("tanabe-full", cfg, xc), *_tanabe_batch("tanabe-full", x, y, xc))
    assert float(step.f) == pytest.approx(float(pose_loss(model(x), y).detach()), rel=1e-12)
    assert float(step.lam[:8].abs().max()) == 0.0
    params = {k: v.detach() for k, v in model.named_parameters()}

    def residuals(p: dict) -> torch.Tensor:
        out = torch.func.functional_call(model, p, (xc,))
        return symmetry_residuals(out, relative=cfg.relative).reshape(-1)

    jac = torch.func.jacrev(residuals)(params)
    J = torch.cat([jac[k].reshape(18, -1) for k in params], dim=1)
    g = residuals(params)
    torch.testing.assert_close(J @ step.grad, g, rtol=1e-6, atol=1e-9)


def test_projection_meets_its_threshold(tiny: tuple[PoseConfig, dict, PoseNet]) -> None:
    """Enough Adam steps on Eq. 12 bring the pool's mean squared residual under the threshold
    (starting from the value computed here independently) and lower the median |C|."""
    cfg, data, start = tiny
    with torch.no_grad():
        C = symmetry_residuals(start(data["pool_x"]), relative=cfg.relative).numpy()
    before = float((C ** 2).mean())
    threshold = 0.05 * before
    settings = FamilySettings(projection_lr=1e-2, projection_batch=8, projection_steps=400,
                              projection_check_every=10, projection_threshold=threshold)
    record = run_family("projection", start, data, cfg, split="test", settings=settings)
    assert record["constraint_before"] == pytest.approx(before, rel=1e-10)
    assert record["converged"]
    assert record["constraint_after"] <= threshold
    assert record["projection_steps"] < 400
    assert record["median_violation"] < evaluate(start, data["test_x"],
                                                 data["test_y"])["median_violation"]


def test_full_jacobian_estimate_and_refusal(tiny: tuple[PoseConfig, dict, PoseNet]) -> None:
    cfg, data, start = tiny
    n = sum(p.numel() for p in start.parameters())
    assert full_jacobian_bytes(start, 10) == 10 * n * (2 * 8 * 7 + 8 * 6)
    with pytest.raises(MemoryError, match="full_max_gib"):
        run_family("tanabe-full", start, data, cfg, settings=FamilySettings(full_max_gib=1e-9))


@pytest.mark.parametrize(("changes", "field"), [
    ({"tanabe_lr": 0.0}, "tanabe_lr"), ({"projection_lr": float("nan")}, "projection_lr"),
    ({"projection_threshold": -1.0}, "projection_threshold"),
    ({"projection_steps": 0}, "projection_steps"), ({"data_batch": 2.5}, "data_batch"),
    ({"tanabe_reduction": "l1"}, "tanabe_reduction"), ({"data_slack": -0.1}, "data_slack")])
def test_bad_settings_raise(changes: dict, field: str) -> None:
    with pytest.raises(ValueError, match=field):
        FamilySettings(**changes)


def test_bad_arguments_raise(tiny: tuple[PoseConfig, dict, PoseNet]) -> None:
    cfg, data, start = tiny
    with pytest.raises(ValueError, match="name"):
        run_family("tanabe", start, data, cfg)
    with pytest.raises(ValueError, match="split"):
        run_family("projection", start, data, cfg, split="train")
