"""Eval stage: few-shot tasks (multiple choice, generation, text log-likelihood) on a base or chat model.

    llmpipe eval --config configs/tiny/eval.yaml model=runs/tiny/sft [num_fewshot=5] [tasks=[demo_mc]]
    ACCELERATE_USE_CPU=1 accelerate launch --config_file launch/accelerate/cpu_2proc.yaml -m pipeline.cli eval ...

Tasks are YAML files under `task_dirs` (see data/tasks/ and pipeline/evaluation/tasks.py), with the keys and numbers of
lm-evaluation-harness: the same prompts, the same shots for the same seed, acc / acc_norm / exact_match computed
the same way, so the numbers can be compared directly. It is faster: every choice of a document is scored in one
row that computes the shared context once (pipeline/evaluation/scoring.py), and rows are length-sorted and batched.
Under `accelerate launch` each process takes every k-th document and rank 0 gathers and writes the results.

Produces `output_dir/results.json` (per task: metrics with standard errors, counts, the first document's exact
prompt), `results.md` (a table), `samples_<task>.jsonl` with `log_samples: true`, config.yaml, manifest.json.
"""

from __future__ import annotations

import json
import math
import statistics
import time
from pathlib import Path

from pipeline.artifacts import atomic_write_text, begin_stage, describe_input, write_manifest
from pipeline.chat import reply_prefix
from pipeline.config import UserError, config, field
from pipeline.distributed import is_main_process, weights_dtype
from pipeline.evaluation.task_rewards import answer_matches, filter_answer
from pipeline.evaluation.tasks import (
    TaskSpec,
    answer_text,
    build_prompt,
    doc_choices,
    doc_target,
    find_tasks,
    gold_indices,
    load_split,
    resolve,
    sample_shots,
)
from pipeline.modeling import load_pretrained, model_and_tokenizer
from pipeline.tracking import log

STAGE = "eval"


@config
class EvalConfig:
    output_dir: str = field(help="Folder for results.json, results.md, samples and manifest.json.")
    model: str = field(help="Model to evaluate: a stage folder (runs/x/sft), an HF model folder or a hub name.")
    tokenizer: str | None = field(None, "Tokenizer folder (None: the model's).")
    trust_remote_code: bool = field(False, "Allow models that ship their own Python code. Off: safe.")
    tasks: list[str] = field(help="Task names (the `task:` key of a YAML under task_dirs) or paths to task YAMLs.")
    task_dirs: list[str] = field(factory=lambda: ["data/tasks"], help="Folders searched for task YAMLs.")
    num_fewshot: int | None = field(None, "Shots for every task (None: each task's own num_fewshot).", ge=0)
    fewshot_seed: int | None = field(None, "Shot sampler seed for every task (None: each task's, lm-eval's 1234).")
    limit: int | None = field(None, "Evaluate only the first N documents of each task.", ge=1)
    chat: bool = field(False, "Render shots and question through the tokenizer's chat template (chat models).")
    add_bos: bool | None = field(None, "Put BOS before every context: true, false, or None (as the tokenizer does).")
    max_length: int | None = field(None, "Longest context in tokens, cut from the left (None: the model's).", ge=2)
    batch_tokens: int | None = field(None, "Tokens per forward pass (None: 16384, halved on out-of-memory).", ge=1)
    share_context: bool = field(True, "Score all choices of a document in one row (faster, same numbers).")
    precision: str = field("auto", "auto (bf16 on a GPU that has it, else fp32), fp32 or bf16.")
    log_samples: bool = field(False, "Write samples_<task>.jsonl: every document's prompt, scores and answer.")

    def check(self) -> list[str]:
        problems = []
        if self.precision not in ("auto", "fp32", "bf16"):
            problems.append(f"precision: got {self.precision!r}, expected auto, fp32 or bf16")
        if not self.tasks:
            problems.append("tasks: the list is empty; name at least one task (e.g. tasks=[demo_mc])")
        return problems


Config = EvalConfig


