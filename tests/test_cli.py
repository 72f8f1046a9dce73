"""The ``ccnn`` command line: ``ccnn check`` against CVXPY; bad input to ``ccnn train``,
``evaluate`` and ``predict``: non-finite and out-of-range options, crossed or unknown constraint
settings, unreadable and incompatible checkpoints."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

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


# -- bad input to ccnn train, evaluate and predict ------------------------------------------------
# (already elsewhere: a missing checkpoint, unknown or out-of-range --bound constants and a
# malformed --bound in tests/test_train.py; a missing dataset folder, bad masks and tags in
# tests/test_bad_input.py; unreadable images with --skip-bad in tests/test_faults.py)

TRAIN = ["train", "--method", "ccnn", "--train-size", "4", "--val-size", "2", "--test-size", "2",
         "--batch-size", "4", "--epochs", "1", "--refine-epochs", "0", "--no-crf",
         "--no-progress"]


@pytest.mark.parametrize(("option", "message"), [
    (["--lr", "nan"], "lr must be positive and finite, got nan"),
    (["--lr", "inf"], "lr must be positive and finite, got inf"),
    (["--lr", "-0.1"], "lr must be positive and finite, got -0.1"),
    (["--refine-lr", "inf"], "refine_lr must be positive and finite, got inf"),
    (["--p-tol", "nan"], "p_tol must be positive and finite, got nan"),
    (["--p-tol", "0"], "p_tol must be positive and finite, got 0.0"),
    (["--hardness", "inf"], "hardness must be positive and finite, got inf"),
    (["--momentum", "1.5"], "momentum must lie in [0, 1], got 1.5"),
    (["--weight-decay", "nan"], "weight_decay must be finite and >= 0, got nan"),
    (["--scale", "1", "inf"], "scale must be finite, got (1.0, inf)"),
    (["--scale", "0", "1"], "scale must be an interval 0 < low <= high, got (0.0, 1.0)"),
    (["--crop", "0"], "crop must be at least 1 pixel, got 0"),
    (["--epochs", "0"], "epochs must be at least 1, got 0"),
    (["--batch-size", "0"], "batch_size must be at least 1, got 0"),
    (["--refine-epochs", "-1"], "refine_epochs must be >= 0, got -1"),
    (["--workers", "-1"], "num_workers must be >= 0, got -1"),
    (["--train-size", "0"], "train_size, val_size and test_size must be at least 1, got 0"),
    (["--seed", "-1"], "seed must be an integer >= 0, got -1"),
    (["--device", "tpu"], "device must be cpu, cuda or cuda:N (or another torch device), got "
                          "'tpu'"),
    (["--bound", "fg_lower=nan"], "bounds: fg_lower=nan must lie in [0, 1]"),
    (["--bound", "bg_upper=inf"], "bounds: bg_upper=inf must lie in [0, 1]"),
    (["--bound", "fg_slack=-1"], "bounds: fg_slack=-1.0 must be >= 0"),
    (["--bound", "bg_lower=0.8", "--bound", "bg_upper=0.6"],
     "bounds: background bounds are crossed: bg_lower=0.8 > bg_upper=0.6"),
    (["--bound", "bg_lower"], "--bound 'bg_lower': expected NAME=VALUE with a number"),
    (["--bound", "bg_lowr=0.2"], "unknown constraint constant(s) ['bg_lowr']"),
    (["--resume", "--overwrite"], "--resume continues the run in the folder, --overwrite "
                                  "replaces it: give one of them"),
])
def test_train_refuses_bad_options_before_touching_anything(tmp_path, capsys, option, message):
    out = tmp_path / "run"
    assert main([*TRAIN, *option, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("ccnn train: error: ") and message in err
    assert not out.exists()


def test_train_on_a_gpu_this_machine_lacks(tmp_path, capsys):
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    out = tmp_path / "run"
    assert main([*TRAIN, "--device", f"cuda:{count}", "--out", str(out)]) == 2
    assert f"device 'cuda:{count}'" in capsys.readouterr().err
    assert not out.exists()


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A one-epoch run of :data:`TRAIN` (6 classes)."""
    out = tmp_path_factory.mktemp("cli") / "run"
    assert main([*TRAIN, "--out", str(out)]) == 0
    return out


