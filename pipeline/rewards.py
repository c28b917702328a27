"""Scores for responses, one contract for every command that judges answers (pairs' judges, ppo's rewards):
the exact-match rule, `module:function` rules, and reward-model scoring rendered as the reward trainer saw it."""

from __future__ import annotations

import difflib
import importlib
import inspect
import numbers
import re

from pipeline.config import UserError

EXACT_MATCH = "exact_match"
MATH_VERIFY = "math_verify"
RULES = (EXACT_MATCH, MATH_VERIFY)  # the rules named by a word; both score each answer against its reference


def exact_match(prompts: list, responses: list[str], references: list[str | None]) -> list[float]:
    """1.0 when the answer equals the reference after strip(), else 0.0 (no reference: 0.0)."""
    return [float(r is not None and s.strip() == r.strip()) for s, r in zip(responses, references, strict=True)]


def math_verify_match(prompts: list, responses: list[str], references: list[str | None]) -> list[float]:
    """1.0 when the answer's final value equals the reference's, as math-verify (Hugging Face's grader, which trl's
    accuracy_reward and open-r1 use) parses and compares them: a worked solution ending "#### 72" (GSM8K) or holding
    "\\boxed{\\frac{1}{3}}" (MATH) against an answer with the same number or expression, LaTeX or plain, in any
    equivalent form. A reference math-verify cannot parse, or none, scores 0.0."""
    import logging
    import threading

    from math_verify import parse, verify

    # math-verify times out with signal.alarm, which only the main thread may set (as trl's accuracy_reward does)
    timeout = 5 if threading.current_thread() is threading.main_thread() else None
    if timeout is None:  # its warning that timeouts are off, once per call, is not the user's concern
        logging.getLogger("math_verify").setLevel(logging.ERROR)
    scores = []
    for response, reference in zip(responses, references, strict=True):
        gold = parse(reference, parsing_timeout=timeout) if reference else []
        answer = parse(response, parsing_timeout=timeout) if gold else []
        scores.append(float(bool(gold) and verify(gold, answer, timeout_seconds=timeout)))
    return scores


def worked_solutions_problem(reward: str, references: list[str | None], where: str) -> str | None:
    """Why exact_match or a task reward cannot score these references: most are worked solutions (GSM8K's
    "#### 72", MATH's \\boxed{}), which no filtered answer equals as a whole. None when fine."""
    marked = sum(bool(r) and ("\n#### " in r or "\\boxed{" in r) for r in references)
    if not needs_reference(reward) or reward == MATH_VERIFY or marked * 2 <= len(references):
        return None
    return (
        f'{where}: {marked} of {len(references)} reference answers are worked solutions ("#### <answer>" or '
        f"\\boxed{{...}}); {reward} compares an answer with the whole solution and would never match. Use "
        "math_verify (compares the final values), or put the final answers in a column of their own and name "
        "it with reference_key"
    )


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
    """A rule as fn(prompts, responses, references=None) -> one float per response: `exact_match`,
    `math_verify`, or a 'module:function' taking (prompts, responses) and, if it accepts it, `references=`. The
    values are checked."""
    if name in RULES:
        if name == MATH_VERIFY:
            try:
                import math_verify  # noqa: F401
            except ImportError:
                raise UserError(f"{key}: math_verify needs the math-verify package: pip install math-verify") from None
        rule = exact_match if name == EXACT_MATCH else math_verify_match
        return lambda prompts, responses, references=None: rule(
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


def reward_inputs(tokenizer, prompts: list, responses: list) -> list[list[int]]:
    """The token ids trl's RewardTrainer trains on for each (prompt, response) pair, so that scoring sees what
    training saw: conversations through the chat template (prompt + response messages); strings as
    prompt + response + EOS (EOS added when missing) encoded with the tokenizer's own special tokens (BOS where it
    adds one)."""
    ids = []
    for prompt, response in zip(prompts, responses, strict=True):
        if isinstance(prompt, list):
            ids.append(tokenizer.apply_chat_template(prompt + response, tokenize=True, return_dict=True)["input_ids"])
        else:
            eos = tokenizer.eos_token
            ids.append(tokenizer(text=prompt + (response if response.endswith(eos) else response + eos))["input_ids"])
    return ids


def score_pairs(model, tokenizer, prompts: list, responses: list, batch_size: int = 16) -> list[float]:
    """Reward-model scores for (prompt, response) pairs, rendered exactly as training rendered them (reward_inputs).

    `prompts[i]` is a string or a message list; `responses[i]` a string or a message list of the same kind.
        model = AutoModelForSequenceClassification.from_pretrained("runs/tiny/reward/model")
        tok = AutoTokenizer.from_pretrained("runs/tiny/reward/model")
        score_pairs(model, tok, [[{"role": "user", "content": "2 + 3?"}]], [[{"role": "assistant", "content": "5"}]])
    """
    import torch

    rows = reward_inputs(tokenizer, prompts, responses)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    scores: list[float] = []
    model.eval()
    with torch.no_grad():
        for start in range(0, len(rows), batch_size):
            batch = rows[start : start + batch_size]
            width = max(len(r) for r in batch)  # right padding: the score is read at the last real token
            ids = torch.tensor([r + [pad] * (width - len(r)) for r in batch], device=model.device)
            mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in batch], device=model.device)
            scores += model(input_ids=ids, attention_mask=mask).logits[:, 0].float().tolist()
    return scores


def as_reply(prompt, text: str):
    """A response in its prompt's format: an assistant message list for a conversation, else the string."""
    return [{"role": "assistant", "content": text}] if isinstance(prompt, list) else text


