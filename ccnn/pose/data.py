"""Pose-estimation data: a synthetic stand-in for Human3.6M, and a loader for real crops.

The synthetic set (:class:`SyntheticPoses`) mimics the task of Márquez-Neila, Salzmann and Fua,
"Imposing Hard Constraints on Deep Networks: Promises and Limitations", 2017 (Section 5): map a
128×128 colour image of a person to the 3D positions of the 17 Human3.6M joints (metres, camera
frame, root-centred; see :mod:`ccnn.pose.skeleton`). Every subject has its own bone lengths,
equal on the left and the right, so the ground truth meets the six symmetry constraints of
Table 2 exactly. Skeletons are posed with joint angles in human ranges, turned by a random yaw
(full circle) and a small pitch and roll, projected orthographically (depth is invisible) and
drawn as thick lines coloured by limb *type*, left and right alike, on a textured background.
``docs/pose_data.md`` explains the choices and measures the resulting depth ambiguity.

Camera frame: x to the image's right, y down the image, z away from the camera (into the
image), as in Human3.6M. Images are float tensors ``(3, H, W)`` in [0, 1] (stored as uint8).
"""

from __future__ import annotations

import logging
import math
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from ccnn.pose.skeleton import BONES, NUM_JOINTS, RIGHT_JOINTS, as_joints

__all__ = [
    "BONE_TYPES",
    "MEAN_BONE_LENGTHS",
    "TEST_SUBJECTS",
    "TRAIN_SUBJECTS",
    "VAL_SUBJECTS",
    "H36MPoses",
    "InputsOnly",
    "PoseSplits",
    "SyntheticPoses",
    "as_tensors",
    "pose_angle_names",
    "posed_skeletons",
    "random_backgrounds",
    "render_poses",
    "subject_bone_lengths",
    "synthetic_pose_splits",
]

logger = logging.getLogger(__name__)

TRAIN_SUBJECTS: tuple[int, ...] = tuple(range(0, 8))
VAL_SUBJECTS: tuple[int, ...] = (8, 9)
TEST_SUBJECTS: tuple[int, ...] = (10, 11, 12, 13)

#: Type of each of the 16 bones of :data:`ccnn.pose.skeleton.BONES` (child joints 1..16).
#: Left and right counterparts share a type, hence a length and a colour.
BONE_TYPES: tuple[str, ...] = (
    "pelvis-hip", "thigh", "calf",            # right leg (joints 1, 2, 3)
    "pelvis-hip", "thigh", "calf",            # left leg (4, 5, 6)
    "lower-spine", "upper-spine", "neck", "head",  # 7, 8, 9, 10
    "chest-shoulder", "arm", "forearm",       # left arm (11, 12, 13)
    "chest-shoulder", "arm", "forearm",       # right arm (14, 15, 16)
)
_TYPES: tuple[str, ...] = tuple(dict.fromkeys(BONE_TYPES))
_TYPE_INDEX = torch.tensor([_TYPES.index(t) for t in BONE_TYPES])
_RIGHT_BONES = frozenset(i for i, (_, c) in enumerate(BONES) if c in RIGHT_JOINTS)

#: Mean adult bone lengths in metres (close to the Human3.6M subjects' averages).
MEAN_BONE_LENGTHS: dict[str, float] = {
    "pelvis-hip": 0.13, "thigh": 0.44, "calf": 0.44, "lower-spine": 0.23, "upper-spine": 0.25,
    "neck": 0.12, "head": 0.11, "chest-shoulder": 0.15, "arm": 0.28, "forearm": 0.25,
}
#: A subject's lengths: mean × global factor U(1 ± 0.13) × per-type factor U(1 ± 0.05).
_SUBJECT_SCALE, _TYPE_SCALE = 0.13, 0.05

