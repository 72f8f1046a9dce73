"""The hard-constraint optimizers and Tanabe's method under DistributedDataParallel (DDP): two gloo
processes on the CPU, each with its half of a global batch, take the steps one process takes on
the whole batch, and keep the same weights.

Every case is a function of (``wrap``, the batch this process sees, the process group or None),
where ``wrap(module)`` is the model to train: the two spawned processes run all cases once on
their shards with ``wrap = DistributedDataParallel`` (one spawn for the module, results through
files), and this process runs them on the whole batch with the module itself as the reference.
The samples are split in contiguous halves, so the global constraint vector (rank order) is the
whole batch's, multipliers included.
"""

from __future__ import annotations

import datetime
import math
import os
import re
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import Tensor, nn
from torch.func import functional_call

from ccnn.hard.kkt import kkt_step
from ccnn.hard.optim import HardAdam, HardGaussNewton, HardSGD
from ccnn.hard.tanabe import Tanabe
from ccnn.helmholtz import HelmholtzNet

WORLD = 2
BATCH = 8  # global batch: 4 samples per process
DT = torch.float64
# o₀ − t ≤ 0 with t = o₀(w₀) + SHIFT: violated (SHIFT < 0) on 3 of process 0's samples and on 1
# of process 1's at the start, so the processes have different numbers of active rows
SHIFT = torch.tensor([-0.3, -0.3, -0.3, 0.3, -0.3, 0.3, 0.3, 0.3], dtype=DT)
# the constraint-only points of the reduction version: 3 on process 0, 5 on process 1
COLLOCATION_SPLIT = (3, 5)

Result = dict[str, Tensor]
Wrap = Callable[[nn.Module], nn.Module]


def _model() -> nn.Module:
    """A 2→6→3 tanh MLP in float64 (39 parameters), the same on every process."""
    torch.manual_seed(0)  # tests only: the same initial weights everywhere
    return nn.Sequential(nn.Linear(2, 6), nn.Tanh(), nn.Linear(6, 3)).double()


def _data() -> dict[str, Tensor]:
    """The global batch: inputs, targets, the inequality thresholds and collocation points."""
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(BATCH, 2, generator=gen, dtype=DT)
    y = 0.3 * torch.randn(BATCH, 3, generator=gen, dtype=DT)
    xc = torch.randn(sum(COLLOCATION_SPLIT), 2, generator=gen, dtype=DT)
    with torch.no_grad():
        t = _model()(x)[:, 0] + SHIFT
    z = torch.rand(BATCH, 4, generator=gen, dtype=DT) * 2 - 1  # Helmholtz inputs (x, A, k, φ)
    v = 0.5 * torch.rand(BATCH, generator=gen, dtype=DT)
    return {"x": x, "y": y, "t": t, "xc": xc, "index": torch.arange(BATCH), "z": z, "v": v}


def _helmholtz() -> nn.Module:
    """A HelmholtzNet of width 3 and depth 1 (float64): it takes parameter copies, for
    Tanabe's ``batched_params``."""
    return HelmholtzNet(width=3, depth=1, generator=torch.Generator().manual_seed(2), dtype=DT)


def _shard(data: dict[str, Tensor], rank: int) -> dict[str, Tensor]:
    """Process ``rank``'s contiguous half of every tensor (the collocation points split 3/5)."""
    out = {}
    for key, value in data.items():
        if key == "xc":
            start = sum(COLLOCATION_SPLIT[:rank])
            out[key] = value[start:start + COLLOCATION_SPLIT[rank]]
        else:
            per = value.shape[0] // WORLD
            out[key] = value[rank * per:(rank + 1) * per]
    return out


def _weights(model: nn.Module) -> Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()]).clone()


def _equalities(out: Tensor, x: Tensor) -> Tensor:
    """Two equalities per sample, sample-major: the outputs sum to 1, and o₀ = x₀/2."""
    return torch.stack([out.sum(1) - 1.0, out[:, 0] - 0.5 * x[:, 0]], 1).reshape(-1)


def _loss(d: dict[str, Tensor]) -> Callable:
    return lambda net: (net(d["x"]) - d["y"]).square().mean()


# ---- the cases: (model, this process's batch, group or None) -> results -----------------------


