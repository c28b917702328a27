"""The tiny pipeline end to end (`llmpipe run configs/tiny/pipeline.yaml`, ~10 min on 2 CPU cores): every stage
moves its metric the right way on the demo world, the report card is written, and a second run skips everything."""

from __future__ import annotations

import json
import time

import pytest
import yaml
from conftest import REPO, run_cli


@pytest.mark.slow
def test_tiny_pipeline_moves_every_metric_and_reports(tmp_path):
    spec = yaml.safe_load((REPO / "configs/tiny/pipeline.yaml").read_text())
    spec["runs_dir"] = str(tmp_path / "runs")
    pipeline = tmp_path / "pipeline.yaml"
    pipeline.write_text(yaml.safe_dump(spec))
    run = tmp_path / "runs" / "tiny"

    result = run_cli("run", str(pipeline), timeout=40 * 60)
    assert result.returncode == 0, result.stderr[-4000:]

    def metrics(stage: str) -> dict:
        return json.loads((run / stage / "manifest.json").read_text())["metrics"]

    pretrain = metrics("pretrain")
    assert pretrain["val_loss"] < 0.5 * pretrain["val_loss_initial"]
    five, zero = metrics("eval_pretrain"), metrics("eval_pretrain_0shot")
    # the shots do not hurt the base model; they no longer help much since the mid-training mix (0.561 / 0.550 and
    # 0.328 / 0.330 for seeds 0 and 1)
    assert five["demo_qa/exact_match"] >= zero["demo_qa/exact_match"] - 0.03
    sft = metrics("sft")
    # the mid-trained base model answers some chat questions already (0.26 / 0.19 / 0.31, seeds 0 / 1 / 2); sft adds
    # 0.10-0.20
    assert sft["exact_match"] >= sft["exact_match_before"] + 0.05
    # issue 20: asked in chat, the sft model answers held-out people's questions from what pretraining stored
    # (0.135 before mid-training; 0.443 / 0.313 / 0.411 for seeds 0 / 1 / 2, bench/RESULTS.md)
    assert metrics("eval_sft")["demo_qa/exact_match"] >= 0.25
    assert metrics("reward")["heldout_pair_accuracy"] >= 0.9
    dpo = metrics("dpo")
    # held-out exact match holds (+0.003 / +0.010 / -0.010 for seeds 0 / 1 / 2 since the mid-trained sft answers
    # 0.67-0.96 of those questions: within 3 of 300 questions)
    assert dpo["exact_match"] >= dpo["exact_match_before"] - 0.02
    assert dpo["heldout_logp_margin"] > dpo["heldout_logp_margin_before"]
    pairs = metrics("pairs")
    assert pairs["pairs"] > 2000 and 0 < pairs["mean_score"] < pairs["best_of_n_mean_score"]
    ppo = metrics("ppo")
    assert ppo["heldout_after"]["reward"] > ppo["heldout_before"]["reward"]  # the reward model's score rose
    # and exact match does not fall with it: 0.960 -> 0.963, 0.673 -> 0.690, 0.813 -> 0.820 for seeds 0 / 1 / 2 with
    # the mid-trained sft and policy_lr 1e-5 (at 3e-5 seed 0 fell to 0.910; issue 20 note)
    assert ppo["heldout_after"]["exact_match"] >= ppo["heldout_before"]["exact_match"]
    assert ppo["kl_end"] < 3.0 and ppo["kl_max_seen"] < 10.0  # KL bounded: the guardrail (kl.max) never fired

    grpo = metrics("grpo")
    # the silent-failure numbers are measured and reported; held-out exact match is not asserted to rise: on this
    # demo grpo lowered it in most settings tried (issue 18 note; -0.007 / -0.033 / -0.003 for seeds 0 / 1 / 2 from
    # the mid-trained sft), and the run must not hide it
    assert 0 < grpo["zero_signal_share_mean"] < 1 and grpo["truncated_share_mean"] < 0.5
    assert grpo["heldout_before"]["exact_match"] == ppo["heldout_before"]["exact_match"]  # one held-out set, one sft
    assert grpo["heldout_after"]["exact_match"] >= grpo["heldout_before"]["exact_match"] - 0.05

    explain = metrics("explain")  # the shipped reward model falls for none of the rewrites (issue 22)
    assert explain["texts"] == 12 and explain["flagged_probes"] == [], explain["probes"]
    assert explain["gap_within_5pct"] >= 0.75

    report = (run / "report.md").read_text()
    assert "of prompt groups had equal rewards" in report and "## Reward model, explained" in report
    for stage in ("pretrain", "sft", "pairs", "reward", "dpo", "ppo", "eval_ppo", "explain", "grpo", "eval_grpo"):
        assert f"| {stage} |" in report
    for png in ("training_curves.png", "eval.png", "stage_metrics.png"):
        assert (run / png).stat().st_size > 10_000, png

    started = time.time()
    again = run_cli("run", str(pipeline))
    assert again.returncode == 0 and "=== " not in again.stdout  # every stage skipped
    assert time.time() - started < 60
