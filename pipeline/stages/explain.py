"""Explain stage: why a reward model scored what it scored. Token attributions and a counterfactual probe.

    llmpipe explain --config configs/tiny/explain.yaml [reward_model=runs/tiny/reward] [data.path=...]

For each row (a preference pair: chosen and rejected; or one answer: ppo's `samples.jsonl`, any prompt/response
rows) the reward model's score is attributed to the input tokens by integrated gradients over the input
embeddings (Captum; Sundararajan et al. 2017), from a baseline of pad-token embeddings (or zeros) in `n_steps`
steps. The sum of a text's attributions equals its score minus the baseline's up to the integral's error: that
completeness gap is reported per text, and its size against the score difference says whether n_steps was
enough. Each token is placed in the prompt, the answer or the end of turn, so the aggregates say where the
score comes from.

The probe rewrites the answers by rules (a bigger number, the answer said twice, a filler word) and scores them
again: a reward model that learned a shortcut ("the bigger number wins") raises the score of a rewrite that
makes the answer wrong. A rule is flagged when the score rises on average and for most rows where a sound model's
would fall or stay.

Produces in output_dir: `attributions.jsonl` (per text: tokens, attributions, regions, score, baseline score,
gap), `probe.jsonl` (per row and rule: the rewrite and both scores), `explain.html` (tokens shaded by
attribution, chosen next to rejected), `attributions.png` (where the score comes from: regions and tokens), and
a manifest with the aggregates and the probe's table. A rich view of the first rows goes to the terminal.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from pipeline.artifacts import atomic_write_text, begin_stage, write_manifest
from pipeline.attribution import (
    PROBES,
    PROMPT_PROBES,
    REGIONS,
    first_name,
    integrated_gradients,
    probe_summary,
    regions,
    rewrite,
)
from pipeline.attribution_views import plot_aggregates, render_html, show_in_terminal
from pipeline.config import DataConfig, UserError, config, field
from pipeline.data import load_examples, stage_inputs
from pipeline.distributed import world_size
from pipeline.formats import last_text, load_preference_pairs
from pipeline.modeling import load_pretrained, model_and_tokenizer
from pipeline.rewards import as_reply, require_reward_model, reward_inputs, score_pairs
from pipeline.tracking import log

STAGE = "explain"


@config
class ExplainConfig:
    output_dir: str = field(help="Folder for this stage's artifact (attributions.jsonl, explain.html, ...).")
    reward_model: str = field(help="Reward model: a reward stage folder or any sequence-classification model.")
    tokenizer: str | None = field(None, "Tokenizer (None: the reward model's).")
    trust_remote_code: bool = field(False, "Allow models that ship their own Python code. Off: safe.")
    data: DataConfig = field(
        help="Rows to explain: preference pairs (prompt?/chosen/rejected, trl's formats: a preference file, "
        "pairs.jsonl) or answers (`prompt` and `response`, e.g. ppo's samples.jsonl)."
    )
    max_rows: int = field(40, "Explain at most N rows (the first, or the top-scored: `order`).", ge=1)
    order: str = field(
        "file", "Which rows: file (the first max_rows) or top_score (the highest `score` column first: the answers "
        "a policy was rewarded most for, e.g. ppo's samples.jsonl, where reward hacking shows).",
    )  # fmt: skip
    n_steps: int = field(64, "Integration steps of integrated gradients (more: smaller completeness gap).", ge=2)
    baseline: str = field("pad", "Baseline input: pad (each embedding the pad token's) or zero.")
    attribute: str = field(
        "all", "What gets attributions: all (prompt and answer: where the score comes from) or answer (the prompt "
        "stays in the baseline: what in the answer made the score).",
    )  # fmt: skip
    keep_format: bool = field(
        True, "Keep the format in the baseline: special tokens (role markers, BOS) and the end of turn after the "
        "answer stay as they are, so the attributions say what the words did in a fixed format (as BERT "
        "attributions keep [CLS] and [SEP]). Off: the format is attributed too.",
    )  # fmt: skip
    batch_size: int = field(32, "Integration steps per forward pass.", ge=1)
    probes: list[str] = field(factory=lambda: list(PROBES), help=f"Probe rules to run: any of {', '.join(PROBES)}.")
    show: int = field(3, "Rows drawn in the terminal.", ge=0)
    policy: str | None = field(
        None, "A policy (causal LM folder) whose greedy answers to the original and the rewritten prompts are "
        "compared under the prompt rules (swapped_name): does the policy's answer follow the prompt?",
    )  # fmt: skip
    max_new_tokens: int = field(16, "Longest greedy answer of `policy`, in tokens.", ge=1)

    def check(self) -> list[str]:
        problems = []
        if self.order not in ("file", "top_score"):
            problems.append(f"order: got {self.order!r}, expected file or top_score")
        if self.attribute not in ("all", "answer"):
            problems.append(f"attribute: got {self.attribute!r}, expected all or answer")
        if self.baseline not in ("pad", "zero"):
            problems.append(f"baseline: got {self.baseline!r}, expected pad or zero")
        unknown = [p for p in self.probes if p not in PROBES]
        if unknown:
            problems.append(f"probes: unknown {unknown}; expected any of {', '.join(PROBES)}")
        return problems


Config = ExplainConfig


def load_rows(cfg: ExplainConfig) -> list[dict]:
    """{prompt, sides: {name: response}} rows: chosen and rejected of preference pairs, or one `response`."""
    probe = load_examples(cfg.data, required=[])
    columns = set(probe.column_names)
    if {"chosen", "rejected"} <= columns:
        ds, conversational = load_preference_pairs(cfg.data)
        if "prompt" not in ds.column_names and not conversational:
            raise UserError(f"{cfg.data.path}: plain-text preference rows need a `prompt` column")
        rows = []
        for r in ds:  # an implicit prompt (whole conversations): the turns before the last one
            if "prompt" in r:
                prompt, chosen, rejected = r["prompt"], r["chosen"], r["rejected"]
            else:
                prompt, chosen, rejected = r["chosen"][:-1], r["chosen"][-1:], r["rejected"][-1:]
            rows.append({"prompt": prompt, "sides": {"chosen": chosen, "rejected": rejected}})
    elif {"prompt", "response"} <= columns:
        rows = []
        for i, r in enumerate(probe):
            if not isinstance(r["response"], str) or not r["prompt"]:
                raise UserError(f"{cfg.data.path}: row {i}: 'response' must be a string and 'prompt' non-empty")
            rows.append({"prompt": r["prompt"], "sides": {"response": as_reply(r["prompt"], r["response"])},
                         "score": r.get("score")})  # fmt: skip
    else:
        raise UserError(f"{cfg.data.path}: rows need chosen and rejected (preference pairs) or prompt and response "
                        f"(answers, e.g. ppo's samples.jsonl); found columns {sorted(columns)}")  # fmt: skip
    if cfg.order == "top_score":
        if any(not isinstance(r.get("score"), (int, float)) for r in rows):
            raise UserError(f"{cfg.data.path}: order: top_score needs a numeric `score` on every row (ppo's "
                            "samples.jsonl has one); use order: file")  # fmt: skip
        seen, unique = set(), []
        for r in sorted(rows, key=lambda r: -r["score"]):  # ppo logs a prompt's answer at several steps: once each
            key = json.dumps([r["prompt"], r["sides"]], sort_keys=True)
            if key not in seen:
                seen.add(key)
                unique.append(r)
        rows = unique
    return rows[: cfg.max_rows]


def run(cfg: ExplainConfig) -> dict:
    from transformers import AutoModelForSequenceClassification

    started = time.time()
    if world_size() > 1:
        raise UserError("explain runs in one process: start it with `llmpipe explain`, not `accelerate launch`")
    out = Path(cfg.output_dir)
    model_path, tokenizer = model_and_tokenizer(cfg.reward_model, cfg.tokenizer, cfg.trust_remote_code, True,
                                                "reward_model")  # fmt: skip
    require_reward_model(model_path, cfg.reward_model, cfg.trust_remote_code)
    rows = load_rows(cfg)
    begin_stage(out, cfg, fresh=True)
    model = load_pretrained(AutoModelForSequenceClassification, model_path, cfg.trust_remote_code, "reward_model",
                            num_labels=1)  # fmt: skip
    model.config.pad_token_id = tokenizer.pad_token_id
    model.eval()

    texts = explain_rows(model, tokenizer, rows, cfg)
    summary = aggregate(texts)
    probed = run_probes(model, tokenizer, rows, cfg.probes, summary["scale"])
    if cfg.policy:
        policy_answers(cfg, probed)
    atomic_write_text(out / "attributions.jsonl", "".join(json.dumps(t) + "\n" for t in texts))
    atomic_write_text(out / "probe.jsonl", "".join(json.dumps(p) + "\n" for p in probed["rows"]))
    page = render_html(texts, probed["table"], str(cfg.reward_model), str(cfg.data.path), cfg.n_steps, cfg.baseline)
    atomic_write_text(out / "explain.html", page)
    plotted = plot_aggregates(summary, out / "attributions.png")
    show_in_terminal(texts[: cfg.show * 2], probed["table"])
    metrics = {"rows": len(rows), "texts": len(texts), **summary, "probes": probed["table"],
               "flagged_probes": [p["rule"] for p in probed["table"] if p["flagged"]],
               "plot": "attributions.png" if plotted else None}  # fmt: skip
    write_manifest(out, STAGE, stage_inputs(cfg, "reward_model", "data"),
                   ["attributions.jsonl", "probe.jsonl", "explain.html"], metrics, started)  # fmt: skip
    if summary["gap_within_5pct"] < 0.9:
        log(f"warning: only {summary['gap_within_5pct']:.0%} of the texts' attributions add up to their score "
            f"change within 5%: raise n_steps (now {cfg.n_steps})", STAGE)  # fmt: skip
    flagged = ", ".join(metrics["flagged_probes"]) or "none"
    log(f"done: {len(texts)} texts, completeness gap {summary['gap_share_median']:.1%} of the score change "
        f"(median); score from prompt/answer/end {summary['region_share']['prompt']:.0%}/"
        f"{summary['region_share']['answer']:.0%}/{summary['region_share']['end']:.0%}; probes flagged: {flagged} "
        f"-> {out / 'explain.html'}", STAGE)  # fmt: skip
    return metrics


def explain_rows(model, tokenizer, rows: list[dict], cfg: ExplainConfig) -> list[dict]:
    from tqdm.auto import tqdm

    texts, special = [], set(tokenizer.all_special_ids)
    jobs = [(i, side, row["prompt"], answer) for i, row in enumerate(rows) for side, answer in row["sides"].items()]
    for i, side, prompt, response in tqdm(jobs, desc="integrated gradients", unit="text"):
        ids = reward_inputs(tokenizer, [prompt], [response])[0]
        where = regions(tokenizer, prompt, ids)
        fixed = {"end"} if cfg.keep_format else set()
        if cfg.attribute == "answer":
            fixed.add("prompt")
        keep = [(cfg.keep_format and t in special) or r in fixed for t, r in zip(ids, where, strict=True)]
        found = integrated_gradients(model, ids, cfg.n_steps, cfg.baseline, cfg.batch_size, keep)
        texts.append({"row": i, "side": side, "prompt": prompt, "answer": last_text(response), "ids": ids,
                      "tokens": [tokenizer.decode([t]) for t in ids], "regions": where, **found})  # fmt: skip
    return texts


def run_probes(model, tokenizer, rows: list[dict], rules: list[str], scale: float) -> dict:
    """Score each row's first answer (chosen, or the response) and its rewrite under every rule; `scale` is the
    score difference that matters (attribution.probe_summary)."""
    per_row, table = [], []
    names = [first_name(last_text(r["prompt"])) for r in rows]
    for rule in rules:
        originals, rewritten, where = [], [], []
        for i, row in enumerate(rows):
            side, response = next(iter(row["sides"].items()))
            # another row's name, the nearest after this one that differs (deterministic)
            other = next((n for n in names[i + 1 :] + names[:i] if n and n != names[i]), None)
            done = rewrite(rule, row["prompt"], last_text(response), other)
            if done is None:
                continue
            prompt, answer = done
            originals.append((row["prompt"], response))
            rewritten.append((prompt, as_reply(prompt, answer)))
            where.append((i, side, answer, row["prompt"], prompt))
        before = score_pairs(model, tokenizer, [p for p, _ in originals], [r for _, r in originals]) if where else []
        after = score_pairs(model, tokenizer, [p for p, _ in rewritten], [r for _, r in rewritten]) if where else []
        table.append(probe_summary(rule, before, after, scale))
        per_row += [{"rule": rule, "row": i, "side": side, "prompt": old, "rewritten_prompt": new,
                     "rewritten_answer": answer, "score": b, "score_after": a}
                    for (i, side, answer, old, new), b, a in zip(where, before, after, strict=True)]  # fmt: skip
    return {"table": table, "rows": per_row}


def policy_answers(cfg: ExplainConfig, probed: dict) -> None:
    """The policy's greedy answers to the original and the rewritten prompts of the prompt rules, added to the
    probe rows (policy_answer, policy_answer_after) and to the table (policy_changed: the share that changed)."""
    from transformers import AutoModelForCausalLM

    from pipeline.generation import greedy_answers

    path, tokenizer = model_and_tokenizer(cfg.policy, None, cfg.trust_remote_code, True, "policy")
    model = load_pretrained(AutoModelForCausalLM, path, cfg.trust_remote_code, "policy")
    for entry in probed["table"]:
        rows = [r for r in probed["rows"] if r["rule"] == entry["rule"]]
        if entry["rule"] not in PROMPT_PROBES or not rows:
            continue
        found = greedy_answers(model, tokenizer, [r["prompt"] for r in rows] + [r["rewritten_prompt"] for r in rows],
                               cfg.max_new_tokens)["texts"]  # fmt: skip
        for r, a, b in zip(rows, found[: len(rows)], found[len(rows) :], strict=True):
            r["policy_answer"], r["policy_answer_after"] = a.strip(), b.strip()
        entry["policy_changed"] = sum(r["policy_answer"] != r["policy_answer_after"] for r in rows) / len(rows)


def aggregate(texts: list[dict]) -> dict:
    """Where the scores come from: the mean share of |attribution| in each region, the tokens with the largest
    total |attribution|, the completeness gap against the score change (median, worst, share within 5%), and
    `scale`: the mean chosen - rejected margin (without pairs, the scores' standard deviation)."""
    shares = {r: 0.0 for r in REGIONS}
    by_token: dict[str, list[float]] = {}
    gaps = []
    for t in texts:
        total = sum(abs(a) for a in t["attributions"]) or 1.0
        for region, a, token in zip(t["regions"], t["attributions"], t["tokens"], strict=True):
            shares[region] += abs(a) / total / len(texts)
            by_token.setdefault(token, []).append(a)
        change = abs(t["score"] - t["baseline_score"])
        gaps.append(abs(t["gap"]) / change if change > 1e-6 else 0.0)
    top = sorted(by_token.items(), key=lambda kv: -sum(abs(a) for a in kv[1]))[:15]
    gaps.sort()
    scores: dict[int, dict[str, float]] = {}
    for t in texts:
        scores.setdefault(t["row"], {})[t["side"]] = t["score"]
    margins = [abs(s["chosen"] - s["rejected"]) for s in scores.values() if {"chosen", "rejected"} <= s.keys()]
    if margins:
        scale = sum(margins) / len(margins)
    else:  # answers alone: how much the scores spread
        values = [t["score"] for t in texts]
        mean = sum(values) / len(values)
        scale = (sum((v - mean) ** 2 for v in values) / len(values)) ** 0.5
    return {
        "scale": scale,
        "gap_within_5pct": sum(g <= 0.05 for g in gaps) / len(gaps) if gaps else 1.0,
        "region_share": shares,
        "top_tokens": [
            {"token": tok, "total_abs": sum(abs(a) for a in v), "mean": sum(v) / len(v), "count": len(v)}
            for tok, v in top
        ],  # fmt: skip
        "gap_share_median": gaps[len(gaps) // 2] if gaps else 0.0,
        "gap_share_max": gaps[-1] if gaps else 0.0,
    }
