"""Choose the constants of ``ccnn pose`` on the validation split of a seed kept for tuning.

One unconstrained model is trained on the tuning seed (default 100, never used to report), then
each method is fine-tuned from it with every candidate setting below and scored on the
*validation* split. The rule: each method takes the setting with the lowest validation mean
joint error; the persistent pool (whose purpose is meeting the constraints) takes Hard-SGD's
chosen learning rate and, among its budgets within 2% of its best validation error, the one with
the lowest validation median |C|; soft-sgd takes soft-adam's λ. Hard-Gauss-Newton keeps its
default damping (not tuned: each of its runs costs several minutes). Prints a table and writes
every row as JSON.

    python scripts/select_pose.py --start runs/start100.pt --json docs/select_pose.json
"""

from __future__ import annotations

import argparse
import copy
import logging
import time
from pathlib import Path

from ccnn.io import json_path, write_json
from ccnn.pose.experiment import (
    PoseConfig,
    load_data,
    run_method,
    unconstrained_model,
    with_overrides,
)

#: (method, changes to the config) for every candidate
CANDIDATES: list[tuple[str, dict]] = [
    *[("soft-adam", {"soft_lambda": lam}) for lam in (0.1, 1.0, 10.0)],
    *[("soft-sgd", {"lr": {"soft-sgd": lr}}) for lr in (1e-5, 1e-4)],
    *[("lagrangian", {"dual_rho": rho}) for rho in (1.0, 10.0)],
    *[("hard-sgd", {"lr": {"hard-sgd": lr}}) for lr in (1e-4, 1e-3, 1e-2)],
    *[("hard-adam", {"lr": {"hard-adam": lr}}) for lr in (1e-5, 1e-4, 1e-3)],
    *[("hard-persistent", {"budget": b}) for b in (32, 64)],
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seed", type=int, default=100, help="tuning seed (default 100)")
    parser.add_argument("--json", help="write every row here")
    parser.add_argument("--methods", help="comma-separated subset of methods")
    parser.add_argument("--start", help="the unconstrained model's state_dict: loaded when the "
                                        "file exists, else trained and saved there")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    out = json_path(args.json)
    base = PoseConfig(seed=args.seed)
    data = load_data(base)
    start, _ = unconstrained_model(base, data, cache=Path(args.start) if args.start else None)
    wanted = set(args.methods.split(",")) if args.methods else None
    rows = []
    # soft-sgd shares soft-adam's λ: choose that first
    for method, changes in CANDIDATES:
        if wanted is not None and method not in wanted:
            continue
        if method == "soft-sgd":
            changes = {**changes, "soft_lambda": _chosen(rows, "soft-adam")["soft_lambda"]}
        if method == "hard-persistent":
            chosen = _chosen(rows, "hard-sgd")["changes"]["lr"]["hard-sgd"]
            changes = {**changes, "lr": {"hard-persistent": chosen}}
        cfg = with_overrides(base, methods=(method,), **copy.deepcopy(changes))
        t0 = time.perf_counter()
        try:
            record = run_method(method, start, data, cfg, split="val")
            error, violation = record["mean_joint_error"], record["median_violation"]
        except RuntimeError as err:  # diverged
            logging.warning("%s %s: %s", method, changes, err)
            error = violation = float("inf")
        rows.append({"method": method, "changes": changes,
                     "soft_lambda": cfg.soft_lambda, "val_mean_joint_error": error,
                     "val_median_violation": violation, "seconds": time.perf_counter() - t0})
        print(f"{method:<16} {changes!s:<52} error {error:.4f}  |C| {violation:.3g}",
              flush=True)
        if out is not None:
            write_json(out, {"seed": args.seed, "split": "val", "rows": rows})
    print("\nchosen:")
    for method in dict.fromkeys(r["method"] for r in rows):
        print(f"  {method:<16} {_chosen(rows, method)['changes']}")


def _chosen(rows: list[dict], method: str) -> dict:
    """The selection rule of the module docstring."""
    mine = [r for r in rows if r["method"] == method]
    best = min(r["val_mean_joint_error"] for r in mine)
    if method != "hard-persistent":
        return min(mine, key=lambda r: r["val_mean_joint_error"])
    close = [r for r in mine if r["val_mean_joint_error"] <= 1.02 * best]
    return min(close, key=lambda r: r["val_median_violation"])


if __name__ == "__main__":
    main()
