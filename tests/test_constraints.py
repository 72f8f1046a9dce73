"""Constraints from tags, region constraints and box maps, against hand-written values."""

import math

import pytest
import torch

from ccnn.constraints import RegionConstraints, box_weights, size_bits, tag_bounds

INF = math.inf


def test_tag_bounds_match_ccnn_constants():
    # image 0: background + classes 2 and 3; image 1: background only.
    tags = torch.tensor([[1, 0, 1, 1], [1, 0, 0, 0]])
    lower, upper, slack = tag_bounds(tags)
    assert lower.tolist() == [[0.3, 0.0, 0.05, 0.05], [0.3, 0.0, 0.0, 0.0]]
    # The background upper bound applies only when a foreground tag is present.
    assert upper.tolist() == [[0.7, 0.0, 1.0, 1.0], [1.0, 0.0, 0.0, 0.0]]
    assert slack.tolist() == [[INF, INF, 2.0, 2.0], [INF, INF, INF, INF]]


def test_index_lists_equal_multi_hot_tags():
    as_lists = tag_bounds([[0, 2, 3], [0]], num_classes=4)
    as_tensor = tag_bounds(torch.tensor([[1, 0, 1, 1], [1, 0, 0, 0]]))
    for a, b in zip(as_lists, as_tensor, strict=True):
        assert torch.equal(a, b)


def test_background_is_present_even_without_its_tag():
    lower, upper, _ = tag_bounds([[1]], num_classes=3)
    assert lower.tolist() == [[0.3, 0.05, 0.0]]
    assert upper.tolist() == [[0.7, 1.0, 0.0]]


def test_size_information_changes_the_bounds():
    tags = torch.tensor([[1, 1, 1, 0]])
    sizes = torch.tensor([[0.6, 0.35, 0.05, 0.0]])
    lower, upper, slack = tag_bounds(tags, sizes=sizes)
    # class 2 covers 5% < 10%: treated as absent; class 1 gets the larger lower bound.
    assert lower.tolist() == [[0.2, 0.1, 0.0, 0.0]]
    assert upper.tolist() == [[0.7, 1.0, 0.0, 0.0]]
    assert slack[0, 1] == 2.0 and math.isinf(slack[0, 0])


def test_size_scale_asks_each_class_for_a_share_of_its_size():
    tags = torch.tensor([[1, 1, 1, 1, 0]])
    sizes = torch.tensor([[0.5, 0.3, 0.04, 0.16, 0.0]])
    lower, upper, slack = tag_bounds(tags, sizes=sizes, size_threshold=0.02, size_fg_scale=1.2)
    # by hand: max(0.1, 1.2·size) for the tagged classes; background keeps [0.2, 0.7]
    assert torch.allclose(lower, torch.tensor([[0.2, 0.36, 0.1, 0.192, 0.0]], dtype=lower.dtype))
    assert upper.tolist() == [[0.7, 1.0, 1.0, 1.0, 0.0]]
    assert slack[0, 1:4].tolist() == [2.0, 2.0, 2.0]
    lower, _, _ = tag_bounds(tags, sizes=sizes, size_threshold=0.02, size_fg_lower=0.0,
                             size_fg_scale=3.0)
    assert torch.allclose(lower[0, 1:4], torch.tensor([0.9, 0.12, 0.48], dtype=lower.dtype))
    lower, _, _ = tag_bounds(tags, sizes=torch.tensor([[0.1, 0.5, 0.2, 0.2, 0.0]]),
                             size_fg_scale=3.0)
    assert lower[0, 1] == 1.0  # a lower bound never exceeds the whole image


def test_one_size_bit_with_ccnns_rule_small_means_absent():
    # image 0: classes 1 and 3 large, class 2 tagged but small; image 1: only a small class
    tags = torch.tensor([[1, 1, 1, 1, 0], [1, 0, 1, 0, 0]])
    large = torch.tensor([[True, True, False, True, False], [False, False, False, False, False]])
    lower, upper, slack = tag_bounds(tags, large=large)
    # by hand, CCNN's constants: large ≥ 0.1 (slack 2), small suppressed (hard), background in
    # [0.2, 0.7] with a large class, [0.2, 1] without one
    assert lower.tolist() == [[0.2, 0.1, 0.0, 0.1, 0.0], [0.2, 0.0, 0.0, 0.0, 0.0]]
    assert upper.tolist() == [[0.7, 1.0, 0.0, 1.0, 0.0], [1.0, 0.0, 0.0, 0.0, 0.0]]
    assert slack.tolist() == [[INF, 2.0, INF, 2.0, INF], [INF, INF, INF, INF, INF]]


