"""The work behind ``ccnn train``, ``demo``, ``evaluate`` and ``predict``: arguments to calls."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ccnn.constraints import BOUND_CONSTANTS
from ccnn.presets import preset
from ccnn.progress import on_terminal
from ccnn.train import TrainConfig, train

__all__ = ["config_from_args", "main_demo", "main_evaluate", "main_hypersphere", "main_pose",
           "main_predict",
           "main_train"]

# options of ``ccnn train`` that are fields of TrainConfig, taken when given on the command line
_FIELDS = ("model", "backbone_weights", "epochs", "batch_size", "optimizer", "lr", "momentum",
           "weight_decay", "schedule", "crop", "scale", "flip", "p_method", "p_tol", "hardness",
           "seed", "device", "num_workers", "data_root", "train_size", "val_size", "test_size",
           "train_split", "val_split", "test_split", "crf", "refine_epochs", "refine_lr")


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """The preset's settings for the method, overridden by every option given."""
    settings = preset(args.preset, args.method)
    settings.update({k: getattr(args, k) for k in _FIELDS if getattr(args, k) is not None})
    settings["bounds"] = {**settings.get("bounds", {}), **_parse_bounds(args.bound)}
    return TrainConfig(method=args.method, **settings)


def _parse_bounds(items: list[str]) -> dict[str, float | str]:
    """``--bound NAME=VALUE`` options as a dict (names are checked by TrainConfig): numbers, or
    a word for ``small_rule``."""
    out: dict[str, float | str] = {}
    for item in items:
        name, _, value = item.partition("=")
        name = name.strip()
        if name == "small_rule":
            out[name] = value.strip()
            continue
        try:
            out[name] = float(value)
        except ValueError:
            raise ValueError(f"--bound {item!r}: expected NAME=VALUE with a number, "
                             f"e.g. --bound bg_upper=0.6 (names: {', '.join(BOUND_CONSTANTS)}; "
                             f"small_rule=absent or at-most)") from None
    return out


def _stderr(message: str) -> None:
    print(message, file=sys.stderr)


def main_train(args: argparse.Namespace) -> int:
    """``ccnn train``: one run; prints the final validation metrics and where the report is."""
    cfg = config_from_args(args)
    out = Path(args.out or f"runs/{args.preset}-{args.method}")
    summary = train(cfg, out, resume=args.resume, progress_bar=on_terminal(args.progress))
    crf = f" (with the dense CRF {summary['crf']['miou']:.4f})" if "crf" in summary else ""
    print(f"{cfg.method} on {summary['split']}: mIoU {summary['miou']:.4f}{crf}, pixel accuracy "
          f"{summary['pixel_accuracy']:.4f}, {summary['seconds']:.0f} s; report in "
          f"{out / 'report'}; on the test split: ccnn evaluate {out / 'checkpoint.pt'}")
    return 0


def main_demo(args: argparse.Namespace) -> int:
    """``ccnn demo``: the weak-label methods on the synthetic default, as a table (test split)."""
    from ccnn.demo import format_table, run_demo
    from ccnn.io import json_path, write_json

    out_json = json_path(args.json)  # checked before any training
    methods = tuple(m.strip() for m in args.methods.split(",") if m.strip())
    sizes = {k: getattr(args, k) for k in ("train_size", "val_size", "test_size")
             if getattr(args, k)}
    table = run_demo(args.out, seed=args.seed, methods=methods, epochs=args.epochs,
                     pretraining=args.pretrain, progress_bar=on_terminal(args.progress),
                     **sizes)
    print(format_table(table))
    print(f"reports in {Path(args.out)}/<method>/report")
    if out_json is not None:
        write_json(out_json, table)
    return 0


def main_pretrain(args: argparse.Namespace) -> int:
    """``ccnn pretrain``: the small network's backbone on the shape classification set."""
    from ccnn.pretrain import PretrainConfig, pretrain

    fields = ("images", "epochs", "lr", "batch_size", "seed")
    cfg = PretrainConfig(**{k: getattr(args, k) for k in fields if getattr(args, k) is not None})
    result = pretrain(cfg, args.out, progress_bar=on_terminal(args.progress))
    print(f"validation accuracy {result['accuracy']:.3f} after {result['seconds']:.1f} s; "
          f"weights in {result['path']} (ccnn train --backbone-weights {result['path']})")
    return 0


def main_evaluate(args: argparse.Namespace) -> int:
    """``ccnn evaluate``: metrics of a checkpoint, per class (by default on the test split)."""
    from ccnn.inference import evaluate_checkpoint
    from ccnn.io import json_path, write_json

    out_json = json_path(args.json)
    m = evaluate_checkpoint(args.checkpoint, split=args.split, data_root=args.data_root,
                            device=args.device, crf=args.crf)
    crf = ", dense CRF" if args.crf else ""
    print(f"{args.checkpoint} on {m['split']} ({m['images']} images{crf}): mIoU {m['miou']:.4f}, "
          f"pixel accuracy {m['pixel_accuracy']:.4f}, mean accuracy {m['mean_accuracy']:.4f}")
    for name, iou in zip(m["class_names"], m["iou"], strict=True):
        print(f"  {name:<16} {'-' if iou != iou else f'{iou:.4f}'}")
    if out_json is not None:
        write_json(out_json, m)
    return 0


def main_predict(args: argparse.Namespace) -> int:
    """``ccnn predict``: colour masks for a folder of images."""
    from ccnn.inference import predict_folder

    written = predict_folder(args.checkpoint, args.input, args.output, device=args.device,
                             crf=args.crf)
    print(f"wrote {len(written)} masks to {args.output}")
    return 0


