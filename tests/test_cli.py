"""The ``ccnn`` command line: ``ccnn check`` against CVXPY."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

import ccnn
from ccnn.cli import main
from ccnn.io import write_json


def test_check_passes_and_prints_the_table(capsys):
    assert main(["check", "--instances", "3", "--seed", "1"]) == 0
    out = capsys.readouterr().out
    assert "max|dfrac|" in out and "all 6 solves agree with CVXPY/SCS" in out
    assert out.count(" newton ") == 3 and out.count(" pgd ") == 3


def test_check_fails_when_the_tolerance_cannot_be_met(capsys):
    # No two solvers agree to 1e-15 in the class fractions: every row must be flagged.
    assert main(["check", "--instances", "2", "--fraction-tol", "1e-15"]) == 1
    assert "DISAGREEMENT in 4 of 4 solves" in capsys.readouterr().out


def test_check_writes_json(tmp_path):
    path = tmp_path / "sub" / "check.json"
    assert main(["check", "--instances", "2", "--methods", "newton", "--solver", "CLARABEL",
                 "--json", str(path)]) == 0
    data = json.loads(path.read_text())
    assert [r["method"] for r in data["rows"]] == ["newton", "newton"]
    assert data["worst"]["max_dfraction"] <= 1e-4


def test_write_json_replaces_whole_files_only(tmp_path):
    path = tmp_path / "out" / "table.json"
    write_json(path, {"miou": float("nan"), "rows": [1.5]})
    assert json.loads(path.read_text()) == {"miou": None, "rows": [1.5]}  # NaN is not JSON
    with pytest.raises(TypeError):
        write_json(path, {"bad": object()})
    assert json.loads(path.read_text()) == {"miou": None, "rows": [1.5]}  # the old file stays
    assert [p.name for p in path.parent.iterdir()] == ["table.json"]


def test_check_rejects_unknown_method(capsys):
    assert main(["check", "--methods", "newton,sgd"]) == 2
    assert "unknown method(s) ['sgd']" in capsys.readouterr().err


def test_the_installed_console_script_runs():
    """The ``ccnn`` entry point that ``pip install`` wrote beside this interpreter."""
    script = Path(sys.executable).parent / "ccnn"
    if not script.is_file():
        pytest.skip(f"no installed ccnn console script beside {sys.executable} (install the "
                    f"package, e.g. make test, to test the entry point)")
    out = subprocess.run([str(script), "--version"], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == f"ccnn {ccnn.__version__}"


def test_command_is_required():
    with pytest.raises(SystemExit):
        main([])
