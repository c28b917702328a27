"""The SFT stage through its real entry point: answer-only loss masks, learning, LoRA, another family, bad rows,
resume. Tiny models (a pretrain artifact of ~60k parameters and a Qwen2 built from a config) on demo data slices."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import REPO, run_cli, save_tiny_model, write_jsonl
from safetensors.torch import load_file
from test_pretrain import tiny_args

from pipeline.config import load_config
from pipeline.stages.sft import SFTStageConfig, build_trainer, load_sft_rows, trained_text

SFT_YAML = str(REPO / "configs/tiny/sft.yaml")
SFT_DATA = str(REPO / "data/demo/sft.jsonl")
EVAL_DATA = str(REPO / "data/demo/eval.jsonl")


@pytest.fixture(scope="module")
def base_model(tmp_path_factory, trained_tokenizer, small_corpus) -> Path:
    """A finished pretrain stage folder (8 steps): sft must map it to its model/ subfolder."""
    out = tmp_path_factory.mktemp("sft_base") / "pretrain"
    result = run_cli(*tiny_args(out, trained_tokenizer, small_corpus, "train.max_steps=8", "eval_every=8"))
    assert result.returncode == 0, result.stderr[-3000:]
    return out


@pytest.fixture(scope="module")
def qwen2_model(tmp_path_factory, trained_tokenizer) -> Path:
    """A tiny Qwen2 (another family, with attention biases) built from a config with our chat tokenizer."""
    from transformers import Qwen2Config

    return save_tiny_model(
        tmp_path_factory.mktemp("qwen2") / "model", trained_tokenizer, Qwen2Config, hidden_size=32,
        intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
        max_position_embeddings=128, tie_word_embeddings=True,
    )  # fmt: skip


def sft_args(out: Path, init_from: Path, *extra: str) -> list[str]:
    """~25 steps on 320 demo conversations; exact match on 16 held-out questions."""
    return [
        "sft", "--config", SFT_YAML, f"output_dir={out}", f"init_from={init_from}", f"data.path={SFT_DATA}",
        "data.max_examples=320", f"generation_eval.path={EVAL_DATA}", "generation_eval_max=16", "max_new_tokens=6",
        "max_length=96", "train.max_steps=25", "train.micro_batch_size=16", "train.lr=3e-3", "train.logging_steps=5",
        "train.save_steps=25", *extra,
    ]  # fmt: skip


def manifest_metrics(out: Path) -> dict:
    return json.loads((out / "manifest.json").read_text())["metrics"]


def logged(out: Path, key: str = "loss") -> list[tuple[int, float]]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r[key]) for r in rows if key in r]


# --- the loss mask ------------------------------------------------------------------------------------------------


def test_loss_mask_trains_exactly_the_answers(tmp_path, base_model):
    """Through the stage's own row check and trainer: only assistant turns (with their end-of-turn token) carry
    loss in conversations, only the completion (+ EOS) in prompt-completion rows."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir = base_model / "model"
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    conversation = [
        {"role": "system", "content": "Answer briefly."},
        {"role": "user", "content": "Where does Razul live?"},
        {"role": "assistant", "content": "Dunhallow"},
        {"role": "user", "content": "And his pet?"},
        {"role": "assistant", "content": "a heron"},
    ]
    cases = {
        # the template's space before a reply is the reply's: the answer's first word is the token running text has
        "messages": ([{"messages": conversation}], [" Dunhallow<|end|>", " a heron<|end|>"]),
        "prompt-completion": ([{"prompt": "2 + 3 =", "completion": " 5"}], [" 5<|eos|>"]),
    }
    for fmt, (rows, expected) in cases.items():
        data = write_jsonl(tmp_path / f"{fmt}.jsonl", rows)
        cfg = load_config(SFTStageConfig, SFT_YAML, [f"output_dir={tmp_path / fmt}", f"init_from={base_model}",
                                                     f"data.path={data}", "eval_fraction=0"])  # fmt: skip
        ds, detected, _, _ = load_sft_rows(cfg.data)
        assert detected == fmt
        trainer = build_trainer(cfg, AutoModelForCausalLM.from_pretrained(model_dir), tokenizer, ds, None, detected)
        row = trainer.train_dataset[0]
        assert trained_text(tokenizer, row["input_ids"], row["labels"]) == expected, fmt
        # Everything else is context: the full rendering still holds the system and user turns.
        assert "Answer briefly." in tokenizer.decode(row["input_ids"]) or fmt != "messages"


