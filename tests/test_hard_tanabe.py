"""Tanabe's constrained backpropagation and the nonlinear projection after training.

Every multiplier and gradient is checked against an independent dense computation: explicit
Jacobians from ``torch.func.jacrev`` over a flat parameter vector and NumPy's pseudoinverse, in
float64.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn
from torch.func import functional_call, jacrev

from ccnn.hard.posthoc import constraint_error, nonlinear_projection
from ccnn.hard.tanabe import Tanabe, huber, input_derivatives, tanabe_multipliers
from ccnn.helmholtz import Affine, HelmholtzNet, helmholtz_residual

DT = torch.float64


def _mlp(seed: int = 0, n_in: int = 2, hidden: int = 6, n_out: int = 1) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(n_in, hidden), nn.Tanh(), nn.Linear(hidden, n_out)).to(DT)


def _flat_fn(model: nn.Module, fn, *batch):
    """``theta -> fn(net_theta, *batch)`` on a flat parameter vector, and that vector."""
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for _, p in model.named_parameters()]
    theta = torch.cat([p.detach().reshape(-1) for p in model.parameters()])

    def call(vec):
        parts = torch.split(vec, [math.prod(s) for s in shapes])
        params = {n: p.view(s) for n, p, s in zip(names, parts, shapes, strict=True)}
        return fn(lambda *x, **kw: functional_call(model, params, x, kw), *batch)

    return call, theta


def _dense(model, fn, *batch):
    """``f̄``'s gradient, the stacked ``g`` and its Jacobian, all as NumPy float64."""
    call, theta = _flat_fn(model, fn, *batch)
    f_of = lambda v: call(v)[0].mean()  # noqa: E731
    g_of = lambda v: call(v)[1].reshape(-1)  # noqa: E731
    grad_f = jacrev(f_of)(theta).numpy()
    J = jacrev(g_of)(theta).numpy()
    g = g_of(theta).detach().numpy()
    return grad_f, g, J


def _fn_two(net, x):
    """Per-sample loss and two constraints per sample."""
    u = net(x)
    f = (u[:, 0] - 1.0).square() + u[:, 1].square()
    g = torch.stack([u[:, 0] - x[:, 0], u[:, 1] + u[:, 0] * x[:, 1]], 1)
    return f, g


def _grad_after_backward(model: nn.Module, loss: torch.Tensor) -> np.ndarray:
    model.zero_grad(set_to_none=True)
    loss.backward()
    return torch.cat([p.grad.reshape(-1) for p in model.parameters()]).numpy()


@pytest.mark.parametrize("solver", ["dense", "minres_qlp"])
def test_full_batch_multipliers_and_gradient_match_dense_pinv(solver):
    model = _mlp(n_out=2)
    x = torch.randn(4, 2, dtype=DT, generator=torch.Generator().manual_seed(1))
    step = Tanabe(model, solver=solver, rtol=1e-14)(_fn_two, x)
    grad_f, g, J = _dense(model, _fn_two, x)
    Lam = np.linalg.pinv(J @ J.T) @ (-J @ grad_f + g)
    np.testing.assert_allclose(step.lam.numpy().reshape(-1), 4 * Lam, rtol=1e-7, atol=1e-9)
    # the gradient of the Tanabe loss is -Ψ of Eq. 2: (I - J⁺J)∇f + J⁺g
    Jp = np.linalg.pinv(J)
    projected = (np.eye(J.shape[1]) - Jp @ J) @ grad_f + Jp @ g
    got = _grad_after_backward(model, step.loss)
    np.testing.assert_allclose(got, projected, rtol=1e-7, atol=1e-10)
    np.testing.assert_allclose(step.grad.numpy(), projected, rtol=1e-7, atol=1e-10)
    # the loss value is f̄ + Σ λ g / B
    f = _fn_two(model, x)[0].detach().numpy()
    assert float(step.loss.detach()) == pytest.approx(f.mean() + (4 * Lam * g).sum() / 4, rel=1e-10)


