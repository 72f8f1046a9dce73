"""The 17-joint Human3.6M skeleton, its symmetry constraints and the pose metrics.

Joint order is the standard 17-joint Human3.6M order (Ionescu et al., "Human3.6M: Large Scale
Datasets and Predictive Methods for 3D Human Sensing in Natural Environments", 2014) used by
Márquez-Neila, Salzmann and Fua, "Imposing Hard Constraints on Deep Networks: Promises and
Limitations", 2017. A pose ``y`` is either ``(K, 51)`` (joint-major: ``x0, y0, z0, x1, ...``)
or ``(K, 17, 3)``.

>>> import torch
>>> y = torch.zeros(1, 17, 3)
>>> y[0, LEFT_ELBOW, 1] = 2.0   # left arm of length 2 (shoulder at the origin)
>>> y[0, RIGHT_ELBOW, 1] = 1.0  # right arm of length 1
>>> symmetry_residuals(y)[0, 0].item(), symmetry_residuals(y, squared=False)[0, 0].item()
(3.0, 1.0)
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = [
    "BONES",
    "FLIP_PERMUTATION",
    "JOINT_NAMES",
    "LEFT_JOINTS",
    "LEFT_RIGHT_BONES",
    "NUM_JOINTS",
    "PARENTS",
    "RIGHT_JOINTS",
    "SYMMETRY_NAMES",
    "SYMMETRY_PAIRS",
    "as_joints",
    "bone_lengths",
    "constraints_met",
    "mean_joint_error",
    "median_constraint_violation",
    "symmetrize",
    "symmetry_residuals",
]

JOINT_NAMES: tuple[str, ...] = (
    "pelvis",          # 0  root ("hip" in Human3.6M)
    "right_hip",       # 1
    "right_knee",      # 2
    "right_heel",      # 3  ("right foot")
    "left_hip",        # 4
    "left_knee",       # 5
    "left_heel",       # 6
    "spine",           # 7
    "chest",           # 8  ("thorax")
    "neck",            # 9  ("neck/nose")
    "head",            # 10
    "left_shoulder",   # 11
    "left_elbow",      # 12
    "left_hand",       # 13 ("left wrist")
    "right_shoulder",  # 14
    "right_elbow",     # 15
    "right_hand",      # 16 ("right wrist")
)
NUM_JOINTS = len(JOINT_NAMES)
(PELVIS, RIGHT_HIP, RIGHT_KNEE, RIGHT_HEEL, LEFT_HIP, LEFT_KNEE, LEFT_HEEL, SPINE, CHEST, NECK,
 HEAD, LEFT_SHOULDER, LEFT_ELBOW, LEFT_HAND, RIGHT_SHOULDER, RIGHT_ELBOW, RIGHT_HAND) = range(17)

#: Parent of each joint (-1 for the root); bone ``j`` (``j >= 1``) joins ``PARENTS[j]`` and ``j``.
PARENTS: tuple[int, ...] = (-1, 0, 1, 2, 0, 4, 5, 0, 7, 8, 9, 8, 11, 12, 8, 14, 15)
#: The 16 bones as ``(parent, child)``, in child order 1..16.
BONES: tuple[tuple[int, int], ...] = tuple((PARENTS[j], j) for j in range(1, NUM_JOINTS))

LEFT_JOINTS: tuple[int, ...] = (LEFT_HIP, LEFT_KNEE, LEFT_HEEL, LEFT_SHOULDER, LEFT_ELBOW,
                                LEFT_HAND)
RIGHT_JOINTS: tuple[int, ...] = (RIGHT_HIP, RIGHT_KNEE, RIGHT_HEEL, RIGHT_SHOULDER, RIGHT_ELBOW,
                                 RIGHT_HAND)
#: Joint permutation that swaps left and right labels (an involution).
FLIP_PERMUTATION: tuple[int, ...] = tuple(
    RIGHT_JOINTS[LEFT_JOINTS.index(j)] if j in LEFT_JOINTS
    else LEFT_JOINTS[RIGHT_JOINTS.index(j)] if j in RIGHT_JOINTS else j
    for j in range(NUM_JOINTS))

#: Names of the six symmetry constraints of Table 2 (rows of :data:`SYMMETRY_PAIRS`).
SYMMETRY_NAMES: tuple[str, ...] = ("arm", "forearm", "thigh", "calf", "chest-shoulder",
                                   "pelvis-hip")
#: Table 2 of Márquez-Neila, Salzmann and Fua 2017: ``joint(j, m)`` for j = 1..6, m = 1..4;
#: constraint j compares the left bone (columns 0, 1) with the right bone (columns 2, 3).
SYMMETRY_PAIRS: Tensor = torch.tensor([
    [LEFT_SHOULDER, LEFT_ELBOW, RIGHT_SHOULDER, RIGHT_ELBOW],  # arm
    [LEFT_ELBOW, LEFT_HAND, RIGHT_ELBOW, RIGHT_HAND],          # forearm
    [LEFT_HIP, LEFT_KNEE, RIGHT_HIP, RIGHT_KNEE],              # thigh ("leg")
    [LEFT_KNEE, LEFT_HEEL, RIGHT_KNEE, RIGHT_HEEL],            # calf
    [CHEST, LEFT_SHOULDER, CHEST, RIGHT_SHOULDER],             # chest-shoulder
    [PELVIS, LEFT_HIP, PELVIS, RIGHT_HIP],                     # pelvis-hip
], dtype=torch.long)
#: The same six pairs as ``((left parent, left child), (right parent, right child))``.
LEFT_RIGHT_BONES: tuple[tuple[tuple[int, int], tuple[int, int]], ...] = tuple(
    ((int(a), int(b)), (int(c), int(d))) for a, b, c, d in SYMMETRY_PAIRS.tolist())


def as_joints(y: Tensor, name: str = "y") -> Tensor:
    """View a batch of poses ``(K, 51)`` or ``(K, 17, 3)`` as ``(K, 17, 3)``.

    Raises:
        ValueError: for any other shape (the message names ``name`` and the shape).
    """
    if not isinstance(y, Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(y).__name__}")
    if y.dim() == 2 and y.shape[1] == 3 * NUM_JOINTS:
        return y.reshape(y.shape[0], NUM_JOINTS, 3)
    if y.dim() == 3 and tuple(y.shape[1:]) == (NUM_JOINTS, 3):
        return y
    raise ValueError(f"{name} must have shape (K, {3 * NUM_JOINTS}) or (K, {NUM_JOINTS}, 3), "
                     f"got {tuple(y.shape)}")


def bone_lengths(y: Tensor) -> Tensor:
    """Lengths ``(K, 16)`` of the 16 bones of :data:`BONES` for poses ``(K, 51)``/``(K, 17, 3)``."""
    J = as_joints(y)
    parent = torch.tensor([p for p, _ in BONES], device=J.device)
    child = torch.tensor([c for _, c in BONES], device=J.device)
    return torch.linalg.vector_norm(J[:, child] - J[:, parent], dim=-1)


def symmetry_residuals(y: Tensor, squared: bool = True, relative: bool = False) -> Tensor:
    """The six left/right symmetry constraints ``C_jk`` for each pose: ``(K, 6)``.

    With ``squared=False`` this is Eq. 15 of Márquez-Neila, Salzmann and Fua, "Imposing Hard
    Constraints on Deep Networks: Promises and Limitations", 2017:
    ``C_jk = ||y_{k,a} - y_{k,b}|| - ||y_{k,c} - y_{k,d}||`` with ``(a, b, c, d)`` row ``j`` of
    Table 2 (:data:`SYMMETRY_PAIRS`). The default ``squared=True`` compares squared lengths,
    ``||y_{k,a} - y_{k,b}||² - ||y_{k,c} - y_{k,d}||²``: the same zero set (lengths are
    non-negative), but a polynomial, so smooth even where a bone has zero length.

    ``relative=True`` divides the squared form by the sum of the two squared lengths,
    ``(‖l‖² − ‖r‖²) / (‖l‖² + ‖r‖²)``: the same zero set for bones of non-zero length, but
    invariant to the scale of the pose. The squared and length forms are homogeneous (scaling a
    pose by ``s`` scales them by ``s²`` or ``s``), so their linearization is zeroed for every
    sample at once by shrinking the pose: a constrained step then trades accuracy for a smaller
    skeleton, which the relative form cannot reward.

    Differentiable (autograd and ``torch.func``), batched, keeps ``y``'s dtype and device.

    Args:
        y: poses ``(K, 51)`` or ``(K, 17, 3)``.
        squared: difference of squared bone lengths (default) or of the lengths themselves.
        relative: the scale-invariant form above (``squared`` is then ignored).

    Raises:
        ValueError: if ``y`` has another shape.
    """
    J = as_joints(y)
    idx = SYMMETRY_PAIRS.to(J.device)
    left = J[:, idx[:, 0]] - J[:, idx[:, 1]]    # (K, 6, 3)
    right = J[:, idx[:, 2]] - J[:, idx[:, 3]]
    if relative:
        l2, r2 = (left * left).sum(-1), (right * right).sum(-1)
        return (l2 - r2) / (l2 + r2).clamp_min(torch.finfo(J.dtype).tiny)
    if squared:
        return (left * left).sum(-1) - (right * right).sum(-1)
    return torch.linalg.vector_norm(left, dim=-1) - torch.linalg.vector_norm(right, dim=-1)


def symmetrize(y: Tensor, *, steps: int = 10, tol: float = 1e-12) -> Tensor:
    """A symmetric pose near each pose of ``y``: the six constraints of
    :func:`symmetry_residuals` (squared form) driven to zero by minimum-norm Newton corrections,
    ``y ← y − J⁺·C(y)`` with ``J = ∂C/∂y`` per pose, until ``max |C| ≤ tol`` or ``steps``.

    Each correction is the smallest move of the joints that zeroes the linearized constraints,
    so the result lies near ``y`` (not exactly the closest symmetric pose, which needs the
    constraints' curvature too).  Computed in float64; returns ``y``'s shape and dtype.
    """
    if steps < 0:
        raise ValueError(f"steps must be >= 0, got {steps}")
    joints = as_joints(y)
    p = joints.reshape(joints.shape[0], -1).double()

    def residual(pose: Tensor) -> Tensor:
        return symmetry_residuals(pose[None])[0]

    jacobian = torch.func.vmap(torch.func.jacrev(residual))
    for _ in range(steps):
        C = symmetry_residuals(p)
        if not len(C) or float(C.abs().max()) <= tol:
            break
        p = p - (torch.linalg.pinv(jacobian(p)) @ C[..., None])[..., 0]
    return p.to(y.dtype).reshape(y.shape)


def mean_joint_error(pred: Tensor, true: Tensor) -> Tensor:
    """The prediction error of Márquez-Neila, Salzmann and Fua 2017 (Section 5), a 0-d tensor:
    ``(1/N) Σ_i (1/17) Σ_m ||y_{i,m} - ŷ_{i,m}||``, in the units of the poses.

    Raises:
        ValueError: if a shape is not ``(K, 51)``/``(K, 17, 3)`` or the batch sizes differ.
    """
    P, T = as_joints(pred, "pred"), as_joints(true, "true")
    if P.shape[0] != T.shape[0]:
        raise ValueError(f"pred and true must hold the same number of poses, got "
                         f"{P.shape[0]} and {T.shape[0]}")
    if P.shape[0] == 0:
        raise ValueError("pred must hold at least one pose, got 0")
    return torch.linalg.vector_norm(P - T, dim=-1).mean()


def constraints_met(C: Tensor, thresholds: Sequence[float] | Tensor) -> Tensor:
    """Share of constraint values with ``|C_jk| <= t`` for each threshold ``t`` (the curve of
    Fig. 2b of Márquez-Neila, Salzmann and Fua 2017): a float tensor ``(T,)`` in [0, 1].

    Args:
        C: constraint values of any shape (e.g. :func:`symmetry_residuals` output ``(K, 6)``).
        thresholds: non-negative thresholds, a sequence or 1-D tensor.

    Raises:
        ValueError: if ``C`` is empty, or ``thresholds`` is not 1-D or holds a negative value.
    """
    if C.numel() == 0:
        raise ValueError(f"C must hold at least one value, got shape {tuple(C.shape)}")
    dtype = C.dtype if C.is_floating_point() else torch.get_default_dtype()
    t = torch.as_tensor(thresholds, dtype=dtype, device=C.device)
    if t.dim() != 1:
        raise ValueError(f"thresholds must be 1-D, got shape {tuple(t.shape)}")
    if bool((t < 0).any()):
        raise ValueError(f"thresholds must be non-negative, got {t.tolist()}")
    a = C.detach().abs().reshape(-1).to(dtype)
    return (a[None, :] <= t[:, None]).to(dtype).mean(dim=1)


def median_constraint_violation(C: Tensor) -> Tensor:
    """Median of ``|C_jk|`` over all entries (the second metric of Márquez-Neila, Salzmann and Fua
    2017, Section 5); for an even count, the mean of the two middle values. A 0-d tensor.

    Raises:
        ValueError: if ``C`` is empty.
    """
    if C.numel() == 0:
        raise ValueError(f"C must hold at least one value, got shape {tuple(C.shape)}")
    s = C.detach().abs().reshape(-1).sort().values
    n = s.numel()
    return (s[(n - 1) // 2] + s[n // 2]) / 2
