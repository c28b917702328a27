"""The arithmetic of PPO for language models: pure tensor functions, each tested on its own (tests/test_ppo.py).

Shapes: `[batch, response_len]` for per-token quantities, with `mask` 1 on real response tokens (the stop token
included) and 0 on the padding after it. Conventions follow Huang et al. 2024 ("The N+ Implementation Details of
RLHF with PPO") and ../shared/RLHF_NOTES.md; the row numbers there (A1, B2, C4...) are cited where they apply.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# --- masked statistics -----------------------------------------------------------------------------------------


def masked_mean(values: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    if dim is None:
        return (values * mask).sum() / mask.sum().clamp(min=1)
    return (values * mask).sum(dim) / mask.sum(dim).clamp(min=1)


def token_normalised(values: torch.Tensor, mask: torch.Tensor, tokens: torch.Tensor | float | None) -> torch.Tensor:
    """Sum over the masked entries divided by `tokens` (the minibatch's response tokens, counted over every
    micro-batch and process), so the objective does not depend on how the minibatch is split; None: the mean."""
    return masked_mean(values, mask) if tokens is None else (values * mask).sum() / tokens


def masked_var(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Unbiased variance over the masked entries (Bessel's correction, as trl and N+ do)."""
    mean = masked_mean(values, mask)
    count = mask.sum()
    return ((values - mean) ** 2 * mask).sum() / (count - 1).clamp(min=1)


def masked_whiten(values: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True) -> torch.Tensor:
    """Scale to unit variance over the masked entries (and to mean 0 unless `shift_mean` is False); pads -> 0 (C2,
    B5). Extra pad columns change nothing."""
    mean, var = masked_mean(values, mask), masked_var(values, mask)
    whitened = (values - mean) * torch.rsqrt(var + 1e-8)
    if not shift_mean:
        whitened = whitened + mean
    return whitened * mask


# --- rollout bookkeeping ---------------------------------------------------------------------------------------


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """What HF generate builds for a left-padded batch: positions count real tokens only; pads get 1 (A1)."""
    positions = attention_mask.long().cumsum(-1) - 1
    return positions.masked_fill(attention_mask == 0, 1)


def truncate_after_stop(responses: torch.Tensor, stop_ids: list[int], pad_id: int) -> tuple[torch.Tensor, ...]:
    """Keep each response up to and including its first stop token, pad after it (A3).

    Returns (responses, mask, has_stop, last_index): mask covers the kept tokens, last_index is the index of the
    last kept token (the stop token, or the final token of a response cut by max_new_tokens)."""
    is_stop = torch.isin(responses, torch.tensor(stop_ids, device=responses.device))
    length = responses.shape[1]
    positions = torch.arange(length, device=responses.device).expand_as(responses)
    first_stop = torch.where(is_stop, positions, length).min(dim=1).values
    has_stop = first_stop < length
    last_index = torch.where(has_stop, first_stop, length - 1)
    mask = positions <= last_index.unsqueeze(1)
    return responses.masked_fill(~mask, pad_id), mask.long(), has_stop, last_index


# --- log-probabilities, entropy and KL --------------------------------------------------------------------------


