"""Benchmark of the P-step: ms per image of each method against one softmax pass.

Batch 64, 21 classes, 41×41 logits (CCNN's output at stride 8), three present foreground classes
per image, as in the solver issue.  Three kinds of logits from ``ccnn.reference.random_problem``:

* ``untrained``  — small smooth scores, no bias: Q is near uniform;
* ``network``    — smooth scores of scale 3, with per-image biases that make the network
                   under-predict some tagged classes and over-predict the background;
* ``confident``  — the same at scale 8: peaked Q, far from the constraints.

Each method runs at ``--tol`` (default 1e-6).  ``pgd`` is CCNN's projected gradient evaluating
the dual as CCNN's code does (a log-sum-exp at every pixel and step); ``pgd, CCNN stop`` is the
same with the original code's only stopping rule (step below 1e-8, no gradient tolerance);
``pgd, factored`` is CCNN's rule on the factored evaluation that ``newton`` uses, which separates
the gain of the method from the gain of the evaluation.  Timings
are medians of ``--repeats`` interleaved runs, so that all rows see the same machine load.
Prints a table and writes JSON.

    python scripts/bench_latent.py [--device cuda] [--json docs/bench_latent.json]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

from ccnn.io import write_json
from ccnn.latent import solve_latent
from ccnn.reference import random_problem, solve_latent_cvxpy

REGIMES = {
    "untrained": {"scale": 0.5, "fg_bias": (0.0, 0.0), "bg_bias": (0.0, 0.0)},
    "network": {"scale": 3.0},
    "confident": {"scale": 8.0},
}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_times(fns: dict[str, Callable[[], object]], repeats: int, device: torch.device
                 ) -> dict[str, float]:
    """Median wall time in seconds of each function, interleaving the runs."""
    for fn in fns.values():  # warm-up
        fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            sync(device)
            start = time.perf_counter()
            fn()
            sync(device)
            times[name].append(time.perf_counter() - start)
    return {k: statistics.median(v) for k, v in times.items()}


def bench_regime(name: str, args, device: torch.device) -> list[dict]:
    logits, _, bounds = random_problem(args.batch, args.classes, args.size, args.size,
                                       present=3, seed=args.seed, **REGIMES[name])
    logits = logits.to(device)
    bounds = [t.to(device) for t in bounds]
    runs = {
        "softmax": lambda: torch.softmax(logits, dim=1),
        "newton": lambda: solve_latent(logits, *bounds, method="newton", tol=args.tol),
        "pgd": lambda: solve_latent(logits, *bounds, method="pgd", tol=args.tol),
        "pgd, CCNN stop": lambda: solve_latent(logits, *bounds, method="pgd", tol=0.0),
        "pgd, factored": lambda: solve_latent(logits, *bounds, method="pgd", tol=args.tol,
                                              evaluation="factored"),
    }
    seconds = median_times(runs, args.repeats, device)
    results = {k: runs[k]() for k in runs if k != "softmax"}
    per_image = {k: 1e3 * v / args.batch for k, v in seconds.items()}
    rows = []
    for method, r in results.items():
        rows.append({
            "regime": name,
            "method": method,
            "ms_per_image": per_image[method],
            "softmax_ms_per_image": per_image["softmax"],
            "softmax_passes": per_image[method] / per_image["softmax"],
            "speedup_of_newton": per_image[method] / per_image["newton"],
            "iterations_mean": float(r.iterations.float().mean()),
            "iterations_max": int(r.iterations.max()),
            "converged": int(r.converged.sum()),
            "max_residual": float(r.residual.max()),
        })
    return rows


def bench_cvxpy(args) -> dict:
    logits, _, bounds = random_problem(1, 21, 11, 11, present=3, seed=args.seed,
                                       dtype=torch.float64)
    ref = solve_latent_cvxpy(logits[0].numpy(), bounds.lower[0].numpy(), bounds.upper[0].numpy(),
                             bounds.slack[0].numpy(), solver="SCS")
    start = time.perf_counter()
    solve_latent(logits, *bounds)
    ours = time.perf_counter() - start
    return {"size": "21 classes, 11x11", "scs_seconds": ref.seconds, "scs_status": ref.status,
            "newton_seconds": ours}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--classes", type=int, default=21)
    parser.add_argument("--size", type=int, default=41)
    parser.add_argument("--tol", type=float, default=1e-6)
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--regimes", default=",".join(REGIMES))
    parser.add_argument("--no-cvxpy", action="store_true", help="skip the CVXPY timing")
    parser.add_argument("--json", default="bench_latent.json", help="where to write the JSON")
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(args.seed)

    rows = []
    for name in args.regimes.split(","):
        rows.extend(bench_regime(name, args, device))
    header = (f"{'regime':<10} {'method':<15} {'ms/image':>9} {'softmax x':>9} "
              f"{'newton is':>9} {'iter mean':>9} {'iter max':>8} {'converged':>9} "
              f"{'max resid':>9}")
    print(f"P-step, batch {args.batch}, {args.classes} classes, {args.size}x{args.size}, "
          f"tol {args.tol:g}, {device}, {torch.get_num_threads()} threads")
    print(header)
    print("-" * len(header))
    for r in rows:
        print(f"{r['regime']:<10} {r['method']:<15} {r['ms_per_image']:>9.3f} "
              f"{r['softmax_passes']:>9.1f} {r['speedup_of_newton']:>8.1f}x "
              f"{r['iterations_mean']:>9.1f} {r['iterations_max']:>8d} "
              f"{r['converged']:>5d}/{args.batch} {r['max_residual']:>9.1e}")
    softmax = {r["regime"]: r["softmax_ms_per_image"] for r in rows}
    print("softmax pass, ms/image: " + ", ".join(f"{k} {v:.3f}" for k, v in softmax.items()))
    cvxpy = None if args.no_cvxpy else bench_cvxpy(args)
    if cvxpy:
        print(f"CVXPY/SCS, one image of {cvxpy['size']}: {cvxpy['scs_seconds']:.1f} s "
              f"({cvxpy['scs_status']}); newton on the same image: "
              f"{1e3 * cvxpy['newton_seconds']:.2f} ms")
    out = {
        "config": {k: getattr(args, k) for k in ("batch", "classes", "size", "tol", "repeats",
                                                  "seed", "device")},
        "machine": {"platform": platform.platform(), "threads": torch.get_num_threads(),
                    "torch": torch.__version__,
                    "device_name": (torch.cuda.get_device_name(device)
                                    if device.type == "cuda" else platform.processor())},
        "rows": rows,
        "cvxpy": cvxpy,
    }
    write_json(Path(args.json), out)
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
