"""The refinement stage: tag-restricted CRF pseudo-labels, the relabelled set, training, resume."""

from __future__ import annotations

import json

import pytest
import torch

from ccnn.cli import build_parser, main
from ccnn.commands import config_from_args
from ccnn.constraints import tag_bounds
from ccnn.crf import CRFParams, crf_refine
from ccnn.criteria import build_criterion
from ccnn.data.synthetic import SyntheticShapes
from ccnn.inference import load_checkpoint
from ccnn.latent import solve_latent
from ccnn.refine import RelabelledDataset, pseudo_labels, restrict_to_tags
from ccnn.train import BEFORE_REFINE, REFINE_LABELS, TrainConfig, lr_factor, split_dataset, train

TINY = {"model": "small", "lr": 3e-3, "optimizer": "adam", "train_size": 16, "val_size": 8,
        "batch_size": 8, "dataset_options": {"image_size": 32}, "overlays": 2}


def _quiet(message: str) -> None:
    pass


def test_untagged_classes_never_win_and_tagged_ones_keep_their_scores():
    scores = torch.tensor([[[[0.0]], [[5.0]], [[1.0]], [[2.0]]]])  # class 1 wins unrestricted
    tags = torch.tensor([[0, 0, 1, 1]])
    out = restrict_to_tags(scores, tags, background=0)
    assert out[0, :, 0, 0].argmax() == 3  # class 3 now: 1 is not tagged
    assert out[0, 0, 0, 0] == 0 and out[0, 2, 0, 0] == 1 and out[0, 3, 0, 0] == 2
    assert torch.softmax(out, 1)[0, 1, 0, 0] == 0  # suppressed exactly, as CCNN's constraint
    no_background = restrict_to_tags(scores, tags, background=None)
    assert torch.softmax(no_background, 1)[0, 0, 0, 0] == 0
    with pytest.raises(ValueError, match="tags have shape"):
        restrict_to_tags(scores, torch.tensor([[1, 1]]), background=0)


def test_pseudo_labels_are_the_argmax_of_the_restricted_crf():
    torch.manual_seed(0)
    images = torch.randint(0, 256, (2, 3, 12, 12), dtype=torch.uint8)
    scores = torch.randn(2, 4, 12, 12) * 3
    tags = torch.tensor([[1, 0, 1, 0], [1, 1, 0, 1]])
    plain = pseudo_labels(scores, images, tags, background=0, crf=None)
    assert plain.dtype == torch.uint8
    expected = scores.clone()
    expected[0, [1, 3]] = -1e9
    expected[1, 2] = -1e9
    assert torch.equal(plain.long(), expected.argmax(1))
    refined = pseudo_labels(scores, images, tags, background=0)
    # the CRF on the allowed classes' scores alone, then their indices: the suppressed classes
    # have probability zero, so they neither win nor send messages
    for b, allowed in enumerate(([0, 2], [0, 1, 3])):
        alone = crf_refine(images[b:b + 1], scores[b:b + 1, allowed], CRFParams()).argmax(1)[0]
        assert torch.equal(refined[b].long(), torch.tensor(allowed)[alone])
    assert set(refined[0].unique().tolist()) <= {0, 2} and 2 not in refined[1].unique().tolist()


@pytest.mark.parametrize("background", [0, None])
def test_pseudo_labels_equal_the_crf_over_every_class(background):
    """The CRF run on each image's allowed classes alone gives the maps of the CRF over all
    classes with the untagged ones suppressed (the plain composition), to the bit — also for
    an image without tags and batches mixing two, three and four allowed classes."""
    g = torch.Generator().manual_seed(3)
    images = torch.randint(0, 256, (6, 3, 10, 11), dtype=torch.uint8, generator=g)
    scores = torch.randn(6, 5, 10, 11, generator=g) * 4
    tags = torch.tensor([[0, 1, 0, 0, 0], [0, 0, 1, 1, 0], [0, 1, 1, 0, 1], [0, 0, 0, 0, 0],
                         [0, 0, 0, 1, 0], [1, 1, 1, 1, 1]])
    full = crf_refine(images, restrict_to_tags(scores, tags, background), CRFParams()).argmax(1)
    ours = pseudo_labels(scores, images, tags, background)
    assert ours.dtype == torch.uint8
    assert torch.equal(ours.long(), full)
    assert (ours[3] == 0).all()  # no tag: the background, or class 0 when nothing is allowed


