"""Scores for responses, one contract for every command that judges answers (pairs' judges, ppo's rewards):
the exact-match rule, `module:function` rules, and reward-model scoring rendered as the reward trainer saw it."""

from __future__ import annotations

import importlib
import inspect
import numbers

from pipeline.config import UserError

EXACT_MATCH = "exact_match"


def exact_match(prompts: list, responses: list[str], references: list[str | None]) -> list[float]:
    """1.0 when the answer equals the reference after strip(), else 0.0 (no reference: 0.0)."""
    return [float(r is not None and s.strip() == r.strip()) for s, r in zip(responses, references, strict=True)]


def import_function(path: str, key: str):
    """The function a 'package.module:function' config value names; errors name the config key."""
    module_name, _, name = path.partition(":")
    try:
        function = getattr(importlib.import_module(module_name), name)
    except (ImportError, AttributeError, ValueError) as exc:
        raise UserError(f"{key}: cannot import {path!r} ({exc}); expected 'package.module:function'") from None
    if not callable(function):
        raise UserError(f"{key}: {path!r} is not callable")
    return function


def load_reward_function(name: str, key: str):
    """A rule as fn(prompts, responses, references=None) -> one float per response: `exact_match`, or a
    'module:function' taking (prompts, responses) and, if it accepts it, `references=`. The values are checked."""
    if name == EXACT_MATCH:
        return lambda prompts, responses, references=None: exact_match(
            prompts, responses, references or [None] * len(responses)
        )
    function = import_function(name, key)
    try:
        params = inspect.signature(function).parameters.values()
    except (TypeError, ValueError):
        params = []
    takes_references = any(p.name == "references" or p.kind is p.VAR_KEYWORD for p in params)

    def score(prompts: list, responses: list[str], references: list | None = None) -> list[float]:
        if takes_references and references is not None:
            scores = list(function(prompts, responses, references=references))
        else:
            scores = list(function(prompts, responses))
        if len(scores) != len(responses) or not all(isinstance(s, numbers.Real) for s in scores):
            raise UserError(f"{key} {name!r}: returned {len(scores)} values for {len(responses)} responses; "
                            "expected one number per response")  # fmt: skip
        return [float(s) for s in scores]

    return score


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


def as_reply(prompt, text: str):
    """A response in its prompt's format: an assistant message list for a conversation, else the string."""
    return [{"role": "assistant", "content": text}] if isinstance(prompt, list) else text


def reward_scorer(reward_model: str | None, reward_function: str | None, trust_remote_code: bool, device):
    """scorer(prompts, response_texts) -> list of floats: the reward model (its own tokenizer and template, A10,
    through score_pairs) or the reward function."""
    if reward_function:
        return load_reward_function(reward_function, "reward_function")
    from transformers import AutoModelForSequenceClassification

    from pipeline.modeling import load_pretrained, load_tokenizer, resolve_model_path

    path = resolve_model_path(reward_model)
    tokenizer = load_tokenizer(path, trust_remote_code, pad_with_eos=True)
    model = load_pretrained(AutoModelForSequenceClassification, path, trust_remote_code, "reward_model")
    model.config.pad_token_id = tokenizer.pad_token_id
    model.to(device).eval().requires_grad_(False)

    def scorer(prompts: list, texts: list[str]) -> list[float]:
        return score_pairs(model, tokenizer, prompts, [as_reply(p, t) for p, t in zip(prompts, texts, strict=True)])

    return scorer
