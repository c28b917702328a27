"""GRPO stage: critic-free RL with rewards checked by rule (or a reward model), on trl's GRPOTrainer.

    llmpipe grpo --config configs/tiny/grpo.yaml [init_from=runs/tiny/sft] [num_generations=8] [beta=0.04]
    launch/run.sh grpo configs/tiny/grpo.yaml launch/accelerate/cpu_2proc.yaml

Each step samples `num_generations` answers per prompt, scores each with the rewards (weighted sum), and takes
every score relative to its group (Shao et al. 2024; DAPO, Dr. GRPO and the other loss variants trl offers).
Rewards: `exact_match` against each prompt's reference, a 'module:function' (the contract of ppo's
reward_function and pairs' judges: `fn(prompts, responses[, references=])` -> one float each), or a reward-model
folder scored as the reward trainer saw the pairs.

What this stage watches because GRPO fails silently: the share of prompt groups whose rewards are all equal (they
carry no gradient), the share of truncated answers, reward mean/std per reward, KL, entropy and length, in
metrics.jsonl; a warning when most groups carry no signal or most answers are cut; `oversample` (DAPO's dynamic
sampling) to train on the groups that carry one; greedy exact match and reward on held-out questions before and
after, apart from the training reward. Sampling is exactly softmax(logits / T): no setting of the model's own
generation_config applies.

Produces `output_dir/model/`, `checkpoints/checkpoint-N/` (resume: auto), `metrics.jsonl`, `completions.jsonl`
(rank 0's prompts, answers and rewards at every step) and a manifest.
"""

from __future__ import annotations

import json
import time
from functools import partial
from pathlib import Path

from pipeline.artifacts import begin_stage, describe_input, write_manifest
from pipeline.chat import reply_ids
from pipeline.config import DataConfig, UserError, config, field
from pipeline.data import stage_inputs
from pipeline.distributed import launch_facts, world_size
from pipeline.formats import last_text, load_prompt_rows, load_reference_answers, overlap_problem
from pipeline.generation import heldout_metrics, stop_tokens
from pipeline.modeling import LoraSection, load_pretrained, model_and_tokenizer, peft_config
from pipeline.rewards import EXACT_MATCH, load_scorer, reward_entry_problem, reward_kind
from pipeline.rl.grpo import dynamic_sampling, epoch_seeded, reference_guidance
from pipeline.tracking import MetricsLog, log
from pipeline.trainers import (
    TrlTrainConfig,
    metrics_jsonl_callback,
    save_trained,
    trainer_resume_point,
    training_kwargs,
)

STAGE = "grpo"
LOSS_TYPES = ("grpo", "dr_grpo", "dapo", "bnpo", "cispo", "sapo", "luspo", "vespo")  # trl 1.16's
IMPORTANCE_LEVELS = ("token", "sequence")
SCALE_REWARDS = ("group", "batch", "none")


