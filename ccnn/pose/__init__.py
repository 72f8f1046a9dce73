"""3D human pose estimation under symmetry constraints (Márquez-Neila, Salzmann and Fua,
"Imposing Hard Constraints on Deep Networks: Promises and Limitations", 2017, Section 5):
the 17-joint skeleton and its six symmetry constraints, a synthetic dataset, a Human3.6M loader
and the network of Eq. 13."""

from ccnn.pose.data import (
    H36MPoses,
    InputsOnly,
    PoseSplits,
    SyntheticPoses,
    as_tensors,
    posed_skeletons,
    random_backgrounds,
    render_poses,
    subject_bone_lengths,
    synthetic_pose_splits,
)
from ccnn.pose.model import PoseNet, pose_loss, posenet_num_parameters
from ccnn.pose.skeleton import (
    BONES,
    JOINT_NAMES,
    NUM_JOINTS,
    PARENTS,
    SYMMETRY_NAMES,
    SYMMETRY_PAIRS,
    bone_lengths,
    constraints_met,
    mean_joint_error,
    median_constraint_violation,
    symmetrize,
    symmetry_residuals,
)

__all__ = [
    "BONES",
    "JOINT_NAMES",
    "NUM_JOINTS",
    "PARENTS",
    "SYMMETRY_NAMES",
    "SYMMETRY_PAIRS",
    "H36MPoses",
    "InputsOnly",
    "PoseNet",
    "PoseSplits",
    "SyntheticPoses",
    "as_tensors",
    "bone_lengths",
    "constraints_met",
    "mean_joint_error",
    "median_constraint_violation",
    "pose_loss",
    "posed_skeletons",
    "posenet_num_parameters",
    "random_backgrounds",
    "render_poses",
    "subject_bone_lengths",
    "symmetrize",
    "symmetry_residuals",
    "synthetic_pose_splits",
]
