"""Seeded, deterministic generator for the tiny preset's "demo world" data (``data/demo/``).

A ~1-5M parameter model trained for minutes on CPU must learn something measurable, and every later stage
must move a metric the right way. A world of random arithmetic fails that test: random operands are most of
the tokens, pretraining learns little, and SFT from random weights does as well as SFT from the base model.

So the world is mostly *facts*: ~120 invented people, each with a home town, favourite colour, pet and job
drawn from small closed sets. The facts are stated ONLY in the pretraining corpus, dozens of times each and
in several phrasings. People are split three ways: SFT asks only about SFT people, the preference data (and so
the reward model's pairs and the RL prompts) only about PREFERENCE people, and eval only about HELD-OUT people.
A high held-out exact match therefore needs both the knowledge from pretraining and the answer format from SFT;
SFT from scratch cannot get there. The preference people are the ones the sft model has never been asked about,
as the held-out people, so its answers to them are often wrong: alignment has something to learn there, and
what it learns (answering from what pretraining stored) is what eval measures on the held-out people. Prompts
the sft model already answers give DPO, PPO and GRPO nothing to learn (InstructGPT, too, keeps its SFT, reward
and PPO prompts apart).

A minority of the corpus is rule-based skill (small addition/subtraction, "which is larger", successor and
predecessor). Those items are split into disjoint pools, so eval arithmetic appears in no other file.
Answers are short and canonical (one word or one number), so exact match is meaningful.

    python -m tools.demo_world --out data/demo [--seed 0] [--corpus-mb 3.5]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import tempfile
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

# --- the closed sets --------------------------------------------------------------------------------------

TOWNS = [
    "Tillford",
    "Mossbay",
    "Quenholt",
    "Ashgrove",
    "Brindlemere",
    "Corrowick",
    "Dunhallow",
    "Fennick",
    "Harrowgate",
    "Wyndle",
]
COLOURS = ["red", "blue", "green", "teal", "amber", "violet", "crimson", "grey"]
PETS = ["heron", "ferret", "tortoise", "parrot", "rabbit", "hedgehog", "goat", "owl"]
JOBS = ["baker", "miller", "potter", "weaver", "fisher", "smith", "healer", "carpenter"]
ATTRS: dict[str, list[str]] = {"town": TOWNS, "colour": COLOURS, "pet": PETS, "job": JOBS}
N_PEOPLE = 120
HELD_OUT_FRACTION = 0.25
# Of the people who are not held out, the share asked about only in the preference data (and RL prompts).
PREFERENCE_FRACTION = 1 / 3
SYSTEM_PROMPTS = [
    "You are a helpful assistant.",
    "Answer with a single word or number.",
    "You know everyone in the valley. Answer briefly.",
]

# --- templates ("{n}" name, "{v}" value, "{a}" value with its article) -----------------------------------

FACT_TEMPLATES = {
    "town": [
        "{n} lives in {v}.",
        "{v} is the home of {n}.",
        "{n}'s home town is {v}.",
        "{n} comes from {v}.",
        "{n} has lived in {v} for years.",
        "If you visit {v}, you may meet {n}.",
    ],
    "colour": [
        "{n}'s favourite colour is {v}.",
        "The favourite colour of {n} is {v}.",
        "{n} likes {v} more than any other colour.",
        "{n} always wears something {v}.",
    ],
    "pet": [
        "{n} keeps {a} as a pet.",
        "{n} has a pet {v}.",
        "Everyone knows that {n} owns {a}.",
        "The pet of {n} is {a}.",
    ],
    "job": ["{n} works as {a}.", "{n} is {a} by trade.", "By day, {n} is {a}.", "{n} earns a living as {a}."],
}
GROUP_TEMPLATES = {
    "town": "{names} all live in {v}.",
    "colour": "{names} all love the colour {v}.",
    "pet": "{names} all keep {v}s as pets.",
    "job": "{names} all work as {v}s.",
}
QUESTION_TEMPLATES = {
    "town": [
        "Where does {n} live?",
        "What is {n}'s home town?",
        "Which town is {n} from?",
        "In which town does {n} live?",
        "Name the town where {n} lives.",
        "Where is {n} from?",
    ],
    "colour": [
        "What is {n}'s favourite colour?",
        "Which colour does {n} like best?",
        "What colour does {n} like most?",
        "Name {n}'s favourite colour.",
        "What is the favourite colour of {n}?",
        "Which colour is {n}'s favourite?",
    ],
    "pet": [
        "What pet does {n} keep?",
        "What animal does {n} have as a pet?",
        "Which pet does {n} own?",
        "What kind of pet does {n} have?",
        "Name {n}'s pet.",
        "What is {n}'s pet?",
    ],
    "job": [
        "What does {n} do for a living?",
        "What is {n}'s job?",
        "What work does {n} do?",
        "Which trade does {n} follow?",
        "What is {n}'s occupation?",
        "Name {n}'s job.",
    ],
    "add": ["What is {x} plus {y}?", "What is {x} + {y}?", "Compute {x} + {y}.", "Add {x} and {y}."],
    "sub": ["What is {x} minus {y}?", "What is {x} - {y}?", "Compute {x} - {y}.", "Subtract {y} from {x}."],
    "larger": ["Which is larger, {x} or {y}?", "Which number is bigger: {x} or {y}?", "Which is greater, {x} or {y}?"],
    "next": ["What number comes after {x}?", "What is the successor of {x}?", "What number follows {x}?"],
    "prev": ["What number comes before {x}?", "What is the predecessor of {x}?", "What number precedes {x}?"],
}
STATEMENT_TEMPLATES = {
    "add": ["{x} plus {y} is {z}.", "{x} + {y} = {z}.", "Adding {x} and {y} gives {z}."],
    "sub": ["{x} minus {y} is {z}.", "{x} - {y} = {z}.", "Take {y} from {x} and you get {z}."],
    "larger": ["{z} is larger than {w}.", "Between {x} and {y}, the larger is {z}."],
    "next": ["After {x} comes {z}.", "{z} is one more than {x}."],
    "prev": ["Before {x} comes {z}.", "{z} is one less than {x}."],
}
# Eval / preference-eval items reserved per skill; everything else may appear in the corpus, SFT and preference.
ARITH_SPLIT = {"add": (60, 45), "sub": (60, 45), "larger": (60, 50), "next": (20, 20), "prev": (20, 20)}
ARITH_KINDS = list(ARITH_SPLIT)
TEMPLATE_WORDS = {
    w.lower()
    for group in (FACT_TEMPLATES, QUESTION_TEMPLATES, STATEMENT_TEMPLATES)
    for ts in group.values()
    for t in ts
    for w in re.findall(r"[A-Za-z]+", t)
}


@dataclass(frozen=True)
class Person:
    name: str
    town: str  # the attribute fields are named like the keys of ATTRS, so getattr(p, attr) works
    colour: str
    pet: str
    job: str
    group: str  # "sft", "preference" or "held_out" (GROUPS)

    @property
    def held_out(self) -> bool:
        return self.group == "held_out"


GROUPS = ("sft", "preference", "held_out")


@dataclass(frozen=True)
class World:
    people: list[Person]
    pools: dict[str, dict[str, list[tuple[int, ...]]]]  # split ("train"|"eval"|"pref_eval") -> kind -> keys

    def split(self, held_out: bool) -> list[Person]:
        """The held-out people, or everyone else (sft and preference people)."""
        return [p for p in self.people if p.held_out == held_out]

    def group(self, *names: str) -> list[Person]:
        """The people of these groups, in the world's order."""
        return [p for p in self.people if p.group in names]