@pytest.mark.parametrize("method", ["ccnn", "ccnn-size", "ccnn-size-exact"])
def test_the_refinement_gradient_is_the_tag_p_steps_plus_the_labels(method):
    """d loss / d logits = (Q − P)/(B·N) with P from the *tag* bounds (sizes never reach the
    stage), plus (Q − onehot(label))/(labelled pixels) from the labels' cross-entropy."""
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(2, 3, 4, 4, dtype=torch.float64, generator=g).requires_grad_()
    mask = torch.randint(0, 3, (2, 4, 4), generator=g)
    mask[0, 0, :2] = 255  # void: no cross-entropy there
    batch = {"tags": torch.tensor([[1, 1, 0], [1, 0, 1]]), "mask": mask,
             "sizes": torch.tensor([[0.95, 0.05, 0.0], [0.9, 0.0, 0.1]])}  # small classes
    loss, stats = build_criterion(method, 3, 0).refinement()(logits, batch)
    loss.backward()
    Q = torch.softmax(logits.detach(), 1)
    P = solve_latent(logits.detach(), *tag_bounds(batch["tags"], 3)).P
    onehot = torch.nn.functional.one_hot(mask.clamp(max=2), 3).permute(0, 3, 1, 2).double()
    labelled = (mask != 255)[:, None]
    expected = (Q - P) / (2 * 16) + (Q - onehot) * labelled / labelled.sum()
    torch.testing.assert_close(logits.grad, expected, atol=1e-9, rtol=0)
    assert stats["p_seconds"] > 0


def test_kept_sizes_reach_the_refinement_p_step_as_the_bit():
    """``refine_sizes``: the stage's P-step takes ccnn-size's one-bit bounds (class 1 is under
    the 10% threshold in image 0, so CCNN's rule makes it absent there), not the tags'."""
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(2, 3, 4, 4, dtype=torch.float64, generator=g).requires_grad_()
    mask = torch.full((2, 4, 4), 255)  # no labelled pixel: the P-step's gradient alone
    batch = {"tags": torch.tensor([[1, 1, 0], [1, 0, 1]]), "mask": mask,
             "sizes": torch.tensor([[0.95, 0.05, 0.0], [0.7, 0.0, 0.3]])}
    criterion = build_criterion("ccnn-size", 3, 0).refinement(keep_sizes=True)
    criterion(logits, batch)[0].backward()
    Q = torch.softmax(logits.detach(), 1)
    bit = tag_bounds(batch["tags"], 3, large=batch["sizes"] >= 0.1)
    P = solve_latent(logits.detach(), *bit).P
    torch.testing.assert_close(logits.grad, (Q - P) / (2 * 16), atol=1e-9, rtol=0)
    assert bit.upper[0, 1] == 0.0  # the bit made class 1 absent in image 0
    tags_only = solve_latent(logits.detach(), *tag_bounds(batch["tags"], 3)).P
    assert not torch.allclose(P, tags_only, atol=1e-3)


def test_a_size_run_keeps_its_bit_in_the_refinement_stage(tmp_path):
    cfg = TrainConfig(method="ccnn-size", epochs=1, refine_epochs=1, refine_sizes=True, **TINY)
    summary = train(cfg, tmp_path, report=False, progress_bar=False, log=_quiet)
    assert [r["stage"] for r in summary["history"]] == ["train", "refine"]
    saved = torch.load(tmp_path / "checkpoint.pt", weights_only=True)["config"]
    assert saved["refine_sizes"] is True


