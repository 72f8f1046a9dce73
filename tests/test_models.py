"""The segmentation networks: output sizes, the registry and local backbone weights."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
import torchvision
from torch import nn

from ccnn.models import (
    MODELS,
    VGG16FCN,
    DeepLabResNet,
    RandomWeightsWarning,
    SmallSegNet,
    build_model,
    load_backbone_weights,
)


@pytest.fixture(scope="module")
def vgg_state():
    """The state dict of torchvision's randomly initialised ``vgg16``, seeded."""
    torch.manual_seed(7)
    return torchvision.models.vgg16(weights=None).state_dict()


@pytest.fixture(scope="module")
def vgg_file(tmp_path_factory, vgg_state):
    """``vgg_state`` saved as a raw state dict, like torchvision's ``vgg16-397923af.pth``."""
    path = tmp_path_factory.mktemp("weights") / "vgg16.pth"
    torch.save(vgg_state, path)
    return path


@pytest.fixture(scope="module")
def resnet_state():
    """The state dict of torchvision's randomly initialised ``resnet50``, seeded."""
    torch.manual_seed(3)
    return torchvision.models.resnet50(weights=None).state_dict()


def _without(state: dict, prefix: str) -> dict:
    return {k: v for k, v in state.items() if not k.startswith(prefix)}


def _assert_same_tensors(own: dict, saved: dict) -> None:
    assert own.keys() == saved.keys()
    for key, value in own.items():
        assert torch.equal(value, saved[key]), key


@pytest.mark.parametrize("name", sorted(MODELS))
def test_output_size_is_ceil_of_input_over_stride(name):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RandomWeightsWarning)
        model = build_model(name, 5).eval()
    stride = model.output_stride
    assert stride == (4 if name == "small" else 8)
    with torch.no_grad():
        for h, w in ((64, 64), (33, 47), (17, 8)):
            out = model(torch.randn(1, 3, h, w))
            assert out.shape == (1, 5, math.ceil(h / stride), math.ceil(w / stride)), (h, w)


def test_registry_errors():
    with pytest.raises(ValueError, match=r"unknown model 'unet'.*'vgg16-fcn'.*'deeplab-resnet101'"):
        build_model("unet", 3)
    with pytest.raises(FileNotFoundError, match=r"backbone weights x\.pth not found"):
        build_model("small", 3, backbone_weights="x.pth")


@pytest.mark.parametrize(("make", "message"), [
    (lambda: VGG16FCN(0), "num_classes must be positive, got 0"),
    (lambda: DeepLabResNet(0), "num_classes must be positive, got 0"),
    (lambda: DeepLabResNet(3, depth=34), "depth must be 50 or 101, got 34"),
])
def test_bad_arguments_are_rejected(make, message):
    with pytest.raises(ValueError, match=message):
        make()


