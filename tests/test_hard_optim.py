"""Tests of the torch.optim-style shells in ccnn.hard.optim (HardSGD, HardAdam, HardGaussNewton)."""

from __future__ import annotations

import copy
import re

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn import functional as F

from ccnn.hard.kkt import kkt_step
from ccnn.hard.optim import HardAdam, HardGaussNewton, HardSGD, TargetCorrection

F64 = torch.float64


def randn(g: torch.Generator, *shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=g, dtype=F64)


def mlp(seed: int) -> nn.Module:
    """3→5→4 tanh MLP in float64 with parameters drawn from a seeded generator."""
    g = torch.Generator().manual_seed(seed)
    model = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 4)).to(F64)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(randn(g, *p.shape))
    return model


def data(seed: int):
    g = torch.Generator().manual_seed(100 + seed)
    return randn(g, 6, 3), randn(g, 6, 4), randn(g, 3, 3)


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.named_parameters()}


# ---- the shells do what kkt_step does ----------------------------------------------------------


def problem_fns(x, y, xc):
    """loss(net), residuals(net), constraints(net) of the small MLP problem."""

    def loss(net):
        return F.mse_loss(net(x), y)

    def residuals(net):
        return net(x) - y

    def constraints(net):
        o = net(xc)
        return torch.stack([o[:, 0] - o[:, 1], o.sum(1) - 1])

    return loss, residuals, constraints


def at_params(model: nn.Module, fn):
    """``fn(net)`` as a function of a parameter dict, written independently of ccnn.hard.optim."""
    return lambda p: fn(lambda *a: torch.func.functional_call(model, p, a))


@pytest.mark.parametrize("block", [{}, {"correction": 0.5, "regularization": 0.1}])
@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("kind", ["sgd", "adam", "adam-euclidean", "gauss-newton"])
def test_step_applies_kkt_step_delta(kind: str, seed: int, block: dict) -> None:
    """Two steps each: the parameters move by kkt_step's delta at the same point (and Adam's
    state carries over as kkt_step's state dict does); correction, regularization and Adam's
    metric reach kkt_step."""
    model = mlp(seed)
    loss, residuals, constraints = problem_fns(*data(seed))
    L, R, C = (at_params(model, f) for f in (loss, residuals, constraints))
    if kind == "adam-euclidean":
        kind, block = "adam", {**block, "metric": "euclidean"}
    if kind == "sgd":
        opt = HardSGD(model, lr=0.05, rtol=1e-10, **block)
    elif kind == "adam":
        opt = HardAdam(model, lr=0.05, rtol=1e-10, **block)
    else:
        opt = HardGaussNewton(model, damping=0.5, rtol=1e-10, **block)
    state: dict = {}
    for _ in range(2):
        params = snapshot(model)
        if kind == "gauss-newton":
            ref = kkt_step(params, None, C, eta=0.5, method=kind, residuals=R, rtol=1e-10,
                           **block)
            result = opt.step(residuals, constraints)
        else:
            ref = kkt_step(params, L, C, eta=20.0, method=kind, state=state, rtol=1e-10,
                           **block)
            result = opt.step(loss, constraints)
        for name, p in model.named_parameters():
            torch.testing.assert_close(p.detach(), params[name] + ref.delta[name], rtol=0, atol=0)
            torch.testing.assert_close(result.delta[name], ref.delta[name], rtol=0, atol=0)
        torch.testing.assert_close(result.multipliers, ref.multipliers, rtol=0, atol=0)
        assert result.loss_value == ref.loss_value


@pytest.mark.parametrize("metric", ["diagonal", "euclidean"])
def test_hard_adam_without_constraints_is_torch_adam(metric: str) -> None:
    """bias_correction="adam", no constraints (None, an empty residual tensor, then C ≡ 0 with
    J ≡ 0): the same iterates as torch.optim.Adam with the same lr, betas and eps, six steps,
    in either metric."""
    model = mlp(2)
    twin = copy.deepcopy(model)
    x, y, _ = data(2)
    opt = HardAdam(model, lr=0.03, betas=(0.8, 0.99), eps=1e-6, bias_correction="adam",
                   metric=metric)
    adam = torch.optim.Adam(twin.parameters(), lr=0.03, betas=(0.8, 0.99), eps=1e-6)
    no_rows = [None, None, lambda net: net(x)[:, :0], lambda net: net(x)[:, :0]]
    zero_rows = [lambda net: 0.0 * net(x)[:, 0]] * 2  # 6 rows, C ≡ 0 and J ≡ 0
    for i, constraints in enumerate(no_rows + zero_rows):
        result = opt.step(lambda net: F.mse_loss(net(x), y), constraints)
        adam.zero_grad()
        F.mse_loss(twin(x), y).backward()
        adam.step()
        for p, q in zip(model.parameters(), twin.parameters(), strict=True):
            torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-14)
        assert result.multipliers.numel() == (0 if i < 4 else 6)
        assert not result.multipliers.any()
    assert opt.state[model[0].weight]["step"] == 6