def test_loss_gradient_equals_autograd_of_explicit_nograd_expression():
    model = _mlp(n_out=2)
    x = torch.randn(5, 2, dtype=DT, generator=torch.Generator().manual_seed(2))
    step = Tanabe(model)(_fn_two, x)
    f, g = _fn_two(model, x)
    explicit = (f + (step.lam.detach() * g).sum(1)).mean()  # Eq. 9 with nograd(λ)
    want = _grad_after_backward(model, explicit)
    got = _grad_after_backward(model, Tanabe(model)(_fn_two, x).loss)
    np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-12)
    # backward scales with the upstream gradient and accumulates like any loss
    model.zero_grad(set_to_none=True)
    (2.0 * step.loss).backward()
    step2 = Tanabe(model)(_fn_two, x)
    step2.loss.backward()
    total = torch.cat([p.grad.reshape(-1) for p in model.parameters()]).numpy()
    np.testing.assert_allclose(total, 3 * want, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("version", ["full", "reduction"])
def test_step_backward_writes_what_loss_backward_writes(version):
    """``TanabeStep.backward()`` (no autograd) adds the same ``∇L`` as ``loss.backward()``,
    onto empty and onto existing gradients."""
    model = _mlp(n_out=2)
    x = torch.randn(5, 2, dtype=DT, generator=torch.Generator().manual_seed(3))
    step = Tanabe(model, version=version)(_fn_two, x)
    want = _grad_after_backward(model, step.loss)
    model.zero_grad(set_to_none=True)
    step.backward()
    got = torch.cat([p.grad.reshape(-1) for p in model.parameters()]).numpy()
    np.testing.assert_array_equal(got, want)
    step.backward()  # accumulates
    got = torch.cat([p.grad.reshape(-1) for p in model.parameters()]).numpy()
    np.testing.assert_allclose(got, 2 * want, rtol=1e-15)
    assert float(step.value) == float(step.loss.detach())


@pytest.mark.parametrize("bad", [math.nan, math.inf])
@pytest.mark.parametrize("batched_params", [False, True])
def test_reduction_on_a_diverged_network_raises(bad, batched_params):
    """The scalar multiplier's path shows ``∇L`` finite from the Gram matrix instead of a pass
    over it; a nan or inf weight must still raise, not write nan gradients."""
    gen = torch.Generator().manual_seed(5)
    net = HelmholtzNet(width=3, depth=2, generator=gen, dtype=DT)
    z = torch.rand(4, 4, dtype=DT, generator=gen) * 2 - 1
    y = torch.rand(4, dtype=DT, generator=gen)
    with torch.no_grad():
        net.lower[1].weight[0, 0] = bad
    tanabe = Tanabe(net, version="reduction", reduction="huber", batched_params=batched_params)
    with pytest.raises(RuntimeError, match="non-finite"):
        tanabe(_helmholtz_fn(1), z, y)


def test_changes_to_the_models_parameters_between_calls_are_noticed():
    """Freezing, unfreezing, adding and replacing parameters between calls: every call uses the
    model's parameters of that moment, as a fresh Tanabe does."""
    model = _mlp(n_out=2)
    x = torch.randn(5, 2, dtype=DT, generator=torch.Generator().manual_seed(4))
    tanabe = Tanabe(model, version="reduction", reduction="huber")

    def check(n_params):
        got, want = tanabe(_fn_two, x), Tanabe(model, version="reduction",
                                                reduction="huber")(_fn_two, x)
        assert got.grad.numel() == n_params
        np.testing.assert_allclose(got.grad.numpy(), want.grad.numpy(), rtol=1e-12)

    check(2 * 6 + 6 + 6 * 2 + 2)
    model[0].bias.requires_grad_(False)
    check(2 * 6 + 6 * 2 + 2)
    model[0].bias.requires_grad_(True)
    check(2 * 6 + 6 + 6 * 2 + 2)
    model[2].register_parameter("extra", nn.Parameter(torch.zeros(3, dtype=DT)))
    check(2 * 6 + 6 + 6 * 2 + 2 + 3)  # not used by fn: a zero gradient, but a parameter
    model[2] = nn.Linear(6, 2).to(DT)
    check(2 * 6 + 6 + 6 * 2 + 2)


def test_sample_coupling_is_eq5_per_sample_systems():
    model = _mlp(n_out=2)
    x = torch.randn(3, 2, dtype=DT, generator=torch.Generator().manual_seed(3))
    step = Tanabe(model, coupling="sample")(_fn_two, x)
    ds = []
    for i in range(3):  # independent per-sample computation (a loop, in the test only)
        grad_f, g, J = _dense(model, _fn_two, x[i:i + 1])
        lam_i = np.linalg.pinv(J @ J.T) @ (-J @ grad_f + g)
        np.testing.assert_allclose(step.lam[i].numpy(), lam_i, rtol=1e-7, atol=1e-9)
        ds.append(grad_f + J.T @ lam_i)
    np.testing.assert_allclose(_grad_after_backward(model, step.loss), np.mean(ds, 0),
                               rtol=1e-7, atol=1e-10)


def test_reduction_multipliers_match_dense():
    model = _mlp(n_out=2)
    x = torch.randn(6, 2, dtype=DT, generator=torch.Generator().manual_seed(4))

    def reduced(net, x):
        f, g = _fn_two(net, x)
        return f, huber(g, 0.3).mean(0)[None, :]  # g̃ as one "sample" row

    step = Tanabe(model, version="reduction", reduction="huber", huber_delta=0.3)(_fn_two, x)
    grad_f, gt, J = _dense(model, reduced, x)
    lam = np.linalg.pinv(J @ J.T) @ (-J @ grad_f + gt)
    np.testing.assert_allclose(step.lam.numpy(), lam, rtol=1e-8, atol=1e-10)
    np.testing.assert_allclose(step.reduced.numpy(), gt, rtol=1e-12)
    np.testing.assert_allclose(_grad_after_backward(model, step.loss), grad_f + J.T @ lam,
                               rtol=1e-8, atol=1e-11)


def test_full_and_reduction_agree_on_one_sample_and_differ_on_a_batch():
    model = _mlp(n_out=2)
    x = torch.randn(4, 2, dtype=DT, generator=torch.Generator().manual_seed(5))
    mean = lambda g: g.mean(0)  # noqa: E731  (valid on a batch of one: g̃ = g)
    one = x[:1]
    full = Tanabe(model)(_fn_two, one)
    red = Tanabe(model, version="reduction", reduction=mean)(_fn_two, one)
    sample = Tanabe(model, coupling="sample")(_fn_two, one)
    np.testing.assert_allclose(full.grad.numpy(), red.grad.numpy(), rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(full.lam[0].numpy(), red.lam.numpy(), rtol=1e-9)
    np.testing.assert_allclose(full.grad.numpy(), sample.grad.numpy(), rtol=1e-9, atol=1e-12)
    full4 = Tanabe(model)(_fn_two, x)
    red4 = Tanabe(model, version="reduction")(_fn_two, x)
    assert not np.allclose(full4.grad.numpy(), red4.grad.numpy(), rtol=1e-3)
    # both move along a descent direction of their constraint measure: the step -∇L reduces
    # Σ g² to first order (ġ = -g)
    _, g, J = _dense(model, _fn_two, x)
    for step in (full4, red4):
        assert float(g @ (J @ -step.grad.numpy())) < 0


def test_rank_deficient_constraints_give_minimum_length_multipliers():
    model = _mlp(n_out=2)
    x = torch.randn(3, 2, dtype=DT, generator=torch.Generator().manual_seed(6))

    def duplicated(net, x):  # the same constraint twice: J has rank 3, not 6
        f, g = _fn_two(net, x)
        return f, torch.stack([g[:, 0], g[:, 0]], 1)

    grad_f, g, J = _dense(model, duplicated, x)
    assert np.linalg.matrix_rank(J) == 3
    Lam = np.linalg.pinv(J @ J.T) @ (-J @ grad_f + g)
    for solver in ("dense", "minres_qlp"):
        step = Tanabe(model, solver=solver, rtol=1e-14)(duplicated, x)
        lam = step.lam.numpy().reshape(-1) / 3
        assert np.isfinite(lam).all()
        np.testing.assert_allclose(lam, Lam, rtol=1e-6, atol=1e-9)
        np.testing.assert_allclose(lam[0::2], lam[1::2], rtol=1e-8)  # split equally
    # the reduction of two identical reduced constraints
    step = Tanabe(model, version="reduction", reduction=lambda g: g.square().mean(0))(
        duplicated, x)
    assert step.lam[0].item() == pytest.approx(step.lam[1].item(), rel=1e-9)


def test_zero_constraint_gradient_gives_zero_multiplier():
    A = torch.zeros(1, 5, dtype=DT)
    lam, _ = tanabe_multipliers(A, torch.ones(5, dtype=DT), torch.zeros(1, dtype=DT))
    assert lam.tolist() == [0.0]
    J = torch.tensor([[1.0, 0.0], [0.0, 0.0]], dtype=DT)
    lam, _ = tanabe_multipliers(J, torch.tensor([2.0, 3.0], dtype=DT),
                                torch.tensor([1.0, 0.0], dtype=DT), solver="dense")
    np.testing.assert_allclose(lam.numpy(), [-1.0, 0.0], atol=1e-14)


def test_warm_start_by_index_reuses_the_pool():
    model = _mlp(n_out=2)
    x = torch.randn(4, 2, dtype=DT, generator=torch.Generator().manual_seed(7))
    tanabe = Tanabe(model, solver="minres_qlp", rtol=1e-12, pool_size=10)
    idx = torch.tensor([3, 1, 7, 0])
    first = tanabe(_fn_two, x, index=idx)
    again = tanabe(_fn_two, x, index=idx)  # same parameters: starts at the solution
    assert again.info.iterations < first.info.iterations
    np.testing.assert_allclose(again.lam.numpy(), first.lam.numpy(), rtol=1e-6, atol=1e-9)
    pool = tanabe.state_dict()["pool"]
    np.testing.assert_allclose(pool[idx].numpy() * 4, first.lam.numpy(), rtol=1e-6)
    assert pool[torch.tensor([2, 4, 5, 6, 8, 9])].abs().max().item() == 0.0


def test_residual_decays_like_exp_minus_t_under_small_sgd_steps():
    model = _mlp(seed=3, hidden=10)
    x = torch.randn(5, 2, dtype=DT, generator=torch.Generator().manual_seed(8))
    target = torch.tensor([0.4, -0.3, 0.2, 0.5, -0.1], dtype=DT)

    def fn(net, x, t):
        u = net(x)[:, 0]
        return (u + 2.0).square(), u - t

    eta, steps = 0.01, 150
    tanabe = Tanabe(model)
    opt = torch.optim.SGD(model.parameters(), lr=eta)
    with torch.no_grad():
        g0 = model(x)[:, 0] - target
    for _ in range(steps):
        opt.zero_grad()
        tanabe(fn, x, target).loss.backward()
        opt.step()
    with torch.no_grad():
        g = model(x)[:, 0] - target
    predicted = g0 * math.exp(-eta * steps)  # g(t) = g(0) e^{-t}, t = η·steps
    assert float((g - predicted).abs().max()) < 0.02 * float(g0.abs().max())
    # far from what plain gradient descent on f does to the residual
    assert float(g.abs().max()) < 0.3 * float(g0.abs().max())


def test_pde_residual_through_second_derivatives_matches_dense():
    model = _mlp(seed=4, n_in=2, hidden=5)
    x = torch.randn(4, 2, dtype=DT, generator=torch.Generator().manual_seed(9))
    def fn(net, x):  # u'' + 4u = 0 along x₀, loss: fit u = 1
        e = x.new_tensor([1.0, 0.0]).expand_as(x)
        u, _, u_xx = input_derivatives(lambda z: net(z)[:, 0], x, e)
        return (u - 1.0).square(), u_xx + 4.0 * u

    step = Tanabe(model)(fn, x)  # per-sample Jacobians by vmap∘jacrev through nested jvp
    grad_f, g, J = _dense(model, fn, x)
    Lam = np.linalg.pinv(J @ J.T) @ (-J @ grad_f + g)
    np.testing.assert_allclose(step.lam.numpy().reshape(-1), 4 * Lam, rtol=1e-7, atol=1e-9)
    np.testing.assert_allclose(step.g.numpy().reshape(-1), g, rtol=1e-12)


def test_input_derivatives_of_known_function_and_finite_differences():
    x = torch.tensor([[0.3, -1.2], [1.1, 0.4]], dtype=DT)
    v = torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=DT)  # row 0 along x₀, row 1 along x₁

    def fn(z):
        return torch.sin(3 * z[:, 0]) * z[:, 1] ** 3

    _, du, d2u = input_derivatives(fn, x, v)
    a, b = x[0].tolist()
    assert du[0].item() == pytest.approx(3 * math.cos(3 * a) * b ** 3, rel=1e-12)
    assert d2u[0].item() == pytest.approx(-9 * math.sin(3 * a) * b ** 3, rel=1e-12)
    a, b = x[1].tolist()
    assert d2u[1].item() == pytest.approx(6 * math.sin(3 * a) * b, rel=1e-12)
    h = 1e-4
    fd = (fn(x + h * v) - 2 * fn(x) + fn(x - h * v)) / h ** 2
    np.testing.assert_allclose(d2u.numpy(), fd.numpy(), rtol=1e-6)
    assert input_derivatives(fn, x, v, order=0)[0].tolist() == fn(x).tolist()


def test_batched_params_path_equals_vmap_path_on_helmholtz_net():
    gen = torch.Generator().manual_seed(10)
    net = HelmholtzNet(width=4, depth=2, generator=gen, dtype=DT)
    z = torch.rand(5, 4, dtype=DT, generator=gen) * 2 - 1
    y = torch.rand(5, dtype=DT, generator=gen)

    def fn(n, z, y):
        r, u = helmholtz_residual(n, z)
        return (u - y).square(), r

    for coupling in ("batch", "sample"):
        a = Tanabe(net, coupling=coupling)(fn, z, y)
        b = Tanabe(net, coupling=coupling, batched_params=True)(fn, z, y)
        np.testing.assert_allclose(b.lam.numpy(), a.lam.numpy(), rtol=1e-8)
        np.testing.assert_allclose(b.grad.numpy(), a.grad.numpy(), rtol=1e-8, atol=1e-14)
    grad_f, g, J = _dense(net, fn, z, y)
    Lam = np.linalg.pinv(J @ J.T) @ (-J @ grad_f + g)
    step = Tanabe(net, batched_params=True)(fn, z, y)
    np.testing.assert_allclose(step.lam.numpy().reshape(-1), 5 * Lam, rtol=1e-6)



def _helmholtz_fn(constraints: int):
    """Per-sample squared error and ``constraints`` residuals of the Helmholtz toy."""

    def fn(n, z, y):
        r, u = helmholtz_residual(n, z)
        g = r[:, None] if constraints == 1 else torch.stack([r, u - 0.3 * z[:, 0]], 1)
        return (u - y).square(), g

    return fn


def _mixed(g):
    return g.square().mean(0) + 0.5 * g.abs().mean(0)


@pytest.mark.parametrize("reduction", ["mse", "huber", "callable"])
@pytest.mark.parametrize("constraints", [1, 2])
def test_reduction_batched_params_equals_autograd_path_and_dense(reduction, constraints):
    gen = torch.Generator().manual_seed(11)
    net = HelmholtzNet(width=4, depth=2, generator=gen, dtype=DT)
    z = torch.rand(6, 4, dtype=DT, generator=gen) * 2 - 1
    y = torch.rand(6, dtype=DT, generator=gen)
    fn = _helmholtz_fn(constraints)
    red = _mixed if reduction == "callable" else reduction
    kw = {"version": "reduction", "reduction": red, "huber_delta": 0.3}
    a = Tanabe(net, **kw)(fn, z, y)
    b = Tanabe(net, batched_params=True, **kw)(fn, z, y)
    for x, w in ((b.lam, a.lam), (b.grad, a.grad), (b.reduced, a.reduced), (b.g, a.g),
                 (b.f, a.f), (b.loss.detach(), a.loss.detach())):
        np.testing.assert_allclose(x.numpy(), w.numpy(), rtol=1e-9, atol=1e-13)
    reduce = {"mse": lambda g: g.square().mean(0), "huber": lambda g: huber(g, 0.3).mean(0),
              "callable": _mixed}[reduction]

    def reduced(n, z, y):
        f, g = fn(n, z, y)
        return f, reduce(g)[None, :]

    grad_f, gt, J = _dense(net, reduced, z, y)
    lam = np.linalg.pinv(J @ J.T) @ (-J @ grad_f + gt)
    np.testing.assert_allclose(b.lam.numpy(), lam, rtol=1e-7, atol=1e-12)
    np.testing.assert_allclose(_grad_after_backward(net, b.loss), grad_f + J.T @ lam,
                               rtol=1e-7, atol=1e-12)
    if constraints == 1:  # the scalar shortcut equals the general solve
        c = Tanabe(net, solver="minres_qlp", batched_params=True, **kw)(fn, z, y)
        np.testing.assert_allclose(c.lam.numpy(), b.lam.numpy(), rtol=1e-9)


def test_batched_params_with_tied_weights_matches_the_plain_paths():
    gen = torch.Generator().manual_seed(12)
    net = HelmholtzNet(width=4, depth=3, generator=gen, dtype=DT)
    net.upper[2].weight = net.upper[1].weight  # one parameter in two layers
    z = torch.rand(5, 4, dtype=DT, generator=gen) * 2 - 1
    y = torch.rand(5, dtype=DT, generator=gen)
    fn = _helmholtz_fn(1)
    for version in ("full", "reduction"):
        a = Tanabe(net, version=version)(fn, z, y)
        b = Tanabe(net, version=version, batched_params=True)(fn, z, y)
        np.testing.assert_allclose(b.grad.numpy(), a.grad.numpy(), rtol=1e-8, atol=1e-13)
        np.testing.assert_allclose(b.lam.numpy(), a.lam.numpy(), rtol=1e-8)


def test_batched_params_reuses_copies_only_while_parameters_are_unchanged():
    gen = torch.Generator().manual_seed(13)
    net = HelmholtzNet(width=3, depth=2, generator=gen, dtype=DT)
    z = torch.rand(4, 4, dtype=DT, generator=gen) * 2 - 1
    y = torch.rand(4, dtype=DT, generator=gen)
    fn = _helmholtz_fn(1)
    tanabe = Tanabe(net, version="reduction", batched_params=True)
    opt = torch.optim.SGD(net.parameters(), lr=0.05)
    for _ in range(3):  # in-place steps: the cached copies see the new values
        opt.zero_grad()
        tanabe(fn, z, y).loss.backward()
        opt.step()
    net.out.bias = nn.Parameter(net.out.bias.detach() + 1.0)  # a new tensor: new copies
    for change in range(2):
        got = tanabe(fn, z, y)
        want = Tanabe(net, version="reduction")(fn, z, y)
        np.testing.assert_allclose(got.grad.numpy(), want.grad.numpy(), rtol=1e-9, atol=1e-13)
        np.testing.assert_allclose(got.f.numpy(), want.f.numpy(), rtol=1e-12)
        if not change:  # a new module: its parameter table changes too
            net.out = Affine(3, 1, generator=gen, dtype=DT)


@pytest.mark.parametrize("solver", ["dense", "minres_qlp"])
@pytest.mark.parametrize("where", ["J", "grad_f"])
def test_non_finite_systems_raise_a_clear_error(solver, where):
    """A diverged network (nan in the constraint Jacobian or the loss gradient) gets a
    FloatingPointError that says so, from either solver, instead of LAPACK's assertion or nan
    multipliers."""
    gen = torch.Generator().manual_seed(0)
    J = torch.randn(3, 5, generator=gen, dtype=DT)
    grad_f = torch.randn(5, generator=gen, dtype=DT)
    g = torch.randn(3, generator=gen, dtype=DT)
    lam, _ = tanabe_multipliers(J, grad_f, g, solver=solver, rtol=1e-12)
    Jn = J.numpy()
    expected = np.linalg.pinv(Jn @ Jn.T) @ (g.numpy() - Jn @ grad_f.numpy())
    np.testing.assert_allclose(lam.numpy(), expected, rtol=1e-8, atol=1e-10)
    {"J": J, "grad_f": grad_f}[where][1] = math.nan
    with pytest.raises(FloatingPointError, match=r"not finite .* lower the learning rate"):
        tanabe_multipliers(J, grad_f, g, solver=solver)


def test_bad_arguments_raise_clear_errors():
    model = _mlp()
    x = torch.randn(3, 2, dtype=DT)
    with pytest.raises(ValueError, match="version must be one of"):
        Tanabe(model, version="partial")
    with pytest.raises(ValueError, match="coupling must be one of"):
        Tanabe(model, coupling="pairs")
    with pytest.raises(ValueError, match="solver must be one of"):
        Tanabe(model, solver="cg")
    with pytest.raises(ValueError, match="huber_delta must be"):
        Tanabe(model, huber_delta=0.0)
    with pytest.raises(ValueError, match=r"model must be a torch\.nn\.Module"):
        Tanabe(lambda z: z)
    with pytest.raises(ValueError, match="f must have shape"):
        Tanabe(model)(lambda net, x: (net(x), net(x)[:, 0]), x)
    with pytest.raises(ValueError, match="g must have shape"):
        Tanabe(model)(lambda net, x: (net(x)[:, 0], net(x)[:, None, :].expand(-1, 2, 2)), x)
    with pytest.raises(ValueError, match="index needs version='full' and a pool_size"):
        Tanabe(model)(_fn_two, x, index=torch.arange(3))
    with pytest.raises(ValueError, match=r"index must lie in \[0, pool_size=3\)"):
        Tanabe(model, pool_size=3)(lambda n, x: (n(x)[:, 0], n(x)[:, 0]), x,
                                   index=torch.tensor([0, 1, 3]))
    with pytest.raises(ValueError, match="batch tensors must share a leading dimension"):
        Tanabe(model)(_fn_two, x, torch.zeros(2))
    with pytest.raises(ValueError, match="order must be a non-negative int"):
        input_derivatives(torch.sin, x, x, order=-1)
    net = HelmholtzNet(width=3, depth=1, dtype=DT)
    z = torch.rand(3, 4, dtype=DT)
    with pytest.raises(ValueError, match="needs residuals per row of the batch"):
        Tanabe(net, version="reduction", batched_params=True)(
            lambda n, z: (n(z), helmholtz_residual(n, z[:2])[0]), z)


# ---- nonlinear projection after training ------------------------------------------------------


def _quad_residual(net, x):
    """A constraint the network can meet: u(x) = 0.5 x₀ on the projection data."""
    return net(x)[:, 0] - 0.5 * x[:, 0]


def _mse(net, x, y):
    return (net(x)[:, 0] - y).square()


def test_projection_leaves_original_untouched_and_reaches_threshold():
    model = _mlp(seed=5, hidden=8)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    xs = torch.linspace(-1, 1, 20, dtype=DT)[:, None].repeat(1, 2)
    result = nonlinear_projection(model, _quad_residual, xs, lr=1e-2, batch_size=5,
                                  threshold=1e-5, max_steps=5000,
                                  generator=torch.Generator().manual_seed(0))
    rep = result.report
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])
    assert result.model is not model
    assert rep.converged and rep.constraint_after <= 1e-5
    assert rep.constraint_before == pytest.approx(
        float(_quad_residual(model, xs).square().mean().detach()), rel=1e-12)
    assert rep.constraint_after == pytest.approx(
        float(_quad_residual(result.model, xs).square().mean().detach()), rel=1e-12)
    assert rep.history[0] == (0, rep.constraint_before)
    assert rep.history[-1] == (rep.steps, rep.constraint_after)
    assert constraint_error(result.model, _quad_residual, xs) == rep.constraint_after
    capped = nonlinear_projection(model, _quad_residual, xs, lr=1e-2, batch_size=5,
                                  threshold=1e-5, max_steps=7,
                                  generator=torch.Generator().manual_seed(0))
    assert capped.report.steps == 7 and not capped.report.converged


