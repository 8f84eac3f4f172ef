"""A terminal progress bar for a running job (frames or files done / total, rate, ETA)."""
from __future__ import annotations

import sys


class ProgressBar:
    """tqdm bar on stderr: frames (or files) done / total, rate, ETA."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.bar = None

    def total(self, n: int, unit: str) -> None:
        if self.enabled:
            from tqdm import tqdm

            self.bar = tqdm(total=n, unit=unit.rstrip("s"), dynamic_ncols=True, file=sys.stderr,
                            bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} [{elapsed}<{remaining}, {rate_fmt}]")

    def advance(self, n: int) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