def case_sgd_equalities(wrap: Wrap, d: dict[str, Tensor], group) -> Result:
    """HardSGD, reduced system, 3 steps with two equalities per sample."""
    model = wrap(_model())
    opt = HardSGD(model, lr=0.5, rtol=1e-12)
    for _ in range(3):
        step = opt.step(_loss(d), lambda net: _equalities(net(d["x"]), d["x"]))
    return {"w": _weights(model), "lam": step.multipliers, "c": step.constraint_values,
            "loss": torch.tensor(step.loss_value)}


def case_sgd_mixed_inequalities(wrap: Wrap, d: dict[str, Tensor], group) -> Result:
    """HardSGD with an equality and an inequality per sample (a bool mask): 7 active rows on
    process 0 and 5 on process 1 at the first step."""
    model = wrap(_model())
    opt = HardSGD(model, lr=0.5, rtol=1e-12)
    n = d["x"].shape[0]
    mask = torch.tensor([False, True]).repeat(n)

    def constraints(net):
        out = net(d["x"])
        return torch.stack([out.sum(1) - 1.0, out[:, 0] - d["t"]], 1).reshape(-1)

    first = opt.step(_loss(d), constraints, inequality=mask)
    step = opt.step(_loss(d), constraints, inequality=mask)
    return {"w": _weights(model), "lam": step.multipliers, "active": step.active,
            "first_active": first.active, "mine": _mine(first)}


def _mine(step) -> Tensor:
    """This process's number of active rows and its part of the global rows."""
    shard = step.shard or slice(0, step.active.numel())
    return torch.tensor([int(step.active[shard].sum()), shard.start, shard.stop])


def case_kkt_full_inequalities(wrap: Wrap, d: dict[str, Tensor], group) -> Result:
    """The functional kkt_step with ``process_group``, the full (saddle-point) system, sgd,
    inequalities only: process 1 starts with a single active row."""
    model = wrap(_model())
    params = {k: v.detach().clone() for k, v in model.named_parameters()}

    def loss(p):
        return (functional_call(model, p, (d["x"],)) - d["y"]).square().mean()

    def constraints(p):
        return functional_call(model, p, (d["x"],))[:, 0] - d["t"]

    steps = []
    for _ in range(2):
        steps.append(kkt_step(params, loss, constraints, eta=2.0, system="full",
                              inequality=True, rtol=1e-12, process_group=group))
        params = {k: v + steps[-1].delta[k] for k, v in params.items()}
    return {"w": torch.cat([v.reshape(-1) for v in params.values()]),
            "lam": steps[-1].multipliers, "c": steps[0].constraint_values,
            "mine": _mine(steps[0])}


def case_adam(wrap: Wrap, d: dict[str, Tensor], group) -> Result:
    """HardAdam (Eq. 12), 3 steps: the moments come from the global gradient."""
    model = wrap(_model())
    opt = HardAdam(model, lr=0.05, rtol=1e-12)
    for _ in range(3):
        step = opt.step(_loss(d), lambda net: _equalities(net(d["x"]), d["x"]))
    states = [opt.state[p] for p in opt.param_groups[0]["params"]]
    return {"w": _weights(model), "lam": step.multipliers,
            "m": torch.cat([s["exp_avg"].reshape(-1) for s in states]),
            "v": torch.cat([s["exp_avg_sq"].reshape(-1) for s in states]),
            "t": torch.tensor(states[0]["step"])}


def case_gauss_newton(wrap: Wrap, d: dict[str, Tensor], group) -> Result:
    """HardGaussNewton, 2 steps: ``r`` scaled by ``1/√(local batch · 3)``, so ``½‖r‖²`` is half
    the mean squared error of the shard and the processes' mean is the whole batch's."""
    model = wrap(_model())
    opt = HardGaussNewton(model, damping=0.5, rtol=1e-12)

    def residuals(net):
        return (net(d["x"]) - d["y"]).reshape(-1) / math.sqrt(d["x"].shape[0] * 3)

    for _ in range(2):
        step = opt.step(residuals, lambda net: _equalities(net(d["x"]), d["x"]))
    return {"w": _weights(model), "lam": step.multipliers,
            "loss": torch.tensor(step.loss_value)}


def _tanabe_fn(net, x, y):
    out = net(x)
    return (out - y).square().mean(1), torch.stack([out.sum(1) - 1.0, out[:, 0] - 0.5 * x[:, 0]],
                                                   1)


