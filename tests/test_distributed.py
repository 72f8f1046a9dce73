"""Distributed training (``ccnn.distributed``): sharding, synchronised batch norm, the token that
lets an elastic restart resume, and 2-process runs on the CPU (gloo, loopback): equal to one
process on the same global batch, and resumed after a SIGKILL mid-epoch — by ``--resume`` and
by an elastic restart — to the weights of the uninterrupted run.

The multi-process tests start real process groups; on two busy cores each launch takes 10-30 s,
most of it importing torch and torchvision in every process.
"""

from __future__ import annotations

import copy
import datetime
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch import nn

from ccnn.cli import build_parser, main
from ccnn.commands import config_from_args
from ccnn.distributed import (
    AllReduceBatchNorm2d,
    Placeholder,
    ShardedBatches,
    World,
    launch,
    shard_indices,
    sync_batchnorm,
)
from ccnn.hard.optim import HardAdam, HardGaussNewton, HardSGD
from ccnn.hard.tanabe import Tanabe
from ccnn.train import CHECKPOINT, LOG, RunExistsError, TrainConfig, _start, train, train_process

ROOT = Path(__file__).resolve().parents[1]

# 9 images in global batches of 4: the last batch holds one image, so one process runs an empty
# step; 2 epochs of tags and 1 of the refinement stage (sharded labelling).  SGD: Adam's first
# steps are ±lr wherever a gradient is at rounding level, which turns the 1e-7 differences of
# a sum taken in another order into 1e-4 (measured: 3e-4 after 6 steps; SGD 1.2e-7).
RUN = ["--method", "ccnn", "--model", "small", "--train-size", "9", "--val-size", "4",
       "--test-size", "2", "--batch-size", "4", "--epochs", "2", "--refine-epochs", "1",
       "--optimizer", "sgd", "--lr", "0.01", "--no-crf", "--no-progress", "--seed", "3"]


def _config() -> TrainConfig:
    return config_from_args(build_parser().parse_args(["train", *RUN]))


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    return torch.load(folder / CHECKPOINT, map_location="cpu", weights_only=True)["model"]


