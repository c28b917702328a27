"""lm-evaluation-harness task files both ways: its YAML keys read as they are (dataset_kwargs, metric_list,
filter_list, fewshot_config, tag), and a TaskSpec written as lm-eval's YAML, so both tools run on the same
documents and shots (tests/test_eval.py, bench/eval_vs_lmeval.py)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pipeline.evaluation.tasks import TaskSpec

LOCAL_BUILDERS = ("json", "csv", "parquet")
METRICS = ("acc", "acc_norm", "exact_match", "perplexity", "word_perplexity", "byte_perplexity", "bits_per_byte")
LMEVAL_KEYS = ("dataset_kwargs", "metric_list", "filter_list", "fewshot_config", "tag", "repeats",
               "should_decontaminate", "doc_to_decontamination_query")  # fmt: skip
GENERATION_KEYS = ("until", "max_gen_toks", "do_sample", "temperature")
EXACT_MATCH_KEYS = ("ignore_case", "ignore_punctuation", "ignore_numbers", "regexes_to_ignore")


def from_lmeval(data: dict, path: Path) -> tuple[dict, list[str]]:
    """A task mapping with lm-eval's keys turned into ours, and the problems (keys whose meaning llmpipe eval does
    not reproduce, named so the file can be fixed). Local data (`dataset_path: json|csv|parquet` with
    `dataset_kwargs.data_files`) is found next to the YAML first, then from the working directory, as lm-eval
    finds it."""
    import dataclasses

    from pipeline.config import suggest
    from pipeline.evaluation.tasks import TaskSpec

    data, problems = dict(data), []
    ours = [f.name for f in dataclasses.fields(TaskSpec)]
    for key in data:  # a near miss of one of lm-eval's keys (ours are checked, with hints, by validation)
        hint = suggest(key, list(LMEVAL_KEYS)) if key not in ours and key not in LMEVAL_KEYS else None
        if hint and not suggest(key, ours):
            problems.append(f"unknown key {key!r} (did you mean {hint!r}?)")
    data.pop("tag", None)  # lm-eval's grouping label: no meaning for one task
    for key in ("should_decontaminate", "doc_to_decontamination_query"):  # read by lm-eval's decontamination only
        data.pop(key, None)
    repeats = data.pop("repeats", 1)
    if repeats != 1:
        problems.append(f"repeats: {repeats} answers per document are not scored by llmpipe eval (it scores one; "
                        "set repeats: 1)")  # fmt: skip
    kwargs = data.pop("dataset_kwargs", None)
    if kwargs is not None:
        extra = sorted(set(kwargs) - {"data_files"})
        if extra or data.get("dataset_path") not in LOCAL_BUILDERS or not kwargs.get("data_files"):
            problems.append(f"dataset_kwargs: only data_files with dataset_path {'|'.join(LOCAL_BUILDERS)} is read "
                            f"(got dataset_path {data.get('dataset_path')!r}, keys {sorted(kwargs)})")  # fmt: skip
        else:
            files = kwargs["data_files"]
            files = files if isinstance(files, dict) else {"train": files}
            data.pop("dataset_path")
            data["data_files"] = {split: [_local(f, path) for f in ([fs] if isinstance(fs, str) else fs)]
                                  for split, fs in files.items()}  # fmt: skip
    for metric in data.pop("metric_list", None) or []:
        name = metric.get("metric") if isinstance(metric, dict) else metric
        if name not in METRICS:
            problems.append(f"metric_list: {name!r} is not computed by llmpipe eval (it computes "
                            f"{', '.join(METRICS)})")  # fmt: skip
        elif name == "exact_match":
            options = {k: metric[k] for k in EXACT_MATCH_KEYS if k in metric}
            data["exact_match"] = {**options, **data.get("exact_match", {})}
    filters = data.pop("filter_list", None)
    if filters:  # lm-eval scores every pipeline; the first is our exact_match, the others exact_match,<name>
        first, *others = [_filter(pipeline, problems) for pipeline in filters]
        data["answer_filter"] = {**first, **data.get("answer_filter", {})}
        names = [str(pipeline.get("name", "none")) for pipeline in filters[1:]]
        if len(set(names)) < len(names) or "none" in names:
            problems.append(f"filter_list: pipelines after the first need distinct names (got {names})")
        data["other_filters"] = {**dict(zip(names, others, strict=True)), **data.get("other_filters", {})}
    fewshot = data.pop("fewshot_config", None)
    if fewshot:
        if set(fewshot) - {"sampler"}:
            problems.append(f"fewshot_config: only `sampler` is read (got {sorted(fewshot)})")
        if "sampler" in fewshot:
            data.setdefault("fewshot_sampler", fewshot["sampler"])
    generation = data.get("generation_kwargs")
    if isinstance(generation, dict):
        unread = sorted(set(generation) - set(GENERATION_KEYS))
        if unread:
            problems.append(f"generation_kwargs: {unread} are not applied by llmpipe eval (it reads "
                            f"{GENERATION_KEYS})")  # fmt: skip
        if isinstance(generation.get("until"), str):
            generation = {**generation, "until": [generation["until"]]}
        data["generation_kwargs"] = {k: v for k, v in generation.items() if k in GENERATION_KEYS}
    return data, problems


def _local(file: str, task_file: Path) -> str:
    beside = task_file.parent / file
    return str((beside if beside.exists() or not Path(file).exists() else Path(file)).resolve())


def _filter(pipeline: dict, problems: list[str]) -> dict:
    """One of lm-eval's filter pipelines (regex, remove_whitespace, take_first) as our AnswerFilter."""
    out: dict[str, Any] = {}
    for step in pipeline.get("filter", []):
        function = step.get("function")
        if function == "regex":
            out["regex"] = step.get("regex_pattern", r"#### (\-?[0-9\.\,]+)")
            out |= {k: step[k] for k in ("group_select", "fallback") if k in step}
        elif function == "remove_whitespace":
            out["strip"] = True
        elif function != "take_first":
            problems.append(f"filter_list: filter function {function!r} is not supported (regex, remove_whitespace, "
                            "take_first are)")  # fmt: skip
    return out


def lmeval_task_config(spec: TaskSpec) -> dict:
    """The task as an lm-evaluation-harness YAML mapping (local data as its `json`/`parquet` builder), so both
    tools can be run on the same documents and shots. chat_doc_to_text has no lm-eval key and is left out: lm-eval's
    chat mode asks doc_to_text."""
    from pipeline.evaluation.tasks import DATA_FORMATS

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
    if spec.metadata:
        out["metadata"] = dict(spec.metadata)
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
        out["filter_list"] = [{"name": name, "filter": _filter_steps(f)}
                              for name, f in (("none", spec.answer_filter), *spec.other_filters.items())]  # fmt: skip
    elif spec.output_type == "loglikelihood":
        out["metric_list"] = [{"metric": "perplexity"}, {"metric": "acc"}]
    else:
        out["metric_list"] = [{"metric": m} for m in ("word_perplexity", "byte_perplexity", "bits_per_byte")]
    return out


def _filter_steps(f) -> list[dict]:
    """An AnswerFilter as lm-eval's filter pipeline."""
    steps: list[dict] = []
    if f.regex is not None:
        steps.append({"function": "regex", "regex_pattern": f.regex, "group_select": f.group_select,
                      "fallback": f.fallback})  # fmt: skip
    if f.strip:
        steps.append({"function": "remove_whitespace"})
    return [*steps, {"function": "take_first"}]