#: Line radius in pixels at 128×128 (scaled with the image size), constant: no depth cue.
_RADIUS: dict[str, float] = {
    "pelvis-hip": 4.0, "thigh": 4.5, "calf": 3.5, "lower-spine": 5.0, "upper-spine": 5.0,
    "neck": 2.5, "head": 6.0, "chest-shoulder": 4.0, "arm": 3.5, "forearm": 3.0,
}
#: Colour per limb type (RGB in [0, 1]), the same for left and right.
_COLOUR: dict[str, tuple[float, float, float]] = {
    "pelvis-hip": (1.0, 0.55, 0.0), "thigh": (0.9, 0.1, 0.1), "calf": (1.0, 0.9, 0.1),
    "lower-spine": (0.1, 0.3, 0.95), "upper-spine": (0.2, 0.85, 0.95), "neck": (1.0, 1.0, 1.0),
    "head": (0.95, 0.3, 0.75), "chest-shoulder": (0.1, 0.75, 0.2), "arm": (0.55, 0.15, 0.9),
    "forearm": (0.6, 1.0, 0.3),
}
#: Drawing order (bone indices): fixed, never by depth, so that depth stays invisible.
_DRAW_ORDER: tuple[int, ...] = (6, 7, 0, 3, 1, 4, 2, 5, 10, 13, 8, 9, 11, 14, 12, 15)
#: Pixels per metre at 128×128: the tallest reach (~1.2 m from the root) stays inside the image.
_PX_PER_M_128 = 52.0

# Joint-angle ranges in degrees: (name, low, high). Left and right limbs draw from the same
# ranges and are mirrored, so the pose distribution is left/right symmetric.
_TORSO_RANGES = (("torso_bend", -10.0, 35.0), ("torso_side", -15.0, 15.0),
                 ("torso_twist", -30.0, 30.0), ("head_yaw", -45.0, 45.0),
                 ("head_pitch", -20.0, 30.0))
_LIMB_RANGES = (("hip_flex", -30.0, 90.0), ("hip_abd", -10.0, 35.0), ("hip_twist", -25.0, 25.0),
                ("knee", 0.0, 120.0), ("shoulder_flex", -40.0, 150.0),
                ("shoulder_abd", 0.0, 110.0), ("shoulder_twist", -60.0, 60.0),
                ("elbow", 0.0, 140.0))
_GLOBAL_RANGES = (("yaw", 0.0, 360.0), ("pitch", -10.0, 10.0), ("roll", -10.0, 10.0))
_ANGLE_RANGES = (*_TORSO_RANGES,
                 *((f"left_{n}", lo, hi) for n, lo, hi in _LIMB_RANGES),
                 *((f"right_{n}", lo, hi) for n, lo, hi in _LIMB_RANGES),
                 *_GLOBAL_RANGES)
_BG_COARSE, _BG_MID = 4, 16  # background noise grids (cells per side)


def pose_angle_names() -> tuple[str, ...]:
    """Names of the columns of the angle table taken by :func:`posed_skeletons` (degrees)."""
    return tuple(n for n, _, _ in _ANGLE_RANGES)


def subject_bone_lengths(subjects: Sequence[int], seed: int) -> Tensor:
    """Bone lengths ``(S, 16)`` in metres (float64) of the given subject ids in world ``seed``.

    Subject ``s`` depends only on ``(seed, s)``: each bone type gets the mean length times a
    subject-wide factor in ``1 ± 0.13`` and a per-type factor in ``1 ± 0.05``; the left and right
    bones of a type share their length.
    """
    rows = []
    for s in subjects:
        rng = np.random.default_rng([seed, zlib.crc32(b"subject"), int(s)])
        g = rng.uniform(1 - _SUBJECT_SCALE, 1 + _SUBJECT_SCALE)
        f = rng.uniform(1 - _TYPE_SCALE, 1 + _TYPE_SCALE, len(_TYPES))
        per_type = torch.tensor([MEAN_BONE_LENGTHS[t] for t in _TYPES], dtype=torch.float64)
        rows.append(per_type * g * torch.from_numpy(f))
    if not rows:
        raise ValueError("subjects must hold at least one subject id, got none")
    return torch.stack(rows)[:, _TYPE_INDEX]


