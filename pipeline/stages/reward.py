"""Reward stage: a sequence-classification model with one score, trained on preference pairs with trl.

    llmpipe reward --config configs/tiny/reward.yaml [init_from=runs/tiny/sft] [train.max_steps=200]

Reads trl's preference formats as they are: explicit prompt (`prompt`, `chosen`, `rejected`), implicit prompt
(`chosen`, `rejected` holding the whole exchange), standard strings or conversational message lists. Produces
`output_dir/model/` (loads with AutoModelForSequenceClassification; `pipeline.rewards.score_pairs` scores
(prompt, response) pairs) and a manifest with held-out pairwise accuracy and mean margin.
"""

from __future__ import annotations

import time
from pathlib import Path

from pipeline.artifacts import begin_stage, write_manifest
from pipeline.config import DataConfig, config, field
from pipeline.data import stage_inputs
from pipeline.distributed import is_main_process, launch_facts, on_every_rank
from pipeline.modeling import load_pretrained, model_and_tokenizer
from pipeline.rewards import score_pairs
from pipeline.tracking import log
from pipeline.trainers import (
    TrlTrainConfig,
    load_preference_splits,
    metrics_jsonl_callback,
    save_trained,
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


# --- held-out pairs ---------------------------------------------------------------------------------------------


def pair_metrics(model, tokenizer, ds, accelerator) -> dict:
    """Held-out pair accuracy and margins; every process scores its share (distributed.on_every_rank) and all get
    the same numbers."""
    if "prompt" in ds.column_names:
        prompts = ds["prompt"]
    else:  # implicit prompt: the whole exchange is in chosen/rejected
        prompts = [[] if isinstance(c, list) else "" for c in ds["chosen"]]
    rows = list(zip(prompts, ds["chosen"], ds["rejected"], strict=True))

    def margins_of(share: list) -> list[float]:
        asked = [p for p, _, _ in share]
        chosen = score_pairs(model, tokenizer, asked, [c for _, c, _ in share])
        rejected = score_pairs(model, tokenizer, asked, [r for _, _, r in share])
        return [(c, c - r) for c, r in zip(chosen, rejected, strict=True)]

    scored = on_every_rank(rows, margins_of, accelerator)
    chosen, margins = [c for c, _ in scored], [m for _, m in scored]
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
    # a classifier must know where padding starts to find the last real token: pad_with_eos
    model_path, tokenizer = model_and_tokenizer(cfg.init_from, cfg.tokenizer, cfg.trust_remote_code, pad_with_eos=True)
    train_ds, eval_ds = load_preference_splits(cfg, tokenizer)
    checkpoints = out / "checkpoints"
    resume_from = trainer_resume_point(checkpoints, cfg.resume, cfg)
    if is_main_process():
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
    before = pair_metrics(trainer.model, tokenizer, eval_ds, trainer.accelerator)
    trainer.add_callback(metrics_jsonl_callback(out, resume_from))
    result = trainer.train(resume_from_checkpoint=resume_from)
    trainer.model.train(False)

    # --- measure on the held-out pairs and save: every rank takes part in both (ZeRO-3 shards the weights)
    metrics, facts = {}, launch_facts(trainer.accelerator, trainer.model)
    after = pair_metrics(trainer.model, tokenizer, eval_ds, trainer.accelerator)
    save_trained(trainer, tokenizer, out / "model", merge=False, generation=False)
    if trainer.is_world_process_zero():
        metrics = {
            "train_loss": result.training_loss, "steps": result.global_step,
            "heldout_pair_accuracy": after["pair_accuracy"], "heldout_mean_margin": after["mean_margin"],
            "heldout_pairs": after["pairs"], "heldout_pair_accuracy_before": before["pair_accuracy"],
            "heldout_mean_margin_before": before["mean_margin"], "train_pairs": len(train_ds),
            "resumed_from": resume_from,
            **facts,
        }  # fmt: skip
        inputs = stage_inputs(cfg, "init_from", "data", "eval_data")
        write_manifest(out, STAGE, inputs, ["model"], metrics, started)
        log(
            f"done: held-out pair accuracy {before['pair_accuracy']:.3f} -> {after['pair_accuracy']:.3f}, "
            f"margin {after['mean_margin']:.3f} -> {out / 'model'}",
            STAGE,
        )
    trainer.accelerator.wait_for_everyone()
    return metrics
