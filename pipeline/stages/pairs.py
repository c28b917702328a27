"""Pairs stage: sample a model several times per prompt, judge every answer by a rule, write preference pairs.

    llmpipe pairs --config configs/tiny/pairs.yaml [model=runs/tiny/ppo] [samples_per_prompt=8]

On-policy preference data, as InstructGPT collects its comparisons: the pairs are made of what the model itself
answers, so a reward model trained on them learns to rank the mistakes this model makes (and that PPO would
otherwise exploit), not only the ones a fixed dataset happened to hold. Answers are judged by `judge`:
`exact_match` (the answer equals the row's reference after strip()) or any `module:function` taking
(prompts, responses) and, if it accepts it, `references=` and returning one score per response (ppo's
`reward_function`s work as they are). Per prompt the best-scoring answer (the reference itself with
`include_reference`) is chosen and every answer that scored lower is a rejection, most frequent mistakes first.
For judgements that need a person, sample with `llmpipe annotate prompts=... model=...` instead.

Produces `output_dir/pairs.jsonl` (`prompt`, `chosen`, `rejected`, their scores: trl's preference format, read by
the reward and dpo stages, e.g. `data.path: [data/demo/preference.jsonl, runs/tiny/pairs/pairs.jsonl]`),
`samples.jsonl` (every prompt with its answers and scores, to read what the model does) and a manifest with the
share of answers judged right and pair counts. Under `accelerate launch` the prompts are split over processes.
Sampling is not checkpointed: a killed run starts again, and nothing is written until every prompt is done.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from pathlib import Path

from pipeline.artifacts import atomic_write_text, begin_stage, write_manifest
from pipeline.config import DataConfig, UserError, config, field
from pipeline.data import stage_inputs
from pipeline.distributed import on_gpu, weights_dtype
from pipeline.formats import load_prompt_rows
from pipeline.generation import encode_prompts, rollout
from pipeline.modeling import load_pretrained, model_and_tokenizer
from pipeline.rewards import EXACT_MATCH, RULES, as_reply, load_reward_function
from pipeline.tracking import log

STAGE = "pairs"


@config
class PairsConfig:
    output_dir: str = field(help="Folder for this stage's artifact (pairs.jsonl, samples.jsonl, manifest.json).")
    model: str = field(help="Model to sample: an sft/ppo/dpo stage folder, an HF folder or a hub name.")
    tokenizer: str | None = field(None, "Tokenizer (None: the model's).")
    trust_remote_code: bool = field(False, "Allow models that ship their own Python code. Off: safe.")
    data: DataConfig = field(
        help="Prompts: `prompt` (string or message list) or `messages` (all but the final answer), each distinct "
        "prompt once; a reference answer per prompt from reference_key."
    )
    reference_key: str | None = field(
        None, "Column with the reference answer (a string or message list); None: the final assistant turn of "
        "`messages`, else the first of chosen, answer, reference, solution present.",
    )  # fmt: skip
    judge: str = field(
        EXACT_MATCH, "exact_match (the answer equals the reference after strip(): 1, else 0), math_verify (its final "
        "value equals the reference's: GSM8K or MATH solutions) or 'module:function' "
        "taking (prompts, responses[, references=]) -> one float per response.",
    )  # fmt: skip
    include_reference: bool = field(
        True, "Judge the reference too, as one more answer: a prompt the model never answers right still gives "
        "pairs (reference chosen, the model's answers rejected).",
    )  # fmt: skip
    samples_per_prompt: int = field(8, "Answers sampled per prompt.", ge=1)
    temperature: float = field(0.7, "Sampling temperature; hotter than the next PPO run's covers more of the answers "
                               "PPO may drift to (demo: 1.0 x 16 beat 0.7 x 8).", gt=0)  # fmt: skip
    top_p: float = field(1.0, "Nucleus sampling.", gt=0, le=1)
    max_new_tokens: int = field(64, "Longest answer in tokens; answers stop at EOS or end-of-turn.", ge=1)
    max_prompts: int | None = field(None, "Use only the first N distinct prompts.", ge=1)
    max_pairs_per_prompt: int | None = field(None, "Keep at most N rejections per prompt (None: all).", ge=1)
    min_margin: float = field(0.0, "A rejection must score at least this much below the chosen answer.", ge=0)
    batch_size: int = field(16, "Prompts per generate call (each sampled samples_per_prompt times).", ge=1)
    seed: int = field(0, "Sampling seed (process i uses seed + i).")
    precision: str = field("auto", "auto (bf16 on a GPU that has it, else fp32), fp32 or bf16.")

    def check(self) -> list[str]:
        problems = []
        if self.judge not in RULES and ":" not in self.judge:
            problems.append(f"judge: got {self.judge!r}; expected exact_match, math_verify or "
                            "'package.module:function'")  # fmt: skip
        if self.precision not in ("auto", "fp32", "bf16"):
            problems.append(f"precision: got {self.precision!r}, expected auto, fp32 or bf16")
        return problems


Config = PairsConfig


# --- judging -----------------------------------------------------------------------------------------------------


def make_pairs(row: dict, answers: list[dict], cfg: PairsConfig) -> list[tuple[dict, dict]]:
    """(chosen, rejected) candidates of one prompt. Candidates are the distinct non-empty answers (and the
    reference); the chosen is the best-scoring one (the reference on a tie, else the most often sampled), every
    candidate scoring at least min_margin lower is rejected, most frequent first."""
    counts = Counter(a["text"].strip() for a in answers if a["text"].strip())
    candidates = {text: {"text": text, "score": a["score"], "count": counts[text]}
                  for a in answers if (text := a["text"].strip())}  # fmt: skip
    if cfg.include_reference and row.get("reference_score") is not None:
        text = row["reference"].strip()
        candidates[text] = {"text": text, "score": row["reference_score"], "count": counts.get(text, 0),
                            "reference": True}  # fmt: skip
    if len(candidates) < 2:
        return []
    ranked = sorted(candidates.values(), key=lambda c: (-c["score"], not c.get("reference"), -c["count"], c["text"]))
    best = ranked[0]
    losers = [c for c in ranked[1:] if c["score"] <= best["score"] - cfg.min_margin and c["score"] < best["score"]]
    losers.sort(key=lambda c: (-c["count"], c["score"], c["text"]))
    return [(best, loser) for loser in losers[: cfg.max_pairs_per_prompt]]


# --- run ---------------------------------------------------------------------------------------------------------


def run(cfg: PairsConfig) -> dict | None:
    import torch
    from accelerate import PartialState
    from accelerate.utils import gather_object
    from tqdm.auto import tqdm
    from transformers import AutoModelForCausalLM

    # --- check inputs before any compute: judge, prompts, references, tokenizer
    started = time.time()
    out = Path(cfg.output_dir)
    judge = load_reward_function(cfg.judge, "judge")
    model_path, tokenizer = model_and_tokenizer(cfg.model, cfg.tokenizer, cfg.trust_remote_code, True, "model")
    rows = load_prompt_rows(cfg.data, cfg.reference_key, [cfg.judge], chat=bool(tokenizer.chat_template))
    rows = rows[: cfg.max_prompts]
    if any(isinstance(r["prompt"], list) for r in rows) and not tokenizer.chat_template:
        raise UserError(f"tokenizer of {cfg.model} has no chat template, but {cfg.data.path} holds conversations")
    state = PartialState(cpu=not on_gpu())
    if state.is_main_process:
        begin_stage(out, cfg, fresh=True)

    # --- sample this process's share of the prompts
    model = load_pretrained(AutoModelForCausalLM, model_path, cfg.trust_remote_code, "model",
                            dtype=weights_dtype(cfg.precision))  # fmt: skip
    model.to(state.device).eval()
    torch.manual_seed(cfg.seed + state.process_index)
    n = cfg.samples_per_prompt
    mine = list(range(len(rows)))[state.process_index :: state.num_processes]
    ids = encode_prompts(tokenizer, [rows[i]["prompt"] for i in mine])
    sampled: list[dict] = []
    sampling_started = time.time()
    batches = range(0, len(mine), cfg.batch_size)
    for start in tqdm(batches, desc=f"sampling {n} answers per prompt", disable=not state.is_main_process):
        chunk = ids[start : start + cfg.batch_size]
        batch = rollout(model, tokenizer, [p for p in chunk for _ in range(n)], cfg.max_new_tokens, cfg.temperature,
                        cfg.top_p, group=n)  # fmt: skip
        texts = tokenizer.batch_decode(batch["responses"], skip_special_tokens=True)
        finished = batch["has_stop"].tolist()
        for k in range(len(chunk)):
            answers = [{"text": texts[k * n + j], "finished": finished[k * n + j]} for j in range(n)]
            sampled.append({"index": mine[start + k], "answers": answers})
    sampling_s = time.time() - sampling_started
    sampled = sorted(gather_object(sampled), key=lambda s: s["index"])

    # --- judge and pair on every process (each has all answers; a rule is cheap), so all stop alike; main writes
    prompts = [rows[s["index"]]["prompt"] for s in sampled for _ in s["answers"]]
    responses = [a["text"] for s in sampled for a in s["answers"]]
    references = [rows[s["index"]]["reference"] for s in sampled for _ in s["answers"]]
    scores = judge(prompts, responses, references=references)
    have_reference = [r for r in rows if r["reference"] is not None] if cfg.include_reference else []
    if have_reference:  # the reference is one more candidate, judged by the same rule
        texts = [r["reference"] for r in have_reference]
        for row, score in zip(have_reference, judge([r["prompt"] for r in have_reference], texts, references=texts),
                              strict=True):  # fmt: skip
            row["reference_score"] = score
    flat = iter(scores)
    pair_rows, sample_rows, prompts_with_pairs = [], [], 0
    for s in sampled:
        row = rows[s["index"]]
        for answer in s["answers"]:
            answer["score"] = next(flat)
        made = make_pairs(row, s["answers"], cfg)
        prompts_with_pairs += bool(made)
        for chosen, rejected in made:
            pair_rows.append({"prompt": row["prompt"], "chosen": as_reply(row["prompt"], chosen["text"]),
                              "rejected": as_reply(row["prompt"], rejected["text"]),
                              "chosen_score": chosen["score"], "rejected_score": rejected["score"]})  # fmt: skip
        sample_rows.append({"prompt": row["prompt"], "reference": row["reference"], "answers": s["answers"]})
    if not pair_rows:
        if not state.is_main_process:
            raise SystemExit(2)  # bad input (cli.EXIT_BAD_INPUT); the main process says why
        raise UserError(f"no pairs: every prompt's answers scored the same under judge {cfg.judge!r} "
                        f"({len(rows)} prompts x {n} samples); sample hotter or more, or check the judge")  # fmt: skip
    if not state.is_main_process:
        state.wait_for_everyone()
        return None
    total = len(scores)
    right = [max(a["score"] for a in s["answers"]) for s in sampled]
    metrics = {
        "prompts": len(rows), "samples": total, "mean_score": sum(scores) / total,
        "prompts_with_pairs": prompts_with_pairs, "pairs": len(pair_rows),
        "best_of_n_mean_score": sum(right) / len(right),
        "distinct_answers_per_prompt": sum(len({a["text"].strip() for a in s["answers"]}) for s in sampled)
        / len(sampled),
        "no_eos_share": sum(not a["finished"] for s in sampled for a in s["answers"]) / total,
        "sampling_s": round(sampling_s, 2), "samples_per_s": round(total / max(sampling_s, 1e-9), 1),
        "world_size": state.num_processes,
    }  # fmt: skip
    atomic_write_text(out / "samples.jsonl", "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in sample_rows))
    atomic_write_text(out / "pairs.jsonl", "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in pair_rows))
    inputs = stage_inputs(cfg, "model", "data")
    write_manifest(out, STAGE, inputs, ["pairs.jsonl", "samples.jsonl"], metrics, started)
    log(f"done: {total} answers to {len(rows)} prompts, mean score {metrics['mean_score']:.3f} (best of {n}: "
        f"{metrics['best_of_n_mean_score']:.3f}); {len(pair_rows)} pairs from {prompts_with_pairs} prompts -> "
        f"{out / 'pairs.jsonl'}", STAGE)  # fmt: skip
    state.wait_for_everyone()
    return metrics
