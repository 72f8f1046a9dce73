"""``ccnn check``: the P-step solvers against the CVXPY oracle on random small problems.

Every method of :func:`ccnn.latent.solve_latent` solves one batch of random problems (several
tag sets, feasible and infeasible bounds, hard and soft); CVXPY solves each image alone.  The
table reports, per image and method, the largest differences in P and in the class fractions,
the relative difference of the objectives (Eq. 4), and the solver's own duality gap.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch

from ccnn.io import json_path, write_json
from ccnn.latent import METHODS, latent_objective, solve_latent
from ccnn.reference import random_problem, solve_latent_cvxpy

__all__ = ["CheckRow", "run_check"]

OBJECTIVE_FLOOR = 1e-3  # objectives are compared relative to max(|objective|, this)


@dataclass
class CheckRow:
    """One image solved by one method, compared with the oracle."""

    instance: int
    method: str
    tags: list[int]
    iterations: int
    converged: bool
    max_dp: float
    max_dfraction: float
    rel_dobjective: float
    duality_gap: float
    oracle_status: str
    ok: bool


def run_check(
    instances: int = 20,
    *,
    seed: int = 0,
    num_classes: int = 5,
    size: int = 6,
    solver: str = "SCS",
    methods: tuple[str, ...] = METHODS,
    tol: float = 1e-6,
    fraction_tol: float = 1e-4,
    objective_tol: float = 1e-5,
    printer=print,
) -> list[CheckRow]:
    """Solve ``instances`` random images with each method and with CVXPY; return the rows.

    A row is ``ok`` when the class fractions agree to ``fraction_tol``, the objectives to
    ``objective_tol`` relative, and the solver reports convergence.
    """
    if instances < 1:
        raise ValueError(f"--instances must be at least 1, got {instances}")
    logits, tags, bounds = random_problem(instances, num_classes, size, size, present=(0, 3),
                                          scale=(1.0, 6.0), varied=True, seed=seed,
                                          dtype=torch.float64)
    results = {m: solve_latent(logits, *bounds, method=m, tol=tol) for m in methods}
    objectives = {m: latent_objective(logits, r.P, *bounds) for m, r in results.items()}
    header = (f"{'#':>3} {'tags':<10} {'method':<7} {'iter':>5} {'max|dP|':>9} {'max|dfrac|':>10} "
              f"{'rel dobj':>9} {'gap':>9} {'oracle':<18} ok")
    printer(header)
    printer("-" * len(header))
    rows = []
    for b in range(instances):
        ref = solve_latent_cvxpy(logits[b].numpy(), bounds.lower[b].numpy(),
                                 bounds.upper[b].numpy(), bounds.slack[b].numpy(),
                                 solver=solver)
        present = tags[b].nonzero().flatten().tolist()
        for method, r in results.items():
            P = r.P[b].numpy()
            d_frac = float(np.abs(P.reshape(P.shape[0], -1).mean(1) - ref.fractions).max())
            d_obj = abs(float(objectives[method][b]) - ref.objective) / max(
                abs(ref.objective), OBJECTIVE_FLOOR)
            ok = bool(r.converged[b]) and d_frac <= fraction_tol and d_obj <= objective_tol
            row = CheckRow(b, method, present, int(r.iterations[b]), bool(r.converged[b]),
                           float(np.abs(P - ref.P).max()), d_frac, d_obj,
                           float(r.duality_gap[b]), ref.status, ok)
            rows.append(row)
            printer(f"{b:>3} {','.join(map(str, present)) or '-':<10} {method:<7} "
                    f"{row.iterations:>5} {row.max_dp:>9.1e} {d_frac:>10.1e} {d_obj:>9.1e} "
                    f"{row.duality_gap:>9.1e} {ref.status:<18} {'yes' if ok else 'NO'}")
    return rows


def main_check(args) -> int:
    """Entry point of ``ccnn check``; returns the exit status (1 when any row disagrees)."""
    torch.manual_seed(args.seed)
    methods = tuple(m.strip() for m in args.methods.split(",") if m.strip())
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ValueError(f"--methods: unknown method(s) {unknown}; choose from {METHODS}")
    out_json = json_path(args.json)
    rows = run_check(args.instances, seed=args.seed, num_classes=args.classes, size=args.size,
                     solver=args.solver, methods=methods, fraction_tol=args.fraction_tol,
                     objective_tol=args.objective_tol)
    bad = [r for r in rows if not r.ok]
    worst = {k: max(getattr(r, k) for r in rows)
             for k in ("max_dp", "max_dfraction", "rel_dobjective", "duality_gap")}
    print(f"\nlargest differences: P {worst['max_dp']:.1e}, fractions "
          f"{worst['max_dfraction']:.1e}, objective {worst['rel_dobjective']:.1e} (relative); "
          f"largest duality gap {worst['duality_gap']:.1e}")
    print(f"tolerances: fractions {args.fraction_tol:g}, objective {args.objective_tol:g}")
    if out_json is not None:
        write_json(out_json, {"rows": [asdict(r) for r in rows], "worst": worst})
    if bad:
        print(f"DISAGREEMENT in {len(bad)} of {len(rows)} solves")
        return 1
    print(f"all {len(rows)} solves agree with CVXPY/{args.solver}")
    return 0
