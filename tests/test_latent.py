"""The P-step solver against CVXPY, and its behaviour at the edges."""

import math

import numpy as np
import pytest
import torch

from ccnn.constraints import Bounds, RegionConstraints, box_weights, tag_bounds
from ccnn.latent import METHODS, latent_objective, solve_latent
from ccnn.reference import random_problem, regions_of, solve_latent_cvxpy

BATCHES, PER_BATCH = 3, 8  # 24 random images, each batch with its own mix of tag sets
OBJECTIVE_FLOOR = 1e-3


def relative(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), OBJECTIVE_FLOOR)


def oracle(logits, bounds, b, solver, regions=()):
    return solve_latent_cvxpy(logits[b].numpy(), bounds.lower[b].numpy(), bounds.upper[b].numpy(),
                              bounds.slack[b].numpy(), regions=regions, solver=solver)


@pytest.fixture(scope="module")
def problems():
    """Random batches with CVXPY's answers: SCS (the default oracle) and Clarabel."""
    out = []
    for k in range(BATCHES):
        logits, tags, bounds = random_problem(PER_BATCH, 5, 6, 6, present=(0, 3),
                                              scale=(1.0, 8.0), varied=True, seed=100 + k,
                                              dtype=torch.float64)
        refs = [{s: oracle(logits, bounds, b, s) for s in ("SCS", "CLARABEL")}
                for b in range(PER_BATCH)]
        out.append((logits, tags, bounds, refs))
    return out


def test_problems_mix_tag_sets_and_infeasible_bounds(problems):
    tag_sets = {tuple(t.tolist()) for _, tags, _, _ in problems for t in tags}
    assert len(tag_sets) >= 10
    violated = 0
    for logits, _, bounds, _ in problems:
        r = solve_latent(logits, *bounds)
        violated += int((r.violation > 1e-3).any(1).sum())
    assert violated >= 3, "some instances must need their slack"


@pytest.mark.parametrize("method", METHODS)
def test_matches_cvxpy_scs(problems, method):
    for logits, _, bounds, refs in problems:
        r = solve_latent(logits, *bounds, method=method)
        assert r.converged.all()
        objective = latent_objective(logits, r.P, *bounds)
        for b, ref in enumerate(refs):
            scs = ref["SCS"]
            assert scs.status == "optimal"
            fractions = r.P[b].flatten(1).mean(1).numpy()
            assert np.abs(fractions - scs.fractions).max() <= 1e-4
            assert relative(float(objective[b]), scs.objective) <= 1e-5


def test_newton_matches_clarabel_tightly_and_certifies_by_duality_gap(problems):
    compared = 0
    for logits, _, bounds, refs in problems:
        r = solve_latent(logits, *bounds, tol=1e-11)
        assert r.converged.all()
        assert r.duality_gap.abs().max() <= 1e-9
        objective = latent_objective(logits, r.P, *bounds)
        for b, ref in enumerate(refs):
            clarabel = ref["CLARABEL"]
            if clarabel.status != "optimal":  # Clarabel did not certify this one
                continue
            compared += 1
            assert np.abs(r.P[b].numpy() - clarabel.P).max() <= 1e-4
            assert np.abs(r.P[b].flatten(1).mean(1).numpy() - clarabel.fractions).max() <= 1e-6
            assert relative(float(objective[b]), clarabel.objective) <= 1e-8
    assert compared >= 20


def test_batched_solve_equals_image_by_image(problems):
    logits, _, bounds, _ = problems[0]
    batched = solve_latent(logits, *bounds, tol=1e-10)
    for b in range(PER_BATCH):
        alone = solve_latent(logits[b:b + 1], *(t[b:b + 1] for t in bounds), tol=1e-10)
        torch.testing.assert_close(alone.P[0], batched.P[b], atol=1e-8, rtol=0)


def test_methods_agree(problems):
    logits, _, bounds, _ = problems[1]
    newton = solve_latent(logits, *bounds, tol=1e-8)
    pgd = solve_latent(logits, *bounds, method="pgd", tol=1e-7)
    torch.testing.assert_close(newton.P, pgd.P, atol=1e-4, rtol=0)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("evaluation", ["factored", "direct"])
