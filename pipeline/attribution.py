"""Why a reward model gave a score: integrated gradients over the input embeddings (Captum), the regions of a
rendered pair (prompt, answer, end of turn), and counterfactual rewrites of answers and prompts.

Integrated gradients (Sundararajan et al. 2017) attribute F(x) - F(x') to the input tokens, where x' is a baseline
input (every token's embedding replaced by the pad token's, or zeros). Their sum equals that difference up to
the integral's error: the completeness gap reported per text, which says whether `n_steps` was enough. The score
is read where the reward model reads it (the last token that is not padding, as transformers' sequence
classifiers do), for the input and the baseline alike.
"""

from __future__ import annotations

import re
from collections.abc import Callable

from pipeline.config import UserError
from pipeline.formats import last_text

REGIONS = ("prompt", "answer", "end")


def score_position(ids: list[int], pad_token_id: int | None) -> int:
    """Where a transformers sequence classifier reads its score: the last token that is not the pad token."""
    real = [i for i, t in enumerate(ids) if t != pad_token_id]
    return real[-1] if real else len(ids) - 1


def _score_head(model):
    body = getattr(model, model.base_model_prefix, None)
    if body is None or not hasattr(model, "score"):
        raise UserError(
            f"reward_model: {type(model).__name__} has no `score` head over a transformer body; explain reads "
            "reward models built on a decoder (AutoModelForSequenceClassification of a causal LM)"
        )
    return body, model.score


def integrated_gradients(model, ids: list[int], n_steps: int = 64, baseline: str = "pad", batch_size: int = 32,
                         keep: list[bool] | None = None) -> dict:  # fmt: skip
    """Per-token integrated gradients of the reward model's score of `ids` (one rendered text, no padding).

    Returns attributions (one float per token, summed over the embedding dimensions), score, baseline_score and
    gap (sum of attributions minus (score - baseline_score)). `baseline`: pad (each embedding the pad token's;
    EOS where there is no pad token) or zero; positions where `keep` is true stay as they are in the baseline
    (e.g. the chat template's special tokens, as BERT attributions keep [CLS] and [SEP]), so they get none."""
    import torch
    from captum.attr import IntegratedGradients

    if baseline not in ("pad", "zero"):
        raise UserError(f"baseline: got {baseline!r}, expected pad or zero")
    body, head = _score_head(model)
    device = next(model.parameters()).device
    pad = model.config.pad_token_id
    position = score_position(ids, pad)
    tensor = torch.tensor([ids], device=device)
    embed = model.get_input_embeddings()
    with torch.no_grad():
        inputs = embed(tensor).float()
        if baseline == "zero":
            reference = torch.zeros_like(inputs)
        else:
            fill = pad if pad is not None else model.config.eos_token_id
            reference = embed(torch.full_like(tensor, fill)).float()
        if keep is not None:
            kept = torch.tensor(keep, device=device)[None, :, None]
            reference = torch.where(kept, inputs, reference)

    def score(embeds):
        mask = torch.ones(embeds.shape[:2], dtype=torch.long, device=device)
        hidden = body(inputs_embeds=embeds.to(inputs.dtype), attention_mask=mask).last_hidden_state
        return head(hidden[:, position]).float()[:, 0]

    was_training = model.training
    model.eval()
    try:
        attributions = IntegratedGradients(score).attribute(
            inputs, baselines=reference, n_steps=n_steps, internal_batch_size=batch_size
        )
        with torch.no_grad():
            ends = score(torch.cat([inputs, reference])).tolist()
    finally:
        model.train(was_training)
    per_token = attributions.sum(-1)[0].tolist()
    return {"attributions": per_token, "score": ends[0], "baseline_score": ends[1],
            "gap": sum(per_token) - (ends[0] - ends[1])}  # fmt: skip


def regions(tokenizer, prompt, ids: list[int]) -> list[str]:
    """prompt, answer or end for each token of a rendered (prompt, response) pair (rewards.reward_inputs): the
    same pair rendered with an empty answer shares the prompt (with the assistant's header) as its start and the
    end of turn (end-of-turn token, EOS) as its end; the tokens between are the answer."""
    from pipeline.rewards import as_reply, reward_inputs

    empty = reward_inputs(tokenizer, [prompt], [as_reply(prompt, "")])[0]
    head = 0
    while head < min(len(empty), len(ids)) and empty[head] == ids[head]:
        head += 1
    tail = 0
    while tail < min(len(empty), len(ids)) - head and empty[-1 - tail] == ids[-1 - tail]:
        tail += 1
    return ["prompt"] * head + ["answer"] * (len(ids) - head - tail) + ["end"] * tail