def main_hypersphere(args: argparse.Namespace) -> int:
    """``ccnn hypersphere``: Eq. 16-17 with Soft-SGD, Hard-SGD and the persistent pool."""
    from ccnn.hypersphere import HypersphereConfig, run_hypersphere
    from ccnn.io import json_path, write_json

    out_json = json_path(args.json)
    fields = ("dim", "spheres", "active", "iterations", "lam", "soft_lr", "eta", "budget",
              "per_coordinate", "seed", "dtype")
    cfg = HypersphereConfig(**{k: getattr(args, k) for k in fields})
    methods = tuple(m.strip() for m in args.methods.split(",") if m.strip())
    result = run_hypersphere(cfg, Path(args.out), methods, progress=on_terminal(args.progress))
    print(f"{'method':<16} {'median |C|':>12} {'s/iter':>8}")
    for name, record in result["methods"].items():
        print(f"{name:<16} {record['median_violation']:>12.4g} {record['seconds_per_iter']:>8.3f}")
    print(f"figures in {args.out}")
    if out_json is not None:
        write_json(out_json, result)
    return 0


def main_helmholtz(args: argparse.Namespace) -> int:
    """``ccnn helmholtz``: the sine-wave toy under the Helmholtz constraint, or its timing."""
    from ccnn.helmholtz import HelmholtzConfig, run_helmholtz, run_timing
    from ccnn.io import json_path, write_json

    def _int_list(text: str, option: str) -> tuple[int, ...]:
        try:
            return tuple(int(v) for v in text.split(",") if v.strip())
        except ValueError:
            raise ValueError(f"{option} must be comma-separated integers, got {text!r}") from None

    out_json = json_path(args.json)
    if args.timing:
        result = run_timing(
            Path(args.out), batch_sizes=_int_list(args.timing_batch_sizes, "--timing-batch-sizes"),
            widths=_int_list(args.timing_widths, "--timing-widths"),
            constraints=_int_list(args.timing_constraints, "--timing-constraints"),
            batch_size=args.batch_size, width=args.width, steps=args.timing_steps,
            repeats=args.timing_repeats, seed=args.seed, dtype=args.dtype, solver=args.solver,
            progress=on_terminal(args.progress))
        setting = result["setting"]
        print(f"batch {setting['batch_size']}, {setting['parameters']} parameters, 1 constraint, "
              f"{setting['threads']} thread(s)")
        print(f"{'method':<14} {'ms/iter':>8} {'x unconstr.':>11} {'x bare':>7}")
        for name, rec in result["methods"].items():
            ratio = rec["ratio_to_unconstrained"]
            print(f"{name:<14} {1e3 * rec['seconds_per_iter']:>8.2f} "
                  f"{ratio if ratio is not None else float('nan'):>11.2f} "
                  f"{rec['ratio_to_bare']:>7.2f}")
    else:
        methods = tuple(m.strip() for m in args.methods.split(",") if m.strip())
        keep = tuple(k.strip() for k in args.keep_data.split(",") if k.strip())
        fields = ("epochs", "batch_size", "lr", "optimizer", "width", "depth", "waves_per_axis",
                  "points", "coupling", "solver", "projection_max_steps", "seed", "dtype")
        cfg = HelmholtzConfig(methods=methods, keep_data=keep,
                              **{k: getattr(args, k) for k in fields})
        result = run_helmholtz(cfg, Path(args.out), progress=on_terminal(args.progress))
        print(f"{'method':<14} {'data loss':>10} {'median |r|':>11} {'test MSE':>9} "
              f"{'ms/iter':>8}")
        for name, rec in result["methods"].items():
            if "data_loss" not in rec:
                continue
            print(f"{name:<14} {rec['data_loss'][-1]:>10.4g} "
                  f"{rec['residual_quantiles'][-1]['0.5']:>11.4g} {rec['test'][-1]['mse']:>9.4g} "
                  f"{1e3 * rec['seconds_per_iter_mean']:>8.2f}")
        for proj in result["methods"].get("projection", {}).get("projection", [])[-1:]:
            after = proj["after"]
            print(f"projection after epoch {proj['epoch']}: {after['steps']} steps, constraint "
                  f"error {after['constraint_before']:.4g} -> {after['constraint_after']:.4g}, "
                  f"test-wave MSE {proj['before']['projection_data']['mse']:.4g} -> "
                  f"{after['projection_data']['mse']:.4g}")
        print(f"figures in {args.out}; {result['seconds']:.0f} s")
    if out_json is not None:
        write_json(out_json, result)
    return 0


def main_pose(args: argparse.Namespace) -> int:
    """``ccnn pose``: every method on the pose-symmetry constraints; prints the table."""
    from ccnn.io import json_path, write_json
    from ccnn.pose.experiment import PoseConfig, run_pose

    out_json = json_path(args.json)
    fields = ("seed", "iterations", "pretrain_epochs", "n_train", "n_val", "n_test", "n_pool",
              "h36m", "h36m_units", "persistent_correction", "persistent_base",
              "adam_bias_correction")
    methods = tuple(m.strip() for m in args.methods.split(",") if m.strip())
    cfg = PoseConfig(methods=methods, **{k: getattr(args, k) for k in fields})
    result = run_pose(cfg, Path(args.out), progress=on_terminal(args.progress))
    print(f"test split, seed {cfg.seed}")
    print(f"{'method':<16} {'error (mm)':>10} {'median |C|':>11} {'s/iter':>7}")
    for name, record in result["methods"].items():
        seconds = f"{record['seconds_per_iter']:>7.2f}" if "seconds_per_iter" in record else ""
        print(f"{name:<16} {1000 * record['mean_joint_error']:>10.1f} "
              f"{record['median_violation']:>11.3g} {seconds}")
    print(f"Fig. 2 in {args.out}; {result['seconds']:.0f} s")
    if out_json is not None:
        write_json(out_json, result)
    return 0
