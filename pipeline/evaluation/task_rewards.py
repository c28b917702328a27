"""An eval task as an RL reward and as held-out questions (grpo): its metric on one answer, its evaluated documents
as question/answer rows."""

from __future__ import annotations

from pipeline.config import UserError
from pipeline.evaluation.tasks import (
    TaskSpec,
    answer_matches,
    doc_target,
    filter_answer,
    load_split,
    load_task_file,
    resolve,
)


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
        rows.append({"question": str(resolve(doc, spec.chat_doc_to_text or spec.doc_to_text)),
                     "answer": str(target[0] if isinstance(target, list) else target)})  # fmt: skip
    return rows
