"""Benchmark of ccnn.hard.minres_qlp against SciPy's minres on the same problems (CPU).

* ``dense``    — random symmetric indefinite, well conditioned (eigenvalues ±[1, 10]);
* ``laplace``  — matrix-free 1-D Laplacian plus shift (tridiag(−1, 2+σ, −1)), applied by
                 torch ops for ours and by the same numpy ops in a LinearOperator for SciPy;
* ``sing-diag`` — singular, inconsistent, well separated: A = diag(d), d uniform in ±[0.1, 10]
                 with 5 exact zeros, n = 2000, random b; pinv(A)·b = b/d on the nonzeros;
* ``sing-neu1d`` — the hard case: singular, inconsistent 1-D Neumann Laplacian (null space =
                 constants, cond ≈ 1.6e6): a long Lanczos run that loses orthogonality.
For both: distance of each answer to the pseudoinverse solution and the direct relAres.

Timings are medians of --repeats interleaved runs. torch uses one thread, like numpy's
element-wise ops. With ``--device cuda`` ours runs on the GPU (timed with a synchronisation;
SciPy stays on the CPU). Prints a table and writes JSON.

    python scripts/bench_minres.py [--n-free 1000000] [--repeats 5] [--device cpu|cuda]
        [--json docs/bench_minres.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

# one BLAS thread, like torch.set_num_threads(1) below: on a small shared machine multithreaded
# BLAS dot products of SciPy's minres otherwise thrash (measured 2 ms per dot at n = 20 000)
for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import numpy as np  # noqa: E402
import scipy  # noqa: E402
import scipy.sparse.linalg as spla  # noqa: E402
import torch  # noqa: E402

from ccnn.hard import minres_qlp  # noqa: E402


def laplace_torch(sigma: float):
    def apply(v: torch.Tensor) -> torch.Tensor:
        y = v * (2.0 + sigma)
        y[1:] -= v[:-1]
        y[:-1] -= v[1:]
        return y

    return apply


def laplace_numpy(sigma: float):
    def apply(v: np.ndarray) -> np.ndarray:
        v = v.ravel()
        y = v * (2.0 + sigma)
        y[1:] -= v[:-1]
        y[:-1] -= v[1:]
        return y

    return apply


def run_pair(name, torch_op, np_op, n, b, rtol, maxit, repeats, device):
    rows = {}
    bt = torch.from_numpy(b).to(device)
    op = torch_op if callable(torch_op) else torch_op.to(device)

    def ours():
        x, info = minres_qlp(op, bt, rtol=rtol, maxit=maxit)
        if bt.is_cuda:
            torch.cuda.synchronize()
        return x.cpu(), info

    def theirs():
        its = [0]

        def cb(_):
            its[0] += 1

        x, _istop = spla.minres(np_op, b, rtol=rtol, maxiter=maxit, callback=cb)
        return x, its[0]

    ours()  # warm-up
    theirs()
    t_ours, t_scipy = [], []
    for _ in range(repeats):
        s = time.perf_counter()
        x, info = ours()
        t_ours.append(time.perf_counter() - s)
        s = time.perf_counter()
        xs, its = theirs()
        t_scipy.append(time.perf_counter() - s)
    matvec = (lambda v: torch_op(torch.from_numpy(v)).numpy()) if callable(torch_op) else None
    if matvec is None:
        mat = torch_op.numpy()
        matvec = mat.__matmul__
    for label, xx, it, ts in (("minres_qlp", x.numpy(), info.iterations, t_ours),
                              ("scipy", xs, its, t_scipy)):
        res = float(np.linalg.norm(b - matvec(xx)) / np.linalg.norm(b))
        med = statistics.median(ts)
        rows[label] = {"iterations": it, "time_s": med, "ms_per_it": 1e3 * med / max(it, 1),
                       "relres": res}
    return {"problem": name, "n": n, **rows}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n-dense", type=int, default=2000)
    p.add_argument("--n-free", type=int, default=1_000_000)
    p.add_argument("--n-sing", type=int, default=2000)
    p.add_argument("--sigma", type=float, default=0.05, help="shift of the matrix-free Laplacian")
    p.add_argument("--rtol", type=float, default=1e-8)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch threads")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"), help="ours (default cpu)")
    p.add_argument("--json", type=Path, default=Path("docs/bench_minres.json"))
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    rng = np.random.default_rng(args.seed)
    results = []

    # dense, random symmetric indefinite, well conditioned
    n = args.n_dense
    q, _ = np.linalg.qr(rng.standard_normal((n, n)))
    ev = rng.uniform(1.0, 10.0, n) * rng.choice([-1.0, 1.0], n)
    A = (q * ev) @ q.T
    A = (A + A.T) / 2
    b = rng.standard_normal(n)
    results.append(run_pair("dense", torch.from_numpy(A), A, n, b, args.rtol, 10 * n,
                            args.repeats, args.device))

    # matrix-free 1-D Laplacian + shift
    n = args.n_free
    b = rng.standard_normal(n)
    lin = spla.LinearOperator((n, n), matvec=laplace_numpy(args.sigma), dtype=np.float64)
    results.append(run_pair("laplace", laplace_torch(args.sigma), lin, n, b, args.rtol, 10 * n,
                            args.repeats, args.device))

    def singular_case(name, L, b, x_pinv):
        n = len(b)
        x, info = minres_qlp(torch.from_numpy(L).to(args.device),
                             torch.from_numpy(b).to(args.device), rtol=args.rtol, maxit=20 * n)
        x = x.cpu()
        its = [0]
        xs, _ = spla.minres(L, b, rtol=args.rtol, maxiter=20 * n,
                            callback=lambda _: its.__setitem__(0, its[0] + 1))
        lnorm = float(np.linalg.norm(L, 2))
        row = {"problem": name, "n": n}
        for label, xx, it in (("minres_qlp", x.numpy(), info.iterations), ("scipy", xs, its[0])):
            r = b - L @ xx
            row[label] = {"iterations": it,
                          "dist_to_pinv": float(np.linalg.norm(xx - x_pinv)
                                                / np.linalg.norm(x_pinv)),
                          "relAres": float(np.linalg.norm(L @ r) / (lnorm * np.linalg.norm(r)))}
        row["minres_qlp"]["flag"] = info.flag.name
        return row

    # singular inconsistent, well separated spectrum: diag with 5 exact zeros
    n = args.n_sing
    d = rng.uniform(0.1, 10.0, n) * rng.choice([-1.0, 1.0], n)
    d[rng.choice(n, 5, replace=False)] = 0.0
    b = rng.standard_normal(n)
    x_pinv = np.divide(b, d, out=np.zeros(n), where=d != 0)
    sing = [singular_case("sing-diag", np.diag(d), b, x_pinv)]

    # singular inconsistent, hard: 1-D Neumann Laplacian, b with a constant component
    L = 2.0 * np.eye(n) - np.eye(n, k=1) - np.eye(n, k=-1)
    L[0, 0] = L[-1, -1] = 1.0
    b = rng.standard_normal(n)
    x_pinv = np.linalg.lstsq(L, b - b.mean(), rcond=None)[0]
    x_pinv -= x_pinv.mean()  # the min-length solution is orthogonal to the constants
    sing.append(singular_case("sing-neu1d", L, b, x_pinv))
    results += sing

    print(f"{'problem':10} {'n':>8} {'solver':11} {'its':>6} {'time s':>8} {'ms/it':>8} "
          f"{'relres':>9}")
    for r in results[:2]:
        for label in ("minres_qlp", "scipy"):
            row = r[label]
            print(f"{r['problem']:10} {r['n']:8d} {label:11} {row['iterations']:6d} "
                  f"{row['time_s']:8.3f} {row['ms_per_it']:8.3f} {row['relres']:9.2e}")
        print(f"{'':10} {'':8} ratio ms/it (ours/scipy) = "
              f"{r['minres_qlp']['ms_per_it'] / r['scipy']['ms_per_it']:.2f}")
    for r in sing:
        for label in ("minres_qlp", "scipy"):
            row = r[label]
            print(f"{r['problem']:10} {r['n']:8d} {label:11} {row['iterations']:6d}  dist to pinv "
                  f"{row['dist_to_pinv']:.2e}  relAres {row['relAres']:.1e}")
    meta = {"torch": torch.__version__, "scipy": scipy.__version__, "numpy": np.__version__,
            "threads": args.threads, "device": args.device, "platform": platform.platform(),
            "args": {k: str(v) for k, v in vars(args).items()}}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"meta": meta, "results": results}, indent=2))
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
