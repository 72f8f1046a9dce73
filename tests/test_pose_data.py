"""Pose data side: skeleton constraints, metrics, synthetic poses, Human3.6M loader, PoseNet."""

from __future__ import annotations

import re
import zlib

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from ccnn.pose import (
    JOINT_NAMES,
    SYMMETRY_PAIRS,
    H36MPoses,
    InputsOnly,
    PoseNet,
    SyntheticPoses,
    as_tensors,
    bone_lengths,
    constraints_met,
    mean_joint_error,
    median_constraint_violation,
    pose_loss,
    posenet_num_parameters,
    random_backgrounds,
    render_poses,
    subject_bone_lengths,
    symmetry_residuals,
    synthetic_pose_splits,
)
from ccnn.pose.data import pose_angle_names
from ccnn.pose.skeleton import FLIP_PERMUTATION, PARENTS, symmetrize

torch.set_num_threads(1)
J = {name: i for i, name in enumerate(JOINT_NAMES)}


def hand_skeleton() -> torch.Tensor:
    """A symmetric T-ish pose (1, 17, 3) in float64 written out by hand: hips ±0.1, legs 0.4 +
    0.4 down (+y), spine/chest/neck/head up, shoulders ±0.2 at the chest, arms 0.3 + 0.25 out."""
    pts = {
        "pelvis": (0, 0, 0), "right_hip": (-0.1, 0, 0), "right_knee": (-0.1, 0.4, 0),
        "right_heel": (-0.1, 0.8, 0), "left_hip": (0.1, 0, 0), "left_knee": (0.1, 0.4, 0),
        "left_heel": (0.1, 0.8, 0), "spine": (0, -0.25, 0), "chest": (0, -0.5, 0),
        "neck": (0, -0.6, -0.05), "head": (0, -0.7, 0), "left_shoulder": (0.2, -0.5, 0),
        "left_elbow": (0.5, -0.5, 0), "left_hand": (0.75, -0.5, 0),
        "right_shoulder": (-0.2, -0.5, 0), "right_elbow": (-0.5, -0.5, 0),
        "right_hand": (-0.75, -0.5, 0),
    }
    return torch.tensor([[pts[n] for n in JOINT_NAMES]], dtype=torch.float64)


# ---------------------------------------------------------------------------------- skeleton

def test_skeleton_tables_follow_h36m_and_table_2():
    assert JOINT_NAMES[0] == "pelvis" and JOINT_NAMES[10] == "head" and len(JOINT_NAMES) == 17
    assert PARENTS == (-1, 0, 1, 2, 0, 4, 5, 0, 7, 8, 9, 8, 11, 12, 8, 14, 15)
    table_2 = [  # Table 2 of the paper, cell by cell
        ("left_shoulder", "left_elbow", "right_shoulder", "right_elbow"),
        ("left_elbow", "left_hand", "right_elbow", "right_hand"),
        ("left_hip", "left_knee", "right_hip", "right_knee"),
        ("left_knee", "left_heel", "right_knee", "right_heel"),
        ("chest", "left_shoulder", "chest", "right_shoulder"),
        ("pelvis", "left_hip", "pelvis", "right_hip"),
    ]
    assert SYMMETRY_PAIRS.tolist() == [[J[n] for n in row] for row in table_2]
    flip = torch.tensor(FLIP_PERMUTATION)
    assert torch.equal(flip[flip], torch.arange(17))
    assert [JOINT_NAMES[i] for i in FLIP_PERMUTATION[11:14]] == [
        "right_shoulder", "right_elbow", "right_hand"]


