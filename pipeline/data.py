"""The data layer: local files or hub datasets in, a `datasets` Dataset out, bad data reported before any compute.

Local files go through `datasets` too (memory-mapped Arrow, cached on disk), so a corpus larger than memory works
the same as a small one; `streaming: true` avoids even the on-disk copy. Errors name the file and line (malformed
JSON), the columns present (missing column), or the data source (empty data).
"""

from __future__ import annotations

import glob
import json
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from pipeline.config import DataConfig, UserError
from pipeline.distributed import is_main_process
from pipeline.gguf import missing_file_problem
from pipeline.layouts import public_layouts

_EXTENSION_FORMATS = {".jsonl": "jsonl", ".json": "json", ".parquet": "parquet", ".txt": "text", ".text": "text"}
# `datasets` builder name for each format: JSON Lines and JSON arrays share one builder.
_BUILDERS = {"jsonl": "json", "json": "json", "parquet": "parquet", "text": "text"}


# --- locating files ---------------------------------------------------------------------------------------------


def local_files(cfg: DataConfig) -> list[str] | None:
    """The local files `cfg.path` names, sorted; None if it names a hub dataset instead."""
    specs = [cfg.path] if isinstance(cfg.path, str) else cfg.path
    files: list[str] = []
    for spec in specs:
        spec = os.path.expanduser(spec)
        if glob.has_magic(spec):
            matches = sorted(p for p in glob.glob(spec, recursive=True) if os.path.isfile(p))
            if not matches:
                raise UserError(f"data.path: the pattern {spec!r} matches no file")
            files += matches
        elif os.path.isdir(spec):
            matches = sorted(str(p) for p in Path(spec).rglob("*") if p.suffix in _EXTENSION_FORMATS)
            if not matches:
                raise UserError(f"data.path: the folder {spec!r} holds no .jsonl/.json/.parquet/.txt file")
            files += matches
        elif os.path.isfile(spec):
            files.append(spec)
        elif Path(spec).suffix in _EXTENSION_FORMATS or spec.startswith((".", "/", "~")) or len(specs) > 1:
            raise UserError(f"data.path: file not found: {spec!r}")
        else:
            return None  # "org/name" with no such local path: a hub dataset
    return files


def check_data_paths(cfg, produced: list[Path] = ()) -> None:
    """Cheap checks that need no compute: every local data path named in a config (any section, at any depth)
    exists, except those inside `produced` folders (a pipeline's earlier stages write them), and so does every
    .gguf model file a key names."""
    import dataclasses

    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if isinstance(value, str) and (problem := missing_file_problem(f.name, value)):
            raise UserError(problem)
        if isinstance(value, DataConfig):
            paths = [value.path] if isinstance(value.path, str) else value.path
            kept = [p for p in paths if not any(Path(p).is_relative_to(folder) for folder in produced)]
            if kept:
                local_files(dataclasses.replace(value, path=kept))
        elif dataclasses.is_dataclass(value):
            check_data_paths(value, produced)


def file_format(cfg: DataConfig, files: list[str]) -> str:
    if cfg.format != "auto":
        return cfg.format
    formats = {_EXTENSION_FORMATS.get(Path(f).suffix) for f in files}
    if None in formats or len(formats) != 1:
        suffixes = sorted({Path(f).suffix or "(none)" for f in files})
        raise UserError(
            f"data.path: cannot tell one format from the extensions {suffixes}; "
            "use one of .jsonl/.json/.parquet/.txt, or set data.format"
        )
    return formats.pop()


# --- loading ----------------------------------------------------------------------------------------------------


