"""The ``ccnn`` command line.

Subcommands:
    demo      train full, mil, ccnn and ccnn-size on the synthetic default; the table on test.
    train     train one method (weak labels or full supervision) on a dataset.
    pretrain  the small network's backbone on a shape classification set (ImageNet's stand-in)
              or on a dataset's own training tags.
    estimate-bounds  constraint constants from at most 20 labelled masks of a new dataset.
    evaluate  mIoU, per-class IoU and pixel accuracy of a checkpoint on a split (test).
    predict   colour PNG masks of a checkpoint's predictions for a folder of images.
    check     the P-step solvers against the CVXPY oracle on random small problems.
    pose      soft, Lagrangian and hard symmetry constraints on a 3D pose network.
    hypersphere  hard vs soft constraints on 200 nearly equal hyperspheres (Márquez-Neila et al.).
    helmholtz  sine waves under the Helmholtz PDE constraint (Jergensen).
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from ccnn import __version__


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``ccnn`` and its subcommands."""
    parser = argparse.ArgumentParser(
        prog="ccnn", description="Training neural networks under constraints on their outputs.")
    parser.add_argument("--version", action="version", version=f"ccnn {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    check = sub.add_parser(
        "check", help="validate the P-step solvers against CVXPY",
        description="Solve random small P-step problems with every method and with CVXPY; print "
                    "the largest differences and exit non-zero when they disagree.")
    check.add_argument("--instances", type=int, default=20, help="random images (default 20)")
    check.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    check.add_argument("--classes", type=int, default=5, help="classes L (default 5)")
    check.add_argument("--size", type=int, default=6, help="image side in pixels (default 6)")
    check.add_argument("--solver", default="SCS", choices=["SCS", "CLARABEL"],
                       help="CVXPY solver of the oracle (default SCS)")
    check.add_argument("--methods", default="newton,pgd",
                       help="comma-separated methods to check (default newton,pgd)")
    check.add_argument("--fraction-tol", type=float, default=1e-4,
                       help="largest allowed difference in class fractions (default 1e-4)")
    check.add_argument("--objective-tol", type=float, default=1e-5,
                       help="largest allowed relative difference in objective (default 1e-5)")
    check.add_argument("--json", metavar="PATH", help="also write the rows as JSON")
    _add_train(sub)
    _add_demo(sub)
    _add_pretrain(sub)
    _add_estimate_bounds(sub)
    _add_evaluate(sub)
    _add_predict(sub)
    _add_pose(sub)
    _add_hypersphere(sub)
    _add_helmholtz(sub)
    return parser


