"""The training engine: data loaders, one epoch, evaluation, prediction and the schedule.

Laid out like torchvision's ``references/segmentation`` scripts: :func:`train_one_epoch` and
:func:`evaluate` take every dependency as an argument, and serve the weak-label training
(:mod:`ccnn.train`, its P/Q epochs and refinement stage), backbone pretraining
(:mod:`ccnn.pretrain`), the refinement stage's labelling (:mod:`ccnn.refine`) and inference
(:mod:`ccnn.inference`) alike.  One training step reads, in order:

1. **data** — a batch from :func:`training_loader`: shuffled and augmented (flip, scale, crop)
   inside the ``DataLoader``, the randomness drawn from the epoch's ``torch.Generator``;
2. **model** — logits at the network's coarse output;
3. **criterion** — for CCNN (:mod:`ccnn.criteria`): constraints from the batch's tags, the
   P-step, the loss ``H(P, Q)``; for the baselines their own losses;
4. **optimizer** and **scheduler** — one step each;
5. **metrics** — the step's statistics, averaged over the epoch; :func:`evaluate` gives mIoU.

Randomness comes from generators passed in (:func:`epoch_generator`); where a library draws
from the global generator (weight initialisation, dropout), :func:`seeded` seeds it for a block
and restores its state afterwards.

In a distributed run (:mod:`ccnn.distributed`) the same functions take the process's
:class:`~ccnn.distributed.World`: :func:`training_loader` keeps the process's shard of every
global batch, :func:`train_one_epoch` weights its loss by that shard's share and agrees with the
other processes on every step's loss, and :func:`evaluate` sums the confusion matrices.

A non-finite loss or gradient stops :func:`train_one_epoch` with :class:`NonFiniteError`, which
names the epoch and the step, before the optimizer takes the step.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn
from torch.utils.data import BatchSampler, DataLoader, Dataset, RandomSampler

from ccnn.crf import CRFParams, crf_refine
from ccnn.data.transforms import Augmentation, DrawnBatches, Transformed, collate, normalize
from ccnn.distributed import Placeholder, ShardedBatches, World, shard
from ccnn.metrics import ConfusionMatrix

__all__ = ["COUNTED", "NonFiniteError", "epoch_generator", "eval_loader", "evaluate",
           "lr_schedule", "poly", "predict_logits", "predict_scores", "seeded", "synchronize",
           "train_one_epoch", "training_loader"]

# statistics that an epoch sums over its steps (the others it averages)
COUNTED = ("p_unconverged",)
_ALONE = World()


class NonFiniteError(FloatingPointError):
    """The loss or the gradient of a training step is NaN or infinite; the message names the
    epoch and the step.  Raised before the optimizer's step, so the weights stay those of the
    step before."""


def epoch_generator(seed: int, epoch: int) -> torch.Generator:
    """The generator of one epoch: shuffling and augmentation depend on ``(seed, epoch)`` only."""
    return torch.Generator().manual_seed(seed * 100_003 + epoch)


@contextmanager
def seeded(seed: int, device: torch.device | str | None = None) -> Iterator[None]:
    """Run a block with PyTorch's global generator (and ``device``'s, on a GPU) seeded with
    ``seed``; their states are restored afterwards, so the caller's random stream is untouched.

    For what draws from the global generator and takes no ``torch.Generator``: the layers'
    weight initialisation and dropout.
    """
    device = torch.device(device) if device is not None else torch.device("cpu")
    cuda = [device.index if device.index is not None else torch.cuda.current_device()] \
        if device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda):
        torch.default_generator.manual_seed(seed)
        for index in cuda:
            with torch.cuda.device(index):
                torch.cuda.manual_seed(seed)
        yield


def training_loader(dataset: Dataset, batch_size: int, augmentation: Augmentation,
                    generator: torch.Generator, *, num_workers: int = 0,
                    world: World | None = None) -> DataLoader:
    """Shuffled, augmented, collated batches of ``dataset`` for one epoch.

    ``generator`` shuffles and draws every sample's augmentation in the main process
    (:class:`ccnn.data.transforms.DrawnBatches`); the images are transformed in the loader
    (:class:`ccnn.data.transforms.Transformed`), by ``num_workers`` processes when positive.

    With a distributed ``world``, ``batch_size`` is the global batch: every process draws the
    whole epoch from the same ``generator`` and loads its shard of each batch
    (:class:`ccnn.distributed.ShardedBatches`); a process left without a sample gets a batch
    marked ``placeholder`` (one sample, only to size an empty step).
    """
    batches = BatchSampler(RandomSampler(dataset, generator=generator), batch_size,
                           drop_last=False)
    drawn = DrawnBatches(batches, augmentation, generator)
    if world is None or not world.distributed:
        return DataLoader(Transformed(dataset, augmentation), batch_sampler=drawn,
                          collate_fn=collate, num_workers=num_workers, generator=generator)
    return DataLoader(_Marked(Transformed(dataset, augmentation)),
                      batch_sampler=ShardedBatches(drawn, world.rank, world.size),
                      collate_fn=_collate_marked, num_workers=num_workers, generator=generator)


class _Marked(Dataset):
    """``dataset`` whose samples asked for by a :class:`~ccnn.distributed.Placeholder` key
    carry ``placeholder: True``."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple) -> dict:
        sample = self.dataset[tuple(key)]
        return {**sample, "placeholder": True} if isinstance(key, Placeholder) else sample


