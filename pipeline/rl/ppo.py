"""The PPO step for language models, as the ppo command runs it: its config sections, the models it works with
(the critic's kind decided once), scoring a rollout (log-probs, KL-penalised rewards, GAE), the clipped update over
minibatches with its guardrails, and the step's metrics averaged over processes."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from pipeline.checkpoints import stopped_message
from pipeline.config import DataConfig, StageFailed, config, field
from pipeline.rl.core import (
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
    token_normalised,
    token_rewards,
    value_loss,
)
from pipeline.rl.policy import logits_and_values, policy_forward

# --- config sections ----------------------------------------------------------------------------------------------


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
    oversample: int = field(
        1,
        "DAPO's dynamic sampling: sample this many times the step's prompts and train on the prompts whose "
        "samples scored differently (with a leave-one-out baseline the others add nothing), filling up with the "
        "rest only where too few did; 1: off. Needs samples_per_prompt >= 2.",
        ge=1,
    )


@config
class KLSection:
    coef: float = field(0.05, "KL penalty coefficient beta (the starting value when adaptive).", ge=0)
    placement: str = field(
        "reward",
        "reward: -beta * KL at every response token joins the reward (classic RLHF, N+; needs estimator k1); "
        "loss: beta * KL of the current policy is added to the policy loss (GRPO's form; needs estimator k3).",
    )
    estimator: str = field(
        "k1",
        "Per-token KL estimator: k1 (log ratio) or k3 (non-negative, lower variance). As a reward only k1 has the "
        "KL's gradient; as a loss k1's expected gradient is zero and k3's is that of KL(ref || policy) (Tang and "
        "Munos 2025, 'On a few pitfalls in KL divergence gradient estimation for RL').",
    )
    target: float | None = field(None, "Adaptive beta aims at this per-sequence KL in nats; null: fixed beta.", gt=0)
    horizon: int = field(10000, "Adaptive beta's horizon in sequences (Ziegler et al.).", ge=1)
    max: float | None = field(
        20.0, "Guardrail: stop when the mean per-sequence KL to the reference exceeds this (nats).", gt=0
    )

    def check(self) -> list[str]:
        if self.placement not in ("reward", "loss"):
            return [f"placement: got {self.placement!r}, expected reward or loss"]
        if self.estimator not in ("k1", "k3"):
            return [f"estimator: got {self.estimator!r}, expected k1 or k3"]
        wanted = {"reward": "k1", "loss": "k3"}[self.placement]
        if self.estimator != wanted:
            why = ("as a per-token reward k3 does not have the KL's gradient" if self.placement == "reward"
                   else "in the loss k1's expected gradient is zero")  # fmt: skip
            return [f"estimator: {self.estimator} with placement {self.placement}: {why}; use estimator {wanted} "
                    f"here, or placement {'loss' if wanted == 'k1' else 'reward'} with {self.estimator}"]  # fmt: skip
        return []


@config
class PtxSection:
    coef: float = field(
        0.0, "InstructGPT's PPO-ptx gamma: weight of a language-modelling loss on `data`, added at every optimizer "
        "step (a per-token mean, as the policy loss is); it holds on to what pretraining taught. 0: off.", ge=0,
    )  # fmt: skip
    data: DataConfig | None = field(
        None, "Plain text (`text` rows, e.g. the pretraining corpus) or chats (`messages`, rendered by the chat "
        "template, e.g. the sft data), packed into blocks as the pretrain stage packs them (EOS after each document).",
    )  # fmt: skip
    block_size: int = field(128, "Tokens per block.", ge=8)
    batch_size: int = field(8, "Blocks per process per optimizer step.", ge=1)

    def check(self) -> list[str]:
        return ["coef > 0 needs data: the text of the pretraining term"] if self.coef > 0 and self.data is None else []


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
    grad_clip: float = field(
        1.0,
        "Clip the gradient norm of the policy and of a separate critic each to this (0: no clipping); under "
        "DeepSpeed the engine clips the two together.",
        ge=0,
    )
    clip_range: float = field(0.2, "PPO ratio clip epsilon.", gt=0)
    value_clip_range: float = field(0.2, "Value clip epsilon, around the rollout's values.", gt=0)
    vf_coef: float = field(0.1, "Weight of the value loss in the summed loss.", gt=0)
    gamma: float = field(1.0, "Discount.", ge=0, le=1)
    lam: float = field(0.95, "GAE lambda.", ge=0, le=1)
    whiten_rewards: bool = field(False, "Whiten the per-token rewards (scaled, mean kept) before GAE.")
    whiten_advantages: bool = field(
        True, "Whiten the advantages over the batch (PPO's N+ default). With rule rewards, score_baseline loo and no "
        "critic, off keeps RLOO's own scale: whitening a batch where few prompts' samples disagree blows their "
        "weight up (trl's RLOO normalize_advantages, off by default).",
    )  # fmt: skip
    score_baseline: str = field(
        "none",
        "none, or loo: subtract from each score the mean score of its prompt's other samples (RLOO's "
        "baseline; needs rollout.samples_per_prompt >= 2) before the KL penalty and GAE.",
    )
    reward_clip: float | None = field(None, "Clip scores to [-c, c] before adding the KL penalty; null: none.", gt=0)
    ratio_range: tuple[float, float] = field(
        (0.2, 5.0), "Guardrail: stop when a minibatch's mean ratio pi/pi_old leaves this range."
    )


def step_seed(seed: int, step: int, rank: int) -> int:
    """The seed of one rank's sampling and minibatch order at one step: a resumed run draws the same."""
    return (seed * 1_000_003 + step) * 1_009 + rank


