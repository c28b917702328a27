"""`llmpipe run PIPELINE.yaml`: every stage of a pipeline file in order, each reading earlier stages' folders.

    llmpipe run configs/tiny/pipeline.yaml                 # runs/tiny/<stage>/ and runs/tiny/report.md
    llmpipe run configs/tiny/pipeline.yaml --dry-run       # the plan: what runs, what is skipped, and why
    llmpipe run configs/tiny/pipeline.yaml --from sft      # sft and the stages after it (earlier ones must be done)
    llmpipe run configs/tiny/pipeline.yaml --stages reward,dpo --force    # re-run these two even if finished

A pipeline file names the run and lists stages; each stage is a stage config plus overrides, and an override
value `stage:<name>` is the folder of an earlier stage (`stage:<name>/file` a file in it, also inside a list):

    name: tiny                        # folders go to <runs_dir>/<name>/<stage name>/
    runs_dir: runs                    # default runs
    launch: null                      # default launch config for every stage (null: a plain process)
    stages:
      - name: pretrain
        config: configs/tiny/pretrain.yaml
        set: {tokenizer: "stage:tokenizer"}
      - name: eval_pretrain
        stage: eval                   # the stage command; default: the name
        config: configs/tiny/eval.yaml
        set: {model: "stage:pretrain"}
        launch: launch/accelerate/cpu_2proc.yaml    # this stage under `accelerate launch`

Each stage is one of four things, decided before anything runs: **skip** (finished: manifest present, the same
resolved config as its config.yaml, the same input hashes as its manifest, and no input stage runs again),
**resume** (started, unfinished, same config: the stage continues from its newest checkpoint), **run** (never
started) or **rerun** (its config, an input file or an input stage changed: it starts afresh, and so does every
stage that reads it). Every stage config is loaded and checked first, so a bad key fails in seconds, naming the
pipeline file and stage. Stages run as child processes (`python -m pipeline.cli ...`, or under `accelerate launch`
with the stage's launch config); the first failure stops the run, and running the same command again resumes.
`<runs_dir>/<name>/pipeline.json` records each stage's command, outcome and wall time; report.md is rebuilt at
the end (`llmpipe report RUN_DIR` rebuilds it any time).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from pipeline.artifacts import CONFIG, MANIFEST, atomic_write_text, config_changes, content_hash
from pipeline.config import UserError, load_config
from pipeline.data import check_data_paths

REF = "stage:"
# Stages a pipeline may hold: the ones that read and write artifact folders (annotate needs a person).
PIPELINE_STAGES = ("tokenizer", "pretrain", "sft", "pairs", "reward", "dpo", "ppo", "grpo", "eval", "explain")
STATE_FILE = "pipeline.json"


@dataclasses.dataclass
class Stage:
    name: str
    stage: str
    config: str
    overrides: list[str]  # key=value, stage: references resolved, output_dir last
    launch: str | None
    needs: list[str]  # names of earlier stages this one reads
    output_dir: Path
    cfg: Any = None  # the validated stage config
    action: str = ""  # skip, resume, run, rerun
    reason: str = ""


@dataclasses.dataclass
class Pipeline:
    path: Path
    name: str
    run_dir: Path
    stages: list[Stage]


# --- reading and checking the pipeline file -----------------------------------------------------------------------


def load_pipeline(path: str | Path) -> Pipeline:
    """Parse and check a pipeline file and every stage config it names; all problems at once, as a UserError."""
    import yaml

    from pipeline.cli import stage_module

    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"{path}: pipeline file not found") from None
    except yaml.YAMLError as exc:
        raise UserError(f"{path}: not valid YAML: {' '.join(str(exc).split())}") from None
    if not isinstance(raw, dict):
        raise UserError(f"{path}: the top level must be a mapping (name, runs_dir, launch, stages)")
    problems = [f"{path}: unknown key {k!r} (keys: name, runs_dir, launch, stages)" for k in raw
                if k not in ("name", "runs_dir", "launch", "stages")]  # fmt: skip
    name = raw.get("name")
    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9._-]+", name or ""):
        problems.append(f"{path}: name: expected a folder name (letters, digits, . _ -), got {name!r}")
        name = "unnamed"
    run_dir = Path(raw.get("runs_dir") or "runs") / name
    default_launch = raw.get("launch")
    entries = raw.get("stages")
    if not isinstance(entries, list) or not entries:
        raise UserError([*problems, f"{path}: stages: expected a list of stages"])
    stages: list[Stage] = []
    for index, entry in enumerate(entries):
        where = f"{path}: stages[{index}]"
        if not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
            problems.append(f"{where}: expected a mapping with a name")
            continue
        where = f"{path}: stage {entry['name']!r}"
        extra = set(entry) - {"name", "stage", "config", "set", "launch"}
        if extra:
            problems.append(f"{where}: unknown key(s) {sorted(extra)} (keys: name, stage, config, set, launch)")
        kind = entry.get("stage", entry["name"])
        if kind not in PIPELINE_STAGES:
            problems.append(f"{where}: stage {kind!r} is not one of {', '.join(PIPELINE_STAGES)} (set `stage:`)")
            continue
        if any(s.name == entry["name"] for s in stages):
            problems.append(f"{where}: the name is used twice")
        config = entry.get("config")
        if config is not None and not Path(config).is_file():
            problems.append(f"{where}: config {config!r} not found")
            continue
        launch = entry.get("launch", default_launch)
        if launch is not None and not Path(launch).is_file():
            problems.append(f"{where}: launch config {launch!r} not found")
        overrides, needs = [], []
        settings = entry.get("set") or {}
        if not isinstance(settings, dict):
            problems.append(f"{where}: set: expected a mapping of config keys to values")
            settings = {}
        for key, value in settings.items():
            unknown = [r for r in _references(value) if r.split("/")[0] not in {s.name for s in stages}]
            if unknown:
                known = ", ".join(s.name for s in stages) or "none"
                problems.append(f"{where}: set.{key}: {REF + unknown[0]!r} names no earlier stage (earlier: {known})")
                continue
            needs += [r.split("/")[0] for r in _references(value) if r.split("/")[0] not in needs]
            value = _resolve(value, run_dir)
            overrides.append(f"{key}={value if isinstance(value, str) else json.dumps(value)}")
        output_dir = run_dir / entry["name"]
        overrides.append(f"output_dir={output_dir}")
        stage = Stage(entry["name"], kind, config, overrides, launch, needs, output_dir)
        try:
            module = stage_module(kind)
            stage.cfg = load_config(module.Config, config, overrides)
            check_data_paths(stage.cfg, produced=[run_dir / n for n in needs])  # earlier stages write those files
        except UserError as exc:
            problems += [f"{where}: {p}" for p in exc.problems]
        stages.append(stage)
    if problems:
        raise UserError(problems)
    return Pipeline(path, name, run_dir, stages)


def _references(value) -> list[str]:
    """The `stage:NAME` or `stage:NAME/path/in/its/folder` references in a set value (a string or a list)."""
    values = value if isinstance(value, list) else [value]
    return [v[len(REF) :] for v in values if isinstance(v, str) and v.startswith(REF)]


def _resolve(value, run_dir: Path):
    """A set value with each stage reference replaced by the path under run_dir."""
    if isinstance(value, list):
        return [_resolve(v, run_dir) for v in value]
    if isinstance(value, str) and value.startswith(REF):
        return str(run_dir / value[len(REF) :])
    return value


# --- the plan -----------------------------------------------------------------------------------------------------


def plan(pipeline: Pipeline, selected: set[str], force: bool) -> None:
    """Set each stage's action and reason. Unselected stages are skipped but must be finished if a selected one
    reads them."""
    changed: set[str] = set()
    for stage in pipeline.stages:
        upstream = [n for n in stage.needs if n in changed]
        if stage.name not in selected:
            stage.action, stage.reason = "skip", "not selected"
            if not (stage.output_dir / MANIFEST).is_file():
                stage.reason = "not selected (unfinished)"
            continue
        state, why = folder_state(stage)
        if state == "absent":
            stage.action, stage.reason = "run", "not run yet"
        elif force:
            stage.action, stage.reason = "rerun", "--force"
        elif upstream:
            stage.action, stage.reason = "rerun", f"input stage {', '.join(upstream)} runs again"
        elif state == "finished":
            stage.action, stage.reason = "skip", "finished, same config and inputs"
        elif state == "unfinished":
            stage.action, stage.reason = "resume", "unfinished, same config: continues from its last checkpoint if any"
        else:
            stage.action, stage.reason = "rerun", why
        if stage.action != "skip":
            changed.add(stage.name)
    by_name = {s.name: s for s in pipeline.stages}
    for stage in pipeline.stages:
        if stage.action == "skip":
            continue
        missing = [
            n for n in stage.needs if by_name[n].action == "skip" and by_name[n].reason.endswith("(unfinished)")
        ]
        if missing:
            raise UserError(f"{pipeline.path}: stage {stage.name!r} reads {', '.join(missing)}, which is not "
                            f"finished and not selected; add it to --stages or start earlier with --from")  # fmt: skip


def folder_state(stage: Stage) -> tuple[str, str]:
    """absent | unfinished | finished | changed, with the reason for `changed`."""
    out = stage.output_dir
    if not (out / CONFIG).is_file():
        return ("absent", "") if not (out / "checkpoints").exists() else ("changed", "no config.yaml beside its files")
    diff = [c for c in config_changes(out, stage.cfg) or [] if c[0] != "resume"]
    if diff:
        shown = ", ".join(f"{k}: {old!r} -> {new!r}" for k, old, new in diff[:3])
        return "changed", f"config changed ({shown}{', ...' if len(diff) > 3 else ''})"
    manifest_path = out / MANIFEST
    if not manifest_path.is_file():
        return "unfinished", ""
    manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    for key, files in (manifest.get("inputs") or {}).items():
        for item, recorded in files.items() if isinstance(files, dict) else []:
            if recorded == "hub" or not isinstance(recorded, str):
                continue
            if not os.path.exists(item):
                return "changed", f"input {key} {item} is gone"
            if content_hash(item) != recorded:
                return "changed", f"input {key} {item} changed"
    return "finished", ""


def select(pipeline: Pipeline, stages: str | None, start: str | None) -> set[str]:
    names = [s.name for s in pipeline.stages]
    chosen = set(names)
    if start is not None:
        if start not in names:
            raise UserError(f"--from {start!r}: no such stage in {pipeline.path} (stages: {', '.join(names)})")
        chosen = set(names[names.index(start) :])
    if stages is not None:
        wanted = [s.strip() for s in stages.split(",") if s.strip()]
        unknown = [s for s in wanted if s not in names]
        if unknown:
            raise UserError(f"--stages: no stage {', '.join(map(repr, unknown))} in {pipeline.path} "
                            f"(stages: {', '.join(names)})")  # fmt: skip
        chosen &= set(wanted)
    return chosen


# --- running ------------------------------------------------------------------------------------------------------


def launch_env(launch: str | None) -> dict[str, str]:
    """Environment for a stage: `# env: KEY=VALUE` lines of its launch config (as launch/run.sh reads them), under
    any variable the user already set."""
    env = dict(os.environ)
    if launch:
        for line in Path(launch).read_text(encoding="utf-8").splitlines():
            match = re.match(r"#\s*env:\s*(.+)", line)
            for item in shlex.split(match.group(1)) if match else []:
                key, _, value = item.partition("=")
                env.setdefault(key, value)
    return env


def command(stage: Stage) -> list[str]:
    overrides = list(stage.overrides)
    if stage.action == "rerun" and any(f.name == "resume" for f in dataclasses.fields(stage.cfg)):
        overrides.append("resume=never")
    config = ["--config", stage.config] if stage.config else []
    cli = ["-m", "pipeline.cli", stage.stage, *config, *overrides]
    if stage.launch:
        return [sys.executable, "-m", "accelerate.commands.launch", "--config_file", stage.launch, *cli]
    return [sys.executable, *cli]


def run_pipeline(pipeline: Pipeline, dry_run: bool) -> int:
    width = max(len(s.name) for s in pipeline.stages)
    count = len(pipeline.stages)
    print(f"pipeline {pipeline.name} ({pipeline.path}) -> {pipeline.run_dir}/")
    for i, stage in enumerate(pipeline.stages, 1):
        print(f"  {f'[{i}/{count}]':>7} {stage.name:<{width}}  {stage.action:<6}  {stage.reason}")
        if dry_run and stage.action != "skip":
            print("        " + shlex.join(command(stage)))
    if dry_run:
        return 0
    state_path = pipeline.run_dir / STATE_FILE
    state = _read_state(state_path)
    state.update(pipeline=str(pipeline.path), name=pipeline.name)
    rc = 0
    for stage in pipeline.stages:
        record = state["stages"].setdefault(stage.name, {})
        record.update(stage=stage.stage, output_dir=str(stage.output_dir), launch=stage.launch)
        if stage.action == "skip":
            record["last_action"] = "skip"
            continue
        cmd = command(stage)
        print(f"\n=== {stage.name}: {stage.action} ({stage.reason})\n+ {shlex.join(cmd)}", flush=True)
        started = time.time()
        rc = subprocess.run(cmd, env=launch_env(stage.launch)).returncode
        finished_at = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        record.update(command=shlex.join(cmd), last_action=stage.action, exit_code=rc,
                      seconds=round(time.time() - started, 1), finished_at=finished_at)  # fmt: skip
        atomic_write_text(state_path, json.dumps(state, indent=2) + "\n")
        if rc != 0:
            print(f"\nllmpipe run: stage {stage.name!r} failed (exit {rc}); fix the cause and run the same command "
                  "again: finished stages are skipped, this one resumes where it can", file=sys.stderr)  # fmt: skip
            break
    atomic_write_text(state_path, json.dumps(state, indent=2) + "\n")
    from pipeline.report import build_report

    report = build_report(pipeline.run_dir)
    print(f"\nreport: {report}")
    return rc


def _read_state(path: Path) -> dict:
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
        return state if isinstance(state.get("stages"), dict) else {"stages": {}}
    except (OSError, ValueError):
        return {"stages": {}}


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="llmpipe run", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("pipeline", help="pipeline file, e.g. configs/tiny/pipeline.yaml")
    parser.add_argument("--stages", help="comma-separated stage names: run only these")
    parser.add_argument("--from", dest="start", metavar="STAGE", help="run this stage and the ones after it")
    parser.add_argument("--force", action="store_true", help="re-run the selected stages even if finished")
    parser.add_argument("--dry-run", action="store_true", help="print the plan and the commands; run nothing")
    args = parser.parse_args(argv)
    pipeline = load_pipeline(args.pipeline)
    plan(pipeline, select(pipeline, args.stages, args.start), args.force)
    return run_pipeline(pipeline, args.dry_run)