def require_reward_model(path: str, given: str, trust_remote_code: bool, key: str = "reward_model") -> None:
    """Refuse a folder whose config names another architecture than a sequence classifier (a policy's folder):
    transformers would load it and score with a new, random head. `given` is what the user wrote under `key`."""
    from transformers import AutoConfig

    try:
        architectures = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code).architectures or []
    except (OSError, ValueError) as exc:
        raise UserError(f"{key}: cannot load {given!r}: {' '.join(str(exc).split())[:300]}") from None
    if architectures and not any(a.endswith("ForSequenceClassification") for a in architectures):
        raise UserError(f"{key}: {given} holds a {architectures[0]}, not a reward model (a "
                        "...ForSequenceClassification with one score, as `llmpipe reward` writes); loading it as "
                        "one would score with a new random head")  # fmt: skip


def reward_scorer(reward_model: str, trust_remote_code: bool, device, key: str = "reward_model"):
    """scorer(prompts, response_texts, references=None) -> list of floats: the reward model (its own tokenizer and
    template, A10, through score_pairs; references unused; require_reward_model first)."""
    from transformers import AutoModelForSequenceClassification

    from pipeline.modeling import load_pretrained, load_tokenizer, resolve_model_path

    path = resolve_model_path(reward_model, key)
    require_reward_model(path, reward_model, trust_remote_code, key)
    tokenizer = load_tokenizer(path, trust_remote_code, pad_with_eos=True)
    model = load_pretrained(AutoModelForSequenceClassification, path, trust_remote_code, "reward_model")
    model.config.pad_token_id = tokenizer.pad_token_id
    model.to(device).eval().requires_grad_(False)

    def scorer(prompts: list, texts: list[str], references: list | None = None) -> list[float]:
        return score_pairs(model, tokenizer, prompts, [as_reply(p, t) for p, t in zip(prompts, texts, strict=True)])

    return scorer


FUNCTION_PATH = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")


def reward_kind(spec: str) -> str:
    """What a reward entry names: 'rule' (exact_match, math_verify), 'task' (an eval task YAML: its answer filter and
    exact-match options), 'function' ('package.module:function') or 'model' (a reward stage folder, any
    sequence-classification model folder or hub name)."""
    if spec in RULES:
        return "rule"
    if spec.endswith((".yaml", ".yml")):
        return "task"
    return "function" if FUNCTION_PATH.match(spec) else "model"


def needs_reference(spec: str) -> bool:
    """Whether a reward entry scores each answer against its prompt's reference: a rule or a task's metric."""
    return reward_kind(spec) in ("rule", "task")


def reward_entry_problem(spec: str, key: str) -> str | None:
    """Why a reward entry names nothing (a word that is no rule, task file, function, folder or org/name hub
    model: most often a misspelt exact_match), or None. Said before any model is loaded or hub asked."""
    from pathlib import Path

    if reward_kind(spec) != "model" or "/" in spec or Path(spec).exists():
        return None
    close = difflib.get_close_matches(spec, RULES, n=1, cutoff=0.6)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return (f"{key}: {spec!r} is not exact_match, math_verify, a task YAML, a 'package.module:function' or a "
            f"reward-model folder or hub name (org/name){hint}")  # fmt: skip


def load_scorer(spec: str, key: str, trust_remote_code: bool = False, device=None):
    """scorer(prompts, texts, references=None) -> floats for one reward entry (reward_kind): the rule, the
    function, the task's metric against each reference, or the reward model on `device` scored as its trainer saw
    the pairs (score_pairs)."""
    if reward_kind(spec) == "task":
        return task_scorer(spec)
    if reward_kind(spec) == "model":
        return reward_scorer(spec, trust_remote_code, device, key)
    return load_reward_function(spec, key)


def task_scorer(path: str):
    """scorer(prompts, texts, references) -> 1.0/0.0 per answer under an eval task's own metric (a generate_until
    task: its stop strings, answer filter and exact-match options); no reference scores 0.0."""
    from pipeline.evaluation.task_rewards import load_generation_task, task_answer_score

    spec = load_generation_task(path)

    def score(prompts: list, texts: list[str], references: list | None = None) -> list[float]:
        references = references or [None] * len(texts)
        return [0.0 if r is None else task_answer_score(spec, t, r) for t, r in zip(texts, references, strict=True)]

    return score


ROUTES = ("model", "function", "sum")  # what scores a prompt when a run has a reward model and a reward function


def routed_scores(prompts: list, texts: list[str], references: list, routes: list[str], model_scorer,
                  function_scorer, function_weight: float = 1.0) -> tuple[list, list]:  # fmt: skip
    """Each answer's reward by its prompt's route: the reward model's score ('model'), the reward function's times
    `function_weight` ('function'), or both added ('sum': open-instruct's RLVR adds a verifiable reward to the
    reward model's score). Each scorer is called once, on the rows routed to it only. Returns the rewards and
    each row's unweighted function score (None where the function did not score it): how often the verifiable
    prompts were answered right."""
    rewards, verified = [0.0] * len(texts), [None] * len(texts)
    for name, scorer in (("model", model_scorer), ("function", function_scorer)):
        rows = [i for i, route in enumerate(routes) if route in (name, "sum")]
        if not rows:
            continue
        if scorer is None:
            raise ValueError(f"{len(rows)} prompt(s) routed to the reward {name}, but the run has none")
        scores = scorer([prompts[i] for i in rows], [texts[i] for i in rows], references=[references[i] for i in rows])
        for i, score in zip(rows, scores, strict=True):
            rewards[i] += function_weight * score if name == "function" else score
            if name == "function":
                verified[i] = score
    return rewards, verified