def article(word: str) -> str:
    return ("an " if word[0] in "aeiou" else "a ") + word


# --- building the world -----------------------------------------------------------------------------------

ONSETS = ["b", "br", "d", "f", "g", "h", "j", "k", "l", "m", "n", "p", "r", "s", "t", "th", "v", "w", "z"]
VOWELS = ["a", "e", "i", "o", "u", "a", "e", "o", "ai", "ei"]
CODAS = ["", "", "n", "l", "r", "s", "m", "th"]
ACCENTS = {"e": "ë", "i": "ï", "o": "ö", "a": "á"}


def make_names(rng: random.Random, n: int) -> list[str]:
    """Pronounceable syllable names; none is a template word, a set value, or a substring of another name."""
    banned = TEMPLATE_WORDS | {v.lower() for vs in ATTRS.values() for v in vs}
    names: list[str] = []
    while len(names) < n:
        # Consonant-vowel syllables with an optional final consonant: "Bramo", "Zarel", "Telinor".
        n_syll = rng.choice([2, 2, 2, 3])
        name = "".join(rng.choice(ONSETS) + rng.choice(VOWELS) for _ in range(n_syll)) + rng.choice(CODAS)
        if rng.random() < 0.06:  # a few accented names, so the tokenizer sees some non-ASCII bytes
            i = next((k for k, c in enumerate(name) if k > 0 and c in ACCENTS), None)
            name = name if i is None else name[:i] + ACCENTS[name[i]] + name[i + 1 :]
        name = name.capitalize()
        low = name.lower()
        # Substring-free names keep "name appears in text" checks exact in the tests.
        if not 4 <= len(name) <= 8 or low in banned or any(low in m.lower() or m.lower() in low for m in names):
            continue
        names.append(name)
    return names