def test_one_size_bit_with_small_means_at_most_the_threshold():
    tags = torch.tensor([[1, 1, 1, 1, 0], [1, 0, 1, 0, 0]])
    large = torch.tensor([[1, 1, 0, 1, 0], [0, 0, 0, 0, 0]])
    lower, upper, slack = tag_bounds(tags, large=large, small_rule="at-most", size_threshold=0.15,
                                     size_fg_lower=0.25, fg_slack=3.0)
    # by hand: the small class stays, at most 0.15 with the foreground slack; the background's
    # upper bound needs a large class
    assert lower.tolist() == [[0.2, 0.25, 0.0, 0.25, 0.0], [0.2, 0.0, 0.0, 0.0, 0.0]]
    assert upper.tolist() == [[0.7, 1.0, 0.15, 1.0, 0.0], [1.0, 0.0, 0.15, 0.0, 0.0]]
    assert slack.tolist() == [[INF, 3.0, 3.0, 3.0, INF], [INF, INF, 3.0, INF, INF]]


def test_a_small_class_can_get_a_floor_under_at_most():
    tags = torch.tensor([[1, 1, 1, 0]])
    large = torch.tensor([[1, 1, 0, 0]])
    lower, upper, slack = tag_bounds(tags, large=large, small_rule="at-most", size_threshold=0.1,
                                     size_small_lower=0.03, size_fg_lower=0.2)
    # by hand: the small class in [0.03, 0.1], the large one at least 0.2, both with slack 2
    assert lower.tolist() == [[0.2, 0.2, 0.03, 0.0]]
    assert upper.tolist() == [[0.7, 1.0, 0.1, 0.0]]
    assert slack.tolist() == [[INF, 2.0, 2.0, INF]]
    with pytest.raises(ValueError, match=r"size_small_lower=0\.2 > size_threshold=0\.1"):
        tag_bounds(tags, large=large, small_rule="at-most", size_small_lower=0.2)
    with pytest.raises(ValueError, match="needs small_rule='at-most'"):
        tag_bounds(tags, large=large, size_small_lower=0.03)


def test_the_bit_is_the_size_against_the_threshold_and_nothing_more():
    sizes = torch.tensor([[0.5, 0.3, 0.05, 0.15], [0.9, 0.0, 0.1, 0.0]])
    assert size_bits(sizes, 0.1).tolist() == [[True, True, False, True], [True, False, True, False]]
    tags = (sizes > 0).long()
    # measured sizes with CCNN's rule (size_fg_scale 0) are the bit: the same bounds
    one_bit = tag_bounds(tags, large=size_bits(sizes, 0.1))
    measured = tag_bounds(tags, sizes=sizes)
    for a, b in zip(one_bit, measured, strict=True):
        assert torch.equal(a, b)
    # other sizes with the same bits give the same bounds
    other = tag_bounds(tags, large=size_bits(torch.tensor([[0.2, 0.9, 0.0, 0.4],
                                                           [0.8, 0.0, 0.3, 0.0]]), 0.1))
    for a, b in zip(one_bit, other, strict=True):
        assert torch.equal(a, b)


def test_without_background_every_tag_is_foreground():
    lower, upper, _ = tag_bounds([[0, 1]], num_classes=3, background=None, fg_lower=0.2)
    assert lower.tolist() == [[0.2, 0.2, 0.0]]
    assert upper.tolist() == [[1.0, 1.0, 0.0]]


