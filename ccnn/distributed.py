"""Training on several processes with ``torch.distributed``: process group, launch and sharding.

``ccnn train`` runs as one process of a group when ``torchrun`` (or ``ccnn train --nproc N``,
which starts ``torchrun``'s elastic agent itself) launched it: one process per GPU with NCCL, or
per share of the CPU cores with gloo, the model wrapped in
:class:`~torch.nn.parallel.DistributedDataParallel` (docs/distributed.md).  A run on ``W``
processes follows one process's run on the same global batch:

* every process draws the epoch's whole schedule — the shuffling and each sample's augmentation —
  from the same ``torch.Generator`` (:func:`ccnn.engine.epoch_generator`) and keeps its shard of
  each global batch (:class:`ShardedBatches`: samples ``r, r + W, …``), so ``--batch-size`` is
  the global batch and the per-epoch seeding is the single process's;
* each process weights its loss by its share of the global batch, ``n_r·W/B``, so that the mean
  of the gradients DDP takes is the gradient of the global batch's mean loss
  (:func:`ccnn.engine.train_one_epoch`);
* batch normalisation takes its statistics over the global batch (:func:`sync_batchnorm`:
  PyTorch's :class:`~torch.nn.SyncBatchNorm` on GPU, :class:`AllReduceBatchNorm2d` on CPU, where
  PyTorch's has no kernel);
* the P-step stays local: it is per image;
* evaluation splits the images by whole batches (:func:`shard`) and sums the confusion matrices
  (:meth:`World.all_reduce`); logging, reports and checkpoints come from rank 0 alone.

:class:`World` is what the training code asks: which process it is, how many there are, and the
few collective operations it needs; ``World()`` is a process on its own, for which every
collective is the identity.
"""

from __future__ import annotations

import logging
import os
import pickle
import socket
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, NamedTuple, TypeVar

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.utils.data import Dataset, Sampler

__all__ = ["AllReduceBatchNorm2d", "LaunchError", "Placeholder", "Shard", "ShardedBatches",
           "World", "launch", "launched", "process_group", "run_token", "shard",
           "shard_indices", "sync_batchnorm", "wrap_model"]

logger = logging.getLogger(__name__)

T = TypeVar("T")

# errors that keep their type when one process's failure is raised on every process
_PASSED_ON = (ValueError, FileNotFoundError, FloatingPointError, KeyError)


def launched() -> bool:
    """Whether this process was started by ``torchrun`` (or another ``torch.distributed``
    launcher): ``RANK`` and ``WORLD_SIZE`` are set."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def run_token() -> str | None:
    """What identifies this job across its elastic restarts: torchrun's ``--rdzv-id``
    (``TORCHELASTIC_RUN_ID``; random with ``--standalone`` and ``ccnn train --nproc``), else the
    host and the launching agent's process id; ``None`` outside a launcher."""
    run_id = os.environ.get("TORCHELASTIC_RUN_ID", "")
    if run_id and run_id != "none":
        return run_id
    if launched():
        return f"{socket.gethostname()}:{os.getppid()}"
    return None


@dataclass(frozen=True)
class World:
    """One process of a group of ``size``: its ``rank`` (0 for the one that logs and writes),
    ``local_rank`` on its machine, the elastic ``restart`` count, the job's ``token``
    (:func:`run_token`) and its ``device`` (``None``: the configuration's).

    ``World()`` is a process on its own: every collective operation returns its input.
    """

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    restart: int = 0
    token: str | None = None
    device: torch.device | None = None

    @property
    def distributed(self) -> bool:
        """More than one process: a process group exists."""
        return self.size > 1

    @property
    def main(self) -> bool:
        """The process that logs and writes files (rank 0)."""
        return self.rank == 0

    def _comm_device(self) -> torch.device:
        """Where collective operations want their tensors: the GPU with NCCL, else the CPU."""
        if self.device is not None and self.device.type == "cuda":
            return self.device
        return torch.device("cpu")

    def all_reduce(self, tensor: Tensor) -> Tensor:
        """The sum of ``tensor`` over the processes, as a new tensor on ``tensor``'s device
        (``tensor`` itself in a process on its own)."""
        if not self.distributed:
            return tensor
        summed = tensor.detach().to(self._comm_device(), copy=True)
        dist.all_reduce(summed)
        return summed.to(tensor.device)

    def broadcast(self, obj: T) -> T:
        """Rank 0's ``obj`` on every process (pickled)."""
        if not self.distributed:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0, device=self._comm_device())
        return box[0]

    def gather(self, obj: T) -> list[T]:
        """Every process's ``obj``, in rank order, on every process (pickled)."""
        if not self.distributed:
            return [obj]
        out: list[Any] = [None] * self.size
        dist.all_gather_object(out, obj)
        return out

    def barrier(self) -> None:
        """Wait until every process gets here."""
        if self.distributed:
            dist.barrier()

    def agree(self, fn: Callable[[], T]) -> T:
        """``fn()`` run by rank 0 alone, its result on every process; when it raises, every
        process raises the error (of the same type for ``ValueError``, ``FileNotFoundError``,
        ``FloatingPointError`` and ``KeyError``, else ``RuntimeError`` with its message), so no
        process is left waiting in a collective operation."""
        if not self.distributed:
            return fn()
        outcome: tuple[bool, Any] = (True, None)
        error: BaseException | None = None
        if self.main:
            try:
                outcome = (True, fn())
            except Exception as err:
                error = err
                outcome = (False, _portable(err))
        ok, value = self.broadcast(outcome)
        if ok:
            return value
        if error is not None:
            raise error
        raise value