def _env() -> dict[str, str]:
    """The environment of a launched run: one thread per process, the package importable."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return env


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory) -> Path:
    """The uninterrupted 2-process run of :data:`RUN` (``launch``, as ``--nproc 2`` does)."""
    out = tmp_path_factory.mktemp("ddp") / "whole"
    saved = os.environ.get("OMP_NUM_THREADS")
    os.environ["OMP_NUM_THREADS"] = "1"
    try:
        summary = launch(train_process, (_config(), str(out), False, False, False), nproc=2)
    finally:
        if saved is None:
            os.environ.pop("OMP_NUM_THREADS")
        else:
            os.environ["OMP_NUM_THREADS"] = saved
    assert summary["processes"] == 2
    return out


# -- sharding --------------------------------------------------------------------------------------

def test_shards_of_each_batch_partition_it_and_an_empty_shard_gets_a_placeholder():
    batches = [[(0, "a"), (5, "b"), (2, "c")], [(7, "d")]]
    shards = [list(ShardedBatches(batches, rank, 2)) for rank in range(2)]
    assert shards[0] == [[(0, "a"), (2, "c")], [(7, "d")]]
    assert shards[1][0] == [(5, "b")]
    assert shards[1][1] == [Placeholder(7, "d")] and isinstance(shards[1][1][0], Placeholder)
    assert len(ShardedBatches(batches, 1, 2)) == 2
    with pytest.raises(ValueError, match=r"rank must lie in \[0, 2\)"):
        ShardedBatches(batches, 2, 2)


@pytest.mark.parametrize(("length", "batch", "size"), [(10, 3, 2), (9, 4, 3), (2, 4, 3)])
def test_evaluation_shards_are_whole_batches_covering_every_image_once(length, batch, size):
    parts = [shard_indices(length, batch, rank, size) for rank in range(size)]
    assert sorted(i for part in parts for i in part) == list(range(length))
    batches = [list(range(s, min(s + batch, length))) for s in range(0, length, batch)]
    for rank, part in enumerate(parts):  # batches rank, rank + size, ... of the one-process run
        assert part == [i for b in batches[rank::size] for i in b]


def test_a_process_on_its_own_needs_no_group():
    world = World()
    t = torch.arange(3.0)
    assert world.all_reduce(t) is t and world.broadcast("x") == "x" and world.gather(1) == [1]
    assert world.agree(lambda: 5) == 5 and not world.distributed and world.main
    with pytest.raises(ValueError, match="bad"):
        world.agree(lambda: (_ for _ in ()).throw(ValueError("bad")))


# -- one process group of one, in this process -------------------------------------------------


@pytest.fixture
def group_of_one(tmp_path):
    """A gloo process group of one process (a file store: no network)."""
    store = dist.FileStore(str(tmp_path / "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1,
                            timeout=datetime.timedelta(seconds=60))
    yield
    dist.destroy_process_group()


def test_hard_optimizers_and_tanabe_step_a_ddp_model_as_its_module(group_of_one):
    """In a group of one, a DDP model's hard step is the module's, bit for bit (the sharded
    case, two processes, is tests/test_hard_distributed.py)."""
    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(6, 3, generator=g), torch.randn(6, 2, generator=g)

    def loss(net):
        return ((net(x) - y) ** 2).mean()

    def constraints(net):
        return net(x).sum(dim=1)

    for optimizer in (HardSGD, HardAdam, HardGaussNewton):
        torch.manual_seed(0)
        plain = nn.Linear(3, 2)
        wrapped = copy.deepcopy(plain)
        ddp = nn.parallel.DistributedDataParallel(wrapped)
        closure = ((lambda net: (net(x) - y).flatten()) if optimizer is HardGaussNewton
                   else loss)
        for opt in (optimizer(plain), optimizer(ddp)):
            for _ in range(2):
                opt.step(closure, constraints)
        for a, b in zip(plain.parameters(), wrapped.parameters(), strict=True):
            assert torch.equal(a, b), optimizer.__name__

    def per_sample(net, inputs):  # Tanabe's fn: per-sample loss f and constraints g
        u = net(inputs)
        return (u - 1.0).square().sum(dim=1), u.sum(dim=1, keepdim=True)

    torch.manual_seed(0)
    plain = nn.Linear(3, 2)
    wrapped = copy.deepcopy(plain)
    ddp = nn.parallel.DistributedDataParallel(wrapped)
    for model, module in ((plain, plain), (ddp, wrapped)):
        Tanabe(model)(per_sample, x).loss.backward()
        with torch.no_grad():
            for w in module.parameters():
                w -= 0.1 * w.grad
    for a, b in zip(plain.parameters(), wrapped.parameters(), strict=True):
        assert torch.equal(a, b)


def test_all_reduce_batch_norm_alone_is_batch_norm():
    """With one process (or no group) the layer is BatchNorm2d: same output, same running
    statistics, same gradients."""
    torch.manual_seed(0)
    plain = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, momentum=None))
    synced = sync_batchnorm(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, momentum=None)),
                            torch.device("cpu"))
    synced.load_state_dict(plain.state_dict())
    assert isinstance(synced[1], AllReduceBatchNorm2d)
    x = torch.randn(2, 3, 6, 6)
    for _ in range(2):
        torch.testing.assert_close(synced(x), plain(x))
    torch.testing.assert_close(synced[1].running_var, plain[1].running_var)


def test_all_reduce_batch_norm_in_a_group_matches_batch_norm_by_hand(group_of_one):
    """The group path (the all-reduces, float64 sums) against the formula of BatchNorm2d in
    training mode, written out with NumPy-style tensor operations; and the gradients against
    BatchNorm2d's own."""
    torch.manual_seed(1)
    x = torch.randn(3, 2, 4, 5, dtype=torch.float64, requires_grad=True)
    layer = AllReduceBatchNorm2d(2, momentum=0.3).double()
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([1.5, -0.5]))
        layer.bias.copy_(torch.tensor([0.2, 0.1]))
    y = layer(x)
    mean = x.detach().mean((0, 2, 3))
    var = ((x.detach() - mean.view(1, -1, 1, 1)) ** 2).mean((0, 2, 3))
    expected = ((x.detach() - mean.view(1, -1, 1, 1)) / (var + 1e-5).sqrt().view(1, -1, 1, 1)
                * torch.tensor([1.5, -0.5]).view(1, -1, 1, 1).double()
                + torch.tensor([0.2, 0.1]).view(1, -1, 1, 1).double())
    torch.testing.assert_close(y, expected)
    n = x.numel() / 2
    torch.testing.assert_close(layer.running_mean, 0.3 * mean)
    torch.testing.assert_close(layer.running_var, 0.7 + 0.3 * var * n / (n - 1))
    reference = nn.BatchNorm2d(2).double()
    reference.load_state_dict({**layer.state_dict(), "running_mean": torch.zeros(2),
                               "running_var": torch.ones(2)})
    x2 = x.detach().clone().requires_grad_()
    (y * torch.arange(120.0).view_as(y)).sum().backward()
    (reference(x2) * torch.arange(120.0).view_as(y)).sum().backward()
    torch.testing.assert_close(x.grad, x2.grad)