# --- documents and prompts (no model needed) ----------------------------------------------------------------


def prepare_task(cfg: EvalConfig, spec: TaskSpec, tokenizer) -> dict:
    """Documents, shots and prompts of one task; the few-shot draw covers every document in order on every rank,
    so a document's shots do not depend on how documents are split between processes."""
    docs = load_split(spec, spec.eval_split)
    shots_n = spec.num_fewshot if cfg.num_fewshot is None else cfg.num_fewshot
    seed = spec.fewshot_seed if cfg.fewshot_seed is None else cfg.fewshot_seed
    same_split = spec.pool_split == spec.eval_split
    pool = (docs if same_split else load_split(spec, spec.pool_split)) if shots_n else []
    if cfg.limit is not None:
        docs = docs[: cfg.limit]
    shots = sample_shots(docs, pool, shots_n, seed, same_split, spec.fewshot_sampler)
    prompts = [build_prompt(spec, doc, s, tokenizer if cfg.chat else None) for doc, s in zip(docs, shots, strict=True)]
    # what separates an answer from its prompt: the task's target_delimiter, or what the chat template writes after
    # its generation prompt ("" after ChatML's newline, " " after llmpipe's or Llama 2's header)
    delimiter = reply_prefix(tokenizer) if cfg.chat else spec.target_delimiter
    return {"docs": docs, "prompts": prompts, "num_fewshot": shots_n, "seed": seed, "delimiter": delimiter}


def continuations(spec: TaskSpec, doc: dict, delimiter: str) -> list[str]:
    if spec.output_type == "multiple_choice":
        return [delimiter + choice for choice in doc_choices(spec, doc)]
    return [delimiter + answer_text(spec, doc)]


# --- scoring: each rank scores its share of documents, rank 0 gathers ---------------------------------------


def score_task(spec: TaskSpec, task: dict, scorer, rank: int, world: int) -> list[dict]:
    """Per-document results for this rank's documents (every world-th, from rank), each with its index."""
    mine = list(range(rank, len(task["docs"]), world))
    docs, prompts = [task["docs"][i] for i in mine], [task["prompts"][i] for i in mine]
    if spec.output_type == "generate_until":
        gen = spec.generation_kwargs
        until = list(gen.until if gen.until is not None else [spec.fewshot_delimiter])
        texts = scorer.generate(prompts, until, gen.max_gen_toks, gen.do_sample, gen.temperature)
        out = []
        for doc, text in zip(docs, texts, strict=True):
            targets = doc_target(spec, doc)
            choices = doc_choices(spec, doc)
            targets = [choices[targets]] if choices is not None else targets
            targets = [str(t) for t in (targets if isinstance(targets, list) else [targets])]
            answer = filter_answer(spec, text)
            row = {"generated": text, "answer": answer, "target": targets,
                   "exact_match": float(any(answer_matches(spec, answer, t) for t in targets))}  # fmt: skip
            for name in spec.other_filters:
                other = filter_answer(spec, text, name)
                row[f"exact_match,{name}"] = float(any(answer_matches(spec, other, t) for t in targets))
            out.append(row)
    elif spec.output_type == "loglikelihood_rolling":
        texts = [str(resolve(doc, spec.doc_to_target or spec.doc_to_text)) for doc in docs]
        windows = scorer.rolling_groups(texts)
        scores = iter(scorer.loglikelihoods([w for text_windows in windows for w in text_windows]))
        out = []
        for text, text_windows in zip(texts, windows, strict=True):
            ll = sum(next(scores)[0][0] for _ in text_windows)
            out.append({"loglikelihood": ll, "words": len(text.split()), "bytes": len(text.encode("utf-8"))})
    elif spec.output_type == "loglikelihood":  # e.g. LAMBADA: the target's log-prob, and whether it is greedy
        results = scorer.loglikelihoods(scorer.pair_groups(prompts, [[str(doc_target(spec, d))] for d in docs]))
        out = [{"loglikelihood": s[0][0], "acc": float(s[0][1])} for s in results]
    else:
        conts = [continuations(spec, doc, task["delimiter"]) for doc in docs]
        results = scorer.loglikelihoods(scorer.pair_groups(prompts, conts))
        out = []
        for doc, scores in zip(docs, results, strict=True):
            lls = [ll for ll, _ in scores]
            choices = doc_choices(spec, doc)
            golds = gold_indices(spec, doc, choices)
            # acc_norm divides by the choice's length in characters, as lm-eval's acc_norm does
            normed = [ll / max(len(c), 1) for ll, c in zip(lls, choices, strict=True)]
            pred, pred_norm = _argmax(lls), _argmax(normed)
            out.append({"loglikelihoods": lls, "is_greedy": [g for _, g in scores], "gold": golds,
                        "acc": float(pred in golds), "acc_norm": float(pred_norm in golds)})  # fmt: skip
    for index, row in zip(mine, out, strict=True):
        row["doc_id"] = index
    return out