def _tanabe_run(model: nn.Module, d: dict[str, Tensor], fn: Callable, steps: int = 2,
                with_index: bool = False, inputs: tuple[str, str] = ("x", "y"), **options
                ) -> Result:
    """``steps`` SGD steps (lr 0.2) on Tanabe's loss; the weights and the last step."""
    tanabe = Tanabe(model, rtol=1e-12, **options)
    opt = torch.optim.SGD(model.parameters(), lr=0.2)
    start = _weights(model)
    for _ in range(steps):
        opt.zero_grad()
        step = tanabe(fn, *(d[k] for k in inputs), index=d["index"] if with_index else None)
        step.loss.backward()
        opt.step()
    out = {"w": _weights(model), "w0": start, "lam": step.lam, "g": step.g, "grad": step.grad,
           "loss": step.loss.detach(), "f": step.f}
    if step.reduced is not None:
        out["reduced"] = step.reduced
    return out


def case_tanabe_batch_dense(wrap: Wrap, d: dict[str, Tensor], group) -> Result:
    """Full version, batch coupling, dense solver (16 unknowns)."""
    return _tanabe_run(wrap(_model()), d, _tanabe_fn, version="full", coupling="batch")


def case_tanabe_batch_minres(wrap: Wrap, d: dict[str, Tensor], group) -> Result:
    """Full version, batch coupling, MINRES-QLP warm-started from a pool indexed by sample."""
    return _tanabe_run(wrap(_model()), d, _tanabe_fn, steps=3, with_index=True, version="full",
                       coupling="batch", solver="minres_qlp", pool_size=BATCH)


def case_tanabe_sample_dense(wrap: Wrap, d: dict[str, Tensor], group) -> Result:
    """Full version, per-sample systems (Eq. 5 as printed), dense solver."""
    return _tanabe_run(wrap(_model()), d, _tanabe_fn, version="full", coupling="sample")


def case_tanabe_sample_minres(wrap: Wrap, d: dict[str, Tensor], group) -> Result:
    """Full version, per-sample systems, MINRES-QLP on their block-diagonal system."""
    return _tanabe_run(wrap(_model()), d, _tanabe_fn, version="full", coupling="sample",
                       solver="minres_qlp")


def case_tanabe_reduction_mse(wrap: Wrap, d: dict[str, Tensor], group) -> Result:
    """Reduction version, mean squared residuals of two constraints on collocation points
    split 3/5 between the processes (not the batch's samples): the batch means are weighted by
    the processes' numbers of rows."""
    xc = d["xc"]

    def fn(net, x, y):
        out = net(xc)
        g = torch.stack([out.sum(1) - 1.0, out[:, 0] - 0.5 * xc[:, 0]], 1)
        return (net(x) - y).square().mean(1), g

    return _tanabe_run(wrap(_model()), d, fn, version="reduction", reduction="mse")


def case_tanabe_reduction_huber(wrap: Wrap, d: dict[str, Tensor], group) -> Result:
    """Reduction version, one Huber-reduced constraint (the scalar multiplier)."""
    def fn(net, x, y):
        out = net(x)
        return (out - y).square().mean(1), out.sum(1) - 1.0

    return _tanabe_run(wrap(_model()), d, fn, version="reduction", reduction="huber",
                       huber_delta=0.5)


def _helmholtz_fn(net, z, v):
    u = net(z)
    return (u - v).square(), u - 0.3 * z[:, 0]


def case_tanabe_batched_full(wrap: Wrap, d: dict[str, Tensor], group) -> Result:
    """Full version, batch coupling, per-sample Jacobians from parameter copies
    (``batched_params``)."""
    return _tanabe_run(wrap(_helmholtz()), d, _helmholtz_fn, inputs=("z", "v"),
                       version="full", batched_params=True)


def case_tanabe_batched_reduction(wrap: Wrap, d: dict[str, Tensor], group) -> Result:
    """Reduction version ("mse") with ``batched_params``."""
    return _tanabe_run(wrap(_helmholtz()), d, _helmholtz_fn, inputs=("z", "v"),
                       version="reduction", batched_params=True)


CASES = {name[len("case_"):]: fn for name, fn in sorted(globals().items())
         if name.startswith("case_")}


# ---- the two processes --------------------------------------------------------------------------


