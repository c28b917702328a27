"""An eval task's metric on one generated answer (its answer filters and exact-match options), as llmpipe eval
scores it and as an RL reward (grpo), and its evaluated documents as held-out question/answer rows."""

from __future__ import annotations

import re
import string

from pipeline.config import UserError
from pipeline.evaluation.tasks import TaskSpec, doc_target, load_split, load_task_file, resolve


def filter_answer(spec: TaskSpec, text: str, name: str | None = None) -> str:
    """What the task scores of a generated answer: its answer_filter, or the other filter called `name`."""
    f = spec.answer_filter if name is None else spec.other_filters[name]
    if f.regex is not None:
        matches = re.findall(f.regex, text)
        if not matches:
            text = f.fallback
        else:
            match = matches[f.group_select]
            if isinstance(match, tuple):  # several groups: the first that matched
                match = next((m for m in match if m), f.fallback)
            text = match.strip()
    return text.strip() if f.strip else text


def answer_matches(spec: TaskSpec, answer: str, target: str) -> bool:
    """lm-eval's exact_match of one filtered answer against its target, with the task's options."""
    em = spec.exact_match
    for pattern in em.regexes_to_ignore:
        answer, target = re.sub(pattern, "", answer), re.sub(pattern, "", target)
    if em.ignore_case:
        answer, target = answer.lower(), target.lower()
    drop = (string.punctuation if em.ignore_punctuation else "") + (string.digits if em.ignore_numbers else "")
    if drop:
        table = str.maketrans("", "", drop)
        answer, target = answer.translate(table), target.translate(table)
    return answer == target


def task_answer_score(spec: TaskSpec, text: str, target: str) -> float:
    """1.0 when a generated answer is right under the task's own metric: cut at its `until` strings, filtered
    (answer_filter), compared with its exact_match options; else 0.0."""
    for stop in spec.generation_kwargs.until or []:
        text = text.split(stop, 1)[0] if stop else text
    return float(answer_matches(spec, filter_answer(spec, text), str(target)))


def load_generation_task(path: str) -> TaskSpec:
    """A task YAML that can score an answer (reward) or ask held-out questions: generate_until, checked by exact
    match; any other output_type is refused, naming the file."""
    spec = load_task_file(path)
    if spec.output_type != "generate_until":
        raise UserError(f"{path}: output_type {spec.output_type!r}; a task reward or held-out questions need a "
                        "generate_until task (an answer checked by exact match)")  # fmt: skip
    return spec


def task_questions(spec: TaskSpec, split: str | None = None) -> list[dict]:
    """The documents of a generate_until task (load_generation_task) as held-out questions asked as a chat model is
    asked them: {question: chat_doc_to_text (else doc_to_text), answer: the target} (the first target where a
    document lists several), from its evaluated split by default."""
    rows = []
    for doc in load_split(spec, split or spec.eval_split):
        target = doc_target(spec, doc)
        question = str(resolve(doc, spec.chat_doc_to_text or spec.doc_to_text))
        # the document's own text inside the prompt (gsm8k's `question` in "Question: ...\nAnswer:"), which the
        # overlap check also looks for among training prompts written without the task's scaffolding
        inside = [v for v in doc.values() if isinstance(v, str) and len(v.strip()) >= 8 and v in question]
        rows.append({"question": question, "answer": str(target[0] if isinstance(target, list) else target),
                     "asked_fields": inside})  # fmt: skip
    return rows
