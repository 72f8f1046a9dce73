"""The few collective operations the hard-constraint steps need under a process group.

Under :class:`~torch.nn.parallel.DistributedDataParallel` (DDP) each process holds a shard of
the global batch. The KKT step of Márquez-Neila, Salzmann and Fua, "Imposing Hard Constraints on
Deep Networks: Promises and Limitations", 2017 (Eq. 5, 6, 12), and Tanabe's multiplier system
(Jergensen, "Neural network optimization under PDE constraints", 2019, Eq. 3-5) couple the whole
batch: the global constraint vector ``C`` is the concatenation of the processes' residuals in
rank order, its Jacobian ``J`` their row-stacked Jacobians, and the multipliers ``Λ`` are kept
replicated on every process as the full vector, so that the solver runs unchanged and
identically everywhere. Then

* ``J·v`` for a replicated ``v``: each process's rows, gathered (:meth:`ShardedRows.gather`);
* ``Jᵀ·Λ``: each process applies its rows to its slice of ``Λ`` (:meth:`ShardedRows.local`),
  and the parameter-sized results are summed (:meth:`Collective.reduce_sum`);
* a data gradient is averaged (:meth:`Collective.mean`), DDP's convention.

:class:`Collective` without a group (or with a group of one process) is a process on its own:
every operation returns its input, so a single process computes exactly what it did without it.
The sums use ``all_reduce``, whose result is the same on every process for gloo's ring algorithm
(reduce-scatter then all-gather; NCCL's ring should be alike, unchecked); the solver then takes
the same path on every process.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["Collective", "ShardedRows", "unwrap"]


class Collective:
    """The process group of a sharded batch, or none (every operation the identity).

    Parameters
    ----------
    group : torch.distributed.ProcessGroup or None
        The group whose processes share the batch (``torch.distributed.group.WORLD`` for the
        default group). None: a process on its own.
    """

    def __init__(self, group: Any = None) -> None:
        self.group = group
        if group is None:
            self.world, self.rank = 1, 0
            return
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            raise ValueError("process_group was given but torch.distributed is not initialized")
        self.world = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        if self.rank < 0:
            raise ValueError("process_group does not contain this process")

    @property
    def distributed(self) -> bool:
        """More than one process: the collective operations communicate."""
        return self.world > 1

    def reduce_sum(self, tensor: Tensor) -> Tensor:
        """The sum of ``tensor`` over the processes (a new tensor; ``tensor`` itself alone)."""
        if not self.distributed:
            return tensor
        import torch.distributed as dist

        out = tensor.detach().clone()
        dist.all_reduce(out, group=self.group)
        return out

    def mean(self, tensor: Tensor) -> Tensor:
        """The mean of ``tensor`` over the processes (DDP's average of the gradients)."""
        if not self.distributed:
            return tensor
        return self.reduce_sum(tensor) / self.world

    def sizes(self, n: int) -> list[int]:
        """Every process's ``n``, in rank order."""
        if not self.distributed:
            return [n]
        import torch.distributed as dist

        mine = torch.tensor([n], dtype=torch.int64)
        out = [torch.zeros_like(mine) for _ in range(self.world)]
        dist.all_gather(out, mine, group=self.group)
        return [int(t) for t in out]

    def gather(self, tensor: Tensor, sizes: list[int]) -> Tensor:
        """The processes' ``tensor`` (``sizes[r]`` rows on process ``r``, equal trailing
        shapes) concatenated along dimension 0 in rank order."""
        if not self.distributed:
            return tensor
        import torch.distributed as dist

        if tensor.shape[0] != sizes[self.rank]:
            raise ValueError(f"this process has {tensor.shape[0]} rows, expected "
                             f"{sizes[self.rank]}")
        longest = max(sizes)
        if longest == 0:
            return tensor.detach().clone()
        padded = tensor.detach().new_zeros(longest, *tensor.shape[1:])
        padded[: tensor.shape[0]] = tensor.detach()
        parts = [torch.empty_like(padded) for _ in range(self.world)]
        dist.all_gather(parts, padded, group=self.group)
        return torch.cat([part[:n] for part, n in zip(parts, sizes, strict=True)])

    def rows(self, n: int) -> ShardedRows:
        """The :class:`ShardedRows` of a vector with ``n`` rows on this process."""
        return ShardedRows(self, self.sizes(n))


class ShardedRows:
    """A vector (or the rows of a tensor) sharded across the processes in rank order:
    ``sizes[r]`` rows on process ``r``, ``total`` in all; this process's are
    ``span = [offset, offset + count)``."""

    def __init__(self, comm: Collective, sizes: list[int]) -> None:
        if len(sizes) != comm.world:
            raise ValueError(f"sizes must have one entry per process ({comm.world}), "
                             f"got {sizes!r}")
        self.comm, self.sizes = comm, list(sizes)
        self.offset = sum(self.sizes[: comm.rank])
        self.count = self.sizes[comm.rank]
        self.total = sum(self.sizes)

    @property
    def span(self) -> slice:
        """This process's rows of the gathered tensor."""
        return slice(self.offset, self.offset + self.count)

    def scaled(self, k: int) -> ShardedRows:
        """The rows of the same shards with ``k`` rows per row (e.g. ``M`` residuals per
        sample, flattened)."""
        return ShardedRows(self.comm, [k * n for n in self.sizes])

    def gather(self, tensor: Tensor) -> Tensor:
        """This process's rows of every process, concatenated in rank order."""
        return self.comm.gather(tensor, self.sizes)

    def local(self, tensor: Tensor) -> Tensor:
        """This process's rows of a replicated, gathered ``tensor``."""
        if not self.comm.distributed:
            return tensor
        return tensor[self.span]


def unwrap(model: nn.Module) -> tuple[nn.Module, Collective]:
    """``(model.module, its process group's Collective)`` for a DDP model, else
    ``(model, Collective())``. The steps call the module itself (through
    :func:`torch.func.functional_call`), which bypasses DDP's gradient hooks, and do their
    all-reduces explicitly."""
    if isinstance(model, nn.parallel.DistributedDataParallel):
        return model.module, Collective(model.process_group)
    return model, Collective()