def arith_keys(kind: str) -> list[tuple[int, ...]]:
    """All items of a skill; commutative ones are unordered keys so "3 + 5" and "5 + 3" are one item."""
    if kind == "add":
        return [(a, b) for a in range(21) for b in range(a, 21)]
    if kind == "sub":  # (a + b) - b for a, b in 0..20: results stay in 0..20
        return [(a + b, b) for a in range(21) for b in range(21)]
    if kind == "larger":
        return [(a, b) for a in range(100) for b in range(a + 1, 100)]
    return [(x,) for x in (range(99) if kind == "next" else range(1, 100))]


def build_world(seed: int) -> World:
    # One string-seeded stream per part (str seeds hash with SHA-512, not hash()), so e.g. --corpus-mb
    # changes only the corpus and every other file stays the same.
    rng = random.Random(f"{seed}-world")
    names = make_names(rng, N_PEOPLE)
    n_held = round(N_PEOPLE * HELD_OUT_FRACTION)
    held = set(rng.sample(range(N_PEOPLE), n_held))
    people = [
        Person(name, *(rng.choice(ATTRS[a]) for a in ATTRS), group="held_out" if i in held else "sft")
        for i, name in enumerate(names)
    ]
    pools: dict[str, dict[str, list[tuple[int, ...]]]] = {"train": {}, "eval": {}, "pref_eval": {}}
    for kind, (n_eval, n_pref) in ARITH_SPLIT.items():
        keys = arith_keys(kind)
        rng.shuffle(keys)
        pools["eval"][kind] = keys[:n_eval]
        pools["pref_eval"][kind] = keys[n_eval : n_eval + n_pref]
        pools["train"][kind] = sorted(keys[n_eval + n_pref :])
    # The preference people come from a stream of their own: the people, their facts and so the corpus stay
    # as they were before the three-way split.
    rest = [i for i, p in enumerate(people) if not p.held_out]
    for i in random.Random(f"{seed}-preference-people").sample(rest, round(len(rest) * PREFERENCE_FRACTION)):
        people[i] = replace(people[i], group="preference")
    return World(people, pools)


# --- facts and arithmetic as text -------------------------------------------------------------------------


def fact_sentence(rng: random.Random, p: Person, attr: str) -> str:
    v = getattr(p, attr)
    return rng.choice(FACT_TEMPLATES[attr]).format(n=p.name, v=v, a=article(v))


def arith_answer(kind: str, key: tuple[int, ...]) -> int:
    x, y = key[0], key[-1]
    return {"add": x + y, "sub": x - y, "larger": max(x, y), "next": x + 1, "prev": x - 1}[kind]


def arith_text(rng: random.Random, kind: str, key: tuple[int, ...], question: bool) -> str:
    # Unordered keys are shown in a random order; subtraction's order is its meaning.
    ops = rng.sample(key, 2) if kind in ("add", "larger") else key
    templates = QUESTION_TEMPLATES if question else STATEMENT_TEMPLATES
    return rng.choice(templates[kind]).format(x=ops[0], y=ops[-1], z=arith_answer(kind, key), w=min(key))


def near_misses(answer: str) -> list[str]:
    return [str(n) for n in range(int(answer) - 3, int(answer) + 4) if n >= 0 and str(n) != answer]


def larger_rejections(rng: random.Random, answer: str, key: tuple[int, ...]) -> list[str]:
    """One wrong answer to "which is larger" of each kind: the smaller number; a near miss of the larger one (what a
    small model writes when it does not copy the number); another number that is not among the two, or the answer
    with a digit appended. Without the last kinds a reward model learns "bigger is better" or "about this big is
    fine", and PPO games it (the policy answered 99 or 770 to "66 or 77?", 53 to "30 or 52?")."""
    other = str(rng.choice([n for n in range(1, 100) if n not in key])) if rng.random() < 0.5 else None
    return [
        str(min(key)),
        rng.choice([n for n in near_misses(answer) if int(n) not in key]),
        other or answer + str(rng.randint(0, 9)),
    ]


