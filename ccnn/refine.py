"""The refinement stage: self-training on the network's own CRF-refined, tag-restricted labels.

CCNN (Pathak et al. 2015) trains only on the P-step's latent distributions; the dense CRF comes at
test time.  Later weak-label pipelines add a second stage that trains the segmentation network
on refined pseudo-labels (e.g. Ahn and Kwak 2018 train DeepLab on theirs).  After the P/Q
epochs, :func:`pseudo_labels` gives each training image a label map:

1. the network's scores at the image's resolution;
2. restricted to the image's tags and the background — CCNN's suppression constraint, exact;
3. refined by the dense CRF (:mod:`ccnn.crf`, CCNN's test-time step);
4. the argmax.

:func:`label_images` labels a whole training set so; :class:`RelabelledDataset` serves it with
these maps as masks.  The network then trains ``refine_epochs`` more epochs
(:class:`ccnn.train.TrainConfig`) on its method's loss from the tags alone plus the per-pixel
cross-entropy with these maps (:meth:`ccnn.criteria.Criterion.refinement`): for the CCNN
methods the P-step's tag constraints keep acting, which stops the stage from teaching the
network its own errors back (a class it mostly missed would otherwise vanish from its labels).
The size methods leave their size bounds out here: the stage uses the tags only, so it stays
weakly supervised by the tags alone and is the same stage for every weak-label method
(``TrainConfig.refine_sizes`` keeps them; lower on the tuning seed, docs/training.md).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn
from torch.utils.data import Dataset

from ccnn.crf import CRFParams, crf_refine
from ccnn.engine import eval_loader, predict_logits

__all__ = ["RelabelledDataset", "label_images", "load_labels", "pseudo_labels",
           "restrict_to_tags"]

_CRF = CRFParams()  # the test-time CRF's parameters
# Scores of suppressed classes: exp() of it underflows to exactly zero in float32.
_SUPPRESSED = -1e4


def _allowed(scores: Tensor, tags: Tensor, background: int | None) -> Tensor:
    """``(B, L)`` bool on ``scores``' device: the classes tagged in ``tags`` ``(B, L)``, and
    ``background``; raises ``ValueError`` when ``tags`` does not fit ``scores``."""
    if tags.shape != scores.shape[:2]:
        raise ValueError(f"tags have shape {tuple(tags.shape)}, expected {tuple(scores.shape[:2])}")
    allowed = tags > 0  # a new tensor: the caller's tags stay as they are
    if background is not None:
        allowed[:, background] = True
    return allowed.to(scores.device)


def restrict_to_tags(scores: Tensor, tags: Tensor, background: int | None) -> Tensor:
    """``scores`` ``(B, L, H, W)`` with every class neither tagged in ``tags`` ``(B, L)`` nor
    ``background`` set to a score no class can lose to: CCNN's suppression constraint
    (P(l) = 0 for absent classes) applied exactly."""
    allowed = _allowed(scores, tags, background)
    return scores.masked_fill(~allowed[:, :, None, None], _SUPPRESSED)


def pseudo_labels(scores: Tensor, images: Tensor, tags: Tensor, background: int | None,
                  crf: CRFParams | None = _CRF) -> Tensor:
    """The refinement stage's label maps ``(B, H, W)`` uint8 (steps 2-4 of the module).

    Args:
        scores: ``(B, L, H, W)`` the network's logits at the images' resolution.
        images: ``(B, 3, H, W)`` uint8, the colours the CRF's appearance kernel compares.
        tags: ``(B, L)`` 0/1, the classes present in each image.
        background: the background class (always allowed), or ``None``.
        crf: the dense CRF's parameters; ``None`` takes the argmax of the restricted scores.
    """
    if scores.shape[1] > 255:
        raise ValueError(f"pseudo_labels stores uint8 labels: at most 255 classes, "
                         f"got {scores.shape[1]}")
    if crf is None:
        return restrict_to_tags(scores, tags, background).argmax(1).to(torch.uint8)
    return _crf_labels(scores, images, _allowed(scores, tags, background), crf)


def _crf_labels(scores: Tensor, images: Tensor, allowed: Tensor, crf: CRFParams) -> Tensor:
    """The argmax of the dense CRF on the tag-restricted ``scores``, run on each image's
    ``allowed`` classes alone.

    A suppressed class has probability exactly zero from the start (its score is
    ``_SUPPRESSED``), so it sends no message and never wins: the CRF over the allowed classes
    gives the same maps as over all ``L`` (tested), at a fraction of the cost (the mean-field
    messages are computed per class; an image shows two to four of the synthetic default's
    six).  Images with the same number of allowed classes go through the CRF together.
    """
    batch, _, height, width = scores.shape
    # No class allowed at all: the restricted CRF is uniform and its argmax the first class.
    labels = torch.zeros(batch, height, width, dtype=torch.uint8, device=scores.device)
    counts = allowed.sum(1)
    for count in counts.unique().tolist():
        if count == 0:
            continue
        rows = (counts == count).nonzero().squeeze(1)
        classes = allowed[rows].nonzero()[:, 1].view(-1, count)  # ascending in each image
        index = classes[:, :, None, None].expand(-1, -1, height, width)
        q = crf_refine(images[rows], scores[rows].gather(1, index), crf)
        labels[rows] = index.gather(1, q.argmax(1, keepdim=True))[:, 0].to(torch.uint8)
    return labels


@torch.no_grad()
def label_images(model: nn.Module, dataset: Dataset, device: torch.device, *, batch_size: int,
                 num_workers: int = 0) -> dict[str, Tensor]:
    """The label map ``(H, W)`` uint8 of every image of ``dataset`` by :func:`pseudo_labels`
    on ``model``'s scores, by the image's ``name``."""
    model.eval()
    labels = {}
    for batch in eval_loader(dataset, batch_size, num_workers=num_workers):
        images = batch["image"].to(device)
        maps = pseudo_labels(predict_logits(model, images), images, batch["tags"],
                             dataset.background).cpu()
        for name, (height, width), label in zip(batch["name"], batch["shape"], maps,
                                                strict=True):
            labels[name] = label[:height, :width].clone()
    return labels


def load_labels(path: Path) -> dict[str, Tensor]:
    """The label maps ``{image name: (H, W) uint8}`` the training loop wrote with
    :func:`ccnn.io.atomic_save` before the stage started."""
    if not Path(path).exists():
        raise FileNotFoundError(f"--resume: the refinement stage's labels {path} are missing; "
                                f"restart the run without --resume")
    return torch.load(path, map_location="cpu", weights_only=True)


class RelabelledDataset(Dataset):
    """``dataset`` with each sample's ``mask`` replaced by its label map in ``labels`` (by the
    sample's ``name``); tags, sizes and the dataset's class attributes are kept."""

    def __init__(self, dataset: Dataset, labels: dict[str, Tensor]) -> None:
        self.dataset, self.labels = dataset, labels
        for name in ("num_classes", "class_names", "palette", "background"):
            setattr(self, name, getattr(dataset, name))

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict:
        sample = self.dataset[index]
        if sample["name"] not in self.labels:
            raise KeyError(f"no refinement label for image {sample['name']!r}")
        return {**sample, "mask": self.labels[sample["name"]].long()}
