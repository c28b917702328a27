"""Stage output folders: atomic writes, content hashes, and manifest.json, which is written LAST.

A folder is a finished artifact if and only if it holds manifest.json. A stage removes an old manifest before it
writes anything else into its folder, so a crash mid-run never leaves a folder that looks complete.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path
from typing import Any

from pipeline.config import UserError, dump_yaml

MANIFEST = "manifest.json"
CONFIG = "config.yaml"
TRACKED_PACKAGES = (
    "llmpipe", "torch", "transformers", "datasets", "accelerate", "peft", "trl", "deepspeed", "tokenizers",
)  # fmt: skip


# --- atomic writes ----------------------------------------------------------------------------------------------


def _fsync_dir(path: Path) -> None:
    # The rename itself is only durable once the directory entry is on disk.
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write a file so that readers see either the old content or the new, never a torn one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


@contextmanager
def atomic_dir(path: str | Path):
    """Yield a temporary sibling folder; on success it replaces `path` in one rename, on failure it is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
    try:
        yield tmp
        if path.exists():
            # Move the old folder aside first: os.replace cannot swap onto a non-empty directory.
            old = path.with_name(f".{path.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


# --- hashing ----------------------------------------------------------------------------------------------------


def file_sha256(path: str | Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest() if hasattr(hashlib, "file_digest") else _sha_stream(f)


def _sha_stream(f) -> str:
    digest = hashlib.sha256()
    for chunk in iter(lambda: f.read(1 << 20), b""):
        digest.update(chunk)
    return digest.hexdigest()


def content_hash(path: str | Path) -> str:
    """sha256 of a file, or of a folder's files (relative names + contents, in sorted order).

    A finished artifact folder is hashed through its manifest alone: the manifest already lists the hashes of
    everything the stage wrote, so this is exact and avoids re-reading gigabytes of weights.
    """
    path = Path(path)
    if path.is_file():
        return file_sha256(path)
    if (path / MANIFEST).is_file():
        return file_sha256(path / MANIFEST)
    digest = hashlib.sha256()
    for file in sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith(".")):
        digest.update(str(file.relative_to(path)).encode() + b"\0" + file_sha256(file).encode())
    return digest.hexdigest()


def describe_input(spec: str | list[str]) -> dict[str, Any]:
    """{path: hash} for local files, folders and globs; a hub name (no local match) is recorded as such."""
    specs = [spec] if isinstance(spec, str) else list(spec)
    out: dict[str, Any] = {}
    for item in specs:
        matches = sorted(glob.glob(item)) if glob.has_magic(item) else ([item] if os.path.exists(item) else [])
        if not matches:
            out[item] = "hub"
        for match in matches:
            out[match] = content_hash(match)
    return out


# --- provenance -------------------------------------------------------------------------------------------------


def git_state() -> dict[str, Any] | None:
    """The llmpipe source checkout's commit and whether it had uncommitted changes; None outside git."""
    src = Path(__file__).resolve().parent
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=src, capture_output=True, text=True, timeout=10)
        if sha.returncode != 0:
            return None
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=src, capture_output=True, text=True, timeout=10)
        return {"sha": sha.stdout.strip(), "dirty": bool(dirty.stdout.strip())}
    except (OSError, subprocess.SubprocessError):
        return None


def package_versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {"python": platform.python_version()}
    for name in TRACKED_PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


# --- stage folders ----------------------------------------------------------------------------------------------


# Keys a resumed run may change: how long it trains and how often it logs, evaluates and saves.
RESUMABLE_CHANGES = {
    "resume", "output_dir", "max_steps", "epochs", "logging_steps", "log_every", "save_steps", "save_total_limit",
    "checkpoint_every", "keep_checkpoints", "eval_steps", "eval_every", "generation_eval_max", "steps",
    "sample_every", "samples_per_log",
}  # fmt: skip


def config_changes(output_dir: str | Path, cfg: Any) -> list[tuple[str, Any, Any]] | None:
    """(dotted key, saved value, new value) for every key where `cfg` differs from output_dir/config.yaml, compared
    through YAML as config.yaml was written (a tuple becomes a list); None when there is no readable config.yaml."""
    import yaml

    saved = Path(output_dir) / CONFIG
    if not saved.is_file():
        return None
    try:
        old = _flatten(yaml.safe_load(saved.read_text(encoding="utf-8")) or {})
    except yaml.YAMLError:
        return None
    new = _flatten(yaml.safe_load(dump_yaml(cfg)))
    return [(k, old.get(k), new.get(k)) for k in sorted(old.keys() | new.keys())
            if old.get(k) != new.get(k) and not (k not in old and _is_default(cfg, k, new[k]))]  # fmt: skip