def _portable(err: BaseException) -> BaseException:
    """``err`` if it pickles and is of a type every process should see, else a RuntimeError
    with its message."""
    if isinstance(err, _PASSED_ON):
        try:
            pickle.loads(pickle.dumps(err))
            return err
        except Exception:  # an exception that does not survive pickling
            pass
    return RuntimeError(f"{type(err).__name__}: {err}")


@contextmanager
def process_group(device: str = "cpu", *, timeout_s: float = 1800.0) -> Iterator[World]:
    """The :class:`World` of this process.

    Under a launcher (:func:`launched`) with ``WORLD_SIZE > 1`` it joins the process group
    (``env://``: ``MASTER_ADDR``, ``MASTER_PORT``, ``RANK``, ``WORLD_SIZE``), with NCCL and GPU
    ``LOCAL_RANK`` when ``device`` is ``"cuda"``, gloo when it is ``"cpu"``, and leaves it at
    the end; a collective operation that waits longer than ``timeout_s`` fails.  Outside a
    launcher it is ``World()``.

    Raises:
        ValueError: a device other than ``cpu`` or ``cuda``, or more processes on this machine
            than it has GPUs.
    """
    if not launched():
        yield World()
        return
    env = os.environ
    rank, size = int(env["RANK"]), int(env["WORLD_SIZE"])
    local_rank = int(env.get("LOCAL_RANK", "0"))
    restart = int(env.get("TORCHELASTIC_RESTART_COUNT", "0"))
    kind = torch.device(device).type
    if kind not in ("cpu", "cuda"):
        raise ValueError(f"device {device!r}: distributed training runs on cpu (gloo) or cuda "
                         f"(NCCL)")
    if kind == "cuda":
        count = torch.cuda.device_count()
        if local_rank >= count:
            raise ValueError(f"device {device!r}: process {local_rank} of this machine has no "
                             f"GPU of its own ({count} GPU(s)); start at most one process per "
                             f"GPU")
        compute = torch.device("cuda", local_rank)
        torch.cuda.set_device(compute)
    else:
        compute = torch.device("cpu")
    world = World(rank, size, local_rank, restart, run_token(), compute)
    if size == 1:
        yield world
        return
    backend = "nccl" if kind == "cuda" else "gloo"
    timeout = timedelta(seconds=timeout_s)
    store, _, _ = next(dist.rendezvous("env://", timeout=timeout))
    # torchrun's agent keeps one store across elastic restarts: without a prefix of their own,
    # the processes of a restart could read the addresses of the processes they replace (gloo
    # then waits forever to connect)
    store = dist.PrefixStore(f"ccnn/attempt_{restart}/size_{size}/", store)
    dist.init_process_group(backend, store=store, rank=rank, world_size=size, timeout=timeout,
                            **({"device_id": compute} if kind == "cuda" else {}))
    try:
        yield world
    finally:
        dist.destroy_process_group()


class LaunchError(RuntimeError):
    """A run launched by :func:`launch` failed (after its restarts); the message is the first
    failed process's error."""


