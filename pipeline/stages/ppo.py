"""PPO stage: classic RLHF (Ouyang et al. 2022) with a learned reward model or a rule reward, on Accelerate.

    llmpipe ppo --config configs/tiny/ppo.yaml [init_from=runs/tiny/sft] [train.steps=50] [kl.target=6]
    launch/run.sh ppo configs/tiny/ppo.yaml launch/accelerate/cpu_2proc.yaml

trl 1.16 has no PPO trainer, so the loop is ours, following Huang et al. 2024 ("The N+ Implementation Details of
RLHF with PPO"); the tensor arithmetic (KL, GAE, losses) lives in pipeline/ppo_core.py. One step: each process
samples responses to its own prompts, scores them (reward model or Python function, a penalty when no stop token
came), adds a per-token KL penalty to the reference, computes GAE advantages, then runs `ppo_epochs` passes of
clipped policy and value updates over minibatches. The prompt order is a pure function of (seed, step), and each
step's sampling is seeded by (seed, step, rank), so `resume: auto` continues the same run.

Produces `output_dir/model/` (AutoModelForCausalLM), `checkpoints/step_N/`, `metrics.jsonl` (one line per step),
`samples.jsonl` (prompt/response/score rows every `sample_every` steps) and a manifest with held-out exact match
and reward before and after.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from pipeline.artifacts import atomic_dir, begin_stage, describe_input, write_manifest
from pipeline.checkpoints import find_resume_point, list_checkpoints, load_checkpoint, save_checkpoint
from pipeline.config import DataConfig, StageFailed, UserError, config, field
from pipeline.data import describe_data, load_prompt_rows, load_reference_answers
from pipeline.modeling import load_pretrained, load_tokenizer, resolve_model_path
from pipeline.ppo_core import (
    KLController,
    entropy_from_logits,
    explained_variance,
    gae,
    kl_estimate,
    leave_one_out,
    masked_mean,
    masked_whiten,
    penalise_missing_stop,
    policy_loss,
    token_logprobs,
    token_rewards,
    value_loss,
)
from pipeline.ppo_rollout import (
    disable_dropout,
    encode_prompts,
    forward_both,
    load_reward_function,
    make_critic,
    make_scorer,
    policy_forward,
    rollout,
    with_value_head,
)
from pipeline.stages.pretrain import BlockSampler, generation_config, make_accelerator
from pipeline.tracking import MetricsLog, log
from pipeline.trl_common import LoraSection, peft_config

STAGE = "ppo"


@config
class RolloutSection:
    max_new_tokens: int = field(16, "Longest response in tokens; responses stop at EOS or end-of-turn.", ge=1)
    temperature: float = field(1.0, "Sampling temperature; the same T divides the logits in training (A6).", gt=0)
    top_p: float = field(1.0, "Nucleus sampling; 1.0 samples the full softmax the loss assumes (A5).", gt=0, le=1)
    max_prompt_length: int = field(128, "Prompts longer than this many tokens are dropped.", ge=1)
    missing_eos_penalty: float | None = field(
        1.0, "Subtracted from the score of a response with no stop token (trl's rule); null: no penalty.", ge=0
    )
    samples_per_prompt: int = field(
        1,
        "Responses sampled per prompt (rollout_batch_size counts responses; each prompt's are on one process).",
        ge=1,
    )


@config
class KLSection:
    coef: float = field(0.05, "KL penalty coefficient beta (the starting value when adaptive).", ge=0)
    estimator: str = field("k1", "Per-token KL estimator: k1 (log ratio) or k3 (non-negative, lower variance).")
    target: float | None = field(None, "Adaptive beta aims at this per-sequence KL in nats; null: fixed beta.", gt=0)
    horizon: int = field(10000, "Adaptive beta's horizon in sequences (Ziegler et al.).", ge=1)
    max: float | None = field(
        20.0, "Guardrail: stop when the mean per-sequence KL to the reference exceeds this (nats).", gt=0
    )

    def check(self) -> list[str]:
        return [] if self.estimator in ("k1", "k3") else [f"estimator: got {self.estimator!r}, expected k1 or k3"]


@config
class PPOTrainConfig:
    seed: int = field(0, "Seed for the prompt order, sampling and new weights.")
    steps: int = field(100, "PPO steps: one rollout batch and its updates each.", ge=1)
    rollout_batch_size: int = field(32, "Prompts per step over all processes.", ge=1)
    ppo_epochs: int = field(4, "Passes over each rollout batch.", ge=1)
    num_minibatches: int = field(2, "Optimizer steps per epoch (the rollout batch split in this many parts).", ge=1)
    micro_batch_size: int = field(8, "Sequences per process per forward pass (gradients accumulate).", ge=1)
    policy_lr: float = field(1e-5, "Policy learning rate (constant).", gt=0)
    value_lr: float = field(1e-5, "Value model learning rate (constant).", gt=0)
    grad_clip: float = field(1.0, "Clip each model's gradient norm to this (0: no clipping).", ge=0)
    clip_range: float = field(0.2, "PPO ratio clip epsilon.", gt=0)
    value_clip_range: float = field(0.2, "Value clip epsilon, around the rollout's values.", gt=0)
    vf_coef: float = field(0.1, "Weight of the value loss in the summed loss.", gt=0)
    gamma: float = field(1.0, "Discount.", ge=0, le=1)
    lam: float = field(0.95, "GAE lambda.", ge=0, le=1)
    whiten_rewards: bool = field(False, "Whiten the per-token rewards (scaled, mean kept) before GAE.")
    score_baseline: str = field(
        "none",
        "none, or loo: subtract from each score the mean score of its prompt's other samples (RLOO's "
        "baseline; needs rollout.samples_per_prompt >= 2) before the KL penalty and GAE.",
    )
    reward_clip: float | None = field(None, "Clip scores to [-c, c] before adding the KL penalty; null: none.", gt=0)
    ratio_range: tuple[float, float] = field(
        (0.2, 5.0), "Guardrail: stop when a minibatch's mean ratio pi/pi_old leaves this range."
    )


@config
class PPOConfig:
    output_dir: str = field(help="Folder for this stage's artifact (model/, checkpoints/, metrics.jsonl, ...).")
    init_from: str = field(help="Policy to start from (and the reference): an sft stage folder or any causal LM.")
    tokenizer: str | None = field(None, "Policy tokenizer (None: the init_from model's).")
    trust_remote_code: bool = field(False, "Allow models that ship their own Python code. Off: safe.")
    reward_model: str | None = field(None, "A reward stage folder or any sequence-classification model (1 score).")
    reward_function: str | None = field(
        None, "Instead of a reward model: 'module:function' taking (prompts, responses) -> list of floats."
    )
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
    precision: str = field("auto", "auto (launch config's; bf16 on GPU, fp32 on CPU), fp32 or bf16.")
    sample_every: int = field(10, "Write a few prompt/response/score rows to samples.jsonl every N steps.", ge=1)
    samples_per_log: int = field(4, "Rows written each time.", ge=1)
    checkpoint_every: int = field(20, "Save a resumable checkpoint every N steps.", ge=1)
    keep_checkpoints: int = field(2, "Keep the newest N checkpoints.", ge=1)
    resume: str = field("auto", "auto (newest checkpoint in output_dir, if any), never, or a checkpoint path.")
    report_to: list[str] = field(factory=list, help="Extra trackers: tensorboard and/or wandb.")

    def check(self) -> list[str]:
        problems = []
        if (self.reward_model is None) == (self.reward_function is None):
            problems.append("set exactly one of reward_model and reward_function "
                            f"(got {self.reward_model!r} and {self.reward_function!r})")  # fmt: skip
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
        if self.train.rollout_batch_size % self.train.num_minibatches:
            problems.append(f"train.rollout_batch_size {self.train.rollout_batch_size} must be a multiple of "
                            f"train.num_minibatches {self.train.num_minibatches}")  # fmt: skip
        return problems


Config = PPOConfig


# --- prompts -----------------------------------------------------------------------------------------------------


def load_prompts(data: DataConfig) -> list:
    """Prompts as message lists or strings: `prompt`, or `messages` without the final assistant turn; each distinct
    prompt once, in file order (a preference file repeats a prompt for every pair)."""
    return [row["prompt"] for row in load_prompt_rows(data)]


def heldout_metrics(model, tokenizer, rows: list[dict], scorer, cfg: PPOConfig) -> dict:
    """Greedy exact match (sft.exact_match) and mean score of the greedy answers on held-out questions."""
    from pipeline.stages.sft import as_messages, exact_match

    match, examples = exact_match(model, tokenizer, rows, cfg.eval_max_new_tokens)
    prompts = [as_messages(r["question"]) for r in rows]
    ids = encode_prompts(tokenizer, prompts)
    greedy = RolloutSection(max_new_tokens=cfg.eval_max_new_tokens, max_prompt_length=cfg.rollout.max_prompt_length)
    scores, no_stop = [], 0
    for start in range(0, len(rows), 32):
        batch = rollout(model, tokenizer, ids[start : start + 32], greedy, greedy=True)
        texts = tokenizer.batch_decode(batch["responses"], skip_special_tokens=True)
        scores += scorer(prompts[start : start + 32], texts)
        no_stop += int((~batch["has_stop"]).sum())
    return {"exact_match": match, "reward": sum(scores) / len(scores), "no_eos_share": no_stop / len(rows),
            "examples": examples}  # fmt: skip


def _step_seed(seed: int, step: int, rank: int) -> int:
    return (seed * 1_000_003 + step) * 1_009 + rank


def _guardrail_message(out: Path, step: int, what: str) -> str:
    kept = list_checkpoints(out / "checkpoints")
    where = f"the last good checkpoint, {kept[-1]}, is intact" if kept else "no checkpoint had been saved yet"
    return (
        f"step {step + 1}: {what}; stopped without saving this step. {where}. Lower train.policy_lr, raise kl.coef "
        "or widen the guardrail (kl.max, train.ratio_range), then run again (resume: auto continues from it)."
    )


# --- run ---------------------------------------------------------------------------------------------------------


def run(cfg: PPOConfig) -> dict | None:
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    # --- check inputs before any compute: tokenizer, prompts, reward, batch arithmetic, resume point
    started = time.time()
    out = Path(cfg.output_dir)
    policy_path = resolve_model_path(cfg.init_from)
    tokenizer = load_tokenizer(cfg.tokenizer or policy_path, cfg.trust_remote_code)
    if tokenizer.pad_token_id is None or tokenizer.pad_token_id == tokenizer.eos_token_id:
        raise UserError(  # A2: with pad == eos the mask would hide every EOS and the policy never learns to stop
            f"tokenizer of {cfg.init_from}: the pad token must exist and differ from EOS "
            f"(pad {tokenizer.pad_token!r}, eos {tokenizer.eos_token!r}); add one, e.g. tokenizer.add_special_tokens"
        )
    prompts = load_prompts(cfg.data)
    if any(isinstance(p, list) for p in prompts) and not tokenizer.chat_template:
        raise UserError(f"tokenizer of {cfg.init_from} has no chat template, but the prompts are conversations")
    prompt_ids = encode_prompts(tokenizer, prompts)
    keep = [i for i, ids in enumerate(prompt_ids) if len(ids) <= cfg.rollout.max_prompt_length]
    if not keep:
        raise UserError(f"data: every prompt is longer than rollout.max_prompt_length {cfg.rollout.max_prompt_length}")
    prompts, prompt_ids = [prompts[i] for i in keep], [prompt_ids[i] for i in keep]
    eval_rows = load_reference_answers(cfg.eval_data, cfg.eval_max) if cfg.eval_data is not None else []
    if cfg.reward_function:
        load_reward_function(cfg.reward_function)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    train = cfg.train
    if train.rollout_batch_size % (world * train.num_minibatches):
        raise UserError(f"train.rollout_batch_size {train.rollout_batch_size} must be a multiple of processes x "
                        f"num_minibatches = {world} x {train.num_minibatches}")  # fmt: skip
    per_rank = train.rollout_batch_size // world
    n_samples = cfg.rollout.samples_per_prompt
    if per_rank % n_samples:
        raise UserError(f"train.rollout_batch_size {train.rollout_batch_size} / {world} process(es) = {per_rank} "
                        f"per process: not a multiple of rollout.samples_per_prompt {n_samples}")  # fmt: skip
    minibatch = per_rank // train.num_minibatches
    resume_from = find_resume_point(out / "checkpoints", cfg.resume)

    accelerator = make_accelerator(cfg, 1, out)
    rank, device = accelerator.process_index, accelerator.device
    if accelerator.is_main_process:
        begin_stage(out, cfg)

    # --- models: policy (+ LoRA), frozen reference, reward model or function, critic
    torch.manual_seed(train.seed)
    policy = load_pretrained(AutoModelForCausalLM, policy_path, cfg.trust_remote_code, "init_from")
    reference = None
    if cfg.lora.enabled:  # the reference is the same weights with the adapters switched off: one frozen base
        from peft import get_peft_model

        policy = get_peft_model(policy, peft_config(cfg.lora))
    else:
        reference = load_pretrained(AutoModelForCausalLM, policy_path, cfg.trust_remote_code, "init_from")
        disable_dropout(reference)
        reference.to(device).eval().requires_grad_(False)
    disable_dropout(policy)
    scorer, _ = make_scorer(cfg, device)
    value_source = cfg.value_model or ("reward" if cfg.reward_model else "policy")
    shared, no_critic = value_source == "head", value_source == "none"
    if no_critic:
        critic, groups = None, [[p for p in policy.parameters() if p.requires_grad], []]
    elif shared:  # one module: DDP must see the trunk once
        policy, critic = with_value_head(policy), None
        groups = [[p for n, p in policy.named_parameters() if p.requires_grad and not n.startswith("value_head")],
                  list(policy.value_head.parameters())]  # fmt: skip
    else:
        value_path = {"reward": cfg.reward_model and resolve_model_path(cfg.reward_model), "policy": policy_path}
        value_model = load_pretrained(AutoModelForSequenceClassification,
                                      resolve_model_path(value_path.get(value_source, value_source)),
                                      cfg.trust_remote_code, "value_model", num_labels=1)  # fmt: skip
        value_model.config.pad_token_id = tokenizer.pad_token_id
        disable_dropout(value_model)
        critic = make_critic(value_model)
        groups = [[p for p in policy.parameters() if p.requires_grad], list(critic.parameters())]
    lrs = [{"params": groups[0], "lr": train.policy_lr}, {"params": groups[1], "lr": train.value_lr}]
    optimizer = torch.optim.AdamW([g for g in lrs if g["params"]], weight_decay=0.0, eps=1e-5)
    if shared or no_critic:
        policy, optimizer = accelerator.prepare(policy, optimizer)
    else:
        policy, critic, optimizer = accelerator.prepare(policy, critic, optimizer)
        critic.train()
    policy.train()  # dropout is off, so train mode changes nothing but what peft/DDP expect
    trainable = sum(p.numel() for p in policy.parameters() if p.requires_grad)
    log(f"{len(prompts)} prompts ({len(keep)} kept), {world} process(es) x {per_rank} per step; policy "
        f"{trainable / 1e6:.2f}M trained, " + ("no critic" if no_critic else f"critic from {value_source}"),
        STAGE)  # fmt: skip

    def forward(model, critic, rows):  # response logits and values (zeros without a critic)
        if no_critic:
            logits = policy_forward(model, batch, rows, cfg.rollout.temperature)
            return logits, torch.zeros(logits.shape[:2], device=logits.device)
        return forward_both(model, critic, batch, rows, cfg.rollout.temperature)

    def unwrapped():  # the causal LM itself, for generation, the reference pass and saving
        model = accelerator.unwrap_model(policy)
        return model.policy if shared else model

    kl_controller = KLController(cfg.kl.coef, cfg.kl.target, cfg.kl.horizon)
    start_step, state = 0, {}
    if resume_from is not None:
        state = load_checkpoint(accelerator, resume_from)
        start_step = state["step"]
        kl_controller.load_state_dict(state["kl_controller"])
        log(f"resumed from {resume_from} at step {start_step}", STAGE)
    before = state.get("heldout_before")
    if before is None and eval_rows and accelerator.is_main_process:
        before = heldout_metrics(unwrapped(), tokenizer, eval_rows, scorer, cfg)
        log(f"held-out before: exact match {before['exact_match']:.3f}, reward {before['reward']:.3f}", STAGE)
    if cfg.report_to:
        accelerator.init_trackers("llmpipe-ppo", config={"output_dir": str(out)})
    resume_step = start_step if resume_from else None
    metrics_log = MetricsLog(out / "metrics.jsonl", accelerator, resume_step)
    samples_log = MetricsLog(out / "samples.jsonl", None, resume_step)
    sampler = BlockSampler(len(prompts), train.seed, per_rank // n_samples, world, 1)
    seconds = state.get("seconds", {"rollout": 0.0, "scoring": 0.0, "update": 0.0, "generated_tokens": 0})

    # --- train
    for step in range(start_step, train.steps):
        # --- rollout: this rank's prompts, sampled with a generator seeded by (seed, step, rank)
        t0 = time.perf_counter()
        indices = sampler.indices(step, 0, rank).repeat(n_samples).tolist()  # a prompt's samples adjacent
        batch_prompts = [prompts[i] for i in indices]
        torch.manual_seed(_step_seed(train.seed, step, rank))
        batch = rollout(unwrapped(), tokenizer, [prompt_ids[i] for i in indices], cfg.rollout)
        t1 = time.perf_counter()

        # --- scoring: rollout log-probs, reference log-probs, values, scores; then rewards and advantages
        responses, mask = batch["responses"], batch["mask"].float()
        with torch.no_grad():
            old_logprobs, ref_logprobs, values = [], [], []
            for rows in torch.arange(per_rank).split(train.micro_batch_size):
                logits, rollout_values = forward(
                    accelerator.unwrap_model(policy), critic and accelerator.unwrap_model(critic), rows
                )
                old_logprobs.append(token_logprobs(logits, responses[rows]))
                values.append(rollout_values)
                if reference is None:
                    with unwrapped().disable_adapter():
                        ref_logits = policy_forward(unwrapped(), batch, rows, cfg.rollout.temperature)
                else:
                    ref_logits = policy_forward(reference, batch, rows, cfg.rollout.temperature)
                ref_logprobs.append(token_logprobs(ref_logits, responses[rows]))
            old_logprobs, ref_logprobs, values = torch.cat(old_logprobs), torch.cat(ref_logprobs), torch.cat(values)
            texts = tokenizer.batch_decode(responses, skip_special_tokens=True)
            raw_scores = torch.tensor(scorer(batch_prompts, texts), dtype=torch.float32, device=device)
            scores = raw_scores.clamp(-train.reward_clip, train.reward_clip) if train.reward_clip else raw_scores
            scores = penalise_missing_stop(scores, batch["has_stop"], cfg.rollout.missing_eos_penalty)
            if train.score_baseline == "loo":
                scores = leave_one_out(scores, n_samples)
            kl = kl_estimate(old_logprobs, ref_logprobs, cfg.kl.estimator) * mask
            rewards = token_rewards(scores, kl, kl_controller.coef, batch["last_index"], mask)
            if train.whiten_rewards:
                rewards = masked_whiten(rewards, mask, shift_mean=False)
            advantages, returns = gae(rewards, values, mask, train.gamma, 1.0 if no_critic else train.lam)
            advantages = masked_whiten(advantages, mask)
        sequence_kl = accelerator.reduce(kl.sum(1).mean(), "mean").item()
        if cfg.kl.max is not None and sequence_kl > cfg.kl.max:
            raise StageFailed(_guardrail_message(out, step, f"KL to the reference {sequence_kl:.3f} > kl.max "
                                                 f"{cfg.kl.max}"))  # fmt: skip
        t2 = time.perf_counter()

        # --- update: ppo_epochs passes, a fresh permutation each, one optimizer step per minibatch
        stats: dict[str, list] = {}  # per micro-batch: policy terms, and the critic's when there is one
        order_generator = torch.Generator().manual_seed(_step_seed(train.seed, step, rank))
        for _epoch in range(train.ppo_epochs):
            order = torch.randperm(per_rank, generator=order_generator)
            for part in order.split(minibatch):
                check = torch.zeros(3, device=device)  # summed loss, mean ratio, non-finite count
                for rows in part.split(train.micro_batch_size):
                    logits, new_values = forward(policy, critic, rows)
                    new_logprobs = token_logprobs(logits, responses[rows])
                    pg_loss, pg_stats = policy_loss(new_logprobs, old_logprobs[rows], advantages[rows], mask[rows],
                                                    train.clip_range)  # fmt: skip
                    loss, terms = pg_loss, {"pg_loss": pg_loss, **pg_stats}
                    if not no_critic:
                        vf_loss, vf_stats = value_loss(new_values, values[rows], returns[rows], mask[rows],
                                                       train.value_clip_range)  # fmt: skip
                        loss, terms = loss + train.vf_coef * vf_loss, {**terms, "vf_loss": vf_loss, **vf_stats}
                    loss = loss * len(rows) / len(part)  # sequence-weighted mean
                    accelerator.backward(loss)
                    with torch.no_grad():
                        terms["entropy"] = masked_mean(entropy_from_logits(logits), mask[rows])
                    for key, value in terms.items():
                        stats.setdefault(key, []).append(float(value.detach()))
                    check += torch.stack([loss.detach(), pg_stats["ratio"] * len(rows) / len(part),
                                          (~torch.isfinite(loss.detach())).float()])  # fmt: skip
                check = accelerator.reduce(check, "mean")
                low, high = train.ratio_range
                if check[2] > 0:
                    raise StageFailed(_guardrail_message(out, step, f"non-finite loss {check[0].item():.4g}"))
                if not low <= check[1].item() <= high:
                    raise StageFailed(_guardrail_message(out, step, f"mean ratio {check[1].item():.3f} left "
                                                         f"train.ratio_range {[low, high]}"))  # fmt: skip
                if train.grad_clip:
                    accelerator.clip_grad_norm_(policy.parameters(), train.grad_clip)
                    if critic is not None:
                        accelerator.clip_grad_norm_(critic.parameters(), train.grad_clip)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
        t3 = time.perf_counter()

        # --- metrics, averaged over processes; the KL controller sees the global per-sequence KL
        lengths = batch["mask"].sum(1).float()
        local = {
            "reward": raw_scores.mean(), "reward_with_kl": (scores - kl_controller.coef * kl.sum(1)).mean(),
            "kl": kl.sum(1).mean(), "response_length": lengths.mean(),
            "no_eos_share": (~batch["has_stop"]).float().mean(),
            **({} if no_critic else {"explained_variance": torch.tensor(explained_variance(values, returns, mask))}),
            **{k: torch.tensor(sum(v) / len(v)) for k, v in stats.items()},
        }  # fmt: skip
        reduced = accelerator.reduce(torch.stack([v.float().to(device) for v in local.values()]), "mean").tolist()
        row = dict(zip(local, reduced, strict=True))
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
        kl_controller.update(row["kl"], train.rollout_batch_size)
        done = step + 1
        metrics_log.write(done, row)
        log(f"step {done}/{train.steps}: reward {row['reward']:.3f}, kl {row['kl']:.3f} (beta {row['kl_coef']:.3f}), "
            f"entropy {row['entropy']:.2f}, clipfrac {row['clipfrac']:.3f}, length {row['response_length']:.1f}, "
            f"{t3 - t0:.1f} s", STAGE)  # fmt: skip
        if step % cfg.sample_every == 0 or done == train.steps:
            for i in range(min(cfg.samples_per_log, per_rank)):
                samples_log.write(
                    done,
                    {
                        "prompt": batch_prompts[i],
                        "response": texts[i],
                        "score": float(raw_scores[i]),
                        "stopped": bool(batch["has_stop"][i]),
                    },
                )
        if done % cfg.checkpoint_every == 0 or done == train.steps:
            save_checkpoint(accelerator, out / "checkpoints", done, {"kl_controller": kl_controller.state_dict(),
                            "heldout_before": before, "seconds": seconds}, cfg.keep_checkpoints)  # fmt: skip

    # --- held-out after, save the policy, the manifest last
    checksum = sum(p.detach().double().sum() for p in unwrapped().parameters())
    checksums = accelerator.gather(checksum.reshape(1).to(device)).tolist()
    metrics = {}
    if accelerator.is_main_process:
        after = heldout_metrics(unwrapped(), tokenizer, eval_rows, scorer, cfg) if eval_rows else None
        model = unwrapped()
        if cfg.lora.enabled and cfg.lora.merge:
            model = model.merge_and_unload()
        with atomic_dir(out / "model") as tmp:
            model.save_pretrained(tmp, safe_serialization=True)
            tokenizer.save_pretrained(tmp)
            generation_config(tokenizer).save_pretrained(tmp)
        history = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
        window = max(1, len(history) // 5)
        metrics = {
            "steps": train.steps, "world_size": world, "distributed_type": str(accelerator.distributed_type.value),
            "mixed_precision": str(accelerator.mixed_precision),
            "reward_start": _mean(history[:window], "reward"), "reward_end": _mean(history[-window:], "reward"),
            "kl_end": _mean(history[-window:], "kl"), "kl_max_seen": max(r["kl"] for r in history),
            "kl_coef_end": kl_controller.coef, "no_eos_share_end": _mean(history[-window:], "no_eos_share"),
            "heldout_before": before, "heldout_after": after,
            "rollout_seconds": seconds["rollout"], "scoring_seconds": seconds["scoring"],
            "update_seconds": seconds["update"],
            "rollout_tokens_per_second": seconds["generated_tokens"] / max(seconds["rollout"], 1e-9),
            "first_step_prompts_by_rank": history[0]["prompt_indices"] if not resume_from else None,
            "resumed_from_step": start_step if resume_from else None, "param_checksum_by_rank": checksums,
            "value_model": value_source, "lora": cfg.lora.enabled, "prompts": len(prompts),
        }  # fmt: skip
        inputs = {"init_from": describe_input(cfg.init_from), "data": describe_data(cfg.data)}
        if cfg.reward_model:
            inputs["reward_model"] = describe_input(cfg.reward_model)
        if cfg.eval_data is not None:
            inputs["eval_data"] = describe_data(cfg.eval_data)
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