def _add_train(sub: argparse._SubParsersAction) -> None:
    """``ccnn train``: every option defaults to the preset's value (see ``ccnn.presets``)."""
    from ccnn.constraints import BOUND_CONSTANTS, SMALL_RULES
    from ccnn.criteria import METHODS
    from ccnn.presets import PRESETS

    p = sub.add_parser(
        "train", help="train one method on a dataset",
        description="Train a segmentation network from image-level tags (ccnn; ccnn-size: and "
                    "one size bit per tagged class; ccnn-size-exact: and measured sizes; mil) or "
                    "masks (full) on the train split, validating on val after every epoch. Unset "
                    "options take the preset's values.")
    p.add_argument("--method", choices=METHODS, default="ccnn", help="default ccnn")
    p.add_argument("--preset", choices=tuple(PRESETS), default="synthetic",
                   help="settings to start from (default synthetic; voc and camvid carry "
                        "CCNN's constants)")
    p.add_argument("--data-root", default="data", help="folder of the datasets (default data/)")
    p.add_argument("--train-split", help="training split (voc: train or train_aug)")
    p.add_argument("--val-split", help="validation split (choosing settings)")
    p.add_argument("--test-split", help="the split reports use (ccnn evaluate's default)")
    p.add_argument("--out", help="output folder (default runs/<preset>-<method>)")
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the run already in OUT (by default a folder holding a "
                        "checkpoint is refused)")
    p.add_argument("--nproc", type=int, metavar="N",
                   help="train on N processes of this machine with torch.distributed (gloo on "
                        "the CPU, NCCL with --device cuda: one GPU each); --batch-size stays "
                        "the global batch (docs/distributed.md; under torchrun leave it out)")
    p.add_argument("--max-restarts", type=int, metavar="R",
                   help="with --nproc: after a process fails, restart them all up to R times, "
                        "resuming from the last checkpoint (default 0)")
    p.add_argument("--skip-bad", action="store_true", default=None,
                   help="leave out (and count in the log) the samples whose files are "
                        "truncated or corrupt instead of stopping")
    p.add_argument("--model", help="small, vgg16-fcn, deeplab-resnet50 or deeplab-resnet101")
    p.add_argument("--backbone-weights", metavar="PATH",
                   help="local torchvision checkpoint of the backbone, or for the small "
                        "network a file of ccnn pretrain (else random weights)")
    p.add_argument("--epochs", type=int)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--optimizer", choices=("sgd", "adam"))
    p.add_argument("--lr", type=float)
    p.add_argument("--momentum", type=float)
    p.add_argument("--weight-decay", type=float)
    p.add_argument("--schedule", choices=("poly", "constant"))
    p.add_argument("--crop", type=int, help="random square crop in pixels (default none)")
    p.add_argument("--scale", type=float, nargs=2, metavar=("LOW", "HIGH"),
                   help="random rescaling range (default 1 1)")
    p.add_argument("--no-flip", dest="flip", action="store_false", default=None,
                   help="no random horizontal flips")
    p.add_argument("--p-method", choices=("newton", "pgd"), help="P-step solver (newton)")
    p.add_argument("--p-tol", type=float, help="P-step KKT tolerance (1e-6)")
    p.add_argument("--hardness", type=float, help="CCNN's hardness s of the P-step")
    p.add_argument("--bound", action="append", default=[], metavar="NAME=VALUE",
                   help="override one of the preset's constraint constants, e.g. bg_upper=0.6 "
                        f"(repeatable; names: {', '.join(BOUND_CONSTANTS)}; and small_rule="
                        f"{' or '.join(SMALL_RULES)}: a tagged class under size_threshold is "
                        "absent or at most the threshold, for ccnn-size)")
    p.add_argument("--crf", action=argparse.BooleanOptionalAction, default=None,
                   help="also report the final metrics after the dense CRF (synthetic: on)")
    p.add_argument("--refine-epochs", type=int, metavar="N",
                   help="weak-label methods: N more epochs on the network's own CRF-refined, "
                        "tag-restricted predictions (ccnn.refine; default 0)")
    p.add_argument("--refine-lr", type=float, metavar="LR",
                   help="restart the learning rate at LR for the refinement stage, decaying over "
                        "its own epochs (default: one schedule spans both stages)")
    p.add_argument("--refine-sizes", action=argparse.BooleanOptionalAction, default=None,
                   help="size methods: keep the size bounds (ccnn-size: its one bit per class) "
                        "in the refinement stage (default: the stage uses the tags alone)")
    p.add_argument("--train-size", type=int, help="synthetic: training images (1000)")
    p.add_argument("--val-size", type=int, help="synthetic: validation images (200)")
    p.add_argument("--test-size", type=int, help="synthetic: test images (200)")
    p.add_argument("--seed", type=int, default=0, help="default 0")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ... (default cpu)")
    p.add_argument("--workers", dest="num_workers", type=int, help="data loading processes")
    _add_no_progress(p)


def _add_no_progress(p: argparse.ArgumentParser) -> None:
    """``--no-progress``, shared by the commands that train."""
    p.add_argument("--no-progress", dest="progress", action="store_false",
                   help="no progress bar")


def _add_test_time_crf(p: argparse.ArgumentParser) -> None:
    """``--crf``, shared by the commands that predict from a checkpoint."""
    p.add_argument("--crf", action="store_true",
                   help="refine the predictions with the dense CRF first (CCNN's test time)")


