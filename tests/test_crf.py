"""The windowed dense CRF against an explicit mean-field computation, and at its edges."""

import numpy as np
import pytest
import torch

from ccnn.crf import CRFParams, crf_refine, pairwise_kernels


def explicit_mean_field(image: np.ndarray, logits: np.ndarray, p: CRFParams) -> np.ndarray:
    """Mean-field with the N×N kernel matrix written out pixel pair by pixel pair."""
    L, H, W = logits.shape
    coords = [(y, x) for y in range(H) for x in range(W)]
    colour = image.reshape(3, -1).T.astype(float)
    r = p.window // 2
    K = np.zeros((H * W, H * W))
    for i, (yi, xi) in enumerate(coords):
        for j, (yj, xj) in enumerate(coords):
            if i == j or abs(yi - yj) > r or abs(xi - xj) > r:
                continue
            d2 = (yi - yj) ** 2 + (xi - xj) ** 2
            c2 = ((colour[i] - colour[j]) ** 2).sum()
            K[i, j] = (p.appearance_weight * np.exp(-d2 / (2 * p.position_sigma ** 2)
                                                    - c2 / (2 * p.colour_sigma ** 2))
                       + p.smoothness_weight * np.exp(-d2 / (2 * p.smoothness_sigma ** 2)))
    u = logits.reshape(L, -1)

    def softmax(z: np.ndarray) -> np.ndarray:
        e = np.exp(z - z.max(0))
        return e / e.sum(0)

    Q = softmax(u)
    for _ in range(p.iterations):
        Q = softmax(u + Q @ K.T)  # message_l(i) = Σ_j K_ij·Q_l(j)
    return Q.reshape(L, H, W)


@pytest.mark.parametrize("params", [
    CRFParams(iterations=3, window=5, position_sigma=2.0, colour_sigma=40.0),
    CRFParams(iterations=2, window=3, appearance_weight=0.0, smoothness_weight=1.5),
])
@pytest.mark.parametrize("classes", [2, 4, 7])
def test_matches_the_explicit_mean_field(params, classes):
    """Every class's message, the first one's too (``crf_refine`` takes it as the kernel's
    total less the others')."""
    rng = np.random.default_rng(classes)
    image = rng.integers(0, 256, (3, 6, 7)).astype(np.uint8)
    logits = rng.standard_normal((classes, 6, 7)) * 2
    ours = crf_refine(torch.from_numpy(image)[None], torch.from_numpy(logits)[None], params)
    np.testing.assert_allclose(ours[0].numpy(), explicit_mean_field(image, logits, params),
                               atol=1e-5)


def test_kernel_maps_are_the_written_out_kernel_for_every_offset():
    """Both halves of the offsets (the second is the first's maps shifted, by the kernel's
    symmetry) against k(i, i + o) computed pixel by pixel, zero outside the image."""
    params = CRFParams(window=7, position_sigma=3.0, colour_sigma=20.0)
    rng = np.random.default_rng(1)
    images = rng.uniform(0, 255, (2, 3, 8, 9))
    ours = pairwise_kernels(torch.from_numpy(images), params).numpy()
    r = params.window // 2
    offsets = [(dy, dx) for dy in range(-r, r + 1) for dx in range(-r, r + 1) if dy or dx]
    assert ours.shape == (2, len(offsets), 8, 9)
    expected = np.zeros_like(ours)
    for b in range(2):
        for o, (dy, dx) in enumerate(offsets):
            for y in range(8):
                for x in range(9):
                    if 0 <= y + dy < 8 and 0 <= x + dx < 9:
                        c2 = ((images[b, :, y, x] - images[b, :, y + dy, x + dx]) ** 2).sum()
                        d2 = dy * dy + dx * dx
                        appearance = np.exp(-d2 / (2 * params.position_sigma ** 2)
                                            - c2 / (2 * params.colour_sigma ** 2))
                        smoothness = np.exp(-d2 / (2 * params.smoothness_sigma ** 2))
                        expected[b, o, y, x] = (params.appearance_weight * appearance
                                                + params.smoothness_weight * smoothness)
    # the smoothness weight is rounded to float32 (as before the symmetric maps)
    np.testing.assert_allclose(ours, expected, rtol=1e-7, atol=1e-9)


def test_an_image_gets_the_same_numbers_in_any_batch():
    """The mean-field loop runs on chunks of the batch; each image's result is the one it gets
    alone, to the bit (15 images of six classes: chunks of 6, 6 and 3)."""
    g = torch.Generator().manual_seed(4)
    images = torch.randint(0, 256, (15, 3, 12, 13), dtype=torch.uint8, generator=g)
    logits = torch.randn(15, 6, 12, 13, generator=g) * 3
    together = crf_refine(images, logits)
    for b in range(15):
        assert torch.equal(together[b:b + 1], crf_refine(images[b:b + 1], logits[b:b + 1]))


def test_one_class_or_no_image_is_the_softmax():
    images = torch.randint(0, 256, (2, 3, 8, 9), dtype=torch.uint8)
    assert torch.equal(crf_refine(images, torch.randn(2, 1, 8, 9)), torch.ones(2, 1, 8, 9))
    assert crf_refine(images[:0], torch.randn(0, 3, 8, 9)).shape == (0, 3, 8, 9)


def test_without_pairwise_terms_it_is_the_softmax():
    logits = torch.randn(2, 3, 8, 9)
    images = torch.randint(0, 256, (2, 3, 8, 9), dtype=torch.uint8)
    for params in (CRFParams(iterations=0), CRFParams(appearance_weight=0, smoothness_weight=0)):
        torch.testing.assert_close(crf_refine(images, logits, params), logits.softmax(1))


def test_flipped_pixels_inside_a_uniform_region_are_repaired():
    """Two flat colour halves; the scores are right except for scattered pixels."""
    H, W = 16, 16
    truth = torch.zeros(H, W, dtype=torch.long)
    truth[:, W // 2:] = 1
    image = torch.zeros(1, 3, H, W, dtype=torch.uint8)
    image[0, 0][truth == 0] = 200
    image[0, 2][truth == 1] = 200
    logits = torch.nn.functional.one_hot(truth, 2).permute(2, 0, 1)[None].float() * 2.0 - 1.0
    flipped = torch.rand(H, W, generator=torch.Generator().manual_seed(1)) < 0.15
    logits[0, :, flipped] = -logits[0, :, flipped]
    before = (logits.argmax(1)[0] == truth).float().mean()
    after = (crf_refine(image, logits).argmax(1)[0] == truth).float().mean()
    assert before < 0.9 and after == 1.0


@pytest.mark.parametrize(("make", "message"), [
    (lambda: CRFParams(window=4), "window must be odd"),
    (lambda: CRFParams(iterations=-1), "iterations must be >= 0"),
    (lambda: CRFParams(colour_sigma=0), "colour_sigma must be positive"),
    (lambda: CRFParams(appearance_weight=-1), "appearance_weight must be >= 0"),
    (lambda: crf_refine(torch.zeros(1, 1, 4, 4), torch.zeros(1, 2, 4, 4)), r"\(B, 3, H, W\)"),
    (lambda: crf_refine(torch.zeros(1, 3, 4, 4), torch.zeros(1, 2, 4, 5)), "do not match"),
])
def test_bad_input_is_named(make, message):
    with pytest.raises(ValueError, match=message):
        make()
