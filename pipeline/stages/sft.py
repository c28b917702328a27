"""SFT stage: supervised fine-tuning on chat or prompt/answer data with trl's SFTTrainer, all weights or LoRA.

    llmpipe sft --config configs/tiny/sft.yaml [init_from=runs/tiny/pretrain] [lora.enabled=true] [train.lr=1e-3]

Reads trl's dataset formats as they are, told apart by their columns: conversational `messages`,
prompt-completion (`prompt`/`completion`, strings or message lists) and plain `text`. Every row is checked before
any compute. By default only the answer is trained: assistant turns of conversations (found through any chat
template, with or without {% generation %} markers: pipeline/chat.py), completions of prompt-completion rows.

Produces `output_dir/model/`: full fine-tuning and LoRA with `lora.merge: true` give a folder that loads with
AutoModelForCausalLM (no peft needed); LoRA with `merge: false` gives a peft adapter folder (load it with
`peft.AutoPeftModelForCausalLM`). The manifest records train/held-out loss and greedy exact match on
`generation_eval` questions before and after training.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

from pipeline.artifacts import begin_stage, write_manifest
from pipeline.chat import assistant_token_mask
from pipeline.config import DataConfig, UserError, config, field
from pipeline.data import concatenate_sources, load_examples, load_mixture, local_files, stage_inputs
from pipeline.distributed import is_main_process, launch_facts
from pipeline.formats import message_problem
from pipeline.modeling import (
    LoraSection,
    load_pretrained,
    model_and_tokenizer,
    peft_config,
)
from pipeline.tracking import log
from pipeline.trainers import (
    TrlTrainConfig,
    evaluation_at_start,
    generation_eval,
    generation_eval_rows,
    metrics_jsonl_callback,
    save_trained,
    trainer_resume_point,
    training_kwargs,
)

STAGE = "sft"


@config
class SFTTrainConfig(TrlTrainConfig):
    lr: float = field(2e-5, "Peak learning rate (2e-5 suits full fine-tuning of a real model; LoRA: ~2e-4).", gt=0)
    eval_steps: int | None = field(None, "Measure held-out loss every N steps (None: before and after only).", ge=1)


@config
class SFTStageConfig:
    output_dir: str = field(help="Folder for this stage's artifact (model/, checkpoints/, manifest.json).")
    init_from: str = field(help="Model to fine-tune: a pretrain/sft stage folder, an HF model folder or a hub name.")
    tokenizer: str | None = field(None, "Tokenizer folder or tokenizer stage (None: the init_from model's).")
    trust_remote_code: bool = field(False, "Allow models that ship their own Python code. Off: safe.")
    data: DataConfig = field(help="Training rows: `messages`, `prompt`+`completion`, or `text` (trl formats).")
    eval_data: DataConfig | None = field(None, "Held-out rows for the loss; None: split eval_fraction off data.")
    eval_fraction: float = field(0.05, "Share of data held out when eval_data is not set (0: none).", ge=0.0, lt=0.5)
    max_length: int = field(1024, "Longest training sequence in tokens; longer ones are truncated at the end.", ge=8)
    assistant_only_loss: bool = field(
        True, "Train only on answers: assistant turns (conversations) or completions (prompt-completion rows)."
    )
    packing: bool = field(False, "Pack several rows per sequence (padding-free; best with flash attention).")
    lora: LoraSection = field(factory=LoraSection, help="LoRA adapters instead of full fine-tuning.")
    train: SFTTrainConfig = field(factory=SFTTrainConfig, help="Optimisation.")
    precision: str = field("auto", "auto (bf16 on a GPU that has it, else fp32), fp32 or bf16.")
    resume: str = field("auto", "auto (newest complete checkpoint in output_dir/checkpoints), never, or a path.")
    generation_eval: DataConfig | None = field(
        None,
        "Rows with `question` and `answer` (or preference pairs: `prompt` + `chosen`): greedy exact match "
        "before and after training (None: skip).",
    )
    generation_eval_max: int = field(200, "Use at most this many generation_eval rows.", ge=1)
    max_new_tokens: int = field(16, "Longest generated answer in generation_eval, in tokens.", ge=1)

    def check(self) -> list[str]:
        problems = []
        if self.precision not in ("auto", "fp32", "bf16"):
            problems.append(f"precision: got {self.precision!r}, expected auto, fp32 or bf16")
        if self.train.eval_steps is not None and self.eval_data is None and self.eval_fraction == 0:
            problems.append("train.eval_steps is set but there is no held-out set (eval_data null, eval_fraction 0)")
        return problems


Config = SFTStageConfig


# --- data: trl formats, checked row by row before any compute -------------------------------------------------


def detect_format(columns: list[str], source: str) -> str:
    """'messages', 'prompt-completion' or 'text', from the columns (trl's own precedence)."""
    if "messages" in columns:
        return "messages"
    if "prompt" in columns and "completion" in columns:
        return "prompt-completion"
    if "text" in columns:
        return "text"
    raise UserError(
        f"data: {source} has none of trl's SFT formats (columns: {columns}); expected `messages`, "
        "`prompt` + `completion`, or `text`. Map yours with data.columns.<expected>=<present>"
    )


def _row_name(data: DataConfig, index: int) -> str:
    """'file:line (row i)' for JSON Lines data, so a user can open the bad line; 'source: row i' otherwise."""
    files = local_files(data) or []
    row = index
    for path in files:
        if Path(path).suffix != ".jsonl":
            break
        with open(path, encoding="utf-8", errors="replace") as f:
            for lineno, line in enumerate(f, 1):
                if line.strip():
                    if row == 0:
                        return f"{path}:{lineno} (row {index})"
                    row -= 1
    return f"{files[0] if len(files) == 1 else data.path}: row {index}"


def _row_problem(row: dict, fmt: str, conversational: bool) -> str | None:
    if fmt == "messages":
        return message_problem(row["messages"], "messages", last_role="assistant")
    if fmt == "text":
        return None if isinstance(row["text"], str) and row["text"] else "'text' is empty or not a string"
    for key in ("prompt", "completion"):
        value = row[key]
        if conversational:
            problem = message_problem(value, key, last_role="assistant" if key == "completion" else None)
            if problem:
                return problem
        elif not isinstance(value, str) or (key == "completion" and not value):
            return f"{key!r} is {'empty' if value == '' else type(value).__name__}; expected text"
    return None


FORMAT_COLUMNS = {"messages": ["messages"], "prompt-completion": ["prompt", "completion"], "text": ["text"]}


def load_sft_rows(data: DataConfig) -> tuple:
    """The rows of `data` in one trl format, every row checked: (dataset, format, conversational, replay). A
    mixture (data.mix) may add plain-text sources to conversations: those rows are `replay` (a language-modelling
    term on every token, against forgetting what pretraining taught), else replay is None."""
    if data.streaming:
        raise UserError("data.streaming: sft checks every row before training; set streaming: false")
    if data.mix is None:
        ds = load_examples(data, required=[])
        return (*_checked(ds, data, None), None)
    parts = []
    for path, ds, rows in load_mixture(data, required=[]):
        source = dataclasses.replace(data, path=path, mix=None)
        parts.append((path, *_checked(ds, source, rows)))
    # every row was checked in its source: the sources need only agree on a format (or be text beside messages)
    kinds = {(fmt, conversational) for _, _, fmt, conversational in parts}
    formats = {fmt for fmt, _ in kinds}
    shown = ", ".join(f"{path} ({fmt}{', conversational' if conv else ''})" for path, _, fmt, conv in parts)
    if "text" in formats and len(formats) > 1:
        if formats != {"messages", "text"}:
            raise UserError(f"data.mix: plain-text sources mix only with `messages` conversations; got {shown}")
        chats = concatenate_sources([(path, ds) for path, ds, fmt, _ in parts if fmt == "messages"])
        replay = concatenate_sources([(path, ds) for path, ds, fmt, _ in parts if fmt == "text"])
        return chats, "messages", True, replay
    if len(kinds) > 1:
        raise UserError(f"data.mix: the sources are in different formats ({shown}); give them one trl format, or "
                        "plain text beside `messages` conversations")  # fmt: skip
    ((fmt, conversational),) = kinds
    return concatenate_sources([(path, ds) for path, ds, _, _ in parts]), fmt, conversational, None


def _checked(ds, data: DataConfig, rows) -> tuple:
    """(dataset cut to its format's columns, format, conversational) after checking every row; a bad row is named
    by file and line (`rows`: each row's index in its source, for a mixture's sample)."""
    fmt = detect_format(ds.column_names, str(data.path))
    ds = ds.select_columns(FORMAT_COLUMNS[fmt])  # extra columns (ids, metadata) would confuse trl's format detection
    conversational = fmt == "messages" or (fmt == "prompt-completion" and isinstance(ds[0]["prompt"], list))
    for index, row in enumerate(ds):
        problem = _row_problem(row, fmt, conversational)
        if problem is None and fmt == "prompt-completion" and isinstance(row["prompt"], list) != conversational:
            problem = "mixes message lists and plain strings with earlier rows"
        if problem:
            raise UserError(f"{_row_name(data, int(rows[index]) if rows is not None else index)}: {problem}")
    return ds, fmt, conversational


def check_chat_template(tokenizer, name: str) -> None:
    """Conversations need a chat template: fail here rather than inside the trainer. (Answer-only loss works with
    any template: with {% generation %} markers trl finds the answers, without them pipeline.chat does.)"""
    if not tokenizer.chat_template:
        raise UserError(
            f"tokenizer {name} has no chat template, but the data are conversations; use a tokenizer from the "
            "tokenizer stage (tokenizer=runs/<run>/tokenizer) or set tokenizer.chat_template"
        )


# --- the trainer, as the stage builds it (tests inspect its tokenized dataset) ----------------------------------


def build_trainer(cfg: SFTStageConfig, model, tokenizer, train_ds, eval_ds, fmt: str, replay=None):
    """trl's SFTTrainer with our settings; trl renders, tokenizes and masks the rows in its constructor. Answer-only
    loss on conversations: trl's assistant masks where the chat template has {% generation %} markers; where it
    has none (almost every real template), the rows arrive tokenized with pipeline.chat's assistant masks, from
    which trl builds the labels the same way. `replay` rows (plain text of a mixture) join the training rows
    tokenized, with a mask over every token and EOS at the end, as pretraining saw them."""
    import datasets
    from trl import SFTConfig, SFTTrainer
    from trl.chat_template_utils import has_generation_markers

    checkpoints = Path(cfg.output_dir) / "checkpoints"
    conversational = fmt == "messages" or (fmt == "prompt-completion" and isinstance(train_ds[0]["prompt"], list))
    markers = conversational and has_generation_markers(tokenizer.chat_template) and replay is None
    if fmt == "messages" and ((cfg.assistant_only_loss and not markers) or replay is not None):

        def tokenized(row):
            encoded = assistant_token_mask(tokenizer, row["messages"])
            if not cfg.assistant_only_loss:
                encoded["assistant_masks"] = [1] * len(encoded["input_ids"])
            return encoded

        train_ds, eval_ds = (None if ds is None else ds.map(tokenized, remove_columns=["messages"],
                                                            desc="finding the assistant turns")
                             for ds in (train_ds, eval_ds))  # fmt: skip
    if replay is not None:
        replay = replay.map(lambda row: replay_tokens(tokenizer, row["text"]), remove_columns=["text"],
                            desc="tokenizing the replay text")  # fmt: skip
        train_ds = datasets.concatenate_datasets([train_ds, replay.cast(train_ds.features)])
    with_eval = eval_ds is not None and cfg.train.eval_steps is not None
    args = SFTConfig(
        **training_kwargs(cfg.train, cfg.precision, checkpoints), max_length=cfg.max_length, packing=cfg.packing,
        # trl refuses assistant_only_loss on non-conversational rows; completions play that part there.
        assistant_only_loss=cfg.assistant_only_loss and markers,
        completion_only_loss=cfg.assistant_only_loss if fmt == "prompt-completion" else None,
        eval_strategy="steps" if with_eval else "no", eval_steps=cfg.train.eval_steps,
        eval_on_start=eval_ds is not None,  # the "before" numbers; see trainers.evaluation_at_start
    )  # fmt: skip
    return SFTTrainer(model=model, args=args, train_dataset=train_ds, eval_dataset=eval_ds,
                      processing_class=tokenizer, peft_config=peft_config(cfg.lora))  # fmt: skip


def replay_tokens(tokenizer, text: str) -> dict[str, list[int]]:
    """A plain-text row as the pretrain stage reads a document (data.encode_and_pack): its tokens without special
    tokens, then EOS; every token trained on."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if tokenizer.eos_token_id is not None and (not ids or ids[-1] != tokenizer.eos_token_id):
        ids = ids + [tokenizer.eos_token_id]
    return {"input_ids": ids, "assistant_masks": [1] * len(ids)}


def trained_text(tokenizer, input_ids: list[int], labels: list[int]) -> list[str]:
    """The decoded runs of tokens that carry loss (label != -100): what the model is taught to write."""
    runs, current = [], []
    for token, label in zip(input_ids, labels, strict=True):
        if label != -100:
            current.append(token)
        elif current:
            runs.append(current)
            current = []
    if current:
        runs.append(current)
    return [tokenizer.decode(run) for run in runs]


# --- run --------------------------------------------------------------------------------------------------------


def run(cfg: SFTStageConfig) -> dict | None:
    # --- check inputs before any compute (and before importing torch: bad data fails in ~2 s)
    started = time.time()
    out = Path(cfg.output_dir)
    train_ds, fmt, conversational, replay = load_sft_rows(cfg.data)
    eval_ds = load_sft_rows(cfg.eval_data)[0] if cfg.eval_data is not None else None
    questions = generation_eval_rows(cfg)
    model_path, tokenizer = model_and_tokenizer(cfg.init_from, cfg.tokenizer, cfg.trust_remote_code, pad_with_eos=True)
    if conversational or questions:
        check_chat_template(tokenizer, cfg.tokenizer or model_path)
    if eval_ds is None and cfg.eval_fraction > 0:
        split = train_ds.train_test_split(test_size=cfg.eval_fraction, seed=cfg.train.seed)
        train_ds, eval_ds = split["train"], split["test"]
    resume_from = trainer_resume_point(out / "checkpoints", cfg.resume, cfg)
    if is_main_process():
        begin_stage(out, cfg, fresh=resume_from is None)

    # --- model and trainer
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(cfg.train.seed)  # LoRA adapters are initialised from this
    model = load_pretrained(AutoModelForCausalLM, model_path, cfg.trust_remote_code)
    if model.get_input_embeddings().num_embeddings < len(tokenizer):  # e.g. a tokenizer with added tokens
        # Exactly len(tokenizer), no rounding up: peft resizes the base model to that size when it loads an
        # unmerged adapter folder (which then carries the embeddings), and the two must agree.
        model.resize_token_embeddings(len(tokenizer))
    trainer = build_trainer(cfg, model, tokenizer, train_ds, eval_ds, fmt, replay)
    trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in trainer.model.parameters())
    sample = trainer.train_dataset[0]
    log(
        f"{fmt} data, {len(train_ds)} rows for training"
        + (f" and {len(replay)} of plain text (replay)" if replay is not None else "")
        + f", {len(eval_ds) if eval_ds is not None else 0} held out; "
        f"{trainable / 1e6:.2f}M of {total / 1e6:.2f}M parameters trained"
        + (f"; LoRA r={cfg.lora.r}" if cfg.lora.enabled else ""),
        STAGE,
    )
    if "labels" in sample:  # what the loss mask keeps of one row: a wrong template shows here, not after training
        log(f"row 0 trains on {trained_text(tokenizer, sample['input_ids'], sample['labels'])}", STAGE)

    # --- before: exact match of the starting model (every process answers its share); the held-out loss before is
    # the trainer's eval_on_start
    match_before, _ = generation_eval(trainer.model, tokenizer, questions, cfg.max_new_tokens, trainer.accelerator)
    if questions:
        log(f"exact match before training: {match_before:.3f} on {len(questions)} questions", STAGE)

    # --- train (Trainer resumes model, optimizer, scheduler and RNG state from checkpoint-N); metrics.jsonl gets
    # the training logs only, so a resumed run's file holds each step once
    trainer.add_callback(metrics_jsonl_callback(out, resume_from))
    result = trainer.train(resume_from_checkpoint=resume_from)
    loss_before = evaluation_at_start(trainer).get("eval_loss")
    loss_after = trainer.evaluate()["eval_loss"] if eval_ds is not None else None

    # --- after: exact match, save the model (every process takes part in both), the manifest last
    match_after, examples = generation_eval(trainer.model, tokenizer, questions, cfg.max_new_tokens,
                                            trainer.accelerator)  # fmt: skip
    metrics, facts = {}, launch_facts(trainer.accelerator, trainer.model)
    save_trained(trainer, tokenizer, out / "model", cfg.lora.merge)
    if trainer.is_world_process_zero():
        metrics = {
            "train_loss": result.training_loss, "final_logged_loss": _last_logged_loss(trainer),
            "eval_loss_before": loss_before, "eval_loss": loss_after,
            "exact_match_before": match_before, "exact_match": match_after, "generation_examples": examples,
            "generation_eval_rows": len(questions), "train_samples": len(train_ds),
            "eval_samples": len(eval_ds) if eval_ds is not None else 0, "data_format": fmt,
            "replay_samples": len(replay) if replay is not None else 0,
            "steps": result.global_step, "trainable_params": trainable, "total_params": total,
            "lora": cfg.lora.enabled, "lora_merged": cfg.lora.enabled and cfg.lora.merge, "resumed_from": resume_from,
            **facts,
        }  # fmt: skip
        inputs = stage_inputs(cfg, "init_from", "data", "eval_data", "generation_eval")
        write_manifest(out, STAGE, inputs, ["model"], metrics, started)
        shown = f", exact match {match_before:.3f} -> {match_after:.3f}" if questions else ""
        log(f"done: train loss {result.training_loss:.4f}{shown} -> {out / 'model'}", STAGE)
    trainer.accelerator.wait_for_everyone()
    return metrics


def _last_logged_loss(trainer) -> float | None:
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    return losses[-1] if losses else None