def _rot(axis: str, a: Tensor) -> Tensor:
    """Rotations ``(N, 3, 3)`` by angles ``a`` (radians, ``(N,)``) about ``axis``."""
    c, s = torch.cos(a), torch.sin(a)
    o, z = torch.ones_like(a), torch.zeros_like(a)
    rows = {"x": ((o, z, z), (z, c, -s), (z, s, c)),
            "y": ((c, z, s), (z, o, z), (-s, z, c)),
            "z": ((c, -s, z), (s, c, z), (z, z, o))}[axis]
    return torch.stack([torch.stack(r, dim=-1) for r in rows], dim=-2)


def _unit(*v: float) -> Tensor:
    t = torch.tensor(v, dtype=torch.float64)
    return t / t.norm()


def _limb(R_parent: Tensor, side: float, flex: Tensor, abd: Tensor, twist: Tensor) -> Tensor:
    """Orientation of a limb's upper segment: abduction, flexion (forward), twist; ``side`` +1 for
    the left (abduction towards +x) and -1 for the right (the mirror image)."""
    return R_parent @ _rot("z", side * abd) @ _rot("x", -flex) @ _rot("y", side * twist)


def posed_skeletons(lengths: Tensor, angles: Tensor) -> Tensor:
    """Forward kinematics: joints ``(N, 17, 3)`` in the camera frame, root at the origin.

    Args:
        lengths: bone lengths ``(N, 16)`` (metres, order of :data:`BONES`).
        angles: joint angles ``(N, A)`` in degrees, columns :func:`pose_angle_names`.

    Body frame: x the subject's left, y up, z the facing direction. Knees bend backwards and
    elbows forwards only. The global rotation is yaw (about the vertical), pitch, roll; the camera
    frame is the world frame with y and z negated (x right, y down, z into the image).
    """
    N = lengths.shape[0]
    dt = torch.float64
    L = lengths.to(dt)
    a = {n: torch.deg2rad(angles[:, i].to(dt)) for i, n in enumerate(pose_angle_names())}
    J = torch.zeros(N, NUM_JOINTS, 3, dtype=dt)
    up, down = _unit(0, 1, 0), _unit(0, -1, 0)

    def put(child: int, parent: int, R: Tensor, direction: Tensor) -> None:
        J[:, child] = J[:, parent] + L[:, child - 1, None] * (R @ direction)

    R_half = (_rot("y", a["torso_twist"] / 2) @ _rot("z", a["torso_side"] / 2)
              @ _rot("x", a["torso_bend"] / 2))
    R_up = R_half @ R_half
    R_head = R_up @ _rot("y", a["head_yaw"]) @ _rot("x", a["head_pitch"])
    eye = torch.eye(3, dtype=dt).expand(N, 3, 3)
    put(4, 0, eye, _unit(1, -0.15, 0))
    put(1, 0, eye, _unit(-1, -0.15, 0))
    put(7, 0, R_half, up)
    put(8, 7, R_up, up)
    put(9, 8, R_head, _unit(0, 1, 0.45))   # the neck/nose joint sits forwards
    put(10, 9, R_head, _unit(0, 1, -0.3))  # the head top, up and back
    put(11, 8, R_up, _unit(1, -0.12, 0))
    put(14, 8, R_up, _unit(-1, -0.12, 0))
    for side, hip, knee, heel, sh, elb, hand in ((1.0, 4, 5, 6, 11, 12, 13),
                                                 (-1.0, 1, 2, 3, 14, 15, 16)):
        p = "left_" if side > 0 else "right_"
        R_leg = _limb(eye, side, a[p + "hip_flex"], a[p + "hip_abd"], a[p + "hip_twist"])
        put(knee, hip, R_leg, down)
        put(heel, knee, R_leg @ _rot("x", a[p + "knee"]), down)      # bends backwards
        R_arm = _limb(R_up, side, a[p + "shoulder_flex"], a[p + "shoulder_abd"],
                      a[p + "shoulder_twist"])
        put(elb, sh, R_arm, down)
        put(hand, elb, R_arm @ _rot("x", -a[p + "elbow"]), down)     # bends forwards
    R_global = _rot("y", a["yaw"]) @ _rot("x", a["pitch"]) @ _rot("z", a["roll"])
    to_camera = torch.diag(torch.tensor([1.0, -1.0, -1.0], dtype=dt))
    return J @ (to_camera @ R_global).transpose(1, 2)


