"""What the stages built on trl's trainers (sft, reward, dpo) share: the optimisation section, TrainingArguments,
resume, saving, the manifest's launch facts, metrics.jsonl. Each stage still builds its own trl config and trainer
in plain sight."""

from __future__ import annotations

from pathlib import Path

from pipeline.artifacts import check_resume_config
from pipeline.config import UserError, config, field
from pipeline.distributed import join_deepspeed_comm, on_gpu, resolve_precision


@config
class TrlTrainConfig:
    seed: int = field(0, "Seed for new weights (heads, adapters) and the data order.")
    lr: float = field(1e-4, "Peak learning rate.", gt=0)
    max_steps: int = field(200, "Optimizer steps (-1: train for `epochs`).", ge=-1)
    epochs: float = field(1.0, "Epochs, used when max_steps is -1.", gt=0)
    micro_batch_size: int = field(16, "Examples per process per forward pass.", ge=1)
    gradient_accumulation_steps: int = field(1, "Micro-batches per optimizer step.", ge=1)
    warmup_ratio: float = field(0.05, "Share of steps spent warming up.", ge=0.0, lt=1.0)
    weight_decay: float = field(0.0, "AdamW weight decay.", ge=0.0)
    lr_scheduler: str = field("cosine", "transformers scheduler name (cosine, linear, constant...).")
    logging_steps: int = field(10, "Log every N steps.", ge=1)
    save_steps: int = field(100, "Checkpoint every N steps.", ge=1)
    save_total_limit: int = field(2, "Keep the newest N checkpoints.", ge=1)
    gradient_checkpointing: bool = field(False, "Recompute activations in backward (less memory, slower).")


def training_kwargs(train: TrlTrainConfig, precision: str, checkpoints: Path) -> dict:
    """Keyword arguments every trl config takes. trl defaults to bf16 and refuses a CPU without use_cpu=True,
    and with use_cpu alone keeps bf16 autocast on (2.3x slower here): both are set explicitly. Called before the
    trl config is made, so it also readies DeepSpeed's communication for models loaded after it
    (distributed.join_deepspeed_comm)."""
    join_deepspeed_comm()
    mixed = resolve_precision(precision)
    return dict(
        output_dir=str(checkpoints), seed=train.seed, learning_rate=train.lr, max_steps=train.max_steps,
        num_train_epochs=train.epochs, per_device_train_batch_size=train.micro_batch_size,
        per_device_eval_batch_size=train.micro_batch_size,
        gradient_accumulation_steps=train.gradient_accumulation_steps, warmup_steps=train.warmup_ratio,
        weight_decay=train.weight_decay, lr_scheduler_type=train.lr_scheduler, logging_steps=train.logging_steps,
        save_steps=train.save_steps, save_total_limit=train.save_total_limit,
        gradient_checkpointing=train.gradient_checkpointing, report_to="none", use_cpu=not on_gpu(),
        bf16=mixed == "bf16", fp16=mixed == "fp16", dataloader_num_workers=0,
    )  # fmt: skip


def trainer_resume_point(checkpoints: Path, resume: str, cfg=None) -> str | None:
    """Trainer's newest complete `checkpoint-N` for resume: auto, None for never, or the given path (must exist).

    Trainer writes trainer_state.json last, so a folder without it is one the process died while saving. With
    `cfg`, checkpoints written under another config (output_dir/config.yaml) are refused, not continued."""
    if resume == "never":
        return None
    if resume == "auto":
        complete = [p for p in checkpoints.glob("checkpoint-*") if (p / "trainer_state.json").is_file()]
        complete.sort(key=lambda p: int(p.name.rsplit("-", 1)[-1]))
        found = str(complete[-1]) if complete else None
    elif not Path(resume).is_dir():
        raise UserError(f"resume: {resume} is not a checkpoint folder; use auto, never or a checkpoint-N path")
    else:
        found = resume
    if found is not None and cfg is not None:
        check_resume_config(checkpoints.parent, cfg)
    return found


