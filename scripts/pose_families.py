"""Run the Tanabe and projection families of ``ccnn.pose.families`` on the pose problem.

Loads the data of ``--seed``, the unconstrained model from the ``--start`` cache (trained and
saved there when missing), runs the chosen families on ``--split`` and writes ``--json`` as
``{"methods": {name: record}, "split", "seed", "settings"}`` ("unconstrained" included)::

    python scripts/pose_families.py --seed 100 --split val --start runs/sel/start100.pt \
        --methods tanabe-reduction --set tanabe_lr=0.3 --json runs/fam/tr_0.3.json
"""

from __future__ import annotations

import argparse
import ast
import json
import logging
import time
from pathlib import Path

import torch

from ccnn.pose.experiment import PoseConfig, evaluate, load_data, unconstrained_model
from ccnn.pose.families import FAMILY_METHODS, FamilySettings, run_family

log = logging.getLogger("pose_families")


def _settings(pairs: list[str]) -> FamilySettings:
    """``FamilySettings`` from ``key=value`` strings (values as Python literals)."""
    changes = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise SystemExit(f"--set needs key=value, got {pair!r}")
        try:
            changes[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            changes[key] = value
    return FamilySettings(**changes)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--split", choices=("val", "test"), default="test")
    parser.add_argument("--start", type=Path, default=None,
                        help="state_dict cache of the unconstrained model")
    parser.add_argument("--methods", default=",".join(m for m in FAMILY_METHODS
                                                       if m != "tanabe-full"),
                        help=f"comma-separated, from {', '.join(FAMILY_METHODS)}")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="a FamilySettings field (repeatable)")
    parser.add_argument("--iterations", type=int, default=None,
                        help="Tanabe iterations (default: PoseConfig's)")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--progress", action="store_true")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    torch.set_num_threads(args.threads)
    methods = [m for m in args.methods.split(",") if m]
    unknown = [m for m in methods if m not in FAMILY_METHODS]
    if unknown:
        raise SystemExit(f"unknown methods {unknown}; choose from {', '.join(FAMILY_METHODS)}")
    settings = _settings(args.set)
    cfg = PoseConfig(seed=args.seed)
    if args.iterations is not None:
        cfg = PoseConfig(seed=args.seed, iterations=args.iterations)
    data = load_data(cfg)
    start, _ = unconstrained_model(cfg, data, progress=args.progress, cache=args.start)
    records = {"unconstrained": evaluate(start, data[f"{args.split}_x"],
                                         data[f"{args.split}_y"])}
    for name in methods:
        t0 = time.perf_counter()
        try:
            records[name] = run_family(name, start, data, cfg, progress=args.progress,
                                       split=args.split, settings=settings)
        except MemoryError as err:
            log.warning("%s skipped: %s", name, err)
            records[name] = {"skipped": str(err)}
            continue
        except RuntimeError as err:
            log.warning("%s diverged: %s", name, err)
            records[name] = {"skipped": f"diverged: {str(err)[:200]}"}
            continue
        log.info("%s took %.0f s", name, time.perf_counter() - t0)
    result = {"methods": records, "split": args.split, "seed": args.seed,
              "settings": settings.as_json(), "iterations": cfg.iterations}
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1))
    print(f"{'method':24s} {'error (mm)':>10s} {'median |C| (m²)':>16s} {'s/iter':>8s}")
    for name, r in records.items():
        if "skipped" in r:
            print(f"{name:24s} skipped ({r['skipped']})")
            continue
        print(f"{name:24s} {1000 * r['mean_joint_error']:10.1f} {r['median_violation']:16.3g} "
              f"{r.get('seconds_per_iter', float('nan')):8.3f}")


if __name__ == "__main__":
    main()