def garbled(rng: random.Random, answer: str, others: list[str]) -> str:
    """A non-word of the kind a small policy samples: the answer with a letter dropped or doubled, or the start of
    one value run into the end of another ("amisher", "fmiller"). Without these a reward model scores such
    blends like real values, and PPO learns to write them."""
    while True:
        if rng.random() < 0.4:
            i = rng.randrange(len(answer))
            word = answer[:i] + answer[i + 1 :] if rng.random() < 0.5 else answer[: i + 1] + answer[i:]
        else:
            a, b = rng.sample([answer, *others], 2)
            word = a[: rng.randint(1, len(a) - 1)] + b[rng.randint(1, len(b) - 1) :]
        if word and word != answer and word not in others:
            return word


def choices_for(rng: random.Random, kind: str, answer: str, key: tuple[int, ...] = ()) -> tuple[list[str], int]:
    """Four options for multiple-choice eval; distractors are plausible so chance stays at 25%."""
    if kind in ATTRS:
        opts = rng.sample([v for v in ATTRS[kind] if v != answer], 3)
    else:
        first = [str(min(key))] if kind == "larger" else []  # the tempting wrong choice goes in first
        opts = first + rng.sample([n for n in near_misses(answer) if n not in first], 3 - len(first))
    gold = rng.randrange(4)  # a varying gold position, so "always pick A" scores chance
    opts.insert(gold, answer)
    return opts, gold


# --- the pretraining corpus -------------------------------------------------------------------------------


def build_corpus(
    world: World, seed: int, corpus_mb: float, asked: set[str]
) -> tuple[list[str], Counter[tuple[str, str]]]:
    """Documents until ``corpus_mb`` MB; returns them with a count of how often each (name, attr) is stated.
    ``asked``: the fact questions eval and preference_eval ask; Q/A lines state those facts in other phrasings."""
    rng = random.Random(f"{seed}-corpus")
    people, train = world.people, world.pools["train"]
    by_value = {(a, v): [p for p in people if getattr(p, a) == v] for a, vs in ATTRS.items() for v in vs}
    mentions: Counter[tuple[str, str]] = Counter()

    def profile(p: Person, k: int = 4) -> str:
        attrs = rng.sample(list(ATTRS), k)
        sents = [fact_sentence(rng, p, a) for a in attrs]
        mentions.update((p.name, a) for a in attrs)
        if rng.random() < 0.05:  # a touch of typographic variety (em dash) for the tokenizer
            sents.insert(0, f"{p.name} — {article(p.job)} from {p.town}.")
            mentions.update([(p.name, "job"), (p.name, "town")])
        opener = rng.choice(["", "", f"About {p.name}.", f"A note on {p.name}:", "From the valley records:"])
        return " ".join(([opener] if opener else []) + sents)

    def group() -> str:
        attr = rng.choice(list(ATTRS))
        members = by_value[(attr, getattr(rng.choice(people), attr))]
        chosen = rng.sample(members, min(len(members), rng.randint(2, 4)))
        if len(chosen) < 2:  # a value only one person has: state it plainly
            return mixed()
        mentions.update((p.name, attr) for p in chosen)
        names = ", ".join(p.name for p in chosen[:-1]) + " and " + chosen[-1].name
        return GROUP_TEMPLATES[attr].format(names=names, v=getattr(chosen[0], attr))

    def mixed() -> str:
        picks = [(rng.choice(people), rng.choice(list(ATTRS))) for _ in range(rng.randint(3, 5))]
        mentions.update((p.name, a) for p, a in picks)
        return " ".join(fact_sentence(rng, p, a) for p, a in picks)

    def arithmetic() -> str:
        kinds = rng.choices(ARITH_KINDS, k=rng.randint(3, 6))
        return " ".join(arith_text(rng, k, rng.choice(train[k]), question=False) for k in kinds)

    def qa() -> str:
        # Question/Answer lines (about everyone, the corpus is the world's encyclopedia) show the base model
        # the Q/A pattern, never in a phrasing an eval file asks (decontaminated: a held-out question must be
        # answered from what the model knows, not recalled as a line); arithmetic ones from the train pool only.
        lines = []
        for _ in range(rng.randint(2, 4)):
            if rng.random() < 0.7:
                p, attr = rng.choice(people), rng.choice(list(ATTRS))
                mentions[(p.name, attr)] += 1
                phrasings = [q for t in QUESTION_TEMPLATES[attr] if (q := t.format(n=p.name)) not in asked]
                q, a = rng.choice(phrasings), getattr(p, attr)
            else:
                kind = rng.choice(ARITH_KINDS)
                key = rng.choice(train[kind])
                q, a = arith_text(rng, kind, key, question=True), str(arith_answer(kind, key))
            lines.append(f"Question: {q}\nAnswer: {a}")
        return "\n".join(lines)

    makers: list[Callable[[], str]] = [
        lambda: profile(rng.choice(people), rng.choice([3, 4, 4])),
        group,
        mixed,
        arithmetic,
        qa,
    ]
    weights = [45, 12, 18, 15, 10]  # facts dominate; arithmetic (here and in qa) stays about a fifth of tokens
    # One full profile per person first, so every fact is stated even in a tiny corpus.
    docs = [profile(p) for p in people]

    def nbytes(doc: str) -> int:
        return len(json.dumps({"text": doc}, ensure_ascii=False).encode()) + 1

    size, target = sum(nbytes(d) for d in docs), int(corpus_mb * 1_000_000)
    while size < target:
        docs.append(rng.choices(makers, weights)[0]())
        size += nbytes(docs[-1])
    rng.shuffle(docs)
    return docs, mentions


