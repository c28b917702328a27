"""The smollm2 recipe over several seeds: does each stage move held-out exact match the same way every time?

    python bench/smollm2_recipe.py                     # seeds 0 1 2: three full runs (~20 min each on 2 cores)
    python bench/smollm2_recipe.py --seeds 0 --report  # just read finished runs, run nothing new
    python bench/smollm2_recipe.py --grpo              # also grpo from the dpo model (configs/smollm2-135m/grpo.yaml)

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
SEED_KEYS = {"sft": "train.seed", "pairs": "seed", "dpo": "train.seed", "ppo": "train.seed", "grpo": "train.seed"}
# what each eval stage is compared with: the stage its model started from
PREVIOUS = {"eval_sft": "eval_base", "eval_dpo": "eval_sft", "eval_ppo": "eval_dpo", "eval_grpo": "eval_dpo"}
METRICS = [("chat_arithmetic", "exact_match"), ("general_knowledge", "acc")]


def seeded_pipeline(seed: int, runs_dir: Path, grpo: bool = False) -> Path:
    spec = yaml.safe_load(PIPELINE.read_text())
    if grpo:  # the critic-free RL stage of trl beside ppo, from the same dpo model
        spec["stages"] += [
            {"name": "grpo", "config": "configs/smollm2-135m/grpo.yaml", "set": {"init_from": "stage:dpo"}},
            {"name": "eval_grpo", "stage": "eval", "config": "configs/smollm2-135m/eval.yaml",
             "set": {"model": "stage:grpo"}},
        ]  # fmt: skip
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
    parser.add_argument("--grpo", action="store_true", help="add grpo + eval_grpo after eval_ppo")
    args = parser.parse_args(argv)
    runs = {}
    for seed in args.seeds:
        pipeline = seeded_pipeline(seed, args.runs_dir, args.grpo)
        runs[seed] = args.runs_dir / f"smollm2-135m-s{seed}"
        if not args.report:
            started = time.time()
            done = subprocess.run([sys.executable, "-m", "pipeline.cli", "run", str(pipeline)], cwd=REPO)
            print(f"seed {seed}: exit {done.returncode}, {time.time() - started:.0f} s", flush=True)
            if done.returncode:
                return done.returncode
    evals = {seed: read_evals(run) for seed, run in runs.items()}
    order = ("eval_base", "eval_sft", "eval_dpo", "eval_ppo", "eval_grpo")
    stages = [s for s in order if all(s in e for e in evals.values())]
    seeds = " | ".join(f"seed {s}" for s in runs)
    print(f"\n| stage | metric (%) | {seeds} | mean ± sd | vs the stage it started from | vs sft | vs base |")
    print("|---|---|" + "---|" * len(runs) + "---|---|---|---|")

    def change(stage: str, other: str | None, key: str) -> str:
        if other is None or stage in (other, "eval_base") or other not in stages:
            return "-"
        return fmt([evals[s][stage][key] - evals[s][other][key] for s in runs])

    for key in (f"{t}.{m}" for t, m in METRICS):
        for stage in stages:
            values = [evals[s][stage][key] for s in runs]
            cells = " | ".join(f"{100 * v:.1f}" for v in values)
            deltas = [change(stage, PREVIOUS.get(stage), key), change(stage, "eval_sft", key),
                      change(stage, "eval_base", key)]  # fmt: skip
            print(f"| {stage.removeprefix('eval_')} | {key} | {cells} | {fmt(values)} | {' | '.join(deltas)} |")
    times = [wall_time(run) for run in runs.values()]
    if all(times):
        print(f"\nwall time per run (sum of stages): {', '.join(f'{t / 60:.1f} min' for t in times)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