@config
class GRPOConfig:
    output_dir: str = field(help="Folder for this stage's artifact (model/, checkpoints/, metrics.jsonl, ...).")
    init_from: str = field(help="Policy to start from (and the reference): an sft stage folder or any causal LM.")
    tokenizer: str | None = field(None, "Policy tokenizer (None: the init_from model's).")
    trust_remote_code: bool = field(False, "Allow models that ship their own Python code. Off: safe.")
    data: DataConfig = field(help="Prompts: `prompt` (string or message list) or `messages` (all but the answer).")
    reference_key: str | None = field(
        None, "Column with each prompt's reference answer (None: the final assistant turn of `messages`, else the "
        "first of chosen, answer, reference, solution present).",
    )  # fmt: skip
    rewards: list[str] = field(
        factory=lambda: [EXACT_MATCH],
        help="Reward(s), summed with reward_weights: exact_match (the answer equals the reference after strip()), "
        "math_verify (the final value equals the reference's, GSM8K '#### 72' or MATH \\boxed{} solutions), "
        "an eval task YAML (its answer filter and exact-match options against the reference), "
        "'package.module:function' taking (prompts, responses[, references=]), or a reward model folder.",
    )
    reward_weights: list[float] | None = field(None, "One weight per reward (None: all 1).")
    eval_data: DataConfig | None = field(
        None, "Held-out questions with a reference answer (`question`/`answer`, or prompt + chosen): greedy exact "
        "match and the weighted reward, before and after.",
    )  # fmt: skip
    eval_task: str | None = field(
        None, "Instead of eval_data: an eval task YAML (generate_until) whose evaluated split is the held-out "
        "questions, scored by the task's metric too (task_metric). Its questions must not be training prompts.",
    )  # fmt: skip
    eval_max: int = field(200, "Use at most this many eval_data rows.", ge=1)
    eval_max_new_tokens: int = field(16, "Longest greedy answer on eval_data.", ge=1)
    num_generations: int = field(8, "Answers sampled per prompt: a group.", ge=2)
    oversample: int = field(
        1, "DAPO's dynamic sampling: draw this many times the step's prompts and train on the groups whose "
        "rewards differ, filled up with the others only where too few do; 1: off.", ge=1,
    )  # fmt: skip
    guide: bool = field(
        False, "Off-policy guidance (LUFFY): when no answer of a group scores as high as the prompt's reference "
        "answer, the reference replaces one of them, so RL can learn answers the policy never samples.",
    )  # fmt: skip
    max_new_tokens: int = field(64, "Longest sampled answer; a longer one is cut (see mask_truncated).", ge=1)
    temperature: float = field(1.0, "Sampling temperature.", gt=0)
    top_p: float = field(1.0, "Nucleus sampling mass (1: off).", gt=0, le=1)
    loss_type: str = field(
        "dapo", "Loss: dapo (token mean over the batch), grpo, dr_grpo, bnpo, cispo, sapo, luspo, vespo (trl's)."
    )
    importance_sampling_level: str = field(
        "token", "Importance ratio per token (GRPO) or per answer, length-normalised (sequence: GSPO, which Qwen3 "
        "was trained with; luspo expects it).",
    )  # fmt: skip
    scale_rewards: str = field("group", "Divide advantages by the group's std (group), the batch's (batch) or not.")
    beta: float = field(0.0, "KL coefficient to the reference (k3 in the loss); 0: no reference model.", ge=0)
    epsilon: float = field(0.2, "Clip range of the importance ratio (low side; also the high side by default).", gt=0)
    epsilon_high: float | None = field(None, "High clip (DAPO's clip-higher, e.g. 0.28); None: epsilon.")
    num_iterations: int = field(1, "Updates per generated batch (mu); >1 reuses the samples.", ge=1)
    mask_truncated: bool = field(False, "Leave answers cut at max_new_tokens out of the loss (DAPO).")
    warn_zero_signal: float = field(0.5, "Warn when this share of groups (or more) has equal rewards.", gt=0, le=1)
    lora: LoraSection = field(factory=LoraSection, help="LoRA policy; the reference is it with adapters off.")
    precision: str = field("auto", "auto (bf16 on a GPU that has it, else fp32), fp32 or bf16.")
    resume: str = field("auto", "auto (newest checkpoint in output_dir/checkpoints), never, or a checkpoint path.")
    train: TrlTrainConfig = field(
        factory=lambda: TrlTrainConfig(lr=1e-6, micro_batch_size=8, logging_steps=1, save_steps=50),
        help="Optimisation; micro_batch_size counts answers (prompts x num_generations) per process.",
    )

    def check(self) -> list[str]:
        problems = []
        if self.loss_type not in LOSS_TYPES:
            problems.append(f"loss_type: got {self.loss_type!r}, expected one of {', '.join(LOSS_TYPES)}")
        if self.importance_sampling_level not in IMPORTANCE_LEVELS:
            problems.append(f"importance_sampling_level: got {self.importance_sampling_level!r}, expected one of "
                            f"{', '.join(IMPORTANCE_LEVELS)}")  # fmt: skip
        elif self.loss_type == "luspo" and self.importance_sampling_level != "sequence":
            problems.append("loss_type luspo scales a sequence-level ratio: set importance_sampling_level: sequence")
        if self.scale_rewards not in SCALE_REWARDS:
            problems.append(f"scale_rewards: got {self.scale_rewards!r}, expected one of {', '.join(SCALE_REWARDS)}")
        if not self.rewards:
            problems.append("rewards: the list is empty; name at least one (e.g. [exact_match])")
        problems += filter(None, (reward_entry_problem(r, f"rewards[{i}]") for i, r in enumerate(self.rewards)))
        if self.reward_weights is not None and len(self.reward_weights) != len(self.rewards):
            problems.append(f"reward_weights has {len(self.reward_weights)} values for {len(self.rewards)} rewards")
        if self.precision not in ("auto", "fp32", "bf16"):
            problems.append(f"precision: got {self.precision!r}, expected auto, fp32 or bf16")
        if self.eval_task is not None and self.eval_data is not None:
            problems.append("set eval_data or eval_task, not both")
        per_process = self.train.micro_batch_size * self.train.gradient_accumulation_steps
        if (self.oversample > 1 or self.guide) and per_process % self.num_generations:
            what = f"oversample {self.oversample} keeps or drops" if self.oversample > 1 else "guide completes"
            problems.append(f"{what} whole groups on each process: "
                            f"train.micro_batch_size x gradient_accumulation_steps ({per_process}) must be a "
                            f"multiple of num_generations ({self.num_generations})")  # fmt: skip
        return problems


