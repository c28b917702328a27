"""Few-shot tasks as data: a task YAML (+ its data files) -> documents, few-shot prompts and answers.

The keys and their meaning follow lm-evaluation-harness (`lm_eval/tasks/*/*.yaml`), so a task reads the same in
both and gives the same prompts: `doc_to_text`, `doc_to_target`, `doc_to_choice` are a column name or a Jinja
template; the eval document's prompt is `description + shots + doc_to_text(doc)`, each shot being
`doc_to_text + target_delimiter + answer + fewshot_delimiter`. Shots are drawn as the harness draws them: one
`random.Random(fewshot_seed)` per task, used for the documents in order, `sample(pool, n + 1)` minus the document
itself when the pool is the evaluated split. evaluation/lmeval.py writes the same task for lm-evaluation-harness.
"""

from __future__ import annotations

import ast
import difflib
import re
from functools import lru_cache
from pathlib import Path
from random import Random
from typing import Any

import yaml

from pipeline.config import ConfigError, UserError, config, field, validate_dict
from pipeline.evaluation.lmeval import from_lmeval

OUTPUT_TYPES = ("multiple_choice", "generate_until", "loglikelihood", "loglikelihood_rolling")
DATA_FORMATS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}


@config
class GenerationSpec:
    until: list[str] | None = field(None, "Stop strings (None: the task's fewshot_delimiter). EOS always stops.")
    max_gen_toks: int = field(256, "Most tokens generated per answer.", ge=1)
    do_sample: bool = field(False, "Sample instead of greedy decoding.")
    temperature: float = field(0.0, "Sampling temperature (with do_sample).", ge=0.0)


@config
class AnswerFilter:
    """What is kept of a generated answer before scoring (lm-eval's `regex` then `remove_whitespace` filters)."""

    regex: str | None = field(None, "Keep only this regex's match (its first group if it has groups).")
    group_select: int = field(0, "Which match to keep when the regex matches several times (-1: the last).")
    fallback: str = field("[invalid]", "The answer when the regex does not match.")
    strip: bool = field(False, "Remove leading and trailing whitespace.")


@config
class ExactMatchSpec:
    ignore_case: bool = field(False, "Compare lower-cased.")
    ignore_punctuation: bool = field(False, "Drop ASCII punctuation before comparing.")
    ignore_numbers: bool = field(False, "Drop digits before comparing.")
    regexes_to_ignore: list[str] = field(factory=list, help="Remove these regexes from answer and target first.")