def test_projection_keeping_the_data_loss():
    gen = torch.Generator().manual_seed(1)
    model = _mlp(seed=6, hidden=8)
    xt = torch.rand(64, 2, dtype=DT, generator=gen) * 2 - 1
    yt = torch.sin(2 * xt[:, 0]) + xt[:, 1]
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(300):  # train on the data first
        opt.zero_grad()
        _mse(model, xt, yt).mean().backward()
        opt.step()
    xs = torch.linspace(-1, 1, 16, dtype=DT)[:, None].repeat(1, 2)
    kw = {"lr": 1e-2, "batch_size": 8, "threshold": 0.0, "max_steps": 150,
          "data_loss": _mse, "train_data": (xt, yt), "data_batch_size": 64}
    plain = nonlinear_projection(model, _quad_residual, xs, **kw,
                                 generator=torch.Generator().manual_seed(0)).report
    kept = nonlinear_projection(model, _quad_residual, xs, keep_data="constraint", **kw,
                                generator=torch.Generator().manual_seed(0)).report
    pen = nonlinear_projection(model, _quad_residual, xs, keep_data="penalty",
                               data_weight=10.0, **kw,
                               generator=torch.Generator().manual_seed(0)).report
    assert plain.data_before == kept.data_before == pen.data_before
    # plain projection gives up the data fit; the constrained variant holds it near d₀
    assert plain.data_after > 3 * plain.data_before
    assert kept.data_after < 2.5 * kept.data_before
    assert kept.data_after < 0.1 * plain.data_after
    assert pen.data_after < 0.5 * plain.data_after
    # and both variants still reduce the constraint error
    assert kept.constraint_after < 0.75 * kept.constraint_before
    assert pen.constraint_after < pen.constraint_before


def test_projection_bad_arguments():
    model = _mlp()
    xs = torch.zeros(4, 2, dtype=DT)
    with pytest.raises(ValueError, match="lr must be a finite number > 0"):
        nonlinear_projection(model, _quad_residual, xs, lr=0.0)
    with pytest.raises(ValueError, match="keep_data must be None"):
        nonlinear_projection(model, _quad_residual, xs, keep_data="both")
    with pytest.raises(ValueError, match="data_loss and train_data must be given together"):
        nonlinear_projection(model, _quad_residual, xs, keep_data="penalty")
    with pytest.raises(ValueError, match="data tensors must share a leading dimension"):
        nonlinear_projection(model, _quad_residual, (xs, torch.zeros(3)))
    with pytest.raises(ValueError, match="optimizer must be 'adam', 'sgd'"):
        nonlinear_projection(model, _quad_residual, xs, optimizer="lbfgs")
