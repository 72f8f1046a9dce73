"""Augmentation as a dataset transform: image and mask stay aligned, the draws are reproducible
and the same with any number of loader workers, batches are padded."""

from __future__ import annotations

import pytest
import torch

from ccnn.data.synthetic import SyntheticShapes
from ccnn.data.transforms import (
    Augmentation,
    AugmentParams,
    DrawnBatches,
    Transformed,
    augment,
    collate,
)
from ccnn.engine import training_loader

SIDE = 15  # 15 × 15 pixels: label r·15 + c ≤ 224 stays clear of void (255)


def coordinate_sample() -> dict:
    """An image whose red and green channels are 16 × its column and row, and a mask whose
    label at (r, c) is r·15 + c: after any resampling, the image says where each pixel was
    taken from, and the mask must say the same."""
    rows, cols = torch.meshgrid(torch.arange(SIDE), torch.arange(SIDE), indexing="ij")
    image = torch.stack([16 * cols, 16 * rows, torch.zeros_like(rows)]).to(torch.uint8)
    return {"image": image, "mask": rows * SIDE + cols, "tags": torch.ones(2),
            "sizes": torch.ones(2) / 2, "name": "grid"}


def assert_aligned(sample: dict) -> int:
    """Every labelled pixel's source position, read from the image (bilinear, so fractional),
    lies within half a pixel of the one its mask label names; returns the pixels checked."""
    mask = sample["mask"]
    keep = mask != 255
    row, col = mask[keep] // SIDE, mask[keep] % SIDE
    image = sample["image"].float() / 16
    x, y = image[0][keep], image[1][keep]
    tolerance = 0.5 + 1 / 32  # half a pixel, and the image's rounding to integers
    assert float((x - col).abs().max()) <= tolerance
    assert float((y - row).abs().max()) <= tolerance
    return int(keep.sum())


def test_image_and_mask_stay_aligned_after_flip_scale_and_crop():
    sample = coordinate_sample()
    # by hand: the flip mirrors the columns of both; the scales include 0.75, where PyTorch's
    # "nearest" mode would take mask pixels half a pixel off the image's bilinear samples
    flipped = Augmentation(scale=(0.75, 0.75)).apply(sample, AugmentParams(flip=True, factor=0.75))
    assert flipped["mask"].shape == (11, 11) and assert_aligned(flipped) == 121
    assert flipped["mask"][0, 0] == SIDE - 1  # the first column is the old last one
    augmentation = Augmentation(flip=True, scale=(0.5, 2.0), crop=12)
    generator = torch.Generator().manual_seed(0)
    checked = 0
    for _ in range(40):
        params = augmentation.draw(generator)
        out = augmentation.apply(sample, params)
        assert out["image"].shape == (3, 12, 12) and out["mask"].shape == (12, 12)
        checked += assert_aligned(out)
    assert checked > 40 * 12 * 12 // 2  # most pixels are image, not padding


def test_crop_pads_smaller_images_with_void():
    out = Augmentation(flip=False, crop=20).apply(coordinate_sample(),
                                                   AugmentParams(crop_at=(0.0, 0.0)))
    assert out["image"].shape == (3, 20, 20)
    assert bool((out["mask"][SIDE:] == 255).all()) and bool((out["mask"][:, SIDE:] == 255).all())
    assert torch.equal(out["mask"][:SIDE, :SIDE], coordinate_sample()["mask"])


def test_draw_then_apply_is_augment():
    sample = SyntheticShapes("train", 1, image_size=32)[0]
    settings = {"flip": True, "scale": (0.5, 1.5), "crop": 24}
    a = augment(sample, torch.Generator().manual_seed(5), **settings)
    augmentation = Augmentation(**settings)
    b = augmentation.apply(sample, augmentation.draw(torch.Generator().manual_seed(5)))
    assert torch.equal(a["image"], b["image"]) and torch.equal(a["mask"], b["mask"])
    # each draw: a flip, a factor and a corner: four numbers from the generator
    generator = torch.Generator().manual_seed(5)
    augmentation.draw(generator)
    reference = torch.Generator().manual_seed(5)
    for _ in range(4):
        torch.rand((), generator=reference)
    assert torch.equal(generator.get_state(), reference.get_state())


def test_the_loader_draws_as_augmenting_the_shuffled_samples_in_turn():
    """The training loader's stream is shuffling, then each sample's draw in batch order — the
    order the training loop used before augmentation moved into the loader, so that runs with
    the same seed reproduce the earlier ones."""
    data = SyntheticShapes("train", 10, image_size=16)
    augmentation = Augmentation(flip=True)
    batches = list(training_loader(data, 4, augmentation, torch.Generator().manual_seed(3)))
    generator = torch.Generator().manual_seed(3)
    torch.empty((), dtype=torch.int64).random_(generator=generator)  # the loader's base seed
    order = torch.randperm(10, generator=generator).tolist()
    for k, batch in enumerate(batches[:2]):  # the last batch follows the sampler's end
        expected = collate([augment(data[i], generator) for i in order[4 * k: 4 * k + 4]])
        assert batch["name"] == expected["name"]
        assert torch.equal(batch["image"], expected["image"])


def test_workers_give_the_same_batches():
    data = SyntheticShapes("train", 12, image_size=16)
    augmentation = Augmentation(flip=True, scale=(0.8, 1.2), crop=14)
    runs = [list(training_loader(data, 5, augmentation, torch.Generator().manual_seed(1),
                                 num_workers=workers)) for workers in (0, 2)]
    assert len(runs[0]) == len(runs[1]) == 3
    for a, b in zip(*runs, strict=True):
        assert a["name"] == b["name"]
        assert torch.equal(a["image"], b["image"]) and torch.equal(a["mask"], b["mask"])


def test_transformed_keeps_the_dataset_and_drawn_batches_pair_indices():
    data = SyntheticShapes("train", 3, image_size=16)
    view = Transformed(data, Augmentation(flip=False))
    assert len(view) == 3 and view.num_classes == data.num_classes and view.background == 0
    assert torch.equal(view[(2, AugmentParams())]["image"], data[2]["image"])
    batches = DrawnBatches([[0, 1], [2]], Augmentation(), torch.Generator().manual_seed(0))
    drawn = list(batches)
    assert len(batches) == 2 and [[i for i, _ in b] for b in drawn] == [[0, 1], [2]]
    assert all(isinstance(p, AugmentParams) for b in drawn for _, p in b)


def test_collate_pads_to_the_largest_image():
    ds = SyntheticShapes("train", 2, image_size=32)
    small = {**ds[1], "image": ds[1]["image"][:, :20, :24], "mask": ds[1]["mask"][:20, :24]}
    batch = collate([ds[0], small])
    assert batch["image"].shape == (2, 3, 32, 32)
    assert bool((batch["mask"][1, 20:] == 255).all())
    assert bool((batch["mask"][1, :, 24:] == 255).all())
    assert torch.equal(batch["image"][1, :, :20, :24], small["image"])
    assert batch["shape"] == [(32, 32), (20, 24)]
    with pytest.raises(ValueError, match="empty list"):
        collate([])


@pytest.mark.parametrize(("settings", "match"), [
    ({"scale": (1.2, 0.8)}, "scale must be an interval"),
    ({"scale": (0.0, 1.0)}, "scale must be an interval"),
    ({"crop": 0}, "crop must be at least 1"),
])
def test_bad_augmentation_settings_are_named(settings, match):
    with pytest.raises(ValueError, match=match):
        Augmentation(**settings)