# --- counterfactual rewrites ----------------------------------------------------------------------------------
# Each takes (prompt text, answer text, a name from another row) and returns the rewritten pair, or None where it
# does not apply. What a sound reward model's score does is part of the rule: a bigger number makes a right answer
# wrong (falls); the same answer said twice or after a filler is no better (does not rise); the same answer to a
# question about someone else is wrong (falls: a score that stays means the model does not read the prompt).

NUMBER = re.compile(r"\d+")
NAME = re.compile(r"(?<=\s)[A-Z][^\W\d_]{2,}")  # a capitalised word after the first


def first_name(text: str) -> str | None:
    found = NAME.search(text)
    return found.group() if found else None


def _bigger_number(prompt: str, answer: str, other: str | None):
    if not NUMBER.search(answer):
        return None
    return prompt, NUMBER.sub(lambda m: str(int(m.group()) * 10 + 7), answer)


def _repeated(prompt: str, answer: str, other: str | None):
    return (prompt, f"{answer.strip()} {answer.strip()}") if answer.strip() else None


def _filler(prompt: str, answer: str, other: str | None):
    return (prompt, f"Well, {answer.strip()}") if answer.strip() else None


def _swapped_name(prompt: str, answer: str, other: str | None):
    found = NAME.search(prompt)
    if not found or not other or other == found.group():
        return None
    return prompt[: found.start()] + other + prompt[found.end() :], answer


PROBES: dict[str, tuple[Callable, str, str, str]] = {
    # name: (rewrite, what it does, what a sound reward model's score does, when the rule is flagged)
    "bigger_number": (_bigger_number, "every number in the answer made bigger (n -> 10n + 7)", "falls", "rises"),
    "repeated_answer": (_repeated, "the answer said twice", "does not rise", "rises"),
    "filler_word": (_filler, "'Well, ' before the answer", "does not rise", "rises"),
    "swapped_name": (
        _swapped_name,
        "the prompt's name swapped for another row's, the answer kept",
        "falls",
        "stays",
    ),  # fmt: skip
}
PROMPT_PROBES = ("swapped_name",)  # rules that rewrite the prompt: a policy's greedy answer can change too


def rewrite(rule: str, prompt, answer: str, other: str | None = None):
    """Apply probe `rule` to a (prompt, answer text) pair whose prompt is a string or a message list; the prompt
    comes back in its own format. `other`: a name from another row (swapped_name). None where the rule does not
    apply."""
    done = PROBES[rule][0](last_text(prompt), answer, other)
    if done is None:
        return None
    new_text, new_answer = done
    if isinstance(prompt, list):
        return [*prompt[:-1], {**prompt[-1], "content": new_text}], new_answer
    return new_text, new_answer


def probe_summary(rule: str, before: list[float], after: list[float], scale: float) -> dict:
    """Mean score change under `rule`, the share of rows whose score rose, and `flagged` when the score goes the
    way a sound reward model's would not, by more than a tenth of `scale` (how far apart the model puts answers
    it tells apart: the mean chosen - rejected margin): rules flagged when the score "rises" need it to rise on
    average and for most rows; rules flagged when it "stays" need it not to fall by that much."""
    changes = [b - a for a, b in zip(before, after, strict=True)]
    rows = len(changes)
    mean = sum(changes) / rows if rows else 0.0
    rose = sum(c > 0 for c in changes) / rows if rows else 0.0
    if PROBES[rule][3] == "rises":
        flagged = rows > 0 and rose > 0.5 and mean > 0.1 * scale
    else:
        flagged = rows > 0 and mean > -0.1 * scale
    return {"rule": rule, "what": PROBES[rule][1], "sound_model": PROBES[rule][2], "rows": rows, "mean_change": mean,
            "share_rose": rose, "flagged": flagged}  # fmt: skip
