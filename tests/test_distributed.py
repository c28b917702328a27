"""Two CPU processes (gloo): plain DDP and DeepSpeed ZeRO-2/3 through launch/run.sh, checked against one process.

Each run trains the same tiny model with the same tokens per step: one process accumulates 2 micro-batches, two
processes take one each. The manifest records which samples each rank saw first and a parameter checksum per rank.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import REPO, run_cli
from safetensors.torch import load_file
from test_pretrain import tiny_args

# dropout 0: each process draws its own dropout masks, so only a deterministic model can match across layouts
EQUAL_BATCH = [
    "model.dropout=0.0",
    "train.max_steps=8",
    "train.warmup_steps=2",
    "checkpoint_every=4",
    "eval_every=4",
    "log_every=2",
    "train.tokens_per_step=256",
]  # 4 sequences x 32 tokens x 2


def launch(launch_config: str, args: list[str], timeout: int = 600) -> subprocess.CompletedProcess:
    stage, _, config, *overrides = args
    env = {**os.environ, "PYTHON": sys.executable, "PYTHONUNBUFFERED": "1"}
    return subprocess.run(
        ["bash", "launch/run.sh", stage, config, f"launch/accelerate/{launch_config}", *overrides],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.fixture(scope="module")
def one_process(tmp_path_factory, trained_tokenizer, small_corpus) -> Path:
    out = tmp_path_factory.mktemp("dist") / "one"
    result = run_cli(*tiny_args(out, trained_tokenizer, small_corpus, *EQUAL_BATCH))
    assert result.returncode == 0, result.stderr[-3000:]
    return out


def check_two_ranks_trained_as_one(out: Path, reference: Path, atol: float) -> dict:
    metrics = json.loads((out / "manifest.json").read_text())["metrics"]
    assert metrics["world_size"] == 2 and metrics["gradient_accumulation"] == 1
    rank0, rank1 = metrics["first_micro_batch_samples_by_rank"][:4], metrics["first_micro_batch_samples_by_rank"][4:]
    assert len(rank0) == len(rank1) == 4 and not set(rank0) & set(rank1), "ranks must see different data"
    reference_metrics = json.loads((reference / "manifest.json").read_text())["metrics"]
    assert sorted(rank0 + rank1) == sorted(
        reference_metrics["first_micro_batch_samples_by_rank"][:4] + _second_micro_batch(reference_metrics)
    )
    assert metrics["val_loss"] < metrics["val_loss_initial"]
    ours, theirs = load_file(out / "model" / "model.safetensors"), load_file(reference / "model" / "model.safetensors")
    for name in theirs:
        torch.testing.assert_close(ours[name], theirs[name], atol=atol, rtol=0, msg=f"{name}: 2 ranks != 1 process")
    assert abs(metrics["val_loss"] - reference_metrics["val_loss"]) < 1e-3
    return metrics


def _second_micro_batch(metrics: dict) -> list[int]:
    # The one-process run records only its first micro-batch; the second follows from the same sampler.
    from pipeline.batches import BlockSampler

    n_blocks = metrics["n_train_blocks"]
    return BlockSampler(n_blocks, seed=0, micro=4, world=1, accumulation=2).indices(0, 1, 0).tolist()


def test_two_cpu_processes_match_one_process(tmp_path, one_process, trained_tokenizer, small_corpus):
    out = tmp_path / "ddp"
    result = launch("cpu_2proc.yaml", tiny_args(out, trained_tokenizer, small_corpus, *EQUAL_BATCH))
    assert result.returncode == 0, result.stderr[-4000:]
    metrics = check_two_ranks_trained_as_one(out, one_process, atol=1e-4)
    assert metrics["distributed_type"] == "MULTI_CPU"
    checksums = metrics["param_checksum_by_rank"]
    assert len(checksums) == 2 and checksums[0] == checksums[1], "parameters must stay identical across ranks"


@pytest.mark.slow
@pytest.mark.parametrize("launch_config", ["cpu_2proc_zero2.yaml", "cpu_2proc_zero3.yaml"])
def test_deepspeed_zero_on_two_cpu_processes(launch_config, tmp_path, one_process, trained_tokenizer, small_corpus):
    out = tmp_path / launch_config.removesuffix(".yaml")
    result = launch(launch_config, tiny_args(out, trained_tokenizer, small_corpus, *EQUAL_BATCH), timeout=900)
    assert result.returncode == 0, result.stderr[-4000:]
    metrics = check_two_ranks_trained_as_one(out, one_process, atol=1e-4)
    assert metrics["distributed_type"] == "DEEPSPEED" and metrics["zero_stage"] == int(launch_config[-6])
    if "zero2" in launch_config:
        assert metrics["param_checksum_by_rank"][0] == metrics["param_checksum_by_rank"][1]
