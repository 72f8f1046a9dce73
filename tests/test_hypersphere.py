"""The hypersphere experiment (Márquez-Neila, Salzmann and Fua 2017, §6.2) at small sizes."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from ccnn.hypersphere import (
    HypersphereConfig,
    Hyperspheres,
    hard_step,
    make_problem,
    run_hypersphere,
    run_method,
)


def _total_variation(curve: list[float], skip: int = 10) -> float:
    return float(np.abs(np.diff(np.asarray(curve[skip:]))).sum())


def test_residuals_match_direct_distances() -> None:
    cfg = HypersphereConfig(dim=7, spheres=5, active=2, budget=2, dtype="float64")
    problem, x0 = make_problem(cfg, torch.Generator().manual_seed(3))
    centers = problem.centers.numpy()
    w = x0.numpy() + 0.3
    expected = np.linalg.norm(w[None, :] - centers, axis=1) - cfg.radius
    np.testing.assert_allclose(problem.residuals(torch.from_numpy(w)).numpy(), expected,
                               rtol=1e-12, atol=1e-12)
    index = torch.tensor([4, 1])
    np.testing.assert_allclose(problem.subset(index).residuals(torch.from_numpy(w)).numpy(),
                               expected[[4, 1]], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("per_coordinate", [True, False])
def test_centres_have_the_configured_spread(per_coordinate: bool) -> None:
    cfg = HypersphereConfig(dim=400, spheres=300, center_std=0.1, per_coordinate=per_coordinate,
                            start_distance=12.0, dtype="float64")
    problem, x0 = make_problem(cfg, torch.Generator().manual_seed(0))
    mean_sq_norm = float(problem.centers.square().sum(1).mean())
    expected = 0.01 * cfg.dim if per_coordinate else 0.01
    assert mean_sq_norm == pytest.approx(expected, rel=0.05)
    assert float(x0.norm()) == pytest.approx(12.0, rel=1e-12)


def test_hard_step_lands_on_the_linearized_constraints() -> None:
    cfg = HypersphereConfig(dim=30, spheres=6, active=3, budget=3, dtype="float64", rtol=1e-12)
    problem, x0 = make_problem(cfg, torch.Generator().manual_seed(1))
    active = problem.subset(torch.tensor([0, 2, 5]))
    w = x0 + 0.5
    w_new, _ = hard_step(active, w, x0, cfg)
    # first-order prediction: C(w) + J·dw = 0 with J rows (w − c_i)/‖w − c_i‖
    diff = w[None, :] - active.centers
    J = diff / diff.norm(dim=1, keepdim=True)
    linear = active.residuals(w) + J @ (w_new - w)
    assert float(linear.abs().max()) < 1e-9
    # and the step is the minimum-norm one of Eq. 5 with η = 1 (dense solve)
    g = (w - x0).numpy()
    Jn = J.numpy()
    K = np.block([[np.eye(cfg.dim), Jn.T], [Jn, np.zeros((3, 3))]])
    rhs = np.concatenate([-g, -active.residuals(w).numpy()])
    expected = np.linalg.pinv(K) @ rhs
    np.testing.assert_allclose((w_new - w).numpy(), expected[: cfg.dim], rtol=1e-7, atol=1e-10)


@pytest.mark.parametrize(("per_coordinate", "seed"), [(True, 0), (False, 1)])
def test_soft_is_smoother_and_better_than_hard_on_changing_subsets(per_coordinate: bool,
                                                                     seed: int) -> None:
    """The paper's qualitative result (Fig. 4a): with a new random subset of constraints every
    iteration, the hard step jumps around while the soft step settles."""
    cfg = HypersphereConfig(dim=300, iterations=80, per_coordinate=per_coordinate, seed=seed,
                            dtype="float64")
    result = run_hypersphere(cfg, methods=("soft-sgd", "hard-sgd"))
    soft, hard = result["methods"]["soft-sgd"], result["methods"]["hard-sgd"]
    assert soft["median_violation"] < 0.5 * hard["median_violation"]
    assert (_total_variation(soft["median_violation_per_iter"])
            < 0.2 * _total_variation(hard["median_violation_per_iter"]))


def test_persistent_pool_holding_every_constraint_converges() -> None:
    """With a budget of all spheres the persistent pool stops forgetting: the hard step then
    meets all of them (feasible: 40 spheres with nearly equal centres in 200 dimensions),
    while plain Hard-SGD on changing subsets does not."""
    cfg = HypersphereConfig(dim=200, spheres=40, active=10, budget=40, iterations=60,
                            per_coordinate=False, tol=1e-6, rtol=1e-12, dtype="float64")
    problem, x0 = make_problem(cfg, torch.Generator().manual_seed(cfg.seed))
    persistent = run_method("hard-persistent", problem, x0, cfg,
                            torch.Generator().manual_seed(5))
    plain = run_method("hard-sgd", problem, x0, cfg, torch.Generator().manual_seed(5))
    assert persistent["median_violation"] < 1e-6
    assert plain["median_violation"] > 100 * persistent["median_violation"]


def test_json_shape_and_figures(tmp_path) -> None:
    cfg = HypersphereConfig(dim=20, spheres=12, active=3, budget=6, iterations=7,
                            dtype="float64")
    result = run_hypersphere(cfg, out=tmp_path)
    assert set(result["methods"]) == {"soft-sgd", "hard-sgd", "hard-persistent"}
    for record in result["methods"].values():
        assert len(record["median_violation_per_iter"]) == 7
        assert len(record["active_change_per_iter"]) == 7
        assert record["median_violation"] == record["median_violation_per_iter"][-1]
        assert record["seconds_per_iter"] > 0
        assert all(math.isfinite(v) for v in record["median_violation_per_iter"])
    assert result["config"]["dim"] == 20
    for name in ("fig3_two_constraints.png", "fig4_hypersphere.png"):
        with (tmp_path / name).open("rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_same_seed_same_numbers() -> None:
    cfg = HypersphereConfig(dim=50, spheres=20, active=4, budget=8, iterations=10,
                            dtype="float64")
    a = run_hypersphere(cfg)["methods"]
    b = run_hypersphere(cfg)["methods"]
    for name in a:
        assert a[name]["median_violation_per_iter"] == b[name]["median_violation_per_iter"]


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"dim": 0}, "dim must be at least 1"),
    ({"active": 300}, "active .* cannot exceed spheres"),
    ({"budget": 5}, "budget .* must be at least active"),
    ({"soft_lr": -1.0}, "soft_lr must be a positive number"),
    ({"lam": float("nan")}, "lam must be a non-negative number"),
    ({"dtype": "float16"}, "dtype must be"),
])
def test_bad_settings_are_refused(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        HypersphereConfig(**kwargs)


def test_unknown_method_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown method 'hard-foo'"):
        run_hypersphere(HypersphereConfig(dim=5, spheres=3, active=2, budget=2, iterations=1),
                        methods=("hard-foo",))


def test_hyperspheres_rejects_a_vector_of_centres() -> None:
    with pytest.raises(ValueError, match="centers must be"):
        Hyperspheres(torch.zeros(5), 1.0)


def test_cli_writes_json_and_figures(tmp_path, capsys: pytest.CaptureFixture) -> None:
    import json

    from ccnn.cli import main

    out_json = tmp_path / "hs.json"
    code = main(["hypersphere", "--dim", "30", "--spheres", "10", "--active", "3", "--budget",
                 "6", "--iterations", "5", "--out", str(tmp_path / "figs"), "--json",
                 str(out_json), "--no-progress"])
    assert code == 0
    result = json.loads(out_json.read_text())
    assert len(result["methods"]["hard-persistent"]["median_violation_per_iter"]) == 5
    assert (tmp_path / "figs" / "fig4_hypersphere.png").is_file()
    assert "hard-sgd" in capsys.readouterr().out
    assert main(["hypersphere", "--iterations", "0", "--out", str(tmp_path)]) == 2
    assert "iterations must be at least 1" in capsys.readouterr().err