def guardrail(checkpoints: Path, step: int, what: str) -> StageFailed:
    """The error that stops a run whose step went wrong (`what`), naming the intact checkpoint to resume from."""
    return StageFailed(stopped_message(checkpoints, step, what, "Lower train.policy_lr, raise kl.coef or widen "
                                       "the guardrail (kl.max, train.ratio_range)"))  # fmt: skip


# --- models -------------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Models:
    """What a PPO step works with. `policy` is as Accelerate prepared it (wrapped for DDP or DeepSpeed), with its
    critic inside when there is one (rl.policy.with_critic or with_value_head: one model, one engine);
    `reference` is None with LoRA (the policy with its adapters off)."""

    accelerator: Any
    policy: Any
    reference: Any
    critic_source: str  # rl.policy.critic_source: reward, policy, head, none or a model path

    def causal_lm(self):
        """The causal LM itself (unwrapped, without a critic): generation, the reference pass, saving."""
        model = self.accelerator.unwrap_model(self.policy)
        return model.policy if self.critic_source != "none" else model

    def forward(self, batch: dict, rows, temperature: float, unwrapped: bool = False):
        """Response logits and values (zeros without a critic); `unwrapped` for no-grad passes outside DDP."""
        policy = self.accelerator.unwrap_model(self.policy) if unwrapped else self.policy
        return logits_and_values(self.critic_source, policy, batch, rows, temperature)

    def policy_state_dict(self) -> dict:
        """The causal LM's weights gathered from every process (all must call it; ZeRO-3 holds shards), without
        the critic; on processes other than the main one possibly empty."""
        full = self.accelerator.get_state_dict(self.policy)
        if self.critic_source == "none" or not full:  # ZeRO-3 gives the other processes None
            return full
        return {key.removeprefix("policy."): value for key, value in full.items() if key.startswith("policy.")}

    def clip_groups(self) -> list:
        """The parameter groups whose gradient norms are clipped apart: policy and a separate critic each (N+), the
        policy with its value head as one."""
        model = self.accelerator.unwrap_model(self.policy)
        if self.critic_source in ("none", "head"):
            return [list(model.parameters())]
        return [list(model.policy.parameters()), list(model.critic_parameters())]

    def lm_loss(self, ids):
        """Mean next-token cross-entropy of the policy on full blocks of text (PPO-ptx), through the prepared policy
        so that DDP syncs its gradient; a value head's output joins with weight 0, so DDP sees every parameter
        used."""
        import torch
        import torch.nn.functional as F

        positions = torch.arange(ids.shape[1], device=ids.device).expand_as(ids)
        out = self.policy(input_ids=ids, attention_mask=torch.ones_like(ids), position_ids=positions, use_cache=False)
        logits = out["logits"][:, :-1].float()
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
        return loss + 0 * out["token_values"].sum() if "token_values" in out else loss

    def reference_logits(self, batch: dict, rows, temperature: float):
        if self.reference is not None:
            return policy_forward(self.reference, batch, rows, temperature)
        with self.causal_lm().disable_adapter():
            return policy_forward(self.causal_lm(), batch, rows, temperature)


