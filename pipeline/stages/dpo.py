"""DPO stage: align a chat model on preference pairs with trl's DPOTrainer (Rafailov et al. 2023).

    llmpipe dpo --config configs/tiny/dpo.yaml [init_from=runs/tiny/sft] [beta=0.1] [loss_type=[ipo]]

The reference is a frozen copy of the starting policy, or with `lora.enabled` the policy itself with its
adapters switched off (one set of base weights in memory). Produces `output_dir/model/` (AutoModelForCausalLM)
and a manifest with the held-out implicit-reward accuracy and margins, and the policy's log-probability margin
(chosen minus rejected) before and after training.
"""

from __future__ import annotations

import time
from pathlib import Path

from pipeline.artifacts import begin_stage, write_manifest
from pipeline.config import DataConfig, config, field
from pipeline.data import stage_inputs
from pipeline.distributed import is_main_process, launch_facts
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
    load_preference_splits,
    metrics_jsonl_callback,
    save_trained,
    trainer_resume_point,
    training_kwargs,
)

STAGE = "dpo"
LOSS_TYPES = ("sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "aot",
              "aot_pair", "apo_zero", "apo_down", "discopop", "sft")  # fmt: skip


@config
class DPOStageConfig:
    output_dir: str = field(help="Folder for this stage's artifact (model/, checkpoints/, manifest.json).")
    init_from: str = field(help="Policy to start from: an sft stage folder, an HF folder or a hub name.")
    tokenizer: str | None = field(None, "Tokenizer (None: the init_from model's).")
    trust_remote_code: bool = field(False, "Allow models that ship their own Python code. Off: safe.")
    data: DataConfig = field(help="Preference pairs: chosen/rejected (+ prompt), strings or message lists.")
    eval_data: DataConfig | None = field(None, "Held-out pairs; None: split eval_fraction off data.")
    eval_fraction: float = field(0.1, "Share of pairs held out when eval_data is not given.", gt=0.0, lt=0.5)
    max_length: int = field(512, "Longest prompt+response in tokens (longer ones are truncated).", ge=8)
    beta: float = field(0.1, "Strength of the KL tie to the reference (higher: stay closer).", gt=0)
    loss_type: list[str] = field(
        factory=lambda: ["sigmoid"], help="DPO loss(es): sigmoid (DPO), ipo, hinge, ... ; add 'sft' for an NLL term."
    )
    loss_weights: list[float] | None = field(None, "Weights of the losses in loss_type (None: all 1).")
    precompute_ref_log_probs: bool = field(False, "Score the reference once before training (saves memory).")
    lora: LoraSection = field(factory=LoraSection, help="LoRA adapters; the reference is then adapters-off.")
    generation_eval: DataConfig | None = field(
        None,
        "Questions (question, answer columns; or preference pairs: prompt + chosen) answered greedily "
        "before and after training: exact match.",
    )
    generation_eval_max: int = field(200, "Use at most this many generation_eval rows.", ge=1)
    max_new_tokens: int = field(16, "Longest generated answer in generation_eval, in tokens.", ge=1)
    precision: str = field("auto", "auto (bf16 on a GPU that has it, else fp32), fp32 or bf16.")
    resume: str = field("auto", "auto (newest checkpoint in output_dir/checkpoints), never, or a checkpoint path.")
    train: TrlTrainConfig = field(factory=lambda: TrlTrainConfig(lr=5e-5), help="Optimisation.")

    def check(self) -> list[str]:
        problems = []
        unknown = [t for t in self.loss_type if t not in LOSS_TYPES]
        if unknown:
            problems.append(f"loss_type: unknown {unknown}; expected any of {', '.join(LOSS_TYPES)}")
        if self.loss_weights is not None and len(self.loss_weights) != len(self.loss_type):
            problems.append(f"loss_weights has {len(self.loss_weights)} values for {len(self.loss_type)} losses")
        if self.precision not in ("auto", "fp32", "bf16"):
            problems.append(f"precision: got {self.precision!r}, expected auto, fp32 or bf16")
        return problems


Config = DPOStageConfig


