"""`llmpipe run`: a pipeline file's stages chained by `stage:` references, skip / resume / rerun decided from the
folders, --dry-run, --from / --stages, errors before anything runs, and `llmpipe report`."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import yaml
from conftest import REPO, run_cli


def write_pipeline(
    tmp_path: Path,
    corpus: Path,
    lr: float = 3e-3,
    extra_stage: dict | None = None,
    file: str = "pipeline.yaml",
    steps: int = 8,
) -> Path:
    """tokenizer -> pretrain (8 steps, checkpoint every 4) -> eval (demo_mc, 8 documents): a pipeline in seconds."""
    stages = [
        {"name": "tokenizer", "config": str(REPO / "configs/tiny/tokenizer.yaml"),
         "set": {"data.path": str(corpus), "vocab_size": 400}},
        {"name": "pretrain", "config": str(REPO / "configs/tiny/pretrain.yaml"),
         "set": {"tokenizer": "stage:tokenizer", "data.path": str(corpus), "data.mix": None, "model.hidden_size": 32,
                 "model.num_layers": 1, "model.num_heads": 2, "model.max_seq_len": 64, "train.max_steps": steps,
                 "train.micro_batch_size": 4, "train.warmup_steps": 2, "train.lr": lr, "checkpoint_every": 4,
                 "eval_every": 4, "log_every": 2, "validation_fraction": 0.1}},
        {"name": "eval_pretrain", "stage": "eval", "config": str(REPO / "configs/tiny/eval.yaml"),
         "set": {"model": "stage:pretrain", "tasks": ["demo_mc"], "limit": 8, "num_fewshot": 1}},
    ]  # fmt: skip
    if extra_stage:
        stages.append(extra_stage)
    path = tmp_path / file
    path.write_text(yaml.safe_dump({"name": "t", "runs_dir": str(tmp_path / "runs"), "stages": stages}))
    return path


def plan_lines(result) -> dict[str, str]:
    """stage name -> action, from the plan `llmpipe run` prints before any stage's output."""
    plan = {}
    for line in result.stdout.split("\n===")[0].splitlines():
        match = re.match(r"\s*\[\d+/\d+\] (\S+)\s+(\S+)", line)
        if match:
            plan[match.group(1)] = match.group(2)
    return plan


def test_runs_chains_skips_reruns_downstream_and_reports(tmp_path, small_corpus):
    pipeline = write_pipeline(tmp_path, small_corpus)
    run_dir = tmp_path / "runs" / "t"
    first = run_cli("run", str(pipeline), timeout=600)
    assert first.returncode == 0, first.stderr[-3000:]
    assert plan_lines(first) == {"tokenizer": "run", "pretrain": "run", "eval_pretrain": "run"}
    for name in ("tokenizer", "pretrain", "eval_pretrain"):
        assert (run_dir / name / "manifest.json").is_file()
    # each stage read the one before: the eval's input is the pretrain folder, pretrain's the tokenizer folder
    assert str(run_dir / "pretrain") in json.loads((run_dir / "eval_pretrain/manifest.json").read_text())["inputs"][
        "model"]  # fmt: skip
    state = json.loads((run_dir / "pipeline.json").read_text())
    assert all(s["exit_code"] == 0 for s in state["stages"].values())

    report = (run_dir / "report.md").read_text()
    assert "| pretrain | held-out loss |" in report and "better" in report  # the loss fell
    assert "demo_mc/acc" in report and (run_dir / "training_curves.png").stat().st_size > 5000
    assert (run_dir / "eval.png").is_file()

    started = time.time()
    again = run_cli("run", str(pipeline))
    assert again.returncode == 0 and set(plan_lines(again).values()) == {"skip"}
    assert time.time() - started < 60  # no stage process started: loading configs and hashing inputs only
    state = json.loads((run_dir / "pipeline.json").read_text())
    assert {s["last_action"] for s in state["stages"].values()} == {"skip"}

    # a changed pretrain config re-runs pretrain and the eval that reads it, not the tokenizer
    changed = write_pipeline(tmp_path, small_corpus, lr=1e-3, file="changed.yaml")
    dry = run_cli("run", str(changed), "--dry-run")
    assert dry.returncode == 0
    assert plan_lines(dry) == {"tokenizer": "skip", "pretrain": "rerun", "eval_pretrain": "rerun"}
    assert "train.lr: 0.003 -> 0.001" in dry.stdout and "resume=never" in dry.stdout
    assert json.loads((run_dir / "pipeline.json").read_text()) == state  # a dry run changes nothing

    # --from limits the run to a stage and the ones after it; --force re-runs finished ones
    forced = run_cli("run", str(pipeline), "--from", "eval_pretrain", "--force", "--dry-run")
    assert plan_lines(forced) == {"tokenizer": "skip", "pretrain": "skip", "eval_pretrain": "rerun"}

    rebuilt = run_cli("report", str(run_dir))
    assert rebuilt.returncode == 0 and rebuilt.stdout.strip().endswith("report.md")


