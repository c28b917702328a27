"""Typed stage configs: YAML file + dotted overrides -> one validated dataclass, or every problem at once.

Each stage declares one config class with the `@config` decorator (a pydantic dataclass that forbids unknown
keys) and fields declared with `field(default, "help text")`. `load_config` reads the YAML with OmegaConf (which
also merges `a.b=value` overrides and resolves `${...}` interpolation), validates it with pydantic, then runs the
class's own cross-field `check()`; every problem found is reported together, each naming its key.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from pathlib import Path
from typing import Any, Union

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException
from pydantic import ConfigDict, Field, TypeAdapter, ValidationError
from pydantic.dataclasses import dataclass as _pydantic_dataclass


class UserError(Exception):
    """Bad input from the user (config, data, artifact folders): the CLI prints it without a traceback, exit 2."""

    def __init__(self, problems: str | list[str]):
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        super().__init__("\n".join(self.problems))


class StageFailed(Exception):
    """A stage cannot go on (e.g. non-finite loss); the message says what is kept and what to do. Exit code 1."""


class ConfigError(UserError):
    """One or more problems in a stage config."""


def config(cls: type) -> type:
    """Make `cls` a validated config dataclass: unknown keys are errors, fields are keyword-only."""
    return _pydantic_dataclass(cls, config=ConfigDict(extra="forbid", validate_assignment=False), kw_only=True)


def field(default: Any = dataclasses.MISSING, help: str = "", *, factory: Any = None, **constraints: Any) -> Any:
    """A config field with its help text. `factory` builds mutable defaults; constraints are pydantic's (ge=1...)."""
    if factory is not None:
        return Field(default_factory=factory, description=help, **constraints)
    if default is dataclasses.MISSING:
        return Field(description=help, **constraints)
    return Field(default=default, description=help, **constraints)


# --- shared sections --------------------------------------------------------------------------------------------


@config
class DataConfig:
    """Where a stage's examples come from: local files or a hub dataset, with column renaming."""

    path: str | list[str] = field(
        help="Local file(s) or glob(s) (.jsonl, .json, .parquet, .txt), or a Hugging Face hub dataset name."
    )
    name: str | None = field(None, "Hub dataset configuration name (the second argument of load_dataset).")
    split: str = field("train", "Split to read (hub datasets; local files always give 'train').")
    revision: str | None = field(None, "Hub dataset revision (branch, tag or commit) to pin.")
    format: str = field("auto", "File format: auto (from the extension), jsonl, json, parquet or text.")
    text_sample_by: str = field(
        "document", "For .txt files: one example per 'line', per blank-line 'paragraph', or per file 'document'."
    )
    columns: dict[str, str] = field(
        factory=dict, help="Column mapping {expected: present}, e.g. {text: content} reads column 'content' as 'text'."
    )
    streaming: bool = field(False, "Stream the data instead of loading it (for corpora larger than memory or disk).")
    max_examples: int | None = field(None, "Use only the first N examples (handy for smoke tests).", ge=1)
    mix: list[float] | None = field(
        None, "A mixture: one weight per entry of `path`, each a source. A weight <= 1 takes that fraction of its "
        "source's rows, one > 1 that many rows (a source with fewer repeats whole, then a sample); drawn with "
        "mix_seed, the same rows every run (Open-Instruct's dataset_mixer). None: every row of every file once.",
    )  # fmt: skip
    mix_seed: int = field(0, "Seed of the rows a mixture draws from each source.")

    @property
    def paths(self) -> list[str]:
        """`path` as a list: its entries, or the one path."""
        return self.path if isinstance(self.path, list) else [self.path]

    def check(self) -> list[str]:
        problems = []
        if self.mix is not None:
            paths = self.paths
            if len(self.mix) != len(paths):
                problems.append(f"mix: {len(self.mix)} weight(s) for {len(paths)} path(s); give one weight per "
                                "entry of path")  # fmt: skip
            bad = [w for w in self.mix if w <= 0 or (w > 1 and w != int(w))]
            if bad:
                problems.append(f"mix: {bad[0]} is not a fraction in (0, 1] or a whole number of rows > 1")
            if self.streaming:
                problems.append("mix: a mixture draws rows by index; it cannot stream (set streaming: false)")
        if self.format not in ("auto", "jsonl", "json", "parquet", "text"):
            problems.append(f"format: got {self.format!r}, expected one of auto, jsonl, json, parquet, text")
        if self.text_sample_by not in ("line", "paragraph", "document"):
            problems.append(f"text_sample_by: got {self.text_sample_by!r}, expected one of line, paragraph, document")
        if isinstance(self.path, list) and not self.path:
            problems.append("path: the list of files is empty")
        return problems


# --- loading ----------------------------------------------------------------------------------------------------


def load_config(cls: type, path: str | Path | None, overrides: list[str] = ()) -> Any:
    """Read `path` (YAML, optional), apply `key.sub=value` overrides, validate into `cls`; raise ConfigError."""
    where = str(path) if path else "command line"
    problems: list[str] = []
    raw = OmegaConf.create({})
    if path is not None:
        try:
            raw = OmegaConf.load(path)
        except FileNotFoundError:
            raise ConfigError(f"{path}: config file not found") from None
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML: {_one_line(exc)}") from None
        if not OmegaConf.is_dict(raw):
            raise ConfigError(f"{path}: the top level must be a mapping of keys to values")
    dotlist, override_keys = [], set()
    for item in overrides:
        key, sep, _ = item.partition("=")
        if not sep or not key.strip():
            problems.append(f"override {item!r}: expected key=value (e.g. train.lr=3e-4)")
            continue
        dotlist.append(item)
        override_keys.add(key.strip())
    if problems:
        raise ConfigError(problems)
    try:
        merged = OmegaConf.merge(raw, OmegaConf.from_dotlist(dotlist))
        data = OmegaConf.to_container(merged, resolve=True)
    except OmegaConfBaseException as exc:
        raise ConfigError(f"{where}: {_one_line(exc)}") from None

    return validate_dict(cls, data, where, override_keys)


