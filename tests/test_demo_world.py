"""Tests for tools/demo_world.py: determinism, the committed data/demo files, schemas, and the guarantees of
the train / held-out split that make the demo's eval meaningful."""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import pytest

from tools import demo_world as dw

COMMITTED = Path(__file__).resolve().parents[1] / "data" / "demo"
JSONL = [
    "corpus.jsonl",
    "sft.jsonl",
    "preference.jsonl",
    "preference_eval.jsonl",
    "prompts.jsonl",
    "arithmetic.jsonl",
    "comparisons.jsonl",
    "eval.jsonl",
]
FILES = [*JSONL, "README.md"]
SMALL_MB = 0.3  # enough documents for every check below, a tenth of the real corpus


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def name_pattern(names: list[str]) -> re.Pattern[str]:
    return re.compile(r"\b(" + "|".join(map(re.escape, names)) + r")\b")


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("demo")
    assert dw.main(["--out", str(out), "--corpus-mb", str(SMALL_MB)]) == 0
    return out


@pytest.fixture(scope="module")
def data(small: Path) -> dict[str, list[dict]]:
    return {name.removesuffix(".jsonl"): read_jsonl(small / name) for name in JSONL}


@pytest.fixture(scope="module")
def world() -> dw.World:
    return dw.build_world(0)


# --- determinism and the committed files ------------------------------------------------------------------


def test_writes_exactly_the_documented_files(small: Path) -> None:
    # No temp files left behind by the atomic writes, nothing missing.
    assert sorted(p.name for p in small.iterdir()) == sorted(FILES)


def test_same_seed_gives_byte_identical_files(small: Path, tmp_path: Path) -> None:
    dw.main(["--out", str(tmp_path), "--corpus-mb", str(SMALL_MB)])
    for name in FILES:
        assert (tmp_path / name).read_bytes() == (small / name).read_bytes(), name


def test_committed_data_is_exactly_the_generator_output(tmp_path: Path) -> None:
    dw.main(["--out", str(tmp_path)])  # default seed and size, like the committed data
    for name in FILES:
        assert (COMMITTED / name).is_file(), f"data/demo/{name} is missing: run python -m tools.demo_world"
        assert (tmp_path / name).read_bytes() == (COMMITTED / name).read_bytes(), f"data/demo/{name} is stale"


def test_different_seed_gives_different_files(small: Path, tmp_path: Path) -> None:
    dw.main(["--out", str(tmp_path), "--corpus-mb", str(SMALL_MB), "--seed", "1"])
    for name in FILES:
        assert (tmp_path / name).read_bytes() != (small / name).read_bytes(), name


def test_corpus_size_follows_corpus_mb(small: Path) -> None:
    size = (small / "corpus.jsonl").stat().st_size
    assert SMALL_MB * 1e6 <= size < SMALL_MB * 1e6 + 2000


def test_corpus_mb_changes_only_the_corpus(small: Path) -> None:
    # Each file has its own random stream, so the small test corpus leaves the chat files as committed.
    for name in JSONL[1:]:
        assert (small / name).read_bytes() == (COMMITTED / name).read_bytes(), name


# --- schemas ----------------------------------------------------------------------------------------------


def test_rows_have_the_documented_keys(data: dict[str, list[dict]]) -> None:
    assert all(set(r) == {"text"} and isinstance(r["text"], str) and r["text"] for r in data["corpus"])
    assert all(set(r) == {"messages"} for r in data["sft"])
    for name in ("preference", "preference_eval"):
        assert all(set(r) == {"prompt", "chosen", "rejected"} for r in data[name]), name
    assert all(set(r) == {"id", "kind", "question", "answer", "choices", "gold"} for r in data["eval"])
    assert all(set(r) == {"messages"} and len(r["messages"]) == 2 for r in data["prompts"])
    # 30 preference people x 4 facts x 4 phrasings, six pairs each; 500 comparisons, three pairs each
    assert 2000 <= len(data["sft"]) <= 5000 and len(data["preference"]) == 480 * 6 + 500 * 3
    # the other 2 phrasings of those facts, and the 50 reserved comparisons
    assert len(data["preference_eval"]) == 240 + 50 and 400 <= len(data["eval"]) <= 600
    assert len({r["id"] for r in data["eval"]}) == len(data["eval"])


