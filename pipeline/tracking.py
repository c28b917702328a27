"""Console output for stages: printed by the main process only, so N ranks do not print N copies."""

from __future__ import annotations

import os
import sys
import time


def is_main_process() -> bool:
    """True on global rank 0 (or when not launched distributed); read from the launcher's environment."""
    return int(os.environ.get("RANK", "0")) == 0


def log(message: str, stage: str | None = None) -> None:
    if is_main_process():
        prefix = f"[{time.strftime('%H:%M:%S')}]" + (f" {stage}:" if stage else "")
        print(f"{prefix} {message}", file=sys.stderr, flush=True)
