"""PPO stage: classic RLHF (Ouyang et al. 2022) with a learned reward model or a rule reward, on Accelerate.

    llmpipe ppo --config configs/tiny/ppo.yaml [init_from=runs/tiny/sft] [train.steps=50] [kl.target=6]
    launch/run.sh ppo configs/tiny/ppo.yaml launch/accelerate/cpu_2proc.yaml

trl 1.16 has no PPO trainer, so the loop is ours, following Huang et al. 2024 ("The N+ Implementation Details of
RLHF with PPO"); the tensor arithmetic (KL, GAE, losses) lives in pipeline/rl/core.py. One step: each process
samples responses to its own prompts, scores them (a reward model; a rule given each prompt's reference answer; or
both, added or each data file's prompts routed to one; a penalty when no stop token came), adds a per-token KL
penalty to the reference, computes GAE advantages, then runs `ppo_epochs` passes of clipped policy and value
updates over minibatches. The prompt order is a pure function of (seed, step), and each step's sampling is seeded
by (seed, step, rank), so `resume: auto` continues the same run.

Produces `output_dir/model/` (AutoModelForCausalLM), `checkpoints/step_N/`, `metrics.jsonl` (one line per step),
`samples.jsonl` (prompt/response/score rows every `sample_every` steps) and a manifest with held-out exact match
and reward before and after.
"""

from __future__ import annotations

import functools
import json
import time
from pathlib import Path

from pipeline.artifacts import atomic_dir, begin_stage, write_manifest
from pipeline.batches import BlockSampler
from pipeline.checkpoints import find_resume_point, load_checkpoint, save_checkpoint
from pipeline.config import DataConfig, UserError, config, field
from pipeline.data import stage_inputs
from pipeline.distributed import launch_facts, make_accelerator, world_size
from pipeline.formats import load_documents, load_prompt_rows, load_reference_answers, overlap_problem
from pipeline.generation import encode_prompts, heldout_metrics, rollout, take_rows
from pipeline.modeling import (
    LoraSection,
    model_and_tokenizer,
    save_model,
)
from pipeline.rewards import ROUTES, load_reward_function, routed_scores
from pipeline.rl.core import KLController, groups_with_signal, pick_groups
from pipeline.rl.ppo import (
    KLSection,
    PPOTrainConfig,
    PtxSection,
    RolloutSection,
    guardrail,
    ppo_update,
    score_rollout,
    step_metrics,
    step_seed,
)
from pipeline.rl.ppo_setup import build_models, ptx_batches
from pipeline.tracking import MetricsLog, log

STAGE = "ppo"