def test_relabelled_dataset_swaps_the_masks_only():
    data = SyntheticShapes("train", 3, image_size=16)
    labels = {data[i]["name"]: torch.full((16, 16), i, dtype=torch.uint8) for i in range(3)}
    relabelled = RelabelledDataset(data, labels)
    assert len(relabelled) == 3 and relabelled.num_classes == data.num_classes
    sample = relabelled[2]
    assert sample["mask"].dtype == torch.int64 and bool((sample["mask"] == 2).all())
    assert torch.equal(sample["tags"], data[2]["tags"]) and torch.equal(sample["image"],
                                                                        data[2]["image"])
    with pytest.raises(KeyError, match="no refinement label"):
        RelabelledDataset(data, {})[0]


def test_refinement_stage_trains_on_tag_restricted_labels(tmp_path, miou_of):
    cfg = TrainConfig(method="ccnn", epochs=2, refine_epochs=1, **TINY)
    summary = train(cfg, tmp_path, report=False, progress_bar=False, log=_quiet)
    stages = [r["stage"] for r in summary["history"]]
    assert stages == ["train", "train", "refine"]
    refine = summary["history"][-1]
    assert refine["p_seconds"] > 0  # the constraints keep acting in the refinement stage
    labels = torch.load(tmp_path / REFINE_LABELS, weights_only=True)
    data = SyntheticShapes("train", 16, image_size=32)
    assert set(labels) == {data[i]["name"] for i in range(16)}
    for i in range(16):
        present = set(labels[data[i]["name"]].unique().tolist())
        allowed = {0} | set(data[i]["tags"].nonzero().flatten().tolist())
        assert present <= allowed, data[i]["name"]
    logged = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [r["stage"] for r in logged] == stages
    # the P/Q stage's last checkpoint is kept: its validation mIoU is the one logged then
    before = load_checkpoint(tmp_path / BEFORE_REFINE)[0]
    assert logged[1]["val_miou"] == pytest.approx(miou_of(before, split_dataset(cfg, "val", 8)))


class _StopError(Exception):
    pass


def test_resume_inside_the_refinement_stage_matches_an_uninterrupted_run(tmp_path):
    cfg = TrainConfig(method="ccnn-size", epochs=1, refine_epochs=2, refine_lr=1e-3, **TINY)
    train(cfg, tmp_path / "whole", report=False, progress_bar=False, log=_quiet)

    def stop_after_the_first_refine_epoch(message: str) -> None:
        if "refine epoch 2/3" in message:
            raise _StopError

    with pytest.raises(_StopError):
        train(cfg, tmp_path / "cut", report=False, progress_bar=False,
              log=stop_after_the_first_refine_epoch)
    train(cfg, tmp_path / "cut", resume=True, report=False, progress_bar=False, log=_quiet)
    whole = torch.load(tmp_path / "whole" / "checkpoint.pt", weights_only=True)
    cut = torch.load(tmp_path / "cut" / "checkpoint.pt", weights_only=True)
    for key, value in whole["model"].items():
        assert torch.equal(value, cut["model"][key]), key

    (tmp_path / "cut" / REFINE_LABELS).unlink()  # the labels are needed to resume inside
    cut_state = torch.load(tmp_path / "cut" / "checkpoint.pt", weights_only=True)
    cut_state["epoch"] = 2
    torch.save(cut_state, tmp_path / "cut" / "checkpoint.pt")
    with pytest.raises(FileNotFoundError, match="refinement stage's labels"):
        train(cfg, tmp_path / "cut", resume=True, report=False, progress_bar=False, log=_quiet)