Config = GRPOConfig


def heldout_questions(cfg: GRPOConfig, prompts: list) -> list[dict]:
    """The held-out questions (eval_data, or eval_task's evaluated split), refused when any of them, or of the
    evaluated documents of a task used as a reward, is also a training prompt. Each task file is read once."""
    from pipeline.evaluation.task_rewards import load_generation_task, task_questions

    rows = load_reference_answers(cfg.eval_data, cfg.eval_max) if cfg.eval_data is not None else []
    checked = {"eval_data": rows} if rows else {}
    tasks = {}  # path -> its questions
    for key, path in [("eval_task", cfg.eval_task)] + [(f"rewards[{i}]", r) for i, r in enumerate(cfg.rewards)]:
        if path is not None and reward_kind(path) == "task":
            if path not in tasks:
                tasks[path] = task_questions(load_generation_task(path))
                checked[f"{key} ({path})"] = tasks[path]
            if key == "eval_task":
                rows = tasks[path][: cfg.eval_max]
    problems = [overlap_problem(where, prompts, questions, cfg.data.path) for where, questions in checked.items()]
    if any(problems):
        raise UserError([p for p in problems if p])
    return rows


def reward_scorers(cfg: GRPOConfig, device) -> list[tuple[str, object]]:
    """(name, scorer(prompts, texts, references)) for every reward entry, in order, each loaded (and checked) once;
    the name is the entry itself, or reward_model_<index> for a model (trl logs rewards/<name>/mean and std)."""
    return [(spec if reward_kind(spec) != "model" else f"reward_model_{index}",
             load_scorer(spec, f"rewards[{index}]", cfg.trust_remote_code, device))
            for index, spec in enumerate(cfg.rewards)]  # fmt: skip


def trl_reward(name: str, scorer):
    """A scorer as trl calls a reward: fn(prompts, completions, reference=..., **columns) -> floats, named."""

    def reward(prompts, completions, reference=None, **columns):
        return scorer(prompts, [last_text(c) for c in completions], reference)

    reward.__name__ = name
    return reward


def weighted_scorer(scorers: list, weights: list[float]):
    """scorer(prompts, texts, references) -> the weighted sum of every reward, for the held-out questions."""

    def score(prompts: list, texts: list[str], references: list | None = None) -> list[float]:
        columns = [scorer(prompts, texts, references) for scorer in scorers]
        return [sum(w * c[i] for w, c in zip(weights, columns, strict=True)) for i in range(len(texts))]

    return score


def recording(trainer_class, completions_log, names: list[str]):
    """trl's trainer that also writes rank 0's prompts, answers and rewards of every generation to
    completions.jsonl (step = the optimizer step the samples are generated for)."""

    class Recording(trainer_class):
        def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
            rewards = super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)
            if completions_log is not None:  # gathered over processes: rank 0's rows come first
                for i, (prompt, completion) in enumerate(zip(prompts, completions, strict=True)):
                    completions_log.write(self.state.global_step + 1, {
                        "prompt": prompt, "completion": last_text(completion),
                        "rewards": dict(zip(names, rewards[i].tolist(), strict=True))})  # fmt: skip
            return rewards

    return Recording


def signal_checks(threshold: float):
    """A callback warning (once each) when a logged step has most groups without signal or most answers cut."""
    from transformers import TrainerCallback

    class SignalChecks(TrainerCallback):
        def __init__(self):
            self.warned: set[str] = set()

        def on_log(self, args, state, control, logs=None, **kwargs):
            logs = logs or {}
            zero, cut = logs.get("frac_reward_zero_std"), logs.get("completions/clipped_ratio")
            if logs.get("trained_signal_share") is not None:  # dynamic sampling: what the step trained on
                zero = 1 - logs["trained_signal_share"]
            if zero is not None and zero >= threshold and "zero" not in self.warned:
                self.warned.add("zero")
                log(f"WARNING step {state.global_step}: {zero:.0%} of prompt groups have equal rewards and teach "
                    "nothing; use prompts nearer the model's level, more num_generations or a denser reward",
                    STAGE)  # fmt: skip
            if cut is not None and cut >= 0.5 and "cut" not in self.warned:
                self.warned.add("cut")
                log(f"WARNING step {state.global_step}: {cut:.0%} of answers reached max_new_tokens; a cut answer "
                    "rarely earns a reward: raise max_new_tokens or set mask_truncated", STAGE)  # fmt: skip

    return SignalChecks()