@config
class TaskSpec:
    task: str = field(help="The task's name, as given to `tasks:` in the eval config.")
    include: str | None = field(None, "A task YAML (relative to this one) whose keys this file starts from.")
    output_type: str = field(
        help="multiple_choice, generate_until, loglikelihood (of a target), loglikelihood_rolling."
    )
    data_files: dict[str, str | list[str]] = field(
        factory=dict, help="Local data per split, {split: file or files}, relative to the YAML (.jsonl/.parquet)."
    )
    dataset_path: str | None = field(None, "Hugging Face hub dataset name (when data_files is empty).")
    dataset_name: str | None = field(None, "Hub dataset configuration name.")
    dataset_revision: str | None = field(None, "Hub dataset revision to pin.")
    training_split: str | None = field(None, "Split that is the few-shot pool when fewshot_split is not set.")
    validation_split: str | None = field(None, "Split evaluated when test_split is not set.")
    test_split: str | None = field(None, "Split evaluated.")
    fewshot_split: str | None = field(None, "Split the shots come from (None: training, else validation split).")
    doc_to_text: str = field(help="The prompt of a document: a column name or a Jinja template.")
    chat_doc_to_text: str | None = field(
        None, "The prompt of a document as a chat model is asked it (eval chat: true), the user turn: e.g. the "
        "question alone where doc_to_text adds a base model's 'Question: ...\\nAnswer:' scaffolding. None: "
        "doc_to_text, as lm-eval's --apply_chat_template does.",
    )  # fmt: skip
    doc_to_target: str | int | None = field(None, "The answer: a column, a template, or an index into the choices.")
    doc_to_choice: str | list[str] | None = field(None, "The options (multiple_choice): a list column or template.")
    description: str = field("", "Text put before the shots (end it with the delimiter you want).")
    target_delimiter: str = field(" ", "Between a prompt and its answer.")
    fewshot_delimiter: str = field("\n\n", "After each shot.")
    num_fewshot: int = field(0, "Shots per prompt (0: zero-shot).", ge=0)
    fewshot_seed: int = field(1234, "Seed of the shot sampler (lm-eval's fewshot_random_seed default).")
    fewshot_sampler: str = field("default", "default (seeded random sample) or first_n (the pool's first n).")
    generation_kwargs: GenerationSpec = field(factory=GenerationSpec, help="Generation (generate_until).")
    answer_filter: AnswerFilter = field(factory=AnswerFilter, help="Cleaning of generated answers.")
    other_filters: dict[str, AnswerFilter] = field(
        factory=dict, help="Further cleanings by name, each scored as its own metric `exact_match,<name>` (lm-eval's "
        "further filter_list pipelines, e.g. gsm8k's flexible-extract). exact_match and rewards use answer_filter.",
    )  # fmt: skip
    exact_match: ExactMatchSpec = field(factory=ExactMatchSpec, help="Exact-match options (generate_until).")
    metadata: dict[str, Any] = field(factory=dict, help="Free-form notes (version, source).")

    def check(self) -> list[str]:
        problems = []
        if self.output_type not in OUTPUT_TYPES:
            problems.append(f"output_type: got {self.output_type!r}, expected one of {', '.join(OUTPUT_TYPES)}")
        if not self.data_files and not self.dataset_path:
            problems.append("neither data_files (local) nor dataset_path (hub) is set")
        if self.test_split is None and self.validation_split is None:
            problems.append("set test_split or validation_split: the split that is evaluated")
        if self.output_type == "multiple_choice" and self.doc_to_choice is None:
            problems.append("doc_to_choice: required for multiple_choice")
        if self.output_type != "loglikelihood_rolling" and self.doc_to_target is None:
            problems.append(f"doc_to_target: required for {self.output_type}")
        if self.fewshot_sampler not in ("default", "first_n"):
            problems.append(f"fewshot_sampler: got {self.fewshot_sampler!r}, expected default or first_n")
        for key, answer_filter in (("answer_filter", self.answer_filter),
                                   *((f"other_filters.{n}", f) for n, f in self.other_filters.items())):  # fmt: skip
            if answer_filter.regex is not None:
                try:
                    re.compile(answer_filter.regex)
                except re.error as exc:
                    problems.append(f"{key}.regex: {exc}")
        for name in ("doc_to_text", "chat_doc_to_text", "doc_to_target", "doc_to_choice", "description"):
            value = getattr(self, name)
            if isinstance(value, str) and "{" in value:
                try:
                    _jinja().from_string(value)
                except Exception as exc:  # noqa: BLE001 - jinja's TemplateSyntaxError and friends
                    problems.append(f"{name}: not a valid Jinja template: {exc}")
        return problems

    @property
    def eval_split(self) -> str:
        return self.test_split or self.validation_split

    @property
    def pool_split(self) -> str:
        """lm-eval's fallback order for the few-shot pool: fewshot, training, validation, test split."""
        return self.fewshot_split or self.training_split or self.validation_split or self.test_split


# --- finding and reading task files -----------------------------------------------------------------------------


def _read_yaml(path: Path) -> dict:
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise UserError(f"{path}: not valid YAML: {' '.join(str(exc).split())}") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: a task file must be a mapping of keys to values")
    return data


def _merged(path: Path, seen: tuple[Path, ...] = ()) -> dict:
    """A task file's keys over those of the file it includes (recursively); data paths made absolute."""
    path = path.resolve()
    if path in seen:
        raise UserError(f"{path}: include loop: {' -> '.join(str(p) for p in (*seen, path))}")
    data = _read_yaml(path)
    if isinstance(data.get("data_files"), dict):  # relative to the file that names them
        data["data_files"] = {
            split: [str((path.parent / f).resolve()) for f in ([files] if isinstance(files, str) else files)]
            for split, files in data["data_files"].items()
        }
    base = data.pop("include", None)
    if base is None:
        return data
    merged = _merged(path.parent / base, (*seen, path))
    for key, value in data.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = {**merged[key], **value}
        else:
            merged[key] = value
    return merged