def test_symmetry_residuals_hand_computed():
    y = hand_skeleton()
    assert torch.equal(symmetry_residuals(y), torch.zeros(1, 6, dtype=torch.float64))
    delta = 0.1  # lengthen the left upper arm 0.3 -> 0.4: move the elbow and hand outwards
    y2 = y.clone()
    y2[0, J["left_elbow"], 0] += delta
    y2[0, J["left_hand"], 0] += delta
    expected_sq = torch.zeros(1, 6, dtype=torch.float64)
    expected_sq[0, 0] = 0.4**2 - 0.3**2
    expected = torch.zeros(1, 6, dtype=torch.float64)
    expected[0, 0] = delta
    torch.testing.assert_close(symmetry_residuals(y2), expected_sq)
    torch.testing.assert_close(symmetry_residuals(y2, squared=False), expected)
    # the calf: left knee-heel 0.4 -> 0.5 (heel down); sign flips when the right one is longer
    y3 = y.clone()
    y3[0, J["right_heel"], 1] += 0.1
    expected3 = torch.zeros(1, 6, dtype=torch.float64)
    expected3[0, 3] = 0.4**2 - 0.5**2
    torch.testing.assert_close(symmetry_residuals(y3), expected3)
    # flat (K, 51) input, a batch of both, float32 on the same values
    both = torch.cat([y2, y3]).reshape(2, 51)
    torch.testing.assert_close(symmetry_residuals(both), torch.cat([expected_sq, expected3]))
    C32 = symmetry_residuals(both.float())
    assert C32.dtype == torch.float32
    torch.testing.assert_close(C32, torch.cat([expected_sq, expected3]).float())


