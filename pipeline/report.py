"""`llmpipe report RUN_DIR`: the report card of a pipeline run, RUN_DIR/report.md with PNG plots beside it.

    llmpipe report runs/tiny

Reads every stage folder under RUN_DIR (manifest.json, metrics.jsonl) and RUN_DIR/pipeline.json (written by
`llmpipe run`: the stage order, commands and wall times). Writes:
- report.md: a table of stages (status, wall time, tokens/s, headline metric before -> after), the eval results of
  every eval stage side by side, the run's versions and git commit;
- training_curves.png: loss per training stage (train and held-out), reward accuracy, PPO reward and KL;
- eval.png: each eval stage's task metrics as grouped bars (pretrain vs sft vs dpo vs ppo vs grpo);
- stage_metrics.png: each training stage's headline metric before and after it.
Unfinished stages are listed as such; nothing here trains or loads a model.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

from pipeline.artifacts import MANIFEST, atomic_write_text
from pipeline.config import UserError
from pipeline.formats import last_text

# (manifest key before, key after, label, higher is better) per stage kind: what each stage is meant to move
HEADLINES = {
    "pretrain": [("val_loss_initial", "val_loss", "held-out loss", False)],
    "sft": [("exact_match_before", "exact_match", "exact match", True),
            ("eval_loss_before", "eval_loss", "held-out loss", False)],
    "reward": [("heldout_pair_accuracy_before", "heldout_pair_accuracy", "held-out pair accuracy", True)],
    "dpo": [("exact_match_before", "exact_match", "exact match", True),
            ("heldout_logp_margin_before", "heldout_logp_margin", "log-prob margin chosen - rejected", True)],
    "ppo": [("heldout_before.exact_match", "heldout_after.exact_match", "held-out exact match", True),
            ("heldout_before.reward", "heldout_after.reward", "held-out reward-model score", True),
            ("reward_start", "reward_end", "rollout reward (first -> last fifth)", True),
            ("function_score_start", "function_score_end", "rule-scored answers right (first -> last fifth)", True)],
    "grpo": [("heldout_before.exact_match", "heldout_after.exact_match", "held-out exact match", True),
             ("heldout_before.task_metric", "heldout_after.task_metric", "held-out task metric", True),
             ("reward_start", "reward_end", "rollout reward (first -> last fifth)", True)],
}  # fmt: skip
# metrics.jsonl series to plot per stage kind: (key, label)
CURVES = {
    "pretrain": [("loss", "train loss"), ("val_loss", "held-out loss")],
    "sft": [("loss", "train loss"), ("eval_loss", "held-out loss")],
    "reward": [("loss", "train loss"), ("eval_loss", "held-out loss"), ("eval_accuracy", "held-out accuracy")],
    "dpo": [("loss", "train loss"), ("eval_loss", "held-out loss"), ("rewards/accuracies", "implicit-reward acc.")],
    "ppo": [("reward", "reward"), ("kl", "KL to reference"), ("function_score", "rule-scored answers right")],
    "grpo": [("reward", "reward"), ("frac_reward_zero_std", "groups without signal"), ("kl", "KL to reference")],
}


def lookup(metrics: dict, dotted: str):
    value = metrics
    for part in dotted.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    return value if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def read_stages(run_dir: Path) -> list[dict]:
    """Stage folders in run order (pipeline.json's, else by creation time), with manifest and metric rows."""
    state = {}
    if (run_dir / "pipeline.json").is_file():
        state = json.loads((run_dir / "pipeline.json").read_text(encoding="utf-8")).get("stages", {})
    folders = [run_dir / name for name in state] + sorted(
        (p for p in run_dir.iterdir() if p.is_dir() and p.name not in state and (p / "config.yaml").is_file()),
        key=lambda p: p.stat().st_mtime,
    )
    stages = []
    for folder in folders:
        if not folder.is_dir():
            continue
        manifest = None
        if (folder / MANIFEST).is_file():
            manifest = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
        rows = []
        if (folder / "metrics.jsonl").is_file():
            rows = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines() if line.strip()]
        record = state.get(folder.name, {})
        kind = (manifest or {}).get("stage") or record.get("stage") or folder.name
        stages.append({"name": folder.name, "kind": kind, "manifest": manifest, "rows": rows, "record": record})
    return stages


