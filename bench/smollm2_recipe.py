"""The smollm2 recipe over several seeds: does each stage move held-out exact match the same way every time?

    python bench/smollm2_recipe.py                     # seeds 0 1 2: three full runs (~20 min each on 2 cores)
    python bench/smollm2_recipe.py --seeds 0 --report  # just read finished runs, run nothing new

Seed s runs configs/smollm2-135m/pipeline.yaml as `smollm2-135m-s<s>` with every seed key set to s (sft, dpo
and ppo `train.seed`: data order and new adapter weights; pairs `seed`: its samples); seed 0 is the recipe as
shipped. A finished run is skipped, an interrupted one resumes (`llmpipe run`). The baseline is the base model,
measured in the same runs: the table gives each eval stage's numbers per seed, their mean and spread (sample
standard deviation), and each stage's change against the stage before it and against the base model.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
PIPELINE = REPO / "configs/smollm2-135m/pipeline.yaml"
SEED_KEYS = {"sft": "train.seed", "pairs": "seed", "dpo": "train.seed", "ppo": "train.seed"}
METRICS = [("chat_arithmetic", "exact_match"), ("general_knowledge", "acc")]


def seeded_pipeline(seed: int, runs_dir: Path) -> Path:
    spec = yaml.safe_load(PIPELINE.read_text())
    spec["name"] = f"smollm2-135m-s{seed}"
    spec["runs_dir"] = str(runs_dir)
    for stage in spec["stages"]:
        key = SEED_KEYS.get(stage.get("stage", stage["name"]))
        if key:
            stage["set"] = {**stage.get("set", {}), key: seed}
    path = runs_dir / f"smollm2-135m-s{seed}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def read_evals(run: Path) -> dict[str, dict[str, float]]:
    found = {}
    for results in sorted(run.glob("eval_*/results.json")):
        tasks = json.loads(results.read_text())["tasks"]
        found[results.parent.name] = {f"{t}.{m}": tasks[t]["metrics"][m]["value"] for t, m in METRICS if t in tasks}
    return found


def wall_time(run: Path) -> float | None:
    record = run / "pipeline.json"
    if not record.is_file():
        return None
    stages = json.loads(record.read_text()).get("stages", {})
    return sum(s.get("seconds") or 0 for s in stages.values())


def fmt(values: list[float]) -> str:
    mean = statistics.mean(values)
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{100 * mean:.1f} ± {100 * spread:.1f}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--runs-dir", type=Path, default=REPO / "runs")
    parser.add_argument("--report", action="store_true", help="only read finished runs")
    args = parser.parse_args(argv)
    runs = {}
    for seed in args.seeds:
        pipeline = seeded_pipeline(seed, args.runs_dir)
        runs[seed] = args.runs_dir / f"smollm2-135m-s{seed}"
        if not args.report:
            started = time.time()
            done = subprocess.run([sys.executable, "-m", "pipeline.cli", "run", str(pipeline)], cwd=REPO)
            print(f"seed {seed}: exit {done.returncode}, {time.time() - started:.0f} s", flush=True)
            if done.returncode:
                return done.returncode
    evals = {seed: read_evals(run) for seed, run in runs.items()}
    stages = [s for s in ("eval_base", "eval_sft", "eval_dpo", "eval_ppo") if all(s in e for e in evals.values())]
    seeds = " | ".join(f"seed {s}" for s in runs)
    print(f"\n| stage | metric (%) | {seeds} | mean ± sd | vs previous | vs base |")
    print("|---|---|" + "---|" * len(runs) + "---|---|---|")
    for key in (f"{t}.{m}" for t, m in METRICS):
        for index, stage in enumerate(stages):
            values = [evals[s][stage][key] for s in runs]
            previous = [evals[s][stages[index - 1]][key] for s in runs] if index else None
            base = [evals[s][stages[0]][key] for s in runs]
            delta = fmt([v - p for v, p in zip(values, previous, strict=True)]) if previous else "-"
            total = fmt([v - b for v, b in zip(values, base, strict=True)]) if index else "-"
            cells = " | ".join(f"{100 * v:.1f}" for v in values)
            print(f"| {stage.removeprefix('eval_')} | {key} | {cells} | {fmt(values)} | {delta} | {total} |")
    times = [wall_time(run) for run in runs.values()]
    if all(times):
        print(f"\nwall time per run (sum of stages): {', '.join(f'{t / 60:.1f} min' for t in times)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
