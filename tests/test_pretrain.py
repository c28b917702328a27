"""The pretrain stage through its real entry point: learning, a loadable model, exact resume after SIGKILL."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import REPO, run_cli, write_jsonl
from safetensors.torch import load_file

from pipeline.batches import BlockSampler
from pipeline.config import DataConfig, UserError
from pipeline.formats import load_documents
from pipeline.stages.pretrain import TrainConfig, learning_rate

PRETRAIN_YAML = str(REPO / "configs/tiny/pretrain.yaml")


def tiny_args(out: Path, tokenizer: Path, corpus: Path, *extra: str) -> list[str]:
    """A ~60k-parameter model with dropout on (so resume must restore the RNG), 1 tokenizer worker."""
    return [
        "pretrain",
        "--config",
        PRETRAIN_YAML,
        f"output_dir={out}",
        f"tokenizer={tokenizer}",
        f"data.path={corpus}",
        "data.mix=null",  # the tiny config's mid-training mix names two sources
        "model.hidden_size=32",
        "model.num_layers=2",
        "model.num_heads=2",
        "model.max_seq_len=64",
        "model.dropout=0.1",
        "seq_len=32",
        "train.micro_batch_size=4",
        "train.max_steps=24",
        "train.warmup_steps=4",
        "train.lr=3e-3",
        "eval_every=12",
        "eval_batches=4",
        "checkpoint_every=4",
        "log_every=4",
        "num_proc=1",
        "validation_fraction=0.05",
        *extra,
    ]


def weights(out: Path) -> dict[str, torch.Tensor]:
    return load_file(out / "model" / "model.safetensors")


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory, trained_tokenizer, small_corpus) -> Path:
    out = tmp_path_factory.mktemp("pretrain") / "run"
    result = run_cli(*tiny_args(out, trained_tokenizer, small_corpus))
    assert result.returncode == 0, result.stderr[-3000:]
    return out


def test_trains_and_saves_a_model_that_loads_and_generates(pretrained):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    manifest = json.loads((pretrained / "manifest.json").read_text())
    metrics = manifest["metrics"]
    assert metrics["val_loss"] < metrics["val_loss_initial"] - 1.0, metrics
    assert metrics["steps"] == 24 and metrics["tokens"] == 24 * 4 * 32
    assert metrics["tokens_per_second"] > 0 and 0 < metrics["mfu"] < 1
    model = AutoModelForCausalLM.from_pretrained(pretrained / "model")
    tokenizer = AutoTokenizer.from_pretrained(pretrained / "model")
    assert model.config.vocab_size == len(tokenizer) and not model.training
    prompt = tokenizer("the cat", return_tensors="pt")
    generated = model.generate(**prompt, max_new_tokens=8, do_sample=False)
    assert generated.shape[1] > prompt["input_ids"].shape[1]
    lines = [json.loads(line) for line in (pretrained / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines if "loss" in r] == [4, 8, 12, 16, 20, 24]
    assert all(np.isfinite(r["grad_norm"]) and r["lr"] > 0 for r in lines if "loss" in r)
    checkpoints = sorted(p.name for p in (pretrained / "checkpoints").iterdir())
    assert checkpoints == ["step_0000020", "step_0000024"]  # keep_checkpoints: 2


def test_sigkill_then_resume_ends_bitwise_identical(tmp_path, pretrained, trained_tokenizer, small_corpus):
    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "pipeline.cli", *tiny_args(out, trained_tokenizer, small_corpus)]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    # Killed mid-run, right after its second checkpoint appears (by one rename, so it is complete): 16 steps and
    # four checkpoints remain, ~0.3 s on a quiet machine. A fixed wait after it (0.3 s here before) could outlast
    # the run and fail the test on a fast machine.
    while not (out / "checkpoints" / "step_0000008").exists():
        assert proc.poll() is None and time.time() < deadline, "run ended before it could be killed"
        time.sleep(0.005)
    assert proc.poll() is None, "run ended before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "manifest.json").exists()  # an interrupted stage never looks finished
    assert not (out / "model").exists()
    resumed = run_cli(*tiny_args(out, trained_tokenizer, small_corpus))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["metrics"]["resumed_from_step"] >= 8
    reference, result = weights(pretrained), weights(out)
    assert reference.keys() == result.keys()
    for name in reference:
        assert torch.equal(reference[name], result[name]), f"{name} differs after resume"
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    train_steps = [
        json.loads(line)["step"]
        for line in (out / "metrics.jsonl").read_text().splitlines()
        if "loss" in json.loads(line)
    ]
    assert train_steps == [4, 8, 12, 16, 20, 24]  # each step logged once, none lost to the kill
    assert steps.count(0) == 1


def test_non_finite_loss_stops_clearly_and_keeps_the_last_good_checkpoint(tmp_path, trained_tokenizer, small_corpus):
    out = tmp_path / "diverged"
    result = run_cli(
        *tiny_args(
            out,
            trained_tokenizer,
            small_corpus,
            "train.lr=1e30",
            "train.warmup_steps=0",
            "train.schedule=constant",
            "checkpoint_every=1",
            "train.grad_clip=0",
        )
    )
    assert result.returncode == 1
    assert "non-finite training signal" in result.stderr and "Traceback" not in result.stderr
    assert not (out / "manifest.json").exists() and not (out / "model").exists()
    kept = sorted((out / "checkpoints").glob("step_*"))
    assert kept, "the checkpoint before the divergence must be kept"
    state = torch.load(kept[-1] / "optimizer.bin", weights_only=False)
    assert state["state"], "checkpoint is loadable"
    assert all(torch.isfinite(t).all() for t in load_file(kept[-1] / "model.safetensors").values() if t.numel())


def test_batch_arithmetic_error_is_reported_before_training(tmp_path, trained_tokenizer, small_corpus):
    result = run_cli(*tiny_args(tmp_path / "o", trained_tokenizer, small_corpus, "train.tokens_per_step=100"))
    assert result.returncode == 2
    assert "tokens_per_step 100 must be a multiple of" in result.stderr and "4 x 32 x 1 = 128" in result.stderr
    assert not (tmp_path / "o").exists()


def test_unfinished_tokenizer_folder_is_refused(tmp_path, small_corpus):
    (tmp_path / "tok").mkdir()
    result = run_cli(*tiny_args(tmp_path / "o", tmp_path / "tok", small_corpus))
    assert result.returncode == 2 and "unfinished" in result.stderr
    result = run_cli(*tiny_args(tmp_path / "o", tmp_path / "never" / "ran", small_corpus))
    assert result.returncode == 2 and "tokenizer: no such folder" in result.stderr


def test_learning_rate_schedules():
    cosine = TrainConfig(max_steps=100, warmup_steps=10, lr=1.0, min_lr_ratio=0.1)
    lrs = [learning_rate(s, cosine) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:], strict=False))
    assert lrs[-1] == pytest.approx(0.1, abs=1e-3)
    wsd = TrainConfig(max_steps=100, warmup_steps=10, lr=1.0, min_lr_ratio=0.0, schedule="wsd", decay_fraction=0.2)
    lrs = [learning_rate(s, wsd) for s in range(100)]
    assert lrs[50] == 1.0 and lrs[79] == 1.0 and lrs[80] < 1.0 and lrs[-1] == pytest.approx(0.0)


def test_sampler_splits_ranks_like_accumulation_and_covers_each_epoch():
    one = BlockSampler(50, seed=3, micro=4, world=1, accumulation=2)
    two = BlockSampler(50, seed=3, micro=4, world=2, accumulation=1)
    for step in range(30):
        a = np.concatenate([one.indices(step, m, 0) for m in range(2)])
        b = np.concatenate([two.indices(step, 0, r) for r in range(2)])
        assert a.tolist() == b.tolist()
        if step < 6:  # within an epoch no block is seen twice, whichever rank takes it
            assert not set(two.indices(step, 0, 0)) & set(two.indices(step, 0, 1))
    first_epoch = np.concatenate([one.indices(s, m, 0) for s in range(7) for m in range(2)])[:50]
    assert sorted(first_epoch.tolist()) == list(range(50))


def test_continue_from_an_artifact_and_another_family(tmp_path, pretrained, trained_tokenizer, small_corpus):
    """init_from takes a finished pretrain folder (its model/ and tokenizer); family builds Qwen2 from sizes."""
    from transformers import AutoModelForCausalLM

    out = tmp_path / "continued"
    result = run_cli(
        *tiny_args(
            out,
            trained_tokenizer,
            small_corpus,
            f"model.init_from={pretrained}",
            "tokenizer=null",
            "train.max_steps=4",
            "train.warmup_steps=1",
            "eval_every=4",
        )
    )
    assert result.returncode == 0, result.stderr[-3000:]
    before, after = weights(pretrained), weights(out)
    assert any(not torch.equal(before[k], after[k]) for k in before), "continued training changed nothing"
    manifest = json.loads((out / "manifest.json").read_text())
    assert str(pretrained) in manifest["inputs"]["init_from"]
    # continuing starts from the trained model's loss, not from scratch
    assert (
        manifest["metrics"]["val_loss_initial"]
        < json.loads((pretrained / "manifest.json").read_text())["metrics"]["val_loss_initial"] - 1.0
    )

    qwen = tmp_path / "qwen2"
    result = run_cli(
        *tiny_args(
            qwen,
            trained_tokenizer,
            small_corpus,
            "model.family=qwen2",
            "train.max_steps=4",
            "train.warmup_steps=1",
            "eval_every=4",
        )
    )
    assert result.returncode == 0, result.stderr[-3000:]
    model = AutoModelForCausalLM.from_pretrained(qwen / "model")
    assert model.config.model_type == "qwen2"


def test_continue_a_gpt2_model_at_its_own_context_length(tmp_path, trained_tokenizer, small_corpus):
    """Any causal LM folder works as init_from; seq_len defaults to its context and may not exceed it."""
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    tokenizer = AutoTokenizer.from_pretrained(trained_tokenizer / "tokenizer")
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), n_embd=32, n_layer=2, n_head=2, n_positions=48))
    gpt2.save_pretrained(tmp_path / "gpt2")
    tokenizer.save_pretrained(tmp_path / "gpt2")
    args = tiny_args(
        tmp_path / "out",
        trained_tokenizer,
        small_corpus,
        f"model.init_from={tmp_path / 'gpt2'}",
        "tokenizer=null",
        "seq_len=null",
        "train.max_steps=4",
        "train.warmup_steps=1",
        "eval_every=4",
    )
    result = run_cli(*args)
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((tmp_path / "out" / "manifest.json").read_text())["metrics"]
    assert metrics["tokens_per_step"] == 4 * 48  # micro-batch 4 x the model's 48-token context
    too_long = run_cli(*args, "seq_len=64", f"output_dir={tmp_path / 'other'}")
    assert too_long.returncode == 2 and "exceeds the context length 48" in too_long.stderr


def test_streaming_data_trains_and_resumes_exactly(tmp_path, trained_tokenizer, small_corpus):
    """data.streaming packs on the fly; a resumed streaming run skips exactly the blocks already trained on."""
    common = [
        "data.streaming=true",
        "train.schedule=constant",
        "train.warmup_steps=0",
        "checkpoint_every=3",
        "eval_every=3",
        "model.dropout=0.0",
    ]
    whole, split = tmp_path / "whole", tmp_path / "split"
    assert run_cli(*tiny_args(whole, trained_tokenizer, small_corpus, *common, "train.max_steps=6")).returncode == 0
    first = run_cli(*tiny_args(split, trained_tokenizer, small_corpus, *common, "train.max_steps=3"))
    assert first.returncode == 0, first.stderr[-3000:]
    second = run_cli(*tiny_args(split, trained_tokenizer, small_corpus, *common, "train.max_steps=6"))
    assert second.returncode == 0 and "resumed from" in second.stderr, second.stderr[-3000:]
    reference, result = weights(whole), weights(split)
    assert all(torch.equal(reference[k], result[k]) for k in reference)


def test_matmul_peak_is_the_best_this_machine_measured_and_mfu_stays_at_most_one(tmp_path, monkeypatch):
    """A peak measured while the machine was busy (low) must not stand: the best measurement so far is kept per
    machine in llmpipe's cache, so a fresh run cannot report MFU above 100% (seen: 101.4% in `make demo`)."""
    from pipeline import modeling

    monkeypatch.setenv("LLMPIPE_CACHE", str(tmp_path))
    cpu = torch.device("cpu")
    monkeypatch.setattr(modeling, "measure_matmul_flops", lambda device: 4.0e10)
    assert modeling.peak_flops(cpu)[0] == 4.0e10
    monkeypatch.setattr(modeling, "measure_matmul_flops", lambda device: 1.0e10)  # busy now: measured low
    assert modeling.peak_flops(cpu)[0] == 4.0e10
    assert modeling.best_measured_flops("other machine", 1.0e10) == 1.0e10  # kept per machine
    (tmp_path / "peak_flops.json").write_text("not json")  # a damaged cache is measured afresh
    assert modeling.peak_flops(cpu)[0] == 1.0e10
    assert modeling.utilisation(1000.0, 6e6, 4.0e9, 1) == 1.0  # 6e9 achieved > 4e9 peak: capped
    assert modeling.utilisation(100.0, 6e6, 4.0e9, 2) == pytest.approx(0.075)