def load_examples(cfg: DataConfig, required: list[str]):
    """Load the configured data with `required` columns (after `cfg.columns` renaming), or raise a UserError.

    Returns a `datasets.Dataset`, or an `IterableDataset` when `cfg.streaming` is set. A mixture (`cfg.mix`) is
    its sources' rows (load_mixture) one after another, cut to the columns all of them have.
    """
    import datasets

    if cfg.mix is not None:
        return concatenate_sources([(name, ds) for name, ds, _ in load_mixture(cfg, required)])
    files = local_files(cfg)
    source = ", ".join(files[:3]) + (f" (+{len(files) - 3} more)" if files and len(files) > 3 else "") if files else ""
    if not is_main_process():
        datasets.disable_progress_bars()
    try:
        if files is not None:
            fmt = file_format(cfg, files)
            kwargs = {"sample_by": cfg.text_sample_by} if fmt == "text" else {}
            ds = datasets.load_dataset(
                _BUILDERS[fmt], data_files=files, split="train", streaming=cfg.streaming, **kwargs
            )
        else:
            source = f"hub dataset {cfg.path!r}"
            ds = datasets.load_dataset(
                cfg.path, cfg.name, split=cfg.split, revision=cfg.revision, streaming=cfg.streaming
            )
    except UserError:
        raise
    except Exception as exc:  # noqa: BLE001 - any loader failure becomes one readable message
        if files is not None and fmt in ("jsonl", "json"):
            for path in files:
                _find_json_error(path, fmt)  # raises with file:line when it finds the bad line
        if files is not None and len(files) > 1 and not cfg.streaming:
            ds = _load_apart(files, fmt, kwargs)  # files whose columns differ: keep the ones they share
        else:
            hint = "" if files is not None else " (is the name right, and is there a network connection?)"
            raise UserError(f"data: could not load {source}{hint}: {' '.join(str(exc).split())[:500]}") from None

    if cfg.max_examples is not None:
        ds = ds.take(cfg.max_examples) if cfg.streaming else ds.select(range(min(cfg.max_examples, len(ds))))
    ds = _rename_columns(ds, cfg, required, source)
    if not cfg.streaming and len(ds) == 0:
        raise UserError(f"data: {source} holds no examples")
    return ds


def _load_apart(files: list[str], fmt: str, kwargs: dict):
    """Files that `datasets` cannot read as one table (their columns differ, e.g. a preference file and the pairs
    stage's output with score columns): each read alone, cut to the columns all of them have, concatenated."""
    import datasets

    parts = []
    for path in files:
        try:
            parts.append((path, datasets.load_dataset(_BUILDERS[fmt], data_files=[path], split="train", **kwargs)))
        except Exception as exc:  # noqa: BLE001
            raise UserError(f"data: could not load {path}: {' '.join(str(exc).split())[:500]}") from None
    return concatenate_sources(parts)


def concatenate_sources(parts: list[tuple[str, object]]):
    """Named datasets one after another, cut to the columns all of them have (the others are named)."""
    import datasets

    if len(parts) == 1:
        return parts[0][1]
    tables = [part for _, part in parts]
    shared = [c for c in tables[0].column_names if all(c in part.column_names for part in tables)]
    dropped = sorted({c for part in tables for c in part.column_names} - set(shared))
    if not shared:
        columns = {name: part.column_names for name, part in parts}
        raise UserError(f"data: the sources have no column in common ({columns}); give them the same columns "
                        "(data.columns renames one source's)")  # fmt: skip
    if dropped and is_main_process():
        print(f"data: the files' columns differ; using the ones all have {shared} (not {dropped})", flush=True)
    try:
        return datasets.concatenate_datasets([part.select_columns(shared) for part in tables])
    except ValueError as exc:
        kinds = {name: str(part.select_columns(shared).features)[:200] for name, part in parts}
        raise UserError(f"data: the files hold the same columns with different types, e.g. {kinds}: "
                        f"{' '.join(str(exc).split())[:300]}") from None  # fmt: skip


# --- mixtures ---------------------------------------------------------------------------------------------------