def _fmt(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:,.0f}" if abs(value) >= 1000 else f"{value:.3f}"
    return str(value)


def headline_rows(stages: list[dict]) -> list[tuple]:
    """(stage, label, before, after, moved the right way?) for every headline metric a stage has."""
    out = []
    for stage in stages:
        metrics = (stage["manifest"] or {}).get("metrics", {})
        for before_key, after_key, label, higher in HEADLINES.get(stage["kind"], []):
            before, after = lookup(metrics, before_key), lookup(metrics, after_key)
            if after is None:
                continue
            good = None if before is None else (after > before if higher else after < before)
            out.append((stage["name"], label, before, after, good))
    return out


def eval_table(stages: list[dict]) -> tuple[list[str], list[str], dict]:
    """Eval stages and their `task/metric` values: (stage names, metric names, {(stage, metric): value})."""
    names, metric_names, values = [], [], {}
    for stage in stages:
        if stage["kind"] != "eval" or not stage["manifest"]:
            continue
        names.append(stage["name"])
        for key, value in stage["manifest"]["metrics"].items():
            if "/" in key and isinstance(value, (int, float)) and not key.endswith("_stderr"):
                values[(stage["name"], key)] = value
                if key not in metric_names:
                    metric_names.append(key)
    return names, metric_names, values


def plot_curves(stages: list[dict], path: Path) -> bool:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = []
    for stage in stages:
        series = []
        for key, label in CURVES.get(stage["kind"], []):
            points = [(r["step"], r[key]) for r in stage["rows"] if isinstance(r.get(key), (int, float))]
            if points:
                series.append((label, points))
        if series:
            panels.append((stage["name"], series))
    if not panels:
        return False
    cols = min(3, len(panels))
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.6 * cols, 3.3 * rows), squeeze=False)
    for ax, (name, series) in zip(axes.flat, panels, strict=False):
        for label, points in series:
            steps, values = zip(*points, strict=True)
            ax.plot(steps, values, marker="." if len(points) < 30 else None, label=label)
        ax.set_title(name)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return _save_grid(fig, axes, len(panels), path)


def plot_bars(groups: list[str], series: list[tuple[str, list]], title: str, path: Path) -> bool:
    """Grouped bars: one group per x label, one bar per series (None values left out)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not groups or not series:
        return False
    width = 0.8 / len(series)
    fig, ax = plt.subplots(figsize=(max(5.0, 1.3 * len(groups) * max(1, len(series)) / 2 + 2), 3.6))
    for i, (label, values) in enumerate(series):
        xs = [g + i * width - 0.4 + width / 2 for g, v in enumerate(values) if v is not None]
        ys = [v for v in values if v is not None]
        bars = ax.bar(xs, ys, width, label=label)
        ax.bar_label(bars, fmt="%.2f", fontsize=7)
    ax.set_xticks(range(len(groups)), groups, rotation=15, fontsize=8)
    ax.set_title(title)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def plot_before_after(headlines: list[tuple], path: Path) -> bool:
    """One small panel per headline metric: its value before the stage and after, green when it moved the
    right way."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = [h for h in headlines if h[2] is not None]
    if not shown:
        return False
    cols = min(4, len(shown))
    rows = math.ceil(len(shown) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.6 * rows), squeeze=False)
    for ax, (name, label, before, after, good) in zip(axes.flat, shown, strict=False):
        colour = "#2e7d32" if good else "#9e9e9e" if after == before else "#c62828"
        bars = ax.bar(["before", "after"], [before, after], color=["#9e9e9e", colour])
        ax.bar_label(bars, fmt="%.3g", fontsize=8)
        ax.set_title(f"{name}\n{label}", fontsize=8)
        ax.tick_params(labelsize=8)
        ax.margins(y=0.2)
    return _save_grid(fig, axes, len(shown), path)


