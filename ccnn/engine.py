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
from ccnn.metrics import ConfusionMatrix

__all__ = ["epoch_generator", "eval_loader", "evaluate", "lr_schedule", "poly",
           "predict_logits", "predict_scores", "seeded", "synchronize", "train_one_epoch",
           "training_loader"]


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
                    generator: torch.Generator, *, num_workers: int = 0) -> DataLoader:
    """Shuffled, augmented, collated batches of ``dataset`` for one epoch.

    ``generator`` shuffles and draws every sample's augmentation in the main process
    (:class:`ccnn.data.transforms.DrawnBatches`); the images are transformed in the loader
    (:class:`ccnn.data.transforms.Transformed`), by ``num_workers`` processes when positive.
    """
    batches = BatchSampler(RandomSampler(dataset, generator=generator), batch_size,
                           drop_last=False)
    return DataLoader(Transformed(dataset, augmentation),
                      batch_sampler=DrawnBatches(batches, augmentation, generator),
                      collate_fn=collate, num_workers=num_workers, generator=generator)


def eval_loader(dataset: Dataset, batch_size: int, *, num_workers: int = 0) -> DataLoader:
    """``dataset`` in order, collated, unaugmented (evaluation and labelling)."""
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
                    progress: Callable[[dict], None] | None = None) -> dict:
    """One pass over ``loader`` (collated batches); returns the epoch's mean statistics.

    ``criterion(logits, batch)`` gives ``(loss, stats)`` (:mod:`ccnn.criteria`); the result
    holds the mean of every statistic over the batches, ``step_seconds`` (the mean time of a
    step from the batch's arrival to the scheduler's step, the device synchronised), the
    epoch's ``images_per_second`` and, with ``p_seconds`` among the statistics,
    ``p_step_share``: the P-step's share of a step's time.
    """
    model.train()
    totals: dict[str, float] = {}
    images_seen, batches = 0, 0
    start = time.perf_counter()
    for batch in loader:
        step_start = time.perf_counter()
        logits = model(normalize(batch["image"].to(device)))
        loss, stats = criterion(logits, batch)
        if not math.isfinite(stats["loss"]):
            raise FloatingPointError(f"the loss became {stats['loss']}: lower --lr")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        synchronize(device)
        stats["step_seconds"] = time.perf_counter() - step_start
        for key, value in stats.items():
            totals[key] = totals.get(key, 0.0) + value
        images_seen += len(batch["image"])
        batches += 1
        if progress is not None:
            shown = {k: stats[k] for k in ("loss", "violation") if k in stats}
            progress({**shown, "images_per_second": images_seen / (time.perf_counter() - start)})
    means = {key: value / max(batches, 1) for key, value in totals.items()}
    means["images_per_second"] = images_seen / (time.perf_counter() - start)
    if "p_seconds" in means:
        means["p_step_share"] = means["p_seconds"] / max(means["step_seconds"], 1e-12)
    return means


@torch.no_grad()
def evaluate(model: nn.Module, loader: Iterable[dict], num_classes: int,
             device: torch.device, crf: CRFParams | None = None) -> dict:
    """mIoU, per-class IoU and pixel accuracy at full resolution over collated batches
    (:class:`ccnn.metrics.ConfusionMatrix`).

    With ``crf`` the upsampled scores are refined by the dense CRF first (CCNN's test time).
    """
    model.eval()
    cm = ConfusionMatrix(num_classes)
    for batch in loader:
        scores = predict_scores(model, batch["image"].to(device), crf)
        cm.update(scores.argmax(1).cpu(), batch["mask"])
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