def test_killed_run_resumes_the_interrupted_stage(tmp_path, small_corpus):
    """SIGKILL the whole `llmpipe run` process group once pretrain has saved a checkpoint; the same command then
    skips the tokenizer, resumes pretrain from its newest checkpoint and finishes the rest."""
    pipeline = write_pipeline(tmp_path, small_corpus, steps=200)
    run_dir = tmp_path / "runs" / "t"
    command = [sys.executable, "-m", "pipeline.cli", "run", str(pipeline)]
    process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               start_new_session=True)  # fmt: skip
    try:
        deadline = time.time() + 300
        while not list((run_dir / "pretrain/checkpoints").glob("step_*")) and time.time() < deadline:
            assert process.poll() is None, "the run ended before pretrain saved a checkpoint"
            time.sleep(0.2)
    finally:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    assert not (run_dir / "pretrain/manifest.json").exists()  # killed mid-stage

    again = run_cli("run", str(pipeline), timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert plan_lines(again) == {"tokenizer": "skip", "pretrain": "resume", "eval_pretrain": "run"}
    metrics = json.loads((run_dir / "pretrain/manifest.json").read_text())["metrics"]
    assert metrics["resumed_from_step"] and metrics["resumed_from_step"] < 200 and metrics["steps"] == 200


def test_bad_pipeline_files_fail_before_anything_runs(tmp_path, small_corpus):
    sft = str(REPO / "configs/tiny/sft.yaml")
    bad_ref = write_pipeline(tmp_path, small_corpus, extra_stage={
        "name": "sft", "config": sft, "set": {"init_from": "stage:pretrian"}})  # fmt: skip
    result = run_cli("run", str(bad_ref))
    assert result.returncode == 2
    assert "stage 'sft': set.init_from: 'stage:pretrian' names no earlier stage" in result.stderr
    assert not (tmp_path / "runs").exists()  # nothing ran, not even the tokenizer

    bad_key = write_pipeline(tmp_path, small_corpus, extra_stage={"name": "sft", "config": sft,
                                                                  "set": {"train.lrr": 1}})  # fmt: skip
    result = run_cli("run", str(bad_key), "--dry-run")
    assert result.returncode == 2 and "stage 'sft'" in result.stderr and "train.lrr" in result.stderr

    unknown = write_pipeline(tmp_path, small_corpus, extra_stage={"name": "annotate", "config": None})
    result = run_cli("run", str(unknown))
    assert result.returncode == 2 and "stage 'annotate' is not one of" in result.stderr

    pipeline = write_pipeline(tmp_path, small_corpus)
    result = run_cli("run", str(pipeline), "--stages", "eval_pretrain")
    assert result.returncode == 2 and "reads pretrain, which is not finished" in result.stderr
    result = run_cli("run", str(pipeline), "--from", "sft")
    assert result.returncode == 2 and "--from 'sft': no such stage" in result.stderr
    assert not (tmp_path / "runs").exists()
    assert run_cli("run", str(tmp_path / "missing.yaml")).returncode == 2


def test_tiny_and_real_pipeline_files_plan_offline():
    """The shipped pipeline files load, every stage config validates, and --dry-run prints commands without
    downloading anything (hub names are only names until a stage runs). --force: a finished `make demo` in runs/
    would otherwise plan every tiny stage as a skip, with no command to show."""
    for path in sorted((REPO / "configs").glob("*/pipeline.yaml")):
        result = run_cli("run", str(path.relative_to(REPO)), "--dry-run", "--force")
        assert result.returncode == 0, f"{path}: {result.stderr[-2000:]}"
        assert "pipeline.cli" in result.stdout


def test_a_reference_names_a_file_in_an_earlier_stage_inside_a_list(tmp_path):
    """`data.path: [fixed.jsonl, "stage:pairs/pairs.jsonl"]`: resolved, recorded as a dependency, and not checked
    for existence before the run (the pairs stage writes it); a missing file elsewhere is still refused."""
    from pipeline.config import UserError
    from pipeline.orchestrate import load_pipeline

    fixed = str(REPO / "data/demo/preference.jsonl")

    def pipeline(paths: list[str]) -> Path:
        stages = [
            {"name": "pairs", "config": str(REPO / "configs/tiny/pairs.yaml"),
             "set": {"model": "some/model", "data.path": fixed}},
            {"name": "reward", "config": str(REPO / "configs/tiny/reward.yaml"),
             "set": {"init_from": "some/model", "data.path": paths}},
        ]  # fmt: skip
        path = tmp_path / "p.yaml"
        path.write_text(yaml.safe_dump({"name": "t", "runs_dir": str(tmp_path / "runs"), "stages": stages}))
        return path

    reward = load_pipeline(pipeline([fixed, "stage:pairs/pairs.jsonl"])).stages[1]
    assert reward.needs == ["pairs"]
    assert reward.cfg.data.path == [fixed, str(tmp_path / "runs/t/pairs/pairs.jsonl")]
    try:
        load_pipeline(pipeline([str(tmp_path / "missing.jsonl"), "stage:pairs/pairs.jsonl"]))
        raise AssertionError("a missing data file was not refused")
    except UserError as exc:
        assert "missing.jsonl" in str(exc) and "pairs.jsonl" not in str(exc), str(exc)
    try:
        load_pipeline(pipeline([fixed, "stage:pairz/pairs.jsonl"]))
        raise AssertionError("a reference to no stage was not refused")
    except UserError as exc:
        assert "'stage:pairz/pairs.jsonl' names no earlier stage" in str(exc), str(exc)