def _save_grid(fig, axes, used: int, path: Path) -> bool:
    """Blank the unused panels of a grid, save it as PNG and free the figure."""
    import matplotlib.pyplot as plt

    for ax in list(axes.flat)[used:]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def explain_section(run_dir: Path, stage: dict) -> list[str]:
    """The reward model, explained (an explain stage): the probe's table, where the score comes from, and the
    first texts (ppo's best-rewarded answers with order top_score) with their most attributed tokens."""
    name, metrics = stage["name"], stage["manifest"]["metrics"]
    folder = run_dir / name
    shares = metrics.get("region_share", {})
    lines = [f"## Reward model, explained ({name})", "",
             f"Token attributions (integrated gradients) of the reward model's score on {metrics.get('texts')} "
             f"texts: prompt {_fmt(shares.get('prompt'))}, answer {_fmt(shares.get('answer'))}, end of turn "
             f"{_fmt(shares.get('end'))} of the attribution. Every text shaded: [{name}/explain.html]"
             f"({name}/explain.html).", "",
             "| probe | rewrite | rows | mean score change | share rose | a sound model's score | |",
             "|---|---|---|---|---|---|---|"]  # fmt: skip
    for p in metrics.get("probes", []):
        verdict = "**flagged**" if p["flagged"] else "ok"
        lines.append(f"| {p['rule']} | {p['what']} | {p['rows']} | {_fmt(p['mean_change'])} | "
                     f"{_fmt(p['share_rose'])} | {p['sound_model']} | {verdict} |")  # fmt: skip
    lines.append("")
    texts_file = folder / "attributions.jsonl"
    if texts_file.is_file():
        texts = [json.loads(line) for line in texts_file.read_text(encoding="utf-8").splitlines()[:3]]
        for t in texts:
            prompt = last_text(t["prompt"])
            top = sorted(range(len(t["tokens"])), key=lambda i: -abs(t["attributions"][i]))[:3]
            shown = ", ".join(f"`{t['tokens'][i]!r}` {t['attributions'][i]:+.2f} ({t['regions'][i]})" for i in top)
            lines.append(f"- {prompt!r} -> {t['answer']!r}: score {t['score']:+.2f}; most attributed {shown}")
        lines.append("")
    if (folder / "attributions.png").is_file():
        lines += [f"![attributions]({name}/attributions.png)", ""]
    return lines