def test_both_evaluations_of_the_dual_agree(problems, method, evaluation):
    logits, _, bounds, _ = problems[2]
    reference = solve_latent(logits, *bounds, tol=1e-10)
    r = solve_latent(logits, *bounds, method=method, evaluation=evaluation,
                     tol=1e-10 if method == "newton" else 1e-7)
    assert r.converged.all()
    torch.testing.assert_close(r.P, reference.P, atol=1e-5 if method == "pgd" else 1e-9, rtol=0)


def region_problem():
    logits, tags, bounds = random_problem(4, 4, 6, 6, present=(2, 3), scale=(1.0, 5.0),
                                          seed=7, dtype=torch.float64)
    boxes = torch.tensor([[[0, 0, 3, 3], [2, 2, 6, 6]], [[1, 0, 4, 6], [0, 3, 6, 6]],
                          [[0, 0, 6, 2], [3, 3, 5, 5]], [[2, 1, 5, 4], [0, 0, 2, 2]]])
    # In each image: "at least 60% of box 0 is its first foreground class" (soft or hard) and
    # "at most 10% of box 1 is background".
    first_fg = torch.stack([t[1:].nonzero()[0, 0] + 1 for t in tags])
    classes = torch.stack([first_fg, torch.zeros_like(first_fg)], 1)
    regions = RegionConstraints(box_weights(boxes, 6, 6), classes,
                                lower=torch.tensor([[0.6, 0.0]] * 4),
                                upper=torch.tensor([[1.0, 0.1]] * 4),
                                slack=torch.tensor([[math.inf, 1.0], [3.0, math.inf],
                                                    [0.2, 0.2], [math.inf, math.inf]]))
    return logits, bounds, regions


@pytest.mark.parametrize("method", METHODS)
def test_region_constraints_match_cvxpy(method):
    logits, bounds, regions = region_problem()
    r = solve_latent(logits, *bounds, regions=regions, method=method,
                     tol=1e-10 if method == "newton" else 1e-7)
    assert r.converged.all()
    objective = latent_objective(logits, r.P, *bounds, regions=regions)
    for b in range(logits.shape[0]):
        ref = oracle(logits, bounds, b, "CLARABEL", regions=regions_of(regions, b))
        assert ref.status == "optimal"
        assert np.abs(r.P[b].flatten(1).mean(1).numpy() - ref.fractions).max() <= 1e-5
        assert relative(float(objective[b]), ref.objective) <= 1e-6
        w = regions.weights[b].flatten(1).double()
        mass = [float((w[k] * torch.from_numpy(ref.P[int(regions.classes[b, k])]).flatten()).sum()
                      / w[k].sum()) for k in range(2)]
        got = [float((w[k] * r.P[b, int(regions.classes[b, k])].flatten()).sum() / w[k].sum())
               for k in range(2)]
        assert np.allclose(got, mass, atol=1e-5)
    # Hard region bounds hold; the region results have one entry per region.
    hard = torch.isinf(regions.slack)
    assert (r.region_violation[hard] <= 1e-6).all()
    assert r.region_multipliers.shape == (4, 2)


def test_suppression_is_exact():
    logits = torch.randn(3, 6, 5, 5) * 4
    logits[:, 4] += 30.0  # the network is sure of a class that the tags rule out
    bounds = tag_bounds([[0, 1], [0, 2, 3], [0, 5]], num_classes=6)
    r = solve_latent(logits, *bounds)
    suppressed = bounds.upper == 0
    assert (r.P.permute(0, 2, 3, 1)[suppressed[:, None, None, :].expand(-1, 5, 5, -1)] == 0).all()
    assert torch.isinf(r.multipliers[suppressed]).all()
    torch.testing.assert_close(r.P.sum(1), torch.ones(3, 5, 5))