@config
class PPOConfig:
    output_dir: str = field(help="Folder for this stage's artifact (model/, checkpoints/, metrics.jsonl, ...).")
    init_from: str = field(help="Policy to start from (and the reference): an sft stage folder or any causal LM.")
    tokenizer: str | None = field(None, "Policy tokenizer (None: the init_from model's).")
    trust_remote_code: bool = field(False, "Allow models that ship their own Python code. Off: safe.")
    reward_model: str | None = field(None, "A reward stage folder or any sequence-classification model (1 score).")
    reward_function: str | None = field(
        None, "Instead of, or beside, a reward model: exact_match (the answer equals the prompt's reference after "
        "strip(): 1, else 0), math_verify (its final value equals the reference's) or 'module:function' taking "
        "(prompts, responses[, references=]) -> one float per response.",
    )  # fmt: skip
    reward_by_source: list[str] | None = field(
        None, "With both reward_model and reward_function: what scores each data.path entry's prompts, one per "
        "entry: model, function, or sum (the model's score plus the function's, as open-instruct's RLVR adds a "
        "verifiable reward to a reward model's); e.g. [model, function] for chat prompts and math problems. "
        "None: sum on every prompt.",
    )  # fmt: skip
    reward_function_weight: float = field(
        1.0, "The reward function's score times this, beside a reward model's (open-instruct's RLVR: 10).", gt=0
    )
    reference_key: str | None = field(
        None, "Column of data with each prompt's reference answer for reward_function (None: the final "
        "assistant turn of `messages`, else the first of chosen, answer, reference, solution present).",
    )  # fmt: skip
    value_model: str | None = field(
        None, "Critic: 'reward' (a copy of the reward model, N+), 'policy' (a copy of the policy's body + new head), "
        "'head' (a value head on the policy itself, shared trunk), a path, or 'none' (no critic: each token's "
        "advantage is its reward-to-go, V = 0 and lambda = 1, whitened; pair with train.score_baseline loo); "
        "None: 'reward' with a reward model, else 'policy'.",
    )  # fmt: skip
    data: DataConfig = field(help="Prompts: `prompt` (string or message list) or `messages` (all but the answer).")
    eval_data: DataConfig | None = field(
        None,
        "Held-out prompts with a reference answer: `question`/`answer` rows, or preference pairs (`prompt` + "
        "`chosen`, e.g. the reward stage's eval_data); greedy exact match and reward before/after.",
    )
    eval_max: int = field(100, "Use at most this many eval_data rows.", ge=1)
    eval_max_new_tokens: int = field(16, "Longest greedy answer on eval_data.", ge=1)
    lora: LoraSection = field(factory=LoraSection, help="LoRA policy; the reference is it with adapters off.")
    rollout: RolloutSection = field(factory=RolloutSection, help="Sampling.")
    kl: KLSection = field(factory=KLSection, help="KL penalty to the reference.")
    train: PPOTrainConfig = field(factory=PPOTrainConfig, help="Optimisation.")
    ptx: PtxSection = field(factory=PtxSection, help="PPO-ptx: a pretraining-loss term in every update (InstructGPT).")
    precision: str = field("auto", "auto (launch config's; bf16 on GPU, fp32 on CPU), fp32 or bf16.")
    sample_every: int = field(10, "Write a few prompt/response/score rows to samples.jsonl every N steps.", ge=1)
    samples_per_log: int = field(4, "Rows written each time.", ge=1)
    checkpoint_every: int = field(20, "Save a resumable checkpoint every N steps.", ge=1)
    keep_checkpoints: int = field(2, "Keep the newest N checkpoints.", ge=1)
    resume: str = field("auto", "auto (newest checkpoint in output_dir, if any), never, or a checkpoint path.")
    report_to: list[str] = field(factory=list, help="Extra trackers: tensorboard and/or wandb.")

    def check(self) -> list[str]:
        problems = []
        if self.reward_model is None and self.reward_function is None:
            problems.append("set reward_model, reward_function or both (both are null)")
        if self.reward_by_source is not None:
            if self.reward_model is None or self.reward_function is None:
                problems.append("reward_by_source routes prompts between a reward model and a reward function: set "
                                "both reward_model and reward_function, or leave reward_by_source null")  # fmt: skip
            if len(self.reward_by_source) != len(self.data.paths):
                problems.append(f"reward_by_source: {len(self.reward_by_source)} value(s) for "
                                f"{len(self.data.paths)} data.path entries; give one per entry")  # fmt: skip
            problems += [f"reward_by_source: {r!r} is not one of {', '.join(ROUTES)}"
                         for r in self.reward_by_source if r not in ROUTES]  # fmt: skip
            if self.data.streaming and len(set(self.reward_by_source)) > 1:
                problems.append("reward_by_source: data.streaming reads data.path's files as one stream, so they "
                                "cannot be scored differently; set data.streaming: false")  # fmt: skip
        if self.value_model == "reward" and self.reward_model is None:
            problems.append("value_model 'reward' needs a reward_model; use value_model: policy")
        if self.precision not in ("auto", "fp32", "bf16"):
            problems.append(f"precision: got {self.precision!r}, expected auto, fp32 or bf16")
        low, high = self.train.ratio_range
        if not 0 < low < 1 < high:
            problems.append(f"train.ratio_range: got {[low, high]}, expected 0 < low < 1 < high")
        if self.train.score_baseline not in ("none", "loo"):
            problems.append(f"train.score_baseline: got {self.train.score_baseline!r}, expected none or loo")
        if self.train.score_baseline == "loo" and self.rollout.samples_per_prompt < 2:
            problems.append("train.score_baseline loo needs rollout.samples_per_prompt >= 2 (got "
                            f"{self.rollout.samples_per_prompt})")  # fmt: skip
        if self.rollout.oversample > 1 and self.rollout.samples_per_prompt < 2:
            problems.append("rollout.oversample > 1 keeps prompts whose samples scored differently: it needs "
                            f"rollout.samples_per_prompt >= 2 (got {self.rollout.samples_per_prompt})")  # fmt: skip
        if self.train.rollout_batch_size % self.train.num_minibatches:
            problems.append(f"train.rollout_batch_size {self.train.rollout_batch_size} must be a multiple of "
                            f"train.num_minibatches {self.train.num_minibatches}")  # fmt: skip
        return problems