def _interpolation_matrix(n_in: int, n_out: int) -> Tensor:
    """Linear interpolation ``(n_out, n_in)`` with the end points aligned (bilinear upsampling
    with ``align_corners=True`` is ``M @ X @ M.T``)."""
    x = torch.linspace(0, n_in - 1, n_out)
    lo = x.floor().clamp(max=n_in - 2).to(torch.long)
    w = x - lo
    M = torch.zeros(n_out, n_in)
    M[torch.arange(n_out), lo] = 1 - w
    M[torch.arange(n_out), lo + 1] = w
    return M


def random_backgrounds(rngs: Sequence[np.random.Generator], image_size: int) -> Tensor:
    """Textured backgrounds ``(N, H, W, 3)`` float32 in [0, 1], one per generator: a muted base
    colour, low- and mid-frequency colour noise (4×4 and 16×16 random grids, upsampled
    bilinearly) and random oriented stripes."""
    H = image_size
    grids = torch.tensor(np.stack([np.concatenate([
        r.uniform(0.3, 0.6, 1) + r.uniform(-0.08, 0.08, 3),               # base colour
        r.uniform(-0.15, 0.15, 3 * _BG_COARSE**2),                          # coarse noise
        r.uniform(-0.08, 0.08, 3 * _BG_MID**2),                             # mid noise
        r.uniform(0, 0.08, 1), r.uniform(4, 16, 1), r.uniform(0, np.pi, 2),  # stripes
    ]) for r in rngs]), dtype=torch.float32)
    N = grids.shape[0]
    base, coarse, mid, stripe = torch.split(grids, [3, 3 * _BG_COARSE**2, 3 * _BG_MID**2, 4], 1)
    A, B = _interpolation_matrix(_BG_COARSE, _BG_MID), _interpolation_matrix(_BG_MID, H)
    m, c = _BG_MID, _BG_COARSE
    # bilinear upsampling as M @ X @ M.T; the base colour is added at low resolution
    low = A @ coarse.reshape(N, 3, c, c) @ A.T + mid.reshape(N, 3, m, m) + base[:, :, None, None]
    image = B @ low @ B.T                                             # (N, 3, H, W)
    amp, period, theta, phase = (v[:, None] for v in stripe.unbind(1))
    ar = torch.arange(H, dtype=torch.float32)
    ax = 2 * math.pi * torch.cos(theta) * ar / period + 2 * phase   # (N, W) phase along x
    ay = 2 * math.pi * torch.sin(theta) * ar / period               # (N, H) phase along y
    # sin(ay + ax) = sin(ay) cos(ax) + cos(ay) sin(ax): separable, two outer products
    wave = (amp * torch.sin(ay))[:, :, None] * torch.cos(ax)[:, None, :]
    wave += (amp * torch.cos(ay))[:, :, None] * torch.sin(ax)[:, None, :]
    out = torch.empty(N, H, H, 3)                                     # channels last
    torch.add(image.permute(0, 2, 3, 1), wave[..., None], out=out)
    return out.clamp_(0, 1)


