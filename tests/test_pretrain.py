"""Backbone pretraining: it learns, it is deterministic, and its file starts the network."""

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, Subset

from ccnn.data.synthetic import SyntheticShapes
from ccnn.data.transforms import collate, normalize
from ccnn.engine import seeded
from ccnn.models import SmallSegNet, build_model
from ccnn.pretrain import PretrainConfig, pretrain

TINY = {"images": 48, "val_images": 16, "batch_size": 16, "image_size": 32}


def training_loss(features: nn.Module, head: nn.Linear, cfg: PretrainConfig) -> float:
    """Cross-entropy of the shape classifier on the pretraining images, computed here."""
    data = SyntheticShapes("pretrain", cfg.images, image_size=cfg.image_size, max_objects=1,
                           seed=cfg.seed)
    batch = next(iter(DataLoader(Subset(data, range(cfg.images)), batch_size=cfg.images,
                                 collate_fn=collate)))
    labels = torch.stack([s[1:].argmax() for s in batch["sizes"]])
    assert (batch["sizes"][:, 1:] > 0).sum(1).eq(1).all()  # one object: one label per image
    features.eval()
    with torch.no_grad():
        logits = head(features(normalize(batch["image"])).mean((2, 3)))
    return nn.functional.cross_entropy(logits, labels).item()


def test_pretraining_lowers_the_classification_loss_and_loads_into_the_network(tmp_path):
    cfg = PretrainConfig(epochs=4, lr=2e-3, **TINY)
    rng_state = torch.get_rng_state()
    result = pretrain(cfg, tmp_path / "bb.pt", progress_bar=False, log=lambda m: None)
    assert torch.equal(torch.get_rng_state(), rng_state)  # the global generator is untouched
    assert [h["epoch"] for h in result["history"]] == [1, 2, 3, 4]
    saved = torch.load(tmp_path / "bb.pt")
    head = nn.Linear(96, 5)
    head.load_state_dict(saved["head"])
    net = build_model("small", 6, backbone_weights=tmp_path / "bb.pt")
    for k, v in saved["state_dict"].items():
        assert torch.equal(net.state_dict()[k], v), k
    with seeded(cfg.seed):  # the weights pretraining started from
        start = SmallSegNet(6)
        start_head = nn.Linear(96, 5)
    assert training_loss(net.features, head, cfg) < training_loss(start.features, start_head, cfg)


def test_pretraining_is_deterministic(tmp_path):
    cfg = PretrainConfig(epochs=1, **TINY)
    a = pretrain(cfg, tmp_path / "a.pt", progress_bar=False, log=lambda m: None)
    b = pretrain(cfg, tmp_path / "b.pt", progress_bar=False, log=lambda m: None)
    assert a["accuracy"] == b["accuracy"]
    sa, sb = (torch.load(tmp_path / f"{k}.pt")["state_dict"] for k in "ab")
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


def test_a_backbone_of_another_width_is_refused(tmp_path):
    pretrain(PretrainConfig(epochs=1, **TINY), tmp_path / "bb.pt", progress_bar=False,
             log=lambda m: None)
    with pytest.raises(ValueError, match=r"bb.pt do not fit small: .*wrong shapes"):
        SmallSegNet(6, width=8, backbone_weights=tmp_path / "bb.pt")


@pytest.mark.parametrize(("field", "value"), [("images", 0), ("epochs", 0), ("lr", 0.0)])
def test_bad_settings_are_named(field, value):
    with pytest.raises(ValueError, match=f"pretrain {field}"):
        PretrainConfig(**{field: value})


def test_command_line_writes_the_file_and_names_bad_settings(tmp_path, capsys):
    from ccnn.cli import main

    out = tmp_path / "bb.pt"
    assert main(["pretrain", "--out", str(out), "--images", "16", "--epochs", "1",
                 "--no-progress"]) == 0
    saved = torch.load(out)
    assert set(saved) == {"state_dict", "head", "accuracy", "config"}
    assert saved["config"]["images"] == 16 and saved["config"]["epochs"] == 1
    printed = capsys.readouterr().out
    assert f"validation accuracy {saved['accuracy']:.3f}" in printed  # the file's accuracy
    assert f"weights in {out}" in printed
    assert main(["pretrain", "--out", str(tmp_path / "x.pt"), "--images", "0"]) == 2
    assert "pretrain images must be at least 1" in capsys.readouterr().err
    assert not (tmp_path / "x.pt").exists()
