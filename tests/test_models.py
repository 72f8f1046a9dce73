"""The segmentation networks: output sizes, the registry and local backbone weights."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
import torchvision

from ccnn.models import MODELS, build_model


@pytest.fixture(scope="module")
def vgg_file(tmp_path_factory):
    """A torchvision vgg16 checkpoint, as a user would save it, with a known seed."""
    torch.manual_seed(7)
    path = tmp_path_factory.mktemp("weights") / "vgg16.pth"
    torch.save(torchvision.models.vgg16(weights=None).state_dict(), path)
    return path


def _quiet(name: str, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return build_model(name, 5, **kw).eval()


@pytest.mark.parametrize("name", sorted(MODELS))
def test_output_size_is_ceil_of_input_over_stride(name):
    model = _quiet(name)
    stride = model.output_stride
    with torch.no_grad():
        for h, w in ((40, 56), (33, 47)):
            out = model(torch.randn(1, 3, h, w))
            assert out.shape == (1, 5, math.ceil(h / stride), math.ceil(w / stride)), (h, w)


def test_registry_errors():
    with pytest.raises(ValueError, match="unknown model 'unet'"):
        build_model("unet", 3)
    with pytest.raises(ValueError, match="no pretrained backbone"):
        build_model("small", 3, backbone_weights="x.pth")


def test_random_weights_are_announced():
    with pytest.warns(UserWarning, match="starting from random weights"):
        build_model("vgg16-fcn", 3)


def test_vgg_backbone_weights_are_loaded_exactly(vgg_file):
    model = build_model("vgg16-fcn", 4, backbone_weights=vgg_file)
    saved = torch.load(vgg_file, weights_only=True)
    own = model.features.state_dict()
    for key, value in own.items():
        assert torch.equal(value, saved[f"features.{key}"]), key


def test_resnet_backbone_weights_are_loaded(tmp_path):
    torch.manual_seed(3)
    resnet = torchvision.models.resnet50(weights=None)
    path = tmp_path / "resnet50.pth"
    torch.save({"state_dict": resnet.state_dict()}, path)
    model = build_model("deeplab-resnet50", 4, backbone_weights=path)
    assert torch.equal(model.backbone[0].weight, resnet.conv1.weight)
    assert torch.equal(model.backbone[7][2].conv3.weight, resnet.layer4[2].conv3.weight)


def test_bad_weight_files_name_the_file(tmp_path, vgg_file):
    with pytest.raises(FileNotFoundError, match=r"missing\.pth"):
        build_model("vgg16-fcn", 3, backbone_weights=tmp_path / "missing.pth")
    junk = tmp_path / "junk.pth"
    junk.write_text("not a checkpoint")
    with pytest.raises(ValueError, match=r"junk\.pth"):
        build_model("vgg16-fcn", 3, backbone_weights=junk)
    with pytest.raises(ValueError, match="do not fit resnet50"):
        build_model("deeplab-resnet50", 3, backbone_weights=vgg_file)
