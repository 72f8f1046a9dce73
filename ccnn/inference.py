"""Using a trained checkpoint: ``ccnn evaluate`` on a dataset split, ``ccnn predict`` on images.

Bad input gets an error that names it: a missing, unreadable or foreign checkpoint, one whose
weights do not fit its own network, one with another number of classes than the dataset it is
evaluated on; with ``skip_bad`` the images whose files are truncated or corrupt are left out and
counted instead of stopping the command.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image
from torch import nn

from ccnn.crf import CRFParams
from ccnn.data.files import BadFileError, read_rgb
from ccnn.engine import eval_loader, evaluate, predict_scores
from ccnn.models import RandomWeightsWarning, build_model
from ccnn.report import colorize
from ccnn.train import TrainConfig, read_checkpoint, split_dataset

__all__ = ["IMAGE_SUFFIXES", "Predictions", "evaluate_checkpoint", "load_checkpoint",
           "predict_folder"]

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp")


def load_checkpoint(path: str | Path, device: str = "cpu") -> tuple[nn.Module, dict]:
    """The model of a training checkpoint (in eval mode) and the checkpoint's other entries.

    Raises:
        FileNotFoundError: no file at ``path``.
        ValueError: the file is not a readable ``ccnn train`` checkpoint, or its weights do not
            fit the network and number of classes it names.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} not found")
    _check_device(device)
    state = read_checkpoint(path, "checkpoint")
    config = state["config"]
    name, classes = config.get("model") if isinstance(config, dict) else None, state["num_classes"]
    try:
        with warnings.catch_warnings():  # the trained weights are loaded next
            warnings.simplefilter("ignore", RandomWeightsWarning)
            model = build_model(name, classes)
        model.load_state_dict(state["model"])
    except (RuntimeError, ValueError, TypeError, KeyError) as err:
        raise ValueError(f"checkpoint {path}: its weights do not fit the {name!r} network with "
                         f"{classes} classes ({str(err).strip().splitlines()[0]})") from None
    return model.to(device).eval(), state


def _check_device(device: str) -> None:
    """``--device`` names a device this machine has."""
    try:
        where = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise ValueError(f"--device {device!r}: {err}") from None
    if where.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0 or (where.index or 0) >= count:
            raise ValueError(f"--device {device!r}: this machine has {count} CUDA GPU(s)")


def _current_config(config: dict) -> dict:
    """A checkpoint's configuration in today's terms: until ``ccnn-size`` became CCNN's one-bit
    size cue, the name meant measured sizes as lower bounds, now ``ccnn-size-exact``."""
    if config.get("method") == "ccnn-size" and config.get("bounds", {}).get("size_fg_scale"):
        return {**config, "method": "ccnn-size-exact"}
    return config


def evaluate_checkpoint(path: str | Path, *, split: str | None = None, data_root: str | None = None,
                        device: str = "cpu", batch_size: int | None = None,
                        crf: bool = False, skip_bad: bool = False) -> dict:
    """Metrics of a checkpoint on a split of the dataset it was trained on: by default the
    run's test split, where reports are made (``crf``: after the dense CRF of
    :mod:`ccnn.crf`; ``skip_bad``: the samples of unreadable files left out, listed in
    ``skipped``).

    Raises:
        ValueError: the checkpoint is unreadable or does not fit its network (:func:`
            load_checkpoint`), or the split's dataset has another number of classes.
    """
    model, state = load_checkpoint(path, device)
    config = _current_config(state["config"])
    # skipping is the evaluation's choice, not the training run's: it changes the metrics
    overrides: dict = {"skip_bad": skip_bad, **({"data_root": data_root} if data_root else {})}
    known = {f for f in TrainConfig.__dataclass_fields__}
    unknown = sorted(set(config) - known)
    if unknown:
        raise ValueError(f"checkpoint {path} was written by another version of ccnn: unknown "
                         f"setting(s) {unknown}")
    cfg = TrainConfig(**{**config, **overrides})
    split = split or cfg.test_split
    sizes = {cfg.train_split: cfg.train_size, cfg.val_split: cfg.val_size,
             cfg.test_split: cfg.test_size}
    dataset = split_dataset(cfg, split, sizes.get(split))
    if dataset.num_classes != state["num_classes"]:
        raise ValueError(f"checkpoint {path} has {state['num_classes']} classes, the "
                         f"{cfg.dataset} {split} split {dataset.num_classes}")
    loader = eval_loader(dataset, batch_size or cfg.eval_batch_size)
    metrics = evaluate(model, loader, state["num_classes"], torch.device(device),
                       crf=CRFParams() if crf else None)
    skipped = [str(p) for p in getattr(dataset, "skipped", None) or []]
    return {**metrics, "class_names": state["class_names"], "split": split,
            "images": len(dataset), "skipped": skipped}


@dataclass
class Predictions:
    """What :func:`predict_folder` did: the masks it wrote and the images it skipped."""

    written: list[Path] = field(default_factory=list)
    skipped: list[Path] = field(default_factory=list)


@torch.no_grad()
def predict_folder(checkpoint: str | Path, images: str | Path, output: str | Path, *,
                   device: str = "cpu", crf: bool = False, skip_bad: bool = False
                   ) -> Predictions:
    """Colour PNG masks (the training dataset's palette) for every image in a folder
    (``crf``: refined by the dense CRF of :mod:`ccnn.crf` first).

    An image that cannot be read (truncated, corrupt) raises
    :class:`ccnn.data.BadFileError` naming it, after the masks of the images before it are
    written; with ``skip_bad`` it is skipped, logged and counted in the result's ``skipped``.
    """
    model, state = load_checkpoint(checkpoint, device)
    images, output = Path(images), Path(output)
    if not images.is_dir():
        raise FileNotFoundError(f"input folder {images} not found")
    files = sorted(p for p in images.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise FileNotFoundError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in {images}")
    output.mkdir(parents=True, exist_ok=True)
    palette = torch.tensor(state["palette"], dtype=torch.uint8)
    result = Predictions()
    for file in files:
        try:
            image = read_rgb(file)
        except BadFileError as err:
            if not skip_bad:
                raise BadFileError(f"{err}; pass --skip-bad to skip such images", err.path
                                   ) from None
            logger.warning("skipped %s: %s", file, err)
            result.skipped.append(file)
            continue
        scores = predict_scores(model, image[None].to(device), CRFParams() if crf else None)
        labels = scores.argmax(1)[0].cpu()
        target = output / f"{file.stem}.png"
        Image.fromarray(colorize(labels, palette)).save(target)
        result.written.append(target)
    if result.skipped:
        logger.warning("skipped %d of %d images that could not be read", len(result.skipped),
                       len(files))
    return result