def validate_dict(cls: type, data: Any, where: str, override_keys: set[str] = frozenset()) -> Any:
    """Validate plain data (already read from `where`) into `cls`; raise ConfigError listing every problem."""
    problems: list[str] = []
    try:
        cfg = TypeAdapter(cls).validate_python(data)
    except ValidationError as exc:
        for err in exc.errors():
            key = ".".join(str(part) for part in err["loc"])
            source = "command line" if key in override_keys else where
            problems.append(f"{source}: {_describe(cls, err, key)}")
        raise ConfigError(problems) from None
    problems = [f"{where}: {p}" for p in collect_checks(cfg)]
    if problems:
        raise ConfigError(problems)
    return cfg


def collect_checks(cfg: Any, prefix: str = "") -> list[str]:
    """Run `check()` of the config and of every nested section, prefixing each problem with its section."""
    problems = []
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            problems += collect_checks(value, f"{prefix}{f.name}.")
    if hasattr(cfg, "check"):
        problems += [f"{prefix}{p}" for p in cfg.check()]
    return problems


def _describe(cls: type, err: dict, key: str) -> str:
    """Turn one pydantic error into a sentence that names the key, the value and what was expected."""
    kind, value = err["type"], err.get("input")
    if kind in ("unexpected_keyword_argument", "extra_forbidden"):
        hint = suggest(key, all_keys(cls))
        return f"unknown key {key!r}" + (f" (did you mean {hint!r}?)" if hint else "")
    if kind == "missing":
        return f"{key}: required, not set (add `{key}: ...` to the config or {key}=... to the command line)"
    expected = _type_name(field_type(cls, key))
    shown = repr(value) if not isinstance(value, dict) else "a mapping"
    return f"{key}: got {shown}, expected {expected} ({err['msg'].lower()})"


def suggest(key: str, candidates: list[str]) -> str | None:
    """The closest valid key: by full dotted path first, then by the last part alone (`lr` -> `train.lr`)."""
    close = difflib.get_close_matches(key, candidates, n=1, cutoff=0.6)
    if close:
        return close[0]
    leaf = key.rsplit(".", 1)[-1]
    by_leaf = {c.rsplit(".", 1)[-1]: c for c in candidates}
    close = difflib.get_close_matches(leaf, list(by_leaf), n=1, cutoff=0.75)
    return by_leaf[close[0]] if close else None


def _section_class(annotation: Any) -> type | None:
    """The config dataclass inside an annotation (`X`, `X | None`), if any."""
    if dataclasses.is_dataclass(annotation):
        return annotation
    for arg in typing.get_args(annotation):
        if dataclasses.is_dataclass(arg):
            return arg
    return None


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def all_keys(cls: type, prefix: str = "") -> list[str]:
    """Every dotted key a config class accepts, sections included."""
    keys = []
    for name, annotation in _hints(cls).items():
        if name not in {f.name for f in dataclasses.fields(cls)}:
            continue
        keys.append(prefix + name)
        section = _section_class(annotation)
        if section is not None:
            keys += all_keys(section, f"{prefix}{name}.")
    return keys


def field_type(cls: type, key: str) -> Any:
    """The annotation of a dotted key, or None where the key leads into a non-dataclass value (dicts, lists)."""
    annotation: Any = cls
    for part in key.split("."):
        section = _section_class(annotation)
        if section is None:
            return None
        annotation = _hints(section).get(part)
    return annotation


def _type_name(annotation: Any) -> str:
    if annotation is None:
        return "a different value"
    if typing.get_origin(annotation) in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(annotation))
    if annotation is type(None):
        return "null"
    if typing.get_origin(annotation) is typing.Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(annotation))
    if typing.get_origin(annotation) is not None:
        return str(annotation).replace("typing.", "")
    return getattr(annotation, "__name__", str(annotation))


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())


# --- saving and help --------------------------------------------------------------------------------------------


def to_dict(cfg: Any) -> dict:
    """The resolved config as plain data (what config.yaml holds)."""
    return dataclasses.asdict(cfg)


def dump_yaml(cfg: Any) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False, allow_unicode=True)


def describe_fields(cls: type, prefix: str = "") -> list[tuple[str, str, str, str]]:
    """(key, type, default, help) for every field, sections expanded, for `llmpipe <stage> --help`."""
    rows = []
    for f in dataclasses.fields(cls):
        annotation = _hints(cls)[f.name]
        section = _section_class(annotation)
        info = f.default if isinstance(f.default, type(Field())) else None
        help_text = (info.description if info is not None else "") or ""
        if section is not None:
            rows.append((prefix + f.name, "section", "", help_text))
            rows += describe_fields(section, f"{prefix}{f.name}.")
            continue
        if info is None or info.is_required():
            default = "required"
        elif info.default_factory is not None:
            default = repr(info.default_factory())
        else:
            default = repr(info.default)
        rows.append((prefix + f.name, _type_name(annotation), default, help_text))
    return rows