def test_constants_are_keyword_arguments():
    lower, upper, slack = tag_bounds([[0, 1]], num_classes=2, bg_lower=0.1, bg_upper=0.5,
                                     fg_lower=0.25, fg_slack=7.0, bg_slack=3.0)
    assert lower.tolist() == [[0.1, 0.25]]
    assert upper.tolist() == [[0.5, 1.0]]
    assert slack.tolist() == [[3.0, 7.0]]


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda: tag_bounds(torch.tensor([[0, 2]])), "only 0 and 1"),
        (lambda: tag_bounds(torch.zeros(2, 3), num_classes=4), "num_classes=4"),
        (lambda: tag_bounds(torch.zeros(3)), r"\(B, L\)"),
        (lambda: tag_bounds([[5]], num_classes=3), "tag 5 of image 0"),
        (lambda: tag_bounds([[1]]), "num_classes is required"),
        (lambda: tag_bounds([[1]], num_classes=2, fg_lower=1.5), "fg_lower"),
        (lambda: tag_bounds([[1]], num_classes=2, fg_slack=-1.0), "fg_slack"),
        (lambda: tag_bounds([[1]], num_classes=2, size_fg_scale=-1.0), "size_fg_scale"),
        (lambda: tag_bounds([[1]], num_classes=2, size_fg_scale=math.inf), "size_fg_scale"),
        (lambda: tag_bounds([[1]], num_classes=2, bg_lower=0.8), "crossed"),
        (lambda: tag_bounds([[1]], num_classes=2, background=4), "background=4"),
        (lambda: tag_bounds([[1]], num_classes=2, sizes=torch.zeros(1, 3)), "sizes must have"),
        (lambda: tag_bounds([[1]], num_classes=2, sizes=torch.full((1, 2), 2.0)), "fractions"),
        (lambda: tag_bounds([[1]], num_classes=2, sizes=torch.ones(1, 2) / 2,
                            large=torch.ones(1, 2)), "not both"),
        (lambda: tag_bounds([[1]], num_classes=2, large=torch.ones(1, 2), size_fg_scale=1.0),
         "size_fg_scale=1.0 needs the measured sizes"),
        (lambda: tag_bounds([[1]], num_classes=2, large=torch.ones(1, 3)), "large must have"),
        (lambda: tag_bounds([[1]], num_classes=2, large=torch.full((1, 2), 2)), "bool or 0/1"),
        (lambda: tag_bounds([[1]], num_classes=2, small_rule="tiny"), "small_rule='tiny'"),
        (lambda: size_bits(torch.zeros(1, 2), 1.5), "size_threshold=1.5"),
    ],
)
def test_tag_bounds_reject_bad_input(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_box_weights_mark_the_box():
    w = box_weights(torch.tensor([[[1, 0, 3, 2]]]), height=3, width=4)
    expected = torch.tensor([[0, 1, 1, 0], [0, 1, 1, 0], [0, 0, 0, 0]], dtype=torch.float32)
    assert torch.equal(w[0, 0], expected)


def test_region_constraints_broadcast_and_normalise():
    w = torch.zeros(2, 1, 2, 2)
    w[:, 0, 0, 0] = 3.0
    w[:, 0, 1, 1] = 1.0
    rc = RegionConstraints(w, classes=torch.tensor([1]), lower=0.5)
    assert rc.classes.shape == (2, 1) and rc.lower.shape == (2, 1)
    assert torch.isinf(rc.slack).all() and (rc.upper == 1).all()
    # Scaled to sum to N = 4: the rows of N·A.
    assert rc.normalized_weights()[0, 0].tolist() == [3.0, 0.0, 0.0, 1.0]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"weights": -torch.ones(1, 1, 2, 2)}, "non-negative"),
        ({"weights": torch.zeros(1, 1, 2, 2)}, "empty region"),
        ({"weights": torch.ones(1, 2, 2)}, r"\(B, R, H, W\)"),
        ({"classes": torch.tensor([0.5])}, "integers"),
        ({"classes": torch.tensor([0, 1, 2])}, "classes has shape"),
        ({"lower": 0.8, "upper": 0.2}, "lower > upper"),
        ({"lower": 1.5}, r"RegionConstraints.lower must lie"),
        ({"slack": -1.0}, r"RegionConstraints.slack must lie"),
    ],
)
def test_region_constraints_reject_bad_input(kwargs, match):
    args = {"weights": torch.ones(1, 1, 2, 2), "classes": torch.tensor([0])} | kwargs
    with pytest.raises(ValueError, match=match):
        RegionConstraints(**args)
