"""Reward stage: a sequence-classification model with one score, trained on preference pairs with trl.

    llmpipe reward --config configs/tiny/reward.yaml [init_from=runs/tiny/sft] [train.max_steps=200]

Reads trl's preference formats as they are: explicit prompt (`prompt`, `chosen`, `rejected`), implicit prompt
(`chosen`, `rejected` holding the whole exchange), standard strings or conversational message lists. Produces
`output_dir/model/` (loads with AutoModelForSequenceClassification; `score_pairs` below scores (prompt, response)
pairs) and a manifest with held-out pairwise accuracy and mean margin.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from pipeline.artifacts import atomic_dir, begin_stage, describe_input, write_manifest
from pipeline.config import DataConfig, config, field
from pipeline.data import describe_data
from pipeline.modeling import load_pretrained, load_tokenizer, resolve_model_path
from pipeline.tracking import log
from pipeline.trl_common import (
    TrlTrainConfig,
    launch_facts,
    load_preference_splits,
    metrics_jsonl_callback,
    trainer_resume_point,
    training_kwargs,
)

STAGE = "reward"


@config
class RewardConfig:
    output_dir: str = field(help="Folder for this stage's artifact (model/, checkpoints/, manifest.json).")
    init_from: str = field(help="Model to start from: an sft/pretrain stage folder, an HF folder or a hub name.")
    tokenizer: str | None = field(None, "Tokenizer (None: the init_from model's).")
    trust_remote_code: bool = field(False, "Allow models that ship their own Python code. Off: safe.")
    data: DataConfig = field(help="Preference pairs: chosen/rejected (+ prompt), strings or message lists.")
    eval_data: DataConfig | None = field(None, "Held-out pairs; None: split eval_fraction off data.")
    eval_fraction: float = field(0.1, "Share of pairs held out when eval_data is not given.", gt=0.0, lt=0.5)
    max_length: int = field(512, "Longest prompt+response in tokens; longer pairs are dropped.", ge=8)
    precision: str = field("auto", "auto (bf16 on a GPU that has it, else fp32), fp32 or bf16.")
    resume: str = field("auto", "auto (newest checkpoint in output_dir/checkpoints), never, or a checkpoint path.")
    train: TrlTrainConfig = field(factory=TrlTrainConfig, help="Optimisation.")
    center_rewards_coefficient: float | None = field(None, "Pull mean rewards to 0 (Eisenstein et al. 2023).")

    def check(self) -> list[str]:
        if self.precision not in ("auto", "fp32", "bf16"):
            return [f"precision: got {self.precision!r}, expected auto, fp32 or bf16"]
        return []


Config = RewardConfig


# --- scoring ------------------------------------------------------------------------------------------------------


def score_pairs(model, tokenizer, prompts: list, responses: list, batch_size: int = 16) -> list[float]:
    """Reward-model scores for (prompt, response) pairs, rendered exactly as training rendered them.

    `prompts[i]` is a string or a message list; `responses[i]` a string or a message list of the same kind.
        model = AutoModelForSequenceClassification.from_pretrained("runs/tiny/reward/model")
        tok = AutoTokenizer.from_pretrained("runs/tiny/reward/model")
        score_pairs(model, tok, [[{"role": "user", "content": "2 + 3?"}]], [[{"role": "assistant", "content": "5"}]])
    """
    import torch

    texts = []
    for prompt, response in zip(prompts, responses, strict=True):
        if isinstance(prompt, list):
            texts.append(tokenizer.apply_chat_template(prompt + response, tokenize=False))
        else:
            text = prompt + response
            texts.append(text if text.endswith(tokenizer.eos_token) else text + tokenizer.eos_token)
    scores: list[float] = []
    model.eval()
    side, tokenizer.padding_side = tokenizer.padding_side, "right"  # the score is read at the last real token
    try:
        with torch.no_grad():
            for start in range(0, len(texts), batch_size):
                batch = tokenizer(texts[start : start + batch_size], return_tensors="pt", padding=True,
                                  add_special_tokens=False).to(model.device)  # fmt: skip
                scores += model(**batch).logits[:, 0].float().tolist()
    finally:
        tokenizer.padding_side = side
    return scores


def pair_metrics(model, tokenizer, ds) -> dict:
    if "prompt" in ds.column_names:
        prompts = ds["prompt"]
    else:  # implicit prompt: the whole exchange is in chosen/rejected
        prompts = [[] if isinstance(c, list) else "" for c in ds["chosen"]]
    chosen = score_pairs(model, tokenizer, prompts, ds["chosen"])
    rejected = score_pairs(model, tokenizer, prompts, ds["rejected"])
    margins = [c - r for c, r in zip(chosen, rejected, strict=True)]
    return {
        "pair_accuracy": sum(m > 0 for m in margins) / len(margins),
        "mean_margin": sum(margins) / len(margins),
        "mean_chosen_score": sum(chosen) / len(chosen),
        "pairs": len(margins),
    }


# --- run ----------------------------------------------------------------------------------------------------------


def run(cfg: RewardConfig) -> dict | None:
    import torch
    from transformers import AutoModelForSequenceClassification
    from trl import RewardConfig as TrlRewardConfig
    from trl import RewardTrainer

    # --- check inputs before any compute
    started = time.time()
    out = Path(cfg.output_dir)
    model_path = resolve_model_path(cfg.init_from)
    tokenizer = load_tokenizer(cfg.tokenizer or model_path, cfg.trust_remote_code)
    if tokenizer.pad_token is None:  # a classifier must know where padding starts to find the last real token
        tokenizer.pad_token = tokenizer.eos_token
    train_ds, eval_ds = load_preference_splits(cfg, tokenizer)
    checkpoints = out / "checkpoints"
    resume_from = trainer_resume_point(checkpoints, cfg.resume, cfg)
    if int(os.environ.get("RANK", "0")) == 0:
        begin_stage(out, cfg, fresh=resume_from is None)

    # --- model: the causal LM's body with a fresh one-output score head
    torch.manual_seed(cfg.train.seed)
    model = load_pretrained(AutoModelForSequenceClassification, model_path, cfg.trust_remote_code, num_labels=1)
    model.config.pad_token_id = tokenizer.pad_token_id

    args = TrlRewardConfig(
        **training_kwargs(cfg.train, cfg.precision, checkpoints),
        max_length=cfg.max_length,
        center_rewards_coefficient=cfg.center_rewards_coefficient,
        eval_strategy="no",
    )
    trainer = RewardTrainer(model=model, args=args, train_dataset=train_ds, processing_class=tokenizer)
    log(f"training on {len(train_ds)} pairs, {len(eval_ds)} held out", STAGE)
    before = pair_metrics(trainer.model, tokenizer, eval_ds) if trainer.is_world_process_zero() else {}
    trainer.add_callback(metrics_jsonl_callback(out, resume_from))
    result = trainer.train(resume_from_checkpoint=resume_from)
    trainer.model.train(False)

    # --- save and measure on the held-out pairs
    metrics, facts = {}, launch_facts(trainer)
    if trainer.is_world_process_zero():
        after = pair_metrics(trainer.model, tokenizer, eval_ds)
        unwrapped = trainer.accelerator.unwrap_model(trainer.model)
        with atomic_dir(out / "model") as tmp:
            unwrapped.save_pretrained(tmp, safe_serialization=True)
            tokenizer.save_pretrained(tmp)
        metrics = {
            "train_loss": result.training_loss, "steps": result.global_step,
            "heldout_pair_accuracy": after["pair_accuracy"], "heldout_mean_margin": after["mean_margin"],
            "heldout_pairs": after["pairs"], "heldout_pair_accuracy_before": before["pair_accuracy"],
            "heldout_mean_margin_before": before["mean_margin"], "train_pairs": len(train_ds),
            "resumed_from": resume_from,
            **facts,
        }  # fmt: skip
        inputs = {"init_from": describe_input(cfg.init_from), "data": describe_data(cfg.data)}
        if cfg.eval_data is not None:
            inputs["eval_data"] = describe_data(cfg.eval_data)
        write_manifest(out, STAGE, inputs, ["model"], metrics, started)
        log(
            f"done: held-out pair accuracy {before['pair_accuracy']:.3f} -> {after['pair_accuracy']:.3f}, "
            f"margin {after['mean_margin']:.3f} -> {out / 'model'}",
            STAGE,
        )
    trainer.accelerator.wait_for_everyone()
    return metrics
