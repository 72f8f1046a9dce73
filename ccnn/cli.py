"""The ``ccnn`` command line.

Subcommands:
    check   the P-step solvers against the CVXPY oracle on random small problems.
"""

from __future__ import annotations

import argparse
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
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``ccnn``; returns the exit status."""
    args = build_parser().parse_args(argv)
    try:
        if args.command == "check":
            from ccnn.check import main_check

            return main_check(args)
    except ValueError as err:
        print(f"ccnn {args.command}: error: {err}", file=sys.stderr)
        return 2
    raise AssertionError(f"unhandled command {args.command}")


if __name__ == "__main__":
    sys.exit(main())
