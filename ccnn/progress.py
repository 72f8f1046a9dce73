"""The progress bar of long work: a tqdm bar on a terminal, silent elsewhere.

Library functions take ``progress: bool``; the command line turns it on only when standard error is
a terminal, so a run redirected to a file writes no carriage-return lines.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

__all__ = ["ProgressBar", "on_terminal"]


def on_terminal(wanted: bool = True) -> bool:
    """Whether to show a progress bar: asked for, and standard error is a terminal."""
    return wanted and sys.stderr.isatty()


_SHORT = {"violation": "viol", "images_per_second": "img_s", "accuracy": "acc"}


class ProgressBar:
    """A tqdm bar whose postfix shows a step's statistics (loss, violation, images/s...);
    silent when disabled."""

    def __init__(self, enabled: bool, total: int, description: str) -> None:
        self.enabled, self.total, self.description = enabled, total, description
        self.bar = None

    def __enter__(self) -> Callable[[dict], None]:
        if self.enabled:
            from tqdm import tqdm

            self.bar = tqdm(total=self.total, desc=self.description, leave=False)
        return self.update

    def update(self, stats: dict) -> None:
        """Advance one step and show ``stats`` beside the bar."""
        if self.bar is not None:
            self.bar.set_postfix({_SHORT.get(k, k): f"{v:.0f}" if k == "images_per_second"
                                  else f"{v:.3f}" for k, v in stats.items()})
            self.bar.update()

    def __exit__(self, *exc: object) -> None:
        if self.bar is not None:
            self.bar.close()