def mixture_rows(n_rows: int, weight: float, seed: int, source: int) -> np.ndarray:
    """The row indices a mixture source of `n_rows` gives for its weight: a fraction (<= 1) is a seeded sample
    without repeats, a count (> 1) the whole source as often as it fits and then a seeded sample; in file order
    within each pass. A pure function of (seed, source): the same rows every run and on every process."""
    rng = np.random.default_rng([seed, source])
    if weight <= 1:
        return np.sort(rng.permutation(n_rows)[: max(1, round(weight * n_rows))])
    count = int(weight)
    return np.concatenate(
        [np.tile(np.arange(n_rows), count // n_rows), np.sort(rng.permutation(n_rows)[: count % n_rows])]
    )


def load_mixture(cfg: DataConfig, required: list[str]) -> list[tuple[str, object, np.ndarray]]:
    """Each source of a mixture (an entry of `cfg.path` with its `cfg.mix` weight) loaded alone, with `required`
    columns, and cut or repeated to its weight: [(source, dataset, the source's row index of each row)]. Sources
    may differ in columns (sft mixes conversations with plain text); load_examples keeps the columns they share."""
    import dataclasses

    parts, counts = [], []
    for source, (path, weight) in enumerate(zip(cfg.paths, cfg.mix, strict=True)):
        ds = load_examples(dataclasses.replace(cfg, path=path, mix=None), required)
        rows = mixture_rows(len(ds), weight, cfg.mix_seed, source)
        parts.append((path, ds.select(rows), rows))
        counts.append(f"{path}: {len(parts[-1][1])} of {len(ds)} rows")
    if is_main_process():
        print(f"data: a mixture of {'; '.join(counts)}", flush=True)
    return parts


def column_names(ds) -> list[str]:
    """A dataset's columns, read from its first row where the loader does not name them (streaming JSON)."""
    names = ds.column_names
    if names is None:  # streaming JSON does not know its columns until it reads a row
        first = next(iter(ds), None)
        names = list(first) if first is not None else []
    return list(names)


def _rename_columns(ds, cfg: DataConfig, required: list[str], source: str):
    present = column_names(ds)
    for expected, actual in cfg.columns.items():
        if actual not in present:
            raise UserError(
                f"data.columns.{expected}: column {actual!r} is not in {source}; columns present: {present}"
            )
    renames = {actual: expected for expected, actual in cfg.columns.items() if actual != expected}
    if renames:
        ds = ds.rename_columns(renames)
        present = [renames.get(c, c) for c in present]
    converted = public_layouts(ds, source, present)
    if converted is not ds:  # a public layout became trl's: its columns changed
        ds, present = converted, column_names(converted)
    missing = [c for c in required if c not in present]
    if missing:
        example = f"data.columns.{missing[0]}=<column>"
        raise UserError(
            f"data: {source} has no column {missing[0]!r} (needed: {required}); columns present: {present}. "
            f"Map one with {example}"
        )
    return ds


def _find_json_error(path: str, fmt: str) -> None:
    """Raise a UserError naming file:line for the first line of `path` that is not a JSON object."""
    with open(path, encoding="utf-8", errors="replace") as f:
        if fmt == "json" and Path(path).suffix == ".json":
            head = f.read(1)
            f.seek(0)
            if head == "[":
                try:
                    rows = json.load(f)
                except json.JSONDecodeError as exc:
                    raise UserError(f"{path}:{exc.lineno}: malformed JSON: {exc.msg}") from None
                bad = [i for i, row in enumerate(rows) if not isinstance(row, dict)]
                if bad:
                    raise UserError(f"{path}: element {bad[0]} of the JSON array is not an object")
                return
    problems: list[str] = []
    for _ in jsonl_objects(path, problems):
        if problems:
            break
    if problems:
        raise UserError(problems[0])


def jsonl_objects(path: str | Path, problems: list[str]) -> Iterator[tuple[int, dict]]:
    """(line number, object) for each line of a JSON Lines file; a line that is no JSON object goes to `problems`
    as 'file:line: ...', and reading goes on (so a caller can report every bad line at once)."""
    with open(path, encoding="utf-8", errors="replace") as f:
        for lineno, text in enumerate(f, 1):
            if not text.strip():
                continue
            try:
                row = json.loads(text)
            except json.JSONDecodeError as exc:
                problems.append(f"{path}:{lineno}: malformed JSON line: {exc.msg} (column {exc.colno})")
                continue
            if not isinstance(row, dict):
                problems.append(f"{path}:{lineno}: expected a JSON object per line, got {type(row).__name__}")
                continue
            yield lineno, row


# --- text iteration, tokenization and packing -------------------------------------------------------------------


def iter_texts(ds, column: str = "text", batch_size: int = 1000) -> Iterator[list[str]]:
    """Batches of non-empty strings from one column; a non-string value is an error naming its row."""
    ds = ds.select_columns([column])
    row = 0
    for batch in ds.iter(batch_size=batch_size):
        texts = batch[column]
        for i, text in enumerate(texts):
            if not isinstance(text, str):
                raise UserError(f"data: row {row + i}: column {column!r} holds {type(text).__name__}, not text")
        row += len(texts)
        yield [t for t in texts if t]


def encode_and_pack(tokenizer, texts: list[str], block_size: int, eos_id: int) -> np.ndarray:
    """Tokenize documents, end each with EOS, concatenate, and cut into full blocks of `block_size` tokens.

    The tail shorter than a block is dropped (as in Hugging Face's run_clm): with large batches it is a tiny share.
    Calls the Rust tokenizer directly: the Python wrapper's per-call overhead costs ~10% of throughput here.
    """
    backend = getattr(tokenizer, "backend_tokenizer", tokenizer)
    encode = getattr(backend, "encode_batch_fast", backend.encode_batch)
    encodings = encode(texts, add_special_tokens=False)
    lengths = np.fromiter((len(e.ids) + 1 for e in encodings), dtype=np.int64, count=len(encodings))
    flat = np.empty(int(lengths.sum()), dtype=np.int32)
    ends = np.cumsum(lengths)
    for encoding, end, length in zip(encodings, ends, lengths, strict=True):
        flat[end - length : end - 1] = encoding.ids
    flat[ends - 1] = eos_id
    usable = (len(flat) // block_size) * block_size
    return flat[:usable].reshape(-1, block_size)


def pack_dataset(docs, tokenizer, block_size: int, tokenizer_hash: str, num_proc: int = 1):
    """Tokenize a dataset of documents ('text') into fixed blocks of `block_size` tokens, EOS between documents.

    Map-style input is processed with `num_proc` workers and cached by `datasets` under a fingerprint made from the
    data, the tokenizer's content hash and the block size: a second run on unchanged inputs reuses the cache.
    Streaming input is packed lazily as it is read.
    """
    import hashlib

    eos = tokenizer.eos_token_id
    if eos is None:
        raise UserError("tokenizer: it has no eos_token; pretraining puts EOS between documents")

    def pack(batch):
        return {"input_ids": encode_and_pack(tokenizer, [t for t in batch["text"] if t], block_size, eos)}

    remove = [c for c in (docs.column_names or ["text"])]
    if not hasattr(docs, "_fingerprint"):  # IterableDataset
        return docs.map(pack, batched=True, batch_size=1000, remove_columns=remove)
    key = f"{docs._fingerprint}-{tokenizer_hash}-{block_size}-pack-v1".encode()
    return docs.map(
        pack, batched=True, batch_size=1000, remove_columns=remove, num_proc=num_proc if len(docs) > 1000 else None,
        new_fingerprint=hashlib.sha256(key).hexdigest()[:16], desc=f"tokenize + pack into {block_size}-token blocks",
    )  # fmt: skip


def describe_data(data: DataConfig) -> dict:
    """What a manifest records about a data section: content hashes of local files, or the hub name + revision."""
    from pipeline.artifacts import describe_input

    files = local_files(data)
    return describe_input(files) if files is not None else {"hub": data.path, "revision": data.revision}


def stage_inputs(cfg, *keys: str) -> dict:
    """The manifest's `inputs`: for each config key that is set, a data section's describe_data or a model/folder
    path's content hashes (artifacts.describe_input), in the order given."""
    from pipeline.artifacts import describe_input

    inputs = {}
    for key in keys:
        value = cfg
        for part in key.split("."):  # a section's key too, e.g. ptx.data
            value = getattr(value, part)
        if value is not None:
            inputs[key] = describe_data(value) if isinstance(value, DataConfig) else describe_input(value)
    return inputs