def _is_default(cfg: Any, key: str, value: Any) -> bool:
    """Whether `value` is the default of the dotted key: a key that a newer llmpipe added, at its default, is not a
    change of a folder written before it existed."""
    import dataclasses

    import yaml

    *sections, name = key.split(".")
    for part in sections:
        cfg = getattr(cfg, part, None)
    fields = {f.name: f for f in dataclasses.fields(cfg)} if dataclasses.is_dataclass(cfg) else {}
    if name not in fields:
        return False
    from pydantic.fields import FieldInfo
    from pydantic_core import PydanticUndefined

    f = fields[name]
    default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
    if isinstance(default, FieldInfo):  # config.field: pydantic's Field
        default = default.get_default(call_default_factory=True)
    if default is dataclasses.MISSING or default is PydanticUndefined:
        return False
    if dataclasses.is_dataclass(default):
        default = dataclasses.asdict(default)
    return yaml.safe_load(yaml.safe_dump(default)) == value


def check_resume_config(output_dir: str | Path, cfg: Any) -> None:
    """Refuse to resume checkpoints that another configuration wrote (they would be silently continued with the
    new data, rates or model: a run that matches neither config). Compares with output_dir/config.yaml."""
    changed = [c for c in config_changes(output_dir, cfg) or [] if c[0].rsplit(".", 1)[-1] not in RESUMABLE_CHANGES]
    if changed:
        shown = ", ".join(f"{k}: {old!r} -> {new!r}" for k, old, new in changed[:6])
        more = ", ..." if len(changed) > 6 else ""
        raise UserError(
            f"{output_dir} holds checkpoints of a run with another config ({shown}{more}); "
            "to start over set resume=never, or use another output_dir"
        )


def _flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def begin_stage(output_dir: str | Path, cfg: Any, fresh: bool = False) -> Path:
    """Prepare a stage's folder: drop any old manifest (the folder is unfinished from now on), save config.yaml.
    `fresh` (not resuming): old checkpoints go too, so a later `resume: auto` cannot pick up another run's."""
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    if fresh:
        shutil.rmtree(out / "checkpoints", ignore_errors=True)
    if (out / MANIFEST).exists():
        (out / MANIFEST).unlink()
        _fsync_dir(out)
    atomic_write_text(out / CONFIG, dump_yaml(cfg))
    return out


def write_manifest(
    output_dir: str | Path,
    stage: str,
    inputs: dict[str, Any],
    outputs: list[str],
    metrics: dict[str, Any],
    started: float,
) -> dict[str, Any]:
    """Write manifest.json, the mark of a finished stage. Call it last, after every output is on disk."""
    out = Path(output_dir)
    manifest = {
        "stage": stage,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "wall_time_s": round(time.time() - started, 3),
        "inputs": inputs,
        "outputs": {name: content_hash(out / name) for name in outputs},
        "config_sha256": file_sha256(out / CONFIG),
        "metrics": metrics,
        "git": git_state(),
        "versions": package_versions(),
        "command": " ".join(sys.argv),
    }
    atomic_write_text(out / MANIFEST, json.dumps(manifest, indent=2, sort_keys=False) + "\n")
    return manifest


def read_manifest(path: str | Path, expect_stage: str | None = None) -> dict[str, Any]:
    """The manifest of a finished artifact folder; a clear error if the folder is missing or unfinished."""
    folder = Path(path)
    if not folder.is_dir():
        raise UserError(f"{folder}: no such artifact folder")
    manifest_path = folder / MANIFEST
    if not manifest_path.is_file():
        raise UserError(
            f"{folder}: unfinished artifact (no {MANIFEST}); the stage that writes it did not complete. "
            "Re-run that stage (it resumes where it can) before using this folder as input."
        )
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise UserError(f"{manifest_path}: corrupt manifest ({exc}); re-run the stage that wrote it") from None
    if expect_stage is not None and manifest.get("stage") != expect_stage:
        raise UserError(f"{folder}: is a {manifest.get('stage')!r} artifact, expected a {expect_stage!r} artifact")
    return manifest