def launch(entrypoint: Callable[..., T], args: Sequence[Any], *, nproc: int,
           max_restarts: int = 0, monitor_interval: float = 0.1) -> T:
    """``entrypoint(*args)`` in ``nproc`` processes of this machine, under ``torch.distributed``'s
    elastic agent — what ``torchrun --standalone --nproc-per-node NPROC --max-restarts R`` does
    (a c10d rendezvous on a free port of localhost, a fresh run id); returns rank 0's result.

    When a process fails, the agent stops the others and starts them all again, up to
    ``max_restarts`` times (``TORCHELASTIC_RESTART_COUNT`` tells them which attempt they are).
    Without ``OMP_NUM_THREADS``, each process gets an equal share of the CPU cores.

    Raises:
        ValueError: ``nproc < 1`` or ``max_restarts < 0``.
        LaunchError: a process failed and no restart was left.
    """
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    if isinstance(nproc, bool) or not isinstance(nproc, int) or nproc < 1:
        raise ValueError(f"--nproc must be a positive integer, got {nproc!r}")
    if isinstance(max_restarts, bool) or not isinstance(max_restarts, int) or max_restarts < 0:
        raise ValueError(f"--max-restarts must be an integer >= 0, got {max_restarts!r}")
    config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=nproc,
                          run_id=f"ccnn-{uuid.uuid4().hex}", rdzv_backend="c10d",
                          rdzv_endpoint="localhost:0", max_restarts=max_restarts,
                          monitor_interval=monitor_interval, start_method="spawn")
    threads = str(max(1, (os.cpu_count() or 1) // nproc))
    saved = os.environ.get("OMP_NUM_THREADS")
    os.environ.setdefault("OMP_NUM_THREADS", threads)  # the spawned processes inherit it
    try:
        results = elastic_launch(config, entrypoint)(*args)
    except ChildFailedError as err:
        rank, failure = err.get_first_failure()
        raise LaunchError(f"process {rank} failed: {_failure_message(failure)}") from None
    finally:
        if saved is None:
            os.environ.pop("OMP_NUM_THREADS", None)
    return results[0]


def _failure_message(failure: Any) -> str:
    """The error of a failed process, as the elastic agent recorded it."""
    message = getattr(failure, "message", None)
    if isinstance(message, dict):
        message = message.get("message", "")
    text = str(message or "").strip()
    if not text or text.startswith("To enable traceback"):  # no error file: it exited
        signal_name = getattr(failure, "signal_name", lambda: "")()
        return f"exit code {failure.exitcode}" + (f" ({signal_name})" if signal_name else "")
    lines = [line for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else text  # the traceback's last line: "ValueError: ..."


# -- data ------------------------------------------------------------------------------------------

class Placeholder(NamedTuple):
    """A sample a process loads only to run an empty step (the global batch had fewer samples
    than processes): its shape sizes the empty batch, and it is never trained on."""

    index: int
    params: Any


class ShardedBatches(Sampler[list]):
    """This process's shard of every batch of ``batches``: the elements ``rank, rank + size,
    …`` of each.  Every process iterates all of ``batches`` (the same draws from the same
    generator) and keeps its own part; a batch with fewer elements than processes leaves some
    with nothing, and they get ``[Placeholder(*batch[0])]``, so that every process takes every
    step together."""

    def __init__(self, batches: Iterable[list], rank: int, size: int) -> None:
        if not 0 <= rank < size:
            raise ValueError(f"rank must lie in [0, {size}), got {rank}")
        self.batches, self.rank, self.size = batches, rank, size

    def __iter__(self) -> Iterator[list]:
        for batch in self.batches:
            part = list(batch[self.rank::self.size])
            yield part if part else [Placeholder(*batch[0])]

    def __len__(self) -> int:
        return len(self.batches)  # type: ignore[arg-type]


def shard_indices(length: int, batch_size: int, rank: int, size: int) -> list[int]:
    """The indices of ``range(length)`` in this process's share of its batches of
    ``batch_size``: whole batches ``rank, rank + size, …``, so that every batch holds the
    images it holds in one process (the same padding, the same sums)."""
    starts = range(rank * batch_size, length, size * batch_size)
    return [i for start in starts for i in range(start, min(start + batch_size, length))]


class Shard(Dataset):
    """``dataset``'s samples at ``indices``, keeping its class attributes (``num_classes``,
    ``class_names``, ``palette``, ``background``)."""

    def __init__(self, dataset: Dataset, indices: Sequence[int]) -> None:
        self.dataset, self.indices = dataset, list(indices)
        for name in ("num_classes", "class_names", "palette", "background"):
            if hasattr(dataset, name):
                setattr(self, name, getattr(dataset, name))

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int) -> dict:
        return self.dataset[self.indices[index]]


def shard(dataset: Dataset, batch_size: int, world: World) -> Dataset:
    """This process's whole batches of ``dataset`` (:func:`shard_indices`); ``dataset`` itself
    in a process on its own."""
    if not world.distributed:
        return dataset
    return Shard(dataset, shard_indices(len(dataset), batch_size, world.rank, world.size))


# -- model -----------------------------------------------------------------------------------------

class _AllReduce(torch.autograd.Function):
    """The sum over the processes, differentiable: the gradient of a sum is the sum of the
    processes' gradients."""

    @staticmethod
    def forward(ctx: Any, tensor: Tensor) -> Tensor:
        out = tensor.clone()
        dist.all_reduce(out)
        return out

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:
        out = grad.clone()
        dist.all_reduce(out)
        return out


class AllReduceBatchNorm2d(nn.BatchNorm2d):
    """:class:`~torch.nn.BatchNorm2d` whose training statistics are those of the global batch
    over every process (gloo on CPU, where :class:`~torch.nn.SyncBatchNorm` has no kernel).

    Training mode in a process group: the channel means and (biased) variances are sums over
    all processes' pixels (:class:`_AllReduce`, two small all-reduces per layer, accumulated in
    float64), the output ``(x − μ)/√(σ² + ε)·γ + β`` and the running statistics (unbiased
    variance) exactly as one process computes them on the whole batch.  Otherwise (evaluation,
    or no process group) it is :class:`~torch.nn.BatchNorm2d`.  A process with an empty batch
    adds nothing to the sums and still takes part.
    """

    def forward(self, x: Tensor) -> Tensor:
        if not (self.training and dist.is_available() and dist.is_initialized()
                and dist.get_world_size() > 1):
            return super().forward(x)
        self._check_input_dim(x)
        dims, shape = (0, 2, 3), (1, -1, 1, 1)
        count = x.new_full((1,), x.shape[0] * x.shape[2] * x.shape[3], dtype=torch.float64)
        sums = _AllReduce.apply(torch.cat([x.sum(dims).double(), count]))
        n = sums[-1].detach()
        mean = sums[:-1] / n
        centred = x - mean.to(x.dtype).view(shape)
        var = _AllReduce.apply((centred * centred).sum(dims).double()) / n
        y = centred * torch.rsqrt(var + self.eps).to(x.dtype).view(shape)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        if self.track_running_stats:
            self._update_running(mean.detach(), var.detach(), float(n))
        return y

    @torch.no_grad()
    def _update_running(self, mean: Tensor, var: Tensor, n: float) -> None:
        """BatchNorm's running statistics: an exponential (or, with ``momentum=None``,
        cumulative) average of the batch mean and unbiased variance."""
        self.num_batches_tracked.add_(1)
        factor = (1.0 / float(self.num_batches_tracked) if self.momentum is None
                  else self.momentum)
        unbiased = var * (n / max(n - 1.0, 1.0))
        self.running_mean.mul_(1 - factor).add_(factor * mean.to(self.running_mean.dtype))
        self.running_var.mul_(1 - factor).add_(factor * unbiased.to(self.running_var.dtype))


def _to_all_reduce(module: nn.Module) -> nn.Module:
    """``module`` with every :class:`~torch.nn.BatchNorm2d` replaced by an
    :class:`AllReduceBatchNorm2d` sharing its parameters and buffers."""
    out = module
    if type(module) is nn.BatchNorm2d:
        out = AllReduceBatchNorm2d(module.num_features, module.eps, module.momentum,
                                   module.affine, module.track_running_stats)
        if module.affine:
            out.weight, out.bias = module.weight, module.bias
        if module.track_running_stats:
            out.running_mean, out.running_var = module.running_mean, module.running_var
            out.num_batches_tracked = module.num_batches_tracked
        out.train(module.training)
    for name, child in module.named_children():
        out.add_module(name, _to_all_reduce(child))
    return out


def sync_batchnorm(model: nn.Module, device: torch.device) -> nn.Module:
    """``model`` with batch statistics over the global batch: :class:`~torch.nn.SyncBatchNorm`
    on a GPU, :class:`AllReduceBatchNorm2d` on the CPU.  The parameters and buffers (and so the
    state dict's keys) stay those of ``model``."""
    if device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return _to_all_reduce(model)


def wrap_model(model: nn.Module, world: World) -> nn.Module:
    """The module a training step calls: ``model`` itself in a process on its own, else
    ``model`` with synchronised batch normalisation (:func:`sync_batchnorm`, in place)
    wrapped in :class:`~torch.nn.parallel.DistributedDataParallel`.  Evaluate, label and save
    ``model`` itself."""
    if not world.distributed:
        return model
    device = world.device or torch.device("cpu")
    synced = sync_batchnorm(model, device)
    if synced is not model:
        raise ValueError("the model itself is a BatchNorm layer; wrap it in a container")
    ids = [device.index] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=ids)