def test_random_weights_are_announced_for_large_networks_only():
    with pytest.warns(RandomWeightsWarning, match="resnet50: .*starting from random weights"):
        build_model("deeplab-resnet50", 3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        build_model("small", 3)


def test_vgg_backbone_is_the_checkpoint_and_the_head_is_new(vgg_state, vgg_file):
    model = build_model("vgg16-fcn", 4, backbone_weights=vgg_file)
    features = {f"features.{k}": v for k, v in model.features.state_dict().items()}
    _assert_same_tensors(features, _without(vgg_state, "classifier."))
    assert any(k.startswith("classifier.") for k in vgg_state)  # ImageNet head in the file...
    assert model.classifier.weight.shape == (4, 1024, 1, 1)  # ...ignored for fc8,
    assert model.classifier.weight.std() < 0.02  # which starts from N(0, 0.01²)
    assert not model.classifier.bias.any()


@pytest.mark.parametrize("layout", ["under state_dict", "pre-0.4.1 BatchNorm"])
def test_resnet_backbone_is_the_checkpoint(tmp_path, resnet_state, layout):
    path = tmp_path / "resnet50.pth"
    if layout == "under state_dict":
        torch.save({"state_dict": resnet_state, "epoch": 90}, path)
    else:  # torchvision's older ResNet files have no BatchNorm batch counters
        torch.save({k: v for k, v in resnet_state.items()
                    if not k.endswith("num_batches_tracked")}, path)
    model = build_model("deeplab-resnet50", 4, backbone_weights=path)
    _assert_same_tensors(model.backbone.state_dict(), _without(resnet_state, "fc."))


def test_bad_weight_files_name_the_file(tmp_path, vgg_file):
    with pytest.raises(FileNotFoundError, match=r"missing\.pth"):
        build_model("deeplab-resnet50", 3, backbone_weights=tmp_path / "missing.pth")
    with pytest.raises(ValueError, match=r"vgg16\.pth do not fit resnet50: \d+ missing keys "
                                         r"\(bn1\..*\d+ unexpected keys \(classifier\."):
        build_model("deeplab-resnet50", 3, backbone_weights=vgg_file)


def test_loader_rejects_files_that_are_not_state_dicts(tmp_path):
    junk = tmp_path / "junk.pth"
    junk.write_text("not a checkpoint")
    with pytest.raises(ValueError, match=r"junk\.pth is not a PyTorch checkpoint"):
        load_backbone_weights(nn.Linear(2, 3), junk, name="tiny")
    listed = tmp_path / "listed.pth"
    torch.save({"epoch": 3, "weight": torch.zeros(3, 2)}, listed)
    with pytest.raises(ValueError, match=r"listed\.pth holds no state dict of tensors"):
        load_backbone_weights(nn.Linear(2, 3), listed, name="tiny")


def test_loader_names_wrong_shapes_and_keeps_skipped_keys(tmp_path):
    path = tmp_path / "tiny.pth"
    torch.save({"weight": torch.zeros(3, 4), "bias": torch.zeros(3)}, path)
    with pytest.raises(ValueError, match=r"tiny\.pth do not fit tiny: 1 wrong shapes "
                                         r"\(weight \(3, 4\) for \(3, 2\)\)"):
        load_backbone_weights(nn.Linear(2, 3), path, name="tiny")
    linear = nn.Linear(4, 3)
    bias = linear.bias.detach().clone()
    load_backbone_weights(linear, path, name="tiny", skip=("bias",))
    assert not linear.weight.any()
    assert torch.equal(linear.bias, bias)


def test_small_network_runs_channels_last_and_computes_the_plain_layers():
    """The features take a channels-last input (the faster layout on the CPU); the logits and
    the gradients are those of the same layers run as a plain Sequential on contiguous input,
    and the parameter names are a Sequential's (backbone files stay compatible)."""
    torch.manual_seed(0)
    model = SmallSegNet(4, width=4).double()
    plain = nn.Sequential(*model.features).double()
    seen = []
    model.features[0].register_forward_hook(
        lambda module, args, out: seen.append(args[0].is_contiguous(
            memory_format=torch.channels_last)))
    x = torch.randn(2, 3, 20, 20, dtype=torch.float64)
    logits = model(x)
    assert seen == [True]
    reference = model.classifier(plain(x))
    assert seen == [True, False]
    assert logits.is_contiguous()
    torch.testing.assert_close(logits, reference, rtol=1e-10, atol=1e-10)
    grads = torch.autograd.grad(logits.square().sum(), list(model.parameters()))
    reference_grads = torch.autograd.grad(reference.square().sum(), list(model.parameters()))
    for g, r in zip(grads, reference_grads, strict=True):
        torch.testing.assert_close(g, r, rtol=1e-9, atol=1e-10)
    assert list(model.state_dict()) == (
        [f"features.{k}" for k in nn.Sequential(*model.features).state_dict()]
        + ["classifier.weight", "classifier.bias"])