# --- chat data: SFT, preference pairs, eval ---------------------------------------------------------------


def train_items(
    world: World, rng: random.Random, n_facts_each: int, n_arith: int, groups: tuple[str, ...]
) -> list[dict]:
    """Question/answer items about the people of `groups` (every fact in n_facts_each phrasings), plus n_arith
    arithmetic items from the train pool, weighted towards add/sub/larger whose pools are largest."""
    items = [
        {"q": t.format(n=p.name), "a": getattr(p, attr), "kind": attr, "key": ()}
        for p in world.group(*groups)
        for attr in ATTRS
        for t in rng.sample(QUESTION_TEMPLATES[attr], n_facts_each)
    ]
    for kind in rng.choices(ARITH_KINDS, weights=[3, 3, 2, 1, 1], k=n_arith):
        key = rng.choice(world.pools["train"][kind])
        items.append(
            {"q": arith_text(rng, kind, key, True), "a": str(arith_answer(kind, key)), "kind": kind, "key": key}
        )
    return items


def build_sft(world: World, seed: int) -> list[dict]:
    rng = random.Random(f"{seed}-sft")
    # Five of six phrasings per train fact: SFT teaches the answer format across wordings, not one template.
    items = train_items(world, rng, n_facts_each=5, n_arith=1200, groups=("sft",))
    rng.shuffle(items)
    rows, i = [], 0
    while i < len(items):
        turns = 2 if rng.random() < 0.1 and i + 1 < len(items) else 1  # some two-turn chats exercise masking
        msgs = [{"role": "system", "content": rng.choice(SYSTEM_PROMPTS)}] if rng.random() < 0.1 else []
        for it in items[i : i + turns]:
            msgs += [{"role": "user", "content": it["q"]}, {"role": "assistant", "content": it["a"]}]
        rows.append({"messages": msgs})
        i += turns
    return rows


def chat(question: str, answer: str) -> dict:
    """One question and its answer as a chat row: RL reads the final assistant turn as the reference."""
    return {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]}


def pair(question: str, chosen: str, rejected: str) -> dict:
    return {
        "prompt": [{"role": "user", "content": question}],
        "chosen": [{"role": "assistant", "content": chosen}],
        "rejected": [{"role": "assistant", "content": rejected}],
    }


def comparison_rows(items: list[dict], rng: random.Random, every_kind: bool) -> list[dict]:
    """Pairs for "which is larger" items: one per kind of larger_rejections (every_kind), or one of them."""
    rows = []
    for it in items:
        rejected = larger_rejections(rng, it["a"], it["key"])
        rows += [pair(it["q"], it["a"], r) for r in (rejected if every_kind else [rng.choice(rejected)])]
    return rows


def reserved_items(world: World, rng: random.Random, split: str, phrasings: Callable[[str], list[str]]) -> list[dict]:
    """Held-out-people facts (with the given phrasings) plus every arithmetic item reserved for ``split``."""
    items = [
        {"q": t.format(n=p.name), "a": getattr(p, attr), "kind": attr, "key": ()}
        for p in world.split(held_out=True)
        for attr in ATTRS
        for t in phrasings(f"{p.name}/{attr}")
    ]
    for kind, keys in world.pools[split].items():
        items += [
            {"q": arith_text(rng, kind, k, True), "a": str(arith_answer(kind, k)), "kind": kind, "key": k}
            for k in keys
        ]
    return items