def _add_demo(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo", help="the main job: four methods on the synthetic default",
        description="Train full, mil, ccnn and ccnn-size on the synthetic default (8.5-9 "
                    "minutes on two otherwise idle CPU cores, measured) and print their mIoU on "
                    "the test split, before and after the refinement stage.")
    p.add_argument("--out", default="runs/demo", help="output folder (default runs/demo)")
    p.add_argument("--json", metavar="PATH", help="also write the table as JSON")
    p.add_argument("--seed", type=int, default=0, help="default 0")
    p.add_argument("--methods", default="full,mil,ccnn,ccnn-size",
                   help="comma-separated methods (default full,mil,ccnn,ccnn-size; also "
                        "ccnn-size-exact)")
    p.add_argument("--epochs", type=int, help="override the preset's epochs")
    p.add_argument("--jobs", type=int, default=4,
                   help="methods trained at once, each in a process of its own on one thread "
                        "(default 4: the four methods take unequal times, and four at once keep "
                        "two cores busy to the end; 1: one after another in this process, on "
                        "torch's threads). Every --jobs of 2 or more gives the same numbers "
                        "(one thread per method); 1 gives others")
    p.add_argument("--train-size", type=int, help="training images (default 1000)")
    p.add_argument("--val-size", type=int, help="validation images (default 200)")
    p.add_argument("--test-size", type=int, help="test images, the table's (default 200)")
    p.add_argument("--device", help="the methods' device, e.g. cuda (default cpu; the backbone's "
                                    "pretraining stays on the CPU)")
    p.add_argument("--no-pretrain", dest="pretrain", action="store_false",
                   help="start every method from random weights (no shared pretrained backbone)")
    _add_no_progress(p)


def _add_pretrain(sub: argparse._SubParsersAction) -> None:
    from ccnn.pretrain import LOSSES, POOLS, PRETRAIN_DATASETS, SOURCE_DEFAULTS, PretrainConfig

    p = sub.add_parser(
        "pretrain", help="pretrain the small network's backbone on image-level labels",
        description="Train the small network's features to classify images from image-level "
                    "labels only, the stand-in for an ImageNet backbone: by default single-object "
                    "synthetic images by shape (a split never used for segmentation); with "
                    "--dataset voc or camvid, the dataset's own training images by their tags "
                    "(multi-label, binary cross-entropy per class; tag mAP reported on "
                    "--val-split). Pass the file to ccnn train --backbone-weights.")
    p.add_argument("--out", default="runs/backbone.pt", help="weights file (default "
                                                             "runs/backbone.pt)")
    p.add_argument("--dataset", choices=PRETRAIN_DATASETS, default="synthetic",
                   help="synthetic (shapes, the demo's) or a dataset's own training tags "
                        "(default synthetic)")
    p.add_argument("--data-root", help="--dataset voc/camvid: its folder (default data)")
    p.add_argument("--train-split", help="--dataset: split to train on (default train)")
    p.add_argument("--val-split", help="--dataset: split to report tag mAP on (default val)")
    p.add_argument("--crop", type=int, help="--dataset: random square crops of this many pixels "
                                            "(default whole images)")
    p.add_argument("--pool", choices=POOLS,
                   help=f"the classifier's global pooling (default "
                        f"{SOURCE_DEFAULTS['synthetic']['pool']} on the synthetic shapes, "
                        f"{SOURCE_DEFAULTS['tags']['pool']} with --dataset)")
    p.add_argument("--loss", choices=LOSSES, help="--dataset: bce (a binary cross-entropy per "
                                                  "class) or softmax (normalised tags; default "
                                                  "bce)")
    p.add_argument("--init", metavar="FILE", help="start the features from this backbone file "
                                                  "(e.g. the synthetic one) instead of random "
                                                  "weights")
    p.add_argument("--images", type=int,
                   help=f"synthetic: training images (default {PretrainConfig.images})")
    p.add_argument("--epochs", type=int, help=f"default {PretrainConfig.epochs}")
    p.add_argument("--lr", type=float, help=f"Adam learning rate (default {PretrainConfig.lr:g})")
    p.add_argument("--batch-size", type=int,
                   help=f"default {SOURCE_DEFAULTS['synthetic']['batch_size']} on the synthetic "
                        f"shapes, {SOURCE_DEFAULTS['tags']['batch_size']} with --dataset")
    p.add_argument("--seed", type=int, help=f"default {PretrainConfig.seed}")
    _add_no_progress(p)