def _worker(rank: int, folder: str) -> None:
    """One of the two processes: every case on its shard with a DDP model; the results, and
    the error messages of a refused configuration and of non-finite constraints, saved to
    ``folder/rank{rank}.pt``."""
    torch.set_num_threads(1)
    store = dist.FileStore(os.path.join(folder, "store"), WORLD)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=WORLD,
                            timeout=datetime.timedelta(seconds=120))
    try:
        data = _shard(_data(), rank)
        results: dict[str, object] = {}
        for name, case in CASES.items():
            results[name] = case(nn.parallel.DistributedDataParallel, data, dist.group.WORLD)
        ddp = nn.parallel.DistributedDataParallel(_model())
        try:
            Tanabe(ddp, version="reduction", reduction=lambda g: g.abs().amax(0))
            results["refused"] = ""
        except ValueError as err:
            results["refused"] = str(err)
        bad = torch.tensor(math.nan if rank == 1 else 0.0, dtype=DT)  # on process 1 only
        try:
            HardSGD(ddp).step(_loss(data), lambda net: net(data["x"])[:, 0] - 1.0 + bad)
            results["nonfinite"] = ""
        except ValueError as err:
            results["nonfinite"] = str(err)
        torch.save(results, os.path.join(folder, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> tuple[dict, list[dict]]:
    """The reference results (one process, whole batch) and each rank's (2 processes)."""
    folder = tmp_path_factory.mktemp("hard_ddp")
    saved = os.environ.get("OMP_NUM_THREADS")
    os.environ["OMP_NUM_THREADS"] = "1"  # the spawned processes inherit it
    try:
        context = mp.spawn(_worker, args=(str(folder),), nprocs=WORLD, join=False)
    finally:
        if saved is None:
            os.environ.pop("OMP_NUM_THREADS")
        else:
            os.environ["OMP_NUM_THREADS"] = saved
    data = _data()  # the reference, while the processes start
    reference = {name: case(lambda module: module, data, None) for name, case in CASES.items()}
    while not context.join(timeout=300):
        pass
    ranks = [torch.load(Path(folder) / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]
    return reference, ranks


def _close(got: Tensor, expected: Tensor, what: str) -> None:
    """``got`` equals ``expected`` to 1e-6 relative (elementwise, atol 1e-6 of the largest)."""
    atol = 1e-6 * float(expected.abs().max()) if expected.numel() else 0.0
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=atol, msg=what)


@pytest.mark.parametrize("name", sorted(CASES))
def test_sharded_steps_equal_one_process_on_the_whole_batch(runs, name):
    reference, ranks = runs
    expected = reference[name]
    start = expected.get("w0", _weights(_model()))
    assert float((expected["w"] - start).norm()) > 1e-2  # the steps move the weights
    for rank, results in enumerate(ranks):
        got = results[name]
        assert got.keys() >= expected.keys() - {"mine"}
        for key, value in expected.items():
            if key == "mine":
                continue
            if value.dtype == torch.bool or key == "t":
                assert torch.equal(got[key], value), (name, key, rank)
            else:
                _close(got[key], value, f"{name}: {key} on rank {rank}")
    for key, value in ranks[0][name].items():  # the same bits on both processes
        if key != "mine":
            assert torch.equal(value, ranks[1][name][key]), (name, key)


def test_inequalities_active_on_different_numbers_of_rows_per_process(runs):
    """The mixed case: process 0 had 4 + 3 active rows, process 1 4 + 1, of 8 rows each;
    ``shard`` is each process's part of the global vectors."""
    reference, ranks = runs
    assert [r["sgd_mixed_inequalities"]["mine"].tolist() for r in ranks] == [[7, 0, 8],
                                                                            [5, 8, 16]]
    assert int(reference["sgd_mixed_inequalities"]["first_active"].sum()) == 12
    assert [r["kkt_full_inequalities"]["mine"].tolist() for r in ranks] == [[3, 0, 4],
                                                                           [1, 4, 8]]


def test_non_finite_constraints_on_one_process_raise_on_every_process(runs):
    """Checked on the gathered values, so no process is left waiting in a collective."""
    _, ranks = runs
    for results in ranks:
        assert results["nonfinite"] == ("constraints(params) returned non-finite values "
                                        "(inf or nan)")


def test_a_callable_reduction_is_refused_under_ddp(runs):
    """The error was raised (ValueError) in each process; its message names the option."""
    _, ranks = runs
    for results in ranks:
        assert re.search(r"reduction=<callable> is not supported under DistributedDataParallel",
                         results["refused"]), results["refused"]
