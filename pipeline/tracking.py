"""Console output for stages: printed by the main process only, so N ranks do not print N copies."""

from __future__ import annotations

import sys
import time

from pipeline.distributed import is_main_process


def log(message: str, stage: str | None = None) -> None:
    if is_main_process():
        prefix = f"[{time.strftime('%H:%M:%S')}]" + (f" {stage}:" if stage else "")
        print(f"{prefix} {message}", file=sys.stderr, flush=True)


class MetricsLog:
    """metrics.jsonl (one JSON line per logged step) plus Accelerate's trackers (tensorboard, wandb) if asked.

    On resume, lines from steps after the checkpoint are dropped first, so the file has each step once.
    """

    def __init__(self, path, accelerator=None, resume_step: int | None = None):
        import json as _json
        from pathlib import Path

        self.path, self.accelerator, self._json = Path(path), accelerator, _json
        if not is_main_process():
            return
        if resume_step is None:
            self.path.unlink(missing_ok=True)
        elif self.path.exists():
            kept = [
                line
                for line in self.path.read_text().splitlines()
                if line.strip() and _json.loads(line).get("step", 0) <= resume_step
            ]
            self.path.write_text("".join(line + "\n" for line in kept))

    def write(self, step: int, values: dict) -> None:
        if self.accelerator is not None and self.accelerator.trackers:
            self.accelerator.log({k: v for k, v in values.items() if isinstance(v, (int, float))}, step=step)
        if is_main_process():
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(self._json.dumps({"step": step, **values}) + "\n")
                f.flush()