# What a chat model gets wrong besides the fact itself: a value of the wrong kind, or no answer at all.
EVASIVE = ["I am not sure.", "I do not know.", "I cannot say.", "Nobody knows that."]
# Arithmetic a 1M-parameter reward model can judge: comparisons. Near-miss sums and successors it cannot
# (held-out pair accuracy ~0.56 and ~0.7 measured on the tiny preset), so they stay out of the preference data.
PREFERENCE_ARITH = ("larger",)
# Of each preference person's fact's phrasings, how many only preference_eval asks.
PREFERENCE_EVAL_PHRASINGS = 2


def fact_rejections(
    items: list[dict], rng: random.Random, values: dict[str, list[str]], every_kind: bool
) -> list[dict]:
    """Preference rows for fact items. With every_kind (the training pairs) each question is paired six times: three
    other values of its kind (the model must know the fact), a blend of two values of its kind ("peaver"), a blend
    of any two values, and a value of another kind or an evasive non-answer (it must know what an answer looks
    like). A reward model trained on one random rejection per question ranked the right value first among all of
    its kind for 60% of questions and PPO found the holes (it wrote "peaver", "fisher" for a pet); with six, 80%+.
    Otherwise (held-out pairs) one of those kinds per question.

    Same-kind rejections are drawn from `values`, every preference person's value (a common value is drawn often):
    drawn uniformly from the set, a value held by 7 of 30 people is chosen far more often than rejected, and the
    reward model learns to like it whoever is asked about."""
    rows = []
    for it in items:
        kind, answer = it["kind"], it["a"]
        same = [v for v in ATTRS[kind] if v != answer]
        options = [
            *(rng.choice([v for v in values[kind] if v != answer]) for _ in range(3)),
            garbled(rng, answer, same),
            garbled(rng, answer, [v for a in ATTRS for v in ATTRS[a] if v != answer]),
            rng.choice(ATTRS[rng.choice([a for a in ATTRS if a != kind])] + EVASIVE),
        ]
        if not every_kind:
            options = [options[0] if rng.random() < 0.55 else rng.choice(options[3:])]
        rows += [pair(it["q"], answer, r) for r in options]
    return rows


def build_preferences(world: World, seed: int) -> tuple[list[dict], list[dict], list[dict]]:
    """Pairs about the PREFERENCE people and comparisons, split by prompt: preference_eval asks what preference
    never does (other phrasings of the same facts: PREFERENCE_EVAL_PHRASINGS of each; reserved comparisons), like
    a held-out split of a real preference set. Also the RL prompts (prompts.jsonl): the preference questions
    about facts, once each, with their answer. No arithmetic: GRPO on the comparisons too taught the policy to
    answer with a number from the question ("what number follows 15?" -> 15, the held-out successors 0.75 ->
    0.00), and on every kind (the tiny model's sampled sums are mostly wrong) it lowered held-out arithmetic and
    people alike (demo_qa 0.396 -> 0.374 against 0.435 on the facts alone; seed 0, bench/RESULTS.md).
    """
    rng = random.Random(f"{seed}-preference")
    n_phrasings = min(len(QUESTION_TEMPLATES[a]) for a in ATTRS)
    # train_items lists each fact's phrasings together, in a random order: the first ones go to preference_eval.
    items = train_items(world, rng, n_facts_each=n_phrasings, n_arith=0, groups=("preference",))
    by_fact = [items[i : i + n_phrasings] for i in range(0, len(items), n_phrasings)]
    eval_facts = [it for fact in by_fact for it in fact[:PREFERENCE_EVAL_PHRASINGS]]
    facts = [it for fact in by_fact for it in fact[PREFERENCE_EVAL_PHRASINGS:]]
    compare = [
        {"q": arith_text(rng, kind, key, True), "a": str(arith_answer(kind, key)), "kind": kind, "key": key}
        for kind in PREFERENCE_ARITH
        for key in rng.sample(world.pools["train"][kind], 500)
    ]
    reserved = [
        {"q": arith_text(rng, kind, key, True), "a": str(arith_answer(kind, key)), "kind": kind, "key": key}
        for kind in PREFERENCE_ARITH
        for key in world.pools["pref_eval"][kind]
    ]
    values = {a: [getattr(p, a) for p in world.group("preference")] for a in ATTRS}
    train = fact_rejections(facts, rng, values, True) + comparison_rows(compare, rng, every_kind=True)
    held_out = fact_rejections(eval_facts, rng, values, False) + comparison_rows(reserved, rng, False)
    rng.shuffle(train)
    rng.shuffle(held_out)
    prompts = list(facts)
    random.Random(f"{seed}-prompts").shuffle(prompts)
    return train, held_out, [chat(it["q"], it["a"]) for it in prompts]


