"""The device paths (issue 17, "GPU"): the same checks on the CPU and, where one is present, on a
CUDA device, each against an independent float64 CPU reference.

The CPU case runs everywhere, so the checks themselves are exercised on every machine; the CUDA
case skips without a GPU (and the NCCL case without two), and runs as it is when one is lent.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ccnn.hard import HardAdam, HardGaussNewton, HardSGD, Tanabe, kkt_step
from ccnn.inference import load_checkpoint
from ccnn.train import LOG, TrainConfig, train

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
DEVICES = ["cpu", pytest.param("cuda", marks=CUDA)]
F64 = torch.float64


def _mlp(device: str) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 2)).to(device, F64)


def _data(device: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return tuple(torch.randn(*shape, generator=g, dtype=F64).to(device)
                 for shape in ((6, 3), (6, 2), (4, 3)))


def _problem(x, y, xc):
    def loss(net):
        return F.mse_loss(net(x), y)

    def residuals(net):
        return (net(x) - y).flatten()

    def constraints(net):
        out = net(xc)
        return out[:, 0] + out[:, 1] - 1.0

    return loss, residuals, constraints


@pytest.mark.parametrize("device", DEVICES)
def test_kkt_step_on_device_solves_the_dense_system(device):
    """Eq. 5 of Márquez-Neila, Salzmann and Fua (2017), η·dw + Jᵀ·Λ = −∇R, J·dw = −C, against a
    NumPy solve with the Jacobian from torch.func.jacrev on the CPU."""
    model = _mlp(device)
    x, y, xc = _data(device)
    params = {k: v.detach() for k, v in model.named_parameters()}

    def call(p, inputs):
        return torch.func.functional_call(model, p, (inputs,))

    def loss(p):
        return F.mse_loss(call(p, x), y)

    def constraints(p):
        out = call(p, xc)
        return out[:, 0] + out[:, 1] - 1.0

    eta = 3.0
    step = kkt_step(params, loss, constraints, eta=eta, rtol=1e-12)
    assert all(d.device.type == device for d in step.delta.values())
    reference = _mlp("cpu")  # the same weights, on the CPU
    cpu = {k: v.detach() for k, v in reference.named_parameters()}
    x_c, y_c, xc_c = _data("cpu")

    def at(vec: torch.Tensor, inputs: torch.Tensor) -> torch.Tensor:
        p = dict(zip(cpu, _split(vec, cpu), strict=True))
        return torch.func.functional_call(reference, p, (inputs,))

    def cfun(vec: torch.Tensor) -> torch.Tensor:
        out = at(vec, xc_c)
        return out[:, 0] + out[:, 1] - 1.0

    w = torch.cat([v.flatten() for v in cpu.values()])
    g = torch.func.grad(lambda vec: F.mse_loss(at(vec, x_c), y_c))(w).numpy()
    J, C = torch.func.jacrev(cfun)(w).numpy(), cfun(w).detach().numpy()
    n, m = len(w), len(C)
    K = np.block([[eta * np.eye(n), J.T], [J, np.zeros((m, m))]])
    solution = np.linalg.solve(K, -np.concatenate([g, C]))
    delta = torch.cat([d.cpu().flatten() for d in step.delta.values()]).numpy()
    np.testing.assert_allclose(delta, solution[:n], rtol=1e-8, atol=1e-10)
    np.testing.assert_allclose(step.multipliers.cpu().numpy(), solution[n:], rtol=1e-8,
                               atol=1e-10)


def _split(vec: torch.Tensor, like: dict[str, torch.Tensor]) -> list[torch.Tensor]:
    sizes = [v.numel() for v in like.values()]
    return [p.view_as(v) for p, v in zip(vec.split(sizes), like.values(), strict=True)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("optimizer", [HardSGD, HardAdam, HardGaussNewton])
def test_hard_optimizers_on_device_match_the_cpu(device, optimizer):
    """Three steps on ``device`` equal three steps on the CPU (float64)."""
    weights = []
    for where in (device, "cpu"):
        model = _mlp(where)
        loss, residuals, constraints = _problem(*_data(where))
        opt = optimizer(model, rtol=1e-12)
        for _ in range(3):
            opt.step(residuals if optimizer is HardGaussNewton else loss, constraints)
        weights.append([p.detach().cpu() for p in model.parameters()])
    for a, b in zip(*weights, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("version", ["full", "reduction"])
def test_tanabe_on_device_matches_the_cpu(device, version):
    """Tanabe's constrained gradient (Jergensen, "Neural network optimization under PDE
    constraints", 2019, Eq. 2-6) on ``device`` equals the CPU's."""

    def per_sample(net, inputs):
        u = net(inputs)
        return (u - 1.0).square().sum(dim=1), u.sum(dim=1, keepdim=True) - inputs[:, :1]

    grads = []
    for where in (device, "cpu"):
        model = _mlp(where)
        step = Tanabe(model, version=version)(per_sample, _data(where)[0])
        step.loss.backward()
        grads.append([p.grad.cpu() for p in model.parameters()])
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("device", DEVICES)
def test_training_on_device_follows_the_cpu_run(device, tmp_path, tiny):
    """One epoch of ccnn (P-step, loss, Adam) and one of the refinement stage (its labels through
    the dense CRF) on ``device``, the final metrics with the CRF: the checkpoint loads on the
    CPU, the log records the P-step's time, and the loss, the validation mIoU and the CRF's
    mIoU follow the CPU run's (float32 convolutions differ in their last bits between devices)."""
    logs, summaries = [], []
    for where in (device, "cpu"):
        cfg = TrainConfig(method="ccnn", **{**tiny, "epochs": 1, "refine_epochs": 1, "crf": True,
                                            "device": where})
        summaries.append(train(cfg, tmp_path / where, report=False, progress_bar=False,
                               log=lambda m: None))
        logs.append([json.loads(line) for line in
                     (tmp_path / where / LOG).read_text().splitlines()])
        model = load_checkpoint(tmp_path / where / "checkpoint.pt", "cpu")[0]
        assert next(model.parameters()).device.type == "cpu"
    on_device, on_cpu = logs
    assert [r["stage"] for r in on_device] == ["train", "refine"]
    assert on_device[0]["p_seconds"] > 0 and on_device[0]["p_unconverged"] == 0
    for a, b in zip(on_device, on_cpu, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-3)
        assert a["val_miou"] == pytest.approx(b["val_miou"], abs=0.02)
    assert summaries[0]["crf"]["miou"] == pytest.approx(summaries[1]["crf"]["miou"], abs=0.02)


