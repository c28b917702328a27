"""Few-shot evaluation speed: `llmpipe eval` against lm-evaluation-harness, one run, same model, documents, shots.

    pip install -e ".[bench]"        # lm-eval; this script installs nothing
    python bench/eval_vs_lmeval.py [--model runs/tiny/pretrain] [--task demo_mc_train] [--num-fewshot 5]

Both sides evaluate the same task file (lm-eval's copy is written by pipeline.evaluation.lmeval.lmeval_task_config,
with the data as local files), on the same model folder, fp32, with the same thread count, in this one process.
Each side is timed on the wall clock from the call to the result: task and data loading, model loading, scoring
(lm-eval's TaskManager indexes only the one task: its built-in task index would add ~10 s). CPU seconds of the
process are reported too: on a shared machine they move less than wall time. Sides alternate which goes first over
--trials; the best time of each is kept. Scores must agree, or the ratio means nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.update(HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")

import torch  # noqa: E402
import yaml  # noqa: E402

from pipeline.config import load_config  # noqa: E402
from pipeline.evaluation.lmeval import lmeval_task_config  # noqa: E402
from pipeline.evaluation.tasks import find_tasks  # noqa: E402
from pipeline.modeling import resolve_model_path  # noqa: E402
from pipeline.stages import evaluate  # noqa: E402

# CPU seconds of this process per run: less moved than wall time by other jobs on a shared machine.
CPU_SECONDS: dict[str, list[float]] = {"llmpipe": [], "lm-eval": []}


def run_llmpipe(args, out: Path) -> tuple[float, dict]:
    overrides = [f"model={args.model}", f"output_dir={out}", f"tasks=[{args.task}]", f"task_dirs=[{args.task_dir}]",
                 f"num_fewshot={args.num_fewshot}", "log_samples=false"]  # fmt: skip
    cfg = load_config(evaluate.Config, None, overrides)
    start, cpu = time.perf_counter(), time.process_time()
    results = evaluate.run(cfg)[args.task]["metrics"]
    CPU_SECONDS["llmpipe"].append(time.process_time() - cpu)
    return time.perf_counter() - start, {k: m["value"] for k, m in results.items()}


def run_lmeval(args, task_folder: Path) -> tuple[float, dict]:
    import lm_eval
    from lm_eval.tasks import TaskManager

    start, cpu = time.perf_counter(), time.process_time()
    result = lm_eval.simple_evaluate(
        model="hf", model_args=f"pretrained={resolve_model_path(args.model)},dtype=float32", device="cpu",
        tasks=[args.task], task_manager=TaskManager(include_path=str(task_folder), include_defaults=False),
        num_fewshot=args.num_fewshot, batch_size=args.lmeval_batch_size, log_samples=False,
    )  # fmt: skip
    elapsed = time.perf_counter() - start
    CPU_SECONDS["lm-eval"].append(time.process_time() - cpu)
    metrics = result["results"][args.task]
    return elapsed, {k.split(",")[0]: v for k, v in metrics.items() if "," in k and "stderr" not in k}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="runs/tiny/pretrain", help="model or stage folder (make demo)")
    parser.add_argument("--task", default="demo_mc_train", help="a task under --task-dir (735 documents)")
    parser.add_argument("--task-dir", default=str(REPO / "data/tasks"))
    parser.add_argument("--num-fewshot", type=int, default=5)
    parser.add_argument("--lmeval-batch-size", default="32", help="lm-eval's batch_size (an int or auto)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--trials", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    spec, _ = find_tasks([args.task], [args.task_dir])[0]
    work = Path(tempfile.mkdtemp(prefix="bench_eval_"))
    (work / "tasks").mkdir()
    (work / "tasks" / f"{args.task}.yaml").write_text(yaml.safe_dump(lmeval_task_config(spec)))
    times: dict[str, list[float]] = {"llmpipe": [], "lm-eval": []}
    scores: dict[str, dict] = {}
    for trial in range(args.trials):
        sides = ["lm-eval", "llmpipe"] if trial % 2 == 0 else ["llmpipe", "lm-eval"]
        for side in sides:
            if side == "llmpipe":
                elapsed, scores[side] = run_llmpipe(args, work / f"out{trial}")
            else:
                elapsed, scores[side] = run_lmeval(args, work / "tasks")
            times[side].append(elapsed)
            print(f"trial {trial} {side}: {elapsed:.1f} s {scores[side]}", file=sys.stderr, flush=True)

    best = {side: min(t) for side, t in times.items()}
    same = all(abs(scores["llmpipe"][k] - scores["lm-eval"][k]) < 1e-9 for k in scores["llmpipe"])
    report = {
        "task": args.task, "num_fewshot": args.num_fewshot, "documents": None, "model": args.model,
        "threads": args.threads, "lmeval_batch_size": args.lmeval_batch_size, "scores": scores,
        "scores_equal": same, "seconds": times, "best_seconds": best, "speedup": best["lm-eval"] / best["llmpipe"],
        "cpu_seconds": CPU_SECONDS, "cpu_speedup": min(CPU_SECONDS["lm-eval"]) / min(CPU_SECONDS["llmpipe"]),
    }  # fmt: skip
    report["documents"] = json.loads((work / "out0" / "results.json").read_text())["tasks"][args.task]["n_docs"]
    print(json.dumps(report, indent=2))
    print(f"\n{args.task}, {report['documents']} documents, {args.num_fewshot}-shot: "
          f"lm-eval {best['lm-eval']:.1f} s, llmpipe {best['llmpipe']:.1f} s -> {report['speedup']:.2f}x "
          f"(CPU time {report['cpu_speedup']:.2f}x); "
          f"scores {'equal' if same else 'DIFFER'}: {scores['llmpipe']}")  # fmt: skip
    return 0 if same else 1


if __name__ == "__main__":
    raise SystemExit(main())