def _collate_marked(samples: list[dict]) -> dict:
    """:func:`ccnn.data.transforms.collate`, and ``placeholder``: whether the batch is a
    placeholder's."""
    return {**collate(samples), "placeholder": any(s.get("placeholder") for s in samples)}


def eval_loader(dataset: Dataset, batch_size: int, *, num_workers: int = 0,
                world: World | None = None) -> DataLoader:
    """``dataset`` in order, collated, unaugmented (evaluation and labelling); with a
    distributed ``world``, this process's whole batches of it
    (:func:`ccnn.distributed.shard`)."""
    if world is not None:
        dataset = shard(dataset, batch_size, world)
    return DataLoader(dataset, batch_size=batch_size, collate_fn=collate,
                      num_workers=num_workers, generator=torch.Generator())


def predict_logits(model: nn.Module, images: Tensor) -> Tensor:
    """Logits at the input resolution: the network's coarse output upsampled bilinearly."""
    logits = model(normalize(images))
    return nn.functional.interpolate(logits, size=images.shape[-2:], mode="bilinear",
                                     align_corners=False)


def predict_scores(model: nn.Module, images: Tensor, crf: CRFParams | None = None) -> Tensor:
    """Test-time scores at the input resolution: :func:`predict_logits`, refined by the dense
    CRF (CCNN's test time, :func:`ccnn.crf.crf_refine`) when ``crf`` is given."""
    scores = predict_logits(model, images)
    return scores if crf is None else crf_refine(images, scores, crf)


