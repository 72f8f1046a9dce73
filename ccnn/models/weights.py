"""Pretrained backbone weights from a local torchvision checkpoint; nothing is ever downloaded.

CCNN (Pathak et al. 2015) and DeepLab start from ImageNet-trained VGG16 / ResNet weights.  Users
download torchvision's official files once by hand (e.g. ``vgg16-397923af.pth``,
``resnet50-0676ba61.pth``) and pass their path; the keys follow torchvision's own naming.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
from torch import nn

__all__ = ["RandomWeightsWarning", "load_backbone_weights"]

# BatchNorm's batch counter: absent from checkpoints saved before PyTorch 0.4.1 (torchvision's
# older ResNet files) and never used with the default momentum; BatchNorm fills it in itself.
_COUNTER = "num_batches_tracked"


class RandomWeightsWarning(UserWarning):
    """A backbone starts from random weights because no checkpoint was given."""


def _state_dict_of(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a checkpoint: a raw state dict or one under ``state_dict`` / ``model``."""
    if not path.is_file():
        raise FileNotFoundError(f"backbone weights {path} not found")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises several types for files that are not checkpoints
        raise ValueError(f"backbone weights {path} is not a PyTorch checkpoint: {err}") from err
    if isinstance(state, dict):
        state = next((state[k] for k in ("state_dict", "model") if isinstance(state.get(k), dict)),
                     state)
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"backbone weights {path} holds no state dict of tensors")
    return state


def _few(keys: list[str]) -> str:
    """At most four of ``keys``, for an error message."""
    return ", ".join(keys[:4]) + (", ..." if len(keys) > 4 else "")


def load_backbone_weights(module: nn.Module, path: str | Path | None, *, name: str,
                          skip: tuple[str, ...] = ()) -> None:
    """Copy a torchvision checkpoint of ``name`` (e.g. ``vgg16``) into ``module``.

    Keys starting with a prefix in ``skip`` (the ImageNet classifier: ``classifier.`` for VGG,
    ``fc.`` for ResNet) are ignored on both sides and keep ``module``'s own weights; every other
    key must match ``module``'s names and shapes.  With ``path=None`` a
    :class:`RandomWeightsWarning` says that the network starts from random weights.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: ``path`` is not a checkpoint, or its keys or shapes do not fit ``module``.
    """
    if path is None:
        warnings.warn(f"{name}: no backbone weights given, starting from random weights (pass a "
                      f"local torchvision {name} checkpoint to start from pretrained ones)",
                      RandomWeightsWarning, stacklevel=2)
        return
    path = Path(path)
    state = {k: v for k, v in _state_dict_of(path).items() if not k.startswith(skip)}
    own = {k: v for k, v in module.state_dict().items() if not k.startswith(skip)}
    missing = sorted(k for k in own.keys() - state.keys() if not k.endswith(_COUNTER))
    unexpected = sorted(state.keys() - own.keys())
    wrong = sorted(f"{k} {tuple(state[k].shape)} for {tuple(own[k].shape)}"
                   for k in own.keys() & state.keys() if own[k].shape != state[k].shape)
    problems = [f"{len(keys)} {what} ({_few(keys)})" for what, keys in
                (("missing keys", missing), ("unexpected keys", unexpected),
                 ("wrong shapes", wrong)) if keys]
    if problems:
        raise ValueError(f"backbone weights {path} do not fit {name}: {'; '.join(problems)} "
                         f"(expected a torchvision {name} checkpoint)")
    module.load_state_dict(state, strict=False)  # only the skipped keys stay as they are
