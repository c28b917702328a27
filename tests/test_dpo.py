"""The DPO stage through its real entry point: the policy learns to prefer chosen answers; LoRA reference."""

from __future__ import annotations

import json

import torch
from conftest import REPO, run_cli, write_jsonl
from safetensors.torch import load_file
from test_reward import base_model, separable_pairs  # noqa: F401  (module fixture reused)

DPO_YAML = str(REPO / "configs/tiny/dpo.yaml")


def dpo_args(out, base, train, held_out, *extra) -> list[str]:
    return [
        "dpo",
        "--config",
        DPO_YAML,
        f"output_dir={out}",
        f"init_from={base}",
        f"data.path={train}",
        f"eval_data.path={held_out}",
        "train.max_steps=20",
        "train.micro_batch_size=16",
        "train.lr=3e-3",
        "loss_type=[sigmoid]",
        "train.save_steps=10",
        *extra,
    ]


def test_dpo_raises_the_heldout_margin_full_and_lora(tmp_path, base_model):  # noqa: F811
    from transformers import AutoModelForCausalLM, AutoTokenizer

    train = write_jsonl(tmp_path / "train.jsonl", separable_pairs(320, 0, True))
    held_out = write_jsonl(tmp_path / "held_out.jsonl", separable_pairs(48, 1, True))
    for mode, extra in {"full": [], "lora": ["lora.enabled=true", "lora.r=8", "train.lr=1e-2"]}.items():
        out = tmp_path / mode
        result = run_cli(*dpo_args(out, base_model, train, held_out, *extra))
        assert result.returncode == 0, result.stderr[-3000:]
        metrics = json.loads((out / "manifest.json").read_text())["metrics"]
        assert metrics["heldout_logp_margin"] > metrics["heldout_logp_margin_before"] + 1.0, (mode, metrics)
        assert metrics["heldout_reward_accuracy"] >= 0.9, (mode, metrics)
        model = AutoModelForCausalLM.from_pretrained(out / "model")  # merged: no peft needed to load
        tokenizer = AutoTokenizer.from_pretrained(out / "model")
        prompt = tokenizer.apply_chat_template(separable_pairs(1, 5, True)[0]["prompt"], add_generation_prompt=True,
                                               return_tensors="pt", return_dict=True)  # fmt: skip
        generated = model.generate(**prompt, max_new_tokens=4, do_sample=False)
        assert generated.shape[1] > prompt["input_ids"].shape[1], mode
        assert not any("lora" in name for name in load_file(out / "model" / "model.safetensors"))
        before = load_file(base_model / "model" / "model.safetensors")
        after = model.state_dict()
        assert any(not torch.equal(before[k], after[k]) for k in before if k in after), mode


def test_unknown_loss_type_is_a_config_error(tmp_path, base_model):  # noqa: F811
    result = run_cli(*dpo_args(tmp_path / "o", base_model, "x.jsonl", "x.jsonl", "loss_type=[sigmod]"))
    assert result.returncode == 2 and "loss_type: unknown ['sigmod']" in result.stderr


def test_dpo_reads_the_h4_ultrafeedback_layout(tmp_path, base_model):  # noqa: F811
    """`prompt` a string, chosen/rejected whole conversations repeating it, extra columns: trains as it comes."""
    rows = []
    for row in separable_pairs(64, 2, True):
        user = row["prompt"]
        rows.append({"prompt": user[0]["content"], "chosen": user + row["chosen"], "rejected": user + row["rejected"],
                     "messages": user + row["chosen"], "score_chosen": 8.0, "score_rejected": 3.0})  # fmt: skip
    data = write_jsonl(tmp_path / "h4.jsonl", rows)
    out = tmp_path / "dpo"
    result = run_cli(*dpo_args(out, base_model, data, data, "train.max_steps=4", "train.save_steps=4"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads((out / "manifest.json").read_text())["metrics"]["steps"] == 4