def _add_estimate_bounds(sub: argparse._SubParsersAction) -> None:
    from ccnn.presets import MAX_ESTIMATE_MASKS

    p = sub.add_parser(
        "estimate-bounds", help="constraint constants from at most 20 labelled masks",
        description="Estimate the constraint constants of ccnn and ccnn-size for a new dataset "
                    f"from the class fractions of at most {MAX_ESTIMATE_MASKS} labelled masks "
                    "(the first images of --split) and print them as ccnn train --bound "
                    "options. A result that uses them uses those labelled masks: say so.")
    p.add_argument("--dataset", choices=("voc", "camvid"), default="voc", help="default voc")
    p.add_argument("--data-root", default="data", help="the dataset's folder (default data)")
    p.add_argument("--split", default="val", help="split whose first masks are read (default "
                                                  "val)")
    p.add_argument("--masks", type=int, default=MAX_ESTIMATE_MASKS,
                   help=f"labelled masks to read, at most {MAX_ESTIMATE_MASKS} (default "
                        f"{MAX_ESTIMATE_MASKS})")
    p.add_argument("--json", metavar="PATH", help="also write the estimate as JSON")
    p.set_defaults(command="estimate_bounds")  # main() calls commands.main_<command>


def _add_evaluate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("evaluate", help="evaluate a checkpoint on a dataset split",
                       description="mIoU, per-class IoU and pixel accuracy at full resolution.")
    p.add_argument("checkpoint", help="a checkpoint.pt written by ccnn train")
    p.add_argument("--split", help="dataset split (default the run's test split; val for "
                                   "choosing settings)")
    p.add_argument("--data-root", help="folder of the datasets (default the run's)")
    p.add_argument("--device", default="cpu")
    _add_test_time_crf(p)
    p.add_argument("--json", metavar="PATH", help="also write the metrics as JSON")
    p.add_argument("--skip-bad", action="store_true",
                   help="leave out (and count) the images whose files are truncated or corrupt")


