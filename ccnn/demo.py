"""``ccnn demo``: the main job — the four methods side by side on the synthetic default.

Every method trains the same network from the same seed on the same images with the preset
``synthetic``; ``full`` sees the masks, the others only the tags (and ``ccnn-size`` the sizes).
All four start from one backbone, pretrained first on a separate image-level classification set
(:mod:`ccnn.pretrain`, the stand-in for CCNN's ImageNet-trained VGG16); its time counts in the
demo's.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

from ccnn.io import write_json
from ccnn.presets import preset
from ccnn.pretrain import PretrainConfig, pretrain
from ccnn.report import plot_comparison
from ccnn.train import METHODS, TrainConfig, load_datasets, train

__all__ = ["DEMO_METHODS", "format_table", "run_demo"]

DEMO_METHODS: tuple[str, ...] = ("full", "mil", "ccnn", "ccnn-size")


def run_demo(out: str | Path, *, seed: int = 0, methods: Sequence[str] = DEMO_METHODS,
             epochs: int | None = None, pretraining: PretrainConfig | bool = True,
             progress_bar: bool = True, log: Callable[[str], None] = print,
             **overrides: object) -> dict:
    """Train each method into ``out/<method>``; returns ``{"methods": {method: row}}``.

    First pretrains the shared backbone into ``out/backbone.pt`` (``pretraining``: ``True`` for
    :class:`PretrainConfig`'s defaults with ``seed``, a config of its own, or ``False`` to start
    every method from random weights); the table's ``"pretrain"`` entry holds its accuracy and
    seconds.  Also draws every method's validation mIoU and constraint violation into
    ``out/curves.png``, and writes the table so far to ``out/demo.json`` after each method, so
    an interrupted demo keeps the rows it finished.

    A row holds ``miou``, ``pixel_accuracy``, ``seconds`` (training and validation time), with
    the preset's dense CRF ``crf`` (the same metrics after CCNN's test-time refinement) and, for
    the constrained methods, ``p_step_share`` (the P-step's share of a training step) and, for
    a method with a refinement stage (:mod:`ccnn.refine`), ``miou_before_refine`` (the
    validation mIoU after its last P/Q epoch).
    ``overrides`` replace preset settings (tests use them to make the run tiny).
    """
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        raise ValueError(f"--methods: unknown or no method(s) {unknown}; choose from {METHODS}")
    out = Path(out)
    table: dict = {"methods": {}, "out": str(out)}
    if pretraining:
        pcfg = pretraining if isinstance(pretraining, PretrainConfig) else PretrainConfig(seed=seed)
        backbone = pretrain(pcfg, out / "backbone.pt", progress_bar=progress_bar, log=log)
        table["pretrain"] = {"accuracy": backbone["accuracy"], "seconds": backbone["seconds"]}
        overrides = {**overrides, "backbone_weights": backbone["path"]}
    configs = {}
    for method in methods:
        settings = {**preset("synthetic", method), "seed": seed, **overrides}
        if epochs is not None:
            settings["epochs"] = epochs
        configs[method] = TrainConfig(method=method, **settings)
    datasets = load_datasets(next(iter(configs.values())))
    histories = {}
    for method, cfg in configs.items():
        summary = train(cfg, out / method, datasets=datasets, progress_bar=progress_bar, log=log)
        histories[method] = summary["history"]
        row = {"miou": summary["miou"], "pixel_accuracy": summary["pixel_accuracy"],
               "seconds": summary["seconds"]}
        if "crf" in summary:
            row["crf"] = {k: summary["crf"][k] for k in ("miou", "pixel_accuracy", "seconds")}
        if cfg.refine_epochs:
            row["miou_before_refine"] = summary["history"][cfg.epochs - 1]["val_miou"]
        if method.startswith("ccnn"):
            history = summary["history"]
            row["p_step_share"] = sum(h["p_seconds"] for h in history) / max(
                sum(h["step_seconds"] for h in history), 1e-12)
        table["methods"][method] = row
        write_json(out / "demo.json", table)
    plot_comparison(histories, out / "curves.png")
    return table


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

    lines = [f"{'method':<10} {'mIoU':>7} {'of full':>8} {'+CRF':>7} {'of full':>8} "
             f"{'pixel acc':>10} {'seconds':>8} {'P-step':>7} {'P/Q only':>9}"]
    for method, row in rows.items():
        share = f"{100 * row['p_step_share']:.1f}%" if "p_step_share" in row else "-"
        before = f"{row['miou_before_refine']:.4f}" if "miou_before_refine" in row else "-"
        lines.append(f"{method:<10} {row['miou']:>7.4f} {of_full(row, ''):>8} {crf(row):>7} "
                     f"{of_full(row, 'crf'):>8} {row['pixel_accuracy']:>10.4f} "
                     f"{row['seconds']:>8.1f} {share:>7} {before:>9}")
    if "pretrain" in table:
        pre = table["pretrain"]
        lines.append(f"(backbone pretrained in {pre['seconds']:.1f} s, shape classification "
                     f"accuracy {pre['accuracy']:.3f})")
    return "\n".join(lines)