def test_state_dict_round_trip_resumes_exactly() -> None:
    """HardAdam (m, v, t per parameter; either metric) and HardSGD: state_dict → load_state_dict
    into a fresh optimizer on a copied model; both continue with bit-identical parameters."""
    loss, _, constraints = problem_fns(*data(3))
    for make in (
        lambda m: HardAdam(m, lr=0.02, betas=(0.85, 0.995), rtol=1e-10),
        lambda m: HardAdam(m, lr=0.02, rtol=1e-10, bias_correction="adam", metric="euclidean"),
        lambda m: HardSGD(m, lr=0.03, rtol=1e-10),
    ):
        model = mlp(3)
        opt = make(model)
        for _ in range(2):
            opt.step(loss, constraints)
        sd = opt.state_dict()
        twin = copy.deepcopy(model)
        opt2 = type(opt)(twin, lr=1.0)  # hyper-parameters come back from the state dict
        opt2.load_state_dict(sd)
        assert opt2.param_groups[0]["lr"] == opt.param_groups[0]["lr"]
        if isinstance(opt, HardAdam):
            for key in ("betas", "metric", "bias_correction"):
                assert opt2.param_groups[0][key] == opt.param_groups[0][key]
            st = opt2.state[twin[0].weight]
            assert st["step"] == 2
            torch.testing.assert_close(
                st["exp_avg"], opt.state[model[0].weight]["exp_avg"], rtol=0, atol=0
            )
        for _ in range(3):
            opt.step(loss, constraints)
            opt2.step(loss, constraints)
        for p, q in zip(model.parameters(), twin.parameters(), strict=True):
            assert torch.equal(p, q)


def test_state_dict_from_before_the_metric_option_loads_as_diagonal() -> None:
    """A HardAdam state dict without "metric" (written before the option existed) resumes as
    Eq. 12's diagonal metric, whatever the loading optimizer was built with."""
    loss, _, constraints = problem_fns(*data(4))
    model = mlp(4)
    opt = HardAdam(model, lr=0.02, rtol=1e-10)
    opt.step(loss, constraints)
    sd = opt.state_dict()
    del sd["param_groups"][0]["metric"]
    twin = copy.deepcopy(model)
    opt2 = HardAdam(twin, lr=0.02, rtol=1e-10, metric="euclidean")
    opt2.load_state_dict(sd)
    for _ in range(2):
        opt.step(loss, constraints)
        opt2.step(loss, constraints)
    for p, q in zip(model.parameters(), twin.parameters(), strict=True):
        assert torch.equal(p, q)


def test_toy_constrained_least_squares() -> None:
    """A linear model 3→2 fit to 12 points (mean squared error) while its two outputs sum to 1
    at 4 points (4 linear equality constraints on 8 parameters). The answer of
    min ‖Mθ − y‖² s.t. Aθ = 1 comes from NumPy's dense KKT solve; HardSGD (60 steps) and
    HardGaussNewton (5 steps) reach it and keep the constraints to 1e-8."""
    g = torch.Generator().manual_seed(5)
    x, y, xc = randn(g, 12, 3), randn(g, 12, 2), randn(g, 4, 3)
    xn, xcn = x.numpy(), xc.numpy()
    M = np.zeros((24, 8))  # θ = (W row-major, b); out[i, k] = W[k]·x[i] + b[k]
    for i in range(12):
        for k in range(2):
            M[2 * i + k, 3 * k : 3 * k + 3], M[2 * i + k, 6 + k] = xn[i], 1.0
    A = np.zeros((4, 8))
    for j in range(4):
        for k in range(2):
            A[j, 3 * k : 3 * k + 3], A[j, 6 + k] = xcn[j], 1.0
    K = np.block([[M.T @ M, A.T], [A, np.zeros((4, 4))]])
    theta = np.linalg.solve(K, np.concatenate([M.T @ y.numpy().reshape(-1), np.ones(4)]))[:8]

    def constraints(net):
        return net(xc).sum(dim=1) - 1

    for kind, steps in (("sgd", 60), ("gauss-newton", 5)):
        model = nn.Linear(3, 2).to(F64)
        if kind == "sgd":
            opt = HardSGD(model, lr=1.2, rtol=1e-12)
            for _ in range(steps):
                result = opt.step(lambda net: F.mse_loss(net(x), y), constraints)
        else:
            opt = HardGaussNewton(model, damping=1e-6, rtol=1e-12)
            for _ in range(steps):
                result = opt.step(lambda net: net(x) - y, constraints)
        got = torch.cat([model.weight.detach().reshape(-1), model.bias.detach()]).numpy()
        np.testing.assert_allclose(got, theta, rtol=0, atol=1e-8)
        assert float(constraints(model).detach().abs().max()) < 1e-8
        assert float(result.constraint_values.abs().max()) < 1e-8


