"""The Helmholtz toy: data, the network of Fig. 6 and its derivatives, the runs and the CLI."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from torch.func import functional_call, jacrev, vmap

from ccnn.cli import main
from ccnn.hard.optim import HardSGD
from ccnn.hard.tanabe import input_derivatives
from ccnn.helmholtz import (
    METHODS,
    HelmholtzConfig,
    HelmholtzNet,
    helmholtz_residual,
    make_data,
    make_step,
    parameter_count,
    run_helmholtz,
    sine_wave,
)

DT = torch.float64


def test_make_data_grid_counts_and_values():
    inputs, targets = make_data(generator=torch.Generator().manual_seed(0), dtype=DT)
    assert inputs.shape == (1000 * 50, 4) and targets.shape == (50000,)
    A = np.linspace(0.2, 5.0, 10)
    k = np.linspace(0.4 * np.pi, 10 * np.pi, 10)
    phi = np.linspace(-0.5, 0.5, 10)
    assert A[1] - A[0] == pytest.approx(0.48 / 0.9)  # (5.0 − 0.2)/9 by hand
    waves = inputs[::50, 1:].numpy()  # one row per wave, wave-major
    np.testing.assert_allclose(waves[:, 0], np.repeat(A, 100), rtol=1e-15)
    np.testing.assert_allclose(waves[:, 1], np.tile(np.repeat(k, 10), 10), rtol=1e-15)
    np.testing.assert_allclose(waves[:, 2], np.tile(phi, 100), atol=1e-15)
    assert len({tuple(w) for w in waves.round(12)}) == 1000
    # 50 points per wave, each row of a wave has the wave's style
    style = inputs[:, 1:].reshape(1000, 50, 3)
    assert torch.equal(style, style[:, :1].expand(-1, 50, -1))
    x = inputs[:, 0].numpy()
    assert x.min() >= -1.0 and x.max() <= 1.0 and abs(x.mean()) < 0.02  # uniform on [−1, 1]
    want = inputs[:, 1].numpy() * np.sin(inputs[:, 2].numpy() * x + inputs[:, 3].numpy())
    np.testing.assert_allclose(targets.numpy(), want, rtol=1e-12, atol=1e-12)
    again, _ = make_data(generator=torch.Generator().manual_seed(0), dtype=DT)
    other, _ = make_data(generator=torch.Generator().manual_seed(1), dtype=DT)
    assert torch.equal(inputs, again) and not torch.equal(inputs, other)
    small, _ = make_data(3, 4, generator=torch.Generator().manual_seed(0))
    assert small.shape == (27 * 4, 4) and small.dtype == torch.float32


def test_test_wave_points():
    inputs, targets = sine_wave()
    assert inputs.shape == (500, 4)
    x = inputs[:, 0].double().numpy()
    assert x[0] == -1.0 and x[-1] == 1.0
    np.testing.assert_allclose(np.diff(x), 2 / 499, rtol=1e-5)
    assert torch.equal(inputs[:, 1:], torch.tensor([[1.0, 1.0, 0.0]]).expand(500, 3))
    np.testing.assert_allclose(targets.numpy(), np.sin(x), atol=1e-6)
    assert sine_wave(100)[0].shape == (100, 4)


def test_network_size_and_parameter_count():
    net = HelmholtzNet()
    assert sum(p.numel() for p in net.parameters()) == 639 == parameter_count(11)
    for w in (3, 8, 16):
        n = sum(p.numel() for p in HelmholtzNet(width=w).parameters())
        assert n == parameter_count(w) == 4 * w * w + 14 * w + 1
    assert sum(p.numel() for p in HelmholtzNet(width=5, depth=2).parameters()) == \
        parameter_count(5, 2)


def test_jet_equals_nested_jvp_and_finite_differences():
    gen = torch.Generator().manual_seed(0)
    net = HelmholtzNet(width=6, generator=gen, dtype=DT)
    z = torch.rand(9, 4, generator=gen, dtype=DT) * 2 - 1
    e = torch.zeros_like(z)
    e[:, 0] = 1.0
    u, du, d2u = net.jet(z)
    U, DU, D2U = input_derivatives(net, z, e)
    for a, b in ((u, U), (du, DU), (d2u, D2U)):
        np.testing.assert_allclose(a.detach().numpy(), b.detach().numpy(), rtol=1e-10,
                                   atol=1e-13)
    assert torch.equal(u, net(z))
    h = 1e-4
    fd = (net(z + h * e) - 2 * net(z) + net(z - h * e)) / h ** 2
    np.testing.assert_allclose(d2u.detach().numpy(), fd.detach().numpy(), rtol=1e-5,
                               atol=1e-6)



def _copies(net, groups, gen, tied=False):
    """The parameters of ``net`` by name: as they are (``groups == 1``), ``groups`` perturbed
    copies with a leading dimension (the per-group weights of the batched_params protocol), or
    with ``tied`` ``groups`` copies that are one tensor expanded (stride 0, as Tanabe makes
    them)."""
    if groups == 1:
        return dict(net.named_parameters())
    if tied:
        return {n: p.detach().unsqueeze(0).expand(groups, *p.shape).requires_grad_()
                for n, p in net.named_parameters()}
    return {n: (p.detach().unsqueeze(0).expand(groups, *p.shape)
                + 0.1 * torch.randn(groups, *p.shape, generator=gen, dtype=DT)).requires_grad_()
            for n, p in net.named_parameters()}


@pytest.mark.parametrize(("groups", "rows", "tied"),
                         [(1, 7, False), (6, 1, False), (3, 2, False), (2, 5, False),
                          (6, 1, True), (2, 5, True)])
def test_fused_jet_equals_autograd_jet_in_values_and_gradients(groups, rows, tied):
    gen = torch.Generator().manual_seed(4)
    net = HelmholtzNet(width=5, depth=3, generator=gen, dtype=DT)
    params = _copies(net, groups, gen, tied)
    assert all((p.stride(0) == 0) == tied for p in params.values()) or groups == 1
    z = (torch.rand(groups * rows, 4, generator=gen, dtype=DT) * 2 - 1).requires_grad_()
    leaves = [z, *params.values()]
    for used in ((1, 1, 1), (1, 0, 0), (0, 0, 1), (0, 1, 0)):
        cot = [torch.randn(groups * rows, generator=gen, dtype=DT) if u else None for u in used]
        got = []
        for fused in (True, False):
            net.fused = fused
            outs = functional_call(net, params, (z,), {"derivatives": True})
            loss = sum((o * c).sum() for o, c in zip(outs, cot, strict=True) if c is not None)
            grads = torch.autograd.grad(loss, leaves, allow_unused=True)
            got.append(([o.detach() for o in outs],
                        [torch.zeros_like(x) if g is None else g
                         for g, x in zip(grads, leaves, strict=True)]))
        (outs_f, grads_f), (outs_a, grads_a) = got
        for a, b in zip(outs_f, outs_a, strict=True):
            np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-12, atol=1e-14)
        for a, b in zip(grads_f, grads_a, strict=True):
            np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-10, atol=1e-13)
    net.fused = True
    u, _, u2 = functional_call(net, params, (z,), {"derivatives": True})
    with pytest.raises(RuntimeError, match="fused jet is differentiable once"):
        torch.autograd.grad((u + u2).sum(), leaves[1:], create_graph=True)


def test_residual_of_known_functions():
    z = torch.tensor([[0.3, 2.0, 4.0, 0.1], [-0.7, 0.5, 1.5, -0.4]], dtype=DT)
    A, k, phi, x = z[:, 1], z[:, 2], z[:, 3], z[:, 0]

    def sine(inputs, derivatives=False):  # the exact solution: residual 0
        s = A * torch.sin(k * x + phi)
        return s, A * k * torch.cos(k * x + phi), -k * k * s

    r, _ = helmholtz_residual(sine, z)
    np.testing.assert_allclose(r.numpy(), 0.0, atol=1e-12)

    def square(inputs, derivatives=False):  # u = x²: r = 2 + k²x²
        return x * x, 2 * x, torch.full_like(x, 2.0)

    r, _ = helmholtz_residual(square, z)
    np.testing.assert_allclose(r.numpy(), (2 + k * k * x * x).numpy(), rtol=1e-14)


def test_parameter_copies_give_per_sample_values_and_gradients():
    gen = torch.Generator().manual_seed(1)
    net = HelmholtzNet(width=4, depth=2, generator=gen, dtype=DT)
    z = torch.rand(6, 4, generator=gen, dtype=DT)
    params = {n: p.detach() for n, p in net.named_parameters()}
    copies = {n: p.unsqueeze(0).expand(6, *p.shape).clone().requires_grad_()
              for n, p in params.items()}
    _, _, d2 = functional_call(net, copies, (z,), {"derivatives": True})
    np.testing.assert_allclose(d2.detach().numpy(), net.jet(z)[2].detach().numpy(),
                               rtol=1e-12)
    grads = torch.autograd.grad(d2.sum(), list(copies.values()), allow_unused=True)
    grads = [torch.zeros_like(c) if g is None else g  # u'' does not depend on the last bias
             for g, c in zip(grads, copies.values(), strict=True)]

    def one(p, zi):
        return functional_call(net, p, (zi[None],), {"derivatives": True})[2][0]

    want = vmap(jacrev(one), in_dims=(None, 0))(params, z)
    for g, name in zip(grads, copies, strict=True):
        np.testing.assert_allclose(g.numpy(), want[name].numpy(), rtol=1e-10, atol=1e-13)
    two = {n: p.unsqueeze(0).expand(2, *p.shape) for n, p in params.items()}  # 2 groups of 3
    np.testing.assert_allclose(functional_call(net, two, (z,)).numpy(),
                               net(z).detach().numpy(), rtol=1e-12)


@pytest.mark.parametrize("method", ["unconstrained", "soft", "lagrangian", "reduction", "full",
                                    "kkt", "bare"])
def test_each_step_runs_and_reports(method):
    gen = torch.Generator().manual_seed(2)
    net = HelmholtzNet(width=4, generator=gen)
    opt = HardSGD(net, lr=1e-4) if method == "kkt" else torch.optim.SGD(net.parameters(), lr=1e-4)
    z = torch.rand(8, 4, generator=gen)
    y = torch.rand(8, generator=gen)
    ref = HelmholtzNet(width=4, generator=torch.Generator().manual_seed(2))  # = net's start
    before = [p.detach().clone() for p in net.parameters()]
    step = make_step(method, net, opt, batch_size=8, pool_size=8)
    f, r = step(z, y, torch.arange(8))
    with torch.no_grad():
        assert float(f) == pytest.approx(float((ref(z) - y).square().mean()), rel=1e-6)
        want = helmholtz_residual(ref, z)[0]
    assert any(not torch.equal(a, p) for a, p in zip(before, net.parameters(), strict=True))
    if method == "bare":
        assert r.shape == (0,)
    else:
        np.testing.assert_allclose(r.numpy(), want.numpy(), rtol=1e-5, atol=1e-4)
    with pytest.raises(ValueError, match="method must be one of"):
        make_step("hard", net, opt, batch_size=8)
    if method == "kkt":
        with pytest.raises(ValueError, match="method 'kkt' needs a HardSGD optimizer"):
            make_step("kkt", net, torch.optim.SGD(net.parameters(), lr=1e-4), batch_size=8)
    if method == "lagrangian":
        with pytest.raises(ValueError, match="method 'lagrangian' needs pool_size"):
            make_step("lagrangian", net, opt, batch_size=8)


def _flat_params(net):
    return torch.cat([p.detach().reshape(-1) for p in net.parameters()])


def test_lagrangian_step_is_the_augmented_lagrangian_with_dual_ascent():
    gen = torch.Generator().manual_seed(5)
    net = HelmholtzNet(width=3, depth=1, generator=gen, dtype=DT)
    ref = HelmholtzNet(width=3, depth=1, generator=torch.Generator().manual_seed(5), dtype=DT)
    z = torch.rand(5, 4, generator=gen, dtype=DT)
    y = torch.rand(5, generator=gen, dtype=DT)
    index = torch.tensor([0, 2, 4, 6, 8])
    rho, lr = 0.3, 1e-3
    step = make_step("lagrangian", net, torch.optim.SGD(net.parameters(), lr=lr), batch_size=5,
                     pool_size=10, lagrangian_rho=rho)
    lam = torch.zeros(5, dtype=DT)
    for _ in range(3):  # SGD on f̄ + Σ Λ_i r_i + (ρ/2) Σ r_i², then Λ_i += ρ r_i (by hand)
        r, u = helmholtz_residual(ref, z)
        loss = (u - y).square().mean() + (lam * r).sum() + 0.5 * rho * r.square().sum()
        grads = torch.autograd.grad(loss, list(ref.parameters()))
        with torch.no_grad():
            for p, g in zip(ref.parameters(), grads, strict=True):
                p -= lr * g
        lam = lam + rho * r.detach()
        f, got_r = step(z, y, index)
        assert float(f) == pytest.approx(float((u - y).detach().square().mean()), rel=1e-12)
        np.testing.assert_allclose(got_r.numpy(), r.detach().numpy(), rtol=1e-12)
        np.testing.assert_allclose(_flat_params(net).numpy(), _flat_params(ref).numpy(),
                                   rtol=1e-11, atol=1e-14)
    assert float(lam.abs().min()) > 0


@pytest.mark.parametrize("alpha", [1.0, 0.25])
def test_kkt_step_is_the_projected_gradient_step_of_eq5(alpha):
    gen = torch.Generator().manual_seed(6)
    net = HelmholtzNet(width=3, depth=1, generator=gen, dtype=DT)
    z = torch.rand(4, 4, generator=gen, dtype=DT)
    y = torch.rand(4, generator=gen, dtype=DT)
    lr = 0.05
    names = [n for n, _ in net.named_parameters()]
    shapes = [p.shape for p in net.parameters()]
    theta = _flat_params(net)

    def at(vec):
        parts = torch.split(vec, [math.prod(s) for s in shapes])
        return {n: t.view(s) for n, t, s in zip(names, parts, shapes, strict=True)}

    def f_of(vec):
        return (functional_call(net, at(vec), (z,)) - y).square().mean()

    def c_of(vec):
        return helmholtz_residual(lambda x, **kw: functional_call(net, at(vec), (x,), kw), z)[0]

    g = jacrev(f_of)(theta).numpy()
    J = jacrev(c_of)(theta).numpy()
    C = c_of(theta).detach().numpy()
    pinv = np.linalg.pinv(J)
    want = -lr * (g - pinv @ (J @ g)) - alpha * pinv @ C  # −η⁻¹(I − J⁺J)∇f − αJ⁺C
    opt = HardSGD(net, lr=lr, rtol=1e-13, maxit=200, correction=alpha)
    f, r = make_step("kkt", net, opt, batch_size=4)(z, y, torch.arange(4))
    assert float(f) == pytest.approx(float(f_of(theta)), rel=1e-12)
    np.testing.assert_allclose(r.numpy(), C, rtol=1e-12)
    np.testing.assert_allclose((_flat_params(net) - theta).numpy(), want, rtol=1e-6,
                               atol=1e-9)


def test_soft_step_gradient_uses_one_over_batch_weight():
    gen = torch.Generator().manual_seed(3)
    net = HelmholtzNet(width=3, depth=1, generator=gen, dtype=DT)
    z = torch.rand(5, 4, generator=gen, dtype=DT)
    y = torch.rand(5, generator=gen, dtype=DT)
    r, u = helmholtz_residual(net, z)
    loss = (u - y).square().mean() + r.square().sum() / 5  # λ = 1/B
    want = torch.autograd.grad(loss, list(net.parameters()))
    opt = torch.optim.SGD(net.parameters(), lr=1.0)
    before = [p.detach().clone() for p in net.parameters()]
    make_step("soft", net, opt, batch_size=5)(z, y, torch.arange(5))
    for b, p, g in zip(before, net.parameters(), want, strict=True):
        np.testing.assert_allclose((b - p.detach()).numpy(), g.numpy(), rtol=1e-10, atol=1e-14)


def _tiny(**kw):
    base = {"epochs": 2, "waves_per_axis": 2, "points": 10, "batch_size": 20, "width": 4,
            "depth": 2, "test_points": 201, "projection_points": 6, "projection_batch": 3,
            "projection_max_steps": 6, "projection_check_every": 2, "dtype": "float64"}
    return HelmholtzConfig(**{**base, **kw})


def _without_seconds(obj):
    if isinstance(obj, dict):
        return {k: _without_seconds(v) for k, v in obj.items() if k != "seconds"}
    if isinstance(obj, list):
        return [_without_seconds(v) for v in obj]
    return obj


def test_run_helmholtz_is_deterministic_and_writes_figures(tmp_path):
    cfg = _tiny(methods=METHODS)
    assert "kkt" in METHODS and "kkt" not in HelmholtzConfig().methods
    first = run_helmholtz(cfg, tmp_path / "a")
    second = run_helmholtz(cfg, None)
    for m in ("unconstrained", "soft", "lagrangian", "reduction", "full", "kkt"):
        assert first["methods"][m]["data_loss"] == second["methods"][m]["data_loss"]
        assert first["methods"][m]["test_prediction"] == second["methods"][m]["test_prediction"]
        assert len(first["methods"][m]["data_loss"]) == 2
        assert len(first["methods"][m]["test_prediction"]) == 101  # thinned from 201
    assert first["curve_points"] == 101 and len(first["test_x"]) == 101
    assert first["test_x"][0] == -1.0 and first["test_x"][-1] == 1.0
    assert first["test_x"][1] == pytest.approx(-0.98, abs=1e-6)  # every other of 201 points
    proj = first["methods"]["projection"]
    assert proj["shares_training_with"] == "unconstrained"
    assert [p["epoch"] for p in proj["projection"]] == [1, 2]
    after = proj["projection"][-1]["after"]
    assert after["steps"] <= 6 and after["history"][0][0] == 0
    assert set(proj["keep_data"]) == {"penalty", "constraint"}
    assert _without_seconds(proj) == _without_seconds(second["methods"]["projection"])
    names = {p.split("/")[-1] for p in first["figures"]}
    assert {"helmholtz_fig10_curves.png", "helmholtz_fig11_test.png",
            "helmholtz_fig12_projection.png", "helmholtz_fig14_projection_path.png"} <= names
    assert all((tmp_path / "a" / n).stat().st_size > 1000 for n in names)
    json.dumps(first)  # JSON-ready


def test_config_rejects_bad_values():
    with pytest.raises(ValueError, match="methods must be a non-empty subset"):
        HelmholtzConfig(methods=("hard",))
    with pytest.raises(ValueError, match="epochs must be an int >= 1"):
        HelmholtzConfig(epochs=0)
    with pytest.raises(ValueError, match="optimizer must be 'adam' or 'sgd'"):
        HelmholtzConfig(optimizer="lbfgs")
    with pytest.raises(ValueError, match="keep_data must hold"):
        HelmholtzConfig(keep_data=("all",))
    with pytest.raises(ValueError, match="lagrangian_rho must be None or a finite number > 0"):
        HelmholtzConfig(lagrangian_rho=0.0)
    with pytest.raises(ValueError, match=r"kkt_correction must be a number in \(0, 1\]"):
        HelmholtzConfig(kkt_correction=1.5)
    with pytest.raises(ValueError, match=r"kkt_rtol must be a number in \[0, 1\)"):
        HelmholtzConfig(kkt_rtol=-1.0)
    with pytest.raises(ValueError, match="waves_per_axis must be an int >= 1"):
        make_data(0)
    with pytest.raises(ValueError, match="points must be an int >= 2"):
        sine_wave(1)


def test_cli_timing_json_shape(tmp_path, capsys):
    path = tmp_path / "t.json"
    rc = main(["helmholtz", "--timing", "--json", str(path), "--out", str(tmp_path / "fig"),
               "--batch-size", "6", "--width", "3", "--timing-batch-sizes", "4",
               "--timing-widths", "2", "--timing-constraints", "2", "--timing-steps", "1",
               "--timing-repeats", "2", "--no-progress"])
    assert rc == 0
    data = json.loads(path.read_text())
    assert set(data["methods"]) == {"unconstrained", "soft", "reduction", "full", "lagrangian",
                                    "kkt"}
    assert set(data["sweeps"]["batch_size"]["methods"]) == {"unconstrained", "soft",
                                                            "reduction", "full"}
    for rec in data["methods"].values():
        assert rec["seconds_per_iter"] > 0 and math.isfinite(rec["seconds_per_iter"])
        assert len(rec["samples"]) == 4
    assert data["methods"]["unconstrained"]["ratio_to_unconstrained"] == 1.0
    assert data["setting"]["batch_size"] == 6 and data["setting"]["parameters"] == 79
    assert data["sweeps"]["constraints"]["values"] == [2]
    assert data["sweeps"]["parameters"]["values"] == [parameter_count(2)]
    assert "reduction" in capsys.readouterr().out
    assert main(["helmholtz", "--timing", "--timing-widths", "a,b", "--no-progress"]) == 2
