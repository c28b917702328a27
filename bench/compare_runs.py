"""Compare every manifest metric of two run folders, stage by stage: the check that a refactor changed no number.

    python bench/compare_runs.py BEFORE_RUN_DIR AFTER_RUN_DIR [--ignore wall_time_s,tokens_per_second,...]

Walks each stage folder's manifest.json `metrics` (nested dicts and lists flattened to dotted keys) and prints a
table of every key that differs, is missing on one side or is new; timings and the measured matmul peak are
ignored (they measure the machine, not the model). Exits 1 when any compared metric differs or is missing, 0
otherwise (new keys are listed but allowed).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

TIMINGS = ("seconds", "_s", "per_second", "per_s", "mfu", "wall_time", "peak_flops")  # measures of the machine


def flatten(value, prefix: str = "") -> dict:
    if isinstance(value, dict):
        out = {}
        for key, item in value.items():
            out.update(flatten(item, f"{prefix}{key}."))
        return out
    if isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
        out = {}
        for index, item in enumerate(value):
            out.update(flatten(item, f"{prefix}{index}."))
        return out
    return {prefix.rstrip("."): value}


def metrics(run_dir: Path) -> dict[str, dict]:
    found = {}
    for manifest in sorted(run_dir.glob("*/manifest.json")):
        found[manifest.parent.name] = flatten(json.loads(manifest.read_text())["metrics"])
    return found


def is_timing(key: str, ignore: set[str]) -> bool:
    last = key.rsplit(".", 1)[-1]
    return last in ignore or any(part in last for part in TIMINGS)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("before", type=Path)
    parser.add_argument("after", type=Path)
    parser.add_argument("--ignore", default="", help="comma-separated metric names to skip besides timings")
    args = parser.parse_args(argv)
    ignore = {k for k in args.ignore.split(",") if k}
    before, after = metrics(args.before), metrics(args.after)
    rows, compared, new = [], 0, []
    for stage in sorted(before.keys() | after.keys()):
        old, cur = before.get(stage), after.get(stage)
        if old is None or cur is None:
            rows.append(
                (stage, "(stage)", "absent" if old is None else "present", "absent" if cur is None else "present")
            )
            continue
        for key in sorted(old.keys() | cur.keys()):
            if is_timing(key, ignore):
                continue
            if key not in old:
                new.append(f"{stage}.{key}")
                continue
            compared += 1
            if key not in cur or old[key] != cur[key]:
                rows.append((stage, key, old.get(key, "(missing)"), cur.get(key, "(missing)")))
    print(f"{len(before)} stages, {compared} metrics compared (timings ignored), {len(rows)} differ")
    if new:
        print(f"new keys (allowed): {', '.join(new)}")
    if rows:
        print("| stage | metric | before | after |\n|---|---|---|---|")
        for stage, key, old, cur in rows:
            print(f"| {stage} | {key} | {json.dumps(old, default=str)[:60]} | {json.dumps(cur, default=str)[:60]} |")
    return 1 if rows else 0


if __name__ == "__main__":
    sys.exit(main())