def load_preference_splits(cfg, tokenizer) -> tuple:
    """Train and held-out preference pairs of a reward/dpo config (eval_data, or eval_fraction split off data),
    every row checked; conversations need the tokenizer's chat template."""
    from pipeline.formats import load_preference_pairs

    train_ds, conversational = load_preference_pairs(cfg.data)
    if cfg.eval_data is not None:
        eval_ds, _ = load_preference_pairs(cfg.eval_data)
    else:
        split = train_ds.train_test_split(test_size=cfg.eval_fraction, seed=cfg.train.seed)
        train_ds, eval_ds = split["train"], split["test"]
    if conversational and not tokenizer.chat_template:
        raise UserError(
            f"tokenizer of {cfg.init_from} has no chat template, but the pairs are conversations; "
            "use a tokenizer stage folder (tokenizer=...) or a chat model"
        )
    return train_ds, eval_ds


def evaluation_at_start(trainer) -> dict:
    """Held-out metrics of the untrained model: the `eval_on_start` evaluation, first in the log history (a resumed
    run reads it back from the checkpoint's trainer_state.json).

    Calling `trainer.evaluate()` before `trainer.train()` instead looks harmless but is not: Accelerate marks the
    model as prepared in evaluation mode, `train()` then skips the DDP wrapper, and with several processes every
    rank trains its own copy, silently (accelerate 1.15, transformers 5.24; tests/test_trl_distributed.py)."""
    return next((entry for entry in trainer.state.log_history if "eval_loss" in entry), {})


def metrics_jsonl_callback(out: Path, resume_from: str | None):
    """A Trainer callback writing every dict the Trainer logs (loss, lr, grad norm, eval metrics) to
    out/metrics.jsonl, one line per logging step; a resumed run drops the lines after its checkpoint's step."""
    from transformers import TrainerCallback

    from pipeline.tracking import MetricsLog

    metrics = MetricsLog(
        out / "metrics.jsonl", resume_step=int(resume_from.rsplit("-", 1)[-1]) if resume_from else None
    )

    class WriteMetrics(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            if state.is_world_process_zero and logs:
                metrics.write(state.global_step, logs)

    return WriteMetrics()


def generation_eval_rows(cfg) -> list[dict]:
    """The `generation_eval` rows (question, answer) of a stage config with the generation_eval keys ([]: none)."""
    if cfg.generation_eval is None:
        return []
    from pipeline.formats import load_reference_answers

    return load_reference_answers(cfg.generation_eval, cfg.generation_eval_max)


def generation_eval(model, tokenizer, rows: list[dict], max_new_tokens: int, accelerator) -> tuple[float | None, list]:
    """Greedy exact match on the generation_eval rows and three examples; (None, []) without rows. Every process
    answers its share and all get the numbers (generation.heldout_metrics): under ZeRO-3 each forward gathers the
    weights from every rank, so no process may evaluate alone."""
    if not rows:
        return None, []
    from pipeline.generation import heldout_metrics

    found = heldout_metrics(model, tokenizer, rows, {}, max_new_tokens, accelerator)
    return found["exact_match"], found["examples"]


def save_trained(trainer, tokenizer, folder: Path, merge: bool, generation: bool = True) -> None:
    """Write a trl trainer's model to `folder` atomically (modeling.save_model). Every process must call it: the
    weights are gathered from all ranks first (accelerator.get_state_dict), which ZeRO-3 needs (each rank holds a
    shard) and is a plain state_dict elsewhere; the main process writes."""
    from pipeline.artifacts import atomic_dir
    from pipeline.modeling import save_model

    accelerator = trainer.accelerator
    state_dict = accelerator.get_state_dict(trainer.model_wrapped)
    if accelerator.is_main_process:
        with atomic_dir(folder) as tmp:
            save_model(accelerator.unwrap_model(trainer.model), tokenizer, tmp, merge, generation, state_dict)
    accelerator.wait_for_everyone()