def _composite(joints: Tensor, canvas: Tensor, distinct_sides: bool) -> None:
    """Draw the bones of ``joints`` (N, 17, 3) into ``canvas`` (N, H, W, 3), in place.

    Bone ``b`` is rasterised on an S×S window (S covers the bone and its radius, at most H)
    placed over the bone and shifted to lie inside the image, which keeps every in-image pixel of
    the bone inside the window."""
    N, H = joints.shape[0], canvas.shape[1]
    k = H / 128.0
    uv = (H - 1) / 2 + _PX_PER_M_128 * k * joints[..., :2]   # (N, 17, 2): column, row
    flat = canvas.view(-1, 3)
    base = (torch.arange(N) * H * H)[:, None, None]
    for b in _DRAW_ORDER:
        parent, child = BONES[b]
        kind = BONE_TYPES[b]
        r = _RADIUS[kind] * k
        colour = torch.tensor(_COLOUR[kind]) * (0.6 if distinct_sides and b in _RIGHT_BONES
                                                else 1.0)
        p, q = uv[:, parent], uv[:, child]
        d = q - p
        S = min(math.ceil(float(d.abs().max()) + 2 * r + 4), H)
        origin = torch.floor(torch.minimum(p, q) - r - 1.5)
        origin = origin.clamp(0, H - S).to(torch.long)             # (N, 2), image pixels
        ar = torch.arange(S)
        cols = origin[:, 0, None] + ar                             # (N, S) pixel x
        rows = origin[:, 1, None] + ar                             # (N, S) pixel y
        px = (cols.to(torch.float32) - p[:, 0, None])[:, None, :]  # (N, 1, S)
        py = (rows.to(torch.float32) - p[:, 1, None])[:, :, None]  # (N, S, 1)
        dx, dy = d[:, 0, None, None], d[:, 1, None, None]
        inv = 1 / (dx * dx + dy * dy).clamp_min(1e-12)
        t = (px * (dx * inv) + py * (dy * inv)).clamp_(0, 1)       # (N, S, S)
        ex = px - t * dx
        ey = py - t * dy
        dist = (ex.mul_(ex).add_(ey.mul_(ey))).sqrt_()
        alpha = dist.neg_().add_(r + 0.5).clamp_(0, 1).view(-1)     # (N S S,)
        lin = (base + rows[:, :, None] * H + cols[:, None, :]).view(-1)
        inside = alpha > 0                  # blend only the pixels the line covers
        lin, alpha = lin[inside], alpha[inside, None]
        patch = flat.index_select(0, lin)
        flat.index_copy_(0, lin, patch.add_(alpha * (colour - patch)))


def render_poses(joints: Tensor, *, image_size: int = 128, backgrounds: Tensor | None = None,
                 distinct_sides: bool = False) -> Tensor:
    """Draw skeletons: orthographic projection, thick anti-aliased lines, colour by limb type.

    Only x and y of each joint are used (pixel = image centre + 52 px/m × (x, y) at 128×128),
    line radii are constant per limb type and lines are composited in a fixed order, so the image
    does not depend on depth: negating z gives the same image. With ``distinct_sides=False`` (the
    default) left and right limbs share their colour, so swapping the left and right labels also
    gives the same image; ``distinct_sides=True`` darkens right limbs to 60 %.

    Vectorised over the batch: each bone is rasterised on a square window around it with
    point-to-segment distances, then alpha-composited into the canvas.

    Args:
        joints: ``(N, 17, 3)`` or ``(N, 51)``, camera frame, metres, root-centred.
        image_size: side of the square image in pixels.
        backgrounds: ``(N, H, W, 3)`` in [0, 1]; mid-grey if ``None``.
        distinct_sides: tell left from right by shade.

    Returns:
        Float32 images ``(N, 3, H, W)`` in [0, 1].
    """
    return _render(joints, image_size, backgrounds, distinct_sides).permute(0, 3, 1, 2).contiguous()


def _render(joints: Tensor, image_size: int, backgrounds: Tensor | None, distinct_sides: bool
            ) -> Tensor:
    """:func:`render_poses` with channels-last output ``(N, H, W, 3)``."""
    J = as_joints(joints, "joints").to(torch.float32)
    N, H = J.shape[0], int(image_size)
    if H < 16:
        raise ValueError(f"image_size must be at least 16, got {image_size}")
    if backgrounds is None:
        backgrounds = torch.full((N, H, H, 3), 0.5)
    if tuple(backgrounds.shape) != (N, H, H, 3):
        raise ValueError(f"backgrounds must have shape {(N, H, H, 3)}, "
                         f"got {tuple(backgrounds.shape)}")
    canvas = backgrounds.to(torch.float32, copy=True).contiguous()
    _composite(J, canvas, distinct_sides)
    return canvas


