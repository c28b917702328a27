"""resume: auto in the reward and dpo stages: an interrupted run continues to the same weights as an uninterrupted
one, and checkpoints written under another config are refused with the keys that differ."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import run_cli
from test_reward import base_model  # noqa: F401  (module fixture reused)
from test_trl_distributed import manifest_metrics, pairs, stage_args, weights  # noqa: F401  (fixture reused)

# Constant lr: the schedule of a 6-step run is then the first 6 steps of a 10-step one.
SHORT = ["train.lr_scheduler=constant", "train.save_steps=3", "train.micro_batch_size=8"]


@pytest.mark.parametrize("stage", ["reward", "dpo"])
def test_interrupted_run_resumes_to_the_uninterrupted_weights(stage, tmp_path, base_model, pairs):  # noqa: F811
    whole = tmp_path / "whole"
    result = run_cli(*stage_args(stage, whole, base_model, pairs), *SHORT, "train.max_steps=10")
    assert result.returncode == 0, result.stderr[-3000:]

    resumed = tmp_path / "resumed"
    first = run_cli(*stage_args(stage, resumed, base_model, pairs), *SHORT, "train.max_steps=6")
    assert first.returncode == 0, first.stderr[-3000:]
    (resumed / "checkpoints" / "checkpoint-9").mkdir()  # died while saving: no trainer_state.json, skipped
    second = run_cli(*stage_args(stage, resumed, base_model, pairs), *SHORT, "train.max_steps=10")
    assert second.returncode == 0, second.stderr[-3000:]

    metrics = manifest_metrics(resumed)
    assert metrics["resumed_from"] == str(resumed / "checkpoints" / "checkpoint-6") and metrics["steps"] == 10
    state = json.loads((resumed / "checkpoints" / "checkpoint-10" / "trainer_state.json").read_text())
    assert [e["step"] for e in state["log_history"] if "loss" in e] == [2, 4, 6, 8, 10]  # each step once
    a, b = weights(resumed), weights(whole)
    worst = max((a[k] - b[k]).abs().max().item() for k in b)
    assert worst < 1e-5, f"resumed weights differ from the uninterrupted run by {worst:.2e}"


def test_checkpoints_of_another_config_are_refused(tmp_path, base_model, pairs):  # noqa: F811
    out = tmp_path / "reward"
    first = run_cli(*stage_args("reward", out, base_model, pairs), *SHORT, "train.max_steps=3")
    assert first.returncode == 0, first.stderr[-3000:]
    model_before = (out / "model" / "model.safetensors").read_bytes()
    changed = run_cli(*stage_args("reward", out, base_model, pairs), *SHORT, "train.max_steps=6", "train.lr=1e-4")
    assert changed.returncode == 2 and "Traceback" not in changed.stderr, changed.stderr[-2000:]
    assert "another config (train.lr: 0.003 -> 0.0001)" in changed.stderr and "resume=never" in changed.stderr
    assert (out / "manifest.json").is_file() and (out / "model" / "model.safetensors").read_bytes() == model_before
    # Starting over is one override away, and leaves no checkpoint of the old run behind.
    again = run_cli(*stage_args("reward", out, base_model, pairs), *SHORT, "train.max_steps=2", "train.lr=1e-4",
                    "resume=never")  # fmt: skip
    assert again.returncode == 0, again.stderr[-3000:]
    assert sorted(p.name for p in Path(out / "checkpoints").glob("checkpoint-*")) == ["checkpoint-2"]
    assert manifest_metrics(out)["resumed_from"] is None