def test_one_class_left_gives_one_hot():
    logits = torch.randn(2, 4, 3, 3)
    r = solve_latent(logits, *tag_bounds([[0], [2]], num_classes=4, background=None))
    assert (r.P[0, 0] == 1).all() and (r.P[1, 2] == 1).all()
    assert r.converged.all() and (r.iterations == 0).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_extreme_logits_give_no_nan(dtype):
    g = torch.Generator().manual_seed(0)
    logits = (torch.randint(0, 2, (4, 5, 7, 7), generator=g) * 100.0 - 50.0).to(dtype)
    logits[:, 0] = 50.0
    logits[:, 2] = -50.0  # a tagged class that the network rules out everywhere
    bounds = tag_bounds([[0, 2], [0, 1, 2], [0, 2, 4], [0, 3]], num_classes=5, fg_slack=math.inf)
    r = solve_latent(logits, *bounds)
    assert torch.isfinite(r.P).all() and torch.isfinite(r.multipliers[bounds.upper > 0]).all()
    assert r.converged.all()
    assert r.violation.max() <= 1e-5
    # Image 0 keeps background and class 2, which the network gives exp(-100) of the mass: the
    # background's upper bound (0.7) moves 30% of the image to class 2, with a multiplier of
    # about -100 nats, and class 2's own bound is then slack.
    assert r.multipliers[0, 0] < -90 and r.multipliers[0, 2] == 0
    assert r.P[0, 2].mean().item() == pytest.approx(0.3, abs=1e-5)


def test_float32_and_float64_agree():
    logits, _, bounds = random_problem(6, 8, 9, 9, varied=True, seed=3, dtype=torch.float64)
    r64 = solve_latent(logits, *bounds)
    r32 = solve_latent(logits.float(), *bounds)
    assert r32.P.dtype == torch.float32 and r32.converged.all()
    torch.testing.assert_close(r32.P.double(), r64.P, atol=1e-5, rtol=0)


def test_solution_satisfies_the_kkt_conditions():
    """Complementarity read off the result: active bounds are met, inactive ones hold."""
    logits, _, bounds = random_problem(8, 6, 8, 8, varied=True, seed=5, dtype=torch.float64)
    r = solve_latent(logits, *bounds, tol=1e-10)
    m = r.P.flatten(2).mean(-1)
    lam, lo, hi, beta = r.multipliers, bounds.lower, bounds.upper, bounds.slack
    live = hi > 0
    pos = live & (lam > 1e-8) & (lam < beta - 1e-8)
    neg = live & (lam < -1e-8) & (lam > -beta + 1e-8)
    zero = live & (lam.abs() <= 1e-8)
    assert pos.any() and neg.any() and zero.any()
    assert (m[pos] - lo[pos]).abs().max() <= 1e-8
    assert (m[neg] - hi[neg]).abs().max() <= 1e-8
    assert ((lo[zero] - m[zero]) <= 1e-8).all() and ((m[zero] - hi[zero]) <= 1e-8).all()
    capped = live & ((lam - beta).abs() <= 1e-12)
    assert (m[capped] <= lo[capped] + 1e-8).all()


def test_iteration_limit_is_reported():
    logits, _, bounds = random_problem(4, 5, 8, 8, seed=9, dtype=torch.float64)
    r = solve_latent(logits, *bounds, method="pgd", max_iter=1)
    assert (r.iterations <= 1).all()
    assert not r.converged.all()
    assert (r.residual[~r.converged] > 1e-6).all()


def test_latent_objective_by_hand():
    logits = torch.tensor([[[[0.0]], [[math.log(3.0)]]]], dtype=torch.float64)  # Q = (1/4, 3/4)
    P = torch.tensor([[[[0.5]], [[0.5]]]], dtype=torch.float64)
    kl = 0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75)
    # Class 0 is bounded below by 0.7 with price 2: 0.2 of it is missing.
    value = latent_objective(logits, P, lower=torch.tensor([[0.7, 0.0]], dtype=torch.float64),
                             upper=1.0, slack=2.0)
    assert value.item() == pytest.approx(kl + 2.0 * 0.2, abs=1e-12)


def test_cpu_runs_are_deterministic():
    logits, _, bounds = random_problem(5, 6, 7, 7, varied=True, seed=2)
    a = solve_latent(logits, *bounds)
    b = solve_latent(logits, *bounds)
    assert torch.equal(a.P, b.P)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("method", METHODS)
