"""Backbone pretraining: it learns, it is deterministic, and its file starts the network; on a
dataset's own training tags too (VOC and CamVid fixtures in their real layouts)."""

import math
import re

import numpy as np
import pytest
import torch
from test_datasets import _write_camvid, _write_voc
from torch import nn
from torch.utils.data import DataLoader, Subset

from ccnn.data import build_dataset
from ccnn.data.synthetic import SyntheticShapes
from ccnn.data.transforms import collate, normalize
from ccnn.engine import seeded
from ccnn.models import SmallSegNet, build_model
from ccnn.pretrain import PretrainConfig, _Classifier, average_precision, pretrain, tag_metrics

TINY = {"images": 48, "val_images": 16, "batch_size": 16, "image_size": 32}


def training_loss(features: nn.Module, head: nn.Linear, cfg: PretrainConfig) -> float:
    """Cross-entropy of the shape classifier on the pretraining images, computed here with
    ``cfg.pool``'s global pooling (max or mean over the positions)."""
    data = SyntheticShapes("pretrain", cfg.images, image_size=cfg.image_size, max_objects=1,
                           seed=cfg.seed)
    batch = next(iter(DataLoader(Subset(data, range(cfg.images)), batch_size=cfg.images,
                                 collate_fn=collate)))
    labels = torch.stack([s[1:].argmax() for s in batch["sizes"]])
    assert (batch["sizes"][:, 1:] > 0).sum(1).eq(1).all()  # one object: one label per image
    features.eval()
    with torch.no_grad():
        maps = features(normalize(batch["image"]))
        logits = head(maps.amax((2, 3)) if cfg.pool == "max" else maps.mean((2, 3)))
    return nn.functional.cross_entropy(logits, labels).item()


@pytest.mark.parametrize("pool", ["max", "mean"])
def test_the_classifier_pools_each_feature_over_the_positions(pool):
    """The classifier's global pooling, written here as a loop over the feature maps."""
    with seeded(0):
        net = SmallSegNet(6, width=4)
        images = torch.randn(2, 3, 24, 24)
    classifier = _Classifier(net, 5, pool)
    classifier.eval()
    with torch.no_grad():
        maps = net.features(images)
        pooled = torch.tensor([[float(maps[b, c].max() if pool == "max" else maps[b, c].mean())
                                for c in range(maps.shape[1])] for b in range(2)])
        expected = pooled @ classifier.head.weight.T + classifier.head.bias
        assert torch.allclose(classifier(images), expected, atol=1e-6)
        other = maps.mean((2, 3)) if pool == "max" else maps.amax((2, 3))
        assert not torch.allclose(classifier(images), classifier.head(other), atol=1e-3)


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


@pytest.mark.parametrize(("field", "value"), [("images", 0), ("epochs", 0), ("lr", 0.0),
                                              ("dataset", "imagenet"), ("pool", "median"),
                                              ("crop", 0)])
def test_bad_settings_are_named(field, value):
    with pytest.raises(ValueError, match=f"pretrain {field}"):
        PretrainConfig(**{field: value})


@pytest.mark.parametrize(("dataset", "given", "expected"), [
    ("synthetic", None, (16, "max")), ("voc", None, (32, "mean")), ("camvid", None, (32, "mean")),
    ("synthetic", (8, "mean"), (8, "mean")), ("voc", (4, "max"), (4, "max"))])
def test_the_batch_size_and_pooling_default_by_source(dataset, given, expected):
    """Batches of 16 and max pooling on the synthetic shapes (stops 29 and 30), 32 and mean
    pooling on a dataset's own tags (the recipe of docs/generality.md), given ones as given;
    a batch of 0 is refused like the other counts."""
    batch_size, pool = given or (None, None)
    cfg = PretrainConfig(dataset=dataset, batch_size=batch_size, pool=pool)
    assert (cfg.batch_size, cfg.pool) == expected
    with pytest.raises(ValueError, match="pretrain batch_size"):
        PretrainConfig(dataset=dataset, batch_size=0)


def test_command_line_writes_the_file_and_names_bad_settings(tmp_path, capsys):
    from ccnn.cli import main

    out = tmp_path / "bb.pt"
    assert main(["pretrain", "--out", str(out), "--images", "16", "--epochs", "1",
                 "--no-progress"]) == 0
    saved = torch.load(out)
    assert set(saved) == {"state_dict", "head", "accuracy", "metrics", "config"}
    assert saved["config"]["images"] == 16 and saved["config"]["epochs"] == 1
    printed = capsys.readouterr().out
    assert f"validation accuracy {saved['accuracy']:.3f}" in printed  # the file's accuracy
    assert f"weights in {out}" in printed
    assert main(["pretrain", "--out", str(tmp_path / "x.pt"), "--images", "0"]) == 2
    assert "pretrain images must be at least 1" in capsys.readouterr().err
    assert not (tmp_path / "x.pt").exists()