def _to_float(images: Tensor) -> Tensor:
    """uint8 images → contiguous float32 in [0, 1]."""
    return images.to(torch.float32, memory_format=torch.contiguous_format).div_(255)


class _PoseTensors(Dataset):
    """Poses held as whole tensors: ``images`` ``(N, 3, H, W)`` uint8 and ``joints`` ``(N, 51)``
    float32 in metres; items are ``(image float32 in [0, 1], joints)``."""

    images: Tensor
    joints: Tensor

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        return _to_float(self.images[index]), self.joints[index]

    def tensors(self) -> tuple[Tensor, Tensor]:
        """All images ``(N, 3, H, W)`` float32 in [0, 1] and joints ``(N, 51)`` float32."""
        return _to_float(self.images), self.joints


class SyntheticPoses(_PoseTensors):
    """Synthetic 3D pose estimation: ``(image, y)`` with image ``(3, H, W)`` float32 in [0, 1]
    and ``y`` ``(51,)`` float32 the camera-frame, root-centred 3D joints in metres.

    Sample ``i`` depends only on ``(seed, stream, i)`` (its subject, angles, background and pixel
    noise come from ``numpy.random.default_rng([seed, crc32(stream), i])``); the subjects' bone
    lengths depend only on ``(seed, subject id)``. Everything is generated at construction, in
    chunks, and kept in memory as uint8 images (49 kB each at 128×128).

    Args:
        n: number of samples.
        seed: the world seed (subjects' bone lengths and the samples).
        image_size: side of the square images.
        subjects: subject ids to draw from (uniformly per sample).
        stream: name of the sample stream; different streams of one seed draw independent
            samples of the same subjects (the splits use ``"train"``, ``"val"``, ...).
        noise_std: standard deviation of the (uniform, independent) pixel noise.
        distinct_sides: right limbs darker than left ones (see :func:`render_poses`).

    Attributes:
        images: uint8 ``(n, 3, H, W)`` (channels-last memory); joints: float32 ``(n, 51)``;
        subject: int64 ``(n,)``; angles: float32 ``(n, A)`` (degrees, :func:`pose_angle_names`);
        lengths: float32 ``(n, 16)`` (the subject's bone lengths, metres).
    """

    def __init__(self, n: int, *, seed: int, image_size: int = 128,
                 subjects: Sequence[int] = TRAIN_SUBJECTS, stream: str = "train",
                 noise_std: float = 0.02, distinct_sides: bool = False) -> None:
        if n < 1:
            raise ValueError(f"n must be positive, got {n}")
        if image_size < 16:
            raise ValueError(f"image_size must be at least 16, got {image_size}")
        if noise_std < 0:
            raise ValueError(f"noise_std must be non-negative, got {noise_std}")
        subjects = tuple(int(s) for s in subjects)
        if not subjects:
            raise ValueError("subjects must hold at least one subject id, got none")
        self.seed, self.stream, self.image_size = seed, stream, image_size
        self.subjects, self.noise_std, self.distinct_sides = subjects, noise_std, distinct_sides
        self.subject_lengths = subject_bone_lengths(subjects, seed)      # (S, 16) float64
        key = zlib.crc32(stream.encode())
        lows = torch.tensor([lo for _, lo, _ in _ANGLE_RANGES], dtype=torch.float64)
        highs = torch.tensor([hi for _, _, hi in _ANGLE_RANGES], dtype=torch.float64)
        self.images = torch.empty(n, 3, image_size, image_size, dtype=torch.uint8,
                                  memory_format=torch.channels_last)  # stored (n, H, W, 3)
        self.joints = torch.empty(n, 3 * NUM_JOINTS, dtype=torch.float32)
        self.subject = torch.empty(n, dtype=torch.long)
        self.angles = torch.empty(n, len(_ANGLE_RANGES), dtype=torch.float32)
        self.lengths = torch.empty(n, len(BONES), dtype=torch.float32)
        chunk = 128
        for start in range(0, n, chunk):
            idx = range(start, min(n, start + chunk))
            rngs = [np.random.default_rng([seed, key, i]) for i in idx]
            which = torch.tensor([int(r.integers(len(subjects))) for r in rngs])
            u = torch.tensor(np.stack([r.uniform(0, 1, len(_ANGLE_RANGES)) for r in rngs]))
            angles = lows + (highs - lows) * u
            lengths = self.subject_lengths[which]
            J = posed_skeletons(lengths, angles)
            image = random_backgrounds(rngs, image_size)           # (n, H, W, 3)
            _composite(J.to(torch.float32), image, distinct_sides)  # as render_poses does
            # 255 × (image + uniform noise of standard deviation noise_std) + 0.5, from bytes
            raw = np.frombuffer(b"".join(r.bytes(3 * image_size**2) for r in rngs),
                                dtype=np.uint8).reshape(image.shape)
            a = noise_std * math.sqrt(12)   # (byte - 127.5) × a / 255 has std ≈ noise_std
            value = torch.from_numpy(raw.copy()).to(torch.float32).mul_(a).add_(0.5 - 127.5 * a)
            value.add_(image, alpha=255)
            sl = slice(idx.start, idx.stop)
            self.images[sl] = value.clamp_(0, 255.5).to(torch.uint8).permute(0, 3, 1, 2)
            self.joints[sl] = J.reshape(len(idx), -1).to(torch.float32)
            self.subject[sl] = torch.tensor([subjects[w] for w in which.tolist()])
            self.angles[sl] = angles.to(torch.float32)
            self.lengths[sl] = lengths.to(torch.float32)
        logger.debug("generated %d synthetic poses (seed %d, stream %r)", n, seed, stream)