def test_cuda_matches_cpu(method):
    logits, _, bounds = random_problem(16, 21, 17, 17, varied=True, seed=4)
    cpu = solve_latent(logits, *bounds, method=method)
    gpu = solve_latent(logits.cuda(), *(t.cuda() for t in bounds), method=method)
    assert gpu.P.is_cuda and gpu.converged.all()
    torch.testing.assert_close(gpu.P.cpu(), cpu.P, atol=1e-5, rtol=0)


GOOD = torch.zeros(2, 3, 4, 4)
LOW = torch.tensor([[0.3, 0.05, 0.0], [0.3, 0.0, 0.0]])
UP = torch.tensor([[0.7, 1.0, 0.0], [1.0, 0.0, 0.0]])


def with_value(index, value):
    out = GOOD.clone()
    out[index] = value
    return out


@pytest.mark.parametrize(
    ("args", "kwargs", "match"),
    [
        ((with_value((1, 0, 2, 2), math.nan), LOW, UP), {}, r"NaN or inf \(images \[1\]\)"),
        ((with_value((0, 1, 0, 0), math.inf), LOW, UP), {}, r"NaN or inf \(images \[0\]\)"),
        ((GOOD, UP, LOW), {}, "lower > upper"),
        ((GOOD, LOW - 0.5, UP), {}, r"lower must lie in \[0.0, 1.0\]"),
        ((GOOD, LOW, UP + 0.5), {}, r"upper must lie in \[0.0, 1.0\]"),
        ((GOOD, LOW, UP, -1.0), {}, "slack must lie"),
        ((GOOD, LOW[:, :2], UP), {}, "lower has shape"),
        ((GOOD[0], LOW, UP), {}, r"\(B, L, H, W\)"),
        ((GOOD.long(), LOW, UP), {}, "floating point"),
        ((GOOD, 0.0, torch.zeros(2, 3)), {}, r"every class is suppressed .* images \[0, 1\]"),
        ((GOOD, torch.tensor([[0.6, 0.6, 0.0]] * 2), UP.clamp(min=0.6)), {}, "infeasible"),
        ((GOOD, LOW, UP), {"method": "cg"}, "method must be one of"),
        ((GOOD, LOW, UP), {"tol": -1.0}, "tol must be"),
        ((GOOD, LOW, UP), {"evaluation": "fast"}, "evaluation must be one of"),
        ((GOOD, LOW, UP), {"evaluation": "factored",
                           "regions": RegionConstraints(torch.ones(2, 1, 4, 4), [0])},
         "needs whole-image bounds"),
        ((GOOD, LOW, UP), {"regions": RegionConstraints(torch.ones(2, 1, 3, 3), [0])},
         "region weights have shape"),
        ((GOOD, LOW, UP), {"regions": RegionConstraints(torch.ones(2, 1, 4, 4), [7])},
         r"region classes must lie in \[0, 3\)"),
        ((GOOD, LOW, UP), {"regions": RegionConstraints(torch.ones(2, 1, 4, 4), [2], lower=0.2)},
         "hard region constraint asks for mass on a suppressed class"),
    ],
)
def test_bad_input_raises(args, kwargs, match):
    with pytest.raises(ValueError, match=match):
        solve_latent(*args, **kwargs)


def test_bounds_broadcast_from_one_row():
    r = solve_latent(GOOD, lower=torch.tensor([0.5, 0.0, 0.0]), upper=1.0)
    torch.testing.assert_close(r.P.flatten(2).mean(-1)[:, 0], torch.full((2,), 0.5))
    assert isinstance(tag_bounds([[0]], num_classes=2), Bounds)