def run(cfg: GRPOConfig) -> dict | None:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, GenerationConfig
    from trl import GRPOConfig as TrlGRPOConfig
    from trl import GRPOTrainer

    # --- check inputs before any compute: tokenizer, prompts, rewards, batch arithmetic, resume point
    started = time.time()
    out = Path(cfg.output_dir)
    model_path, tokenizer = model_and_tokenizer(cfg.init_from, cfg.tokenizer, cfg.trust_remote_code, True)
    rows = load_prompt_rows(cfg.data, cfg.reference_key, cfg.rewards, chat=bool(tokenizer.chat_template))
    if any(isinstance(r["prompt"], list) for r in rows) and not tokenizer.chat_template:
        raise UserError(f"tokenizer of {cfg.init_from} has no chat template, but the prompts are conversations")
    if cfg.guide and (missing := sum(r["reference"] is None for r in rows)):
        raise UserError(f"guide: {missing} prompt(s) of {cfg.data.path} have no reference answer to guide with; "
                        "give each a reference (reference_key) or set guide=false")  # fmt: skip
    eval_rows = heldout_questions(cfg, [r["prompt"] for r in rows])
    world, train = world_size(), cfg.train
    answers = train.micro_batch_size * world * train.gradient_accumulation_steps
    if answers % cfg.num_generations:
        raise UserError(f"train.micro_batch_size {train.micro_batch_size} x {world} process(es) x "
                        f"gradient_accumulation_steps {train.gradient_accumulation_steps} = {answers} answers a step: "
                        f"not a multiple of num_generations {cfg.num_generations}")  # fmt: skip
    per_step = answers // cfg.num_generations * cfg.oversample
    if per_step > len(rows):  # trl's sampler would yield no step at all
        raise UserError(f"{cfg.data.path}: {len(rows)} prompts, fewer than the {per_step} a step draws "
                        f"({answers} answers / num_generations {cfg.num_generations} x oversample {cfg.oversample}): "
                        "add prompts or lower train.micro_batch_size or oversample")  # fmt: skip
    checkpoints = out / "checkpoints"
    resume_from = trainer_resume_point(checkpoints, cfg.resume, cfg)
    from accelerate import PartialState

    state = PartialState()
    named = reward_scorers(cfg, state.device)  # imports and loads every reward before training
    weights = cfg.reward_weights or [1.0] * len(named)
    if state.is_main_process:
        begin_stage(out, cfg, fresh=resume_from is None)

    # --- policy; sampling exactly as configured: the model's own generation_config (repetition_penalty, top_k,
    # min_length, ...) would otherwise fill whatever trl leaves unset. Stop at EOS and every end-of-turn token.
    torch.manual_seed(train.seed)
    model = load_pretrained(AutoModelForCausalLM, model_path, cfg.trust_remote_code)
    model.generation_config = GenerationConfig(
        eos_token_id=list(stop_tokens(tokenizer).values()), pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
    )  # fmt: skip
    args = TrlGRPOConfig(
        **training_kwargs(train, cfg.precision, checkpoints), num_generations=cfg.num_generations,
        max_completion_length=cfg.max_new_tokens, temperature=cfg.temperature, top_p=cfg.top_p, top_k=0,
        repetition_penalty=1.0, loss_type=cfg.loss_type, importance_sampling_level=cfg.importance_sampling_level,
        scale_rewards=cfg.scale_rewards, beta=cfg.beta,
        epsilon=cfg.epsilon, epsilon_high=cfg.epsilon_high, num_iterations=cfg.num_iterations,
        mask_truncated_completions=cfg.mask_truncated, reward_weights=weights, disable_dropout=True,
        log_completions=False, eval_strategy="no",
    )  # fmt: skip
    dataset = Dataset.from_list([{"prompt": r["prompt"], "reference": r["reference"]} for r in rows])
    completions_log = None
    if state.is_main_process:
        resume_step = int(resume_from.rsplit("-", 1)[-1]) if resume_from else None
        completions_log = MetricsLog(out / "completions.jsonl", None, resume_step)
    names = [name for name, _ in named]
    reward = weighted_scorer([scorer for _, scorer in named], weights)  # guidance's and the held-out reward
    trainer_class = epoch_seeded(recording(GRPOTrainer, completions_log, names))
    if cfg.guide:
        trainer_class = reference_guidance(trainer_class, reward, partial(reply_ids, tokenizer))
    if cfg.oversample > 1:
        trainer_class = dynamic_sampling(trainer_class, cfg.oversample)
    trainer = trainer_class(
        model=model, reward_funcs=[trl_reward(name, scorer) for name, scorer in named], args=args,
        train_dataset=dataset, processing_class=tokenizer, peft_config=peft_config(cfg.lora),
    )  # fmt: skip
    accelerator = trainer.accelerator
    scorers = {"reward": reward}
    if cfg.eval_task is not None:
        from pipeline.rewards import task_scorer

        scorers["task_metric"] = task_scorer(cfg.eval_task)
    trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    drawn = f" (drawn from {cfg.oversample} x as many)" if cfg.oversample > 1 else ""
    log(f"{len(rows)} prompts, {answers // cfg.num_generations} a step{drawn} x {cfg.num_generations} answers, "
        f"rewards {names} (weights {weights}), loss {cfg.loss_type}, beta {cfg.beta}; {trainable / 1e6:.2f}M trained",
        STAGE)  # fmt: skip

    # --- held-out before (every process answers its share), train, held-out after
    before = None
    if eval_rows:
        before = heldout_metrics(trainer.model, tokenizer, eval_rows, scorers, cfg.eval_max_new_tokens, accelerator)
        log(f"held-out before: exact match {before['exact_match']:.3f}, reward {before['reward']:.3f}", STAGE)
    trainer.add_callback(metrics_jsonl_callback(out, resume_from))
    trainer.add_callback(signal_checks(cfg.warn_zero_signal))
    result = trainer.train(resume_from_checkpoint=resume_from)
    unwrapped = accelerator.unwrap_model(trainer.model)
    after = None
    if eval_rows:
        after = heldout_metrics(unwrapped, tokenizer, eval_rows, scorers, cfg.eval_max_new_tokens, accelerator)

    # --- save the policy, the manifest last
    metrics, facts = {}, launch_facts(accelerator, trainer.model)
    save_trained(trainer, tokenizer, out / "model", cfg.lora.enabled and cfg.lora.merge)
    if accelerator.is_main_process:
        history = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
        history = [h for h in history if "reward" in h]
        window = max(1, len(history) // 5)
        metrics = {
            "steps": result.global_step, "train_loss": result.training_loss, "prompts": len(rows),
            "reward_start": _mean(history[:window], "reward"), "reward_end": _mean(history[-window:], "reward"),
            "zero_signal_share_mean": _mean(history, "frac_reward_zero_std"),
            "zero_signal_share_end": _mean(history[-window:], "frac_reward_zero_std"),
            "trained_signal_share_mean": _mean(history, "trained_signal_share"),
            "guided_share_mean": _mean(history, "guided_share"),
            "truncated_share_mean": _mean(history, "completions/clipped_ratio"),
            "completion_length_end": _mean(history[-window:], "completions/mean_length"),
            "entropy_end": _mean(history[-window:], "entropy"), "kl_end": _mean(history[-window:], "kl"),
            "rewards_end": {n: _mean(history[-window:], f"rewards/{n}/mean") for n in names},
            "heldout_before": before, "heldout_after": after, "resumed_from": resume_from,
            "lora": cfg.lora.enabled, **facts,
        }  # fmt: skip
        inputs = stage_inputs(cfg, "init_from", "data", "eval_data", "eval_task")
        inputs["rewards"] = describe_input([r for r in cfg.rewards if reward_kind(r) in ("task", "model")])
        write_manifest(out, STAGE, inputs, ["model"], metrics, started)
        shown = (f", held-out exact match {before['exact_match']:.3f} -> {after['exact_match']:.3f}, reward "
                 f"{before['reward']:.3f} -> {after['reward']:.3f}") if after else ""  # fmt: skip
        log(f"done: reward {metrics['reward_start']:.3f} -> {metrics['reward_end']:.3f}, groups without signal "
            f"{metrics['zero_signal_share_mean']:.0%}{shown} -> {out / 'model'}", STAGE)  # fmt: skip
    accelerator.wait_for_everyone()
    return metrics


def _mean(rows: list[dict], key: str) -> float | None:
    values = [r[key] for r in rows if r.get(key) is not None]
    return sum(values) / len(values) if values else None