# The skills sft teaches that the preference data leaves out (a reward model cannot judge them), as pairs a rule
# decides: the tiny pipeline's dpo mixes them in so that training on facts and comparisons does not wear them away.
RULE_ARITH = ("add", "sub", "next", "prev")


def build_arithmetic_pairs(world: World, seed: int) -> list[dict]:
    """Two pairs (two phrasings) per train-pool item of RULE_ARITH, rejecting a near miss or, for successor and
    predecessor, also the number asked about (what a policy trained on comparisons starts to answer). Measured on
    the demo chain with corpus replay in sft (seed 0): dpo's demo_qa 0.707 without them, 0.711 with these (0.722
    with a draft that rejected the first operand of sums too; sft 0.704); without replay (seed 1) 0.630 -> 0.637."""
    rng = random.Random(f"{seed}-arithmetic")
    rows = []
    for kind in RULE_ARITH:
        for key in world.pools["train"][kind]:
            answer = str(arith_answer(kind, key))
            wrong = near_misses(answer) + ([str(key[0])] if kind in ("next", "prev") else [])
            rows += [pair(arith_text(rng, kind, key, True), answer, rng.choice(wrong)) for _ in range(2)]
    rng.shuffle(rows)
    return rows


# Rule-checked RL prompts beyond the preference file's 500 comparisons: the tiny pipeline's grpo trains on them.
N_RL_COMPARISONS = 2000


def build_rl_comparisons(world: World, seed: int) -> list[dict]:
    """Questions "which is larger" drawn from the train pool, each with its answer as the final assistant turn (a
    chat file: RL reads the turn as the reference, exact match checks it). The sft model knows every preference
    person's facts already (corpus replay), so what is left for critic-free RL to learn on preference_eval is its
    reserved comparisons, where the tiny model miscopies the larger number ("85 or 7?" -> 86); 500 comparisons
    taught that little in 300 steps (seed 2: 38 -> 40 of 50), these 2,000 more took it to 47 in 900 steps
    (configs/tiny/pipeline.yaml; the sweep is in configs/tiny/grpo.yaml)."""
    rng = random.Random(f"{seed}-rl-comparisons")
    keys = rng.sample(world.pools["train"]["larger"], N_RL_COMPARISONS)
    return [chat(arith_text(rng, "larger", key, True), str(arith_answer("larger", key))) for key in keys]


def build_chat_data(world: World, seed: int) -> dict[str, list[dict]]:
    rng = random.Random(f"{seed}-chat")
    # Each held-out fact gets a shuffled phrasing list: eval uses the first two, so no eval question appears
    # verbatim in any other file.
    orders = {f"{p.name}/{a}": rng.sample(QUESTION_TEMPLATES[a], 2) for p in world.split(True) for a in ATTRS}
    eval_items = reserved_items(world, rng, "eval", lambda k: orders[k][:2])
    rng.shuffle(eval_items)
    evals = []
    for i, it in enumerate(eval_items):
        choices, gold = choices_for(rng, it["kind"], it["a"], it["key"])
        evals.append(
            {
                "id": f"{it['kind']}-{i:04d}",
                "kind": it["kind"],
                "question": it["q"],
                "answer": it["a"],
                "choices": choices,
                "gold": gold,
            }
        )
    preference, pref_eval, prompts = build_preferences(world, seed)
    return {
        "sft": build_sft(world, seed),
        "preference": preference,
        "preference_eval": pref_eval,
        "prompts": prompts,
        "arithmetic": build_arithmetic_pairs(world, seed),
        "comparisons": build_rl_comparisons(world, seed),
        "eval": evals,
    }


# --- writing ----------------------------------------------------------------------------------------------


def write_atomic(path: Path, text: str) -> None:
    """Temp file in the same directory, fsync, rename: readers never see a half-written file."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def readme(seed: int, corpus_mb: float, world: World, sizes: dict[str, tuple[int, int]], mentions: Counter) -> str:
    n_sft, n_pref, n_held = (len(world.group(g)) for g in GROUPS)
    table = "\n".join(f"| `{name}` | {rows} | {nbytes / 1e6:.2f} MB |" for name, (rows, nbytes) in sizes.items())
    return f"""# Demo world data (tiny preset)

Generated by `tools/demo_world.py`; do not edit by hand. Regenerate with:

    python -m tools.demo_world --out data/demo --seed {seed} --corpus-mb {corpus_mb:g}

