"""The same task for lm-evaluation-harness: a TaskSpec written as lm-eval's task YAML mapping, so both tools can
be run on the same documents and shots (tests/test_eval.py, bench/eval_vs_lmeval.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pipeline.evaluation.tasks import DATA_FORMATS, TaskSpec


def lmeval_task_config(spec: TaskSpec) -> dict:
    """The task as an lm-evaluation-harness YAML mapping (local data as its `json`/`parquet` builder), so both
    tools can be run on the same documents and shots."""
    out: dict[str, Any] = {"task": spec.task, "output_type": spec.output_type}
    if spec.data_files:
        builder = DATA_FORMATS[Path(next(iter(spec.data_files.values()))[0]).suffix]
        out |= {"dataset_path": builder, "dataset_kwargs": {"data_files": dict(spec.data_files)}}
    else:
        out |= {"dataset_path": spec.dataset_path, "dataset_name": spec.dataset_name}
    for key in ("training_split", "validation_split", "test_split", "fewshot_split", "doc_to_text",
                "doc_to_target", "doc_to_choice", "description", "target_delimiter", "fewshot_delimiter",
                "num_fewshot"):  # fmt: skip
        value = getattr(spec, key)
        if value is not None:
            out[key] = value
    out["fewshot_config"] = {"sampler": spec.fewshot_sampler}
    if spec.output_type == "multiple_choice":
        out["metric_list"] = [
            {"metric": m, "aggregation": "mean", "higher_is_better": True} for m in ("acc", "acc_norm")
        ]
    elif spec.output_type == "generate_until":
        em = spec.exact_match
        out["metric_list"] = [
            {"metric": "exact_match", "aggregation": "mean", "higher_is_better": True, "ignore_case": em.ignore_case,
             "ignore_punctuation": em.ignore_punctuation, "ignore_numbers": em.ignore_numbers,
             "regexes_to_ignore": list(em.regexes_to_ignore)}
        ]  # fmt: skip
        gen = spec.generation_kwargs
        out["generation_kwargs"] = {
            "until": list(gen.until if gen.until is not None else [spec.fewshot_delimiter]),
            "max_gen_toks": gen.max_gen_toks, "do_sample": gen.do_sample, "temperature": gen.temperature,
        }  # fmt: skip
        steps = []
        f = spec.answer_filter
        if f.regex is not None:
            steps.append({"function": "regex", "regex_pattern": f.regex, "group_select": f.group_select,
                          "fallback": f.fallback})  # fmt: skip
        if f.strip:
            steps.append({"function": "remove_whitespace"})
        out["filter_list"] = [{"name": "none", "filter": [*steps, {"function": "take_first"}]}]
    elif spec.output_type == "loglikelihood":
        out["metric_list"] = [{"metric": "perplexity"}, {"metric": "acc"}]
    else:
        out["metric_list"] = [{"metric": m} for m in ("word_perplexity", "byte_perplexity", "bits_per_byte")]
    return out