def load_task_file(path: str | Path) -> TaskSpec:
    """One task YAML, its includes applied, validated: errors name the file and the key."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such task file")
    data, problems = from_lmeval(_merged(path), path)  # lm-eval's own keys, as its task files have them
    if problems:
        raise ConfigError([f"{path}: {p}" for p in problems])
    return validate_dict(TaskSpec, data, str(path))


def task_index(task_dirs: list[str]) -> dict[str, Path]:
    """{task name: YAML file} for every task file under the folders (the `task:` key names it)."""
    index: dict[str, Path] = {}
    for folder in task_dirs:
        for path in sorted(Path(folder).rglob("*.yaml")):
            name = _read_yaml(path).get("task")
            if isinstance(name, str):
                if name in index:
                    raise UserError(f"task {name!r} is defined twice: {index[name]} and {path}")
                index[name] = path
    return index


def find_tasks(names: list[str], task_dirs: list[str]) -> list[tuple[TaskSpec, Path]]:
    """Task specs by name (or YAML path); every unknown name is reported at once, with the closest match."""
    index = task_index(task_dirs)
    found, problems = [], []
    for name in names:
        if name.endswith((".yaml", ".yml")) and Path(name).is_file():
            found.append(Path(name))
        elif name in index:
            found.append(index[name])
        else:
            hint = difflib.get_close_matches(name, list(index), n=1, cutoff=0.5)
            problems.append(
                f"tasks: unknown task {name!r}" + (f" (did you mean {hint[0]!r}?)" if hint else "")
                + f"; tasks in {', '.join(task_dirs)}: {', '.join(sorted(index)) or 'none'}"
            )  # fmt: skip
    if problems:
        raise UserError(problems)
    specs, errors = [], []
    for path in found:
        try:
            specs.append((load_task_file(path), path))
        except ConfigError as exc:
            errors += exc.problems
    if errors:
        raise UserError(errors)
    return specs


# --- documents --------------------------------------------------------------------------------------------------


def load_split(spec: TaskSpec, split: str) -> list[dict]:
    """The documents of one split, as plain dicts, from local files or the hub."""
    import datasets

    try:
        if spec.data_files:
            if split not in spec.data_files:
                raise UserError(f"task {spec.task}: no data_files for split {split!r} (has {list(spec.data_files)})")
            files = spec.data_files[split]
            missing = [f for f in files if not Path(f).is_file()]
            if missing:
                raise UserError(f"task {spec.task}: data file not found: {missing[0]}")
            builder = DATA_FORMATS.get(Path(files[0]).suffix)
            if builder is None:
                raise UserError(f"task {spec.task}: cannot read {files[0]} (expected .jsonl/.json/.parquet/.csv)")
            ds = datasets.load_dataset(builder, data_files={split: files}, split=split)
        else:
            ds = datasets.load_dataset(
                spec.dataset_path, spec.dataset_name, split=split, revision=spec.dataset_revision
            )
    except UserError:
        raise
    except Exception as exc:  # noqa: BLE001 - any loader failure becomes one readable message
        where = "local files" if spec.data_files else f"hub dataset {spec.dataset_path!r} (is there a network?)"
        raise UserError(f"task {spec.task}: cannot load split {split!r} from {where}: {str(exc)[:300]}") from None
    return ds.to_list()


# --- templates: doc_to_text / doc_to_target / doc_to_choice -----------------------------------------------------


@lru_cache(maxsize=1)
def _jinja():
    # The harness's Jinja settings: a missing field is an error, a template's last newline is kept.
    from jinja2 import BaseLoader, Environment, StrictUndefined

    env = Environment(loader=BaseLoader(), undefined=StrictUndefined, keep_trailing_newline=True)
    env.filters["regex_replace"] = lambda text, pattern, repl, count=0: re.sub(pattern, repl, text, count=count)
    return env


@lru_cache(maxsize=256)
def _template(source: str):
    return _jinja().from_string(source)


def resolve(doc: dict, source: Any) -> Any:
    """A column's value when `source` names a column, else the template rendered on the document."""
    if not isinstance(source, str):
        return source
    if source in doc:
        return doc[source]
    return _template(source).render(**doc)


