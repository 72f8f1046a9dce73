"""Loading pretrained backbone weights from a file the user names; nothing is downloaded."""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
from torch import nn

__all__ = ["load_backbone_weights"]


def _state_dict_of(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a checkpoint: a raw state dict or one under ``state_dict`` / ``model``."""
    if not path.is_file():
        raise FileNotFoundError(f"backbone weights {path} not found")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises several types for files that are not checkpoints
        raise ValueError(f"backbone weights {path} is not a PyTorch checkpoint: {err}") from err
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"backbone weights {path} holds no state dict of tensors")
    return state


def load_backbone_weights(backbone: nn.Module, path: str | Path | None, *, name: str,
                          skip: tuple[str, ...] = ()) -> None:
    """Copy a torchvision checkpoint (e.g. ``vgg16-397923af.pth``) into ``backbone``.

    Keys starting with a prefix in ``skip`` (the classification head) are ignored; every other
    key must match the backbone's names and shapes.  With ``path=None`` a warning says that the
    network starts from random weights.
    """
    if path is None:
        warnings.warn(f"{name}: no backbone weights given, starting from random weights "
                      f"(pass a local torchvision checkpoint to use pretrained ones)", stacklevel=2)
        return
    path = Path(path)
    state = {k: v for k, v in _state_dict_of(path).items() if not k.startswith(skip)}
    own = {k: v for k, v in backbone.state_dict().items() if not k.startswith(skip)}
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    wrong = sorted(k for k in set(own) & set(state) if own[k].shape != state[k].shape)
    if missing or unexpected or wrong:
        raise ValueError(
            f"backbone weights {path} do not fit {name}: missing {missing[:4]}, unexpected "
            f"{unexpected[:4]}, wrong shapes {wrong[:4]} (expected torchvision's {name} keys)")
    backbone.load_state_dict(state, strict=False)  # the skipped head keeps its own weights