def test_symmetry_residuals_jacobian_matches_formula():
    y = hand_skeleton().reshape(1, 51) + 0.01 * torch.randn(
        1, 51, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    jac = torch.func.jacrev(lambda v: symmetry_residuals(v))(y)[0, :, 0]   # (6, 51)
    expected = torch.zeros(6, 17, 3, dtype=torch.float64)
    Y = y.reshape(17, 3)
    for j, (a, b, c, d) in enumerate(SYMMETRY_PAIRS.tolist()):
        expected[j, a] += 2 * (Y[a] - Y[b])
        expected[j, b] -= 2 * (Y[a] - Y[b])
        expected[j, c] -= 2 * (Y[c] - Y[d])
        expected[j, d] += 2 * (Y[c] - Y[d])
    torch.testing.assert_close(jac, expected.reshape(6, 51))


def test_relative_symmetry_residuals_are_scale_invariant():
    """(‖l‖² − ‖r‖²)/(‖l‖² + ‖r‖²): zero on a symmetric skeleton, the hand value on a lengthened
    arm, and unchanged when the whole pose is scaled (Eq. 15's squared form scales by s²)."""
    y = hand_skeleton()
    assert torch.equal(symmetry_residuals(y, relative=True), torch.zeros(1, 6,
                                                                        dtype=torch.float64))
    Y = y.reshape(17, 3).clone()
    Y[J["left_elbow"]] = Y[J["left_shoulder"]] + 1.5 * (Y[J["left_elbow"]] - Y[J["left_shoulder"]])
    l2 = float((Y[J["left_shoulder"]] - Y[J["left_elbow"]]).square().sum())
    r2 = float((Y[J["right_shoulder"]] - Y[J["right_elbow"]]).square().sum())
    C = symmetry_residuals(Y[None], relative=True)
    assert float(C[0, 0]) == pytest.approx((l2 - r2) / (l2 + r2), rel=1e-12)
    torch.testing.assert_close(symmetry_residuals(3.7 * Y[None], relative=True), C)
    torch.testing.assert_close(symmetry_residuals(3.7 * Y[None]),
                               3.7**2 * symmetry_residuals(Y[None]))


@pytest.mark.parametrize("shape", [(51,), (4, 50), (4, 17, 2), (4, 16, 3), (2, 2, 17, 3)])
def test_symmetry_residuals_rejects_shapes(shape):
    with pytest.raises(ValueError, match=re.escape(f"got {shape}")):
        symmetry_residuals(torch.zeros(shape))


def _fd_jacobian(pose: np.ndarray, h: float = 1e-6) -> np.ndarray:
    """∂C/∂y of the six squared-length constraints by central differences (6, 51)."""
    def c(q: np.ndarray) -> np.ndarray:
        return symmetry_residuals(torch.from_numpy(q)[None])[0].numpy()
    cols = []
    for i in range(pose.size):
        e = np.zeros_like(pose)
        e[i] = h
        cols.append((c(pose + e) - c(pose - e)) / (2 * h))
    return np.stack(cols, 1)


def test_symmetrize_takes_minimum_norm_newton_steps_to_a_symmetric_pose():
    """One step is the pseudoinverse step of the finite-difference Jacobian (NumPy); ten reach
    a symmetric pose; symmetric poses stay; shape and dtype are kept."""
    g = torch.Generator().manual_seed(5)
    y = torch.randn(3, 51, generator=g, dtype=torch.float64) * 0.3
    one = symmetrize(y, steps=1)
    for k in range(3):
        pose = y[k].numpy()
        C = symmetry_residuals(y[k:k + 1])[0].numpy()
        expected = pose - np.linalg.pinv(_fd_jacobian(pose)) @ C
        np.testing.assert_allclose(one[k].numpy(), expected, rtol=0, atol=1e-7)
    done = symmetrize(y)
    assert symmetry_residuals(done).abs().max() < 1e-10
    assert (done - y).norm(dim=1).max() < 1.0  # near y, not a collapsed skeleton
    assert bone_lengths(done).min() > 0.01
    truth = SyntheticPoses(4, seed=0, image_size=32).joints
    torch.testing.assert_close(symmetrize(truth), truth, rtol=0, atol=1e-5)
    assert symmetrize(y.float().reshape(3, 17, 3)).shape == (3, 17, 3)
    assert symmetrize(y.float()).dtype == torch.float32
    with pytest.raises(ValueError, match="steps"):
        symmetrize(y, steps=-1)


def test_mean_joint_error_and_constraint_metrics_hand_computed():
    true = hand_skeleton().repeat(2, 1, 1)
    pred = true.clone()
    pred[0, 0] += torch.tensor([3.0, 4.0, 0.0], dtype=torch.float64)  # distance 5
    pred[1, 5] += torch.tensor([0.0, 0.0, -2.0], dtype=torch.float64)  # distance 2
    torch.testing.assert_close(mean_joint_error(pred, true),
                               torch.tensor(7 / 34, dtype=torch.float64))
    torch.testing.assert_close(mean_joint_error(pred.reshape(2, 51), true),
                               torch.tensor(7 / 34, dtype=torch.float64))
    with pytest.raises(ValueError, match="same number of poses"):
        mean_joint_error(pred, true[:1])
    C = torch.tensor([[0.1, -0.2, 0.3, 0.0, 0.5, -1.0]])
    torch.testing.assert_close(constraints_met(C, [0.0, 0.25, 1.0]),
                               torch.tensor([1 / 6, 3 / 6, 1.0]))
    torch.testing.assert_close(median_constraint_violation(C), torch.tensor(0.25))
    torch.testing.assert_close(median_constraint_violation(C[:, :5]), torch.tensor(0.2))
    with pytest.raises(ValueError, match="non-negative"):
        constraints_met(C, [-0.1])
    with pytest.raises(ValueError, match="at least one value"):
        constraints_met(C[:, :0], [0.1])


# -------------------------------------------------------------------------- synthetic poses

def test_ground_truth_meets_constraints_and_subjects_differ():
    ds = SyntheticPoses(48, seed=3, image_size=32, subjects=(0, 1, 2, 3))
    y = ds.joints.double()
    L = bone_lengths(y)
    C = symmetry_residuals(y)
    ref = torch.stack([L[:, a - 1] for a in SYMMETRY_PAIRS[:, 1].tolist()], 1) ** 2
    assert (C.abs() / ref).max() < 1e-5
    # every bone has its subject's length (forward kinematics keeps lengths)
    torch.testing.assert_close(L, subject_bone_lengths(ds.subject.tolist(), 3), rtol=1e-5,
                               atol=1e-6)
    lengths = subject_bone_lengths(range(6), 3)
    assert torch.cdist(lengths, lengths).add(torch.eye(6)).min() > 0.01  # pairwise different
    assert not torch.equal(lengths, subject_bone_lengths(range(6), 4))
    # root-centred, camera frame with y down the image: the head is above the pelvis
    assert torch.equal(y.reshape(-1, 17, 3)[:, 0], torch.zeros(48, 3, dtype=torch.float64))
    assert (y.reshape(-1, 17, 3)[:, J["head"], 1] < 0).all()
    assert sorted(set(ds.subject.tolist())) == [0, 1, 2, 3]


def test_determinism_by_seed_and_per_sample():
    a = SyntheticPoses(6, seed=7, image_size=32)
    b = SyntheticPoses(6, seed=7, image_size=32)
    c = SyntheticPoses(6, seed=8, image_size=32)
    prefix = SyntheticPoses(3, seed=7, image_size=32)
    other_stream = SyntheticPoses(6, seed=7, image_size=32, stream="val")
    assert torch.equal(a.images, b.images) and torch.equal(a.joints, b.joints)
    assert torch.equal(prefix.images, a.images[:3]) and torch.equal(prefix.joints, a.joints[:3])
    assert (a.joints - c.joints).abs().amax(1).min() > 1e-3
    assert (a.images.float() - c.images.float()).abs().mean() > 5
    assert (a.joints - other_stream.joints).abs().amax(1).min() > 1e-3


def test_rendering_hides_depth_and_sides():
    ds = SyntheticPoses(4, seed=1, image_size=128, noise_std=0.0)
    joints = ds.joints.reshape(4, 17, 3)
    bg = random_backgrounds([np.random.default_rng([1, i]) for i in range(4)], 128)
    image = render_poses(joints, backgrounds=bg)
    mirrored = joints.clone()
    mirrored[..., 2] *= -1          # depth negated about the root: the same image
    assert torch.equal(render_poses(mirrored, backgrounds=bg), image)
    swapped = joints[:, list(FLIP_PERMUTATION)]   # left/right labels exchanged: the same image
    torch.testing.assert_close(render_poses(swapped, backgrounds=bg), image, rtol=0, atol=1e-6)
    shaded = render_poses(joints, backgrounds=bg, distinct_sides=True)
    assert (render_poses(swapped, backgrounds=bg, distinct_sides=True) - shaded).abs().max() > 0.2
    flipped_x = joints.clone()
    flipped_x[..., 0] *= -1         # but x and y are visible
    assert (render_poses(flipped_x, backgrounds=bg) - image).abs().max() > 0.5
    assert image.shape == (4, 3, 128, 128)


def test_rendering_geometry_hand_computed():
    grey = torch.full((3, 128, 128, 3), 0.5)
    joints = torch.zeros(3, 17, 3)
    joints[1, :, 0] = 0.5   # every joint at x = 0.5 m: 26 px right of the centre (52 px/m)
    joints[2, :, 1] = 0.5   # every joint at y = 0.5 m: 26 px down
    image = render_poses(joints, backgrounds=grey)
    forearm = torch.tensor([0.6, 1.0, 0.3])   # the last bone drawn: a disc of radius 3 px
    for k, (row, col) in enumerate([(63, 63), (63, 89), (89, 63)]):
        torch.testing.assert_close(image[k, :, row, col], forearm)
        torch.testing.assert_close(image[k, :, row, col + 10], torch.full((3,), 0.5))
    torch.testing.assert_close(image[1, :, 63, 63], torch.full((3,), 0.5))


def test_dataset_images_are_the_rendered_joints():
    ds = SyntheticPoses(3, seed=5, image_size=64, noise_std=0.0, stream="s")
    rngs = []
    for i in range(3):   # replay each sample's stream: subject, angles, then background
        rng = np.random.default_rng([5, zlib.crc32(b"s"), i])
        rng.integers(len(ds.subjects))
        rng.uniform(0, 1, len(pose_angle_names()))
        rngs.append(rng)
    expected = render_poses(ds.joints, image_size=64, backgrounds=random_backgrounds(rngs, 64))
    diff = (ds.images.float() - (expected * 255 + 0.5).floor()).abs()
    assert diff.max() <= 1 and (diff == 0).float().mean() > 0.999
    noisy = SyntheticPoses(3, seed=5, image_size=64, noise_std=0.05, stream="s")
    assert torch.equal(noisy.joints, ds.joints)
    noise = (noisy.images.float() - ds.images.float()) / 255
    interior = (ds.images > 20) & (ds.images < 235)
    assert abs(noise[interior].std().item() - 0.05) < 0.005


def test_items_shapes_range_and_loader():
    ds = SyntheticPoses(5, seed=2)
    x, y = ds[4]
    assert x.shape == (3, 128, 128) and x.dtype == torch.float32 and x.is_contiguous()
    assert y.shape == (51,) and y.dtype == torch.float32
    assert x.min() >= 0 and x.max() <= 1
    torch.testing.assert_close(x * 255, ds.images[4].float())
    xb, yb = next(iter(DataLoader(ds, batch_size=5)))
    X, Y = as_tensors(ds)
    assert torch.equal(xb, X) and torch.equal(yb, Y) and X.is_contiguous()
    Xs, Ys = as_tensors(torch.utils.data.Subset(ds, [3, 1]))
    assert torch.equal(Xs, X[[3, 1]]) and torch.equal(Ys, Y[[3, 1]])


def test_splits_disjoint_subjects_and_unlabeled_pool():
    s = synthetic_pose_splits(0, 16, 4, 8, 6, image_size=32)
    assert (len(s.train), len(s.val), len(s.test), len(s.constraint)) == (16, 4, 8, 6)
    train, val, test = (set(d.subject.tolist()) for d in (s.train, s.val, s.test))
    assert train <= set(range(8)) and val <= {8, 9} and test <= {10, 11, 12, 13}
    assert isinstance(s.constraint, InputsOnly)
    item = s.constraint[0]
    assert isinstance(item, torch.Tensor) and item.shape == (3, 32, 32)
    assert set(s.constraint.dataset.subject.tolist()) <= set(range(8))
    assert torch.equal(s.constraint.tensors()[2], s.constraint[2])
    assert not torch.equal(s.constraint.dataset.joints[:6], s.train.joints[:6])
    with pytest.raises(ValueError, match="n must be positive"):
        synthetic_pose_splits(0, 0, 1, 1, 1, image_size=32)


# ---------------------------------------------------------------------------- Human3.6M crops

def write_fixture(path, n=3, **overrides):
    rng = np.random.default_rng(0)
    data = {"images": rng.integers(0, 256, (n, 128, 128, 3), dtype=np.uint8),
            "joints": rng.normal(0, 300, (n, 17, 3)) + np.array([100.0, -50.0, 4500.0])}
    data.update(overrides)
    np.savez(path, **{k: v for k, v in data.items() if v is not None})
    return data


def test_h36m_loader_converts_units_and_root_centres(tmp_path):
    path = tmp_path / "crops.npz"
    data = write_fixture(path)
    ds = H36MPoses(path, units="mm")
    assert len(ds) == 3
    x, y = ds[1]
    assert x.shape == (3, 128, 128) and y.shape == (51,)
    torch.testing.assert_close(x, torch.from_numpy(data["images"][1]).permute(2, 0, 1) / 255)
    expected = (data["joints"] - data["joints"][:, :1]) / 1000
    torch.testing.assert_close(ds.joints, torch.from_numpy(expected.reshape(3, 51)).float())
    path_m = tmp_path / "crops_m.npz"
    write_fixture(path_m, joints=data["joints"] / 1000)
    torch.testing.assert_close(H36MPoses(path_m, units="m").joints, ds.joints)
    X, Y = as_tensors(ds)
    assert X.shape == (3, 3, 128, 128) and torch.equal(Y, ds.joints)


@pytest.mark.parametrize("overrides, message", [
    ({"joints": None}, "missing key 'joints'"),
    ({"images": None}, "missing key 'images'"),
    ({"images": np.zeros((3, 64, 64, 3), np.uint8)}, "'images' must have shape"),
    ({"images": np.zeros((3, 128, 128, 3), np.float32)}, "must be uint8"),
    ({"joints": np.zeros((3, 16, 3))}, "'joints' must have shape"),
    ({"joints": np.zeros((2, 17, 3))}, "holds 3 samples but 'joints' holds 2"),
    ({"joints": np.where(np.arange(3)[:, None, None] == 1, np.nan, np.zeros((3, 17, 3)))},
     "non-finite values in 1 samples"),
])
def test_h36m_loader_errors_name_the_file(tmp_path, overrides, message):
    path = tmp_path / "bad.npz"
    write_fixture(path, **overrides)
    with pytest.raises(ValueError, match=re.escape(str(path)) + ".*" + re.escape(message)):
        H36MPoses(path)


def test_h36m_loader_rejects_units(tmp_path):
    with pytest.raises(ValueError, match="units must be 'mm' or 'm', got 'cm'"):
        H36MPoses(tmp_path / "x.npz", units="cm")


# ----------------------------------------------------------------------------------- PoseNet

def test_posenet_shape_and_parameter_count():
    net = PoseNet()
    # by hand: conv 3->8 5x5, conv 8->8 5x5, conv 8->8 3x3, then 8*16*16 -> 1024 -> 1024 -> 51
    by_hand = (3 * 8 * 25 + 8) + (8 * 8 * 25 + 8) + (8 * 8 * 9 + 8) \
        + (2048 * 1024 + 1024) + (1024 * 1024 + 1024) + (1024 * 51 + 51)
    assert by_hand == 3_202_851
    assert sum(p.numel() for p in net.parameters()) == by_hand == posenet_num_parameters()
    assert net(torch.rand(2, 3, 128, 128)).shape == (2, 51)
    small = PoseNet(width=2, hidden=16, image_size=32)
    assert sum(p.numel() for p in small.parameters()) == (
        (3 * 2 * 25 + 2) + (2 * 2 * 25 + 2) + (2 * 2 * 9 + 2) + (2 * 4 * 4 * 16 + 16)
        + (16 * 16 + 16) + (16 * 51 + 51))
    assert small(torch.rand(3, 3, 32, 32)).shape == (3, 51)
    with pytest.raises(ValueError, match=re.escape("got (3, 3, 64, 64)")):
        small(torch.rand(3, 3, 64, 64))
    with pytest.raises(ValueError, match="image_size must be a positive multiple of 8"):
        PoseNet(image_size=100)


def test_posenet_goes_through_torch_func_and_eq14_loss():
    net = PoseNet(width=2, hidden=8, image_size=16).double()
    params = {k: v.detach() for k, v in net.named_parameters()}
    x = torch.rand(2, 3, 16, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    v = {k: torch.randn_like(p) for k, p in params.items()}

    def f(p):
        return torch.func.functional_call(net, p, (x,))

    _, jv = torch.func.jvp(f, (params,), (v,))
    eps = 1e-6
    plus = f({k: p + eps * v[k] for k, p in params.items()})
    minus = f({k: p - eps * v[k] for k, p in params.items()})
    torch.testing.assert_close(jv, (plus - minus) / (2 * eps), rtol=1e-5, atol=1e-7)
    pred, y = torch.zeros(2, 51), torch.zeros(2, 51)
    pred[0, 0], pred[1, 50] = 3.0, 4.0
    torch.testing.assert_close(pose_loss(pred, y), torch.tensor((9 / 51 + 16 / 51) / 2))