def doc_choices(spec: TaskSpec, doc: dict) -> list[str] | None:
    if spec.doc_to_choice is None:
        return None
    value = resolve(doc, spec.doc_to_choice)
    return ast.literal_eval(value) if isinstance(value, str) else list(value)


def doc_target(spec: TaskSpec, doc: dict) -> Any:
    """The answer as the harness reads it: an index for digit strings with choices, a list for '[...]'."""
    value = resolve(doc, spec.doc_to_target)
    if isinstance(value, str) and spec.doc_to_target not in doc:
        if value.isdigit() and spec.doc_to_choice is not None:
            return int(value)
        if len(value) >= 2 and value[0] == "[" and value[-1] == "]":
            try:
                return ast.literal_eval(value)
            except (SyntaxError, ValueError):
                return value
    return value


def answer_text(spec: TaskSpec, doc: dict) -> str:
    """A shot's written answer: the gold choice's text, the first of several targets, or the target."""
    target, choices = doc_target(spec, doc), doc_choices(spec, doc)
    if choices is not None and isinstance(target, int):
        return choices[target]
    return str(target[0] if isinstance(target, list) else target)


def gold_indices(spec: TaskSpec, doc: dict, choices: list[str]) -> list[int]:
    """Gold choice index (or indices); an index out of range or an unknown string counts as no gold."""
    target = doc_target(spec, doc)
    golds = target if isinstance(target, list) else [target]
    out = []
    for gold in golds:
        if isinstance(gold, str):
            gold = choices.index(gold) if gold in choices else -1
        out.append(gold if 0 <= gold < len(choices) else -1)
    return out


# --- shots and prompts ------------------------------------------------------------------------------------------


def sample_shots(
    docs: list[dict], pool: list[dict], n: int, seed: int, pool_is_eval_split: bool, sampler: str = "default"
) -> list[list[dict]]:
    """The shots of every document, drawn in document order from one seeded generator (as the harness does, so
    the same seed gives the same shots). A document is never its own shot when the pool is the evaluated split."""
    if n == 0:
        return [[] for _ in docs]
    need = n + 1 if pool_is_eval_split else n
    if len(pool) < need:
        raise UserError(f"num_fewshot {n} needs a few-shot pool of at least {need} documents; it has {len(pool)}")
    if sampler == "first_n":
        return [[d for d in pool if not (pool_is_eval_split and d == doc)][:n] for doc in docs]
    rng = Random(seed)
    shots = []
    for doc in docs:
        if not pool_is_eval_split:
            shots.append([pool[i] for i in rng.sample(range(len(pool)), n)])
            continue
        # n + 1 drawn, the document dropped (a duplicate row equal to it is dropped too, then redrawn)
        picked = [pool[i] for i in rng.sample(range(len(pool)), n + 1) if pool[i] != doc][:n]
        if len(picked) < n:
            others = [d for d in pool if d != doc]
            picked = [others[i] for i in rng.sample(range(len(others)), n)]
        shots.append(picked)
    return shots


def build_prompt(spec: TaskSpec, doc: dict, shots: list[dict], tokenizer=None) -> str:
    """The context the model continues: plain text, or (with a tokenizer) the chat template applied to the shots
    as user/assistant turns and the document as the last user turn, each asked in chat_doc_to_text if set."""
    description = resolve(doc, spec.description) if spec.description else ""
    if tokenizer is None:
        question = resolve(doc, spec.doc_to_text)
        parts = [description]
        for shot in shots:
            parts += [resolve(shot, spec.doc_to_text), spec.target_delimiter, answer_text(spec, shot)]
            parts.append(spec.fewshot_delimiter)
        return "".join(parts) + question
    asked = spec.chat_doc_to_text or spec.doc_to_text
    messages = [{"role": "system", "content": description}] if description else []
    for shot in shots:
        messages += [
            {"role": "user", "content": resolve(shot, asked)},
            {"role": "assistant", "content": answer_text(spec, shot)},
        ]
    messages.append({"role": "user", "content": resolve(doc, asked)})
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
