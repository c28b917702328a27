"""Resumable training state on Accelerate: atomic checkpoint folders, keep-last-K, and `resume: auto`.

A checkpoint is written by every rank into a hidden temporary folder (DeepSpeed and FSDP write one shard per rank),
then rank 0 adds trainer_state.json and renames the folder to `step_NNNNNNN` in one step. A process killed mid-write
leaves only the hidden folder, which is never taken as a checkpoint and is cleared on the next save.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

from pipeline.artifacts import atomic_write_text, check_resume_config
from pipeline.config import UserError

STATE_FILE = "trainer_state.json"
_NAME = re.compile(r"^step_(\d+)$")


def list_checkpoints(folder: str | Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = [
        (int(m.group(1)), p) for p in folder.iterdir() if (m := _NAME.match(p.name)) and (p / STATE_FILE).is_file()
    ]
    return [p for _, p in sorted(found)]


def stopped_message(folder: str | Path, step: int, what: str, advice: str) -> str:
    """Why a training loop stopped at `step` (0-based) without saving it, and that its last good checkpoint is
    intact, so the same command resumes from it after the advice is taken."""
    kept = list_checkpoints(folder)
    where = f"the last good checkpoint, {kept[-1]}, is intact" if kept else "no checkpoint had been saved yet"
    return (f"step {step + 1}: {what}; stopped without saving this step. {where}. {advice}, then run again "
            "(resume: auto continues from it).")  # fmt: skip


def find_resume_point(folder: str | Path, resume: str, cfg: Any = None) -> Path | None:
    """The checkpoint to resume from: `auto` -> newest complete one (or None), `never` -> None, else a path. With
    `cfg`, checkpoints another config wrote (the stage folder's config.yaml) are refused, not continued."""
    if resume == "never":
        return None
    if resume == "auto":
        found = list_checkpoints(folder)
        path = found[-1] if found else None
    else:
        path = Path(resume)
        if not (path / STATE_FILE).is_file():
            raise UserError(
                f"resume: {resume} is not a complete checkpoint (no {STATE_FILE}); use auto, never or a path"
            )
    if path is not None and cfg is not None:
        check_resume_config(Path(folder).parent, cfg)
    return path


def save_checkpoint(accelerator, folder: str | Path, step: int, state: dict[str, Any], keep_last: int) -> Path:
    """Save model, optimizer and RNG states of every rank plus `state`; atomic; prune to the newest `keep_last`."""
    folder = Path(folder)
    final = folder / f"step_{step:07d}"
    tmp = folder / f".tmp_step_{step:07d}"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp), safe_serialization=True)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        atomic_write_text(tmp / STATE_FILE, json.dumps({"step": step, **state}, indent=2))
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        for old in list_checkpoints(folder)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
        for stale in folder.glob(".tmp_step_*"):  # left by a process killed while saving
            shutil.rmtree(stale, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def load_checkpoint(accelerator, path: str | Path) -> dict[str, Any]:
    """Restore model, optimizer and RNG states saved by `save_checkpoint`; return the saved trainer state."""
    accelerator.load_state(str(path))
    return json.loads((Path(path) / STATE_FILE).read_text())
