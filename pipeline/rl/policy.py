"""The models of an RL step: scoring forward passes of the policy (position ids that skip left padding,
temperature-scaled logits), the critic in each of its forms, and dropout switched off (A8)."""

from __future__ import annotations

from pipeline.config import UserError
from pipeline.rl.core import position_ids_from_mask, response_logits


def critic_source(value_model: str | None, reward_model: str | None) -> str:
    """The critic a config asks for, decided once: 'reward', 'policy', 'head', 'none' or a model path.
    None means a copy of the reward model when there is one (N+), else of the policy."""
    return value_model or ("reward" if reward_model else "policy")


def keeps_logits(model) -> bool:
    """Whether the causal LM under any wrappers (DDP, DeepSpeed, PEFT) takes transformers' `logits_to_keep`."""
    import inspect

    inner = model
    for _ in range(8):
        if hasattr(inner, "get_base_model"):
            inner = inner.get_base_model()
        elif hasattr(inner, "module"):
            inner = inner.module
        elif hasattr(inner, "critic_parameters"):  # the policy joined with its critic (with_critic, with_value_head)
            inner = inner.policy
        else:
            break
    return "logits_to_keep" in inspect.signature(inner.forward).parameters


def policy_forward(model, batch: dict, rows, temperature: float):
    """Temperature-scaled logits at the response positions, with position ids that skip the left padding (A1).
    Where the model takes `logits_to_keep`, the LM head runs on those positions only (on a 49k vocabulary and a
    prompt of ~50 tokens before an 8-token answer, most of its cost)."""
    mask = batch["attention_mask"][rows]
    context = batch["context_length"]
    keep = {"logits_to_keep": batch["ids"].shape[1] - context + 1} if keeps_logits(model) else {}
    logits = model(input_ids=batch["ids"][rows], attention_mask=mask, position_ids=position_ids_from_mask(mask),
                   use_cache=False, **keep).logits  # fmt: skip
    return response_logits(logits, 1 if keep else context, temperature)


def make_critic(model):
    """The critic: a sequence-classification model whose score head is read at every token, not pooled."""
    import torch

    if not hasattr(model, "score"):
        raise UserError(f"value_model: {type(model).__name__} has no `score` head to read values from")

    class Critic(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, input_ids, attention_mask, position_ids):
            body = getattr(self.inner, self.inner.base_model_prefix)
            hidden = body(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                          use_cache=False).last_hidden_state  # fmt: skip
            return self.inner.score(hidden).squeeze(-1).float()

    return Critic(model)


def disable_dropout(model) -> None:
    """Dropout off everywhere (A8): modules and the float attention-dropout attributes attention layers read."""
    import torch

    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
        for name in ("attention_dropout", "attn_dropout", "dropout"):
            if isinstance(getattr(module, name, None), float):
                setattr(module, name, 0.0)


def with_value_head(policy):
    """`value_model: head`: a linear value head on the policy's last hidden state, one trunk for both (with LoRA,
    policy, reference and critic then share one frozen base). Initialised as N+ does: std 1/sqrt(hidden + 1)."""
    import torch

    class PolicyWithValueHead(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.policy, self.config = inner, inner.config  # DeepSpeed sizes its buckets from model.config
            hidden = inner.config.hidden_size
            self.value_head = torch.nn.Linear(hidden, 1)
            torch.nn.init.normal_(self.value_head.weight, std=1 / (hidden + 1) ** 0.5)
            torch.nn.init.zeros_(self.value_head.bias)

        def forward(self, input_ids, attention_mask, position_ids, use_cache=False, **kwargs):
            out = self.policy(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                              use_cache=False, output_hidden_states=True, **kwargs)  # fmt: skip
            out["token_values"] = self.value_head(out.hidden_states[-1]).squeeze(-1).float()
            return out

        def critic_parameters(self):
            return self.value_head.parameters()

    return PolicyWithValueHead(policy)


def with_critic(policy, critic):
    """A separate critic (make_critic) and the policy as one module, as trl's PolicyAndValueWrapper: one forward
    gives logits and per-token values, so DDP and DeepSpeed see one model, one engine and one backward (DeepSpeed
    refuses a second model under one Accelerator)."""
    import torch

    class PolicyWithCritic(torch.nn.Module):
        def __init__(self, inner, value):
            super().__init__()
            self.policy, self.critic, self.config = inner, value, inner.config  # config: for DeepSpeed's buckets

        def forward(self, input_ids, attention_mask, position_ids, use_cache=False, **kwargs):
            out = self.policy(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                              use_cache=False, **kwargs)  # fmt: skip
            out["token_values"] = self.critic(input_ids, attention_mask, position_ids)
            return out

        def critic_parameters(self):
            return self.critic.parameters()

    return PolicyWithCritic(policy, critic)


def logits_and_values(source: str, model, batch: dict, rows, temperature: float):
    """Response logits and per-token values for the critic `source` (critic_source): one pass through the policy
    and its critic (a value head, or a separate critic joined by with_critic), or zeros ('none': no critic)."""
    import torch

    if source == "none":
        logits = policy_forward(model, batch, rows, temperature)
        return logits, torch.zeros(logits.shape[:2], device=logits.device)
    mask = batch["attention_mask"][rows]
    context = batch["context_length"]
    keep = {"logits_to_keep": batch["ids"].shape[1] - context + 1} if keeps_logits(model) else {}
    out = model(input_ids=batch["ids"][rows], attention_mask=mask, position_ids=position_ids_from_mask(mask), **keep)
    return response_logits(out.logits, 1 if keep else context, temperature), out["token_values"][:, context - 1 : -1]
