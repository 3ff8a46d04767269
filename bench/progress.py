"""A progress bar for long sweeps: tqdm on a terminal when installed, else one counter line per step on
stderr (readable in logs)."""

from __future__ import annotations

import sys


class Progress:
    def __init__(self, total: int, label: str, enabled: bool = True):
        self.total, self.label, self.count, self.bar = total, label, 0, None
        self.enabled = enabled and total > 0
        if self.enabled and sys.stderr.isatty():
            try:
                from tqdm.auto import tqdm
            except ImportError:
                return
            self.bar = tqdm(total=total, desc=label, file=sys.stderr, leave=False, dynamic_ncols=True)

    def step(self, what: str) -> None:
        self.count += 1
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.set_postfix_str(what[:60], refresh=False)
            self.bar.update(1)
        else:
            print(f"[{self.label} {self.count}/{self.total}] {what}", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