# -- average precision ----------------------------------------------------------------------------

def test_average_precision_by_hand():
    scores = torch.tensor([[0.9, 0.5, 0.3], [0.8, 0.5, 0.2], [0.7, 0.1, 0.1], [0.6, 0.0, 0.0]])
    targets = torch.tensor([[1, 1, 0], [0, 0, 0], [1, 1, 0], [0, 0, 0]])
    ap = average_precision(scores, targets)
    # column 0: positives at ranks 1 and 3: (1/1 + 2/3) / 2
    assert ap[0].item() == pytest.approx((1 + 2 / 3) / 2)
    # column 1: a tie at 0.5 between a positive and a negative counts together: (1/2 + 2/3) / 2
    assert ap[1].item() == pytest.approx((1 / 2 + 2 / 3) / 2)
    assert math.isnan(ap[2].item())  # no positive
    with pytest.raises(ValueError, match="scores and targets"):
        average_precision(scores, targets[:, :2])


def test_tag_metrics_by_hand():
    logits = torch.tensor([[2.0, -1.0, -3.0], [-1.0, 1.0, -2.0], [1.0, 0.5, -1.0]])
    tags = torch.tensor([[1, 0, 0], [0, 1, 0], [0, 1, 0]])
    m = tag_metrics(logits, tags)
    # columns 0 and 1 have positives; column 2 none: left out of mAP and tag accuracy
    assert m["map"] == pytest.approx((1.0 + 1.0) / 2)  # both ranked perfectly
    assert m["tag_accuracy"] == pytest.approx(5 / 6)  # image 3 wrongly tags class 0
    assert m["accuracy"] == pytest.approx(2 / 3)


# -- on a dataset's own tags ---------------------------------------------------------------------

def _independent_tag_logits(path, dataset, columns):
    """Logits of the saved classifier on every image, computed here: features, mean over
    positions, the head."""
    saved = torch.load(path)
    net = build_model("small", dataset.num_classes, backbone_weights=path).eval()
    head = nn.Linear(96, len(columns))
    head.load_state_dict(saved["head"])
    with torch.no_grad():
        return torch.cat([head(net.features(normalize(dataset[i]["image"][None])).mean((2, 3)))
                          for i in range(len(dataset))])


def _numpy_bce(logits: torch.Tensor, targets: torch.Tensor) -> float:
    x, t = logits.double().numpy(), targets.double().numpy()
    p = 1 / (1 + np.exp(-x))
    return float(np.mean(-(t * np.log(p) + (1 - t) * np.log(1 - p))))


@pytest.mark.parametrize("name", ["voc", "camvid"])
def test_pretraining_on_a_datasets_tags_fits_them_and_reports_its_metrics(tmp_path, name):
    (_write_voc if name == "voc" else _write_camvid)(tmp_path)
    columns = list(range(1, 21)) if name == "voc" else list(range(11))  # no background column
    cfg = PretrainConfig(dataset=name, data_root=str(tmp_path), epochs=20, lr=5e-3,
                         batch_size=2)
    result = pretrain(cfg, tmp_path / "bb.pt", progress_bar=False, log=lambda m: None)
    saved = torch.load(tmp_path / "bb.pt")
    assert saved["head"]["weight"].shape == (len(columns), 96)
    assert saved["config"]["dataset"] == name
    train_set, val_set = (build_dataset(name, split, tmp_path) for split in ("train", "val"))
    # the file's validation metrics are those of its weights on the val split
    val_logits = _independent_tag_logits(tmp_path / "bb.pt", val_set, columns)
    val_tags = torch.stack([s["tags"] for s in val_set])[:, columns]
    expected = tag_metrics(val_logits, val_tags)
    assert saved["metrics"]["map"] == pytest.approx(expected["map"], abs=1e-5)
    assert result["accuracy"] == saved["accuracy"] == pytest.approx(expected["accuracy"])
    # it fits the training tags: the BCE, computed here, fell from the starting weights'
    train_tags = torch.stack([s["tags"] for s in train_set])[:, columns]
    after = _numpy_bce(_independent_tag_logits(tmp_path / "bb.pt", train_set, columns),
                       train_tags)
    with seeded(cfg.seed):
        start = SmallSegNet(train_set.num_classes)
        start_head = nn.Linear(96, len(columns))
    start.eval()
    with torch.no_grad():
        before_logits = torch.cat([start_head(start.features(normalize(s["image"][None]))
                                              .mean((2, 3))) for s in train_set])
    assert after < 0.5 * _numpy_bce(before_logits, train_tags)