# -- elastic restarts resume their own job's checkpoint only ---------------------------------------

def test_an_elastic_restart_resumes_its_own_jobs_checkpoint_only(tmp_path):
    cfg = TrainConfig()
    (tmp_path / CHECKPOINT).parent.mkdir(exist_ok=True)
    torch.save({"model": {}, "config": {}, "num_classes": 2, "run": "job-a"},
               tmp_path / CHECKPOINT)
    mine = World(restart=1, token="job-a")
    assert _start(tmp_path, cfg, mine, resume=False, overwrite=False)["run"] == "job-a"
    for world in (World(restart=1, token="job-b"), World(restart=0, token="job-a")):
        with pytest.raises(RunExistsError, match="already holds a run"):
            _start(tmp_path, cfg, world, resume=False, overwrite=False)
    assert (tmp_path / CHECKPOINT).exists()


# -- the command line ----------------------------------------------------------------------------

def test_cli_distributed_option_errors(tmp_path, capsys, monkeypatch):
    out = ["--out", str(tmp_path / "run")]
    assert main(["train", *RUN, "--nproc", "0", *out]) == 2
    assert "--nproc must be a positive integer, got 0" in capsys.readouterr().err
    assert main(["train", *RUN, "--nproc", "2", "--max-restarts", "-1", *out]) == 2
    assert "--max-restarts must be an integer >= 0, got -1" in capsys.readouterr().err
    assert main(["train", *RUN, "--max-restarts", "1", *out]) == 2
    assert "give --nproc too" in capsys.readouterr().err
    if torch.cuda.device_count() < 64:
        assert main(["train", *RUN, "--nproc", "64", "--device", "cuda", *out]) == 2
        assert "one process per GPU" in capsys.readouterr().err
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main(["train", *RUN, "--nproc", "2", *out]) == 2
    assert "under torchrun use its --nproc-per-node" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


# -- two processes ---------------------------------------------------------------------------------

def test_two_processes_train_as_one_process_on_the_global_batch(two_process_run, tmp_path):
    """Global batches of 4 split 2 + 2 (and 1 + none): the weights after 2 epochs and 1
    refinement epoch (9 optimizer steps) equal one process's on the same batches, to 1e-3.

    Not to the bit: oneDNN's channels-last convolutions round a batch of 2 and a batch of 4
    differently, and a max-pooling window whose entries tie after a ReLU sends its gradient
    elsewhere on the smallest change, so two runs that differ by rounding alone (one process
    in the channels-last and the contiguous layout) end 1e-4 apart here, while gradients
    summed instead of averaged (the learning rate doubled) end 4e-2 away."""
    torch.set_num_threads(1)
    single = tmp_path / "single"
    summary = train(_config(), single, report=False, progress_bar=False, log=lambda m: None)
    ddp, one = _weights(two_process_run), _weights(single)
    assert ddp.keys() == one.keys()
    for key, value in one.items():
        if value.is_floating_point():
            torch.testing.assert_close(ddp[key], value, atol=1e-3, rtol=0, msg=key)
        else:
            assert torch.equal(ddp[key], value), key  # BatchNorm's batch counter
    logged = [json.loads(line) for line in (two_process_run / LOG).read_text().splitlines()]
    assert [r["stage"] for r in logged] == ["train", "train", "refine"]
    # the confusion matrices summed over the processes: one process's validation mIoU
    assert logged[-1]["val_miou"] == pytest.approx(summary["history"][-1]["val_miou"], abs=1e-9)
    labels = torch.load(two_process_run / "refine_labels.pt", weights_only=True)
    assert sorted(labels) == sorted(torch.load(single / "refine_labels.pt", weights_only=True))
    state = torch.load(two_process_run / CHECKPOINT, weights_only=True)
    assert state["world_size"] == 2 and state["epoch"] == 3
    assert (two_process_run / "report" / "metrics.json").is_file()


