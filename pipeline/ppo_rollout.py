"""Models and rollouts for the PPO stage: prompt encoding, batched sampling cut at the stop token, the scoring
forward passes (position ids that skip left padding, temperature-scaled logits), the per-token critic, and the
scorer (reward model or Python function)."""

from __future__ import annotations

import importlib

from pipeline.config import UserError
from pipeline.modeling import load_pretrained, load_tokenizer, resolve_model_path
from pipeline.ppo_core import position_ids_from_mask, response_logits, truncate_after_stop
from pipeline.stages.pretrain import generation_config


def encode_prompts(tokenizer, prompts: list) -> list[list[int]]:
    """Token ids of each prompt: message lists through the chat template with the generation prompt (which holds
    BOS where the model wants one), strings as the tokenizer encodes them."""
    ids = []
    for prompt in prompts:
        if isinstance(prompt, list):
            text = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
            ids.append(tokenizer(text, add_special_tokens=False)["input_ids"])
        else:
            ids.append(tokenizer(prompt)["input_ids"])
    return ids


# --- rollouts ----------------------------------------------------------------------------------------------------


def rollout(model, tokenizer, prompt_ids: list[list[int]], settings, greedy: bool = False) -> dict:
    """Sample one response per prompt (left-padded batch, KV cache) and cut it after its first stop token.

    Returns ids = prompt + response (the response padded after its stop token), attention_mask, context_length,
    responses, mask (response tokens kept), has_stop, last_index, generated_tokens (as `generate` produced)."""
    import torch
    from transformers import GenerationConfig

    device = next(model.parameters()).device
    width = max(len(p) for p in prompt_ids)
    pad = tokenizer.pad_token_id
    prompts = torch.tensor([[pad] * (width - len(p)) + p for p in prompt_ids], device=device)
    prompt_mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompt_ids], device=device)
    stops = generation_config(tokenizer).eos_token_id
    sampling = dict(do_sample=False) if greedy else dict(do_sample=True, temperature=settings.temperature,
                                                         top_p=settings.top_p, top_k=0)  # fmt: skip
    gen_config = GenerationConfig(max_new_tokens=settings.max_new_tokens, eos_token_id=stops, pad_token_id=pad,
                                  bos_token_id=tokenizer.bos_token_id, use_cache=True, **sampling)  # fmt: skip
    with torch.no_grad():
        output = model.generate(input_ids=prompts, attention_mask=prompt_mask, generation_config=gen_config)
    generated = output[:, width:]
    responses, mask, has_stop, last_index = truncate_after_stop(generated, stops, pad)
    return {
        "ids": torch.cat([prompts, responses], 1), "attention_mask": torch.cat([prompt_mask, mask], 1),
        "context_length": width, "responses": responses, "mask": mask, "has_stop": has_stop,
        "last_index": last_index, "generated_tokens": int((generated != pad).sum()),
    }  # fmt: skip


def policy_forward(model, batch: dict, rows, temperature: float):
    """Temperature-scaled logits at the response positions, with position ids that skip the left padding (A1)."""
    mask = batch["attention_mask"][rows]
    logits = model(input_ids=batch["ids"][rows], attention_mask=mask, position_ids=position_ids_from_mask(mask),
                   use_cache=False).logits  # fmt: skip
    return response_logits(logits, batch["context_length"], temperature)


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


def critic_forward(critic, batch: dict, rows):
    mask = batch["attention_mask"][rows]
    values = critic(batch["ids"][rows], mask, position_ids_from_mask(mask))
    return values[:, batch["context_length"] - 1 : -1]  # V(state before each response token)


def disable_dropout(model) -> None:
    """Dropout off everywhere (A8): modules and the float attention-dropout attributes attention layers read."""
    import torch

    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
        for name in ("attention_dropout", "attn_dropout", "dropout"):
            if isinstance(getattr(module, name, None), float):
                setattr(module, name, 0.0)


# --- rewards -----------------------------------------------------------------------------------------------------


def load_reward_function(path: str, key: str = "reward_function"):
    """The function a 'package.module:function' config value names; errors name the config key."""
    module_name, _, name = path.partition(":")
    try:
        function = getattr(importlib.import_module(module_name), name)
    except (ImportError, AttributeError, ValueError) as exc:
        raise UserError(f"{key}: cannot import {path!r} ({exc}); expected 'package.module:function'") from None
    if not callable(function):
        raise UserError(f"{key}: {path!r} is not callable")
    return function


def make_scorer(cfg, device):
    """scorer(prompts, response_texts) -> list of floats, from the reward model (rendered with its own tokenizer
    and template, A10, via reward.score_pairs) or the reward function."""
    if cfg.reward_function:
        return load_reward_function(cfg.reward_function), None
    from transformers import AutoModelForSequenceClassification

    from pipeline.stages.reward import score_pairs

    path = resolve_model_path(cfg.reward_model)
    tokenizer = load_tokenizer(path, cfg.trust_remote_code)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = load_pretrained(AutoModelForSequenceClassification, path, cfg.trust_remote_code, "reward_model")
    model.config.pad_token_id = tokenizer.pad_token_id
    model.to(device).eval().requires_grad_(False)

    def scorer(prompts: list, texts: list[str]) -> list[float]:
        pairs = zip(prompts, texts, strict=True)
        responses = [[{"role": "assistant", "content": t}] if isinstance(p, list) else t for p, t in pairs]
        return score_pairs(model, tokenizer, prompts, responses)

    return scorer, model


def with_value_head(policy):
    """`value_model: head`: a linear value head on the policy's last hidden state, one trunk for both (with LoRA,
    policy, reference and critic then share one frozen base). Initialised as N+ does: std 1/sqrt(hidden + 1)."""
    import torch

    class PolicyWithValueHead(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.policy = inner
            hidden = inner.config.hidden_size
            self.value_head = torch.nn.Linear(hidden, 1)
            torch.nn.init.normal_(self.value_head.weight, std=1 / (hidden + 1) ** 0.5)
            torch.nn.init.zeros_(self.value_head.bias)

        def forward(self, input_ids, attention_mask, position_ids, use_cache=False):
            out = self.policy(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                              use_cache=False, output_hidden_states=True)  # fmt: skip
            out["token_values"] = self.value_head(out.hidden_states[-1]).squeeze(-1).float()
            return out

    return PolicyWithValueHead(policy)


def forward_both(model, critic, batch: dict, rows, temperature: float):
    """Response logits and values: one pass through a policy with a value head (critic None), or two models."""
    if critic is not None:
        return policy_forward(model, batch, rows, temperature), critic_forward(critic, batch, rows)
    mask = batch["attention_mask"][rows]
    out = model(input_ids=batch["ids"][rows], attention_mask=mask, position_ids=position_ids_from_mask(mask))
    context = batch["context_length"]
    return response_logits(out.logits, context, temperature), out["token_values"][:, context - 1 : -1]