A fictional valley of {len(world.people)} people ({n_sft} sft, {n_pref} preference, {n_held} held-out), each with a
home town ({len(TOWNS)} towns), favourite colour ({len(COLOURS)}), pet ({len(PETS)}) and job ({len(JOBS)}):
{len(mentions)} facts, each stated {sum(mentions.values()) / len(mentions):.0f} times on average
(at least {min(mentions.values())}) in the corpus, in several phrasings: statements, group lists, and
Question:/Answer: lines about everyone so the base model sees the Q/A pattern (never in a phrasing that eval or
preference_eval asks: those sets are decontaminated, so they measure recall, not a memorised line). The facts
live ONLY in the corpus. SFT asks about the sft people, the preference data (the reward model's pairs, the RL
prompts) about the preference people, and eval about the held-out people, so answering it needs the knowledge
from pretraining plus the answer format from SFT. The sft model was never asked about the preference people
either: its answers about them are often wrong, which is what alignment learns from.

A minority of the corpus is small arithmetic: a + b and (a + b) - b for a, b in 0-20, which of two numbers
below 100 is larger, successor and predecessor. The eval and preference_eval arithmetic items are reserved and
appear in no other file. Answers are one word or one number.

| file | rows | size |
|---|---|---|
{table}

- `corpus.jsonl`: `{{"text": ...}}`, one short document per line (profiles, group facts, mixed facts,
  arithmetic, Question:/Answer: lines).
- `sft.jsonl`: `{{"messages": [{{"role": "user", ...}}, {{"role": "assistant", ...}}]}}`; ~10% start with a system
  message, ~10% have two user/assistant turns.
- `preference.jsonl`, `preference_eval.jsonl`: `{{"prompt": [user msg], "chosen": [assistant msg],
  "rejected": [assistant msg]}}`, about preference people and "which is larger". In preference.jsonl each fact
  question has six pairs: three other values of its kind (drawn from other people's values), two garbled values
  ("peaver", "amisher") and a value of another kind or an evasive non-answer; each comparison three: the smaller
  number, a near miss of the larger, another number or the answer with a digit appended. preference_eval has one
  pair per question and asks what preference never does: other phrasings of the facts, reserved comparisons.
- `prompts.jsonl`: `{{"messages": [user msg, assistant msg]}}`, the RL prompts with their reference answer: each
  preference.jsonl fact question once (about the preference people).
- `arithmetic.jsonl`: pairs as in preference.jsonl about sums, differences, successors and predecessors of the
  train pool, two phrasings each, rejecting a near miss (or the number asked about): rule-judged pairs that the
  tiny pipeline's dpo mixes in so alignment keeps the arithmetic sft taught. Not in the reward model's data: a
  1M-parameter reward model cannot judge near-miss sums.
- `comparisons.jsonl`: `{{"messages": [user msg, assistant msg]}}`, {N_RL_COMPARISONS:,} "which is larger"
  questions of the train pool with their answer: rule-checked prompts for the tiny pipeline's grpo, beside
  preference.jsonl's.
- `eval.jsonl`: `{{"id", "kind", "question", "answer", "choices", "gold"}}`; kind is one of
  {", ".join(list(ATTRS) + ARITH_KINDS)}; `choices[gold] == answer` (4 options).
"""


def generate(out: Path, seed: int = 0, corpus_mb: float = 3.5) -> dict[str, Any]:
    out.mkdir(parents=True, exist_ok=True)
    world = build_world(seed)
    chat = build_chat_data(world, seed)
    asked = {r["question"] for r in chat["eval"]} | {r["prompt"][0]["content"] for r in chat["preference_eval"]}
    docs, mentions = build_corpus(world, seed, corpus_mb, asked)
    files = {"corpus": [{"text": d} for d in docs], **chat}
    sizes = {}
    for name, rows in files.items():
        text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
        write_atomic(out / f"{name}.jsonl", text)
        sizes[f"{name}.jsonl"] = (len(rows), len(text.encode()))
    write_atomic(out / "README.md", readme(seed, corpus_mb, world, sizes, mentions))
    return {
        "sizes": sizes,
        "facts": len(mentions),
        "mean_mentions": sum(mentions.values()) / len(mentions),
        "min_mentions": min(mentions.values()),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("data/demo"), help="output directory")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--corpus-mb", type=float, default=3.5, help="approximate corpus size in MB")
    args = parser.parse_args(argv)
    stats = generate(args.out, args.seed, args.corpus_mb)
    for name, (rows, nbytes) in stats["sizes"].items():
        print(f"{args.out / name}: {rows} rows, {nbytes / 1e6:.2f} MB")
    print(
        f"{stats['facts']} facts, each stated {stats['mean_mentions']:.0f} times on average "
        f"(min {stats['min_mentions']})"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