def run(cfg: DPOStageConfig) -> dict | None:
    import torch
    from transformers import AutoModelForCausalLM
    from trl import DPOConfig, DPOTrainer

    # --- check inputs before any compute
    started = time.time()
    out = Path(cfg.output_dir)
    model_path, tokenizer = model_and_tokenizer(cfg.init_from, cfg.tokenizer, cfg.trust_remote_code, pad_with_eos=True)
    train_ds, eval_ds = load_preference_splits(cfg, tokenizer)
    questions = generation_eval_rows(cfg)
    checkpoints = out / "checkpoints"
    resume_from = trainer_resume_point(checkpoints, cfg.resume, cfg)
    if is_main_process():
        begin_stage(out, cfg, fresh=resume_from is None)

    # --- policy (+ frozen reference made by trl, or adapters-off with LoRA)
    torch.manual_seed(cfg.train.seed)
    model = load_pretrained(AutoModelForCausalLM, model_path, cfg.trust_remote_code)
    args = DPOConfig(
        **training_kwargs(cfg.train, cfg.precision, checkpoints), max_length=cfg.max_length, beta=cfg.beta,
        loss_type=list(cfg.loss_type), loss_weights=cfg.loss_weights, eval_strategy="no",
        precompute_ref_log_probs=cfg.precompute_ref_log_probs,
        eval_on_start=True,  # the "before" numbers; see trainers.evaluation_at_start
    )  # fmt: skip
    trainer = DPOTrainer(model=model, args=args, train_dataset=train_ds, eval_dataset=eval_ds,
                         processing_class=tokenizer, peft_config=peft_config(cfg.lora))  # fmt: skip
    log(f"training on {len(train_ds)} pairs, {len(eval_ds)} held out, beta {cfg.beta}, loss {cfg.loss_type}", STAGE)
    # every process answers its share of the questions, before and after (ZeRO-3 shards the weights)
    match_before, _ = generation_eval(trainer.model, tokenizer, questions, cfg.max_new_tokens, trainer.accelerator)
    trainer.add_callback(metrics_jsonl_callback(out, resume_from))
    result = trainer.train(resume_from_checkpoint=resume_from)
    before = evaluation_at_start(trainer)
    after = trainer.evaluate()
    match_after, examples = generation_eval(trainer.model, tokenizer, questions, cfg.max_new_tokens,
                                            trainer.accelerator)  # fmt: skip

    # --- save: merged weights (or adapters), tokenizer, generation config; the manifest last
    metrics, facts = {}, launch_facts(trainer.accelerator, trainer.model)
    save_trained(trainer, tokenizer, out / "model", cfg.lora.merge)
    if trainer.is_world_process_zero():
        metrics = {
            "train_loss": result.training_loss, "steps": result.global_step, "train_pairs": len(train_ds),
            "heldout_pairs": len(eval_ds), "resumed_from": resume_from,
            "heldout_reward_accuracy": after.get("eval_rewards/accuracies"),
            "heldout_reward_margin": after.get("eval_rewards/margins"),
            "heldout_reward_chosen": after.get("eval_rewards/chosen"),
            "heldout_reward_rejected": after.get("eval_rewards/rejected"),
            "heldout_logp_margin_before": _logp_margin(before), "heldout_logp_margin": _logp_margin(after),
            "heldout_loss_before": before.get("eval_loss"), "heldout_loss": after.get("eval_loss"),
            "exact_match_before": match_before, "exact_match": match_after, "generation_examples": examples,
            "generation_eval_rows": len(questions),
            **facts,
        }  # fmt: skip
        inputs = stage_inputs(cfg, "init_from", "data", "eval_data", "generation_eval")
        write_manifest(out, STAGE, inputs, ["model"], metrics, started)
        shown = f", exact match {match_before:.3f} -> {match_after:.3f}" if questions else ""
        log(
            f"done: held-out log-prob margin {metrics['heldout_logp_margin_before']:.3f} -> "
            f"{metrics['heldout_logp_margin']:.3f}, reward accuracy {metrics['heldout_reward_accuracy']:.3f}{shown} "
            f"-> {out / 'model'}",
            STAGE,
        )
    trainer.accelerator.wait_for_everyone()
    return metrics


def _logp_margin(evaluation: dict) -> float | None:
    """Mean log p(chosen) - log p(rejected) under the policy: what DPO should raise."""
    chosen, rejected = evaluation.get("eval_logps/chosen"), evaluation.get("eval_logps/rejected")
    return None if chosen is None or rejected is None else chosen - rejected