def _other_classes(state: dict, classes: int, *, fit: bool) -> dict:
    """``state`` claiming ``classes`` classes; ``fit``: its classifier cut to them as well."""
    state = {**state, "num_classes": classes, "model": dict(state["model"])}
    if fit:
        for key in ("classifier.weight", "classifier.bias"):
            state["model"][key] = state["model"][key][:classes].clone()
        state["palette"] = state["palette"][:classes]
        state["class_names"] = state["class_names"][:classes]
    return state


def test_unreadable_and_incompatible_checkpoints(trained, tmp_path, capsys):
    images = tmp_path / "images"
    images.mkdir()
    Image.fromarray(np.zeros((8, 8, 3), dtype=np.uint8)).save(images / "a.png")
    state = torch.load(trained / "checkpoint.pt", weights_only=True)
    garbage, foreign = tmp_path / "garbage.pt", tmp_path / "foreign.pt"
    garbage.write_bytes(b"\x80\x02 this is not a checkpoint")
    torch.save({"weights": torch.zeros(3)}, foreign)
    unfit, four = tmp_path / "unfit.pt", tmp_path / "four.pt"
    torch.save(_other_classes(state, 4, fit=False), unfit)  # says 4, holds 6
    torch.save(_other_classes(state, 4, fit=True), four)  # a 4-class network
    cases = [(garbage, "is not a readable ccnn checkpoint"),
             (foreign, "is not a ccnn training checkpoint (no config/model/num_classes"),
             (unfit, "its weights do not fit the 'small' network with 4 classes")]
    for path, message in cases:
        for command in (["evaluate", str(path)],
                        ["predict", str(path), str(images), str(tmp_path / "masks")]):
            assert main(command) == 2, command
            err = capsys.readouterr().err
            assert str(path) in err and message in err, (command, err)
    assert not (tmp_path / "masks").exists()
    # a network of 4 classes on the synthetic data's 6
    assert main(["evaluate", str(four)]) == 2
    assert f"checkpoint {four} has 4 classes, the synthetic test split 6" in \
        capsys.readouterr().err
    assert main(["predict", str(four), str(images), str(tmp_path / "masks")]) == 0
    capsys.readouterr()


def test_resume_from_an_unreadable_or_incompatible_checkpoint(trained, tmp_path, capsys):
    state = torch.load(trained / "checkpoint.pt", weights_only=True)
    run = tmp_path / "run"
    run.mkdir()
    resume = [*TRAIN, "--epochs", "2", "--out", str(run), "--resume"]
    cases = [(b"garbage", "--resume: " + str(run / "checkpoint.pt") +
              " is not a readable ccnn checkpoint"),
             (_other_classes(state, 4, fit=True), "has 4 classes, the dataset 6"),
             (_other_classes(state, 6, fit=False) | {"model": {}},
              "does not fit the small network with 6 classes"),
             ({**state, "config": {**state["config"], "lr": 0.5}},
              "was written with other settings: lr=0.5")]
    for content, message in cases:
        if isinstance(content, bytes):
            (run / "checkpoint.pt").write_bytes(content)
        else:
            torch.save(content, run / "checkpoint.pt")
        before = (run / "checkpoint.pt").read_bytes()
        assert main(resume) == 2
        assert message in capsys.readouterr().err
        assert (run / "checkpoint.pt").read_bytes() == before
        assert sorted(p.name for p in run.iterdir()) == ["checkpoint.pt"]
    assert main([*TRAIN, "--out", str(tmp_path / "none"), "--resume"]) == 2
    assert "--resume: no checkpoint at" in capsys.readouterr().err
    assert not (tmp_path / "none").exists()


def test_evaluate_and_predict_on_a_device_this_machine_lacks(trained, tmp_path, capsys):
    for device in ("tpu", "cuda:99"):
        assert main(["evaluate", str(trained / "checkpoint.pt"), "--device", device]) == 2
        assert f"--device {device!r}" in capsys.readouterr().err