# --- one step after the rollout: scoring, update, metrics -------------------------------------------------------


def on_policy(models: Models, kl: KLSection, train: PPOTrainConfig) -> bool:
    """One optimizer step per rollout batch, no critic and the KL in the loss: the update's forward pass runs on the
    weights that sampled, so its log-probs (detached) are the rollout's, ratio 1, and the scoring pass skips the
    policy (trl's GRPO with num_iterations 1 does the same; ~a sixth of a smollm2 recipe step)."""
    return (train.ppo_epochs == 1 and train.num_minibatches == 1 and models.critic_source == "none"
            and kl.placement == "loss")  # fmt: skip


def score_rollout(
    models: Models, batch: dict, texts: list[str], raw_scores, kl_coef: float, rollout: RolloutSection,
    kl: KLSection, train: PPOTrainConfig,
) -> dict:  # fmt: skip
    """Rollout log-probs, reference log-probs and values (no grad), the scores (`raw_scores`, the scorer's,
    clipped, missing-stop penalty, leave-one-out baseline), per-token KL and rewards (the KL penalty among them
    when kl.placement is reward), then GAE advantages (whitened unless told not) and returns."""
    import torch

    temperature = rollout.temperature
    responses, mask = batch["responses"], batch["mask"].float()
    skip_policy = on_policy(models, kl, train)
    # one autocast for every pass (a frozen reference is not prepared, so Accelerate would leave it in fp32): with
    # policy == reference the KL is exactly 0 under bf16 too
    with torch.no_grad(), models.accelerator.autocast():
        old_logprobs, ref_logprobs, values = [], [], []
        for rows in torch.arange(len(responses)).split(train.micro_batch_size):
            if not skip_policy:
                logits, rollout_values = models.forward(batch, rows, temperature, unwrapped=True)
                old_logprobs.append(token_logprobs(logits, responses[rows]))
                values.append(rollout_values)
            ref_logprobs.append(token_logprobs(models.reference_logits(batch, rows, temperature), responses[rows]))
        ref_logprobs = torch.cat(ref_logprobs)
        if skip_policy:  # ppo_update takes the log-probs of its own (only) pass and fills in the KL
            old_logprobs, values = None, torch.zeros_like(ref_logprobs)
        else:
            old_logprobs, values = torch.cat(old_logprobs), torch.cat(values)
        raw_scores = torch.as_tensor(raw_scores, dtype=torch.float32, device=responses.device)
        scores = raw_scores.clamp(-train.reward_clip, train.reward_clip) if train.reward_clip else raw_scores
        scores = penalise_missing_stop(scores, batch["has_stop"], rollout.missing_eos_penalty)
        if train.score_baseline == "loo":
            scores = leave_one_out(scores, rollout.samples_per_prompt)
        kl_tokens = (
            torch.zeros_like(mask) if skip_policy else kl_estimate(old_logprobs, ref_logprobs, kl.estimator) * mask
        )
        reward_kl_coef = kl_coef if kl.placement == "reward" else 0.0  # placement loss: ppo_update adds it
        rewards = token_rewards(scores, kl_tokens, reward_kl_coef, batch["last_index"], mask)
        if train.whiten_rewards:
            rewards = masked_whiten(rewards, mask, shift_mean=False)
        no_critic = models.critic_source == "none"
        advantages, returns = gae(rewards, values, mask, train.gamma, 1.0 if no_critic else train.lam)
        if train.whiten_advantages:
            advantages = masked_whiten(advantages, mask)
    return {"texts": texts, "raw_scores": raw_scores, "scores": scores, "kl": kl_tokens, "mask": mask,
            "values": values, "old_logprobs": old_logprobs, "ref_logprobs": ref_logprobs, "advantages": advantages,
            "returns": returns}  # fmt: skip