class H36MPoses(_PoseTensors):
    """User-supplied Human3.6M crops: an ``.npz`` with ``images`` ``(N, 128, 128, 3)`` uint8 and
    ``joints`` ``(N, 17, 3)`` (standard 17-joint order, camera frame).

    Joints are converted to metres (``units`` "mm" or "m") and root-centred (joint 0 subtracted).
    Items are ``(image (3, 128, 128) float32 in [0, 1], y (51,) float32)`` like
    :class:`SyntheticPoses`.

    Raises:
        ValueError: naming the file, for a missing key, a wrong shape or dtype, mismatched counts,
            an empty file or non-finite joints; or for unknown ``units``.
    """

    def __init__(self, path: str | Path, *, units: str = "mm", image_size: int = 128) -> None:
        if units not in ("mm", "m"):
            raise ValueError(f"units must be 'mm' or 'm', got {units!r}")
        self.path = Path(path)
        with np.load(self.path, allow_pickle=False) as f:
            for key in ("images", "joints"):
                if key not in f.files:
                    raise ValueError(f"{self.path}: missing key {key!r} (found {f.files})")
            images, joints = f["images"], f["joints"]
        want = (image_size, image_size, 3)
        if images.ndim != 4 or images.shape[1:] != want:
            raise ValueError(f"{self.path}: 'images' must have shape (N, {image_size}, "
                             f"{image_size}, 3), got {images.shape}")
        if images.dtype != np.uint8:
            raise ValueError(f"{self.path}: 'images' must be uint8, got {images.dtype}")
        if joints.ndim != 3 or joints.shape[1:] != (NUM_JOINTS, 3):
            raise ValueError(f"{self.path}: 'joints' must have shape (N, {NUM_JOINTS}, 3), "
                             f"got {joints.shape}")
        if images.shape[0] != joints.shape[0]:
            raise ValueError(f"{self.path}: 'images' holds {images.shape[0]} samples but "
                             f"'joints' holds {joints.shape[0]}")
        if images.shape[0] == 0:
            raise ValueError(f"{self.path}: no samples")
        joints = np.asarray(joints, dtype=np.float64)
        bad = ~np.isfinite(joints).all(axis=(1, 2))
        if bad.any():
            raise ValueError(f"{self.path}: 'joints' has non-finite values in "
                             f"{int(bad.sum())} samples (first: {int(np.argmax(bad))})")
        if units == "mm":
            joints = joints / 1000.0
        joints = joints - joints[:, :1]
        self.units = units
        self.images = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()
        self.joints = torch.from_numpy(joints.reshape(len(joints), -1)).to(torch.float32)



