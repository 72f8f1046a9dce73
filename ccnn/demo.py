"""``ccnn demo``: the main job — the weak-label methods side by side on the synthetic default.

Every method trains the same network from the same seed on the same images with the preset
``synthetic``; ``full`` sees the masks, the others only the tags (and ``ccnn-size`` one bit of
size per tagged class).  All start from one backbone, pretrained first on a separate image-level
classification set (:mod:`ccnn.pretrain`, the stand-in for CCNN's ImageNet-trained VGG16); its
time counts in the demo's.  Each method trains on ``train`` and is validated on ``val`` after
every epoch; the table reports on ``test``, which no setting was chosen on.
"""

from __future__ import annotations

import dataclasses
import logging
import multiprocessing
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from pathlib import Path

import torch
from torch.utils.data import Dataset

from ccnn import __version__
from ccnn.crf import CRFParams
from ccnn.engine import eval_loader, evaluate
from ccnn.inference import load_checkpoint
from ccnn.io import write_json
from ccnn.presets import preset
from ccnn.pretrain import PretrainConfig, pretrain
from ccnn.report import plot_comparison
from ccnn.train import (
    BEFORE_REFINE,
    CHECKPOINT,
    METHODS,
    TrainConfig,
    load_datasets,
    load_test_set,
    train,
)

__all__ = ["DEMO_METHODS", "PRESET", "format_table", "run_demo"]

logger = logging.getLogger(__name__)

DEMO_METHODS: tuple[str, ...] = ("full", "mil", "ccnn", "ccnn-size")
PRESET = "synthetic"


def run_demo(out: str | Path, *, seed: int = 0, methods: Sequence[str] = DEMO_METHODS,
             epochs: int | None = None, pretraining: PretrainConfig | bool = True,
             jobs: int = 1, progress_bar: bool = True,
             log: Callable[[str], None] | None = None, **overrides: object) -> dict:
    """Train each method into ``out/<method>`` and report it on the test split.

    First pretrains the shared backbone into ``out/backbone.pt`` (``pretraining``: ``True`` for
    :class:`PretrainConfig`'s defaults with ``seed``, a config of its own, or ``False`` to start
    every method from random weights).  Also draws every method's validation mIoU and
    constraint violation into ``out/curves.png``, and writes the table so far to
    ``out/demo.json`` after each method, so an interrupted demo keeps the rows it finished.

    Returns the table: ``split`` (``"test"``), ``images``, ``seed``, ``preset``, ``version``
    (of ``ccnn``), ``settings`` (each method's full :class:`~ccnn.train.TrainConfig`),
    ``pretrain`` (accuracy, seconds and settings) and ``methods``, one row per method:
    ``miou`` and ``pixel_accuracy`` on the test split, ``seconds`` (training and per-epoch
    validation), ``val_miou``; with the preset's dense CRF ``crf`` (the test metrics after
    CCNN's test-time refinement and their seconds); for a method with a refinement stage
    (:mod:`ccnn.refine`) ``miou_before_refine`` (test mIoU after its last P/Q epoch); for the
    CCNN methods ``p_step_share`` (the P-step's share of a training step).
    ``overrides`` replace preset settings (tests use them to make the run tiny).

    ``jobs`` > 1 trains that many methods at once, each in a process of its own on one thread
    (:func:`_train_in_worker`): on two cores two one-thread processes do more work than one
    two-thread process with this small network.  A method's numbers depend on its thread count
    only (the same seed and ``jobs`` give the same table); its messages then go to the worker's
    ``logging`` (stderr) instead of ``log``, and no progress bar is drawn.
    """
    log = log or logger.info
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        raise ValueError(f"--methods: unknown or no method(s) {unknown}; choose from {METHODS}")
    if jobs < 1:
        raise ValueError(f"--jobs must be at least 1, got {jobs}")
    out = Path(out)
    table: dict = {"split": None, "seed": seed, "preset": PRESET, "version": __version__,
                   "methods": {}, "settings": {}, "out": str(out)}
    if pretraining:
        pcfg = pretraining if isinstance(pretraining, PretrainConfig) else PretrainConfig(seed=seed)
        backbone = pretrain(pcfg, out / "backbone.pt", progress_bar=progress_bar, log=log)
        table["pretrain"] = {"accuracy": backbone["accuracy"], "seconds": backbone["seconds"],
                             "config": dataclasses.asdict(pcfg)}
        overrides = {**overrides, "backbone_weights": backbone["path"]}
    configs = {}
    for method in methods:
        settings = {**preset(PRESET, method), "seed": seed, **overrides}
        if epochs is not None:
            settings["epochs"] = epochs
        configs[method] = TrainConfig(method=method, **settings)
    first = next(iter(configs.values()))
    test_set = load_test_set(first)
    table["split"], table["images"] = first.test_split, len(test_set)
    table["settings"] = {method: dataclasses.asdict(cfg) for method, cfg in configs.items()}
    table["jobs"] = jobs
    histories = {}

    def record(method: str, row: dict, history: list[dict]) -> None:
        """Keep a finished method's row and write the table so far (rows come in ``methods``'
        order: the workers' results are awaited in that order)."""
        histories[method] = history
        table["methods"][method] = row
        write_json(out / "demo.json", table)
        log(f"{method}: test mIoU {row['miou']:.4f}")

    if jobs == 1:
        datasets = load_datasets(first)
        for method, cfg in configs.items():
            record(method, *_train_method(cfg, out / method, datasets, test_set, progress_bar,
                                          log))
    else:
        context = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(max_workers=min(jobs, len(configs)), mp_context=context,
                                 initializer=_start_worker,
                                 initargs=(logging.getLogger().getEffectiveLevel(),)) as pool:
            futures: dict[str, Future] = {
                method: pool.submit(_train_in_worker, cfg, out / method)
                for method, cfg in configs.items()}
            for method, future in futures.items():
                record(method, *future.result())
    plot_comparison({m: histories[m] for m in configs}, out / "curves.png")
    return table