def _argmax(values: list[float]) -> int:
    return max(range(len(values)), key=lambda i: (values[i], -i))  # ties to the first, like numpy.argmax


def aggregate(spec: TaskSpec, rows: list[dict]) -> dict:
    """Each metric's value and standard error (sample std / sqrt(n), lm-eval's mean_stderr)."""
    if spec.output_type == "loglikelihood_rolling":
        ll = sum(r["loglikelihood"] for r in rows)
        words, nbytes = sum(r["words"] for r in rows), sum(r["bytes"] for r in rows)
        return {"word_perplexity": {"value": math.exp(-ll / words), "stderr": None},
                "byte_perplexity": {"value": math.exp(-ll / nbytes), "stderr": None},
                "bits_per_byte": {"value": -ll / nbytes / math.log(2), "stderr": None}}  # fmt: skip
    names = {"generate_until": ["exact_match", *(f"exact_match,{n}" for n in spec.other_filters)],
             "loglikelihood": ["acc"]}.get(spec.output_type, ["acc", "acc_norm"])  # fmt: skip
    metrics = {}
    if spec.output_type == "loglikelihood":
        mean_ll = statistics.fmean(r["loglikelihood"] for r in rows)
        metrics["perplexity"] = {"value": math.exp(-mean_ll), "stderr": None}
    for name in names:
        values = [r[name] for r in rows]
        stderr = statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else None
        metrics[name] = {"value": sum(values) / len(values), "stderr": stderr}
    return metrics


# --- outputs ------------------------------------------------------------------------------------------------


def markdown_table(model: str, results: dict) -> str:
    lines = [f"# Evaluation of `{model}`", "", "| task | shots | metric | value | ± stderr | docs |",
             "|---|---:|---|---:|---:|---:|"]  # fmt: skip
    for name, task in results.items():
        for metric, m in task["metrics"].items():
            stderr = f"{m['stderr']:.4f}" if m["stderr"] is not None else ""
            lines.append(
                f"| {name} | {task['num_fewshot']} | {metric} | {m['value']:.4f} | {stderr} | {task['n_docs']} |"
            )
    return "\n".join(lines) + "\n"


# --- run ----------------------------------------------------------------------------------------------------