def test_sft_roles_and_turns(data: dict[str, list[dict]]) -> None:
    n_system = n_two_turn = 0
    for row in data["sft"]:
        roles = [m["role"] for m in row["messages"]]
        assert set(roles) <= {"system", "user", "assistant"} and roles[-1] == "assistant"
        n_system += roles[0] == "system"
        chat = roles[1:] if roles[0] == "system" else roles
        assert chat == ["user", "assistant"] * (len(chat) // 2) and len(chat) in (2, 4)
        n_two_turn += len(chat) == 4
        assert all(isinstance(m["content"], str) and m["content"].strip() for m in row["messages"])
    # Both variants present as a small share, as the README documents (~10% each).
    assert 0.05 < n_system / len(data["sft"]) < 0.2 and 0.05 < n_two_turn / len(data["sft"]) < 0.2


def test_preference_rows_are_one_turn_with_distinct_answers(data: dict[str, list[dict]]) -> None:
    for name in ("preference", "preference_eval"):
        for row in data[name]:
            assert [m["role"] for m in row["prompt"]] == ["user"]
            assert [m["role"] for m in row["chosen"]] == [m["role"] for m in row["rejected"]] == ["assistant"]
            assert row["chosen"][0]["content"] != row["rejected"][0]["content"]


def test_training_pairs_reject_every_kind_of_wrong_answer_and_favour_no_value(data: dict[str, list[dict]]) -> None:
    """Each training fact question is paired six times (three values of its kind, two blends, another kind or an
    evasive reply), each comparison three times; a value is rejected about as often as it is the answer, so a
    reward model cannot score it by how common it is."""
    by_prompt: dict[str, list[tuple[str, str]]] = {}
    for row in data["preference"]:
        by_prompt.setdefault(row["prompt"][0]["content"], []).append(
            (row["chosen"][0]["content"], row["rejected"][0]["content"])
        )
    kind_of = {v: a for a, values in dw.ATTRS.items() for v in values}
    chosen, rejected = Counter(), Counter()
    for question, pairs in by_prompt.items():
        answer = pairs[0][0]
        if answer.isdigit():
            assert len(pairs) == 3 and str(min(int(n) for n in re.findall(r"\d+", question))) in {r for _, r in pairs}
            continue
        same_kind = [r for _, r in pairs if kind_of.get(r) == kind_of[answer]]
        assert len(pairs) == 6 and len(same_kind) == 3, (question, pairs)
        assert sum(r not in kind_of for _, r in pairs) >= 2, pairs  # the blends (and maybe an evasive reply)
        chosen[answer] += 1
        rejected.update(same_kind)
    for value, n in chosen.items():
        share_chosen = n / sum(c for v, c in chosen.items() if kind_of[v] == kind_of[value])
        share_rejected = rejected[value] / sum(c for v, c in rejected.items() if kind_of[v] == kind_of[value])
        assert 0.5 < share_rejected / share_chosen < 2, (value, share_chosen, share_rejected)


def test_eval_answers_sit_at_gold(data: dict[str, list[dict]]) -> None:
    kinds = set(dw.ATTRS) | set(dw.ARITH_KINDS)
    for row in data["eval"]:
        assert row["kind"] in kinds and row["id"].startswith(row["kind"])
        assert len(row["choices"]) == len(set(row["choices"])) == 4
        assert row["choices"][row["gold"]] == row["answer"]
    assert {r["gold"] for r in data["eval"]} == {0, 1, 2, 3}  # the gold position varies


def test_eval_arithmetic_answers_are_correct(data: dict[str, list[dict]]) -> None:
    # Recompute each answer from the numbers in the question, independently of the generator's code.
    for row in (r for r in data["eval"] if r["kind"] in dw.ARITH_KINDS):
        nums = [int(n) for n in re.findall(r"\d+", row["question"])]
        x, y = (nums[-1], nums[0]) if row["question"].startswith("Subtract") else (nums[0], nums[-1])
        expected = {"add": x + y, "sub": x - y, "larger": max(x, y), "next": x + 1, "prev": x - 1}[row["kind"]]
        assert row["answer"] == str(expected), row


def test_arithmetic_pairs_are_right_and_from_the_train_pool(data: dict[str, list[dict]], world: dw.World) -> None:
    """arithmetic.jsonl: every chosen answer recomputed from the question, every rejected one wrong, and only the
    train pool's items (the eval and preference_eval arithmetic stays reserved)."""
    ops = {
        "add": lambda x, y: x + y,
        "sub": lambda x, y: x - y,
        "next": lambda x, _: x + 1,
        "prev": lambda x, _: x - 1,
    }
    seen = Counter()
    for row in data["arithmetic"]:
        question, chosen, rejected = (row[k][0]["content"] for k in ("prompt", "chosen", "rejected"))
        kind = next(k for k in dw.RULE_ARITH for t in dw.QUESTION_TEMPLATES[k] if re.fullmatch(
            re.escape(t).replace(r"\{x\}", r"\d+").replace(r"\{y\}", r"\d+"), question))  # fmt: skip
        nums = [int(n) for n in re.findall(r"\d+", question)]
        x, y = (nums[-1], nums[0]) if question.startswith("Subtract") else (nums[0], nums[-1])
        assert chosen == str(ops[kind](x, y)) != rejected, row
        key = (x,) if kind in ("next", "prev") else (x, y) if kind == "sub" else (min(x, y), max(x, y))
        assert key in world.pools["train"][kind], row
        seen[kind] += 1
    assert set(seen) == set(dw.RULE_ARITH) and all(seen[k] == 2 * len(world.pools["train"][k]) for k in seen)


def test_rl_comparisons_are_right_and_from_the_train_pool(data: dict[str, list[dict]], world: dw.World) -> None:
    """comparisons.jsonl: each answer the larger of the question's two numbers, every pair from the train pool
    (preference_eval's and eval's comparisons stay reserved), no question twice."""
    rows = data["comparisons"]
    assert len(rows) == dw.N_RL_COMPARISONS
    questions = [r["messages"][0]["content"] for r in rows]
    assert len(set(questions)) == len(questions)
    for row in rows:
        (user, assistant) = row["messages"]
        assert (user["role"], assistant["role"]) == ("user", "assistant")
        x, y = (int(n) for n in re.findall(r"\d+", user["content"]))
        assert assistant["content"] == str(max(x, y)) and (min(x, y), max(x, y)) in world.pools["train"]["larger"]


# --- the held-out split -----------------------------------------------------------------------------------


def test_arithmetic_pools_are_disjoint(world: dw.World) -> None:
    for kind in dw.ARITH_KINDS:
        train, ev, pref = (set(world.pools[s][kind]) for s in ("train", "eval", "pref_eval"))
        assert not (train & ev or train & pref or ev & pref), kind


def test_no_eval_question_appears_elsewhere(data: dict[str, list[dict]], small: Path) -> None:
    questions = {r["question"] for r in data["eval"]}
    others = {m["content"] for r in data["sft"] for m in r["messages"] if m["role"] == "user"}
    others |= {
        r["prompt"][0]["content"] for name in ("preference", "preference_eval", "arithmetic") for r in data[name]
    }
    others |= {r["messages"][0]["content"] for r in data["comparisons"]}
    assert not questions & others
    # Nor does the corpus ask them, or preference_eval's questions: its Q/A lines state those facts in other
    # phrasings only, so both sets measure recall, not a line the model memorised (216 of eval's 240 fact
    # questions and 205 of preference_eval's were corpus lines before).
    corpus = (small / "corpus.jsonl").read_text(encoding="utf-8")
    assert not any(r["question"] in corpus for r in data["eval"])
    assert not any(r["prompt"][0]["content"] in corpus for r in data["preference_eval"])


def test_held_out_people_never_in_train_chat_data(world: dw.World, small: Path) -> None:
    held = name_pattern([p.name for p in world.split(held_out=True)])
    for name in (n for n in JSONL if n not in ("corpus.jsonl", "eval.jsonl")):  # every chat and preference file
        text = (small / name).read_text(encoding="utf-8")
        assert held.search(text) is None, name


def test_sft_and_preference_people_are_asked_apart(world: dw.World, small: Path) -> None:
    """SFT never asks about a preference person and the preference data never about an sft person: the sft
    model meets the preference people first in alignment, where its wrong answers are the signal."""
    sft, pref = world.group("sft"), world.group("preference")
    assert len(sft) == 60 and len(pref) == 30 and len(world.group("held_out")) == 30
    for name, asked, never in [
        ("sft.jsonl", sft, pref),
        ("preference.jsonl", pref, sft),
        ("preference_eval.jsonl", pref, sft),
        ("prompts.jsonl", pref, sft),
    ]:
        # the questions (a garbled rejected answer may happen to spell a name)
        text = "\n".join(
            m["content"]
            for r in read_jsonl(small / name)
            for m in r.get("messages", r.get("prompt", []))
            if m["role"] == "user"
        )
        assert name_pattern([p.name for p in never]).search(text) is None, name
        assert set(name_pattern([p.name for p in asked]).findall(text)) == {p.name for p in asked}, name


def test_rl_prompts_are_the_preference_fact_questions(data: dict[str, list[dict]]) -> None:
    chosen = {r["prompt"][0]["content"]: r["chosen"][0]["content"] for r in data["preference"]}
    prompts = [(r["messages"][0]["content"], r["messages"][1]["content"]) for r in data["prompts"]]
    fact_questions = {q for q in chosen if not any(c.isdigit() for c in q)}
    assert len(prompts) == len({q for q, _ in prompts}) == len(fact_questions) == 480
    assert {q for q, _ in prompts} == fact_questions and all(chosen[q] == a for q, a in prompts)


def test_eval_facts_are_about_held_out_people_and_stated_in_corpus(
    data: dict[str, list[dict]], world: dw.World
) -> None:
    people = {p.name: p for p in world.people}
    pattern = name_pattern(list(people))
    docs_by_name: dict[str, list[str]] = {}
    for row in data["corpus"]:
        for name in set(pattern.findall(row["text"])):
            docs_by_name.setdefault(name, []).append(row["text"])
    fact_rows = [r for r in data["eval"] if r["kind"] in dw.ATTRS]
    assert len(fact_rows) >= 100
    for row in fact_rows:
        (name,) = pattern.findall(row["question"])
        assert people[name].held_out and getattr(people[name], row["kind"]) == row["answer"], row
        assert any(re.search(rf"\b{row['answer']}\b", d) for d in docs_by_name.get(name, [])), row


def test_preference_eval_is_a_held_out_split_of_preference(data: dict[str, list[dict]], world: dw.World) -> None:
    """Held-out pairs ask what the training pairs never do, about the same (preference) people; eval asks about
    the held-out people only."""
    prompts = {r["prompt"][0]["content"] for r in data["preference"]}
    assert not any(r["prompt"][0]["content"] in prompts for r in data["preference_eval"])
    pref = name_pattern([p.name for p in world.group("preference")])
    facts = [r for r in data["preference_eval"] if not any(c.isdigit() for c in r["prompt"][0]["content"])]
    assert len(facts) == 240 and all(pref.search(r["prompt"][0]["content"]) for r in facts)
    train = name_pattern([p.name for p in world.split(held_out=False)])
    assert not any(train.search(r["question"]) for r in data["eval"])