@pytest.mark.parametrize("with_regions", [False, True])
def test_dual_gradient_and_hessian_match_autograd(with_regions):
    """The evaluators' m and H against autograd's derivatives of their own dual value."""
    from ccnn import latent

    logits, bounds, regions = region_problem()
    regions = regions if with_regions else None
    lower, upper, slack = latent._check_bounds(logits, *bounds, regions)
    prob = latent._compact(logits, lower, upper, slack, regions)
    evaluators = [latent._Weighted(prob.f, prob.region_class, prob.region_weights)]
    if not with_regions:
        evaluators.append(latent._ClassSums(prob.f))
    g = torch.Generator().manual_seed(0)
    lam = torch.randn(prob.box.lo.shape, generator=g, dtype=torch.float64) * 2
    lam = torch.where(prob.box.active, lam, 0.0)
    for ev in evaluators:
        _, m, H = ev.value_grad(lam, hessian=True)
        for b in range(lam.shape[0]):
            one = ev.select(torch.arange(lam.shape[0]) == b)

            def value(x, one=one):
                return one.value(x[None])[0]

            grad = torch.func.grad(value)(lam[b])
            hess = torch.func.hessian(value)(lam[b])
            torch.testing.assert_close(m[b], grad, atol=1e-12, rtol=1e-9)
            torch.testing.assert_close(H[b], hess, atol=1e-12, rtol=1e-9)


def test_hardness_1000_approaches_the_linear_program():
    """CCNN's hardness s = 1000 scales the logits until P-step ≈ the LP ``max Σ P·f`` under the
    hard bounds; the solver must still meet them (its multipliers exceed any fixed cap)."""
    from scipy.optimize import linprog

    g = torch.Generator().manual_seed(4)
    L, H, W, s = 3, 5, 5, 1000.0
    f = torch.randn(1, L, H, W, generator=g, dtype=torch.float64)
    f[:, 0] += 2.0  # the network wants background almost everywhere
    lower = torch.tensor([[0.3, 0.2, 0.1]], dtype=torch.float64)
    upper = torch.tensor([[0.6, 1.0, 1.0]], dtype=torch.float64)
    r = solve_latent(s * f, lower, upper, math.inf)
    assert r.converged.all()
    m = r.P.flatten(2).mean(-1)
    assert ((lower - m).max() <= 1e-6) and ((m - upper).max() <= 1e-6)
    assert r.multipliers.abs().max() > 300  # beyond the old fixed cap
    # The LP over P (N×L, row-stochastic) with the same fraction bounds.
    N = H * W
    c = -f[0].flatten(1).T.numpy().ravel() / N  # pixel-major (i, l)
    frac = np.zeros((L, N * L))
    for k in range(L):
        frac[k, k::L] = 1.0 / N
    rows = np.kron(np.eye(N), np.ones((1, L)))
    lp = linprog(c, A_ub=np.vstack([frac, -frac]),
                 b_ub=np.concatenate([upper[0].numpy(), -lower[0].numpy()]),
                 A_eq=rows, b_eq=np.ones(N), bounds=(0, None), method="highs")
    assert lp.status == 0
    ours = (r.P[0] * f[0]).sum().item() / N
    assert ours == pytest.approx(-lp.fun, abs=5e-3)  # entropy costs at most log(L)/s


@pytest.mark.parametrize("method", METHODS)
def test_warm_start_reaches_the_cold_solution(method):
    logits, _, bounds = random_problem(8, 6, 8, 8, varied=True, seed=12, dtype=torch.float64)
    cold = solve_latent(logits, *bounds, method=method, tol=1e-9)
    again = solve_latent(logits, *bounds, method=method, tol=1e-9, init=cold.multipliers)
    assert cold.converged.any() and (again.iterations[cold.converged] == 0).all()
    g = torch.Generator().manual_seed(3)
    moved = logits + 0.3 * torch.randn(logits.shape, generator=g, dtype=torch.float64)
    ref = solve_latent(moved, *bounds, method=method, tol=1e-9)
    warm = solve_latent(moved, *bounds, method=method, tol=1e-9, init=cold.multipliers)
    # pgd may stop on CCNN's step rule before tol: compare where both reached it
    both = warm.converged & ref.converged
    assert both.all() if method == "newton" else both.sum() >= 6
    torch.testing.assert_close(warm.P[both], ref.P[both], atol=1e-6, rtol=0)
    if method == "newton":
        assert warm.iterations.sum() < ref.iterations.sum()
    garbage = torch.full_like(cold.multipliers, 1e6)
    garbage[:, 1] = math.nan  # non-finite entries start at 0, huge ones at the caps
    torch.testing.assert_close(solve_latent(moved, *bounds, tol=1e-9, init=garbage).P, ref.P,
                               atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="init must be"):
        solve_latent(moved, *bounds, init=cold.multipliers[:3])