def run(cfg: EvalConfig) -> dict | None:
    # --- tasks, documents, shots and prompts before any model is loaded: a bad task fails in seconds
    started = time.time()
    out = Path(cfg.output_dir)
    specs = find_tasks(cfg.tasks, cfg.task_dirs)
    model_path, tokenizer = model_and_tokenizer(cfg.model, cfg.tokenizer, cfg.trust_remote_code, key="model")
    if cfg.chat and not tokenizer.chat_template:
        raise UserError(f"chat: true, but the tokenizer of {cfg.tokenizer or model_path} has no chat template")
    prepared = {spec.task: prepare_task(cfg, spec, tokenizer) for spec, _ in specs}
    if is_main_process():
        begin_stage(out, cfg)

    # --- model and scorer; plain `llmpipe eval` is one process, `accelerate launch` gives several
    from accelerate import Accelerator
    from tqdm.auto import tqdm
    from transformers import AutoModelForCausalLM

    from pipeline.evaluation.scoring import Scorer

    accelerator = Accelerator()
    model = load_pretrained(AutoModelForCausalLM, model_path, cfg.trust_remote_code, "model",
                            dtype=weights_dtype(cfg.precision)).to(accelerator.device).eval()  # fmt: skip
    total = sum(len(t["docs"]) for t in prepared.values())
    bar = tqdm(total=total, desc="eval documents", disable=not accelerator.is_main_process, unit="doc")
    scorer = Scorer(model, tokenizer, cfg.add_bos, cfg.max_length, cfg.batch_tokens, cfg.share_context)
    log(f"{len(specs)} task(s), {total} documents, {accelerator.num_processes} process(es), "
        f"BOS {'added' if scorer.add_bos else 'not added'}, context {scorer.max_length} tokens", STAGE)  # fmt: skip

    # --- evaluate every task; rank 0 gathers the documents' results in document order
    results, samples, timings = {}, {}, {}
    for spec, path in specs:
        task = prepared[spec.task]
        task_started = time.time()
        try:
            rows = score_task(spec, task, scorer, accelerator.process_index, accelerator.num_processes)
        except ValueError as exc:
            raise UserError(f"task {spec.task}: {exc}") from None
        bar.update(len(rows) * accelerator.num_processes)
        if accelerator.num_processes > 1:
            from accelerate.utils import gather_object

            rows = gather_object(rows)
        rows = sorted(rows, key=lambda r: r["doc_id"])
        timings[spec.task] = round(time.time() - task_started, 3)
        first = task["docs"][0]
        results[spec.task] = {
            "output_type": spec.output_type, "metrics": aggregate(spec, rows), "n_docs": len(rows),
            "num_fewshot": task["num_fewshot"], "fewshot_seed": task["seed"], "chat": cfg.chat,
            "first_prompt": task["prompts"][0],
            "first_continuations": continuations(spec, first, task["delimiter"])
            if spec.output_type not in ("generate_until", "loglikelihood_rolling") else None,
            "task_file": str(path), "wall_time_s": timings[spec.task],
        }  # fmt: skip
        samples[spec.task] = [{**r, "prompt": task["prompts"][r["doc_id"]]} for r in rows]
        shown = ", ".join(f"{k} {m['value']:.4f}" for k, m in results[spec.task]["metrics"].items())
        log(f"{spec.task} ({task['num_fewshot']}-shot, {len(rows)} docs, {timings[spec.task]:.1f} s): {shown}", STAGE)
    bar.close()

    # --- outputs on rank 0, the manifest last
    if accelerator.is_main_process:
        summary = {"model": cfg.model, "tasks": results, "world_size": accelerator.num_processes,
                   "add_bos": scorer.add_bos, "max_length": scorer.max_length}  # fmt: skip
        atomic_write_text(out / "results.json", json.dumps(summary, indent=2, ensure_ascii=False) + "\n")
        atomic_write_text(out / "results.md", markdown_table(cfg.model, results))
        outputs = ["results.json", "results.md"]
        if cfg.log_samples:
            for name, rows in samples.items():
                text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
                atomic_write_text(out / f"samples_{name}.jsonl", text)
                outputs.append(f"samples_{name}.jsonl")
        metrics = {f"{name}/{k}": m["value"] for name, t in results.items() for k, m in t["metrics"].items()}
        inputs = {"model": describe_input(cfg.model)}
        for spec, path in specs:
            files = [f for split_files in spec.data_files.values() for f in split_files]
            inputs[f"task:{spec.task}"] = describe_input([str(path), *files]) if files else {"hub": spec.dataset_path}
        write_manifest(out, STAGE, inputs, outputs, {**metrics, "world_size": accelerator.num_processes}, started)
        log(f"done -> {out / 'results.md'}", STAGE)
    accelerator.wait_for_everyone()
    return results