def test_refinement_restarts_the_learning_rate_on_its_own_schedule():
    pq = TrainConfig(method="ccnn", epochs=2, refine_epochs=1, lr=1e-3)
    restarted = TrainConfig(method="ccnn", epochs=2, refine_epochs=1, lr=1e-3, refine_lr=5e-4)
    steady = TrainConfig(method="ccnn", epochs=2, refine_epochs=1, lr=1e-3, refine_lr=5e-4,
                         schedule="constant")
    one, two, three = (lr_factor(c, steps_per_epoch=4) for c in (pq, restarted, steady))
    for step in range(13):  # 8 P/Q steps, then 4 refinement steps; 12 is the end
        whole = (1 - step / 12) ** 0.9
        assert one(step) == pytest.approx(whole)
        stage = 0.5 * (1 - (step - 8) / 4) ** 0.9 if step >= 8 else whole
        assert two(step) == pytest.approx(stage)
        assert three(step) == (0.5 if step >= 8 else 1.0)


def test_the_logged_learning_rate_restarts_with_the_refinement_stage(tmp_path):
    cfg = TrainConfig(method="ccnn", epochs=2, refine_epochs=2, refine_lr=1e-3, **TINY)
    history = train(cfg, tmp_path, report=False, progress_bar=False, log=_quiet)["history"]
    # TINY: 16 images in batches of 8, two steps per epoch, 8 in all; a record holds the rate
    # of the next step: lr 3e-3 decaying over the 8, then from step 4 on 1e-3 over the last 4
    expected = [3e-3 * (1 - 2 / 8) ** 0.9, 1e-3, 1e-3 * (1 - 2 / 4) ** 0.9, 0.0]
    assert [r["lr"] for r in history] == pytest.approx(expected)


def test_refinement_is_refused_for_full_and_negative_epochs():
    with pytest.raises(ValueError, match="full trains on the masks"):
        TrainConfig(method="full", refine_epochs=1)
    with pytest.raises(ValueError, match="full trains on the masks"):
        build_criterion("full", 3, 0).refinement()
    with pytest.raises(ValueError, match="refine_epochs must be >= 0"):
        TrainConfig(method="ccnn", refine_epochs=-1)
    with pytest.raises(ValueError, match="refine_lr must be positive"):
        TrainConfig(method="ccnn", refine_epochs=1, refine_lr=0.0)


def test_cli_sets_the_refinement_stage(tmp_path, capsys):
    args = build_parser().parse_args(["train", "--method", "ccnn", "--refine-epochs", "2",
                                      "--refine-lr", "2e-4"])
    assert config_from_args(args).refine_epochs == 2
    assert config_from_args(args).refine_lr == 2e-4
    assert config_from_args(args).refine_sizes is False
    sizes = build_parser().parse_args(["train", "--method", "ccnn-size", "--refine-sizes"])
    assert config_from_args(sizes).refine_sizes is True
    assert main(["train", "--method", "full", "--refine-epochs", "1",
                 "--out", str(tmp_path / "f")]) == 2
    assert "full trains on the masks" in capsys.readouterr().err
    assert not (tmp_path / "f").exists()


def test_resume_reads_checkpoints_written_before_the_refinement_stage_existed(tmp_path):
    cfg = TrainConfig(method="ccnn", epochs=1, **TINY)
    train(cfg, tmp_path, report=False, progress_bar=False, log=_quiet)
    state = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    del state["config"]["refine_epochs"]  # as an older version wrote it
    torch.save(state, tmp_path / "checkpoint.pt")
    longer = TrainConfig(method="ccnn", epochs=2, **TINY)
    summary = train(longer, tmp_path, resume=True, report=False, progress_bar=False, log=_quiet)
    assert [r["epoch"] for r in summary["history"]] == [0, 1]
    with pytest.raises(ValueError, match="other settings: refine_epochs=0"):
        train(TrainConfig(method="ccnn", epochs=2, refine_epochs=1, **TINY), tmp_path,
              resume=True, report=False, progress_bar=False, log=_quiet)
