"""Tests for tools/chat_arithmetic.py, the smollm2 recipe's data: the committed files are the generator's output,
answers are right, held-out operands never appear in train, and the control task's gold choice is the fact."""

from __future__ import annotations

import json
import re
from pathlib import Path

from tools import chat_arithmetic as ca

COMMITTED = Path(__file__).resolve().parents[1] / "data" / "smollm2"


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def kind(question: str) -> str:
    if "+" in question or "plus" in question or question.startswith(("Add", "What is the sum")):
        return "add"
    if question.startswith("Subtract") or " - " in question or "minus" in question or "take away" in question:
        return "sub"
    return "convert"


def solve(question: str) -> int:
    """The answer computed from the question's own words, independently of the generator's arithmetic."""
    numbers = [int(n) for n in re.findall(r"\d+", question)]
    if kind(question) == "add":
        return numbers[0] + numbers[1]
    if kind(question) == "sub":
        return numbers[1] - numbers[0] if question.startswith("Subtract") else numbers[0] - numbers[1]
    factors = {(big, small): f for big, small, f in ca.UNITS}
    big = next(b for b, _, _ in ca.UNITS if re.search(rf"\d+ {b}\b", question))
    small = next(s for b, s, _ in ca.UNITS if b == big and s in question.replace(f"{numbers[0]} {big}", ""))
    return numbers[0] * factors[big, small]


def operands(question: str) -> tuple:
    """What makes two questions the same problem: the operation and its operands (a sum's in either order)."""
    numbers = tuple(int(n) for n in re.findall(r"\d+", question))
    if kind(question) == "add":
        return ("add", *sorted(numbers))
    if kind(question) == "sub":
        return ("sub", *sorted(numbers))
    return ("convert", next(b for b, _, _ in ca.UNITS if re.search(rf"\d+ {b}\b", question)), *numbers)


def test_committed_files_are_the_generators_output():
    built = ca.build(0)
    for name, rows in built.items():
        assert read_jsonl(COMMITTED / name) == rows, f"data/smollm2/{name}: run python -m tools.chat_arithmetic"
    assert ca.build(1)["heldout.jsonl"] != built["heldout.jsonl"]  # the seed matters


def test_answers_are_right_and_heldout_operands_are_unseen():
    data = ca.build(0)
    train = [(row["messages"][0]["content"], row["messages"][1]["content"]) for row in data["train.jsonl"]]
    heldout = [(row["question"], row["answer"]) for row in data["heldout.jsonl"]]
    for question, answer in train + heldout:
        assert answer == str(solve(question)), (question, answer)
    assert len({q for q, _ in train}) == len(train) == 3000 and len(heldout) == 300
    kinds = {row["kind"] for row in data["heldout.jsonl"]}
    assert kinds == {"add", "sub", "convert"}
    # the same operands in another phrasing would let a model recall instead of compute
    seen = {operands(q) for q, _ in train}
    assert not [q for q, _ in heldout if operands(q) in seen]


def test_general_task_gold_is_the_fact():
    rows = ca.build(0)["general.jsonl"]
    tables = {"capital": ca.CAPITALS, "symbol": ca.SYMBOLS, "opposite": ca.OPPOSITES}
    assert len(rows) == sum(len(t) for t in tables.values())
    for row in rows:
        key = re.search(r"(?:of|for) \"?([^\"?]+)\"?\?$", row["question"]).group(1)
        assert row["choices"][row["gold"]] == tables[row["kind"]][key], row
        assert len(set(row["choices"])) == 4
    assert len({row["gold"] for row in rows}) == 4  # the gold answer is not always in the same place