def response_logits(logits: torch.Tensor, context_length: int, temperature: float) -> torch.Tensor:
    """The logits that predict the response tokens: position t predicts token t+1, so `logits[:, ctx-1:-1]` pairs
    with `ids[:, ctx:]` (A7); divided by the sampling temperature, as sampling did (A6)."""
    return logits[:, context_length - 1 : -1].float() / temperature


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    return torch.gather(F.log_softmax(logits, dim=-1), 2, tokens.unsqueeze(-1)).squeeze(-1)


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of softmax(logits) per position: logsumexp(z) - sum softmax(z) * z (C5)."""
    probs = F.softmax(logits, dim=-1)
    return torch.logsumexp(logits, dim=-1) - (probs * logits).sum(-1)


def kl_estimate(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, estimator: str) -> torch.Tensor:
    """Per-token KL(policy || reference) from the sampled tokens (B2; Schulman's estimators).

    k1 = log pi - log pi_ref (unbiased, can be negative); k3 = (r - 1) - log r with r = pi_ref / pi (unbiased,
    never negative, lower variance)."""
    log_ratio = logprobs - ref_logprobs
    if estimator == "k1":
        return log_ratio
    if estimator == "k3":
        return torch.expm1(-log_ratio) + log_ratio
    raise ValueError(f"kl estimator {estimator!r}: expected k1 or k3")


# --- rewards and advantages -------------------------------------------------------------------------------------


def penalise_missing_stop(scores: torch.Tensor, has_stop: torch.Tensor, penalty: float | None) -> torch.Tensor:
    """trl's rule (A4): subtract `penalty` from the score of each response that never produced a stop token; the
    other scores are left as they are. N+ instead replaces such a score with a constant."""
    if penalty is None:
        return scores
    return scores - penalty * (~has_stop).to(scores.dtype)


def leave_one_out(scores: torch.Tensor, group_size: int) -> torch.Tensor:
    """RLOO's baseline (Ahmadian et al. 2024): `scores` holds groups of `group_size` samples of one prompt, adjacent;
    each score minus the mean of the others in its group. It removes how easy the prompt is, which one sample per
    prompt leaves to the critic, and it does not depend on the sample itself, so the gradient stays unbiased."""
    groups = scores.view(-1, group_size)
    others = (groups.sum(1, keepdim=True) - groups) / (group_size - 1)
    return (groups - others).view(-1)


def groups_with_signal(scores: torch.Tensor, group_size: int) -> torch.Tensor:
    """Which groups of `group_size` adjacent samples (one prompt's) scored differently: the only groups a group
    baseline (leave_one_out, GRPO's mean) learns from; a group of equal scores has every advantage 0."""
    groups = scores.view(-1, group_size)
    return (groups != groups[:, :1]).any(1)


def pick_groups(signal: torch.Tensor, wanted: int) -> list[int]:
    """DAPO's dynamic sampling (Yu et al. 2025) over one oversampled draw: the first `wanted` groups with signal,
    in draw order, then groups without signal, in draw order, only where too few had any. Returns group indices
    in draw order."""
    order = [i for i in range(len(signal)) if signal[i]] + [i for i in range(len(signal)) if not signal[i]]
    return sorted(order[:wanted])


def token_rewards(
    scores: torch.Tensor, kl: torch.Tensor, kl_coef: float, last_index: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    """Per-token rewards: -kl_coef * kl at every response token, plus the sequence score at its last real token
    (B3, B4: the score lands on a position the mask keeps)."""
    rewards = -kl_coef * kl * mask
    rewards[torch.arange(len(scores), device=scores.device), last_index] += scores
    return rewards


def gae(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation (C1): delta_t = r_t + gamma V_{t+1} - V_t, A_t = delta_t + gamma lam
    A_{t+1}, with V = 0 after the last real token. Returns (advantages, returns = advantages + values), pads 0."""
    values = values * mask
    advantages = torch.zeros_like(rewards)
    next_value = torch.zeros_like(rewards[:, 0])
    next_advantage = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(rewards.shape[1])):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        next_advantage = (delta + gamma * lam * next_advantage) * mask[:, t]
        advantages[:, t] = next_advantage
        next_value = values[:, t]
    return advantages, (advantages + values) * mask


# --- losses --------------------------------------------------------------------------------------------------------


def policy_loss(
    logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, clip: float,
    tokens: torch.Tensor | float | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:  # fmt: skip
    """Clipped surrogate (C4): max(-A r, -A clamp(r, 1-eps, 1+eps)), r = pi / pi_old, averaged over the masked
    tokens (or summed and divided by `tokens`: token_normalised); with its statistics (C5): clip fraction, approx KL
    0.5 * mean(log r ^ 2), mean ratio."""
    log_ratio = logprobs - old_logprobs
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip, 1.0 + clip)
    loss = token_normalised(torch.max(unclipped, clipped), mask, tokens)
    with torch.no_grad():
        stats = {
            "clipfrac": masked_mean((clipped > unclipped).float(), mask),
            "approx_kl": 0.5 * masked_mean(log_ratio**2, mask),
            "ratio": masked_mean(ratio, mask),
        }
    return loss, stats


def value_loss(
    values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor, clip: float,
    tokens: torch.Tensor | float | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:  # fmt: skip
    """Clipped value loss (C3): 0.5 * max((V - R)^2, (Vc - R)^2), Vc = V_old +- eps, averaged over the masked tokens
    (or divided by `tokens`)."""
    clipped_values = old_values + torch.clamp(values - old_values, -clip, clip)
    unclipped_error, clipped_error = (values - returns) ** 2, (clipped_values - returns) ** 2
    loss = 0.5 * token_normalised(torch.max(unclipped_error, clipped_error), mask, tokens)
    with torch.no_grad():
        stats = {"vf_clipfrac": masked_mean((clipped_error > unclipped_error).float(), mask)}
    return loss, stats


def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> float:
    """1 - Var(R - V) / Var(R) over real tokens: 1 is a perfect critic, 0 one that predicts the mean."""
    var_returns = masked_var(returns, mask)
    return float(1 - masked_var(returns - values, mask) / var_returns) if var_returns > 0 else float("nan")


# --- KL coefficient -------------------------------------------------------------------------------------------------


class KLController:
    """Fixed, or adaptive (Ziegler et al. 2019, C8): beta <- beta (1 + clip(KL / target - 1, +-0.2) n / horizon),
    with KL the per-sequence sum averaged over the batch and n the sequences in the batch (all processes)."""

    def __init__(self, coef: float, target: float | None, horizon: int):
        self.coef, self.target, self.horizon = coef, target, horizon

    def update(self, sequence_kl: float, n_sequences: int) -> None:
        if self.target is None:
            return
        error = max(-0.2, min(0.2, sequence_kl / self.target - 1))
        self.coef *= 1 + error * n_sequences / self.horizon

    def state_dict(self) -> dict:
        return {"coef": self.coef}

    def load_state_dict(self, state: dict) -> None:
        self.coef = state["coef"]
