"""Probe one method of ``ccnn pose`` on the validation split of the tuning seed (100).

Prints the validation error and median |C| (Eq. 15) along the run, the loss and the solver's
iterations and flags. The unconstrained model of the seed is trained once and cached.

    python scripts/pose_probe.py hard-sgd 30 "{'lr': {'hard-sgd': 1e-3}}"
"""

from __future__ import annotations

import argparse
import ast
import time
from pathlib import Path

import torch

from ccnn.pose.experiment import (
    PoseConfig,
    evaluate,
    load_data,
    run_method,
    unconstrained_model,
    with_overrides,
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("method")
    parser.add_argument("iterations", type=int)
    parser.add_argument("changes", nargs="?", default="{}",
                        help="a Python dict of PoseConfig fields, e.g. \"{'soft_lambda': 1.0}\"")
    parser.add_argument("--seed", type=int, default=100)
    parser.add_argument("--start", default="runs/sel/start100.pt",
                        help="cache of the unconstrained model")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    base = PoseConfig(seed=args.seed)
    data = load_data(base)
    start, _ = unconstrained_model(base, data, cache=Path(args.start))
    print("start", evaluate(start, data["val_x"], data["val_y"])["mean_joint_error"], flush=True)
    changes = ast.literal_eval(args.changes)
    cfg = with_overrides(base, methods=(args.method,), iterations=args.iterations,
                         eval_every=max(1, args.iterations // 6), **changes)
    t0 = time.perf_counter()
    r = run_method(args.method, start, data, cfg, split="val")
    print(f"{args.method} {changes} err {r['mean_joint_error']:.4f} "
          f"|C| {r['median_violation']:.3g}  {time.perf_counter() - t0:.1f}s")
    print([(c["iteration"], round(c["mean_joint_error"], 4), f"{c['median_violation']:.2g}")
           for c in r["curve"]])
    every = max(1, args.iterations // 10)
    print([round(h["loss"], 4) for h in r["history"]][::every])
    print([h.get("solver_iterations") for h in r["history"]][::every],
          [h.get("solver_flag") for h in r["history"]][::every])


if __name__ == "__main__":
    main()