def _add_predict(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("predict", help="colour PNG masks for a folder of images")
    p.add_argument("checkpoint", help="a checkpoint.pt written by ccnn train")
    p.add_argument("input", help="folder of images (.jpg, .jpeg, .png, .bmp)")
    p.add_argument("output", help="folder for the PNG masks (created)")
    _add_test_time_crf(p)
    p.add_argument("--device", default="cpu")
    p.add_argument("--skip-bad", action="store_true",
                   help="skip (and count) the images that cannot be read instead of stopping")


def _add_pose(sub: argparse._SubParsersAction) -> None:
    from ccnn.pose.experiment import (
        METHODS,
        PERSISTENT_ANNEAL,
        PERSISTENT_BASES,
        PERSISTENT_LR,
        PoseConfig,
    )

    d = PoseConfig()
    p = sub.add_parser(
        "pose", help="symmetry constraints on a 3D pose network, every method",
        description="The experiment of Márquez-Neila, Salzmann and Fua (2017, §5): train the "
                    "Eq. 13 network without constraints, then fine-tune it under the six "
                    "left/right symmetry constraints by Soft-SGD, Soft-Adam, the Lagrangian, "
                    "Hard-SGD, Hard-Adam, Hard-Gauss-Newton, the persistent-pool hard method and "
                    "projected targets (the pool pulled toward symmetric poses); report mean "
                    "joint error and constraint violation on the test split and draw Fig. 2a "
                    "and 2b (docs/hard_experiments.md: 6-9 minutes on two CPU cores).")
    p.add_argument("--out", default="runs/pose", help="folder for the figure (default "
                                                      "runs/pose)")
    p.add_argument("--json", metavar="PATH", help="also write the numbers as JSON")
    p.add_argument("--seed", type=int, default=d.seed, help=f"default {d.seed}")
    p.add_argument("--methods", default=",".join(METHODS), help="comma-separated (default all)")
    p.add_argument("--iterations", type=int, default=d.iterations,
                   help=f"constrained iterations per method (default {d.iterations})")
    p.add_argument("--pretrain-epochs", type=int, default=d.pretrain_epochs,
                   help=f"unconstrained Adam epochs (default {d.pretrain_epochs})")
    p.add_argument("--train-size", dest="n_train", type=int, default=d.n_train,
                   help=f"default {d.n_train}")
    p.add_argument("--val-size", dest="n_val", type=int, default=d.n_val,
                   help=f"default {d.n_val}")
    p.add_argument("--test-size", dest="n_test", type=int, default=d.n_test,
                   help=f"default {d.n_test}")
    p.add_argument("--pool-size", dest="n_pool", type=int, default=d.n_pool,
                   help=f"unlabeled constraint images (default {d.n_pool})")
    p.add_argument("--persistent-correction", type=float, default=d.persistent_correction,
                   help="share of the linearized violation each step of the persistent-pool "
                        "method removes until --persistent-target is reached, in (0, 1] "
                        f"(default {d.persistent_correction:g}; 1 is Eq. 5's full correction)")
    p.add_argument("--persistent-target", type=_optional_float, default=d.persistent_target,
                   help="once the held-out median |C| is at most this share of the start "
                        "model's, the persistent method's correction falls to "
                        f"--persistent-low; 'none' never (default {d.persistent_target:g})")
    p.add_argument("--persistent-low", type=float, default=d.persistent_low,
                   help="the persistent method's correction once --persistent-target is "
                        f"reached, in (0, 1] (default {d.persistent_low:g})")
    p.add_argument("--persistent-warmup", type=int, default=d.persistent_warmup,
                   help="steps over which the persistent method's correction rises linearly to "
                        f"--persistent-correction; 0 none (default {d.persistent_warmup})")
    p.add_argument("--persistent-data-steps", type=int, default=d.persistent_data_steps,
                   help="data steps of the persistent method per iteration, each on its own "
                        "labelled batch, the last one projected onto the constraints "
                        f"(default {d.persistent_data_steps})")
    p.add_argument("--persistent-final", type=int, default=d.persistent_final,
                   help="last iterations of the persistent method that take the projected step "
                        "alone at the full correction (1), without a plain data step before it "
                        f"(default {d.persistent_final})")
    p.add_argument("--persistent-anneal", type=int, default=d.persistent_anneal,
                   help="last iterations over which the persistent method's learning rate "
                        "falls linearly to --persistent-anneal-to times its own; 0 a constant "
                        f"rate (default {PERSISTENT_ANNEAL}; 0 with --persistent-base gn)")
    p.add_argument("--persistent-anneal-to", type=float, default=d.persistent_anneal_to,
                   help="the share of its learning rate the persistent method ends at, in "
                        f"(0, 1] (default {d.persistent_anneal_to:g})")
    p.add_argument("--persistent-budget", type=int, default=d.persistent_budget,
                   help=f"most samples in the persistent method's pool (default "
                        f"{d.persistent_budget})")
    p.add_argument("--persistent-mined", type=int, default=d.persistent_mined,
                   help=f"samples mined into that pool each step (default {d.persistent_mined})")
    p.add_argument("--persistent-lr", type=float, default=None,
                   help="learning rate of the persistent method's steps (default its base's: "
                        + ", ".join(f"{b} {v:g}" for b, v in PERSISTENT_LR.items()) + ")")
    p.add_argument("--persistent-base", choices=PERSISTENT_BASES,
                   default=d.persistent_base,
                   help="the persistent method's step: Eq. 5, Eq. 10-12, Adam's step projected "
                        "in Eq. 5's metric, or Gauss-Newton's Eq. 6 (default "
                        f"{d.persistent_base})")
    p.add_argument("--persistent-maxit", type=int, default=d.persistent_maxit,
                   help="MINRES-QLP iterations of the persistent method's solves, whatever its "
                        f"base (default {d.persistent_maxit})")
    p.add_argument("--persistent-frozen", type=_names, default=d.persistent_frozen,
                   help="comma-separated submodules whose weights the persistent method leaves "
                        "at the start model's, 'none' to train every weight (default "
                        f"{','.join(d.persistent_frozen)})")
    p.add_argument("--adam-bias-correction", choices=("eq12", "adam"),
                   default=d.adam_bias_correction,
                   help="Hard-Adam's D: Eq. 12 as printed, or Adam's own bias correction "
                        f"(default {d.adam_bias_correction})")
    p.add_argument("--h36m", metavar="NPZ", help="Human3.6M crops and joints (images (N,128,"
                   "128,3) uint8, joints (N,17,3)) instead of the synthetic data")
    p.add_argument("--h36m-units", choices=("mm", "m"), default=d.h36m_units,
                   help=f"units of the file's joints (default {d.h36m_units})")
    _add_no_progress(p)


def _names(text: str) -> tuple[str, ...]:
    """A comma-separated list of names; 'none' (or nothing) is the empty list."""
    return () if text.strip().lower() in ("", "none") else tuple(
        n.strip() for n in text.split(",") if n.strip())


def _optional_float(text: str) -> float | None:
    """A number, or None for 'none' (any case)."""
    if text.strip().lower() == "none":
        return None
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number or 'none', got {text!r}") from None


def _add_hypersphere(sub: argparse._SubParsersAction) -> None:
    from ccnn.hypersphere import HypersphereConfig

    d = HypersphereConfig()
    p = sub.add_parser(
        "hypersphere", help="hard vs soft constraints on 200 nearly equal hyperspheres",
        description="The synthetic experiment of Márquez-Neila, Salzmann and Fua (2017, §6.2): "
                    "Soft-SGD, Hard-SGD and the persistent-pool hard method on Eq. 16-17 with a "
                    "random subset of active constraints per iteration. Writes Fig. 3 and Fig. 4 "
                    "as PNG to --out (the default run: about 8 minutes on two CPU cores).")
    p.add_argument("--out", default="runs/hypersphere", help="folder for the figures "
                                                             "(default runs/hypersphere)")
    p.add_argument("--json", metavar="PATH", help="also write the numbers as JSON")
    p.add_argument("--dim", type=int, default=d.dim, help=f"dimension d (default {d.dim})")
    p.add_argument("--spheres", type=int, default=d.spheres, help=f"default {d.spheres}")
    p.add_argument("--active", type=int, default=d.active,
                   help=f"random active constraints per iteration (default {d.active})")
    p.add_argument("--iterations", type=int, default=d.iterations,
                   help=f"default {d.iterations}")
    p.add_argument("--lam", type=float, default=d.lam, help=f"soft λ (default {d.lam:g})")
    p.add_argument("--soft-lr", type=float, default=d.soft_lr,
                   help=f"Soft-SGD step size (default {d.soft_lr:g})")
    p.add_argument("--eta", type=float, default=d.eta, help=f"η of Eq. 5 (default {d.eta:g})")
    p.add_argument("--budget", type=int, default=d.budget,
                   help=f"most constraints in the persistent pool (default {d.budget})")
    p.add_argument("--total-variance", dest="per_coordinate", action="store_false",
                   help="give the centre's offset as a whole the variance 0.01 (default: each "
                        "coordinate, as the paper writes)")
    p.add_argument("--methods", default="soft-sgd,hard-sgd,hard-persistent",
                   help="comma-separated (default all three)")
    p.add_argument("--seed", type=int, default=d.seed, help=f"default {d.seed}")
    p.add_argument("--dtype", choices=("float32", "float64"), default=d.dtype,
                   help=f"default {d.dtype}")
    _add_no_progress(p)


def _add_helmholtz(sub: argparse._SubParsersAction) -> None:
    from ccnn.helmholtz import METHODS, HelmholtzConfig

    d = HelmholtzConfig()
    p = sub.add_parser(
        "helmholtz", help="sine waves under the Helmholtz PDE constraint (Jergensen)",
        description="The toy of Jergensen (2019): a network of (x, A, k, phi) fits "
                    "A sin(kx + phi) under u'' + k^2 u = 0. Trains unconstrained, soft, the "
                    "augmented Lagrangian, Tanabe's reduction and full versions and the "
                    "projection after each epoch (and, on request, the KKT hard step); writes "
                    "Figs. 10-14 analogues to --out. With --timing: seconds per iteration "
                    "against batch size, model size and constraints (Figs. 7-9).")
    p.add_argument("--out", default="runs/helmholtz",
                   help="folder for the figures (default runs/helmholtz)")
    p.add_argument("--json", metavar="PATH", help="also write the numbers as JSON")
    p.add_argument("--timing", action="store_true",
                   help="run the timing study instead of training")
    p.add_argument("--methods", default=",".join(d.methods),
                   help=f"comma-separated from {','.join(METHODS)} "
                        f"(default {','.join(d.methods)})")
    p.add_argument("--epochs", type=int, default=d.epochs, help=f"default {d.epochs}")
    p.add_argument("--batch-size", type=int, default=d.batch_size,
                   help=f"default {d.batch_size}")
    p.add_argument("--lr", type=float, default=d.lr, help=f"default {d.lr:g}")
    p.add_argument("--optimizer", choices=("adam", "sgd"), default=d.optimizer,
                   help=f"default {d.optimizer}")
    p.add_argument("--width", type=int, default=d.width, help=f"default {d.width}")
    p.add_argument("--depth", type=int, default=d.depth, help=f"default {d.depth}")
    p.add_argument("--waves-per-axis", type=int, default=d.waves_per_axis,
                   help=f"values of A, k and phi each (default {d.waves_per_axis})")
    p.add_argument("--points", type=int, default=d.points,
                   help=f"x values per wave (default {d.points})")
    p.add_argument("--coupling", choices=("batch", "sample"), default=d.coupling,
                   help=f"the full version's multiplier system (default {d.coupling})")
    p.add_argument("--solver", choices=("auto", "dense", "minres_qlp"), default=d.solver,
                   help=f"multiplier solver (default {d.solver})")
    p.add_argument("--lagrangian-rho", type=float, default=d.lagrangian_rho,
                   help="rho of the augmented Lagrangian and its dual step (default 2/batch, "
                        "whose augmented term is the soft penalty)")
    p.add_argument("--kkt-correction", type=float, default=d.kkt_correction,
                   help="share of the residual the KKT step removes per step "
                        f"(default {d.kkt_correction:g}: the paper's Eq. 5)")
    p.add_argument("--projection-max-steps", type=int, default=d.projection_max_steps,
                   help=f"cap per projection (default {d.projection_max_steps})")
    p.add_argument("--keep-data", default=",".join(d.keep_data),
                   help="data-keeping projection variants of the final model, comma-separated "
                        "from penalty,constraint; empty for none (default both)")
    p.add_argument("--seed", type=int, default=d.seed, help=f"default {d.seed}")
    p.add_argument("--dtype", choices=("float32", "float64"), default=d.dtype,
                   help=f"default {d.dtype}")
    p.add_argument("--timing-batch-sizes", default="10,30,100,200",
                   help="--timing: batch sizes of the sweep (default 10,30,100,200)")
    p.add_argument("--timing-widths", default="5,8,11,16,23",
                   help="--timing: widths of the model-size sweep (default 5,8,11,16,23)")
    p.add_argument("--timing-constraints", default="1,2,4,8",
                   help="--timing: constraint counts of the sweep (default 1,2,4,8)")
    p.add_argument("--timing-steps", type=int, default=20,
                   help="--timing: steps per measurement (default 20)")
    p.add_argument("--timing-repeats", type=int, default=7,
                   help="--timing: measurements per setting (default 7; twice that at "
                        "batch 100, width 11, 1 constraint)")
    _add_no_progress(p)


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``ccnn``; returns the exit status."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(stream=sys.stderr, level=logging.WARNING, format="%(message)s")
    logging.getLogger("ccnn").setLevel(logging.INFO)
    try:
        if args.command == "check":
            from ccnn.check import main_check

            return main_check(args)
        from ccnn import commands

        return getattr(commands, f"main_{args.command}")(args)
    except (ValueError, FileNotFoundError) as err:
        print(f"ccnn {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