def _train_method(cfg: TrainConfig, folder: Path, datasets: Sequence[Dataset], test_set: Dataset,
                  progress_bar: bool, log: Callable[[str], None]) -> tuple[dict, list[dict]]:
    """Train one method and evaluate it on the test split: its row and its history."""
    # the CRF is applied on the test split by _row, not on val
    summary = train(dataclasses.replace(cfg, crf=False), folder, datasets=datasets,
                    progress_bar=progress_bar, log=log)
    return _row(cfg, folder, summary, test_set), summary["history"]


def _start_worker(level: int) -> None:
    """A worker process of ``run_demo(jobs > 1)``: one thread, messages to stderr at ``level``."""
    torch.set_num_threads(1)
    logging.basicConfig(level=level, format="%(asctime)s %(processName)s %(message)s")


def _train_in_worker(cfg: TrainConfig, folder: Path) -> tuple[dict, list[dict]]:
    """:func:`_train_method` in a worker process, on datasets of its own (the same images)."""
    return _train_method(cfg, folder, load_datasets(cfg), load_test_set(cfg), False, logger.info)


def _row(cfg: TrainConfig, folder: Path, summary: dict, test_set: Dataset) -> dict:
    """One method's row of the table: its checkpoints evaluated on the test split."""
    device = torch.device(cfg.device)
    loader = eval_loader(test_set, cfg.eval_batch_size, num_workers=cfg.num_workers)
    model = load_checkpoint(folder / CHECKPOINT, cfg.device)[0]
    metrics = evaluate(model, loader, test_set.num_classes, device)
    row = {"miou": metrics["miou"], "pixel_accuracy": metrics["pixel_accuracy"],
           "seconds": summary["seconds"], "val_miou": summary["miou"]}
    if cfg.crf:
        start = time.perf_counter()
        crf = evaluate(model, loader, test_set.num_classes, device, crf=CRFParams())
        row["crf"] = {"miou": crf["miou"], "pixel_accuracy": crf["pixel_accuracy"],
                      "seconds": time.perf_counter() - start}
    if cfg.refine_epochs:
        before = load_checkpoint(folder / BEFORE_REFINE, cfg.device)[0]
        row["miou_before_refine"] = evaluate(before, loader, test_set.num_classes, device)["miou"]
    if cfg.method.startswith("ccnn"):
        history = summary["history"]
        row["p_step_share"] = sum(h["p_seconds"] for h in history) / max(
            sum(h["step_seconds"] for h in history), 1e-12)
    return row


def format_table(table: dict) -> str:
    """The demo's table as text: one row per method, mIoU relative to ``full`` when present."""
    rows = table["methods"]
    full = rows.get("full", {})

    def of_full(row: dict, key: str) -> str:
        ref = full.get(key, {}).get("miou") if key else full.get("miou")
        value = row.get(key, {}).get("miou") if key else row["miou"]
        return f"{100 * value / ref:.1f}%" if ref and value is not None else "-"

    def crf(row: dict) -> str:
        return f"{row['crf']['miou']:.4f}" if "crf" in row else "-"

    lines = [f"{table.get('split', '?')} split ({table.get('images', '?')} images), seed "
             f"{table.get('seed', '?')}, ccnn {table.get('version', '?')}",
             f"{'method':<16} {'mIoU':>7} {'of full':>8} {'+CRF':>7} {'of full':>8} "
             f"{'pixel acc':>10} {'seconds':>8} {'P-step':>7} {'unrefined':>9}"]
    for method, row in rows.items():
        share = f"{100 * row['p_step_share']:.1f}%" if "p_step_share" in row else "-"
        before = f"{row['miou_before_refine']:.4f}" if "miou_before_refine" in row else "-"
        lines.append(f"{method:<16} {row['miou']:>7.4f} {of_full(row, ''):>8} {crf(row):>7} "
                     f"{of_full(row, 'crf'):>8} {row['pixel_accuracy']:>10.4f} "
                     f"{row['seconds']:>8.1f} {share:>7} {before:>9}")
    lines.append("(unrefined: mIoU after the method's own epochs, before the refinement stage)")
    if "pretrain" in table:
        pre = table["pretrain"]
        lines.append(f"(backbone pretrained in {pre['seconds']:.1f} s, shape classification "
                     f"accuracy {pre['accuracy']:.3f})")
    return "\n".join(lines)