def test_chat_sources_in_the_mix_are_rendered_by_the_chat_template(tmp_path, trained_tokenizer, small_corpus):
    """Mid-training: plain text and chats in one mixture. The chats reach the packed blocks as the chat template
    renders them (role and end-of-turn tokens included); a source with neither column, or chats with a tokenizer
    that has no template, are refused before any training, naming the source."""
    from transformers import AutoTokenizer

    chats = write_jsonl(tmp_path / "chats.jsonl", [
        {"messages": [{"role": "user", "content": f"What is {i} plus one?"},
                      {"role": "assistant", "content": str(i + 1)}]} for i in range(30)
    ])  # fmt: skip
    tokenizer = AutoTokenizer.from_pretrained(trained_tokenizer / "tokenizer")
    docs = load_documents(DataConfig(path=[str(small_corpus), str(chats)], mix=[1.0, 60]), tokenizer)
    rendered = [t for t in docs["text"] if "plus one" in t]
    assert len(rendered) == 60 and len(docs) == 60 + sum(1 for _ in open(small_corpus))
    assert rendered[0] == tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is 0 plus one?"}, {"role": "assistant", "content": "1"}], tokenize=False
    )
    end = tokenizer.convert_tokens_to_ids("<|end|>")
    ids = tokenizer(rendered[0], add_special_tokens=False)["input_ids"]
    assert end in ids  # the special tokens survive as tokens, not as their characters

    out = tmp_path / "mid"
    result = run_cli(*tiny_args(out, trained_tokenizer, small_corpus, f"data.path=[{small_corpus},{chats}]",
                                "data.mix=[1.0,60]", "train.max_steps=6", "checkpoint_every=100"))  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert "chats.jsonl: 60 of 30 rows" in result.stdout + result.stderr

    odd = write_jsonl(tmp_path / "odd.jsonl", [{"body": "words"}] * 3)
    result = run_cli(*tiny_args(tmp_path / "bad", trained_tokenizer, small_corpus, f"data.path=[{small_corpus},{odd}]",
                                "data.mix=[1.0,1.0]"))  # fmt: skip
    assert result.returncode != 0 and "odd.jsonl has neither a 'text' column nor chat 'messages'" in result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "bad" / "checkpoints").exists()
    tokenizer.chat_template = None
    with pytest.raises(UserError, match="chats.jsonl holds chats .* no chat template"):
        load_documents(DataConfig(path=str(chats)), tokenizer)