# Real chat templates have no {% generation %} markers; written here as they ship (SmolLM2's ChatML, Llama 3,
# Qwen2.5 with its default system turn).
CHATML = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\\n"
    "You are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
LLAMA3 = (
    "{{- bos_token }}{%- for message in messages %}{{- '<|start_header_id|>' + message['role'] + "
    "'<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' }}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}"
)
QWEN25 = (
    "{%- if messages[0]['role'] == 'system' %}{{- '<|im_start|>system\\n' + messages[0]['content'] + "
    "'<|im_end|>\\n' }}{%- else %}{{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a "
    "helpful assistant.<|im_end|>\\n' }}{%- endif %}{%- for message in messages %}{%- if not (message.role == "
    "'system' and loop.first) %}{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + "
    "'\\n' }}{%- endif %}{%- endfor %}{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
TEMPLATE_TOKENS = ["<|im_start|>", "<|im_end|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]


def test_answer_only_loss_on_chat_templates_without_generation_markers(tmp_path, base_model):
    """Through the stage's trainer, with default assistant_only_loss: the tokens that carry loss decode to exactly
    each assistant reply and its end-of-turn token, for templates without markers; on our own template (which has
    them) pipeline.chat finds the same tokens as trl's markers."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pipeline.chat import assistant_token_mask

    model_dir = base_model / "model"
    conversation = [{"role": "user", "content": "Capital of France?"}, {"role": "assistant", "content": "Paris."},
                    {"role": "user", "content": "Italy?"}, {"role": "assistant", "content": "Rome."}]  # fmt: skip
    ours = AutoTokenizer.from_pretrained(model_dir)
    marked = ours.apply_chat_template(conversation, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    assert assistant_token_mask(ours, conversation) == {k: marked[k] for k in ("input_ids", "assistant_masks")}
    data = write_jsonl(tmp_path / "chat.jsonl", [{"messages": conversation}])
    cfg = load_config(SFTStageConfig, SFT_YAML, [f"output_dir={tmp_path / 'o'}", f"init_from={base_model}",
                                                 f"data.path={data}", "eval_fraction=0"])  # fmt: skip
    ds, fmt, _, _ = load_sft_rows(cfg.data)
    for template, stop in ((CHATML, "<|im_end|>"), (LLAMA3, "<|eot_id|>"), (QWEN25, "<|im_end|>")):
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        tokenizer.add_special_tokens({"additional_special_tokens": TEMPLATE_TOKENS})
        tokenizer.chat_template = template
        model = AutoModelForCausalLM.from_pretrained(model_dir)
        model.resize_token_embeddings(len(tokenizer))
        row = build_trainer(cfg, model, tokenizer, ds, None, fmt).train_dataset[0]
        assert trained_text(tokenizer, row["input_ids"], row["labels"]) == [f"Paris.{stop}", f"Rome.{stop}"], stop
        assert (
            row["input_ids"]
            == tokenizer.apply_chat_template(conversation, tokenize=True, return_dict=True)["input_ids"]
        )


def test_sft_trains_answers_only_with_a_chatml_tokenizer(tmp_path, base_model):
    """The stage end to end with a tokenizer whose template has no markers (SmolLM2's ChatML): it trains, on the
    answers only, with the default assistant_only_loss."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base_model / "model")
    tokenizer.add_special_tokens({"additional_special_tokens": TEMPLATE_TOKENS})
    tokenizer.chat_template = CHATML
    tokenizer.save_pretrained(tmp_path / "chatml")
    out = tmp_path / "sft"
    result = run_cli(*sft_args(out, base_model, f"tokenizer={tmp_path / 'chatml'}", "train.max_steps=6",
                               "train.save_steps=6"))  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    trained = result.stderr.split("row 0 trains on ")[1].splitlines()[0]
    assert trained.endswith("<|im_end|>']") and "<|im_start|>" not in trained, trained
    assert manifest_metrics(out)["steps"] == 6


def test_a_mixture_replays_plain_text_on_every_token(tmp_path, base_model):
    """data.mix with a conversation source and a plain-text source: the conversations train on their answers, the
    text rows (a count of them, drawn the same every time) on every token with EOS at the end; the stage runs on
    such a mixture. Text mixes only with conversations, and the weights must match the sources: refused, named."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir = base_model / "model"
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    chats = write_jsonl(tmp_path / "chats.jsonl", [GOOD] * 8)
    lines = [f"Razul{i} lives in Dunhallow and keeps a heron." for i in range(5)]
    text = write_jsonl(tmp_path / "corpus.jsonl", [{"text": line} for line in lines])
    mixed = [f"data.path=[{chats},{text}]", "data.mix=[1.0,3]", "eval_fraction=0"]
    cfg = load_config(SFTStageConfig, SFT_YAML, [f"output_dir={tmp_path / 'o'}", f"init_from={base_model}", *mixed])
    ds, fmt, conversational, replay = load_sft_rows(cfg.data)
    assert (fmt, conversational, len(ds), len(replay)) == ("messages", True, 8, 3)
    assert load_sft_rows(cfg.data)[3]["text"] == replay["text"], "the same rows every time"
    rows = build_trainer(cfg, AutoModelForCausalLM.from_pretrained(model_dir), tokenizer, ds, None, fmt,
                         replay).train_dataset  # fmt: skip
    trained = [trained_text(tokenizer, row["input_ids"], row["labels"]) for row in rows]
    answer = GOOD["messages"][-1]["content"]
    assert trained[:8] == [[f" {answer}<|end|>"]] * 8, trained[0]
    assert sorted(t[0] for t in trained[8:]) == sorted(f"{line}<|eos|>" for line in replay["text"]), trained[8:]
    out = tmp_path / "sft"
    result = run_cli(*sft_args(out, base_model, *mixed, "data.max_examples=null", "train.max_steps=4",
                               "train.save_steps=4", "generation_eval=null"))  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert manifest_metrics(out)["replay_samples"] == 3 and "and 3 of plain text (replay)" in result.stderr
    pairs = write_jsonl(tmp_path / "pc.jsonl", [{"prompt": "2 + 3 =", "completion": " 5"}])
    refused = run_cli(*sft_args(tmp_path / "no", base_model, f"data.path=[{pairs},{text}]", "data.mix=[1.0,3]"))
    assert refused.returncode == 2 and "plain-text sources mix only with `messages`" in refused.stderr, refused.stderr
    refused = run_cli(*sft_args(tmp_path / "no", base_model, f"data.path=[{chats},{pairs}]", "data.mix=[1.0,1.0]"))
    assert refused.returncode == 2 and "the sources are in different formats" in refused.stderr, refused.stderr
    refused = run_cli(*sft_args(tmp_path / "no", base_model, f"data.path=[{chats},{text}]", "data.mix=[1.0]"))
    assert refused.returncode == 2 and "data.mix: 1 weight(s) for 2 path(s)" in refused.stderr, refused.stderr
    assert not (tmp_path / "no").exists()


def test_sharegpt_and_alpaca_files_train_their_answers(tmp_path, base_model):
    """Files as published in the ShareGPT and Alpaca layouts, mixed: each row trains on its assistant turns only
    (both of a two-turn ShareGPT chat, the Alpaca output), the stage runs on them, and a ShareGPT turn from a tool
    is refused, named with its row, before the output folder exists."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir = base_model / "model"
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    turns = [{"from": "human", "value": "Where does Razul live?"}, {"from": "gpt", "value": "Dunhallow"},
             {"from": "human", "value": "And his pet?"}, {"from": "gpt", "value": "a heron"}]  # fmt: skip
    sharegpt = write_jsonl(tmp_path / "sharegpt.jsonl", [{"conversations": turns, "system": "Answer briefly."}] * 6)
    alpaca = write_jsonl(tmp_path / "alpaca.jsonl", [{"instruction": "Add.", "input": "2 and 3", "output": "5"}] * 6)
    mixed = [f"data.path=[{sharegpt},{alpaca}]", "data.mix=[1.0,1.0]", "eval_fraction=0"]
    cfg = load_config(SFTStageConfig, SFT_YAML, [f"output_dir={tmp_path / 'o'}", f"init_from={base_model}", *mixed])
    ds, fmt, _, _ = load_sft_rows(cfg.data)
    assert fmt == "messages" and len(ds) == 12
    rows = build_trainer(cfg, AutoModelForCausalLM.from_pretrained(model_dir), tokenizer, ds, None, fmt).train_dataset
    trained = [trained_text(tokenizer, row["input_ids"], row["labels"]) for row in rows]
    assert trained[0] == [" Dunhallow<|end|>", " a heron<|end|>"] and trained[6] == [" 5<|end|>"], trained
    assert "Answer briefly." in tokenizer.decode(rows[0]["input_ids"])
    assert "Add.\n\n2 and 3" in tokenizer.decode(rows[6]["input_ids"])
    out = tmp_path / "sft"
    result = run_cli(*sft_args(out, base_model, *mixed, "data.max_examples=null", "train.max_steps=4",
                               "train.save_steps=4", "generation_eval=null"))  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert (out / "model" / "model.safetensors").exists()
    tool = write_jsonl(
        tmp_path / "tool.jsonl", [{"conversations": [*turns[:1], {"from": "observation", "value": "{}"}]}]
    )
    refused = run_cli(*sft_args(tmp_path / "no", base_model, f"data.path={tool}"))
    assert refused.returncode == 2 and "tool.jsonl: row 0: 'conversations': turn 1 is from 'observation'" in (
        refused.stderr), refused.stderr[-2000:]  # fmt: skip
    assert not (tmp_path / "no").exists()


# --- end to end ---------------------------------------------------------------------------------------------------


def test_sft_learns_and_saves_a_model_that_loads_and_generates(tmp_path, base_model):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "sft"
    result = run_cli(*sft_args(out, base_model))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "row 0 trains on ['" in result.stderr and "<|end|>']" in result.stderr
    metrics = manifest_metrics(out)
    losses = [loss for _, loss in logged(out)]
    assert losses[-1] < losses[0] - 0.5, losses
    assert metrics["eval_loss"] < metrics["eval_loss_before"] - 0.5, metrics
    assert metrics["steps"] == 25 and metrics["train_samples"] == 304 and metrics["eval_samples"] == 16
    assert metrics["exact_match_before"] is not None and 0 <= metrics["exact_match"] <= 1
    assert metrics["generation_eval_rows"] == 16 and len(metrics["generation_examples"]) == 3
    assert metrics["trainable_params"] == metrics["total_params"] > 0 and metrics["data_format"] == "messages"

    model = AutoModelForCausalLM.from_pretrained(out / "model")
    tokenizer = AutoTokenizer.from_pretrained(out / "model")
    question = [{"role": "user", "content": "Compute 22 - 4."}]
    prompt = tokenizer.apply_chat_template(question, add_generation_prompt=True, return_dict=True, return_tensors="pt")
    generated = model.generate(**prompt, max_new_tokens=4)
    assert generated.shape[1] > prompt["input_ids"].shape[1]
    assert tokenizer.convert_tokens_to_ids("<|end|>") in model.generation_config.eos_token_id


def test_lora_merged_model_loads_without_peft(tmp_path, base_model):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "lora"
    lora = ["lora.enabled=true", "lora.r=4", "train.lr=1e-2", "train.max_steps=10"]
    result = run_cli(*sft_args(out, base_model, *lora))
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = manifest_metrics(out)
    assert 0 < metrics["trainable_params"] < metrics["total_params"] / 2 and metrics["lora_merged"], metrics
    assert metrics["eval_loss"] < metrics["eval_loss_before"], metrics
    saved = load_file(out / "model" / "model.safetensors")
    assert not any("lora" in name for name in saved)
    before = load_file(base_model / "model" / "model.safetensors")
    assert any(not torch.equal(before[k], saved[k]) for k in before if "proj" in k)
    AutoModelForCausalLM.from_pretrained(out / "model")


def test_qwen2_prompt_completion_with_unmerged_lora(tmp_path, qwen2_model):
    """Another family and another data format; `merge: false` leaves a peft adapter folder."""
    from peft import AutoPeftModelForCausalLM

    rows = [{"prompt": [{"role": "user", "content": f"What is {a} + 1?"}],
             "completion": [{"role": "assistant", "content": str(a + 1)}]} for a in range(200)]  # fmt: skip
    data = write_jsonl(tmp_path / "pc.jsonl", rows)
    out = tmp_path / "qwen2"
    result = run_cli(*sft_args(out, qwen2_model, f"data.path={data}", "lora.enabled=true", "lora.merge=false",
                               "train.lr=1e-2", "train.max_steps=10"))  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = manifest_metrics(out)
    assert metrics["data_format"] == "prompt-completion" and not metrics["lora_merged"]
    adapter = json.loads((out / "model" / "adapter_config.json").read_text())
    # 'all-linear' found every attention and MLP projection of Qwen2 (and not the output head).
    projections = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert {name.rsplit(".", 1)[-1] for name in adapter["target_modules"]} == projections
    model = AutoPeftModelForCausalLM.from_pretrained(out / "model")
    assert model.base_model.model.config.model_type == "qwen2"


# --- bad input ----------------------------------------------------------------------------------------------------

GOOD = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]}


@pytest.mark.parametrize(
    ("bad_row", "says"),
    [
        ({"messages": []}, "'messages' must be a non-empty list of messages"),
        ({"messages": [{"role": "tool", "content": "42"}, GOOD["messages"][1]]}, "has role 'tool'"),
        ({"messages": GOOD["messages"][:1]}, "ends with a 'user' message; the last message must be the assistant's"),
        ({"messages": [{"role": "user", "content": None}, GOOD["messages"][1]]}, "is not a message with text content"),
    ],
    ids=["empty", "tool-role", "no-assistant-turn", "no-content"],
)
def test_bad_rows_are_named_before_anything_is_written(tmp_path, base_model, bad_row, says):
    data = write_jsonl(tmp_path / "bad.jsonl", [GOOD, GOOD, bad_row, GOOD])
    out = tmp_path / "out"
    result = run_cli(*sft_args(out, base_model, f"data.path={data}"))
    assert result.returncode == 2, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and errors[0].startswith(f"llmpipe sft: error: {data}:3 (row 2): "), errors
    assert says in errors[0], errors
    assert not out.exists()


def test_a_tokenizer_without_chat_template_is_refused_with_a_fix(tmp_path, qwen2_model):
    plain = tmp_path / "plain"
    shutil.copytree(qwen2_model, plain)
    (plain / "chat_template.jinja").unlink()
    config = json.loads((plain / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (plain / "tokenizer_config.json").write_text(json.dumps(config))
    result = run_cli(*sft_args(tmp_path / "out", plain))
    assert result.returncode == 2 and "has no chat template" in result.stderr, result.stderr[-2000:]
    assert "tokenizer stage" in result.stderr and not (tmp_path / "out").exists()


# --- resume -------------------------------------------------------------------------------------------------------


def test_resume_auto_continues_from_the_newest_checkpoint(tmp_path, base_model):
    """A run stopped at step 6 (checkpoint-6) and rerun with max_steps 10 trains steps 7-10 only."""
    out = tmp_path / "resume"
    short = ["generation_eval=null", "train.logging_steps=2", "train.save_steps=3", "train.lr_scheduler=constant"]
    first = run_cli(*sft_args(out, base_model, *short, "train.max_steps=6"))
    assert first.returncode == 0, first.stderr[-3000:]
    assert (out / "checkpoints" / "checkpoint-6" / "trainer_state.json").is_file()
    # A checkpoint the process died while writing (no trainer_state.json) must be skipped.
    (out / "checkpoints" / "checkpoint-9").mkdir()
    second = run_cli(*sft_args(out, base_model, *short, "train.max_steps=10"))
    assert second.returncode == 0, second.stderr[-3000:]
    metrics = manifest_metrics(out)
    assert metrics["resumed_from"] == str(out / "checkpoints" / "checkpoint-6") and metrics["steps"] == 10
    assert [step for step, _ in logged(out)] == [2, 4, 6, 8, 10]
    state = json.loads((out / "checkpoints" / "checkpoint-10" / "trainer_state.json").read_text())
    assert state["global_step"] == 10
