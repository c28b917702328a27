"""Data of the smollm2 recipe: arithmetic and unit conversion asked in chat, and a general-knowledge control task.

    python -m tools.chat_arithmetic --out data/smollm2 --seed 0

The skill task is one a small chat model is weak at and a rule can check: "What is 347 + 589?", "Subtract 68
from 415.", "How many minutes are in 17 hours?", answered with the number alone. SmolLM2-135M-Instruct explains
instead of answering (0 of 48 two- and three-digit sums right when asked in chat, STACK.md), so sft has a format
and a skill to teach, and the exact-match rule is the judge of the pairs stage and the reward of ppo.

Held-out questions use operand pairs that no train question uses (in any phrasing), so held-out exact match
measures arithmetic, not recall. The control task (capitals, chemical symbols, opposites: four choices) is what
the model was never trained on here: its score after each stage is what the training cost elsewhere.

Files (all JSON lines):
- `train.jsonl`: `{"messages": [user, assistant]}`: sft's data, and the prompts (with their reference, the final
  assistant turn) that pairs and ppo read.
- `heldout.jsonl`: `{"id", "kind", "question", "answer"}`: the eval task `chat_arithmetic`, and the held-out
  rows of sft, dpo and ppo.
- `general.jsonl`: `{"id", "kind", "question", "choices", "gold"}`: the eval task `general_knowledge`.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

from tools.demo_world import write_atomic

ADD = ["What is {a} + {b}?", "Add {a} and {b}.", "Compute {a} plus {b}.", "What is the sum of {a} and {b}?"]
SUB = ["What is {a} - {b}?", "Subtract {b} from {a}.", "Compute {a} minus {b}.", "What is {a} take away {b}?"]
CONVERT = ["How many {small} are in {x} {big}?", "Convert {x} {big} to {small}.", "{x} {big} is how many {small}?"]
# (larger unit, smaller unit, factor): multiplying by 10, 100 or 1000 is a pattern, by 7, 12, 24 or 60 is arithmetic
UNITS = [("meters", "centimeters", 100), ("kilometers", "meters", 1000), ("kilograms", "grams", 1000),
         ("centimeters", "millimeters", 10), ("hours", "minutes", 60), ("minutes", "seconds", 60),
         ("feet", "inches", 12), ("weeks", "days", 7), ("days", "hours", 24)]  # fmt: skip

CAPITALS = {
    "France": "Paris", "Germany": "Berlin", "Italy": "Rome", "Spain": "Madrid", "Portugal": "Lisbon",
    "United Kingdom": "London", "Ireland": "Dublin", "Netherlands": "Amsterdam", "Belgium": "Brussels",
    "Austria": "Vienna", "Switzerland": "Bern", "Poland": "Warsaw", "Czech Republic": "Prague",
    "Hungary": "Budapest", "Greece": "Athens", "Sweden": "Stockholm", "Norway": "Oslo", "Denmark": "Copenhagen",
    "Finland": "Helsinki", "Russia": "Moscow", "Ukraine": "Kyiv", "Turkey": "Ankara", "Egypt": "Cairo",
    "Kenya": "Nairobi", "Nigeria": "Abuja", "Morocco": "Rabat", "Japan": "Tokyo", "China": "Beijing",
    "South Korea": "Seoul", "India": "New Delhi", "Thailand": "Bangkok", "Vietnam": "Hanoi",
    "Indonesia": "Jakarta", "Philippines": "Manila", "Australia": "Canberra", "New Zealand": "Wellington",
    "Canada": "Ottawa", "United States": "Washington", "Mexico": "Mexico City", "Brazil": "Brasilia",
    "Argentina": "Buenos Aires", "Chile": "Santiago", "Peru": "Lima", "Colombia": "Bogota", "Cuba": "Havana",
    "Iran": "Tehran", "Iraq": "Baghdad", "Saudi Arabia": "Riyadh", "Israel": "Jerusalem", "Pakistan": "Islamabad",
}  # fmt: skip
SYMBOLS = {
    "hydrogen": "H", "helium": "He", "carbon": "C", "nitrogen": "N", "oxygen": "O", "sodium": "Na",
    "magnesium": "Mg", "aluminium": "Al", "silicon": "Si", "phosphorus": "P", "sulfur": "S", "chlorine": "Cl",
    "potassium": "K", "calcium": "Ca", "iron": "Fe", "copper": "Cu", "zinc": "Zn", "silver": "Ag", "tin": "Sn",
    "gold": "Au", "mercury": "Hg", "lead": "Pb", "uranium": "U", "neon": "Ne", "iodine": "I",
}  # fmt: skip
OPPOSITES = {
    "hot": "cold", "big": "small", "fast": "slow", "happy": "sad", "light": "dark", "up": "down", "early": "late",
    "open": "closed", "full": "empty", "rich": "poor", "strong": "weak", "young": "old", "wet": "dry",
    "hard": "soft", "loud": "quiet", "high": "low", "thick": "thin", "clean": "dirty", "easy": "difficult",
    "heavy": "light", "long": "short", "safe": "dangerous", "true": "false", "win": "lose", "buy": "sell",
}  # fmt: skip


def _item(rng: random.Random) -> tuple[str, tuple, str, int]:
    """(kind, key, question, answer): the key is the operands, the same in every phrasing (and either order)."""
    kind = rng.choice(["add", "add", "sub", "convert"])
    if kind == "add":
        a, b = rng.randint(10, 999), rng.randint(10, 999)
        return kind, tuple(sorted((a, b))), rng.choice(ADD).format(a=a, b=b), a + b
    if kind == "sub":
        a, b = sorted((rng.randint(10, 999), rng.randint(10, 999)), reverse=True)
        return kind, (a, b), rng.choice(SUB).format(a=a, b=b), a - b
    big, small, factor = rng.choice(UNITS)
    x = rng.randint(2, 99)
    return kind, (big, x), rng.choice(CONVERT).format(x=x, big=big, small=small), x * factor


def arithmetic(seed: int, n_train: int, n_heldout: int) -> tuple[list[dict], list[dict]]:
    """Train chats and held-out questions; no held-out operands appear in any train question."""
    rng = random.Random(f"{seed}-arithmetic")
    heldout, held_keys = [], set()
    while len(heldout) < n_heldout:
        kind, key, question, answer = _item(rng)
        if (kind, key) not in held_keys:
            held_keys.add((kind, key))
            heldout.append({"id": f"{kind}-{len(heldout):04d}", "kind": kind, "question": question,
                            "answer": str(answer)})  # fmt: skip
    train, seen = [], set()
    while len(train) < n_train:
        kind, key, question, answer = _item(rng)
        if (kind, key) in held_keys or question in seen:
            continue
        seen.add(question)
        train.append({"messages": [{"role": "user", "content": question},
                                   {"role": "assistant", "content": str(answer)}]})  # fmt: skip
    return train, heldout


def general(seed: int) -> list[dict]:
    """Four-choice questions with distractors of the same kind, the gold choice at a random place."""
    rng = random.Random(f"{seed}-general")
    rows = []
    for kind, table, template in [("capital", CAPITALS, "What is the capital of {}?"),
                                  ("symbol", SYMBOLS, "What is the chemical symbol for {}?"),
                                  ("opposite", OPPOSITES, "What is the opposite of \"{}\"?")]:  # fmt: skip
        values = sorted(set(table.values()))
        for key, answer in table.items():
            choices = rng.sample([v for v in values if v != answer and v != key], 3) + [answer]
            rng.shuffle(choices)
            rows.append({"id": f"{kind}-{len(rows):04d}", "kind": kind, "question": template.format(key),
                         "choices": choices, "gold": choices.index(answer)})  # fmt: skip
    return rows


def build(seed: int, n_train: int = 3000, n_heldout: int = 300) -> dict[str, list[dict]]:
    train, heldout = arithmetic(seed, n_train, n_heldout)
    return {"train.jsonl": train, "heldout.jsonl": heldout, "general.jsonl": general(seed)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("data/smollm2"), help="output directory")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    for name, rows in build(args.seed).items():
        write_atomic(args.out / name, "".join(json.dumps(row) + "\n" for row in rows))
        print(f"{args.out / name}: {len(rows)} rows")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