class InputsOnly(Dataset):
    """The inputs of a labelled pose dataset without its labels: items are image tensors only
    (the unlabeled set ``C`` on which constraints are imposed). ``dataset`` keeps the source."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> Tensor:
        return self.dataset[index][0]

    def tensors(self) -> Tensor:
        """All images as one float32 tensor ``(N, 3, H, W)``."""
        return as_tensors(self.dataset)[0]


def as_tensors(dataset: Dataset) -> tuple[Tensor, Tensor]:
    """Whole-dataset tensors ``(images (N, 3, H, W) float32, joints (N, 51) float32)`` for
    full-batch evaluation: direct for :class:`SyntheticPoses`/:class:`H36MPoses` (also through a
    ``torch.utils.data.Subset``), stacked item by item otherwise."""
    if isinstance(dataset, SyntheticPoses | H36MPoses):
        return dataset.tensors()
    if isinstance(dataset, torch.utils.data.Subset) and isinstance(
            dataset.dataset, SyntheticPoses | H36MPoses):
        idx = torch.as_tensor(list(dataset.indices), dtype=torch.long)
        base = dataset.dataset
        return _to_float(base.images[idx]), base.joints[idx]
    if isinstance(dataset, InputsOnly):
        raise ValueError("dataset is an InputsOnly pool without joints; use its tensors() for "
                         "the images")
    items = [dataset[i] for i in range(len(dataset))]  # type: ignore[arg-type]
    if not items:
        raise ValueError("dataset must hold at least one sample, got 0")
    return torch.stack([x for x, _ in items]), torch.stack([y for _, y in items])


class PoseSplits(NamedTuple):
    """Train / validation / test sets and the unlabeled constraint pool."""

    train: SyntheticPoses
    val: SyntheticPoses
    test: SyntheticPoses
    constraint: InputsOnly


def synthetic_pose_splits(seed: int, n_train: int, n_val: int, n_test: int, n_constraint: int,
                          *, image_size: int = 128,
                          train_subjects: Sequence[int] = TRAIN_SUBJECTS,
                          val_subjects: Sequence[int] = VAL_SUBJECTS,
                          test_subjects: Sequence[int] = TEST_SUBJECTS,
                          constraint_subjects: Sequence[int] | None = None,
                          noise_std: float = 0.02, distinct_sides: bool = False) -> PoseSplits:
    """The synthetic splits of one world ``seed``, each its own sample stream.

    Subjects are disjoint between train (0-7), validation (8, 9) and test (10-13) by default, so
    validation and test measure generalisation to unseen bone lengths. The constraint pool ``C``
    (inputs only) draws new images of ``constraint_subjects`` (default: the training subjects).

    Raises:
        ValueError: if a size is not positive (sizes come from :class:`SyntheticPoses`).
    """
    common = {"seed": seed, "image_size": image_size, "noise_std": noise_std,
              "distinct_sides": distinct_sides}
    pool_subjects = train_subjects if constraint_subjects is None else constraint_subjects
    return PoseSplits(
        train=SyntheticPoses(n_train, subjects=train_subjects, stream="train", **common),
        val=SyntheticPoses(n_val, subjects=val_subjects, stream="val", **common),
        test=SyntheticPoses(n_test, subjects=test_subjects, stream="test", **common),
        constraint=InputsOnly(SyntheticPoses(n_constraint, subjects=pool_subjects,
                                             stream="constraint", **common)),
    )