Config = PPOConfig


# --- prompts and held-out questions ------------------------------------------------------------------------------


def source_routes(cfg: PPOConfig) -> list[str]:
    """What scores each data.path entry's prompts (rewards.ROUTES): reward_by_source, else the one reward set, or
    the sum of both."""
    if cfg.reward_by_source is not None:
        return list(cfg.reward_by_source)
    return [("sum" if cfg.reward_function else "model") if cfg.reward_model else "function"] * len(cfg.data.paths)


def load_prompts(cfg: PPOConfig, chat: bool) -> tuple[list, list, list]:
    """Prompts as message lists or strings (load_prompt_rows: `prompt`, `messages` without the final assistant turn,
    `question` or `problem`, asked as a user turn to a chat model), each distinct prompt once, in file order (a
    preference file repeats a prompt for every pair), each one's reference answer (None where the rows have
    none; exact_match and math_verify need one on every prompt they score) and its route (source_routes)."""
    routes = source_routes(cfg)
    needs = [[cfg.reward_function] if route != "model" else [] for route in routes]
    rows = load_prompt_rows(cfg.data, cfg.reference_key, chat=chat, source_rewards=needs)
    return [row["prompt"] for row in rows], [row["reference"] for row in rows], [routes[r["source"]] for r in rows]


# --- run ---------------------------------------------------------------------------------------------------------