def test_dataset_pretraining_is_deterministic_and_leaves_the_global_generator(tmp_path):
    _write_voc(tmp_path)
    cfg = PretrainConfig(dataset="voc", data_root=str(tmp_path), epochs=2, batch_size=1,
                         pool="max", crop=8)
    state = torch.get_rng_state()
    a = pretrain(cfg, tmp_path / "a.pt", progress_bar=False, log=lambda m: None)
    b = pretrain(cfg, tmp_path / "b.pt", progress_bar=False, log=lambda m: None)
    assert torch.equal(torch.get_rng_state(), state)
    assert a["history"] == b["history"]
    sa, sb = (torch.load(tmp_path / f"{k}.pt")["state_dict"] for k in "ab")
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


def test_command_line_pretrains_on_a_dataset(tmp_path, capsys):
    from ccnn.cli import main

    _write_voc(tmp_path)
    out = tmp_path / "bb.pt"
    assert main(["pretrain", "--dataset", "voc", "--data-root", str(tmp_path), "--out",
                 str(out), "--epochs", "1", "--no-progress"]) == 0
    saved = torch.load(out)
    printed = capsys.readouterr().out
    assert re.search(rf"tag mAP {saved['metrics']['map']:.3f}, tag accuracy "
                     rf"{saved['metrics']['tag_accuracy']:.3f}", printed)
    assert saved["config"]["dataset"] == "voc" and saved["config"]["data_root"] == str(tmp_path)
    assert main(["pretrain", "--dataset", "voc", "--data-root", str(tmp_path), "--images", "5",
                 "--out", str(tmp_path / "x.pt")]) == 2
    assert "--images sets the synthetic pretraining set's size" in capsys.readouterr().err
    assert main(["pretrain", "--dataset", "voc", "--data-root", str(tmp_path / "nowhere"),
                 "--out", str(tmp_path / "x.pt")]) == 2
    assert "data root" in capsys.readouterr().err


def test_multilabel_losses_by_hand():
    from ccnn.pretrain import MultiLabelCriterion, tag_columns

    columns = tag_columns(4, background=0)
    assert columns.tolist() == [1, 2, 3] and tag_columns(3, None).tolist() == [0, 1, 2]
    logits = torch.tensor([[1.0, -2.0, 0.5], [0.0, 3.0, -1.0]])
    batch = {"tags": torch.tensor([[1.0, 1.0, 0.0, 1.0], [1.0, 0.0, 1.0, 0.0]])}
    x = logits.double().numpy()
    t = np.array([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]])
    bce = np.mean(np.log1p(np.exp(-x)) * t + np.log1p(np.exp(x)) * (1 - t))
    loss, stats = MultiLabelCriterion(columns, "bce")(logits, batch)
    assert loss.item() == pytest.approx(bce, rel=1e-6) and stats["loss"] == pytest.approx(bce)
    log_p = x - np.log(np.exp(x).sum(1, keepdims=True))
    softmax = -np.mean([0.5 * log_p[0, 0] + 0.5 * log_p[0, 2], log_p[1, 1]])
    loss, _ = MultiLabelCriterion(columns, "softmax")(logits, batch)
    assert loss.item() == pytest.approx(softmax, rel=1e-6)
    with pytest.raises(ValueError, match="loss must be one of"):
        MultiLabelCriterion(columns, "hinge")


def test_pretraining_on_tags_can_start_from_another_backbone(tmp_path):
    pretrain(PretrainConfig(epochs=1, seed=3, **TINY), tmp_path / "shapes.pt",
             progress_bar=False, log=lambda m: None)
    _write_voc(tmp_path)
    cfg = PretrainConfig(dataset="voc", data_root=str(tmp_path), epochs=1, lr=1e-12,
                         init=str(tmp_path / "shapes.pt"))
    pretrain(cfg, tmp_path / "adapted.pt", progress_bar=False, log=lambda m: None)
    start = torch.load(tmp_path / "shapes.pt")["state_dict"]
    adapted = torch.load(tmp_path / "adapted.pt")["state_dict"]
    with seeded(cfg.seed):
        random_start = SmallSegNet(21).state_dict()
    conv = "features.0.0.weight"
    assert torch.allclose(adapted[conv], start[conv], atol=1e-8)  # a step of 1e-12 from it
    assert not torch.allclose(adapted[conv], random_start[conv], atol=1e-3)