def build_report(run_dir: str | Path) -> Path:
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise UserError(f"{run_dir}: no such run folder (llmpipe run writes runs/<name>/)")
    stages = read_stages(run_dir)
    if not stages:
        raise UserError(f"{run_dir}: no stage folders (config.yaml) inside; is this a run folder?")
    lines = [f"# Report card: {run_dir.name}", ""]
    pipeline_file = ""
    if (run_dir / "pipeline.json").is_file():
        pipeline_file = json.loads((run_dir / "pipeline.json").read_text(encoding="utf-8")).get("pipeline", "")
    if pipeline_file:
        lines += [f"Pipeline file: `{pipeline_file}`; rebuild this page with `llmpipe report {run_dir}`.", ""]

    lines += [
        "## Stages",
        "",
        "| stage | kind | status | wall time | tokens/s | launch |",
        "|---|---|---|---|---|---|",
    ]
    total = 0.0
    for stage in stages:
        manifest, record = stage["manifest"], stage["record"]
        status = "finished" if manifest else ("failed" if record.get("exit_code") else "unfinished")
        seconds = (manifest or {}).get("wall_time_s") or record.get("seconds")
        total += seconds or 0
        metrics = (manifest or {}).get("metrics", {})
        speed = metrics.get("tokens_per_second") or metrics.get("rollout_tokens_per_second")
        launch = record.get("launch") or "plain process"
        wall = f"{seconds:.0f} s" if seconds else "-"
        lines.append(f"| {stage['name']} | {stage['kind']} | {status} | {wall} | {_fmt(speed)} | {launch} |")
    lines += ["", f"Stage wall time in all: {total / 60:.1f} min.", ""]

    headlines = headline_rows(stages)
    if headlines:
        lines += ["## What each stage moved", "", "| stage | metric | before | after | |", "|---|---|---|---|---|"]
        for name, label, before, after, good in headlines:
            mark = "" if good is None else ("better" if good else "same" if after == before else "**worse**")
            lines.append(f"| {name} | {label} | {_fmt(before)} | {_fmt(after)} | {mark} |")
        for stage in (s for s in stages if s["kind"] == "ppo" and s["manifest"]):
            m = stage["manifest"]["metrics"]
            lines.append(f"\n{stage['name']}: KL to the reference at the end {_fmt(m.get('kl_end'))} nats "
                         f"(highest seen {_fmt(m.get('kl_max_seen'))}).")  # fmt: skip
        for stage in (s for s in stages if s["kind"] == "grpo" and s["manifest"]):
            m = stage["manifest"]["metrics"]
            lines.append(f"\n{stage['name']}: {_fmt(m.get('zero_signal_share_mean'))} of prompt groups had equal "
                         f"rewards (no signal; last fifth {_fmt(m.get('zero_signal_share_end'))}), "
                         f"{_fmt(m.get('truncated_share_mean'))} of answers were cut at max_new_tokens.")  # fmt: skip
        for stage in (s for s in stages if s["kind"] == "pairs" and s["manifest"]):
            m = stage["manifest"]["metrics"]
            lines.append(f"\n{stage['name']}: {m.get('samples')} sampled answers to {m.get('prompts')} prompts, "
                         f"mean judge score {_fmt(m.get('mean_score'))} (best of the samples per prompt "
                         f"{_fmt(m.get('best_of_n_mean_score'))}); {m.get('pairs')} preference pairs.")  # fmt: skip
        lines.append("")
        if plot_before_after(headlines, run_dir / "stage_metrics.png"):
            lines += ["![stage metrics](stage_metrics.png)", ""]

    eval_stages, metric_names, values = eval_table(stages)
    if eval_stages:
        lines += ["## Evaluation", "", "| metric | " + " | ".join(eval_stages) + " |",
                  "|---|" + "---|" * len(eval_stages)]  # fmt: skip
        for metric in metric_names:
            lines.append(f"| {metric} | " + " | ".join(_fmt(values.get((s, metric))) for s in eval_stages) + " |")
        lines.append("")
        series = [(s, [values.get((s, m)) for m in metric_names]) for s in eval_stages]
        if plot_bars(metric_names, series, "evaluation by stage", run_dir / "eval.png"):
            lines += ["![evaluation](eval.png)", ""]

    for stage in (s for s in stages if s["kind"] == "explain" and s["manifest"]):
        lines += explain_section(run_dir, stage)

    if plot_curves(stages, run_dir / "training_curves.png"):
        lines += ["## Training curves", "", "![training curves](training_curves.png)", ""]

    first = next((s["manifest"] for s in stages if s["manifest"]), None)
    if first:
        git = first.get("git") or {}
        versions = ", ".join(f"{k} {v}" for k, v in (first.get("versions") or {}).items() if v)
        lines += ["## Provenance", "", f"- git: {git.get('sha', 'not a git checkout')}"
                  + (" (uncommitted changes)" if git.get("dirty") else ""), f"- versions: {versions}"]  # fmt: skip
        lines += [f"- {s['name']}: `{s['manifest'].get('command', '')}`" for s in stages if s["manifest"]]
        lines.append("")
    path = run_dir / "report.md"
    atomic_write_text(path, "\n".join(lines))
    return path


def main(argv: list[str]) -> int:
    if len(argv) != 1 or argv[0].startswith("-"):
        print("usage: llmpipe report RUN_DIR    (e.g. runs/tiny)", file=sys.stderr)
        return 2
    print(build_report(argv[0]))
    return 0