def _children(pid: int) -> list[int]:
    """The worker processes the elastic agent ``pid`` spawned (Linux ``/proc``)."""
    children = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        children += [int(c) for c in (task / "children").read_text().split()]
    return [c for c in children
            if b"spawn_main" in Path(f"/proc/{c}/cmdline").read_bytes()]


@contextmanager
def _run_in_background(out: Path, *extra: str) -> Iterator[subprocess.Popen]:
    """``ccnn train --nproc 2`` of :data:`RUN` in its own session, its output in
    ``OUT.txt``; whatever is left of it is killed on the way out."""
    log = out.with_suffix(".txt")
    with log.open("w") as sink:
        run = subprocess.Popen([sys.executable, "-m", "ccnn.cli", "train", *RUN, "--out",
                                str(out), "--nproc", "2", *extra], env=_env(), cwd=ROOT,
                               start_new_session=True, stdout=sink, stderr=subprocess.STDOUT)
        try:
            yield run
        finally:
            if run.poll() is None:
                os.killpg(run.pid, signal.SIGKILL)
                run.wait()


def _wait_for_checkpoint(run: subprocess.Popen, out: Path, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not (out / CHECKPOINT).exists():
        assert run.poll() is None, out.with_suffix(".txt").read_text()
        assert time.monotonic() < deadline, "no checkpoint in time"
        time.sleep(0.01)


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="needs Linux /proc")
def test_sigkill_mid_epoch_then_resume_matches_the_uninterrupted_run(two_process_run, tmp_path,
                                                                     capfd, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the thread count of the uninterrupted run
    out = tmp_path / "cut"
    with _run_in_background(out) as run:
        _wait_for_checkpoint(run, out)  # epoch 1 written; the processes are in epoch 2
        os.killpg(run.pid, signal.SIGKILL)  # the agent and both processes at once
        run.wait()
    assert torch.load(out / CHECKPOINT, weights_only=True)["epoch"] < 3
    # a new run is refused, --resume continues it
    assert main(["train", *RUN, "--out", str(out), "--nproc", "2"]) == 2
    assert "already holds a run" in capfd.readouterr().err
    assert main(["train", *RUN, "--out", str(out), "--nproc", "2", "--resume"]) == 0
    assert "resumed from" in capfd.readouterr().err
    whole, cut = _weights(two_process_run), _weights(out)
    for key, value in whole.items():
        assert torch.equal(value, cut[key]), key
    lines = (out / LOG).read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == [0, 1, 2]


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="needs Linux /proc")
def test_an_elastic_restart_resumes_from_the_last_checkpoint(two_process_run, tmp_path):
    out = tmp_path / "elastic"
    with _run_in_background(out, "--max-restarts", "1") as run:
        _wait_for_checkpoint(run, out)
        workers = _children(run.pid)
        assert len(workers) == 2
        os.kill(workers[0], signal.SIGKILL)  # one process dies; the agent restarts both
        run.wait(timeout=300)
    output = out.with_suffix(".txt").read_text()
    assert run.returncode == 0, output
    assert "elastic restart 1: resumed from" in output
    whole, restarted = _weights(two_process_run), _weights(out)
    for key, value in whole.items():
        assert torch.equal(value, restarted[key]), key
