"""Few-shot pool for the demo-world eval tasks: questions about the sft and preference people
(anyone but the held-out people) and train-pool arithmetic.

    python -m tools.demo_tasks --out data/tasks/demo --seed 0

data/demo/eval.jsonl (held-out people, reserved arithmetic) is what the demo tasks evaluate; this file is where
their shots come from, in the same schema (id, kind, question, answer, choices, gold), so a shot never gives
away an eval answer. With ~760 rows it is also the >= 500-document task that bench/eval_vs_lmeval.py times.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

from tools.demo_world import build_world, choices_for, train_items, write_atomic


def build_pool(seed: int) -> list[dict]:
    world = build_world(seed)  # the same world (people, arithmetic pools) as data/demo for this seed
    rng = random.Random(f"{seed}-tasks")
    # shots about anyone but the held-out people (the base model's few-shot prompts)
    items = train_items(world, rng, n_facts_each=1, n_arith=400, groups=("sft", "preference"))
    rows, seen = [], set()
    for it in items:
        if it["q"] in seen:  # the same arithmetic item drawn twice
            continue
        seen.add(it["q"])
        choices, gold = choices_for(rng, it["kind"], it["a"], it["key"])
        rows.append({"id": f"{it['kind']}-{len(rows):04d}", "kind": it["kind"], "question": it["q"],
                     "answer": it["a"], "choices": choices, "gold": gold})  # fmt: skip
    rng.shuffle(rows)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("data/tasks/demo"), help="output directory")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    rows = build_pool(args.seed)
    args.out.mkdir(parents=True, exist_ok=True)
    write_atomic(args.out / "train.jsonl", "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    print(f"{args.out / 'train.jsonl'}: {len(rows)} rows")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
