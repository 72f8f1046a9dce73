"""Using a trained checkpoint: ``ccnn evaluate`` on a dataset split, ``ccnn predict`` on images."""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
from PIL import Image
from torch import nn

from ccnn.crf import CRFParams
from ccnn.data.files import read_rgb
from ccnn.engine import eval_loader, evaluate, predict_scores
from ccnn.models import RandomWeightsWarning, build_model
from ccnn.report import colorize
from ccnn.train import TrainConfig, split_dataset

__all__ = ["IMAGE_SUFFIXES", "evaluate_checkpoint", "load_checkpoint", "predict_folder"]

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp")


def load_checkpoint(path: str | Path, device: str = "cpu") -> tuple[nn.Module, dict]:
    """The model of a training checkpoint (in eval mode) and the checkpoint's other entries."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} not found")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises several types for a file that is not a checkpoint
        raise ValueError(f"{path} is not a ccnn checkpoint: {err}") from err
    if not isinstance(state, dict) or not {"model", "config", "num_classes"} <= state.keys():
        raise ValueError(f"{path} is not a ccnn training checkpoint (no model/config entries)")
    config = state["config"]
    with warnings.catch_warnings():  # the trained weights are loaded next
        warnings.simplefilter("ignore", RandomWeightsWarning)
        model = build_model(config["model"], state["num_classes"])
    model.load_state_dict(state["model"])
    return model.to(device).eval(), state


def _current_config(config: dict) -> dict:
    """A checkpoint's configuration in today's terms: until ``ccnn-size`` became CCNN's one-bit
    size cue, the name meant measured sizes as lower bounds, now ``ccnn-size-exact``."""
    if config.get("method") == "ccnn-size" and config.get("bounds", {}).get("size_fg_scale"):
        return {**config, "method": "ccnn-size-exact"}
    return config


def evaluate_checkpoint(path: str | Path, *, split: str | None = None, data_root: str | None = None,
                        device: str = "cpu", batch_size: int | None = None,
                        crf: bool = False) -> dict:
    """Metrics of a checkpoint on a split of the dataset it was trained on: by default the
    run's test split, where reports are made (``crf``: after the dense CRF of
    :mod:`ccnn.crf`)."""
    model, state = load_checkpoint(path, device)
    config = _current_config(state["config"])
    cfg = TrainConfig(**{**config, **({"data_root": data_root} if data_root else {})})
    split = split or cfg.test_split
    sizes = {cfg.train_split: cfg.train_size, cfg.val_split: cfg.val_size,
             cfg.test_split: cfg.test_size}
    dataset = split_dataset(cfg, split, sizes.get(split))
    loader = eval_loader(dataset, batch_size or cfg.eval_batch_size)
    metrics = evaluate(model, loader, state["num_classes"], torch.device(device),
                       crf=CRFParams() if crf else None)
    return {**metrics, "class_names": state["class_names"], "split": split,
            "images": len(dataset)}


@torch.no_grad()
def predict_folder(checkpoint: str | Path, images: str | Path, output: str | Path, *,
                   device: str = "cpu", crf: bool = False) -> list[Path]:
    """Colour PNG masks (the training dataset's palette) for every image in a folder
    (``crf``: refined by the dense CRF of :mod:`ccnn.crf` first)."""
    model, state = load_checkpoint(checkpoint, device)
    images, output = Path(images), Path(output)
    if not images.is_dir():
        raise FileNotFoundError(f"input folder {images} not found")
    files = sorted(p for p in images.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise FileNotFoundError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in {images}")
    output.mkdir(parents=True, exist_ok=True)
    palette = torch.tensor(state["palette"], dtype=torch.uint8)
    written = []
    for file in files:
        image = read_rgb(file)
        scores = predict_scores(model, image[None].to(device), CRFParams() if crf else None)
        labels = scores.argmax(1)[0].cpu()
        target = output / f"{file.stem}.png"
        Image.fromarray(colorize(labels, palette)).save(target)
        written.append(target)
    return written