def run(cfg: PPOConfig) -> dict | None:
    import torch

    # --- check inputs before any compute: tokenizer, prompts, reward, batch arithmetic, resume point
    started = time.time()
    out = Path(cfg.output_dir)
    # A2: pad may equal EOS (Llama 3, SmolLM, Qwen base models): every mask here is built from positions (left
    # padding from prompt lengths, the response up to its first stop token), never from `ids != pad`
    policy_path, tokenizer = model_and_tokenizer(cfg.init_from, cfg.tokenizer, cfg.trust_remote_code, True)
    prompts, references, routes = load_prompts(cfg, chat=bool(tokenizer.chat_template))
    if any(isinstance(p, list) for p in prompts) and not tokenizer.chat_template:
        raise UserError(f"tokenizer of {cfg.init_from} has no chat template, but the prompts are conversations")
    prompt_ids = encode_prompts(tokenizer, prompts)
    keep = [i for i, ids in enumerate(prompt_ids) if len(ids) <= cfg.rollout.max_prompt_length]
    if not keep:
        raise UserError(f"data: every prompt is longer than rollout.max_prompt_length {cfg.rollout.max_prompt_length}")
    prompts, prompt_ids, references, routes = ([items[i] for i in keep]
                                               for items in (prompts, prompt_ids, references, routes))  # fmt: skip
    eval_rows = load_reference_answers(cfg.eval_data, cfg.eval_max) if cfg.eval_data is not None else []
    problem = overlap_problem("eval_data", prompts, eval_rows, cfg.data.path)
    if problem:
        raise UserError(problem)
    # the rule is imported and checked before any compute; the reward model is loaded with the other models
    function_scorer = load_reward_function(cfg.reward_function, "reward_function") if cfg.reward_function else None
    ptx_docs = load_documents(cfg.ptx.data, tokenizer) if cfg.ptx.coef > 0 else None
    world, train = world_size(), cfg.train
    if train.rollout_batch_size % (world * train.num_minibatches):
        raise UserError(f"train.rollout_batch_size {train.rollout_batch_size} must be a multiple of processes x "
                        f"num_minibatches = {world} x {train.num_minibatches}")  # fmt: skip
    per_rank = train.rollout_batch_size // world
    n_samples = cfg.rollout.samples_per_prompt
    if per_rank % n_samples:
        raise UserError(f"train.rollout_batch_size {train.rollout_batch_size} / {world} process(es) = {per_rank} "
                        f"per process: not a multiple of rollout.samples_per_prompt {n_samples}")  # fmt: skip
    resume_from = find_resume_point(out / "checkpoints", cfg.resume, cfg)  # another config's: refused

    accelerator = make_accelerator(cfg.precision, out, cfg.report_to)
    rank, device = accelerator.process_index, accelerator.device
    if accelerator.is_main_process:
        begin_stage(out, cfg, fresh=resume_from is None)  # a fresh run never leaves an older run's steps behind

    # --- models, controller, resume point, held-out numbers before training
    models, optimizer, model_scorer = build_models(cfg, tokenizer, policy_path, accelerator)
    trainable = sum(getattr(p, "ds_numel", p.numel()) for p in models.causal_lm().parameters() if p.requires_grad)
    critic = "no critic" if models.critic_source == "none" else f"critic from {models.critic_source}"
    log(f"{len(prompts)} prompts ({len(keep)} kept), {world} process(es) x {per_rank} per step; policy "
        f"{trainable / 1e6:.2f}M trained, {critic}", STAGE)  # fmt: skip
    kl_controller = KLController(cfg.kl.coef, cfg.kl.target, cfg.kl.horizon)
    start_step, state = 0, {}
    if resume_from is not None:
        state = load_checkpoint(accelerator, resume_from)
        start_step = state["step"]
        kl_controller.load_state_dict(state["kl_controller"])
        log(f"resumed from {resume_from} at step {start_step}", STAGE)
    before = state.get("heldout_before")
    verifiable = any(route != "model" for route in routes)  # the function's right-answer rate is logged apart
    score = functools.partial(routed_scores, model_scorer=model_scorer, function_scorer=function_scorer,
                              function_weight=cfg.reward_function_weight)  # fmt: skip
    # held-out "reward": the reward model's score where there is one (the function's is the exact match beside it)
    evaluate = functools.partial(heldout_metrics, tokenizer=tokenizer, rows=eval_rows,
                                 scorers={"reward": model_scorer or function_scorer},
                                 max_new_tokens=cfg.eval_max_new_tokens, accelerator=accelerator)  # fmt: skip
    if before is None and eval_rows:
        before = evaluate(models.causal_lm())
        log(f"held-out before: exact match {before['exact_match']:.3f}, reward {before['reward']:.3f}", STAGE)
    if cfg.report_to:
        accelerator.init_trackers("llmpipe-ppo", config={"output_dir": str(out)})
    resume_step = start_step if resume_from else None
    metrics_log = MetricsLog(out / "metrics.jsonl", accelerator, resume_step)
    samples_log = MetricsLog(out / "samples.jsonl", None, resume_step)
    groups = per_rank // n_samples  # prompts a step trains on, per process; oversample x that many are sampled
    sampler = BlockSampler(len(prompts), train.seed, groups * cfg.rollout.oversample, world, 1)
    seconds = state.get("seconds", {"rollout": 0.0, "scoring": 0.0, "update": 0.0, "generated_tokens": 0})
    ptx = None if ptx_docs is None else ptx_batches(cfg.ptx, train.seed, ptx_docs, tokenizer, world, rank, device)

    # --- train: rollout, scoring, update, metrics
    for step in range(start_step, train.steps):
        t0 = time.perf_counter()  # this rank's prompts, sampled with a generator seeded by (seed, step, rank)
        indices = sampler.indices(step, 0, rank).repeat(n_samples).tolist()  # a prompt's samples adjacent
        torch.manual_seed(step_seed(train.seed, step, rank))
        with accelerator.autocast():  # sampled in the precision the log-probs are computed in
            batch = rollout(models.causal_lm(), tokenizer, [prompt_ids[i] for i in indices],
                            cfg.rollout.max_new_tokens, cfg.rollout.temperature, cfg.rollout.top_p,
                            group=n_samples)  # fmt: skip
        t1 = time.perf_counter()
        texts = tokenizer.batch_decode(batch["responses"], skip_special_tokens=True)
        scores, verified = score([prompts[i] for i in indices], texts, [references[i] for i in indices],
                                 [routes[i] for i in indices])  # fmt: skip
        raw_scores = torch.tensor(scores, dtype=torch.float32)
        drawn = {"reward": raw_scores.mean()}
        if verifiable:  # over every process's function-scored samples: the same number on each
            right = [v for v in verified if v is not None]
            right = torch.tensor([sum(right), len(right)], device=device, dtype=torch.float32)
            total = accelerator.reduce(right, "sum")
            drawn["function_score"] = total[0] / total[1].clamp(min=1)
        if n_samples > 1:
            signal = groups_with_signal(raw_scores, n_samples)
            kept_groups = pick_groups(signal, groups)
            drawn.update(signal_share=signal.float().mean(), trained_signal_share=signal[kept_groups].float().mean())
            rows = [g * n_samples + k for g in kept_groups for k in range(n_samples)]
            if len(rows) < len(indices):
                batch, indices = take_rows(batch, rows), [indices[r] for r in rows]
                texts, raw_scores = [texts[r] for r in rows], raw_scores[rows]
        scored = score_rollout(models, batch, texts, raw_scores, kl_controller.coef, cfg.rollout, cfg.kl, train)
        t2 = time.perf_counter()
        kl_loss_coef = kl_controller.coef if cfg.kl.placement == "loss" else 0.0
        stats = ppo_update(models, optimizer, batch, scored, cfg.rollout.temperature, train, step, out / "checkpoints",
                           kl_loss_coef, ptx, cfg.ptx.coef)  # fmt: skip
        t3 = time.perf_counter()
        # the rollout policy's KL (on_policy: measured in the update's own pass); the step is not saved past this
        sequence_kl = accelerator.reduce(scored["kl"].sum(1).mean(), "mean").item()
        if cfg.kl.max is not None and sequence_kl > cfg.kl.max:
            raise guardrail(out / "checkpoints", step, f"KL to the reference {sequence_kl:.3f} > kl.max {cfg.kl.max}")

        row = step_metrics(models, batch, scored, stats, kl_controller.coef, drawn)
        generated = int(accelerator.reduce(torch.tensor(batch["generated_tokens"], device=device), "sum"))
        seconds = {
            "rollout": seconds["rollout"] + t1 - t0,
            "scoring": seconds["scoring"] + t2 - t1,
            "update": seconds["update"] + t3 - t2,
            "generated_tokens": seconds["generated_tokens"] + generated,
        }
        row.update(kl_coef=kl_controller.coef, rollout_seconds=t1 - t0, scoring_seconds=t2 - t1,
                   update_seconds=t3 - t2, rollout_tokens_per_second=generated / (t1 - t0),
                   prompt_indices=accelerator.gather(torch.tensor(indices, device=device)).tolist())  # fmt: skip
        kl_controller.update(row["kl"], train.rollout_batch_size)  # the global per-sequence KL
        done = step + 1
        metrics_log.write(done, row)
        log(f"step {done}/{train.steps}: reward {row['reward']:.3f}, kl {row['kl']:.3f} (beta {row['kl_coef']:.3f}), "
            f"entropy {row['entropy']:.2f}, clipfrac {row['clipfrac']:.3f}, length {row['response_length']:.1f}, "
            + (f"ptx loss {row['ptx_loss']:.3f}, " if ptx else "") + f"{t3 - t0:.1f} s", STAGE)  # fmt: skip
        if step % cfg.sample_every == 0 or done == train.steps:
            for i in range(min(cfg.samples_per_log, per_rank)):
                samples_log.write(done, {"prompt": prompts[indices[i]], "response": texts[i],
                                         "score": float(scored["raw_scores"][i]),
                                         "stopped": bool(batch["has_stop"][i])})  # fmt: skip
        if done % cfg.checkpoint_every == 0 or done == train.steps:
            save_checkpoint(accelerator, out / "checkpoints", done, {"kl_controller": kl_controller.state_dict(),
                            "heldout_before": before, "seconds": seconds}, cfg.keep_checkpoints)  # fmt: skip

    # --- held-out after, save the policy, the manifest last
    facts = launch_facts(accelerator, models.causal_lm())
    metrics = {}
    after = evaluate(models.causal_lm()) if eval_rows else None
    state_dict = models.policy_state_dict()  # on every process: ZeRO-3 gathers the shards
    if accelerator.is_main_process:
        with atomic_dir(out / "model") as tmp:
            save_model(models.causal_lm(), tokenizer, tmp, cfg.lora.enabled and cfg.lora.merge, state_dict=state_dict)
        history = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
        window = max(1, len(history) // 5)
        metrics = {
            "steps": train.steps,
            "reward_start": _mean(history[:window], "reward"), "reward_end": _mean(history[-window:], "reward"),
            "kl_end": _mean(history[-window:], "kl"), "kl_max_seen": max(r["kl"] for r in history),
            "kl_coef_end": kl_controller.coef, "no_eos_share_end": _mean(history[-window:], "no_eos_share"),
            **({"ptx_loss_start": _mean(history[:window], "ptx_loss"),
                "ptx_loss_end": _mean(history[-window:], "ptx_loss")} if ptx else {}),
            **({"function_score_start": _mean(history[:window], "function_score"),
                "function_score_end": _mean(history[-window:], "function_score")} if verifiable else {}),
            "prompts_by_reward": {route: routes.count(route) for route in ROUTES if route in routes},
            "heldout_before": before, "heldout_after": after,
            "rollout_seconds": seconds["rollout"], "scoring_seconds": seconds["scoring"],
            "update_seconds": seconds["update"],
            "rollout_tokens_per_second": seconds["generated_tokens"] / max(seconds["rollout"], 1e-9),
            "first_step_prompts_by_rank": history[0]["prompt_indices"] if not resume_from else None,
            "resumed_from_step": start_step if resume_from else None,
            "value_model": models.critic_source, "lora": cfg.lora.enabled, "prompts": len(prompts), **facts,
        }  # fmt: skip
        inputs = stage_inputs(cfg, "init_from", "data", "reward_model", "eval_data", *(["ptx.data"] if ptx else []))
        write_manifest(out, STAGE, inputs, ["model"], metrics, started)
        shown = (f", held-out exact match {before['exact_match']:.3f} -> {after['exact_match']:.3f}, reward "
                 f"{before['reward']:.3f} -> {after['reward']:.3f}") if after else ""  # fmt: skip
        log(f"done: reward {metrics['reward_start']:.3f} -> {metrics['reward_end']:.3f}, kl {metrics['kl_end']:.3f}"
            f"{shown} -> {out / 'model'}", STAGE)  # fmt: skip
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return metrics


def _mean(rows: list[dict], key: str) -> float:
    return sum(r[key] for r in rows) / len(rows)