def ppo_update(
    models: Models, optimizer, batch: dict, scored: dict, temperature: float, train: PPOTrainConfig, step: int,
    checkpoints: Path, kl_loss_coef: float = 0.0, ptx=None, ptx_coef: float = 0.0,
) -> dict:  # fmt: skip
    """`ppo_epochs` passes over the rollout batch, a fresh permutation each (seeded by seed, step, rank), one
    optimizer step per minibatch: clipped policy loss (+ kl_loss_coef * the k3 KL of the current policy to the
    reference, GRPO's form; + clipped value loss with a critic), each summed over tokens and divided by the
    minibatch's response tokens over all processes, so micro_batch_size and the process count do not change it.
    With `ptx` (update index -> a batch of text blocks), ptx_coef x its language-modelling loss joins every
    optimizer step (PPO-ptx), logged as ptx_loss. Stops, before the optimizer step, when the loss is not finite or
    the mean ratio leaves train.ratio_range. Returns each logged term's mean over micro-batches."""
    import torch

    accelerator = models.accelerator
    responses, mask, device = batch["responses"], scored["mask"], accelerator.device
    per_rank = len(responses)
    minibatch = per_rank // train.num_minibatches
    with_critic = models.critic_source != "none"
    stats: dict[str, list] = {}
    order_generator = torch.Generator().manual_seed(step_seed(train.seed, step, accelerator.process_index))
    update = step * train.ppo_epochs * train.num_minibatches  # optimizer steps so far: which ptx blocks come next
    for _epoch in range(train.ppo_epochs):
        order = torch.randperm(per_rank, generator=order_generator)
        for part in order.split(minibatch):
            check = torch.zeros(3, device=device)  # summed loss, mean ratio, non-finite count
            # DDP averages gradients over processes, so each divides by the mean token count per process
            tokens = accelerator.reduce(mask[part].sum(), "sum") / accelerator.num_processes
            micro = part.split(train.micro_batch_size)
            for i, rows in enumerate(micro):
                with accelerator.autocast():
                    logits, new_values = models.forward(batch, rows, temperature)
                new_logprobs = token_logprobs(logits, responses[rows])
                if scored["old_logprobs"] is None:  # on_policy: this pass is the rollout's, and so is its KL
                    old_logprobs = new_logprobs.detach()
                    scored["kl"][rows] = kl_estimate(old_logprobs, scored["ref_logprobs"][rows], "k3") * mask[rows]
                else:
                    old_logprobs = scored["old_logprobs"][rows]
                pg_loss, pg_stats = policy_loss(new_logprobs, old_logprobs, scored["advantages"][rows], mask[rows],
                                                train.clip_range, tokens)  # fmt: skip
                as_mean = tokens / mask[rows].sum().clamp(min=1)  # logged terms: this micro-batch's token mean
                loss, terms = pg_loss, {"pg_loss": pg_loss * as_mean, **pg_stats}
                if kl_loss_coef:
                    kl_term = token_normalised(kl_estimate(new_logprobs, scored["ref_logprobs"][rows], "k3"),
                                               mask[rows], tokens)  # fmt: skip
                    loss, terms = loss + kl_loss_coef * kl_term, {**terms, "kl_loss": kl_term * as_mean}
                if with_critic:
                    vf_loss, vf_stats = value_loss(new_values, scored["values"][rows], scored["returns"][rows],
                                                   mask[rows], train.value_clip_range, tokens)  # fmt: skip
                    loss, terms = loss + train.vf_coef * vf_loss, {**terms, "vf_loss": vf_loss * as_mean, **vf_stats}
                with torch.no_grad():
                    terms["entropy"] = masked_mean(entropy_from_logits(logits), mask[rows])
                for key, value in terms.items():
                    stats.setdefault(key, []).append(float(value.detach()))
                check += torch.stack([loss.detach(), pg_stats["ratio"] * len(rows) / len(part),
                                      (~torch.isfinite(loss.detach())).float()])  # fmt: skip
                last = i == len(micro) - 1 and ptx is None
                if last:
                    stop_unless_sound(accelerator, check, train.ratio_range, checkpoints, step)
                backward(accelerator, loss, last)
            if ptx is not None:
                with accelerator.autocast():
                    ptx_loss = models.lm_loss(ptx(update))
                stats.setdefault("ptx_loss", []).append(float(ptx_loss.detach()))
                check[2] += (~torch.isfinite(ptx_loss.detach())).float()
                stop_unless_sound(accelerator, check, train.ratio_range, checkpoints, step)
                backward(accelerator, ptx_coef * ptx_loss, True)
            update += 1
            if train.grad_clip:  # under DeepSpeed the engine clips (gradient_clipping), and this does nothing
                for group in models.clip_groups():
                    accelerator.clip_grad_norm_(group, train.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    return {key: sum(values) / len(values) for key, values in stats.items()}


def stop_unless_sound(accelerator, check, ratio_range, checkpoints: Path, step: int) -> None:
    """Stop before the optimizer step when any process saw a non-finite loss or the mean ratio left ratio_range.
    `check` holds this process's summed loss, mean ratio and non-finite count; all processes call this together."""
    check = accelerator.reduce(check, "mean")
    low, high = ratio_range
    if check[2] > 0:
        raise guardrail(checkpoints, step, f"non-finite loss {check[0].item():.4g}")
    if not low <= check[1].item() <= high:
        raise guardrail(checkpoints, step, f"mean ratio {check[1].item():.3f} left train.ratio_range {[low, high]}")


def backward(accelerator, loss, last: bool) -> None:
    """accelerator.backward, telling DeepSpeed which backward ends the minibatch: its engine steps the optimizer
    inside that backward, and accumulates gradients over the ones before (elsewhere the flag changes nothing: the
    loop steps the optimizer itself). The guardrails therefore run before the last backward."""
    accelerator.gradient_state._set_sync_gradients(last)
    accelerator.backward(loss)
    accelerator.gradient_state._set_sync_gradients(True)


def step_metrics(models: Models, batch: dict, scored: dict, stats: dict, kl_coef: float, drawn: dict) -> dict:
    """The step's metrics averaged over processes: reward, reward with the KL penalty, per-sequence KL, response
    length, no-stop share, explained variance (with a critic), the update's terms, and `drawn` (tensors about
    the whole draw before dynamic sampling kept part of it)."""
    import torch

    kl, mask, device = scored["kl"], scored["mask"], models.accelerator.device
    with_critic = models.critic_source != "none"
    local = {
        "reward": scored["raw_scores"].mean(), "reward_with_kl": (scored["scores"] - kl_coef * kl.sum(1)).mean(),
        "kl": kl.sum(1).mean(), "response_length": batch["mask"].sum(1).float().mean(),
        "no_eos_share": (~batch["has_stop"]).float().mean(),
        **({"explained_variance": torch.tensor(explained_variance(scored["values"], scored["returns"], mask))}
           if with_critic else {}),
        **{k: torch.tensor(v) for k, v in stats.items()},
    }  # fmt: skip
    local.update(drawn)  # e.g. the reward over every sample drawn, not only over those dynamic sampling kept
    reduced = models.accelerator.reduce(torch.stack([v.float().to(device) for v in local.values()]), "mean")
    return dict(zip(local, reduced.tolist(), strict=True))