def synchronize(device: torch.device) -> None:
    """Wait for the GPU's queued work, so that wall time measures it (nothing on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train_one_epoch(model: nn.Module, criterion: Callable[[Tensor, dict], tuple[Tensor, dict]],
                    optimizer: torch.optim.Optimizer,
                    scheduler: torch.optim.lr_scheduler.LRScheduler, loader: Iterable[dict],
                    device: torch.device, *,
                    progress: Callable[[dict], None] | None = None,
                    world: World | None = None, epoch: int | None = None) -> dict:
    """One pass over ``loader`` (collated batches); returns the epoch's mean statistics.

    ``criterion(logits, batch)`` gives ``(loss, stats)`` (:mod:`ccnn.criteria`); the result
    holds the mean of every statistic over the batches (the sum for those in :data:`COUNTED`),
    ``step_seconds`` (the mean time of a step from the batch's arrival to the scheduler's step,
    the device synchronised), the epoch's ``images_per_second`` and, with ``p_seconds`` among
    the statistics, ``p_step_share``: the P-step's share of a step's time.

    With a distributed ``world`` (``model`` wrapped in DistributedDataParallel), each process's
    loss is weighted by ``n_r·W/B`` (its ``n_r`` of the step's ``B`` images, ``W`` processes),
    so that the gradients' mean is that of the global batch's mean loss; a placeholder batch
    (:func:`training_loader`) runs the model on no image.  The statistics are the means over
    every process's batches, ``images_per_second`` that of all processes together.

    Raises:
        NonFiniteError: the loss (on any process) or the gradient is NaN or infinite; the
            message names ``epoch`` (0-based, shown from 1) and the step, and the optimizer
            has not stepped.
    """
    world = world or _ALONE
    model.train()
    totals: dict[str, float] = {}
    images_seen, batches = 0, 0
    steps = len(loader) if hasattr(loader, "__len__") else None  # type: ignore[arg-type]
    start = time.perf_counter()
    for step, batch in enumerate(loader, 1):
        step_start = time.perf_counter()
        images = batch["image"].to(device)
        real = not batch.get("placeholder", False)
        if not real:
            images = images[:0]
        logits = model(normalize(images))
        if real:
            loss, stats = criterion(logits, batch)
        else:  # no image here: a zero loss that still reaches every parameter
            loss, stats = logits.sum() * 0.0, {"loss": 0.0}
        loss = _agree_on_loss(loss, stats["loss"], len(images), world,
                              _where(epoch, step, steps))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        _check_gradients(optimizer, _where(epoch, step, steps))
        optimizer.step()
        scheduler.step()
        synchronize(device)
        if not real:
            continue
        stats["step_seconds"] = time.perf_counter() - step_start
        for key, value in stats.items():
            totals[key] = totals.get(key, 0.0) + value
        images_seen += len(images)
        batches += 1
        if progress is not None:
            shown = {k: stats[k] for k in ("loss", "violation") if k in stats}
            seconds = time.perf_counter() - start
            progress({**shown, "images_per_second": world.size * images_seen / seconds})
    seconds = time.perf_counter() - start
    if world.distributed:
        totals, batches, images_seen = _sum_over_processes(totals, batches, images_seen, world)
    means = {key: value if key in COUNTED else value / max(batches, 1)
             for key, value in totals.items()}
    means["images_per_second"] = images_seen / seconds
    if "p_seconds" in means:
        means["p_step_share"] = means["p_seconds"] / max(means["step_seconds"], 1e-12)
    return means


def _where(epoch: int | None, step: int, steps: int | None) -> str:
    """``epoch 3, step 5 of 12`` (the epoch shown from 1)."""
    at = f"step {step}" + (f" of {steps}" if steps is not None else "")
    return at if epoch is None else f"epoch {epoch + 1}, {at}"


def _agree_on_loss(loss: Tensor, value: float, n: int, world: World, where: str) -> Tensor:
    """The loss to backpropagate: ``loss`` alone, or weighted by its share ``n·W/B`` of the
    global batch; raises :class:`NonFiniteError` on every process when any process's loss is
    NaN or infinite (one small all-reduce: images, non-finite losses)."""
    finite = math.isfinite(value)
    if not world.distributed:
        if not finite:
            raise NonFiniteError(f"the loss became {value} in {where}: lower --lr")
        return loss
    shared = world.all_reduce(torch.tensor([float(n), 0.0 if finite else 1.0],
                                           dtype=torch.float64))
    total, bad = float(shared[0]), int(shared[1])
    if bad:
        here = f" ({value} on this process)" if not finite else ""
        raise NonFiniteError(f"the loss became non-finite on {bad} of {world.size} processes"
                             f"{here} in {where}: lower --lr")
    return loss * (n * world.size / total)


def _check_gradients(optimizer: torch.optim.Optimizer, where: str) -> None:
    """Raise :class:`NonFiniteError` if a gradient holds a NaN or an infinity (after DDP's
    all-reduce every process holds the same gradients, so all of them raise)."""
    grads = [p.grad for group in optimizer.param_groups for p in group["params"]
             if p.grad is not None]
    if not grads:
        return
    largest = torch.stack([torch.linalg.vector_norm(g.detach(), math.inf).float()
                           for g in grads]).max()
    if not bool(torch.isfinite(largest)):
        raise NonFiniteError(f"the gradient became non-finite ({float(largest)}) in {where}: "
                             f"lower --lr")


def _sum_over_processes(totals: dict[str, float], batches: int, images: int, world: World
                        ) -> tuple[dict[str, float], int, int]:
    """The statistics' totals, batches and images summed over the processes (rank 0's keys:
    every process runs the same criterion)."""
    keys = world.broadcast(sorted(totals))
    values = torch.tensor([totals.get(k, 0.0) for k in keys] + [batches, images],
                          dtype=torch.float64)
    summed = world.all_reduce(values).tolist()
    return dict(zip(keys, summed[:-2], strict=True)), int(summed[-2]), int(summed[-1])


@torch.no_grad()
def evaluate(model: nn.Module, loader: Iterable[dict], num_classes: int,
             device: torch.device, crf: CRFParams | None = None, *,
             world: World | None = None) -> dict:
    """mIoU, per-class IoU and pixel accuracy at full resolution over collated batches
    (:class:`ccnn.metrics.ConfusionMatrix`).

    With ``crf`` the upsampled scores are refined by the dense CRF first (CCNN's test time).
    With a distributed ``world`` each process evaluates its share of the images
    (:func:`eval_loader` with the world) and the confusion matrices are summed, so every
    process returns the metrics of all the images.  Call it with the model itself, not its
    DistributedDataParallel wrapper.
    """
    model.eval()
    cm = ConfusionMatrix(num_classes)
    for batch in loader:
        scores = predict_scores(model, batch["image"].to(device), crf)
        cm.update(scores.argmax(1).cpu(), batch["mask"])
    if world is not None:
        cm.counts = world.all_reduce(cm.counts)
    return cm.compute()


def poly(step: int, total: int) -> float:
    """DeepLab's "poly" learning-rate factor ``(1 − step/total)^0.9`` (0 from ``total`` on)."""
    return max(1.0 - step / total, 0.0) ** 0.9


def lr_schedule(steps_per_epoch: int, epochs: int, *, schedule: str = "poly",
                refine_epochs: int = 0, restart: float | None = None) -> Callable[[int], float]:
    """The learning rate after ``step`` optimizer steps, as a multiple of the base rate.

    ``"poly"`` decays by :func:`poly` over all ``epochs + refine_epochs``; ``"constant"`` keeps
    1.  With ``restart`` (the refinement stage's rate over the base rate) the refinement stage
    has a schedule of its own: it restarts at ``restart`` and decays (``"poly"``) to zero over
    its own steps, while the first ``epochs`` keep the factors they have without it.
    """
    if schedule not in ("poly", "constant"):
        raise ValueError(f"schedule must be poly or constant, got {schedule!r}")

    def decay(step: int, total: int) -> float:
        return 1.0 if schedule == "constant" else poly(step, total)

    total = (epochs + refine_epochs) * steps_per_epoch
    if restart is None or refine_epochs == 0:
        return lambda step: decay(step, total)
    first, stage = epochs * steps_per_epoch, refine_epochs * steps_per_epoch
    return lambda step: decay(step, total) if step < first else restart * decay(step - first,
                                                                                stage)