@pytest.mark.skipif(torch.cuda.device_count() < 2 or not torch.distributed.is_nccl_available(),
                    reason="needs two CUDA devices and NCCL")
def test_two_gpus_with_nccl_train_as_one_gpu_on_the_global_batch(tmp_path, tiny):
    """``ccnn train --nproc 2 --device cuda``: DDP over NCCL, one process per GPU, ends near one
    GPU's weights on the same global batches (SGD; float32 sums in another order)."""
    from ccnn.distributed import launch
    from ccnn.train import CHECKPOINT, train_process

    cfg = TrainConfig(method="ccnn", **{**tiny, "epochs": 2, "device": "cuda",
                                        "optimizer": "sgd", "lr": 0.01, "batch_size": 4})
    summary = launch(train_process, (cfg, str(tmp_path / "two"), False, False, False), nproc=2)
    assert summary["processes"] == 2
    train(cfg, tmp_path / "one", report=False, progress_bar=False, log=lambda m: None)
    two, one = (torch.load(tmp_path / run / CHECKPOINT, map_location="cpu",
                           weights_only=True)["model"] for run in ("two", "one"))
    for key, value in one.items():
        if value.is_floating_point():
            torch.testing.assert_close(two[key], value, atol=1e-4, rtol=0, msg=key)