@pytest.mark.parametrize("cls", [HardSGD, HardAdam, HardGaussNewton])
def test_deepcopy_gives_a_working_optimizer_of_the_copied_model(cls: type) -> None:
    """copy.deepcopy of a model and its optimizer together: the copy steps the copied model
    exactly as the original steps the original."""
    import copy

    model = mlp(0)
    opt = cls(model, rtol=1e-10)
    loss, residuals, constraints = problem_fns(*data(0))
    first = residuals if cls is HardGaussNewton else loss
    opt.step(first, constraints)
    model2, opt2 = copy.deepcopy((model, opt))
    opt.step(first, constraints)
    opt2.step(first, constraints)
    for p, q in zip(model.parameters(), model2.parameters(), strict=True):
        assert p is not q
        torch.testing.assert_close(p, q, rtol=0, atol=0)


def test_frozen_parameters_and_buffers() -> None:
    """Only parameters that require grad move; buffers and frozen parameters are used as they
    are (the frozen first bias stays, the buffer scales the input)."""

    class Scaled(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(2, 2).to(F64)
            self.register_buffer("scale", torch.tensor([2.0, -1.0], dtype=F64))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.lin(x * self.scale)

    model = Scaled()
    model.lin.bias.requires_grad_(False)
    bias = model.lin.bias.detach().clone()
    xc = torch.tensor([[1.0, 1.0]], dtype=F64)
    opt = HardSGD(model, lr=0.1, rtol=1e-12)
    assert opt._names == ["lin.weight"]
    result = opt.step(lambda net: net(xc).pow(2).sum(), lambda net: net(xc)[:, 0] - 3.0)
    assert list(result.delta) == ["lin.weight"]
    assert torch.equal(model.lin.bias, bias)
    # linear in the weight: one step puts output 0 on the constraint, through the buffer
    assert float(model(xc)[0, 0].detach()) == pytest.approx(3.0, abs=1e-12)


def test_gauss_newton_reports_loss_and_inequalities_pass_through() -> None:
    model = mlp(4)
    x, y, xc = data(4)
    loss, residuals, constraints = problem_fns(x, y, xc)
    expected = float(loss(model).detach())
    opt = HardGaussNewton(model, damping=1.0)
    result = opt.step(residuals, constraints, loss=loss)
    assert result.loss_value == pytest.approx(expected, rel=1e-14)
    r = (model(x) - y).detach()
    result = opt.step(residuals, lambda net: constraints(net) - 1e3, inequality=True)
    assert result.loss_value == pytest.approx(0.5 * float(r.pow(2).sum()), rel=1e-14)
    assert not result.active.any() and torch.equal(result.multipliers, torch.zeros(6, dtype=F64))


def test_lr_scheduler_changes_eta() -> None:
    """η = 1/lr is read at every step, so a scheduler's new lr is used."""
    model = mlp(5)
    loss, _, constraints = problem_fns(*data(5))
    opt = HardSGD(model, lr=0.1, rtol=1e-10)
    scheduler = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    opt.step(loss, constraints)
    scheduler.step()
    params = snapshot(model)
    ref = kkt_step(
        params, at_params(model, loss), at_params(model, constraints), eta=20.0, rtol=1e-10
    )
    result = opt.step(loss, constraints)
    for name in params:
        torch.testing.assert_close(result.delta[name], ref.delta[name], rtol=0, atol=0)


def test_hyper_parameter_errors() -> None:
    model = mlp(0)
    with pytest.raises(ValueError, match="Invalid learning rate: 0"):
        HardSGD(model, lr=0)
    with pytest.raises(ValueError, match=re.escape("Invalid learning rate: -0.001")):
        HardAdam(model, lr=-1e-3)
    with pytest.raises(ValueError, match="Invalid learning rate: nan"):
        HardSGD(model, lr=float("nan"))
    with pytest.raises(ValueError, match=re.escape("Invalid beta parameter at index 1: 1.0")):
        HardAdam(model, betas=(0.9, 1.0))
    with pytest.raises(ValueError, match=re.escape("Invalid beta parameter at index 0: -0.1")):
        HardAdam(model, betas=(-0.1, 0.9))
    with pytest.raises(ValueError, match="Invalid betas"):
        HardAdam(model, betas=0.9)
    with pytest.raises(ValueError, match=re.escape("Invalid epsilon value: 0.0")):
        HardAdam(model, eps=0.0)
    with pytest.raises(ValueError, match="Invalid bias_correction"):
        HardAdam(model, bias_correction="kingma")
    with pytest.raises(ValueError, match="Invalid metric"):
        HardAdam(model, metric="riemannian")
    with pytest.raises(ValueError, match=re.escape("Invalid damping: 0.0")):
        HardGaussNewton(model, damping=0.0)
    with pytest.raises(ValueError, match="Invalid rtol"):
        HardSGD(model, rtol=-1.0)
    with pytest.raises(ValueError, match="Invalid maxit"):
        HardGaussNewton(model, maxit=-3)
    with pytest.raises(ValueError, match=re.escape("Invalid correction (must be in (0, 1]): 2")):
        HardSGD(model, correction=2)
    with pytest.raises(ValueError, match="Invalid regularization"):
        HardAdam(model, regularization=float("inf"))
    with pytest.raises(ValueError, match=re.escape("model must be a torch.nn.Module")):
        HardSGD(list(model.parameters()))
    frozen = nn.Linear(2, 2).requires_grad_(False)
    with pytest.raises(ValueError, match="model has no parameters that require grad"):
        HardSGD(frozen)
    opt = HardSGD(model)
    with pytest.raises(ValueError, match="one parameter group"):
        opt.add_param_group({"params": [nn.Parameter(torch.zeros(1))]})


# ---- the correction switched by a measured violation ---------------------------------------


def test_target_correction_switches_by_the_measured_violation() -> None:
    """high (the correction the optimizer was made with) while the violation is above the
    target, low at or below it, high again when it rises; a relative target is a share of the
    first violation; every value is set in the group the next step reads."""
    opt = HardSGD(mlp(0), lr=0.1, correction=0.6)
    switch = TargetCorrection(opt, 0.5, low=0.2)
    assert [switch.step(v) for v in (3.0, 0.5, 0.1, 0.7, 0.0)] == [0.6, 0.2, 0.2, 0.6, 0.2]
    assert opt.param_groups[0]["correction"] == 0.2
    opt = HardAdam(mlp(0), correction=0.8)
    switch = TargetCorrection(opt, 0.1, low=0.3, relative=True)
    assert switch.threshold is None
    assert [switch.step(v) for v in (4.0, 0.5, 0.4, 0.41, 2.0)] == [0.8, 0.8, 0.3, 0.8, 0.8]
    assert switch.threshold == pytest.approx(0.4)


def test_target_correction_warms_up() -> None:
    """With warmup W the k-th call caps α at high·(k + 1)/W, under the switch too (low below
    the cap wins); target None never switches; the position survives state_dict."""
    opt = HardSGD(mlp(0), lr=0.1, correction=0.8)
    switch = TargetCorrection(opt, 0.5, low=0.3, warmup=4)
    values = [switch.step(v) for v in (3.0, 0.1, 3.0, 0.1, 3.0, 0.1)]
    assert values == pytest.approx([0.2, 0.3, 0.6, 0.3, 0.8, 0.3])
    switch = TargetCorrection(HardSGD(mlp(0), correction=0.8), None, low=0.3, warmup=2)
    assert [switch.step(v) for v in (3.0, 0.0, 0.0)] == pytest.approx([0.4, 0.8, 0.8])
    switch = TargetCorrection(HardSGD(mlp(0), correction=0.8), None, low=0.3, warmup=5)
    switch.step(1.0)
    restored = TargetCorrection(HardSGD(mlp(0), correction=0.8), None, low=0.3)
    restored.load_state_dict(switch.state_dict())
    assert restored.step(1.0) == pytest.approx(0.8 * 2 / 5)
    old = {k: v for k, v in switch.state_dict().items() if k not in ("warmup", "calls")}
    restored.load_state_dict(old)  # written before the warm-up existed: none
    assert (restored.warmup, restored.calls, restored.step(1.0)) == (0, 0, 0.8)
    with pytest.raises(ValueError, match=re.escape("Invalid warmup (must be an int >= 0): -1")):
        TargetCorrection(opt, None, low=0.3, warmup=-1)


def test_target_correction_sets_the_share_the_next_step_removes() -> None:
    """After the switch the step removes the share ``low`` of the linearized violation:
    C + J·dw = (1 − low)·C, with J·dw by forward-mode AD (independent of the solver)."""
    model = mlp(1)
    loss, _, constraints = problem_fns(*data(1))
    opt = HardSGD(model, lr=0.05, rtol=1e-13, correction=0.9)
    switch = TargetCorrection(opt, 1e9, low=0.25)  # any violation reaches it
    switch.step(1.0)
    w = snapshot(model)
    C = at_params(model, constraints)(w)
    opt.step(loss, constraints)
    dw = {k: v.detach() - w[k] for k, v in model.named_parameters()}
    _, J_dw = torch.func.jvp(at_params(model, constraints), (w,), (dw,))
    torch.testing.assert_close(C + J_dw, 0.75 * C, rtol=0, atol=1e-10)


def test_target_correction_state_dict_and_errors() -> None:
    opt = HardSGD(mlp(0), correction=0.5)
    switch = TargetCorrection(opt, 0.2, low=0.1, relative=True)
    switch.step(2.0)
    restored = TargetCorrection(HardSGD(mlp(0), correction=0.5), 0.9, low=0.9)
    restored.load_state_dict(switch.state_dict())
    assert restored.state_dict() == {"target": 0.2, "low": 0.1, "relative": True, "high": [0.5],
                                     "threshold": pytest.approx(0.4), "warmup": 0, "calls": 1}
    assert restored.step(0.3) == 0.1 and restored.step(0.5) == 0.5
    with pytest.raises(ValueError, match="optimizer must be HardSGD, HardAdam or HardGaussNewton"):
        TargetCorrection(torch.optim.SGD(mlp(0).parameters(), lr=0.1), 0.1, low=0.1)
    with pytest.raises(ValueError,
                       match=re.escape("Invalid target (must be None, or finite and > 0): 0")):
        TargetCorrection(opt, 0, low=0.1)
    with pytest.raises(ValueError, match=re.escape("Invalid low (must be in (0, 1]): 1.5")):
        TargetCorrection(opt, 0.1, low=1.5)
    with pytest.raises(ValueError, match=re.escape("Invalid violation (must be finite and >= 0)")):
        switch.step(float("nan"))
    with pytest.raises(ValueError, match=re.escape("Invalid violation (must be finite and >= 0)")):
        switch.step(-1.0)


def test_an_lr_scheduler_drives_the_data_part_of_the_step_not_the_correction() -> None:
    """A ``torch.optim.lr_scheduler`` sets a hard optimizer's ``lr``: after StepLR halves it the
    unconstrained step is −(lr/2)·∇R (autograd's gradient), and with constraints the step
    still meets the linearized constraints (J·dw = −C, J from ``jacrev``), the correction not
    depending on the rate."""
    model = mlp(3)
    x, y, xc = data(3)
    loss, _, constraints = problem_fns(x, y, xc)
    opt = HardSGD(model, lr=0.1, rtol=1e-12)
    schedule = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    opt.step(loss)
    schedule.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.05)
    before = snapshot(model)
    grads = torch.autograd.grad(loss(model), list(model.parameters()))
    opt.step(loss)
    for (name, p), g in zip(model.named_parameters(), grads, strict=True):
        torch.testing.assert_close(p - before[name], -0.05 * g, rtol=1e-10, atol=1e-12)
    schedule.step()
    params = snapshot(model)
    C0 = constraints(lambda inp: torch.func.functional_call(model, params, (inp,)))
    J = torch.func.jacrev(lambda w: constraints(
        lambda inp: torch.func.functional_call(model, w, (inp,))))(params)
    opt.step(loss, constraints)
    J_dw = sum((J[k].reshape(C0.numel(), -1) @ (p.detach() - params[k]).reshape(-1))
               for k, p in model.named_parameters())
    torch.testing.assert_close(J_dw, -C0.detach().reshape(-1), rtol=1e-8, atol=1e-10)
